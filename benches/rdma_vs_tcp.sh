#!/usr/bin/env bash
# NVMe/RDMA against NVMe/TCP through the same target in the same run, inside the test guest:
# our host (plexperf) against plexd, which exports a malloc bdev over TCP and over RDMA
# (soft-RoCE, rxe0) at once, and against the kernel's nvmet, which exports one RAM disk the
# same way.
#
# Relative only: soft-RoCE is RDMA done in software by the guest's kernel, and the guest is
# emulated, so absolute numbers are the emulator's. What compares is CPU per I/O in the same
# guest: each run reads /proc/stat around it (every CPU's busy time: host, target and the
# soft-RoCE or TCP stack alike) and plexperf's own user + system time. plexperf polls
# without sleeping, so its time is its wall time and says little; the rest of the busy time
# (the target, the network stack or soft-RoCE, interrupts) is the column to read. Rounds interleave the
# transports (TCP, RDMA, then again) and medians are reported, so a slow moment of the host
# hits both columns alike. For plexd, its reactors' busy time (framework_get_reactors: passes
# in which a poller did work) per I/O is the target's own CPU per I/O.
#
#   benches/rdma_vs_tcp.sh [SECONDS_PER_RUN] [ROUNDS]      (defaults 5 and 3)
# Writes benches/reports/rdma_vs_tcp-<date>.md.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
secs=${1:-5}
rounds=${2:-3}
if [ -z "${PLEXSTOR_GUEST:-}" ]; then
    # The release binaries with LTO: scripts/test.sh leaves them built without it.
    cargo build --release --workspace --bins -q --manifest-path "$repo/Cargo.toml"
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    out=$(mktemp -d /tmp/rdma-bench-out.XXXXXX)
    trap 'rm -rf "$out"' EXIT
    "$repo/scripts/guest/run.sh" --mem 3072 --timeout 1800 --out "$out" \
        --env HOST_LOAD="$load" -- "$0" "$secs" "$rounds"
    mkdir -p "$repo/benches/reports"
    cp "$out"/rdma_vs_tcp-*.md "$repo/benches/reports/"
    exit 0
fi

# shellcheck source=tests/guest/lib.sh
. "$repo/tests/guest/lib.sh"
NQN=nqn.2024-01.io.plexstor:rdma-vs-tcp
PORT=4440
rxe_up
SIZE_MIB=256
NVMET_RAMDISK_MIB=$SIZE_MIB nvmet_export_ramdisk "$NQN" "$PORT" "$RXE_ADDR" tcp
portdir=$(nvmet_port "$RXE_ADDR" "$PORT" rdma)
load_modules nvmet-rdma
ln -s "$NVMET_CFS/subsystems/$NQN" "$portdir/subsystems/$NQN"

# plexd on both guest CPUs, the same namespace on TCP and RDMA, one port above nvmet's.
WORK=$(mktemp -d)
SOCK=$WORK/plexd.sock
PLEXD=$repo/build/release/plexd
PLEXD_PORT=$((PORT + 1))
start_plexd
SPDK_PID=
# A frozen process must be let go on before it can die.
stop_spdk() {
    [ -n "$SPDK_PID" ] || return 0
    kill -CONT "$SPDK_PID" 2>/dev/null
    kill -KILL "$SPDK_PID" 2>/dev/null
}
# (stop_plexd's `wait` answers 137 for the killed plexd: not the run's status.)
trap 'stop_plexd -KILL || true; stop_spdk || true; nvmet_clear >/dev/null 2>&1 || true' EXIT
rpc bdev_malloc_create "{\"name\": \"M0\", \"num_blocks\": $((SIZE_MIB * 2048)), \"block_size\": 512}" >/dev/null
rpc nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"allow_any_host\": true}" >/dev/null
rpc nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"M0\"}}" >/dev/null
for tr in TCP RDMA; do
    rpc nvmf_create_transport "{\"trtype\": \"$tr\", \"max_io_size\": 131072}" >/dev/null
    rpc nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"$tr\", \"traddr\": \"$RXE_ADDR\", \"trsvcid\": \"$PLEXD_PORT\"}}" >/dev/null
done

