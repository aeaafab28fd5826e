/* wait.c: the one wait primitive: the wait loop, waiters, pollables and
 * core.await. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <lauxlib.h>

#include "wait.h"

#include "engine.h"
#include "future.h"
#include "pp.h"

#define REG_WAITER "procpool.waiter"
#define WAITBOX_MT "procpool.WaitFd"

/* ------------------------------------------------------------------ */
/* waiters and the pollable protocol                                    */

typedef struct waitbox {
  pp_waiter *w;
} waitbox;

static int waitbox_gc(lua_State *L) {
  waitbox *b = lua_touserdata(L, 1);
  if (b->w) pp_waiter_unref(b->w);
  b->w = NULL;
  return 0;
}

static waitbox *new_waitbox(lua_State *L) {
  waitbox *b = lua_newuserdatauv(L, sizeof *b, 0);
  b->w = NULL;
  luaL_setmetatable(L, WAITBOX_MT);
  pp_waiter *w = malloc(sizeof *w);
  if (!w) luaL_error(L, "procpool: not enough memory");
  w->refs = 1;
  w->fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  b->w = w;
  if (w->fd < 0) luaL_error(L, "procpool: eventfd: %s", strerror(errno));
  return b;
}

static void signal_waiter(pp_waiter *w) {
  uint64_t one = 1;
  ssize_t r = write(w->fd, &one, sizeof one);
  (void)r;
}

/* pollfd(): an fd readable once the future is done */
int pp_future_pollfd(lua_State *L) {
  pp_fut *f = pp_future_check(L, 1);
  if (pp_future_getuv(L, 1, PP_FUV_POLLFD) == LUA_TUSERDATA) {
    waitbox *b = lua_touserdata(L, -1);
    lua_pushinteger(L, b->w->fd);
    return 1;
  }
  lua_pop(L, 1);
  waitbox *b = new_waitbox(L);
  pp_future_setuv(L, 1, PP_FUV_POLLFD);
  if (!pp_engine_wait_add(f->e, f->job, b->w)) signal_waiter(b->w); /* done already */
  lua_pushinteger(L, b->w->fd);
  return 1;
}

int pp_pollable_events(lua_State *L) {
  lua_pushliteral(L, "r");
  return 1;
}

int pp_pollable_timeout(lua_State *L) {
  lua_pushnil(L);
  return 1;
}

/* ------------------------------------------------------------------ */
/* the wait loop                                                        */

/* How long a wait keeps looking before it sleeps in poll. */
#define SPIN_NS 30000u

/* Sleep in poll on the engines' fds until one is readable or `ms` pass
 * (-1: no limit). With on_signal, a signal that ends the sleep early
 * gives a hook the signal's handler installed (lua.c's Ctrl-C handler
 * raises "interrupted!" from one) its chance to run: such a wait is never
 * deaf to Ctrl-C. */
static void sleep_on(lua_State *L, const pp_wait *w, int ms) {
  int top = lua_gettop(L);
  struct pollfd inl[16], *pfd = inl;
  if (w->nengs > 16) pfd = lua_newuserdatauv(L, (size_t)w->nengs * sizeof *pfd, 0);
  for (int i = 0; i < w->nengs; i++) {
    pfd[i].fd = pp_engine_fd(w->engs[i]);
    pfd[i].events = POLLIN;
    pfd[i].revents = 0;
  }
  int r;
  if (w->nengs == 0) {
    if (ms < 0) luaL_error(L, "procpool: nothing to wait for");
    r = poll(NULL, 0, ms);
  } else {
    r = poll(pfd, (nfds_t)w->nengs, ms);
  }
  lua_settop(L, top);
  if (r < 0 && errno == EINTR && w->on_signal && lua_gethook(L)) {
    /* calling any function runs the hook's call event */
    lua_pushcfunction(L, pp_pollable_timeout);
    lua_call(L, 0, 0);
    lua_settop(L, top);
  }
}

int pp_wait_loop(lua_State *L, pp_wait *w) {
  int spun = 0;
  for (;;) {
    if (w->check(L, w)) return 1;
    double left = w->deadline < 0 ? -1 : w->deadline - pp_wait_now();
    if (w->deadline >= 0 && left <= 0) return 0;
    if (w->instead && w->instead(L, w, left)) continue;
    /* a result often arrives within microseconds: look again briefly
     * before sleeping, which costs far more to wake from */
    if (w->peek && !spun) {
      spun = 1;
      uint64_t until = pp_now_ns() + SPIN_NS;
      int done = 0;
      while (!done && pp_now_ns() < until) {
        sched_yield();
        done = w->peek(L, w);
      }
      if (done) continue;
    }
    int ms = left < 0 ? -1 : (int)ceil(left * 1000.0);
    if (w->slice_ms >= 0 && (ms < 0 || ms > w->slice_ms)) ms = w->slice_ms;
    sleep_on(L, w, ms);
  }
}

/* ------------------------------------------------------------------ */
/* the wait primitive                                                   */

