/* procpool.c: luaopen_procpool_core, error objects, and the module table. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "pp.h"

#define ERROR_MT "procpool.Error"

void pp_error_push(lua_State *L, const char *name, const char *msg) {
  lua_createtable(L, 0, 4);
  lua_pushstring(L, name);
  lua_setfield(L, -2, "name");
  lua_pushstring(L, msg);
  lua_setfield(L, -2, "message");
  luaL_setmetatable(L, ERROR_MT);
}

void pp_error_raise(lua_State *L, const char *name, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  const char *msg = lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  pp_error_push(L, name, msg);
  lua_error(L);
  for (;;) {
  } /* not reached: lua_error does not return */
}

/* error(name, message [, fields]) -> a new error object */
static int l_error(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  const char *msg = luaL_optstring(L, 2, "");
  pp_error_push(L, name, msg);
  if (lua_istable(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
    /* name and message win over fields of the same name */
    lua_pushstring(L, name);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, msg);
    lua_setfield(L, -2, "message");
  }
  return 1;
}

static int err_tostring(lua_State *L) {
  lua_getfield(L, 1, "name");
  lua_getfield(L, 1, "message");
  lua_pushfstring(L, "procpool.%s: %s", luaL_optstring(L, -2, "Error"), luaL_optstring(L, -1, ""));
  return 1;
}

/* Error objects cross process boundaries as error(name, message, fields). */
static int err_serialize(lua_State *L) {
  lua_pushliteral(L, "procpool.core:error");
  lua_getfield(L, 1, "name");
  lua_getfield(L, 1, "message");
  lua_newtable(L);
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, -4);
  }
  return 4;
}

/* is_error(e [, name]) */
static int l_is_error(lua_State *L) {
  int ok = 0;
  if (lua_getmetatable(L, 1)) {
    luaL_getmetatable(L, ERROR_MT);
    ok = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  if (ok && !lua_isnoneornil(L, 2)) {
    lua_getfield(L, 1, "name");
    ok = lua_rawequal(L, -1, 2);
    lua_pop(L, 1);
  }
  lua_pushboolean(L, ok);
  return 1;
}

/* monotonic() -> seconds (float) from CLOCK_MONOTONIC */
static int l_monotonic(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
  return 1;
}

/* sleep(seconds): blocks the calling thread */
static int l_sleep(lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  if (s > 0) {
    struct timespec ts;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (lua_Number)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
  }
  return 0;
}

/* open(path) -> fd, for reading (CLOEXEC); nil, message on failure */
static int l_open(lua_State *L) {
  int fd = open(luaL_checkstring(L, 1), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return luaL_fileresult(L, 0, lua_tostring(L, 1));
  lua_pushinteger(L, fd);
  return 1;
}

/* read(fd, max) -> what one read(2) gives when data is ready: a string,
 * "" if none is ready now (nothing waited for), nil at the end */
static int l_read(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  size_t max = (size_t)luaL_optinteger(L, 2, 65536);
  struct pollfd p = {fd, POLLIN, 0};
  int r;
  while ((r = poll(&p, 1, 0)) < 0 && errno == EINTR) {
  }
  if (r == 0) {
    lua_pushliteral(L, "");
    return 1;
  }
  luaL_Buffer b;
  char *buf = luaL_buffinitsize(L, &b, max);
  ssize_t n;
  while ((n = read(fd, buf, max)) < 0 && errno == EINTR) {
  }
  if (n < 0) {
    if (errno == EAGAIN) {
      lua_pushliteral(L, "");
      return 1;
    }
    return luaL_fileresult(L, 0, NULL);
  }
  if (n == 0) {
    lua_pushnil(L);
    return 1;
  }
  luaL_pushresultsize(&b, (size_t)n);
  return 1;
}

/* poll({fd, ...}, timeout) -> true once any fd is readable, false when
 * the timeout (seconds; nil: none) passes or a signal interrupts */
static int l_poll(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  struct pollfd p[16];
  int n = (int)lua_rawlen(L, 1);
  if (n > 16) n = 16;
  for (int i = 0; i < n; i++) {
    lua_rawgeti(L, 1, i + 1);
    p[i].fd = (int)lua_tointeger(L, -1);
    p[i].events = POLLIN;
    p[i].revents = 0;
    lua_pop(L, 1);
  }
  int ms = lua_isnoneornil(L, 2) ? -1 : (int)(luaL_checknumber(L, 2) * 1000);
  lua_pushboolean(L, poll(p, (nfds_t)n, ms) > 0);
  return 1;
}

/* close(fd) */
static int l_close(lua_State *L) {
  close((int)luaL_checkinteger(L, 1));
  return 0;
}

/* table_new(narr, nrec) -> a table with room for that many entries */
static int l_table_new(lua_State *L) {
  lua_createtable(L, (int)luaL_optinteger(L, 1, 0), (int)luaL_optinteger(L, 2, 0));
  return 1;
}

/* isatty(fd) -> boolean */
static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)) == 1);
  return 1;
}

__attribute__((visibility("default"))) int luaopen_procpool_core(lua_State *L);

int luaopen_procpool_core(lua_State *L) {
  static const luaL_Reg fns[] = {{"error", l_error},
                                 {"is_error", l_is_error},
                                 {"monotonic", l_monotonic},
                                 {"sleep", l_sleep},
                                 {"isatty", l_isatty},
                                 {"table_new", l_table_new},
                                 {"open", l_open},
                                 {"read", l_read},
                                 {"poll", l_poll},
                                 {"close", l_close},
                                 {NULL, NULL}};
  luaL_checkversion(L);
  if (luaL_newmetatable(L, ERROR_MT)) {
    lua_pushcfunction(L, err_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, err_serialize);
    lua_setfield(L, -2, "__serialize");
  }
  lua_pop(L, 1);
  /* Pin this library: engines run an I/O thread inside it that may
   * outlive the lua_State (an executor dropped with wait = false), and a
   * pthread_atfork handler lives here; neither may be unmapped by the
   * dlclose in lua_close. */
  Dl_info info;
  if (dladdr((void *)luaopen_procpool_core, &info) && info.dli_fname)
    (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  lua_newtable(L);
  luaL_setfuncs(L, fns, 0);
  pp_codec_open(L);
  pp_future_open(L);
  pp_engine_open(L);
  return 1;
}
