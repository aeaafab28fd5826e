/* bccheck.c: the structure check of function bytecode before lua_load. */
#include "bccheck.h"

#include <limits.h>
#include <stdint.h>
#include <string.h>

#include <lua.h>

/*
 * Before lua_load sees a function's bytecode, walk the Lua 5.4 dump format
 * and check every count against the bytes that remain. lua_load allocates
 * from declared sizes before reading, and Lua 5.4.4's loader writes
 * upvalue names past their array when the counts disagree (fixed in 5.4.6),
 * so unchecked input could exhaust memory or corrupt the heap. This checks
 * structure only: bytecode that passes can still misbehave when *run*,
 * which is why data from an untrusted peer must never be deserialized.
 */
#if LUA_VERSION_NUM != 504
#error "the bytecode check follows the Lua 5.4 dump format"
#endif

typedef struct {
  const unsigned char *p, *e;
} bcr;

static size_t bc_left(const bcr *r) { return (size_t)(r->e - r->p); }

static int bc_skip(bcr *r, size_t n) {
  if (bc_left(r) < n) return 0;
  r->p += n;
  return 1;
}

static int bc_size(bcr *r, size_t limit, size_t *v) {
  size_t x = 0;
  unsigned b;
  do {
    if (r->p >= r->e || x >= (limit >> 7)) return 0;
    b = *r->p++;
    x = (x << 7) | (b & 0x7f);
  } while (!(b & 0x80));
  *v = x;
  return 1;
}

static int bc_int(bcr *r, size_t *v) { return bc_size(r, (size_t)INT_MAX, v); }

static int bc_string(bcr *r) {
  size_t n;
  if (!bc_size(r, SIZE_MAX, &n)) return 0;
  return n == 0 || bc_skip(r, n - 1);
}

/* counts: n elements of at least `min` bytes each must fit */
static int bc_count(bcr *r, size_t min, size_t *n) {
  return bc_int(r, n) && *n <= bc_left(r) / min;
}

static int bc_function(bcr *r, int depth, size_t *nupsp) {
  size_t n, i, nups, x;
  if (depth > 200) return 0; /* Lua's parser nests no deeper */
  if (!bc_string(r) || !bc_int(r, &x) || !bc_int(r, &x) || !bc_skip(r, 3)) return 0;
  if (!bc_count(r, 4, &n) || !bc_skip(r, n * 4)) return 0; /* code */
  if (!bc_count(r, 1, &n)) return 0;                       /* constants */
  for (i = 0; i < n; i++) {
    if (r->p >= r->e) return 0;
    switch (*r->p++) {
    case 0:  /* nil */
    case 1:  /* false */
    case 17: /* true */
      break;
    case 3:  /* integer */
    case 19: /* float */
      if (!bc_skip(r, 8)) return 0;
      break;
    case 4:  /* short string */
    case 20: /* long string */
      if (!bc_string(r)) return 0;
      break;
    default:
      return 0;
    }
  }
  if (!bc_count(r, 3, &nups) || !bc_skip(r, nups * 3)) return 0; /* upvalues */
  if (!bc_count(r, 1, &n)) return 0;                             /* protos */
  for (i = 0; i < n; i++)
    if (!bc_function(r, depth + 1, &x)) return 0;
  if (!bc_count(r, 1, &n) || !bc_skip(r, n)) return 0; /* line info */
  if (!bc_count(r, 2, &n)) return 0;                   /* absolute line info */
  for (i = 0; i < n; i++)
    if (!bc_int(r, &x) || !bc_int(r, &x)) return 0;
  if (!bc_count(r, 3, &n)) return 0; /* local variables */
  for (i = 0; i < n; i++)
    if (!bc_string(r) || !bc_int(r, &x) || !bc_int(r, &x)) return 0;
  if (!bc_count(r, 1, &n) || (n != 0 && n != nups)) return 0; /* upvalue names */
  for (i = 0; i < n; i++)
    if (!bc_string(r)) return 0;
  *nupsp = nups;
  return 1;
}

/* The header lua_dump writes on this platform. */
static size_t bc_header(unsigned char *h) {
  size_t n = 0;
  lua_Integer i = 0x5678;
  lua_Number f = 370.5;
  memcpy(h, LUA_SIGNATURE, 4);
  n = 4;
  h[n++] = 0x54; /* version */
  h[n++] = 0;    /* format */
  memcpy(h + n, "\x19\x93\r\n\x1a\n", 6);
  n += 6;
  h[n++] = 4; /* sizeof(Instruction) */
  h[n++] = (unsigned char)sizeof(lua_Integer);
  h[n++] = (unsigned char)sizeof(lua_Number);
  memcpy(h + n, &i, sizeof i);
  n += sizeof i;
  memcpy(h + n, &f, sizeof f);
  n += sizeof f;
  return n;
}

int pp_bytecode_ok(const char *s, size_t len) {
  unsigned char h[64];
  size_t hn = bc_header(h), nups;
  bcr r = {(const unsigned char *)s, (const unsigned char *)s + len};
  if (len < hn + 1 || memcmp(s, h, hn) != 0) return 0;
  r.p += hn;
  unsigned closure_nups = *r.p++;
  return bc_function(&r, 0, &nups) && nups == closure_nups && r.p == r.e;
}
