#!/usr/bin/env bash
# Online growth of an lvol under a mounted filesystem, seen by the Linux kernel's own host.
#
# Run on the host: boots the test guest (scripts/guest/run.sh) and runs itself inside. In the
# guest, plexd carves a thin lvol out of a store on a malloc bdev and exports it over NVMe/TCP;
# the kernel connects, makes and mounts xfs, and then bdev_lvol_resize grows the lvol. The
# kernel must see the new size on the same connection (plexd raises the namespace attribute
# changed event; the kernel rescans), and xfs_growfs must give the filesystem the new room with
# the file written before the growth still whole. Then the kernel discards the whole device:
# the lvol gives back every cluster, and the blocks read zeroes.
#
#   tests/guest/lvol_growth.sh          (needs: cargo build --release -p plexd)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 16
REPO=$GUEST_LIB_REPO

PLEXD=${PLEXD:-$REPO/build/release/plexd}
if ! in_guest; then
    [ -x "$PLEXD" ] || { echo "build plexd first: cargo build --release -p plexd" >&2; exit 2; }
    reexec_in_guest --timeout 300 --env PLEXD="$PLEXD" -- "$0" "$@"
fi
NQN=nqn.2024-01.io.plexstor:lvol-growth
ADDR=127.0.0.1
PORT=$(free_tcp_port)
WORK=$(mktemp -d /tmp/lvol-growth.XXXXXX)
SOCK=$WORK/plexd.sock
MNT=$WORK/mnt
PLEXD_PID=
# xfs wants 300 MiB at least; the lvol is thin, so growing past the store's size is allowed.
SIZE_MIB=320
GROWN_MIB=640

cleanup() {
    umount "$MNT" 2>/dev/null
    nvme disconnect -n "$NQN" >/dev/null 2>&1
    if [ -n "$PLEXD_PID" ]; then
        kill -KILL "$PLEXD_PID" 2>/dev/null
        wait "$PLEXD_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

load_modules nvme nvme-tcp xfs || bail modules "cannot load nvme-tcp/xfs"
"$PLEXD" -m 0x3 --no-pin -r "$SOCK" --idle-poll-us 200 >>"$WORK/plexd.log" 2>&1 &
PLEXD_PID=$!
if wait_for_plexd "$PLEXD_PID"; then pass "plexd starts"; else
    tail -n 20 "$WORK/plexd.log" | sed 's/^/# /'
    bail "plexd starts" "see log above"
fi

configure() {
    rpc bdev_malloc_create '{"name": "M0", "num_blocks": 786432, "block_size": 512}' &&
        rpc bdev_lvol_create_lvstore '{"bdev_name": "M0", "lvs_name": "lvs"}' &&
        rpc bdev_lvol_create "{\"lvol_name\": \"vol\", \"size_in_mib\": $SIZE_MIB, \"thin_provision\": true, \"lvs_name\": \"lvs\"}" &&
        rpc nvmf_create_transport '{"trtype": "TCP"}' &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"serial_number\": \"PLEXLVOL1\", \"allow_any_host\": true}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"lvs/vol\"}}" &&
        rpc nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"$ADDR\", \"trsvcid\": \"$PORT\"}}"
}
check "a thin $SIZE_MIB MiB lvol on a 384 MiB store, exported" configure || finish

check "nvme connect" nvme_connect_tcp "$NQN" "$ADDR" "$PORT" || finish
DEV=$(wait_for_nvme_dev "$NQN" 1 30) || bail "block device appears" "no device for $NQN"
pass "block device appears ($DEV)"
BLK=${DEV#/dev/}
CTRL_DIR=$(readlink -f "/sys/block/$BLK/device")

sectors_are() { [ "$(cat "/sys/block/$BLK/size")" = "$1" ]; }
check "the kernel sees $SIZE_MIB MiB" sectors_are $((SIZE_MIB * 2048))

mount_xfs() {
    mkdir -p "$MNT" && mkfs.xfs -f -q "$DEV" && mount "$DEV" "$MNT" &&
        head -c 8M /dev/urandom >"$WORK/before.bin" && cp "$WORK/before.bin" "$MNT/" && sync
}
check "mkfs.xfs, mount, write 8 MiB" mount_xfs || finish
fs_bytes() { df -B1 --output=size "$MNT" | tail -n1 | tr -d ' '; }
before=$(fs_bytes)

check "bdev_lvol_resize to $GROWN_MIB MiB while mounted" \
    rpc bdev_lvol_resize "{\"name\": \"lvs/vol\", \"size_in_mib\": $GROWN_MIB}"
# The event reaches the kernel through an outstanding Asynchronous Event Request; the kernel
# then reads the changed namespace list and revalidates, all on the existing connection.
if wait_until 30 sectors_are $((GROWN_MIB * 2048)); then
    pass "the kernel sees $GROWN_MIB MiB without reconnecting"
else
    fail "the kernel sees $GROWN_MIB MiB without reconnecting" \
        "/sys/block/$BLK/size is $(cat "/sys/block/$BLK/size") sectors"
fi
if [ "$(readlink -f "/sys/block/$BLK/device")" = "$CTRL_DIR" ] && [ -b "$DEV" ]; then
    pass "same device, same controller ($DEV)"
else
    fail "same device, same controller" "now $(readlink -f "/sys/block/$BLK/device" 2>&1)"
fi
dmesg | grep -q "$BLK: detected capacity change from $((SIZE_MIB * 2048)) to $((GROWN_MIB * 2048))" &&
    pass "the kernel logged the change" ||
    fail "the kernel logged the change" "$(dmesg | grep -i nvme | tail -n 3 | tr '\n' '|')"

check "xfs_growfs" xfs_growfs "$MNT"
after=$(fs_bytes)
# xfs keeps some of the device for its log and headers; the new room is nearly all of it.
if [ "$after" -gt $((before + (GROWN_MIB - SIZE_MIB) * 1048576 * 9 / 10)) ]; then
    pass "df shows the new capacity ($before -> $after bytes)"
else
    fail "df shows the new capacity" "$before -> $after bytes"
fi
same_file() { cmp "$WORK/before.bin" "$MNT/before.bin" && umount "$MNT" && mount "$DEV" "$MNT" &&
    cmp "$WORK/before.bin" "$MNT/before.bin"; }
check "the file written before the growth reads back, also after a remount" same_file

allocated() {
    rpc bdev_lvol_get_lvols '{"lvs_name": "lvs"}' |
        python3 -c 'import json, sys; print([l["num_allocated_clusters"] for l in json.load(sys.stdin) if l["name"] == "vol"][0])'
}
umount "$MNT"
before=$(allocated)
check "blkdiscard of the whole device" blkdiscard "$DEV"
after=$(allocated)
if [ "${before:-0}" -gt 0 ] && [ "$after" = 0 ]; then
    pass "the discard gave back every cluster ($before -> $after allocated)"
else
    fail "the discard gave back every cluster" "$before -> $after allocated"
fi
check "discarded blocks read zeroes" cmp -n 16777216 "$DEV" /dev/zero
finish
