#!/usr/bin/env bash
# A mirrored volume across two nodes, each a network namespace of its own with its own address
# (made and removed here): n1 owns the mirror over its own file plex and n2's (exported over
# NVMe/TCP on the veth link between them). plexperf --verify runs against n1's export the whole
# time while n2 is partitioned (its link down) and then healed: no I/O may fail and no block
# may read back wrong; afterwards n2's plex is resynced in the regions it missed only, and the
# two plex files are the same block by block.
#
#   tests/host/mirror_netns.sh     (needs root, ip(8); cargo build --release -p plexd -p initiator)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tests/guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 11

PLEXD=${PLEXD:-$REPO/build/release/plexd}
PLEXPERF=${PLEXPERF:-$REPO/build/release/plexperf}
PLEXCTL=${PLEXCTL:-$REPO/build/release/plexctl}
for b in "$PLEXD" "$PLEXPERF" "$PLEXCTL"; do
    [ -x "$b" ] || { echo "missing $b: cargo build --release -p plexd -p initiator" >&2; exit 2; }
done
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
    skip_all --required "network namespaces need root and ip(8)"
fi

TAG=plx$$
N1=${TAG}a
N2=${TAG}b
A1=10.201.$((RANDOM % 200)).1
A2=${A1%.1}.2
NQN_P=nqn.2026-12.io.plexstor:netns-plex
NQN_V=nqn.2026-12.io.plexstor:netns-vol
WORK=$(mktemp -d "$REPO/build/mirror-netns.XXXXXX")
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    # Anything started from a subshell, by its socket path under $WORK.
    pkill -9 -f "$WORK/" 2>/dev/null
    wait 2>/dev/null
    ip netns del "$N1" 2>/dev/null
    ip netns del "$N2" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

setup_net() {
    ip netns add "$N1" && ip netns add "$N2" &&
        ip link add "${TAG}1" type veth peer name "${TAG}2" &&
        ip link set "${TAG}1" netns "$N1" && ip link set "${TAG}2" netns "$N2" &&
        ip -n "$N1" addr add "$A1/24" dev "${TAG}1" && ip -n "$N2" addr add "$A2/24" dev "${TAG}2" &&
        ip -n "$N1" link set "${TAG}1" up && ip -n "$N2" link set "${TAG}2" up &&
        ip -n "$N1" link set lo up && ip -n "$N2" link set lo up
}
check "two nodes in network namespaces, $A1 and $A2" setup_net || finish

# start_node NS NAME: plexd in namespace NS, socket $WORK/NAME.sock.
start_node() {
    local ns=$1 name=$2
    SOCK=$WORK/$name.sock
    ip netns exec "$ns" "$PLEXD" -m 0x3 --no-pin -r "$SOCK" --idle-poll-us 200 >>"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    wait_for_plexd "$!"
}
on() { SOCK=$WORK/$1.sock; shift; rpc "$@"; }

for f in n1 n2; do truncate -s 64M "$WORK/$f.img"; done
# Started here, not inside `check` (a subshell), so their PIDs are known.
if start_node "$N2" n2 && start_node "$N1" n1; then
    pass "plexd runs in each namespace"
else
    bail "plexd runs in each namespace" "$(tail -n3 "$WORK"/n*.log)"
fi
configure() {
    on n2 bdev_uring_create "{\"name\": \"p2\", \"filename\": \"$WORK/n2.img\", \"block_size\": 512}" &&
        on n2 nvmf_create_transport '{"trtype": "TCP"}' &&
        on n2 nvmf_create_subsystem "{\"nqn\": \"$NQN_P\", \"allow_any_host\": true}" &&
        on n2 nvmf_subsystem_add_ns "{\"nqn\": \"$NQN_P\", \"namespace\": {\"bdev_name\": \"p2\"}}" &&
        on n2 nvmf_subsystem_add_listener "{\"nqn\": \"$NQN_P\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"$A2\", \"trsvcid\": \"4420\"}}" &&
        on n1 bdev_uring_create "{\"name\": \"p1\", \"filename\": \"$WORK/n1.img\", \"block_size\": 512}" &&
        on n1 bdev_nvme_attach_controller "{\"name\": \"n2\", \"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"$A2\", \"trsvcid\": \"4420\", \"subnqn\": \"$NQN_P\", \"ctrlr_loss_timeout_sec\": -1, \"reconnect_delay_sec\": 1, \"fast_io_fail_timeout_sec\": 1}" &&
        on n1 bdev_mirror_create '{"name": "vol", "plexes": [{"bdev": "p1", "node": "n1"}, {"bdev": "n2n1", "node": "n2"}]}' &&
        on n1 bdev_mirror_set_options '{"name": "vol", "bitmap_clear_interval_ms": 300}' &&
        on n1 nvmf_create_transport '{"trtype": "TCP"}' &&
        on n1 nvmf_create_subsystem "{\"nqn\": \"$NQN_V\", \"allow_any_host\": true}" &&
        on n1 nvmf_subsystem_add_ns "{\"nqn\": \"$NQN_V\", \"namespace\": {\"bdev_name\": \"vol\"}}" &&
        on n1 nvmf_subsystem_add_listener "{\"nqn\": \"$NQN_V\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"$A1\", \"trsvcid\": \"4420\"}}"
}
check "n2 exports its plex, n1 mirrors it with its own and exports the volume" configure || finish

