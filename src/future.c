/* future.c: Future userdata over the engine's jobs, and its done callbacks.
 * lua/procpool/futures.lua completes the class (result, exception, wait,
 * as_completed). */
#define _GNU_SOURCE
#include "future.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>

#include <lauxlib.h>

#include "codec.h"
#include "error.h"
#include "pp.h"
#include "progress_cb.h"
#include "udata.h"

/* registry tables (reg_table), under the addresses of these: futures
 * with callbacks by job, and a count per engine */
static const char reg_cbfuts, reg_cbengines;

/* the registry keys of the Future metatable and of an apply result's
 * (udata.h): the same userdata under either */
static const char future_mt_key, apply_mt_key;

pp_fut *pp_future_test(lua_State *L, int idx) {
  void *p = lua_touserdata(L, idx);
  if (!p || !lua_getmetatable(L, idx)) return NULL;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &future_mt_key);
  int same = lua_rawequal(L, -1, -2);
  if (!same) {
    lua_pop(L, 1);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &apply_mt_key);
    same = lua_rawequal(L, -1, -2);
  }
  lua_pop(L, 2);
  return same ? p : NULL;
}

pp_fut *pp_future_check(lua_State *L, int idx) {
  pp_fut *f = pp_future_test(L, idx);
  if (!f) f = luaL_checkudata(L, idx, PP_FUTURE_MT); /* (for its error) */
  if (!f->job) pp_error_raise(L, "InvalidStateError", "a released future");
  if (!pp_engine_mine(f->e)) pp_error_raise(L, "InvalidStateError", "%s", pp_strerror(PP_EFOREIGN));
  return f;
}

/* the registry keys of the tables of attached values, one per kind */
static const char fuv_keys[PP_FUV_N];

int pp_future_getuv(lua_State *L, int idx, int k) {
  idx = lua_absindex(L, idx);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &fuv_keys[k - 1]);
  lua_pushvalue(L, idx);
  int t = lua_rawget(L, -2);
  lua_remove(L, -2);
  return t;
}

void pp_future_setuv(lua_State *L, int idx, int k) {
  idx = lua_absindex(L, idx);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &fuv_keys[k - 1]);
  lua_pushvalue(L, idx);
  lua_rotate(L, -3, -1); /* table, future, value */
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

void pp_future_push(lua_State *L, pp_engine *e, pp_job *job) {
  pp_fut *f = lua_newuserdatauv(L, sizeof *f, 0);
  f->job = NULL;
  f->e = NULL;
  pp_udata_setmt(L, &future_mt_key);
  pp_engine_ref(e);
  f->e = e;
  f->job = job;
}

void pp_future_as_apply(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &apply_mt_key);
  lua_setmetatable(L, idx);
}

static int fut_gc(lua_State *L) {
  pp_fut *f = pp_future_test(L, 1);
  if (!f) return 0;
  if (f->job && pp_engine_mine(f->e)) { /* a forked copy leaves its parent's memory alone */
    pp_job_unref(f->job);
    pp_engine_unref(f->e);
  }
  f->job = NULL;
  f->e = NULL;
  return 0;
}

/* _release(): an ended future's job let go of now, not at collection: the
 * pipelines call it on a chunk whose results they have taken, so that its
 * result frames and item records go back to the allocator (and warm.c's
 * cache) while they are still warm, instead of lingering until the
 * collector runs. The future is then released (its methods raise). */
static int fut_release(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  if (!pp_job_ended(pp_engine_job_state(f->e, f->job)))
    pp_error_raise(L, "InvalidStateError", "the future is not done");
  return fut_gc(L);
}

static int fut_done(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_pushboolean(L, pp_job_ended(pp_engine_job_state(f->e, f->job)));
  return 1;
}

static int fut_running(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_pushboolean(L, pp_engine_job_state(f->e, f->job) == PP_JOB_RUNNING);
  return 1;
}

static int fut_cancelled(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_pushboolean(L, pp_engine_job_state(f->e, f->job) == PP_JOB_CANCELLED);
  return 1;
}

static const char *state_name(int st) {
  switch (st) {
  case PP_JOB_PENDING:
    return "pending";
  case PP_JOB_RUNNING:
    return "running";
  case PP_JOB_CANCELLED:
    return "cancelled";
  default:
    return "finished";
  }
}

static int fut_state(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_pushstring(L, state_name(pp_engine_job_state(f->e, f->job)));
  return 1;
}

static int fut_tostring(lua_State *L) {
  pp_fut *f = pp_future_test(L, 1);
  if (!f) f = luaL_checkudata(L, 1, PP_FUTURE_MT);
  const char *kind = pp_udata_test(L, 1, &apply_mt_key) ? PP_APPLY_MT : PP_FUTURE_MT;
  if (!f->job || !pp_engine_mine(f->e))
    lua_pushfstring(L, "%s: %p (released)", kind, (void *)f);
  else
    lua_pushfstring(L, "%s: %p (%s)", kind, (void *)f,
                    state_name(pp_engine_job_state(f->e, f->job)));
  return 1;
}

