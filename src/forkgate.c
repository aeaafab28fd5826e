/* forkgate.c: no thread of this library is inside its own work, nor
 * starting or ending, while the process forks (see forkgate.h). */
#define _GNU_SOURCE
#include "forkgate.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

/* Writers first: a fork waits only for the I/O threads' current rounds,
 * never for a stream of new ones. */
static pthread_rwlock_t gate = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;

void pp_forkgate_enter(void) { pthread_rwlock_rdlock(&gate); }

void pp_forkgate_leave(void) { pthread_rwlock_unlock(&gate); }

/* One record per I/O thread from its creation until it is joined. */
typedef struct lifeline {
  pthread_t th;
  int retired; /* its start routine is over: joining it cannot block long */
  int owned;   /* an engine will join it (pp_forkgate_join) */
  int claimed; /* its engine is joining it now */
  int joined;  /* a fork joined it; the engine only forgets it */
  struct lifeline *next;
} lifeline;

static pthread_mutex_t lives_mu = PTHREAD_MUTEX_INITIALIZER;
static lifeline *lives;

static lifeline **find(pthread_t th) {
  lifeline **p = &lives;
  while (*p && !pthread_equal((*p)->th, th)) p = &(*p)->next;
  return p;
}

static void forget(lifeline **p) {
  lifeline *l = *p;
  *p = l->next;
  free(l);
}

int pp_forkgate_register(pthread_t th) {
  lifeline *l = calloc(1, sizeof *l);
  if (!l) return ENOMEM;
  l->th = th;
  l->owned = 1;
  pthread_mutex_lock(&lives_mu);
  l->next = lives;
  lives = l;
  pthread_mutex_unlock(&lives_mu);
  return 0;
}

void pp_forkgate_retire(void) {
  pthread_mutex_lock(&lives_mu);
  lifeline *l = *find(pthread_self());
  if (l) l->retired = 1;
  pthread_mutex_unlock(&lives_mu);
  pthread_rwlock_unlock(&gate);
}

void pp_forkgate_join(pthread_t th) {
  pthread_mutex_lock(&lives_mu);
  lifeline **p = find(th);
  int join = *p && !(*p)->joined;
  if (*p) (*p)->claimed = 1;
  pthread_mutex_unlock(&lives_mu);
  if (join) pthread_join(th, NULL);
  pthread_mutex_lock(&lives_mu);
  p = find(th);
  if (*p) forget(p);
  pthread_mutex_unlock(&lives_mu);
}

void pp_forkgate_disown(pthread_t th) {
  pthread_mutex_lock(&lives_mu);
  lifeline **p = find(th);
  if (*p) {
    if ((*p)->joined)
      forget(p);
    else
      (*p)->owned = 0;
  }
  pthread_mutex_unlock(&lives_mu);
}

int pp_forkgate_fork(void) {
  pthread_rwlock_wrlock(&gate);
  /* a retired thread is past the gate: what is left of its exit runs
   * outside it, so it is waited for here */
  pthread_mutex_lock(&lives_mu);
  for (lifeline **p = &lives; *p;) {
    lifeline *l = *p;
    if (l->retired && !l->claimed && !l->joined) {
      pthread_join(l->th, NULL);
      l->joined = 1;
    }
    if (l->joined && !l->owned)
      forget(p);
    else
      p = &l->next;
  }
  pid_t pid = fork();
  if (pid == 0) {
    /* the child has none of these threads, and the copies of both locks
     * may be held by threads it does not have */
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_rwlock_t fresh = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;
    while (lives) forget(&lives);
    lives_mu = mu;
    gate = fresh;
  } else {
    pthread_mutex_unlock(&lives_mu);
    pthread_rwlock_unlock(&gate);
  }
  return pid;
}
