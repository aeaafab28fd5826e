/* names.c: names of values: the index of what package.loaded reaches,
 * which the encoder writes names from, and names resolved back to values. */
#include "names.h"

#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "codec.h"
#include "codec_ctx.h"

static void push_loaded(lua_State *L) { luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE); }

/* ------------------------------------------------------------------ */
/* the index: values reachable from package.loaded                      */

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
static void index_build(lua_State *L, pp_names *nm) {
  pp_codec_ctx *ctx = lua_touserdata(L, nm->ctxidx);
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
  lua_setiuservalue(L, nm->ctxidx, PP_CTX_REVMAP);
  lua_replace(L, nm->revidx);
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

int pp_names_find(lua_State *L, pp_names *nm, int must) {
  int v = lua_gettop(L);
  if (!((pp_codec_ctx *)lua_touserdata(L, nm->ctxidx))->indexed) index_build(L, nm);
  for (int attempt = 0; attempt < 2; attempt++) {
    lua_pushvalue(L, v);
    lua_rawget(L, nm->revidx);
    if (lua_type(L, -1) == LUA_TSTRING) {
      size_t len;
      const unsigned char *enc = (const unsigned char *)lua_tolstring(L, -1, &len);
      if (index_verify(L, enc, len, v)) return 1;
    }
    lua_pop(L, 1);
    if (attempt) break;
    pp_codec_ctx *ctx = lua_touserdata(L, nm->ctxidx);
    if (must) {
      if (nm->rebuilt) break;
    } else {
      if (nm->loaded_checked) break;
      nm->loaded_checked = 1;
      if (count_loaded(L) == ctx->loaded_count) break;
    }
    nm->rebuilt = 1;
    index_build(L, nm);
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* names back to values                                                 */

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
