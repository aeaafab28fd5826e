/* test_engine.c: the engine driven from C alone, with a fake zygote whose
 * workers send malformed frames: each must count as a lost worker, and
 * the engine must neither crash nor wedge. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "channel.h"
#include "ctest.h"
#include "engine.h"
#include "wire.h"

/* What the fake worker writes once it has read its task. */
enum { W_VALID, W_HUGE, W_BADTYPE, W_BADSEQ, W_NOFD, W_SHORT, W_CLOSE, W_DEAF };

static int *mode; /* shared with the fake workers, read at task time */
static int zend;  /* the zygote's end of the control socket */
static volatile int zstop;

static void put_frame(int fd, int type, int flags, const unsigned char *body, uint32_t len) {
  unsigned char h[8];
  pp_put32(h, len);
  h[4] = (unsigned char)type;
  h[5] = (unsigned char)flags;
  h[6] = h[7] = 0;
  if (write(fd, h, 8) != 8) _exit(2);
  if (len && write(fd, body, len) != (ssize_t)len) _exit(2);
}

static void fake_worker(int fd, int pg) {
  unsigned char buf[4096];
  put_frame(fd, PP_FR_READY, 0, NULL, 0);
  if (read(fd, buf, sizeof buf) <= 0) _exit(0); /* the TASK frame */
  /* like a real worker, say which item runs (the first: seq 1) */
  pp_page *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, pg, 0);
  if (page == MAP_FAILED) _exit(2);
  __atomic_store_n(&page->started, 1, __ATOMIC_RELEASE);
  unsigned char body[64];
  memset(body, 0, sizeof body);
  /* seq0 1: the first item a new worker gets */
  pp_result_hdr rh = {1, 1, 10};
  pp_result_hdr_put(body, &rh);
  pp_result_item_put(body + PP_RESULT_HDR, PP_RES_OK, 2);
  body[PP_RESULT_HDR + PP_RESULT_ITEM] = 1;        /* a list of one value: */
  body[PP_RESULT_HDR + PP_RESULT_ITEM + 1] = 0x85; /* the integer 5 */
  const uint32_t blen = PP_RESULT_HDR + PP_RESULT_ITEM + 2;
  switch (*mode) {
  case W_VALID:
  case W_DEAF:
    put_frame(fd, PP_FR_RESULT, 0, body, blen);
    break;
  case W_HUGE: {
    unsigned char h[8] = {0xff, 0xff, 0xff, 0xff, PP_FR_RESULT, 0, 0, 0};
    if (write(fd, h, 8) != 8) _exit(2);
    break;
  }
  case W_BADTYPE:
    put_frame(fd, 99, 0, body, blen);
    break;
  case W_BADSEQ:
    rh.seq0 = 77;
    pp_result_hdr_put(body, &rh);
    put_frame(fd, PP_FR_RESULT, 0, body, blen);
    break;
  case W_NOFD:
    put_frame(fd, PP_FR_RESULT, PP_FF_FD, body, PP_RESULT_HDR + PP_RESULT_FD_ITEM);
    break;
  case W_SHORT:
    pp_result_item_put(body + PP_RESULT_HDR, PP_RES_OK, 100); /* longer than its frame */
    put_frame(fd, PP_FR_RESULT, 0, body, blen);
    break;
  case W_CLOSE:
    _exit(3); /* dies with a status, having sent nothing */
  }
  if (*mode == W_DEAF)
    for (;;) pause(); /* ignores being told to exit: killed after a grace */
  while (read(fd, buf, sizeof buf) > 0) {
  }
  _exit(0); /* told to exit (EOF), or killed before */
}

static void zsend(const pp_zmsg *m, const int *fds, int nfds) {
  pp_send_fds(zend, m, sizeof *m, fds, nfds, 0);
}

/* The fake zygote: fork a fake worker per SPAWN, report exits. */
static void *zygote(void *arg) {
  (void)arg;
  pid_t kids[64];
  int nkids = 0;
  while (!zstop) {
    struct pollfd p = {zend, POLLIN, 0};
    if (poll(&p, 1, 10) == 1) {
      pp_zmsg m;
      ssize_t r = recv(zend, &m, sizeof m, 0);
      if (r <= 0) break;
      if (m.type == PP_Z_SPAWN) {
        int sv[2], ep[2];
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
        pipe2(ep, O_CLOEXEC);
        int pg = memfd_create("page", MFD_CLOEXEC);
        if (ftruncate(pg, 4096) != 0) abort();
        pid_t pid = fork();
        if (pid == 0) {
          close(sv[0]);
          fake_worker(sv[1], pg);
        }
        close(sv[1]);
        close(ep[1]);
        kids[nkids++] = pid;
        int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        pp_zmsg a;
        memset(&a, 0, sizeof a);
        a.type = PP_Z_SPAWNED;
        a.slot = m.slot;
        a.gen = m.gen;
        a.pid = pid;
        a.nfds = 4;
        a.err = pidfd >= 0 ? 0 : ENOSYS; /* as the real zygote: a stand-in fd */
        int fds[4] = {sv[0], pidfd >= 0 ? pidfd : sv[0], pg, ep[0]};
        zsend(&a, fds, 4);
        close(sv[0]);
        if (pidfd >= 0) close(pidfd);
        close(pg);
        close(ep[0]);
      }
    }
    for (int i = 0; i < nkids; i++) {
      int st;
      if (waitpid(kids[i], &st, WNOHANG) == kids[i]) {
        pp_zmsg x;
        memset(&x, 0, sizeof x);
        x.type = PP_Z_EXITED;
        x.pid = kids[i];
        x.status = st;
        zsend(&x, NULL, 0);
        kids[i--] = kids[--nkids];
      }
    }
  }
  for (int i = 0; i < nkids; i++) {
    kill(kids[i], SIGKILL);
    waitpid(kids[i], NULL, 0);
  }
  return NULL;
}

