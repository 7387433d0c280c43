#!/usr/bin/env bash
# A bdev module's own cost, no network: our bdevperf and SPDK's bdevperf side by side, in one
# run, on the same JSON configs, both on core 0 (-m 0x1). Two suites:
#
#   malloc (default): a malloc bdev of 1 Mi 512-byte blocks, as benches/nvmf_tcp.py uses:
#     4 KiB randread QD32, 4 KiB randwrite QD32, 4 KiB randread QD1, 128 KiB write QD32
#   lvol: a volume store (4 MiB clusters) on an 8 GiB malloc bdev, against that bdev raw:
#     4 KiB randwrite QD32 on the raw bdev and on a fully allocated (thick) lvol; 4 KiB
#     sequential write QD32 for 1 s on the raw bdev and on a fresh thin lvol, whose every
#     cluster is allocated during the run (the first pass; a run that wrote more than the
#     lvol holds is flagged, as it went on over allocated clusters).
#   mirror: plexd's mirror (bdev_mirror_create) and SPDK's raid1 (bdev_raid_create -r raid1),
#     each over two malloc bdevs of 1 Mi 512-byte blocks, against one such malloc bdev:
#     4 KiB randwrite QD32 on the single malloc; on the mirror 4 KiB randwrite QD32, randread
#     QD32, randwrite QD1 and 128 KiB write QD32. The two programs' configs differ only in
#     the method that joins the two mallocs (SPDK has no bdev_mirror_create).
#   nvme: each program's NVMe/TCP host as a bdev (bdev_nvme_attach_controller, both with
#     their defaults), the way a mirror reaches a plex on another node, to one plexd target on
#     core 1 exporting a null bdev over 127.0.0.1: 4 KiB randread and randwrite QD32, randread
#     QD1, randwrite QD128, 128 KiB read and write QD32. Then a mirror of a local malloc and
#     a plex on the target (a fresh malloc namespace per run: the mirror fences it), against
#     SPDK's raid1 of the same two: 4 KiB randwrite and randread QD32, randwrite QD1; a write
#     run fails unless the remote plex took its writes. The target is the same for both: the
#     report gives its busy share of core 1 in each row, to tell where it set the pace.
#
# Each row runs REPS times per program, interleaved (SPDK first on odd repetitions, ours first
# on even ones), TIME seconds each; the table gives the medians and ours ÷ SPDK. The report,
# with the load average at start and end, the busiest processes at start, the share of each
# core the hypervisor stole during the run, and the exact commands, goes to
# benches/reports/<bdevperf|lvol|mirror_bdevperf|nvme_bdevperf>-<date>.md (or --out).
#
# Usage: benches/bdevperf_vs_spdk.sh [--suite malloc|lvol|mirror|nvme] [--time SECONDS (5)]
#                                    [--reps N (3)]
#                                    [--out FILE]
# Needs build/release/bdevperf (cargo build --release -p plexd --bin bdevperf). SPDK's rows
# need ../shared/spdk/bin/bdevperf, root and hugepages (reserved here through
# scripts/setup.sh, and given back at the end); without it, ours runs alone and the report
# says so. Run on a quiet machine: nothing else may use core 0 (nor core 1, for nvme).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The release binaries with LTO: scripts/test.sh leaves them built without it.
cargo build --release --workspace --bins -q --manifest-path "$repo/Cargo.toml"
# shellcheck source=../tests/guest/lib.sh
. "$repo/tests/guest/lib.sh"

secs=5
reps=3
out=
suite=malloc
while [ $# -gt 0 ]; do
    case $1 in
    --time) secs=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --suite) suite=$2; shift 2 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $secs =~ ^[0-9]+$ && $secs -gt 0 ]] || { echo "--time takes whole seconds (SPDK's -t does)" >&2; exit 2; }
[[ $reps =~ ^[0-9]+$ && $reps -gt 0 ]] || { echo "--reps takes a count" >&2; exit 2; }
case $suite in malloc | lvol | mirror | nvme) ;; *) echo "--suite is malloc, lvol, mirror or nvme" >&2; exit 2 ;; esac

