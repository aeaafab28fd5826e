/* executor.c: the Executor userdata: starting the engine, submitting jobs.
 * lua/procpool/executor.lua completes the class (its checks and public
 * methods); lua/procpool/map.lua drives the chunk methods. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lauxlib.h>

#include "agent.h"
#include "codec.h"
#include "codec_ctx.h"
#include "engine.h"
#include "error.h"
#include "fncache.h"
#include "hostproxy.h"
#include "future.h"
#include "progress_cb.h"
#include "pp.h"
#include "proc.h"
#include "udata.h"
#include "wait.h"
#include "warm.h"
#include "wire.h"

#define PP_EXECUTOR_MT "procpool.Executor"

/* The Executor userdata. */
typedef struct pp_exec {
  pp_engine *e; /* NULL once closed */
  int nworkers;
  uint64_t polled;       /* ended-job count at the last poll() */
  int capture;           /* output = "capture": tasks capture unless told */
  pp_host_status *hosts; /* with hosts: what the host proxy tells of each (else NULL) */
  int nhosts;
  pp_fncache fns; /* the encoded functions its jobs share */
  size_t untold;  /* bytes of jobs not yet told to the collector */
  /* the encoding of the function last submitted (EXEC_UV_LASTFN), when
   * that function's encoding cannot change (fn_is_fixed); else NULL */
  pp_blob *last_fn;
} pp_exec;

/* user values of the Executor: the write buffer that submit reuses; the
 * function last submitted (see last_fn) */
enum { EXEC_UV_SCRATCH = 1, EXEC_UV_LASTFN, EXEC_UV_N = EXEC_UV_LASTFN };

/* A registry-held object whose finalizer runs first when the state
 * closes: it tells executors that the state is closing, so they stop
 * their workers and wait instead of leaving threads behind. lua_close
 * finalizes the most recent objects first, so the sentinel must be newer
 * than every executor: each new executor replaces it with a new one. A
 * replaced sentinel that the collector finalizes later is stale (no
 * longer the registry's) and does nothing. */
typedef struct closing {
  int closing;
} closing;

#define CLOSING_MT "procpool.Closing"
#define REG_CLOSING "procpool.closing"
#define REG_SENTINEL "procpool.sentinel"

static closing *state_closing(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, REG_CLOSING) != LUA_TUSERDATA) {
    lua_pop(L, 1);
    closing *c = lua_newuserdatauv(L, sizeof *c, 0);
    c->closing = 0;
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_CLOSING);
  }
  closing *c = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return c;
}

static int sentinel_gc(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, REG_SENTINEL);
  int current = lua_rawequal(L, 1, -1);
  lua_pop(L, 1);
  if (!current) return 0;
  lua_getiuservalue(L, 1, 1);
  closing *c = lua_touserdata(L, -1);
  if (c) c->closing = 1;
  return 0;
}

static void renew_sentinel(lua_State *L) {
  state_closing(L);
  lua_newuserdatauv(L, 1, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, REG_CLOSING);
  lua_setiuservalue(L, -2, 1);
  luaL_setmetatable(L, CLOSING_MT);
  lua_setfield(L, LUA_REGISTRYINDEX, REG_SENTINEL);
}

/* Give the zygote to a new engine; on failure, reap it and raise. */
static void start_engine(lua_State *L, pp_exec *x, const pp_engine_cfg *cfg, pid_t zpid, int zfd) {
  int err;
  x->e = pp_engine_new(cfg, zpid, zfd, &err);
  if (!x->e) {
    close(zfd);
    kill(zpid, SIGKILL);
    while (waitpid(zpid, NULL, 0) < 0 && errno == EINTR) {
    }
    pp_error_raise(L, "BrokenProcessPool", "cannot start the pool: %s", strerror(err));
  }
  renew_sentinel(L);
}

/* the registry key of the Executor metatable (udata.h) */
static const char executor_mt_key;

static pp_exec *checkexec(lua_State *L, int idx) {
  pp_exec *x = pp_udata_check(L, idx, &executor_mt_key, PP_EXECUTOR_MT);
  if (!x->e) pp_error_raise(L, "InvalidStateError", "the executor is closed");
  if (!pp_engine_mine(x->e)) pp_error_raise(L, "InvalidStateError", "%s", pp_strerror(PP_EFOREIGN));
  return x;
}

int pp_executor_engine(lua_State *L, int idx, pp_engine **e) {
  pp_exec *x = luaL_testudata(L, idx, PP_EXECUTOR_MT);
  if (!x) return 0;
  *e = x->e;
  return 1;
}

static lua_Integer opt_int(lua_State *L, int t, const char *k, lua_Integer def) {
  lua_getfield(L, t, k);
  lua_Integer v = lua_isnil(L, -1) ? def : lua_tointeger(L, -1);
  lua_pop(L, 1);
  return v;
}

