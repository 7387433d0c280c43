#!/usr/bin/env bash
# SPDK's own NVMe/TCP host, spdk_nvme_perf (SPDK v26.05, in shared/spdk/bin), against plexd:
# with SPDK's empty host NQN and with one, with header and data digests, on a subsystem with two
# namespaces, reads, writes and a mix. Each run must exit 0, do I/O and report no error.
#
#   tests/host/spdk_perf_plexd.sh     (needs: cargo build --release -p plexd -p initiator)
#
# Where the SPDK binaries are absent every result is skipped, saying so. The runtime packages
# they need are installed if missing; hugepages are reserved with scripts/setup.sh and the
# machine's previous count is put back at the end.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tests/guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 9

RESULTS=(
    "plexd configured"
    "randread with SPDK's empty host NQN"
    "nvmf_subsystem_get_controllers shows the empty host NQN"
    "randwrite with a host NQN on a subsystem that allows only it"
    "the empty host NQN is refused where any host is not allowed"
    "header and data digests (-H -I), randrw"
    "a subsystem with two namespaces: I/O on both"
    "128 KiB rw mix over 2 queue pairs per namespace"
    "plexd never panicked"
)
if ! PERF=$(spdk_bin spdk_nvme_perf); then
    for r in "${RESULTS[@]}"; do skip "$r" "no spdk_nvme_perf in $SPDK_BIN_DIR"; done
    finish
fi

PLEXD=${PLEXD:-$REPO/build/release/plexd}
[ -x "$PLEXD" ] || bail "plexd built" "missing $PLEXD: cargo build --release -p plexd -p initiator"

# ---- what spdk_nvme_perf needs: its libraries and hugepages ------------------------------------
PERF_MEM_MB=512
WORK=$(mktemp -d /tmp/spdk-perf-plexd.XXXXXX)
SOCK=$WORK/plexd.sock
PLEXD_PID=
cleanup() {
    [ -n "$PLEXD_PID" ] && kill "$PLEXD_PID" 2>/dev/null && wait "$PLEXD_PID" 2>/dev/null
    spdk_restore
    rm -rf "$WORK"
}
trap cleanup EXIT
spdk_prepare "$PERF_MEM_MB" 2>"$WORK/prepare.err" || bail "${RESULTS[0]}" "$(tail -n1 "$WORK/prepare.err")"

# ---- plexd ------------------------------------------------------------------------------------
ANY_HOST=nqn.2026-12.io.plexstor:spdk-perf-any
ONE_HOST=nqn.2026-12.io.plexstor:spdk-perf-one
TWO_NS=nqn.2026-12.io.plexstor:spdk-perf-two-ns
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:0badc0de-0000-4000-8000-000000000001
PORT=$(free_tcp_port)

"$PLEXD" -m 0x1 --no-pin -r "$SOCK" >"$WORK/plexd.log" 2>&1 &
PLEXD_PID=$!
wait_for_plexd "$PLEXD_PID" || bail "${RESULTS[0]}" "$(tail -n 3 "$WORK/plexd.log")"
listener() {
    echo "{\"nqn\": \"$1\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT\"}}"
}
configure() {
    local b
    for b in N0 N1 N2 N3; do
        rpc bdev_null_create "{\"name\": \"$b\", \"num_blocks\": 65536, \"block_size\": 512}" || return 1
    done
    rpc nvmf_create_transport '{"trtype": "TCP"}' &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$ANY_HOST\", \"allow_any_host\": true}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$ANY_HOST\", \"namespace\": {\"bdev_name\": \"N0\"}}" &&
        rpc nvmf_subsystem_add_listener "$(listener "$ANY_HOST")" &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$ONE_HOST\"}" &&
        rpc nvmf_subsystem_add_host "{\"nqn\": \"$ONE_HOST\", \"host\": \"$HOSTNQN\"}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$ONE_HOST\", \"namespace\": {\"bdev_name\": \"N1\"}}" &&
        rpc nvmf_subsystem_add_listener "$(listener "$ONE_HOST")" &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$TWO_NS\", \"allow_any_host\": true}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$TWO_NS\", \"namespace\": {\"bdev_name\": \"N2\"}}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$TWO_NS\", \"namespace\": {\"bdev_name\": \"N3\"}}" &&
        rpc nvmf_subsystem_add_listener "$(listener "$TWO_NS")"
}
check "${RESULTS[0]}" configure || finish

trid() { echo "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$1${2:+ hostnqn:$2}"; }

# perf LOG NQN HOSTNQN ARGS...: spdk_nvme_perf on core 1 with its own memory, bounded in time.
perf() {
    local log=$1 nqn=$2 host=$3
    shift 3
    (cd "$WORK" && timeout 60 "$PERF" -c 0x2 -s "$PERF_MEM_MB" -t 2 -r "$(trid "$nqn" "$host")" "$@") \
        >"$log" 2>&1
}

