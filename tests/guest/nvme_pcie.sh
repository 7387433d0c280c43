#!/usr/bin/env bash
# The userspace NVMe PCIe driver (initiator/src/pcie/, vfio/, dma's IOVA registry) against
# QEMU's emulated NVMe controller behind the guest's virtual IOMMU.
#
# The kernel's nvme driver reports the controller first (nvme-cli); scripts/setup.sh hands it
# to vfio-pci; plexperf then drives it with no kernel in the data path: Identify must match
# what the kernel reported (shadow doorbells and SGLs in use where it offers them), and
# verified random writes and reads must read back: at 4 KiB, 128 KiB and 1 MiB (one SGL data
# block, then PRP lists reading back what those wrote), on two queue pairs at once and on two
# controllers at once. A second plexperf run (a new controller bring-up) checks every block
# the first acknowledged. Bad addresses, a device in use and a shared IOMMU group give clear
# errors; reset gives the controller back to the kernel, which finds its namespace again.
#
# On the host it boots the guest with `run.sh --nvme --nvme --nvme-shared-group`; inside a
# guest that is already up (scripts/test.sh runs every guest test in one boot) it uses the
# controllers with serials plexstor-nvme0 and 1 (and plexstor-grp0 and 1), and leaves them
# bound to nvme.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 18

reexec_in_guest --nvme --nvme --nvme-shared-group --nvme-size 256M --hugepages 64 --timeout 300 -- "$0" "$@"

REPO=$GUEST_LIB_REPO
SETUP=$REPO/scripts/setup.sh
PLEXPERF=${PLEXPERF:-$REPO/build/release/plexperf}
NQN=nqn.2019-08.org.qemu:plexstor-nvme0
NQN2=nqn.2019-08.org.qemu:plexstor-nvme1
WORK=$(mktemp -d /tmp/nvme-pcie.XXXXXX)
BDF=''
BDF2=''
PAGES_BEFORE=$(cat /proc/sys/vm/nr_hugepages)

# setup.sh limited to our controllers, with 64 hugepages for plexperf's buffers.
setup_sh() { env PCI_ALLOWED="$BDF $BDF2" HUGEMEM=128 "$SETUP" "$@" >"$WORK/setup.log" 2>&1; }


# The guest's binding and hugepage count are put back for the tests that follow in the boot.
cleanup() {
    if [ -n "$BDF" ] && [ "$(driver_of "$BDF")$(driver_of "$BDF2")" != nvmenvme ]; then setup_sh reset || true; fi
    echo "$PAGES_BEFORE" >/proc/sys/vm/nr_hugepages
    rm -rf "$WORK"
}
trap cleanup EXIT

# One plexperf run over PCIe; its report in $WORK/perf.log, its log in $WORK/perf.err, both
# shown as comments on failure.
perf() {
    if "$PLEXPERF" -r "trtype:PCIe traddr:$BDF" "$@" >"$WORK/perf.log" 2>"$WORK/perf.err"; then
        return 0
    fi
    cat "$WORK/perf.log" "$WORK/perf.err" | sed 's/^/# /' | tail -n 15
    return 1
}

