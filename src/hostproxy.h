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

/* What the proxy tells of each host, in memory it shares with the parent
 * (ex:stats().hosts). A seqlock: `seq` is odd while the proxy writes;
 * read it with pp_host_status_read. */
enum { PP_HS_CONNECTING = 1, PP_HS_UP, PP_HS_LOST, PP_HS_FAILED };
typedef struct pp_host_status {
  uint32_t seq;
  uint32_t state;      /* PP_HS_*; LOST: waiting to reconnect */
  uint32_t workers;    /* its engine slots */
  uint32_t losses;     /* times it was lost */
  uint32_t reconnects; /* times it came back */
  uint32_t pad;
  uint64_t rtt_ns;  /* the last heartbeat's round trip; 0: none yet */
  uint64_t seen_ns; /* pp_now_ns() of its last message; 0: none yet */
  char name[128];   /* as the user wrote it (cut short), set by the parent */
  char reason[480]; /* why it was last lost, or why it failed */
} pp_host_status;

/* A consistent copy of *s into *out. */
void pp_host_status_read(const pp_host_status *s, pp_host_status *out);

/* What every host's agent is given. */
typedef struct pp_hosts_cfg {
  const pp_host *hosts;
  int nhosts;
  uint32_t nslots;      /* the engine's workers, over all hosts */
  uint32_t timeout_ms;  /* silence after which a host is lost (both ways) */
  uint32_t start_ms;    /* how long an agent may take to start */
  uint32_t reconnects;  /* launches after a loss before a host is given up */
  uint32_t retry_ms;    /* the first of them after this, each next one after twice as long */
  pp_limits lim;        /* the workers' limits */
  const char *dump_hex; /* this interpreter's bytecode header (pp_dump_hex) */
  const char *init;     /* the encoded initializer list (may be NULL) */
  size_t initlen;
  const char *ship; /* the encoded shipped modules, { [name] = { source, path } } (may be NULL) */
  size_t shiplen;
} pp_hosts_cfg;

/* The first bytes of string.dump's output (the bytecode format: version,
 * sizes, byte order), in hex, into out[PP_DUMP_HEX] (the agent sends its
 * own in HELLO). */
#define PP_DUMP_BYTES 31
#define PP_DUMP_HEX (2 * PP_DUMP_BYTES + 1)
struct lua_State;
void pp_dump_hex(struct lua_State *L, char out[PP_DUMP_HEX]);

/* Fork the proxy and wait until every host is up or has failed. 0 with
 * *pid and *zfd (for pp_engine_new, as a zygote's), *nslots (the
 * engine's workers: those of the hosts that came up, in the order given)
 * and *status (cfg->nhosts of them, shared with the proxy: unmap them
 * with pp_host_status_free) when at least one host is up; else an errno,
 * with `why` (malloc'ed, the caller frees it) naming every host and its
 * reason. A host that failed while others came up is told on stderr, and
 * its slots never start. */
int pp_hosts_start(const pp_hosts_cfg *cfg, pid_t *pid, int *zfd, uint32_t *nslots,
                   pp_host_status **status, char **why);
void pp_host_status_free(pp_host_status *status, int nhosts);

#endif
