#!/usr/bin/env bash
# scripts/setup.sh against real (emulated) NVMe controllers behind a virtual
# IOMMU. On the host it boots the guest with three controllers and runs itself
# inside:
#   nvme0  free             -> bound to vfio-pci, /dev/vfio/<group> usable
#   nvme1  ext4 mounted     -> skipped
#   nvme2  active swap      -> skipped
# then reset gives nvme0 back to the kernel and its namespace reappears.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"

reexec_in_guest --nvme --nvme --nvme --nvme-size 256M --timeout 300 -- "$0" "$@"

SETUP=$GUEST_LIB_REPO/scripts/setup.sh
BUSY_MOUNT=/mnt/setup-sh-busy

show_as_comment() { printf '%s\n' "$1" | while IFS= read -r line; do echo "# $line"; done; }

# QEMU's NVMe controller reports subsystem NQN nqn.2019-08.org.qemu:<serial>.
qemu_nqn() { echo "nqn.2019-08.org.qemu:plexstor-nvme$1"; }

# PCI address of the emulated controller with serial plexstor-nvmeN.
bdf_of() {
    local ctrl
    for ctrl in /sys/class/nvme/nvme*; do
        if [ "$(cat "$ctrl/subsysnqn")" = "$(qemu_nqn "$1")" ]; then
            basename "$(readlink -f "$ctrl/device")"
            return 0
        fi
    done
    return 1
}

driver_of() {
    local link=/sys/bus/pci/devices/$1/driver
    if [ -e "$link" ]; then basename "$(readlink -f "$link")"; else echo none; fi
}

expect_driver() {
    local name=$1 bdf=$2 want=$3 got
    got=$(driver_of "$bdf")
    if [ "$got" = "$want" ]; then pass "$name"; else fail "$name" "$bdf has driver $got, expected $want"; fi
}

# Opens the VFIO group and asks whether it is viable (all its devices bound to
# vfio-pci), which is what plexd needs before it can map the device.
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

BDF0='' BDF1='' BDF2='' DEV1='' DEV2=''

find_controllers() {
    modprobe nvme
    local n dev
    for n in 0 1 2; do
        dev=$(wait_for_nvme_dev "$(qemu_nqn "$n")" 1 30) || bail "controller plexstor-nvme$n" "no namespace"
        printf -v "DEV$n" '%s' "$dev"
        printf -v "BDF$n" '%s' "$(bdf_of "$n")"
    done
    pass "three emulated NVMe controllers: $BDF0 $BDF1 $BDF2"
}

make_two_busy() {
    mkdir -p "$BUSY_MOUNT"
    check "ext4 mounted from $DEV1 ($BDF1)" bash -c "mkfs.ext4 -q -F $DEV1 && mount $DEV1 $BUSY_MOUNT" || true
    check "swap active on $DEV2 ($BDF2)" bash -c "mkswap -q $DEV2 >/dev/null && swapon $DEV2" || true
}

test_config() {
    local out group
    if out=$(HUGEMEM=64 "$SETUP" 2>&1); then
        pass "HUGEMEM=64 setup.sh exits 0"
    else
        fail "HUGEMEM=64 setup.sh exits 0" "$(tail -n1 <<<"$out")"
    fi
    show_as_comment "$out"
    expect_driver "$BDF0 is bound to vfio-pci" "$BDF0" vfio-pci
    group=$(basename "$(readlink -f "/sys/bus/pci/devices/$BDF0/iommu_group")")
    if [ -c "/dev/vfio/$group" ] && [ -c /dev/vfio/vfio ]; then
        pass "/dev/vfio/$group appears"
    else
        fail "/dev/vfio/$group appears" "no such character device"
    fi
    check "VFIO group $group is viable" vfio_group_viable "/dev/vfio/$group" || true

    expect_driver "$BDF1 with a mounted filesystem stays with nvme" "$BDF1" nvme
    if grep -q "$BDF1: skipped, in use: .*mounted on $BUSY_MOUNT" <<<"$out"; then
        pass "setup.sh says why $BDF1 is skipped"
    else
        fail "setup.sh says why $BDF1 is skipped" "no 'skipped ... mounted' line"
    fi
    expect_driver "$BDF2 with active swap stays with nvme" "$BDF2" nvme
    if grep -q "$BDF2: skipped, in use: .*swap" <<<"$out"; then
        pass "setup.sh says why $BDF2 is skipped"
    else
        fail "setup.sh says why $BDF2 is skipped" "no 'skipped ... swap' line"
    fi
    if [ "$(cat /proc/sys/vm/nr_hugepages)" = 32 ]; then
        pass "32 hugepages reserved in the guest"
    else
        fail "32 hugepages reserved in the guest" "nr_hugepages $(cat /proc/sys/vm/nr_hugepages)"
    fi
}

