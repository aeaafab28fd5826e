/* reslimit.c: per-worker resource limits, applied inside the worker. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <unistd.h>

#include <lua.h>

#include "reslimit.h"

/* Headroom of the address-space limit over the heap cap: thread stacks,
 * the codec's buffers and mappings of task payloads are outside the Lua
 * heap. A C allocation past both fails (malloc returns NULL). */
#define AS_SLACK (64u << 20)

/* Lua's allocator, refusing to grow the heap past the cap. Shrinking and
 * freeing always go through (Lua relies on that); a refusal makes Lua
 * collect and retry once, then raise "not enough memory". */
static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  pp_limiter *l = ud;
  size_t old = ptr ? osize : 0; /* for a new block, osize is its type */
  if (nsize > old && nsize - old > l->cap - l->used) {
    l->refused = 1;
    return NULL;
  }
  void *p = l->alloc(l->alloc_ud, ptr, osize, nsize);
  if (p || nsize == 0) l->used = l->used - old + nsize;
  return p;
}

/* Set soft and hard limit to `v` (a worker never needs more back). */
static int set_limit(int res, rlim_t v) {
  struct rlimit r = {v, v};
  return setrlimit(res, &r) == 0 ? 0 : errno;
}

#if !defined(__SANITIZE_ADDRESS__)
/* The process's virtual size, from /proc/self/statm (0 if unknown). */
static uint64_t vm_bytes(void) {
  FILE *f = fopen("/proc/self/statm", "re");
  unsigned long pages = 0;
  if (!f) return 0;
  if (fscanf(f, "%lu", &pages) != 1) pages = 0;
  fclose(f);
  return (uint64_t)pages * (uint64_t)sysconf(_SC_PAGESIZE);
}
#endif

static uint64_t cpu_used_ns(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) * 1000000000u +
         ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000u;
}

/* RLIMIT_CPU counts whole seconds of the process's CPU time, so each task
 * gets the soft limit set to ceil(used + cpu): between cpu and cpu + 1 s
 * of its own. The next renewal is due once that much wall time has
 * passed as the budget's slack: a task thread uses CPU time no faster
 * than wall time, so an item starting before then has its whole budget
 * without a system call. */
void pp_limiter_renew_cpu(pp_limiter *l, uint64_t now_ns) {
  uint64_t used = cpu_used_ns(), want = used + (uint64_t)l->lim.cpu * 1000000000u;
  uint64_t soft = (want + 999999999u) / 1000000000u;
  struct rlimit r;
  if (getrlimit(RLIMIT_CPU, &r) == 0 && (r.rlim_max == RLIM_INFINITY || soft <= r.rlim_max)) {
    r.rlim_cur = (rlim_t)soft;
    setrlimit(RLIMIT_CPU, &r);
  }
  l->cpu_renew_ns = now_ns + (soft * 1000000000u - want);
}

int pp_limiter_start(pp_limiter *l, lua_State *L, const pp_limits *lim, const char **what) {
  memset(l, 0, sizeof *l);
  l->lim = *lim;
  int err;
  if (lim->nofile) {
    *what = "nofile";
    if ((err = set_limit(RLIMIT_NOFILE, lim->nofile)) != 0) return err;
  }
  if (lim->nice) {
    *what = "nice";
    errno = 0;
    if (nice(lim->nice) == -1 && errno) return errno;
  }
  if (lim->cpu) {
    /* past the soft limit the kernel sends SIGXCPU, whose default action
     * ends the worker (the parent names the limit); no core file */
    *what = "cpu";
    signal(SIGXCPU, SIG_DFL);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGXCPU);
    sigprocmask(SIG_UNBLOCK, &s, NULL);
    set_limit(RLIMIT_CORE, 0);
    pp_limiter_renew_cpu(l, 0);
    l->cpu_renew_ns = 0; /* each first item renews with its own clock */
  }
  if (lim->memory) {
    *what = "memory";
    l->alloc = lua_getallocf(L, &l->alloc_ud);
    l->used = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024u + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
    l->cap = lim->memory > SIZE_MAX - l->used ? SIZE_MAX : l->used + (size_t)lim->memory;
    lua_setallocf(L, limited_alloc, l);
#if !defined(__SANITIZE_ADDRESS__)
    /* C allocations too (and what the task starts): the address space may
     * grow by the limit and a little more. One malloc arena, as each
     * thread's own arena would reserve 64 MiB of it. Not under ASan,
     * whose shadow memory is address space. */
    mallopt(M_ARENA_MAX, 1);
    uint64_t vm = vm_bytes();
    struct rlimit r;
    if (vm && getrlimit(RLIMIT_AS, &r) == 0) {
      rlim_t want = (rlim_t)(vm + lim->memory + AS_SLACK);
      if (r.rlim_max == RLIM_INFINITY || want < r.rlim_max) r.rlim_max = want;
      r.rlim_cur = r.rlim_max;
      if (setrlimit(RLIMIT_AS, &r) != 0) return errno;
    }
#endif
  }
  *what = NULL;
  return 0;
}

int pp_limiter_refused(pp_limiter *l) {
  int r = l->refused;
  l->refused = 0;
  return r;
}

void pp_limiter_lift(pp_limiter *l) {
  if (l->lim.memory) l->cap = SIZE_MAX;
}
