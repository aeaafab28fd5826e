/* progress_cb.h: the parent's side of task reports: a Future's progress
 * callbacks and f:progress() (progress_cb.c). */
#ifndef PP_PROGRESS_CB_H
#define PP_PROGRESS_CB_H

#include <lua.h>

#include "engine.h"

/* Run the progress callbacks of the reports of `e` that came. */
void pp_progress_deliver(lua_State *L, pp_engine *e);
/* 1 while progress callbacks run: a drain then waits for them to end
 * (callbacks that wait would otherwise run others out of order). */
int pp_progress_delivering(lua_State *L);
/* Job `j` has ended and its reports are delivered: forget its listeners. */
void pp_progress_forget(lua_State *L, pp_engine *e, pp_job *j);

#endif
