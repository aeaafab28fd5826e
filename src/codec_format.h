/* codec_format.h: the value codec's format: tags, header, sizes and
 * limits, and the one writer and reader of its varints and scalars. */
#ifndef PP_CODEC_FORMAT_H
#define PP_CODEC_FORMAT_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "le.h"

/* The scalar reader and writer are inlined into every hot loop. */
#if defined(__GNUC__)
#define PP_SCALAR_INLINE inline __attribute__((always_inline))
#else
#define PP_SCALAR_INLINE inline
#endif

/*
 * Format (little-endian throughout):
 *   message    = "\x1bPP" version:u8 list
 *   list       = count:varint value*count
 *   value      = tag payload
 * Tags 0x80-0xff are integers 0..127, 0x40-0x7f strings of 0..63 bytes.
 * Tables, functions and __serialize values carry the REFD bit when a later
 * REF points at them; a REF's payload is the byte offset of the target's
 * tag within the list, so unshared data costs nothing for sharing.
 */
#define PP_CODEC_VERSION 1
#define PP_CODEC_MAGIC "\x1bPP"
#define PP_CODEC_HEADER 4 /* the magic, then the version */

/* Deepest nesting of tables/functions either direction accepts. The codec
 * works iteratively (no C recursion), so this bounds the Lua stack only. */
#define PP_CODEC_MAX_DEPTH 100000

enum {
  PP_T_NIL = 0x00,
  PP_T_FALSE = 0x01,
  PP_T_TRUE = 0x02,
  PP_T_INT8 = 0x03,
  PP_T_INT16 = 0x04,
  PP_T_INT32 = 0x05,
  PP_T_INT64 = 0x06,
  PP_T_FLOAT = 0x07,
  PP_T_STR8 = 0x08,
  PP_T_STR32 = 0x09,
  PP_T_STR64 = 0x0a,
  PP_T_TABLE = 0x0b,    /* narr:u32 nhash:u32 value*narr (key value)*nhash */
  PP_T_TABLE_MT = 0x0c, /* as PP_T_TABLE, then the metatable */
  PP_T_REF = 0x0d,      /* offset:varint */
  PP_T_FUNC = 0x0e,     /* flags:u8 len:varint bytecode nups:u8 upvalue*nups */
  PP_T_UPREF = 0x0f,    /* (upvalue position only) func offset:varint index:u8 */
  PP_T_GLOBALS = 0x10,  /* the receiver's global table */
  PP_T_MODULE = 0x11,   /* name:string -> package.loaded[name] */
  PP_T_CFUNC = 0x12,    /* module:string key:string (a C function or light userdata) */
  PP_T_CUSTOM = 0x13,   /* constructor:string nargs:varint value*nargs */
  PP_T_REFD = 0x20,
  PP_T_FIXSTR = 0x40,
  PP_T_FIXINT = 0x80
};

#define PP_FN_PURE 0x01 /* PP_T_FUNC flags: upvalues are all names or immutable scalars */

/* A table's tag and counts: the counts are patched in once known. */
#define PP_TABLE_HDR 9
static inline void pp_table_counts_put(unsigned char *tag, uint32_t narr, uint32_t nhash) {
  pp_put32(tag + 1, narr);
  pp_put32(tag + 5, nhash);
}
static inline void pp_table_counts_get(const unsigned char *counts, uint32_t *narr,
                                       uint32_t *nhash) {
  *narr = pp_get32(counts);
  *nhash = pp_get32(counts + 4);
}

static inline void pp_codec_header_put(unsigned char *p) {
  memcpy(p, PP_CODEC_MAGIC, 3);
  p[3] = PP_CODEC_VERSION;
}

/* ------------------------------------------------------------------ */
/* varints: 7 bits a byte, low first                                    */

