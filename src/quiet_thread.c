/* quiet_thread.c: a worker's helper threads, which take no signals. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <signal.h>

#include "quiet_thread.h"

int pp_quiet_thread(void *(*fn)(void *), void *arg, size_t stack) {
  pthread_attr_t ta;
  pthread_attr_init(&ta);
  pthread_attr_setstacksize(&ta, stack);
  pthread_t th;
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int rc = pthread_create(&th, &ta, fn, arg);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  pthread_attr_destroy(&ta);
  if (rc == 0) pthread_detach(th);
  return rc;
}
