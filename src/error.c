/* error.c: procpool's error objects: tables {name=, message=, ...} with
 * the shared "procpool.Error" metatable, raised by every part. */
#include <stdarg.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "error.h"
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

int pp_is_interrupt(lua_State *L, int idx) {
  static const char word[] = "interrupted!";
  const size_t wn = sizeof word - 1;
  if (lua_type(L, idx) != LUA_TSTRING) return 0;
  size_t n;
  const char *s = lua_tolstring(L, idx, &n);
  if (n < wn || memcmp(s + n - wn, word, wn) != 0) return 0;
  /* the whole message, or after luaL_where's "source:line: " */
  return n == wn || (n >= wn + 2 && s[n - wn - 1] == ' ' && s[n - wn - 2] == ':');
}

void pp_interrupt_raise(lua_State *L) {
  lua_pushliteral(L, "interrupted!");
  lua_error(L);
  for (;;) {
  } /* not reached: lua_error does not return */
}

/* is_interrupt(e) -> whether e is Ctrl-C's error (pp_is_interrupt) */
static int l_is_interrupt(lua_State *L) {
  lua_pushboolean(L, pp_is_interrupt(L, 1));
  return 1;
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

/* Adds error, is_error and is_interrupt to the module table on top of the stack. */
void pp_error_open(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"error", l_error}, {"is_error", l_is_error}, {"is_interrupt", l_is_interrupt}, {NULL, NULL}};
  if (luaL_newmetatable(L, ERROR_MT)) {
    lua_pushcfunction(L, err_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, err_serialize);
    lua_setfield(L, -2, "__serialize");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, fns, 0);
}
