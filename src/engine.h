/* engine.h: the pool engine: jobs, queue, dispatch, I/O thread (no Lua). */
#ifndef PP_ENGINE_H
#define PP_ENGINE_H

#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>

#include "buf.h"
#include "channel.h"
#include "wire.h"

/* Engine error codes (negative; positive values are errnos). */
#define PP_ESHUTDOWN (-1) /* no new work after shutdown */
#define PP_EBROKEN (-2)   /* the pool is broken */
#define PP_EFOREIGN (-3)  /* used in a process other than its creator */
const char *pp_strerror(int code);

/* Outcome of one item (one task). */
enum {
  PP_IT_PENDING = 0,
  PP_IT_OK,        /* blob: the returned values */
  PP_IT_ERROR,     /* blob: (error, traceback) */
  PP_IT_LOST,      /* worker died: pid, sig or code */
  PP_IT_DEADLINE,  /* killed past its deadline: pid */
  PP_IT_BROKEN,    /* the pool broke: engine message */
  PP_IT_CANCELLED, /* cancelled before it started */
};

/* How a worker ended, for LOST/DEADLINE items (rare: kept aside). */
typedef struct pp_death {
  int32_t pid, sig, code; /* code -1 when unknown */
  char *stderr_tail;      /* the last lines the worker wrote (owned) */
  char *host;             /* on a host: its name (owned), else NULL */
  char *host_lost;        /* lost with its host: why (owned), else NULL */
  /* a captured item: its output until the death (owned; has_output) */
  char *out, *err;
  size_t outlen, errlen;
  int has_output;
} pp_death;

/* One item's outcome: 16 bytes, as a map of millions of items keeps one
 * per item. `ref` is, for OK/ERROR, the index in the job's blobs of the
 * frame body or memfd mapping holding the values; for LOST/DEADLINE, 1 +
 * the index of its death record, or 0. */
typedef struct pp_item {
  uint32_t ref;
  uint32_t off;
  uint32_t len; /* PP_WHOLE_BLOB: the rest of the blob (a memfd result) */
  uint8_t status;
  uint8_t output; /* 1: the bytes end with the task's output (wire.h) */
} pp_item;
typedef char pp_item_is_16_bytes[sizeof(pp_item) == 16 ? 1 : -1];

#define PP_WHOLE_BLOB UINT32_MAX

/* Job states, as a Future shows them. */
enum { PP_JOB_PENDING = 0, PP_JOB_RUNNING, PP_JOB_DONE, PP_JOB_CANCELLED };

/* A coroutine's wait: an eventfd written when any job it waits on ends. */
typedef struct pp_waiter {
  int refs; /* atomic */
  int fd;
} pp_waiter;

typedef struct pp_wnode {
  pp_waiter *w;
  struct pp_wnode *next;
} pp_wnode;

/* What a job does with its items' reports (procpool.report): keep the
 * latest (a submitted task's future shows it), also queue each one for
 * the Lua side (it listens), or drop them (a map chunk nobody listens to). */
enum { PP_REPORTS_KEEP = 0, PP_REPORTS_QUEUE, PP_REPORTS_DROP };

/* What only some jobs need, allocated when first needed: a payload held
 * whole (chunks, memfd payloads), a deadline of its own, more than one
 * pending range or result frame, death records, coroutine waiters. A
 * pending single task has none, so it costs one allocation. */
typedef struct pp_job_ext {
  /* [u32 fnlen][fn][items: u32 len, bytes]*; heap or memfd */
  pp_blob *payload;
  size_t scan_item, scan_off; /* a known item boundary, to find others fast */
  uint64_t timeout_ns;        /* per-item deadline, 0: the engine's */
  uint32_t (*ranges)[2];      /* all the ranges, once there is more than one */
  uint32_t capranges;
  uint32_t capblobs;
  pp_blob **blobs;  /* all the result frames, once there is more than one */
  pp_death *deaths; /* of its LOST/DEADLINE items */
  uint32_t ndeaths, capdeaths;
  pp_wnode *waiters;
  pp_blob *report; /* the latest report's frame body (values at PP_REPORT_HDR) */
  uint32_t report_item;
  uint64_t nreports; /* reports kept so far, numbering them */
  uint8_t reports;   /* PP_REPORTS_* (a job without its ext: KEEP) */
  uint8_t capture;   /* its items' stdout and stderr come back with them */
} pp_job_ext;

