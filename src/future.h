/* future.h: Future userdata over the engine's jobs, and the wait primitive. */
#ifndef PP_FUTURE_H
#define PP_FUTURE_H

#include <lua.h>

#include "engine.h"

#define PP_FUTURE_MT "procpool.Future"
#define PP_EXECUTOR_MT "procpool.Executor"

typedef struct pp_fut {
  pp_job *job;
  pp_engine *e;
} pp_fut;

typedef struct pp_exec {
  pp_engine *e;
  int nworkers;
  uint64_t polled; /* ended-job count at the last poll() */
} pp_exec;

/* Push a new Future for `job` of `e` (takes over one job reference). */
void pp_future_push(lua_State *L, pp_engine *e, pp_job *job);
/* Run the done callbacks of every ended watched job. */
void pp_drain(lua_State *L);

#endif
