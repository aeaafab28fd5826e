/* forkgate.c: no thread of this library is inside its own work while the
 * process forks (see forkgate.h). */
#define _GNU_SOURCE
#include "forkgate.h"

#include <pthread.h>
#include <unistd.h>

/* Writers first: a fork waits only for the I/O threads' current rounds,
 * never for a stream of new ones. */
static pthread_rwlock_t gate = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;

void pp_forkgate_enter(void) { pthread_rwlock_rdlock(&gate); }

void pp_forkgate_leave(void) { pthread_rwlock_unlock(&gate); }

int pp_forkgate_fork(void) {
  pthread_rwlock_wrlock(&gate);
  pid_t pid = fork();
  if (pid == 0) {
    /* the copy is held by a thread the child does not have */
    pthread_rwlock_t fresh = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;
    gate = fresh;
  } else {
    pthread_rwlock_unlock(&gate);
  }
  return pid;
}