ours=$repo/build/release/bdevperf
[ -x "$ours" ] || { echo "no $ours: cargo build --release -p plexd --bin bdevperf" >&2; exit 2; }
stamp=$(date +%Y%m%d-%H%M)
report_name=bdevperf
[ "$suite" = lvol ] && report_name=lvol
[ "$suite" = mirror ] && report_name=mirror_bdevperf
[ "$suite" = nvme ] && report_name=nvme_bdevperf
out=${out:-$repo/benches/reports/$report_name-$stamp.md}
work=$(mktemp -d /tmp/bdevperf-vs-spdk.XXXXXX)

# SPDK's memory: the disks (512 MiB, two for a mirror, one for nvme's mirror rows, or 8 GiB
# for lvols), its I/O pools and DPDK's own.
SPDK_MEM_MB=1024
[ "$suite" = lvol ] && SPDK_MEM_MB=9216
[ "$suite" = mirror ] && SPDK_MEM_MB=1536
# Hugepages reserved beyond SPDK's own: the nvme suite's target holds a remote plex's 512 MiB
# disk while SPDK's bdevperf runs.
TARGET_MEM_MB=0
[ "$suite" = nvme ] && TARGET_MEM_MB=640
spdk=$(spdk_bin bdevperf) || spdk=
spdk_note=
spdk_mem=(-s "$SPDK_MEM_MB")
hugepages_ok=
target_pid=
cleanup() {
    if [ -n "$target_pid" ]; then
        kill "$target_pid" 2>/dev/null || true
        wait "$target_pid" 2>/dev/null || true
    fi
    [ -n "$spdk" ] && spdk_restore
    rm -rf "$work"
}
trap cleanup EXIT
if [ -n "$spdk" ]; then
    if spdk_prepare $((SPDK_MEM_MB + TARGET_MEM_MB)) >&2; then
        hugepages_ok=1
    else
        # Both then run on ordinary memory: ours falls back to it by itself.
        spdk_mem=(--no-huge -s "$SPDK_MEM_MB")
        spdk_note="Hugepages could not be reserved: SPDK ran with --no-huge and ours on ordinary memory."
    fi
    spdk_version=$("$spdk" -v 2>&1 | grep -o 'SPDK v[^ ]*' | head -n1 || true)
else
    spdk_note="SPDK's bdevperf is absent (no $SPDK_BIN_DIR/bdevperf): ours ran alone."
fi

# The nvme suite's target: one plexd, its reactor and every thread on core 1, exporting a null
# bdev (4 GiB of 512 B blocks) with the transport options of benches/nvmf_tcp.py.
TARGET_NQN=nqn.2026-11.io.plexstor:bdevperf-nvme
target_sock=$work/target.sock
tcall() { "$repo/build/release/plexctl" -s "$target_sock" call --compact "$@"; }
# target_busy: the target reactor's busy ticks so far and its tick rate.
target_busy() {
    tcall framework_get_reactors | python3 -c 'import json, sys
v = json.load(sys.stdin)
print(sum(r["busy"] for r in v["reactors"]), v["tick_rate"])'
}
# target_export NQN BDEV: a subsystem NQN open to any host, with BDEV as its namespace,
# listening on the target's port.
target_export() {
    tcall nvmf_create_subsystem "{\"nqn\": \"$1\", \"allow_any_host\": true}" &&
        tcall nvmf_subsystem_add_ns "{\"nqn\": \"$1\", \"namespace\": {\"bdev_name\": \"$2\"}}" &&
        tcall nvmf_subsystem_add_listener "{\"nqn\": \"$1\", \"listen_address\": {\"trtype\": \"TCP\",
            \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$target_port\"}}"
}
if [ "$suite" = nvme ]; then
    target_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    taskset -c 1 "$repo/build/release/plexd" -m 0x2 -r "$target_sock" --idle-poll-us 1000 \
        >"$work/target.log" 2>&1 &
    target_pid=$!
    for _ in $(seq 100); do [ -S "$target_sock" ] && break; sleep 0.1; done
    {
        tcall bdev_null_create '{"name": "null0", "num_blocks": 8388608, "block_size": 512}' &&
        tcall nvmf_create_transport '{"trtype": "TCP", "max_queue_depth": 128,
            "in_capsule_data_size": 8192, "max_io_size": 131072, "io_unit_size": 131072}' &&
        target_export "$TARGET_NQN" null0
    } >/dev/null || { echo "the nvme suite's target did not start:" >&2; tail -n 20 "$work/target.log" >&2; exit 1; }