/* _apply_result(f) -> f, now under the apply result's metatable */
static int l_apply_result(lua_State *L) {
  pp_future_check(L, 1);
  lua_settop(L, 1);
  pp_future_as_apply(L, 1);
  return 1;
}

/* ------------------------------------------------------------------ */
/* callbacks                                                            */

static void report_callback_error(lua_State *L, int futidx) {
  const char *msg = luaL_tolstring(L, -1, NULL);
  const char *fs = luaL_tolstring(L, futidx, NULL);
  fprintf(stderr, "procpool: exception calling callback for %s: %s\n", fs, msg);
  fflush(stderr);
  lua_pop(L, 3);
}

static int tb_handler(lua_State *L) {
  if (pp_is_interrupt(L, 1)) return 1; /* as it is: the caller knows Ctrl-C by it */
  const char *msg = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Call every callback of the future at `idx` once, then forget them.
 * Returns 1 if Ctrl-C came in one (the others ran: the caller raises it
 * once its own work is done, pp_interrupt_raise). */
static int run_callbacks(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  if (pp_future_getuv(L, idx, PP_FUV_CALLBACKS) != LUA_TTABLE) {
    lua_pop(L, 1);
    return 0;
  }
  int interrupted = 0;
  int cbs = lua_gettop(L);
  lua_pushnil(L);
  pp_future_setuv(L, idx, PP_FUV_CALLBACKS);
  lua_Integer n = (lua_Integer)lua_rawlen(L, cbs);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_pushcfunction(L, tb_handler);
    lua_rawgeti(L, cbs, i);
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 1, 0, -3) == LUA_OK) {
      lua_pop(L, 1);
    } else if (pp_is_interrupt(L, -1)) {
      interrupted = 1;
      lua_pop(L, 2);
    } else {
      report_callback_error(L, idx);
      lua_pop(L, 1); /* the handler */
    }
  }
  lua_pop(L, 1);
  return interrupted;
}

static void reg_table(lua_State *L, const void *key) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, key);
  }
}

void pp_future_count_engine(lua_State *L, pp_engine *e, int delta) {
  reg_table(L, &reg_cbengines);
  lua_rawgetp(L, -1, e);
  lua_Integer n = lua_tointeger(L, -1) + delta;
  lua_pop(L, 1);
  if (n > 0)
    lua_pushinteger(L, n);
  else
    lua_pushnil(L);
  lua_rawsetp(L, -2, e);
  lua_pop(L, 1);
}

/* Forget the registration of the future for `job`; leaves the future (or
 * nil) on the stack. */
static void unregister(lua_State *L, pp_engine *e, pp_job *job) {
  reg_table(L, &reg_cbfuts);
  lua_rawgetp(L, -1, job);
  if (!lua_isnil(L, -1)) {
    lua_pushnil(L);
    lua_rawsetp(L, -3, job);
    pp_future_count_engine(L, e, -1);
  }
  lua_remove(L, -2);
}

/* Run the callbacks of the watched jobs of `e` that have ended; 1 if
 * Ctrl-C came in one (all ran). */
static int drain_engine(lua_State *L, pp_engine *e) {
  reg_table(L, &reg_cbengines);
  int live = lua_rawgetp(L, -1, e) != LUA_TNIL;
  lua_pop(L, 2);
  if (!live) return 0;                     /* a callback's drain got to it */
  if (pp_progress_delivering(L)) return 0; /* inside a progress callback: after it */
  /* futures with callbacks hold the engine, so it is alive here */
  pp_engine_ref(e);
  pp_job *j = pp_engine_take_ended(e);
  /* the reports of these jobs came before their ends: they go first */
  int interrupted = pp_progress_deliver(L, e);
  while (j) {
    pp_job *next = j->qnext; /* the callback list */
    if (pp_progress_forget(L, j)) pp_future_count_engine(L, e, -1);
    unregister(L, e, j);
    if (!lua_isnil(L, -1)) interrupted |= run_callbacks(L, -1);
    lua_pop(L, 1);
    pp_job_unref(j);
    j = next;
  }
  pp_engine_unref(e);
  return interrupted;
}

