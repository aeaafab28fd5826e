/* hostproxy.c: the zygote of a pool on hosts (hostproxy.h). One local
 * process for all the pool's hosts: for each, a launcher (ssh, srun, a
 * plain exec) runs the agent (agent.c) with the link (link.h) on its
 * stdin and stdout. To the engine the proxy is a zygote: a worker on a
 * host is, here, a local socketpair relayed over the link, a page the
 * proxy writes when the worker dies (the seq it was running), and a
 * stderr pipe fed from the host. */
#define _GNU_SOURCE
#include "hostproxy.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec_format.h"
#include "engine.h" /* pp_now_ns */
#include "le.h"
#include "link.h"
#include "proc.h"

#define ZFD 3               /* the engine's socket, in the proxy */
#define PING_NS 1000000000u /* idle time before a PING */
#define NOISE_MAX 65536     /* bytes a login may print before the agent's magic */

extern char **environ;

/* STARTING: until the magic; HELLO: until its HELLO; KNOWN: waiting for
 * the other hosts' HELLO (the slots are shared out once every host's
 * worker count is known); CONFIG: until its READY; RETRY: lost, waiting
 * to be launched again; FAILED: given up */
enum { H_WAITING, H_STARTING, H_HELLO, H_KNOWN, H_CONFIG, H_UP, H_FAILED, H_RETRY };
/* a host up this long starts its reconnects afresh when lost */
#define STABLE_NS 60000000000u
#define RETRY_MAX_NS 60000000000u /* the longest wait before a reconnect */
/* WAITING: not launched yet. At most MAX_STARTING hosts start at once:
 * sshd refuses connections past its MaxStartups (10 by default). */
#define MAX_STARTING 10

typedef struct hp_host {
  const pp_host *cfg;
  int state;
  pid_t lpid;      /* the launcher, until reaped */
  int lstatus;     /* its wait status, once reaped */
  int sock;        /* our end of its stdin and stdout */
  int errfd;       /* its stderr */
  char tail[1024]; /* the end of what it wrote to stderr */
  size_t taillen;
  char noise[512]; /* the start of what came before the magic */
  size_t noiselen, noiseall;
  unsigned char win[PP_LINK_MAGIC_LEN]; /* the last bytes read before the magic */
  pp_link link;
  uint32_t first, count, ncpu; /* its engine slots; its CPUs */
  uint64_t start_ns;
  uint64_t up_ns;    /* when it was last READY */
  uint64_t ping_ns;  /* when it was last sent a timed PING */
  uint64_t retry_at; /* RETRY: when it is launched again */
  uint32_t tries;    /* reconnects since it was last up for STABLE_NS */
  pp_host_status *st;
  char why[600];
} hp_host;

/* Its link is open: the agent has spoken, the host is not lost. */
static int linked(const hp_host *h) { return h->state >= H_HELLO && h->state <= H_UP; }

/* ---- what the parent sees of it (pp_host_status, a seqlock) ---- */

static void st_begin(pp_host_status *s) {
  __atomic_store_n(&s->seq, s->seq + 1, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_RELEASE);
}

static void st_end(pp_host_status *s) { __atomic_store_n(&s->seq, s->seq + 1, __ATOMIC_RELEASE); }

static void st_state(hp_host *h, uint32_t state, const char *reason) {
  st_begin(h->st);
  h->st->state = state;
  h->st->workers = h->count;
  if (reason) snprintf(h->st->reason, sizeof h->st->reason, "%s", reason);
  st_end(h->st);
}

void pp_host_status_read(const pp_host_status *s, pp_host_status *out) {
  for (;;) {
    uint32_t a = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
    memcpy(out, (const void *)s, sizeof *out);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (!(a & 1) && __atomic_load_n(&s->seq, __ATOMIC_RELAXED) == a) return;
    sched_yield();
  }
}

void pp_host_status_free(pp_host_status *status, int nhosts) {
  if (status) munmap(status, (size_t)nhosts * sizeof *status);
}

typedef struct hp_slot {
  int live;   /* SPAWNED sent to the engine, EXITED not yet */
  int wanted; /* SPAWN asked for before its host was up */
  uint32_t gen;
  pid_t rpid; /* on its host */
  int errw;   /* the write end of the stderr pipe the engine reads */
  pp_page *page;
  int host;
} hp_slot;

typedef struct hp {
  const pp_hosts_cfg *cfg;
  hp_host *h;
  hp_slot *s;
  uint32_t nslots;
  int assigned, hello_sent;
} hp;

static void zsend(const pp_zmsg *m, const int *fds, int nfds) {
  pp_send_fds(ZFD, m, sizeof *m, fds, nfds, 0);
}

static void zmsg_init(pp_zmsg *m, int type, uint32_t slot, uint32_t gen) {
  memset(m, 0, sizeof *m);
  m->type = (uint32_t)type;
  m->slot = slot;
  m->gen = gen;
}

static void spawnfail(uint32_t slot, uint32_t gen, int err) {
  pp_zmsg m;
  zmsg_init(&m, PP_Z_SPAWNFAIL, slot, gen);
  m.err = err;
  zsend(&m, NULL, 0);
}

/* The slot's host is gone for good: its name and reason, for the
 * engine's BrokenProcessPool once every host is. */
