/* proc.c: the zygote: forks workers on request, reaps them, reports exits. */
#define _GNU_SOURCE
#include "proc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lauxlib.h>

#include "buf.h"
#include "codec.h"
#include "forkgate.h"

#define ZCTL 3 /* the zygote's control socket lives at this fd */

void pp_close_from(int lowfd, int keep) {
#ifdef SYS_close_range
  if (keep < lowfd) {
    if (syscall(SYS_close_range, (unsigned)lowfd, ~0u, 0) == 0) return;
  } else {
    int ok = 1;
    if (keep > lowfd) ok = syscall(SYS_close_range, (unsigned)lowfd, (unsigned)keep - 1, 0) == 0;
    if (ok && syscall(SYS_close_range, (unsigned)keep + 1, ~0u, 0) == 0) return;
  }
#endif
  /* older kernels: walk /proc/self/fd (collect first, then close) */
  DIR *d = opendir("/proc/self/fd");
  if (d) {
    int fds[4096], n = 0, dfd = dirfd(d);
    struct dirent *de;
    while ((de = readdir(d)) && n < 4096) {
      int fd = atoi(de->d_name);
      if (fd >= lowfd && fd != keep && fd != dfd) fds[n++] = fd;
    }
    closedir(d);
    for (int i = 0; i < n; i++) close(fds[i]);
    return;
  }
  for (int fd = lowfd; fd < 65536; fd++)
    if (fd != keep) close(fd);
}

static void zsend(const pp_zmsg *m, const int *fds, int nfds) {
  pp_send_fds(ZCTL, m, sizeof *m, fds, nfds, 0);
}

typedef struct zstate {
  lua_State *L;
  const pp_wctx *wctx;
  sigset_t mask; /* the host's signal mask, restored in workers */
  int sfd;
  pid_t *kids;
  int nkids, capkids;
} zstate;

static void spawn_worker(zstate *z, uint32_t slot, uint32_t gen) {
  pp_zmsg m;
  memset(&m, 0, sizeof m);
  m.slot = slot;
  m.gen = gen;
  int sv[2] = {-1, -1}, pg = -1, ep[2] = {-1, -1};
  pp_page *page = MAP_FAILED;
  pid_t pid = -1;
  int err = 0;
  if (z->nkids == z->capkids) {
    int cap = z->capkids ? z->capkids * 2 : 16;
    pid_t *k = realloc(z->kids, (size_t)cap * sizeof *k);
    if (!k)
      err = ENOMEM;
    else {
      z->kids = k;
      z->capkids = cap;
    }
  }
  if (!err && socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) err = errno;
  if (!err && (pg = memfd_create("procpool-page", MFD_CLOEXEC)) < 0) err = errno;
  /* the worker's stderr goes through the parent, which keeps its tail */
  if (!err && pipe2(ep, O_CLOEXEC) != 0) err = errno;
  if (!err && ftruncate(pg, 4096) != 0) err = errno;
  if (!err) {
    page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, pg, 0);
    if (page == MAP_FAILED) err = errno;
  }
  if (!err) {
    pid_t zpid = getpid();
    pid = fork();
    if (pid == 0) {
      /* the worker, leading a process group of its own: what its tasks
       * start (os.execute, io.popen) is stopped with it */
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != zpid) _exit(1);
      close(sv[0]);
      close(pg);
      close(z->sfd);
      close(ZCTL);
      close(ep[0]);
      dup2(ep[1], 2);
      close(ep[1]);
      sigprocmask(SIG_SETMASK, &z->mask, NULL);
      pp_worker_main(z->L, sv[1], page, (int)slot, z->wctx);
    }
    if (pid < 0)
      err = errno;
    else
      setpgid(pid, pid); /* also here: no signal to the group can precede it */
  }
  if (err) {
    m.type = PP_Z_SPAWNFAIL;
    m.err = err;
    zsend(&m, NULL, 0);
  } else {
    z->kids[z->nkids++] = pid;
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    int fds[4] = {sv[0], pidfd >= 0 ? pidfd : sv[0], pg, ep[0]};
    m.type = PP_Z_SPAWNED;
    m.pid = pid;
    m.err = pidfd >= 0 ? 0 : ENOSYS; /* the parent drops the stand-in */
    m.nfds = 4;
    zsend(&m, fds, 4);
    if (pidfd >= 0) close(pidfd);
  }
  if (page != MAP_FAILED) munmap(page, 4096);
  if (pg >= 0) close(pg);
  if (sv[0] >= 0) close(sv[0]);
  if (sv[1] >= 0) close(sv[1]);
  if (ep[0] >= 0) close(ep[0]);
  if (ep[1] >= 0) close(ep[1]);
}

