#!/usr/bin/env bash
# plexd's NVMe/RDMA target, over soft-RoCE (rxe0) in the test guest, against the Linux
# kernel's nvme-rdma host and against our own host (plexperf), with SPDK's JSON-RPC client
# creating both transports.
#
# One subsystem listens on RDMA (rxe0's address) and on TCP (127.0.0.1) at once. The kernel
# host discovers it over RDMA, connects with 2 I/O queues, runs fio with crc32c verification
# (4 KiB random, 1 MiB sequential), makes and checks an XFS, while plexperf reads the same
# namespace over TCP; plexperf then verifies a pattern over RDMA. plexd is killed (-9) with
# the kernel host connected: its I/O fails as fast_io_fail_tmo says, and plexd restarted from
# its saved configuration is reconnected. Bad input: connect requests with bad private data
# are rejected with the NVMe/RDMA reason; keyed SGLs naming memory the host never registered
# end only their queue pair; a host leaving mid-transfer; a host past its queue size; plexd
# keeps serving.
#
# On the host: cargo build --release && tests/guest/nvmf_rdma_kernel_initiator.sh
# Soft-RoCE is software in an emulated guest: this proves interoperability, not speed.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 39
REPO=$GUEST_LIB_REPO

PLEXD=${PLEXD:-$REPO/build/release/plexd}
PERF=${PLEXPERF:-$REPO/build/release/plexperf}
if ! in_guest; then
    [ -x "$PLEXD" ] || { echo "build first: cargo build --release" >&2; exit 2; }
    reexec_in_guest --timeout 700 --env PLEXD="$PLEXD" -- "$0" "$@"
fi
NQN=nqn.2024-01.io.plexstor:rdma1
PORT=4420
TCP_ADDR=127.0.0.1
BDEV_UUID=9b1d7c2e-4f60-4a8b-8c3d-00112233aabb
WORK=$(mktemp -d /tmp/nvmf-rdma.XXXXXX)
SOCK=$WORK/plexd.sock
PLEXD_PID=
export RUST_LOG=${RUST_LOG:-info}

cleanup() {
    nvme disconnect -n "$NQN" >/dev/null 2>&1
    stop_plexd -KILL
}
trap cleanup EXIT

# SPDK's own client (the host tests install it) drives the methods we share with SPDK.
srpc() { "$SPDK_RPC" -s "$SOCK" "$@"; }

configure() {
    rpc bdev_malloc_create "{\"name\": \"Malloc0\", \"num_blocks\": 786432, \"block_size\": 512, \"uuid\": \"$BDEV_UUID\"}" &&
        srpc nvmf_create_transport -t RDMA &&
        srpc nvmf_create_transport -t TCP &&
        srpc nvmf_create_subsystem "$NQN" -s PLEX0002 -a &&
        srpc nvmf_subsystem_add_ns "$NQN" Malloc0 &&
        srpc nvmf_subsystem_add_listener "$NQN" -t rdma -a "$RXE_ADDR" -s "$PORT" -f ipv4 &&
        srpc nvmf_subsystem_add_listener "$NQN" -t tcp -a "$TCP_ADDR" -s "$PORT" -f ipv4
}

dev_of() { wait_for_nvme_dev "$NQN" 1 30; }

[ -x "$SPDK_RPC" ] || skip_all --required "SPDK's client is not installed at $SPDK_RPC (tests/host install it)"
if rxe_up; then pass "soft-RoCE device rxe0 ($RXE_ADDR)"; else bail "soft-RoCE device rxe0" "rdma_rxe or 'rdma link add' failed"; fi
load_modules nvme nvme-rdma xfs || bail modules "cannot load nvme-rdma/xfs"
# Not through `check`: that runs its command in a subshell, and PLEXD_PID must reach us.
if start_plexd; then pass "plexd starts"; else bail "plexd starts" "see log above"; fi
check "SPDK's client creates RDMA and TCP transports, a subsystem listening on both" configure || finish

