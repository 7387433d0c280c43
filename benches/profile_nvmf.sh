#!/usr/bin/env bash
# Where plexd's time goes per NVMe/TCP I/O: runs plexd under callgrind (instruction counts,
# which do not depend on what else the machine is doing) while plexperf drives one workload,
# then prints instructions per I/O and the functions that cost the most.
#
# Usage: benches/profile_nvmf.sh [randread|randwrite|read|write] [IO_SIZE] [QD]
# Needs valgrind (apt-get install valgrind) and release builds.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The release binaries with LTO: scripts/test.sh leaves them built without it.
cargo build --release --workspace --bins -q --manifest-path "$repo/Cargo.toml"
workload=${1:-randread}
size=${2:-4096}
qd=${3:-32}
nqn=nqn.2026-11.io.plexstor:profile
work=$(mktemp -d /tmp/plexprofile.XXXXXX)
sock=$work/plexd.sock
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ctl() { "$repo/build/release/plexctl" -s "$sock" call --compact "$@" >/dev/null; }

valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
    "$repo/build/release/plexd" -m 0x1 -r "$sock" >"$work/plexd.log" 2>&1 &
plexd=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.2; done
ctl bdev_null_create '{"name": "bench", "num_blocks": 8388608, "block_size": 512}'
ctl nvmf_create_transport '{"trtype": "TCP"}'
ctl nvmf_create_subsystem "{\"nqn\": \"$nqn\", \"allow_any_host\": true}"
ctl nvmf_subsystem_add_ns "{\"nqn\": \"$nqn\", \"namespace\": {\"bdev_name\": \"bench\"}}"
ctl nvmf_subsystem_add_listener "{\"nqn\": \"$nqn\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$port\"}}"
"$repo/build/release/plexperf" -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$port subnqn:$nqn" \
    -q "$qd" -o "$size" -w "$workload" -t 5 --warmup 0 -c 0x2 >/dev/null
ios=$("$repo/build/release/plexctl" -s "$sock" call --compact bdev_get_iostat |
    python3 -c 'import json,sys; b=json.load(sys.stdin)["bdevs"][0]; print(b["num_read_ops"] + b["num_write_ops"])')
kill -INT "$plexd"
wait "$plexd" || true
total=$(callgrind_annotate "$work/callgrind.out" 2>/dev/null | sed -n 's/^\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
echo "$workload ${size} B QD$qd: $ios I/Os, $total instructions in plexd, $((total / ios)) per I/O"
echo "(the whole process: idle polling, RPC and start-up included)"
callgrind_annotate "$work/callgrind.out" 2>/dev/null | sed -n '/file:function/,$p' | sed -n 3,25p | cut -c1-160
echo "profile: $work/callgrind.out (callgrind_annotate --inclusive=yes for call trees)"