static void reap(zstate *z) {
  int st;
  pid_t pid;
  while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
    for (int i = 0; i < z->nkids; i++)
      if (z->kids[i] == pid) {
        z->kids[i] = z->kids[--z->nkids];
        break;
      }
    pp_zmsg m;
    memset(&m, 0, sizeof m);
    m.type = PP_Z_EXITED;
    m.pid = pid;
    m.status = st;
    zsend(&m, NULL, 0);
  }
}

__attribute__((noreturn)) static void zygote_main(lua_State *L, const pp_wctx *w, int ctl,
                                                  pid_t parent, const sigset_t *mask) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(0);
  signal(SIGINT, SIG_IGN); /* Ctrl-C is the parent's to act on */
  /* The garbage the parent had is collected here, once for all workers,
   * while the fds are still the parent's: a file handle dropped without
   * io.close closes its own fd now, not later in a worker, where that
   * number is the worker's channel (or the zygote's, below). And
   * limits.memory counts from what a worker holds at start: without the
   * garbage, which its workers would free and then have as room past the
   * limit. */
  lua_gc(L, LUA_GCCOLLECT, 0);
  if (ctl != ZCTL) {
    dup2(ctl, ZCTL);
    close(ctl);
  }
  pp_spare_forget(); /* the parent's, and its fd is closed just below */
  pp_close_from(ZCTL + 1, -1);
  zstate z;
  memset(&z, 0, sizeof z);
  z.L = L;
  z.wctx = w;
  z.mask = *mask;
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigset_t zmask = *mask;
  sigaddset(&zmask, SIGCHLD);
  sigprocmask(SIG_SETMASK, &zmask, NULL);
  z.sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  if (z.sfd < 0) _exit(1);
  for (;;) {
    struct pollfd p[2] = {{ZCTL, POLLIN, 0}, {z.sfd, POLLIN, 0}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (p[1].revents) {
      struct signalfd_siginfo si;
      while (read(z.sfd, &si, sizeof si) > 0) {
      }
      reap(&z);
    }
    if (p[0].revents) {
      pp_zmsg m;
      ssize_t r = recv(ZCTL, &m, sizeof m, MSG_DONTWAIT);
      if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (r <= 0) break; /* the parent closed: end */
      if (r == (ssize_t)sizeof m && m.type == PP_Z_SPAWN) spawn_worker(&z, m.slot, m.gen);
    }
  }
  /* our workers go with us */
  for (int i = 0; i < z.nkids; i++) kill(-z.kids[i], SIGKILL);
  while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {
  }
  _exit(0);
}

pid_t pp_fork_helper(int *fd, sigset_t *old) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return -1;
  sigset_t all;
  sigfillset(&all);
  fflush(NULL); /* no buffered output is written twice */
  pthread_sigmask(SIG_SETMASK, &all, old);
  pid_t pid = pp_forkgate_fork();
  if (pid == 0) {
    close(sv[0]);
    *fd = sv[1];
    return 0;
  }
  int err = errno;
  pthread_sigmask(SIG_SETMASK, old, NULL);
  close(sv[1]);
  if (pid < 0) {
    close(sv[0]);
    errno = err;
    return -1;
  }
  *fd = sv[0];
  return pid;
}

int pp_zygote_fork(lua_State *L, const pp_wctx *w, pid_t *zpid, int *zfd) {
  sigset_t old;
  int fd;
  pid_t parent = getpid();
  pid_t pid = pp_fork_helper(&fd, &old);
  if (pid == 0) zygote_main(L, w, fd, parent, &old);
  if (pid < 0) return errno;
  *zpid = pid;
  *zfd = fd;
  return 0;
}

/* ------------------------------------------------------------------ */
/* spawn context                                                        */

extern char **environ;

