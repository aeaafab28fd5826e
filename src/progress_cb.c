/* progress_cb.c: the parent's side of task reports (procpool.report): a
 * job's progress callbacks, run from the drain of its done callbacks
 * (future.c), and its latest report. */
#include "progress_cb.h"

#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>

#include "codec.h"
#include "error.h"
#include "pp.h"
#include "wire.h"

/* registry: job (light userdata) -> its listener, a table
 * { future, callbacks, seen, indexed }: callback k has been given the
 * reports up to number seen[k]; an indexed one (a map's) is called as
 * cb(f, item, ...), the others as cb(f, ...) */
#define REG_LISTENERS "procpool.listeners"
enum { LS_FUT = 1, LS_CBS, LS_SEEN, LS_INDEXED };
#define NOTES_MT "procpool.ReportNotes"

static const char delivering_key = 0; /* registry: true while callbacks run */

static void listeners(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, REG_LISTENERS) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_LISTENERS);
  }
}

/* [cb, future, note, indexed] -> calls cb(future, [item,] values...) */
static int call_body(lua_State *L) {
  const pp_report_note *n = lua_touserdata(L, 3);
  int indexed = lua_toboolean(L, 4);
  lua_settop(L, 2);
  if (indexed) lua_pushinteger(L, (lua_Integer)n->item + 1);
  pp_decode(L, n->blob->p + PP_REPORT_HDR, n->blob->n - PP_REPORT_HDR, NULL, 0, 0);
  lua_call(L, lua_gettop(L) - 1, 0);
  return 0;
}

static int tb_handler(lua_State *L) {
  if (pp_is_interrupt(L, 1)) return 1; /* as it is: the caller knows Ctrl-C by it */
  luaL_traceback(L, L, luaL_tolstring(L, 1, NULL), 1);
  return 1;
}

/* Call the callback at `cb` with the report `n` for the future at `fut`;
 * an error (of the callback, or decoding the values) is said on stderr.
 * Returns 1 for Ctrl-C, which the caller raises when its loop is done. */
static int call_one(lua_State *L, int cb, int fut, const pp_report_note *n, int indexed) {
  lua_pushcfunction(L, tb_handler);
  int h = lua_gettop(L);
  lua_pushcfunction(L, call_body);
  lua_pushvalue(L, cb);
  lua_pushvalue(L, fut);
  lua_pushlightuserdata(L, (void *)n);
  lua_pushboolean(L, indexed);
  int interrupted = 0;
  if (lua_pcall(L, 4, 0, h) != LUA_OK) {
    if (pp_is_interrupt(L, -1)) {
      interrupted = 1;
    } else {
      const char *fs = luaL_tolstring(L, fut, NULL);
      fprintf(stderr, "procpool: exception calling progress callback for %s: %s\n", fs,
              lua_tostring(L, -2));
      fflush(stderr);
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return interrupted;
}

/* ------------------------------------------------------------------ */
/* delivery                                                             */

/* The notes being delivered, in a box that frees what is left of them
 * if delivery is cut short. */
typedef struct notes {
  pp_report_note *head;
  int interrupted; /* Ctrl-C came in a callback (the others still ran) */
} notes;

static int notes_gc(lua_State *L) {
  notes *b = luaL_checkudata(L, 1, NOTES_MT);
  pp_report_notes_free(b->head);
  b->head = NULL;
  return 0;
}

/* [notes box] -> the callbacks of each note, in order; callback k of a
 * listener gets the notes numbered above seen[k] */
static int deliver_body(lua_State *L) {
  notes *b = lua_touserdata(L, 1);
  listeners(L);
  int ls = lua_gettop(L);
  while (b->head) {
    pp_report_note *n = b->head;
    lua_settop(L, ls);
    if (lua_rawgetp(L, ls, n->job) == LUA_TTABLE) {
      int l = lua_gettop(L);
      lua_rawgeti(L, l, LS_FUT);
      lua_rawgeti(L, l, LS_CBS);
      lua_rawgeti(L, l, LS_SEEN);
      lua_rawgeti(L, l, LS_INDEXED);
      lua_Integer m = (lua_Integer)lua_rawlen(L, l + 2);
      for (lua_Integer k = 1; k <= m; k++) { /* callbacks added meanwhile wait for the next */
        lua_rawgeti(L, l + 3, k);
        uint64_t seen = (uint64_t)lua_tointeger(L, -1);
        lua_pop(L, 1);
        if (seen >= n->num) continue;
        lua_pushinteger(L, (lua_Integer)n->num);
        lua_rawseti(L, l + 3, k);
        lua_rawgeti(L, l + 2, k);
        lua_rawgeti(L, l + 4, k);
        int indexed = lua_toboolean(L, -1);
        lua_pop(L, 1);
        b->interrupted |= call_one(L, lua_gettop(L), l + 1, n, indexed);
        lua_pop(L, 1);
      }
    }
    b->head = n->next;
    n->next = NULL;
    pp_report_notes_free(n);
  }
  return 0;
}

int pp_progress_delivering(lua_State *L) {
  int busy = lua_rawgetp(L, LUA_REGISTRYINDEX, &delivering_key) != LUA_TNIL;
  lua_pop(L, 1);
  return busy;
}

int pp_progress_deliver(lua_State *L, pp_engine *e) {
  pp_report_note *head = pp_engine_take_reports(e);
  if (!head) return 0;
  int top = lua_gettop(L);
  lua_pushcfunction(L, deliver_body);
  notes *b = lua_newuserdatauv(L, sizeof *b, 0);
  b->head = head;
  b->interrupted = 0;
  luaL_setmetatable(L, NOTES_MT);
  lua_pushvalue(L, -1);
  lua_insert(L, -3); /* the box stays, to read `interrupted` after the call */
  lua_pushboolean(L, 1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &delivering_key);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) { /* out of memory: the rest is lost */
    fprintf(stderr, "procpool: reports lost: %s\n", lua_tostring(L, -1));
    fflush(stderr);
  }
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &delivering_key);
  int interrupted = b->interrupted;
  lua_settop(L, top);
  return interrupted;
}

