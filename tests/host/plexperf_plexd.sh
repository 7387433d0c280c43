#!/usr/bin/env bash
# Our NVMe/TCP host against our target, on the host: plexperf --verify with several queue
# pairs over two plexd reactors, small in-capsule writes, large R2T writes, and digests.
#
#   tests/host/plexperf_plexd.sh     (needs: cargo build --release -p plexd -p initiator)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tests/guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 13

PLEXD=${PLEXD:-$REPO/build/release/plexd}
PLEXPERF=${PLEXPERF:-$REPO/build/release/plexperf}
NQN=nqn.2026-11.io.plexstor:plexperf-test
TWO_NS=nqn.2026-11.io.plexstor:plexperf-two-ns
PORT=$(free_tcp_port)
WORK=$(mktemp -d /tmp/plexperf-plexd.XXXXXX)
SOCK=$WORK/plexd.sock
PLEXD_PID=
for b in "$PLEXD" "$PLEXPERF"; do
    [ -x "$b" ] || { echo "missing $b: cargo build --release -p plexd -p initiator" >&2; exit 2; }
done

cleanup() {
    [ -n "$PLEXD_PID" ] && kill "$PLEXD_PID" 2>/dev/null && wait "$PLEXD_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

"$PLEXD" -m 0x3 --no-pin -r "$SOCK" >"$WORK/plexd.log" 2>&1 &
PLEXD_PID=$!
wait_for_plexd "$PLEXD_PID" || bail "plexd starts" "$(tail -n 3 "$WORK/plexd.log")"
configure() {
    rpc bdev_malloc_create '{"name": "Malloc0", "num_blocks": 131072, "block_size": 512}' &&
        rpc nvmf_create_transport '{"trtype": "TCP"}' &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"allow_any_host\": true}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"Malloc0\"}}" &&
        rpc nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT\"}}" &&
        rpc bdev_malloc_create '{"name": "Malloc1", "num_blocks": 16384, "block_size": 512}' &&
        rpc bdev_malloc_create '{"name": "Malloc2", "num_blocks": 16384, "block_size": 512}' &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$TWO_NS\", \"allow_any_host\": true}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$TWO_NS\", \"namespace\": {\"bdev_name\": \"Malloc1\"}}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$TWO_NS\", \"namespace\": {\"bdev_name\": \"Malloc2\"}}" &&
        rpc nvmf_subsystem_add_listener "{\"nqn\": \"$TWO_NS\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT\"}}"
}
check "plexd with two reactors configured" configure || finish

TRID="trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$NQN"

# run_verify NAME PLEXPERF-ARGS...: a --verify run must do I/O with no error and no mismatch.
run_verify() {
    local name=$1 out
    shift
    out=$WORK/$name.json
    if ! "$PLEXPERF" -r "${RUN_TRID:-$TRID}" --verify --json -t 2 --warmup 0 "$@" >"$out" 2>"$WORK/$name.err"; then
        fail "$name" "plexperf failed: $(tail -n1 "$WORK/$name.err")"
        return
    fi
    local verdict
    verdict=$(python3 - "$out" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t, v = r["total"], r["verify"]
ios = t["reads"] + t["writes"]
if t["errors"] or v["mismatches"] or ios == 0 or v["verified_blocks"] == 0:
    print(f"bad: {ios} I/Os, {t['errors']} errors, {v['mismatches']} mismatches, "
          f"{v['verified_blocks']} blocks verified")
else:
    print(f"{ios} I/Os, {v['verified_blocks']} blocks verified, no error, no mismatch")
EOF
)
    case "$verdict" in
        bad:*) fail "$name" "$verdict" ;;
        *) pass "$name ($verdict)" ;;
    esac
}

