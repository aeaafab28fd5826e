/* test_warm.c: large heap buffers kept for reuse while a pool lives, and
 * never across a fork. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ctest.h"
#include "warm.h"

int main(void) {
  size_t n = 8 * PP_WARM_MIN;

  char *a = pp_warm_alloc(n);
  CHECK(a && pp_warm_cap(a) >= n, "a buffer holds at least what was asked");
  memset(a, 1, n);
  pp_warm_free(a);
  CHECK(pp_warm_kept() == 0, "with no pool alive a freed buffer is not kept");

  pp_warm_users(1);
  char *b = pp_warm_alloc(n);
  size_t cap = pp_warm_cap(b);
  pp_warm_free(b);
  CHECK(pp_warm_kept() == cap, "while a pool lives a freed buffer is kept");
  char *c = pp_warm_alloc(n);
  CHECK(c == b && pp_warm_kept() == 0, "and the next one of its size reuses it");

  pp_warm_free(c);
  char *small = pp_warm_alloc(PP_WARM_MIN);
  CHECK(small != c && pp_warm_kept() == cap, "a buffer four times too large is not handed out");
  char *again = pp_warm_alloc(n - 1);
  CHECK(again == c && pp_warm_cap(again) == cap,
        "a slightly smaller need takes the kept buffer, with its whole capacity");
  pp_warm_free(again);
  size_t kept = cap + pp_warm_cap(small);
  pp_warm_free(small);
  CHECK(pp_warm_kept() == kept, "buffers of several sizes are kept");

  /* a forked child neither takes its parent's buffers nor keeps its own */
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    char *x = pp_warm_alloc(n);
    int ok = x != c && pp_warm_kept() == kept;
    pp_warm_free(x);
    ok = ok && pp_warm_kept() == kept;
    _exit(ok ? 0 : 1);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "a forked child bypasses the cache");

  char *big = pp_warm_alloc((size_t)16 << 20);
  pp_warm_free(big);
  CHECK(pp_warm_kept() == kept, "a buffer past the largest kept size is freed");

  pp_warm_users(-1);
  CHECK(pp_warm_kept() == 0, "with the last pool gone every kept buffer is freed");
  pp_warm_free(pp_warm_alloc(n));
  CHECK(pp_warm_kept() == 0, "and none is kept after");
  return CTEST_DONE();
}
