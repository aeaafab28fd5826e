/* procpool.c: luaopen_procpool_core: opens the parts, in order, into the
 * module table. */
#define _GNU_SOURCE
#include <dlfcn.h>

#include <lauxlib.h>
#include <lua.h>

#include "pp.h"

__attribute__((visibility("default"))) int luaopen_procpool_core(lua_State *L);

int luaopen_procpool_core(lua_State *L) {
  luaL_checkversion(L);
  /* Pin this library: engines run an I/O thread inside it that may
   * outlive the lua_State (an executor dropped with wait = false), and a
   * pthread_atfork handler lives here; neither may be unmapped by the
   * dlclose in lua_close. */
  Dl_info info;
  if (dladdr((void *)luaopen_procpool_core, &info) && info.dli_fname)
    (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  lua_newtable(L);
  pp_error_open(L);
  pp_sys_open(L);
  pp_codec_open(L);
  pp_future_open(L);
  pp_progress_cb_open(L);
  pp_wait_open(L);
  pp_cursor_open(L);
  pp_engine_open(L);
  pp_report_open(L);
  return 1;
}