static double opt_num(lua_State *L, int t, const char *k, double def) {
  lua_getfield(L, t, k);
  double v = lua_isnil(L, -1) ? def : (double)lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

static pp_wbuf *push_box(lua_State *L);

/* Push opts.initargs (opts at index 1) unpacked, 1..(t.n or #t); returns
 * how many. */
static int push_initargs(lua_State *L) {
  if (lua_getfield(L, 1, "initargs") != LUA_TTABLE) {
    lua_pop(L, 1);
    return 0;
  }
  int a = lua_gettop(L);
  lua_getfield(L, a, "n");
  lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : (lua_Integer)lua_rawlen(L, a);
  lua_pop(L, 1);
  luaL_checkstack(L, (int)n + 4, "procpool: too many initargs");
  for (lua_Integer i = 1; i <= n; i++) lua_rawgeti(L, a, i);
  lua_remove(L, a);
  return (int)n;
}

/* opts.limits (checked and normalized in Lua: whole numbers) */
static void get_limits(lua_State *L, pp_limits *lim) {
  memset(lim, 0, sizeof *lim);
  if (lua_getfield(L, 1, "limits") == LUA_TTABLE) {
    lim->memory = (uint64_t)opt_int(L, -1, "memory", 0);
    lim->cpu = (uint32_t)opt_int(L, -1, "cpu", 0);
    lim->nofile = (uint32_t)opt_int(L, -1, "nofile", 0);
    lim->nice = (int32_t)opt_int(L, -1, "nice", 0);
  }
  lua_pop(L, 1);
}

/* opts.initializer and its initargs (opts at index 1) encoded as values,
 * for workers in a fresh interpreter (spawn, hosts): a box pushed (and
 * what the encoding left above it). */
static pp_wbuf *encoded_initializer(lua_State *L) {
  luaL_checkstack(L, 4, NULL);
  pp_wbuf *b = push_box(L);
  lua_getfield(L, 1, "initializer");
  if (!lua_isnil(L, -1)) {
    int base = lua_gettop(L);
    int n = push_initargs(L);
    pp_encode(L, base, n + 1, b, 1, "initializer", 0);
  }
  return b;
}

/* Start the workers of opts.hosts (a list of { name =, argv = {...},
 * workers = n }, checked in Lua; max_workers is their sum) through the
 * host proxy; the initializer travels as values, as in the spawn context. */
static void start_hosts(lua_State *L, pp_exec *x, pp_engine_cfg *cfg, const pp_limits *lim) {
  int ht = lua_gettop(L);
  int nh = (int)lua_rawlen(L, ht);
  if (nh < 1) luaL_argerror(L, 1, "hosts must not be empty");
  pp_host *hosts = lua_newuserdatauv(L, (size_t)nh * sizeof *hosts, 0);
  for (int i = 0; i < nh; i++) {
    luaL_checkstack(L, 8, "too many hosts"); /* (three values stay per host) */
    lua_rawgeti(L, ht, i + 1);               /* (kept on the stack: its strings stay put) */
    int e = lua_gettop(L);
    lua_getfield(L, e, "name");
    hosts[i].name = luaL_checkstring(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, e, "argv");
    int a = lua_gettop(L);
    int na = (int)lua_rawlen(L, a);
    char **argv = lua_newuserdatauv(L, (size_t)(na + 1) * sizeof *argv, 0);
    for (int k = 0; k < na; k++) {
      lua_rawgeti(L, a, k + 1);
      argv[k] = (char *)luaL_checkstring(L, -1);
      lua_pop(L, 1);
    }
    argv[na] = NULL;
    hosts[i].argv = argv;
    hosts[i].workers = (uint32_t)opt_int(L, e, "workers", 0);
    lua_getfield(L, e, "exe");
    hosts[i].exe = luaL_optstring(L, -1, "lua5.4");
    lua_pop(L, 1);
  }
  pp_wbuf *b = encoded_initializer(L);
  pp_wbuf *ship = push_box(L);
  if (lua_getfield(L, 1, "ship_modules") == LUA_TTABLE)
    pp_encode(L, lua_gettop(L), 1, ship, 1, "ship_modules", 0);
  lua_pop(L, 1);
  char dump[PP_DUMP_HEX];
  pp_dump_hex(L, dump);
  pp_hosts_cfg hc;
  memset(&hc, 0, sizeof hc);
  hc.hosts = hosts;
  hc.nhosts = nh;
  hc.timeout_ms = (uint32_t)(opt_num(L, 1, "host_timeout", 10) * 1000);
  hc.start_ms = (uint32_t)(opt_num(L, 1, "start_timeout", 30) * 1000);
  hc.reconnects = (uint32_t)opt_int(L, 1, "reconnects", 0);
  hc.retry_ms = (uint32_t)(opt_num(L, 1, "reconnect_delay", 1) * 1000);
  hc.lim = *lim;
  hc.dump_hex = dump;
  hc.init = b->p;
  hc.initlen = b->n;
  hc.ship = ship->p;
  hc.shiplen = ship->n;
  pid_t zpid;
  int zfd;
  uint32_t nslots;
  char *why;
  pp_host_status *status;
  int err = pp_hosts_start(&hc, &zpid, &zfd, &nslots, &status, &why);
  if (err) {
    lua_pushstring(L, why ? why : strerror(err));
    free(why);
    pp_error_raise(L, "BrokenProcessPool", "no host could be started: %s", lua_tostring(L, -1));
  }
  cfg->nworkers = (int)nslots;
  cfg->on_hosts = 1;
  x->nworkers = (int)nslots;
  x->hosts = status;
  x->nhosts = nh;
  start_engine(L, x, cfg, zpid, zfd);
}

/* executor_new(opts) -> Executor. `opts` has been validated in Lua. */
static int l_executor_new(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  pp_engine_cfg cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.nworkers = (int)opt_int(L, 1, "max_workers", 1);
  cfg.max_tasks = (uint64_t)opt_int(L, 1, "max_tasks_per_child", 0);
  double tt = opt_num(L, 1, "task_timeout", 0);
  cfg.timeout_ns = tt > 0 ? (uint64_t)(tt * 1e9) : 0;
  lua_getfield(L, 1, "on_worker_lost");
  cfg.break_on_lost = lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "break") == 0;
  lua_pop(L, 1);
  cfg.max_output = (uint64_t)opt_int(L, 1, "max_output", 1 << 20);
  if (cfg.nworkers < 1) luaL_argerror(L, 1, "max_workers must be greater than 0");
  pp_limits lim;
  get_limits(L, &lim);
  cfg.cpu_limit = lim.cpu;
  lua_getfield(L, 1, "output");
  int capture = lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "capture") == 0;
  lua_pop(L, 1);

  pp_exec *x = lua_newuserdatauv(L, sizeof *x, EXEC_UV_N);
  memset(x, 0, sizeof *x);
  x->nworkers = cfg.nworkers;
  x->polled = 0;
  x->capture = capture;
  luaL_setmetatable(L, PP_EXECUTOR_MT);
  int xi = lua_gettop(L);

  if (lua_getfield(L, 1, "hosts") == LUA_TTABLE) {
    start_hosts(L, x, &cfg, &lim);
    lua_settop(L, xi);
    return 1;
  }
  lua_pop(L, 1);
  lua_getfield(L, 1, "context");
  int spawn = lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "spawn") == 0;
  lua_pop(L, 1);
  if (spawn) {
    /* a fresh interpreter: the initializer travels as values */
    lua_getfield(L, 1, "executable");
    const char *exe = luaL_optstring(L, -1, "lua5.4");
    /* it finds procpool where this interpreter does */
    const char *paths[2];
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_getfield(L, -2, "cpath");
    paths[0] = luaL_optstring(L, -2, "");
    paths[1] = luaL_optstring(L, -1, "");
    pp_wbuf *b = encoded_initializer(L);
    pid_t zpid;
    int zfd;
    char why[256];
    int err = pp_zygote_spawn(exe, paths, b->p, b->n, &lim, &zpid, &zfd, why, sizeof why);
    if (err) pp_error_raise(L, "BrokenProcessPool", "cannot start the spawn context: %s", why);
    start_engine(L, x, &cfg, zpid, zfd);
    lua_settop(L, xi);
    return 1;
  }

  /* the initializer and its arguments stay on this stack: the zygote's
   * copy of it is what workers run */
  pp_wctx w;
  memset(&w, 0, sizeof w);
  w.lim = lim;
  lua_getfield(L, 1, "initializer");
  if (!lua_isnil(L, -1)) {
    w.init_idx = lua_gettop(L);
    w.init_str = lua_type(L, -1) == LUA_TSTRING;
    w.init_n = push_initargs(L);
  }
  pid_t zpid;
  int zfd, err = pp_zygote_fork(L, &w, &zpid, &zfd);
  if (err)
    pp_error_raise(L, "BrokenProcessPool", "cannot start the zygote process: %s", strerror(err));
  start_engine(L, x, &cfg, zpid, zfd);
  lua_settop(L, xi);
  return 1;
}

