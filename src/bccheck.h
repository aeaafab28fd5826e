/* bccheck.h: the structure check of function bytecode before lua_load. */
#ifndef PP_BCCHECK_H
#define PP_BCCHECK_H

#include <stddef.h>

/* 1 if s[0..len) is exactly one Lua 5.4 dump as lua_dump writes it on
 * this platform (header, the closure's upvalue count, its function) and
 * every count in it fits the bytes that remain; 0 otherwise. */
int pp_bytecode_ok(const char *s, size_t len);

#endif
