#!/usr/bin/env bash
# plexd owns an NVMe SSD through VFIO and exports it over NVMe/TCP to the kernel's own host.
#
# In the guest (QEMU's NVMe behind the virtual IOMMU): setup.sh hands the controller to
# vfio-pci; plexd attaches it with bdev_nvme_attach_controller -t pcie (sent by SPDK's own
# client where its venv is installed); the namespace is exported over NVMe/TCP and the
# kernel's initiator in the same guest makes and mounts xfs and writes a file. plexd stops on
# SIGTERM, shutting the controller down first, and starts again from what save_config wrote:
# the controller is attached at start and the file reads back. A controller reset under
# writes loses none of them. Then plexd is killed (SIGKILL) with writes in flight and started
# again: the controller comes up again and xfs mounts with both files
# whole. Detach, and reset gives the controller back to the kernel.
#
# On the host it boots the guest with `run.sh --nvme`; inside a guest that is already up
# (scripts/test.sh runs every guest test in one boot) it uses the controller with serial
# plexstor-nvme0, and leaves it bound to nvme.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 17
REPO=$GUEST_LIB_REPO
PLEXD=${PLEXD:-$REPO/build/release/plexd}
reexec_in_guest --nvme --nvme-size 512M --hugepages 128 --timeout 300 -- "$0" "$@"

SETUP=$REPO/scripts/setup.sh
KERNEL_NQN=nqn.2019-08.org.qemu:plexstor-nvme0
NQN=nqn.2024-01.io.plexstor:pcie
ADDR=127.0.0.1
PORT=$(free_tcp_port)
WORK=$(mktemp -d /tmp/plexd-pcie.XXXXXX)
SOCK=$WORK/plexd.sock
MNT=$WORK/mnt
PLEXD_PID=
BDF=''
DEV=''
PAGES_BEFORE=$(cat /proc/sys/vm/nr_hugepages)

setup_sh() { env PCI_ALLOWED="$BDF" HUGEMEM=256 "$SETUP" "$@" >"$WORK/setup.log" 2>&1; }

stop_plexd() { # SIGNAL
    [ -n "$PLEXD_PID" ] || return 0
    kill -"$1" "$PLEXD_PID" 2>/dev/null
    wait "$PLEXD_PID" 2>/dev/null
    local rc=$?
    PLEXD_PID=
    return $rc
}

# The guest's binding and hugepage count are put back for the tests that follow in the boot.
cleanup() {
    umount "$MNT" 2>/dev/null
    nvme disconnect -n "$NQN" >/dev/null 2>&1
    stop_plexd KILL
    if [ -n "$BDF" ] && [ "$(driver_of "$BDF")" = vfio-pci ]; then setup_sh reset; fi
    echo "$PAGES_BEFORE" >/proc/sys/vm/nr_hugepages
    rm -rf "$WORK"
}
trap cleanup EXIT