transports=$(srpc nvmf_get_transports)
if [ "$(jget "$transports" '",".join(sorted(t["trtype"] for t in v))')" = "RDMA,TCP" ] &&
    [ "$(jget "$transports" '[t for t in v if t["trtype"] == "RDMA"][0]["in_capsule_data_size"]')" = 4096 ]; then
    pass "nvmf_get_transports: RDMA (SPDK's defaults) and TCP"
else
    printf '%s\n' "$transports" | sed 's/^/# /'
    fail "nvmf_get_transports: RDMA (SPDK's defaults) and TCP" "unexpected"
fi
if [ "$(jget "$(srpc nvmf_get_stats)" 'all(any(d["name"] == "rxe0" for t in g["transports"]
        if t["trtype"] == "RDMA" for d in t["devices"]) for g in v["poll_groups"])')" = True ]; then
    pass "nvmf_get_stats: every poll group lists rxe0 under RDMA once it is listened on"
else
    srpc nvmf_get_stats | sed 's/^/# /'
    fail "nvmf_get_stats: every poll group lists rxe0 under RDMA" "unexpected"
fi

# ---- discovery over RDMA ----------------------------------------------------------
out=$(nvme discover -t rdma -a "$RXE_ADDR" -s "$PORT" 2>&1)
if grep -q "subnqn: *$NQN" <<<"$out" && grep -q "trtype: *rdma" <<<"$out" &&
    grep -q "rdma_cms: *rdma-cm" <<<"$out" && grep -q "trtype: *tcp" <<<"$out"; then
    pass "nvme discover over RDMA lists the RDMA (rdma-cm) and TCP listeners"
else
    printf '%s\n' "$out" | sed 's/^/# /'
    fail "nvme discover over RDMA lists both listeners" "entries missing"
fi

# ---- the kernel's nvme-rdma host ---------------------------------------------------
# Kernel messages from here on are this test's (the guest runs other tests before it).
dmesg_from=$(dmesg | wc -l)
check "nvme connect -t rdma (2 I/O queues)" nvme connect -t rdma -n "$NQN" -a "$RXE_ADDR" -s "$PORT" -i 2 || finish
DEV=$(dev_of) || bail "block device appears" "no device for $NQN"
pass "block device appears ($DEV)"
HOST_CTRL=$(ctrl_of_dev "$DEV")
qpairs=$(rpc nvmf_subsystem_get_qpairs "{\"nqn\": \"$NQN\"}")
if [ "$(jget "$qpairs" '"%d %s" % (len(v), ",".join(sorted(set(q["peer_address"]["trtype"] for q in v))))')" = "3 RDMA" ]; then
    pass "plexd sees admin + 2 I/O queue pairs over RDMA"
else
    printf '%s\n' "$qpairs" | sed 's/^/# /'
    fail "plexd sees admin + 2 I/O queue pairs over RDMA" "unexpected"
fi

# Our host reads the same namespace over TCP while the kernel's works over RDMA.
TCP_TRID="trtype:TCP adrfam:IPv4 traddr:$TCP_ADDR trsvcid:$PORT subnqn:$NQN"
timeout 120 "$PERF" -r "$TCP_TRID" --json --warmup 0 -w randread -o 4096 -q 8 -t 20 \
    >"$WORK/tcp.json" 2>"$WORK/tcp.err" &
tcp_pid=$!
check "fio 4k randwrite, crc32c verify" fio_verify "$DEV" 8M
check "fio 1M seq write, crc32c verify" fio_seq "$DEV" 1M 32M
check "xfs: mkfs, mount, write, remount, read back" fs_roundtrip "$DEV" mkfs.xfs -f
tcp_rc=0
wait "$tcp_pid" || tcp_rc=$?
if [ "$tcp_rc" = 0 ]; then
    plexperf_ok "plexperf over TCP on the same subsystem meanwhile" "$WORK/tcp.json"
