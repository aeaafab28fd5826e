/* worker.c: the worker's main loop: run tasks, send results (child side). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "capture.h"
#include "codec.h"
#include "engine.h"
#include "error.h"
#include "hugealloc.h"
#include "reslimit.h"
#include "pp.h"
#include "quiet_thread.h"
#include "proc.h"
#include "report.h"
#include "wire.h"

/* Results of quick items are sent in batches: one send per result would
 * cost more than the items. The task thread sends a batch when an item
 * took LONG_ITEM_NS or more (so a long item's result goes at once, and
 * the quick ones before it with it), when the batch is BATCH_WAIT_NS old,
 * or holds BATCH_BYTES.
 *
 * An item that starts while a batch is open might be long: the worker's
 * flusher thread then sends the batch if it is still open FLUSH_FAST_NS
 * after its first result was ready, when the worker was idle before, or
 * FLUSH_SLOW_NS after, while results stream. A stream needs no quicker
 * check: its own items send the batch every BATCH_WAIT_NS. Each timed
 * wake of the flusher costs the stream's throughput (measured on 2 vCPUs:
 * 2 000 wakes a second per worker made tiny items 15-20% slower), so the
 * flusher wakes at most once per FLUSH_SLOW_NS while results stream, and
 * sleeps untimed once none came for that long. */
#define BATCH_BYTES (64u << 10)
#define BATCH_WAIT_NS 1000000u
#define LONG_ITEM_NS 100000u
#define FLUSH_FAST_NS 100000u
#define FLUSH_SLOW_NS 5000000u
/* How long an idle worker keeps looking for a next task before sleeping. */
#define SPIN_NS 50000u
/* Reports (procpool.report) are sent by themselves at most once every
 * REPORT_INTERVAL_NS, so a task reporting in a tight loop pays for an
 * encode, not a send. One made sooner is held, replacing the report held
 * before it (latest wins), until the interval has passed (the flusher
 * sends it then) or until its item's result, which it goes just before. */
#define REPORT_INTERVAL_NS 20000000u

typedef struct wstate {
  lua_State *L;
  int fd;
  pp_page *page;
  pp_in in;
  /* `out` and the open batch belong to whoever set `owner` (atomic):
   * OWN_NONE, OWN_TASK (the task thread appends or sends) or OWN_FLUSHER
   * (the flusher sends, holding `mu`, which a task thread that finds it
   * busy waits on). The task thread's claim is one compare-and-swap per
   * result: the flusher rarely sends. */
  int owner;
  pthread_mutex_t mu;
  /* The flusher sleeps on `cv` under `fmu` (its own, so that its wakes
   * never hold up the task thread) and takes `mu` only to send. */
  pthread_mutex_t fmu;
  pthread_cond_t cv;
  int flusher; /* 1: the flusher thread runs (task thread only) */
  /* atomic: BATCH_NONE, BATCH_OPEN or BATCH_WATCHED (the flusher watches
   * it); batch_gen counts the batches opened, so that the flusher sends
   * only the one it looked at; watch_due is when the watched batch is to
   * be sent if still open; flusher_wake when the flusher looks next
   * (UINT64_MAX: only when woken) */
  int bstate;
  uint64_t batch_gen, watch_due, flusher_wake;
  uint64_t last_watched; /* batch_ready0 of the batch watched before */
  pp_out out;
  pp_wbuf res;  /* one item's encoded result (memfd when large) */
  size_t batch; /* header offset of the open RESULT frame, or SIZE_MAX */
  uint64_t batch_seq0, batch_t0, batch_end;
  uint64_t batch_ready0; /* when the batch's first result was ready */
  uint64_t last_t;       /* when the previous item ended (the next one started) */
  uint32_t quick;        /* items in a row that took under 20 us */
  uint32_t unclocked;    /* quick items since the clock was last read */
  uint32_t batch_n;
  int fncache; /* stack index of the function cache */
  /* the task function last decoded, when its bytes say decoding them
   * again gives the same (pp_decode_fn_globals): the bytes, its stack
   * slot (lastfn_idx) and its upvalue count; lastfn NULL: none */
  char *lastfn;
  size_t lastfn_len;
  int lastfn_idx, lastfn_nups;
  pp_limiter lim;
  int retiring; /* a memory error: exit after the results */
  /* the item claim (pp_page): `claimed` is what this worker last wrote
   * to page->started; `revoked` once a claim failed: the parent took
   * back the items not started, and the frames up to its RESUME are
   * dropped (`dropped_to`: the last seq dropped) */
  uint64_t claimed, dropped_to;
  int revoked;
  /* captured output (capture.c): made at the first capture TASK frame;
   * `capturing` while fds 1 and 2 go to it (switched per frame) */
  pp_capture *cap;
  int capturing, cap_failed;
  /* reports: the task thread encodes into rep.values; a report held back
   * (rheld, for item rheld_seq) belongs to the owner of `out`. rstate
   * (atomic): REPORT_NONE or REPORT_HELD, to be sent at report_due;
   * rsent_ns: when one was last sent by itself */
  pp_reporter rep;
  pp_wbuf rheld;
  uint64_t rheld_seq, rsent_ns, report_due;
  int rstate;
} wstate;

enum { BATCH_NONE, BATCH_OPEN, BATCH_WATCHED };
enum { REPORT_NONE, REPORT_HELD };
enum { OWN_NONE, OWN_TASK, OWN_FLUSHER };

/* The task thread takes `out` (waiting while the flusher sends). */
static void claim(wstate *ws) {
  int none = OWN_NONE;
  while (!__atomic_compare_exchange_n(&ws->owner, &none, OWN_TASK, 0, __ATOMIC_ACQUIRE,
                                      __ATOMIC_RELAXED)) {
    none = OWN_NONE;
    pthread_mutex_lock(&ws->mu); /* held by the flusher while it sends */
    pthread_mutex_unlock(&ws->mu);
  }
}

