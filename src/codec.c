/* codec.c: the value codec: Lua values <-> bytes (no I/O, no processes). */
#include "codec.h"
#include "error.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "pp.h"

#define INPROGRESS ((uint64_t)1 << 62)

/* ------------------------------------------------------------------ */
/* pointer -> u64 hash map (open addressing)                           */

typedef struct {
  const void *k;
  uint64_t v;
} pm_ent;

typedef struct {
  pm_ent *t;
  size_t mask, n;
} pmap;

static size_t pm_hash(const void *k) {
  uint64_t x = (uint64_t)(uintptr_t)k;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  return (size_t)x;
}

static int pm_get(const pmap *m, const void *k, uint64_t *v) {
  if (!m->n) return 0;
  for (size_t i = pm_hash(k) & m->mask;; i = (i + 1) & m->mask) {
    if (m->t[i].k == k) {
      *v = m->t[i].v;
      return 1;
    }
    if (!m->t[i].k) return 0;
  }
}

static int pm_put(pmap *m, const void *k, uint64_t v) {
  if (!m->t || (m->n + 1) * 4 > (m->mask + 1) * 3) {
    size_t cap = m->t ? (m->mask + 1) * 2 : 64;
    pm_ent *t = calloc(cap, sizeof *t);
    if (!t) return ENOMEM;
    for (size_t j = 0; m->t && j <= m->mask; j++) {
      if (!m->t[j].k) continue;
      size_t i = pm_hash(m->t[j].k) & (cap - 1);
      while (t[i].k) i = (i + 1) & (cap - 1);
      t[i] = m->t[j];
    }
    free(m->t);
    m->t = t;
    m->mask = cap - 1;
  }
  size_t i = pm_hash(k) & m->mask;
  while (m->t[i].k && m->t[i].k != k) i = (i + 1) & m->mask;
  if (!m->t[i].k) m->n++;
  m->t[i].k = k;
  m->t[i].v = v;
  return 0;
}

static void pm_clear(pmap *m) {
  if (!m->n) return;
  if (m->mask >= 4096) {
    free(m->t);
    m->t = NULL;
    m->mask = 0;
  } else {
    memset(m->t, 0, (m->mask + 1) * sizeof *m->t);
  }
  m->n = 0;
}

static void pm_free(pmap *m) {
  free(m->t);
  m->t = NULL;
  m->mask = m->n = 0;
}

/* ------------------------------------------------------------------ */
/* per-state context: name index, bytecode cache, reusable scratch      */

static const char CTX_KEY = 'c';

enum { UV_REVMAP = 1, UV_DUMPS, UV_ENC, UV_DEC, UV_SER, UV_N = UV_SER };

typedef struct {
  lua_Integer loaded_count; /* entries of package.loaded when indexed */
  int indexed;
} codec_ctx;

typedef struct {
  unsigned char kind, sub, arraymode, pure, has_mt;
  int idx;  /* stack index of the container / first value */
  int i, n; /* cursor and count (values, upvalues) */
  uint32_t narr, nhash;
  size_t off; /* offset of this object's tag */
  const void *self;
  const char *upname;
} eframe;

typedef struct pp_encoder {
  pp_wbuf *out;
  size_t base; /* offset of the list within out (REF offsets are relative) */
  pmap refs;   /* object -> tag offset (| INPROGRESS) */
  pmap ups;    /* upvalue id -> func tag offset << 8 | index */
  eframe *fr;
  int nfr, capfr;
  pp_wbuf scratch; /* lua_dump output */
  const void *globals;
  const char *root;
  int busy;
  int revidx, dumpidx, ctxidx;
  int loaded_checked, rebuilt;
  /* gather mode: large strings are referenced, not copied; each gap is
   * recorded as (buffer position, cumulative skipped bytes) */
  int gatheridx, ngaps, capgaps;
  size_t *gaps;
} pp_encoder;

#define GATHER_MIN (32u << 10)
#define GATHER_MAX_GAPS 4096

enum { EF_TOP, EF_TABLE, EF_FUNC, EF_CUSTOM };
enum { S_START, S_KEY, S_VALUE, S_MT, S_KEYVAL };

typedef struct {
  unsigned char kind, sub, mt, cache;
  int idx;
  uint64_t a, b;
  lua_Integer ai;
} dframe;

typedef struct pp_decoder {
  const unsigned char *s, *p, *e;
  dframe *fr;
  int nfr, capfr;
  int refsidx;
  int busy;
  int fncache;
} pp_decoder;

static int enc_gc(lua_State *L) {
  pp_encoder *E = lua_touserdata(L, 1);
  pm_free(&E->refs);
  pm_free(&E->ups);
  free(E->fr);
  E->fr = NULL;
  free(E->gaps);
  E->gaps = NULL;
  pp_wbuf_free(&E->scratch);
  return 0;
}

static int dec_gc(lua_State *L) {
  pp_decoder *D = lua_touserdata(L, 1);
  free(D->fr);
  D->fr = NULL;
  return 0;
}

static int wbuf_gc(lua_State *L) {
  pp_wbuf *b = lua_touserdata(L, 1);
  pp_wbuf_free(b);
  return 0;
}

static codec_ctx *get_ctx(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &CTX_KEY);
  return lua_touserdata(L, -1);
}

/* Push a cached scratch object of context slot `uv` (creating it if it is
 * absent or in use). `busy` points at its in-use flag. */
static void *ctx_scratch(lua_State *L, int ctxidx, int uv, size_t size, const char *mt,
                         int **busy) {
  lua_getiuservalue(L, ctxidx, uv);
  void *o = lua_touserdata(L, -1);
  int *b = o ? (int *)((char *)o + (uv == UV_ENC   ? offsetof(pp_encoder, busy)
                                    : uv == UV_DEC ? offsetof(pp_decoder, busy)
                                                   : sizeof(pp_wbuf)))
             : NULL;
  if (o && !*b) {
    *busy = b;
    return o;
  }
  /* absent, or busy because of a reentrant call (or an earlier call that
   * was interrupted by an error): make a fresh one and cache that. */
  lua_pop(L, 1);
  o = lua_newuserdatauv(L, size, 0);
  memset(o, 0, size);
  if (uv == UV_ENC)
    pp_wbuf_init(&((pp_encoder *)o)->scratch, 0);
  else if (uv == UV_SER)
    pp_wbuf_init((pp_wbuf *)o, 0);
  luaL_setmetatable(L, mt);
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, ctxidx, uv);
  b = (int *)((char *)o + (uv == UV_ENC   ? offsetof(pp_encoder, busy)
                           : uv == UV_DEC ? offsetof(pp_decoder, busy)
                                          : sizeof(pp_wbuf)));
  *busy = b;
  return o;
}

/* ------------------------------------------------------------------ */
/* name index: values reachable from package.loaded                     */

static void push_loaded(lua_State *L) { luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE); }

static lua_Integer count_loaded(lua_State *L) {
  lua_Integer n = 0;
  push_loaded(L);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    n++;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return n;
}

static size_t put_name_str(unsigned char *p, const char *s, size_t len) {
  pp_scalar v = {.type = LUA_TSTRING, .len = len};
  size_t n = pp_scalar_put(p, &v);
  memcpy(p + n, s, len);
  return n + len;
}

/* Candidate name for value at -1: keep the existing one unless the new
 * module name is shorter (or equal and smaller), so the choice does not
 * depend on table traversal order. */