static void spawngone(uint32_t slot, uint32_t gen, const hp_host *h) {
  pp_zmsg m;
  zmsg_init(&m, PP_Z_SPAWNFAIL, slot, gen);
  m.err = EHOSTDOWN;
  m.flags = PP_ZF_GONE;
  /* (cut to fit: the whole reason is in stats().hosts and on stderr) */
  snprintf(m.text, sizeof m.text, "host '%.60s': %.130s", h->cfg->name, h->why);
  zsend(&m, NULL, 0);
}

void pp_dump_hex(lua_State *L, char out[PP_DUMP_HEX]) {
  out[0] = 0;
  luaL_checkstack(L, 4, NULL);
  int top = lua_gettop(L);
  lua_getglobal(L, "string");
  if (lua_type(L, -1) == LUA_TTABLE && lua_getfield(L, -1, "dump") == LUA_TFUNCTION &&
      luaL_loadstring(L, "return") == LUA_OK && lua_pcall(L, 1, 1, 0) == LUA_OK) {
    size_t n;
    const unsigned char *d = (const unsigned char *)lua_tolstring(L, -1, &n);
    for (size_t i = 0; d && i < n && i < PP_DUMP_BYTES; i++) snprintf(out + 2 * i, 3, "%02x", d[i]);
  }
  lua_settop(L, top);
}

/* ---- starting a host ---- */

static int launch(hp_host *h) {
  int sv[2], ep[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return errno;
  if (pipe2(ep, O_CLOEXEC) != 0) {
    int e = errno;
    close(sv[0]);
    close(sv[1]);
    return e;
  }
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&at);
  posix_spawn_file_actions_adddup2(&fa, sv[1], 0);
  posix_spawn_file_actions_adddup2(&fa, sv[1], 1);
  posix_spawn_file_actions_adddup2(&fa, ep[1], 2);
  sigset_t all, none;
  sigfillset(&all);
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&at, &all);
  posix_spawnattr_setsigmask(&at, &none);
  /* its own process group: the terminal's Ctrl-C is the parent's to act
   * on (it ends the link), not the launcher's */
  posix_spawnattr_setpgroup(&at, 0);
  posix_spawnattr_setflags(&at,
                           POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP);
  int rc = posix_spawnp(&h->lpid, h->cfg->argv[0], &fa, &at, h->cfg->argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&at);
  close(sv[1]);
  close(ep[1]);
  if (rc != 0) {
    close(sv[0]);
    close(ep[0]);
    h->lpid = 0;
    snprintf(h->why, sizeof h->why, "cannot run its launcher '%s': %s", h->cfg->argv[0],
             strerror(rc));
    return rc;
  }
  h->sock = sv[0];
  h->errfd = ep[0];
  fcntl(h->sock, F_SETFL, fcntl(h->sock, F_GETFL) | O_NONBLOCK);
  fcntl(h->errfd, F_SETFL, fcntl(h->errfd, F_GETFL) | O_NONBLOCK);
  h->start_ns = pp_now_ns();
  return 0;
}

static void keep_tail(hp_host *h, const char *p, size_t n) {
  if (n >= sizeof h->tail) {
    p += n - sizeof h->tail;
    n = sizeof h->tail;
  }
  if (h->taillen + n > sizeof h->tail) {
    size_t drop = h->taillen + n - sizeof h->tail;
    memmove(h->tail, h->tail + drop, h->taillen - drop);
    h->taillen -= drop;
  }
  memcpy(h->tail + h->taillen, p, n);
  h->taillen += n;
}

static void read_stderr(hp_host *h) {
  char b[4096];
  ssize_t r;
  while (h->errfd >= 0 && (r = read(h->errfd, b, sizeof b)) != 0) {
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return;
      break;
    }
    keep_tail(h, b, (size_t)r);
  }
  if (h->errfd >= 0) {
    close(h->errfd);
    h->errfd = -1;
  }
}

/* The last line of what the launcher wrote to stderr (or ""). */
static const char *last_line(hp_host *h, char *out, size_t n) {
  size_t end = h->taillen;
  while (end && (h->tail[end - 1] == '\n' || h->tail[end - 1] == '\r')) end--;
  size_t start = end;
  while (start && h->tail[start - 1] != '\n') start--;
  snprintf(out, n, "%.*s", (int)(end - start), h->tail + start);
  return out;
}

static void host_failed(hp *p, int hi, const char *why);
static void host_lost(hp *p, int hi, const char *why);

/* Bytes before the magic: the prelude's error line, or a login's noise. */
static void scan_noise(hp *p, int hi) {
  hp_host *h = &p->h[hi];
  unsigned char c;
  for (;;) {
    ssize_t r = read(h->sock, &c, 1);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return;  /* EAGAIN: more later */
    if (r == 0) return; /* EOF: the launcher's exit says why */
    h->noiseall++;
    if (h->noiselen < sizeof h->noise - 1) h->noise[h->noiselen++] = (char)c;
    memmove(h->win, h->win + 1, PP_LINK_MAGIC_LEN - 1);
    h->win[PP_LINK_MAGIC_LEN - 1] = c;
    if (h->noiseall >= PP_LINK_MAGIC_LEN && memcmp(h->win, PP_LINK_MAGIC, PP_LINK_MAGIC_LEN) == 0) {
      if (pp_link_init(&h->link, h->sock, h->sock, 0) != 0) {
        host_failed(p, hi, "out of memory");
        return;
      }
      h->state = H_HELLO;
      return;
    }
    if (h->noiseall > NOISE_MAX) {
      char why[700];
      snprintf(why, sizeof why,
               "did not start the procpool agent: it printed %d bytes of other "
               "output first, beginning: %.*s",
               NOISE_MAX, (int)h->noiselen, h->noise);
      host_failed(p, hi, why);
      return;
    }
  }
}