load_modules nvme nvme-tcp xfs || bail modules "cannot load nvme, nvme-tcp, xfs"
KDEV=$(wait_for_nvme_dev "$KERNEL_NQN" 1 30) || bail "controller plexstor-nvme0" "none (boot the guest with run.sh --nvme)"
BDF=$(nvme_bdf_of "$KERNEL_NQN")
K_BLOCKS=$(nvme id-ns "$KDEV" -n 1 -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nsze"])')
K_DLFEAT=$(nvme id-ns "$KDEV" -n 1 -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["dlfeat"])')
wipefs -a -q "$KDEV"
if setup_sh && [ "$(driver_of "$BDF")" = vfio-pci ]; then
    pass "controller $BDF ($K_BLOCKS blocks) handed to vfio-pci"
else
    bail "controller $BDF handed to vfio-pci" "$(tail -n1 "$WORK/setup.log")"
fi

# SPDK's own client where its venv is installed (the host tests install it), else plexctl
# with the same parameters.
attach() {
    if [ -x "$SPDK_RPC" ]; then
        "$SPDK_RPC" -s "$SOCK" bdev_nvme_attach_controller -b Nvme0 -t pcie -a "$BDF"
    else
        echo "# SPDK's client is not installed ($SPDK_RPC); plexctl sends SPDK's parameters"
        rpc bdev_nvme_attach_controller "{\"name\": \"Nvme0\", \"trtype\": \"PCIe\", \"traddr\": \"$BDF\"}"
    fi
}

start_and_export() {
    "$PLEXD" -m 0x3 --no-pin -r "$SOCK" --idle-poll-us 200 >>"$WORK/plexd.log" 2>&1 &
    PLEXD_PID=$!
    wait_for_plexd "$PLEXD_PID" || return 1
    attach | tee "$WORK/attach.out" | grep -q Nvme0n1 || return 1
    {
        rpc nvmf_create_transport '{"trtype": "TCP"}' &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"serial_number\": \"PLEXPCIE1\", \"allow_any_host\": true}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"Nvme0n1\"}}" &&
        rpc nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"$ADDR\", \"trsvcid\": \"$PORT\"}}"
    } >/dev/null
}

# A short controller-loss timeout: when plexd is killed, I/O fails in seconds, not minutes.
connect() {
    nvme_connect_tcp "$NQN" "$ADDR" "$PORT" -l 5 >/dev/null && DEV=$(wait_for_nvme_dev "$NQN" 1 30)
}

show_log() { tail -n 15 "$WORK/plexd.log" | sed 's/^/# /'; }

if start_and_export; then
    pass "plexd attaches $BDF as Nvme0n1 with bdev_nvme_attach_controller -t pcie and exports it"
else
    show_log
    bail "plexd attaches $BDF" "see log above"
fi
blocks=$(rpc bdev_get_bdevs '{"name": "Nvme0n1"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["num_blocks"])')
if [ "$blocks" = "$K_BLOCKS" ]; then
    pass "Nvme0n1 has the $K_BLOCKS blocks the kernel saw"
else
    fail "Nvme0n1 has the $K_BLOCKS blocks the kernel saw" "it has $blocks"
fi

# (connect sets DEV, so it runs here rather than in check's subshell)
if connect; then pass "the kernel connects over NVMe/TCP ($DEV)"; else
    show_log
    bail "the kernel connects over NVMe/TCP" "no block device for $NQN"
fi
# Flush, Write Zeroes and Deallocate, sent by nvme-cli through the kernel's initiator to
# plexd, which passes them to the controller over PCIe. 1 MiB at 64 MiB: random data, then
# zeroed by the device; then deallocated (reads of it return zeroes where the controller
# said so before the handover, DLFEAT).
data_commands() {
    local lba=131072 count=2048
    head -c 1M /dev/urandom >"$WORK/r.bin"
    dd if="$WORK/r.bin" of="$DEV" bs=1M seek=64 count=1 oflag=direct status=none &&
        nvme flush "$DEV" -n 1 >/dev/null &&
        dd if="$DEV" bs=1M skip=64 count=1 iflag=direct status=none | cmp -s - "$WORK/r.bin" || {
        echo "random data did not land"
        return 1
    }
    nvme write-zeroes "$DEV" -n 1 -s "$lba" -c "$((count - 1))" >/dev/null &&
        dd if="$DEV" bs=1M skip=64 count=1 iflag=direct status=none | cmp -s - <(head -c 1M /dev/zero) || {
        echo "Write Zeroes failed or left data"
        return 1
    }
    dd if="$WORK/r.bin" of="$DEV" bs=1M seek=64 count=1 oflag=direct status=none &&
        nvme dsm "$DEV" -n 1 -d -s "$lba" -b "$count" >/dev/null || {
        echo "Deallocate failed"
        return 1
    }
    if [ "$((K_DLFEAT & 7))" = 1 ] &&
        ! dd if="$DEV" bs=1M skip=64 count=1 iflag=direct status=none | cmp -s - <(head -c 1M /dev/zero); then
        echo "deallocated blocks do not read as zeroes (DLFEAT $K_DLFEAT)"
        return 1
    fi
}
if out=$(data_commands 2>&1); then
    pass "Flush, Write Zeroes (reads back zeroes) and Deallocate reach the controller"
else
    fail "Flush, Write Zeroes and Deallocate" "$(tail -n1 <<<"$out")"
fi

make_fs() {
    mkdir -p "$MNT" && mkfs.xfs -f -q "$DEV" && mount "$DEV" "$MNT" &&
        head -c 8M /dev/urandom >"$WORK/a.bin" && cp "$WORK/a.bin" "$MNT/" && sync
}
check "mkfs.xfs, mount, write file a (8 MiB)" make_fs || { show_log; finish; }
umount "$MNT"
nvme disconnect -n "$NQN" >/dev/null 2>&1
wait_until 30 sh -c "! ls /sys/class/nvme-subsystem/*/subsysnqn 2>/dev/null | xargs -r grep -qx '$NQN'" || true

rpc save_config >"$WORK/config.json"
# On SIGTERM the controller is shut down (CC.SHN) and disabled before the process's memory
# is unmapped, so the device never completes into memory that is gone.
if stop_plexd TERM; then
    if grep -q "bdev_nvme Nvme0: shut down" "$WORK/plexd.log"; then
        pass "plexd stops on SIGTERM (exit 0), shutting the controller down first"
    else
        show_log
        fail "plexd shuts the controller down on SIGTERM" "no 'bdev_nvme Nvme0: shut down' in its log"
    fi
else
    fail "plexd stops on SIGTERM" "exit status $?"
fi
# Started from what save_config wrote: the PCIe controller is attached again at start.
"$PLEXD" -m 0x3 --no-pin -r "$SOCK" --idle-poll-us 200 -c "$WORK/config.json" >>"$WORK/plexd.log" 2>&1 &
PLEXD_PID=$!
if wait_for_plexd "$PLEXD_PID" && rpc bdev_get_bdevs '{"name": "Nvme0n1"}' >/dev/null; then
    pass "plexd started from its saved config attaches $BDF again ($(grep -o '"traddr": *"[^"]*"' "$WORK/config.json" | head -n1))"
else
    show_log
    bail "plexd started from its saved config attaches $BDF again" "see log above"
fi
if connect && mount "$DEV" "$MNT" && cmp "$WORK/a.bin" "$MNT/a.bin"; then
    pass "file a reads back after the restart"
else
    show_log
    bail "file a reads back after the restart" "not connected, not mounted or not the same"
fi

# A controller reset under writes: the controller is disabled and brought up again, each
# I/O queue is created again on the device and resends what the reset cut off.
reset_ctrlr() {
    if [ -x "$SPDK_RPC" ]; then
        "$SPDK_RPC" -s "$SOCK" bdev_nvme_reset_controller Nvme0
    else
        rpc bdev_nvme_reset_controller '{"name": "Nvme0"}'
    fi
}
head -c 24M /dev/urandom >"$WORK/c.bin"
dd if="$WORK/c.bin" of="$MNT/c.bin" bs=64k oflag=direct status=none 2>"$WORK/dd.err" &
writer=$!
reset_ctrlr >/dev/null
if wait "$writer" && sync && echo 3 >/proc/sys/vm/drop_caches && cmp "$WORK/c.bin" "$MNT/c.bin"; then
    pass "bdev_nvme_reset_controller under writes: they finish and read back"
else
    grep -iE "reset|reconnect|queue|error|fail" "$WORK/plexd.log" | tail -n 20 | sed 's/^/# /'
    sed 's/^/# dd: /' "$WORK/dd.err"
    fail "bdev_nvme_reset_controller under writes" "the writer failed or the file differs"
fi

# Writes in flight when plexd dies: a file being written and synced in a loop.
head -c 32M /dev/urandom >"$WORK/b.bin"
cp "$WORK/b.bin" "$MNT/" && sync
(while :; do dd if=/dev/urandom of="$MNT/scratch" bs=1M count=16 oflag=direct status=none conv=fsync || break; done) &
writer=$!
wait_until 10 test -s "$MNT/scratch" || true
if kill -0 "$writer" 2>/dev/null; then
    pass "plexd killed (SIGKILL) while a writer writes"
else
    fail "plexd killed while a writer writes" "the writer had already stopped"
fi
stop_plexd KILL
# The kernel fails the writer's I/O once the controller is gone; then the filesystem goes.
nvme disconnect -n "$NQN" >/dev/null 2>&1
kill "$writer" 2>/dev/null
wait "$writer" 2>/dev/null
umount -l "$MNT" 2>/dev/null
wait_until 30 sh -c "! ls /sys/class/nvme-subsystem/*/subsysnqn 2>/dev/null | xargs -r grep -qx '$NQN'" || true

if start_and_export; then pass "after the kill, plexd starts and the controller comes up again"; else
    show_log
    bail "after the kill, plexd starts and the controller comes up again" "see log above"
fi
if connect && mount "$DEV" "$MNT" && cmp "$WORK/a.bin" "$MNT/a.bin" && cmp "$WORK/b.bin" "$MNT/b.bin"; then
    pass "xfs mounts (its log recovered) and files a and b read back"
else
    fail "xfs mounts and files a and b read back" "see above"
fi
umount "$MNT" 2>/dev/null

# The device stops answering under reads (its BAR no longer decoded, as after a surprise
# removal): the controller turns failed, the reads fail rather than hang, plexd runs on.
ctrlr_state() { rpc bdev_nvme_get_controllers '{"name": "Nvme0"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["ctrlrs"][0]["state"])'; }
(while dd if="$DEV" of=/dev/null bs=64k count=256 iflag=direct status=none; do :; done) 2>"$WORK/reader.err" &
reader=$!
COMMAND_BEFORE=$(setpci -s "$BDF" COMMAND)
setpci -s "$BDF" COMMAND=0000
ctrlr_failed() { [ "$(ctrlr_state 2>/dev/null)" = failed ]; }
reader_ended() { ! kill -0 "$reader" 2>/dev/null; }
if wait_until 30 ctrlr_failed; then
    pass "a device that stops answering turns the controller failed"
else
    show_log
    fail "a device that stops answering turns the controller failed" "state $(ctrlr_state)"
fi
if wait_until 60 reader_ended && kill -0 "$PLEXD_PID" 2>/dev/null && ctrlr_state >/dev/null; then
    pass "reads from it fail rather than hang ($(head -n1 "$WORK/reader.err")), and plexd runs on"
else
    kill "$reader" 2>/dev/null
    show_log
    fail "reads from the failed controller end, plexd runs on" "the reader still runs, or plexd is gone"
fi
setpci -s "$BDF" COMMAND="$COMMAND_BEFORE"
nvme disconnect -n "$NQN" >/dev/null 2>&1

detach() {
    rpc nvmf_delete_subsystem "{\"nqn\": \"$NQN\"}" >/dev/null &&
        rpc bdev_nvme_detach_controller '{"name": "Nvme0"}' >/dev/null
}
check "subsystem deleted, bdev_nvme_detach_controller Nvme0" detach
stop_plexd TERM
if setup_sh reset && [ "$(driver_of "$BDF")" = nvme ] && dev=$(wait_for_nvme_dev "$KERNEL_NQN" 1 30) &&
    blkid -p -s TYPE -o value "$dev" | grep -qx xfs; then
    pass "reset gives $BDF back to the kernel, which finds the xfs plexd's host made ($dev)"
else
    fail "reset gives $BDF back to the kernel with the xfs on it" "$(tail -n1 "$WORK/setup.log")"
fi
finish