/* The spawned interpreter runs this one fixed line. It finds procpool
 * through the parent's package.path and package.cpath, which spawn_env
 * puts in LUA_PATH_5_4 and LUA_CPATH_5_4 (the variables lua5.4 reads
 * first); pp_zygote_spawned puts back what the user had in them. */
#define SPAWN_ENTRY "require('procpool.core')._zygote()"

/* Both search paths, and for each the name under which its original value
 * travels (absent: it was not set). */
static const char *const SPAWN_VARS[2] = {"LUA_PATH_5_4", "LUA_CPATH_5_4"};
static const char *const SPAWN_SAVED[2] = {"PROCPOOL_SAVED_LUA_PATH_5_4",
                                           "PROCPOOL_SAVED_LUA_CPATH_5_4"};

static int env_is(const char *entry, const char *name) {
  size_t n = strlen(name);
  return strncmp(entry, name, n) == 0 && entry[n] == '=';
}

static void free_env(char **env, size_t own) {
  for (size_t i = 0; i < own; i++) free(env[i]);
  free(env);
}

static char *env_entry(const char *name, const char *value) {
  size_t n = strlen(name) + strlen(value) + 2;
  char *e = malloc(n);
  if (e) snprintf(e, n, "%s=%s", name, value);
  return e;
}

/* environ with the search paths set to `paths` and the originals saved,
 * in env[0..*own-1] (allocated here; the rest are environ's own strings);
 * NULL when out of memory. Free with free_env. */
static char **spawn_env(const char *const paths[2], size_t *own) {
  size_t n = 0;
  while (environ[n]) n++;
  char **env = calloc(n + 5, sizeof *env);
  if (!env) return NULL;
  size_t k = 0;
  int ok = 1;
  for (int v = 0; v < 2 && ok; v++) {
    const char *orig = getenv(SPAWN_VARS[v]);
    ok = (env[k++] = env_entry(SPAWN_VARS[v], paths[v])) != NULL;
    if (ok && orig) ok = (env[k++] = env_entry(SPAWN_SAVED[v], orig)) != NULL;
  }
  *own = k;
  for (size_t i = 0; i < n && ok; i++) {
    int skip = 0;
    for (int v = 0; v < 2; v++)
      skip |= env_is(environ[i], SPAWN_VARS[v]) || env_is(environ[i], SPAWN_SAVED[v]);
    if (!skip) env[k++] = environ[i];
  }
  env[k] = NULL;
  if (!ok) {
    free_env(env, *own);
    return NULL;
  }
  return env;
}

int pp_zygote_spawn(const char *exe, const char *const paths[2], const char *init, size_t initlen,
                    const pp_limits *lim, pid_t *zpid, int *zfd, char *why, size_t whylen) {
  int sv[2];
  why[0] = 0;
  size_t own;
  char **env = spawn_env(paths, &own);
  if (!env) return ENOMEM;
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    int err = errno;
    free_env(env, own);
    return err;
  }
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&at);
  /* the child's end becomes its fd 3 (dup2 clears CLOEXEC there) */
  posix_spawn_file_actions_adddup2(&fa, sv[1], ZCTL);
  /* a fresh interpreter: default signal handling, nothing blocked */
  sigset_t all, none;
  sigfillset(&all);
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&at, &all);
  posix_spawnattr_setsigmask(&at, &none);
  posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
  char *argv[] = {(char *)exe, (char *)"-e", (char *)SPAWN_ENTRY, NULL};
  pid_t pid;
  fflush(NULL);
  int rc = posix_spawnp(&pid, exe, &fa, &at, argv, env);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&at);
  free_env(env, own);
  close(sv[1]);
  if (rc != 0) {
    close(sv[0]);
    snprintf(why, whylen, "cannot run '%s': %s", exe, strerror(rc));
    return rc;
  }
  /* the initializer, in a memfd (any size) */
  pp_zmsg m;
  memset(&m, 0, sizeof m);
  m.type = PP_Z_CONFIG;
  m.pid = getpid();
  m.lim = *lim;
  int mfd = -1, err = 0;
  if (init && initlen) {
    mfd = memfd_create("procpool-init", MFD_CLOEXEC);
    if (mfd < 0 || write(mfd, init, initlen) != (ssize_t)initlen) err = errno ? errno : EIO;
    m.len = initlen;
  }
  if (!err && pp_send_fds(sv[0], &m, sizeof m, &mfd, mfd >= 0, 0) < 0) err = errno;
  if (mfd >= 0) close(mfd);
  /* wait for HELLO: the interpreter started, loaded procpool, decoded the
   * initializer */
  if (!err) {
    struct pollfd p = {sv[0], POLLIN, 0};
    int ms = 30000;
    while ((rc = poll(&p, 1, ms)) < 0 && errno == EINTR) {
    }
    ssize_t r = rc == 1 ? recv(sv[0], &m, sizeof m, 0) : -1;
    if (rc == 0) {
      err = ETIMEDOUT;
      snprintf(why, whylen, "'%s' did not start within 30 s", exe);
    } else if (r != (ssize_t)sizeof m || m.type != PP_Z_HELLO) {
      err = ECHILD;
      snprintf(why, whylen,
               "'%s' exited before it was ready (can it load procpool with this "
               "package.path and package.cpath?)",
               exe);
    } else if (m.err) {
      err = m.err;
      m.text[sizeof m.text - 1] = 0;
      snprintf(why, whylen, "%s", m.text);
    }
  }
  if (err) {
    close(sv[0]);
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    if (!why[0]) snprintf(why, whylen, "%s", strerror(err));
    return err;
  }
  *zpid = pid;
  *zfd = sv[0];
  return 0;
}