void pp_drain(lua_State *L) {
  reg_table(L, &reg_cbengines);
  int t = lua_gettop(L);
  /* a snapshot (callbacks may add or remove engines): in C for the usual
   * few, in a table when there are more */
  pp_engine *engs[16];
  int n = 0, many = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    if (n == 16) {
      lua_pop(L, 1);
      many = 1;
      break;
    }
    engs[n++] = (pp_engine *)lua_touserdata(L, -1);
  }
  int interrupted = 0; /* Ctrl-C in a callback: raised after the drain */
  if (!many) {
    lua_pop(L, 1);
    for (int k = 0; k < n; k++) interrupted |= drain_engine(L, engs[k]);
    if (interrupted) pp_interrupt_raise(L);
    return;
  }
  lua_newtable(L);
  lua_Integer m = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    lua_pushvalue(L, -1);
    lua_rawseti(L, t + 1, ++m);
  }
  for (lua_Integer k = 1; k <= m; k++) {
    lua_rawgeti(L, t + 1, k);
    pp_engine *e = (pp_engine *)lua_touserdata(L, -1);
    lua_pop(L, 1);
    interrupted |= drain_engine(L, e);
  }
  lua_pop(L, 2);
  if (interrupted) pp_interrupt_raise(L);
}

static int l_drain(lua_State *L) {
  pp_drain(L);
  return 0;
}

static int fut_add_done_callback(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  if (pp_future_getuv(L, 1, PP_FUV_CALLBACKS) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    pp_future_setuv(L, 1, PP_FUV_CALLBACKS);
  }
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  reg_table(L, &reg_cbfuts);
  int registered = lua_rawgetp(L, -1, f->job) != LUA_TNIL;
  lua_pop(L, 1);
  if (!registered) {
    if (pp_engine_watch(f->e, f->job)) {
      lua_pushvalue(L, 1);
      lua_rawsetp(L, -2, f->job);
      pp_future_count_engine(L, f->e, 1);
      return 0;
    }
    if (run_callbacks(L, 1)) pp_interrupt_raise(L); /* already done: now, in the caller */
  }
  return 0;
}

/* [future, cb]: cb listens to the task's reports; the latest one so far
 * comes at once (once the job counts as watched) */
static int add_listener(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  pp_report_note latest;
  if (pp_progress_listen(L, 1, f->e, f->job, 2, 0, &latest)) pp_future_count_engine(L, f->e, 1);
  pp_progress_catch_up(L, 1, 2, &latest);
  return 0;
}

void pp_future_listen_items(lua_State *L, int fut, int cb) {
  fut = lua_absindex(L, fut);
  cb = lua_absindex(L, cb);
  pp_fut *f = pp_future_check(L, fut);
  pp_report_note latest;
  if (pp_progress_listen(L, fut, f->e, f->job, cb, 1, &latest)) pp_future_count_engine(L, f->e, 1);
}

/* add_progress_callback(cb): cb(f, ...) with each report of the task */
static int fut_add_progress_callback(lua_State *L) { return add_listener(L); }

/* progress() -> the values of the task's latest report (none before one) */
static int fut_progress(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_settop(L, 1);
  return pp_progress_latest(L, f->e, f->job);
}

static int fut_cancel(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  int was = pp_engine_job_state(f->e, f->job) == PP_JOB_CANCELLED;
  int ok = pp_engine_cancel(f->e, f->job);
  if (ok && !was) { /* cancelled now: callbacks run here, once */
    unregister(L, f->e, f->job);
    lua_pop(L, 1);
    if (run_callbacks(L, 1)) pp_interrupt_raise(L);
  }
  lua_pushboolean(L, ok);
  return 1;
}

/* ------------------------------------------------------------------ */
/* outcomes                                                             */

static const char *signame(int sig) {
  static const char *names[] = {NULL,      "SIGHUP",  "SIGINT",  "SIGQUIT", "SIGILL",    "SIGTRAP",
                                "SIGABRT", "SIGBUS",  "SIGFPE",  "SIGKILL", "SIGUSR1",   "SIGSEGV",
                                "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM", "SIGSTKFLT", "SIGCHLD",
                                "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU",   "SIGURG",
                                "SIGXCPU", "SIGXFSZ"};
  return sig > 0 && sig < (int)(sizeof names / sizeof names[0]) ? names[sig] : NULL;
}

/* Push the error object for a failed item that has no error value;
 * `d` is its death record (NULL if none). */
