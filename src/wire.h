/* wire.h: the bodies of the frames (TASK, RESULT, REPORT, RESUME) and the job payload:
 * their layout, named, and the one writer and reader of each field. The
 * framing itself (header, fds) is channel.h's. Everything is
 * little-endian.
 *
 * Job payload (built by the executor, sliced into TASK frames):
 *   u32 fnlen, fn, then per item: u32 len, bytes
 * TASK (parent -> worker): a header, then
 *   inline: the payload's u32 fnlen and fn, then the items sent
 *   FD:     where in the memfd (the whole payload) the fn and items are
 *   with PP_TASK_CAPTURE, last: u64 max_output (bytes kept per stream)
 * RESULT (worker -> parent): a header, then
 *   inline: per item: u8 status, u32 len, bytes
 *   FD:     u8 status, u64 len (count is 1; the bytes are the memfd)
 *   a status with PP_RES_OUTPUT: the item's bytes end with its output,
 *   stdout, stderr, u32 outlen, u32 errlen (pp_output_split)
 * OUTBUF (worker -> parent): u8 part (PP_OUT_*), the fd's role in the
 *   capture; the area's memfd is a pp_outarea
 * REPORT (worker -> parent): u64 seq (the item running), then the
 *   encoded values of procpool.report (a value list)
 * RESUME (parent -> worker): u64 seq, the last item taken back
 */
#ifndef PP_WIRE_H
#define PP_WIRE_H

#include <stdint.h>

#include "channel.h"

/* u32 length before the function and before each item */
#define PP_LEN_PREFIX 4
static inline uint32_t pp_wire_len(const unsigned char *p) { return pp_get32(p); }
static inline void pp_wire_put_len(unsigned char *p, uint32_t n) { pp_put32(p, n); }

/* TASK header: u64 seq0, u32 count, u32 flags (PP_TASK_*) */
#define PP_TASK_HDR 16
typedef struct pp_task_hdr {
  uint64_t seq0;
  uint32_t count, flags;
} pp_task_hdr;
static inline void pp_task_hdr_put(unsigned char *q, const pp_task_hdr *h) {
  pp_put64(q, h->seq0);
  pp_put32(q + 8, h->count);
  pp_put32(q + 12, h->flags);
}
static inline void pp_task_hdr_get(const unsigned char *q, pp_task_hdr *h) {
  h->seq0 = pp_get64(q);
  h->count = pp_get32(q + 8);
  h->flags = pp_get32(q + 12);
}

/* TASK with FD, after the header: u64 fnoff, u32 fnlen, u64 itemsoff,
 * u64 itemslen (byte ranges of the memfd) */
#define PP_TASK_FD_BODY (PP_TASK_HDR + 28)
typedef struct pp_task_fd {
  uint64_t fnoff;
  uint32_t fnlen;
  uint64_t itemsoff, itemslen;
} pp_task_fd;
static inline void pp_task_fd_put(unsigned char *q, const pp_task_fd *r) {
  pp_put64(q, r->fnoff);
  pp_put32(q + 8, r->fnlen);
  pp_put64(q + 12, r->itemsoff);
  pp_put64(q + 20, r->itemslen);
}
static inline void pp_task_fd_get(const unsigned char *q, pp_task_fd *r) {
  r->fnoff = pp_get64(q);
  r->fnlen = pp_get32(q + 8);
  r->itemsoff = pp_get64(q + 12);
  r->itemslen = pp_get64(q + 20);
}

/* RESULT header: u64 seq0, u32 count, u32 0, u64 elapsed_ns (from the
 * first item's start to the last one's end) */
#define PP_RESULT_HDR 24
typedef struct pp_result_hdr {
  uint64_t seq0;
  uint32_t count;
  uint64_t elapsed_ns;
} pp_result_hdr;
static inline void pp_result_hdr_put(unsigned char *q, const pp_result_hdr *h) {
  pp_put64(q, h->seq0);
  pp_put32(q + 8, h->count);
  pp_put32(q + 12, 0);
  pp_put64(q + 16, h->elapsed_ns);
}
static inline void pp_result_hdr_get(const unsigned char *q, pp_result_hdr *h) {
  h->seq0 = pp_get64(q);
  h->count = pp_get32(q + 8);
  h->elapsed_ns = pp_get64(q + 16);
}