/* One task whose function and argument lists are empty. */
static pp_job *tiny_job(void) {
  pp_job *j = pp_job_new(1, PP_LEN_PREFIX + 1);
  unsigned char fn[PP_LEN_PREFIX + 1];
  pp_wire_put_len(fn, 1);
  fn[PP_LEN_PREFIX] = 0; /* fn: an empty list */
  j->fn = pp_blob_new(fn, sizeof fn);
  unsigned char *args = (unsigned char *)pp_job_inline(j);
  pp_wire_put_len(args, 1);
  args[PP_LEN_PREFIX] = 0; /* args: an empty list */
  return j;
}

static int slow = 1; /* under valgrind or sanitizers, wait longer */

static int wait_job(pp_engine *e, pp_job *j, int ms) {
  ms *= slow;
  while (ms > 0) {
    int st = pp_engine_job_state(e, j);
    if (st == PP_JOB_DONE || st == PP_JOB_CANCELLED) return 1;
    struct pollfd p = {pp_engine_fd(e), POLLIN, 0};
    poll(&p, 1, 10);
    pp_engine_ack(e);
    ms -= 10;
  }
  return 0;
}

static void run_case(int m, const char *name, int expect) {
  *mode = m;
  int sv[2];
  socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv);
  zend = sv[1];
  zstop = 0;
  /* a stand-in zygote pid for the engine to reap: exits when told */
  int hold[2];
  pipe2(hold, O_CLOEXEC);
  pid_t zpid = fork();
  if (zpid == 0) {
    char c;
    close(hold[1]);
    while (read(hold[0], &c, 1) < 0 && errno == EINTR) {
    }
    _exit(0);
  }
  close(hold[0]);
  pthread_t th;
  pthread_create(&th, NULL, zygote, NULL);
  pp_engine_cfg cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.nworkers = 1;
  int err = 0;
  pp_engine *e = pp_engine_new(&cfg, zpid, sv[0], &err);
  pp_job *j = tiny_job();
  const char *msg;
  int rc = pp_engine_submit(e, j, &msg);
  int done = rc == 0 && wait_job(e, j, 5000);
  char what[160];
  snprintf(what, sizeof what, "%s: the task ends (not wedged)", name);
  CHECK(done, what);
  if (done) {
    snprintf(what, sizeof what, "%s: the task's outcome", name);
    CHECK(j->items[0].status == expect, what);
  }
  pp_stats st;
  pp_engine_stats(e, &st);
  snprintf(what, sizeof what, "%s: the worker counts as lost iff the frame was bad", name);
  CHECK((expect == PP_IT_LOST) == (st.worker_restarts >= 1), what);
  /* the pool still works after a bad worker: a valid one replaces it */
  if (expect == PP_IT_LOST) {
    *mode = W_VALID;
    pp_job *j2 = tiny_job();
    int ok = pp_engine_submit(e, j2, &msg) == 0 && wait_job(e, j2, 5000) &&
             j2->items[0].status == PP_IT_OK;
    snprintf(what, sizeof what, "%s: a replacement worker serves the next task", name);
    CHECK(ok, what);
    pp_job_unref(j2);
  }
  close(hold[1]); /* let the stand-in zygote exit */
  pp_engine_shutdown(e, 1);
  int ms = 5000 * slow;
  while (pp_engine_state(e) != PP_E_DEAD && ms > 0) {
    usleep(10000);
    ms -= 10;
  }
  snprintf(what, sizeof what, "%s: shutdown completes", name);
  CHECK(pp_engine_state(e) == PP_E_DEAD, what);
  pp_engine_join(e);
  zstop = 1;
  pthread_join(th, NULL);
  close(zend);
  pp_job_unref(j);
  pp_engine_unref(e);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  if (getenv("PROCPOOL_SANITIZED")) slow = 10;
  mode = mmap(NULL, sizeof *mode, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mode == MAP_FAILED) return 1;
  signal(SIGPIPE, SIG_IGN); /* the fake workers write to closed sockets */
  run_case(W_VALID, "a valid result", PP_IT_OK);
  run_case(W_HUGE, "a frame longer than any allowed", PP_IT_LOST);
  run_case(W_BADTYPE, "an unknown frame type", PP_IT_LOST);
  run_case(W_BADSEQ, "a result out of sequence", PP_IT_LOST);
  run_case(W_NOFD, "an fd frame without its fd", PP_IT_LOST);
  run_case(W_SHORT, "an item longer than its frame", PP_IT_LOST);
  run_case(W_CLOSE, "a worker that exits without a word", PP_IT_LOST);
  run_case(W_DEAF, "a worker that will not exit when told", PP_IT_OK);
  return CTEST_DONE();
}