/* The prelude's error line ("\0PPERR <what> <detail>"), if it wrote one. */
static int prelude_error(hp_host *h, char *out, size_t n) {
  for (size_t i = 0; i + 7 <= h->noiselen; i++)
    if (h->noise[i] == 0 && memcmp(h->noise + i + 1, "PPERR ", 6) == 0) {
      const char *s = h->noise + i + 7;
      size_t len = 0;
      while (i + 7 + len < h->noiselen && s[len] != '\n') len++;
      snprintf(out, n, "%.*s", (int)len, s);
      return 1;
    }
  return 0;
}

/* Why the launcher ended before the agent spoke. */
static void launcher_gone(hp *p, int hi) {
  hp_host *h = &p->h[hi];
  char line[400], err[400], why[900];
  int again = 0; /* worth another launch (a missing interpreter or module is not) */
  read_stderr(h);
  last_line(h, line, sizeof line);
  int code = WIFEXITED(h->lstatus) ? WEXITSTATUS(h->lstatus) : -1;
  if (prelude_error(h, err, sizeof err)) {
    if (strncmp(err, "lua ", 4) == 0)
      snprintf(why, sizeof why, "it runs %s; procpool needs Lua 5.4", err + 4);
    else if (strncmp(err, "noprocpool ", 11) == 0)
      snprintf(why, sizeof why,
               "procpool is not installed there (%s); install it there or set "
               "remote.lua_cpath",
               err + 11);
    else
      snprintf(why, sizeof why, "%s", err);
  } else if (code == 127) {
    snprintf(why, sizeof why, "it has no '%s' on its PATH (set remote.executable)%s%s", h->cfg->exe,
             line[0] ? ": " : "", line);
  } else if (code == 255) {
    snprintf(why, sizeof why, "cannot reach it: %s", line[0] ? line : "its launcher exited 255");
    again = 1;
  } else if (WIFSIGNALED(h->lstatus)) {
    again = 1;
    snprintf(why, sizeof why, "its launcher was killed by signal %d%s%s", WTERMSIG(h->lstatus),
             line[0] ? ": " : "", line);
  } else {
    snprintf(why, sizeof why, "its launcher exited with status %d before the agent started%s%s",
             code, line[0] ? ": " : "", line);
    again = 1;
  }
  if (again)
    host_lost(p, hi, why);
  else
    host_failed(p, hi, why);
}

/* HELLO: the agent's versions against ours. */
static void on_hello(hp *p, int hi, const unsigned char *b, size_t len) {
  hp_host *h = &p->h[hi];
  char text[1024], why[700];
  snprintf(text, sizeof text, "%.*s", (int)len, (const char *)b);
  int proto = -1, codec = -1, ncpu = 1;
  char lua[64] = "", dump[64] = "";
  for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
    if (sscanf(line, "proto=%d", &proto) == 1 || sscanf(line, "codec=%d", &codec) == 1 ||
        sscanf(line, "ncpu=%d", &ncpu) == 1)
      continue;
    if (strncmp(line, "lua=", 4) == 0) snprintf(lua, sizeof lua, "%s", line + 4);
    if (strncmp(line, "dump=", 5) == 0) snprintf(dump, sizeof dump, "%s", line + 5);
  }
  if (proto != PP_LINK_PROTO || codec != PP_CODEC_VERSION || strcmp(lua, LUA_RELEASE) != 0 ||
      strcmp(dump, p->cfg->dump_hex) != 0) {
    snprintf(why, sizeof why,
             "it runs procpool protocol %d, codec %d, %s (bytecode %s) but this process runs "
             "protocol %d, codec %d, %s (bytecode %s)",
             proto, codec, lua, dump, PP_LINK_PROTO, PP_CODEC_VERSION, LUA_RELEASE,
             p->cfg->dump_hex);
    host_failed(p, hi, why);
    return;
  }
  h->ncpu = ncpu > 0 ? (uint32_t)ncpu : 1;
  h->state = H_KNOWN;
}

/* CONFIG to a host whose slots are known. */
static void send_config(hp *p, int hi) {
  hp_host *h = &p->h[hi];
  const pp_hosts_cfg *c = p->cfg;
  size_t nlen = strlen(h->cfg->name);
  size_t len = PP_L_CONFIG_HDR + nlen + 4 + c->shiplen + c->initlen;
  if (pp_link_slots(&h->link, p->nslots) != 0 ||
      pp_wbuf_reserve(&h->link.ob, PP_FRAME_HDR + len) != 0) {
    host_failed(p, hi, "out of memory");
    return;
  }
  size_t at = pp_link_begin(&h->link, PP_L_CONFIG);
  unsigned char *q = (unsigned char *)h->link.ob.p + h->link.ob.n;
  pp_put32(q, p->nslots);
  pp_put32(q + 4, c->timeout_ms);
  memcpy(q + 8, &c->lim, sizeof c->lim);
  pp_put32(q + 8 + sizeof c->lim, (uint32_t)nlen);
  q += PP_L_CONFIG_HDR;
  memcpy(q, h->cfg->name, nlen);
  q += nlen;
  pp_put32(q, (uint32_t)c->shiplen);
  q += 4;
  if (c->shiplen) memcpy(q, c->ship, c->shiplen);
  q += c->shiplen;
  if (c->initlen) memcpy(q, c->init, c->initlen);
  h->link.ob.n += len;
  pp_link_end(&h->link, at);
  h->state = H_CONFIG;
}

