/* memcpy.c: this machine's copy floor, for the codec benchmark.
 * Prints "fresh <MB/s>" (into newly allocated memory, as a codec must
 * produce new strings) and "warm <MB/s>" (into memory already touched). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* through a volatile pointer so the copies are not optimized away */
static void *(*volatile copy)(void *, const void *, size_t) = memcpy;

int main(int argc, char **argv) {
  size_t n = (argc > 1 ? (size_t)atol(argv[1]) : 64) << 20;
  int reps = 8;
  char *src = malloc(n), *dst = malloc(n);
  long sink = 0;
  if (!src || !dst) return 1;
  memset(src, 'x', n);
  memset(dst, 0, n);
  double best = 1e9;
  for (int i = 0; i < reps; i++) {
    double t = now();
    char *d = malloc(n);
    if (!d) return 1;
    copy(d, src, n);
    sink += d[i * 4096];
    free(d);
    t = now() - t;
    if (t < best) best = t;
  }
  printf("fresh %.0f\n", (double)n / best / 1e6);
  best = 1e9;
  for (int i = 0; i < reps; i++) {
    double t = now();
    copy(dst, src, n);
    sink += dst[i * 4096];
    t = now() - t;
    if (t < best) best = t;
  }
  printf("warm %.0f\n", (double)n / best / 1e6);
  return (int)(sink & 0);
}