/* A Lua-owned write buffer (freed by GC if anything raises). */
static pp_wbuf *push_box(lua_State *L) {
  pp_wbuf *b = lua_newuserdatauv(L, sizeof(pp_wbuf) + sizeof(int), 0);
  pp_wbuf_init(b, PP_MEMFD_MIN);
  *(int *)(b + 1) = 0;
  luaL_setmetatable(L, "procpool.Buffer");
  return b;
}

/* Room for a payload length prefix (wire.h), filled in by patch_len once
 * what it counts is written. */
static void put_u32_placeholder(lua_State *L, pp_wbuf *b) {
  if (pp_wbuf_reserve(b, PP_LEN_PREFIX) != 0) luaL_error(L, "procpool: not enough memory");
  b->n += PP_LEN_PREFIX;
}

static void patch_len(pp_wbuf *b, size_t at) {
  pp_wire_put_len((unsigned char *)b->p + at, (uint32_t)(b->n - at - PP_LEN_PREFIX));
}

static void check_fn(lua_State *L, int idx) {
  int t = lua_type(L, idx);
  if (t != LUA_TFUNCTION && t != LUA_TSTRING)
    luaL_typeerror(L, idx, "function or \"module.name\" string");
}

/* The C memory a job holds while its Future lives is unseen by Lua's
 * collector (the Future is 64 bytes): it is told as allocation debt, so
 * that garbage futures are collected at the pace of what they hold and
 * RSS stays flat over many tasks. A collector the program stopped
 * (collectgarbage "stop") stays stopped: an explicit step would run it
 * anyway. */
