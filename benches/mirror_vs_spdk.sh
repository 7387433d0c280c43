#!/usr/bin/env bash
# The mirror's cost, side by side with SPDK's raid1 in one run.
#
# Writes: the target on core 0 exports a bdev over NVMe/TCP on loopback; plexperf on core 1
# drives 4 KiB random writes at QD32 (IOPS) and QD1 (mean latency), SECONDS each:
#   - SPDK nvmf_tgt: one malloc; raid1 over two mallocs (bdev_raid_create -r raid1)
#   - plexd: one malloc; a mirror over two local mallocs (SPDK raid1's shape); a mirror over a
#     local malloc and a remote one (a second plexd on core 1, attached with bdev_nvme): the
#     product's shape, whose remote leg shares core 1 with plexperf (so it sleeps when idle,
#     --idle-poll-us 1; the figure is still the shared core's, not the mirror's).
# Resync (plexd): a full copy to an added plex vs `dd` (O_DIRECT, 1 MiB) of the same bytes
# between the same kind of files (ext4 under build/, which the uring bdev opens O_DIRECT), and a
# partial resync after 1 % of the regions were written while a plex was away vs a full resync.
#
# Usage: benches/mirror_vs_spdk.sh [SECONDS (default 5)]
# Needs release builds; SPDK's rows need ../shared/spdk/bin/nvmf_tgt. Run on a quiet machine.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The release binaries with LTO: scripts/test.sh leaves them built without it.
cargo build --release --workspace --bins -q --manifest-path "$repo/Cargo.toml"
# shellcheck source=../tests/guest/lib.sh
. "$repo/tests/guest/lib.sh"
secs=${1:-5}
PLEXCTL=$repo/build/release/plexctl
plexd=$repo/build/release/plexd
plexperf=$repo/build/release/plexperf
tgt=$(spdk_bin nvmf_tgt) || tgt=
spdk_rpc_install
[ -n "$tgt" ] && spdk_prepare 1024
work=$(mktemp -d /tmp/mirror-bench.XXXXXX)
quiet="$(uptime | sed 's/.*load average/load average/') before the run"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null || true
    [ -n "$tgt" ] && spdk_restore
    rm -rf "$work"
}
trap cleanup EXIT
nqn=nqn.2026-12.io.plexstor:mirror-bench
rnqn=nqn.2026-12.io.plexstor:mirror-bench-remote
MB=256

# daemon KIND NAME CORES [PLEXD OPTIONS]: nvmf_tgt or plexd; sets SOCK.
daemon() {
    SOCK=$work/$2.sock
    rm -f "$SOCK"
    if [ "$1" = spdk ]; then
        "$tgt" -m "$3" -s 1024 -r "$SOCK" >"$work/$2.log" 2>&1 &
    else
        "$plexd" -m "$3" -r "$SOCK" "${@:4}" >"$work/$2.log" 2>&1 &
    fi
    pids+=($!)
    wait_until 30 "$SPDK_RPC" -s "$SOCK" spdk_get_version >/dev/null 2>&1
}
s_rpc() { "$SPDK_RPC" -s "$SOCK" "$@" >/dev/null; }
stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null || true
    pids=()
}

export_bdev() { # BDEV PORT [NQN]
    local n=${3:-$nqn}
    s_rpc nvmf_create_transport -t TCP 2>/dev/null || true
    s_rpc nvmf_create_subsystem "$n" -a
    s_rpc nvmf_subsystem_add_ns "$n" "$1"
    s_rpc nvmf_subsystem_add_listener "$n" -t tcp -a 127.0.0.1 -s "$2" -f ipv4
}

