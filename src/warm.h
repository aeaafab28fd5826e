/* warm.h: large heap buffers kept for reuse, so their pages stay mapped. */
#ifndef PP_WARM_H
#define PP_WARM_H

#include <stddef.h>

/* A map's chunks allocate buffers of a few hundred KiB each (item
 * records, encoded arguments, result frames) and free them a moment
 * later. malloc hands such sizes back to the kernel (munmap, or a trim
 * of the heap's top), so each new one starts on pages the kernel must
 * find and zero: a third of the parent's time in a map of no-ops. Kept
 * here instead, they are reused warm.
 *
 * Buffers of at least PP_WARM_MIN bytes only; whether a buffer came from
 * here is the caller's to know (by its size: every caller decides by the
 * same rule at alloc and at free). A forked child bypasses the cache (its
 * entries are its parent's pages, and its lock may have been held at the
 * fork): alloc and free are then malloc and free. */
#define PP_WARM_MIN ((size_t)64 << 10)

/* At least n bytes (n >= PP_WARM_MIN), uninitialized; NULL when out of
 * memory. */
void *pp_warm_alloc(size_t n);
/* How many bytes p (from pp_warm_alloc) may hold: at least what was asked. */
size_t pp_warm_cap(const void *p);
/* Give p (from pp_warm_alloc, or NULL) back: kept for reuse, or freed. */
void pp_warm_free(void *p);
/* A pool is made (+1) or freed (-1): buffers are kept only while one
 * lives, and with the last one gone every kept buffer is freed. */
void pp_warm_users(int delta);
/* The bytes kept now (for tests and statistics). */
size_t pp_warm_kept(void);

#endif
