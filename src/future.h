/* future.h: Future userdata over the engine's jobs, and its done callbacks. */
#ifndef PP_FUTURE_H
#define PP_FUTURE_H

#include <lua.h>

#include "engine.h"

#define PP_FUTURE_MT "procpool.Future"
/* an apply result without callbacks or captured output: a Future under
 * this metatable (no table of its own per call) */
#define PP_APPLY_MT "procpool.AsyncResult"

/* values attached to a Future, read and set with pp_future_getuv/setuv */
enum { PP_FUV_OUTCOME = 1, PP_FUV_CALLBACKS, PP_FUV_POLLFD, PP_FUV_N = PP_FUV_POLLFD };

typedef struct pp_fut {
  pp_job *job;
  pp_engine *e;
} pp_fut;

/* Push a new Future for `job` of `e` (takes over one job reference). */
void pp_future_push(lua_State *L, pp_engine *e, pp_job *job);
/* Give the Future at idx the apply result's metatable. */
void pp_future_as_apply(lua_State *L, int idx);
/* The Future (or apply result) at `idx`, or NULL if it is neither. */
pp_fut *pp_future_test(lua_State *L, int idx);
/* The Future at `idx`; raises if it is released or another process's. */
pp_fut *pp_future_check(lua_State *L, int idx);
/* Push value k (PP_FUV_*) of the Future at idx (nil if unset) and return
 * its type; pop a value and make it value k. They are kept beside the
 * Future, in a weak-keyed table per kind, not in user values: a pending
 * Future is then a 64-byte userdata (with three user values, 112). */
int pp_future_getuv(lua_State *L, int idx, int k);
void pp_future_setuv(lua_State *L, int idx, int k);
/* cb (at index cb) listens to the reports of the items of the Future at
 * fut, called as cb(f, i, ...): every one of them, from before the job
 * is submitted (map chunks). */
void pp_future_listen_items(lua_State *L, int fut, int cb);
/* Run the progress and done callbacks due (of every watched job). */
void pp_drain(lua_State *L);
/* Count one more (delta 1) or one less (-1) watched job of engine `e`:
 * pp_drain looks at the engines that have some. */
void pp_future_count_engine(lua_State *L, pp_engine *e, int delta);

/* A job in state `st` has ended (done or cancelled). */
static inline int pp_job_ended(int st) { return st == PP_JOB_DONE || st == PP_JOB_CANCELLED; }

/* Item i (0-based) has its outcome; its job may still be running. */
static inline int pp_future_item_ready(const pp_fut *f, uint32_t i) {
  return __atomic_load_n(&f->job->items[i].status, __ATOMIC_ACQUIRE) != PP_IT_PENDING;
}

#endif
