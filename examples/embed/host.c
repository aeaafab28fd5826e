/* host.c: a C program that hosts Lua and runs procpool in it.
 *
 * It creates its own lua_State, registers a host function (host_scale),
 * requires procpool and runs a map whose tasks call that function in
 * worker processes (fork context: workers are copies of this host, so
 * its C functions are there). A second thread runs its own lua_State
 * with its own executor at the same time.
 *
 * Build: make -C examples/embed     (uses pkg-config lua5.4)
 * Run:   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' \
 *          examples/embed/host
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

/* The host's own C function, known to Lua as the global host_scale. */
static int host_scale(lua_State *L) {
  lua_Integer x = luaL_checkinteger(L, 1);
  lua_pushinteger(L, x * 1000 + 7);
  return 1;
}

static const char *main_script =
    "local procpool = require 'procpool'\n"
    "local ex <close> = procpool.ProcessPoolExecutor { max_workers = 2 }\n"
    "local out = {}\n"
    "for i, v in ex:map(function(x)\n"
    "  return host_scale(x), require('procpool').current_worker().pid\n"
    "end, { 1, 2, 3, 4 }) do out[i] = v end\n"
    "-- the function itself travels by name (_G.host_scale)\n"
    "local direct = ex:submit(host_scale, 9):result(10)\n"
    "return table.concat(out, ' ') .. ' | ' .. direct\n";

static const char *thread_script =
    "local procpool = require 'procpool'\n"
    "local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1 }\n"
    "local f = ex:submit(function(a, b) return a * b end, 6, 7)\n"
    "return 'second state: ' .. f:result(10)\n";

static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L); /* package.path/cpath come from LUA_PATH/LUA_CPATH */
  lua_register(L, "host_scale", host_scale);
  return L;
}

/* Run a chunk; on success leave its string result in *out (malloc'ed). */
static int run(lua_State *L, const char *code, const char *name, char **out) {
  if (luaL_loadbuffer(L, code, __builtin_strlen(code), name) != LUA_OK ||
      lua_pcall(L, 0, 1, 0) != LUA_OK) {
    fprintf(stderr, "%s: %s\n", name, lua_tostring(L, -1));
    return 1;
  }
  size_t n;
  const char *s = lua_tolstring(L, -1, &n);
  *out = malloc(n + 1);
  if (!*out) return 1;
  __builtin_memcpy(*out, s, n + 1);
  return 0;
}

static void *second(void *arg) {
  char **result = arg;
  lua_State *L = new_state();
  int rc = run(L, thread_script, "=second", result);
  lua_close(L);
  return rc ? (void *)1 : NULL;
}

int main(void) {
  char *r1 = NULL, *r2 = NULL;
  pthread_t th;
  if (pthread_create(&th, NULL, second, &r2) != 0) return 1;
  lua_State *L = new_state();
  int rc = run(L, main_script, "=main", &r1);
  lua_close(L); /* executors, zygotes and workers are gone by now */
  void *trc;
  pthread_join(th, &trc);
  if (rc || trc || !r1 || !r2) return 1;
  printf("main state: %s\n%s\n", r1, r2);
  free(r1);
  free(r2);
  return 0;
}
