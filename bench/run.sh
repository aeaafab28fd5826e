#!/bin/sh
# Runs the benchmarks (BENCHES="codec executor ..." to choose; see
# bench/README.md). Each prints a markdown table.
set -e
BUILD=${BUILD:-build}
mkdir -p "$BUILD/bench"
CC=${CC:-cc}
for c in bench/c/*.c; do
  $CC -O2 -o "$BUILD/bench/$(basename "$c" .c)" "$c" -lpthread
done
export LUA_PATH="./?.lua;lua/?.lua;lua/?/init.lua;;"
export LUA_CPATH="$BUILD/?.so;;"
export PROCPOOL_BENCH_BIN="$BUILD/bench"
for b in ${BENCHES:-perf executor pool memory makespan latency codec cli hosts}; do
  [ -f "bench/$b.lua" ] || continue
  lua5.4 "bench/$b.lua"
  echo
done