/* A job: one allocation holding its items and, for a single task, its
 * argument bytes. */
typedef struct pp_job {
  int refs; /* atomic: the engine while it holds the job, each Future */
  uint8_t state;
  uint8_t in_queue;
  uint8_t has_cb;      /* the Lua side wants it on the callback list when done */
  uint8_t watch_items; /* wake waiters as each item ends, not only the last */
  uint32_t n;
  uint32_t ndone;
  uint32_t nfailed;
  /* items still to dispatch, as [lo, hi) ranges (dispatch takes from the
   * front; items of a dead worker are put back in front): range0, or
   * x->ranges once there are more */
  uint32_t nranges;
  uint32_t range0[1][2];
  uint32_t nblobs; /* result frames its items point into: blob0, or x->blobs */
  uint32_t ilen;   /* inline payload bytes (the items' part), after items[n] */
  /* the pending queue; once the job has ended (out of the queue for
   * good), qnext links the callback list */
  struct pp_job *qnext, *qprev;
  /* with inline bytes: [u32 fnlen][fn], shared by the jobs of the same
   * encoded function */
  pp_blob *fn;
  pp_blob *blob0;
  pp_job_ext *x; /* NULL until needed */
  pp_item items[];
} pp_job;

/* The result frame k of a job. */
static inline pp_blob *pp_job_blob(const pp_job *j, uint32_t k) {
  return j->x && j->x->blobs ? j->x->blobs[k] : j->blob0;
}

/* The encoded values of a done item that has them (OK/ERROR). */
static inline const char *pp_item_bytes(const pp_job *j, const pp_item *it, size_t *len) {
  const pp_blob *b = pp_job_blob(j, it->ref);
  *len = it->len == PP_WHOLE_BLOB ? b->n - it->off : it->len;
  if (it->output) { /* checked when the result came (w_results) */
    size_t oo, ol, eo, el;
    pp_output_split(b->p + it->off, *len, len, &oo, &ol, &eo, &el);
  }
  return b->p + it->off;
}

/* The captured output of a done OK/ERROR item: 0 if it has none. */
static inline int pp_item_output(const pp_job *j, const pp_item *it, const char **out,
                                 size_t *outlen, const char **err, size_t *errlen) {
  if (!it->output) return 0;
  const pp_blob *b = pp_job_blob(j, it->ref);
  size_t len = it->len == PP_WHOLE_BLOB ? b->n - it->off : it->len, rl, oo, eo;
  const char *p = b->p + it->off;
  if (pp_output_split(p, len, &rl, &oo, outlen, &eo, errlen) != 0) return 0;
  *out = p + oo;
  *err = p + eo;
  return 1;
}

/* The death record of a LOST/DEADLINE item, or NULL. */
static inline const pp_death *pp_item_death(const pp_job *j, const pp_item *it) {
  return it->ref && j->x && it->ref <= j->x->ndeaths ? &j->x->deaths[it->ref - 1] : NULL;
}

/* Lifecycle of the engine. */
enum {
  PP_E_RUNNING = 0,
  PP_E_DRAINING, /* shutdown: finish queued work, then close workers */
  PP_E_CLOSING,  /* workers told to exit */
  PP_E_DEAD      /* all processes gone; the I/O thread has ended */
};