#define GC_TELL_AT 8192
static void tell_collector(lua_State *L, pp_exec *x, const pp_job *j) {
  x->untold += pp_job_bytes(j->n, j->ilen);
  if (j->x) x->untold += sizeof *j->x + (j->x->payload ? j->x->payload->n : 0);
  if (x->untold < GC_TELL_AT) return;
  size_t kib = x->untold >> 10;
  x->untold &= 1023;
  if (lua_gc(L, LUA_GCISRUNNING)) lua_gc(L, LUA_GCSTEP, kib > INT_MAX ? INT_MAX : (int)kib);
}

/* Queue the job and push its Future (the job's reference moves into it);
 * `listener` (a stack index, 0: none) hears its items' reports. */
static void submit_job_heard(lua_State *L, pp_exec *x, pp_job *j, int listener) {
  pp_future_push(L, x->e, j);
  if (listener) pp_future_listen_items(L, -1, listener);
  tell_collector(L, x, j);
  const char *msg = NULL;
  int rc = pp_engine_submit(x->e, j, &msg);
  if (rc && listener && pp_progress_forget(L, j)) pp_future_count_engine(L, x->e, -1);
  if (rc == PP_EBROKEN) pp_error_raise(L, "BrokenProcessPool", "%s", msg);
  if (rc) pp_error_raise(L, "InvalidStateError", "%s", msg);
}

static void submit_job(lua_State *L, pp_exec *x, pp_job *j) { submit_job_heard(L, x, j, 0); }

static void scratch_init(void *o) { pp_wbuf_init(o, PP_MEMFD_MIN); }

/* submit's buffer, kept in the executor (a box's layout: the buffer, then
 * its in-use flag), so a task costs no buffer of its own; its metatable
 * (and __gc) is codec.c's */
static const pp_scratch_kind scratch_kind = {
    EXEC_UV_SCRATCH, sizeof(pp_wbuf) + sizeof(int), sizeof(pp_wbuf), "procpool.Buffer", NULL,
    scratch_init};

static void job_fail(lua_State *L, pp_job *j) {
  pp_job_unref(j);
  luaL_error(L, "procpool: not enough memory");
}

/* The job's own deadline (seconds, 0: the executor's) and capture. */
static pp_job *job_options(lua_State *L, pp_job *j, double timeout, int capture) {
  if (pp_job_set_timeout(j, timeout > 0 ? (uint64_t)(timeout * 1e9) : 0) != 0) job_fail(L, j);
  if (pp_job_set_capture(j, capture) != 0) job_fail(L, j);
  return j;
}

static pp_job *new_job(lua_State *L, uint32_t n, pp_wbuf *b, double timeout, int capture) {
  pp_job *j = pp_job_new(n, 0);
  if (!j) luaL_error(L, "procpool: not enough memory");
  pp_blob *payload = pp_blob_from_wbuf(b, 1);
  if (!payload) job_fail(L, j);
  if (pp_job_set_payload(j, payload) != 0) {
    pp_blob_unref(payload);
    job_fail(L, j);
  }
  return job_options(L, j, timeout, capture);
}

/* The job of one task whose payload is in b, its function part ending at
 * fnend: on the heap, one allocation holding the argument bytes at their
 * size, and the function bytes shared with earlier jobs that sent the
 * same (`fn`, when the caller has their blob already); a memfd payload is
 * kept whole. b is left empty for reuse. */
static pp_job *task_job(lua_State *L, pp_exec *x, pp_wbuf *b, size_t fnend, pp_blob *fn,
                        double timeout, int capture) {
  if (b->fd >= 0) return new_job(L, 1, b, timeout, capture);
  pp_job *j = pp_job_new(1, b->n - fnend);
  if (!j) luaL_error(L, "procpool: not enough memory");
  memcpy(pp_job_inline(j), b->p + fnend, b->n - fnend);
  j->fn = fn ? pp_blob_ref(fn) : pp_fncache_get(&x->fns, b->p, fnend);
  pp_wbuf_reset(b);
  if (!j->fn) job_fail(L, j);
  return job_options(L, j, timeout, capture);
}

/* Whether the encoding of the function at idx is the same whenever it is
 * sent: a Lua function with no upvalue but _ENV (its bytecode never
 * changes, and an _ENV goes as the receiver's globals, whatever it holds).
 * The function and the arguments are encoded apart, so no reference
 * between them is lost by reusing the function's bytes. */
static int fn_is_fixed(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TFUNCTION || lua_iscfunction(L, idx)) return 0;
  const char *name = lua_getupvalue(L, idx, 1);
  if (!name) return 1;
  lua_pop(L, 1);
  if (strcmp(name, "_ENV") != 0) return 0;
  if (!lua_getupvalue(L, idx, 2)) return 1;
  lua_pop(L, 1);
  return 0;
}

