/* report.c: core.report: encode a task's progress report and hand it to
 * the worker that runs the task; a no-op anywhere else. */
#include "report.h"

#include <lauxlib.h>

#include "codec.h"
#include "engine.h"
#include "error.h"
#include "pp.h"

/* registry key (its address) of the worker's reporter, a light userdata */
static const char reporter_key = 0;

void pp_report_attach(lua_State *L, pp_reporter *r) {
  lua_pushlightuserdata(L, r);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &reporter_key);
}

/* report(...): outside a task (the parent, an initializer, between
 * items, a process the task forked) nothing happens. The values follow
 * the rules of results; one that cannot be sent raises here, in the
 * task. */
static int l_report(lua_State *L) {
  int n = lua_gettop(L);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &reporter_key);
  pp_reporter *r = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (!r || !r->seq || r->forkgen != pp_fork_generation()) return 0;
  r->values.n = 0;
  size_t m = 0;
  /* one scalar (a fraction, a count) skips the general encoder */
  if (n == 1 && pp_wbuf_reserve(&r->values, 80) == 0)
    m = pp_encode_scalar(L, 1, lua_type(L, 1), (unsigned char *)r->values.p);
  if (m)
    r->values.n = m;
  else
    pp_encode(L, 1, n, &r->values, 0, "report", 0);
  if (r->values.n > PP_REPORT_MAX) {
    size_t len = r->values.n;
    r->values.n = 0;
    pp_error_raise(L, "SerializationError", "the report is too large (%I bytes; at most %d)",
                   (lua_Integer)len, (int)PP_REPORT_MAX);
  }
  r->send(r);
  return 0;
}

void pp_report_open(lua_State *L) {
  lua_pushcfunction(L, l_report);
  lua_setfield(L, -2, "report");
}