static void maybe_hello(hp *p);

/* Once every host has said HELLO (or failed): share out the slots, in the
 * order the hosts were given, and configure them. */
static void maybe_assign(hp *p) {
  if (p->assigned) return;
  for (int i = 0; i < p->cfg->nhosts; i++)
    if (p->h[i].state <= H_HELLO) return;
  p->assigned = 1;
  uint32_t n = 0;
  for (int i = 0; i < p->cfg->nhosts; i++) {
    hp_host *h = &p->h[i];
    if (h->state != H_KNOWN) continue;
    h->first = n;
    h->count = h->cfg->workers ? h->cfg->workers : h->ncpu;
    n += h->count;
  }
  p->nslots = n;
  p->s = calloc(n ? n : 1, sizeof *p->s);
  if (!p->s) _exit(1);
  for (uint32_t i = 0; i < n; i++) p->s[i].errw = -1;
  for (int i = 0; i < p->cfg->nhosts; i++)
    if (p->h[i].state == H_KNOWN) send_config(p, i);
  maybe_hello(p);
}

static void send_signal(hp_host *h, uint32_t slot, uint32_t gen, int sig) {
  unsigned char b[12];
  pp_put32(b, slot);
  pp_put32(b + 4, gen);
  pp_put32(b + 8, (uint32_t)sig);
  pp_link_send(&h->link, PP_L_SIGNAL, b, sizeof b);
}

static void send_spawn(hp_host *h, uint32_t slot, uint32_t gen) {
  unsigned char b[8];
  pp_put32(b, slot);
  pp_put32(b + 4, gen);
  pp_link_send(&h->link, PP_L_SPAWN, b, sizeof b);
}

/* ---- a worker on a host ---- */

static void on_spawned(hp *p, int hi, uint32_t slot, uint32_t gen, pid_t rpid) {
  hp_host *h = &p->h[hi];
  hp_slot *s = &p->s[slot];
  int sv[2] = {-1, -1}, ep[2] = {-1, -1}, pg = -1, err = 0;
  pp_page *page = MAP_FAILED;
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) err = errno;
  if (!err && pipe2(ep, O_CLOEXEC) != 0) err = errno;
  if (!err && (pg = memfd_create("procpool-page", MFD_CLOEXEC)) < 0) err = errno;
  if (!err && ftruncate(pg, 4096) != 0) err = errno;
  if (!err && (page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, pg, 0)) == MAP_FAILED)
    err = errno;
  if (!err) err = pp_link_attach(&h->link, slot, gen, sv[1]);
  if (err) {
    if (sv[1] >= 0) close(sv[1]);
    if (sv[0] >= 0) close(sv[0]);
    if (ep[0] >= 0) close(ep[0]);
    if (ep[1] >= 0) close(ep[1]);
    if (pg >= 0) close(pg);
    if (page != MAP_FAILED) munmap(page, 4096);
    send_signal(h, slot, gen, SIGKILL);
    spawnfail(slot, gen, err);
    return;
  }
  fcntl(ep[1], F_SETFL, fcntl(ep[1], F_GETFL) | O_NONBLOCK);
  s->live = 1;
  s->gen = gen;
  s->rpid = rpid;
  s->errw = ep[1];
  s->page = page;
  pp_zmsg m;
  zmsg_init(&m, PP_Z_SPAWNED, slot, gen);
  m.pid = rpid;
  m.err = ENOSYS; /* no pidfd: fds[1] is a stand-in the engine drops */
  m.flags = PP_ZF_REMOTE;
  snprintf(m.text, sizeof m.text, "%s", h->cfg->name);
  m.nfds = 4;
  int fds[4] = {sv[0], sv[0], pg, ep[0]};
  zsend(&m, fds, 4);
  close(sv[0]);
  close(pg);
  close(ep[0]);
}

/* Everything the link has for the slot's channel, into it, before its
 * death is told: the engine reads what the worker sent when it hears of
 * the death. */
static void flush_slot(hp_host *h, uint32_t slot) {
  pp_link_slot *ls = &h->link.slots[slot];
  uint64_t until = pp_now_ns() + 2000000000u;
  while (ls->fd >= 0 && pp_out_pending(&ls->out) && pp_now_ns() < until) {
    if (pp_out_flush(&ls->out, ls->fd) != 0) break;
    if (pp_out_pending(&ls->out)) {
      struct pollfd q = {ls->fd, POLLOUT, 0};
      poll(&q, 1, 50);
    }
  }
}