/* Remember the function at fi and its encoding `fn` for the next submit
 * (or forget the last one). */
static void remember_fn(lua_State *L, pp_exec *x, int fi, pp_blob *fn) {
  pp_blob_unref(x->last_fn);
  x->last_fn = fn ? pp_blob_ref(fn) : NULL;
  if (fn)
    lua_pushvalue(L, fi);
  else
    lua_pushnil(L);
  lua_setiuservalue(L, 1, EXEC_UV_LASTFN);
}

/* The encoding of the function at fi if it is the one last submitted
 * (and fixed), else NULL. */
static pp_blob *remembered_fn(lua_State *L, pp_exec *x, int fi) {
  if (!x->last_fn) return NULL;
  lua_getiuservalue(L, 1, EXEC_UV_LASTFN);
  int same = lua_rawequal(L, -1, fi);
  lua_pop(L, 1);
  return same ? x->last_fn : NULL;
}

/* Submit fn(...) (fn at index `fi`, its arguments after it; the
 * executor at 1). */
static int submit_task(lua_State *L, pp_exec *x, double timeout, int capture, int fi) {
  check_fn(L, fi);
  int nargs = lua_gettop(L) - fi;
  /* (an encoding that raised leaves the buffer marked busy: the next
   * submit replaces it) */
  int *busy;
  pp_wbuf *b = pp_codec_scratch(L, 1, &scratch_kind, &busy);
  *busy = 1;
  b->n = 0;
  pp_blob *fn = remembered_fn(L, x, fi);
  if (fn) { /* the same function again: its bytes as sent before */
    if (pp_wbuf_reserve(b, fn->n) != 0) luaL_error(L, "procpool: not enough memory");
    memcpy(b->p, fn->p, fn->n);
    b->n = fn->n;
  } else {
    put_u32_placeholder(L, b);
    pp_encode(L, fi, 1, b, 0, "=fn", 0);
    patch_len(b, 0);
  }
  size_t at = b->n;
  put_u32_placeholder(L, b);
  pp_encode(L, fi + 1, nargs, b, 0, "args", 0);
  patch_len(b, at);
  pp_job *j = task_job(L, x, b, at, fn, timeout, capture);
  *busy = 0;
  if (j->fn && j->fn != x->last_fn) {
    if (fn_is_fixed(L, fi))
      remember_fn(L, x, fi, j->fn);
    else if (x->last_fn)
      remember_fn(L, x, fi, NULL);
  }
  submit_job(L, x, j);
  return 1;
}

/* _submit(timeout|nil, fn, ...) -> Future (output as the executor's) */
static int l_submit(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  return submit_task(L, x, luaL_optnumber(L, 2, 0), x->capture, 3);
}

/* _submit_as(timeout|nil, capture, fn, ...) -> Future */
static int l_submit_as(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  return submit_task(L, x, luaL_optnumber(L, 2, 0), lua_toboolean(L, 3), 4);
}

/* fast_apply's upvalues: the Lua method, then the names it reads (kept,
 * so that no string is hashed per call) */
enum { FA_METHOD = 1, FA_N, FA_STATE, FA_CAPTURE, FA_EX, FA_RUN, FA_NUP = FA_RUN };

/* Push t[upvalue k], raw, for the table at idx (absolute); its type. */
static int rawfield(lua_State *L, int idx, int k) {
  lua_pushvalue(L, lua_upvalueindex(k));
  return lua_rawget(L, idx);
}

/* Pool:apply_async(fn, args) in its commonest case, else the Lua method:
 * a running pool without captured output, no options, args nil or a
 * plain list of a few. The pool's fields (pool.lua's Pool) are read raw:
 * _state, _capture, _ex. A third of a tiny apply's cost was its Lua
 * call, its checks and its result table; here it is one submit. */
static int fast_apply(lua_State *L) {
  int top = lua_gettop(L);
  if (top > 4 || !lua_isnoneornil(L, 4) || lua_type(L, 1) != LUA_TTABLE) goto slow;
  lua_settop(L, 3);
  int tf = lua_type(L, 2), ta = lua_type(L, 3);
  if (tf != LUA_TFUNCTION && tf != LUA_TSTRING) goto slow;
  lua_Integer n = 0;
  if (ta == LUA_TTABLE) {
    if (lua_getmetatable(L, 3) || rawfield(L, 3, FA_N) != LUA_TNIL) goto slow;
    n = (lua_Integer)lua_rawlen(L, 3);
    if (n > 64) goto slow; /* (the stack room unpack checks) */
  } else if (ta != LUA_TNIL) {
    goto slow;
  }
  rawfield(L, 1, FA_STATE);
  if (!lua_rawequal(L, -1, lua_upvalueindex(FA_RUN))) goto slow;
  rawfield(L, 1, FA_CAPTURE);
  if (lua_toboolean(L, -1)) goto slow;
  rawfield(L, 1, FA_EX);
  pp_exec *x = checkexec(L, -1);
  lua_replace(L, 1); /* ex, fn, args */
  lua_settop(L, 3);
  luaL_checkstack(L, (int)n + 8, NULL);
  for (lua_Integer i = 1; i <= n; i++) lua_rawgeti(L, 3, i);
  lua_remove(L, 3); /* ex, fn, args... */
  submit_task(L, x, 0, 0, 2);
  pp_future_as_apply(L, -1);
  return 1;
slow:
  lua_settop(L, top);
  lua_pushvalue(L, lua_upvalueindex(FA_METHOD));
  lua_insert(L, 1);
  lua_call(L, top, LUA_MULTRET);
  return lua_gettop(L);
}

