/* test_link.c: two links back to back over a socketpair or two pipes, as a
 * host proxy and its agent are over ssh: channel frames cross in order,
 * memfd payloads cross as chunks and arrive as memfds, control messages
 * reach the owner, stale incarnations are dropped, and the end of the
 * stream and a bad message are reported. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "channel.h"
#include "ctest.h"
#include "le.h"
#include "link.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* one end of a channel, as the engine or a worker holds it */
typedef struct end {
  int fd;
  pp_in in;
  pp_out out;
} end;

static void end_init(end *e, int fd) {
  e->fd = fd;
  pp_in_init(&e->in);
  pp_out_init(&e->out);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void end_free(end *e) {
  pp_in_free(&e->in);
  pp_out_free(&e->out);
  if (e->fd >= 0) close(e->fd);
}

static void put_frame(end *e, int type, const char *body, size_t n, int fd) {
  pp_wbuf_reserve(&e->out.buf, PP_FRAME_HDR + n);
  size_t h = pp_frame_begin(&e->out.buf, type, fd >= 0 ? PP_FF_FD : 0);
  memcpy(e->out.buf.p + e->out.buf.n, body, n);
  e->out.buf.n += n;
  pp_frame_end(&e->out.buf, h);
  if (fd >= 0) pp_out_addfd(&e->out, h, fd);
}

static int memfd_of(size_t n, unsigned seed) {
  int fd = memfd_create("t", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, (off_t)n) != 0) return -1;
  if (n) {
    unsigned char *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    for (size_t i = 0; i < n; i++) m[i] = (unsigned char)(i * 31 + seed + (i >> 12));
    munmap(m, n);
  }
  return fd;
}

static int memfd_is(int fd, size_t n, unsigned seed) {
  if (lseek(fd, 0, SEEK_END) != (off_t)n) return 0;
  if (!n) return 1;
  unsigned char *m = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) return 0;
  int ok = 1;
  for (size_t i = 0; i < n && ok; i++) ok = m[i] == (unsigned char)(i * 31 + seed + (i >> 12));
  munmap(m, n);
  return ok;
}

typedef struct ctrl_log {
  int type, count;
  char body[64];
} ctrl_log;

static int on_ctrl(void *ud, int type, const unsigned char *body, size_t len) {
  ctrl_log *c = ud;
  c->type = type;
  c->count++;
  size_t n = len < sizeof c->body - 1 ? len : sizeof c->body - 1;
  memcpy(c->body, body, n);
  c->body[n] = 0;
  return 0;
}

/* Step both links and flush the ends until `done` (or 20 s). */
typedef struct world {
  pp_link a, b;
  end ends[4]; /* 0,1: the engine's ends (slots 0, 1); 2,3: the workers' */
  ctrl_log ca, cb;
  int ea, eb; /* the last step's results */
} world;

static void turn(world *w) {
  struct pollfd p[16];
  int n = pp_link_pollfds(&w->a, p, 8);
  n += pp_link_pollfds(&w->b, p + n, 8);
  poll(p, (nfds_t)n, 5);
  w->ea = pp_link_step(&w->a, on_ctrl, &w->ca);
  w->eb = pp_link_step(&w->b, on_ctrl, &w->cb);
  for (int i = 0; i < 4; i++) {
    end *e = &w->ends[i];
    if (pp_out_pending(&e->out)) pp_out_flush(&e->out, e->fd);
    pp_in_read(&e->in, e->fd, 0);
  }
}

/* The next frame at end e, within 20 s; 1 if one came. */
static int next_frame(world *w, end *e, pp_frame *f) {
  double t = now() + 20;
  while (now() < t) {
    int r = pp_in_next(&e->in, f);
    if (r) return r > 0;
    turn(w);
  }
  return 0;
}

