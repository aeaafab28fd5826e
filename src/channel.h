/* channel.h: framed messages over a socket, with memfd payloads passed as fds. */
#ifndef PP_CHANNEL_H
#define PP_CHANNEL_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "le.h"

/*
 * A frame is an 8-byte header (u32 body length, u8 type, u8 flags, u16 0)
 * and a body, little-endian. With PP_FF_FD the frame also owns the next fd
 * passed on the socket (SCM_RIGHTS): a memfd holding its large payload.
 * The bodies of TASK and RESULT are wire.h's.
 * INITFAIL (worker -> parent): the initializer's error, as text.
 * READY (worker -> parent): initialized; empty body.
 * REPORT (worker -> parent): procpool.report's values (wire.h).
 * OUTBUF (worker -> parent, FD): one part of the worker's capture (the
 * body's u8 says which, wire.h): its area, a stream's file, a pipe's
 * read end; all sent once, before its first captured item, and read by
 * the parent only once the worker is dead.
 * RETIRE (worker -> parent): the worker exits after the results sent so
 * far (a memory error left it unfit); empty body. Not a loss: its
 * unstarted items go to other workers.
 * RESUME (parent -> worker): the parent took back the items the worker
 * had not started, up to a seq (wire.h; see pp_page): the worker drops
 * them and goes on with the frames after this one.
 */
#define PP_FRAME_HDR 8

enum {
  PP_FR_TASK = 1,
  PP_FR_RESULT = 2,
  PP_FR_INITFAIL = 3,
  PP_FR_READY = 4,
  PP_FR_REPORT = 5,
  PP_FR_OUTBUF = 6,
  PP_FR_RETIRE = 7,
  PP_FR_RESUME = 8,
};
enum { PP_FF_FD = 0x01 };
enum {
  PP_TASK_TIMED = 0x01,   /* worker records each item's start time */
  PP_TASK_CAPTURE = 0x02, /* the items' stdout and stderr come back with them */
  /* FD: the frame holds every item of its memfd, which no other worker is
   * sent unless an item is taken back: once the worker has claimed them
   * all, the memfd is its own (its spare, buf.h) */
  PP_TASK_WHOLE = 0x04
};
enum { PP_RES_OK = 1, PP_RES_ERROR = 2 };
enum { PP_RES_OUTPUT = 0x80 }; /* on a result's status: its bytes end with output */

/* The `limits` option, as the parent asks for it (reslimit.h applies it in
 * each worker); zero fields ask for nothing. */
typedef struct pp_limits {
  uint64_t memory; /* bytes a worker may allocate beyond what it holds at start */
  uint32_t cpu;    /* CPU seconds each task may use */
  uint32_t nofile; /* open files (soft and hard limit) */
  int32_t nice;    /* added to the workers' niceness */
  uint32_t pad;
} pp_limits;

/* Zygote control messages (a SOCK_SEQPACKET pair). SPAWNED carries the
 * worker's channel, its pidfd (or a stand-in), its progress page (a memfd)
 * and the read end of its stderr pipe. */
enum {
  PP_Z_SPAWN = 1,
  PP_Z_SPAWNED,
  PP_Z_SPAWNFAIL,
  PP_Z_EXITED,
  PP_Z_CONFIG, /* spawn context, parent -> zygote: the initializer (a memfd) */
  PP_Z_HELLO,  /* spawn context, zygote -> parent: ready (err != 0: failed) */
  PP_Z_SIGNAL, /* hosts, parent -> host proxy: signal the worker of slot/gen (status) */
};
/* pp_zmsg.flags from a host proxy (hostproxy.h): SPAWNED and EXITED of a
 * worker on a host (no pid of this machine: it is signalled with
 * PP_Z_SIGNAL, its death named by slot and gen); SPAWNFAIL of a slot
 * whose host is gone for good (never asked again). */
enum { PP_ZF_REMOTE = 1, PP_ZF_GONE = 2, PP_ZF_LOST = 4 };
/* (LOST: an EXITED because its host was lost; text says why. A remote
 * SPAWNED's text is its host's name.) */
