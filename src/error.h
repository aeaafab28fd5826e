/* error.h: procpool's error objects (error.c). */
#ifndef PP_ERROR_H
#define PP_ERROR_H

#include <lua.h>

#include "pp.h"

/* Push a new error object {name = name, message = msg}. */
void pp_error_push(lua_State *L, const char *name, const char *msg);
/* Raise a new error object; the message is formatted as lua_pushfstring. */
PP_NORETURN void pp_error_raise(lua_State *L, const char *name, const char *fmt, ...);

#endif
