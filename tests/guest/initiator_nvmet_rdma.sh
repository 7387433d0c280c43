#!/usr/bin/env bash
# Our NVMe/RDMA host (plexperf on the initiator crate's RDMA queues) against the Linux kernel's
# nvmet-rdma target, over soft-RoCE (rxe0) inside the test guest: identify and discovery over
# RDMA, a verified pattern written at 4 KiB (in-capsule) and read back (the target RDMA
# WRITEs our reads), randrw at 128 KiB (keyed SGLs: the target RDMA READs our writes), clear
# errors for a wrong subsystem and a port nobody listens on, and surviving removal and
# re-creation of the nvmet port while I/O runs (reconnect, nothing lost, no mismatches).
#
# On the host: cargo build --release -p initiator && tests/guest/initiator_nvmet_rdma.sh
# The guest is emulated and soft-RoCE is software: this proves interoperability, not speed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 13
REPO=$GUEST_LIB_REPO
PERF=${PLEXPERF:-$REPO/build/release/plexperf}
NQN=nqn.2024-01.io.plexstor:initiator-nvmet-rdma
PORT=4422

reexec_in_guest --timeout 600 -- "$0" "$@"

export RUST_LOG=${RUST_LOG:-warn}
WORK=$(mktemp -d)

if rxe_up; then
    pass "soft-RoCE device rxe0 ($RXE_ADDR)"
else
    bail "soft-RoCE device rxe0" "rdma_rxe or 'rdma link add' failed"
fi
TRID="trtype:RDMA adrfam:IPv4 traddr:$RXE_ADDR trsvcid:$PORT subnqn:$NQN"
DISC="trtype:RDMA adrfam:IPv4 traddr:$RXE_ADDR trsvcid:$PORT"

check "nvmet-rdma exports a RAM disk on $RXE_ADDR:$PORT" \
    nvmet_export_ramdisk "$NQN" "$PORT" "$RXE_ADDR" rdma ||
    bail "nvmet-rdma export" "cannot go on without it"

plexperf_identify_ok "identify over RDMA"
plexperf_discovers "discovery over RDMA lists $NQN on an RDMA port" "trtype: *rdma"
plexperf_pattern_round_trip "read it back (RDMA WRITE by the target) and verify every block"
plexperf_check "randrw 128 KiB on 2 queue pairs with --verify" "$WORK/big.json" \
    -w randrw -M 50 -o 131072 -q 4 -P 2 -t 3 --verify --size 8388608

# Clear errors, not hangs: a subsystem the target does not have, and a port nobody serves.
refused() { # NAME TRID PATTERN
    local out rc=0
    out=$(timeout 60 "$PERF" -r "$2" --identify 2>&1) || rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -qi -- "$3" <<<"$out"; then
        pass "$1 ($(grep -i -- "$3" <<<"$out" | tail -n1 | cut -c1-150))"
    else
        printf '%s\n' "$out" | tail -n 5 | sed 's/^/# /'
        fail "$1" "exit $rc, no message matching '$3'"
    fi
}
refused "an unknown subsystem NQN fails Fabrics Connect with its status" \
    "trtype:RDMA adrfam:IPv4 traddr:$RXE_ADDR trsvcid:$PORT subnqn:$NQN-missing" "Fabrics Connect"
refused "a port with no listener: the RDMA connect is refused, clearly" \
    "trtype:RDMA adrfam:IPv4 traddr:$RXE_ADDR trsvcid:$((PORT + 1)) subnqn:$NQN" "REJECTED\|rejected"

# Reconnect: remove the nvmet port under running I/O, re-create it, expect plexperf to
# reconnect, re-send what was in flight, and finish with no error and no mismatch.
qps_at_most() { [ "$(rc_queue_pairs)" -le "$1" ]; }
qps_at_least() { [ "$(rc_queue_pairs)" -ge "$1" ]; }
qps_idle=$(rc_queue_pairs)
"$PERF" -r "$TRID" --json --warmup 0 -w randrw -M 50 -o 4096 -q 8 -t 14 --verify \
    --size 2097152 --reconnect-delay-sec 1 --ctrlr-loss-timeout-sec -1 --io-timeout-sec 0 \
    >"$WORK/rc.json" 2>"$WORK/rc.err" &
perf_pid=$!
# Both ends of the admin and the I/O queue: plexperf is connected and its I/O under way.
wait_until 20 qps_at_least $((qps_idle + 4)) || echo "# plexperf's queues never came up"
sleep 1
portdir=$(nvmet_port "$RXE_ADDR" "$PORT" rdma)
rm -f "$portdir/subsystems/$NQN"
rmdir "$portdir"
echo "# nvmet port removed"
wait_until 20 qps_at_most "$qps_idle" || echo "# $(rc_queue_pairs) RC queue pairs still up"
portdir=$(nvmet_port "$RXE_ADDR" "$PORT" rdma)
ln -s "$NVMET_CFS/subsystems/$NQN" "$portdir/subsystems/$NQN"
echo "# nvmet port re-created"
rc=0
wait "$perf_pid" || rc=$?
sed 's/^/# /' "$WORK/rc.err" | grep -v '^# *$' | tail -n 8 || true
if [ "$rc" = 0 ]; then
    plexperf_ok "I/O with --verify across nvmet-rdma port removal and re-creation" "$WORK/rc.json"
    n=$(json_field "$WORK/rc.json" 'r["reconnects"]')
    if [ "$n" -ge 1 ]; then pass "controller reconnected over RDMA ($n time(s))"; else fail "controller reconnected" "reconnects=$n"; fi
else
    tail -n 30 "$WORK/rc.json" | sed 's/^/# /'
    fail "I/O across nvmet-rdma port removal and re-creation" "plexperf exited $rc"
fi

check "nvmet configuration removed" nvmet_clear || true
rm -rf "$WORK"
finish