static void unclaim(wstate *ws) { __atomic_store_n(&ws->owner, OWN_NONE, __ATOMIC_RELEASE); }

/* Claim item `seq` before running it (pp_page): 1 if it is ours to run;
 * 0 if the parent took it back (with every later item it had sent). */
static int start_item(wstate *ws, uint64_t seq) {
  uint64_t was = ws->claimed;
  if (__atomic_compare_exchange_n(&ws->page->started, &was, seq, 0, __ATOMIC_ACQ_REL,
                                  __ATOMIC_ACQUIRE)) {
    ws->claimed = seq;
    return 1;
  }
  ws->revoked = 1; /* `was` is claimed | PP_STARTED_REVOKED */
  return 0;
}

/* Items seq0 .. seq0+count-1 (count > 0) are dropped: the parent took
 * them back. */
static void dropped(wstate *ws, uint64_t seq0, uint32_t count) {
  if (seq0 + count - 1 > ws->dropped_to) ws->dropped_to = seq0 + count - 1;
}

__attribute__((noreturn)) static void wexit(wstate *ws, int code) {
  (void)ws;
  fflush(NULL);
  _exit(code);
}

/* Blocking write of everything queued. */
static void out_drain(wstate *ws) {
  while (pp_out_pending(&ws->out)) {
    int rc = pp_out_flush(&ws->out, ws->fd);
    if (rc != 0) wexit(ws, 0); /* the parent is gone */
    if (pp_out_pending(&ws->out)) {
      fd_set wf;
      FD_ZERO(&wf);
      FD_SET(ws->fd, &wf);
      select(ws->fd + 1, NULL, &wf, NULL, NULL);
    }
  }
}

/* Close the open RESULT frame; `end` is when its last item ended. */
static void batch_close(wstate *ws, uint64_t end) {
  if (ws->batch == SIZE_MAX) return;
  ws->batch_end = end;
  unsigned char *h = (unsigned char *)ws->out.buf.p + ws->batch + PP_FRAME_HDR;
  pp_result_hdr rh = {ws->batch_seq0, ws->batch_n, ws->batch_end - ws->batch_t0};
  pp_result_hdr_put(h, &rh);
  pp_frame_end(&ws->out.buf, ws->batch);
  ws->batch = SIZE_MAX;
  __atomic_store_n(&ws->bstate, BATCH_NONE, __ATOMIC_RELAXED);
}

/* Send everything queued (`out` claimed). */
static void flush_locked(wstate *ws, uint64_t end) {
  batch_close(ws, end);
  fflush(NULL); /* what the tasks printed comes out before their results */
  out_drain(ws);
}

static void flush(wstate *ws) {
  claim(ws);
  flush_locked(ws, pp_now_ns());
  unclaim(ws);
}

/* Begin a frame other than a RESULT batch, with room for `body` bytes
 * (`out` claimed). An open batch is closed first: its length runs to
 * the end of the buffer, so nothing may follow it while it is open. */
static size_t begin_frame(wstate *ws, int type, int flags, size_t body) {
  batch_close(ws, ws->batch_end);
  if (pp_wbuf_reserve(&ws->out.buf, PP_FRAME_HDR + body) != 0) wexit(ws, 70);
  return pp_frame_begin(&ws->out.buf, type, flags);
}

/* Append a REPORT frame of item `seq` with the value list `v`, after the
 * results before it (`out` claimed). */
static void put_report(wstate *ws, uint64_t seq, const pp_wbuf *v) {
  size_t h = begin_frame(ws, PP_FR_REPORT, 0, PP_REPORT_HDR + v->n);
  pp_report_hdr_put((unsigned char *)ws->out.buf.p + ws->out.buf.n, seq);
  memcpy(ws->out.buf.p + ws->out.buf.n + PP_REPORT_HDR, v->p, v->n);
  ws->out.buf.n += PP_REPORT_HDR + v->n;
  pp_frame_end(&ws->out.buf, h);
}

/* The held report goes into `out` (`out` claimed). */
static void release_report(wstate *ws) {
  put_report(ws, ws->rheld_seq, &ws->rheld);
  ws->rheld.n = 0;
  __atomic_store_n(&ws->rstate, REPORT_NONE, __ATOMIC_RELAXED);
}

/* The flusher sends the held report, with the results before it; 0 if
 * the task thread has `out` just now. */
