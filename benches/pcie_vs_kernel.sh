#!/usr/bin/env bash
# The userspace PCIe driver against the kernel's nvme driver, on the same emulated controller,
# in one run of the test guest (QEMU's NVMe behind a virtual IOMMU).
#
# Under emulation only the ratios mean anything: every doorbell write and completion is a
# trip through QEMU, so absolute IOPS are those of the emulator, not of an SSD. Rounds are
# interleaved (kernel, ours, SPDK's, then again) and medians reported, so a slow moment of
# the host hits all columns alike.
#
#   fio, io_uring, O_DIRECT on /dev/nvmeXn1     (the kernel's driver)
#   plexperf -r 'trtype:PCIe traddr:BDF'         (ours, through VFIO)
#   spdk_nvme_perf -r 'trtype:PCIe traddr:BDF'   (SPDK's, where ../shared/spdk/bin has it)
#
# and system calls per I/O for fio and plexperf (strace -c -f over a shorter run: the count
# is exact even though strace slows the run). Writes benches/reports/pcie-<date>.md.
#
#   benches/pcie_vs_kernel.sh [SECONDS_PER_RUN] [ROUNDS]      (defaults 10 and 3)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
secs=${1:-10}
rounds=${2:-3}
if [ -z "${PLEXSTOR_GUEST:-}" ]; then
    # The release binaries with LTO: scripts/test.sh leaves them built without it.
    cargo build --release --workspace --bins -q --manifest-path "$repo/Cargo.toml"
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    # The guest writes into a scratch share (run.sh keeps its console log there too); only
    # the report is kept.
    out=$(mktemp -d /tmp/pcie-bench-out.XXXXXX)
    trap 'rm -rf "$out"' EXIT
    "$repo/scripts/guest/run.sh" --nvme --nvme-size 1G --hugepages 512 --timeout 1800 \
        --out "$out" --env HOST_LOAD="$load" -- "$0" "$secs" "$rounds"
    mkdir -p "$repo/benches/reports"
    cp "$out"/pcie-*.md "$repo/benches/reports/"
    exit 0
fi

# shellcheck source=tests/guest/lib.sh
. "$repo/tests/guest/lib.sh"
NQN=nqn.2019-08.org.qemu:plexstor-nvme0
PLEXPERF=$repo/build/release/plexperf
SPDK_PERF=$(spdk_bin spdk_nvme_perf 2>/dev/null || true)
work=$(mktemp -d /tmp/pcie-bench.XXXXXX)
modprobe nvme
dev=$(wait_for_nvme_dev "$NQN" 1 30)
bdf=$(nvme_bdf_of "$NQN")
to_kernel() { PCI_ALLOWED="$bdf" "$repo/scripts/setup.sh" reset >/dev/null 2>&1; dev=$(wait_for_nvme_dev "$NQN" 1 30); }
to_vfio() { PCI_ALLOWED="$bdf" HUGEMEM=1024 "$repo/scripts/setup.sh" >/dev/null 2>&1; }

# Fill the namespace's first GiB once, so reads hit written blocks in every column.
fio --name=fill --filename="$dev" --ioengine=io_uring --direct=1 --rw=write --bs=1M --size=1G \
    --iodepth=8 >/dev/null

fio_iops() { # SECONDS
    fio --name=rr --filename="$dev" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
        --iodepth=32 --size=1G --runtime="$1" --time_based --output-format=json |
        python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'
}
ours_iops() { # SECONDS
    "$PLEXPERF" -r "trtype:PCIe traddr:$bdf" -w randread -o 4096 -q 32 -t "$1" --warmup 1 \
        --size 1073741824 --json 2>/dev/null |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print(int(d["total"]["iops"]))'
}
spdk_iops() { # SECONDS
    "$SPDK_PERF" -r "trtype:PCIe traddr:$bdf" -q 32 -o 4096 -w randread -t "$1" 2>/dev/null |
        awk '/^Total/ { print int($3) }'
}

k=(); o=(); s=()
for r in $(seq 1 "$rounds"); do
    to_kernel; k+=("$(fio_iops "$secs")")
    to_vfio; o+=("$(ours_iops "$secs")")
    if [ -n "$SPDK_PERF" ]; then s+=("$(spdk_iops "$secs" || echo 0)"); fi
    echo "round $r: kernel ${k[-1]}, plexperf ${o[-1]}${SPDK_PERF:+, spdk_nvme_perf ${s[-1]:-?}}" >&2
done

# System calls per I/O, counted over a 3-second run of each.
syscalls_per_io() { # IOPS_SECONDS CMD...: strace's total call count over the I/Os done
    local ios=$1
    shift
    strace -c -f -o "$work/strace" "$@" >/dev/null 2>&1 || true
    awk -v ios="$ios" '/^100.00/ || /total$/ { calls = $4 } END { if (ios > 0) printf "%.2f", calls / ios }' "$work/strace"
}
to_vfio
ours_ios=$(( $(ours_iops 3) * 3 ))
ours_sc=$(syscalls_per_io "$ours_ios" "$PLEXPERF" -r "trtype:PCIe traddr:$bdf" -w randread -o 4096 -q 32 -t 3 --warmup 0 --size 1073741824)
to_kernel
fio_ios=$(( $(fio_iops 3) * 3 ))
fio_sc=$(syscalls_per_io "$fio_ios" fio --name=rr --filename="$dev" --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 --size=1G --runtime=3 --time_based)

median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
mk=$(median "${k[@]}"); mo=$(median "${o[@]}")
ms=$([ ${#s[@]} -gt 0 ] && median "${s[@]}" || echo "")
report=$GUEST_OUT/pcie-$(date +%Y%m%d-%H%M).md
{
    echo "# PCIe: plexperf through VFIO against the kernel's nvme driver (guest, emulated NVMe)"
    echo
    echo "$(date -u '+%F %T') UTC. 4 KiB random reads, QD32, one queue, ${secs} s per run, $rounds interleaved rounds, medians."
    echo "Host load average when the guest started: ${HOST_LOAD:-?}. Under emulation only the ratios mean anything."
    echo
    echo "| | IOPS (median) | rounds | ÷ kernel |"
    echo "|---|---|---|---|"
    echo "| kernel nvme, fio io_uring O_DIRECT | $mk | ${k[*]} | 1.00 |"
    echo "| plexperf over VFIO | $mo | ${o[*]} | $(awk -v a="$mo" -v b="$mk" 'BEGIN { printf "%.2f", a / b }') |"
    if [ -n "$ms" ]; then
        echo "| spdk_nvme_perf over VFIO | $ms | ${s[*]} | $(awk -v a="$ms" -v b="$mk" 'BEGIN { printf "%.2f", a / b }') |"
    else
        echo "| spdk_nvme_perf | not run: no ../shared/spdk/bin/spdk_nvme_perf | | |"
    fi
    echo
    echo "System calls per I/O (strace -c -f over a 3 s run, startup included): plexperf $ours_sc, fio io_uring $fio_sc."
} | tee "$report"
to_kernel
rm -rf "$work"
