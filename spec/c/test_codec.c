/* test_codec.c: the codec and byte buffers, driven from C. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "buf.h"
#include "codec.h"
#include "ctest.h"

int luaopen_procpool_core(lua_State *L);

static void test_varint(void) {
  unsigned char b[16];
  uint64_t vals[] = {0, 1, 127, 128, 16383, 16384, UINT32_MAX, UINT64_MAX};
  int ok = 1;
  for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
    uint64_t v;
    size_t n = pp_varint_put(b, vals[i]);
    ok &= pp_varint_get(b, n, &v) == n && v == vals[i];
    ok &= pp_varint_get(b, n - 1, &v) == 0; /* truncated */
  }
  CHECK(ok, "varints round-trip and reject truncation");
  unsigned char overlong[] = {0x80, 0x00};
  uint64_t v;
  CHECK(pp_varint_get(overlong, 2, &v) == 0, "overlong varint rejected");
  unsigned char over[11];
  memset(over, 0xff, 10);
  over[9] = 0x02;
  CHECK(pp_varint_get(over, 10, &v) == 0, "64-bit overflow rejected");
}

static int encode_decode(lua_State *L) {
  pp_wbuf *b = lua_touserdata(L, lua_upvalueindex(1));
  int n = lua_gettop(L);
  pp_encode(L, 1, n, b, 0, "args", 0);
  size_t used;
  int m = pp_decode(L, b->p, b->n, &used, 0, 0);
  lua_pushinteger(L, (lua_Integer)used);
  return m + 1;
}

static void test_lists(lua_State *L) {
  pp_wbuf b = PP_WBUF_INIT;
  lua_pushlightuserdata(L, &b);
  lua_pushcclosure(L, encode_decode, 1);
  lua_pushinteger(L, 42);
  lua_pushnil(L);
  lua_pushstring(L, "hi");
  int rc = lua_pcall(L, 3, LUA_MULTRET, 0);
  CHECK(rc == LUA_OK, "encode+decode without header");
  CHECK(lua_gettop(L) == 4 && lua_tointeger(L, 1) == 42 && lua_isnil(L, 2) &&
            strcmp(lua_tostring(L, 3), "hi") == 0 && (size_t)lua_tointeger(L, 4) == b.n,
        "values and consumed length come back");
  lua_settop(L, 0);
  /* two lists back to back: `used` stops at the first */
  size_t first = b.n;
  lua_pushinteger(L, 7);
  pp_encode(L, 1, 1, &b, 0, "args", 0);
  lua_settop(L, 0);
  size_t used;
  int m = pp_decode(L, b.p, b.n, &used, 0, 0);
  CHECK(m == 3 && used == first, "decode stops at the end of one list");
  lua_settop(L, 0);
  pp_wbuf_free(&b);
}

static void test_memfd(void) {
  pp_wbuf b;
  pp_wbuf_init(&b, 4096);
  int ok = 1;
  for (int i = 0; i < 1000 && ok; i++) {
    ok = pp_wbuf_reserve(&b, 1024) == 0;
    memset(b.p + b.n, (char)i, 1024);
    b.n += 1024;
  }
  CHECK(ok && b.fd >= 0, "a buffer past its threshold moves into a memfd");
  CHECK(b.p[0] == 0 && b.p[1024 * 999] == (char)999, "contents survive the move and growth");
  int fd = dup(b.fd);
  size_t n = b.n;
  pp_blob *bl = pp_blob_from_wbuf(&b, 0);
  CHECK(bl && bl->mapped && bl->n == n && b.p == NULL, "a memfd buffer becomes a mapped blob");
  int err = 0;
  pp_blob *m = pp_blob_map(fd, n, 0, &err);
  CHECK(m && memcmp(m->p, bl->p, n) == 0, "the memfd maps read-only in another owner");
  pp_blob *bad = pp_blob_map(fd, n * 4, 0, &err);
  CHECK(bad == NULL && err == EPROTO, "a memfd shorter than announced is refused");
  pp_blob_unref(m);
  pp_blob_unref(bl);
  close(fd);
}

static ino_t inode(int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

static int is_open(int fd) { return fcntl(fd, F_GETFD) >= 0; }

/* A freed spare-able blob's memfd is the next large buffer's; none is
 * kept without a pool. */
static void test_spare(void) {
  pp_wbuf b;
  pp_wbuf_init(&b, 4096);
  pp_spare_users(1);
  int ok = pp_wbuf_reserve(&b, 1 << 20) == 0;
  memset(b.p, 'x', 1 << 20);
  b.n = 1 << 20;
  ino_t ino = inode(b.fd);
  int fd = dup(b.fd);
  pp_wbuf_free(&b);
  int err = 0;
  pp_blob *m = pp_blob_map(fd, 1 << 20, 1, &err);
  close(fd);
  CHECK(ok && m && m->p[12345] == 'x', "a received memfd maps with a copy of its fd kept");
  pp_blob_unref(m);
  pp_wbuf_init(&b, 4096);
  ok = pp_wbuf_reserve(&b, 1 << 19) == 0;
  CHECK(ok && b.fd >= 0 && inode(b.fd) == ino, "the next large buffer is written into it");
  CHECK(b.cap >= (size_t)1 << 20, "it keeps the spare's larger size");
  fd = dup(b.fd);
  pp_wbuf_free(&b);
  pp_spare_give(fd);
  pp_spare_users(-1);
  CHECK(!is_open(fd), "with no pool left the spare is closed");
  fd = memfd_create("t", MFD_CLOEXEC);
  CHECK(fd >= 0 && ftruncate(fd, 4096) == 0, "a memfd to give");
  pp_spare_give(fd);
  CHECK(!is_open(fd), "and none is kept");
  pp_spare_users(1);
  /* a forked child: the spare's fd number may be another file there now */
  fd = memfd_create("t", MFD_CLOEXEC);
  CHECK(fd >= 0 && ftruncate(fd, 1 << 20) == 0, "a memfd to keep");
  pp_spare_give(fd);
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    close(fd);
    int other = open("/dev/null", O_RDONLY);
    pp_wbuf c;
    pp_wbuf_init(&c, 4096);
    /* (the take finds its parent's pid in the slot) */
    int good = other == fd && pp_wbuf_reserve(&c, 1 << 19) == 0 && c.fd != other;
    _exit(good && is_open(other) ? 0 : 1);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0,
        "a forked child neither uses its parent's spare nor closes that fd number");
  CHECK(is_open(fd), "the parent still keeps it");
  pp_spare_forget();
  close(fd);
  fd = memfd_create("t", MFD_CLOEXEC);
  CHECK(fd >= 0 && ftruncate(fd, (off_t)PP_SPARE_MAX + 4096) == 0, "a large memfd");
  pp_spare_give(fd);
  CHECK(!is_open(fd), "a memfd past PP_SPARE_MAX is not kept");
  pp_spare_users(-1);
}

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "procpool.core", luaopen_procpool_core, 0);
  lua_settop(L, 0);
  test_varint();
  test_lists(L);
  test_memfd();
  test_spare();
  lua_close(L);
  return CTEST_DONE();
}