static int flusher_send_report(wstate *ws) {
  pthread_mutex_lock(&ws->mu);
  int none = OWN_NONE;
  int mine = __atomic_compare_exchange_n(&ws->owner, &none, OWN_FLUSHER, 0, __ATOMIC_ACQUIRE,
                                         __ATOMIC_RELAXED);
  if (mine) {
    if (__atomic_load_n(&ws->rstate, __ATOMIC_RELAXED) == REPORT_HELD) {
      release_report(ws);
      ws->rsent_ns = pp_now_ns();
      flush_locked(ws, ws->batch_end);
    }
    __atomic_store_n(&ws->owner, OWN_NONE, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&ws->mu);
  return mine;
}

/* The flusher thread: sends a watched batch still open when due (the
 * task thread is then inside a long item). It looks when the batch it
 * saw is due, lingers FLUSH_SLOW_NS after the last one it saw, then
 * sleeps until watch_batch wakes it. */
static void *flusher_main(void *arg) {
  wstate *ws = arg;
  uint64_t seen = 0; /* when it last saw a watched batch */
  pthread_mutex_lock(&ws->fmu);
  for (;;) {
    uint64_t now = pp_now_ns(), wake = UINT64_MAX;
    if (__atomic_load_n(&ws->bstate, __ATOMIC_SEQ_CST) == BATCH_WATCHED) {
      uint64_t gen = __atomic_load_n(&ws->batch_gen, __ATOMIC_ACQUIRE);
      uint64_t due = __atomic_load_n(&ws->watch_due, __ATOMIC_ACQUIRE);
      seen = now;
      if (now >= due) {
        pthread_mutex_lock(&ws->mu);
        int none = OWN_NONE;
        int mine = __atomic_compare_exchange_n(&ws->owner, &none, OWN_FLUSHER, 0, __ATOMIC_ACQUIRE,
                                               __ATOMIC_RELAXED);
        if (mine) {
          if (__atomic_load_n(&ws->bstate, __ATOMIC_RELAXED) == BATCH_WATCHED &&
              ws->batch_gen == gen)
            flush_locked(ws, ws->batch_end);
          __atomic_store_n(&ws->owner, OWN_NONE, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&ws->mu);
        if (mine) continue;
        /* the task thread is between items, so not stuck: look again */
        due = now + FLUSH_FAST_NS;
      }
      wake = due;
    } else if (now - seen < FLUSH_SLOW_NS) {
      wake = seen + FLUSH_SLOW_NS;
    }
    if (__atomic_load_n(&ws->rstate, __ATOMIC_SEQ_CST) == REPORT_HELD) {
      uint64_t rdue = __atomic_load_n(&ws->report_due, __ATOMIC_ACQUIRE);
      if (now >= rdue) {
        if (flusher_send_report(ws)) continue;
        rdue = now + FLUSH_FAST_NS; /* the task thread has `out` for a moment */
      }
      if (rdue < wake) wake = rdue;
    }
    /* publish when it looks next, then look again: watch_batch sets the
     * state first, then reads this, so one of the two sees the other */
    __atomic_store_n(&ws->flusher_wake, wake, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&ws->bstate, __ATOMIC_SEQ_CST) == BATCH_WATCHED &&
        __atomic_load_n(&ws->watch_due, __ATOMIC_ACQUIRE) < wake)
      continue;
    if (__atomic_load_n(&ws->rstate, __ATOMIC_SEQ_CST) == REPORT_HELD &&
        __atomic_load_n(&ws->report_due, __ATOMIC_ACQUIRE) < wake)
      continue;
    if (wake == UINT64_MAX) {
      pthread_cond_wait(&ws->cv, &ws->fmu);
    } else {
      struct timespec ts = {(time_t)(wake / 1000000000u), (long)(wake % 1000000000u)};
      pthread_cond_timedwait(&ws->cv, &ws->fmu, &ts);
    }
  }
  return NULL;
}

/* Start the flusher thread (on first need: a worker whose results all go
 * out at once never has one). 0 if it cannot be had. */
static int start_flusher(wstate *ws) {
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  int rc = pthread_cond_init(&ws->cv, &ca);
  pthread_condattr_destroy(&ca);
  if (rc != 0) return 0;
  if (pp_quiet_thread(flusher_main, ws, 256u << 10) != 0) {
    pthread_cond_destroy(&ws->cv);
    return 0;
  }
  ws->flusher = 1;
  return 1;
}

/* An item is about to start while a batch is open: have the flusher
 * watch it, due FLUSH_SLOW_NS after its first result when the batch
 * before was watched that recently (results stream), else FLUSH_FAST_NS.
 * Sends the batch now when no flusher thread can be had. */
static void watch_batch(wstate *ws) {
  if (!ws->flusher && !start_flusher(ws)) {
    flush(ws);
    return;
  }
  uint64_t r0 = ws->batch_ready0;
  uint64_t due = r0 + (r0 - ws->last_watched < FLUSH_SLOW_NS ? FLUSH_SLOW_NS : FLUSH_FAST_NS);
  ws->last_watched = r0;
  __atomic_store_n(&ws->watch_due, due, __ATOMIC_RELEASE);
  int open = BATCH_OPEN;
  if (__atomic_compare_exchange_n(&ws->bstate, &open, BATCH_WATCHED, 0, __ATOMIC_SEQ_CST,
                                  __ATOMIC_SEQ_CST) &&
      __atomic_load_n(&ws->flusher_wake, __ATOMIC_SEQ_CST) > due) {
    pthread_mutex_lock(&ws->fmu);
    pthread_cond_signal(&ws->cv);
    pthread_mutex_unlock(&ws->fmu);
  }
}

/* rep.send: a report of the item running, encoded in rep.values. It goes
 * at once when none went in the last REPORT_INTERVAL_NS (or when there
 * can be no flusher thread), else it is held (see REPORT_INTERVAL_NS). */
static void send_report(pp_reporter *r) {
  wstate *ws = (wstate *)(void *)((char *)r - offsetof(wstate, rep));
  uint64_t now = pp_now_ns();
  claim(ws);
  pp_wbuf v = ws->rheld; /* the buffers swap: no copy */
  ws->rheld = r->values;
  r->values = v;
  ws->rheld_seq = r->seq;
  if (__atomic_load_n(&ws->rstate, __ATOMIC_RELAXED) == REPORT_HELD) {
    unclaim(ws); /* it replaces the one held, of the same item (a result releases it) */
    return;
  }
  if (now - ws->rsent_ns >= REPORT_INTERVAL_NS || (!ws->flusher && !start_flusher(ws))) {
    release_report(ws);
    ws->rsent_ns = now;
    flush_locked(ws, ws->batch_end);
    unclaim(ws);
    return;
  }
  uint64_t due = ws->rsent_ns + REPORT_INTERVAL_NS;
  __atomic_store_n(&ws->report_due, due, __ATOMIC_RELEASE);
  __atomic_store_n(&ws->rstate, REPORT_HELD, __ATOMIC_SEQ_CST);
  unclaim(ws);
  /* as watch_batch: the state is set, then the flusher's next look read */
  if (__atomic_load_n(&ws->flusher_wake, __ATOMIC_SEQ_CST) > due) {
    pthread_mutex_lock(&ws->fmu);
    pthread_cond_signal(&ws->cv);
    pthread_mutex_unlock(&ws->fmu);
  }
}

static void reserve(wstate *ws, size_t n) {
  if (pp_wbuf_reserve(&ws->out.buf, n) != 0) wexit(ws, 70);
}

/* With `out` claimed: open a batch of results if none is (item `seq`,
 * ready at `now`); its header is written when it closes (batch_close). */
static void batch_begin(wstate *ws, uint64_t seq, uint64_t now) {
  if (ws->batch != SIZE_MAX) return;
  reserve(ws, PP_FRAME_HDR + PP_RESULT_HDR);
  ws->batch = pp_frame_begin(&ws->out.buf, PP_FR_RESULT, 0);
  memset(ws->out.buf.p + ws->out.buf.n, 0, PP_RESULT_HDR);
  ws->out.buf.n += PP_RESULT_HDR;
  ws->batch_seq0 = seq;
  ws->batch_n = 0;
  ws->batch_t0 = ws->last_t; /* when this batch's first item started */
  ws->batch_ready0 = now;
  __atomic_store_n(&ws->batch_gen, ws->batch_gen + 1, __ATOMIC_RELEASE);
  __atomic_store_n(&ws->bstate, BATCH_OPEN, __ATOMIC_RELEASE);
}

/* With `out` claimed: an item's result is in the batch; send the batch
 * when it is full, the item ran long or the batch waited long. */
static void batch_added(wstate *ws, uint64_t now, uint64_t took) {
  ws->batch_n++;
  ws->last_t = now;
  ws->batch_end = now;
  if (ws->out.buf.n - ws->batch > BATCH_BYTES || took >= LONG_ITEM_NS ||
      now - ws->batch_ready0 >= BATCH_WAIT_NS)
    flush_locked(ws, pp_now_ns()); /* `now` is not read after every quick item */
}

/* An item is over: no more reports for it; `out` claimed, with the
 * item's held report (if any) in it before its result. */
static void result_claim(wstate *ws) {
  ws->rep.seq = 0;
  claim(ws);
  if (__atomic_load_n(&ws->rstate, __ATOMIC_RELAXED) == REPORT_HELD) release_report(ws);
}

/* Append one item's result (status + the encoded list in ws->res);
 * `now` is the time the item ended, `took` about how long it ran. */
static void put_result(wstate *ws, uint64_t seq, int status, uint64_t now, uint64_t took) {
  result_claim(ws);
  if (ws->res.fd >= 0) { /* large: its own frame, the bytes in the memfd */
    flush_locked(ws, ws->last_t);
    reserve(ws, PP_FRAME_HDR + PP_RESULT_HDR + PP_RESULT_FD_ITEM);
    size_t h = pp_frame_begin(&ws->out.buf, PP_FR_RESULT, PP_FF_FD);
    unsigned char *q = (unsigned char *)ws->out.buf.p + ws->out.buf.n;
    pp_result_hdr rh = {seq, 1, now - ws->last_t};
    pp_result_hdr_put(q, &rh);
    pp_result_fd_item_put(q + PP_RESULT_HDR, status, ws->res.n);
    ws->out.buf.n += PP_RESULT_HDR + PP_RESULT_FD_ITEM;
    pp_frame_end(&ws->out.buf, h);
    int fd = ws->res.fd;
    munmap(ws->res.p, ws->res.cap);
    ws->res.p = NULL;
    ws->res.n = ws->res.cap = 0;
    ws->res.fd = -1;
    if (pp_out_addfd(&ws->out, h, fd) != 0) wexit(ws, 70);
    flush_locked(ws, now);
    ws->last_t = now;
    unclaim(ws);
    return;
  }
  batch_begin(ws, seq, now);
  reserve(ws, PP_RESULT_ITEM + ws->res.n);
  unsigned char *q = (unsigned char *)ws->out.buf.p + ws->out.buf.n;
  pp_result_item_put(q, status, (uint32_t)ws->res.n);
  memcpy(q + PP_RESULT_ITEM, ws->res.p, ws->res.n);
  ws->out.buf.n += PP_RESULT_ITEM + ws->res.n;
  ws->res.n = 0;
  batch_added(ws, now, took);
  unclaim(ws);
}

/* put_result for a task's one result, a value pp_encode_scalar takes, at
 * stack index 3 (of type t): encoded straight into the batch, neither in
 * ws->res nor copied (a map of numbers spends a fair part of a worker's
 * time per item here). */
static void put_scalar_result(wstate *ws, lua_State *L, int t, uint64_t seq, uint64_t now,
                              uint64_t took) {
  result_claim(ws);
  batch_begin(ws, seq, now);
  reserve(ws, PP_RESULT_ITEM + PP_ENCODE_SCALAR_MAX);
  unsigned char *q = (unsigned char *)ws->out.buf.p + ws->out.buf.n;
  size_t m = pp_encode_scalar(L, 3, t, q + PP_RESULT_ITEM);
  pp_result_item_put(q, PP_RES_OK, (uint32_t)m);
  ws->out.buf.n += PP_RESULT_ITEM + m;
  batch_added(ws, now, took);
  unclaim(ws);
}

/* The status of an item's result, with its output appended when it is
 * captured. */
static int with_output(wstate *ws, int status) {
  if (!ws->capturing) return status;
  if (pp_capture_take(ws->cap, &ws->res) != 0) wexit(ws, 70);
  return status | PP_RES_OUTPUT;
}

/* Send a frame with an empty body (READY, RETIRE) after what is queued,
 * holding `out` (the flusher may be sending). */
static void send_empty(wstate *ws, int type) {
  claim(ws);
  pp_frame_end(&ws->out.buf, begin_frame(ws, type, 0, 0));
  flush_locked(ws, pp_now_ns());
  unclaim(ws);
}

/* A capture TASK frame: capture from now on, making the capture first
 * and passing its parts to the parent (OUTBUF frames) before any
 * captured item runs, so that the output of an item whose worker dies is
 * not lost. Without them (no memory, no fds), items run uncaptured. */
static void capture_start(wstate *ws, uint64_t max_output) {
  if (!ws->cap && !ws->cap_failed) {
    int fds[PP_CAPTURE_FDS];
    ws->cap = pp_capture_new(max_output, fds);
    if (!ws->cap) {
      ws->cap_failed = 1;
      return;
    }
    claim(ws);
    for (int part = 0; part < PP_CAPTURE_FDS; part++) {
      size_t h = begin_frame(ws, PP_FR_OUTBUF, PP_FF_FD, PP_OUTBUF_BODY);
      pp_outbuf_put((unsigned char *)ws->out.buf.p + ws->out.buf.n, part);
      ws->out.buf.n += PP_OUTBUF_BODY;
      pp_frame_end(&ws->out.buf, h);
      if (pp_out_addfd(&ws->out, h, fds[part]) != 0) wexit(ws, 70);
    }
    flush_locked(ws, pp_now_ns());
    unclaim(ws);
  }
  if (ws->cap && !ws->capturing) {
    pp_capture_on(ws->cap);
    ws->capturing = 1;
  }
}

/* Message handler: keep the error value, remember a traceback. The
 * frames below the worker loop (the parent's, from when the executor was
 * created, copied by fork) are cut off: they say nothing about the task. */
static int msgh(lua_State *L) {
  const char *msg = NULL;
  if (lua_type(L, 1) == LUA_TSTRING)
    msg = lua_tostring(L, 1);
  else if (!lua_isnil(L, 1))
    msg = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, msg ? msg : "(error object is nil)", 1);
  size_t tl, bl;
  const char *tb = lua_tolstring(L, -1, &tl);
  if (lua_getfield(L, LUA_REGISTRYINDEX, "procpool.base_traceback") == LUA_TSTRING) {
    const char *base = lua_tolstring(L, -1, &bl);
    if (bl > 0 && tl > bl && memcmp(tb + tl - bl, base, bl) == 0)
      lua_pushlstring(L, tb, tl - bl);
    else
      lua_pushvalue(L, -2);
  } else {
    lua_pushvalue(L, -2);
  }
  lua_setfield(L, LUA_REGISTRYINDEX, "procpool.traceback");
  lua_settop(L, 1);
  return 1;
}

