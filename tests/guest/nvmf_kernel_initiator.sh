#!/usr/bin/env bash
# plexd's NVMe/TCP target against the Linux kernel's own initiator.
#
# Run on the host: boots the test guest (scripts/guest/run.sh) and runs itself inside. In the
# guest, the host-built build/release/plexd serves a malloc bdev on 127.0.0.1:4420 and the
# kernel's nvme-tcp + nvme-cli discover, connect (with and without digests), format, mount,
# run fio with verification, discard, disconnect, and survive a plexd restart from its saved
# configuration.
#
#   tests/guest/nvmf_kernel_initiator.sh          (needs: cargo build --release -p plexd)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 36
REPO=$GUEST_LIB_REPO

PLEXD=${PLEXD:-$REPO/build/release/plexd}
if ! in_guest; then
    [ -x "$PLEXD" ] || { echo "build plexd first: cargo build --release -p plexd" >&2; exit 2; }
    reexec_in_guest --timeout 480 --env PLEXD="$PLEXD" -- "$0" "$@"
fi
NQN=nqn.2024-01.io.plexstor:kernel1
ADDR=127.0.0.1
PORT=4420
BDEV_UUID=5e4f0c2a-7d1b-4c3e-9a8f-0123456789ab
WORK=$(mktemp -d /tmp/nvmf-kernel.XXXXXX)
SOCK=$WORK/plexd.sock
PLEXD_PID=


cleanup() {
    nvme disconnect -n "$NQN" >/dev/null 2>&1
    stop_plexd -KILL
}
trap cleanup EXIT

configure() {
    rpc bdev_malloc_create "{\"name\": \"Malloc0\", \"num_blocks\": 786432, \"block_size\": 512, \"uuid\": \"$BDEV_UUID\"}" &&
        rpc nvmf_create_transport '{"trtype": "TCP", "max_queue_depth": 128, "in_capsule_data_size": 8192, "max_io_size": 1048576}' &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"serial_number\": \"PLEX0001\", \"allow_any_host\": true}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"Malloc0\"}}" &&
        rpc nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"$ADDR\", \"trsvcid\": \"$PORT\"}}"
}

dev_of() { wait_for_nvme_dev "$NQN" 1 30; }

unmap_ops() { jget "$(rpc bdev_get_iostat '{"name": "Malloc0"}')" 'v["bdevs"][0]["num_unmap_ops"]'; }

load_modules nvme nvme-tcp xfs ext4 || bail modules "cannot load nvme-tcp/xfs/ext4"
# Not through `check`: that runs its command in a subshell, and PLEXD_PID must reach us.
if start_plexd; then pass "plexd starts"; else bail "plexd starts" "see log above"; fi
check "configure over JSON-RPC" configure || finish

# ---- discovery -----------------------------------------------------------------
out=$(nvme discover -t tcp -a "$ADDR" -s "$PORT" 2>&1)
if grep -q "subnqn: *$NQN" <<<"$out" && grep -q "trsvcid: *$PORT" <<<"$out"; then
    pass "nvme discover lists the subsystem"
else
    printf '%s\n' "$out" | sed 's/^/# /'
    fail "nvme discover lists the subsystem" "no entry for $NQN"
fi