# verdict LOG RC [NAMESPACES]: "ok: …" when the run exited 0, reported I/O on every namespace
# and printed no error. SPDK's host logs "CQ transport error -6" for each I/O queue it has
# already disconnected while tearing down; it does so against SPDK's own nvmf_tgt too, so that
# line alone is not an error.
verdict() {
    python3 - "$1" "$2" "${3:-1}" <<'EOF'
import re, sys
log, rc, want_ns = open(sys.argv[1], errors="replace").read(), int(sys.argv[2]), int(sys.argv[3])
teardown = re.compile(r"DISCONNECTED\] CQ transport error -6 ")
errors = [l for l in log.splitlines()
          if ("*ERROR*" in l or "failed" in l.lower()) and not teardown.search(l)]
ns = re.findall(r"NSID (\d+) from core\s+\d+:\s+([\d.]+)", log)
total = re.search(r"^Total\s+:\s+([\d.]+)", log, re.M)
if rc != 0:
    print(f"bad: exit {rc}: " + (log.strip().splitlines() or ["no output"])[-1])
elif errors:
    print(f"bad: {len(errors)} error line(s): {errors[0][:200]}")
elif not total or float(total.group(1)) <= 0:
    print("bad: no Total line with I/O")
elif len(ns) != want_ns or any(float(iops) <= 0 for _, iops in ns):
    print(f"bad: I/O on namespaces {ns}, expected {want_ns} with I/O")
else:
    print(f"ok: {total.group(1)} IOPS over {len(ns)} namespace(s), no error")
EOF
}

# run NAME NAMESPACES NQN HOSTNQN ARGS...
run() {
    local name=$1 nss=$2 log rc=0 v
    shift 2
    log=$WORK/run$((TESTS_PASSED + TESTS_FAILED)).log
    perf "$log" "$@" || rc=$?
    v=$(verdict "$log" "$rc" "$nss")
    case "$v" in
        ok:*) pass "$name (${v#ok: })" ;;
        *)
            sed 's/^/# /' "$log" | tail -n 12
            fail "$name" "${v#bad: }"
            ;;
    esac
}

# The first run is watched from the side: while it is connected, the target must list its
# controller with the empty host NQN, as SPDK's nvmf_tgt does.
empty_hostnqn_listed() {
    CTRLS=$(rpc nvmf_subsystem_get_controllers "{\"nqn\": \"$ANY_HOST\"}") &&
        python3 -c 'import json,sys; c=json.loads(sys.argv[1]); sys.exit(0 if c and all(x["hostnqn"] == "" for x in c) else 1)' "$CTRLS"
}
log=$WORK/empty-hostnqn.log
perf "$log" "$ANY_HOST" "" -q 16 -o 4096 -w randread &
perf_pid=$!
CTRLS=
if wait_until 20 empty_hostnqn_listed; then listed=yes; else listed=no; fi
rc=0
wait "$perf_pid" || rc=$?
v=$(verdict "$log" "$rc")
case "$v" in
    ok:*) pass "${RESULTS[1]} (${v#ok: })" ;;
    *) sed 's/^/# /' "$log" | tail -n 12; fail "${RESULTS[1]}" "${v#bad: }" ;;
esac
if [ "$listed" = yes ]; then pass "${RESULTS[2]}"; else fail "${RESULTS[2]}" "controllers: ${CTRLS:-none}"; fi

run "${RESULTS[3]}" 1 "$ONE_HOST" "$HOSTNQN" -q 16 -o 4096 -w randwrite

# SPDK's host must be turned away, and say so, where the subsystem names its hosts. (Finding
# no controller, spdk_nvme_perf still exits 0: what it prints is what tells.)
rc=0
perf "$WORK/refused.log" "$ONE_HOST" "" -q 1 -o 4096 -w randread || rc=$?
if grep -q "No valid NVMe controllers" "$WORK/refused.log" && ! grep -q "^Total" "$WORK/refused.log"; then
    pass "${RESULTS[4]}"
else
    sed 's/^/# /' "$WORK/refused.log" | tail -n 8
    fail "${RESULTS[4]}" "spdk_nvme_perf exited $rc and was not refused"
fi

run "${RESULTS[5]}" 1 "$ANY_HOST" "" -H -I -q 16 -o 16384 -w randrw -M 50
run "${RESULTS[6]}" 2 "$TWO_NS" "" -q 16 -o 4096 -w randread
# spdk_nvme_perf has no data verification; a mix of large writes and reads over several queues
# per namespace is the closest: it exercises R2T, C2H data and queue setup.
run "${RESULTS[7]}" 2 "$TWO_NS" "$HOSTNQN" -P 2 -q 8 -o 131072 -w rw -M 50

if grep -q panicked "$WORK/plexd.log"; then
    fail "${RESULTS[8]}" "$(grep -m1 panicked "$WORK/plexd.log")"
else
    pass "${RESULTS[8]}"
fi
finish
