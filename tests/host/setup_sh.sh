#!/usr/bin/env bash
# scripts/setup.sh on this host: hugepages are reserved, shown, kept on a second
# run and released by reset CLEAR_HUGE=yes. The machine's hugepage count and
# hugetlbfs mount are put back as they were at the end.
#
# PCI_ALLOWED names a BDF that does not exist, so no NVMe device of the machine
# running the test is ever touched (binding is tested in the guest:
# tests/guest/setup_sh.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tests/guest/lib.sh
. "$REPO/tests/guest/lib.sh"

plan 21

SETUP=$REPO/scripts/setup.sh
NO_SUCH_DEVICE=ffff:ff:1f.7
export PCI_ALLOWED=$NO_SUCH_DEVICE

PAGE_KB=$(awk '/^Hugepagesize:/ { print $2 }' /proc/meminfo)
NR_FILE=/sys/kernel/mm/hugepages/hugepages-${PAGE_KB}kB/nr_hugepages
PREVIOUS_PAGES=
HUGETLBFS_WAS_MOUNTED=no

hugetlbfs_mounts() {
    awk '$2 == "/dev/hugepages" && $3 == "hugetlbfs"' /proc/mounts | wc -l
}

remember_machine_state() {
    PREVIOUS_PAGES=$(cat "$NR_FILE")
    [ "$(hugetlbfs_mounts)" = 0 ] || HUGETLBFS_WAS_MOUNTED=yes
}

restore_machine_state() {
    [ -n "$PREVIOUS_PAGES" ] || return 0
    echo "$PREVIOUS_PAGES" >"$NR_FILE" || true
    if [ "$HUGETLBFS_WAS_MOUNTED" = no ] && [ "$(hugetlbfs_mounts)" != 0 ]; then
        umount /dev/hugepages 2>/dev/null || true
    fi
}

# expect_pages NAME COUNT
expect_pages() {
    local got
    got=$(cat "$NR_FILE")
    if [ "$got" = "$2" ]; then pass "$1"; else fail "$1" "nr_hugepages is $got, expected $2"; fi
}

# Only ever grow the reservation during the test, so that programs of others
# that use hugepages on this machine keep theirs.
test_config_reserves() {
    local mib=$(((PREVIOUS_PAGES * PAGE_KB) / 1024 + 64)) want out
    want=$(((mib * 1024) / PAGE_KB))
    if out=$(HUGEMEM=$mib "$SETUP" 2>&1); then
        pass "HUGEMEM=$mib setup.sh exits 0"
    else
        fail "HUGEMEM=$mib setup.sh exits 0" "$(tail -n1 <<<"$out")"
    fi
    expect_pages "HUGEMEM=$mib reserves $want pages of ${PAGE_KB}kB" "$want"
    if grep -q "no NVMe devices" <<<"$out"; then
        pass "without NVMe devices it says so"
    else
        fail "without NVMe devices it says so" "output: $(tr '\n' '|' <<<"$out")"
    fi
    if [ "$(hugetlbfs_mounts)" = 1 ]; then
        pass "hugetlbfs mounted at /dev/hugepages"
    else
        fail "hugetlbfs mounted at /dev/hugepages" "$(hugetlbfs_mounts) mounts"
    fi

    out=$("$SETUP" status 2>&1) || true
    if awk -v s="${PAGE_KB}kB" -v n="$want" '$2 == s && $4 == n { f = 1 } END { exit !f }' <<<"$out"; then
        pass "status shows $want pages of ${PAGE_KB}kB"
    else
        fail "status shows $want pages of ${PAGE_KB}kB" "$(tr '\n' '|' <<<"$out")"
    fi
    if grep -q "^NVMe devices" <<<"$out"; then pass "status has an NVMe section"; else fail "status has an NVMe section" "missing"; fi

    if HUGEMEM=$mib "$SETUP" >/dev/null 2>&1; then
        pass "second run exits 0"
    else
        fail "second run exits 0" "non-zero"
    fi
    expect_pages "second run keeps $want pages" "$want"
    if [ "$(hugetlbfs_mounts)" = 1 ]; then
        pass "second run does not mount hugetlbfs again"
    else
        fail "second run does not mount hugetlbfs again" "$(hugetlbfs_mounts) mounts"
    fi

    check "HUGE_EVEN_ALLOC=yes exits 0" env HUGE_EVEN_ALLOC=yes HUGEMEM=$mib "$SETUP" || true
    expect_pages "HUGE_EVEN_ALLOC=yes gives $want pages in all" "$want"
    check "NRHUGE=$((want + 3)) exits 0" env NRHUGE=$((want + 3)) "$SETUP" || true
    expect_pages "NRHUGE=$((want + 3)) reserves that many" "$((want + 3))"
}

test_bad_input() {
    if HUGEMEM=lots "$SETUP" >/dev/null 2>&1; then
        fail "HUGEMEM=lots is refused" "exit 0"
    else
        pass "HUGEMEM=lots is refused"
    fi
    local mem_mib before out
    mem_mib=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
    before=$(cat "$NR_FILE")
    if out=$(HUGEMEM=$mem_mib "$SETUP" 2>&1); then
        fail "HUGEMEM=$mem_mib (all memory) is refused" "exit 0"
    elif grep -q "too little memory" <<<"$out" && [ "$(cat "$NR_FILE")" = "$before" ]; then
        pass "HUGEMEM=$mem_mib (all memory) is refused and changes nothing"
    else
        fail "HUGEMEM=$mem_mib (all memory) is refused and changes nothing" "$(tail -n1 <<<"$out")"
    fi
    if "$SETUP" frobnicate >/dev/null 2>&1; then
        fail "an unknown action is refused" "exit 0"
    else
        pass "an unknown action is refused"
    fi
    if "$SETUP" help | grep -q reset; then pass "help describes the actions"; else fail "help describes the actions" "no 'reset'"; fi
}

test_reset_clears() {
    local out total
    if out=$(CLEAR_HUGE=yes "$SETUP" reset 2>&1); then
        pass "reset CLEAR_HUGE=yes exits 0"
    else
        fail "reset CLEAR_HUGE=yes exits 0" "$(tail -n1 <<<"$out")"
    fi
    total=$(awk '/^HugePages_Total:/ { print $2 }' /proc/meminfo)
    # Pages other programs still use stay until they let go.
    local in_use
    in_use=$(awk '/^HugePages_Total:/ { t = $2 } /^HugePages_Free:/ { f = $2 } END { print t - f }' /proc/meminfo)
    if [ "$total" -le "$in_use" ]; then
        pass "reset CLEAR_HUGE=yes releases the hugepages"
    else
        fail "reset CLEAR_HUGE=yes releases the hugepages" "HugePages_Total is still $total"
    fi
    if CLEAR_HUGE=yes "$SETUP" reset >/dev/null 2>&1; then pass "second reset exits 0"; else fail "second reset exits 0" "non-zero"; fi
}

main() {
    [ "$(id -u)" = 0 ] || skip_all --required "setup.sh on the host needs root"
    [ -e "$NR_FILE" ] || skip_all --required "no hugepage support in this kernel ($NR_FILE)"
    remember_machine_state
    trap restore_machine_state EXIT
    test_config_reserves
    test_bad_input
    test_reset_clears
    restore_machine_state
    expect_pages "the machine's $PREVIOUS_PAGES hugepages are back" "$PREVIOUS_PAGES"
    finish
}

main "$@"