/*
 * await(target, deadline, mode) -> true when the condition holds, false
 * when the deadline (absolute, monotonic seconds; nil: none) passes.
 * target: a Future, with mode nil (it is done) or an item number i (its
 * item i is done, or the whole future); a sequence of Futures with mode
 * "any" (one done), "all" (all done), "exc" (one failed, or all done) or
 * a sequence of item numbers (item pos[k] of future k is done, for any
 * k); or an Executor (its engine has ended).
 * In a yieldable coroutine with a waiter installed, it calls the waiter
 * through lua_callk, so the waiter may yield; otherwise it blocks in poll.
 */
#define AW_TARGET 1
#define AW_DEADLINE 2
#define AW_MODE 3
#define AW_BOX 4     /* the waitbox while a waiter runs */
#define AW_ENGINES 5 /* scratch for many engines (a userdata), or nil */
#define AW_TOP AW_ENGINES

/* An await's wait, and the engines it involves (w.engs), each once,
 * without a limit on how many. */
typedef struct awstate {
  pp_wait w;
  int cap;
  pp_engine *inl[16];
} awstate;

static void aw_engine(lua_State *L, awstate *s, pp_engine *e) {
  for (int i = 0; i < s->w.nengs; i++)
    if (s->w.engs[i] == e) return;
  if (s->w.nengs == s->cap) { /* grow into a Lua-owned scratch buffer */
    int cap = s->cap * 2;
    pp_engine **n = lua_newuserdatauv(L, (size_t)cap * sizeof *n, 0);
    memcpy(n, s->w.engs, (size_t)s->w.nengs * sizeof *n);
    lua_replace(L, AW_ENGINES);
    s->w.engs = n;
    s->cap = cap;
  }
  s->w.engs[s->w.nengs++] = e;
}

/* The i-th entry of a target sequence if it is a live Future, else NULL
 * (such entries are passed over). */
static pp_fut *aw_nth(lua_State *L, lua_Integer i) {
  lua_rawgeti(L, AW_TARGET, i);
  pp_fut *g = pp_future_test(L, -1);
  lua_pop(L, 1);
  return g && g->job ? g : NULL;
}

/* Item i (1-based) of the future's job, or the whole job, is done. */
static int aw_item_done(pp_fut *f, lua_Integer i) {
  if (pp_job_ended(pp_engine_job_state(f->e, f->job))) return 1;
  return i >= 1 && i <= (lua_Integer)f->job->n && pp_future_item_ready(f, (uint32_t)(i - 1));
}

/* 1 if the condition holds; collects the engines involved */
static int aw_check(lua_State *L, awstate *s) {
  s->w.nengs = 0;
  pp_fut *f = pp_future_test(L, AW_TARGET);
  if (f) {
    pp_future_check(L, AW_TARGET);
    aw_engine(L, s, f->e);
    if (lua_isinteger(L, AW_MODE)) return aw_item_done(f, lua_tointeger(L, AW_MODE));
    return pp_job_ended(pp_engine_job_state(f->e, f->job));
  }
  pp_engine *xe;
  if (pp_executor_engine(L, AW_TARGET, &xe)) {
    if (!xe) return 1;
    aw_engine(L, s, xe);
    return pp_engine_state(xe) == PP_E_DEAD;
  }
  int items = lua_istable(L, AW_MODE);
  const char *mode = items ? "" : luaL_optstring(L, AW_MODE, "all");
  lua_Integer n = (lua_Integer)lua_rawlen(L, AW_TARGET), done = 0;
  if (n == 0) return 1;
  for (lua_Integer i = 1; i <= n; i++) {
    pp_fut *g = aw_nth(L, i);
    if (!g) continue;
    aw_engine(L, s, g->e);
    if (items) {
      lua_rawgeti(L, AW_MODE, i);
      lua_Integer pos = lua_tointeger(L, -1);
      lua_pop(L, 1);
      if (aw_item_done(g, pos)) return 1;
      continue;
    }
    int st = pp_engine_job_state(g->e, g->job);
    if (pp_job_ended(st)) {
      done++;
      if (mode[0] == 'a' && mode[1] == 'n') return 1; /* any */
      if (mode[0] == 'e' && st == PP_JOB_DONE && g->job->nfailed) return 1;
    }
  }
  return !items && done == n;
}

/* A wait on single items: have the jobs report each item as it ends. */
static void aw_watch_items(lua_State *L) {
  pp_fut *f = pp_future_test(L, AW_TARGET);
  if (f) {
    if (lua_isinteger(L, AW_MODE) && f->job) pp_engine_watch_items(f->e, f->job);
    return;
  }
  if (!lua_istable(L, AW_TARGET) || !lua_istable(L, AW_MODE)) return;
  lua_Integer n = (lua_Integer)lua_rawlen(L, AW_TARGET);
  for (lua_Integer i = 1; i <= n; i++) {
    pp_fut *g = aw_nth(L, i);
    if (g) pp_engine_watch_items(g->e, g->job);
  }
}