static void slot_exited(hp *p, int hi, uint32_t slot, int status, uint64_t started,
                        const char *lost) {
  hp_slot *s = &p->s[slot];
  hp_host *h = &p->h[hi];
  if (!s->live) return;
  flush_slot(h, slot);
  if (s->page) {
    __atomic_store_n(&s->page->started, started, __ATOMIC_RELEASE);
    munmap(s->page, 4096);
    s->page = NULL;
  }
  if (s->errw >= 0) close(s->errw);
  s->errw = -1;
  pp_link_detach(&h->link, slot);
  pp_zmsg m;
  zmsg_init(&m, PP_Z_EXITED, slot, s->gen);
  m.pid = s->rpid;
  m.status = status;
  m.flags = PP_ZF_REMOTE | (lost ? PP_ZF_LOST : 0);
  if (lost) snprintf(m.text, sizeof m.text, "%s", lost);
  s->live = 0;
  zsend(&m, NULL, 0);
}

static int on_ctrl(void *ud, int type, const unsigned char *b, size_t len);

typedef struct ctrl_ctx {
  hp *p;
  int hi;
} ctrl_ctx;

static int on_ctrl(void *ud, int type, const unsigned char *b, size_t len) {
  ctrl_ctx *c = ud;
  hp *p = c->p;
  hp_host *h = &p->h[c->hi];
  uint32_t slot = len >= 8 ? pp_get32(b) : UINT32_MAX, gen = len >= 8 ? pp_get32(b + 4) : 0;
  int mine = slot >= h->first && slot < h->first + h->count;
  switch (type) {
  case PP_L_HELLO:
    if (h->state != H_HELLO) return EPROTO;
    on_hello(p, c->hi, b, len);
    if (p->assigned && h->state == H_KNOWN) /* a reconnect: its slots are known */
      send_config(p, c->hi);
    else
      maybe_assign(p);
    return 0;
  case PP_L_READY:
    if (h->state != H_CONFIG) return EPROTO;
    h->state = H_UP;
    h->up_ns = pp_now_ns();
    if (p->hello_sent) { /* READY after the pool started: a reconnect */
      st_begin(h->st);
      h->st->reconnects++;
      st_end(h->st);
      fprintf(stderr, "procpool: host '%s' reconnected\n", h->cfg->name);
    }
    st_state(h, PP_HS_UP, NULL);
    for (uint32_t i = h->first; i < h->first + h->count; i++)
      if (p->s[i].wanted) {
        p->s[i].wanted = 0;
        send_spawn(h, i, p->s[i].gen);
      }
    maybe_hello(p);
    return 0;
  case PP_L_FAIL: {
    char why[600];
    snprintf(why, sizeof why, "%.*s", (int)len, (const char *)b);
    host_failed(p, c->hi, why);
    return 0;
  }
  case PP_L_SPAWNED:
    if (len < 12 || !mine) return EPROTO;
    if (p->s[slot].gen == gen && !p->s[slot].live)
      on_spawned(p, c->hi, slot, gen, (pid_t)pp_get32(b + 8));
    return 0;
  case PP_L_SPAWNFAIL:
    if (len < 12 || !mine) return EPROTO;
    spawnfail(slot, gen, (int)pp_get32(b + 8));
    return 0;
  case PP_L_EXITED:
    if (len < 24 || !mine) return EPROTO;
    if (p->s[slot].live && p->s[slot].gen == gen)
      slot_exited(p, c->hi, slot, (int)pp_get32(b + 8), pp_get64(b + 16), NULL);
    return 0;
  case PP_L_STDERR:
    if (!mine) return EPROTO;
    if (p->s[slot].live && p->s[slot].gen == gen && p->s[slot].errw >= 0) {
      ssize_t w = write(p->s[slot].errw, b + 12, len - 12);
      (void)w; /* a full pipe drops it: the engine keeps only a tail */
    }
    return 0;
  case PP_L_STDOUT: { /* the parent's stdout, as local workers write to it */
    size_t off = 0;
    while (off < len) {
      ssize_t w = write(1, b + off, len - off);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) break;
      off += (size_t)w;
    }
    return 0;
  }
  case PP_L_STARTED:
    if (len < 28 || !mine) return EPROTO;
    if (p->s[slot].live && p->s[slot].gen == gen && p->s[slot].page) {
      uint64_t ago = pp_get64(b + 20), now = pp_now_ns();
      __atomic_store_n(&p->s[slot].page->started_ns, now > ago ? now - ago : 1, __ATOMIC_RELEASE);
      __atomic_store_n(&p->s[slot].page->started, pp_get64(b + 12), __ATOMIC_RELEASE);
    }
    return 0;
  case PP_L_PING:
    return 0;
  case PP_L_PONG:
    if (len >= 8) {
      uint64_t sent = pp_get64(b), now = pp_now_ns();
      st_begin(h->st);
      h->st->rtt_ns = now > sent ? now - sent : 1;
      st_end(h->st);
    }
    return 0;
  default:
    return EPROTO;
  }
}

/* ---- losing a host ---- */

/* The host is down: its workers are lost, its launcher stopped. It is
 * launched again later (RETRY) when `may_retry` and it has reconnects
 * left, else given up (FAILED): its slots are gone for good. Only a host
 * of a started pool is retried; start-up errors are told at once. */
