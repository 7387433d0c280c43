#!/usr/bin/env bash
# QoS side by side in one run: the same malloc bdev, the same bdev_set_qos_limit (set with
# spdk-rpc on both), exported over NVMe/TCP by SPDK's nvmf_tgt and by plexd in turn, each on
# core 0, driven by the same host (plexperf on core 1) for SECONDS. Prints one table: the limit,
# what each target achieved, and each one's error.
#
# Usage: benches/qos_vs_spdk.sh [SECONDS (default 10)]
# Needs ../shared/spdk/bin/nvmf_tgt, release builds, and a quiet machine.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The release binaries with LTO: scripts/test.sh leaves them built without it.
cargo build --release --workspace --bins -q --manifest-path "$repo/Cargo.toml"
# shellcheck source=../tests/guest/lib.sh
. "$repo/tests/guest/lib.sh"
secs=${1:-10}
tgt=$(spdk_bin nvmf_tgt) || { echo "no nvmf_tgt in $SPDK_BIN_DIR: nothing to compare with" >&2; exit 2; }
spdk_rpc_install
spdk_prepare 1024
work=$(mktemp -d /tmp/qos-vs-spdk.XXXXXX)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    spdk_restore
    rm -rf "$work"
}
trap cleanup EXIT
nqn=nqn.2026-12.io.plexstor:qos

# start KIND: nvmf_tgt or plexd on core 0 with a 64 MiB malloc bdev Q0 exported on $port.
start() {
    local sock=$work/$1.sock
    rm -f "$sock"
    if [ "$1" = spdk ]; then
        "$tgt" -m 0x1 -s 512 -r "$sock" >"$work/spdk.log" 2>&1 &
    else
        "$repo/build/release/plexd" -m 0x1 -r "$sock" >"$work/plexd.log" 2>&1 &
    fi
    pid=$!
    SOCK=$sock
    wait_until 30 "$SPDK_RPC" -s "$sock" spdk_get_version >/dev/null 2>&1
    port=$(free_tcp_port)
    for c in "bdev_malloc_create -b Q0 64 512" "nvmf_create_transport -t TCP" \
        "nvmf_create_subsystem $nqn -a" "nvmf_subsystem_add_ns $nqn Q0" \
        "nvmf_subsystem_add_listener $nqn -t tcp -a 127.0.0.1 -s $port -f ipv4"; do
        # shellcheck disable=SC2086 # one argument a word
        "$SPDK_RPC" -s "$sock" $c >/dev/null
    done
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

# measure KIND LIMIT-ARGS WORKLOAD SIZE QD FIELD: the achieved rate (IOPS, or MiB/s).
measure() {
    local kind=$1 limit=$2 workload=$3 size=$4 qd=$5 field=$6
    start "$kind"
    # shellcheck disable=SC2086
    "$SPDK_RPC" -s "$SOCK" bdev_set_qos_limit Q0 $limit >/dev/null
    "$repo/build/release/plexperf" -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$port subnqn:$nqn" \
        -c 0x2 -q "$qd" -o "$size" -w "$workload" -t "$secs" --warmup 1 --json >"$work/r.json"
    stop
    python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["total"][sys.argv[2]], 1))' \
        "$work/r.json" "$field"
}

echo "# QoS, nvmf_tgt (SPDK v26.05) and plexd side by side, ${secs} s per run, plexperf on core 1"
echo
echo "| limit | workload | SPDK nvmf_tgt | error | plexd | error |"
echo "|---|---|---:|---:|---:|---:|"
while read -r name value args workload size qd field unit; do
    s=$(measure spdk "$args" "$workload" "$size" "$qd" "$field")
    p=$(measure plexd "$args" "$workload" "$size" "$qd" "$field")
    python3 -c '
import sys
name, value, unit, s, p, wl = sys.argv[1:]
v = float(value)
err = lambda x: f"{(float(x) - v) / v * 100:+.2f} %"
print(f"| {name}={value} | {wl} | {float(s):,.1f} {unit} | {err(s)} | {float(p):,.1f} {unit} | {err(p)} |")' \
        "$name" "$value" "$unit" "$s" "$p" "$workload $((size / 1024)) KiB QD$qd"
done <<'EOF'
rw_ios_per_sec 20000 --rw-ios-per-sec=20000 randread 4096 32 iops IOPS
w_mbytes_per_sec 64 --w-mbytes-per-sec=64 randwrite 131072 8 mib_s MiB/s
r_mbytes_per_sec 64 --r-mbytes-per-sec=64 randread 131072 8 mib_s MiB/s
EOF