static void push_item_error(lua_State *L, pp_fut *f, int status, const pp_death *d) {
  switch (status) {
  case PP_IT_CANCELLED:
    pp_error_push(L, "CancelledError", "the future was cancelled");
    break;
  case PP_IT_LOST: {
    pp_death none = {0, 0, -1, NULL, NULL, NULL, NULL, NULL, 0, 0, 0};
    if (!d) d = &none;
    const char *sn = signame(d->sig);
    uint32_t cpu = pp_engine_cpu_limit(f->e);
    /* the reason alone, then the message that says it in a sentence */
    if (d->host_lost) {
      lua_pushfstring(L, "host lost: %s", d->host_lost);
      lua_pushfstring(L,
                      "worker process %d on host '%s' was lost with its host while running the "
                      "task (%s)",
                      (int)d->pid, d->host ? d->host : "?", d->host_lost);
    } else if (d->sig == SIGXCPU && cpu)
      lua_pushfstring(L, "CPU time limit of %d s exceeded (SIGXCPU)", (int)cpu);
    else if (d->sig)
      lua_pushfstring(L, "killed by signal %d%s%s", (int)d->sig, sn ? ", " : "", sn ? sn : "");
    else if (d->code >= 0)
      lua_pushfstring(L, "exit code %d", (int)d->code);
    else
      lua_pushliteral(L, "ended");
    if (d->host_lost)
      ; /* (said above) */
    else if (d->sig == SIGXCPU && cpu)
      lua_pushfstring(L,
                      "worker process %d was stopped by its CPU time limit (%d s) while running "
                      "the task",
                      (int)d->pid, (int)cpu);
    else if (d->sig)
      lua_pushfstring(L, "worker process %d died while running the task (signal %d%s%s)",
                      (int)d->pid, (int)d->sig, sn ? ", " : "", sn ? sn : "");
    else if (d->code >= 0)
      lua_pushfstring(L, "worker process %d died while running the task (exit code %d)",
                      (int)d->pid, (int)d->code);
    else
      lua_pushfstring(L, "worker process %d died while running the task", (int)d->pid);
    if (d->host && !d->host_lost) { /* which host it died on */
      lua_pushfstring(L, "%s, on host '%s'", lua_tostring(L, -1), d->host);
      lua_remove(L, -2);
    }
    pp_error_push(L, "WorkerLost", lua_tostring(L, -1));
    lua_remove(L, -2);
    lua_insert(L, -2);
    lua_setfield(L, -2, "reason");
    lua_pushinteger(L, d->pid);
    lua_setfield(L, -2, "pid");
    if (d->host) {
      lua_pushstring(L, d->host);
      lua_setfield(L, -2, "host");
    }
    if (d->has_output) { /* captured: what the task wrote, in place of the tail */
      lua_pushlstring(L, d->out, d->outlen);
      lua_setfield(L, -2, "stdout");
      lua_pushlstring(L, d->err, d->errlen);
      lua_setfield(L, -2, "stderr");
    } else if (d->stderr_tail) {
      lua_pushstring(L, d->stderr_tail);
      lua_setfield(L, -2, "stderr");
    }
    if (d->sig) {
      lua_pushinteger(L, d->sig);
      lua_setfield(L, -2, "signal");
    } else if (d->code >= 0) {
      lua_pushinteger(L, d->code);
      lua_setfield(L, -2, "exit_code");
    }
    break;
  }
  case PP_IT_DEADLINE: {
    pp_error_push(L, "DeadlineExceeded", "the task ran past its deadline and was stopped");
    lua_pushinteger(L, d ? d->pid : 0);
    lua_setfield(L, -2, "pid");
    lua_pushnumber(L, (lua_Number)pp_engine_job_timeout(f->e, f->job) / 1e9);
    lua_setfield(L, -2, "timeout");
    break;
  }
  default:
    pp_error_push(L, "BrokenProcessPool", pp_engine_fail_msg(f->e));
    break;
  }
}

/* Push the values of item i (its outcome is in); returns the count, or
 * -1 after pushing (error value, traceback or nil) for a failure. Raises
 * if the values cannot be decoded here. For a job still running, the
 * item's place is read under the engine's lock (the job's arrays may
 * still grow), and the blob holding it is kept in *held while it is
 * decoded (the caller drops it if decoding raises). */
static int push_item(lua_State *L, pp_fut *f, uint32_t i, int first_only, pp_blob **held) {
  int status;
  const char *s = NULL;
  size_t len = 0;
  pp_item_view v;
  const pp_death *death = NULL;
  if (pp_job_ended(pp_engine_job_state(f->e, f->job))) {
    const pp_item *it = &f->job->items[i];
    status = it->status;
    if (status == PP_IT_OK || status == PP_IT_ERROR)
      s = pp_item_bytes(f->job, it, &len);
    else
      death = pp_item_death(f->job, it);
  } else {
    status = pp_engine_item_get(f->e, f->job, i, &v);
    if (v.blob) {
      *held = v.blob;
      s = v.blob->p + v.off;
      len = v.len;
    } else if (v.has_death) {
      death = &v.death;
    }
  }
  int n = -1, top = lua_gettop(L);
  if (status == PP_IT_OK) {
    if (first_only && pp_decode_first(L, s, len)) {
      n = 1;
    } else {
      n = pp_decode(L, s, len, NULL, 0, 0);
      if (first_only) {
        if (n == 0) lua_pushnil(L);
        lua_settop(L, top + 1);
        n = 1;
      }
    }
  } else if (status == PP_IT_ERROR) {
    pp_decode(L, s, len, NULL, 0, 0);
    lua_settop(L, top + 2); /* (error value, traceback) */
  } else {
    push_item_error(L, f, status, death);
    lua_pushnil(L);
  }
  if (*held) {
    pp_blob_unref(*held);
    *held = NULL;
  }
  return n;
}

