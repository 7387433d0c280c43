#!/usr/bin/env bash
# scripts/setup.sh against a real (emulated) NVMe controller behind a virtual
# IOMMU. On the host it boots the guest with `run.sh --nvme` and runs itself
# inside; inside a guest that is already up (scripts/test.sh runs every guest
# test in one boot) it uses the controller with serial plexstor-nvme0.
#
# One controller, in turn: with ext4 mounted on its namespace it is skipped;
# with swap active on it, skipped; free, it is bound to vfio-pci and its VFIO
# group is usable; status shows it; a second run changes nothing; reset gives
# it back to nvme and the namespace reappears; PCI_BLOCKED/PCI_ALLOWED are
# obeyed; CLEAR_HUGE=yes releases the hugepages. Every setup.sh call names
# the controller in PCI_ALLOWED, so other controllers of the guest are never
# touched, and the guest's driver binding and hugepage count are put back at
# the end for the tests that follow in the same boot.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 26

reexec_in_guest --nvme --nvme-size 256M --timeout 300 -- "$0" "$@"

SETUP=$GUEST_LIB_REPO/scripts/setup.sh
NQN=nqn.2019-08.org.qemu:plexstor-nvme0   # QEMU: nqn.2019-08.org.qemu:<serial>
MNT=/mnt/setup-sh-test

BDF=''
DEV=''
GROUP=''
PREVIOUS_DRIVER=''
PREVIOUS_PAGES=''

show_as_comment() { printf '%s\n' "$1" | while IFS= read -r line; do echo "# $line"; done; }

expect_driver() {
    local name=$1 want=$2 got
    got=$(driver_of "$BDF")
    if [ "$got" = "$want" ]; then pass "$name"; else fail "$name" "$BDF has driver $got, expected $want"; fi
}