test_status() {
    local out
    out=$("$SETUP" status 2>&1) || true
    show_as_comment "$out"
    if grep -qE "^$BDF0 +1b36 +0010 .* vfio-pci " <<<"$out"; then
        pass "status shows $BDF0 (1b36:0010) with driver vfio-pci"
    else
        fail "status shows $BDF0 (1b36:0010) with driver vfio-pci" "row missing"
    fi
    if grep -qE "^$BDF1 .* nvme .*mounted on $BUSY_MOUNT" <<<"$out"; then
        pass "status shows $BDF1 mounted"
    else
        fail "status shows $BDF1 mounted" "row missing"
    fi
    if grep -qE "^node0 +2048kB +32 +32$" <<<"$out"; then
        pass "status shows 32 free of 32 hugepages on node0"
    else
        fail "status shows 32 free of 32 hugepages on node0" "row missing"
    fi
}

test_idempotent() {
    local out
    if out=$(HUGEMEM=64 "$SETUP" 2>&1) && grep -q "$BDF0: already bound to vfio-pci" <<<"$out"; then
        pass "second run exits 0 and leaves $BDF0 bound"
    else
        fail "second run exits 0 and leaves $BDF0 bound" "$(tr '\n' '|' <<<"$out")"
    fi
    expect_driver "$BDF1 still with nvme after the second run" "$BDF1" nvme
}

test_reset() {
    local out dev
    if out=$("$SETUP" reset 2>&1); then
        pass "reset exits 0"
    else
        fail "reset exits 0" "$(tail -n1 <<<"$out")"
    fi
    expect_driver "reset gives $BDF0 back to nvme" "$BDF0" nvme
    if dev=$(wait_for_nvme_dev "$(qemu_nqn 0)" 1 30); then
        pass "its namespace reappears as $dev"
    else
        fail "its namespace reappears" "no block device for $(qemu_nqn 0)"
    fi
    if mountpoint -q "$BUSY_MOUNT"; then pass "the mounted filesystem was left alone"; else fail "the mounted filesystem was left alone" "not mounted"; fi
}

test_allow_and_block_lists() {
    PCI_BLOCKED="$BDF0" HUGEMEM=64 "$SETUP" >/dev/null 2>&1 || true
    expect_driver "PCI_BLOCKED=$BDF0 keeps it with nvme" "$BDF0" nvme
    # Short form without the domain is accepted too.
    PCI_ALLOWED="${BDF0#0000:}" HUGEMEM=64 "$SETUP" >/dev/null 2>&1 || true
    expect_driver "PCI_ALLOWED=${BDF0#0000:} binds it" "$BDF0" vfio-pci
    PCI_ALLOWED="$BDF0" "$SETUP" reset >/dev/null 2>&1 || true
    expect_driver "PCI_ALLOWED=$BDF0 reset gives it back" "$BDF0" nvme
}

test_clear_huge() {
    check "reset CLEAR_HUGE=yes exits 0" env CLEAR_HUGE=yes "$SETUP" reset || true
    if [ "$(cat /proc/sys/vm/nr_hugepages)" = 0 ]; then
        pass "reset CLEAR_HUGE=yes releases the hugepages"
    else
        fail "reset CLEAR_HUGE=yes releases the hugepages" "nr_hugepages $(cat /proc/sys/vm/nr_hugepages)"
    fi
}

main() {
    find_controllers
    make_two_busy
    test_config
    test_status
    test_idempotent
    test_reset
    test_allow_and_block_lists
    test_clear_huge
    swapoff "$DEV2" 2>/dev/null || true
    umount "$BUSY_MOUNT" 2>/dev/null || true
    finish
}

main