/* Items decoded inside a protected call: a value that cannot be decoded
 * here (a module or constructor the parent lacks) becomes that item's
 * failure instead of an error escaping from a wait or a callback. */
typedef struct dstate {
  pp_fut *f;
  uint32_t i, end; /* the item being decoded; one past the last */
  int one;         /* one item, all its values (first_only: the first) */
  int first_only;
  int base;      /* a run: item i's first value goes to table[base + i] */
  pp_blob *held; /* a blob being decoded from (dropped if that raises) */
} dstate;

/* [dstate, table] -> one item: its values, with the count (negative for
 * a failure) last; a run: stores the items' first values into the table
 * until done (nothing) or a failed item (error, traceback, -1). */
static int decode_body(lua_State *L) {
  dstate *d = lua_touserdata(L, 1);
  if (d->one) {
    int n = push_item(L, d->f, d->i, d->first_only, &d->held);
    lua_pushinteger(L, n);
    return (n < 0 ? 2 : n) + 1;
  }
  if (pp_job_ended(pp_engine_job_state(d->f->e, d->f->job))) {
    /* the common case: a run of scalar results of a done job, read in
     * place (push_item below takes any other item) */
    const pp_job *j = d->f->job;
    for (; d->i < d->end; d->i++) {
      const pp_item *it = &j->items[d->i];
      if (it->status != PP_IT_OK) break;
      size_t len;
      const char *s = pp_item_bytes(j, it, &len);
      if (!pp_decode_first(L, s, len)) break;
      lua_rawseti(L, 2, d->base + (lua_Integer)d->i);
    }
  }
  for (; d->i < d->end; d->i++) {
    if (push_item(L, d->f, d->i, 1, &d->held) < 0) {
      lua_pushinteger(L, -1);
      return 3;
    }
    lua_rawseti(L, 2, d->base + (lua_Integer)d->i);
  }
  return 0;
}

/* Run decode_body protected; a run stores into the table at stack index
 * 2. Returns what it returned (>= 0 values on top), or -1 with (error,
 * nil) on top when decoding raised. */
static int decode_protected(lua_State *L, dstate *d) {
  int top = lua_gettop(L);
  luaL_checkstack(L, 8, NULL);
  lua_pushcfunction(L, decode_body);
  lua_pushlightuserdata(L, d);
  lua_pushvalue(L, d->one ? 1 : 2);
  if (lua_pcall(L, 2, LUA_MULTRET, 0) != LUA_OK) {
    pp_blob_unref(d->held);
    d->held = NULL;
    if (pp_is_interrupt(L, -1)) lua_error(L); /* Ctrl-C is not the item's failure */
    lua_pushnil(L);
    return -1;
  }
  return lua_gettop(L) - top;
}

/* The registry keys of the tables that cache a done Future's one value
 * when that value has an identity (a table, a function, a userdata), so
 * that every call returns the same object: its one result, or its error
 * value. The tables are weak in their values too: an entry lives while
 * something else holds the value, and a value nobody holds can be decoded
 * again unnoticed. Keyed only by the Future (an ephemeron, like
 * fuv_keys), a cached value would outlive its Future by a collection
 * cycle, as everything a finalized object reaches does: over many tasks
 * the collector's estimate of the live heap, and RSS, grow with that lag
 * (bench/memory.lua). */
static const char value_cache_key, error_cache_key;

/* A value that has an identity, which decoding again would not keep. */
static int has_identity(lua_State *L, int idx) {
  int t = lua_type(L, idx);
  return t == LUA_TTABLE || t == LUA_TFUNCTION || t == LUA_TUSERDATA || t == LUA_TTHREAD;
}

/* The value cached under `key` for the Future at stack index 1 on top;
 * its type */
static int cache_get(lua_State *L, const char *key) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, key);
  lua_pushvalue(L, 1);
  int t = lua_rawget(L, -2);
  lua_remove(L, -2);
  return t;
}

/* Cache the value at stack index idx under `key` for the Future at 1. */
static void cache_set(lua_State *L, const char *key, int idx) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, key);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, idx);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

static void new_cache(lua_State *L, const char *key) {
  lua_createtable(L, 0, 0);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "kv");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, key);
}

/* The outcome of a done Future at stack index 1, decoded now: false,
 * error, traceback (n = 2) or true and the n values, above `top`. */