else
    sed 's/^/# /' "$WORK/tcp.err" | tail -n 10
    fail "plexperf over TCP on the same subsystem meanwhile" "exit $tcp_rc"
fi
# The kernel host saw nothing wrong on the way: no bogus invalidation, error recovery, reset.
host_errors=$(dmesg | tail -n +"$((dmesg_from + 1))" |
    grep -E "nvme $HOST_CTRL: .*(Bogus|error|recovery|reset|timeout|Reconnecting)" || true)
if [ -z "$host_errors" ]; then
    pass "the kernel host logged no transport error"
else
    printf '%s\n' "$host_errors" | tail -n 5 | sed 's/^/# /'
    fail "the kernel host logged no transport error" "see dmesg above"
fi
check "nvme disconnect" nvme disconnect -n "$NQN"
check "device goes away" wait_for_no_nvme_dev "$NQN" 20
check "plexd's controllers cleaned up" wait_controllers 0

# ---- our host over RDMA --------------------------------------------------------------
TRID="trtype:RDMA adrfam:IPv4 traddr:$RXE_ADDR trsvcid:$PORT subnqn:$NQN"
plexperf_pattern_round_trip "plexperf over RDMA reads it back (RDMA WRITE by plexd), verified"
plexperf_check "plexperf randrw 128 KiB over RDMA (RDMA READ by plexd), --verify" "$WORK/big.json" \
    -w randrw -M 50 -o 131072 -q 4 -P 2 -t 3 --verify --size 8388608

# ---- bad input ------------------------------------------------------------------------
# Connect requests with bad NVMe/RDMA private data (rdma-check's probe): each is rejected with
# the reason the binding names (STS in the reject's private data), and plexd keeps serving.
PROBE=${RDMA_CHECK:-$REPO/build/release/rdma-check}
ZEROS=$(printf '0%.0s' $(seq 1 44)) # 22 zero bytes: the rest of the 32-byte request
rejected_with() { # NAME STS REQUEST-HEX (RECFMT QID HRQSIZE HSQSIZE CNTLID, little-endian)
    local out sts
    out=$(timeout 30 "$PROBE" --connect-with "$3$ZEROS" "$RXE_ADDR" "$PORT" 2>&1)
    sts=$(sed -n 's/^rejected: .*private data \(....\)\(....\).*/\2/p' <<<"$out")
    if [ "$sts" = "$2" ]; then
        pass "$1 (rejected, STS ${2:0:2})"
    else
        printf '%s\n' "$out" | tail -n 3 | sed 's/^/# /'
        fail "$1" "want a reject with STS $2"
    fi
}
rejected_with "a connect request with RECFMT 5 is rejected: invalid RECFMT" 0200 "0500010020001f00ffff"
rejected_with "a queue deeper than max_queue_depth is rejected: invalid HSQSIZE" 0400 "000001000004ff03ffff"
rejected_with "a QID past max_io_qpairs_per_ctrlr is rejected: invalid QID" 0300 "0000001020001f00ffff"
# Transfers a host names wrongly: the target's RDMA READ of the Connect data fails at the
# host's NIC, and plexd ends only that queue pair; and a host gone right after asking.
transfer_ended() { # NAME MODE PATTERN
    local out
    out=$(timeout 30 "$PROBE" --bad-transfer "$2" "$RXE_ADDR" "$PORT" 2>&1)
    if grep -q -- "$3" <<<"$out"; then
        pass "$1 ($out)"
    else
        printf '%s\n' "$out" | tail -n 3 | sed 's/^/# /'
        fail "$1" "want '$3'"
    fi
}
transfer_ended "a keyed SGL with a key the host never registered: plexd closes that queue pair" \
    bad-key "closed by the target"
transfer_ended "a keyed SGL running past the host's registration: plexd closes that queue pair" \
    out-of-range "closed by the target"