static void index_add(lua_State *L, int rev, const char *mod, size_t mlen, const char *key,
                      size_t klen) {
  unsigned char stackbuf[600];
  if (mlen > 255 || klen > 255) return;
  lua_pushvalue(L, -1);
  lua_rawget(L, rev);
  if (lua_type(L, -1) == LUA_TSTRING) {
    size_t olen;
    const unsigned char *o = (const unsigned char *)lua_tolstring(L, -1, &olen);
    /* existing: tag, then the module string (fixstr or str8) */
    size_t om = (o[1] & 0xc0) == PP_T_FIXSTR ? (size_t)(o[1] & 0x3f) : o[2];
    const char *os = (const char *)o + ((o[1] & 0xc0) == PP_T_FIXSTR ? 2 : 3);
    int better = mlen < om || (mlen == om && memcmp(mod, os, mlen) < 0);
    if (!better) {
      lua_pop(L, 1);
      return;
    }
  }
  lua_pop(L, 1);
  size_t n = 0;
  stackbuf[n++] = key ? PP_T_CFUNC : PP_T_MODULE;
  n += put_name_str(stackbuf + n, mod, mlen);
  if (key) n += put_name_str(stackbuf + n, key, klen);
  lua_pushvalue(L, -1);
  lua_pushlstring(L, (const char *)stackbuf, n);
  lua_rawset(L, rev);
}

/* Rebuild the index into a fresh table stored in the context. */
static void index_build(lua_State *L, pp_encoder *E) {
  codec_ctx *ctx = lua_touserdata(L, E->ctxidx);
  lua_newtable(L);
  int rev = lua_gettop(L);
  lua_Integer count = 0;
  push_loaded(L);
  int loaded = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, loaded)) {
    count++;
    if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TTABLE) {
      size_t mlen;
      const char *mod = lua_tolstring(L, -2, &mlen);
      index_add(L, rev, mod, mlen, NULL, 0);
      int m = lua_gettop(L);
      lua_pushnil(L);
      while (lua_next(L, m)) {
        if (lua_type(L, -2) == LUA_TSTRING &&
            (lua_iscfunction(L, -1) || lua_islightuserdata(L, -1))) {
          size_t klen;
          const char *key = lua_tolstring(L, -2, &klen);
          index_add(L, rev, mod, mlen, key, klen);
        }
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1); /* loaded */
  ctx->loaded_count = count;
  ctx->indexed = 1;
  lua_pushvalue(L, rev);
  lua_setiuservalue(L, E->ctxidx, UV_REVMAP);
  lua_replace(L, E->revidx);
  lua_settop(L, rev - 1);
}

static const unsigned char *get_name_str(const unsigned char *p, const unsigned char *e,
                                         const char **s, size_t *len) {
  pp_scalar v;
  if (p >= e || !pp_scalar_get(p, e, &v) || v.type != LUA_TSTRING) return NULL;
  *s = v.s;
  *len = (size_t)v.len;
  return (const unsigned char *)v.s + v.len;
}

/* Does the indexed name `enc` still resolve to the value at `vidx`? */
static int index_verify(lua_State *L, const unsigned char *enc, size_t len, int vidx) {
  const unsigned char *e = enc + len, *p = enc + 1;
  const char *mod, *key;
  size_t mlen, klen;
  int ok = 0;
  p = get_name_str(p, e, &mod, &mlen);
  if (!p) return 0;
  push_loaded(L);
  lua_pushlstring(L, mod, mlen);
  lua_rawget(L, -2);
  if (enc[0] == PP_T_CFUNC) {
    if (get_name_str(p, e, &key, &klen) && lua_type(L, -1) == LUA_TTABLE) {
      lua_pushlstring(L, key, klen);
      lua_rawget(L, -2);
      ok = lua_rawequal(L, -1, vidx);
      lua_pop(L, 1);
    }
  } else {
    ok = lua_rawequal(L, -1, vidx);
  }
  lua_pop(L, 2);
  return ok;
}

static void enc_fail(lua_State *L, pp_encoder *E, const char *fmt, ...);
static unsigned char *w_res(lua_State *L, pp_encoder *E, size_t k);

/* If the value at the top is reachable by name, write its name and
 * return 1. `must`: a C function, which can only go by name, so a miss
 * forces a rebuild of the index. */