typedef struct pp_zmsg {
  uint32_t type, slot, gen;
  int32_t pid, status, err, nfds;
  uint32_t flags, pad;
  uint64_t len;   /* CONFIG: bytes of the initializer list in the memfd */
  pp_limits lim;  /* CONFIG: the workers' limits */
  char text[200]; /* HELLO with err: why the zygote cannot start */
} pp_zmsg;

/* Payloads at least this large travel in a memfd, not through the socket. */
#define PP_MEMFD_MIN (256u << 10)

/* Shared page per worker: what it is running, so a death or a deadline is
 * charged to the right item, and the claim that lets the parent take back
 * what a worker has not started (an item queued behind a long one, while
 * another worker is idle).
 *
 * `started` is the seq of the item last started. The worker claims each
 * item before running it by a compare-and-swap from the value it last
 * wrote to the item's seq. The parent takes back every item after the
 * one running by a compare-and-swap that sets PP_STARTED_REVOKED on the
 * same value: exactly one of the two succeeds, so an item is either run
 * by this worker or requeued by the parent, never both, never neither.
 * A worker whose claim fails drops what it was sent up to the RESUME
 * frame that follows (the parent sends it with the revocation), then
 * clears the flag. */
typedef struct pp_page {
  uint64_t started;    /* seq of the item last started (0: none yet) */
  uint64_t started_ns; /* CLOCK_MONOTONIC of that start, when timed */
} pp_page;
#define PP_STARTED_REVOKED (UINT64_C(1) << 63)

/* sendmsg/recvmsg with fds (SCM_RIGHTS), EINTR retried, no SIGPIPE.
 * pp_send_fds attaches nfds fds (0..4) to the bytes p[0..n). pp_recv_fds
 * receives into p[0..n) and up to maxfds fds (CLOEXEC; extra ones are
 * closed), setting *nfds. Both return what sendmsg/recvmsg return. */
long pp_send_fds(int sock, const void *p, size_t n, const int *fds, int nfds, int flags);
long pp_recv_fds(int sock, void *p, size_t n, int *fds, int maxfds, int *nfds, int flags);

/* Append a frame header; the body follows. Returns the header offset so
 * the length can be patched with pp_frame_end. */
size_t pp_frame_begin(pp_wbuf *b, int type, int flags);
void pp_frame_end(pp_wbuf *b, size_t hdr);

/* Outgoing bytes, with the fds to pass at given offsets. */
typedef struct pp_fdmark {
  size_t at; /* byte offset in the buffer where the fd's frame starts */
  int fd;    /* owned: closed once sent */
} pp_fdmark;

typedef struct pp_out {
  pp_wbuf buf;
  size_t sent;
  pp_fdmark *fds;
  int nfds, capfds;
} pp_out;

void pp_out_init(pp_out *o);
void pp_out_free(pp_out *o);
/* The frame starting at `at` passes `fd` (taken over). 0 or an errno. */
int pp_out_addfd(pp_out *o, size_t at, int fd);
static inline size_t pp_out_pending(const pp_out *o) { return o->buf.n - o->sent; }
/* Write what the socket takes. 0 when all is written or it would block
 * (check pp_out_pending), else an errno (EPIPE etc.). */
int pp_out_flush(pp_out *o, int sock);

/* Incoming bytes and fds, parsed into frames. */
typedef struct pp_in {
  char *p;
  size_t n, cap, off; /* data at p[off..n) */
  int *fds;           /* received fds, in order */
  int nfds, capfds;
  int eof;
} pp_in;

void pp_in_init(pp_in *in);
void pp_in_free(pp_in *in);
/* Read what is available (nonblocking unless `block`). Returns bytes read,
 * 0 at EOF (in->eof set), -1 with errno (EAGAIN when nothing is there). */
long pp_in_read(pp_in *in, int sock, int block);

typedef struct pp_frame {
  int type, flags;
  const unsigned char *body; /* inline body */
  size_t len;
  int fd; /* for PP_FF_FD frames: the fd (now owned by the caller) */
} pp_frame;

/* The next complete frame, or 0 if none is buffered yet. -1 on a protocol
 * error (bad header, missing fd). The body stays valid until the next
 * pp_in_read or pp_in_next call. */
int pp_in_next(pp_in *in, pp_frame *f);
/* Bytes of the frame being received that are still missing (0 if none). */
size_t pp_in_missing(const pp_in *in);

#endif
