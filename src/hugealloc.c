/* hugealloc.c: huge pages for a worker's large Lua blocks (hugealloc.h). */
#define _GNU_SOURCE
#include "hugealloc.h"

#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define HUGE_PAGE ((size_t)2 << 20)
#define MAX_BLOCKS 256 /* large blocks alive at once; past that, the base allocator's */

/* The large blocks are mappings of their own, not the C library's: a
 * malloc would reuse free memory already touched in 4 KiB pages (a forked
 * worker inherits its parent's free lists). They are known by address:
 * Lua passes a block's size back with it, so only a block of PP_HUGE_MIN
 * bytes or more is looked up. */
typedef struct huge_block {
  void *p;
  size_t len; /* mapped bytes */
  int small;  /* Lua's size for it is below PP_HUGE_MIN (see nsmall) */
} huge_block;

typedef struct huge_alloc {
  lua_Alloc base;
  void *base_ud;
  huge_block blocks[MAX_BLOCKS];
  int nblocks;
  /* blocks Lua now takes for small ones: a shrink the base allocator
   * could not take (then each block is looked up, whatever its size) */
  int nsmall;
} huge_alloc;

static huge_alloc installed; /* one Lua state per worker process */

static size_t round_huge(size_t n) { return (n + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1); }

static huge_block *find(huge_alloc *h, const void *p) {
  for (int i = 0; i < h->nblocks; i++)
    if (h->blocks[i].p == p) return &h->blocks[i];
  return NULL;
}

static void set_small(huge_alloc *h, huge_block *b, int small) {
  h->nsmall += small - b->small;
  b->small = small;
}

/* A new mapping of at least n bytes, 2 MiB aligned, advised huge. */
static void *map_huge(size_t n, size_t *len) {
  size_t want = round_huge(n);
  char *m =
      mmap(NULL, want + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return NULL;
  char *p = (char *)(((uintptr_t)m + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
  if (p > m) munmap(m, (size_t)(p - m)); /* the unaligned head and tail */
  size_t tail = (size_t)(m + want + HUGE_PAGE - (p + want));
  if (tail) munmap(p + want, tail);
  madvise(p, want, MADV_HUGEPAGE); /* before the first write: faults take 2 MiB */
  *len = want;
  return p;
}

static void *huge_alloc_fn(void *ud, void *ptr, size_t osize, size_t nsize) {
  huge_alloc *h = ud;
  huge_block *b = ptr && (osize >= PP_HUGE_MIN || h->nsmall) ? find(h, ptr) : NULL;
  if (!b) {
    if (ptr || nsize < PP_HUGE_MIN || h->nblocks == MAX_BLOCKS)
      return h->base(h->base_ud, ptr, osize, nsize);
    size_t len;
    void *p = map_huge(nsize, &len); /* a new large block (osize is a type tag) */
    if (!p) return NULL;
    h->blocks[h->nblocks++] = (huge_block){p, len, 0};
    return p;
  }
  if (nsize >= PP_HUGE_MIN) { /* still large: the mapping grows or shrinks */
    size_t len = round_huge(nsize);
    set_small(h, b, 0);
    if (len == b->len) return ptr;
    void *p = mremap(ptr, b->len, len, MREMAP_MAYMOVE);
    if (p == MAP_FAILED) return len < b->len ? ptr : NULL; /* (a shrink keeps it whole) */
    b->p = p;
    b->len = len;
    return p;
  }
  void *p = NULL;
  if (nsize) { /* small now: back to the base allocator */
    p = h->base(h->base_ud, NULL, 0, nsize);
    if (!p) { /* Lua counts on a shrink never failing: keep the mapping (it is larger) */
      set_small(h, b, 1);
      return ptr;
    }
    memcpy(p, ptr, osize < nsize ? osize : nsize);
  }
  set_small(h, b, 0);
  munmap(ptr, b->len);
  *b = h->blocks[--h->nblocks];
  return p;
}

void pp_hugealloc_install(lua_State *L) {
  /* a worker of a pool inside a task is a fork of a worker: its state's
   * allocators (this one, perhaps under the memory limit's) are in place,
   * with the blocks they know of */
  if (installed.base) return;
  installed.base = lua_getallocf(L, &installed.base_ud);
  lua_setallocf(L, huge_alloc_fn, &installed);
}
