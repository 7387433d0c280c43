#!/usr/bin/env bash
# bdev_nvme against the Linux kernel's nvmet target, inside the test guest: nvmet exports a
# RAM disk on 127.0.0.1:4420; plexd attaches it (bdev_nvme_attach_controller -> Nvme0n1),
# exports Nvme0n1 again on 127.0.0.1:4421, and plexperf --verify writes and reads back through
# plexd's re-export (so every byte crosses plexd's target, its bdev_nvme and nvmet). Then the
# nvmet port goes away and comes back: the controller must report reconnecting, then connected,
# and verified I/O must work again. Then detach, and the same over NVMe/RDMA: nvmet-rdma on
# soft-RoCE, attached by SPDK's client with -t rdma (so a mirror plex can live across RDMA),
# re-exported over TCP and checked with verified I/O.
#
# On the host:  cargo build --release -p plexd -p initiator && tests/guest/bdev_nvme_nvmet.sh
# The guest is emulated (TCG): slow, this proves interoperability, not speed.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 21
REPO=$GUEST_LIB_REPO
PLEXD=${PLEXD:-$REPO/build/release/plexd}
PERF=${PLEXPERF:-$REPO/build/release/plexperf}

if ! in_guest; then
    for b in "$PLEXD" "$PERF"; do
        [ -x "$b" ] || { echo "missing $b: cargo build --release -p plexd -p initiator" >&2; exit 2; }
    done
    reexec_in_guest --timeout 600 --env PLEXD="$PLEXD" --env PLEXPERF="$PERF" -- "$0" "$@"
fi

export RUST_LOG=${RUST_LOG:-info}
NQN_K=nqn.2024-01.io.plexstor:bdev-nvme-nvmet
NQN_P=nqn.2024-01.io.plexstor:bdev-nvme-reexport
PORT_K=4420
PORT_P=4421
NQN_R=nqn.2024-01.io.plexstor:bdev-nvme-nvmet-rdma
PORT_R=4424
WORK=$(mktemp -d /tmp/bdev-nvme.XXXXXX)
SOCK=$WORK/plexd.sock
PLEXD_PID=



state() { jget "$(rpc bdev_nvme_get_controllers '{"name": "Nvme0"}')" 'v[0]["ctrlrs"][0]["state"]'; }

state_is() { [ "$(state)" = "$1" ]; }

wait_state() { # wait_state WANT TIMEOUT_S
    wait_until "$2" state_is "$1" && return 0
    echo "controller is $(state), want $1" >&2
    return 1
}

cleanup() {
    [ -n "$PLEXD_PID" ] && kill -KILL "$PLEXD_PID" 2>/dev/null && wait "$PLEXD_PID" 2>/dev/null
    nvmet_clear >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

# perf NAME ARGS...: plexperf --verify --json through plexd's re-export, checked.
perf() {
    local name=$1 out=$WORK/perf.json rc=0
    shift
    timeout 120 "$PERF" -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT_P subnqn:$NQN_P" \
        --json --warmup 0 --verify "$@" >"$out" 2>"$out.err" || rc=$?
    if [ "$rc" != 0 ]; then
        tail -n 15 "$out.err" | sed 's/^/# /'
        fail "$name" "plexperf exited $rc"
        return 1
    fi
    local v
    v=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); t=r["total"]; m=(r["verify"] or {}).get("mismatches",0); print(t["reads"]+t["writes"], t["errors"], m)' "$out")
    read -r ios errs mism <<<"$v"
    if [ "$ios" -gt 0 ] && [ "$errs" = 0 ] && [ "$mism" = 0 ]; then
        pass "$name ($ios I/Os, no error, no mismatch)"
    else
        fail "$name" "ios=$ios errors=$errs mismatches=$mism"
        return 1
    fi
}

check "nvmet exports a RAM disk on 127.0.0.1:$PORT_K" nvmet_export_ramdisk "$NQN_K" "$PORT_K" ||
    bail "nvmet export" "cannot go on without it"

rm -f "$SOCK"
"$PLEXD" -m 0x1 --no-pin -r "$SOCK" --idle-poll-us 200 >>"$WORK/plexd.log" 2>&1 &
PLEXD_PID=$!
wait_for_plexd "$PLEXD_PID" || { tail -n 20 "$WORK/plexd.log" | sed 's/^/# /'; bail "plexd starts" "no answer"; }

if names=$(rpc bdev_nvme_attach_controller "{\"name\": \"Nvme0\", \"trtype\": \"tcp\", \"adrfam\": \"ipv4\",
        \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT_K\", \"subnqn\": \"$NQN_K\",
        \"ctrlr_loss_timeout_sec\": -1, \"reconnect_delay_sec\": 1, \"fast_io_fail_timeout_sec\": 5}") &&
    [ "$names" = '["Nvme0n1"]' ]; then
    pass "bdev_nvme_attach_controller to nvmet -> $names"
else
    tail -n 20 "$WORK/plexd.log" | sed 's/^/# /'
    bail "bdev_nvme_attach_controller to nvmet" "got ${names:-an error}"
fi
check "controller state is connected" wait_state connected 5