int pp_progress_forget(lua_State *L, pp_job *j) {
  listeners(L);
  int had = lua_rawgetp(L, -1, j) != LUA_TNIL;
  if (had) {
    lua_pushnil(L);
    lua_rawsetp(L, -3, j);
  }
  lua_pop(L, 2);
  return had;
}

/* ------------------------------------------------------------------ */
/* listening                                                            */

int pp_progress_listen(lua_State *L, int fut, pp_engine *e, pp_job *j, int cb, int indexed,
                       pp_report_note *latest) {
  fut = lua_absindex(L, fut);
  cb = lua_absindex(L, cb);
  int top = lua_gettop(L), added = 0;
  /* reports are queued from now on; the latest one, read after, is then
   * the newest this callback is given at once */
  int live = pp_engine_want_reports(e, j);
  pp_report_note n = {j, 0, 0, NULL, NULL};
  /* an indexed listener (a map chunk's, whose reports are queued from its
   * submit) is given every queued report, none at once: each item's
   * matters, not only the latest */
  if (!indexed) n.num = pp_engine_latest_report(e, j, &n.blob, &n.item);
  *latest = n;
  if (live) {
    listeners(L);
    if (lua_rawgetp(L, -1, j) != LUA_TTABLE) {
      lua_pop(L, 1);
      lua_createtable(L, 4, 0);
      lua_pushvalue(L, fut);
      lua_rawseti(L, -2, LS_FUT);
      for (int k = LS_CBS; k <= LS_INDEXED; k++) {
        lua_newtable(L);
        lua_rawseti(L, -2, k);
      }
      lua_pushvalue(L, -1);
      lua_rawsetp(L, -3, j);
      added = 1;
    }
    int l = lua_gettop(L);
    lua_rawgeti(L, l, LS_CBS);
    lua_Integer k = (lua_Integer)lua_rawlen(L, -1) + 1;
    lua_pushvalue(L, cb);
    lua_rawseti(L, -2, k);
    lua_rawgeti(L, l, LS_SEEN);
    lua_pushinteger(L, (lua_Integer)n.num);
    lua_rawseti(L, -2, k);
    lua_rawgeti(L, l, LS_INDEXED);
    lua_pushboolean(L, indexed);
    lua_rawseti(L, -2, k);
    lua_settop(L, top);
  }
  return added;
}

void pp_progress_catch_up(lua_State *L, int fut, int cb, pp_report_note *latest) {
  if (!latest->num) return;
  int interrupted = call_one(L, lua_absindex(L, cb), lua_absindex(L, fut), latest, 0);
  pp_blob_unref(latest->blob);
  latest->blob = NULL;
  if (interrupted) pp_interrupt_raise(L);
}

/* [blob] -> the report's values */
static int latest_body(lua_State *L) {
  const pp_blob *b = lua_touserdata(L, 1);
  return pp_decode(L, b->p + PP_REPORT_HDR, b->n - PP_REPORT_HDR, NULL, 0, 0);
}

int pp_progress_latest(lua_State *L, pp_engine *e, pp_job *j) {
  pp_blob *b;
  uint32_t item;
  if (!pp_engine_latest_report(e, j, &b, &item)) return 0;
  int top = lua_gettop(L);
  lua_pushcfunction(L, latest_body);
  lua_pushlightuserdata(L, b);
  int rc = lua_pcall(L, 1, LUA_MULTRET, 0);
  pp_blob_unref(b);
  if (rc != LUA_OK) lua_error(L);
  return lua_gettop(L) - top;
}

void pp_progress_cb_open(lua_State *L) {
  luaL_newmetatable(L, NOTES_MT);
  lua_pushcfunction(L, notes_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}
