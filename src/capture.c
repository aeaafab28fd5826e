/* capture.c: a worker's captured output: fds 1 and 2 into pipes, drained
 * into files that the parent holds too (child side, no Lua).
 *
 * A drain thread moves what the task (or what it started) writes from
 * the pipes into one memfd per stream, so writers never wait on a full
 * pipe for long and never see an error. Each move is one splice: the
 * kernel takes the bytes from the pipe and grows the file in the same
 * call, so a worker SIGKILLed at any point leaves every byte either in
 * the file (its size says how many) or still in the pipe, never in
 * between. The parent holds both (OUTBUF parts) and reads them once the
 * worker is dead; the area says which item they belong to and where in
 * the files its bytes start (items follow each other in a file, which
 * is emptied now and then: freeing and faulting pages per item costs
 * more than the item's output). Past `cap` bytes an item's part still
 * grows, as a hole: the size counts what was dropped, without holding
 * it. */
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

/* A stream's file is emptied at an item's end once it holds this much. */
#define REWIND_AT (64u << 10)

struct pp_capture {
  pthread_mutex_t mu; /* the streams' files: the drain thread or the item's end */
  int rd[2];          /* read ends, stdout and stderr (non-blocking) */
  int wr[2];          /* write ends, on fds 1 and 2 while capturing */
  int saved[2];       /* the real fds 1 and 2 (-1: they were closed) */
  int file[2];        /* the streams' memfds: the items' bytes, kept and dropped */
  uint64_t len[2];    /* their sizes (mu held) */
  uint64_t base[2];   /* where the item's bytes start in them (mu held) */
  char *bytes[2];     /* the files mapped: their first REWIND_AT + cap bytes */
  size_t maplen;
  int on;
  pp_outarea *area;
};

/* Move what pipe k holds into its file (mu held). */
static void drain(pp_capture *c, int k) {
  uint64_t end = c->base[k] + c->area->cap; /* where the item's kept bytes end */
  for (;;) {
    uint64_t n = c->len[k];
    loff_t at = (loff_t)n;
    size_t want = n < end ? (size_t)(end - n) : (size_t)1 << 20;
    ssize_t r = splice(c->rd[k], NULL, c->file[k], &at, want, SPLICE_F_NONBLOCK);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno != EAGAIN) {
      /* the file cannot grow (no memory): read on, so writers never
       * block, and count these bytes as dropped */
      char scratch[4096];
      r = read(c->rd[k], scratch, sizeof scratch);
      if (r > 0) __atomic_add_fetch(&c->area->lost[k], (uint64_t)r, __ATOMIC_RELEASE);
      if (r > 0 || (r < 0 && errno == EINTR)) continue;
      return;
    }
    if (r <= 0) return;
    c->len[k] = n + (uint64_t)r;
    /* what lies past the kept bytes only counts: free it at once */
    if (n >= end)
      fallocate(c->file[k], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)end,
                (off_t)(c->len[k] - end));
    /* less than asked: the pipe was empty (a call more would only say so) */
    if ((size_t)r < want) return;
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
    if (c->file[k] >= 0) close(c->file[k]);
    if (c->bytes[k]) munmap(c->bytes[k], c->maplen);
  }
  if (c->area) munmap(c->area, PP_OUTAREA_HDR);
  free(c);
}

/* A copy of fd for the parent, above the worker's fixed fds (0-3). */
static int for_parent(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 4); }

