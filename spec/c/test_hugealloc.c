/* test_hugealloc.c: a worker's allocator with huge pages for large blocks,
 * through every way Lua allocates, grows, shrinks and frees a block. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

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

/* The kB figure of line `key` ("VmRSS: %ld kB") of a /proc file. */
static long proc_kb(const char *path, const char *key) {
  FILE *f = fopen(path, "r");
  char line[256];
  long kb = 0;
  while (f && fgets(line, sizeof line, f))
    if (sscanf(line, key, &kb) == 1) break;
  if (f) fclose(f);
  return kb;
}

/* the process's memory in huge pages, and all it holds */
static long huge_kb(void) { return proc_kb("/proc/self/smaps_rollup", "AnonHugePages: %ld kB"); }
static long rss_kb(void) { return proc_kb("/proc/self/status", "VmRSS: %ld kB"); }

static int thp_never(void) {
  FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  char line[128] = "[never]";
  if (f) {
    if (!fgets(line, sizeof line, f)) strcpy(line, "[never]");
    fclose(f);
  }
  return strstr(line, "[never]") != NULL;
}

/* A base allocator that can be told to refuse new memory. */
static int refuse;
static void *base_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud;
  (void)osize;
  if (!nsize) {
    free(ptr);
    return NULL;
  }
  if (refuse) return NULL;
  return realloc(ptr, nsize);
}

/* What a memory limit does: another allocator around the current one. */
typedef struct outer {
  lua_Alloc inner;
  void *inner_ud;
  long calls;
} outer;
static void *outer_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  outer *o = ud;
  o->calls++;
  return o->inner(o->inner_ud, ptr, osize, nsize);
}

/* fn() in a fresh process (the allocator keeps one state per process):
 * whether it returned true. */
static int in_child(int (*fn)(void)) {
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    int ok = fn();
    fflush(stdout);
    _exit(ok ? 0 : 1);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

#define EXPECT(cond)                                                                               \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      printf("# %s:%d: %s\n", __FILE__, __LINE__, #cond);                                          \
      fflush(stdout);                                                                              \
      return 0;                                                                                    \
    }                                                                                              \
  } while (0)

static int refused_shrink(void) {
  lua_State *L = lua_newstate(base_alloc, NULL);
  pp_hugealloc_install(L);
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  size_t mib = (size_t)1 << 20;
  char *p = f(ud, NULL, LUA_TSTRING, 6 * mib);
  EXPECT(p);
  memset(p, 'c', 6 * mib);
  refuse = 1;
  char *q = f(ud, p, 6 * mib, 100); /* the base allocator refuses: it must not fail */
  refuse = 0;
  EXPECT(q == p && q[99] == 'c');
  char *r = f(ud, q, 100, 200); /* looked up though Lua now takes it for small */
  EXPECT(r && r[99] == 'c');
  f(ud, r, 200, 0); /* freed as the mapping it is (else free() aborts) */
  lua_close(L);
  return 1;
}

/* A Lua state with its libraries and the allocator. */
static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  pp_hugealloc_install(L);
  return L;
}

static int under_a_limit(void) {
  lua_State *L = new_state();
  outer o = {NULL, NULL, 0};
  o.inner = lua_getallocf(L, &o.inner_ud);
  lua_setallocf(L, outer_alloc, &o);
  pp_hugealloc_install(L); /* a worker forked from this one: no second layer */
  void *ud;
  EXPECT(lua_getallocf(L, &ud) == outer_alloc);
  EXPECT(run(L, "return #('z'):rep(8 << 20) == 8 << 20"));
  EXPECT(o.calls > 0);
  lua_close(L);
  return 1;
}

static int given_back(void) {
  lua_State *L = new_state();
  long before = rss_kb();
  EXPECT(run(L, "big = ('q'):rep(64 << 20) return true"));
  long held = rss_kb() - before;
  EXPECT(run(L, "big = nil collectgarbage() collectgarbage() return true"));
  long left = rss_kb() - before;
  printf("# 64 MiB string: %ld kB held, %ld kB left after it is freed\n", held, left);
  EXPECT(held >= 60 * 1024 && left < 8 * 1024);
  lua_close(L);
  return 1;
}

int main(void) {
  CHECK(in_child(refused_shrink), "a shrink the base allocator refuses keeps the block, "
                                  "which is then looked up, grown and freed as a mapping");
  CHECK(in_child(under_a_limit), "installed again under another allocator (a memory limit), "
                                 "it adds no layer and large blocks still work");
  CHECK(in_child(given_back), "a freed large block's memory goes back to the system");
  lua_State *L = new_state();
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
        "freed blocks are freed");
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
