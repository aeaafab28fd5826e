/* codec.h: the value codec: Lua values <-> bytes (encode.c, decode.c,
 * names.c; its format is codec_format.h's). */
#ifndef PP_CODEC_H
#define PP_CODEC_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "codec_format.h"

/* Encode the `n` values at stack index `first`... and append them to `out`
 * as a value list (count + values); with `header`, prefix the format
 * header (a whole message). `root` names the values in error paths
 * ("args" gives args[1], args[2]; "fn" a single value named fn).
 * On failure raises a SerializationError naming the path to the value;
 * `out` then holds partial output, which the caller discards: it must be
 * Lua-owned (a box) or freed by the caller when this raises.
 * `gather` (stack index of a table, or 0): strings of 32 KiB and more are
 * not copied into `out`; their buffer position and the string are
 * appended to that table instead, for the caller to splice in. */
void pp_encode(lua_State *L, int first, int n, pp_wbuf *out, int header, const char *root,
               int gather);

/* Decode a value list from s[0..len) and push its values; returns how
 * many. With `header`, expect the message header first. When `used` is
 * NULL the input must be consumed exactly; otherwise *used receives the
 * bytes read. Raises a SerializationError on any malformed input.
 * `fncache` (stack index or 0): a table in which functions with no
 * per-call state are cached by bytecode, so they are not load()ed again. */
int pp_decode(lua_State *L, const char *s, size_t len, size_t *used, int header, int fncache);

/* Fast paths for single values. pp_encode_scalar writes the list of the
 * one value at idx (count + value) to p (room for PP_ENCODE_SCALAR_MAX
 * bytes) and returns
 * its length, or 0 if that value needs pp_encode. pp_decode_first pushes
 * the first value of a list when it is a simple scalar and returns the
 * bytes it read (count and value), or returns 0 having pushed nothing (use
 * pp_decode); the list holds just that value when the count is 1 and the
 * bytes read are all of it. */
#define PP_ENCODE_SCALAR_MAX 80
size_t pp_encode_scalar(lua_State *L, int idx, int type, unsigned char *p);
/* Whether pp_encode_scalar takes the value at idx (of that type). */
int pp_encode_scalar_takes(lua_State *L, int idx, int type);
size_t pp_decode_first(lua_State *L, const char *s, size_t len);

/* Whether s[0..len) encodes a list of one Lua function whose upvalues are
 * all the receiver's globals (its _ENV), and nothing else: then how many
 * upvalues it has, else -1. Decoding such bytes again gives the same
 * function with those upvalues set to the globals, so a receiver may keep
 * the function it decoded from them and reset its upvalues instead. */
int pp_decode_fn_globals(const char *s, size_t len);

/* Push package.loaded[name], requiring it if needed. On failure returns 0
 * with *err set (the message is on the stack). */
int pp_push_module(lua_State *L, const char *name, size_t len, const char **err);
/* Push the function named "mod:fn", "mod.fn" (split at the last dot) or
 * "global". On failure returns 0 with *err set. */
int pp_resolve_name(lua_State *L, const char *name, size_t len, const char **err);

#endif