pp_capture *pp_capture_new(uint64_t max_output, int fds[PP_CAPTURE_FDS]) {
  pp_capture *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  for (int k = 0; k < 2; k++) c->rd[k] = c->wr[k] = c->saved[k] = c->file[k] = -1;
  for (int k = 0; k < 2; k++) {
    int p[2];
    c->file[k] = memfd_create(k ? "procpool-stderr" : "procpool-stdout", MFD_CLOEXEC);
    if (c->file[k] < 0 || pipe2(p, O_CLOEXEC) != 0) {
      close_all(c);
      return NULL;
    }
    c->rd[k] = p[0];
    c->wr[k] = p[1];
    fcntl(p[0], F_SETFL, O_NONBLOCK | fcntl(p[0], F_GETFL));
    /* an item's kept bytes start below REWIND_AT; only bytes below the
     * file's size are ever read here */
    c->maplen = REWIND_AT + (size_t)max_output;
    void *b = mmap(NULL, c->maplen, PROT_READ, MAP_SHARED, c->file[k], 0);
    if (b == MAP_FAILED) {
      close_all(c);
      return NULL;
    }
    c->bytes[k] = b;
  }
  int fd = memfd_create("procpool-output", MFD_CLOEXEC);
  void *m = MAP_FAILED;
  if (fd >= 0 && ftruncate(fd, PP_OUTAREA_HDR) == 0)
    m = mmap(NULL, PP_OUTAREA_HDR, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) {
    if (fd >= 0) close(fd);
    close_all(c);
    return NULL;
  }
  c->area = m;
  c->area->cap = max_output;
  fds[PP_OUT_AREA] = fd;
  for (int k = 0; k < 2; k++) {
    fds[PP_OUT_FILE + k] = for_parent(c->file[k]);
    fds[PP_OUT_PIPE + k] = for_parent(c->rd[k]);
  }
  pthread_mutex_init(&c->mu, NULL);
  for (int i = 0; i < PP_CAPTURE_FDS; i++)
    if (fds[i] < 0 || (i == PP_CAPTURE_FDS - 1 && pp_quiet_thread(drain_main, c, 128u << 10))) {
      for (int j = 0; j < PP_CAPTURE_FDS; j++)
        if (fds[j] >= 0) close(fds[j]);
      pthread_mutex_destroy(&c->mu);
      close_all(c);
      return NULL;
    }
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
  uint64_t cap = c->area->cap, kept[2], lost[2];
  char note[2][PP_OUTPUT_DROPPED_MAX];
  size_t notelen[2], total = PP_OUTPUT_TRAILER;
  for (int k = 0; k < 2; k++) {
    uint64_t n = c->len[k] - c->base[k];
    kept[k] = n < cap ? n : cap;
    lost[k] = __atomic_load_n(&c->area->lost[k], __ATOMIC_ACQUIRE);
    uint64_t drop = n - kept[k] + lost[k];
    int m =
        drop ? snprintf(note[k], sizeof note[k], PP_OUTPUT_DROPPED, (unsigned long long)drop) : 0;
    notelen[k] = m > 0 ? (size_t)m : 0;
    total += (size_t)kept[k] + notelen[k];
  }
  int rc = pp_wbuf_reserve(res, total);
  for (int k = 0; rc == 0 && k < 2; k++) {
    rc = pp_wbuf_put_at(res, res->n, c->bytes[k] + c->base[k], (size_t)kept[k]);
    if (rc == 0) rc = pp_wbuf_put_at(res, res->n + (size_t)kept[k], note[k], notelen[k]);
    res->n += (size_t)kept[k] + notelen[k];
  }
  if (rc == 0) {
    unsigned char t[PP_OUTPUT_TRAILER];
    pp_output_trailer_put(t, (uint32_t)(kept[0] + notelen[0]), (uint32_t)(kept[1] + notelen[1]));
    rc = pp_wbuf_put_at(res, res->n, t, sizeof t);
    res->n += sizeof t;
  }
  /* the next item's bytes start here (the file is emptied first, when
   * it is large: a parent that sees it empty before the new base reads
   * nothing, rightly) */
  for (int k = 0; k < 2; k++) {
    if (c->len[k] >= REWIND_AT) {
      if (ftruncate(c->file[k], 0) != 0 && rc == 0) rc = errno;
      c->len[k] = 0;
    }
    c->base[k] = c->len[k];
    __atomic_store_n(&c->area->base[k], c->base[k], __ATOMIC_RELEASE);
    if (lost[k]) __atomic_sub_fetch(&c->area->lost[k], lost[k], __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&c->mu);
  return rc;
}
