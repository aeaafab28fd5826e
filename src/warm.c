/* warm.c: large heap buffers kept for reuse (warm.h says why). */
#define _GNU_SOURCE
#include "warm.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

/* Each buffer starts with its capacity; callers get the bytes after it
 * (16: malloc's own alignment is kept). */
#define HDR 16
/* What is kept at most: a map's chunks in flight on a few workers (item
 * records, arguments and results of each), not a program's big data. */
#define KEEP_MAX 32
#define KEEP_BYTES ((size_t)32 << 20)
#define KEEP_ONE ((size_t)8 << 20)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pid_t owner; /* atomic: the process this cache is for; 0 until used */
static char *kept[KEEP_MAX];
static size_t nkept, kept_bytes;
static int users; /* pools alive (pp_warm_users); none: nothing is kept */

static size_t cap_of(const char *b) { return *(const size_t *)(const void *)b; }

/* Whether the cache is this process's: not in a forked child. */
static int mine(void) {
  pid_t me = getpid(), o = 0;
  if (__atomic_compare_exchange_n(&owner, &o, me, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return 1;
  return o == me;
}

void *pp_warm_alloc(size_t n) {
  if (n > SIZE_MAX - HDR) return NULL;
  if (mine()) {
    pthread_mutex_lock(&lock);
    size_t best = 0, bestcap = SIZE_MAX;
    for (size_t i = 0; i < nkept; i++) {
      size_t c = cap_of(kept[i]);
      /* the tightest fit, and not one four times too big (it would be
       * held, idle, while a larger need mallocs afresh) */
      if (c >= n && c / 4 <= n && c < bestcap) {
        best = i;
        bestcap = c;
      }
    }
    if (bestcap != SIZE_MAX) {
      char *b = kept[best];
      kept[best] = kept[--nkept];
      kept_bytes -= bestcap;
      pthread_mutex_unlock(&lock);
      return b + HDR;
    }
    pthread_mutex_unlock(&lock);
  }
  char *b = malloc(HDR + n);
  if (!b) return NULL;
  *(size_t *)(void *)b = n;
  return b + HDR;
}

size_t pp_warm_cap(const void *p) { return cap_of((const char *)p - HDR); }

void pp_warm_free(void *p) {
  if (!p) return;
  char *b = (char *)p - HDR;
  size_t c = cap_of(b);
  if (c <= KEEP_ONE && mine()) {
    pthread_mutex_lock(&lock);
    if (users > 0 && nkept < KEEP_MAX && kept_bytes + c <= KEEP_BYTES) {
      kept[nkept++] = b;
      kept_bytes += c;
      b = NULL;
    }
    pthread_mutex_unlock(&lock);
  }
  free(b);
}

/* Take every kept buffer out (under the lock), to free outside it. */
static size_t take_all(char **out) {
  size_t n = nkept;
  for (size_t i = 0; i < n; i++) out[i] = kept[i];
  nkept = 0;
  kept_bytes = 0;
  return n;
}

void pp_warm_users(int delta) {
  if (!mine()) return;
  char *gone[KEEP_MAX];
  size_t n = 0;
  pthread_mutex_lock(&lock);
  users += delta;
  if (users <= 0) n = take_all(gone);
  pthread_mutex_unlock(&lock);
  for (size_t i = 0; i < n; i++) free(gone[i]);
}

size_t pp_warm_kept(void) {
  pthread_mutex_lock(&lock);
  size_t n = kept_bytes;
  pthread_mutex_unlock(&lock);
  return n;
}
