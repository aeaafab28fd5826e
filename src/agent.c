/* agent.c: a host's end of the link: started by the launcher (ssh, srun,
 * a local fork) on the host, it forks the host's workers with the local
 * machinery (a zygote, proc.c) and carries their channels, deaths and
 * stderr over its stdin and stdout (link.h). */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>

#include "buf.h"
#include "codec.h"
#include "codec_format.h"
#include "hostproxy.h"
#include "engine.h" /* pp_now_ns */
#include "le.h"
#include "link.h"
#include "proc.h"

/* Until CONFIG says otherwise, and the idle time before a PING. */
#define AGENT_SILENCE_MS 30000u
#define PING_NS 1000000000u

typedef struct agent_worker {
  int live;   /* spawned, its EXITED not sent yet */
  int exited; /* the zygote reported its death: EXITED once its channel is drained */
  int status; /* its wait status */
  pid_t pid;
  uint32_t gen;
  int pidfd;
  int errfd; /* the read end of its stderr */
  pp_page *page;
  uint64_t told; /* the started seq last sent */
} agent_worker;

typedef struct agent {
  pp_link link;
  int zfd; /* the zygote's control socket; -1 before CONFIG */
  pid_t zpid;
  agent_worker *w;
  uint32_t nslots;
  uint64_t silence_ns;
  lua_State *L;
  int ready, quit, busy;
  int outfd; /* the read end of the workers' stdout */
} agent;

static void send_text(agent *a, int type, const char *text) {
  pp_link_send(&a->link, type, text, strlen(text));
}

static void send_ids(agent *a, int type, uint32_t slot, uint32_t gen, int32_t v, const void *more,
                     size_t nmore) {
  unsigned char b[12];
  pp_put32(b, slot);
  pp_put32(b + 4, gen);
  pp_put32(b + 8, (uint32_t)v);
  if (pp_wbuf_reserve(&a->link.ob, PP_FRAME_HDR + sizeof b + nmore) != 0) return;
  size_t at = pp_link_begin(&a->link, type);
  memcpy(a->link.ob.p + a->link.ob.n, b, sizeof b);
  a->link.ob.n += sizeof b;
  if (nmore) memcpy(a->link.ob.p + a->link.ob.n, more, nmore);
  a->link.ob.n += nmore;
  pp_link_end(&a->link, at);
}

/* HELLO: what the proxy checks before it sends anything else */
static void hello(agent *a) {
  char host[256] = "?";
  gethostname(host, sizeof host - 1);
  /* the bytecode header: closures travel as bytecode, which another
   * format cannot load */
  char dump[PP_DUMP_HEX];
  pp_dump_hex(a->L, dump);
  char text[1024];
  snprintf(text, sizeof text, "proto=%d\ncodec=%d\nlua=%s\ndump=%s\nncpu=%ld\nhost=%s\npid=%ld\n",
           PP_LINK_PROTO, PP_CODEC_VERSION, LUA_RELEASE, dump, sysconf(_SC_NPROCESSORS_ONLN), host,
           (long)getpid());
  send_text(a, PP_L_HELLO, text);
}

static int decode_init(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t n = (size_t)lua_tointeger(L, 2);
  lua_settop(L, 0);
  return pp_decode(L, p, n, NULL, 1, 0);
}

/* Shipped modules ({ [name] = { source, path } }, encoded): each a
 * package.preload loader, so that `require` finds it in the workers (and
 * in the initializer's decoding, below) as if it were installed here. */
static int install_shipped(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t n = (size_t)lua_tointeger(L, 2);
  lua_settop(L, 0);
  pp_decode(L, p, n, NULL, 1, 0);
  if (luaL_loadstring(L, "local mods = ...\n"
                         "for name, m in pairs(mods) do\n"
                         "  package.preload[name] = function(...)\n"
                         "    return assert(load(m[1], '@' .. m[2]))(...)\n"
                         "  end\n"
                         "end") != LUA_OK)
    return lua_error(L);
  lua_insert(L, 1);
  lua_call(L, 1, 0);
  return 0;
}

/* A step of CONFIG: fn(bytes, n) in protected mode, keeping `nres` of its
 * results. 0 when it raised: the agent then tells why (FAIL) and quits. */
static int config_step(agent *a, lua_CFunction fn, const unsigned char *bytes, size_t n, int nres,
                       const char *what) {
  lua_State *L = a->L;
  lua_pushcfunction(L, fn);
  lua_pushlightuserdata(L, (void *)bytes);
  lua_pushinteger(L, (lua_Integer)n);
  if (lua_pcall(L, 2, nres, 0) == LUA_OK) return 1;
  char text[300];
  snprintf(text, sizeof text, "cannot %s on this host: %s", what, luaL_tolstring(L, -1, NULL));
  send_text(a, PP_L_FAIL, text);
  a->quit = 1;
  return 0;
}

