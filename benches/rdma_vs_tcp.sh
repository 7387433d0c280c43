#!/usr/bin/env bash
# NVMe/RDMA against NVMe/TCP through the same target in the same run: our host (plexperf)
# against the kernel's nvmet, which exports one RAM disk on a TCP port and on an RDMA port
# (soft-RoCE, rxe0), inside the test guest.
#
# Relative only: soft-RoCE is RDMA done in software by the guest's kernel, and the guest is
# emulated, so absolute numbers are the emulator's. What compares is CPU per I/O in the same
# guest: each run reads /proc/stat around it (every CPU's busy time: host, target and the
# soft-RoCE or TCP stack alike) and plexperf's own user + system time. plexperf polls
# without sleeping, so its time is its wall time and says little; the rest of the busy time
# (the target, the network stack or soft-RoCE, interrupts) is the column to read. Rounds interleave the
# transports (TCP, RDMA, then again) and medians are reported, so a slow moment of the host
# hits both columns alike. plexd's own NVMe/RDMA target is not built yet; when it is, it
# joins this table.
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
NVMET_RAMDISK_MIB=1024 nvmet_export_ramdisk "$NQN" "$PORT" "$RXE_ADDR" tcp
portdir=$(nvmet_port "$RXE_ADDR" "$PORT" rdma)
load_modules nvmet-rdma
ln -s "$NVMET_CFS/subsystems/$NQN" "$portdir/subsystems/$NQN"
trap 'nvmet_clear >/dev/null 2>&1 || true' EXIT

# run TRTYPE WORKLOAD IO_SIZE QD: prints "IOPS BUSY_NS_PER_IO NOT_PLEXPERF_NS_PER_IO"
run() {
    python3 - "$repo/build/release/plexperf" "$1" "$RXE_ADDR" "$PORT" "$NQN" "$2" "$3" "$4" "$secs" <<'EOF'
import json, os, resource, subprocess, sys
perf, tr, addr, port, nqn, w, o, q, secs = sys.argv[1:]
def busy_ticks():
    f = open("/proc/stat").readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq = map(int, f[:7])
    return user + nice + system + irq + softirq
hz = os.sysconf("SC_CLK_TCK")
before = resource.getrusage(resource.RUSAGE_CHILDREN)
t0 = busy_ticks()
out = subprocess.run([perf, "-r", f"trtype:{tr} adrfam:IPv4 traddr:{addr} trsvcid:{port} subnqn:{nqn}",
                      "-w", w, "-o", o, "-q", q, "-t", secs, "--warmup", "1", "--json",
                      "--size", str(1 << 30)], capture_output=True, text=True, check=True).stdout
t1 = busy_ticks()
after = resource.getrusage(resource.RUSAGE_CHILDREN)
r = json.loads(out)["total"]
ios = r["reads"] + r["writes"]
host = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
# The warm-up second's I/Os are not counted but its CPU is; scale busy time to the measured
# seconds.
scale = float(secs) / (float(secs) + 1)
busy = (t1 - t0) / hz
print(int(r["iops"]), int(busy * scale * 1e9 / max(ios, 1)), int(max(busy - host, 0) * scale * 1e9 / max(ios, 1)))
EOF
}

workloads=("randread 4096 32" "read 131072 8" "write 131072 8")
declare -A res
for r in $(seq 1 "$rounds"); do
    for wl in "${workloads[@]}"; do
        for tr in TCP RDMA; do
            # shellcheck disable=SC2086 # the workload is three words
            v=$(run "$tr" $wl)
            res["$wl|$tr"]+="$v;"
            echo "round $r: $tr $wl: $v" >&2
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
    echo "# NVMe/RDMA vs NVMe/TCP: plexperf against the kernel's nvmet, one RAM disk, same run"
    echo
    echo "$(date -u '+%F %T') UTC, in the test guest (emulated, 2 vCPUs); RDMA is soft-RoCE (rdma_rxe)."
    echo "${secs} s per run after 1 s of warm-up, $rounds interleaved rounds, medians. Host load average"
    echo "when the guest started: ${HOST_LOAD:-?}. Relative only: every number is the emulator's."
    echo
    echo "busy ns/IO: all of the guest's CPUs per I/O (plexperf, which polls without sleeping, the"
    echo "target, the network stack or soft-RoCE); target+stack ns/IO: the same without plexperf's time."
    echo
    echo "| workload | TCP IOPS | RDMA IOPS | RDMA ÷ TCP | TCP busy ns/IO | RDMA busy ns/IO | TCP target+stack ns/IO | RDMA target+stack ns/IO |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for wl in "${workloads[@]}"; do
        t=${res["$wl|TCP"]}; d=${res["$wl|RDMA"]}
        ti=$(median_of "$t" 1); di=$(median_of "$d" 1)
        echo "| $wl | $ti | $di | $(awk -v a="$di" -v b="$ti" 'BEGIN { printf "%.2f", a / b }') | $(median_of "$t" 2) | $(median_of "$d" 2) | $(median_of "$t" 3) | $(median_of "$d" 3) |"
    done
    echo
    echo "Every run (IOPS, busy ns/IO, target+stack ns/IO):"
    echo
    for wl in "${workloads[@]}"; do
        echo "- $wl: TCP ${res["$wl|TCP"]} RDMA ${res["$wl|RDMA"]}"
    done
} | tee "$report"