run_verify "4 qpairs x QD32, 4 KiB randrw (in-capsule writes)" -P 4 -q 32 -c 0x3 -o 4096 -w randrw -M 50
run_verify "2 qpairs x QD16, 128 KiB randrw (R2T writes, C2H reads)" -P 2 -q 16 -c 0x3 -o 131072 -w randrw -M 50
run_verify "header and data digests, 64 KiB randrw" -P 2 -q 16 -o 65536 -w randrw -M 50 --hdgst --ddgst
# The digests were in force, not just asked for: plexperf reports what each ICResp granted.
digests=$(python3 -c '
import json, sys
q = json.load(open(sys.argv[1]))["digests"]
print(len(q), sum(d["hdgst"] and d["ddgst"] for d in q))' "$WORK/header and data digests, 64 KiB randrw.json")
if [ "${digests% *}" -ge 3 ] && [ "${digests% *}" = "${digests#* }" ]; then
    pass "digests in force on every queue (queues, with both digests: $digests)"
else
    fail "digests in force on every queue" "queues, with both digests: ${digests:-no report}"
fi
run_verify "1 MiB sequential writes and reads (MDTS-sized)" -q 8 -o 1048576 -w rw -M 50
# One queue pair per -P per namespace: plexperf must ask for all of them.
RUN_TRID="trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$TWO_NS" \
    run_verify "a subsystem with two namespaces, 2 qpairs each" -P 2 -q 8 -c 0x3 -o 4096 -w randrw -M 50

# --verify-state carries the record of acknowledged writes from one run to the next (as a
# failover test needs): a later read-only run checks what the first one wrote ...
STATE=$WORK/verify-state.json
run_verify "--verify-state: the writes of one run" -q 32 -o 4096 -w randrw -M 30 --size 8388608 --verify-state "$STATE"
run_verify "--verify-state: a later run reads them all back" -q 32 -o 4096 -w read --size 8388608 --verify-state "$STATE"
# ... and catches blocks changed behind its back: a run that keeps no record rewrites them.
"$PLEXPERF" -r "$TRID" --verify -t 1 --warmup 0 -q 32 -o 4096 -w randwrite --size 8388608 >/dev/null 2>&1
stale=$("$PLEXPERF" -r "$TRID" --verify --json -t 1 --warmup 0 -q 32 -o 4096 -w read --size 8388608 \
    --verify-state "$STATE" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["verify"]["mismatches"])')
if [ "${stale:-0}" -gt 0 ]; then
    pass "--verify-state: blocks rewritten by another writer are caught ($stale mismatches)"
else
    fail "--verify-state: blocks rewritten by another writer are caught" "mismatches: ${stale:-no report}"
fi

# The connections spread over both reactors while connected, and go away after. plexperf
# runs long enough to be seen; the poll below ends as soon as all its queues are up.
"$PLEXPERF" -r "$TRID" -P 4 -q 4 -c 0x1 -t 6 --warmup 0 -w randread >/dev/null 2>&1 &
perf=$!
# "REACTORS QPAIRS" of the subsystem's queues now: the admin queue and 4 I/O queues.
reactors_and_qpairs() {
    rpc nvmf_subsystem_get_qpairs "{\"nqn\": \"$NQN\"}" |
        python3 -c 'import json,sys; q=json.load(sys.stdin); print(len({p["thread"] for p in q}), len(q))'
}
all_qpairs_up() { spread=$(reactors_and_qpairs) && [ "${spread#* }" -ge 5 ]; }
spread=
wait_until 5 all_qpairs_up
wait "$perf"
case "$spread" in
    "2 "*) pass "qpairs spread over both reactors (reactors, qpairs: $spread)" ;;
    *) fail "qpairs spread over both reactors" "reactors, qpairs: ${spread:-none seen}" ;;
esac
if wait_until 10 no_controllers "$NQN"; then
    pass "controllers gone after plexperf exits"
else
    fail "controllers gone after plexperf exits" "$CTRLS"
fi
grep -q panicked "$WORK/plexd.log" && fail "plexd never panicked" "see $WORK/plexd.log" || pass "plexd never panicked"
finish
