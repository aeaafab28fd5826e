/* floor.c: this machine's floor for process-to-process messaging.
 * Prints, one per line:
 *   pipe_pingpong_us    a 1-byte round trip between two processes (pipes)
 *   sock_pingpong_us    the same over a socketpair
 *   sock_echo_mibs      64 MiB sent to a child over a socketpair and back
 *   fresh_copy_ms       64 MiB copied into newly allocated memory: what
 *                       materializing one new 64 MiB value costs at least
 *   warm_copy_ms        64 MiB copied into memory already touched: what
 *                       moving 64 MiB through a reused buffer costs at least
 * Each is the best of several rounds. With the argument "pingpong", only
 * the first two; with "copy", only the last two.
 * Both ping-pongs block in read(2) on each side, as a caller and a worker
 * that wait for each other without spinning do.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void xfer(int fd, char *p, size_t n, int out) {
  while (n) {
    ssize_t r = out ? write(fd, p, n) : read(fd, p, n);
    if (r <= 0) exit(1);
    p += r;
    n -= (size_t)r;
  }
}

struct job {
  int fd;
  char *p;
  size_t n;
};

static void *writer(void *arg) {
  struct job *j = arg;
  xfer(j->fd, j->p, j->n, 1);
  return NULL;
}

static double pingpong(int rfd, int wfd, int crfd, int cwfd, int n) {
  char c = 'x';
  pid_t p = fork();
  if (p == 0) {
    for (int i = 0; i < n; i++) {
      xfer(crfd, &c, 1, 0);
      xfer(cwfd, &c, 1, 1);
    }
    _exit(0);
  }
  double best = 1e9;
  for (int round = 0; round < 5; round++) {
    double t = now();
    for (int i = 0; i < n / 5; i++) {
      xfer(wfd, &c, 1, 1);
      xfer(rfd, &c, 1, 0);
    }
    t = (now() - t) / (n / 5);
    if (t < best) best = t;
  }
  waitpid(p, NULL, 0);
  return best * 1e6;
}

/* through a volatile pointer so the copies are not optimized away */
static void *(*volatile copy)(void *, const void *, size_t) = memcpy;

/* fresh_copy_ms and warm_copy_ms of n bytes from src */
static int copies(const char *src, size_t n) {
  /* a receiver that hands over a whole new value must copy it into fresh
   * memory; on some machines the page faults cost more than the copy */
  double best = 1e9;
  for (int r = 0; r < 4; r++) {
    double t = now();
    char *fresh = malloc(n);
    if (!fresh) return 1;
    copy(fresh, src, n);
    t = now() - t;
    if (fresh[n - 1] != src[n - 1]) return 1;
    free(fresh);
    if (t < best) best = t;
  }
  printf("fresh_copy_ms %.1f\n", best * 1e3);
  char *warm = malloc(n);
  if (!warm) return 1;
  memset(warm, 0, n);
  best = 1e9;
  for (int r = 0; r < 4; r++) {
    double t = now();
    copy(warm, src, n);
    t = now() - t;
    if (warm[n - 1] != src[n - 1]) return 1;
    if (t < best) best = t;
  }
  free(warm);
  printf("warm_copy_ms %.1f\n", best * 1e3);
  return 0;
}

int main(int argc, char **argv) {
  int a[2], b[2], s[2];
  const char *mode = argc > 1 ? argv[1] : "";
  size_t n = 64u << 20;
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (strcmp(mode, "copy") == 0) {
    char *src = malloc(n);
    if (!src) return 1;
    memset(src, 'x', n);
    return copies(src, n);
  }
  if (pipe(a) || pipe(b)) return 1;
  printf("pipe_pingpong_us %.2f\n", pingpong(b[0], a[1], a[0], b[1], 10000));
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, s)) return 1;
  printf("sock_pingpong_us %.2f\n", pingpong(s[0], s[0], s[1], s[1], 10000));
  if (strcmp(mode, "pingpong") == 0) return 0;
  /* echo: a writer thread sends 64 MiB, the child echoes each piece back
   * as it comes, the main thread reads it all back */
  char *buf = malloc(n), *back = malloc(n);
  memset(buf, 'x', n);
  int e[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, e)) return 1;
  pid_t p = fork();
  if (p == 0) {
    close(e[0]);
    char *cbuf = malloc(1u << 20);
    for (;;) {
      ssize_t k = read(e[1], cbuf, 1u << 20);
      if (k <= 0) _exit(0);
      xfer(e[1], cbuf, (size_t)k, 1);
    }
  }
  double best = 1e9;
  for (int r = 0; r < 4; r++) {
    struct job j = {e[0], buf, n};
    pthread_t th;
    double t = now();
    pthread_create(&th, NULL, writer, &j);
    xfer(e[0], back, n, 0);
    pthread_join(th, NULL);
    t = now() - t;
    if (t < best) best = t;
  }
  close(e[0]);
  waitpid(p, NULL, 0);
  printf("sock_echo_mibs %.0f\n", 64.0 / best);
  return copies(buf, n);
}
