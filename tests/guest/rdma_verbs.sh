#!/usr/bin/env bash
# Our RDMA bindings (the rdma crate) on a real RDMA device: soft-RoCE (rdma_rxe) on the
# guest's network interface. rdma-check plays both ends of one connection the way NVMe/RDMA
# uses them — NVMe/RDMA private data in connect, accept and reject; a capsule by SEND; the
# host's memory read by RDMA READ and written by RDMA WRITE; a completion channel waking an
# idle poller; a forged remote key failing only its own work; disconnects on both ends —
# and prints one result per step. rping first proves the device itself works, so a failure
# below it is ours.
#
# On the host it boots the guest; inside a guest that is already up (scripts/test.sh runs
# every guest test in one boot) it adds rxe0 if no test did yet.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 16

reexec_in_guest --timeout 300 -- "$0" "$@"

REPO=$GUEST_LIB_REPO
CHECK=${RDMA_CHECK:-$REPO/build/release/rdma-check}
PORT=4891

if rxe_up; then
    pass "soft-RoCE device rxe0 ($RXE_ADDR)"
else
    bail "soft-RoCE device rxe0" "rdma_rxe or 'rdma link add' failed"
fi
addr=$RXE_ADDR

rping_ok() {
    rping -s -a "$addr" -p 4890 -C 2 >/dev/null 2>&1 &
    local server=$! rc=0
    sleep 0.5
    timeout 30 rping -c -a "$addr" -p 4890 -C 2 -v || rc=$?
    wait "$server" || rc=$?
    return "$rc"
}
check "rping over rxe0 (the device works before we test ours on it)" rping_ok

[ -x "$CHECK" ] || bail "rdma-check built" "$CHECK missing (cargo build --release -p rdma)"
out=$(timeout 120 "$CHECK" "$addr" "$PORT" 2>&1) || true
printf '%s\n' "$out" | grep '^#' || true
# rdma-check prints its own TAP lines; count them here.
while IFS= read -r line; do
    case $line in
        "ok - "*) pass "rdma-check: ${line#ok - }" ;;
        "not ok - "*) rest=${line#not ok - }; fail "rdma-check: ${rest%%: *}" "${rest#*: }" ;;
    esac
done <<<"$out"
finish