static void host_down(hp *p, int hi, const char *why, int may_retry) {
  hp_host *h = &p->h[hi];
  if (h->state == H_FAILED || h->state == H_RETRY) return;
  int was_up = h->state == H_UP;
  uint64_t now = pp_now_ns();
  snprintf(h->why, sizeof h->why, "%s", why);
  if (h->lpid > 0) {
    kill(-h->lpid, SIGTERM);
    kill(h->lpid, SIGKILL);
  }
  if (was_up && now - h->up_ns >= STABLE_NS) h->tries = 0;
  int retry = may_retry && p->hello_sent && h->count > 0 && h->tries < p->cfg->reconnects;
  h->state = retry ? H_RETRY : H_FAILED;
  for (uint32_t i = h->first; i < h->first + h->count; i++) {
    hp_slot *s = &p->s[i];
    if (s->live) /* charged to the item its page last read as started */
      slot_exited(p, hi, i, SIGKILL, __atomic_load_n(&s->page->started, __ATOMIC_ACQUIRE), h->why);
    if (s->wanted && !retry) { /* (a retried host starts them when it is back) */
      s->wanted = 0;
      spawngone(i, s->gen, h);
    }
  }
  if (h->link.slots) pp_link_free(&h->link);
  if (h->sock >= 0) close(h->sock);
  h->sock = -1;
  if (was_up) {
    st_begin(h->st);
    h->st->losses++;
    st_end(h->st);
  }
  if (retry) {
    uint64_t wait = (uint64_t)p->cfg->retry_ms * 1000000u << h->tries;
    if (wait > RETRY_MAX_NS) wait = RETRY_MAX_NS;
    h->tries++;
    h->retry_at = now + wait;
    st_state(h, PP_HS_LOST, h->why);
    fprintf(stderr, "procpool: host '%s' lost: %s; reconnecting in %g s (%u of %u)\n", h->cfg->name,
            h->why, (double)wait / 1e9, h->tries, p->cfg->reconnects);
  } else {
    st_state(h, PP_HS_FAILED, h->why);
    if (p->hello_sent || was_up)
      fprintf(stderr, "procpool: host '%s' lost: %s%s\n", h->cfg->name, h->why,
              h->tries ? "; no reconnects left" : "");
  }
  maybe_assign(p);
  maybe_hello(p);
}

/* Down for good: what it said will not change by trying again. */
static void host_failed(hp *p, int hi, const char *why) { host_down(p, hi, why, 0); }

/* Down for now: a lost link, a launcher that ended, a silence. */
static void host_lost(hp *p, int hi, const char *why) { host_down(p, hi, why, 1); }

/* Run the host's launcher: 1 when it is starting, 0 when it could not
 * be run (the host has failed). */
static int start_host(hp *p, int hi) {
  hp_host *h = &p->h[hi];
  h->state = H_STARTING;
  if (launch(h) == 0) return 1;
  char why[sizeof h->why];
  snprintf(why, sizeof why, "%s", h->why);
  host_failed(p, hi, why);
  return 0;
}

/* A lost host's next launch: what the last one left is cleared. */
static int relaunch(hp *p, int hi) {
  hp_host *h = &p->h[hi];
  if (h->lpid > 0) /* killed when it was lost */
    while (waitpid(h->lpid, NULL, 0) < 0 && errno == EINTR) {
    }
  h->lpid = 0;
  if (h->errfd >= 0) close(h->errfd);
  h->errfd = -1;
  h->taillen = h->noiselen = h->noiseall = 0;
  memset(h->win, 0, sizeof h->win);
  st_state(h, PP_HS_CONNECTING, NULL);
  return start_host(p, hi);
}

/* Once every host is up or failed: tell the engine's starter. */
static void maybe_hello(hp *p) {
  if (p->hello_sent) return;
  int up = 0;
  if (!p->assigned) return;
  for (int i = 0; i < p->cfg->nhosts; i++) {
    if (p->h[i].state != H_UP && p->h[i].state != H_FAILED) return;
    up += p->h[i].state == H_UP;
  }
  p->hello_sent = 1;
  pp_zmsg m;
  zmsg_init(&m, PP_Z_HELLO, p->nslots, 0);
  if (up) {
    for (int i = 0; i < p->cfg->nhosts; i++)
      if (p->h[i].state == H_FAILED)
        fprintf(stderr, "procpool: host '%s' failed: %s\n", p->h[i].cfg->name, p->h[i].why);
    zsend(&m, NULL, 0);
    return;
  }
  /* every host failed: their reasons, in a memfd (any length) */
  m.err = EHOSTDOWN;
  int fd = memfd_create("procpool-why", MFD_CLOEXEC);
  for (int i = 0; fd >= 0 && i < p->cfg->nhosts; i++) {
    dprintf(fd, "%shost '%s': %s", i ? "; " : "", p->h[i].cfg->name, p->h[i].why);
  }
  m.nfds = fd >= 0;
  zsend(&m, &fd, fd >= 0);
  if (fd >= 0) close(fd);
}

/* ---- the engine's messages ---- */

static int slot_host(const hp *p, uint32_t slot) {
  for (int i = 0; i < p->cfg->nhosts; i++)
    if (slot >= p->h[i].first && slot < p->h[i].first + p->h[i].count) return i;
  return -1;
}