# setup_sh [VAR=VALUE...] [ACTION]: setup.sh limited to our controller.
setup_sh() {
    local vars=()
    while [ $# -gt 0 ] && [[ $1 == *=* ]]; do vars+=("$1"); shift; done
    env PCI_ALLOWED="$BDF" "${vars[@]}" "$SETUP" "$@" 2>&1
}

find_controller() {
    modprobe nvme
    DEV=$(wait_for_nvme_dev "$NQN" 1 30) ||
        bail "controller plexstor-nvme0" "none (boot the guest with run.sh --nvme)"
    local ctrl
    for ctrl in /sys/class/nvme/nvme*; do
        if [ "$(cat "$ctrl/subsysnqn")" = "$NQN" ]; then
            BDF=$(basename "$(readlink -f "$ctrl/device")")
        fi
    done
    [ -n "$BDF" ] || bail "controller plexstor-nvme0" "no PCI address"
    GROUP=$(basename "$(readlink -f "/sys/bus/pci/devices/$BDF/iommu_group")")
    PREVIOUS_DRIVER=$(driver_of "$BDF")
    PREVIOUS_PAGES=$(cat /proc/sys/vm/nr_hugepages)
    pass "controller plexstor-nvme0 at $BDF ($DEV, IOMMU group $GROUP)"
}

restore_guest() {
    local dev
    swapoff "$DEV" 2>/dev/null || true
    umount "$MNT" 2>/dev/null || true
    [ -n "$PREVIOUS_PAGES" ] && echo "$PREVIOUS_PAGES" >/proc/sys/vm/nr_hugepages
    if [ -n "$BDF" ] && [ "$(driver_of "$BDF")" != "$PREVIOUS_DRIVER" ]; then
        if [ "$PREVIOUS_DRIVER" = vfio-pci ]; then setup_sh >/dev/null; else setup_sh reset >/dev/null; fi
    fi
    # Leave no filesystem or swap signature for the tests that follow.
    dev=$(wait_for_nvme_dev "$NQN" 1 10 2>/dev/null) && wipefs -a -q "$dev" 2>/dev/null
    return 0
}

test_skips_mounted() {
    local out
    mkdir -p "$MNT"
    check "ext4 mounted from $DEV" bash -c "mkfs.ext4 -q -F $DEV && mount $DEV $MNT" || return 0
    out=$(setup_sh HUGEMEM=64) || true
    show_as_comment "$out"
    expect_driver "with a mounted filesystem $BDF stays with nvme" nvme
    if grep -q "$BDF: skipped, in use: .*mounted on $MNT" <<<"$out"; then
        pass "setup.sh says it skipped $BDF: mounted on $MNT"
    else
        fail "setup.sh says it skipped $BDF: mounted" "no such line"
    fi
    out=$(setup_sh status) || true
    if grep -qE "^$BDF .* nvme .*mounted on $MNT" <<<"$out"; then
        pass "status shows $BDF mounted"
    else
        fail "status shows $BDF mounted" "$(grep "^$BDF" <<<"$out")"
    fi
    umount "$MNT"
}

test_skips_swap() {
    local out
    check "swap active on $DEV" bash -c "mkswap -q $DEV >/dev/null && swapon $DEV" || return 0
    out=$(setup_sh HUGEMEM=64) || true
    expect_driver "with active swap $BDF stays with nvme" nvme
    if grep -q "$BDF: skipped, in use: .*swap" <<<"$out"; then
        pass "setup.sh says it skipped $BDF: swap"
    else
        fail "setup.sh says it skipped $BDF: swap" "$(tr '\n' '|' <<<"$out")"
    fi
    swapoff "$DEV"
    wipefs -a -q "$DEV"
}

# Opens the VFIO group and asks whether it is viable (every device in it bound
# to vfio-pci), which plexd needs before it can map the device.
# shellcheck disable=SC2317 # called through check
vfio_group_viable() {
    python3 - "$1" <<'EOF'
import fcntl, os, struct, sys
VFIO_GROUP_GET_STATUS = (ord(';') << 8) | (100 + 3)   # _IO(VFIO_TYPE, VFIO_BASE + 3)
fd = os.open(sys.argv[1], os.O_RDWR)
buf = bytearray(struct.pack("II", 8, 0))
fcntl.ioctl(fd, VFIO_GROUP_GET_STATUS, buf)
_, flags = struct.unpack("II", buf)
sys.exit(0 if flags & 1 else 1)                        # VFIO_GROUP_FLAGS_VIABLE
EOF
}

test_binds_free_device() {
    local out
    if out=$(setup_sh HUGEMEM=64); then
        pass "HUGEMEM=64 setup.sh exits 0"
    else
        fail "HUGEMEM=64 setup.sh exits 0" "$(tail -n1 <<<"$out")"
    fi
    show_as_comment "$out"
    expect_driver "free, $BDF is bound to vfio-pci" vfio-pci
    if [ -c "/dev/vfio/$GROUP" ] && [ -c /dev/vfio/vfio ]; then
        pass "/dev/vfio/$GROUP appears"
    else
        fail "/dev/vfio/$GROUP appears" "no such character device"
    fi
    check "VFIO group $GROUP is viable" vfio_group_viable "/dev/vfio/$GROUP" || true
    if [ "$(cat /proc/sys/vm/nr_hugepages)" = 32 ]; then
        pass "32 hugepages reserved"
    else
        fail "32 hugepages reserved" "nr_hugepages $(cat /proc/sys/vm/nr_hugepages)"
    fi

    out=$(setup_sh status) || true
    show_as_comment "$out"
    if grep -qE "^$BDF +1b36 +0010 .* vfio-pci +$GROUP " <<<"$out"; then
        pass "status shows $BDF (1b36:0010) with driver vfio-pci, group $GROUP"
    else
        fail "status shows $BDF with driver vfio-pci" "$(grep "^$BDF" <<<"$out")"
    fi
    if grep -qE "^node0 +2048kB +32 +32$" <<<"$out"; then
        pass "status shows 32 free of 32 hugepages on node0"
    else
        fail "status shows 32 free of 32 hugepages on node0" "row missing"
    fi

    if out=$(setup_sh HUGEMEM=64) && grep -q "$BDF: already bound to vfio-pci" <<<"$out"; then
        pass "a second run exits 0 and leaves $BDF bound"
    else
        fail "a second run exits 0 and leaves $BDF bound" "$(tr '\n' '|' <<<"$out")"
    fi
    expect_driver "still vfio-pci after the second run" vfio-pci
}

test_reset() {
    local out dev
    if out=$(setup_sh reset); then pass "reset exits 0"; else fail "reset exits 0" "$(tail -n1 <<<"$out")"; fi
    expect_driver "reset gives $BDF back to nvme" nvme
    if dev=$(wait_for_nvme_dev "$NQN" 1 30); then
        pass "its namespace reappears as $dev"
        DEV=$dev
    else
        fail "its namespace reappears" "no block device for $NQN"
    fi
}

test_allow_and_block_lists() {
    setup_sh PCI_BLOCKED="$BDF" HUGEMEM=64 >/dev/null || true
    expect_driver "PCI_BLOCKED=$BDF keeps it with nvme" nvme
    # The short form without the PCI domain is accepted too.
    env PCI_ALLOWED="${BDF#0000:}" HUGEMEM=64 "$SETUP" >/dev/null 2>&1 || true
    expect_driver "PCI_ALLOWED=${BDF#0000:} binds it" vfio-pci
    setup_sh reset >/dev/null || true
    expect_driver "PCI_ALLOWED=$BDF reset gives it back" nvme
}

test_clear_huge() {
    check "reset CLEAR_HUGE=yes exits 0" setup_sh CLEAR_HUGE=yes reset || true
    if [ "$(cat /proc/sys/vm/nr_hugepages)" = 0 ]; then
        pass "reset CLEAR_HUGE=yes releases the hugepages"
    else
        fail "reset CLEAR_HUGE=yes releases the hugepages" "nr_hugepages $(cat /proc/sys/vm/nr_hugepages)"
    fi
}

main() {
    find_controller
    trap restore_guest EXIT
    test_skips_mounted
    test_skips_swap
    test_binds_free_device
    test_reset
    test_allow_and_block_lists
    test_clear_huge
    restore_guest
    trap - EXIT
    if [ "$(driver_of "$BDF")" = "$PREVIOUS_DRIVER" ] &&
       [ "$(cat /proc/sys/vm/nr_hugepages)" = "$PREVIOUS_PAGES" ]; then
        pass "guest left as found: $BDF with $PREVIOUS_DRIVER, $PREVIOUS_PAGES hugepages"
    else
        fail "guest left as found" "$BDF with $(driver_of "$BDF"), $(cat /proc/sys/vm/nr_hugepages) hugepages"
    fi
    finish
}

main
