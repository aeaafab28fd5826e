/* sys.c: the small OS calls the Lua layer and the command line use:
 * clocks, sleeping, fds (open, read, poll, close), isatty, table_new. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "pp.h"

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
/* rlimit_nofile() -> soft, hard (math.huge for unlimited): what the
 * `limits.nofile` option is checked against */
static int l_rlimit_nofile(lua_State *L) {
  struct rlimit r;
  if (getrlimit(RLIMIT_NOFILE, &r) != 0) return luaL_fileresult(L, 0, NULL);
  for (int i = 0; i < 2; i++) {
    rlim_t v = i ? r.rlim_max : r.rlim_cur;
    if (v == RLIM_INFINITY)
      lua_pushnumber(L, HUGE_VAL);
    else
      lua_pushinteger(L, (lua_Integer)v);
  }
  return 2;
}

static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)) == 1);
  return 1;
}

/* Adds the calls to the module table on top of the stack. */
void pp_sys_open(lua_State *L) {
  static const luaL_Reg fns[] = {{"monotonic", l_monotonic},
                                 {"sleep", l_sleep},
                                 {"isatty", l_isatty},
                                 {"table_new", l_table_new},
                                 {"open", l_open},
                                 {"read", l_read},
                                 {"poll", l_poll},
                                 {"close", l_close},
                                 {"rlimit_nofile", l_rlimit_nofile},
                                 {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
}
