/* codec.c: the value codec's Lua face: its per-state context, scratch
 * objects, and core.serialize / core.deserialize. */
#include "codec.h"

#include <stddef.h>
#include <string.h>

#include <lauxlib.h>

#include "codec_ctx.h"
#include "pp.h"

static const char CTX_KEY = 'c';

pp_codec_ctx *pp_codec_ctx_push(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &CTX_KEY);
  return lua_touserdata(L, -1);
}

void *pp_codec_scratch(lua_State *L, int ctxidx, const pp_scratch_kind *k, int **busy) {
  lua_getiuservalue(L, ctxidx, k->uv);
  void *o = lua_touserdata(L, -1);
  if (o && !*(int *)((char *)o + k->busy_off)) {
    *busy = (int *)((char *)o + k->busy_off);
    return o;
  }
  /* absent, or busy because of a reentrant call (or an earlier call that
   * was interrupted by an error): make a fresh one and cache that. */
  lua_pop(L, 1);
  o = lua_newuserdatauv(L, k->size, 0);
  memset(o, 0, k->size);
  if (k->init) k->init(o);
  luaL_setmetatable(L, k->mt);
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, ctxidx, k->uv);
  *busy = (int *)((char *)o + k->busy_off);
  return o;
}

static void scratch_meta(lua_State *L, const pp_scratch_kind *k) {
  luaL_newmetatable(L, k->mt);
  lua_pushcfunction(L, k->gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}

/* core.serialize's buffer: a write buffer, then its in-use flag (the
 * layout of executor.c's boxes too) */
static int wbuf_gc(lua_State *L) {
  pp_wbuf *b = lua_touserdata(L, 1);
  pp_wbuf_free(b);
  return 0;
}

static void wbuf_init(void *o) { pp_wbuf_init(o, 0); }

static const pp_scratch_kind buffer_kind = {PP_CTX_SER,      sizeof(pp_wbuf) + sizeof(int),
                                            sizeof(pp_wbuf), "procpool.Buffer",
                                            wbuf_gc,         wbuf_init};

static int l_serialize(lua_State *L) {
  int n = lua_gettop(L);
  pp_codec_ctx_push(L);
  int ctxidx = lua_gettop(L);
  int *busy;
  pp_wbuf *b = pp_codec_scratch(L, ctxidx, &buffer_kind, &busy);
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
  scratch_meta(L, &pp_encoder_kind);
  scratch_meta(L, &pp_decoder_kind);
  scratch_meta(L, &buffer_kind);
  /* the context: name index, weak bytecode cache, scratch objects */
  pp_codec_ctx *ctx = lua_newuserdatauv(L, sizeof *ctx, PP_CTX_N);
  ctx->loaded_count = 0;
  ctx->indexed = 0;
  lua_newtable(L);
  lua_setiuservalue(L, -2, PP_CTX_REVMAP);
  lua_newtable(L);
  lua_newtable(L);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_setiuservalue(L, -2, PP_CTX_DUMPS);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &CTX_KEY);
  luaL_setfuncs(L, fns, 0);
}