static inline size_t pp_varint_put(unsigned char *p, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    p[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  p[n++] = (unsigned char)v;
  return n;
}

/* Returns bytes read, 0 on truncated/overlong input (*v is then
 * meaningless). */
static inline size_t pp_varint_get(const unsigned char *p, size_t avail, uint64_t *v) {
  uint64_t r = 0;
  size_t n = 0;
  for (size_t i = 0; i < avail && i < 10; i++) {
    uint64_t b = p[i] & 0x7f;
    if (i == 9 && b > 1) break; /* overflows 64 bits */
    r |= b << (7 * i);
    if (!(p[i] & 0x80)) {
      if (i == 0 || p[i] != 0) n = i + 1; /* else overlong */
      break;
    }
  }
  *v = r;
  return n;
}

/* ------------------------------------------------------------------ */
/* scalars: nil, booleans, integers of each width, floats, strings      */

typedef struct pp_scalar {
  int type;        /* LUA_TNIL, LUA_TBOOLEAN, LUA_TNUMBER, LUA_TSTRING; LUA_TNONE: none */
  int isint;       /* a number: an integer (i), else a float (d) */
  int64_t i;       /* an integer, or a boolean (0 or 1) */
  double d;        /* a float */
  const char *s;   /* read: a string's bytes, in the input */
  uint64_t len;    /* a string's length */
  size_t short_at; /* read, input too short: bytes read before it ended */
} pp_scalar;

/* The most bytes pp_scalar_put writes. */
#define PP_SCALAR_MAX 9

/* Write the scalar's tag and payload: an integer in the fewest bytes
 * that hold it; a string's length, not its bytes (the caller writes them
 * after, or has them spliced in). Returns the bytes written. */
static PP_SCALAR_INLINE size_t pp_scalar_put(unsigned char *p, const pp_scalar *v) {
  switch (v->type) {
  case LUA_TNIL:
    p[0] = PP_T_NIL;
    return 1;
  case LUA_TBOOLEAN:
    p[0] = v->i ? PP_T_TRUE : PP_T_FALSE;
    return 1;
  case LUA_TNUMBER: {
    if (!v->isint) {
      uint64_t bits;
      memcpy(&bits, &v->d, 8);
      p[0] = PP_T_FLOAT;
      pp_put64(p + 1, bits);
      return 9;
    }
    int64_t i = v->i;
    if (i >= 0 && i < 128) {
      p[0] = (unsigned char)(PP_T_FIXINT | i);
      return 1;
    }
    if (i >= INT8_MIN && i <= INT8_MAX) {
      p[0] = PP_T_INT8;
      p[1] = (unsigned char)(i & 0xff);
      return 2;
    }
    if (i >= INT16_MIN && i <= INT16_MAX) {
      p[0] = PP_T_INT16;
      pp_put16(p + 1, (uint16_t)i);
      return 3;
    }
    if (i >= INT32_MIN && i <= INT32_MAX) {
      p[0] = PP_T_INT32;
      pp_put32(p + 1, (uint32_t)i);
      return 5;
    }
    p[0] = PP_T_INT64;
    pp_put64(p + 1, (uint64_t)i);
    return 9;
  }
  default: { /* LUA_TSTRING */
    uint64_t len = v->len;
    if (len < 64) {
      p[0] = (unsigned char)(PP_T_FIXSTR | len);
      return 1;
    }
    if (len < 256) {
      p[0] = PP_T_STR8;
      p[1] = (unsigned char)len;
      return 2;
    }
    if (len <= UINT32_MAX) {
      p[0] = PP_T_STR32;
      pp_put32(p + 1, (uint32_t)len);
      return 5;
    }
    p[0] = PP_T_STR64;
    pp_put64(p + 1, len);
    return 9;
  }
  }
}

/* Read the scalar whose tag is at p (p < e, the end of the input).
 * Returns the bytes it takes (tag, payload, a string's bytes); 0 when
 * the tag is not a scalar's (v->type is LUA_TNONE), or when the input
 * ends inside it (v->short_at: the bytes read before the missing ones). */
static PP_SCALAR_INLINE size_t pp_scalar_get(const unsigned char *p, const unsigned char *e,
                                             pp_scalar *v) {
  size_t left = (size_t)(e - p) - 1, w = 0; /* w: bytes of a string's length */
  unsigned t = p[0];
  v->short_at = 1;
  if (t >= PP_T_FIXINT) {
    v->type = LUA_TNUMBER;
    v->isint = 1;
    v->i = (int64_t)(t & 0x7f);
    return 1;
  }
  if (t >= PP_T_FIXSTR) {
    v->type = LUA_TSTRING;
    v->len = t & 0x3f;
  } else {
    switch (t) {
    case PP_T_NIL:
      v->type = LUA_TNIL;
      return 1;
    case PP_T_FALSE:
    case PP_T_TRUE:
      v->type = LUA_TBOOLEAN;
      v->i = t == PP_T_TRUE;
      return 1;
    case PP_T_INT8:
    case PP_T_INT16:
    case PP_T_INT32:
    case PP_T_INT64: {
      size_t n = t == PP_T_INT8 ? 1 : t == PP_T_INT16 ? 2 : t == PP_T_INT32 ? 4 : 8;
      v->type = LUA_TNUMBER;
      v->isint = 1;
      if (left < n) return 0;
      v->i = n == 1   ? (int64_t)(int8_t)p[1]
             : n == 2 ? (int64_t)(int16_t)pp_get16(p + 1)
             : n == 4 ? (int64_t)(int32_t)pp_get32(p + 1)
                      : (int64_t)pp_get64(p + 1);
      return 1 + n;
    }
    case PP_T_FLOAT: {
      v->type = LUA_TNUMBER;
      v->isint = 0;
      if (left < 8) return 0;
      uint64_t bits = pp_get64(p + 1);
      memcpy(&v->d, &bits, 8);
      return 9;
    }
    case PP_T_STR8:
    case PP_T_STR32:
    case PP_T_STR64:
      v->type = LUA_TSTRING;
      w = t == PP_T_STR8 ? 1 : t == PP_T_STR32 ? 4 : 8;
      if (left < w) return 0;
      v->len = w == 1 ? p[1] : w == 4 ? pp_get32(p + 1) : pp_get64(p + 1);
      break;
    default:
      v->type = LUA_TNONE;
      return 0;
    }
  }
  if (left - w < v->len) {
    v->short_at = 1 + w;
    return 0;
  }
  v->s = (const char *)p + 1 + w;
  return 1 + w + (size_t)v->len;
}

#endif