fi

# write_config NAME [NQN]: the JSON config NAME, as $work/NAME.json; where SPDK's must differ
# (a mirror), SPDK's as $work/NAME.spdk.json. NQN: the target subsystem an nvme config attaches
# to (the suite's null one by default).
LVOL_BASE_BLOCKS=16777216 # 8 GiB: more than a second of sequential writes
LVOL_MIB=8000            # about all the store holds, less its metadata
write_config() {
    python3 - "$1" "$LVOL_BASE_BLOCKS" "$LVOL_MIB" "$work" "${target_port:-}" "${2:-$TARGET_NQN}" <<'EOF'
import json, sys
name, blocks, mib, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
port, nqn = sys.argv[5], sys.argv[6]
def write(path, config):
    with open(path, "w") as f:
        print(json.dumps({"subsystems": [{"subsystem": "bdev", "config": config}]}, indent=1), file=f)
def malloc(n, blocks):
    return {"method": "bdev_malloc_create", "params": {"name": n, "num_blocks": blocks, "block_size": 512}}
attach = {"method": "bdev_nvme_attach_controller", "params": {
    "name": "Nvme0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
    "trsvcid": port, "subnqn": nqn}}
if name == "nvme":
    write(f"{work}/{name}.json", [attach])
    sys.exit()
def mirrors(pair, plexes):
    """Ours joins the two with bdev_mirror_create, SPDK's (which has no mirror) with raid1."""
    write(f"{work}/{name}.json", pair + [{"method": "bdev_mirror_create", "params": {
        "name": "Mirror0", "plexes": plexes}}])
    write(f"{work}/{name}.spdk.json", pair + [{"method": "bdev_raid_create", "params": {
        "name": "Mirror0", "raid_level": "raid1", "base_bdevs": plexes, "strip_size_kb": 0}}])
    sys.exit()
if name == "mirror_remote":
    mirrors([malloc("Malloc0", 1048576), attach], ["Malloc0", "Nvme0n1"])
if name == "mirror":
    mirrors([malloc("Malloc0", 1048576), malloc("Malloc1", 1048576)], ["Malloc0", "Malloc1"])
config = [malloc("Malloc0", 1048576 if name == "malloc" else blocks)]
if name in ("thick", "thin"):
    config += [
        {"method": "bdev_lvol_create_lvstore", "params": {"bdev_name": "Malloc0", "lvs_name": "lvs"}},
        {"method": "bdev_lvol_create", "params": {"lvol_name": "vol", "size_in_mib": mib,
                                                  "thin_provision": name == "thin", "lvs_name": "lvs"}},
    ]
write(f"{work}/{name}.json", config)
EOF
}

# config workload io_size qd seconds
if [ "$suite" = malloc ]; then
    rows=(
        "malloc randread 4096 32 $secs"
        "malloc randwrite 4096 32 $secs"
        "malloc randread 4096 1 $secs"
        "malloc write 131072 32 $secs"
    )
elif [ "$suite" = nvme ]; then
    rows=(
        "nvme randread 4096 32 $secs"
        "nvme randwrite 4096 32 $secs"
        "nvme randread 4096 1 $secs"
        "nvme randwrite 4096 128 $secs"
        "nvme read 131072 32 $secs"
        "nvme write 131072 32 $secs"
        "mirror_remote randwrite 4096 32 $secs"
        "mirror_remote randread 4096 32 $secs"
        "mirror_remote randwrite 4096 1 $secs"
    )
elif [ "$suite" = mirror ]; then
    rows=(
        "malloc randwrite 4096 32 $secs"
        "mirror randwrite 4096 32 $secs"
        "mirror randread 4096 32 $secs"
        "mirror randwrite 4096 1 $secs"
        "mirror write 131072 32 $secs"
    )
else
    rows=(
        "base randwrite 4096 32 $secs"
        "thick randwrite 4096 32 $secs"
        "base write 4096 32 1"
        "thin write 4096 32 1"
    )
