/* proc.h: the zygote and worker processes (fork context). */
#ifndef PP_PROC_H
#define PP_PROC_H

#include <lua.h>
#include <signal.h>
#include <sys/types.h>

#include "channel.h"
#include "reslimit.h"

/* What a worker needs from the state it was forked with. */
typedef struct pp_wctx {
  int init_idx;  /* stack index of the initializer (0: none) */
  int init_n;    /* number of initargs that follow it */
  int init_str;  /* the initializer is a "module.name" string */
  pp_limits lim; /* the `limits` option */
} pp_wctx;

/* Fork a helper process (the zygote, the host proxy) with a control
 * socket to it (SOCK_SEQPACKET), every signal blocked around the fork so
 * that none reaches the child before it has set itself up. Returns the
 * child's pid, or -1 with errno. In the parent, *fd is its end; in the
 * child (0 returned), *fd is the child's end and *old the signal mask to
 * restore once it is ready, signals still all blocked. */
pid_t pp_fork_helper(int *fd, sigset_t *old);

/* Fork the zygote from the calling (Lua) thread. The child keeps a copy of
 * L and never returns from this call. In the parent: 0 with *zpid and
 * *zfd (its control socket), or an errno. */
int pp_zygote_fork(lua_State *L, const pp_wctx *w, pid_t *zpid, int *zfd);

/* Spawn context: start `exe` (found on PATH), a Lua 5.4 interpreter, as
 * the zygote; `paths` are the package.path and package.cpath it finds
 * procpool with. Send it the encoded initializer list `init` (may be
 * NULL) and the workers' limits, and wait for it to be ready. In the parent: 0 with *zpid and
 * *zfd, or an errno with `why` filled. */
int pp_zygote_spawn(const char *exe, const char *const paths[2], const char *init, size_t initlen,
                    const pp_limits *lim, pid_t *zpid, int *zfd, char *why, size_t whylen);

/* In a spawned interpreter (procpool.core's _zygote): become the zygote of
 * the parent on fd 3. Never returns. */
void pp_zygote_spawned(lua_State *L) __attribute__((noreturn));

/* The worker's main loop (worker.c); never returns. */
void pp_worker_main(lua_State *L, int fd, pp_page *page, int slot, const pp_wctx *w)
    __attribute__((noreturn));

/* Close every fd from `lowfd` up, except `keep` (may be -1). */
void pp_close_from(int lowfd, int keep);

#endif
