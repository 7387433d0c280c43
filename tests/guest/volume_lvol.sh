#!/usr/bin/env bash
# A mirrored volume on lvols, grown, snapshotted and cloned while the Linux kernel's host has
# it mounted.
#
# Run on the host: boots the test guest (scripts/guest/run.sh) and runs itself inside. In the
# guest, two plexd nodes on loopback each keep a volume store on a sparse file; `plexctl
# volume` makes a 2-plex volume there, the kernel connects to its owner and mounts xfs. Then:
#   - `volume resize`: both plexes grow, then the mirror; the kernel sees the size on the same
#     connection and xfs_growfs gives the filesystem the room;
#   - `volume snapshot` while a writer writes: the writer never fails (writes only wait);
#   - `volume clone`: a new mirrored volume of the snapshot, which the kernel mounts (xfs
#     replays its log: the snapshot is crash-consistent) and where every file written before
#     the snapshot reads back and the one written after is absent;
#   - deletes: the source waits for its clone; afterwards both stores are empty.
#
#   tests/guest/volume_lvol.sh          (needs: cargo build --release)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 19
REPO=$GUEST_LIB_REPO

PLEXD=${PLEXD:-$REPO/build/release/plexd}
if ! in_guest; then
    for b in "$PLEXD" "$PLEXCTL"; do
        [ -x "$b" ] || { echo "build first: cargo build --release ($b)" >&2; exit 2; }
    done
    reexec_in_guest --timeout 300 --env PLEXD="$PLEXD" --env PLEXCTL="$PLEXCTL" -- "$0" "$@"
fi
WORK=$(mktemp -d /tmp/volume-lvol.XXXXXX)
NODES_FILE=$WORK/nodes.json
NODES=(n1 n2)
declare -A PID PORT
MNT=$WORK/mnt
CMNT=$WORK/clone
VOL=v1
CLONE=v1-copy
NQN=nqn.2024-01.io.plexstor:vol-$VOL
CNQN=nqn.2024-01.io.plexstor:vol-$CLONE
# xfs wants 300 MiB at least.
SIZE_MIB=320
GROWN_MIB=640