/* Remember the frames the worker runs on top of (everything after the
 * first line of a traceback taken here, seen from a task's frames). */
static void note_base_frames(lua_State *L) {
  luaL_traceback(L, L, NULL, 0);
  const char *tb = lua_tostring(L, -1);
  const char *nl = strchr(tb, '\n');
  if (nl)
    lua_pushstring(L, nl); /* "\n\t[C]: in ..." */
  else
    lua_pushliteral(L, "");
  lua_setfield(L, LUA_REGISTRYINDEX, "procpool.base_traceback");
  lua_pop(L, 1);
}

/* The items of one TASK frame, run inside one protected call; after an
 * error the caller records it for item `k` and calls again from k+1. */
typedef struct batch {
  wstate *ws;
  const char *items;
  size_t itemslen, pos;
  uint32_t k, count;
  uint64_t seq0;
  int timed;
} batch;

/* When the item that just ended ended (`now`) and about how long it ran
 * (`took`): the clock is read after every item, unless items are quick:
 * then every 16th (a long one is still noticed within 16 items). */
static void item_clock(wstate *ws, const batch *b, uint64_t *now, uint64_t *took) {
  *now = ws->last_t;
  *took = 0;
  if (ws->quick < 16 || (b->k & 15) == 15 || b->timed || ws->res.fd >= 0) {
    *now = pp_now_ns();
    uint64_t span = *now - ws->last_t; /* this item and the unclocked ones */
    ws->quick = span < 20000 ? ws->quick + 1 : 0;
    *took = span / (ws->unclocked + 1);
    ws->unclocked = 0;
  } else {
    ws->unclocked++;
  }
}

