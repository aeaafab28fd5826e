/* udata.h: userdata type checks without a string lookup per call. */
#ifndef PP_UDATA_H
#define PP_UDATA_H

#include <lauxlib.h>
#include <lua.h>

/*
 * luaL_checkudata finds the metatable by its name: a string lookup (and
 * a strcmp in Lua's string cache) on every method call, a tenth of a
 * tiny task's cost in the caller. The metatables are also kept in the
 * registry under the address of a static C object, `key`, and compared
 * with lua_rawequal. Errors still go through luaL_checkudata, for its
 * message.
 */

/* Keep the metatable on top of the stack under `key` too (left there). */
static inline void pp_udata_register(lua_State *L, const void *key) {
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, key);
}

/* Give the value on top the metatable kept under `key`. */
static inline void pp_udata_setmt(lua_State *L, const void *key) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, key);
  lua_setmetatable(L, -2);
}

/* The userdata at idx if its metatable is the one under `key`, else NULL. */
static inline void *pp_udata_test(lua_State *L, int idx, const void *key) {
  void *p = lua_touserdata(L, idx);
  if (!p || !lua_getmetatable(L, idx)) return NULL;
  lua_rawgetp(L, LUA_REGISTRYINDEX, key);
  int same = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return same ? p : NULL;
}

/* As pp_udata_test, raising luaL_checkudata's error when it is not. */
static inline void *pp_udata_check(lua_State *L, int idx, const void *key, const char *name) {
  void *p = pp_udata_test(L, idx, key);
  return p ? p : luaL_checkudata(L, idx, name);
}

#endif
