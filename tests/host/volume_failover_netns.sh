#!/usr/bin/env bash
# Failover of a mirrored volume across nodes, each a network namespace of its own with its own
# address on a bridge (made and removed here), driven through `plexctl volume` as an operator
# would. The host side (plexperf, in the root namespace) writes with --verify and keeps the
# record of every acknowledged write in a file (--verify-state), so that what the first owner
# acknowledged is checked through the second:
#
#   create vol1 on n1 (owner) and n2 -> writer on n1's export -> kill -9 n1 mid-write
#   -> volume attach --node n2 -> every acknowledged write reads back through n2, which keeps
#   writing, degraded -> the restarted n1 cannot reach n2's plex -> volume rejoin -> n1's plex
#   copies only the regions it missed -> all verified again, both plexes the same block by block.
#
#   tests/host/volume_failover_netns.sh  (needs root, ip(8); cargo build --release -p plexd -p initiator)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tests/guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 13

PLEXD=${PLEXD:-$REPO/build/release/plexd}
PLEXPERF=${PLEXPERF:-$REPO/build/release/plexperf}
PLEXCTL=${PLEXCTL:-$REPO/build/release/plexctl}
for b in "$PLEXD" "$PLEXPERF" "$PLEXCTL"; do
    [ -x "$b" ] || { echo "missing $b: cargo build --release -p plexd -p initiator" >&2; exit 2; }
done
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
    skip_all --required "network namespaces need root and ip(8)"
fi

TAG=pvf$$
BR=${TAG}br
NET=10.202.$((RANDOM % 200))
WORK=$(mktemp -d "$REPO/build/volume-failover.XXXXXX")
VOL=vol1
NQN=nqn.2024-01.io.plexstor:vol-$VOL
STATE=$WORK/acked.json
# The part of the volume the writer uses: 24 of its 64 regions.
SPAN=$((24 << 20))
declare -A PID

