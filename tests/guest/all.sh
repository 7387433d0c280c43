#!/usr/bin/env bash
# Runs inside the test guest: each test script given, one after another, each with its own
# time limit, so one boot serves them all. Their TAP lines pass through, each script's between
# "--- guest: NAME" and "--- guest: NAME finished … (exit RC)".
set -uo pipefail

status=0
for t in "$@"; do
    name=$(basename "$t" .sh)
    echo "--- guest: $name"
    start=$(date +%s)
    timeout 600 bash "$t"
    rc=$?
    # Before the "finished" line: scripts/test.sh reads each script's lines up to it.
    [ "$rc" -eq 124 ] && echo "not ok - $name: timed out after 600 s"
    echo "--- guest: $name finished in $(( $(date +%s) - start )) s (exit $rc)"
    [ "$rc" -eq 0 ] || status=1
done
exit $status