static void world_init(world *w, int sock) {
  memset(w, 0, sizeof *w);
  int s[2], r1[2], r2[2];
  if (sock) {
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s);
    pp_link_init(&w->a, s[0], s[0], 2);
    pp_link_init(&w->b, s[1], s[1], 2);
  } else { /* two pipes, as ssh's stdin and stdout */
    if (pipe2(r1, O_CLOEXEC) || pipe2(r2, O_CLOEXEC)) abort();
    pp_link_init(&w->a, r1[0], r2[1], 2);
    pp_link_init(&w->b, r2[0], r1[1], 2);
  }
  for (int i = 0; i < 2; i++) {
    int c[2], d[2];
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, c);
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, d);
    end_init(&w->ends[i], c[0]);
    pp_link_attach(&w->a, (uint32_t)i, 7, c[1]);
    end_init(&w->ends[2 + i], d[0]);
    pp_link_attach(&w->b, (uint32_t)i, 7, d[1]);
  }
}

static void world_free(world *w) {
  int fds[4] = {w->a.rfd, w->a.wfd, w->b.rfd, w->b.wfd};
  pp_link_free(&w->a);
  pp_link_free(&w->b);
  for (int i = 0; i < 4; i++) end_free(&w->ends[i]);
  for (int i = 0; i < 4; i++)
    if (i == 0 || fds[i] != fds[i - 1]) close(fds[i]);
}

static void crossing(int sock) {
  const char *kind = sock ? "socketpair" : "pipes";
  char name[128];
  world w;
  world_init(&w, sock);
  size_t big = (size_t)64 << 20, mid = (PP_LINK_CHUNK * 3) / 2;
  /* slot 0, engine to worker: small, 64 MiB memfd, small, empty memfd */
  put_frame(&w.ends[0], PP_FR_TASK, "first", 5, -1);
  put_frame(&w.ends[0], PP_FR_TASK, "big", 3, memfd_of(big, 1));
  put_frame(&w.ends[0], PP_FR_TASK, "after", 5, -1);
  put_frame(&w.ends[0], PP_FR_TASK, "empty", 5, memfd_of(0, 0));
  /* slot 1, worker to engine at the same time: a memfd, then a small one */
  put_frame(&w.ends[3], PP_FR_RESULT, "r1", 2, memfd_of(mid, 2));
  put_frame(&w.ends[3], PP_FR_RESULT, "r2", 2, -1);
  pp_link_send(&w.a, PP_L_CTRL + 3, "hello", 5);

  pp_frame f;
  int ok = next_frame(&w, &w.ends[2], &f) && f.type == PP_FR_TASK && f.len == 5 &&
           memcmp(f.body, "first", 5) == 0 && f.fd < 0;
  snprintf(name, sizeof name, "%s: a small frame crosses whole", kind);
  CHECK(ok, name);
  ok = next_frame(&w, &w.ends[2], &f) && f.len == 3 && memcmp(f.body, "big", 3) == 0 &&
       (f.flags & PP_FF_FD) && f.fd >= 0 && memfd_is(f.fd, big, 1);
  snprintf(name, sizeof name, "%s: a 64 MiB memfd arrives as a memfd with its bytes", kind);
  CHECK(ok, name);
  if (f.fd >= 0) close(f.fd);
  ok = next_frame(&w, &w.ends[2], &f) && f.len == 5 && memcmp(f.body, "after", 5) == 0;
  snprintf(name, sizeof name, "%s: the frame behind a memfd comes after it", kind);
  CHECK(ok, name);
  ok = next_frame(&w, &w.ends[2], &f) && f.fd >= 0 && memfd_is(f.fd, 0, 0);
  snprintf(name, sizeof name, "%s: an empty memfd crosses", kind);
  CHECK(ok, name);
  if (f.fd >= 0) close(f.fd);
  ok = next_frame(&w, &w.ends[1], &f) && f.type == PP_FR_RESULT && f.len == 2 &&
       memcmp(f.body, "r1", 2) == 0 && f.fd >= 0 && memfd_is(f.fd, mid, 2);
  snprintf(name, sizeof name, "%s: the other way at once, another slot's memfd", kind);
  CHECK(ok, name);
  if (f.fd >= 0) close(f.fd);
  ok = next_frame(&w, &w.ends[1], &f) && f.len == 2 && memcmp(f.body, "r2", 2) == 0;
  snprintf(name, sizeof name, "%s: and its next frame", kind);
  CHECK(ok, name);
  snprintf(name, sizeof name, "%s: a control message reaches the other owner", kind);
  CHECK(w.cb.count == 1 && w.cb.type == PP_L_CTRL + 3 && strcmp(w.cb.body, "hello") == 0, name);
  snprintf(name, sizeof name, "%s: no error on either side", kind);
  CHECK(w.ea == 0 && w.eb == 0, name);
  world_free(&w);
}

