/* fncache.c: the encoded functions of an executor's recent submits. Jobs
 * are shared by bytes, not by function value: what a worker runs depends
 * only on the bytes it receives, so two encodings that are equal are
 * interchangeable, whatever the upvalues were when each was made (a
 * closure whose upvalues changed between submits encodes differently and
 * gets its own copy). */
#include "fncache.h"

#include <string.h>

pp_blob *pp_fncache_get(pp_fncache *c, const char *p, size_t n) {
  for (int k = 0; k < PP_FNCACHE_N && c->fn[k]; k++) {
    pp_blob *b = c->fn[k];
    if (b->n != n || memcmp(b->p, p, n) != 0) continue;
    memmove(c->fn + 1, c->fn, (size_t)k * sizeof *c->fn); /* to the front */
    c->fn[0] = b;
    return pp_blob_ref(b);
  }
  pp_blob *b = pp_blob_new(p, n);
  if (!b || n > PP_FNCACHE_MAX) return b;
  pp_blob_unref(c->fn[PP_FNCACHE_N - 1]);
  memmove(c->fn + 1, c->fn, (PP_FNCACHE_N - 1) * sizeof *c->fn);
  c->fn[0] = pp_blob_ref(b);
  return b;
}

void pp_fncache_clear(pp_fncache *c) {
  for (int k = 0; k < PP_FNCACHE_N; k++) {
    pp_blob_unref(c->fn[k]);
    c->fn[k] = NULL;
  }
}