transfer_ended "a host that disconnects right after sending a Connect to be read" disconnect disconnected
plexperf_identify_ok "plexd still serves RDMA after the bad connects and transfers"

# ---- a host past its queue size ------------------------------------------------------
# rdma-check's overrun probe keeps more commands in flight than its I/O queue of 128 (SPDK's
# max_queue_depth) holds. plexd gives a queue pair 32 command slots past its size (for cids a
# host reuses before the response's send completes here). The writes go to a quiesced mirror,
# which holds each write that got a slot until it is resumed, so the slots stay busy however
# slowly the burst arrives: with 56 writes past the queue, the last 24 wait in their receives;
# with 104, 64 wait (the most a queue pair holds) and the 8 past them are answered at once
# with Command Sequence Error, the queue pair staying up. Once nvmf_get_stats counts every
# wait (its pending_free_request, as SPDK's) and refusal (commands_past_queue_size, plexd's
# own), the mirror is resumed: each command is answered once, and the held writes'
# in-capsule data lands intact. The reads that follow are not held.
HELD_NQN=nqn.2024-01.io.plexstor:rdma-held
held_subsystem() {
    rpc bdev_malloc_create '{"name": "Held0", "num_blocks": 16384, "block_size": 512}' >/dev/null &&
        rpc bdev_mirror_create '{"name": "Held", "plexes": ["Held0"]}' >/dev/null &&
        srpc nvmf_create_subsystem "$HELD_NQN" -a &&
        srpc nvmf_subsystem_add_ns "$HELD_NQN" Held &&
        srpc nvmf_subsystem_add_listener "$HELD_NQN" -t rdma -a "$RXE_ADDR" -s "$PORT" -f ipv4
}
# stats: nvmf_get_stats' RDMA waits and refusals, each summed over the poll groups
stats() {
    jget "$(srpc nvmf_get_stats)" '"%d %d" % (sum(d["pending_free_request"] for g in v["poll_groups"]
        for t in g["transports"] if t["trtype"] == "RDMA" for d in t["devices"]),
        sum(g["commands_past_queue_size"] for g in v["poll_groups"]))'
}
counted() { # WAITS REFUSED: both counters at least as high
    local now
    now=$(stats) && [ "${now% *}" -ge "$1" ] && [ "${now#* }" -ge "$2" ]
}
# overrun EXTRA WAITS REFUSED: "counted W waits, R refused" (what nvmf_get_stats counted
# while the mirror held the writes), then the probe's line. The mirror is resumed once WAITS
# more capsules waited and REFUSED more were refused (or after 60 s).
overrun() {
    local before after probe
    before=$(stats) || return 1
    rpc bdev_mirror_quiesce '{"name": "Held", "timeout_ms": 60000}' >/dev/null || return 1
    timeout 120 "$PROBE" --overrun "$1" "$RXE_ADDR" "$PORT" "$HELD_NQN" >"$WORK/overrun.out" 2>&1 &
    probe=$!
    wait_until 60 counted $((${before% *} + $2)) $((${before#* } + $3))
    after=$(stats)
    echo "counted $((${after% *} - ${before% *})) waits, $((${after#* } - ${before#* })) refused"
    rpc bdev_mirror_resume '{"name": "Held"}' >/dev/null
    wait "$probe"
    cat "$WORK/overrun.out"
}
refusals() { sed -n 's/.*Command Sequence Error: \([0-9]*\) writes.*/\1/p' <<<"$1"; }
# served OUT WAITS REFUSED: nvmf_get_stats counted the waits and refusals, and the probe says
# ok, with as many writes refused
served() {
    grep -qx "counted $2 waits, $3 refused" <<<"$1" && grep -q "^ok: " <<<"$1" &&
        [ "$(refusals "$1")" = "$3" ]
}
check "a namespace on a mirror, to be quiesced (SPDK's client adds it)" held_subsystem
out=$(overrun 56 24 0)
if served "$out" 24 0; then
    pass "184 writes on a queue of 128: nvmf_get_stats counts 24 waits for a slot, none refused: $(sed -n 's/^ok: //p' <<<"$out")"
else
    printf '%s\n' "$out" | tail -n 3 | sed 's/^/# /'
    fail "184 writes on a queue of 128, each answered once, successfully, data intact" "${out:-no output}"
fi
out=$(overrun 104 64 8)
if served "$out" 64 8; then
    pass "232 writes on a queue of 128: nvmf_get_stats counts 64 waits and the 8 past them refused, the rest served: $(sed -n 's/^ok: //p' <<<"$out")"
else
    printf '%s\n' "$out" | tail -n 3 | sed 's/^/# /'
    fail "232 writes on a queue of 128: exactly the 8 past the slots and waits refused" "${out:-no output}"
fi

# ---- kill -9 with the kernel host connected; restart from the saved configuration -------
check "save_config" sh -c "$(declare -f rpc); SOCK=$SOCK PLEXCTL=$PLEXCTL; rpc save_config > $WORK/saved.json"
check "connect over RDMA (reconnect_delay 1 s, fast_io_fail_tmo 3 s)" connect_failfast rdma "$RXE_ADDR"
DEV=$(dev_of) || bail "reconnect setup" "no device"
CTRL=$(ctrl_of_dev "$DEV")
ctrl_attr() { cat "/sys/class/nvme/$CTRL/$1" 2>/dev/null; }
[ "$(ctrl_attr transport)" = rdma ] || bail "reconnect setup" "controller '$CTRL' of $DEV is not an RDMA one"
ctrl_live() { [ "$(ctrl_attr state)" = live ]; }
ctrl_not_live() { ! ctrl_live; }
stop_plexd -KILL
rc=0
timeout 60 dd if="$DEV" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || rc=$?
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && wait_until 10 ctrl_not_live; then
    pass "host I/O fails cleanly while plexd is down ($CTRL is $(ctrl_attr state))"
else
    fail "host I/O fails cleanly while plexd is down" "dd exit $rc, $CTRL $(ctrl_attr state)"
fi
# Restarted with the saved configuration as it is but for no_srq: until now every queue pair
# took its capsules from the device's shared receive queue (SPDK's default); from here each
# posts its own.
python3 - "$WORK/saved.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
for sub in cfg["subsystems"]:
    for c in sub.get("config") or []:
        if c["method"] == "nvmf_create_transport" and c["params"]["trtype"] == "RDMA":
            c["params"]["no_srq"] = True
json.dump(cfg, open(sys.argv[1], "w"))
EOF
if start_plexd -c "$WORK/saved.json" && wait_until 30 ctrl_live; then
    pass "the kernel host reconnects over RDMA to plexd restarted from saved.json"
    check "I/O verified after the reconnect" fio_verify "$DEV" 2M
else
    fail "the kernel host reconnects over RDMA to plexd restarted from saved.json" "controller $CTRL: $(ctrl_attr state)"
    fail "I/O verified after the reconnect" "no reconnect"
fi
no_srq=$(jget "$(srpc nvmf_get_transports --trtype RDMA)" 'v[0]["no_srq"]')
[ "$no_srq" = True ] && pass "and that was without the shared receive queue (no_srq)" ||
    fail "and that was without the shared receive queue (no_srq)" "no_srq is $no_srq"
nvme disconnect -n "$NQN" >/dev/null 2>&1
check "device gone after the final disconnect" wait_for_no_nvme_dev "$NQN" 20

stop_plexd -TERM
if grep -q "panicked" "$WORK/plexd.log"; then
    grep -B2 -A5 panicked "$WORK/plexd.log" | sed 's/^/# /'
    fail "plexd never panicked" "see log"
else
    pass "plexd never panicked"
fi
grep -E "WARN|ERROR" "$WORK/plexd.log" | tail -n 15 | sed 's/^/# plexd: /'
finish