static int decode_outcome(lua_State *L, pp_fut *f, int top) {
  lua_pushboolean(L, 1);
  int n = 0;
  if (f->job->n) {
    dstate d = {f, 0, 1, 1, 0, 0, NULL};
    n = decode_protected(L, &d);
    if (n >= 0) { /* the values, then their count */
      n = (int)lua_tointeger(L, -1);
      lua_pop(L, 1);
    }
  }
  if (n < 0) {
    lua_settop(L, top + 3); /* true, error, traceback (or nil) */
    lua_pushboolean(L, 0);
    lua_replace(L, top + 1);
    n = 2;
  }
  return n;
}

/* _outcome() -> true, values... | false, error, traceback. Decoded at
 * each call, from the bytes the job keeps anyway: values without an
 * identity (nil, booleans, numbers, strings) cost less to decode again
 * than to keep. A single value with one, and an error value with one,
 * are cached (value_cache_key, error_cache_key); several values with
 * such a one among them are decoded once and cached in the future as a
 * table. */
static int fut_outcome(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  if (!pp_job_ended(pp_engine_job_state(f->e, f->job)))
    pp_error_raise(L, "InvalidStateError", "the future is not done");
  lua_settop(L, 1);
  if (cache_get(L, &value_cache_key) != LUA_TNIL) {
    lua_pushboolean(L, 1);
    lua_insert(L, 2);
    return 2;
  }
  lua_pop(L, 1);
  if (pp_future_getuv(L, 1, PP_FUV_OUTCOME) != LUA_TTABLE) {
    lua_pop(L, 1);
    int n = decode_outcome(L, f, 1), ok = lua_toboolean(L, 2), shared = 0;
    for (int k = 3; k < 3 + (ok ? n : 1); k++) shared += has_identity(L, k);
    if (!shared) return n + 1;
    if (!ok) { /* the traceback is a string: only the error is kept */
      if (cache_get(L, &error_cache_key) != LUA_TNIL)
        lua_replace(L, 3);
      else
        cache_set(L, &error_cache_key, 3);
      lua_settop(L, 4);
      return 3;
    }
    if (n == 1) {
      cache_set(L, &value_cache_key, 3);
      return 2;
    }
    lua_createtable(L, n, 2);
    lua_insert(L, 2);
    for (int k = n; k >= 1; k--) lua_rawseti(L, 2, k);
    lua_setfield(L, 2, "ok");
    lua_pushinteger(L, n);
    lua_setfield(L, 2, "n");
    lua_pushvalue(L, 2);
    pp_future_setuv(L, 1, PP_FUV_OUTCOME);
  }
  int t = lua_gettop(L);
  lua_getfield(L, t, "ok");
  lua_getfield(L, t, "n");
  int n = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  luaL_checkstack(L, n + 2, "procpool: too many results");
  for (int k = 1; k <= n; k++) lua_rawgeti(L, t, k);
  return n + 1;
}

/* _item(i[, all]) -> true, first value (all: every value) | false,
 * error, traceback (not cached) */
static int fut_item(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_Integer i = luaL_checkinteger(L, 2);
  int all = lua_toboolean(L, 3);
  if (i < 1 || i > (lua_Integer)f->job->n) luaL_argerror(L, 2, "no such item");
  if (!pp_future_item_ready(f, (uint32_t)(i - 1)))
    pp_error_raise(L, "InvalidStateError", "the item is not done");
  lua_settop(L, 2);
  lua_pushboolean(L, 1);
  dstate d = {f, (uint32_t)(i - 1), 0, 1, !all, 0, NULL};
  int r = decode_protected(L, &d);
  if (r < 0 || lua_tointeger(L, -1) < 0) { /* false, error, traceback */
    if (r >= 0) lua_pop(L, 1);
    lua_pushboolean(L, 0);
    lua_replace(L, 3);
    return 3;
  }
  lua_pop(L, 1); /* the count: true and the values stay */
  return r;
}

/* _item_ready(i) -> whether item i has its outcome */
static int fut_item_ready(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_Integer i = luaL_checkinteger(L, 2);
  if (i < 1 || i > (lua_Integer)f->job->n) luaL_argerror(L, 2, "no such item");
  lua_pushboolean(L, pp_future_item_ready(f, (uint32_t)(i - 1)));
  return 1;
}

/* _collect(out, base) -> nil | index, error, traceback: the first values
 * of all items into out[base], out[base+1], ...; stops at the first
 * failed item (in item order). */
