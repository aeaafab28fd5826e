/* ctest.h: a minimal TAP producer for the C tests. */
#ifndef PP_CTEST_H
#define PP_CTEST_H

#include <stdio.h>

static int ctest_n, ctest_failed;

#define CHECK(cond, name)                                                                          \
  do {                                                                                             \
    ctest_n++;                                                                                     \
    if (cond) {                                                                                    \
      printf("ok %d - %s\n", ctest_n, name);                                                       \
    } else {                                                                                       \
      ctest_failed++;                                                                              \
      printf("not ok %d - %s (%s:%d: %s)\n", ctest_n, name, __FILE__, __LINE__, #cond);            \
    }                                                                                              \
  } while (0)

#define CTEST_DONE() (printf("1..%d\n", ctest_n), ctest_failed ? 1 : 0)

#endif