/* CONFIG: load the initializer and start the host's zygote. */
static int on_config(agent *a, const unsigned char *b, size_t len) {
  if (a->zfd >= 0 || len < PP_L_CONFIG_HDR) return EPROTO;
  uint32_t slots = pp_get32(b), ms = pp_get32(b + 4);
  if (slots == 0 || slots > 65536) return EPROTO;
  pp_wctx w;
  memset(&w, 0, sizeof w);
  memcpy(&w.lim, b + 8, sizeof w.lim);
  a->silence_ns = (uint64_t)(ms ? ms : AGENT_SILENCE_MS) * 1000000u;
  a->w = calloc(slots, sizeof *a->w);
  if (!a->w || pp_link_slots(&a->link, slots) != 0) return ENOMEM;
  a->nslots = slots;
  lua_State *L = a->L;
  lua_settop(L, 0);
  uint32_t nlen = pp_get32(b + 8 + sizeof w.lim);
  if (nlen > len - PP_L_CONFIG_HDR) return EPROTO;
  /* the host's name, for procpool.current_worker().host (worker.c) */
  lua_pushlstring(L, (const char *)b + PP_L_CONFIG_HDR, nlen);
  lua_setfield(L, LUA_REGISTRYINDEX, "procpool.host");
  const unsigned char *ship = b + PP_L_CONFIG_HDR + nlen + 4;
  if (len - PP_L_CONFIG_HDR - nlen < 4) return EPROTO;
  size_t slen = pp_get32(ship - 4);
  if (slen > len - PP_L_CONFIG_HDR - nlen - 4) return EPROTO;
  if (slen && !config_step(a, install_shipped, ship, slen, 0, "install the shipped modules"))
    return 0;
  const unsigned char *init = ship + slen;
  size_t ilen = len - PP_L_CONFIG_HDR - nlen - 4 - slen;
  if (ilen) {
    if (!config_step(a, decode_init, init, ilen, LUA_MULTRET, "load the initializer")) return 0;
    int n = lua_gettop(L);
    if (n >= 1) {
      w.init_idx = 1;
      w.init_str = lua_type(L, 1) == LUA_TSTRING;
      w.init_n = n - 1;
    }
  }
  int err = pp_zygote_fork(L, &w, &a->zpid, &a->zfd);
  if (err) {
    char text[200];
    snprintf(text, sizeof text, "cannot start the zygote: %s", strerror(err));
    send_text(a, PP_L_FAIL, text);
    a->quit = 1;
    return 0;
  }
  fcntl(a->zfd, F_SETFL, fcntl(a->zfd, F_GETFL) | O_NONBLOCK);
  a->ready = 1;
  pp_link_send(&a->link, PP_L_READY, NULL, 0);
  return 0;
}

static agent_worker *worker_of(agent *a, const unsigned char *b, size_t len, uint32_t *slot) {
  if (len < 8) return NULL;
  *slot = pp_get32(b);
  if (*slot >= a->nslots) return NULL;
  return &a->w[*slot];
}

static int on_ctrl(void *ud, int type, const unsigned char *b, size_t len) {
  agent *a = ud;
  uint32_t slot;
  agent_worker *w;
  switch (type) {
  case PP_L_CONFIG:
    return on_config(a, b, len);
  case PP_L_SPAWN: {
    if (!a->ready || !(w = worker_of(a, b, len, &slot))) return EPROTO;
    pp_zmsg m;
    memset(&m, 0, sizeof m);
    m.type = PP_Z_SPAWN;
    m.slot = slot;
    m.gen = pp_get32(b + 4);
    if (send(a->zfd, &m, sizeof m, MSG_NOSIGNAL) != (ssize_t)sizeof m)
      send_ids(a, PP_L_SPAWNFAIL, slot, m.gen, errno, NULL, 0);
    return 0;
  }
  case PP_L_SIGNAL: {
    if (len < 12 || !(w = worker_of(a, b, len, &slot))) return EPROTO;
    int sig = (int)pp_get32(b + 8);
    if (!w->live || w->exited || w->gen != pp_get32(b + 4)) return 0; /* gone already */
    int sent = w->pidfd >= 0 && syscall(SYS_pidfd_send_signal, w->pidfd, sig, NULL, 0) == 0;
    if (sig == SIGTERM || sig == SIGKILL) kill(-w->pid, sig); /* its group too */
    if (!sent) kill(w->pid, sig);
    return 0;
  }
  case PP_L_PING: /* the proxy's, with a body, times the link */
    return len ? pp_link_send(&a->link, PP_L_PONG, b, len) : 0;
  default:
    return EPROTO;
  }
}