static int enc_named(lua_State *L, pp_encoder *E, int must) {
  int v = lua_gettop(L);
  if (!((codec_ctx *)lua_touserdata(L, E->ctxidx))->indexed) index_build(L, E);
  for (int attempt = 0; attempt < 2; attempt++) {
    lua_pushvalue(L, v);
    lua_rawget(L, E->revidx);
    if (lua_type(L, -1) == LUA_TSTRING) {
      size_t len;
      const unsigned char *enc = (const unsigned char *)lua_tolstring(L, -1, &len);
      if (index_verify(L, enc, len, v)) {
        memcpy(w_res(L, E, len), enc, len);
        E->out->n += len;
        lua_pop(L, 1);
        return 1;
      }
    }
    lua_pop(L, 1);
    if (attempt) break;
    codec_ctx *ctx = lua_touserdata(L, E->ctxidx);
    if (must) {
      if (E->rebuilt) break;
    } else {
      if (E->loaded_checked) break;
      E->loaded_checked = 1;
      if (count_loaded(L) == ctx->loaded_count) break;
    }
    E->rebuilt = 1;
    index_build(L, E);
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* encoder                                                              */

static unsigned char *w_res(lua_State *L, pp_encoder *E, size_t k) {
  if (pp_wbuf_reserve(E->out, k) != 0) {
    E->busy = 0;
    luaL_error(L, "procpool: not enough memory to serialize");
  }
  return (unsigned char *)E->out->p + E->out->n;
}

static void w_byte(lua_State *L, pp_encoder *E, unsigned char c) {
  *w_res(L, E, 1) = c;
  E->out->n++;
}

static void w_varint(lua_State *L, pp_encoder *E, uint64_t v) {
  E->out->n += pp_varint_put(w_res(L, E, 10), v);
}

static void w_int(lua_State *L, pp_encoder *E, lua_Integer i) {
  pp_scalar v = {.type = LUA_TNUMBER, .isint = 1, .i = i};
  E->out->n += pp_scalar_put(w_res(L, E, PP_SCALAR_MAX), &v);
}

static void w_float(lua_State *L, pp_encoder *E, lua_Number d) {
  pp_scalar v = {.type = LUA_TNUMBER, .d = (double)d};
  E->out->n += pp_scalar_put(w_res(L, E, PP_SCALAR_MAX), &v);
}

static void w_str(lua_State *L, pp_encoder *E, const char *s, size_t len) {
  pp_scalar v = {.type = LUA_TSTRING, .len = len};
  size_t n = pp_scalar_put(w_res(L, E, len + PP_SCALAR_MAX), &v);
  if (E->gatheridx && len >= GATHER_MIN && E->ngaps < GATHER_MAX_GAPS) {
    /* keep the string (at the top of the stack) instead of its bytes */
    E->out->n += n;
    if (E->ngaps == E->capgaps) {
      int cap = E->capgaps ? E->capgaps * 2 : 16;
      size_t *g = realloc(E->gaps, (size_t)cap * 2 * sizeof *g);
      if (!g) enc_fail(L, E, "not enough memory");
      E->gaps = g;
      E->capgaps = cap;
    }
    size_t cum = (E->ngaps ? E->gaps[2 * E->ngaps - 1] : 0) + len;
    E->gaps[2 * E->ngaps] = E->out->n;
    E->gaps[2 * E->ngaps + 1] = cum;
    E->ngaps++;
    lua_pushinteger(L, (lua_Integer)E->out->n);
    lua_rawseti(L, E->gatheridx, 2 * E->ngaps - 1);
    lua_pushvalue(L, -1);
    lua_rawseti(L, E->gatheridx, 2 * E->ngaps);
    return;
  }
  int err = pp_wbuf_put_at(E->out, E->out->n + n, s, len);
  if (err) enc_fail(L, E, "cannot write the string: %s", strerror(err));
  E->out->n += n + len;
}

/* The offset a decoder sees for buffer position `pos`: relative to the
 * list, plus the bytes of gathered strings before it. */
static uint64_t logical(const pp_encoder *E, size_t pos) {
  size_t skipped = 0;
  int lo = 0, hi = E->ngaps;
  while (lo < hi) { /* last gap at or before pos */
    int mid = (lo + hi) / 2;
    if (E->gaps[2 * mid] <= pos) {
      skipped = E->gaps[2 * mid + 1];
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return (uint64_t)(pos - E->base + skipped);
}

static void w_ref(lua_State *L, pp_encoder *E, size_t pos) {
  E->out->p[pos] |= PP_T_REFD; /* the target is shared */
  w_byte(L, E, PP_T_REF);
  w_varint(L, E, logical(E, pos));
}

static eframe *push_eframe(lua_State *L, pp_encoder *E, int kind) {
  if (E->nfr >= PP_CODEC_MAX_DEPTH || !lua_checkstack(L, 8))
    enc_fail(L, E, "nesting too deep (more than %d levels)",
             E->nfr >= PP_CODEC_MAX_DEPTH ? PP_CODEC_MAX_DEPTH : E->nfr);
  if (E->nfr == E->capfr) {
    int cap = E->capfr ? E->capfr * 2 : 32;
    eframe *f = realloc(E->fr, (size_t)cap * sizeof *f);
    if (!f) enc_fail(L, E, "not enough memory");
    E->fr = f;
    E->capfr = cap;
  }
  eframe *f = &E->fr[E->nfr++];
  memset(f, 0, sizeof *f);
  f->kind = (unsigned char)kind;
  return f;
}

/* Append a description of the key at `idx` to the error path. */
static void path_key(lua_State *L, luaL_Buffer *b, int idx) {
  switch (lua_type(L, idx)) {
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    int ident = len > 0 && len <= 64 && !(s[0] >= '0' && s[0] <= '9');
    for (size_t i = 0; ident && i < len; i++)
      ident = (s[i] == '_' || (s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
               (s[i] >= '0' && s[i] <= '9'));
    if (ident) {
      luaL_addchar(b, '.');
      luaL_addlstring(b, s, len);
    } else {
      luaL_addstring(b, "[\"");
      for (size_t i = 0; i < len && i < 40; i++)
        luaL_addchar(b, (s[i] >= 32 && s[i] < 127 && s[i] != '"' && s[i] != '\\') ? s[i] : '?');
      luaL_addstring(b, len > 40 ? "...\"]" : "\"]");
    }
    break;
  }
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx))
      lua_pushfstring(L, "[%I]", (LUAI_UACINT)lua_tointeger(L, idx));
    else
      lua_pushfstring(L, "[%f]", (LUAI_UACNUMBER)lua_tonumber(L, idx));
    luaL_addvalue(b);
    break;
  case LUA_TBOOLEAN:
    luaL_addstring(b, lua_toboolean(L, idx) ? "[true]" : "[false]");
    break;
  default:
    lua_pushfstring(L, "[<%s key>]", luaL_typename(L, idx));
    luaL_addvalue(b);
    break;
  }
}

static void enc_fail(lua_State *L, pp_encoder *E, const char *fmt, ...) {
  va_list ap;
  luaL_Buffer b;
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  int msg = lua_gettop(L);
  luaL_buffinit(L, &b);
  for (int k = 0; k < E->nfr; k++) {
    eframe *f = &E->fr[k];
    switch (f->kind) {
    case EF_TOP:
      if (E->root[0] == '=') {
        luaL_addstring(&b, E->root + 1);
      } else {
        lua_pushfstring(L, "%s[%d]", E->root, f->i);
        luaL_addvalue(&b);
      }
      break;
    case EF_TABLE:
      if (f->sub == S_MT)
        luaL_addstring(&b, ".<metatable>");
      else if (f->sub == S_KEY)
        luaL_addstring(&b, ".<key>");
      else if (f->sub == S_VALUE)
        path_key(L, &b, f->idx + 1);
      break;
    case EF_FUNC:
      lua_pushfstring(L, ".<upvalue %s>", f->upname ? f->upname : "?");
      luaL_addvalue(&b);
      break;
    case EF_CUSTOM:
      lua_pushfstring(L, ".<__serialize value %d>", f->i);
      luaL_addvalue(&b);
      break;
    }
  }
  if (E->nfr) luaL_addstring(&b, ": ");
  lua_pushvalue(L, msg);
  luaL_addvalue(&b);
  luaL_pushresult(&b);
  const char *full = lua_tostring(L, -1);
  E->busy = 0;
  pp_error_raise(L, "SerializationError", "%s", full);
}

static void enc_table(lua_State *L, pp_encoder *E);
static void enc_function(lua_State *L, pp_encoder *E);
static int enc_custom(lua_State *L, pp_encoder *E);

/* Encode the value at the top of the stack. Scalars are written and
 * popped here; containers push a frame and are popped when it ends. */
static void encode_top(lua_State *L, pp_encoder *E) {
  switch (lua_type(L, -1)) {
  case LUA_TNIL:
    w_byte(L, E, PP_T_NIL);
    break;
  case LUA_TBOOLEAN:
    w_byte(L, E, lua_toboolean(L, -1) ? PP_T_TRUE : PP_T_FALSE);
    break;
  case LUA_TNUMBER:
    if (lua_isinteger(L, -1))
      w_int(L, E, lua_tointeger(L, -1));
    else
      w_float(L, E, lua_tonumber(L, -1));
    break;
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    w_str(L, E, s, len);
    break;
  }
  case LUA_TTABLE:
    enc_table(L, E);
    return;
  case LUA_TFUNCTION:
    enc_function(L, E);
    return;
  case LUA_TUSERDATA:
    if (enc_custom(L, E)) return;
    enc_fail(L, E, "cannot serialize a userdata (it has no __serialize metamethod)");
    break;
  case LUA_TLIGHTUSERDATA: /* a sentinel such as cjson.null goes by name */
    if (enc_named(L, E, 1)) break;
    enc_fail(L, E, "cannot serialize a light userdata");
    break;
  case LUA_TTHREAD:
    enc_fail(L, E, "cannot serialize a coroutine");
    break;
  default:
    enc_fail(L, E, "cannot serialize a %s", luaL_typename(L, -1));
    break;
  }
  lua_pop(L, 1);
}

static void enc_table(lua_State *L, pp_encoder *E) {
  const void *p = lua_topointer(L, -1);
  uint64_t off;
  if (p == E->globals) {
    w_byte(L, E, PP_T_GLOBALS);
    lua_pop(L, 1);
    return;
  }
  if (pm_get(&E->refs, p, &off)) {
    if (off & INPROGRESS) enc_fail(L, E, "cyclic reference through a __serialize value");
    w_ref(L, E, (size_t)off);
    lua_pop(L, 1);
    return;
  }
  if (enc_named(L, E, 0)) {
    lua_pop(L, 1);
    return;
  }
  int has_mt = lua_getmetatable(L, -1);
  if (has_mt) {
    lua_pop(L, 1);
    if (enc_custom(L, E)) return;
  }
  off = E->out->n;
  unsigned char *w = w_res(L, E, PP_TABLE_HDR);
  w[0] = has_mt ? PP_T_TABLE_MT : PP_T_TABLE;
  pp_table_counts_put(w, 0, 0);
  E->out->n += PP_TABLE_HDR;
  if (pm_put(&E->refs, p, off)) enc_fail(L, E, "not enough memory");
  eframe *f = push_eframe(L, E, EF_TABLE);
  f->idx = lua_gettop(L);
  f->off = off;
  f->arraymode = 1;
  f->sub = S_START;
  f->has_mt = (unsigned char)has_mt;
  lua_pushnil(L);
}

typedef struct {
  pp_wbuf *b;
  int err;
} dumpstate;

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  dumpstate *d = ud;
  (void)L;
  if (pp_wbuf_reserve(d->b, sz) != 0) {
    d->err = 1;
    return 1;
  }
  memcpy(d->b->p + d->b->n, p, sz);
  d->b->n += sz;
  return 0;
}

