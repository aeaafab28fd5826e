/* wire.h: the bodies of the frames (TASK, RESULT, REPORT) and the job payload:
 * their layout, named, and the one writer and reader of each field. The
 * framing itself (header, fds) is channel.h's. Everything is
 * little-endian.
 *
 * Job payload (built by the executor, sliced into TASK frames):
 *   u32 fnlen, fn, then per item: u32 len, bytes
 * TASK (parent -> worker): a header, then
 *   inline: the payload's u32 fnlen and fn, then the items sent
 *   FD:     where in the memfd (the whole payload) the fn and items are
 * RESULT (worker -> parent): a header, then
 *   inline: per item: u8 status, u32 len, bytes
 *   FD:     u8 status, u64 len (count is 1; the bytes are the memfd)
 * REPORT (worker -> parent): u64 seq (the item running), then the
 *   encoded values of procpool.report (a value list)
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

/* REPORT header: u64 seq; the encoded values follow */
#define PP_REPORT_HDR 8
static inline void pp_report_hdr_put(unsigned char *q, uint64_t seq) { pp_put64(q, seq); }
static inline uint64_t pp_report_hdr_get(const unsigned char *q) { return pp_get64(q); }

#endif
