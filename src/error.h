/* error.h: procpool's error objects (error.c). */
#ifndef PP_ERROR_H
#define PP_ERROR_H

#include <lua.h>

#include "pp.h"

/* Push a new error object {name = name, message = msg}. */
void pp_error_push(lua_State *L, const char *name, const char *msg);
/* Raise a new error object; the message is formatted as lua_pushfstring. */
PP_NORETURN void pp_error_raise(lua_State *L, const char *name, const char *fmt, ...);

/* Whether the value at idx is Ctrl-C in the stand-alone interpreter:
 * lua.c's SIGINT handler sets a hook that raises "interrupted!" (perhaps
 * after a position) at the next call or line, wherever that is, also
 * inside a protected call of ours that makes an error into a result or a
 * report. Such a call must raise an interrupt again (the hook runs once:
 * Ctrl-C would be lost), and a message handler give it back unchanged. */
int pp_is_interrupt(lua_State *L, int idx);
/* Raise Ctrl-C's error, once a loop that caught one (and went on with
 * its other callbacks, so that none is lost) has ended. */
PP_NORETURN void pp_interrupt_raise(lua_State *L);

#endif