static void enc_function(lua_State *L, pp_encoder *E) {
  if (lua_iscfunction(L, -1)) {
    if (enc_named(L, E, 1)) {
      lua_pop(L, 1);
      return;
    }
    enc_fail(L, E,
             "cannot serialize a C function (it is not reachable by name from "
             "package.loaded)");
  }
  const void *p = lua_topointer(L, -1);
  uint64_t off;
  if (pm_get(&E->refs, p, &off)) {
    w_ref(L, E, (size_t)(off & ~INPROGRESS));
    lua_pop(L, 1);
    return;
  }
  /* bytecode, cached per closure (a closure's code never changes) */
  lua_pushvalue(L, -1);
  lua_rawget(L, E->dumpidx);
  if (lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    dumpstate d = {&E->scratch, 0};
    E->scratch.n = 0;
    lua_pushvalue(L, -1);
    lua_dump(L, dump_writer, &d, 0);
    lua_pop(L, 1);
    if (d.err) enc_fail(L, E, "not enough memory");
    lua_pushlstring(L, E->scratch.p, E->scratch.n);
    pp_wbuf_reset(&E->scratch);
    lua_pushvalue(L, -2);
    lua_pushvalue(L, -2);
    lua_rawset(L, E->dumpidx);
  }
  size_t blen;
  const char *bc = lua_tolstring(L, -1, &blen);
  lua_Debug ar;
  lua_pushvalue(L, -2);
  lua_getinfo(L, ">u", &ar);
  off = E->out->n;
  unsigned char *w = w_res(L, E, blen + 13);
  size_t n = 0;
  w[n++] = PP_T_FUNC;
  w[n++] = 0; /* flags, patched when the upvalues are known */
  n += pp_varint_put(w + n, blen);
  memcpy(w + n, bc, blen);
  n += blen;
  w[n++] = ar.nups;
  E->out->n += n;
  lua_pop(L, 1); /* bytecode */
  if (pm_put(&E->refs, p, off)) enc_fail(L, E, "not enough memory");
  eframe *f = push_eframe(L, E, EF_FUNC);
  f->idx = lua_gettop(L);
  f->off = off;
  f->n = ar.nups;
  f->i = 0;
  f->pure = 1;
}

/* A value whose metatable has __serialize: write the constructor name
 * and arguments it returns. Returns 0 when there is no __serialize. */
static int enc_custom(lua_State *L, pp_encoder *E) {
  if (luaL_getmetafield(L, -1, "__serialize") == LUA_TNIL) return 0;
  const void *p = lua_topointer(L, -2);
  uint64_t off;
  if (pm_get(&E->refs, p, &off)) {
    if (off & INPROGRESS) enc_fail(L, E, "cyclic reference through a __serialize value");
    lua_pop(L, 2);
    w_ref(L, E, (size_t)off);
    return 1;
  }
  int base = lua_gettop(L); /* the metamethod */
  lua_pushvalue(L, base - 1);
  if (lua_pcall(L, 1, LUA_MULTRET, 0) != LUA_OK) {
    const char *m = lua_tostring(L, -1);
    enc_fail(L, E, "__serialize failed: %s", m ? m : "(error object is not a string)");
  }
  int nres = lua_gettop(L) - base + 1;
  if (nres > 251) enc_fail(L, E, "__serialize returned too many values (at most 250 arguments)");
  if (nres < 1 || lua_type(L, base) != LUA_TSTRING)
    enc_fail(L, E, "__serialize must return a constructor name (a string), got %s",
             nres < 1 ? "nothing" : luaL_typename(L, base));
  off = E->out->n;
  w_byte(L, E, PP_T_CUSTOM);
  size_t len;
  const char *name = lua_tolstring(L, base, &len);
  w_str(L, E, name, len);
  w_varint(L, E, (uint64_t)(nres - 1));
  if (pm_put(&E->refs, p, off | INPROGRESS)) enc_fail(L, E, "not enough memory");
  eframe *f = push_eframe(L, E, EF_CUSTOM);
  f->idx = base + 1;
  f->i = 0;
  f->n = nres - 1;
  f->off = off;
  f->self = p;
  return 1;
}

static void enc_run(lua_State *L, pp_encoder *E) {
  while (E->nfr > 0) {
    eframe *f = &E->fr[E->nfr - 1];
    switch (f->kind) {
    case EF_TOP:
    case EF_CUSTOM:
      if (f->i < f->n) {
        lua_pushvalue(L, f->idx + f->i);
        f->i++;
        encode_top(L, E);
        continue;
      }
      if (f->kind == EF_CUSTOM) {
        pm_put(&E->refs, f->self, f->off); /* no longer in progress */
        lua_settop(L, f->idx - 3);         /* name, args, the value */
      }
      E->nfr--;
      continue;
    case EF_FUNC: {
      if (f->i >= f->n) {
        if (f->pure) E->out->p[f->off + 1] |= PP_FN_PURE;
        lua_pop(L, 1);
        E->nfr--;
        continue;
      }
      f->i++;
      void *uid = lua_upvalueid(L, f->idx, f->i);
      uint64_t v;
      if (uid && pm_get(&E->ups, uid, &v)) {
        E->out->p[v >> 8] |= PP_T_REFD;
        f->pure = 0;
        w_byte(L, E, PP_T_UPREF);
        w_varint(L, E, logical(E, (size_t)(v >> 8)));
        w_byte(L, E, (unsigned char)(v & 0xff));
        continue;
      }
      if (uid && pm_put(&E->ups, uid, (f->off << 8) | (uint64_t)f->i))
        enc_fail(L, E, "not enough memory");
      f->upname = lua_getupvalue(L, f->idx, f->i);
      if (f->upname && strcmp(f->upname, "_ENV") == 0) {
        /* a function's environment is always the receiver's globals */
        lua_pop(L, 1);
        w_byte(L, E, PP_T_GLOBALS);
        continue;
      }
      if (f->pure) {
        int t = lua_type(L, -1);
        if (t == LUA_TTABLE) {
          /* only the globals table or a module keeps the function pure */
          size_t before = E->out->n;
          encode_top(L, E);
          f = &E->fr[E->nfr - 1];
          if (f->kind != EF_FUNC) { /* pushed a table frame: by value */
            E->fr[E->nfr - 2].pure = 0;
          } else {
            unsigned char tag = (unsigned char)E->out->p[before];
            if (tag != PP_T_GLOBALS && tag != PP_T_MODULE) f->pure = 0;
          }
          continue;
        }
        if (t == LUA_TFUNCTION && !lua_iscfunction(L, -1)) f->pure = 0;
        if (t == LUA_TUSERDATA) f->pure = 0;
      }
      encode_top(L, E);
      continue;
    }
    case EF_TABLE:
      if (f->sub == S_KEY) {
        f->sub = S_VALUE;
        encode_top(L, E);
        continue;
      }
      if (f->sub == S_MT) {
        lua_pop(L, 1);
        E->nfr--;
        continue;
      }
      if (lua_next(L, f->idx)) {
        if (f->arraymode && lua_isinteger(L, -2) &&
            lua_tointeger(L, -2) == (lua_Integer)f->narr + 1) {
          if (f->narr == UINT32_MAX) enc_fail(L, E, "table too large");
          f->narr++;
          f->sub = S_VALUE;
          /* fast path for integers (the commonest array payload): one
           * conversion call, and a type check only when it succeeds */
          int isnum;
          lua_Integer iv = lua_tointegerx(L, -1, &isnum);
          if (isnum && lua_isinteger(L, -1)) {
            w_int(L, E, iv);
            lua_settop(L, -2);
            continue;
          }
          encode_top(L, E);
          continue;
        }
        if (f->nhash == UINT32_MAX) enc_fail(L, E, "table too large");
        f->arraymode = 0;
        f->nhash++;
        lua_pushvalue(L, -2);
        f->sub = S_KEY;
        encode_top(L, E);
        continue;
      }
      pp_table_counts_put((unsigned char *)E->out->p + f->off, f->narr, f->nhash);
      if (f->has_mt) {
        f->sub = S_MT;
        lua_getmetatable(L, f->idx);
        encode_top(L, E);
        continue;
      }
      lua_pop(L, 1);
      E->nfr--;
      continue;
    }
  }
}

