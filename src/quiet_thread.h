/* quiet_thread.h: a worker's helper threads, which take no signals. */
#ifndef PP_QUIET_THREAD_H
#define PP_QUIET_THREAD_H

#include <stddef.h>

/* Start fn(arg) on a detached thread with a stack of `stack` bytes and
 * every signal blocked: deadlines, kills and Ctrl-C are for the task
 * thread. 0, or the error of pthread_create. */
int pp_quiet_thread(void *(*fn)(void *), void *arg, size_t stack);

#endif