# SPDK's nvmf_tgt beside them, where ../shared/spdk/bin has it: TCP only (that build has no
# RDMA), one core (not plexperf's, which is pinned to CPU 0), no hugepages (the guest has
# none). Frozen (SIGSTOP) except while measured, so its spinning reactor does not take the
# core from the others.
targets=(plexd nvmet)
SPDK_SOCK=$WORK/spdk.sock
SPDK_PORT=$((PORT + 2))
spdk_note="SPDK's nvmf_tgt: not run ($SPDK_BIN_DIR/nvmf_tgt or $SPDK_RPC missing)."
if nvmf_tgt=$(spdk_bin nvmf_tgt) && [ -x "$SPDK_RPC" ]; then
    "$nvmf_tgt" --no-huge -s 1024 -m 0x2 -r "$SPDK_SOCK" >"$WORK/spdk.log" 2>&1 &
    SPDK_PID=$!
    srpc() { "$SPDK_RPC" -s "$SPDK_SOCK" "$@" >/dev/null 2>>"$WORK/spdk.log"; }
    spdk_up() { [ -S "$SPDK_SOCK" ] && srpc spdk_get_version; }
    if wait_until 30 spdk_up && srpc bdev_malloc_create -b M0 "$SIZE_MIB" 512 &&
        srpc nvmf_create_transport -t TCP -i 131072 && srpc nvmf_create_subsystem "$NQN" -a &&
        srpc nvmf_subsystem_add_ns "$NQN" M0 &&
        srpc nvmf_subsystem_add_listener "$NQN" -t tcp -a "$RXE_ADDR" -s "$SPDK_PORT" -f ipv4; then
        targets+=(spdk)
        spdk_note="SPDK: v26.05 nvmf_tgt, a malloc bdev, one reactor on the CPU plexperf does not use (-m 0x2, --no-huge -s 1024),
TCP only: this SPDK build has no RDMA."
    else
        spdk_note="SPDK's nvmf_tgt did not come up: $(tail -n 2 "$WORK/spdk.log" | tr '\n' ' ')"
    fi
    kill -STOP "$SPDK_PID"
fi

# run TARGET TRTYPE WORKLOAD IO_SIZE QD: prints "IOPS BUSY_NS_PER_IO NOT_PLEXPERF_NS_PER_IO
# TARGET_REACTOR_NS_PER_IO" (the last 0 for nvmet, which has no reactors)
run() {
    local port=$PORT
    [ "$1" = plexd ] && port=$PLEXD_PORT
    [ "$1" = spdk ] && { port=$SPDK_PORT; kill -CONT "$SPDK_PID"; }
    python3 - "$repo/build/release/plexperf" "$2" "$RXE_ADDR" "$port" "$NQN" "$3" "$4" "$5" "$secs" \
        "$1" "$PLEXCTL" "$SOCK" "$SIZE_MIB" "$SPDK_RPC" "$SPDK_SOCK" <<'EOF'
import json, os, resource, subprocess, sys
perf, tr, addr, port, nqn, w, o, q, secs, target, plexctl, sock, size_mib, spdk_rpc, spdk_sock = sys.argv[1:]
def reactor_busy_s():
    if target == "plexd":
        cmd = [plexctl, "-s", sock, "call", "--compact", "framework_get_reactors"]
    elif target == "spdk":
        cmd = [spdk_rpc, "-s", spdk_sock, "framework_get_reactors"]
    else:
        return 0.0
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return sum(x["busy"] for x in r["reactors"]) / r["tick_rate"]
def busy_ticks():
    f = open("/proc/stat").readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq = map(int, f[:7])
    return user + nice + system + irq + softirq
hz = os.sysconf("SC_CLK_TCK")
before = resource.getrusage(resource.RUSAGE_CHILDREN)
t0 = busy_ticks()
r0 = reactor_busy_s()
out = subprocess.run([perf, "-r", f"trtype:{tr} adrfam:IPv4 traddr:{addr} trsvcid:{port} subnqn:{nqn}",
                      "-w", w, "-o", o, "-q", q, "-t", secs, "--warmup", "1", "--json",
                      "--size", str(int(size_mib) << 20)], capture_output=True, text=True, check=True).stdout
t1 = busy_ticks()
r1 = reactor_busy_s()
after = resource.getrusage(resource.RUSAGE_CHILDREN)
r = json.loads(out)["total"]
ios = r["reads"] + r["writes"]
host = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
# The warm-up second's I/Os are not counted but its CPU is; scale busy time to the measured
# seconds.
scale = float(secs) / (float(secs) + 1)
busy = (t1 - t0) / hz
print(int(r["iops"]), int(busy * scale * 1e9 / max(ios, 1)), int(max(busy - host, 0) * scale * 1e9 / max(ios, 1)),
      int((r1 - r0) * scale * 1e9 / max(ios, 1)))
EOF
    [ "$1" = spdk ] && kill -STOP "$SPDK_PID"
    return 0
}