/* fast_apply(method): Pool:apply_async (above) over its Lua method */
static int l_fast_apply(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_pushliteral(L, "n");
  lua_pushliteral(L, "_state");
  lua_pushliteral(L, "_capture");
  lua_pushliteral(L, "_ex");
  lua_pushliteral(L, "RUN");
  lua_pushcclosure(L, fast_apply, FA_NUP);
  return 1;
}

/* Items pushed at once by a chunk's scalar run (stack slots it takes). */
#define SCALAR_BATCH 64

/* Encode items[from], items[from + 1], ... (the items at stack index 3),
 * at most `left` of them, each a scalar behind its u32 length, while they
 * are scalars: pushed a batch at a time and popped at once. Returns how
 * many it encoded (0: the general encoder takes items[from], and raises
 * whatever is wrong, out of memory too). */
static uint32_t put_scalar_run(lua_State *L, pp_wbuf *b, lua_Integer from, uint32_t left) {
  uint32_t m = left < SCALAR_BATCH ? left : SCALAR_BATCH, d = 0;
  if (!lua_checkstack(L, (int)m) ||
      pp_wbuf_reserve(b, (size_t)m * (PP_LEN_PREFIX + PP_ENCODE_SCALAR_MAX)) != 0)
    return 0;
  int top = lua_gettop(L);
  unsigned char *q = (unsigned char *)b->p + b->n;
  for (; d < m; d++) {
    int t = lua_rawgeti(L, 3, from + (lua_Integer)d);
    size_t len = pp_encode_scalar(L, -1, t, q + PP_LEN_PREFIX);
    if (!len) break;
    pp_wire_put_len(q, (uint32_t)len);
    q += PP_LEN_PREFIX + len;
  }
  b->n = (size_t)(q - (unsigned char *)b->p);
  lua_settop(L, top);
  return d;
}

/* _submit_chunk(fn, items, i, j, star, timeout|nil, base|nil,
 * listener|nil, capture|nil) -> Future for fn(items[i]) .. fn(items[j]);
 * with `star`, each item is a table of arguments (unpacked 1..(t.n or
 * #t)). An item that cannot be serialized is named by its input
 * position, base + 1 for items[i] (base defaults to i - 1). The items'
 * reports are dropped unless a `listener` is given: then it is called as
 * listener(f, k, ...) with every report of item k of the chunk, heard
 * from before the chunk is submitted. `capture` nil: as the executor's. */
