/* decode.c: the decoder: bytes -> Lua values (the format is
 * codec_format.h's). */
#include "codec.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "bccheck.h"
#include "codec_ctx.h"
#include "error.h"
#include "pp.h"

/* ------------------------------------------------------------------ */
/* the decoder's state                                                  */

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

static int dec_gc(lua_State *L) {
  pp_decoder *D = lua_touserdata(L, 1);
  free(D->fr);
  D->fr = NULL;
  return 0;
}

const pp_scratch_kind pp_decoder_kind = {
    PP_CTX_DEC, sizeof(pp_decoder), offsetof(pp_decoder, busy), "procpool.Decoder", dec_gc, NULL};

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

/* ------------------------------------------------------------------ */
/* scalar fast path: lists of nil/boolean/number/string values (most task
 * arguments and results) skip the context, frames and maps entirely */

#define FAST_MAX 16

/* Push the one scalar whose tag is at p (input ends at e); returns the
 * bytes read, or 0 having pushed nothing when it is not a scalar or the
 * input is short. */
static size_t fast_get(lua_State *L, const unsigned char *p, const unsigned char *e) {
  pp_scalar v;
  return p < e ? get_scalar(L, p, e, &v) : 0;
}

int pp_decode_fn_globals(const char *s, size_t len) {
  const unsigned char *p = (const unsigned char *)s, *e = p + len;
  /* a list of one value (count 1), a function with no flag but pure */
  if (len < 4 || p[0] != 1 || p[1] != PP_T_FUNC || p[2] != PP_FN_PURE) return -1;
  uint64_t blen;
  size_t k = pp_varint_get(p + 3, len - 3, &blen);
  if (!k) return -1;
  const unsigned char *q = p + 3 + k;
  if ((size_t)(e - q) < 1 || blen > (uint64_t)(e - q) - 1) return -1;
  q += blen;
  size_t nups = *q++;
  if ((size_t)(e - q) != nups) return -1;
  for (size_t i = 0; i < nups; i++)
    if (q[i] != PP_T_GLOBALS) return -1;
  return (int)nups;
}

size_t pp_decode_first(lua_State *L, const char *s, size_t len) {
  const unsigned char *p = (const unsigned char *)s;
  if (len < 2 || p[0] == 0 || p[0] >= 0x80) return 0; /* need a count of 1..127 */
  size_t k = fast_get(L, p + 1, p + len);
  return k ? 1 + k : 0;
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

/* After a failed call of this process's code (require, a constructor):
 * Ctrl-C (on top) goes on as it is, not as a SerializationError. */
static void dec_pass_interrupt(lua_State *L, pp_decoder *D) {
  if (!pp_is_interrupt(L, -1)) return;
  D->busy = 0;
  lua_error(L);
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
    if (!pp_bytecode_ok(bc, (size_t)len)) dec_fail(L, D, "malformed function bytecode");
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
    if (!pp_push_module(L, mod, mlen, &err)) {
      dec_pass_interrupt(L, D);
      dec_fail(L, D, "cannot load module '%s': %s", lua_pushlstring(L, mod, mlen), err);
    }
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
    if (!pp_resolve_name(L, name, nlen, &err)) {
      dec_pass_interrupt(L, D);
      dec_fail(L, D, "cannot find constructor '%s': %s", lua_pushlstring(L, name, nlen), err);
    }
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
        dec_pass_interrupt(L, D);
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
  pp_codec_ctx_push(L);
  int ctxidx = lua_gettop(L);
  int *busy;
  pp_decoder *D = pp_codec_scratch(L, ctxidx, &pp_decoder_kind, &busy);
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
