/* fncache.h: the encoded functions of an executor's recent submits, so
 * that jobs sending the same function bytes share one copy (no Lua). */
#ifndef PP_FNCACHE_H
#define PP_FNCACHE_H

#include <stddef.h>

#include "buf.h"

/* A few entries: repeated submits of one function (or a few in turn) are
 * the case that piles up pending jobs. */
#define PP_FNCACHE_N 4
/* Larger encodings (big upvalues) are not kept: the cache would hold
 * their memory after their jobs are gone. */
#define PP_FNCACHE_MAX 4096

typedef struct pp_fncache {
  pp_blob *fn[PP_FNCACHE_N]; /* most recently used first; NULL: empty */
} pp_fncache;

/* A blob holding the bytes p[0..n) (one reference, the caller's): a
 * cached one with the same bytes, or a new one, cached when small. NULL
 * when out of memory. */
pp_blob *pp_fncache_get(pp_fncache *c, const char *p, size_t n);
/* Drop every entry. */
void pp_fncache_clear(pp_fncache *c);

#endif