static int fut_collect(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer base = luaL_checkinteger(L, 3);
  if (base < INT_MIN + 1 || base > INT_MAX - (lua_Integer)f->job->n)
    luaL_argerror(L, 3, "bad base");
  if (!pp_job_ended(pp_engine_job_state(f->e, f->job)))
    pp_error_raise(L, "InvalidStateError", "the future is not done");
  lua_settop(L, 3);
  dstate d = {f, 0, f->job->n, 0, 1, (int)base, NULL};
  int r = decode_protected(L, &d);
  if (r == 0) return 0;
  if (r > 0) lua_pop(L, 1); /* the -1 after (error, traceback) */
  lua_pushinteger(L, (lua_Integer)d.i + 1);
  lua_insert(L, -3);
  return 3;
}

/* _values([from]) -> values, failures, last: values[i] is item i's first
 * value for items from..last; failures is nil, or a table failures[i] =
 * { error } for failed items (wrapped: an error value may be nil or
 * false). For a done future, last is its item count; for one still
 * running, the last of the items from `from` on that are in (item `from`
 * must be). */
static int fut_values(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_Integer from = luaL_optinteger(L, 2, 1);
  uint32_t n = f->job->n, end = n;
  if (from < 1 || from > (lua_Integer)n + 1) luaL_argerror(L, 2, "no such item");
  if (!pp_job_ended(pp_engine_job_state(f->e, f->job))) {
    end = (uint32_t)(from - 1);
    while (end < n && pp_future_item_ready(f, end)) end++;
    if (end < (uint32_t)from) pp_error_raise(L, "InvalidStateError", "the item is not done");
  }
  lua_settop(L, 1);
  lua_createtable(L, from == 1 ? (int)end : 0, 0);
  lua_pushnil(L); /* failures, created on the first one */
  dstate d = {f, (uint32_t)(from - 1), end, 0, 1, 1, NULL};
  while (d.i < d.end) {
    int r = decode_protected(L, &d);
    if (r == 0) break;
    if (r > 0) lua_pop(L, 1); /* the -1 */
    lua_pop(L, 1);            /* the traceback */
    if (lua_isnil(L, 3)) {
      lua_newtable(L);
      lua_replace(L, 3);
    }
    lua_createtable(L, 1, 0);
    lua_insert(L, -2);
    lua_rawseti(L, -2, 1);
    lua_rawseti(L, 3, (lua_Integer)d.i + 1);
    d.i++;
  }
  lua_pushinteger(L, (lua_Integer)end);
  return 3;
}

/* _output([i]) -> stdout, stderr of item i (default 1), done; nothing
 * when it was not captured. */
static int fut_output(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_Integer i = luaL_optinteger(L, 2, 1);
  if (i < 1 || i > (lua_Integer)f->job->n) luaL_argerror(L, 2, "no such item");
  if (!pp_future_item_ready(f, (uint32_t)(i - 1)))
    pp_error_raise(L, "InvalidStateError", "the item is not done");
  luaL_checkstack(L, 4, NULL);
  pp_item_view v;
  pp_engine_item_get(f->e, f->job, (uint32_t)(i - 1), &v);
  /* the blob is held while its bytes are copied: a box of its own would
   * cost more than the memory error that could leak it */
  if (v.has_output) {
    lua_pushlstring(L, v.out, v.outlen);
    lua_pushlstring(L, v.err, v.errlen);
  }
  pp_blob_unref(v.blob);
  return v.has_output ? 2 : 0;
}

/* Whether some callback or report listener may be due (pp_drain has
 * work): a wait then runs them before it returns. */
static int callbacks_listed(lua_State *L) {
  reg_table(L, &reg_cbengines);
  lua_pushnil(L);
  int any = lua_next(L, -2);
  lua_pop(L, any ? 3 : 1);
  return any;
}

/* Push the one value of the Future at idx when it is cheap to know: a
 * done task that returned one scalar, while no callback waits anywhere
 * (a wait would run them first). 1 if pushed, else 0 (nothing pushed). */
static int fast_value(lua_State *L, int idx) {
  pp_fut *f = pp_future_test(L, idx);
  if (!f || !f->job || f->job->n != 1 || !pp_engine_mine(f->e) ||
      pp_engine_job_state(f->e, f->job) != PP_JOB_DONE || f->job->items[0].status != PP_IT_OK ||
      callbacks_listed(L))
    return 0;
  size_t len;
  const char *s = pp_item_bytes(f->job, &f->job->items[0], &len);
  size_t k = pp_decode_first(L, s, len);
  if (k && k == len && (unsigned char)s[0] == 1) return 1;
  if (k) lua_pop(L, 1);
  return 0;
}

/* Asked without a timeout (a given one, good or bad, is the Lua
 * method's to read) */
static int no_timeout(lua_State *L) { return lua_gettop(L) <= 2 && lua_isnoneornil(L, 2); }

/* What the method returned: all of the stack (it replaced the call). */
static int method_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  return lua_gettop(L);
}

/* Call the Lua method (upvalue 1) with this call's arguments; with a
 * continuation, so that its wait may yield to a coroutine's scheduler. */
