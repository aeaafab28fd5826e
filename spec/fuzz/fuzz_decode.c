/* fuzz_decode.c: libFuzzer target for procpool.deserialize and the
 * decoder's fast path for one value (how the parent reads a worker's
 * results). */
#include <stddef.h>
#include <stdint.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "codec.h"

#ifndef PP_FUZZ_NO_FINALIZERS
#error "build with -DPP_FUZZ_NO_FINALIZERS"
#endif

int luaopen_procpool_core(lua_State *L);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lua_State *L;
static int runs;

/* A state where names in the input reach nothing but procpool.core: no
 * globals, no other modules, no require. Decoded functions are loaded but
 * never called (the codec is built with PP_FUZZ_NO_FINALIZERS so no __gc
 * can run them); bytecode is trusted by design, see the docs. */
static lua_State *new_state(void) {
  lua_State *S = luaL_newstate();
  luaL_requiref(S, "_G", luaopen_base, 1);
  luaL_requiref(S, "procpool.core", luaopen_procpool_core, 0);
  lua_settop(S, 0);
  lua_newtable(S); /* package.loaded = { ["procpool.core"] = core } */
  lua_getfield(S, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getfield(S, -1, "procpool.core");
  lua_setfield(S, 1, "procpool.core");
  lua_pop(S, 1);
  lua_setfield(S, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_newtable(S); /* empty globals */
  lua_rawseti(S, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  return S;
}

static void push_deserialize(lua_State *S) {
  lua_getfield(S, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getfield(S, -1, "procpool.core");
  lua_getfield(S, -1, "deserialize");
  lua_replace(S, -3);
  lua_pop(S, 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!L || ++runs % 5000 == 0) { /* fresh state now and then */
    if (L) lua_close(L);
    L = new_state();
  }
  push_deserialize(L);
  lua_pushlstring(L, (const char *)data, size);
  (void)lua_pcall(L, 1, LUA_MULTRET, 0);
  lua_settop(L, 0);
  size_t used = pp_decode_first(L, (const char *)data, size);
  if (used > size || (used == 0 && lua_gettop(L) != 0)) __builtin_trap();
  lua_settop(L, 0);
  /* the worker's check for a function it may keep: in bounds, and never
   * more upvalues than bytes */
  int nups = pp_decode_fn_globals((const char *)data, size);
  if (nups >= 0 && (size_t)nups + 4 > size) __builtin_trap();
  return 0;
}
