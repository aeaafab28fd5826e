/* encode.c: the encoder: Lua values -> bytes (the format is
 * codec_format.h's). */
#include "codec.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "codec_ctx.h"
#include "error.h"
#include "names.h"

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
/* the encoder's state                                                  */

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
  int dumpidx;
  pp_names names;
  /* gather mode: large strings are referenced, not copied; each gap is
   * recorded as (buffer position, cumulative skipped bytes) */
  int gatheridx, ngaps, capgaps;
  size_t *gaps;
} pp_encoder;

#define GATHER_MIN (32u << 10)
#define GATHER_MAX_GAPS 4096

enum { EF_TOP, EF_TABLE, EF_FUNC, EF_CUSTOM };
enum { S_START, S_KEY, S_VALUE, S_MT };

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

static void enc_init(void *o) { pp_wbuf_init(&((pp_encoder *)o)->scratch, 0); }

const pp_scratch_kind pp_encoder_kind = {
    PP_CTX_ENC, sizeof(pp_encoder), offsetof(pp_encoder, busy), "procpool.Encoder", enc_gc,
    enc_init};

static void enc_fail(lua_State *L, pp_encoder *E, const char *fmt, ...);
static unsigned char *w_res(lua_State *L, pp_encoder *E, size_t k);

/* If the value at the top is reachable by name, write its name and
 * return 1. `must`: a C function, which can only go by name. */
static int enc_named(lua_State *L, pp_encoder *E, int must) {
  if (!pp_names_find(L, &E->names, must)) return 0;
  size_t len;
  const char *enc = lua_tolstring(L, -1, &len);
  memcpy(w_res(L, E, len), enc, len);
  E->out->n += len;
  lua_pop(L, 1);
  return 1;
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
    if (pp_is_interrupt(L, -1)) { /* Ctrl-C: as it is, not as a SerializationError */
      E->busy = 0;
      lua_error(L);
    }
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
  case LUA_TNUMBER:
    v.isint = lua_isinteger(L, idx);
    if (v.isint)
      v.i = lua_tointegerx(L, idx, NULL);
    else
      v.d = (double)lua_tonumber(L, idx);
    break;
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

int pp_encode_scalar_takes(lua_State *L, int idx, int type) {
  /* (a string under 64 bytes keeps within the 80 promised) */
  return type == LUA_TNIL || type == LUA_TBOOLEAN || type == LUA_TNUMBER ||
         (type == LUA_TSTRING && lua_rawlen(L, idx) < 64);
}

size_t pp_encode_scalar(lua_State *L, int idx, int type, unsigned char *p) {
  if (!pp_encode_scalar_takes(L, idx, type)) return 0;
  p[0] = 1; /* a list of one value */
  return 1 + fast_put(L, idx, type, p + 1);
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

void pp_encode(lua_State *L, int first, int n, pp_wbuf *out, int header, const char *root,
               int gather) {
  first = lua_absindex(L, first);
  if (encode_fast(L, first, n, out, header)) return;
  if (gather) gather = lua_absindex(L, gather);
  luaL_checkstack(L, 16, "procpool: serialize");
  int top0 = lua_gettop(L);
  pp_codec_ctx_push(L);
  int ctxidx = lua_gettop(L);
  int *busy;
  pp_encoder *E = pp_codec_scratch(L, ctxidx, &pp_encoder_kind, &busy);
  *busy = 1;
  E->out = out;
  E->root = root;
  E->names.ctxidx = ctxidx;
  E->names.loaded_checked = E->names.rebuilt = 0;
  E->nfr = 0;
  E->gatheridx = gather;
  E->ngaps = 0;
  pm_clear(&E->refs); /* an interrupted earlier call may have left entries */
  pm_clear(&E->ups);
  /* the name index and the bytecode cache sit below everything the
   * encoder pushes, so stack positions of frames never move */
  lua_getiuservalue(L, ctxidx, PP_CTX_REVMAP);
  E->names.revidx = lua_gettop(L);
  lua_getiuservalue(L, ctxidx, PP_CTX_DUMPS);
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