/* ------------------------------------------------------------------ */
/* scalar fast path: lists of nil/boolean/number/string values (most task
 * arguments and results) skip the context, frames and maps entirely */

#define FAST_MAX 16

/* Write the one scalar at idx (nil, boolean, number or string; `type` is
 * its type) as tag and bytes at p, which has room; returns the length. */
static size_t fast_put(lua_State *L, int idx, int type, unsigned char *p) {
  pp_scalar v = {.type = type};
  switch (type) {
  case LUA_TNIL:
    break;
  case LUA_TBOOLEAN:
    v.i = lua_toboolean(L, idx);
    break;
  case LUA_TNUMBER: {
    int isint;
    lua_Integer iv = lua_tointegerx(L, idx, &isint);
    v.isint = isint && lua_isinteger(L, idx);
    if (v.isint)
      v.i = iv;
    else
      v.d = (double)lua_tonumber(L, idx);
    break;
  }
  default: { /* string */
    size_t len;
    const char *str = lua_tolstring(L, idx, &len);
    v.len = len;
    size_t n = pp_scalar_put(p, &v);
    memcpy(p + n, str, len);
    return n + len;
  }
  }
  return pp_scalar_put(p, &v);
}

size_t pp_encode_scalar(lua_State *L, int idx, int type, unsigned char *p) {
  if (type != LUA_TNIL && type != LUA_TBOOLEAN && type != LUA_TNUMBER &&
      (type != LUA_TSTRING || lua_rawlen(L, idx) >= 64))
    return 0; /* (a string under 64 bytes keeps within the 80 promised) */
  p[0] = 1;   /* a list of one value */
  return 1 + fast_put(L, idx, type, p + 1);
}

/* Push the scalar whose tag is at p (p < e, the end of the input);
 * returns the bytes it takes, or 0 having pushed nothing, with *v saying
 * why (pp_scalar_get). */
static PP_SCALAR_INLINE size_t get_scalar(lua_State *L, const unsigned char *p,
                                          const unsigned char *e, pp_scalar *v) {
  size_t k = pp_scalar_get(p, e, v);
  if (!k) return 0;
  switch (v->type) {
  case LUA_TNIL:
    lua_pushnil(L);
    break;
  case LUA_TBOOLEAN:
    lua_pushboolean(L, (int)v->i);
    break;
  case LUA_TNUMBER:
    if (v->isint)
      lua_pushinteger(L, (lua_Integer)v->i);
    else
      lua_pushnumber(L, (lua_Number)v->d);
    break;
  default:
    lua_pushlstring(L, v->s, (size_t)v->len);
    break;
  }
  return k;
}

/* Push the one scalar whose tag is at p (input ends at e); returns the
 * bytes read, or 0 having pushed nothing when it is not a scalar or the
 * input is short. */
static size_t fast_get(lua_State *L, const unsigned char *p, const unsigned char *e) {
  pp_scalar v;
  return p < e ? get_scalar(L, p, e, &v) : 0;
}

size_t pp_decode_first(lua_State *L, const char *s, size_t len) {
  const unsigned char *p = (const unsigned char *)s;
  if (len < 2 || p[0] == 0 || p[0] >= 0x80) return 0; /* need a count of 1..127 */
  size_t k = fast_get(L, p + 1, p + len);
  return k ? 1 + k : 0;
}

static int encode_fast(lua_State *L, int first, int n, pp_wbuf *out, int header) {
  if (n > FAST_MAX) return 0;
  size_t need = PP_CODEC_HEADER + 10;
  for (int i = 0; i < n; i++) {
    int t = lua_type(L, first + i);
    if (t == LUA_TSTRING) {
      size_t len = lua_rawlen(L, first + i);
      if (len >= GATHER_MIN) return 0; /* large strings take the general path */
      need += len + 9;
    } else if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER) {
      return 0;
    } else {
      need += 9;
    }
  }
  if (pp_wbuf_reserve(out, need) != 0) luaL_error(L, "procpool: not enough memory to serialize");
  unsigned char *p = (unsigned char *)out->p + out->n, *p0 = p;
  if (header) {
    pp_codec_header_put(p);
    p += PP_CODEC_HEADER;
  }
  p += pp_varint_put(p, (uint64_t)n);
  for (int i = 0; i < n; i++) p += fast_put(L, first + i, lua_type(L, first + i), p);
  out->n += (size_t)(p - p0);
  return 1;
}

/* Push a list of scalars; 0 (nothing pushed) if anything else appears or
 * the input is short: the general decoder then handles it (and reports). */
static int decode_fast(lua_State *L, const unsigned char *s, size_t len, size_t *used, int header,
                       int *count) {
  const unsigned char *p = s, *e = s + len;
  if (header) {
    if (len < PP_CODEC_HEADER || memcmp(s, PP_CODEC_MAGIC, 3) != 0 || s[3] != PP_CODEC_VERSION)
      return 0;
    p += PP_CODEC_HEADER;
  }
  uint64_t n;
  size_t k = pp_varint_get(p, (size_t)(e - p), &n);
  if (!k || n > FAST_MAX) return 0;
  p += k;
  if (!lua_checkstack(L, (int)n + 2)) return 0;
  int top = lua_gettop(L);
  for (uint64_t i = 0; i < n; i++) {
    k = fast_get(L, p, e);
    if (!k) goto bail;
    p += k;
  }
  if (used)
    *used = (size_t)(p - s);
  else if (p != e)
    goto bail;
  *count = (int)n;
  return 1;
bail:
  lua_settop(L, top);
  return 0;
}

