/* engine.c: the pool engine: jobs, queue, dispatch, the I/O thread (no Lua). */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "forkgate.h"
#include "warm.h"
#include "wire.h"

/* ------------------------------------------------------------------ */
/* process identity                                                     */

/* A forked child holds a copy of every engine of its parent, with their
 * mutexes possibly locked by threads that do not exist there. Engines
 * record the generation they were made in; this counter moves on in each
 * child, so copies are recognised and never touched. It is process-wide
 * by nature (it says which process this is), not per Lua state. */
static unsigned fork_gen;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void on_fork_child(void) { __atomic_add_fetch(&fork_gen, 1, __ATOMIC_RELAXED); }
static void fork_install(void) { pthread_atfork(NULL, NULL, on_fork_child); }

unsigned pp_fork_generation(void) {
  pthread_once(&fork_once, fork_install);
  return __atomic_load_n(&fork_gen, __ATOMIC_RELAXED);
}

uint64_t pp_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

const char *pp_strerror(int code) {
  switch (code) {
  case PP_ESHUTDOWN:
    return "cannot schedule new futures after shutdown";
  case PP_EBROKEN:
    return "the process pool is broken";
  case PP_EFOREIGN:
    return "this pool belongs to another process";
  default:
    return strerror(code);
  }
}

/* ------------------------------------------------------------------ */
/* structures                                                           */

typedef struct pp_disp { /* items handed to a worker, in order */
  pp_job *job;
  uint32_t first, count, acked;
  uint64_t seq0;
  struct pp_disp *next;
} pp_disp;

/* W_GONE: a slot whose host is gone for good; never started again */
enum { W_EMPTY = 0, W_SPAWNING, W_READY, W_GONE };

typedef struct pp_worker {
  int state;
  uint32_t gen;
  pid_t pid;
  int fd, pidfd;
  pp_page *page;
  pp_out out;
  pp_in in;
  pp_disp *dhead, *dtail;
  uint64_t next_seq;
  uint32_t inflight;
  uint32_t chunks; /* dispatches of several items among them */
  uint64_t assigned;
  uint32_t epev;      /* events registered for fd (0: not registered) */
  int errfd;          /* its stderr pipe (-1 once at EOF) */
  char errtail[2048]; /* the last bytes it wrote there */
  size_t errlen;
  int retire;          /* shut its input once the output is flushed */
  int shut;            /* input shut (SHUT_WR done) */
  int doomed;          /* being killed: no more work */
  uint64_t kill_seq;   /* deadline kill: the item */
  uint64_t kill_at;    /* escalate to SIGKILL at (ns), 0: none */
  int expected_exit;   /* retired/closing: not a loss */
  int ready;           /* initialized (a READY frame came) */
  int outfd[4];        /* its capture's files and pipes (OUTBUF), or -1 */
  pp_outarea *outarea; /* its capture area (OUTBUF), mapped, or NULL */
  size_t outsize;
  int unsent; /* given tasks by the dispatch under way */
  /* taking back what it has not started (steal): the item seen running
   * and since when; `stalled` once taken back from, until its last item
   * is in (it gets no new work meanwhile) */
  uint64_t seen_seq, seen_ns;
  int stalled;
  /* a worker on a host (hostproxy.h): no pid here, no page it writes
   * while it runs (nothing to take back from), signalled through the
   * proxy on zfd */
  int remote, zfd, slot;
  char host[200];      /* its host's name (SPAWNED's text), or "" */
  char host_lost[200]; /* why its host was lost (EXITED's text) or is gone (SPAWNFAIL's), or "" */
} pp_worker;

struct pp_engine {
  pthread_mutex_t mu;
  int refs;
  unsigned forkgen;
  pp_engine_cfg cfg;
  int state;
  int broken;
  char *broken_msg;
  int killing;         /* terminate/kill requested: the signal */
  const char *end_msg; /* why unfinished jobs failed, when not broken */
  pid_t zpid;
  int zfd, zdead;
  int epfd, wakefd, notifyfd;
  int notified;
  uint64_t ended_total; /* jobs ended, ever */
  pthread_t th;
  int th_running, th_detached, th_joined;
  int th_started;       /* the I/O thread is inside the fork gate */
  pthread_cond_t th_cv; /* signalled when th_started is set */
  pp_worker *w;
  pp_job *qhead, *qtail;
  pp_job *chead, *ctail;
  pp_report_note *rhead, *rtail; /* reports for the Lua side */
  pp_stats st;
  uint64_t ewma_ns;
  int startup_deaths; /* workers in a row that died before being ready */
  uint64_t steal_at;  /* when to look again for work to take back (0: no need) */
  /* a worker could not start for want of fds: no start before this
   * (0: none pending), so a full fd table is not a fork per loop */
  uint64_t respawn_at;
  rlim_t capture_fds; /* fds below this may be kept for captures (w_outbuf) */
  /* Submits in a burst do not take the lock (the I/O thread holds it
   * while it sends and reads, and a submit waiting for it sleeps): they
   * push their jobs on `inbox`, a stack linked by qnext, and whoever
   * holds the lock next moves them to the queue (inbox_take). Atomic,
   * like `accepting` (1 while submits are taken: running, not broken),
   * `idle_hint` (1 when the last look under the lock saw a worker idle:
   * a push then wakes the I/O thread; else results will) and
   * `wake_pending` (a push woke it already). */
  pp_job *inbox;
  int accepting, idle_hint, wake_pending;
  uint64_t submit_end_ns; /* atomic: when the last submit returned */
};

enum { EV_WAKE = 1, EV_ZYGOTE, EV_WORKER, EV_STDERR };
#define EVKEY(kind, slot) (((uint64_t)(kind) << 32) | (uint32_t)(slot))

static void job_end(pp_engine *e, pp_job *j);
static void engine_break(pp_engine *e, const char *msg);

/* ------------------------------------------------------------------ */
/* jobs                                                                 */

/* A job's state changes under the engine lock and is read without it
 * (pp_engine_job_state): a release store publishes the items' outcomes
 * written before it. */
static void set_state(pp_job *j, int st) { __atomic_store_n(&j->state, st, __ATOMIC_RELEASE); }

pp_job *pp_job_new(uint32_t n, size_t ilen) {
  size_t nitems = n ? n : 1;
  if (ilen > UINT32_MAX || nitems > (SIZE_MAX - sizeof(pp_job) - ilen) / sizeof(pp_item))
    return NULL;
  size_t head = pp_job_bytes(n, 0), all = head + ilen;
  pp_job *j = all >= PP_WARM_MIN ? pp_warm_alloc(all) : malloc(all);
  if (!j) return NULL;
  /* written here, by the submitting thread: calloc's untouched zero pages
   * would be copied on first write by the I/O thread, a fault and a TLB
   * shootdown per page */
  pp_zero_touch(j, head);
  j->refs = 1;
  j->n = n;
  j->range0[0][0] = 0;
  j->range0[0][1] = n;
  j->nranges = 1;
  j->ilen = (uint32_t)ilen;
  j->state = PP_JOB_PENDING;
  return j;
}

/* The job's rarely needed part, made on first use (NULL: out of memory). */
static pp_job_ext *job_ext(pp_job *j) {
  if (!j->x) j->x = calloc(1, sizeof *j->x);
  return j->x;
}

int pp_job_set_payload(pp_job *j, pp_blob *payload) {
  if (!job_ext(j)) return ENOMEM;
  j->x->payload = payload;
  return 0;
}

int pp_job_set_timeout(pp_job *j, uint64_t ns) {
  if (!ns) return 0;
  if (!job_ext(j)) return ENOMEM;
  j->x->timeout_ns = ns;
  return 0;
}

int pp_job_set_capture(pp_job *j, int capture) {
  if (!capture) return 0;
  if (!job_ext(j)) return ENOMEM;
  j->x->capture = 1;
  return 0;
}

int pp_job_set_reports(pp_job *j, int mode) {
  if (mode == PP_REPORTS_KEEP && !j->x) return 0;
  if (!job_ext(j)) return ENOMEM;
  j->x->reports = (uint8_t)mode;
  return 0;
}

static int job_reports(const pp_job *j) { return j->x ? j->x->reports : PP_REPORTS_KEEP; }

uint64_t pp_engine_job_timeout(const pp_engine *e, const pp_job *j) {
  return j->x && j->x->timeout_ns ? j->x->timeout_ns : e->cfg.timeout_ns;
}

/* The pending ranges: range0, or the ext's array once there are more. */
static uint32_t (*job_ranges(pp_job *j))[2] {
  return j->x && j->x->ranges ? j->x->ranges : j->range0;
}

static void wnodes_fire(pp_job *j) {
  if (!j->x) return;
  pp_wnode *n = j->x->waiters;
  j->x->waiters = NULL;
  while (n) {
    pp_wnode *next = n->next;
    uint64_t one = 1;
    ssize_t r = write(n->w->fd, &one, sizeof one);
    (void)r;
    pp_waiter_unref(n->w);
    free(n);
    n = next;
  }
}