static int l_submit_chunk(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  check_fn(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_Integer lo = luaL_checkinteger(L, 4), hi = luaL_checkinteger(L, 5);
  int star = lua_toboolean(L, 6);
  double timeout = luaL_optnumber(L, 7, 0);
  lua_Integer pos0 = luaL_optinteger(L, 8, lo - 1) + 1; /* input position of items[lo] */
  int heard = lua_isfunction(L, 9);
  int capture = lua_isnoneornil(L, 10) ? x->capture : lua_toboolean(L, 10);
  if (hi - lo + 1 < 0 || hi - lo + 1 > (lua_Integer)UINT32_MAX / 2)
    luaL_argerror(L, 5, "bad range");
  uint32_t n = (uint32_t)(hi - lo + 1);
  lua_settop(L, 10);
  pp_wbuf *b = push_box(L);
  /* room for small items up front: no regrowing (and copying) per chunk */
  if (pp_wbuf_reserve(b, (size_t)n * 8 + 64) != 0) luaL_error(L, "procpool: not enough memory");
  put_u32_placeholder(L, b);
  pp_encode(L, 2, 1, b, 0, "=fn", 0);
  patch_len(b, 0);
  int top = lua_gettop(L);
  for (uint32_t k = 0; k < n; k++) {
    if (!star) {
      /* the common case, without the general encoder (an item it does
       * not take goes on below) */
      uint32_t d = put_scalar_run(L, b, lo + (lua_Integer)k, n - k);
      if (d) {
        k += d - 1; /* (and the loop's k++) */
        continue;
      }
    }
    lua_rawgeti(L, 3, lo + (lua_Integer)k);
    size_t at = b->n;
    put_u32_placeholder(L, b);
    if (star) {
      int it = lua_gettop(L);
      if (!lua_istable(L, it))
        pp_error_raise(L, "SerializationError", "starmap item %d is not a table of arguments",
                       (int)(pos0 + k));
      lua_getfield(L, it, "n");
      lua_Integer m = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : (lua_Integer)lua_rawlen(L, it);
      lua_pop(L, 1);
      luaL_checkstack(L, (int)m + 4, "procpool: too many arguments");
      for (lua_Integer a = 1; a <= m; a++) lua_rawgeti(L, it, a);
      const char *root = lua_pushfstring(L, "item[%d]", (int)(pos0 + (lua_Integer)k));
      lua_insert(L, it + 1);
      pp_encode(L, it + 2, (int)m, b, 0, root, 0);
    } else {
      const char *root = lua_pushfstring(L, "=item[%d]", (int)(pos0 + (lua_Integer)k));
      pp_encode(L, -2, 1, b, 0, root, 0);
    }
    lua_settop(L, top);
    patch_len(b, at);
  }
  pp_job *j = new_job(L, n, b, timeout, capture);
  /* reports nobody hears are dropped in the engine; a listener asks for
   * them (pp_future_listen_items) */
  if (!heard && pp_job_set_reports(j, PP_REPORTS_DROP) != 0) job_fail(L, j);
  submit_job_heard(L, x, j, heard ? 9 : 0);
  return 1;
}

static int l_shutdown(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  pp_engine_shutdown(x->e, lua_toboolean(L, 2));
  return 0;
}

static int l_kill(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  pp_engine_kill(x->e, (int)luaL_checkinteger(L, 2));
  return 0;
}

static int l_join(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  if (pp_engine_state(x->e) == PP_E_DEAD) pp_engine_join(x->e);
  return 0;
}

static int l_state(lua_State *L) {
  pp_exec *x = luaL_checkudata(L, 1, PP_EXECUTOR_MT);
  static const char *names[] = {"running", "draining", "closing", "dead"};
  if (!x->e || !pp_engine_mine(x->e)) {
    lua_pushliteral(L, "dead");
    return 1;
  }
  const char *broken = pp_engine_broken(x->e);
  lua_pushstring(L, names[pp_engine_state(x->e)]);
  if (broken) {
    lua_pushstring(L, broken);
    return 2;
  }
  return 1;
}

/* stats().hosts: one table per host, in the order given. */
static void push_hosts(lua_State *L, const pp_exec *x) {
  static const char *const states[] = {"connecting", "connecting", "up", "lost", "failed"};
  uint64_t now = pp_now_ns();
  lua_createtable(L, x->nhosts, 0);
  for (int i = 0; i < x->nhosts; i++) {
    pp_host_status h;
    pp_host_status_read(&x->hosts[i], &h);
    lua_createtable(L, 0, 8);
    lua_pushstring(L, h.name);
    lua_setfield(L, -2, "host");
    lua_pushstring(L, states[h.state <= PP_HS_FAILED ? h.state : 0]);
    lua_setfield(L, -2, "state");
    lua_pushinteger(L, h.workers);
    lua_setfield(L, -2, "workers");
    lua_pushinteger(L, h.losses);
    lua_setfield(L, -2, "losses");
    lua_pushinteger(L, h.reconnects);
    lua_setfield(L, -2, "reconnects");
    if (h.rtt_ns) {
      lua_pushnumber(L, (double)h.rtt_ns / 1e9);
      lua_setfield(L, -2, "rtt");
    }
    if (h.seen_ns) {
      lua_pushnumber(L, now > h.seen_ns ? (double)(now - h.seen_ns) / 1e9 : 0.0);
      lua_setfield(L, -2, "last_seen");
    }
    if ((h.state == PP_HS_LOST || h.state == PP_HS_FAILED || h.losses) && h.reason[0]) {
      lua_pushstring(L, h.reason);
      lua_setfield(L, -2, "reason");
    }
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "hosts");
}

static int l_stats(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  pp_stats s;
  pp_engine_stats(x->e, &s);
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, s.workers);
  lua_setfield(L, -2, "workers");
#define F(name)                                                                                    \
  lua_pushinteger(L, (lua_Integer)s.name);                                                         \
  lua_setfield(L, -2, #name)
  F(pending);
  F(running);
  F(completed);
  F(failed);
  F(cancelled);
  F(worker_restarts);
  F(taken_back);
#undef F
  if (x->hosts) push_hosts(L, x);
  return 1;
}

static int l_pollfd(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  lua_pushinteger(L, pp_engine_fd(x->e));
  return 1;
}

/* poll()'s wait: futures ended since the last poll (their callbacks
 * run), or the engine has ended. */
typedef struct pollwait {
  pp_wait w;
  pp_exec *x;
  uint64_t n; /* ended since the last poll */
} pollwait;

static int poll_look(lua_State *L, pp_wait *w) {
  pollwait *p = (pollwait *)w;
  p->n = pp_engine_ack(p->x->e) - p->x->polled;
  pp_drain(L);
  return p->n > 0 || pp_engine_state(p->x->e) == PP_E_DEAD;
}

/* poll(timeout) -> number of futures that ended since the last poll */
static int l_poll(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  double timeout = luaL_optnumber(L, 2, 0);
  pollwait p = {{.check = poll_look,
                 .engs = &x->e,
                 .nengs = 1,
                 .deadline = pp_wait_now() + (timeout > 0 ? timeout : 0),
                 .slice_ms = -1,
                 .on_signal = 1},
                x,
                0};
  pp_wait_loop(L, &p.w);
  x->polled += p.n;
  lua_pushinteger(L, (lua_Integer)p.n);
  return 1;
}

static int l_item_ns(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  lua_pushinteger(L, (lua_Integer)pp_engine_item_ns(x->e));
  return 1;
}

/* _capture() -> whether tasks capture their output unless told */
static int l_capture(lua_State *L) {
  pp_exec *x = checkexec(L, 1);
  lua_pushboolean(L, x->capture);
  return 1;
}

static int l_nworkers(lua_State *L) {
  pp_exec *x = luaL_checkudata(L, 1, PP_EXECUTOR_MT);
  lua_pushinteger(L, x->nworkers);
  return 1;
}

/* The closing wait's look: the engine has ended (no callbacks run). */
static int ended_look(lua_State *L, pp_wait *w) {
  pp_engine_ack(w->engs[0]);
  return pp_engine_state(w->engs[0]) == PP_E_DEAD;
}

/* Garbage collection: an executor nobody can reach any more. */
static int l_gc(lua_State *L) {
  pp_exec *x = luaL_checkudata(L, 1, PP_EXECUTOR_MT);
  pp_host_status_free(x->hosts, x->nhosts);
  x->hosts = NULL;
  if (!x->e) return 0;
  pp_engine *e = x->e;
  x->e = NULL;
  if (!pp_engine_mine(e)) return 0; /* a worker's copy of its parent's */
  pp_fncache_clear(&x->fns);
  pp_blob_unref(x->last_fn);
  x->last_fn = NULL;
  if (state_closing(L)->closing) {
    /* the state is closing: stop the workers now and wait for them */
    if (pp_engine_state(e) != PP_E_DEAD) pp_engine_kill(e, SIGKILL);
    pp_wait w = {.check = ended_look, .engs = &e, .nengs = 1, .deadline = -1, .slice_ms = 100};
    pp_wait_loop(L, &w);
    pp_engine_join(e);
  } else {
    /* running tasks finish in the background. Queued ones are cancelled
     * if the executor was never shut down; after shutdown{wait=false}
     * every accepted task runs to its end */
    pp_engine_shutdown(e, pp_engine_state(e) == PP_E_RUNNING);
    pp_engine_detach(e);
  }
  pp_engine_unref(e);
  return 0;
}

/* _warm_kept() -> the bytes of large buffers kept for reuse (warm.h): a
 * spec's view of whether a map's memory went back while warm */
static int l_warm_kept(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)pp_warm_kept());
  return 1;
}