fi
configs=$(printf '%s\n' "${rows[@]}" | cut -d' ' -f1 | sort -u | grep -vx mirror_remote || true)
for c in $configs; do write_config "$c"; done

# A mirror's remote plex is fenced by it (a reservation) and carries its superblock: each run
# gets a fresh malloc namespace of its own on the target, made here and deleted after the run.
remote_runs=0
remote_plex_up() {
    remote_runs=$((remote_runs + 1))
    remote_nqn=$TARGET_NQN-plex$remote_runs
    remote_bdev=plex$remote_runs
    {
        tcall bdev_malloc_create "{\"name\": \"$remote_bdev\", \"num_blocks\": 1048576, \"block_size\": 512}" &&
        target_export "$remote_nqn" "$remote_bdev"
    } >/dev/null || { echo "the target refused remote plex $remote_bdev:" >&2; tail -n 5 "$work/target.log" >&2; exit 1; }
    write_config mirror_remote "$remote_nqn"
}
remote_plex_down() {
    tcall nvmf_delete_subsystem "{\"nqn\": \"$remote_nqn\"}" >/dev/null
    tcall bdev_malloc_delete "{\"name\": \"$remote_bdev\"}" >/dev/null
}

# command PROG CONFIG WORKLOAD SIZE QD SECONDS: the command line, one word per line.
command_for() {
    if [ "$1" = spdk ]; then
        local config=$work/$2.json
        [ -e "$work/$2.spdk.json" ] && config=$work/$2.spdk.json
        printf '%s\n' "$spdk" -m 0x1 "${spdk_mem[@]}" -r "$work/spdk.sock" --json "$config" \
            -q "$5" -o "$4" -w "$3" -t "$6"
    else
        printf '%s\n' "$ours" -m 0x1 -c "$work/$2.json" -q "$5" -o "$4" -w "$3" -t "$6"
    fi
}

# measure PROG ROW REP: one run; appends "prog row rep iops mib_s avg_us [target_busy]" to
# results, the last for the nvme suite: the target's busy ticks over the run's length.
results=$work/results.txt
measure() {
    local prog=$1 row=$2 rep=$3 log=$work/$1-$2-$3.log cmd summary rc=0 busy0= busy=
    local remote=
    [ "${rows[$row]%% *}" = mirror_remote ] && remote=1 && remote_plex_up
    # shellcheck disable=SC2086 # one row field a word
    mapfile -t cmd < <(command_for "$prog" ${rows[$row]})
    [ "$suite" = nvme ] && busy0=$(target_busy)
    (cd "$work" && timeout $((secs + 180)) "${cmd[@]}") >"$log" 2>&1 || rc=$?
    if [ -n "$busy0" ]; then
        # shellcheck disable=SC2086 # two numbers each
        busy=$(python3 -c 'import sys; b0, _, b1, hz, secs = map(float, sys.argv[1:]); print(f"{(b1 - b0) / hz / secs:.3f}")' \
            $busy0 $(target_busy) "$secs")
    fi
    # Both print SPDK's table: "Total : <IOPS> <MiB/s> <Fail/s> <TO/s> <avg> <min> <max>",
    # SPDK's with carriage returns in it.
    summary=$(tr '\r' '\n' <"$log" | awk '$1 == "Total" && $2 == ":" { print $3, $4, $5, $7 }' | tail -n1)
    read -r iops mibs fails avg <<<"$summary"
    if [ "$rc" != 0 ] || [ -z "$iops" ] || [ "$fails" != "0.00" ]; then
        echo "$prog failed on row $row (exit $rc, Total: ${summary:-none}):" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    if [ -n "$remote" ]; then
        # A raid that dropped its remote leg would still finish every write, on one leg: the
        # remote plex must have taken (nearly) all of them.
        local remote_writes
        remote_writes=$(tcall bdev_get_iostat "{\"name\": \"$remote_bdev\"}" |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["bdevs"][0]["num_write_ops"])')
        remote_plex_down
        if [[ ${rows[$row]} == *write* ]] && ! python3 -c 'import sys; sys.exit(float(sys.argv[1]) < 0.9 * float(sys.argv[2]) * float(sys.argv[3]))' \
            "$remote_writes" "$iops" "$secs"; then
            echo "$prog on row $row: the remote plex took $remote_writes writes of about $iops x $secs s: not mirrored" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
    fi
    echo "$prog $row $rep $iops $mibs $avg $busy" >>"$results"
    printf '  %-5s %-32s rep %d: %12s IOPS %9s us\n' "$prog" "${rows[$row]}" "$rep" "$iops" "$avg" >&2
}