reexport() { # BDEV
    { rpc nvmf_get_transports | grep -q '"TCP"' || rpc nvmf_create_transport '{"trtype": "TCP"}'; } &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$NQN_P\", \"allow_any_host\": true, \"serial_number\": \"PLEXNV01\"}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$NQN_P\", \"namespace\": {\"bdev_name\": \"$1\"}}" &&
        rpc nvmf_subsystem_add_listener "{\"nqn\": \"$NQN_P\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT_P\"}}"
}
check "plexd re-exports Nvme0n1 on 127.0.0.1:$PORT_P" reexport Nvme0n1 ||
    bail "re-export" "cannot go on without it"

perf "write a 1 MiB pattern through plexd -> nvmet (--verify)" -w write -o 4096 -q 8 -t 3 --size 1048576
perf "read it back and verify" -w read -o 4096 -q 8 -t 2 --size 1048576
perf "randrw 64 KiB through plexd -> nvmet (--verify)" -w randrw -M 50 -o 65536 -q 4 -t 3 --size 8388608

# The nvmet port goes away: the controller leaves connected; when the port is back, it returns.
portdir=$(nvmet_tcp_port 127.0.0.1 "$PORT_K")
rm -f "$portdir/subsystems/$NQN_K"
rmdir "$portdir"
check "nvmet port removed: controller is reconnecting" wait_state reconnecting 30
portdir=$(nvmet_tcp_port 127.0.0.1 "$PORT_K")
ln -s "$NVMET_CFS/subsystems/$NQN_K" "$portdir/subsystems/$NQN_K"
check "nvmet port re-created: controller is connected again" wait_state connected 30
perf "verified I/O after the reconnect" -w randrw -M 50 -o 4096 -q 8 -t 3 --size 2097152

check "remove the re-export" rpc nvmf_delete_subsystem "{\"nqn\": \"$NQN_P\"}"
check "bdev_nvme_detach_controller" rpc bdev_nvme_detach_controller '{"name": "Nvme0"}'
if [ "$(rpc bdev_get_bdevs)" = "[]" ] && [ "$(rpc bdev_nvme_get_controllers)" = "[]" ]; then
    pass "detach removed the controller and Nvme0n1"
else
    fail "detach removed the controller and Nvme0n1" "$(rpc bdev_get_bdevs)"
fi
# ---- over RDMA ----------------------------------------------------------------
# Not under `check`: its subshell would keep RXE_ADDR from us.
if rxe_up && nvmet_export_ramdisk "$NQN_R" "$PORT_R" "$RXE_ADDR" rdma; then
    pass "nvmet-rdma exports a RAM disk on soft-RoCE ($RXE_ADDR:$PORT_R)"
else
    fail "nvmet-rdma exports a RAM disk on soft-RoCE" "rxe0 or the nvmet-rdma port failed"
fi
# SPDK's own client where its venv is installed (the host tests install it), else plexctl
# with the same parameters.
attach_rdma() {
    if [ -x "$SPDK_RPC" ]; then
        "$SPDK_RPC" -s "$SOCK" bdev_nvme_attach_controller -b Nvme1 -t rdma -f ipv4 \
            -a "$RXE_ADDR" -s "$PORT_R" -n "$NQN_R"
    else
        echo "# SPDK's client is not installed ($SPDK_RPC); plexctl sends SPDK's parameters" >&2
        rpc bdev_nvme_attach_controller "{\"name\": \"Nvme1\", \"trtype\": \"rdma\", \"adrfam\": \"ipv4\",
            \"traddr\": \"$RXE_ADDR\", \"trsvcid\": \"$PORT_R\", \"subnqn\": \"$NQN_R\"}"
    fi
}
if names=$(attach_rdma 2>&1) && grep -q Nvme1n1 <<<"$names"; then
    pass "bdev_nvme_attach_controller -t rdma to nvmet-rdma -> Nvme1n1"
else
    printf '%s\n' "$names" | tail -n 5 | sed 's/^/# /'
    tail -n 10 "$WORK/plexd.log" | sed 's/^/# /'
    fail "bdev_nvme_attach_controller -t rdma to nvmet-rdma" "no Nvme1n1"
fi
check "plexd re-exports Nvme1n1 (RDMA-backed) on 127.0.0.1:$PORT_P" reexport Nvme1n1
perf "randrw 4 KiB through plexd -> RDMA -> nvmet (--verify)" -w randrw -M 50 -o 4096 -q 8 -t 3 --size 2097152
perf "randrw 128 KiB through plexd -> RDMA -> nvmet (--verify)" -w randrw -M 50 -o 131072 -q 4 -t 3 --size 8388608
# Larger than one RDMA command carries (128 KiB): bdev_nvme splits it.
perf "write and read 1 MiB through plexd -> RDMA -> nvmet (--verify, split in 128 KiB)" \
    -w randrw -M 50 -o 1048576 -q 2 -t 3 --size 8388608
detach_rdma() {
    rpc nvmf_delete_subsystem "{\"nqn\": \"$NQN_P\"}" &&
        rpc bdev_nvme_detach_controller '{"name": "Nvme1"}' && [ "$(rpc bdev_get_bdevs)" = "[]" ]
}
check "remove the re-export and detach the RDMA controller" detach_rdma

if grep -q panicked "$WORK/plexd.log"; then
    grep -B2 -A5 panicked "$WORK/plexd.log" | sed 's/^/# /'
    fail "plexd did not panic" "see log"
else
    pass "plexd did not panic"
fi
kill -TERM "$PLEXD_PID" 2>/dev/null && wait "$PLEXD_PID" 2>/dev/null
PLEXD_PID=
finish
