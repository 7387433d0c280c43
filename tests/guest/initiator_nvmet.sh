#!/usr/bin/env bash
# Our NVMe/TCP host (plexperf on the initiator crate) against the Linux kernel's nvmet
# target, inside the test guest: identify, discovery, pattern write + verified read back
# (in-capsule, R2T-sized and with digests), and surviving removal and re-creation of the
# nvmet port while I/O runs (reconnect, nothing lost, no mismatches).
#
# On the host:  cargo build --release -p initiator && tests/guest/initiator_nvmet.sh
# (it boots the guest with scripts/guest/run.sh and runs itself inside).
# The guest is emulated (TCG): a few hundred IOPS. This proves interoperability, not speed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 12
REPO=$GUEST_LIB_REPO
PERF=${PLEXPERF:-$REPO/build/release/plexperf}
NQN=nqn.2024-01.io.plexstor:initiator-nvmet
PORT=4420
TRID="trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$NQN"
DISC="trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT"

if ! in_guest; then
    if [ ! -x "$PERF" ]; then
        echo "not ok - plexperf built: $PERF missing (cargo build --release -p initiator)"
        exit 1
    fi
    reexec_in_guest --timeout 900 --env "PLEXPERF=$PERF" -- "$0" "$@"
fi

export RUST_LOG=${RUST_LOG:-warn}
WORK=$(mktemp -d)

check "nvmet exports a RAM disk on 127.0.0.1:$PORT" nvmet_export_ramdisk "$NQN" "$PORT" ||
    bail "nvmet export" "cannot go on without it"

plexperf_identify_ok "identify"
plexperf_discovers "discovery log lists $NQN"
plexperf_pattern_round_trip "read it back and verify every block"

# 64 KiB I/O is larger than nvmet's in-capsule size: writes go through R2T/H2CData.
plexperf_check "randrw 64 KiB (R2T/H2CData writes, C2HData reads) with --verify" "$WORK/big.json" \
    -w randrw -M 50 -o 65536 -q 4 -t 3 --verify --size 8388608
plexperf_check "header and data digests with --verify" "$WORK/dg.json" \
    -w randrw -M 50 -o 16384 -q 4 -t 3 --verify --size 4194304 --hdgst --ddgst
granted=$(json_field "$WORK/dg.json" '"%d %d" % (len(r["digests"]), sum(d["hdgst"] and d["ddgst"] for d in r["digests"]))')
if [ "${granted% *}" -ge 2 ] && [ "${granted% *}" = "${granted#* }" ]; then
    pass "nvmet granted both digests on every queue (queues, with both: $granted)"
else
    fail "nvmet granted both digests on every queue" "queues, with both: ${granted:-no report}"
fi

# Reconnect: remove the nvmet port under running I/O, re-create it, expect plexperf to
# reconnect, re-send what was in flight, and finish with no error and no mismatch.
# What the RAM disk behind the namespace has done (reads + writes completed), from its stats.
ramdisk=$(basename "$(cat "$NVMET_CFS/subsystems/$NQN/namespaces/1/device_path")")
ramdisk_ios() { awk '{ print $1 + $5 }' "/sys/block/$ramdisk/stat"; }
ios_since() { [ "$(ramdisk_ios)" -ge $(($1 + 200)) ]; }
connections_to_port() { ss -Htn state established "( dport = :$PORT )" | wc -l; }
no_connection_left() { [ "$(connections_to_port)" = 0 ]; }
ios_before=$(ramdisk_ios)
"$PERF" -r "$TRID" --json --warmup 0 -w randrw -M 50 -o 4096 -q 8 -t 14 --verify \
    --size 2097152 --reconnect-delay-sec 1 --ctrlr-loss-timeout-sec -1 --io-timeout-sec 0 \
    >"$WORK/rc.json" 2>"$WORK/rc.err" &
perf_pid=$!
wait_until 10 ios_since "$ios_before" || echo "# no I/O seen on $ramdisk before the port removal"
portdir=$(nvmet_tcp_port 127.0.0.1 "$PORT")
rm -f "$portdir/subsystems/$NQN"
rmdir "$portdir"
echo "# nvmet port removed"
# nvmet drops the port's queues; plexperf's reconnect attempts are refused until it is back.
wait_until 10 no_connection_left || echo "# $(connections_to_port) connections still up"
portdir=$(nvmet_tcp_port 127.0.0.1 "$PORT")
ln -s "$NVMET_CFS/subsystems/$NQN" "$portdir/subsystems/$NQN"
echo "# nvmet port re-created"
rc=0
wait "$perf_pid" || rc=$?
sed 's/^/# /' "$WORK/rc.err" | grep -v '^# *$' | tail -n 8 || true
if [ "$rc" = 0 ]; then
    plexperf_ok "I/O with --verify across nvmet port removal and re-creation" "$WORK/rc.json"
    n=$(json_field "$WORK/rc.json" 'r["reconnects"]')
    if [ "$n" -ge 1 ]; then pass "controller reconnected ($n time(s))"; else fail "controller reconnected" "reconnects=$n"; fi
else
    tail -n 30 "$WORK/rc.json" | sed 's/^/# /'
    fail "I/O across nvmet port removal and re-creation" "plexperf exited $rc"
fi

check "nvmet configuration removed" nvmet_clear || true
rm -rf "$WORK"
finish