void pp_encode(lua_State *L, int first, int n, pp_wbuf *out, int header, const char *root,
               int gather) {
  first = lua_absindex(L, first);
  if (encode_fast(L, first, n, out, header)) return;
  if (gather) gather = lua_absindex(L, gather);
  luaL_checkstack(L, 16, "procpool: serialize");
  int top0 = lua_gettop(L);
  codec_ctx *ctx = get_ctx(L);
  (void)ctx;
  int ctxidx = lua_gettop(L);
  int *busy;
  pp_encoder *E = ctx_scratch(L, ctxidx, UV_ENC, sizeof(pp_encoder), "procpool.Encoder", &busy);
  *busy = 1;
  E->out = out;
  E->root = root;
  E->ctxidx = ctxidx;
  E->loaded_checked = E->rebuilt = 0;
  E->nfr = 0;
  E->gatheridx = gather;
  E->ngaps = 0;
  pm_clear(&E->refs); /* an interrupted earlier call may have left entries */
  pm_clear(&E->ups);
  /* the name index and the bytecode cache sit below everything the
   * encoder pushes, so stack positions of frames never move */
  lua_getiuservalue(L, ctxidx, UV_REVMAP);
  E->revidx = lua_gettop(L);
  lua_getiuservalue(L, ctxidx, UV_DUMPS);
  E->dumpidx = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  E->globals = lua_topointer(L, -1);
  lua_pop(L, 1);
  if (header) {
    if (pp_wbuf_reserve(out, PP_CODEC_HEADER) != 0) {
      *busy = 0;
      luaL_error(L, "procpool: not enough memory to serialize");
    }
    pp_codec_header_put((unsigned char *)out->p + out->n);
    out->n += PP_CODEC_HEADER;
  }
  w_varint(L, E, (uint64_t)n);
  E->base = out->n;
  eframe *f = push_eframe(L, E, EF_TOP);
  f->idx = first;
  f->n = n;
  f->i = 0;
  enc_run(L, E);
  pm_clear(&E->refs);
  pm_clear(&E->ups);
  E->out = NULL;
  *busy = 0;
  lua_settop(L, top0);
}

/* ------------------------------------------------------------------ */
/* decoder                                                              */

PP_NORETURN static void dec_fail(lua_State *L, pp_decoder *D, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  const char *m = lua_tostring(L, -1);
  size_t at = (size_t)(D->p - D->s);
  D->busy = 0;
  pp_error_raise(L, "SerializationError", "cannot deserialize: %s (at byte %I)", m,
                 (LUAI_UACINT)at);
}

#define NEED(L, D, k)                                                                              \
  do {                                                                                             \
    if ((size_t)((D)->e - (D)->p) < (size_t)(k)) dec_fail((L), (D), "truncated input");            \
  } while (0)

static dframe *push_dframe(lua_State *L, pp_decoder *D, int kind) {
  if (D->nfr >= PP_CODEC_MAX_DEPTH || !lua_checkstack(L, 8)) dec_fail(L, D, "nesting too deep");
  if (D->nfr == D->capfr) {
    int cap = D->capfr ? D->capfr * 2 : 32;
    dframe *f = realloc(D->fr, (size_t)cap * sizeof *f);
    if (!f) dec_fail(L, D, "not enough memory");
    D->fr = f;
    D->capfr = cap;
  }
  dframe *f = &D->fr[D->nfr++];
  memset(f, 0, sizeof *f);
  f->kind = (unsigned char)kind;
  return f;
}

static uint64_t dec_varint(lua_State *L, pp_decoder *D) {
  uint64_t v;
  size_t k = pp_varint_get(D->p, (size_t)(D->e - D->p), &v);
  if (!k) dec_fail(L, D, "bad varint");
  D->p += k;
  return v;
}

/* Fail for a scalar cut short (pp_scalar_get), where its bytes end. */
PP_NORETURN static void dec_short(lua_State *L, pp_decoder *D, const pp_scalar *v) {
  D->p += v->short_at;
  dec_fail(L, D, "truncated input");
}

/* Read a string value; used for names (never 4 GiB long: PP_T_STR64 is
 * refused). */
static const char *dec_name(lua_State *L, pp_decoder *D, size_t *len) {
  NEED(L, D, 1);
  pp_scalar v;
  size_t k = pp_scalar_get(D->p, D->e, &v);
  if (v.type != LUA_TSTRING || *D->p == PP_T_STR64) {
    D->p++;
    dec_fail(L, D, "name expected");
  }
  if (!k) dec_short(L, D, &v);
  D->p += k;
  *len = (size_t)v.len;
  return v.s;
}

static void dec_register(lua_State *L, pp_decoder *D, size_t off) {
  if (!lua_toboolean(L, D->refsidx)) {
    lua_newtable(L);
    lua_replace(L, D->refsidx);
  }
  lua_pushvalue(L, -1);
  lua_rawseti(L, D->refsidx, (lua_Integer)off);
}

static int push_module_pcall(lua_State *L) {
  /* [name] -> package.loaded[name] or require(name) */
  push_loaded(L);
  lua_pushvalue(L, 1);
  lua_rawget(L, -2);
  if (!lua_isnil(L, -1)) return 1;
  lua_getglobal(L, "require");
  lua_pushvalue(L, 1);
  lua_call(L, 1, 1);
  return 1;
}

int pp_push_module(lua_State *L, const char *name, size_t len, const char **err) {
  lua_pushcfunction(L, push_module_pcall);
  lua_pushlstring(L, name, len);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    *err = lua_tostring(L, -1);
    if (!*err) *err = "(error object is not a string)";
    return 0;
  }
  return 1;
}

int pp_resolve_name(lua_State *L, const char *name, size_t len, const char **err) {
  /* "mod:fn", "mod.fn" (split at the last dot), or a global */
  const char *sep = memchr(name, ':', len);
  if (!sep)
    for (const char *q = name + len; q > name; q--)
      if (q[-1] == '.') {
        sep = q - 1;
        break;
      }
  if (!sep) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_pushlstring(L, name, len);
    lua_rawget(L, -2);
    lua_remove(L, -2);
  } else {
    if (!pp_push_module(L, name, (size_t)(sep - name), err)) return 0;
    if (!lua_istable(L, -1)) {
      *err = lua_pushfstring(L, "module '%s' is not a table", lua_tostring(L, -1));
      return 0;
    }
    lua_pushlstring(L, sep + 1, len - (size_t)(sep + 1 - name));
    lua_rawget(L, -2);
    lua_remove(L, -2);
  }
  if (lua_isnil(L, -1)) {
    *err = lua_pushfstring(L, "'%s' not found", lua_pushlstring(L, name, len));
    return 0;
  }
  return 1;
}

typedef struct {
  const char *p;
  size_t n;
} loadstate;

static const char *load_reader(lua_State *L, void *ud, size_t *sz) {
  loadstate *s = ud;
  (void)L;
  *sz = s->n;
  s->n = 0;
  return s->n == 0 && *sz == 0 ? NULL : s->p;
}

static int dec_value(lua_State *L, pp_decoder *D);

/* ------------------------------------------------------------------ */
/* bytecode structure check                                             */
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

static int bytecode_ok(const char *s, size_t len) {
  unsigned char h[64];
  size_t hn = bc_header(h), nups;
  bcr r = {(const unsigned char *)s, (const unsigned char *)s + len};
  if (len < hn + 1 || memcmp(s, h, hn) != 0) return 0;
  r.p += hn;
  unsigned closure_nups = *r.p++;
  return bc_function(&r, 0, &nups) && nups == closure_nups && r.p == r.e;
}