# mirror PYEXPR: evaluates PYEXPR over n1's bdev_mirror_get_mirrors entry `m`.
mirror() {
    on n1 bdev_mirror_get_mirrors '{"name": "vol"}' |
        python3 -c "import json,sys; m=json.load(sys.stdin)[0]; p=m['plexes']; print($1)"
}
is_true() { [ "$(mirror "$1")" = True ]; }

# The first 16 MiB get written everywhere once, then the bitmap empties.
TRID="trtype:TCP adrfam:IPv4 traddr:$A1 trsvcid:4420 subnqn:$NQN_V"
ip netns exec "$N1" "$PLEXPERF" -r "$TRID" -q 8 -o 65536 -w write -t 1 --warmup 0 --size 16777216 >/dev/null 2>&1
if wait_until 20 is_true "m['dirty_regions'] == 0 and m['state'] == 'online'"; then
    pass "written and clean, both plexes in use"
else
    fail "written and clean, both plexes in use" "$(mirror m)"
fi

# The writer runs throughout: plexperf --verify, 4 KiB random read/write over the first 8 MiB.
ip netns exec "$N1" "$PLEXPERF" -r "$TRID" --verify --json -q 8 -o 4096 -w randrw -M 50 \
    -t 40 --warmup 0 --size 8388608 >"$WORK/perf.json" 2>"$WORK/perf.err" &
PERF=$!
PIDS+=($PERF)
writer_started() { [ "$(on n1 bdev_get_iostat '{"name": "vol"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["bdevs"][0]["num_write_ops"] > 100)')" = True ]; }
wait_until 10 writer_started

ip -n "$N2" link set "${TAG}2" down
if wait_until 40 is_true "m['state'] == 'degraded' and p[1]['condition'] == 'Faulted'"; then
    pass "partitioned n2: the volume stays writable, degraded ($(mirror "p[1]['reason']"))"
else
    fail "partitioned n2: the volume stays writable, degraded" "$(mirror m)"
fi
dirty=$(mirror "m['dirty_regions']")
ip -n "$N2" link set "${TAG}2" up
if wait_until 60 is_true "m['state'] == 'online' and p[1]['last_resync'] is not None"; then
    pass "healed: n2's plex resynced and in use again"
else
    fail "healed: n2's plex resynced and in use again" "$(mirror m)"
fi
# Only the regions written while n2 was away (within the first 8 MiB the writer touches),
# never a full copy of the 63 regions.
copied=$(mirror "(p[1]['last_resync']['full'], p[1]['last_resync']['regions'])")
case "$copied" in
    "(False, "[1-8]")") pass "partial resync: $copied regions (dirty when healed: $dirty)" ;;
    *) fail "partial resync of the regions n2 missed" "got (full, regions) = $copied" ;;
esac

wait "$PERF"
verdict=$(python3 - "$WORK/perf.json" <<'EOF' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
t, v = r["total"], r["verify"]
ios = t["reads"] + t["writes"]
ok = not t["errors"] and not v["mismatches"] and ios > 0 and v["verified_blocks"] > 0
print(("" if ok else "bad: ") + f"{ios} I/Os, {t['errors']} errors, {v['mismatches']} mismatches, "
      f"{v['verified_blocks']} blocks verified")
EOF
)
case "$verdict" in
    "" | bad:* | *Error*) fail "the writer saw no error and no wrong block through it all" "${verdict:-no report} $(tail -n2 "$WORK/perf.err")" ;;
    *) pass "the writer saw no error and no wrong block through it all ($verdict)" ;;
esac

# Block by block, once the writer is done and the bitmap is clean again.
if wait_until 20 is_true "m['dirty_regions'] == 0"; then
    pass "bitmap clean after the writer stopped"
else
    fail "bitmap clean after the writer stopped" "$(mirror m)"
fi
blocks=$(mirror "m['num_blocks']")
same=$(plex_files_differ "$WORK/n1.img" "$WORK/n2.img" "$blocks")
[ "$same" = same ] && pass "the two plexes are the same, block by block ($blocks blocks)" ||
    fail "the two plexes are the same, block by block" "$same"
kill -0 "${PIDS[1]}" 2>/dev/null && pass "n1's plexd still running" || fail "n1's plexd still running" "it died: $(tail -n3 "$WORK/n1.log")"
finish
