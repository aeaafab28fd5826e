/* agent.h: a host's end of the link to the parent (agent.c). */
#ifndef PP_AGENT_H
#define PP_AGENT_H

#include <lua.h>

/* In an interpreter the launcher started on a host (procpool.core's
 * _agent): speak the host protocol (link.h) over stdin and stdout, fork
 * the host's workers, carry their channels. Never returns; exits when the
 * parent goes away, after its workers. */
void pp_agent_main(lua_State *L) __attribute__((noreturn));

#endif
