/* wait.h: the one wait loop: look, then sleep in poll on the engines' fds
 * until the condition holds or the deadline passes. */
#ifndef PP_WAIT_H
#define PP_WAIT_H

#include <lua.h>

#include "engine.h"

/* A wait: how to look, and how to sleep between looks. A caller puts it
 * first in a struct of its own to hand its callbacks more state. */
typedef struct pp_wait pp_wait;
struct pp_wait {
  /* 1 once the wait is over. It may ack engines and run callbacks, and
   * may change `engs` and `nengs`, the engines slept on. */
  int (*check)(lua_State *L, pp_wait *w);
  /* NULL, or a look without side effects, repeated for a few
   * microseconds before the first sleep */
  int (*peek)(lua_State *L, pp_wait *w);
  /* NULL, or a wait some other way than sleeping here, given the seconds
   * left (-1: no deadline): 1 if it waited (it may also yield and not
   * return), 0 to sleep after all */
  int (*instead)(lua_State *L, pp_wait *w, double left);
  pp_engine **engs;
  int nengs;
  double deadline; /* absolute, in pp_wait_now() seconds; < 0: none */
  int slice_ms;    /* longest sleep before looking again; -1: no limit */
  int on_signal;   /* a signal that ends a sleep runs the hook its handler set */
};

/* 1 once check says so, 0 when the deadline passes. */
int pp_wait_loop(lua_State *L, pp_wait *w);

/* The deadlines' clock: monotonic, in seconds. */
static inline double pp_wait_now(void) { return (double)pp_now_ns() / 1e9; }

#endif