static void forward_stderr(agent *a, uint32_t slot) {
  agent_worker *w = &a->w[slot];
  char buf[16384];
  ssize_t r;
  while (w->errfd >= 0 && (r = read(w->errfd, buf, sizeof buf)) != 0) {
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) {
        close(w->errfd);
        w->errfd = -1;
      }
      return;
    }
    send_ids(a, PP_L_STDERR, slot, w->gen, 0, buf, (size_t)r);
  }
  if (w->errfd >= 0) {
    close(w->errfd);
    w->errfd = -1;
  }
}

static void forward_stdout(agent *a) {
  char buf[16384];
  ssize_t r;
  while ((r = read(a->outfd, buf, sizeof buf)) > 0)
    pp_link_send(&a->link, PP_L_STDOUT, buf, (size_t)r);
}

static void z_spawned(agent *a, const pp_zmsg *m, int *fds, int nfds) {
  if (m->slot >= a->nslots || nfds != 4) {
    for (int i = 0; i < nfds; i++) close(fds[i]);
    return;
  }
  agent_worker *w = &a->w[m->slot];
  w->live = 1;
  w->exited = 0;
  w->pid = m->pid;
  w->gen = m->gen;
  if (m->err == 0) {
    w->pidfd = fds[1];
  } else {
    close(fds[1]);
    w->pidfd = -1;
  }
  void *pg = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fds[2], 0);
  close(fds[2]);
  w->page = pg == MAP_FAILED ? NULL : pg;
  w->errfd = fds[3];
  fcntl(w->errfd, F_SETFL, fcntl(w->errfd, F_GETFL) | O_NONBLOCK);
  if (pp_link_attach(&a->link, m->slot, m->gen, fds[0]) != 0) close(fds[0]);
  send_ids(a, PP_L_SPAWNED, m->slot, m->gen, m->pid, NULL, 0);
}

static void z_readable(agent *a) {
  for (;;) {
    pp_zmsg m;
    memset(&m, 0, sizeof m);
    int fds[4], nfds;
    long r = pp_recv_fds(a->zfd, &m, sizeof m, fds, 4, &nfds, MSG_DONTWAIT);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (r <= 0) { /* the zygote died: its workers went with it */
      a->quit = 1;
      return;
    }
    if (r != (long)sizeof m) {
      for (int i = 0; i < nfds; i++) close(fds[i]);
      continue;
    }
    if (m.type == PP_Z_SPAWNED) {
      z_spawned(a, &m, fds, nfds);
      continue;
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);
    if (m.type == PP_Z_SPAWNFAIL) {
      send_ids(a, PP_L_SPAWNFAIL, m.slot, m.gen, m.err, NULL, 0);
    } else if (m.type == PP_Z_EXITED) {
      for (uint32_t s = 0; s < a->nslots; s++)
        if (a->w[s].live && !a->w[s].exited && a->w[s].pid == m.pid) {
          a->w[s].exited = 1;
          a->w[s].status = m.status;
          break;
        }
    }
  }
}

/* STARTED for each worker whose page moved since it was last told. */
static int tell_starts(agent *a) {
  int busy = 0;
  for (uint32_t s = 0; s < a->nslots; s++) {
    agent_worker *w = &a->w[s];
    if (!w->live || w->exited || !w->page) continue;
    busy = 1;
    uint64_t seq = __atomic_load_n(&w->page->started, __ATOMIC_ACQUIRE);
    if (seq == w->told) continue;
    uint64_t t0 = __atomic_load_n(&w->page->started_ns, __ATOMIC_ACQUIRE), now = pp_now_ns();
    unsigned char more[20];
    pp_put32(more, 0);
    pp_put64(more + 4, seq);
    pp_put64(more + 12, t0 && t0 <= now ? now - t0 : 0);
    /* (send_ids' third word is the pad here) */
    send_ids(a, PP_L_STARTED, s, w->gen, 0, more + 4, 16);
    w->told = seq;
  }
  return busy;
}

