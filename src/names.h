/* names.h: the name index, from which the encoder writes a value that
 * package.loaded reaches as its name (the way back is codec.h's
 * pp_push_module and pp_resolve_name, in names.c too). */
#ifndef PP_NAMES_H
#define PP_NAMES_H

#include <lua.h>

/* One encode call's use of the index. */
typedef struct pp_names {
  int ctxidx;                  /* stack index of the codec context */
  int revidx;                  /* stack index of the index table; a rebuild replaces it */
  int loaded_checked, rebuilt; /* each at most once per call */
} pp_names;

/* If the value at the top of the stack is reachable by name, push its
 * name as the encoder writes it (tag, module, key) and return 1; else
 * push nothing and return 0. `must`: the value can only go by name (a C
 * function), so a miss forces a rebuild of the index. */
int pp_names_find(lua_State *L, pp_names *n, int must);

#endif