static int engine_readable(hp *p) {
  for (;;) {
    pp_zmsg m;
    memset(&m, 0, sizeof m);
    ssize_t r = recv(ZFD, &m, sizeof m, MSG_DONTWAIT);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (r <= 0) return -1; /* the engine closed: end */
    if (r != (ssize_t)sizeof m || m.slot >= p->nslots) continue;
    int hi = slot_host(p, m.slot);
    if (hi < 0) continue;
    hp_host *h = &p->h[hi];
    hp_slot *s = &p->s[m.slot];
    if (m.type == PP_Z_SPAWN) {
      s->gen = m.gen;
      if (h->state == H_UP)
        send_spawn(h, m.slot, m.gen);
      else if (h->state == H_FAILED)
        spawngone(m.slot, m.gen, h);
      else /* starting, or lost and to be launched again */
        s->wanted = 1;
    } else if (m.type == PP_Z_SIGNAL && h->state == H_UP && s->live && s->gen == m.gen) {
      send_signal(h, m.slot, m.gen, m.status);
    }
  }
}

__attribute__((noreturn)) static void proxy_exit(hp *p) {
  for (int i = 0; i < p->cfg->nhosts; i++) {
    hp_host *h = &p->h[i];
    if (h->sock >= 0) close(h->sock); /* the agent's EOF: it stops its workers */
    h->sock = -1;
  }
  /* the launchers end with their agents; the stuck ones are made to */
  uint64_t until = pp_now_ns() + 2000000000u;
  int left;
  do {
    left = 0;
    for (int i = 0; i < p->cfg->nhosts; i++) {
      hp_host *h = &p->h[i];
      if (h->lpid > 0 && waitpid(h->lpid, NULL, WNOHANG) == 0)
        left++;
      else
        h->lpid = 0;
    }
    if (left) usleep(10000);
  } while (left && pp_now_ns() < until);
  for (int i = 0; i < p->cfg->nhosts; i++)
    if (p->h[i].lpid > 0) {
      kill(-p->h[i].lpid, SIGKILL);
      kill(p->h[i].lpid, SIGKILL);
      while (waitpid(p->h[i].lpid, NULL, 0) < 0 && errno == EINTR) {
      }
    }
  _exit(0);
}

__attribute__((noreturn)) static void proxy_main(const pp_hosts_cfg *cfg, pid_t parent,
                                                 pp_host_status *status) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(0);
  signal(SIGINT, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  hp p;
  memset(&p, 0, sizeof p);
  p.cfg = cfg;
  p.h = calloc((size_t)cfg->nhosts, sizeof *p.h);
  if (!p.h) _exit(1);
  for (int i = 0; i < cfg->nhosts; i++) {
    p.h[i].cfg = &cfg->hosts[i];
    p.h[i].sock = p.h[i].errfd = -1;
    p.h[i].state = H_WAITING;
    p.h[i].st = &status[i];
  }
  struct pollfd *q = NULL;
  size_t qcap = 0;
  for (;;) {
    /* the next hosts to start, while fewer than MAX_STARTING are starting */
    int starting = 0;
    uint64_t t = pp_now_ns();
    for (int i = 0; i < cfg->nhosts; i++)
      starting += p.h[i].state == H_STARTING || p.h[i].state == H_HELLO;
    for (int i = 0; i < cfg->nhosts && starting < MAX_STARTING; i++)
      if (p.h[i].state == H_RETRY && t >= p.h[i].retry_at) starting += relaunch(&p, i);
    for (int i = 0; i < cfg->nhosts && starting < MAX_STARTING; i++) {
      if (p.h[i].state == H_WAITING) starting += start_host(&p, i);
    }
    /* room for every fd: the engine's, each host's stderr and stream, each worker's channel */
    size_t need = 1 + 3 * (size_t)cfg->nhosts + p.nslots;
    if (need > qcap) {
      struct pollfd *nq = realloc(q, need * sizeof *q);
      if (!nq) proxy_exit(&p);
      q = nq;
      qcap = need;
    }
    int n = 0;
    q[n].fd = ZFD;
    q[n].events = POLLIN;
    n++;
    for (int i = 0; i < cfg->nhosts; i++) {
      hp_host *h = &p.h[i];
      if (h->errfd >= 0) {
        q[n].fd = h->errfd;
        q[n].events = POLLIN;
        n++;
      }
      if (h->state == H_STARTING && h->sock >= 0) {
        q[n].fd = h->sock;
        q[n].events = POLLIN;
        n++;
      } else if (linked(h)) {
        int k = pp_link_pollfds(&h->link, q + n, (int)(qcap - (size_t)n));
        n += k;
      }
    }
    for (int i = 0; i < n; i++) q[i].revents = 0;
    if (poll(q, (nfds_t)n, 100) < 0 && errno != EINTR) proxy_exit(&p);
    if (q[0].revents && engine_readable(&p) < 0) proxy_exit(&p);
    uint64_t now = pp_now_ns();
    for (int i = 0; i < cfg->nhosts; i++) {
      hp_host *h = &p.h[i];
      if (h->errfd >= 0) {
        char b[4096];
        ssize_t r = read(h->errfd, b, sizeof b);
        if (r > 0) {
          keep_tail(h, b, (size_t)r);
          if (h->state == H_UP) { /* the agent's own words, and ssh's */
            ssize_t w = write(2, b, (size_t)r);
            (void)w;
          }
        } else if (r == 0) {
          close(h->errfd);
          h->errfd = -1;
        }
      }
      if (h->lpid > 0 && waitpid(h->lpid, &h->lstatus, WNOHANG) == h->lpid) {
        h->lpid = 0;
        if (h->state == H_STARTING || h->state == H_HELLO) {
          if (h->state == H_STARTING) scan_noise(&p, i);
          launcher_gone(&p, i);
        } else if (linked(h)) {
          char why[600], line[400], how[40];
          if (WIFSIGNALED(h->lstatus))
            snprintf(how, sizeof how, "was killed by signal %d", WTERMSIG(h->lstatus));
          else
            snprintf(how, sizeof how, "exited with status %d", WEXITSTATUS(h->lstatus));
          snprintf(why, sizeof why, "its launcher %s%s%s", how,
                   last_line(h, line, sizeof line)[0] ? ": " : "", line);
          host_lost(&p, i, why);
        }
        continue;
      }
      if (h->state == H_STARTING) {
        scan_noise(&p, i);
        if (h->state == H_STARTING && now - h->start_ns > (uint64_t)cfg->start_ms * 1000000u) {
          char why[700], line[400];
          snprintf(why, sizeof why, "did not start the procpool agent within %u s%s%s",
                   cfg->start_ms / 1000, last_line(h, line, sizeof line)[0] ? "; it said: " : "",
                   line);
          host_lost(&p, i, why);
        }
      }
      if (linked(h)) {
        ctrl_ctx c = {&p, i};
        int e = pp_link_step(&h->link, on_ctrl, &c);
        if (!linked(h)) continue;
        if (e) {
          char why[600], line[400];
          snprintf(why, sizeof why, "%s%s%s",
                   e == EPIPE ? "connection lost" : "protocol error on the link",
                   last_line(h, line, sizeof line)[0] ? ": " : "", line);
          if (e == EPIPE)
            host_lost(&p, i, why);
          else
            host_failed(&p, i, why);
          continue;
        }
        now = pp_now_ns(); /* (the link may have begun after the first reading) */
        if (now - h->link.rx_ns > (uint64_t)cfg->timeout_ms * 1000000u) {
          char why[100];
          snprintf(why, sizeof why, "connection lost: no message for %g s",
                   cfg->timeout_ms / 1000.0);
          host_lost(&p, i, why);
          continue;
        }
        if ((h->state == H_HELLO || h->state == H_CONFIG) &&
            now - h->start_ns > (uint64_t)cfg->start_ms * 1000000u) {
          host_lost(&p, i, "the agent did not finish starting in time");
          continue;
        }
        if (h->st->seen_ns != h->link.rx_ns) {
          st_begin(h->st);
          h->st->seen_ns = h->link.rx_ns;
          st_end(h->st);
        }
        /* the heartbeat, timed: its PONG is the link's round trip */
        if (now - h->ping_ns > PING_NS) {
          unsigned char b[8];
          pp_put64(b, now);
          pp_link_send(&h->link, PP_L_PING, b, sizeof b);
          h->ping_ns = now;
        }
      }
    }
  }
}

