/* capture.c: a worker's captured output: fds 1 and 2 into pipes, drained
 * into the capture area that the parent maps (child side, no Lua).
 *
 * A drain thread reads the pipes as the task (or what it started) writes,
 * so writers never wait on a full pipe for long and never see an error;
 * past `cap` bytes per stream it reads on and counts what it drops. The
 * area lives in a memfd the parent maps (OUTBUF), and says which item its
 * bytes belong to: a worker killed mid-item leaves its output readable. */
#define _GNU_SOURCE
#include "capture.h"
#include "quiet_thread.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "wire.h"

struct pp_capture {
  pthread_mutex_t mu; /* the area's lengths: the drain thread or the item's end */
  int rd[2];          /* read ends, stdout and stderr (non-blocking) */
  int wr[2];          /* write ends, on fds 1 and 2 while capturing */
  int saved[2];       /* the real fds 1 and 2 (-1: they were closed) */
  int on;
  pp_outarea *area;
  size_t size;
  char *bytes[2];
};

/* Read what pipe k holds into the area (mu held). */
static void drain(pp_capture *c, int k) {
  uint64_t *len = k ? &c->area->errlen : &c->area->outlen;
  uint64_t *drop = k ? &c->area->errdrop : &c->area->outdrop;
  char scratch[4096];
  for (;;) {
    uint64_t n = *len, room = c->area->cap - n;
    ssize_t r =
        room ? read(c->rd[k], c->bytes[k] + n, room) : read(c->rd[k], scratch, sizeof scratch);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return;
    /* the lengths are published after the bytes: the parent may read
     * them once this process is dead */
    if (room)
      __atomic_store_n(len, n + (uint64_t)r, __ATOMIC_RELEASE);
    else
      __atomic_store_n(drop, *drop + (uint64_t)r, __ATOMIC_RELEASE);
  }
}

static void *drain_main(void *arg) {
  pp_capture *c = arg;
  struct pollfd p[2] = {{c->rd[0], POLLIN, 0}, {c->rd[1], POLLIN, 0}};
  for (;;) {
    if (poll(p, 2, -1) <= 0) continue;
    pthread_mutex_lock(&c->mu);
    for (int k = 0; k < 2; k++)
      if (p[k].revents) drain(c, k);
    pthread_mutex_unlock(&c->mu);
  }
  return NULL;
}

static void close_all(pp_capture *c) {
  for (int k = 0; k < 2; k++) {
    if (c->rd[k] >= 0) close(c->rd[k]);
    if (c->wr[k] >= 0) close(c->wr[k]);
  }
  if (c->area) munmap(c->area, c->size);
  free(c);
}

pp_capture *pp_capture_new(uint64_t max_output, int *memfd) {
  pp_capture *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->rd[0] = c->rd[1] = c->wr[0] = c->wr[1] = c->saved[0] = c->saved[1] = -1;
  for (int k = 0; k < 2; k++) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) {
      close_all(c);
      return NULL;
    }
    c->rd[k] = p[0];
    c->wr[k] = p[1];
    fcntl(p[0], F_SETFL, O_NONBLOCK | fcntl(p[0], F_GETFL));
  }
  c->size = PP_OUTAREA_HDR + 2 * (size_t)max_output;
  int fd = memfd_create("procpool-output", MFD_CLOEXEC);
  void *m = MAP_FAILED;
  if (fd >= 0 && ftruncate(fd, (off_t)c->size) == 0)
    m = mmap(NULL, c->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) {
    if (fd >= 0) close(fd);
    close_all(c);
    return NULL;
  }
  c->area = m;
  c->area->cap = max_output;
  c->bytes[0] = (char *)m + PP_OUTAREA_HDR;
  c->bytes[1] = c->bytes[0] + max_output;
  pthread_mutex_init(&c->mu, NULL);
  if (pp_quiet_thread(drain_main, c, 128u << 10) != 0) {
    close(fd);
    pthread_mutex_destroy(&c->mu);
    close_all(c);
    return NULL;
  }
  *memfd = fd;
  return c;
}

void pp_capture_on(pp_capture *c) {
  if (c->on) return;
  fflush(stdout);
  fflush(stderr);
  for (int k = 0; k < 2; k++) {
    /* kept above the worker's fixed fds (0-3), and not inherited */
    if (c->saved[k] < 0) c->saved[k] = fcntl(k + 1, F_DUPFD_CLOEXEC, 4);
    dup2(c->wr[k], k + 1);
  }
  c->on = 1;
}

void pp_capture_off(pp_capture *c) {
  if (!c->on) return;
  fflush(stdout);
  fflush(stderr);
  for (int k = 0; k < 2; k++) {
    if (c->saved[k] >= 0)
      dup2(c->saved[k], k + 1);
    else
      close(k + 1);
  }
  c->on = 0;
}

void pp_capture_begin(pp_capture *c, uint64_t seq) {
  __atomic_store_n(&c->area->seq, seq, __ATOMIC_RELEASE);
}

int pp_capture_take(pp_capture *c, pp_wbuf *res) {
  fflush(stdout);
  fflush(stderr);
  pthread_mutex_lock(&c->mu);
  /* everything the item and its finished children wrote is in a pipe:
   * one poll says which to read (a quiet item costs that one call) */
  struct pollfd p[2] = {{c->rd[0], POLLIN, 0}, {c->rd[1], POLLIN, 0}};
  if (poll(p, 2, 0) > 0)
    for (int k = 0; k < 2; k++)
      if (p[k].revents) drain(c, k);
  uint64_t *lens[2] = {&c->area->outlen, &c->area->errlen};
  uint64_t *drops[2] = {&c->area->outdrop, &c->area->errdrop};
  char note[2][PP_OUTPUT_DROPPED_MAX];
  size_t notelen[2], total = PP_OUTPUT_TRAILER;
  for (int k = 0; k < 2; k++) {
    int m = *drops[k] ? snprintf(note[k], sizeof note[k], PP_OUTPUT_DROPPED,
                                 (unsigned long long)*drops[k])
                      : 0;
    notelen[k] = m > 0 ? (size_t)m : 0;
    total += (size_t)*lens[k] + notelen[k];
  }
  int rc = pp_wbuf_reserve(res, total);
  for (int k = 0; rc == 0 && k < 2; k++) {
    rc = pp_wbuf_put_at(res, res->n, c->bytes[k], (size_t)*lens[k]);
    if (rc == 0) rc = pp_wbuf_put_at(res, res->n + (size_t)*lens[k], note[k], notelen[k]);
    res->n += (size_t)*lens[k] + notelen[k];
  }
  if (rc == 0) {
    unsigned char t[PP_OUTPUT_TRAILER];
    pp_output_trailer_put(t, (uint32_t)(*lens[0] + notelen[0]), (uint32_t)(*lens[1] + notelen[1]));
    rc = pp_wbuf_put_at(res, res->n, t, sizeof t);
    res->n += sizeof t;
  }
  for (int k = 0; k < 2; k++) {
    __atomic_store_n(lens[k], 0, __ATOMIC_RELEASE);
    __atomic_store_n(drops[k], 0, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&c->mu);
  return rc;
}
