/* reslimit.h: per-worker resource limits (the `limits` option), applied in
 * the worker: rlimits, niceness, and a cap on the Lua heap. */
#ifndef PP_RESLIMIT_H
#define PP_RESLIMIT_H

#include <stddef.h>
#include <stdint.h>

#include "channel.h" /* pp_limits, which the spawn context's CONFIG carries */

struct lua_State;

/* The worker's side: the state the limits need while tasks run. */
typedef struct pp_limiter {
  pp_limits lim;
  /* memory: the Lua allocator wrapped (see limited_alloc in reslimit.c) */
  void *(*alloc)(void *ud, void *ptr, size_t osize, size_t nsize); /* a lua_Alloc */
  void *alloc_ud;
  size_t used, cap;
  int refused; /* an allocation was refused since pp_limiter_refused */
  /* cpu: when the soft RLIMIT_CPU must be renewed (CLOCK_MONOTONIC ns) */
  uint64_t cpu_renew_ns;
} pp_limiter;

/* In a new worker, before its initializer: apply `lim` to this process
 * and wrap L's allocator. 0, or an errno with *what naming the limit
 * that could not be set. */
int pp_limiter_start(pp_limiter *l, struct lua_State *L, const pp_limits *lim, const char **what);

/* Before each item: give the task its CPU budget (cheap unless the
 * budget set before is running short), and forget earlier refusals. */
void pp_limiter_renew_cpu(pp_limiter *l, uint64_t now_ns);
static inline void pp_limiter_item(pp_limiter *l, uint64_t now_ns) {
  l->refused = 0;
  if (l->lim.cpu && now_ns >= l->cpu_renew_ns) pp_limiter_renew_cpu(l, now_ns);
}

/* 1 if the Lua heap cap refused an allocation in this item (since the
 * last call). */
int pp_limiter_refused(pp_limiter *l);

/* Lift the heap cap for good (the worker then reports its memory error
 * and retires). */
void pp_limiter_lift(pp_limiter *l);

#endif