workloads=("randread 4096 32" "read 131072 8" "write 131072 8")
declare -A res
for r in $(seq 1 "$rounds"); do
    for wl in "${workloads[@]}"; do
        for tg in "${targets[@]}"; do
            for tr in TCP RDMA; do
                [ "$tg" = spdk ] && [ "$tr" = RDMA ] && continue
                # shellcheck disable=SC2086 # the workload is three words
                v=$(run "$tg" "$tr" $wl)
                res["$tg|$wl|$tr"]+="$v;"
                echo "round $r: $tg $tr $wl: $v" >&2
            done
        done
    done
done

# median_of LIST FIELD: the median of field FIELD (1-based) of "a b c;a b c;…"
median_of() {
    tr ';' '\n' <<<"$1" | grep . | awk -v f="$2" '{ print $f }' | sort -n |
        awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
}
report=$GUEST_OUT/rdma_vs_tcp-$(date +%Y%m%d-%H%M).md
{
    echo "# NVMe/RDMA vs NVMe/TCP: plexperf against plexd, the kernel's nvmet and SPDK, same run"
    echo
    echo "$(date -u '+%F %T') UTC, in the test guest (emulated, 2 vCPUs); RDMA is soft-RoCE (rdma_rxe)."
    echo "${secs} s per run after 1 s of warm-up, $rounds interleaved rounds, medians. Host load average"
    echo "when the guest started: ${HOST_LOAD:-?}. Relative only: every number is the emulator's."
    echo
    echo "plexd: a malloc bdev, 2 reactors; nvmet: a $SIZE_MIB MiB RAM disk. $spdk_note"
    echo "busy ns/IO: all of the guest's CPUs per I/O (plexperf, which polls without sleeping, the"
    echo "target, the network stack or soft-RoCE); target+stack ns/IO: the same without plexperf's time"
    echo "(for plexd this includes its reactors' polling); plexd reactor ns/IO: plexd's reactors' busy"
    echo "time (passes in which a poller did work) per I/O, the target's own CPU per I/O; for SPDK the"
    echo "same from its framework_get_reactors."
    echo
    echo "| target | workload | TCP IOPS | RDMA IOPS | RDMA ÷ TCP | TCP target+stack ns/IO | RDMA target+stack ns/IO | TCP reactor ns/IO | RDMA reactor ns/IO |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    for tg in "${targets[@]}"; do
        for wl in "${workloads[@]}"; do
            t=${res["$tg|$wl|TCP"]}; d=${res["$tg|$wl|RDMA"]:-}
            ti=$(median_of "$t" 1); di=–; ratio=–; ds=–; reactor_t=–; reactor_d=–
            [ "$tg" != nvmet ] && reactor_t=$(median_of "$t" 4)
            if [ -n "$d" ]; then
                di=$(median_of "$d" 1); ds=$(median_of "$d" 3)
                ratio=$(awk -v a="$di" -v b="$ti" 'BEGIN { printf "%.2f", a / b }')
                [ "$tg" != nvmet ] && reactor_d=$(median_of "$d" 4)
            fi
            echo "| $tg | $wl | $ti | $di | $ratio | $(median_of "$t" 3) | $ds | $reactor_t | $reactor_d |"
        done
    done
    echo
    echo "Every run (IOPS, busy ns/IO, target+stack ns/IO, plexd reactor ns/IO):"
    echo
    for tg in "${targets[@]}"; do
        for wl in "${workloads[@]}"; do
            echo "- $tg $wl: TCP ${res["$tg|$wl|TCP"]} RDMA ${res["$tg|$wl|RDMA"]:-–}"
        done
    done
} | tee "$report"
