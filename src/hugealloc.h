/* hugealloc.h: a worker's Lua allocator that backs large new blocks with
 * transparent huge pages. */
#ifndef PP_HUGEALLOC_H
#define PP_HUGEALLOC_H

#include <lua.h>

/* Wrap L's allocator: a new block of PP_HUGE_MIN bytes or more is a fresh
 * 2 MiB-aligned mapping marked MADV_HUGEPAGE before anything touches it,
 * so that its first writes (a large string a task receives) fault in
 * 2 MiB pages, not 4 KiB ones: a fresh 64 MiB copy takes about half the
 * time. Where the kernel gives no huge pages the advice is ignored. For a
 * worker only: a host's own state keeps the allocator it chose. */
void pp_hugealloc_install(lua_State *L);

#define PP_HUGE_MIN ((size_t)4 << 20)

#endif
