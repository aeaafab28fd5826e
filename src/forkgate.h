/* forkgate.h: no thread of this library is inside its own work, nor
 * starting or ending, while the process forks. */
#ifndef PP_FORKGATE_H
#define PP_FORKGATE_H

#include <pthread.h>

/* An engine's I/O thread holds the gate (shared) from the moment it wakes
 * until it waits again. */
void pp_forkgate_enter(void);
void pp_forkgate_leave(void);

/* The I/O threads' lives. A thread is registered by its creator right
 * after pthread_create (pp_forkgate_register) and leaves the gate for the
 * last time with pp_forkgate_retire. Its joiner, the engine
 * (pp_forkgate_join) or, for a thread nobody will join
 * (pp_forkgate_disown), the next fork, waits for the rest of its exit:
 * the C library and the sanitizers free its stack and thread-local state
 * after its start routine returns, outside the gate. Returns 0 or an
 * errno value. */
int pp_forkgate_register(pthread_t th);
void pp_forkgate_retire(void);
void pp_forkgate_join(pthread_t th);
void pp_forkgate_disown(pthread_t th);

/* fork() with the gate held exclusively, after joining every retired
 * thread nobody else joins: the child starts with no thread of ours
 * stopped halfway through an allocation (glibc's malloc is safe across
 * fork, the sanitizers' allocators are not). The child gets a fresh
 * gate. Returns what fork() returned. */
int pp_forkgate_fork(void);

#endif
