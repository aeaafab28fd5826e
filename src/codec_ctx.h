/* codec_ctx.h: the codec's per-state context, which its parts share: the
 * name index, the bytecode cache and reusable scratch objects. */
#ifndef PP_CODEC_CTX_H
#define PP_CODEC_CTX_H

#include <lua.h>
#include <stddef.h>

/* user values of the context */
enum {
  PP_CTX_REVMAP = 1, /* the name index: value -> encoded name (names.c) */
  PP_CTX_DUMPS,      /* closure -> bytecode, weak keys (encode.c) */
  PP_CTX_ENC,        /* scratch encoder */
  PP_CTX_DEC,        /* scratch decoder */
  PP_CTX_SER,        /* scratch buffer of core.serialize */
  PP_CTX_N = PP_CTX_SER
};

typedef struct pp_codec_ctx {
  lua_Integer loaded_count; /* entries of package.loaded when indexed */
  int indexed;
} pp_codec_ctx;

/* Push the context (codec.c) and return it. */
pp_codec_ctx *pp_codec_ctx_push(lua_State *L);

/* A kind of scratch object, kept in one slot of the context for reuse. */
typedef struct pp_scratch_kind {
  int uv;                /* its slot */
  size_t size;           /* bytes */
  size_t busy_off;       /* offset of its in-use flag (an int) */
  const char *mt;        /* its metatable's name */
  lua_CFunction gc;      /* the metatable's __gc: frees what it holds */
  void (*init)(void *o); /* NULL, or finishes a new, zeroed one */
} pp_scratch_kind;

/* Push the scratch object of kind k of the context at ctxidx; one that
 * is absent or in use is replaced by a fresh one. *busy points at its
 * in-use flag. */
void *pp_codec_scratch(lua_State *L, int ctxidx, const pp_scratch_kind *k, int **busy);

/* The kinds encode.c and decode.c keep (their metatables are made when
 * the codec opens). */
extern const pp_scratch_kind pp_encoder_kind, pp_decoder_kind;

#endif