static int l_cpu_count(lua_State *L) {
  cpu_set_t set;
  int n = 0;
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
  if (n < 1) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
  lua_pushinteger(L, n < 1 ? 1 : n);
  return 1;
}

/* _zygote(): the entry point of a spawned interpreter (proc.c's
 * SPAWN_ENTRY) */
static int l_zygote(lua_State *L) { pp_zygote_spawned(L); }

/* _agent(): the entry point of an interpreter a launcher started on a
 * host (agent.c) */
static int l_agent(lua_State *L) { pp_agent_main(L); }

static int l_current_worker(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, "procpool.current_worker") != LUA_TTABLE) return 1;
  /* a copy, so callers cannot change what later tasks see */
  lua_createtable(L, 0, 2);
  lua_getfield(L, -2, "id");
  lua_setfield(L, -2, "id");
  lua_getfield(L, -2, "pid");
  lua_setfield(L, -2, "pid");
  lua_getfield(L, -2, "host");
  lua_setfield(L, -2, "host");
  return 1;
}

void pp_engine_open(lua_State *L) {
  static const luaL_Reg methods[] = {{"_submit", l_submit},
                                     {"_submit_chunk", l_submit_chunk},
                                     {"_submit_as", l_submit_as},
                                     {"_capture", l_capture},
                                     {"_shutdown", l_shutdown},
                                     {"_kill", l_kill},
                                     {"_join", l_join},
                                     {"_state", l_state},
                                     {"_item_ns", l_item_ns},
                                     {"_nworkers", l_nworkers},
                                     {"stats", l_stats},
                                     {"poll", l_poll},
                                     {"pollfd", l_pollfd},
                                     {"events", pp_pollable_events},
                                     {"timeout", pp_pollable_timeout},
                                     {NULL, NULL}};
  static const luaL_Reg fns[] = {{"executor_new", l_executor_new},
                                 {"cpu_count", l_cpu_count},
                                 {"current_worker", l_current_worker},
                                 {"fast_apply", l_fast_apply},
                                 {"_zygote", l_zygote},
                                 {"_agent", l_agent},
                                 {"_warm_kept", l_warm_kept},
                                 {NULL, NULL}};
  luaL_newmetatable(L, CLOSING_MT);
  lua_pushcfunction(L, sentinel_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, PP_EXECUTOR_MT);
  pp_udata_register(L, &executor_mt_key);
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_setfield(L, -2, "Executor"); /* module.Executor = the metatable */
  luaL_setfuncs(L, fns, 0);
}