cleanup() {
    for p in "${PID[@]}"; do kill -9 "$p" 2>/dev/null; done
    pkill -9 -f "$WORK/" 2>/dev/null
    wait 2>/dev/null
    for n in 1 2 3; do ip netns del "$TAG$n" 2>/dev/null; done
    ip link del "$BR" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

# Nodes n1-n3 at $NET.1-3, the root namespace (the pod's node) at $NET.254, on one bridge.
setup_net() {
    ip link add "$BR" type bridge && ip addr add "$NET.254/24" dev "$BR" && ip link set "$BR" up || return 1
    for n in 1 2 3; do
        ip netns add "$TAG$n" &&
            ip link add "$TAG$n" type veth peer name "${TAG}p$n" &&
            ip link set "$TAG$n" netns "$TAG$n" && ip link set "${TAG}p$n" master "$BR" &&
            ip link set "${TAG}p$n" up &&
            ip -n "$TAG$n" addr add "$NET.$n/24" dev "$TAG$n" &&
            ip -n "$TAG$n" link set "$TAG$n" up && ip -n "$TAG$n" link set lo up || return 1
    done
}
check "three nodes in network namespaces on a bridge, $NET.1-3" setup_net || finish

# start_node N: plexd of node nN in its namespace, socket $WORK/nN.sock.
start_node() {
    SOCK=$WORK/n$1.sock
    ip netns exec "$TAG$1" "$PLEXD" -m 0x1 --no-pin -r "$SOCK" --idle-poll-us 200 >>"$WORK/n$1.log" 2>&1 &
    PID[n$1]=$!
    wait_for_plexd "$!"
}
# Started here, not inside `check` (a subshell), so their PIDs are known.
if start_node 1 && start_node 2 && start_node 3; then
    pass "plexd runs in each namespace"
else
    bail "plexd runs in each namespace" "$(tail -n3 "$WORK"/n*.log)"
fi
python3 - "$WORK" "$NET" >"$WORK/nodes.json" <<'EOF'
import json, sys
work, net = sys.argv[1:]
print(json.dumps({"backend": "uring", "nodes": [
    {"name": f"n{i}", "rpc_socket": f"{work}/n{i}.sock", "storage_addr": f"{net}.{i}",
     "data_dir": f"{work}/n{i}-data"} for i in (1, 2, 3)]}))
EOF
vol() { "$PLEXCTL" volume -f "$WORK/nodes.json" "$@"; }
# mirror PYEXPR: PYEXPR over the owner's view of the volume (`m`, plexes `p`).
mirror() {
    vol describe "$VOL" --json 2>/dev/null |
        python3 -c "import json,sys; m=json.load(sys.stdin)['mirror']; p=m['plexes']; print($1)"
}
is_true() { [ "$(mirror "$1")" = True ]; }

check "volume create $VOL --size 64M --nodes n1,n2" vol create "$VOL" --size 64M --nodes n1,n2 || finish

# perf NAME TRADDR PLEXPERF-ARGS...: plexperf --verify --verify-state on the volume's export at
# TRADDR, report in $WORK/NAME.json. Fails I/O a second after its target goes away. `exec`, so
# that run in the background its PID is plexperf's.
perf() {
    local name=$1 addr=$2
    shift 2
    exec "$PLEXPERF" -r "trtype:TCP adrfam:IPv4 traddr:$addr trsvcid:4420 subnqn:$NQN" --verify \
        --verify-state "$STATE" --json --warmup 0 -o 4096 --size "$SPAN" \
        --fast-io-fail-timeout-sec 1 --ctrlr-loss-timeout-sec 2 "$@" >"$WORK/$name.json" 2>"$WORK/$name.err"
}
# verdict NAME: "I/Os errors mismatches verified-blocks" from a plexperf report.
verdict() {
    python3 -c '
import json, sys
r = json.load(open(sys.argv[1])); t, v = r["total"], r["verify"]
print(t["reads"] + t["writes"], t["errors"], v["mismatches"], v["verified_blocks"])' "$WORK/$1.json" 2>/dev/null
}

# The writer runs until the owner dies under it, then is stopped; its record holds every write
# n1 acknowledged (and, as uncertain, those it did not answer).
perf writer "$NET.1" -q 16 -w randrw -M 30 -t 120 &
WRITER=$!
PID[writer]=$WRITER
writing() {
    SOCK=$WORK/n1.sock
    [ "$(rpc bdev_get_iostat "{\"name\": \"$VOL\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bdevs"][0]["num_write_ops"] > 5000)')" = True ]
}
wait_until 20 writing
kill -9 "${PID[n1]}"
wait "${PID[n1]}" 2>/dev/null
# The writer's I/O fails within a second or two of losing n1; then it is told to stop.
wait_until 10 grep -q "is Failed\|is Resetting\|is Reconnecting" "$WORK/writer.err"
kill -INT "$WRITER"
if wait_until 30 eval '! kill -0 "$WRITER" 2>/dev/null'; then
    read -r ios errors mism _ <<<"$(verdict writer)"
    if [ "${ios:-0}" -gt 1000 ] && [ "${mism:-1}" = 0 ]; then
        pass "owner n1 killed (kill -9) under a writer ($ios I/Os, $errors failed when n1 died, 0 mismatches)"
    else
        fail "owner n1 killed (kill -9) under a writer" "report: ${ios:-none} I/Os, ${mism:-?} mismatches; $(tail -n2 "$WORK/writer.err")"
    fi
else
    fail "owner n1 killed (kill -9) under a writer" "plexperf did not stop: $(tail -n2 "$WORK/writer.err")"
fi

check "volume attach $VOL --node n2 (n1 does not answer)" vol attach "$VOL" --node n2 || finish

# read_back NAME WHAT: a sequential --verify pass over the whole span through n2 must check
# every block at least once, with no error and no mismatch.
read_back() {
    (perf "$1" "$NET.2" -q 32 -w read -t 3)
    read -r ios errors mism verified <<<"$(verdict "$1")"
    if [ "${errors:-1}" = 0 ] && [ "${mism:-1}" = 0 ] && [ "${verified:-0}" -ge $((SPAN / 512)) ]; then
        pass "$2 ($verified blocks checked, the span $((SPAN / 512)) at least once)"
    else
        fail "$2" "$ios I/Os, $errors errors, $mism mismatches, $verified blocks checked"
    fi
}
read_back after-failover "every write n1 acknowledged reads back through n2"
(perf degraded "$NET.2" -q 16 -w randrw -M 30 -t 2)
read -r ios errors mism verified <<<"$(verdict degraded)"
if [ "${ios:-0}" -gt 0 ] && [ "$errors" = 0 ] && [ "$mism" = 0 ] && is_true "m['state'] == 'degraded'"; then
    pass "n2 keeps the volume writable, degraded ($ios I/Os, no error, no mismatch)"
else
    fail "n2 keeps the volume writable, degraded" "$ios I/Os, $errors errors, $mism mismatches; $(mirror "m['state']")"
fi

# n1 comes back knowing nothing but its plex file. Its host was fenced off n2's plex.
start_node 1 || bail "n1 restarts" "$(tail -n3 "$WORK/n1.log")"
SOCK=$WORK/n1.sock
if rpc bdev_nvme_attach_controller "{\"name\": \"stale\", \"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"$NET.2\", \"trsvcid\": \"4420\", \"subnqn\": \"$NQN-p1\", \"hostnqn\": \"nqn.2024-01.io.plexstor:node:n1\"}" >"$WORK/stale.out" 2>&1; then
    fail "the restarted old owner cannot reach n2's plex" "attached: $(cat "$WORK/stale.out")"
else
    pass "the restarted old owner cannot reach n2's plex ($(tail -n1 "$WORK/stale.out" | cut -c1-100))"
fi

missed=$(mirror "m['dirty_regions']")
check "volume rejoin $VOL: n1's plex back on n2" vol rejoin "$VOL"
if wait_until 60 is_true "m['state'] == 'online' and p[0]['last_resync'] is not None"; then
    pass "n1's plex resynced and in use"
else
    fail "n1's plex resynced and in use" "$(mirror m)"
fi
copied=$(mirror "(p[0]['last_resync']['full'], p[0]['last_resync']['regions'], m['regions'])")
case "$copied" in
    "(False, $missed, "*) pass "partial resync: (full, regions copied, of) = $copied, the $missed regions n1 missed" ;;
    *) fail "partial resync of the $missed regions n1 missed" "(full, regions copied, of) = $copied" ;;
esac

read_back after-rejoin "every acknowledged write still reads back"

wait_until 20 is_true "m['dirty_regions'] == 0"
same=$(plex_files_differ "$WORK/n1-data/$VOL.p0.img" "$WORK/n2-data/$VOL.p1.img" "$(mirror "m['num_blocks']")")
[ "$same" = same ] && pass "the two plexes are the same, block by block" ||
    fail "the two plexes are the same, block by block" "$same"
finish