/* A dead worker's EXITED, once everything it sent is on the stream. */
static void report_deaths(agent *a) {
  for (uint32_t s = 0; s < a->nslots; s++) {
    agent_worker *w = &a->w[s];
    if (!w->live || !w->exited) continue;
    pp_link_slot *ls = &a->link.slots[s];
    if (ls->fd >= 0 && (!ls->eof || ls->src_fd >= 0)) continue;
    forward_stderr(a, s);
    unsigned char more[12];
    pp_put32(more, 0);
    pp_put64(more + 4, w->page ? __atomic_load_n(&w->page->started, __ATOMIC_ACQUIRE) : 0);
    send_ids(a, PP_L_EXITED, s, w->gen, w->status, more, sizeof more);
    pp_link_detach(&a->link, s);
    if (w->page) munmap(w->page, 4096);
    if (w->pidfd >= 0) close(w->pidfd);
    memset(w, 0, sizeof *w);
    w->pidfd = w->errfd = -1;
  }
}

/* Stop every worker (the zygote kills them when its socket closes) and
 * end, with nothing left running on this host. */
__attribute__((noreturn)) static void agent_exit(agent *a, int code) {
  /* what can still be said goes out first, for a moment */
  uint64_t until = pp_now_ns() + 200000000u;
  while (pp_link_pending(&a->link) && pp_now_ns() < until) {
    struct pollfd p = {a->link.wfd, POLLOUT, 0};
    poll(&p, 1, 20);
    if (pp_link_step(&a->link, NULL, NULL) != 0) break;
  }
  if (a->zfd >= 0) {
    close(a->zfd);
    while (waitpid(a->zpid, NULL, 0) < 0 && errno == EINTR) {
    }
  }
  _exit(code);
}

void pp_agent_main(lua_State *L) {
  agent a;
  memset(&a, 0, sizeof a);
  a.L = L;
  a.zfd = -1;
  a.silence_ns = (uint64_t)AGENT_SILENCE_MS * 1000000u;
  signal(SIGPIPE, SIG_IGN); /* (a fresh interpreter of its own: no host's handlers here) */
  signal(SIGINT, SIG_IGN);  /* Ctrl-C reaches the parent, which ends the link */
  /* the stream moves off fds 0 and 1: tasks read /dev/null, and their
   * stdout is a pipe the agent forwards (STDOUT), never the stream */
  int in = fcntl(0, F_DUPFD_CLOEXEC, 10), out = fcntl(1, F_DUPFD_CLOEXEC, 10);
  int nul = open("/dev/null", O_RDONLY | O_CLOEXEC), op[2];
  if (in < 0 || out < 0 || nul < 0 || pipe2(op, O_CLOEXEC) != 0) _exit(3);
  dup2(nul, 0);
  dup2(op[1], 1); /* (without CLOEXEC: the workers' stdout) */
  close(nul);
  close(op[1]);
  a.outfd = op[0];
  fcntl(a.outfd, F_SETFL, fcntl(a.outfd, F_GETFL) | O_NONBLOCK);
  if (write(out, PP_LINK_MAGIC, PP_LINK_MAGIC_LEN) != PP_LINK_MAGIC_LEN) _exit(3);
  if (pp_link_init(&a.link, in, out, 0) != 0) _exit(3);
  hello(&a);
  for (;;) {
    struct pollfd p[300];
    int n = pp_link_pollfds(&a.link, p, 200);
    int zi = -1;
    if (a.zfd >= 0) {
      zi = n;
      p[n].fd = a.zfd;
      p[n].events = POLLIN;
      p[n++].revents = 0;
    }
    p[n].fd = a.outfd;
    p[n].events = POLLIN;
    p[n++].revents = 0;
    for (uint32_t s = 0; s < a.nslots && n < 300; s++)
      if (a.w[s].live && a.w[s].errfd >= 0) {
        p[n].fd = a.w[s].errfd;
        p[n].events = POLLIN;
        p[n++].revents = 0;
      }
    /* a worker's start is told within 10 ms (its deadline is the
     * parent's to watch); idle, the agent wakes for its heartbeat only */
    if (poll(p, (nfds_t)n, a.busy ? 10 : 200) < 0 && errno != EINTR) agent_exit(&a, 3);
    forward_stdout(&a);
    if (zi >= 0 && p[zi].revents) z_readable(&a);
    for (uint32_t s = 0; s < a.nslots; s++)
      if (a.w[s].live && a.w[s].errfd >= 0) forward_stderr(&a, s);
    int e = pp_link_step(&a.link, on_ctrl, &a);
    if (e) agent_exit(&a, e == EPIPE ? 0 : 3); /* the parent went away, or broke the protocol */
    a.busy = tell_starts(&a);
    report_deaths(&a);
    if (a.quit) agent_exit(&a, 0);
    uint64_t now = pp_now_ns();
    if (now - a.link.rx_ns > a.silence_ns) agent_exit(&a, 4); /* the parent is silent: gone */
    if (now - a.link.tx_ns > PING_NS && !pp_link_pending(&a.link))
      pp_link_send(&a.link, PP_L_PING, NULL, 0);
  }
}
