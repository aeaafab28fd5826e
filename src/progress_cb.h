/* progress_cb.h: the parent's side of task reports: a job's progress
 * callbacks and its latest report (progress_cb.c). */
#ifndef PP_PROGRESS_CB_H
#define PP_PROGRESS_CB_H

#include <lua.h>

#include "engine.h"

/* Run the progress callbacks of the reports of `e` that came; 1 if
 * Ctrl-C came in one (the others ran; the caller raises it). */
int pp_progress_deliver(lua_State *L, pp_engine *e);
/* 1 while progress callbacks run: a drain then waits for them to end
 * (callbacks that wait would otherwise run others out of order). */
int pp_progress_delivering(lua_State *L);
/* Job `j` has ended and its reports are delivered: forget its listeners;
 * 1 if it had some. */
int pp_progress_forget(lua_State *L, pp_job *j);
/* Add the function at `cb` as a listener of the reports of job `j` of `e`
 * (the Future at `fut`): called as cb(future, ...), or with `indexed` as
 * cb(future, item, ...) (item: 1-based), for each report after *latest,
 * the latest report so far (num 0: none; it holds a blob reference).
 * Returns 1 if the job had no listener before: the caller counts it as
 * watched, then calls pp_progress_catch_up. */
int pp_progress_listen(lua_State *L, int fut, pp_engine *e, pp_job *j, int cb, int indexed,
                       pp_report_note *latest);
/* Call the new listener at `cb` (not an indexed one: those are given every
 * queued report instead) with *latest, if there is one, and drop it. */
void pp_progress_catch_up(lua_State *L, int fut, int cb, pp_report_note *latest);
/* Push the values of the job's latest report; returns how many (0: none
 * yet). Raises if they cannot be decoded here. */
int pp_progress_latest(lua_State *L, pp_engine *e, pp_job *j);

#endif
