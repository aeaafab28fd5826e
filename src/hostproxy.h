/* hostproxy.h: the zygote of a pool whose workers run on hosts: a local
 * process that starts each host's agent through its launcher and speaks
 * the zygote protocol (channel.h) to the engine for them. */
#ifndef PP_HOSTPROXY_H
#define PP_HOSTPROXY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "channel.h"

/* One host: how to start its agent, and how many workers it runs. */
typedef struct pp_host {
  const char *name;  /* as the user wrote it, for messages */
  char *const *argv; /* the launcher's command, NULL-terminated (run with PATH) */
  uint32_t workers;  /* 0: as many as the host has CPUs (its HELLO says) */
  const char *exe;   /* the interpreter it runs the agent with, for messages */
} pp_host;

/* What every host's agent is given. */
typedef struct pp_hosts_cfg {
  const pp_host *hosts;
  int nhosts;
  uint32_t nslots;      /* the engine's workers, over all hosts */
  uint32_t timeout_ms;  /* silence after which a host is lost (both ways) */
  uint32_t start_ms;    /* how long an agent may take to start */
  pp_limits lim;        /* the workers' limits */
  const char *dump_hex; /* this interpreter's bytecode header (pp_dump_hex) */
  const char *init;     /* the encoded initializer list (may be NULL) */
  size_t initlen;
} pp_hosts_cfg;

/* The first bytes of string.dump's output (the bytecode format: version,
 * sizes, byte order), in hex, into out[PP_DUMP_HEX] (the agent sends its
 * own in HELLO). */
#define PP_DUMP_BYTES 31
#define PP_DUMP_HEX (2 * PP_DUMP_BYTES + 1)
struct lua_State;
void pp_dump_hex(struct lua_State *L, char out[PP_DUMP_HEX]);

/* Fork the proxy and wait until every host is up or has failed. 0 with
 * *pid and *zfd (for pp_engine_new, as a zygote's) and *nslots (the
 * engine's workers: those of the hosts that came up, in the order given)
 * when at least one host is up; else an errno, with `why` (malloc'ed, the caller frees it)
 * naming every host and its reason. A host that failed while others came
 * up is told on stderr, and its slots never start. */
int pp_hosts_start(const pp_hosts_cfg *cfg, pid_t *pid, int *zfd, uint32_t *nslots, char **why);

#endif
