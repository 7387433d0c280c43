#!/usr/bin/env bash
# Runs inside the test guest: each test script given, one after another, each with its own
# time limit, so one boot serves them all. Their `ok - ` / `not ok - ` lines pass through.
set -uo pipefail

status=0
for t in "$@"; do
    name=$(basename "$t" .sh)
    echo "--- guest: $name"
    start=$(date +%s)
    timeout 600 bash "$t"
    rc=$?
    echo "--- guest: $name finished in $(( $(date +%s) - start )) s (exit $rc)"
    if [ "$rc" -ne 0 ]; then
        status=1
        [ "$rc" -eq 124 ] && echo "not ok - $name: timed out after 600 s"
    fi
done
exit $status