# setup KIND SHAPE: start the target(s) and export the bdev under test on $port.
setup() {
    port=$(free_tcp_port)
    daemon "$1" a 0x1
    s_rpc bdev_malloc_create -b M0 $MB 512
    case $2 in
    single) export_bdev M0 "$port" ;;
    pair)
        s_rpc bdev_malloc_create -b M1 $MB 512
        if [ "$1" = spdk ]; then
            s_rpc bdev_raid_create -n R0 -r raid1 -b "M0 M1"
            export_bdev R0 "$port"
        else
            rpc bdev_mirror_create '{"name": "R0", "plexes": ["M0", "M1"]}' >/dev/null
            export_bdev R0 "$port"
        fi
        ;;
    remote)
        local asock=$SOCK rport
        rport=$(free_tcp_port)
        # It shares core 1 with plexperf, which spins. With plexd's default idle policy (poll
        # 1 ms after the last work) neither ever yields, and each waits out the other's
        # scheduler slices: 14 K IOPS and 2.1 ms at QD1 (mirror-20261205-1152.md). Sleeping
        # as soon as it is idle, it runs when its work arrives: 167 K and 84 us in the same run.
        daemon plexd b 0x2 --idle-poll-us 1
        s_rpc bdev_malloc_create -b M1 $MB 512
        export_bdev M1 "$rport" "$rnqn"
        SOCK=$asock
        s_rpc bdev_nvme_attach_controller -b B -t tcp -a 127.0.0.1 -s "$rport" -f ipv4 -n "$rnqn"
        rpc bdev_mirror_create '{"name": "R0", "plexes": ["M0", "Bn1"]}' >/dev/null
        export_bdev R0 "$port"
        ;;
    esac
}

# perf QD FIELD: one plexperf run on core 1; prints the field of its total.
perf() {
    "$plexperf" -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$port subnqn:$nqn" \
        -c 0x2 -q "$1" -o 4096 -w randwrite -t "$secs" --warmup 1 --json >"$work/r.json"
    python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["total"]; print(t["iops"] if sys.argv[2] == "iops" else t["latency_us"]["avg_us"])' "$work/r.json" "$2"
}

declare -A iops lat
for kind in spdk plexd; do
    [ "$kind" = spdk ] && [ -z "$tgt" ] && continue
    shapes="single pair"
    [ "$kind" = plexd ] && shapes="single pair remote"
    for shape in $shapes; do
        setup "$kind" "$shape"
        iops[$kind.$shape]=$(perf 32 iops)
        lat[$kind.$shape]=$(perf 1 lat)
        stop_all
    done
done

echo "# Mirror write cost, SPDK nvmf_tgt (v26.05) and plexd side by side"
echo
echo "4 KiB random writes over NVMe/TCP loopback, target on core 0, plexperf on core 1, ${secs} s per run."
echo "Quiet: nothing else ran (no build, no helper); $quiet."
echo
echo "| target | bdev | QD32 IOPS | vs its single malloc | QD1 mean latency (µs) |"
echo "|---|---|---:|---:|---:|"
row() { # KIND SHAPE LABEL
    [ -n "${iops[$1.$2]:-}" ] || return 0
    python3 -c 'import sys; k, l, i, s, lat = sys.argv[1:]; print(f"| {k} | {l} | {float(i):,.0f} | {float(i)/float(s):.2f}x | {float(lat):.1f} |")' \
        "$1" "$3" "${iops[$1.$2]}" "${iops[$1.single]}" "${lat[$1.$2]}"
}
row spdk single "malloc"
row spdk pair "raid1 over 2 mallocs"
row plexd single "malloc"
row plexd pair "mirror over 2 mallocs"
row plexd remote "mirror: local malloc + remote malloc (2nd plexd on core 1, sleeping when idle)"

# ---- resync: a full copy against dd, a partial one against a full one ----------------------
shm=$(mktemp -d "$repo/build/mirror-bench.XXXXXX")
trap 'cleanup; rm -rf "$shm"' EXIT
for f in a b c; do truncate -s ${MB}M "$shm/$f.img"; done
dd if=/dev/urandom of="$shm/a.img" bs=1M count=$MB conv=notrunc status=none
t0=$(date +%s.%N)
dd if="$shm/a.img" of="$shm/c.img" bs=1M iflag=direct oflag=direct conv=notrunc status=none
t1=$(date +%s.%N)
dd_mibs=$(python3 -c "print($MB / ($t1 - $t0))")

