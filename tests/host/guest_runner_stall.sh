#!/usr/bin/env bash
# The test guest's runner (scripts/guest/run.sh) stops a guest whose kernel says an emulated
# CPU's timer stalled (seen under TCG: nothing progresses after it), at once and saying why,
# so scripts/test.sh can give the interrupted scripts one fresh guest instead of waiting out
# the guest's timeout. The kernel's line is written into /dev/kmsg here, as the kernel would
# print it; a real stall cannot be caused on demand.
#
#   tests/host/guest_runner_stall.sh
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tests/guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 2

RUN=$REPO/scripts/guest/run.sh
LINE="rcu: rcu_preempt kthread timer wakeup didn't happen for 5248 jiffies! (written by $(basename "$0"))"

# A command that would end well after 120 s, with status 0, unless the guest is stopped.
out=$("$RUN" --timeout 600 --no-retry --env "STALL_LINE=$LINE" -- bash -c \
    'sleep 1; echo "<3>$STALL_LINE" > /dev/kmsg; sleep 120; echo COMMAND-ENDED' 2>&1)
rc=$?
reason=$(printf '%s\n' "$out" | grep -m1 '^run\.sh: guest failed: ' || true)
if [ "$rc" -eq 125 ] && [[ $reason == *"guest stalled: "*"$LINE"* ]] &&
    ! grep -q COMMAND-ENDED <<<"$out"; then
    pass "a guest whose CPU timer stalled is stopped before its command ends ($reason)"
else
    fail "a guest whose CPU timer stalled is stopped before its command ends" \
        "exit $rc, reason '${reason:-none}'; last lines: $(printf '%s\n' "$out" | tail -n 3 | tr '\n' '|')"
fi

# The same guest without the line: the command's own status comes back.
out=$("$RUN" --timeout 600 --no-retry -- bash -c "sleep 1; exit 7" 2>&1)
rc=$?
if [ "$rc" -eq 7 ]; then
    pass "without a stall the guest runs its command to the end (exit 7 comes back)"
else
    fail "without a stall the guest runs its command to the end" \
        "exit $rc; last lines: $(printf '%s\n' "$out" | tail -n 3 | tr '\n' '|')"
fi
finish