static void stale_and_ends(void) {
  world w;
  world_init(&w, 1);
  /* the worker of slot 0 was replaced on the agent's side: gen 8 */
  int d[2];
  socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, d);
  end_free(&w.ends[2]);
  end_init(&w.ends[2], d[0]);
  pp_link_attach(&w.b, 0, 8, d[1]);
  put_frame(&w.ends[0], PP_FR_TASK, "old", 3, memfd_of(4096, 3));
  put_frame(&w.ends[1], PP_FR_TASK, "mark", 4, -1);
  pp_frame f;
  int ok = next_frame(&w, &w.ends[3], &f) && f.len == 4;
  for (int i = 0; i < 20; i++) turn(&w);
  CHECK(ok && pp_in_next(&w.ends[2].in, &f) == 0 && w.eb == 0,
        "a message for a gone incarnation is dropped, without error");
  /* a channel shut for writing at one end is shut at the other, after
   * its frames */
  put_frame(&w.ends[1], PP_FR_TASK, "tail", 4, -1);
  for (int i = 0; i < 5; i++) turn(&w);
  shutdown(w.ends[1].fd, SHUT_WR);
  ok = next_frame(&w, &w.ends[3], &f) && f.len == 4 && memcmp(f.body, "tail", 4) == 0;
  double until = now() + 10;
  while (!w.ends[3].in.eof && now() < until) turn(&w);
  CHECK(ok && w.ends[3].in.eof, "a channel's end crosses the link, after its frames");
  /* the stream ends: the other side is told, after what was sent */
  put_frame(&w.ends[3], PP_FR_RESULT, "last", 4, -1);
  for (int i = 0; i < 10; i++) turn(&w);
  shutdown(w.b.wfd, SHUT_WR);
  ok = next_frame(&w, &w.ends[1], &f) && f.len == 4 && memcmp(f.body, "last", 4) == 0;
  for (int i = 0; i < 10 && w.ea == 0; i++) turn(&w);
  CHECK(ok && w.ea == EPIPE, "the end of the stream is EPIPE, after the messages before it");
  world_free(&w);

  world_init(&w, 1);
  unsigned char bad[8] = {0, 0, 0, 0, PP_L_EOF + 2, 0, 0, 0}; /* type 5: none */
  if (write(w.a.wfd, bad, sizeof bad) != (ssize_t)sizeof bad) abort();
  for (int i = 0; i < 10 && w.eb == 0; i++) turn(&w);
  CHECK(w.eb == EPROTO, "a message of an unknown type is a protocol error");
  world_free(&w);

  world_init(&w, 1);
  unsigned char huge[8];
  pp_put32(huge, 0xfffffff0u);
  huge[4] = PP_L_DATA;
  huge[5] = huge[6] = huge[7] = 0;
  if (write(w.a.wfd, huge, sizeof huge) != (ssize_t)sizeof huge) abort();
  for (int i = 0; i < 10 && w.eb == 0; i++) turn(&w);
  CHECK(w.eb == EPROTO, "a length past the largest message is a protocol error, not an allocation");
  world_free(&w);

  world_init(&w, 1);
  /* a chunk that does not start at 0 */
  unsigned char ch[PP_FRAME_HDR + PP_L_CHUNK_HDR + 4];
  memset(ch, 0, sizeof ch);
  pp_put32(ch, PP_L_CHUNK_HDR + 4);
  ch[4] = PP_L_CHUNK;
  pp_put32(ch + 8, 0);
  pp_put32(ch + 12, 7);
  pp_put64(ch + 16, 100);
  pp_put64(ch + 24, 50);
  if (write(w.a.wfd, ch, sizeof ch) != (ssize_t)sizeof ch) abort();
  for (int i = 0; i < 10 && w.eb == 0; i++) turn(&w);
  CHECK(w.eb == EPROTO, "a chunk out of order is a protocol error");
  world_free(&w);
}

int main(void) {
  crossing(1);
  crossing(0);
  stale_and_ends();
  return CTEST_DONE();
}