# ---- connect, identify ---------------------------------------------------------
check "nvme connect (2 I/O queues)" nvme_connect_tcp "$NQN" "$ADDR" "$PORT" -i 2 || finish
DEV=$(dev_of) || bail "block device appears" "no device for $NQN"
pass "block device appears ($DEV)"
qp=$(jget "$(rpc nvmf_subsystem_get_qpairs "{\"nqn\": \"$NQN\"}")" 'len(v)')
[ "$qp" = 3 ] && pass "plexd sees admin + 2 I/O qpairs" || fail "plexd sees admin + 2 I/O qpairs" "$qp qpairs"
nvme list 2>/dev/null | grep -q "plexstor" && pass "nvme list shows model plexstor" || fail "nvme list shows model plexstor" "$(nvme list 2>&1 | tail -n2)"
idc=$(nvme id-ctrl "$DEV" 2>&1)
if grep -Eq '^mn +: plexstor' <<<"$idc" && grep -Eq '^sn +: PLEX0001' <<<"$idc" &&
    grep -Eq '^fr +: 0\.' <<<"$idc" && grep -Eq "^subnqn +: $NQN" <<<"$idc" && grep -Eq '^mdts +: 8' <<<"$idc"; then
    pass "nvme id-ctrl: model, serial, firmware, subnqn, mdts"
else
    printf '%s\n' "$idc" | grep -E '^(mn|sn|fr|subnqn|mdts|ioccsz|cntlid) ' | sed 's/^/# /'
    fail "nvme id-ctrl: model, serial, firmware, subnqn, mdts" "unexpected values"
fi
idn=$(nvme id-ns "$DEV" 2>&1)
if grep -Eq '^nsze +: 0xc0000' <<<"$idn" && grep -Eq 'lbads:9 .*in use' <<<"$idn"; then
    pass "nvme id-ns: size and LBA format"
else
    printf '%s\n' "$idn" | head -n 12 | sed 's/^/# /'
    fail "nvme id-ns: size and LBA format" "unexpected values"
fi
uuid=$(cat "/sys/block/${DEV#/dev/}/uuid" 2>/dev/null)
[ "$uuid" = "$BDEV_UUID" ] && pass "namespace UUID is the bdev's" || fail "namespace UUID is the bdev's" "got '$uuid'"

# ---- raw device I/O --------------------------------------------------------------
check "fio 4k randwrite verify" fio_verify "$DEV" 4M
check "fio 128k seq write verify" fio_seq "$DEV" 128k 16M
check "fio 1M seq write verify" fio_seq "$DEV" 1M 16M

# ---- filesystems -----------------------------------------------------------------
check "xfs: mkfs, mount, write, remount, read back" fs_roundtrip "$DEV" mkfs.xfs -f
before=$(unmap_ops)
FSTRIM=1 check "ext4: mkfs, mount, write, remount, read back, fstrim" fs_roundtrip "$DEV" mkfs.ext4 -F -q
check "blkdiscard" blkdiscard -o 0 -l 1048576 "$DEV"
after=$(unmap_ops)
if [ "${after:-0}" -gt "${before:-0}" ]; then
    pass "discards reach the bdev as unmap ($before -> $after)"
else
    fail "discards reach the bdev as unmap" "num_unmap_ops $before -> $after"
fi

# ---- namespace hot add/remove: AER, changed namespace list, rescan ----------------
ns2_gone() { [ -z "$(nvme_devs_of "$NQN" 2)" ]; }
if rpc bdev_malloc_create '{"name": "Malloc1", "num_blocks": 4096, "block_size": 512}' >/dev/null &&
    rpc nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"Malloc1\", \"nsid\": 2}}" >/dev/null; then
    check "namespace added while connected appears (AER)" wait_for_nvme_dev "$NQN" 2 20
    rpc nvmf_subsystem_remove_ns "{\"nqn\": \"$NQN\", \"nsid\": 2}" >/dev/null
    check "namespace removed while connected disappears (AER)" wait_until 20 ns2_gone
    rpc bdev_malloc_delete '{"name": "Malloc1"}' >/dev/null
else
    fail "namespace added while connected appears (AER)" "RPC failed"
    fail "namespace removed while connected disappears (AER)" "not added"
fi

# ---- disconnect ------------------------------------------------------------------
check "nvme disconnect" nvme disconnect -n "$NQN"
check "device goes away" wait_for_no_nvme_dev "$NQN" 20
check "plexd controllers cleaned up" wait_controllers 0

# ---- digests ---------------------------------------------------------------------
if check "nvme connect --hdr-digest --data-digest" nvme_connect_tcp "$NQN" "$ADDR" "$PORT" -i 2 --hdr-digest --data-digest; then
    DEV=$(dev_of) && check "fio verify with digests" fio_verify "$DEV" 2M
    qpairs=$(rpc nvmf_subsystem_get_qpairs "{\"nqn\": \"$NQN\"}")
    with_digests=$(jget "$qpairs" '"%d %d" % (len(v), sum(q["hdgst"] and q["ddgst"] for q in v))')
    if [ "${with_digests% *}" = 3 ] && [ "${with_digests#* }" = 3 ]; then
        pass "plexd runs both digests on all 3 queues"
    else
        fail "plexd runs both digests on all 3 queues" "queues, with both: $with_digests"
    fi
    check "fio 1M seq with digests" fio_seq "$DEV" 1M 8M
    nvme disconnect -n "$NQN" >/dev/null 2>&1
    wait_for_no_nvme_dev "$NQN" 20 >/dev/null
fi

# ---- plexd restart from saved config --------------------------------------------
check "save_config" sh -c "$(declare -f rpc); SOCK=$SOCK; rpc save_config > $WORK/saved.json"
check "connect (reconnect_delay 1 s, fast_io_fail_tmo 3 s)" connect_failfast tcp "$ADDR"
DEV=$(dev_of) || bail "reconnect setup" "no device"
# The kernel's controller of this very namespace: a TCP one, of our subsystem (never QEMU's
# PCIe controller, which is always live).
CTRL=$(ctrl_of_dev "$DEV")
ctrl_attr() { cat "/sys/class/nvme/$CTRL/$1" 2>/dev/null; }
if [ "$(ctrl_attr transport)" != tcp ] || [ "$(ctrl_attr subsysnqn)" != "$NQN" ]; then
    bail "reconnect setup" "controller '$CTRL' of $DEV is not our TCP controller"
fi
ctrl_live() { [ "$(ctrl_attr state)" = live ]; }
ctrl_not_live() { ! ctrl_live; }
stop_plexd -KILL
rc=0
timeout 60 dd if="$DEV" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || rc=$?
# The host must have noticed: I/O failed (fast_io_fail_tmo), and its controller left `live`.
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && wait_until 10 ctrl_not_live; then
    pass "host I/O fails cleanly while plexd is down ($CTRL is $(ctrl_attr state))"
else
    fail "host I/O fails cleanly while plexd is down" "dd exit $rc, $CTRL $(ctrl_attr state)"
fi
if start_plexd -c "$WORK/saved.json"; then
    pass "plexd restarts with -c saved.json"
else
    fail "plexd restarts with -c saved.json" "see log above"
fi
# Live again, after the check above saw it leave `live`.
if wait_until 30 ctrl_live; then
    pass "kernel host reconnects to the restarted plexd"
    uuid=$(cat "/sys/block/${DEV#/dev/}/uuid" 2>/dev/null)
    [ "$uuid" = "$BDEV_UUID" ] && pass "same namespace after restart" || fail "same namespace after restart" "uuid '$uuid'"
    check "I/O works after reconnect" fio_verify "$DEV" 1M
else
    fail "kernel host reconnects to the restarted plexd" "controller $CTRL state $(cat "/sys/class/nvme/$CTRL/state" 2>/dev/null)"
fi
nvme disconnect -n "$NQN" >/dev/null 2>&1
check "device gone after final disconnect" wait_for_no_nvme_dev "$NQN" 20
check "controllers cleaned up after final disconnect" wait_controllers 0
stop_plexd -TERM
if grep -q "panicked" "$WORK/plexd.log"; then
    grep -B2 -A5 panicked "$WORK/plexd.log" | sed 's/^/# /'
    fail "plexd never panicked" "see log"
else
    pass "plexd never panicked"
fi
finish
