/* report.h: procpool.report in a worker: a task's progress report, from
 * the Lua call to the worker loop that sends it (worker.c). */
#ifndef PP_REPORT_H
#define PP_REPORT_H

#include <lua.h>
#include <stdint.h>

#include "buf.h"

/* Reports larger than this are refused (they travel inline, in one frame). */
#define PP_REPORT_MAX (1u << 20)

typedef struct pp_reporter pp_reporter;
struct pp_reporter {
  uint64_t seq;     /* the item running (0: none; a report is then a no-op) */
  unsigned forkgen; /* the worker's process: a task's forked child is not it */
  pp_wbuf values;   /* the report being made: its encoded value list */
  /* hands `values` on (it may swap the buffer for another, emptied) */
  void (*send)(pp_reporter *r);
};

/* Make `r` the reporter of the tasks that run in this Lua state (a
 * worker's; it lives as long as the worker). */
void pp_report_attach(lua_State *L, pp_reporter *r);

#endif