typedef struct pp_engine_cfg {
  int nworkers;
  uint64_t max_tasks;  /* per worker, 0: unlimited */
  int break_on_lost;   /* on_worker_lost = "break" */
  uint64_t timeout_ns; /* default per-task deadline, 0: none */
  uint32_t cpu_limit;  /* limits.cpu (seconds per task), 0: none */
  uint64_t max_output; /* captured bytes kept per stream per task */
  /* the zygote is a host proxy (hostproxy.h): a spawn may wait for a lost
   * host to come back, so a closing engine with no work does not wait for
   * one (the proxy's end stops whatever it starts) */
  int on_hosts;
} pp_engine_cfg;

typedef struct pp_stats {
  int workers;
  uint64_t pending, running, completed, failed, cancelled, worker_restarts;
  uint64_t taken_back; /* items a worker had not started, requeued (see steal) */
} pp_stats;

typedef struct pp_engine pp_engine;

/* Create an engine around a running zygote (its pid and control socket).
 * Starts the I/O thread, which asks the zygote for the workers. On failure
 * returns NULL with *err set, and the caller still owns zfd. */
pp_engine *pp_engine_new(const pp_engine_cfg *cfg, pid_t zpid, int zfd, int *err);
void pp_engine_ref(pp_engine *e);
void pp_engine_unref(pp_engine *e);
/* 1 when this process created the engine (a forked worker holds copies
 * of its parent's engines, which it must never touch). */
int pp_engine_mine(const pp_engine *e);

/* A job of n items with room for `ilen` inline payload bytes (the items'
 * part, written at pp_job_inline; its function then goes in j->fn). NULL
 * when out of memory. */
pp_job *pp_job_new(uint32_t n, size_t ilen);
/* The bytes of such a job's one allocation (a job of no item has room for
 * one: its state is kept like any other's). */
static inline size_t pp_job_bytes(uint32_t n, size_t ilen) {
  return sizeof(pp_job) + (size_t)(n ? n : 1) * sizeof(pp_item) + ilen;
}
static inline char *pp_job_inline(pp_job *j) { return (char *)(j->items + (j->n ? j->n : 1)); }
/* Give the job its whole payload (takes the reference), or a deadline of
 * its own (ns): 0, or ENOMEM (nothing taken). Before it is submitted. */
int pp_job_set_payload(pp_job *j, pp_blob *payload);
int pp_job_set_timeout(pp_job *j, uint64_t ns);
/* Before submit: capture the items' output; what to do with their
 * reports (PP_REPORTS_*). 0 or ENOMEM. */
int pp_job_set_capture(pp_job *j, int capture);
int pp_job_set_reports(pp_job *j, int mode);
void pp_job_unref(pp_job *j);

/* Queue a job (the engine takes a reference). 0, or PP_ESHUTDOWN /
 * PP_EBROKEN (then *msg names why, owned by the engine). */
int pp_engine_submit(pp_engine *e, pp_job *j, const char **msg);
/* Cancel a job that has not started: 1 if it is (now) cancelled. */
int pp_engine_cancel(pp_engine *e, pp_job *j);
/* State of a job, read under the lock. */
int pp_engine_job_state(pp_engine *e, pp_job *j);
/* Ask for the job on the callback list once it ends. 0 if it already has
 * (the caller runs the callback itself). */
int pp_engine_watch(pp_engine *e, pp_job *j);
/* Wake the job's waiters (and the engine's fd) as each of its items
 * ends, for a wait on one item of a job still running. */
void pp_engine_watch_items(pp_engine *e, pp_job *j);
/* A copy of item i's outcome, taken under the lock (the job may still be
 * running, its arrays growing): the status, and for OK/ERROR the blob
 * (one reference, the caller's to drop) and the bytes' place in it, for
 * LOST/DEADLINE the death record. */