# cpu_ticks: "core all-ticks steal-ticks" per core from /proc/stat. Steal is the time the
# hypervisor ran others while this guest's core wanted to run: a quiet guest on a busy host
# still loses its cycles, and every figure of the run is then low and spread.
cpu_ticks() { awk '/^cpu[0-9]/ { t = 0; for (i = 2; i <= 9; i++) t += $i; print substr($1, 4), t, $9 }' /proc/stat; }
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
ticks_start=$(cpu_ticks)
busiest=$(ps -eo pcpu,comm --sort=-pcpu | sed -n 2,6p | awk '{ printf "%s %s%%; ", $2, $1 }')
hugepages=$(awk '/^HugePages_(Total|Free)/ { printf "%s %s ", $1, $2 }' /proc/meminfo)
echo "bdevperf_vs_spdk: ${#rows[@]} rows x $reps reps x ${secs} s, load average $load_start" >&2
: >"$results"
for ((rep = 1; rep <= reps; rep++)); do
    for ((row = 0; row < ${#rows[@]}; row++)); do
        order="spdk ours"
        [ $((rep % 2)) = 0 ] && order="ours spdk"
        for prog in $order; do
            [ "$prog" = spdk ] && [ -z "$spdk" ] && continue
            measure "$prog" "$row" "$rep"
        done
    done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
steal=$(printf '%s\n%s\n' "$ticks_start" "$(cpu_ticks)" | awk '
    $1 in t { printf "%score %s %.1f %%", sep, $1, 100 * ($3 - s[$1]) / (($2 - t[$1]) > 0 ? $2 - t[$1] : 1); sep = ", "; next }
    { t[$1] = $2; s[$1] = $3 }')

{
    if [ "$suite" = malloc ]; then
        echo "# bdevperf: plexd's bdev layer and SPDK's, no network, side by side"
        echo
        echo "Malloc bdev (1,048,576 blocks of 512 B), both programs on core 0 (\`-m 0x1\`), ${secs} s per"
    elif [ "$suite" = nvme ]; then
        echo "# bdevperf over NVMe/TCP: plexd's bdev_nvme and SPDK's, to the same target, side by side"
        echo
        echo "Each program attaches one NVMe/TCP controller (\`bdev_nvme_attach_controller\`, its own"
        echo "defaults otherwise) to one plexd target on core 1 (\`-m 0x2\`, every thread pinned there)"
        echo "exporting a null bdev of 8,388,608 blocks of 512 B over 127.0.0.1, and runs on its"
        echo "namespace: the path a mirror takes to a plex on another node. The \"local + remote plex\" rows run"
        echo "plexd's mirror (ours) or SPDK's raid1 over a local malloc bdev (1,048,576 blocks of 512 B)"
        echo "and such a namespace on the target, a fresh malloc of the same size for each run (the"
        echo "mirror fences its plexes with a reservation and writes its superblock there); each write"
        echo "run was checked to have reached the remote plex. The programs on core 0 (\`-m 0x1\`),"
        echo "${secs} s per"
    elif [ "$suite" = mirror ]; then
        echo "# bdevperf on a mirror: plexd's mirror and SPDK's raid1, no network, side by side"
        echo
        echo "plexd's mirror (\`bdev_mirror_create\`: superblocks and a write-intent bitmap of 1 MiB"
        echo "regions on its plexes) and SPDK's raid1 (\`bdev_raid_create -r raid1\`, no superblock), each"
        echo "over two malloc bdevs of 1,048,576 blocks of 512 B. \`malloc\` rows run on one such bdev"
        echo "alone. Both programs on core 0 (\`-m 0x1\`), ${secs} s per"
    else
        echo "# bdevperf on lvols: plexd's volume store and SPDK's, against their base, side by side"
        echo
        echo "A store with 4 MiB clusters on a malloc bdev of $LVOL_BASE_BLOCKS blocks of 512 B (8 GiB); a"
        echo "$LVOL_MIB MiB lvol on it, thick (every cluster allocated when it is made) or thin (none"
        echo "until written). \`base\` rows run on the malloc bdev alone. Both programs on core 0"
        echo "(\`-m 0x1\`), ${secs} s per randwrite run and 1 s per sequential one (the thin lvol's"
        echo "first pass: each of its clusters is allocated by the run's writes),"
    fi
    echo "run, $reps repetition(s) per row, interleaved, medians. $(date '+%Y-%m-%d %H:%M %Z')."
    echo
    echo "- plexstor: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes)'), \`build/release/bdevperf\`"
    echo "- SPDK: ${spdk_version:-absent}${spdk:+, \`$spdk\`}"
    echo "- machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
    echo "- load average (1, 5, 15 min): $load_start at start, $load_end at end"
    echo "- stolen by the hypervisor during the run: ${steal:-not reported}"
    echo "- busiest processes at start (ps %CPU, lifetime averages): ${busiest% }"
    echo "- hugepages for the run: $hugepages${hugepages_ok:+(grown by scripts/setup.sh, given back after)}"
    fallbacks=$(cat "$work"/ours-*.log | grep -c "NOT ENOUGH HUGEPAGES" || true)
    [ "$fallbacks" = 0 ] || echo "- ours found too few hugepages in $fallbacks run(s) and used ordinary locked memory there"
    if [ -n "$spdk_note" ]; then echo "- $spdk_note"; fi
    echo
    python3 - "$results" "$LVOL_MIB" "${rows[@]}" <<'EOF'
import statistics, sys
path, lvol_mib, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {}
for line in open(path):
    prog, row, rep, iops, mibs, avg, *busy = line.split()
    runs.setdefault((prog, int(row)), []).append(
        (float(iops), float(mibs), float(avg), float(busy[0]) if busy else None))
def med(prog, row, i):
    v = runs.get((prog, row))
    return statistics.median(x[i] for x in v) if v else None
def label(spec):
    cfg, wl, size, qd, secs = spec.split()
    what = f"{int(size) // 1024} KiB {wl} QD{qd}"
    names = {"mirror_remote": "mirror, local + remote plex"}
    return what if cfg == "malloc" else f"{names.get(cfg, cfg)}: {what}"
def wrapped(prog, r):
    """A thin first pass that wrote more than the lvol: it went on over allocated clusters."""
    cfg, wl, size, qd, secs = rows[r].split()
    v = runs.get((prog, r))
    return bool(v) and cfg == "thin" and max(x[0] for x in v) * int(size) * int(secs) > lvol_mib << 20
def fmt(v, spec):
    return "–" if v is None else format(v, spec)
def within(prog, cfg, base, wl, *shape):
    """A program's median IOPS on config `cfg` over its own on `base`, same workload."""
    def find(c):
        key = [c, wl, *shape]
        return next(i for i, x in enumerate(rows) if x.split()[:len(key)] == key)
    a, b = med(prog, find(cfg), 0), med(prog, find(base), 0)
    return "–" if a is None or b is None else f"{a / b:.2f}"
# The nvme suite's target's busy share of its core: had it neared 100 %, the target, not the
# host, would have set the pace.
target = any(x[3] is not None for v in runs.values() for x in v)
def busy(prog, r):
    v = runs.get((prog, r))
    return "–" if not v or v[0][3] is None else f"{100 * statistics.median(x[3] for x in v):.0f} %"
extra = " target busy, SPDK's run | target busy, ours |" if target else ""
print("| workload | SPDK bdevperf IOPS | ours IOPS | ours ÷ SPDK | SPDK avg latency (µs) | ours avg latency (µs) |" + extra)
print("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if target else ""))
for r, spec in enumerate(rows):
    s, o = med("spdk", r, 0), med("ours", r, 0)
    ratio = "–" if s is None or o is None else f"{o / s:.2f}"
    print(f"| {label(spec)} | {fmt(s, ',.0f')} | {fmt(o, ',.0f')} | {ratio} "
          f"| {fmt(med('spdk', r, 2), '.2f')} | {fmt(med('ours', r, 2), '.2f')} |"
          + (f" {busy('spdk', r)} | {busy('ours', r)} |" if target else ""))
if target:
    paced = [label(spec) for r, spec in enumerate(rows)
             if any(x[3] is not None and x[3] >= 0.9 for p in ("spdk", "ours") for x in runs.get((p, r), []))]
    print()
    print("The target's busy share is its reactor's busy ticks over the run's length. Where it "
          "reached 90 % in a run, the target more than the host set that run's pace, and ours ÷ SPDK "
          "understates the faster host: " + ("; ".join(paced) if paced else "no row") + ".")
if any(r.split()[0] == "mirror" for r in rows):
    print()
    print("Each program's mirror against its own single malloc, 4 KiB randwrite QD32, same run")
    print("(medians): what writing every block twice costs each.")
    print()
    pair = [within(p, "mirror", "malloc", "randwrite", "4096", "32") for p in ("spdk", "ours")]
    print("| | SPDK (raid1) | ours (mirror) |")
    print("|---|---:|---:|")
    print(f"| mirror ÷ single malloc | {pair[0]} | {pair[1]} |")
if any(r.split()[0] == "thick" for r in rows):
    print()
    print("Each program's lvol against its own base, same run (medians):")
    print()
    print("| | SPDK | ours | target (ours) |")
    print("|---|---:|---:|---:|")
    print(f"| allocated (thick) lvol ÷ base, 4 KiB randwrite QD32 | {within('spdk', 'thick', 'base', 'randwrite')} "
          f"| {within('ours', 'thick', 'base', 'randwrite')} | ≥ 0.95 |")
    print(f"| first-write allocation (thin, first pass) ÷ base, 4 KiB write QD32 | {within('spdk', 'thin', 'base', 'write')} "
          f"| {within('ours', 'thin', 'base', 'write')} | ≥ 0.50 |")
    for r in range(len(rows)):
        for prog in ("spdk", "ours"):
            if wrapped(prog, r):
                print()
                print(f"Note: a {prog} run of row '{label(rows[r])}' wrote more than the lvol holds, "
                      "so part of it ran over allocated clusters: an upper bound.")
print()
print("Every run (IOPS):")
print()
for r, spec in enumerate(rows):
    for prog in ("spdk", "ours"):
        if (prog, r) in runs:
            print(f"- {label(spec)}, {'SPDK' if prog == 'spdk' else 'ours'}: " + ", ".join(f"{x[0]:,.0f}" for x in runs[(prog, r)]))
EOF
    echo
    echo "Average latency is from submission until the program handles the completion (both"
    echo "resubmit from there), so at a fixed depth it is QD ÷ IOPS in both columns."
    echo
    echo "## Commands"
    echo
    echo "Run as \`benches/bdevperf_vs_spdk.sh --suite $suite --time $secs --reps $reps\`. The configs:"
    for f in $(cd "$work" && ls -- *.json); do
        echo
        echo "\`$f\`:"
        echo
        echo '```json'
        cat "$work/$f"
        echo '```'
    done
    echo
    echo '```sh'
    if [ "$suite" = nvme ]; then
        echo "# the target, and its configuration by JSON-RPC:"
        echo "taskset -c 1 $repo/build/release/plexd -m 0x2 -r $target_sock --idle-poll-us 1000"
        echo "#   bdev_null_create null0, 8388608 blocks of 512 B; nvmf_create_transport TCP (max_queue_depth 128,"
        echo "#   in_capsule_data_size 8192, max_io_size 131072, io_unit_size 131072); subsystem $TARGET_NQN"
        echo "#   with null0, listening on 127.0.0.1:$target_port"
    fi
    for ((row = 0; row < ${#rows[@]}; row++)); do
        for prog in spdk ours; do
            [ "$prog" = spdk ] && [ -z "$spdk" ] && continue
            # shellcheck disable=SC2086
            command_for "$prog" ${rows[$row]} | paste -sd' '
        done
    done
    echo '```'
} >"$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
echo >&2
echo "report: $out" >&2