/* [batch, fn] */
static int item_loop(lua_State *L) {
  batch *b = lua_touserdata(L, 1);
  wstate *ws = b->ws;
  for (; b->k < b->count; b->k++) {
    if (b->itemslen - b->pos < PP_LEN_PREFIX) wexit(ws, 71);
    size_t ilen = pp_wire_len((const unsigned char *)b->items + b->pos);
    if (b->itemslen - b->pos - PP_LEN_PREFIX < ilen) wexit(ws, 71);
    const char *item = b->items + b->pos + PP_LEN_PREFIX;
    b->pos += PP_LEN_PREFIX + ilen;
    uint64_t seq = b->seq0 + b->k;
    pp_limiter_item(&ws->lim, ws->last_t); /* (and forget refusals before it) */
    if (b->timed) __atomic_store_n(&ws->page->started_ns, ws->last_t, __ATOMIC_RELEASE);
    if (!start_item(ws, seq)) {
      dropped(ws, seq, b->count - b->k);
      return 0;
    }
    if (ws->capturing) pp_capture_begin(ws->cap, seq);
    ws->rep.seq = seq;
    if (__atomic_load_n(&ws->bstate, __ATOMIC_RELAXED) == BATCH_OPEN) watch_batch(ws);
    lua_settop(L, 2);
    lua_pushvalue(L, 2);
    /* one scalar argument and one scalar result (a map of numbers or
     * short strings) skip the general codec */
    int n = 1;
    if (ilen == 0 || (unsigned char)item[0] != 1 || pp_decode_first(L, item, ilen) != ilen) {
      lua_settop(L, 3);
      n = pp_decode(L, item, ilen, NULL, 0, 0);
    }
    lua_call(L, n, LUA_MULTRET);
    uint64_t now, took;
    int t = lua_gettop(L) == 3 ? lua_type(L, 3) : LUA_TNONE;
    if (t != LUA_TNONE && !ws->capturing && pp_encode_scalar_takes(L, 3, t)) {
      item_clock(ws, b, &now, &took);
      put_scalar_result(ws, L, t, seq, now, took);
      continue;
    }
    ws->res.n = 0;
    size_t m = 0; /* a captured item's scalar goes through ws->res, its output after it */
    if (t != LUA_TNONE && ws->capturing && pp_wbuf_reserve(&ws->res, PP_ENCODE_SCALAR_MAX) == 0)
      m = pp_encode_scalar(L, 3, t, (unsigned char *)ws->res.p);
    if (m)
      ws->res.n = m;
    else
      pp_encode(L, 3, lua_gettop(L) - 2, &ws->res, 0, "result", 0);
    item_clock(ws, b, &now, &took);
    put_result(ws, seq, with_output(ws, PP_RES_OK), now, took);
  }
  return 0;
}

