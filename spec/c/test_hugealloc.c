/* test_hugealloc.c: a worker's allocator with huge pages for large blocks,
 * through every way Lua allocates, grows, shrinks and frees a block. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <string.h>

#include "ctest.h"
#include "hugealloc.h"

/* Run chunk; its one result, a boolean, is the check. */
static int run(lua_State *L, const char *chunk) {
  if (luaL_dostring(L, chunk) != LUA_OK) {
    printf("# %s\n", lua_tostring(L, -1));
    lua_settop(L, 0);
    return 0;
  }
  int ok = lua_toboolean(L, -1);
  lua_settop(L, 0);
  return ok;
}

/* the process's memory in huge pages, in kB */
static long huge_kb(void) {
  FILE *f = fopen("/proc/self/smaps_rollup", "r");
  char line[256];
  long kb = 0;
  while (f && fgets(line, sizeof line, f))
    if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
  if (f) fclose(f);
  return kb;
}

static int thp_never(void) {
  FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  char line[128] = "[never]";
  if (f) {
    if (!fgets(line, sizeof line, f)) strcpy(line, "[never]");
    fclose(f);
  }
  return strstr(line, "[never]") != NULL;
}

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  pp_hugealloc_install(L);
  pp_hugealloc_install(L); /* a second time (a fork of a worker): no second layer */
  CHECK(run(L, "return ('x'):rep(16 << 20):sub(-3) == 'xxx'"), "a large new string");
  long before = huge_kb();
  CHECK(run(L, "big = ('<%d>'):format(7):rep(4 << 20) return #big == 12 << 20"),
        "a large string kept");
  long gained = huge_kb() - before;
  CHECK(thp_never() ? gained == 0 : gained >= 8192,
        "it is in huge pages (unless the system says never)");
  CHECK(run(L, "return big:sub(1, 6) == '<7><7>' and big:sub(-3) == '<7>'"),
        "its bytes are intact");
  /* a buffer box grows through the threshold (base -> ours) and on (mremap) */
  CHECK(run(L, "local t = {} for i = 1, 6000 do t[i] = string.char(65 + i % 26):rep(4096) end "
               "local s = table.concat(t) return #s == 6000 * 4096 and s:sub(-4096) == "
               "string.char(65 + 6000 % 26):rep(4096) and s:sub(1, 1) == 'B'"),
        "a buffer grown past the threshold and beyond keeps its bytes");
  /* a large new table array, shrunk small by a rehash, then dropped */
  CHECK(run(L, "local t = table.pack(table.unpack({}, 1, 300000)) for i = 1, 10 do t[i] = i end "
               "for i = 11, 300000 do t[i] = nil end for k = 1, 64 do t['k' .. k] = k end "
               "local s = 0 for i = 1, 10 do s = s + t[i] end return s == 55 and t.k64 == 64"),
        "a large array shrunk to a small one keeps its first values");
  CHECK(run(L, "big = nil collectgarbage() collectgarbage() return collectgarbage('count') < 4096"),
        "freed blocks are given back");
  /* a large block grown and shrunk in place of its own (mremap) */
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  size_t mib = (size_t)1 << 20;
  char *p = f(ud, NULL, LUA_TSTRING, 5 * mib);
  int ok = p != NULL;
  if (ok) memset(p, 'a', 5 * mib);
  if (ok) p = f(ud, p, 5 * mib, 9 * mib);
  ok = ok && p && p[0] == 'a' && p[5 * mib - 1] == 'a';
  if (ok) memset(p + 5 * mib, 'b', 4 * mib);
  if (ok) p = f(ud, p, 9 * mib, 6 * mib);
  ok = ok && p && p[5 * mib - 1] == 'a' && p[5 * mib] == 'b' && p[6 * mib - 1] == 'b';
  CHECK(ok, "a large block grows and shrinks with its bytes");
  if (ok) p = f(ud, p, 6 * mib, 64);
  CHECK(p && p[0] == 'a' && p[63] == 'a', "and shrinks to a small one");
  if (p) f(ud, p, 64, 0);
  luaL_checkstack(L, 600, "the blocks");
  for (int i = 0; i < 300; i++) /* past the table of large blocks: the base allocator's */
    lua_pushlstring(L, "", 0), lua_newuserdatauv(L, 4 << 20, 0);
  CHECK(lua_gettop(L) == 600, "more large blocks at once than it tracks");
  lua_settop(L, 0);
  CHECK(run(L, "collectgarbage() return collectgarbage('count') < 4096"), "all of them freed");
  lua_close(L);
  return CTEST_DONE();
}
