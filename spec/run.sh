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
timeout -k 10 "$TIMEOUT" $BUSTED -o TAP ${SPECS:-spec} >"$log" 2>&1
rc=$?
cat "$log"
p=$(grep -c '^ok ' "$log")
f=$(grep -c '^not ok ' "$log")
if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
  if [ "$rc" = 124 ]; then
    echo "not ok - busted timed out after ${TIMEOUT}s"
  else
    echo "not ok - busted exited with status $rc"
  fi
  f=1
fi
passed=$((passed + p))
failed=$((failed + f))

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