static void hello(int err, const char *text) {
  pp_zmsg m;
  memset(&m, 0, sizeof m);
  m.type = PP_Z_HELLO;
  m.err = err;
  if (text) snprintf(m.text, sizeof m.text, "%s", text);
  zsend(&m, NULL, 0);
}

static int decode_init(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t n = (size_t)lua_tointeger(L, 2);
  lua_settop(L, 0);
  return pp_decode(L, p, n, NULL, 1, 0);
}

/* The user's own search path variables, as they were before spawn_env. */
static void restore_env(void) {
  for (int v = 0; v < 2; v++) {
    const char *orig = getenv(SPAWN_SAVED[v]);
    if (orig)
      setenv(SPAWN_VARS[v], orig, 1);
    else
      unsetenv(SPAWN_VARS[v]);
    unsetenv(SPAWN_SAVED[v]);
  }
}

void pp_zygote_spawned(lua_State *L) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  restore_env();
  /* the configuration: the parent's pid, the initializer list, if any */
  pp_zmsg m;
  memset(&m, 0, sizeof m);
  int mfd = -1, nfds;
  long r = pp_recv_fds(ZCTL, &m, sizeof m, &mfd, 1, &nfds, 0);
  if (r != (long)sizeof m || m.type != PP_Z_CONFIG) _exit(1);
  pid_t parent = m.pid;
  if (getppid() != parent) _exit(0); /* it went before the death signal was set */
  if (nfds == 0) mfd = -1;
  pp_wctx w;
  memset(&w, 0, sizeof w);
  w.lim = m.lim;
  lua_settop(L, 0);
  if (mfd >= 0) {
    int err = 0;
    pp_blob *b = pp_blob_map(mfd, (size_t)m.len, 0, &err);
    close(mfd);
    if (!b) {
      hello(err, "cannot read the initializer");
      _exit(1);
    }
    lua_pushcfunction(L, decode_init);
    lua_pushlightuserdata(L, b->p);
    lua_pushinteger(L, (lua_Integer)b->n);
    int base = lua_gettop(L) - 3;
    if (lua_pcall(L, 2, LUA_MULTRET, 0) != LUA_OK) {
      const char *msg = luaL_tolstring(L, -1, NULL);
      char text[200];
      snprintf(text, sizeof text, "cannot load the initializer in the new interpreter: %s", msg);
      hello(EINVAL, text);
      _exit(1);
    }
    pp_blob_unref(b);
    int n = lua_gettop(L) - base;
    if (n >= 1) {
      w.init_idx = base + 1;
      w.init_str = lua_type(L, base + 1) == LUA_TSTRING;
      w.init_n = n - 1;
    }
  }
  hello(0, NULL);
  sigset_t none;
  sigemptyset(&none);
  zygote_main(L, &w, ZCTL, parent, &none);
}