typedef struct pp_item_view {
  int status;
  pp_blob *blob;
  size_t off, len;
  pp_death death;
  int has_death;
  /* a captured item's output: in the blob (OK/ERROR) or the death record */
  const char *out, *err;
  size_t outlen, errlen;
  int has_output;
} pp_item_view;
int pp_engine_item_get(pp_engine *e, pp_job *j, uint32_t i, pp_item_view *v);
/* Take the list of ended jobs that were watched (linked by cnext; the
 * caller owns one reference to each). */
pp_job *pp_engine_take_ended(pp_engine *e);
/* A report of item `item` of `job`, queued for the Lua side. */
typedef struct pp_report_note {
  pp_job *job; /* one reference */
  uint32_t item;
  uint64_t num;  /* its number among the job's reports: 1, 2, ... */
  pp_blob *blob; /* the frame body: the values are at PP_REPORT_HDR */
  struct pp_report_note *next;
} pp_report_note;
/* Queue every report of the job from now on (and list the job as
 * watched, pp_engine_watch, so that its end is seen). 0 if it has ended. */
int pp_engine_want_reports(pp_engine *e, pp_job *j);
/* Take the reports queued so far, in the order they came (the caller
 * frees them with pp_report_notes_free). */
pp_report_note *pp_engine_take_reports(pp_engine *e);
void pp_report_notes_free(pp_report_note *n);
/* The job's latest report: its number (0: none yet), with *blob (one
 * reference, the caller's) and *item. */
uint64_t pp_engine_latest_report(pp_engine *e, pp_job *j, pp_blob **blob, uint32_t *item);
/* Register/unregister a coroutine waiter on a job. Register returns 0 if
 * the job already ended (nothing registered). */
int pp_engine_wait_add(pp_engine *e, pp_job *j, pp_waiter *w);
void pp_engine_wait_del(pp_engine *e, pp_job *j, pp_waiter *w);
void pp_waiter_unref(pp_waiter *w);

/* The eventfd readable while ended jobs or state changes wait for the
 * Lua side; pp_engine_ack clears it and returns the number of jobs that
 * have ended so far (a count that only grows). */
int pp_engine_fd(const pp_engine *e);
/* From a waiting caller: read what the workers have sent, if the I/O
 * thread is not doing so now (never blocks). */
void pp_engine_reap(pp_engine *e);
uint64_t pp_engine_ack(pp_engine *e);

/* Begin shutdown: no new jobs; with cancel, pending jobs are cancelled.
 * Idempotent. The engine drains, closes its workers and ends. */
void pp_engine_shutdown(pp_engine *e, int cancel);
/* Signal every worker (SIGTERM/SIGKILL): unfinished jobs fail with
 * BrokenProcessPool, pending ones are cancelled, the engine ends. */
void pp_engine_kill(pp_engine *e, int sig);
int pp_engine_state(pp_engine *e);
/* Wait for the I/O thread to end (after the state is DEAD). */
void pp_engine_join(pp_engine *e);
/* Let the I/O thread end on its own (the engine is freed when the last
 * reference goes). */
void pp_engine_detach(pp_engine *e);
void pp_engine_stats(pp_engine *e, pp_stats *s);
/* Why the pool is broken (NULL if it is not). Owned by the engine. */
const char *pp_engine_broken(pp_engine *e);
/* The message for jobs that failed because the pool broke or was
 * terminated. Owned by the engine. */
const char *pp_engine_fail_msg(pp_engine *e);
/* A job's per-item deadline in ns (its own or the engine's; 0: none). */
uint64_t pp_engine_job_timeout(const pp_engine *e, const pp_job *j);
/* The workers' CPU limit per task, in seconds (0: none). */
uint32_t pp_engine_cpu_limit(const pp_engine *e);
/* Observed mean time of one item, in ns (0 before any). */
uint64_t pp_engine_item_ns(pp_engine *e);

/* Monotonic clock in ns. */
uint64_t pp_now_ns(void);
/* Incremented in every process forked after load (see engine.c). */
unsigned pp_fork_generation(void);

#endif