static int call_method(lua_State *L) {
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_callk(L, lua_gettop(L) - 1, LUA_MULTRET, 0, method_k);
  return method_k(L, LUA_OK, 0);
}

/* Future:result(timeout): the Lua method, with its commonest case here
 * (fast_value, asked without a timeout): skipping the wait's look and
 * the decode's protected call makes a tiny task's result() 6x cheaper. */
static int fut_result(lua_State *L) {
  if (no_timeout(L) && fast_value(L, 1)) return 1;
  return call_method(L);
}

/* AsyncResult:get(timeout) as fut_result, for an apply's result (a
 * table whose _fut is its Future) that hands on no captured output. */
static int apply_get(lua_State *L) {
  if (no_timeout(L) && lua_type(L, 1) == LUA_TTABLE) {
    int top = lua_gettop(L);
    if (lua_getfield(L, 1, "_emit") == LUA_TNIL && lua_getfield(L, 1, "_fut") == LUA_TUSERDATA &&
        fast_value(L, -1))
      return 1;
    lua_settop(L, top);
  }
  return call_method(L);
}

/* `fast` over the Lua method given (its upvalue, for call_method) */
static int over_method(lua_State *L, lua_CFunction fast) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_pushcclosure(L, fast, 1);
  return 1;
}

/* fast_result(method), fast_get(method): result and get (above) */
static int l_fast_result(lua_State *L) { return over_method(L, fut_result); }
static int l_fast_get(lua_State *L) { return over_method(L, apply_get); }

static int fut_traceback(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  if (!pp_job_ended(pp_engine_job_state(f->e, f->job)) || f->job->n == 0 ||
      f->job->items[0].status != PP_IT_ERROR) {
    lua_pushnil(L);
    return 1;
  }
  lua_settop(L, 1);
  fut_outcome(L);
  return 1; /* the last value pushed is the traceback */
}

static int fut_nitems(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  lua_pushinteger(L, (lua_Integer)f->job->n);
  return 1;
}

/* failed() -> true if done and any item failed (cancelled is not failed) */
static int fut_failed(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  int st = pp_engine_job_state(f->e, f->job);
  lua_pushboolean(L, st == PP_JOB_DONE && f->job->nfailed > 0);
  return 1;
}

/* Push a new metatable for Future userdata, kept under `key` (udata.h):
 * __gc and __tostring; its __index is the caller's. */
static void new_future_mt(lua_State *L, const char *name, const void *key) {
  luaL_newmetatable(L, name);
  pp_udata_register(L, key);
  lua_pushcfunction(L, fut_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, fut_tostring);
  lua_setfield(L, -2, "__tostring");
}

void pp_future_open(lua_State *L) {
  static const luaL_Reg methods[] = {{"done", fut_done},
                                     {"running", fut_running},
                                     {"cancelled", fut_cancelled},
                                     {"cancel", fut_cancel},
                                     {"add_done_callback", fut_add_done_callback},
                                     {"add_progress_callback", fut_add_progress_callback},
                                     {"progress", fut_progress},
                                     {"traceback", fut_traceback},
                                     {"pollfd", pp_future_pollfd},
                                     {"events", pp_pollable_events},
                                     {"timeout", pp_pollable_timeout},
                                     {"_outcome", fut_outcome},
                                     {"_item", fut_item},
                                     {"_item_ready", fut_item_ready},
                                     {"_collect", fut_collect},
                                     {"_values", fut_values},
                                     {"_output", fut_output},
                                     {"_state", fut_state},
                                     {"_nitems", fut_nitems},
                                     {"_failed", fut_failed},
                                     {"_release", fut_release},
                                     {NULL, NULL}};
  static const luaL_Reg fns[] = {{"drain", l_drain},
                                 {"fast_result", l_fast_result},
                                 {"fast_get", l_fast_get},
                                 {"_apply_result", l_apply_result},
                                 {NULL, NULL}};
  for (int k = 0; k < PP_FUV_N; k++) {
    lua_createtable(L, 0, 0);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k"); /* a value may refer to its future: an ephemeron */
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &fuv_keys[k]);
  }
  new_cache(L, &value_cache_key);
  new_cache(L, &error_cache_key);
  new_future_mt(L, PP_FUTURE_MT, &future_mt_key);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_setfield(L, -2, "Future"); /* module.Future = the metatable */
  /* an apply's result: its task's Future under a metatable whose methods
   * (AsyncResult's, from pool.lua) fill the empty __index */
  new_future_mt(L, PP_APPLY_MT, &apply_mt_key);
  lua_newtable(L);
  lua_setfield(L, -2, "__index");
  lua_setfield(L, -2, "AsyncResult");
  luaL_setfuncs(L, fns, 0);
}