cleanup() {
    umount "$MNT" "$CMNT" 2>/dev/null
    nvme disconnect -n "$NQN" >/dev/null 2>&1
    nvme disconnect -n "$CNQN" >/dev/null 2>&1
    for n in "${NODES[@]}"; do
        [ -n "${PID[$n]:-}" ] && kill -KILL "${PID[$n]}" 2>/dev/null
    done
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

on() { local SOCK=$WORK/$1.sock; shift; rpc "$@"; }
vol() { "$PLEXCTL" volume -f "$NODES_FILE" "$@" 2>>"$WORK/plexctl.log"; }
note() { echo "# $*"; }
say_log() { tail -n 5 "$WORK/plexctl.log" | tr '\n' '|'; }

load_modules nvme nvme-tcp xfs || bail modules "cannot load nvme-tcp/xfs"
start_nodes() {
    local n
    for n in "${NODES[@]}"; do
        PORT[$n]=$(free_tcp_port)
        SOCK=$WORK/$n.sock "$PLEXD" -m 0x1 --no-pin -r "$WORK/$n.sock" --idle-poll-us 200 \
            >>"$WORK/$n.log" 2>&1 &
        PID[$n]=$!
        SOCK=$WORK/$n.sock wait_for_plexd "${PID[$n]}" || return 1
        truncate -s 2G "$WORK/$n-disk.img" &&
            on "$n" bdev_uring_create "{\"name\": \"disk\", \"filename\": \"$WORK/$n-disk.img\", \"block_size\": 512}" >/dev/null &&
            on "$n" bdev_lvol_create_lvstore '{"bdev_name": "disk", "lvs_name": "lvs"}' >/dev/null || return 1
    done
    python3 - "$NODES_FILE" "$WORK" "${PORT[n1]}" "${PORT[n2]}" <<'EOF'
import json, sys
path, work, p1, p2 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
nodes = [{"name": n, "rpc_socket": f"{work}/{n}.sock", "storage_addr": "127.0.0.1", "port": p,
          "data_dir": f"{work}/{n}-data"} for n, p in (("n1", p1), ("n2", p2))]
json.dump({"backend": "lvol", "nodes": nodes}, open(path, "w"), indent=2)
EOF
}
# Not under check: that runs its command in a subshell, and the PIDs and ports are needed here.
if start_nodes >>"$WORK/setup.log" 2>&1; then
    pass "two plexd nodes, each with a volume store on a sparse 2 GiB file"
else
    tail -n 15 "$WORK/setup.log" | sed 's/^/# /'
    bail "two plexd nodes, each with a volume store" "see above"
fi

check "volume create $VOL: 2 plexes, owned by n1" \
    vol create "$VOL" --size ${SIZE_MIB}M --mirror-count 2 --nodes n1,n2 || finish
check "the kernel connects to n1" nvme_connect_tcp "$NQN" 127.0.0.1 "${PORT[n1]}" || finish
DEV=$(wait_for_nvme_dev "$NQN" 1 30) || bail "block device appears" "no device for $NQN"
pass "block device appears ($DEV)"
BLK=${DEV#/dev/}
sectors_are() { [ "$(cat "/sys/block/$BLK/size")" = "$1" ]; }

mount_xfs() {
    mkdir -p "$MNT" && mkfs.xfs -f -q "$DEV" && mount "$DEV" "$MNT" &&
        head -c 8M /dev/urandom >"$WORK/a.bin" && cp "$WORK/a.bin" "$MNT/" && sync
}
check "mkfs.xfs, mount, write file a (8 MiB)" mount_xfs || finish
fs_bytes() { df -B1 --output=size "$1" | tail -n1 | tr -d ' '; }
before=$(fs_bytes "$MNT")

# ---- grow ------------------------------------------------------------------------------------
check "volume resize to $GROWN_MIB MiB while mounted" vol resize "$VOL" --size ${GROWN_MIB}M ||
    note "$(say_log)"
if wait_until 30 sectors_are $((GROWN_MIB * 2048)); then
    pass "the kernel sees $GROWN_MIB MiB without reconnecting"
else
    fail "the kernel sees $GROWN_MIB MiB without reconnecting" \
        "/sys/block/$BLK/size is $(cat "/sys/block/$BLK/size") sectors"
fi
check "xfs_growfs" xfs_growfs "$MNT"
grown=$(fs_bytes "$MNT")
if [ "$grown" -gt $((before + (GROWN_MIB - SIZE_MIB) * 1048576 * 9 / 10)) ]; then
    pass "df shows the new capacity ($before -> $grown bytes)"
else
    fail "df shows the new capacity" "$before -> $grown bytes"
fi

# ---- snapshot under a writer -------------------------------------------------------------------
head -c 8M /dev/urandom >"$WORK/b.bin"
cp "$WORK/b.bin" "$MNT/" && sync
# The writer: 48 MiB of O_DIRECT writes, one MiB at a time, across the snapshot.
dd if=/dev/urandom of="$MNT/during.bin" bs=1M count=48 oflag=direct status=none &
WRITER=$!
sleep 0.3
check "volume snapshot $VOL s1 while a writer writes" vol snapshot "$VOL" s1 || note "$(say_log)"
note "plexctl: $(grep -o 'writes were held.*' "$WORK/plexctl.log")"
if wait "$WRITER"; then pass "the writer never failed (writes only waited)"; else
    fail "the writer never failed" "dd exited $?"
fi
head -c 8M /dev/urandom >"$WORK/c.bin"
cp "$WORK/c.bin" "$MNT/" && sync

# ---- clone -----------------------------------------------------------------------------------
check "volume clone $VOL s1 $CLONE" vol clone "$VOL" s1 "$CLONE" || { note "$(say_log)"; finish; }
owner_of_clone=$(vol list --json | python3 -c "import json,sys; print([v['owner'] for v in json.load(sys.stdin) if v['name'] == '$CLONE'][0])")
check "the kernel connects to the clone (on $owner_of_clone)" \
    nvme_connect_tcp "$CNQN" 127.0.0.1 "${PORT[$owner_of_clone]}" || finish
CDEV=$(wait_for_nvme_dev "$CNQN" 1 30) || bail "clone device appears" "no device for $CNQN"
# The same filesystem UUID as the source's, mounted beside it: nouuid. Its log is replayed.
check "the clone mounts beside the source ($CDEV; xfs recovers its log as after a crash)" \
    bash -c "mkdir -p '$CMNT' && mount -o nouuid '$CDEV' '$CMNT'" || finish
check "files a and b, written before the snapshot, read back from the clone" \
    bash -c "cmp '$WORK/a.bin' '$CMNT/a.bin' && cmp '$WORK/b.bin' '$CMNT/b.bin'"
if [ -e "$CMNT/c.bin" ]; then fail "file c, written after the snapshot, is not in the clone" "it is"; else
    pass "file c, written after the snapshot, is not in the clone"
fi
cloned=$(fs_bytes "$CMNT")
[ "$cloned" = "$grown" ] && pass "the clone has the grown size ($cloned bytes)" ||
    fail "the clone has the grown size" "$cloned, the source $grown"

# ---- teardown --------------------------------------------------------------------------------
umount "$MNT" "$CMNT"
nvme disconnect -n "$NQN" >/dev/null
nvme disconnect -n "$CNQN" >/dev/null
if vol delete "$VOL"; then fail "the source is not deleted before its clone" "it was"; else
    pass "the source is not deleted before its clone ($(tail -n1 "$WORK/plexctl.log"))"
fi
stores_empty() {
    local n
    for n in "${NODES[@]}"; do
        on "$n" bdev_lvol_get_lvstores '{}' | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]
sys.exit(0 if s["free_clusters"] == s["total_data_clusters"] else 1)' || return 1
        [ "$(on "$n" bdev_lvol_get_lvols '{}')" = "[]" ] || return 1
    done
}
delete_both() { vol delete "$CLONE" && vol delete "$VOL" && stores_empty; }
check "delete the clone, then the source: both stores are empty" delete_both
finish