/* Register the box's waiter on every job not done yet. A job that ended
 * since the condition was checked makes the fd readable at once, or the
 * wakeup would be lost. */
static void aw_register(lua_State *L, pp_waiter *w, int add) {
  pp_fut *f = pp_future_test(L, AW_TARGET);
  if (f) {
    if (!add)
      pp_engine_wait_del(f->e, f->job, w);
    else if (!pp_engine_wait_add(f->e, f->job, w))
      signal_waiter(w);
    return;
  }
  if (!lua_istable(L, AW_TARGET)) return;
  lua_Integer n = (lua_Integer)lua_rawlen(L, AW_TARGET);
  for (lua_Integer i = 1; i <= n; i++) {
    pp_fut *g = aw_nth(L, i);
    if (!g) continue;
    if (!add)
      pp_engine_wait_del(g->e, g->job, w);
    else if (!pp_engine_wait_add(g->e, g->job, w))
      signal_waiter(w);
  }
}

/* The wait's look: clear the notifications first, so none that follow
 * are missed, then run the callbacks due and test the condition. */
static int aw_look(lua_State *L, pp_wait *w) {
  awstate *s = (awstate *)w;
  if (lua_type(L, AW_BOX) == LUA_TUSERDATA) { /* back from the waiter */
    waitbox *b = lua_touserdata(L, AW_BOX);
    aw_register(L, b->w, 0);
    lua_pushnil(L);
    lua_replace(L, AW_BOX);
  }
  lua_settop(L, AW_TOP);
  aw_check(L, s);
  for (int i = 0; i < s->w.nengs; i++) pp_engine_ack(s->w.engs[i]);
  pp_drain(L);
  if (aw_check(L, s)) {
    /* jobs that ended since the drain are on their engine's list by now
     * (a job is listed before it shows as done): their callbacks run
     * before the waiter is released */
    pp_drain(L);
    return 1;
  }
  return 0;
}

static int aw_peek(lua_State *L, pp_wait *w) {
  for (int i = 0; i < w->nengs; i++) pp_engine_reap(w->engs[i]);
  return aw_check(L, (awstate *)w);
}

static int await_k(lua_State *L, int status, lua_KContext ctx);

/* In a yieldable coroutine with a waiter installed, wait in the waiter:
 * it is given an fd readable once the condition may hold. */
static int aw_instead(lua_State *L, pp_wait *w, double left) {
  (void)w;
  if (!lua_isyieldable(L)) return 0;
  if (lua_getfield(L, LUA_REGISTRYINDEX, REG_WAITER) != LUA_TFUNCTION) {
    lua_pop(L, 1);
    return 0;
  }
  int fd;
  pp_engine *xe;
  if (pp_executor_engine(L, AW_TARGET, &xe)) {
    fd = pp_engine_fd(xe);
  } else {
    waitbox *b = new_waitbox(L);
    lua_replace(L, AW_BOX);
    aw_register(L, b->w, 1);
    fd = b->w->fd;
  }
  lua_pushinteger(L, fd);
  if (left < 0)
    lua_pushnil(L);
  else
    lua_pushnumber(L, left);
  lua_callk(L, 2, 0, 0, await_k);
  return 1;
}

static int await_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  awstate s;
  s.w.check = aw_look;
  s.w.peek = aw_peek;
  s.w.instead = aw_instead;
  s.w.engs = s.inl;
  s.w.nengs = 0;
  s.w.deadline = lua_isnoneornil(L, AW_DEADLINE) ? -1 : lua_tonumber(L, AW_DEADLINE);
  s.w.slice_ms = -1;
  s.w.on_signal = 1;
  s.cap = 16;
  if (lua_type(L, AW_ENGINES) == LUA_TUSERDATA) { /* back from the waiter: keep the scratch */
    s.w.engs = lua_touserdata(L, AW_ENGINES);
    s.cap = (int)(lua_rawlen(L, AW_ENGINES) / sizeof *s.w.engs);
  }
  lua_pushboolean(L, pp_wait_loop(L, &s.w));
  return 1;
}

static int l_await(lua_State *L) {
  luaL_checkany(L, AW_TARGET);
  if (!lua_isnoneornil(L, AW_DEADLINE)) luaL_checknumber(L, AW_DEADLINE);
  lua_settop(L, AW_MODE);
  lua_pushnil(L); /* AW_BOX */
  lua_pushnil(L); /* AW_ENGINES */
  aw_watch_items(L);
  return await_k(L, LUA_OK, 0);
}

static int l_set_waiter(lua_State *L) {
  if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, REG_WAITER);
  return 0;
}

void pp_wait_open(lua_State *L) {
  static const luaL_Reg fns[] = {{"await", l_await}, {"set_waiter", l_set_waiter}, {NULL, NULL}};
  luaL_newmetatable(L, WAITBOX_MT);
  lua_pushcfunction(L, waitbox_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_setfuncs(L, fns, 0);
}