void pp_job_unref(pp_job *j) {
  if (!j || __atomic_sub_fetch(&j->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
  for (uint32_t i = 0; i < j->nblobs; i++) pp_blob_unref(pp_job_blob(j, i));
  pp_blob_unref(j->fn);
  wnodes_fire(j);
  pp_job_ext *x = j->x;
  if (x) {
    free(x->blobs);
    for (uint32_t i = 0; i < x->ndeaths; i++) {
      free(x->deaths[i].stderr_tail);
      free(x->deaths[i].host);
      free(x->deaths[i].host_lost);
      free(x->deaths[i].out);
      free(x->deaths[i].err);
    }
    free(x->deaths);
    pp_blob_unref(x->payload);
    pp_blob_unref(x->report);
    free(x->ranges);
    free(x);
  }
  /* (pp_job_new's rule: a large job's memory is kept warm) */
  if (pp_job_bytes(j->n, j->ilen) >= PP_WARM_MIN)
    pp_warm_free(j);
  else
    free(j);
}

static void q_remove(pp_engine *e, pp_job *j) {
  if (!j->in_queue) return;
  if (j->qprev)
    j->qprev->qnext = j->qnext;
  else
    e->qhead = j->qnext;
  if (j->qnext)
    j->qnext->qprev = j->qprev;
  else
    e->qtail = j->qprev;
  j->qnext = j->qprev = NULL;
  j->in_queue = 0;
}

static void q_push(pp_engine *e, pp_job *j, int front) {
  if (j->in_queue) return;
  j->in_queue = 1;
  if (front) {
    j->qprev = NULL;
    j->qnext = e->qhead;
    if (e->qhead)
      e->qhead->qprev = j;
    else
      e->qtail = j;
    e->qhead = j;
  } else {
    j->qnext = NULL;
    j->qprev = e->qtail;
    if (e->qtail)
      e->qtail->qnext = j;
    else
      e->qhead = j;
    e->qtail = j;
  }
}

static void job_fail_pending(pp_engine *e, pp_job *j, int status);

/* Move the jobs pushed by submits without the lock to the queue's end,
 * in the order they were pushed. Under the lock; called before anything
 * that looks at the queue or the pending count. A job that arrives once
 * the pool can no longer run it (broken, killed, ended) fails as queued
 * jobs then do. */
static int inbox_take(pp_engine *e) {
  if (!__atomic_load_n(&e->inbox, __ATOMIC_RELAXED)) return 0;
  pp_job *j = __atomic_exchange_n(&e->inbox, NULL, __ATOMIC_ACQUIRE), *rev = NULL;
  while (j) { /* newest first: reverse */
    pp_job *next = j->qnext;
    j->qnext = rev;
    rev = j;
    j = next;
  }
  while (rev) {
    pp_job *next = rev->qnext;
    e->st.pending += rev->n;
    q_push(e, rev, 0);
    if (e->broken || e->killing || e->state == PP_E_DEAD) job_fail_pending(e, rev, PP_IT_BROKEN);
    rev = next;
  }
  return 1;
}

/* Put items [lo, hi) of a job back in front of its pending ranges. */
static int job_requeue(pp_engine *e, pp_job *j, uint32_t lo, uint32_t hi) {
  if (lo >= hi) return 0;
  uint32_t cap = j->x && j->x->ranges ? j->x->capranges : 1;
  if (j->nranges == cap) { /* the ranges move to (or grow in) the ext */
    if (!job_ext(j)) return ENOMEM;
    uint32_t(*r)[2] = realloc(j->x->ranges, (size_t)cap * 2 * sizeof *r);
    if (!r) return ENOMEM;
    if (!j->x->ranges) memcpy(r, j->range0, sizeof j->range0);
    j->x->ranges = r;
    j->x->capranges = cap * 2;
  }
  uint32_t(*ranges)[2] = job_ranges(j);
  memmove(ranges + 1, ranges, (size_t)j->nranges * sizeof *ranges);
  ranges[0][0] = lo;
  ranges[0][1] = hi;
  j->nranges++;
  e->st.pending += hi - lo;
  e->st.running -= hi - lo;
  q_push(e, j, 1);
  return 0;
}

static void notify(pp_engine *e) {
  if (e->notified) return;
  e->notified = 1;
  uint64_t one = 1;
  ssize_t r = write(e->notifyfd, &one, sizeof one);
  (void)r;
}

static char *w_tail(pp_worker *w);
static void w_death_output(const pp_worker *w, uint64_t seq, pp_death *d);

/* Keep a reference to a result frame its items point into: in blob0, then
 * in the ext's array. 0 or ENOMEM. */
static int job_add_blob(pp_job *j, pp_blob *blob) {
  if (j->nblobs == 0) {
    j->blob0 = pp_blob_ref(blob);
    j->nblobs = 1;
    return 0;
  }
  uint32_t cap = j->x && j->x->blobs ? j->x->capblobs : 1;
  if (j->nblobs == cap) {
    if (!job_ext(j)) return ENOMEM;
    uint32_t ncap = cap == 1 ? 4 : cap * 2;
    pp_blob **nb = realloc(j->x->blobs, (size_t)ncap * sizeof *nb);
    if (!nb) return ENOMEM;
    if (!j->x->blobs) nb[0] = j->blob0;
    j->x->blobs = nb;
    j->x->capblobs = ncap;
  }
  j->x->blobs[j->nblobs++] = pp_blob_ref(blob);
  return 0;
}

/* Record how the worker running pending item i ended (before the item
 * is set LOST or DEADLINE); without memory the error just has no pid. */
static void job_note_death(pp_job *j, uint32_t i, uint64_t seq, pp_worker *w, int sig, int code) {
  pp_job_ext *x = job_ext(j);
  if (!x) return;
  if (x->ndeaths == x->capdeaths) {
    uint32_t cap = x->capdeaths ? 2 * x->capdeaths : 2;
    pp_death *nd = realloc(x->deaths, cap * sizeof *nd);
    if (!nd) return;
    x->deaths = nd;
    x->capdeaths = cap;
  }
  pp_death *d = &x->deaths[x->ndeaths++];
  d->pid = w->pid;
  d->sig = sig;
  d->code = code;
  d->stderr_tail = w_tail(w);
  d->host = w->host[0] ? strdup(w->host) : NULL;
  d->host_lost = w->host_lost[0] ? strdup(w->host_lost) : NULL;
  w_death_output(w, seq, d);
  j->items[i].ref = x->ndeaths;
}

/* Set an item's final outcome (it has none yet). */
static void item_set(pp_engine *e, pp_job *j, uint32_t i, int status) {
  pp_item *it = &j->items[i];
  if (it->status != PP_IT_PENDING) return;
  /* read without the lock by a waiter on this item: the outcome written
   * before is published by the release */
  __atomic_store_n(&it->status, (uint8_t)status, __ATOMIC_RELEASE);
  j->ndone++;
  switch (status) {
  case PP_IT_OK:
    e->st.completed++;
    break;
  case PP_IT_CANCELLED:
    e->st.cancelled++;
    break;
  default:
    e->st.failed++;
    j->nfailed++;
    break;
  }
  if (j->ndone == j->n) {
    job_end(e, j);
  } else if (j->watch_items) { /* someone waits for items one by one */
    wnodes_fire(j);
    notify(e);
  }
}

/* A job's last item has its outcome: wake whoever waits, drop the
 * engine's reference (or hand it to the callback list). */
static void job_end(pp_engine *e, pp_job *j) {
  q_remove(e, j);
  if (j->x && j->x->payload) { /* nothing is sent again: a future holds no argument */
    pp_blob_unref(j->x->payload);
    j->x->payload = NULL;
  }
  if (j->state != PP_JOB_CANCELLED) set_state(j, PP_JOB_DONE);
  wnodes_fire(j);
  e->ended_total++;
  notify(e);
  if (j->has_cb) {
    j->qnext = NULL; /* out of the queue for good: it links the callback list */
    if (e->ctail)
      e->ctail->qnext = j;
    else
      e->chead = j;
    e->ctail = j;
  } else {
    pp_job_unref(j);
  }
}

/* Fail every pending item of a job with `status`. */
static void job_fail_pending(pp_engine *e, pp_job *j, int status) {
  q_remove(e, j);
  int nr = j->nranges;
  uint32_t ranges[64][2];
  /* copy out: item_set may end (and free) the job */
  uint32_t(*rs)[2] = nr <= 64 ? ranges : malloc((size_t)nr * sizeof *rs);
  if (!rs) return;
  memcpy(rs, job_ranges(j), (size_t)nr * sizeof *rs);
  for (int k = 0; k < nr; k++) e->st.pending -= rs[k][1] - rs[k][0];
  j->nranges = 0;
  __atomic_add_fetch(&j->refs, 1, __ATOMIC_RELAXED);
  for (int k = 0; k < nr; k++)
    for (uint32_t i = rs[k][0]; i < rs[k][1]; i++) item_set(e, j, i, status);
  pp_job_unref(j);
  if (rs != ranges) free(rs);
}

/* ------------------------------------------------------------------ */
/* workers                                                              */

static void w_epoll(pp_engine *e, int slot) {
  pp_worker *w = &e->w[slot];
  if (w->fd < 0) return;
  uint32_t ev = EPOLLIN | EPOLLRDHUP;
  if (w->in.eof) ev = 0;
  if (pp_out_pending(&w->out)) ev |= EPOLLOUT;
  if (ev == w->epev) return;
  struct epoll_event ee;
  memset(&ee, 0, sizeof ee);
  ee.events = ev;
  ee.data.u64 = EVKEY(EV_WORKER, slot);
  if (w->epev == 0 && ev != 0)
    epoll_ctl(e->epfd, EPOLL_CTL_ADD, w->fd, &ee);
  else if (ev == 0)
    epoll_ctl(e->epfd, EPOLL_CTL_DEL, w->fd, &ee);
  else
    epoll_ctl(e->epfd, EPOLL_CTL_MOD, w->fd, &ee);
  w->epev = ev;
}

/* Signal a worker. SIGTERM and SIGKILL go to its whole process group
 * too, so that what its task started stops with it. The zygote has not
 * reported the worker dead yet, so its pid (and group) is still its own. */
static void w_signal(pp_worker *w, int sig) {
  if (w->remote) {
    pp_zmsg m;
    memset(&m, 0, sizeof m);
    m.type = PP_Z_SIGNAL;
    m.slot = (uint32_t)w->slot;
    m.gen = w->gen;
    m.status = sig;
    if (w->zfd >= 0) send(w->zfd, &m, sizeof m, MSG_NOSIGNAL | MSG_DONTWAIT);
    return;
  }
  int sent = 0;
  if (w->pidfd >= 0) sent = syscall(SYS_pidfd_send_signal, w->pidfd, sig, NULL, 0) == 0;
  if (w->pid <= 0) return;
  if (sig == SIGTERM || sig == SIGKILL) kill(-w->pid, sig);
  if (!sent) kill(w->pid, sig);
}

/* The seq of the item the worker last started (pp_page), without the
 * flag of a revocation it has not seen yet. */
static uint64_t w_started(const pp_worker *w) {
  if (!w->page) return 0;
  return __atomic_load_n(&w->page->started, __ATOMIC_ACQUIRE) & ~PP_STARTED_REVOKED;
}

static void w_flush(pp_engine *e, int slot) {
  pp_worker *w = &e->w[slot];
  if (w->fd < 0) return;
  if (pp_out_pending(&w->out)) {
    int rc = pp_out_flush(&w->out, w->fd);
    if (rc != 0) { /* peer gone: its death report will follow */
      pp_out_free(&w->out);
      pp_out_init(&w->out);
    }
  }
  if (!pp_out_pending(&w->out) && w->retire && !w->shut) {
    shutdown(w->fd, SHUT_WR); /* the worker exits after what it has */
    w->shut = 1;
  }
  w_epoll(e, slot);
}

/* How many items a worker may hold: about 2 ms of work, so tiny tasks
 * stream in batches while long ones go out one at a time (a queued task
 * never waits behind a long one while another worker idles, and stays
 * cancellable). Until durations are known, one at a time. */
static uint32_t window(const pp_engine *e) {
  if (!e->ewma_ns) return 1;
  uint64_t w = (2000000u + e->ewma_ns - 1) / e->ewma_ns;
  if (w < 1) w = 1;
  if (w > 512) w = 512;
  return (uint32_t)w;
}

/* A job's payload in two parts: the function ([u32 fnlen][fn]) and the
 * items ([u32 len][bytes] each); held whole in x->payload, or as the
 * shared j->fn and the job's inline bytes. */
typedef struct job_parts {
  const char *fn, *items;
  size_t fnpart, ilen;
  int fd; /* the whole payload's memfd, or -1 */
} job_parts;

static void get_parts(const pp_job *j, job_parts *jp) {
  const pp_blob *P = j->x ? j->x->payload : NULL;
  if (P) {
    jp->fn = P->p;
    jp->fnpart = PP_LEN_PREFIX + (size_t)pp_wire_len((const unsigned char *)P->p);
    if (jp->fnpart > P->n) jp->fnpart = P->n; /* (shared bytes: see item_offset) */
    jp->items = P->p + jp->fnpart;
    jp->ilen = P->n - jp->fnpart;
    jp->fd = P->fd;
  } else {
    jp->fn = j->fn->p;
    jp->fnpart = j->fn->n;
    jp->items = (const char *)(j->items + (j->n ? j->n : 1));
    jp->ilen = j->ilen;
    jp->fd = -1;
  }
}

/* Byte offset of item i in a job's items part. Only a part of a job
 * needs it (after a worker death, or a split for max_tasks), so it is
 * found by walking the lengths from the nearest boundary seen before, not
 * kept per item (a job split so has x: its payload is held whole). */
static size_t item_offset(pp_job *j, const job_parts *jp, uint32_t i) {
  const unsigned char *p = (const unsigned char *)jp->items;
  if (i == j->n) return jp->ilen;
  size_t k = 0, off = 0;
  pp_job_ext *x = j->x;
  if (x && x->scan_off && x->scan_item <= i) {
    k = x->scan_item;
    off = x->scan_off;
  }
  /* within the part whatever the lengths say: a memfd's bytes are shared
   * with the workers, and a worker's bad write must not take the parent
   * down (the worker is then sent a range it refuses, and dies) */
  for (; k < i && off + PP_LEN_PREFIX <= jp->ilen; k++)
    off += PP_LEN_PREFIX + (size_t)pp_wire_len(p + off);
  if (off > jp->ilen) off = jp->ilen;
  if (x) {
    x->scan_item = i;
    x->scan_off = off;
  }
  return off;
}

/* Append a TASK frame for items [first, first+count) of job j. */
static int w_task(pp_engine *e, pp_worker *w, pp_job *j, uint32_t first, uint32_t count,
                  uint64_t seq0) {
  job_parts jp;
  get_parts(j, &jp);
  uint64_t max_output = e->cfg.max_output;
  size_t ilo, ihi;
  if (first == 0 && first + count == j->n) { /* the common case: the whole job */
    ilo = 0;
    ihi = jp.ilen;
  } else {
    ilo = item_offset(j, &jp, first);
    ihi = item_offset(j, &jp, first + count);
  }
  pp_task_hdr th = {seq0, count, pp_engine_job_timeout(e, j) ? PP_TASK_TIMED : 0};
  size_t tail = 0; /* a capture frame ends with max_output */
  if (j->x && j->x->capture) {
    th.flags |= PP_TASK_CAPTURE;
    tail = PP_TASK_CAPTURE_TAIL;
  }
  pp_wbuf *b = &w->out.buf;
  if (jp.fd >= 0) {
    if (first == 0 && count == j->n) th.flags |= PP_TASK_WHOLE;
    int fd = dup(jp.fd);
    if (fd < 0) return errno;
    if (pp_wbuf_reserve(b, PP_FRAME_HDR + PP_TASK_FD_BODY + tail) != 0) {
      close(fd);
      return ENOMEM;
    }
    size_t h = pp_frame_begin(b, PP_FR_TASK, PP_FF_FD);
    unsigned char *q = (unsigned char *)b->p + b->n;
    pp_task_hdr_put(q, &th);
    pp_task_fd r = {PP_LEN_PREFIX, (uint32_t)(jp.fnpart - PP_LEN_PREFIX), jp.fnpart + ilo,
                    ihi - ilo};
    pp_task_fd_put(q + PP_TASK_HDR, &r);
    b->n += PP_TASK_FD_BODY;
    if (tail) pp_task_capture_put(q + PP_TASK_FD_BODY, max_output);
    b->n += tail;
    pp_frame_end(b, h);
    if (pp_out_addfd(&w->out, h, fd) != 0) {
      close(fd);
      b->n = h;
      return ENOMEM;
    }
    return 0;
  }
  size_t fnpart = jp.fnpart; /* u32 fnlen, fn */
  if (pp_wbuf_reserve(b, PP_FRAME_HDR + PP_TASK_HDR + fnpart + (ihi - ilo) + tail) != 0)
    return ENOMEM;
  size_t h = pp_frame_begin(b, PP_FR_TASK, 0);
  unsigned char *q = (unsigned char *)b->p + b->n;
  pp_task_hdr_put(q, &th);
  memcpy(q + PP_TASK_HDR, jp.fn, fnpart);
  memcpy(q + PP_TASK_HDR + fnpart, jp.items + ilo, ihi - ilo);
  b->n += PP_TASK_HDR + fnpart + (ihi - ilo);
  if (tail) pp_task_capture_put(q + PP_TASK_HDR + fnpart + (ihi - ilo), max_output);
  b->n += tail;
  pp_frame_end(b, h);
  return 0;
}

/* How many items a worker may hold now (see window()); nor more than a
 * fair share of the outstanding work, counting workers still starting: a
 * burst must not pile onto the first worker up. */
static uint32_t depth(const pp_engine *e) {
  uint32_t win = window(e);
  uint64_t total = e->st.pending + e->st.running;
  uint64_t share = (total + (uint64_t)e->cfg.nworkers - 1) / (uint64_t)e->cfg.nworkers;
  if (share < 1) share = 1;
  return share < win ? (uint32_t)share : win;
}

/* Chunks (dispatches of several items) a worker may hold: the one it runs
 * and one more. The window counts items, timed mostly on earlier work: a
 * chunk whose first item turns out long would keep every chunk queued
 * behind it from the other workers, which go idle. */
#define CHUNKS_AHEAD 2

/* The worker that should get the next task: the least loaded one below
 * `win` (idle ones only, with `idle_only`; below CHUNKS_AHEAD for a
 * `chunk`); -1 if none. */
static int pick_worker(const pp_engine *e, uint32_t win, int idle_only, int chunk) {
  int best = -1;
  for (int s = 0; s < e->cfg.nworkers; s++) {
    const pp_worker *w = &e->w[s];
    if (w->state != W_READY || w->doomed || w->retire || w->stalled || w->inflight >= win) continue;
    if (chunk && w->chunks >= CHUNKS_AHEAD) continue;
    if (idle_only && w->inflight) continue;
    if (best < 0 || w->inflight < e->w[best].inflight) best = s;
  }
  return best;
}

/* Hand queued work to workers with room, least loaded first. Called
 * under the lock by the I/O thread as results arrive, and by a lone submit with
 * `idle_only` (a task reaches an idle worker at once, without waking the
 * I/O thread; deeper pipelines are filled only as results come back, so a
 * burst never queues behind a task that just started and may be long).
 * Returns 1 if a timed task went out (the I/O thread must look at its
 * deadline). */
static int dispatch(pp_engine *e, int idle_only) {
  int timed = 0;
  inbox_take(e);
  uint32_t win = depth(e);
  while (e->qhead && e->state != PP_E_CLOSING && e->state != PP_E_DEAD) {
    pp_job *j = e->qhead;
    uint32_t(*ranges)[2] = job_ranges(j);
    uint32_t lo = ranges[0][0], hi = ranges[0][1];
    int best = pick_worker(e, win, idle_only, hi - lo > 1);
    if (best < 0) break;
    pp_worker *w = &e->w[best];
    uint32_t count = hi - lo;
    if (e->cfg.max_tasks && count > e->cfg.max_tasks - w->assigned)
      count = (uint32_t)(e->cfg.max_tasks - w->assigned);
    pp_disp *d = malloc(sizeof *d);
    if (!d || w_task(e, w, j, lo, count, w->next_seq) != 0) {
      free(d);
      engine_break(e, "out of memory while dispatching");
      return timed;
    }
    d->job = j;
    d->first = lo;
    d->count = count;
    d->acked = 0;
    d->seq0 = w->next_seq;
    d->next = NULL;
    __atomic_add_fetch(&j->refs, 1, __ATOMIC_RELAXED);
    if (w->dtail)
      w->dtail->next = d;
    else
      w->dhead = d;
    w->dtail = d;
    w->next_seq += count;
    w->inflight += count;
    if (count > 1) w->chunks++;
    w->assigned += count;
    e->st.pending -= count;
    e->st.running += count;
    set_state(j, PP_JOB_RUNNING);
    if (pp_engine_job_timeout(e, j)) timed = 1;
    if (lo + count == hi) {
      memmove(ranges, ranges + 1, (size_t)(j->nranges - 1) * sizeof *ranges);
      j->nranges--;
      if (j->nranges == 0) q_remove(e, j);
    } else {
      ranges[0][0] = lo + count;
    }
    if (e->cfg.max_tasks && w->assigned >= e->cfg.max_tasks) {
      w->retire = 1;
      w->expected_exit = 1;
    }
    w->unsent = 1;
  }
  /* one send per worker for all it was given */
  for (int s = 0; s < e->cfg.nworkers; s++)
    if (e->w[s].unsent) {
      e->w[s].unsent = 0;
      w_flush(e, s);
    }
  return timed;
}

/* Taking back work queued behind a long item. A worker holds a few
 * items ahead (window(), CHUNKS_AHEAD); when the one it runs turns out
 * long, those would wait for it while another worker idles. So when the
 * queue is empty and a worker is idle, a worker that has started nothing
 * new for STEAL_NS gives back every item it has not started (the claim
 * of pp_page decides, item by item, who has it): they go back to the
 * front of the queue, in order, and it gets no new work until what it
 * kept is in. */
#define STEAL_NS 2000000u

/* Requeue worker w's items after seq `kept`, whose claim the parent has
 * revoked. */
static int w_take_back(pp_engine *e, pp_worker *w, uint64_t kept) {
  pp_disp *keep_last = NULL, *d = w->dhead;
  while (d && d->seq0 + d->count <= kept + 1) {
    keep_last = d;
    d = d->next;
  }
  pp_disp *part = NULL; /* the dispatch running `kept`, whose rest goes back */
  if (d && d->seq0 <= kept) {
    part = d;
    keep_last = d;
    d = d->next;
  }
  if (keep_last)
    keep_last->next = NULL;
  else
    w->dhead = NULL;
  w->dtail = keep_last;
  /* latest first: each requeue goes to the front of the queue */
  pp_disp *rev = NULL;
  while (d) {
    pp_disp *next = d->next;
    d->next = rev;
    rev = d;
    d = next;
  }
  int err = 0;
  uint32_t n = 0;
  while (rev) {
    pp_disp *next = rev->next;
    if (!err) err = job_requeue(e, rev->job, rev->first, rev->first + rev->count);
    n += rev->count;
    if (rev->count > 1) w->chunks--;
    pp_job_unref(rev->job);
    free(rev);
    rev = next;
  }
  if (part) {
    uint32_t keep = (uint32_t)(kept + 1 - part->seq0);
    if (!err) err = job_requeue(e, part->job, part->first + keep, part->first + part->count);
    n += part->count - keep;
    if (part->count > 1 && keep <= 1) w->chunks--;
    part->count = keep;
    if (part->acked == keep) { /* what it kept is in already: the dispatch is done */
      pp_disp **pd = &w->dhead;
      pp_disp *prev = NULL;
      while (*pd != part) {
        prev = *pd;
        pd = &prev->next;
      }
      *pd = NULL; /* (part is the last one kept) */
      w->dtail = prev;
      if (keep > 1) w->chunks--;
      pp_job_unref(part->job);
      free(part);
    }
  }
  w->inflight -= n;
  w->assigned -= n;
  return err;
}

/* Append a RESUME frame: the items up to seq `last` were taken back. */
static int w_resume(pp_worker *w, uint64_t last) {
  pp_wbuf *b = &w->out.buf;
  if (pp_wbuf_reserve(b, PP_FRAME_HDR + PP_RESUME_BODY) != 0) return ENOMEM;
  size_t h = pp_frame_begin(b, PP_FR_RESUME, 0);
  pp_resume_put((unsigned char *)b->p + b->n, last);
  b->n += PP_RESUME_BODY;
  pp_frame_end(b, h);
  return 0;
}

/* Take back what a stuck worker has not started, if a worker is idle
 * and nothing is queued; else, or if it is not stuck long enough yet,
 * set e->steal_at to when to look again. */
static void steal(pp_engine *e) {
  e->steal_at = 0;
  if (e->qhead || (e->state != PP_E_RUNNING && e->state != PP_E_DRAINING)) return;
  int idle = 0;
  for (int s = 0; s < e->cfg.nworkers && !idle; s++) {
    const pp_worker *w = &e->w[s];
    idle = w->state == W_READY && !w->doomed && !w->retire && !w->stalled && !w->inflight;
  }
  if (!idle) return;
  uint64_t now = pp_now_ns();
  int victim = -1;
  uint64_t most = 0, running = 0;
  for (int s = 0; s < e->cfg.nworkers; s++) {
    pp_worker *w = &e->w[s];
    if (w->state != W_READY || w->doomed || w->retire || w->stalled || !w->page || !w->dhead ||
        w->remote)
      continue;
    uint64_t seq = __atomic_load_n(&w->page->started, __ATOMIC_ACQUIRE);
    uint64_t last = w->next_seq - 1;
    if ((seq & PP_STARTED_REVOKED) || last <= seq) continue; /* nothing it has not started */
    if (seq != w->seen_seq || !w->seen_ns) {
      w->seen_seq = seq;
      w->seen_ns = now;
    }
    if (now - w->seen_ns < STEAL_NS) {
      uint64_t due = w->seen_ns + STEAL_NS;
      if (!e->steal_at || due < e->steal_at) e->steal_at = due;
      continue;
    }
    if (last - seq > most) {
      most = last - seq;
      victim = s;
      running = seq;
    }
  }
  if (victim < 0) return;
  pp_worker *w = &e->w[victim];
  uint64_t seen = running;
  if (!__atomic_compare_exchange_n(&w->page->started, &seen, running | PP_STARTED_REVOKED, 0,
                                   __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    return; /* it started its next item meanwhile: not stuck after all */
  }
  if (w_take_back(e, w, running) != 0 || w_resume(w, w->next_seq - 1) != 0) {
    engine_break(e, "out of memory while taking back queued work");
    return;
  }
  w->stalled = w->dhead != NULL; /* (until what it kept is in) */
  e->st.taken_back += most;
  w_flush(e, victim);
  dispatch(e, 0);
}

/* Forward what a worker wrote to stderr to ours, and keep its tail. The
 * host's stderr is never waited on: if it cannot take the bytes now,
 * they are dropped there (the tail still has them). */
static void w_stderr(pp_engine *e, int slot) {
  pp_worker *w = &e->w[slot];
  char buf[4096];
  for (int rounds = 0; rounds < 16 && w->errfd >= 0; rounds++) {
    ssize_t r = read(w->errfd, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (r <= 0) {
      epoll_ctl(e->epfd, EPOLL_CTL_DEL, w->errfd, NULL);
      close(w->errfd);
      w->errfd = -1;
      return;
    }
    struct pollfd p = {2, POLLOUT, 0};
    if (poll(&p, 1, 0) == 1 && (p.revents & POLLOUT)) {
      ssize_t wr = write(2, buf, (size_t)r);
      (void)wr;
    }
    size_t n = (size_t)r, cap = sizeof w->errtail;
    if (n >= cap) {
      memcpy(w->errtail, buf + n - cap, cap);
      w->errlen = cap;
    } else {
      if (w->errlen + n > cap) {
        size_t drop = w->errlen + n - cap;
        memmove(w->errtail, w->errtail + drop, w->errlen - drop);
        w->errlen -= drop;
      }
      memcpy(w->errtail + w->errlen, buf, n);
      w->errlen += n;
    }
  }
}

/* The last lines of a worker's stderr (at most 20), or NULL. */
static char *w_tail(pp_worker *w) {
  if (!w->errlen) return NULL;
  size_t end = w->errlen, start = 0;
  int lines = 0;
  for (size_t i = end; i > 0; i--)
    if (w->errtail[i - 1] == '\n' && i != end && ++lines >= 20) {
      start = i;
      break;
    }
  char *t = malloc(end - start + 1);
  if (!t) return NULL;
  memcpy(t, w->errtail + start, end - start);
  t[end - start] = 0;
  return t;
}

/* Stream k of a dead worker's capture, as its drain thread would have
 * left it: what its file holds, then what its pipe still does (both
 * kept up to the area's cap, the rest only counted), and a note of what
 * was dropped. NULL without memory. */
static char *area_stream(const pp_worker *w, int k, size_t *len) {
  const pp_outarea *a = w->outarea;
  int file = w->outfd[k], pipe = w->outfd[2 + k];
  struct stat st;
  uint64_t base = __atomic_load_n(&a->base[k], __ATOMIC_ACQUIRE), size = 0;
  if (file >= 0 && fstat(file, &st) == 0 && (uint64_t)st.st_size > base)
    size = (uint64_t)st.st_size - base;
  uint64_t n = size < a->cap ? size : a->cap;
  /* only the bytes there now: a process the task started may hold the
   * write end and write on, or never close it (so never wait for EOF) */
  int held = 0;
  if (pipe < 0 || ioctl(pipe, FIONREAD, &held) != 0 || held < 0) held = 0;
  uint64_t room = a->cap - n, more = (uint64_t)held < room ? (uint64_t)held : room;
  char *s = malloc((size_t)(n + more) + PP_OUTPUT_DROPPED_MAX + 1);
  if (!s) return NULL;
  uint64_t got = 0;
  while (got < n) {
    ssize_t r = pread(file, s + got, (size_t)(n - got), (off_t)(base + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += (uint64_t)r;
  }
  for (uint64_t end = got + more; got < end;) {
    ssize_t r = read(pipe, s + got, (size_t)(end - got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break; /* non-blocking: nothing more */
    got += (uint64_t)r;
  }
  uint64_t drop =
      size - n + ((uint64_t)held - more) + __atomic_load_n(&a->lost[k], __ATOMIC_ACQUIRE);
  int m =
      drop ? snprintf(s + got, PP_OUTPUT_DROPPED_MAX, PP_OUTPUT_DROPPED, (unsigned long long)drop)
           : 0;
  *len = (size_t)got + (m > 0 ? (size_t)m : 0);
  return s;
}

/* The output item `seq` had written when its worker died, if it was
 * captured (the area then names it). */
static void w_death_output(const pp_worker *w, uint64_t seq, pp_death *d) {
  const pp_outarea *a = w->outarea;
  d->out = d->err = NULL;
  d->outlen = d->errlen = 0;
  d->has_output = 0;
  if (!a || __atomic_load_n(&a->seq, __ATOMIC_ACQUIRE) != seq) return;
  for (int k = 0; k < 4; k++)
    if (w->outfd[k] < 0) return; /* all the parts, or nothing right */
  d->out = area_stream(w, 0, &d->outlen);
  d->err = area_stream(w, 1, &d->errlen);
  d->has_output = d->out && d->err;
}

/* One part of a worker's capture (an OUTBUF frame): map the area, keep
 * a file or a pipe (the frame's fd is then taken: f->fd = -1). Each
 * once, and only while this process has room: a capture holds four fds
 * here, and more than half of the fd table spent on them would leave
 * too few for the application and for the fds frames bring (a worker
 * whose fd cannot be received is killed). Without them its deaths come
 * without output. */
static void w_outbuf(pp_engine *e, pp_worker *w, pp_frame *f) {
  if (f->len != PP_OUTBUF_BODY || f->fd < 0) return;
  int part = pp_outbuf_get(f->body);
  struct stat st;
  if (part == PP_OUT_AREA) {
    if (w->outarea || (rlim_t)f->fd + PP_OUT_PARTS >= e->capture_fds) return;
    if (fstat(f->fd, &st) != 0 || st.st_size < PP_OUTAREA_HDR) return;
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, f->fd, 0);
    if (m == MAP_FAILED) return;
    w->outarea = m;
    w->outsize = (size_t)st.st_size;
  } else if (w->outarea && part < PP_OUT_PARTS && w->outfd[part - PP_OUT_FILE] < 0) {
    /* a pipe is non-blocking already (the drain thread's is the same
     * open file); this says so here */
    if (part >= PP_OUT_PIPE) fcntl(f->fd, F_SETFL, O_NONBLOCK | fcntl(f->fd, F_GETFL));
    w->outfd[part - PP_OUT_FILE] = f->fd;
    f->fd = -1;
  }
}

/* Release a worker slot's resources (its process is gone). */
static void w_clear(pp_engine *e, int slot) {
  pp_worker *w = &e->w[slot];
  if (w->fd >= 0) {
    if (w->epev) epoll_ctl(e->epfd, EPOLL_CTL_DEL, w->fd, NULL);
    close(w->fd);
  }
  if (w->pidfd >= 0) close(w->pidfd);
  if (w->errfd >= 0) {
    epoll_ctl(e->epfd, EPOLL_CTL_DEL, w->errfd, NULL);
    close(w->errfd);
  }
  if (w->page) munmap(w->page, 4096);
  if (w->outarea) munmap(w->outarea, w->outsize);
  for (int k = 0; k < 4; k++)
    if (w->outfd[k] >= 0) close(w->outfd[k]);
  pp_out_free(&w->out);
  pp_in_free(&w->in);
  uint32_t gen = w->gen;
  memset(w, 0, sizeof *w);
  w->fd = w->pidfd = w->errfd = -1;
  for (int k = 0; k < 4; k++) w->outfd[k] = -1;
  w->gen = gen + 1;
  w->state = W_EMPTY;
  pp_out_init(&w->out);
  pp_in_init(&w->in);
}

/* The zygote reaped worker `slot`: settle everything it held. */
static void w_died(pp_engine *e, int slot, int status) {
  pp_worker *w = &e->w[slot];
  uint64_t started = w_started(w);
  int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  int lost_one = 0;
  /* drain results still buffered in the channel before judging */
  pp_disp *d = w->dhead;
  w->dhead = w->dtail = NULL;
  w->chunks = 0;
  while (d) {
    pp_disp *next = d->next;
    pp_job *j = d->job;
    for (uint32_t k = d->acked; k < d->count; k++) {
      uint64_t seq = d->seq0 + k;
      uint32_t i = d->first + k;
      if (seq == started && j->items[i].status == PP_IT_PENDING) {
        job_note_death(j, i, seq, w, sig, code);
        e->st.running--;
        if (e->killing || e->broken ||
            (e->cfg.break_on_lost && !w->expected_exit && w->kill_seq != seq)) {
          /* with on_worker_lost = "break" the pool breaks (just below) */
          lost_one = 1;
          item_set(e, j, i, PP_IT_BROKEN);
        } else if (w->kill_seq == seq) {
          item_set(e, j, i, PP_IT_DEADLINE);
        } else {
          item_set(e, j, i, PP_IT_LOST);
          lost_one = 1;
        }
        continue;
      }
      /* not started, or finished without its result reaching us */
      uint32_t hi = i + 1;
      while (k + 1 < d->count && d->seq0 + k + 1 != started) {
        k++;
        hi++;
      }
      job_requeue(e, j, i, hi);
      if (e->killing || e->broken) job_fail_pending(e, j, PP_IT_BROKEN);
    }
    pp_job_unref(j);
    free(d);
    d = next;
  }
  int expected = w->expected_exit || e->state == PP_E_CLOSING || e->killing || e->broken;
  int was_deadline = w->kill_seq != 0, was_ready = w->ready;
  pid_t pid = w->pid;
  w_clear(e, slot);
  if (!expected) {
    e->st.worker_restarts++;
    if (!was_ready) e->startup_deaths++;
    if (e->cfg.break_on_lost && (lost_one || !was_deadline)) {
      char msg[256];
      snprintf(msg, sizeof msg,
               "A process in the process pool was terminated abruptly while the future was "
               "running or pending (worker %d, %s %d).",
               (int)pid, sig ? "signal" : "exit code", sig ? sig : code);
      engine_break(e, msg);
    } else if (e->startup_deaths > 2 * e->cfg.nworkers + 3) {
      engine_break(e, "worker processes keep dying before they are ready");
    }
  } else if (was_deadline) {
    e->st.worker_restarts++;
  }
}

/* A RESULT frame: record each item's outcome. */
static int w_results(pp_engine *e, int slot, const pp_frame *f) {
  pp_worker *w = &e->w[slot];
  const unsigned char *b = f->body;
  pp_blob *blob = NULL;
  if (f->len < PP_RESULT_HDR) return -1;
  pp_result_hdr rh;
  pp_result_hdr_get(b, &rh);
  uint64_t seq0 = rh.seq0, elapsed = rh.elapsed_ns;
  uint32_t count = rh.count;
  size_t pos = PP_RESULT_HDR;
  if (f->flags & PP_FF_FD) {
    if (count != 1 || f->len < pos + PP_RESULT_FD_ITEM) return -1;
    int err = 0;
    uint64_t len = pp_result_fd_item_len(b + pos);
    blob = pp_blob_map(f->fd, (size_t)len, 1, &err); /* the worker let go of it */
    if (!blob) return -1;
  } else {
    blob = pp_blob_new(b, f->len);
    if (!blob) return -1;
  }
  if (count) {
    uint64_t per = elapsed / count;
    e->ewma_ns = e->ewma_ns ? (e->ewma_ns * 7 + per) / 8 : (per ? per : 1);
    if (!e->ewma_ns) e->ewma_ns = 1;
  }
  for (uint32_t k = 0; k < count; k++) {
    uint64_t seq = seq0 + k;
    pp_disp *d = w->dhead;
    if (!d || seq != d->seq0 + d->acked) {
      pp_blob_unref(blob);
      return -1; /* results must come in order */
    }
    int status;
    size_t off, len;
    if (f->flags & PP_FF_FD) {
      status = b[pos];
      off = 0;
      len = blob->n;
    } else {
      if (f->len < pos + PP_RESULT_ITEM) {
        pp_blob_unref(blob);
        return -1;
      }
      status = b[pos];
      len = pp_result_item_len(b + pos);
      off = pos + PP_RESULT_ITEM;
      if (len > f->len - off) {
        pp_blob_unref(blob);
        return -1;
      }
      pos = off + len;
    }
    int output = (status & PP_RES_OUTPUT) != 0;
    status &= ~PP_RES_OUTPUT;
    size_t rl, oo, ol, eo, el;
    if ((status != PP_RES_OK && status != PP_RES_ERROR) ||
        (output && pp_output_split(blob->p + off, len, &rl, &oo, &ol, &eo, &el) != 0)) {
      pp_blob_unref(blob);
      return -1;
    }
    pp_job *j = d->job;
    uint32_t i = d->first + d->acked;
    d->acked++;
    w->inflight--;
    e->st.running--;
    pp_item *it = &j->items[i];
    if (it->status == PP_IT_PENDING) {
      if (!j->nblobs || pp_job_blob(j, j->nblobs - 1) != blob) { /* the job keeps the frame */
        if (job_add_blob(j, blob) != 0) {
          pp_blob_unref(blob);
          return -1;
        }
      }
      it->ref = j->nblobs - 1;
      it->off = (uint32_t)off;
      it->len = f->flags & PP_FF_FD ? PP_WHOLE_BLOB : (uint32_t)len;
      it->output = (uint8_t)output;
      item_set(e, j, i, status == PP_RES_OK ? PP_IT_OK : PP_IT_ERROR);
    }
    if (d->acked == d->count) {
      w->dhead = d->next;
      if (!w->dhead) {
        w->dtail = NULL;
        w->stalled = 0;
      }
      if (d->count > 1) w->chunks--;
      pp_job_unref(j);
      free(d);
    }
  }
  pp_blob_unref(blob);
  return 0;
}

/* A REPORT frame: the item's job keeps it as its latest report, and
 * queues it when the Lua side listens. A report of an item that is no
 * longer running is dropped; so is one there is no memory for. */
static int w_report(pp_engine *e, int slot, const pp_frame *f) {
  if (f->len < PP_REPORT_HDR || (f->flags & PP_FF_FD)) return -1;
  uint64_t seq = pp_report_hdr_get(f->body);
  pp_disp *d = e->w[slot].dhead;
  while (d && seq >= d->seq0 + d->count) d = d->next;
  if (!d || seq < d->seq0 + d->acked) return 0;
  pp_job *j = d->job;
  uint32_t i = d->first + (uint32_t)(seq - d->seq0);
  if (job_reports(j) == PP_REPORTS_DROP || j->items[i].status != PP_IT_PENDING) return 0;
  pp_job_ext *x = job_ext(j); /* reports are rare: kept beside the job */
  pp_blob *b = x ? pp_blob_new(f->body, f->len) : NULL;
  if (!b) return 0;
  pp_blob_unref(x->report);
  x->report = b;
  x->report_item = i;
  x->nreports++;
  if (x->reports != PP_REPORTS_QUEUE) return 0;
  pp_report_note *n = malloc(sizeof *n);
  if (!n) return 0;
  *n = (pp_report_note){j, i, x->nreports, pp_blob_ref(b), NULL};
  __atomic_add_fetch(&j->refs, 1, __ATOMIC_RELAXED);
  if (e->rtail)
    e->rtail->next = n;
  else
    e->rhead = n;
  e->rtail = n;
  notify(e);
  return 0;
}

/* Read and handle what a worker sent; returns the frames handled. */
static int w_readable(pp_engine *e, int slot) {
  pp_worker *w = &e->w[slot];
  int frames = 0;
  for (int rounds = 0; rounds < 64 && !w->in.eof; rounds++) {
    long r = pp_in_read(&w->in, w->fd, 0);
    if (r < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      w->doomed = 1; /* a channel we cannot read is a lost worker */
      w_signal(w, SIGKILL);
      w->in.eof = 1;
      break;
    }
    pp_frame f;
    int rc;
    while ((rc = pp_in_next(&w->in, &f)) == 1) {
      int bad = 0;
      frames++;
      if (f.type == PP_FR_RESULT) {
        bad = w_results(e, slot, &f) != 0;
      } else if (f.type == PP_FR_OUTBUF) {
        w_outbuf(e, w, &f);
      } else if (f.type == PP_FR_REPORT) {
        bad = w_report(e, slot, &f) != 0;
      } else if (f.type == PP_FR_READY) {
        w->ready = 1;
        e->startup_deaths = 0;
      } else if (f.type == PP_FR_RETIRE) {
        /* it ends after the results it sent: its unstarted items are
         * requeued when the zygote reports it gone */
        w->retire = 1;
        w->expected_exit = 1;
        w_flush(e, slot);
      } else if (f.type == PP_FR_INITFAIL) {
        /* the message is the initializer's error, already a string list */
        char msg[512];
        snprintf(msg, sizeof msg, "initializer failed: %.*s", (int)(f.len < 400 ? f.len : 400),
                 (const char *)f.body);
        engine_break(e, msg);
      } else {
        bad = 1;
      }
      if (f.fd >= 0) close(f.fd);
      if (bad) rc = -1;
      if (rc < 0 || e->w[slot].fd < 0) break;
    }
    if (rc < 0) { /* a worker that breaks the protocol is killed */
      w->doomed = 1;
      w_signal(w, SIGKILL);
      w->in.eof = 1;
      break;
    }
    if (r == 0) break;
  }
  w_epoll(e, slot);
  return frames;
}

/* ------------------------------------------------------------------ */
/* the zygote                                                           */

static void z_spawn(pp_engine *e, int slot) {
  pp_worker *w = &e->w[slot];
  pp_zmsg m;
  memset(&m, 0, sizeof m);
  m.type = PP_Z_SPAWN;
  m.slot = (uint32_t)slot;
  m.gen = w->gen;
  if (send(e->zfd, &m, sizeof m, MSG_NOSIGNAL) == (ssize_t)sizeof m) w->state = W_SPAWNING;
}

/* How long no worker starts after one could not for want of fds. */
#define RESPAWN_PAUSE_NS 50000000u

/* Every slot's host is gone for good: the pool breaks, naming each host
 * and why (the slots of a host say the same). */
static void all_hosts_lost(pp_engine *e) {
  char msg[2048];
  const char *sep = ": ";
  size_t n = (size_t)snprintf(msg, sizeof msg, "every host of the pool is lost");
  for (int s = 0; s < e->cfg.nworkers && n < sizeof msg; s++) {
    const char *why = e->w[s].host_lost;
    int seen = !why[0];
    for (int k = 0; k < s && !seen; k++) seen = strcmp(e->w[k].host_lost, why) == 0;
    if (seen) continue;
    n += (size_t)snprintf(msg + n, sizeof msg - n, "%s%s", sep, why);
    sep = "; ";
  }
  engine_break(e, msg);
}

/* Why the worker's host was lost (or is gone), as the proxy said. */
static void keep_host_lost(pp_worker *w, const pp_zmsg *m) {
  snprintf(w->host_lost, sizeof w->host_lost, "%.*s", (int)sizeof m->text, m->text);
}

static void z_message(pp_engine *e, const pp_zmsg *m, int *fds, int nfds) {
  if (m->type == PP_Z_SPAWNED && m->slot < (uint32_t)e->cfg.nworkers && nfds == 4 &&
      e->w[m->slot].gen == m->gen && e->w[m->slot].state == W_SPAWNING) {
    pp_worker *w = &e->w[m->slot];
    w->pid = m->pid;
    w->remote = (m->flags & PP_ZF_REMOTE) != 0;
    snprintf(w->host, sizeof w->host, "%s", w->remote ? m->text : "");
    w->host_lost[0] = 0;
    w->zfd = e->zfd;
    w->slot = (int)m->slot;
    w->fd = fds[0];
    if (m->err == 0) {
      w->pidfd = fds[1];
    } else { /* no pidfds here: the zygote sent a stand-in */
      close(fds[1]);
      w->pidfd = -1;
    }
    void *pg = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fds[2], 0);
    close(fds[2]);
    w->page = pg == MAP_FAILED ? NULL : pg;
    w->errfd = fds[3];
    fcntl(w->errfd, F_SETFL, O_NONBLOCK | fcntl(w->errfd, F_GETFL));
    struct epoll_event ee;
    memset(&ee, 0, sizeof ee);
    ee.events = EPOLLIN;
    ee.data.u64 = EVKEY(EV_STDERR, m->slot);
    epoll_ctl(e->epfd, EPOLL_CTL_ADD, w->errfd, &ee);
    w->next_seq = 1;
    w->state = W_READY;
    fcntl(w->fd, F_SETFL, O_NONBLOCK | fcntl(w->fd, F_GETFL));
    w_epoll(e, (int)m->slot);
    if (e->state == PP_E_CLOSING || e->killing || e->broken) {
      w->retire = 1;
      w->expected_exit = 1;
      if (e->killing || e->broken) w_signal(w, e->killing ? e->killing : SIGKILL);
      w_flush(e, (int)m->slot);
    }
    return;
  }
  for (int i = 0; i < nfds; i++) close(fds[i]);
  pp_zmsg short_of_fds;
  if (m->type == PP_Z_SPAWNED && m->slot < (uint32_t)e->cfg.nworkers &&
      e->w[m->slot].gen == m->gen && e->w[m->slot].state == W_SPAWNING) {
    /* its fds did not all arrive: this process's fd table was full, and
     * the kernel drops what it cannot install. The worker finds its
     * channel closed and exits; the slot is free again, as after any
     * failed start (else it would wait for this worker forever) */
    short_of_fds = *m;
    short_of_fds.type = PP_Z_SPAWNFAIL;
    short_of_fds.err = EMFILE;
    short_of_fds.flags = 0;
    m = &short_of_fds;
  }
  if (m->type == PP_Z_SPAWNFAIL && m->slot < (uint32_t)e->cfg.nworkers &&
      e->w[m->slot].gen == m->gen) {
    e->w[m->slot].state = m->flags & PP_ZF_GONE ? W_GONE : W_EMPTY;
    if (m->flags & PP_ZF_GONE) keep_host_lost(&e->w[m->slot], m); /* its host and why */
    if (m->err == EMFILE || m->err == ENFILE) e->respawn_at = pp_now_ns() + RESPAWN_PAUSE_NS;
    int alive = 0, gone = 0;
    for (int s = 0; s < e->cfg.nworkers; s++) {
      alive += e->w[s].state == W_READY || e->w[s].state == W_SPAWNING;
      gone += e->w[s].state == W_GONE;
    }
    if (gone == e->cfg.nworkers) {
      all_hosts_lost(e);
    } else if (!alive && !(m->flags & PP_ZF_GONE) && e->state != PP_E_CLOSING) {
      char msg[160];
      snprintf(msg, sizeof msg, "no worker process could be started: %s", strerror(m->err));
      engine_break(e, msg);
    }
  } else if (m->type == PP_Z_EXITED) {
    for (int s = 0; s < e->cfg.nworkers; s++)
      if (e->w[s].state == W_READY &&
          ((m->flags & PP_ZF_REMOTE)
               ? e->w[s].remote && (uint32_t)s == m->slot && e->w[s].gen == m->gen
               : !e->w[s].remote && e->w[s].pid == m->pid)) {
        /* read whatever it managed to send (and say) before it died */
        if (e->w[s].fd >= 0 && !e->w[s].in.eof) w_readable(e, s);
        if (m->flags & PP_ZF_LOST) keep_host_lost(&e->w[s], m);
        w_stderr(e, s);
        w_died(e, s, m->status);
        break;
      }
  }
}

static void z_readable(pp_engine *e) {
  for (;;) {
    pp_zmsg m;
    memset(&m, 0, sizeof m);
    int fds[4], nfds;
    long r = pp_recv_fds(e->zfd, &m, sizeof m, fds, 4, &nfds, MSG_DONTWAIT);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (r <= 0) { /* the zygote is gone; its workers die with it */
      for (int i = 0; i < nfds; i++) close(fds[i]);
      e->zdead = 1;
      epoll_ctl(e->epfd, EPOLL_CTL_DEL, e->zfd, NULL);
      if (e->state != PP_E_CLOSING && !e->broken && !e->killing)
        engine_break(e, "the zygote process died");
      for (int s = 0; s < e->cfg.nworkers; s++) {
        if (e->w[s].state == W_READY) {
          w_signal(&e->w[s], SIGKILL);
          w_died(e, s, 0);
        } else if (e->w[s].state == W_SPAWNING) {
          e->w[s].state = W_EMPTY;
        }
      }
      return;
    }
    if ((size_t)r == sizeof m)
      z_message(e, &m, fds, nfds);
    else
      for (int i = 0; i < nfds; i++) close(fds[i]);
  }
}

/* ------------------------------------------------------------------ */
/* state changes                                                        */

static void engine_break(pp_engine *e, const char *msg) {
  if (e->broken) return;
  e->broken = 1;
  __atomic_store_n(&e->accepting, 0, __ATOMIC_SEQ_CST);
  inbox_take(e);
  free(e->broken_msg);
  e->broken_msg = strdup(msg);
  /* every unfinished job fails */
  while (e->qhead) job_fail_pending(e, e->qhead, PP_IT_BROKEN);
  for (int s = 0; s < e->cfg.nworkers; s++) {
    pp_worker *w = &e->w[s];
    if (w->state == W_READY) {
      w->doomed = 1;
      w->expected_exit = 1;
      w_signal(w, SIGKILL);
    }
  }
  if (e->state == PP_E_RUNNING || e->state == PP_E_DRAINING) e->state = PP_E_CLOSING;
  notify(e);
}

static int all_idle(const pp_engine *e) {
  if (e->qhead) return 0;
  for (int s = 0; s < e->cfg.nworkers; s++)
    if (e->w[s].dhead) return 0;
  return 1;
}

/* Move the lifecycle along: spawn, drain, close, end. */
static void progress(pp_engine *e) {
  inbox_take(e);
  if (e->state == PP_E_DRAINING && all_idle(e)) e->state = PP_E_CLOSING;
  if (e->state == PP_E_RUNNING || (e->state == PP_E_DRAINING && e->qhead)) {
    if (e->respawn_at && pp_now_ns() >= e->respawn_at) e->respawn_at = 0;
    if (!e->zdead && !e->broken && !e->respawn_at)
      for (int s = 0; s < e->cfg.nworkers; s++)
        if (e->w[s].state == W_EMPTY) z_spawn(e, s);
  }
  if (e->state == PP_E_CLOSING) {
    int alive = 0;
    for (int s = 0; s < e->cfg.nworkers; s++) {
      pp_worker *w = &e->w[s];
      if (w->state == W_EMPTY || w->state == W_GONE) continue;
      if (w->state == W_SPAWNING && e->cfg.on_hosts) continue;
      alive++;
      if (w->state == W_READY) {
        if (!w->retire) {
          w->retire = 1;
          w->expected_exit = 1;
          w_flush(e, s);
        }
        /* idle and told to exit: one that does not (a hung thread, a stuck
         * exit handler) is killed rather than wedge the shutdown */
        if (!w->kill_at) w->kill_at = pp_now_ns() + 2000000000u;
      }
    }
    if (!alive || e->zdead) {
      if (e->zfd >= 0) {
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, e->zfd, NULL);
        close(e->zfd); /* the zygote exits on EOF */
        e->zfd = -1;
      }
      if (e->zpid > 0) {
        int st;
        while (waitpid(e->zpid, &st, 0) < 0 && errno == EINTR) {
        }
        e->zpid = 0;
      }
      /* anything still listed cannot run any more */
      while (e->qhead) job_fail_pending(e, e->qhead, PP_IT_BROKEN);
      e->state = PP_E_DEAD;
      notify(e);
    }
  }
}

/* Deadlines and kill escalation; returns ms until the next check (-1). */
static int deadlines(pp_engine *e) {
  uint64_t now = pp_now_ns(), next = 0;
  for (int s = 0; s < e->cfg.nworkers; s++) {
    pp_worker *w = &e->w[s];
    if (w->state != W_READY) continue;
    if (w->kill_at) {
      if (now >= w->kill_at) {
        w_signal(w, SIGKILL);
        w->kill_at = 0;
      } else if (!next || w->kill_at < next) {
        next = w->kill_at;
      }
      continue;
    }
    if (w->doomed || !w->dhead || !w->page) continue;
    uint64_t started = w_started(w);
    /* the item running is the first unacknowledged one at or after it */
    for (pp_disp *d = w->dhead; d; d = d->next) {
      uint64_t timeout_ns = pp_engine_job_timeout(e, d->job);
      if (!timeout_ns) continue;
      uint64_t first = d->seq0 + d->acked, last = d->seq0 + d->count - 1;
      if (started >= first && started <= last) {
        uint64_t t0 = __atomic_load_n(&w->page->started_ns, __ATOMIC_ACQUIRE);
        uint64_t due = t0 + timeout_ns;
        if (now >= due) {
          w->doomed = 1;
          w->kill_seq = started;
          w_signal(w, SIGTERM);
          w->kill_at = now + 200000000u; /* then SIGKILL */
          if (!next || w->kill_at < next) next = w->kill_at;
        } else if (!next || due < next) {
          next = due;
        }
        break;
      }
      if (started < first) { /* not started yet: look again a timeout later */
        uint64_t due = now + timeout_ns;
        if (!next || due < next) next = due;
        break;
      }
    }
  }
  if (e->killing) { /* escalate a terminate that is not obeyed */
    for (int s = 0; s < e->cfg.nworkers; s++)
      if (e->w[s].state == W_READY) {
        if (!e->w[s].kill_at) e->w[s].kill_at = now + 2000000000u;
        if (!next || e->w[s].kill_at < next) next = e->w[s].kill_at;
      }
  }
  if (!next) return -1;
  uint64_t ms = (next > now ? next - now : 0) / 1000000u + 1;
  return ms > 60000 ? 60000 : (int)ms;
}

static void wake(pp_engine *e) {
  uint64_t one = 1;
  ssize_t r = write(e->wakefd, &one, sizeof one);
  (void)r;
}

/* After a look under the lock: tell submits whether a worker is idle
 * (a push must then wake the I/O thread). Then look at the inbox again:
 * the hint's store and this load, and a push and its load of the hint,
 * are sequentially consistent, so either the push sees the hint and
 * wakes the I/O thread, or this sees the push and hands it out (a timed
 * task wakes the I/O thread for its deadline). */
static void hint_idle(pp_engine *e) {
  int idle = e->state == PP_E_RUNNING && pick_worker(e, depth(e), 1, 0) >= 0;
  __atomic_store_n(&e->idle_hint, idle, __ATOMIC_SEQ_CST);
  if (idle && __atomic_load_n(&e->inbox, __ATOMIC_SEQ_CST) && dispatch(e, 0)) wake(e);
}

static void *io_main(void *arg) {
  pp_engine *e = arg;
  struct epoll_event ev[64];
  pp_forkgate_enter();
  pthread_mutex_lock(&e->mu);
  e->th_started = 1;
  pthread_cond_signal(&e->th_cv);
  progress(e);
  while (e->state != PP_E_DEAD) {
    int tmo = deadlines(e);
    uint64_t at[2] = {e->steal_at, e->respawn_at};
    for (int k = 0; k < 2; k++) {
      if (!at[k]) continue;
      uint64_t now = pp_now_ns(); /* (in ms, rounded up, as deadlines) */
      int ms = at[k] > now ? (int)((at[k] - now) / 1000000u) + 1 : 0;
      if (tmo < 0 || ms < tmo) tmo = ms;
    }
    pthread_mutex_unlock(&e->mu);
    pp_forkgate_leave(); /* a fork may happen while it waits */
    int n = epoll_wait(e->epfd, ev, 64, tmo);
    pp_forkgate_enter();
    pthread_mutex_lock(&e->mu);
    for (int i = 0; i < n; i++) {
      uint64_t key = ev[i].data.u64;
      int kind = (int)(key >> 32), slot = (int)(uint32_t)key;
      if (kind == EV_WAKE) {
        uint64_t v;
        ssize_t r = read(e->wakefd, &v, sizeof v);
        (void)r;
        /* what it was woken for is dispatched below */
        __atomic_store_n(&e->wake_pending, 0, __ATOMIC_RELAXED);
      } else if (kind == EV_ZYGOTE) {
        if (e->zfd >= 0) z_readable(e);
      } else if (kind == EV_STDERR && slot < e->cfg.nworkers) {
        w_stderr(e, slot);
      } else if (kind == EV_WORKER && slot < e->cfg.nworkers && e->w[slot].fd >= 0) {
        if (ev[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) w_readable(e, slot);
        if (e->w[slot].fd >= 0 && (ev[i].events & EPOLLOUT)) w_flush(e, slot);
      }
    }
    dispatch(e, 0);
    progress(e);
    steal(e);
    hint_idle(e);
  }
  int detached = e->th_detached;
  e->th_running = 0;
  pthread_mutex_unlock(&e->mu);
  if (detached) pp_engine_unref(e);
  pp_forkgate_retire();
  return NULL;
}

/* ------------------------------------------------------------------ */
/* the API                                                              */

pp_engine *pp_engine_new(const pp_engine_cfg *cfg, pid_t zpid, int zfd, int *err) {
  pp_engine *e = calloc(1, sizeof *e);
  if (!e) {
    *err = ENOMEM;
    return NULL;
  }
  e->cfg = *cfg;
  e->refs = 1;
  pp_spare_users(1); /* the spare memfd is kept while a pool lives */
  pp_warm_users(1);  /* and so are large buffers */
  e->accepting = 1;
  e->forkgen = pp_fork_generation();
  e->zpid = zpid;
  e->zfd = zfd;
  e->epfd = e->wakefd = e->notifyfd = -1;
  e->w = calloc((size_t)cfg->nworkers, sizeof *e->w);
  /* the lock is held briefly, by two threads at most: spinning a little
   * before sleeping avoids most futex sleeps and wakeups */
  pthread_mutexattr_t ma;
  pthread_mutexattr_init(&ma);
  pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
  int mrc = pthread_mutex_init(&e->mu, &ma);
  pthread_mutexattr_destroy(&ma);
  if (mrc == 0 && pthread_cond_init(&e->th_cv, NULL) != 0) {
    pthread_mutex_destroy(&e->mu);
    mrc = ENOMEM;
  }
  if (!e->w || mrc != 0) {
    free(e->w);
    free(e);
    *err = ENOMEM;
    return NULL;
  }
  for (int s = 0; s < cfg->nworkers; s++) {
    e->w[s].fd = e->w[s].pidfd = e->w[s].errfd = -1;
    for (int k = 0; k < 4; k++) e->w[s].outfd[k] = -1;
    pp_out_init(&e->w[s].out);
    pp_in_init(&e->w[s].in);
  }
  struct rlimit nofile;
  e->capture_fds = getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY
                       ? nofile.rlim_cur / 2
                       : 1u << 20;
  e->epfd = epoll_create1(EPOLL_CLOEXEC);
  e->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  e->notifyfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  struct epoll_event ee;
  memset(&ee, 0, sizeof ee);
  int ok = e->epfd >= 0 && e->wakefd >= 0 && e->notifyfd >= 0;
  if (ok) {
    ee.events = EPOLLIN;
    ee.data.u64 = EVKEY(EV_WAKE, 0);
    ok = epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wakefd, &ee) == 0;
  }
  if (ok) {
    ee.data.u64 = EVKEY(EV_ZYGOTE, 0);
    ok = epoll_ctl(e->epfd, EPOLL_CTL_ADD, zfd, &ee) == 0;
  }
  if (ok) {
    /* the I/O thread takes no signals: they go to the host's threads */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    e->refs++; /* the thread's */
    e->th_running = 1;
    ok = pthread_create(&e->th, NULL, io_main, e) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!ok) {
      e->refs--;
      e->th_running = 0;
    } else if (pp_forkgate_register(e->th) != 0) {
      /* the thread cannot be tracked for forks: it ends at once */
      pthread_mutex_lock(&e->mu);
      e->state = PP_E_DEAD;
      pthread_mutex_unlock(&e->mu);
      wake(e);
      pthread_join(e->th, NULL);
      e->refs--;
      ok = 0;
      errno = ENOMEM;
    } else {
      /* return once it is inside the gate: what the C library and the
       * sanitizers allocate as a thread starts is then done, and a fork
       * from this thread cannot catch it halfway */
      pthread_mutex_lock(&e->mu);
      while (!e->th_started) pthread_cond_wait(&e->th_cv, &e->mu);
      pthread_mutex_unlock(&e->mu);
    }
  }
  if (!ok) {
    *err = errno ? errno : EAGAIN;
    e->zfd = -1; /* the caller keeps it */
    e->zpid = 0;
    e->state = PP_E_DEAD;
    pp_engine_unref(e);
    return NULL;
  }
  return e;
}

int pp_engine_mine(const pp_engine *e) { return e->forkgen == pp_fork_generation(); }

void pp_engine_ref(pp_engine *e) { __atomic_add_fetch(&e->refs, 1, __ATOMIC_RELAXED); }

void pp_engine_unref(pp_engine *e) {
  if (!e || __atomic_sub_fetch(&e->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
  /* last reference: the thread has ended (it holds one while running) */
  for (int s = 0; s < e->cfg.nworkers; s++) {
    pp_disp *d = e->w[s].dhead;
    while (d) {
      pp_disp *n = d->next;
      pp_job_unref(d->job);
      free(d);
      d = n;
    }
    e->w[s].dhead = NULL;
    w_clear(e, s);
  }
  inbox_take(e);
  while (e->qhead) {
    pp_job *j = e->qhead;
    q_remove(e, j);
    pp_job_unref(j);
  }
  while (e->chead) {
    pp_job *j = e->chead;
    e->chead = j->qnext;
    pp_job_unref(j);
  }
  pp_report_notes_free(e->rhead);
  if (e->zfd >= 0) close(e->zfd);
  if (e->zpid > 0) {
    kill(e->zpid, SIGKILL);
    while (waitpid(e->zpid, NULL, 0) < 0 && errno == EINTR) {
    }
  }
  if (e->epfd >= 0) close(e->epfd);
  if (e->wakefd >= 0) close(e->wakefd);
  if (e->notifyfd >= 0) close(e->notifyfd);
  pthread_mutex_destroy(&e->mu);
  pthread_cond_destroy(&e->th_cv);
  free(e->broken_msg);
  free(e->w);
  free(e);
  pp_spare_users(-1);
  pp_warm_users(-1);
}

/* Submits closer together than this are a burst. */
#define BURST_GAP_NS 5000u

/* A submit in a burst, without the lock: the job goes on the inbox (the
 * I/O thread, or a waiting caller's reap, hands it out). 0 if submits
 * are not taken now: the locked path then says why. */
static int submit_unlocked(pp_engine *e, pp_job *j, uint64_t now) {
  if (!__atomic_load_n(&e->accepting, __ATOMIC_ACQUIRE)) return 0;
  __atomic_add_fetch(&j->refs, 1, __ATOMIC_RELAXED);
  pp_job *head = __atomic_load_n(&e->inbox, __ATOMIC_RELAXED);
  do {
    j->qnext = head;
  } while (
      !__atomic_compare_exchange_n(&e->inbox, &head, j, 1, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
  if (__atomic_load_n(&e->idle_hint, __ATOMIC_SEQ_CST) &&
      !__atomic_exchange_n(&e->wake_pending, 1, __ATOMIC_RELAXED))
    wake(e); /* for idle workers: busy ones' results wake it */
  /* (the clock as this submit began: what it took since is far below the
   * burst's gap, and a second read would cost a tenth of the submit) */
  __atomic_store_n(&e->submit_end_ns, now, __ATOMIC_RELAXED);
  return 1;
}

int pp_engine_submit(pp_engine *e, pp_job *j, const char **msg) {
  /* a lone task goes to an idle worker at once, from this thread, under
   * the lock; in a burst of submits that would cost a send and a worker
   * wakeup per task, so they go to the I/O thread to send in batches */
  uint64_t now = pp_now_ns();
  int burst = now - __atomic_load_n(&e->submit_end_ns, __ATOMIC_RELAXED) < BURST_GAP_NS;
  if (burst && j->n && submit_unlocked(e, j, now)) return 0;
  pthread_mutex_lock(&e->mu);
  if (e->broken) {
    *msg = e->broken_msg;
    pthread_mutex_unlock(&e->mu);
    return PP_EBROKEN;
  }
  if (e->state != PP_E_RUNNING) {
    *msg = pp_strerror(PP_ESHUTDOWN);
    pthread_mutex_unlock(&e->mu);
    return PP_ESHUTDOWN;
  }
  __atomic_add_fetch(&j->refs, 1, __ATOMIC_RELAXED);
  e->st.pending += j->n;
  if (j->n == 0) {
    set_state(j, PP_JOB_DONE);
    job_end(e, j);
  } else {
    inbox_take(e); /* (those pushed before it go first) */
    q_push(e, j, 0);
    if (dispatch(e, 1)) wake(e);
  }
  __atomic_store_n(&e->submit_end_ns, pp_now_ns(), __ATOMIC_RELAXED);
  pthread_mutex_unlock(&e->mu);
  return 0;
}

int pp_engine_cancel(pp_engine *e, pp_job *j) {
  pthread_mutex_lock(&e->mu);
  inbox_take(e);
  int r = 0;
  if (j->state == PP_JOB_CANCELLED) {
    r = 1;
  } else if (j->state == PP_JOB_PENDING) {
    set_state(j, PP_JOB_CANCELLED);
    job_fail_pending(e, j, PP_IT_CANCELLED);
    r = 1;
  }
  pthread_mutex_unlock(&e->mu);
  return r;
}

int pp_engine_job_state(pp_engine *e, pp_job *j) {
  (void)e; /* without the lock: a waiter polling it must not slow the I/O thread */
  return __atomic_load_n(&j->state, __ATOMIC_ACQUIRE);
}

int pp_engine_watch(pp_engine *e, pp_job *j) {
  pthread_mutex_lock(&e->mu);
  int r = 0;
  if (j->state != PP_JOB_DONE && j->state != PP_JOB_CANCELLED) {
    j->has_cb = 1;
    r = 1;
  }
  pthread_mutex_unlock(&e->mu);
  return r;
}

void pp_engine_watch_items(pp_engine *e, pp_job *j) {
  pthread_mutex_lock(&e->mu);
  j->watch_items = 1;
  pthread_mutex_unlock(&e->mu);
}

int pp_engine_item_get(pp_engine *e, pp_job *j, uint32_t i, pp_item_view *v) {
  memset(v, 0, sizeof *v);
  pthread_mutex_lock(&e->mu);
  const pp_item *it = &j->items[i];
  v->status = it->status;
  if (it->status == PP_IT_OK || it->status == PP_IT_ERROR) {
    pp_item_bytes(j, it, &v->len);
    v->blob = pp_blob_ref(pp_job_blob(j, it->ref));
    v->off = it->off;
  } else if (pp_item_death(j, it)) {
    v->death = *pp_item_death(j, it); /* its tail string lives as long as the job */
    v->has_death = 1;
  }
  if (v->blob)
    v->has_output = pp_item_output(j, it, &v->out, &v->outlen, &v->err, &v->errlen);
  else if (v->has_death && v->death.has_output) {
    v->out = v->death.out;
    v->err = v->death.err;
    v->outlen = v->death.outlen;
    v->errlen = v->death.errlen;
    v->has_output = 1;
  }
  pthread_mutex_unlock(&e->mu);
  return v->status;
}

pp_job *pp_engine_take_ended(pp_engine *e) {
  pthread_mutex_lock(&e->mu);
  pp_job *j = e->chead;
  e->chead = e->ctail = NULL;
  pthread_mutex_unlock(&e->mu);
  return j;
}

int pp_engine_want_reports(pp_engine *e, pp_job *j) {
  pthread_mutex_lock(&e->mu);
  int r = 0;
  if (j->state != PP_JOB_DONE && j->state != PP_JOB_CANCELLED) {
    if (job_ext(j)) j->x->reports = PP_REPORTS_QUEUE; /* (else: no memory for reports) */
    j->has_cb = 1;
    r = 1;
  }
  pthread_mutex_unlock(&e->mu);
  return r;
}

pp_report_note *pp_engine_take_reports(pp_engine *e) {
  pthread_mutex_lock(&e->mu);
  pp_report_note *n = e->rhead;
  e->rhead = e->rtail = NULL;
  pthread_mutex_unlock(&e->mu);
  return n;
}

void pp_report_notes_free(pp_report_note *n) {
  while (n) {
    pp_report_note *next = n->next;
    pp_blob_unref(n->blob);
    pp_job_unref(n->job);
    free(n);
    n = next;
  }
}

uint64_t pp_engine_latest_report(pp_engine *e, pp_job *j, pp_blob **blob, uint32_t *item) {
  pthread_mutex_lock(&e->mu);
  pp_job_ext *x = j->x;
  uint64_t num = x && x->report ? x->nreports : 0;
  *blob = num ? pp_blob_ref(x->report) : NULL;
  *item = x ? x->report_item : 0;
  pthread_mutex_unlock(&e->mu);
  return num;
}

int pp_engine_wait_add(pp_engine *e, pp_job *j, pp_waiter *w) {
  pthread_mutex_lock(&e->mu);
  int r = 0;
  if (j->state != PP_JOB_DONE && j->state != PP_JOB_CANCELLED) {
    pp_wnode *n = job_ext(j) ? malloc(sizeof *n) : NULL;
    if (n) {
      n->w = w;
      __atomic_add_fetch(&w->refs, 1, __ATOMIC_RELAXED);
      n->next = j->x->waiters;
      j->x->waiters = n;
      r = 1;
    }
  }
  pthread_mutex_unlock(&e->mu);
  return r;
}

void pp_engine_wait_del(pp_engine *e, pp_job *j, pp_waiter *w) {
  pthread_mutex_lock(&e->mu);
  for (pp_wnode **p = j->x ? &j->x->waiters : NULL; p && *p; p = &(*p)->next) {
    if ((*p)->w == w) {
      pp_wnode *n = *p;
      *p = n->next;
      pp_waiter_unref(w);
      free(n);
      break;
    }
  }
  pthread_mutex_unlock(&e->mu);
}

void pp_waiter_unref(pp_waiter *w) {
  if (__atomic_sub_fetch(&w->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
  if (w->fd >= 0) close(w->fd);
  free(w);
}

int pp_engine_fd(const pp_engine *e) { return e->notifyfd; }

/* The waiting caller reads results itself, as the I/O thread would: a
 * result then reaches it in two hops (worker, caller), not three (worker,
 * I/O thread, caller). The I/O thread, woken for the same bytes, finds
 * them gone. What the I/O thread does after reading that matters at once
 * is done here too (dispatch to a worker now idle, taking back work); it
 * is woken only when it has more to do: a deadline to watch, a steal to
 * look at later, a lifecycle step. */
void pp_engine_reap(pp_engine *e) {
  if (pthread_mutex_trylock(&e->mu) != 0) return; /* the I/O thread is at it */
  int took = inbox_take(e);
  int frames = 0;
  for (int s = 0; s < e->cfg.nworkers; s++) {
    pp_worker *w = &e->w[s];
    if (w->state == W_READY && w->fd >= 0 && w->dhead && !w->in.eof) frames += w_readable(e, s);
  }
  if (!frames && !took) {
    /* nothing read, nothing new to hand out */
  } else if (e->state != PP_E_RUNNING || e->broken) {
    wake(e); /* a lifecycle step, an INITFAIL: the I/O thread takes it from here */
  } else {
    uint64_t steal_was = e->steal_at;
    int timed = dispatch(e, 0);
    steal(e);
    if (timed || (e->steal_at && e->steal_at != steal_was)) wake(e);
  }
  hint_idle(e);
  pthread_mutex_unlock(&e->mu);
}

uint64_t pp_engine_ack(pp_engine *e) {
  pthread_mutex_lock(&e->mu);
  if (e->notified) { /* only notify() writes the eventfd, once till acked */
    uint64_t v;
    ssize_t r = read(e->notifyfd, &v, sizeof v);
    (void)r;
    e->notified = 0;
  }
  uint64_t n = e->ended_total;
  pthread_mutex_unlock(&e->mu);
  return n;
}

void pp_engine_shutdown(pp_engine *e, int cancel) {
  pthread_mutex_lock(&e->mu);
  __atomic_store_n(&e->accepting, 0, __ATOMIC_SEQ_CST);
  inbox_take(e);
  if (cancel) {
    pp_job *j = e->qhead;
    while (j) {
      pp_job *next = j->qnext;
      if (j->state == PP_JOB_PENDING) {
        set_state(j, PP_JOB_CANCELLED);
        job_fail_pending(e, j, PP_IT_CANCELLED);
      }
      j = next;
    }
  }
  if (e->state == PP_E_RUNNING) e->state = PP_E_DRAINING;
  progress(e);
  wake(e);
  pthread_mutex_unlock(&e->mu);
}

void pp_engine_kill(pp_engine *e, int sig) {
  pthread_mutex_lock(&e->mu);
  __atomic_store_n(&e->accepting, 0, __ATOMIC_SEQ_CST);
  if (e->state != PP_E_DEAD && !e->killing) {
    inbox_take(e);
    e->killing = sig;
    e->end_msg = sig == SIGKILL ? "the pool's workers were killed before the task finished"
                                : "the pool's workers were terminated before the task finished";
    while (e->qhead) job_fail_pending(e, e->qhead, PP_IT_BROKEN);
    for (int s = 0; s < e->cfg.nworkers; s++) {
      pp_worker *w = &e->w[s];
      if (w->state == W_READY) {
        w->doomed = 1;
        w->expected_exit = 1;
        w_signal(w, sig);
      }
    }
    if (e->state != PP_E_DEAD) e->state = PP_E_CLOSING;
    progress(e);
    wake(e);
  }
  pthread_mutex_unlock(&e->mu);
}

int pp_engine_state(pp_engine *e) {
  pthread_mutex_lock(&e->mu);
  int s = e->state;
  pthread_mutex_unlock(&e->mu);
  return s;
}

void pp_engine_join(pp_engine *e) {
  pthread_mutex_lock(&e->mu);
  int join = !e->th_joined && !e->th_detached;
  e->th_joined = 1;
  pthread_mutex_unlock(&e->mu);
  if (join) {
    pp_forkgate_join(e->th);
    /* nothing polls these any more: give them back now, not at GC */
    close(e->epfd);
    close(e->wakefd);
    e->epfd = e->wakefd = -1;
    pp_engine_unref(e); /* the thread's reference */
  }
}

void pp_engine_detach(pp_engine *e) {
  pthread_mutex_lock(&e->mu);
  int unref = 0;
  if (!e->th_joined && !e->th_detached) {
    e->th_detached = 1;
    pp_forkgate_disown(e->th);
    unref = !e->th_running; /* it has ended already: drop its reference */
  }
  pthread_mutex_unlock(&e->mu);
  if (unref) pp_engine_unref(e);
}

void pp_engine_stats(pp_engine *e, pp_stats *s) {
  pthread_mutex_lock(&e->mu);
  inbox_take(e);
  *s = e->st;
  s->workers = 0;
  for (int k = 0; k < e->cfg.nworkers; k++) s->workers += e->w[k].state == W_READY;
  pthread_mutex_unlock(&e->mu);
}

const char *pp_engine_broken(pp_engine *e) {
  pthread_mutex_lock(&e->mu);
  const char *m = e->broken ? e->broken_msg : NULL;
  pthread_mutex_unlock(&e->mu);
  return m;
}

const char *pp_engine_fail_msg(pp_engine *e) {
  pthread_mutex_lock(&e->mu);
  const char *m = e->broken ? e->broken_msg : e->end_msg;
  pthread_mutex_unlock(&e->mu);
  return m ? m : "the process pool was shut down before the task could complete";
}

uint32_t pp_engine_cpu_limit(const pp_engine *e) { return e->cfg.cpu_limit; }

uint64_t pp_engine_item_ns(pp_engine *e) {
  pthread_mutex_lock(&e->mu);
  uint64_t v = e->ewma_ns;
  pthread_mutex_unlock(&e->mu);
  return v;
}
