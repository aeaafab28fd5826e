/* cursor.c: the map iterators' fast path: the items of one chunk handed
 * out from C, one per call of the generic-for iterator, with no Lua call
 * per item. lua/procpool/map.lua keeps the pipeline (chunks, waits,
 * failures, the last item of a chunk) and arms the cursor over the items
 * it may hand out on its own. */
#include <lauxlib.h>

#include "codec.h"
#include "future.h"
#include "pp.h"

#define CURSOR_MT "procpool.Cursor"

enum { SRC_NONE = 0, SRC_VALUES, SRC_FUTURE };

/* The cursor. Its user value is what it hands out from: a table of the
 * chunk's decoded first values (SRC_VALUES), or the chunk's Future, done
 * with no failed item, whose results it decodes one by one (SRC_FUTURE). */
typedef struct cursor {
  lua_Integer pos;   /* the chunk's items taken (the last one handed out) */
  lua_Integer limit; /* hand out items up to this one */
  lua_Integer base;  /* the input index before the chunk's first item */
  int src;
  const pp_job *job; /* SRC_FUTURE: the Future's job, ended (read without the engine's lock) */
} cursor;

static void disarm(lua_State *L, cursor *c, int ci) {
  c->src = SRC_NONE;
  c->job = NULL;
  c->limit = c->pos;
  lua_pushnil(L);
  lua_setiuservalue(L, ci, 1);
}

/* Push the input index and value of the next item and count it taken; 0
 * (nothing pushed) when the cursor cannot: a result that is not a lone
 * scalar (the general decoder runs protected, from Lua) or not a value. */
static int hand_out(lua_State *L, cursor *c, int ci) {
  lua_Integer pos = c->pos + 1;
  if (c->src == SRC_VALUES) {
    lua_getiuservalue(L, ci, 1);
    lua_pushinteger(L, c->base + pos);
    lua_rawgeti(L, -2, pos);
    lua_pushnil(L); /* what was handed out is the caller's to keep or drop */
    lua_rawseti(L, -4, pos);
    lua_remove(L, -3);
    c->pos = pos;
    return 1;
  }
  const pp_item *it = &c->job->items[pos - 1];
  if (it->status != PP_IT_OK) return 0;
  size_t len;
  const char *s = pp_item_bytes(c->job, it, &len);
  lua_pushinteger(L, c->base + pos);
  if (!pp_decode_first(L, s, len)) {
    lua_pop(L, 1);
    return 0;
  }
  c->pos = pos;
  return 1;
}

/* `slow` returned false alone: it armed the cursor again (what it
 * returned is on an empty stack) */
static int rearmed(lua_State *L) {
  if (lua_gettop(L) != 1 || lua_type(L, 1) != LUA_TBOOLEAN || lua_toboolean(L, 1)) return 0;
  lua_settop(L, 0);
  return 1;
}

static int next_k(lua_State *L, int status, lua_KContext ctx);

/* The iterator's step: an item from the cursor, or else the pipeline's
 * own step (the upvalue `slow`), called with the chunk position the
 * cursor reached (nil if it was not armed). `slow` returns what the
 * iterator returns (i, v, or nil at the end), or false alone once it has
 * armed the cursor again. */
static int step(lua_State *L) {
  for (;;) {
    int ci = lua_upvalueindex(1);
    cursor *c = lua_touserdata(L, ci);
    if (c->pos < c->limit && hand_out(L, c, ci)) return 2;
    int armed = c->src != SRC_NONE;
    lua_Integer pos = c->pos;
    disarm(L, c, ci);
    lua_pushvalue(L, lua_upvalueindex(2));
    if (armed)
      lua_pushinteger(L, pos);
    else
      lua_pushnil(L);
    lua_callk(L, 1, LUA_MULTRET, 0, next_k); /* it may yield, in a wait */
    if (!rearmed(L)) return lua_gettop(L);
  }
}

static int next_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  return rearmed(L) ? step(L) : lua_gettop(L);
}

/* the generic-for iterator (its arguments, if any, are not used) */
static int cursor_next(lua_State *L) {
  lua_settop(L, 0);
  return step(L);
}

/* cursor:arm(src, pos, limit, base) -> whether armed: hand out items
 * pos+1..limit of a chunk whose first item is input item base+1, from
 * src: the table of their decoded values, or the chunk's Future, if it
 * is done and no item of it failed (else the cursor is not armed). */
static int cursor_arm(lua_State *L) {
  cursor *c = luaL_checkudata(L, 1, CURSOR_MT);
  lua_Integer pos = luaL_checkinteger(L, 3), limit = luaL_checkinteger(L, 4);
  lua_Integer base = luaL_checkinteger(L, 5);
  int src = SRC_VALUES;
  const pp_job *job = NULL;
  if (lua_type(L, 2) != LUA_TTABLE) {
    pp_fut *f = pp_future_check(L, 2);
    if (pp_engine_job_state(f->e, f->job) != PP_JOB_DONE || f->job->nfailed) {
      lua_pushboolean(L, 0);
      return 1;
    }
    if (pos < 0 || limit > (lua_Integer)f->job->n) luaL_argerror(L, 4, "no such item");
    src = SRC_FUTURE;
    job = f->job;
  }
  lua_settop(L, 2);
  lua_setiuservalue(L, 1, 1);
  c->src = src;
  c->job = job;
  c->pos = pos;
  c->limit = limit;
  c->base = base;
  lua_pushboolean(L, 1);
  return 1;
}

/* cursor:disarm(): it hands out nothing more (the loop was left) */
static int cursor_disarm(lua_State *L) {
  disarm(L, luaL_checkudata(L, 1, CURSOR_MT), 1);
  return 0;
}

/* map_cursor(slow) -> cursor, iterator */
static int l_map_cursor(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  cursor *c = lua_newuserdatauv(L, sizeof *c, 1);
  c->pos = c->limit = c->base = 0;
  c->src = SRC_NONE;
  c->job = NULL;
  luaL_setmetatable(L, CURSOR_MT);
  lua_pushvalue(L, -1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, cursor_next, 2);
  return 2;
}

void pp_cursor_open(lua_State *L) {
  static const luaL_Reg methods[] = {{"arm", cursor_arm}, {"disarm", cursor_disarm}, {NULL, NULL}};
  luaL_newmetatable(L, CURSOR_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  lua_pushcfunction(L, l_map_cursor);
  lua_setfield(L, -2, "map_cursor");
}
