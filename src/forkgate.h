/* forkgate.h: no thread of this library is inside its own work while the
 * process forks. */
#ifndef PP_FORKGATE_H
#define PP_FORKGATE_H

/* An engine's I/O thread holds the gate (shared) from the moment it wakes
 * until it waits again. */
void pp_forkgate_enter(void);
void pp_forkgate_leave(void);

/* fork() with the gate held exclusively: the child starts with no thread
 * of ours stopped halfway through an allocation (glibc's malloc is safe
 * across fork, the sanitizers' allocators are not). The child gets a
 * fresh gate. Returns what fork() returned. */
int pp_forkgate_fork(void);

#endif