/* One inline result: u8 status (PP_RES_*), u32 len, then the bytes */
#define PP_RESULT_ITEM 5
static inline void pp_result_item_put(unsigned char *q, int status, uint32_t len) {
  q[0] = (unsigned char)status;
  pp_put32(q + 1, len);
}
static inline uint32_t pp_result_item_len(const unsigned char *q) { return pp_get32(q + 1); }

/* The result of a FD frame: u8 status, u64 len of the memfd's bytes */
#define PP_RESULT_FD_ITEM 9
static inline void pp_result_fd_item_put(unsigned char *q, int status, uint64_t len) {
  q[0] = (unsigned char)status;
  pp_put64(q + 1, len);
}
static inline uint64_t pp_result_fd_item_len(const unsigned char *q) { return pp_get64(q + 1); }

/* A RESUME frame's body: u64 seq, the last item taken back. */
#define PP_RESUME_BODY 8
static inline void pp_resume_put(unsigned char *q, uint64_t last) { pp_put64(q, last); }
static inline uint64_t pp_resume_get(const unsigned char *q) { return pp_get64(q); }

/* A capture TASK frame ends with u64 max_output: the size of the
 * worker's capture area, made at its first such frame. */
#define PP_TASK_CAPTURE_TAIL 8
static inline void pp_task_capture_put(unsigned char *q, uint64_t max_output) {
  pp_put64(q, max_output);
}
static inline uint64_t pp_task_capture_get(const unsigned char *q) { return pp_get64(q); }

/* The output after a result's bytes: stdout, stderr, then their lengths,
 * last, so that the result and its output are one range of the frame
 * (or memfd) and the result is its first part. */
#define PP_OUTPUT_TRAILER 8
static inline void pp_output_trailer_put(unsigned char *q, uint32_t outlen, uint32_t errlen) {
  pp_put32(q, outlen);
  pp_put32(q + 4, errlen);
}
/* Split an item's bytes p[0..len) into result (its length), stdout and
 * stderr (their offsets and lengths). -1 when the trailer does not fit. */
static inline int pp_output_split(const char *p, size_t len, size_t *reslen, size_t *outoff,
                                  size_t *outlen, size_t *erroff, size_t *errlen) {
  if (len < PP_OUTPUT_TRAILER) return -1;
  const unsigned char *t = (const unsigned char *)p + len - PP_OUTPUT_TRAILER;
  uint64_t o = pp_get32(t), e = pp_get32(t + 4);
  if (o + e > len - PP_OUTPUT_TRAILER) return -1;
  *reslen = len - PP_OUTPUT_TRAILER - (size_t)(o + e);
  *outoff = *reslen;
  *outlen = (size_t)o;
  *erroff = *reslen + (size_t)o;
  *errlen = (size_t)e;
  return 0;
}

/* A worker's capture, as the parent holds it (OUTBUF parts): the area,
 * then per stream (stdout, stderr) a memfd whose bytes from base[k] to
 * its size are the output of item `seq` so far (kept up to cap bytes;
 * the rest, a hole, counts bytes dropped; a size below base: none yet),
 * and the read end of the pipe the drain thread empties into it (what
 * it had not moved yet). The area is written by the worker
 * (atomically), read by the parent once the worker is dead; `lost`
 * counts bytes dropped because a file could not grow. Native byte order:
 * it never leaves the machine. */
enum { PP_OUT_AREA = 0, PP_OUT_FILE = 1, PP_OUT_PIPE = 3, PP_OUT_PARTS = 5 };
typedef struct pp_outarea {
  uint64_t seq, cap;
  uint64_t base[2], lost[2];
} pp_outarea;
#define PP_OUTAREA_HDR 64
#define PP_OUTBUF_BODY 1
static inline void pp_outbuf_put(unsigned char *q, int part) { q[0] = (unsigned char)part; }
static inline int pp_outbuf_get(const unsigned char *q) { return q[0]; }
/* Appended to a stream that lost bytes (a printf format of the count). */
#define PP_OUTPUT_DROPPED "\n[procpool: %llu bytes of output dropped]\n"
#define PP_OUTPUT_DROPPED_MAX 64 /* its length, at most */
/* REPORT header: u64 seq; the encoded values follow */
#define PP_REPORT_HDR 8
static inline void pp_report_hdr_put(unsigned char *q, uint64_t seq) { pp_put64(q, seq); }
static inline uint64_t pp_report_hdr_get(const unsigned char *q) { return pp_get64(q); }

#endif