/* [wstate, values...] -> encodes the values into ws->res */
static int encode_values(lua_State *L) {
  wstate *ws = lua_touserdata(L, 1);
  pp_encode(L, 2, lua_gettop(L) - 1, &ws->res, 0, "result", 0);
  return 0;
}

/* Encode (err, traceback) as an ERROR result; if the error value itself
 * cannot be serialized, send a SerializationError in its place. */
static void encode_error(wstate *ws, int erridx) {
  lua_State *L = ws->L;
  int top = lua_gettop(L);
  lua_pushcfunction(L, encode_values);
  lua_pushlightuserdata(L, ws);
  lua_pushvalue(L, erridx);
  lua_getfield(L, LUA_REGISTRYINDEX, "procpool.traceback");
  ws->res.n = 0;
  if (lua_pcall(L, 3, 0, 0) != LUA_OK) {
    /* the error value did not serialize: report that instead */
    const char *why = lua_tostring(L, -1);
    if (!why) why = luaL_tolstring(L, -1, NULL);
    lua_pushcfunction(L, encode_values);
    lua_pushlightuserdata(L, ws);
    lua_getfield(L, LUA_REGISTRYINDEX, "procpool.traceback");
    pp_error_push(L, "SerializationError", "the task's error value could not be sent");
    lua_pushstring(L, why);
    lua_setfield(L, -2, "reason");
    lua_insert(L, -2);
    ws->res.n = 0;
    if (lua_pcall(L, 3, 0, 0) != LUA_OK) wexit(ws, 70);
  }
  lua_settop(L, top);
}

/* Resolve the function value at the top: a "module.name" string names
 * one. Leaves the function, or returns 0 with an error value on top. */
static int resolve_fn(lua_State *L) {
  if (lua_type(L, -1) != LUA_TSTRING) return 1;
  size_t len;
  const char *name = lua_tolstring(L, -1, &len), *err = NULL;
  if (pp_resolve_name(L, name, len, &err)) {
    lua_remove(L, -2);
    return 1;
  }
  lua_pushfstring(L, "procpool: cannot find function '%s': %s", name, err);
  return 0;
}

static int decode_fn(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  int cache = 3;
  if (pp_decode(L, p, len, NULL, 0, cache) != 1) luaL_error(L, "procpool: bad task function");
  return 1;
}

/* An error that is Lua's out-of-memory message, raised again by a task
 * that caught it (the procpool command's wrapper does), after the heap
 * cap refused an allocation in this item. */
static int out_of_memory(wstate *ws, int erridx) {
  if (!pp_limiter_refused(&ws->lim)) return 0;
  size_t len;
  const char *msg = lua_tolstring(ws->L, erridx, &len);
  return lua_type(ws->L, erridx) == LUA_TSTRING && len == 17 &&
         memcmp(msg, "not enough memory", 17) == 0;
}

/* The item ran out of memory (the message handler is not called for
 * that): replace the error on top with a MemoryError naming the limit.
 * The worker then retires: what the task left behind may be what filled
 * the heap, and C code may not have recovered. */
static void memory_error(wstate *ws) {
  lua_State *L = ws->L;
  pp_limiter_lift(&ws->lim); /* room to build and send the error */
  ws->retiring = 1;
  lua_pop(L, 1);
  uint64_t cap = ws->lim.lim.memory;
  if (cap) {
    static const char *const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    uint64_t n = cap;
    while (u < 4 && n % 1024 == 0) {
      n /= 1024;
      u++;
    }
    lua_pushfstring(L, "the task ran out of memory under the worker's limit of %I %s",
                    (lua_Integer)n, units[u]);
    pp_error_push(L, "MemoryError", lua_tostring(L, -1));
    lua_pushinteger(L, (lua_Integer)cap);
    lua_setfield(L, -2, "limit");
  } else {
    lua_pushliteral(L, "the task ran out of memory");
    pp_error_push(L, "MemoryError", lua_tostring(L, -1));
  }
  lua_remove(L, -2);
  lua_pushnil(L); /* no traceback: the handler did not run */
  lua_setfield(L, LUA_REGISTRYINDEX, "procpool.traceback");
}

/* Larger function encodings are decoded each time (not kept). */
#define LASTFN_MAX 4096

/* The task function of bytes fn[0..len) is the one last decoded: push it,
 * its upvalues the globals again (as decoding would set them), and
 * return 1; else push nothing and return 0. */
static int same_fn(wstate *ws, const char *fn, size_t len) {
  if (!ws->lastfn || len != ws->lastfn_len || memcmp(fn, ws->lastfn, len) != 0) return 0;
  lua_State *L = ws->L;
  lua_pushvalue(L, ws->lastfn_idx);
  for (int i = 1; i <= ws->lastfn_nups; i++) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_setupvalue(L, -2, i);
  }
  return 1;
}