static void dec_func(lua_State *L, pp_decoder *D, int refd, size_t off) {
  NEED(L, D, 1);
  int flags = *D->p++;
  uint64_t len = dec_varint(L, D);
  NEED(L, D, len);
  const char *bc = (const char *)D->p;
  D->p += len;
  NEED(L, D, 1);
  int nups = *D->p++;
  int cache = D->fncache && (flags & PP_FN_PURE) && D->nfr == 1;
  int loaded = 0;
  if (cache) {
    lua_pushlstring(L, bc, (size_t)len);
    lua_pushvalue(L, -1);
    lua_rawget(L, D->fncache);
    if (lua_isfunction(L, -1)) {
      lua_remove(L, -2);
      loaded = 1;
    } else {
      lua_pop(L, 1);
    }
  }
  if (!loaded) {
    loadstate ls = {bc, (size_t)len};
    if (!bytecode_ok(bc, (size_t)len)) dec_fail(L, D, "malformed function bytecode");
    if (lua_load(L, load_reader, &ls, "=(procpool)", "b") != LUA_OK)
      dec_fail(L, D, "bad function (%s)", lua_tostring(L, -1));
    if (cache) { /* [bc fn] */
      lua_pushvalue(L, -2);
      lua_pushvalue(L, -2);
      lua_rawset(L, D->fncache);
      lua_remove(L, -2);
    }
  }
  lua_Debug ar;
  lua_pushvalue(L, -1);
  lua_getinfo(L, ">u", &ar);
  /* the closure's count (ar.nups) and its prototype's (what
   * lua_getupvalue checks) come from separate bytes of the bytecode */
  if (ar.nups != nups || (nups > 0 && !lua_getupvalue(L, -1, nups)) ||
      lua_getupvalue(L, -1 - (nups > 0), nups + 1))
    dec_fail(L, D, "function upvalue count mismatch");
  if (nups > 0) lua_pop(L, 1);
  if (refd) dec_register(L, D, off);
  dframe *f = push_dframe(L, D, EF_FUNC);
  f->idx = lua_gettop(L);
  f->a = 0;
  f->b = (uint64_t)nups;
}

/* Push the next value. A container pushes a frame; its value is complete
 * when that frame ends. Either way the caller just continues its loop. */
static int dec_value(lua_State *L, pp_decoder *D) {
  NEED(L, D, 1);
  size_t off = (size_t)(D->p - D->s);
  pp_scalar v;
  size_t k = get_scalar(L, D->p, D->e, &v);
  if (k) {
    D->p += k;
    return 1;
  }
  if (v.type != LUA_TNONE) dec_short(L, D, &v);
  unsigned tag = *D->p++;
  int refd = 0;
  switch (tag) {
  case PP_T_TABLE | PP_T_REFD:
  case PP_T_TABLE_MT | PP_T_REFD:
  case PP_T_FUNC | PP_T_REFD:
  case PP_T_CUSTOM | PP_T_REFD:
    refd = 1;
    tag &= ~(unsigned)PP_T_REFD;
    break;
  default:
    break;
  }
  switch (tag) {
  case PP_T_TABLE:
  case PP_T_TABLE_MT: {
    NEED(L, D, PP_TABLE_HDR - 1);
    uint32_t narr32, nhash32;
    pp_table_counts_get(D->p, &narr32, &nhash32);
    uint64_t narr = narr32, nhash = nhash32; /* 2 * nhash below must not wrap */
    D->p += PP_TABLE_HDR - 1;
    size_t left = (size_t)(D->e - D->p);
    if (narr > left || nhash > left / 2 || narr + 2 * nhash > left)
      dec_fail(L, D, "table size exceeds the input");
    if (!lua_checkstack(L, 8)) dec_fail(L, D, "nesting too deep");
    lua_createtable(L, (int)(narr < (1u << 26) ? narr : (1u << 26)),
                    (int)(nhash < (1u << 26) ? nhash : (1u << 26)));
    if (refd) dec_register(L, D, off);
    dframe *f = push_dframe(L, D, EF_TABLE);
    f->idx = lua_gettop(L);
    f->a = narr;
    f->b = nhash;
    f->ai = 0;
    f->mt = tag == PP_T_TABLE_MT;
    f->sub = S_START;
    return 0;
  }
  case PP_T_REF: {
    uint64_t to = dec_varint(L, D);
    if (!lua_toboolean(L, D->refsidx) || to >= off ||
        lua_rawgeti(L, D->refsidx, (lua_Integer)to) == LUA_TNIL)
      dec_fail(L, D, "bad reference");
    return 1;
  }
  case PP_T_FUNC:
    dec_func(L, D, refd, off);
    return 0;
  case PP_T_GLOBALS:
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    return 1;
  case PP_T_MODULE:
  case PP_T_CFUNC: {
    size_t mlen, klen = 0;
    const char *mod = dec_name(L, D, &mlen), *key = NULL, *err;
    if (tag == PP_T_CFUNC) key = dec_name(L, D, &klen);
    if (!pp_push_module(L, mod, mlen, &err))
      dec_fail(L, D, "cannot load module '%s': %s", lua_pushlstring(L, mod, mlen), err);
    if (tag == PP_T_CFUNC) {
      if (!lua_istable(L, -1))
        dec_fail(L, D, "module '%s' is not a table", lua_pushlstring(L, mod, mlen));
      lua_pushlstring(L, key, klen);
      lua_gettable(L, -2);
      lua_remove(L, -2);
      if (!lua_isfunction(L, -1) && !lua_islightuserdata(L, -1))
        dec_fail(L, D, "'%s.%s' is not a function in this process", lua_pushlstring(L, mod, mlen),
                 lua_pushlstring(L, key, klen));
    }
    return 1;
  }
  case PP_T_CUSTOM: {
    size_t nlen;
    const char *name = dec_name(L, D, &nlen), *err;
    uint64_t nargs = dec_varint(L, D);
    if (nargs > (uint64_t)(D->e - D->p) || nargs > 250) dec_fail(L, D, "bad argument count");
    if (!lua_checkstack(L, (int)nargs + 8)) dec_fail(L, D, "nesting too deep");
    if (!pp_resolve_name(L, name, nlen, &err))
      dec_fail(L, D, "cannot find constructor '%s': %s", lua_pushlstring(L, name, nlen), err);
    dframe *f = push_dframe(L, D, EF_CUSTOM);
    f->idx = lua_gettop(L);
    f->a = nargs;
    f->b = off;
    f->mt = (unsigned char)refd;
    return 0;
  }
  default:
    dec_fail(L, D, "bad tag %d", (int)tag);
  }
}

