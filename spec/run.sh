#!/bin/sh
# Runs the C tests given as arguments, then the busted suite, and ends with
# the line "N passed, M failed". Exit status is non-zero on any failure.
# Environment: LUA, BUSTED, BUILD, TIMEOUT, CTEST_WRAP.

LUA=${LUA:-lua5.4}
BUSTED=${BUSTED:-busted --lua=lua5.4}
BUILD=${BUILD:-build}
TIMEOUT=${TIMEOUT:-280}
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for t in "$@"; do
  # each C test prints "ok N - name" / "not ok N - name" lines (TAP)
  timeout 120 $CTEST_WRAP "$t" >"$log" 2>&1
  rc=$?
  cat "$log"
  p=$(grep -c '^ok ' "$log")
  f=$(grep -c '^not ok ' "$log")
  if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
    echo "not ok - $t exited with status $rc"
    f=1
  fi
  passed=$((passed + p))
  failed=$((failed + f))
done

export LUA_PATH="lua/?.lua;lua/?/init.lua;;"
export LUA_CPATH="$BUILD/?.so;;"
export PROCPOOL_BUILD="$BUILD"

# busted LABEL SPECS...: run, show, and count
run_busted() {
  label=$1
  shift
  timeout -k 10 "$TIMEOUT" $BUSTED -o TAP "$@" >"$log" 2>&1
  rc=$?
  sed "s/^\(\(not \)\{0,1\}ok [0-9]* - \)/\1$label/" "$log"
  p=$(grep -c '^ok ' "$log")
  f=$(grep -c '^not ok ' "$log")
  if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
    if [ "$rc" = 124 ]; then
      echo "not ok - ${label}busted timed out after ${TIMEOUT}s"
    else
      echo "not ok - ${label}busted exited with status $rc"
    fi
    f=1
  fi
  passed=$((passed + p))
  failed=$((failed + f))
}

run_busted "" ${SPECS:-spec}
# the API and reliability specs again, with workers from a fresh interpreter
if [ -z "$SPECS" ]; then
  PROCPOOL_CONTEXT=spawn run_busted "[spawn] " spec/1[0-7]-*_spec.lua spec/20-pool_spec.lua spec/22-takeback_spec.lua spec/23-burst_spec.lua spec/24-spare_spec.lua \
    spec/30-faults_spec.lua spec/40-coroutines_spec.lua spec/70-cpython_futures_spec.lua \
    spec/71-cpython_pool_spec.lua
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