/* Keep the function just decoded (on top) from bytes fn[0..len) for the
 * next task, if decoding those bytes again would give the same. */
static void keep_fn(wstate *ws, const char *fn, size_t len) {
  int nups = len <= LASTFN_MAX ? pp_decode_fn_globals(fn, len) : -1;
  if (nups < 0) return;
  char *p = realloc(ws->lastfn, len ? len : 1);
  if (!p) return;
  ws->lastfn = p;
  memcpy(ws->lastfn, fn, len);
  ws->lastfn_len = len;
  ws->lastfn_nups = nups;
  lua_copy(ws->L, -1, ws->lastfn_idx);
}

static void run_task(wstate *ws, const unsigned char *fb, size_t blen, int fd) {
  lua_State *L = ws->L;
  if (blen < PP_TASK_HDR) wexit(ws, 71);
  pp_task_hdr th;
  pp_task_hdr_get(fb, &th);
  uint64_t seq0 = th.seq0;
  uint32_t count = th.count, flags = th.flags;
  if (flags & PP_TASK_CAPTURE) {
    if (blen < PP_TASK_HDR + PP_TASK_CAPTURE_TAIL) wexit(ws, 71);
    blen -= PP_TASK_CAPTURE_TAIL;
    capture_start(ws, pp_task_capture_get(fb + blen));
  } else if (ws->capturing) {
    pp_capture_off(ws->cap);
    ws->capturing = 0;
  }
  const char *fn, *items;
  size_t fnlen, itemslen;
  pp_blob *map = NULL;
  int whole_fd = -1;
  if (fd >= 0) {
    if (blen < PP_TASK_FD_BODY) wexit(ws, 71);
    pp_task_fd r;
    pp_task_fd_get(fb + PP_TASK_HDR, &r);
    uint64_t fnoff = r.fnoff, ioff = r.itemsoff;
    fnlen = r.fnlen;
    itemslen = (size_t)r.itemslen;
    int err = 0;
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < 0) wexit(ws, 71);
    map = pp_blob_map(fd, (size_t)size, 0, &err);
    if (flags & PP_TASK_WHOLE)
      whole_fd = fd; /* kept: once every item is claimed here, the spare */
    else
      close(fd);
    if (!map || fnoff + fnlen > map->n || ioff + itemslen > map->n) wexit(ws, 71);
    fn = map->p + fnoff;
    items = map->p + ioff;
  } else {
    size_t at = PP_TASK_HDR + PP_LEN_PREFIX; /* the fn, after its u32 length */
    fnlen = pp_wire_len(fb + PP_TASK_HDR);
    if (at + fnlen > blen) wexit(ws, 71);
    fn = (const char *)fb + at;
    items = fn + fnlen;
    itemslen = blen - at - fnlen;
  }
  int top = lua_gettop(L);
  lua_pushcfunction(L, msgh);
  int h = lua_gettop(L);
  /* the function, once per frame */
  int fnok = same_fn(ws, fn, fnlen);
  if (!fnok) {
    lua_pushcfunction(L, decode_fn);
    lua_pushlightuserdata(L, (void *)fn);
    lua_pushinteger(L, (lua_Integer)fnlen);
    lua_pushvalue(L, ws->fncache);
    int fnrc = lua_pcall(L, 3, 1, h);
    if (fnrc == LUA_ERRMEM) memory_error(ws); /* its upvalues did not fit */
    fnok = fnrc == LUA_OK && resolve_fn(L);
    if (fnok) keep_fn(ws, fn, fnlen);
  }
  int fnidx = lua_gettop(L);
  batch b = {ws, items, itemslen, 0, 0, count, seq0, (flags & PP_TASK_TIMED) != 0};
  ws->last_t = pp_now_ns();
  if (!fnok) {
    if (lua_type(L, fnidx) == LUA_TSTRING) { /* no traceback for a lookup failure */
      lua_pushnil(L);
      lua_setfield(L, LUA_REGISTRYINDEX, "procpool.traceback");
    }
    for (; b.k < count; b.k++) { /* every item: the function is the same for all */
      if (!start_item(ws, seq0 + b.k)) {
        dropped(ws, seq0 + b.k, count - b.k);
        break;
      }
      if (ws->capturing) pp_capture_begin(ws->cap, seq0 + b.k);
      encode_error(ws, fnidx);
      put_result(ws, seq0 + b.k, with_output(ws, PP_RES_ERROR), pp_now_ns(), 0);
    }
  }
  while (b.k < count && !ws->retiring && !ws->revoked) {
    lua_settop(L, fnidx);
    lua_pushcfunction(L, item_loop);
    lua_pushlightuserdata(L, &b);
    lua_pushvalue(L, fnidx);
    int rc = lua_pcall(L, 2, 0, h);
    if (rc == LUA_OK) break;
    if (rc == LUA_ERRMEM || out_of_memory(ws, lua_gettop(L))) memory_error(ws);
    /* item k raised (or its result would not serialize) */
    encode_error(ws, lua_gettop(L));
    uint64_t now = pp_now_ns();
    put_result(ws, seq0 + b.k, with_output(ws, PP_RES_ERROR), now, now - ws->last_t);
    b.k++;
    if (ws->retiring) break; /* the rest goes to other workers */
  }
  lua_settop(L, top);
  pp_blob_unref(map);
  if (whole_fd >= 0) {
    /* no other worker reads it once all its items are ours and their
     * results are on the way: a result still in an open batch would be
     * lost with this worker, and its item sent again from this memfd */
    if (count && ws->claimed == seq0 + count - 1) {
      flush(ws);
      pp_spare_give(whole_fd);
    } else {
      close(whole_fd);
    }
  }
}