static void dec_run(lua_State *L, pp_decoder *D) {
  while (D->nfr > 0) {
    dframe *f = &D->fr[D->nfr - 1];
    switch (f->kind) {
    case EF_TOP:
      if (f->a == 0) {
        D->nfr--;
        continue;
      }
      f->a--;
      dec_value(L, D);
      continue;
    case EF_TABLE:
      switch (f->sub) {
      case S_VALUE: /* an array value arrived */
        lua_rawseti(L, f->idx, ++f->ai);
        break;
      case S_KEY: { /* a key arrived; now its value */
        int t = lua_type(L, -1);
        if (t == LUA_TNIL) dec_fail(L, D, "nil table key");
        if (t == LUA_TNUMBER && !lua_isinteger(L, -1) && isnan(lua_tonumber(L, -1)))
          dec_fail(L, D, "NaN table key");
        f->sub = S_KEYVAL; /* its value is next */
        dec_value(L, D);
        continue;
      }
      case S_KEYVAL: /* key, value */
        lua_rawset(L, f->idx);
        break;
      case S_MT:
        if (!lua_istable(L, -1)) dec_fail(L, D, "metatable is not a table");
#ifdef PP_FUZZ_NO_FINALIZERS
        /* the fuzz target must never run decoded code: a __gc would */
        if (lua_getfield(L, -1, "__gc") != LUA_TNIL) dec_fail(L, D, "__gc refused (fuzzing)");
        lua_pop(L, 1);
#endif
        lua_setmetatable(L, f->idx);
        D->nfr--;
        continue;
      default:
        break;
      }
      f->sub = S_START;
      if (f->a > 0) {
        f->a--;
        f->sub = S_VALUE;
        /* fast path: scalars straight into the array */
        if (D->p < D->e) {
          pp_scalar v;
          size_t k = get_scalar(L, D->p, D->e, &v);
          if (k) {
            D->p += k;
            continue;
          }
        }

        dec_value(L, D);
        continue;
      }
      if (f->b > 0) {
        f->b--;
        f->sub = S_KEY;
        dec_value(L, D);
        continue;
      }
      if (f->mt) {
        f->sub = S_MT;
        dec_value(L, D);
        continue;
      }
      D->nfr--;
      continue;
    case EF_FUNC:
      if (f->sub == S_VALUE) { /* an upvalue arrived */
        if (!lua_setupvalue(L, f->idx, (int)f->a + 1)) dec_fail(L, D, "bad upvalue");
        f->a++;
        f->sub = S_START;
      }
      if (f->a >= f->b) {
        D->nfr--;
        continue;
      }
      NEED(L, D, 1);
      if (*D->p == PP_T_UPREF) {
        D->p++;
        size_t here = (size_t)(D->p - D->s);
        uint64_t to = dec_varint(L, D);
        NEED(L, D, 1);
        int idx = *D->p++;
        lua_Debug ar;
        if (!lua_toboolean(L, D->refsidx) || to >= here ||
            lua_rawgeti(L, D->refsidx, (lua_Integer)to) != LUA_TFUNCTION || lua_iscfunction(L, -1))
          dec_fail(L, D, "bad upvalue reference");
        lua_pushvalue(L, -1);
        lua_getinfo(L, ">u", &ar);
        if (idx < 1 || idx > ar.nups) dec_fail(L, D, "bad upvalue reference");
        lua_upvaluejoin(L, f->idx, (int)f->a + 1, -1, idx);
        lua_pop(L, 1);
        f->a++;
        continue;
      }
      f->sub = S_VALUE;
      dec_value(L, D);
      continue;
    case EF_CUSTOM: {
      if (f->a > 0) {
        f->a--;
        dec_value(L, D);
        continue;
      }
      int nargs = lua_gettop(L) - f->idx;
      size_t off = (size_t)f->b;
      int refd = f->mt;
      D->nfr--;
      if (lua_pcall(L, nargs, 1, 0) != LUA_OK) {
        const char *m = lua_tostring(L, -1);
        dec_fail(L, D, "constructor failed: %s", m ? m : "(error object is not a string)");
      }
      if (refd) dec_register(L, D, off);
      continue;
    }
    }
  }
}

int pp_decode(lua_State *L, const char *s, size_t len, size_t *used, int header, int fncache) {
  int fastn;
  if (decode_fast(L, (const unsigned char *)s, len, used, header, &fastn)) return fastn;
  if (fncache) fncache = lua_absindex(L, fncache);
  lua_checkstack(L, 16);
  int top0 = lua_gettop(L);
  lua_pushnil(L); /* refs slot (a table once an object is shared) */
  codec_ctx *ctx = get_ctx(L);
  (void)ctx;
  int ctxidx = lua_gettop(L);
  int *busy;
  pp_decoder *D = ctx_scratch(L, ctxidx, UV_DEC, sizeof(pp_decoder), "procpool.Decoder", &busy);
  *busy = 1;
  /* keep the decoder alive below the values: [refs ctx D] */
  D->s = D->p = (const unsigned char *)s;
  D->e = D->p + len;
  D->nfr = 0;
  D->refsidx = top0 + 1;
  D->fncache = fncache;
  if (header) {
    if (len < PP_CODEC_HEADER || memcmp(s, PP_CODEC_MAGIC, 3) != 0)
      dec_fail(L, D, "not procpool data");
    if ((unsigned char)s[3] != PP_CODEC_VERSION)
      dec_fail(L, D, "unsupported format version %d (this is %d)", (unsigned char)s[3],
               PP_CODEC_VERSION);
    D->p += PP_CODEC_HEADER;
  }
  uint64_t n = dec_varint(L, D);
  if (n > (uint64_t)(D->e - D->p)) dec_fail(L, D, "value count exceeds the input");
  /* the list's offsets are relative to its start, as the encoder wrote */
  D->s = D->p;
  if (!lua_checkstack(L, (int)(n < 1000000 ? n : 1000000) + 16)) dec_fail(L, D, "too many values");
  dframe *f = push_dframe(L, D, EF_TOP);
  f->a = n;
  dec_run(L, D);
  if (used)
    *used = (size_t)(D->p - (const unsigned char *)s);
  else if (D->p != D->e)
    dec_fail(L, D, "trailing bytes");
  *busy = 0;
  /* [refs ctx D v1..vn] -> [v1..vn] */
  lua_rotate(L, top0 + 1, -3);
  lua_settop(L, top0 + (int)n);
  return (int)n;
}

/* ------------------------------------------------------------------ */
/* Lua functions                                                        */

static int l_serialize(lua_State *L) {
  int n = lua_gettop(L);
  codec_ctx *ctx = get_ctx(L);
  (void)ctx;
  int ctxidx = lua_gettop(L);
  int *busy;
  pp_wbuf *b =
      ctx_scratch(L, ctxidx, UV_SER, sizeof(pp_wbuf) + sizeof(int), "procpool.Buffer", &busy);
  *busy = 1;
  b->n = 0;
  lua_newtable(L); /* gathered large strings: position, string, ... */
  int gidx = lua_gettop(L);
  pp_encode(L, 1, n, b, 1, "value", gidx);
  /* assemble: buffer pieces between the gathered strings, one concat */
  lua_Integer ng = (lua_Integer)lua_rawlen(L, gidx) / 2;
  luaL_checkstack(L, (int)(2 * ng + 2), "procpool: serialize");
  size_t at = 0;
  for (lua_Integer k = 0; k < ng; k++) {
    lua_rawgeti(L, gidx, 2 * k + 1);
    size_t pos = (size_t)lua_tointeger(L, -1);
    lua_pop(L, 1);
    lua_pushlstring(L, b->p + at, pos - at);
    lua_rawgeti(L, gidx, 2 * k + 2);
    at = pos;
  }
  lua_pushlstring(L, b->p + at, b->n - at);
  lua_concat(L, (int)(2 * ng + 1));
  pp_wbuf_reset(b);
  *busy = 0;
  return 1;
}

static int l_deserialize(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_settop(L, 1);
  return pp_decode(L, s, len, NULL, 1, 0);
}

void pp_codec_open(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"serialize", l_serialize}, {"deserialize", l_deserialize}, {NULL, NULL}};
  luaL_newmetatable(L, "procpool.Encoder");
  lua_pushcfunction(L, enc_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, "procpool.Decoder");
  lua_pushcfunction(L, dec_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, "procpool.Buffer");
  lua_pushcfunction(L, wbuf_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  /* the context: name index, weak bytecode cache, scratch objects */
  codec_ctx *ctx = lua_newuserdatauv(L, sizeof *ctx, UV_N);
  ctx->loaded_count = 0;
  ctx->indexed = 0;
  lua_newtable(L);
  lua_setiuservalue(L, -2, UV_REVMAP);
  lua_newtable(L);
  lua_newtable(L);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_setiuservalue(L, -2, UV_DUMPS);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &CTX_KEY);
  luaL_setfuncs(L, fns, 0);
}