int pp_hosts_start(const pp_hosts_cfg *cfg, pid_t *pid, int *zfd, uint32_t *nslots,
                   pp_host_status **status, char **why) {
  *why = NULL;
  *status = NULL;
  sigset_t old;
  int ctl;
  pid_t parent = getpid();
  /* shared with the proxy it forks */
  pp_host_status *st = mmap(NULL, (size_t)cfg->nhosts * sizeof *st, PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (st == MAP_FAILED) return errno;
  for (int i = 0; i < cfg->nhosts; i++) {
    st[i].state = PP_HS_CONNECTING;
    snprintf(st[i].name, sizeof st[i].name, "%s", cfg->hosts[i].name);
  }
  pid_t child = pp_fork_helper(&ctl, &old);
  if (child == 0) {
    if (ctl != ZFD) {
      dup2(ctl, ZFD);
      close(ctl);
    }
    pp_close_from(ZFD + 1, -1);
    sigprocmask(SIG_SETMASK, &old, NULL);
    proxy_main(cfg, parent, st);
  }
  if (child < 0) {
    int e = errno;
    pp_host_status_free(st, cfg->nhosts);
    return e;
  }
  /* HELLO once every host is up or failed (each within its start limit) */
  pp_zmsg m;
  memset(&m, 0, sizeof m);
  int fd = -1, nfds = 0;
  long r;
  do r = pp_recv_fds(ctl, &m, sizeof m, &fd, 1, &nfds, 0);
  while (r < 0 && errno == EINTR);
  if (r != (long)sizeof m || m.type != PP_Z_HELLO || m.err) {
    int err = r == (long)sizeof m && m.err ? m.err : ECHILD;
    if (nfds == 1) {
      off_t n = lseek(fd, 0, SEEK_END);
      *why = n > 0 ? malloc((size_t)n + 1) : NULL;
      if (*why) {
        ssize_t got = pread(fd, *why, (size_t)n, 0);
        (*why)[got > 0 ? got : 0] = 0;
      }
      close(fd);
    }
    close(ctl);
    kill(child, SIGKILL);
    while (waitpid(child, NULL, 0) < 0 && errno == EINTR) {
    }
    pp_host_status_free(st, cfg->nhosts);
    return err;
  }
  *status = st;
  *pid = child;
  *zfd = ctl;
  *nslots = m.slot;
  return 0;
}