void pp_worker_main(lua_State *L, int fd, pp_page *page, int slot, const pp_wctx *w) {
  wstate ws;
  memset(&ws, 0, sizeof ws);
  ws.L = L;
  ws.fd = fd;
  ws.page = page;
  ws.batch = SIZE_MAX;
  pp_in_init(&ws.in);
  pp_out_init(&ws.out);
  pthread_mutex_init(&ws.mu, NULL);
  pthread_mutex_init(&ws.fmu, NULL);
  ws.flusher_wake = UINT64_MAX;
  pp_spare_forget(); /* a forked worker's copy of its parent's */
  pp_spare_users(1); /* a spawned one has no pool of its own to count */
  pp_wbuf_init(&ws.res, PP_MEMFD_MIN);
  pp_wbuf_init(&ws.rep.values, 0);
  pp_wbuf_init(&ws.rheld, 0);
  ws.rep.send = send_report;
  ws.rep.forkgen = pp_fork_generation();
  pp_report_attach(L, &ws.rep);
  /* Ctrl-C is for the parent (which then stops the pool), not for the
   * tasks: an inherited interpreter handler would fail them all */
  signal(SIGINT, SIG_IGN);
  /* stdin is the parent's, not ours; every other fd is closed */
  int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (devnull >= 0) {
    dup2(devnull, 0);
    close(devnull);
  }
  if (fd != 3) {
    dup2(fd, 3);
    close(fd);
    ws.fd = fd = 3;
  }
  pp_close_from(4, -1);
  /* who we are, for procpool.current_worker() */
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, slot + 1);
  lua_setfield(L, -2, "id");
  lua_pushinteger(L, (lua_Integer)getpid());
  lua_setfield(L, -2, "pid");
  /* on a host, its name as the pool was given it (agent.c) */
  lua_getfield(L, LUA_REGISTRYINDEX, "procpool.host");
  lua_setfield(L, -2, "host");
  lua_setfield(L, LUA_REGISTRYINDEX, "procpool.current_worker");
  note_base_frames(L);
  pp_hugealloc_install(L); /* (the memory limit, if any, wraps it) */
  if (w) {
    const char *what = NULL;
    int err = pp_limiter_start(&ws.lim, L, &w->lim, &what);
    if (err) { /* checked in the parent: not expected to happen */
      fprintf(stderr, "procpool: worker %d: cannot apply limits.%s: %s\n", slot + 1, what,
              strerror(err));
      wexit(&ws, 1);
    }
  }
  lua_newtable(L);
  ws.fncache = lua_gettop(L);
  lua_pushnil(L);
  ws.lastfn_idx = lua_gettop(L);
  if (w && w->init_idx) {
    lua_pushcfunction(L, msgh);
    int h = lua_gettop(L);
    lua_pushvalue(L, w->init_idx);
    int ok = 1;
    if (w->init_str) ok = resolve_fn(L);
    for (int i = 1; i <= w->init_n; i++) lua_pushvalue(L, w->init_idx + i);
    if (!ok || lua_pcall(L, w->init_n, 0, h) != LUA_OK) {
      const char *msg = luaL_tolstring(L, ok ? -1 : -1 - w->init_n, NULL);
      size_t len = strlen(msg);
      /* said on stderr first: the INITFAIL frame breaks the pool, whose
       * workers are then killed, and the parent reads a dead worker's
       * stderr before it lets the pool end */
      fprintf(stderr, "procpool: worker %d: exception in initializer: %s\n", slot + 1, msg);
      fflush(stderr);
      reserve(&ws, PP_FRAME_HDR + len);
      size_t hh = pp_frame_begin(&ws.out.buf, PP_FR_INITFAIL, 0);
      memcpy(ws.out.buf.p + ws.out.buf.n, msg, len);
      ws.out.buf.n += len;
      pp_frame_end(&ws.out.buf, hh);
      flush(&ws);
      wexit(&ws, 1);
    }
    lua_settop(L, ws.lastfn_idx);
  }
  send_empty(&ws, PP_FR_READY);
  for (;;) {
    pp_frame f;
    int rc = pp_in_next(&ws.in, &f);
    if (rc < 0) wexit(&ws, 71);
    if (rc == 0) {
      /* nothing complete buffered: take what has arrived meanwhile
       * before sending the results, then block */
      long r = pp_in_read(&ws.in, fd, 0);
      if (r > 0) continue;
      flush(&ws);
      /* a next task often follows at once: look for it a little while
       * before sleeping (waking a sleeping process costs far more) */
      uint64_t until = pp_now_ns() + SPIN_NS;
      while ((r = pp_in_read(&ws.in, fd, 0)) < 0 && errno == EAGAIN && pp_now_ns() < until)
        sched_yield();
      if (r > 0) continue;
      r = pp_in_read(&ws.in, fd, 1);
      if (r == 0) wexit(&ws, 0); /* the parent closed our input: done */
      if (r < 0 && errno != EINTR && errno != EAGAIN) wexit(&ws, 0);
      continue;
    }
    if (f.type == PP_FR_RESUME) { /* the items taken back end here */
      if (!ws.revoked || f.len < PP_RESUME_BODY || pp_resume_get(f.body) < ws.dropped_to)
        wexit(&ws, 71);
      __atomic_store_n(&page->started, ws.claimed, __ATOMIC_RELEASE);
      ws.revoked = 0;
      continue;
    }
    if (f.type != PP_FR_TASK) wexit(&ws, 71);
    if (ws.revoked) { /* sent before the parent took it back */
      pp_task_hdr th;
      if (f.len < PP_TASK_HDR) wexit(&ws, 71);
      pp_task_hdr_get(f.body, &th);
      if (th.count) dropped(&ws, th.seq0, th.count);
      if (f.fd >= 0) close(f.fd);
      continue;
    }
    run_task(&ws, f.body, f.len, f.fd);
    if (ws.retiring) {
      send_empty(&ws, PP_FR_RETIRE);
      wexit(&ws, 0);
    }
  }
}
