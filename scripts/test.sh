#!/usr/bin/env bash
# Runs every plexstor test on a fresh or a used machine, installing what the tests need:
#   1. builds the workspace (release: the guest runs these binaries, and speed matters there),
#   2. cargo's unit and integration tests,
#   3. host tests (tests/host/*.sh): hugepages, SPDK's own JSON-RPC client, plexd on the host
#      reached from the test guest,
#   4. guest tests (tests/guest/*.sh) inside one QEMU guest running Debian's kernel, where the
#      kernel's NVMe/TCP initiator, nvmet and vfio-pci live.
# Ends with one line "N passed, M failed" and exits non-zero if anything failed.
#
# Usage: scripts/test.sh [--no-guest] [--only PATTERN]
#   --no-guest      skip everything that boots the test guest (quick runs while coding)
#   --only PATTERN  run only test scripts whose file name contains PATTERN (cargo tests too)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

use_guest=yes
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --no-guest) use_guest=no ;;
        --only) only=${2:?--only needs a pattern}; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "test.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

logdir="$repo/build/test-logs"
mkdir -p "$logdir"
passed=0
failed=0
failures=()

stage() { printf '\n=== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

# Counts the `ok - ` / `not ok - ` lines a test script printed; a script that failed without
# printing a `not ok` line still counts as one failure.
count_script() {
    local name=$1 log=$2 rc=$3 ok bad
    ok=$(grep -c '^ok - ' "$log" || true)
    bad=$(grep -c '^not ok - ' "$log" || true)
    if [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ]; then
        bad=1
        echo "not ok - $name: exited $rc without saying why (log: $log)"
    fi
    passed=$((passed + ok))
    failed=$((failed + bad))
    if [ "$bad" -gt 0 ]; then
        while IFS= read -r line; do failures+=("$name: ${line#not ok - }"); done \
            < <(grep '^not ok - ' "$log" || echo "not ok - exit $rc")
    fi
}

wanted() { [ -z "$only" ] || [[ "$1" == *"$only"* ]]; }

stage "build"
cargo build --release --workspace --bins

stage "cargo test"
cargo_log="$logdir/cargo-test.log"
cargo_filter=()
[ -n "$only" ] && cargo_filter=("$only")
set +e
cargo test --release --workspace -- "${cargo_filter[@]}" 2>&1 | tee "$cargo_log"
cargo_rc=${PIPESTATUS[0]}
set -e
# "test result: ok. 16 passed; 0 failed; ..." once per test binary.
cargo_ok=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) n += $i } END { print n+0 }' "$cargo_log")
cargo_bad=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) n += $i } END { print n+0 }' "$cargo_log")
passed=$((passed + ${cargo_ok:-0}))
failed=$((failed + ${cargo_bad:-0}))
if [ "$cargo_rc" -ne 0 ]; then
    if [ "${cargo_bad:-0}" -eq 0 ]; then failed=$((failed + 1)); fi
    failures+=("cargo test exited $cargo_rc (see $cargo_log)")
fi

run_script() {
    local script=$1 name log rc
    name=$(basename "$script" .sh)
    log="$logdir/$name.log"
    stage "$script"
    set +e
    timeout 900 bash "$script" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    count_script "$name" "$log" "$rc"
}

for t in tests/host/*.sh; do
    [ -e "$t" ] || continue
    case "$(basename "$t")" in *nvmf_host*) needs_guest=yes ;; *) needs_guest=no ;; esac
    [ "$needs_guest" = yes ] && [ "$use_guest" = no ] && continue
    wanted "$t" && run_script "$t"
done

if [ "$use_guest" = yes ]; then
    stage "test guest: prepare"
    scripts/guest/prepare.sh
    guest_tests=()
    for t in tests/guest/*.sh; do
        case "$(basename "$t")" in lib.sh|all.sh) continue ;; esac
        wanted "$t" && guest_tests+=("$t")
    done
    if [ ${#guest_tests[@]} -gt 0 ]; then
        stage "test guest: ${guest_tests[*]}"
        log="$logdir/guest.log"
        set +e
        scripts/guest/run.sh --nvme --hugepages 256 --timeout 1500 -- \
            bash tests/guest/all.sh "${guest_tests[@]}" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        set -e
        count_script guest "$log" "$rc"
    fi
fi

echo
if [ ${#failures[@]} -gt 0 ]; then
    echo "failures:"
    printf '  %s\n' "${failures[@]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