# ---- the kernel's view, before the handover -----------------------------------
modprobe nvme
DEV=$(wait_for_nvme_dev "$NQN" 1 30) || bail "controller plexstor-nvme0" "none (boot the guest with run.sh --nvme --nvme)"
wait_for_nvme_dev "$NQN2" 1 30 >/dev/null || bail "controller plexstor-nvme1" "none (boot the guest with run.sh --nvme --nvme)"
BDF=$(nvme_bdf_of "$NQN")
BDF2=$(nvme_bdf_of "$NQN2")
[ -n "$BDF" ] && [ -n "$BDF2" ] || bail "controllers plexstor-nvme0 and 1" "no PCI address"
K_MODEL=$(nvme id-ctrl "$DEV" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["mn"].strip())')
K_SERIAL=$(nvme id-ctrl "$DEV" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sn"].strip())')
# Doorbell Buffer Config offered (OACS bit 8): then our queues must use shadow doorbells.
K_SHADOW=$(nvme id-ctrl "$DEV" -o json | python3 -c 'import json,sys; print(bool(json.load(sys.stdin)["oacs"] & 0x100))')
# SGLs for I/O data (SGLS bits 1:0): then transfers past two pages use them.
K_SGLS=$(nvme id-ctrl "$DEV" -o json | python3 -c 'import json,sys; print(bool(json.load(sys.stdin)["sgls"] & 3))')
K_BLOCKS=$(nvme id-ns "$DEV" -n 1 -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nsze"])')
pass "the kernel reports $BDF: model '$K_MODEL', serial '$K_SERIAL', $K_BLOCKS blocks"

# ---- refused before the handover ----------------------------------------------
if ! out=$("$PLEXPERF" -r "trtype:PCIe traddr:$BDF" --identify 2>&1) &&
    grep -q "bound to nvme, not bound to vfio-pci: run scripts/setup.sh" <<<"$out"; then
    pass "a controller the kernel drives is refused, naming setup.sh"
else
    fail "a controller the kernel drives is refused" "$(tail -n1 <<<"$out")"
fi

# ---- handover -------------------------------------------------------------------
if setup_sh && [ "$(driver_of "$BDF")" = vfio-pci ] && [ "$(driver_of "$BDF2")" = vfio-pci ]; then
    pass "setup.sh binds $BDF and $BDF2 to vfio-pci"
else
    bail "setup.sh binds $BDF and $BDF2 to vfio-pci" "$(tail -n1 "$WORK/setup.log")"
fi

if perf --identify --json; then
    id=$(cat "$WORK/perf.log")
    got=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); c=d["controller"]; n=d["namespaces"][0]
print(c["model"], "|", c["serial"], "|", n["blocks"], "| shadow doorbells", c["shadow_doorbells"], "| SGLs", c["sgls"])' "$id")
    want="$K_MODEL | $K_SERIAL | $K_BLOCKS | shadow doorbells $K_SHADOW | SGLs $K_SGLS"
    if [ "$got" = "$want" ]; then
        pass "Identify over VFIO matches the kernel's ($got)"
    else
        fail "Identify over VFIO matches the kernel's" "got '$got', kernel '$want'"
    fi
else
    fail "Identify over VFIO" "plexperf --identify failed"
fi

# ---- data ------------------------------------------------------------------------
STATE=$WORK/verify.state
# Past two pages a transfer goes as one SGL data block where the controller takes SGLs
# (QEMU's does), else on a PRP list; --prp-only makes it a PRP list either way. Each
# --prp-only run follows the run of its size and continues its verify state, so it also
# reads back what the SGL run wrote (a run of another size in between would overwrite it).
for run in 4096 131072 131072:--prp-only 1048576 1048576:--prp-only; do
    size=${run%%:*} how=
    [ "$run" = "$size" ] || how=${run#*:}
    # shellcheck disable=SC2086 # $how is one option or none
    if perf --verify --verify-state "$STATE.$size" -w randrw -o "$size" -q 8 -t 2 --warmup 0 --size 67108864 $how; then
        pass "verified random writes and reads of $size bytes${how:+ ($how)} ($(grep -m1 '^verify:' "$WORK/perf.log"))"
    else
        fail "verified random writes and reads of $size bytes${how:+ ($how)}" "plexperf failed"
    fi
done
if perf --verify --verify-state "$STATE.last" -w randrw -o 4096 -q 16 -P 2 -t 2 --warmup 0 --size 67108864; then
    pass "two queue pairs at once ($(grep -m1 '^verify:' "$WORK/perf.log"))"
else
    fail "two queue pairs at once" "plexperf failed"
fi
# A new bring-up (disable, admin queue, enable) finds what the last run acknowledged.
if perf --verify --verify-state "$STATE.last" -w read -o 4096 -q 8 -P 2 -t 1 --warmup 0 --size 67108864 &&
    grep -qE '^verify: [1-9][0-9]* blocks checked, .* 0 mismatches' "$WORK/perf.log"; then
    pass "a second bring-up reads back every acknowledged block ($(grep -m1 '^verify:' "$WORK/perf.log"))"
else
    fail "a second bring-up reads back every acknowledged block" "$(grep -m1 '^verify:' "$WORK/perf.log" || echo 'plexperf failed')"
fi

# Two controllers in one process: one VFIO container, one IOMMU address space for both.
if perf -r "trtype:PCIe traddr:$BDF2" --verify -w randrw -o 8192 -q 8 -t 2 --warmup 0 --size 67108864 &&
    grep -q "traddr:$BDF " "$WORK/perf.log" && grep -q "traddr:$BDF2 " "$WORK/perf.log"; then
    pass "two controllers at once ($(grep -m1 '^verify:' "$WORK/perf.log"))"
else
    fail "two controllers at once" "plexperf failed or did not report both"
fi

# ---- bad input --------------------------------------------------------------------
expect_error() { # NAME TRADDR PATTERN
    local out
    if ! out=$("$PLEXPERF" -r "trtype:PCIe traddr:$2" --identify 2>&1) && grep -q "$3" <<<"$out"; then
        pass "$1"
    else
        fail "$1" "$(tail -n1 <<<"$out")"
    fi
}
expect_error "a PCI address with no device is named" 0000:00:1f.7 "no PCI device 0000:00:1f.7"
expect_error "a malformed address is named" 00:04 "\`00:04\` is not a PCI address"
# The device is ours while a first plexperf holds it: a second one is told it is in use.
"$PLEXPERF" -r "trtype:PCIe traddr:$BDF" -w randread -t 3 --warmup 0 >/dev/null 2>&1 &
holder=$!
wait_until 10 grep -q vfio "/proc/$holder/maps" 2>/dev/null || true
expect_error "a controller another process holds is refused" "$BDF" "in use by another process"
wait "$holder" || true

# A controller whose IOMMU group holds another device the kernel drives (two controllers
# behind one PCI-to-PCI bridge: run.sh --nvme-shared-group): setup.sh hands it over but
# warns, and opening it is refused naming the other device, which vfio would need too.
GRP0=$(nvme_bdf_of nqn.2019-08.org.qemu:plexstor-grp0)
GRP1=$(nvme_bdf_of nqn.2019-08.org.qemu:plexstor-grp1)
if [ -z "$GRP0" ] || [ -z "$GRP1" ]; then
    skip --required "a group shared with a device the kernel drives is refused, naming it" \
        "no controllers plexstor-grp0 and 1 (boot the guest with run.sh --nvme-shared-group)"
elif ! env PCI_ALLOWED="$GRP0" HUGEMEM=128 "$SETUP" >"$WORK/grp.log" 2>&1 ||
    ! grep -q "shares IOMMU group .* with $GRP1 (driver nvme)" "$WORK/grp.log"; then
    fail "setup.sh hands over $GRP0 warning that $GRP1 shares its group" "$(tail -n1 "$WORK/grp.log")"
else
    expect_error "a group shared with a device the kernel drives is refused, naming it" \
        "$GRP0" "these are not: $GRP1 (bound to nvme)"
fi
if [ -n "$GRP0" ] && [ "$(driver_of "$GRP0")" = vfio-pci ]; then
    env PCI_ALLOWED="$GRP0" HUGEMEM=128 "$SETUP" reset >>"$WORK/grp.log" 2>&1
fi

# ---- back to the kernel ----------------------------------------------------------
if setup_sh reset && [ "$(driver_of "$BDF")" = nvme ] && [ "$(driver_of "$BDF2")" = nvme ]; then
    pass "reset gives $BDF and $BDF2 back to nvme"
else
    fail "reset gives $BDF back to nvme" "$(tail -n1 "$WORK/setup.log")"
fi
if dev=$(wait_for_nvme_dev "$NQN" 1 30) &&
    [ "$(nvme id-ns "$dev" -n 1 -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nsze"])')" = "$K_BLOCKS" ]; then
    pass "the kernel finds its namespace again ($dev, $K_BLOCKS blocks)"
else
    fail "the kernel finds its namespace again" "no block device for $NQN"
fi
finish
