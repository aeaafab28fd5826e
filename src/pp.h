/* pp.h: declarations shared by the Lua-facing C files of procpool.core. */
#ifndef PP_PP_H
#define PP_PP_H

#include <lua.h>
#include <lauxlib.h>

#if defined(__GNUC__)
#define PP_NORETURN __attribute__((noreturn))
#define PP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define PP_NORETURN
#define PP_PRINTF(a, b)
#endif

/* The cqueues pollable protocol (wait.c): events() ("r") and timeout()
 * (nil), shared by executors and futures, and a Future's pollfd(). */
int pp_pollable_events(lua_State *L);
int pp_pollable_timeout(lua_State *L);
int pp_future_pollfd(lua_State *L);

/* If the value at idx is an Executor, set *e to its engine (NULL once it
 * is closed) and return 1; else return 0 (executor.c). */
struct pp_engine;
int pp_executor_engine(lua_State *L, int idx, struct pp_engine **e);

/* Per-file registration, called in order by luaopen_procpool_core with the
 * module table on top of the stack. */
void pp_error_open(lua_State *L);
void pp_sys_open(lua_State *L);
void pp_codec_open(lua_State *L);
void pp_future_open(lua_State *L);
void pp_progress_cb_open(lua_State *L);
void pp_wait_open(lua_State *L);
void pp_cursor_open(lua_State *L);
void pp_engine_open(lua_State *L);
void pp_report_open(lua_State *L);

#endif