daemon plexd a 0x1
for f in a b; do rpc bdev_uring_create "{\"name\": \"$f\", \"filename\": \"$shm/$f.img\", \"block_size\": 512}" >/dev/null; done
rpc bdev_mirror_create '{"name": "R0", "plexes": ["a"]}' >/dev/null
rpc bdev_mirror_add_plex '{"name": "R0", "bdev": "b"}' >/dev/null
last() { rpc bdev_mirror_get_mirrors '{"name": "R0"}' | python3 -c "import json,sys; m=json.load(sys.stdin)[0]; r=m['plexes'][1]['last_resync']; print($1 if r else '')"; }
wait_until 120 test -n "$(last 1)" || true
full=$(last "f\"{r['bytes_copied']} {r['duration_ms']} {r['regions']}\"")
read -r full_bytes full_ms full_regions <<<"$full"
stop_all
resync_mibs=$(python3 -c "print($full_bytes / 1048576 / ($full_ms / 1000))")

# Partial: the mirror is reassembled with plex b missing, 1 % of the regions are written,
# then b's bdev comes back (the examine step hands it to the mirror).
daemon plexd a 0x1
rpc bdev_uring_create "{\"name\": \"a\", \"filename\": \"$shm/a.img\", \"block_size\": 512}" >/dev/null
rpc bdev_mirror_create '{"name": "R0", "plexes": ["a", "b"], "allow_degraded": true}' >/dev/null
rpc bdev_mirror_set_options '{"name": "R0", "bitmap_clear_interval_ms": 3600000}' >/dev/null
port=$(free_tcp_port)
export_bdev R0 "$port"
# 1 % of the regions: sequential writes over the first that many MiB.
n=$(( (full_regions + 99) / 100 ))
"$plexperf" -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$port subnqn:$nqn" -c 0x2 -q 4 \
    -o 65536 -w write -t 1 --warmup 0 --size $((n * 1048576)) >/dev/null
rpc bdev_uring_create "{\"name\": \"b\", \"filename\": \"$shm/b.img\", \"block_size\": 512}" >/dev/null
wait_until 60 test -n "$(last 1)" || true
part=$(last "f\"{r['bytes_copied']} {r['duration_ms']} {r['regions']}\"")
read -r part_bytes part_ms part_regions <<<"$part"
stop_all

echo
echo "## Resync (plexd, ${MB} MiB file plexes on ext4, O_DIRECT, 1 MiB regions)"
echo
echo "| copy | regions | bytes | time | rate |"
echo "|---|---:|---:|---:|---:|"
python3 - "$MB" "$t0" "$t1" "$full_bytes" "$full_ms" "$full_regions" "$part_bytes" "$part_ms" "$part_regions" <<'EOF'
import sys
mb, t0, t1, fb, fms, fr, pb, pms, pr = sys.argv[1:]
dd_s = float(t1) - float(t0)
print(f"| dd of the same bytes (bs=1M, O_DIRECT) | – | {int(mb) << 20:,} | {dd_s * 1000:.0f} ms | {int(mb) / dd_s:,.0f} MiB/s |")
print(f"| full resync (added plex) | {fr} | {int(fb):,} | {fms} ms | {int(fb) / 1048576 / (int(fms) / 1000):,.0f} MiB/s |")
print(f"| partial resync (1 % of regions written while away) | {pr} | {int(pb):,} | {pms} ms | – |")
print()
print(f"full resync ÷ dd: {int(fb) / 1048576 / (int(fms) / 1000) / (int(mb) / dd_s):.2f} (target ≥ 0.8); "
      f"partial ÷ full time: {int(pms) / max(int(fms), 1) * 100:.1f} % (target ≤ 3 %)")
EOF
