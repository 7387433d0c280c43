#!/usr/bin/env bash
# Runs every plexstor test on a fresh or a used machine, installing what the tests need:
#   1. builds the workspace (release: the guest runs these binaries, and speed matters there),
#   2. cargo's unit and integration tests, every test binary even after a failure; as root,
#      also the tests marked #[ignore = "needs root: ..."],
#   3. host tests (tests/host/*.sh): hugepages, SPDK's own JSON-RPC client and programs
#      (nvmf_tgt, spdk_nvme_perf, bdevperf from ../shared/spdk/bin) as peers, the deploy/
#      manifests against the Kubernetes schema, plexd on the host reached from the test
#      guest, the guest runner's stall watch, the fuzz targets' smoke run,
#   4. guest tests (tests/guest/*.sh) inside one QEMU guest running Debian's kernel, where the
#      kernel's NVMe/TCP initiator, nvmet and vfio-pci live. Should QEMU itself abort or an
#      emulated CPU stall, a fresh guest runs the interrupted script and the rest once more
#      (listed as noticed).
# Ends with one line "N passed, M failed, K skipped", after the list of failures and of skips
# with their reasons, and exits non-zero if anything failed.
#
# Each test script declares its results with a literal `plan N` line, the first in the file
# (tests/guest/lib.sh); a script that prints fewer results, or never runs, counts as a
# failure. Under CI=true the
# run must be complete: as root, with the guest, and with no test CI must run skipped
# (`skip --required`, e.g. SPDK's binaries where ../shared/spdk/bin has them).
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
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;p}' "$0"; exit 0 ;;
        *) echo "test.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

logdir="$repo/build/test-logs"
mkdir -p "$logdir"
passed=0
failed=0
skipped=0
failures=()
skips=()
notices=()

stage() { printf '\n=== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

record_failure() { # WHAT
    failed=$((failed + 1))
    failures+=("$1")
}

record_skip() { # COUNT WHAT
    skipped=$((skipped + $1))
    skips+=("$2")
}

# The literal `plan N` a test script declares, or nothing.
declared_plan() { sed -n 's/^[[:space:]]*plan \([0-9][0-9]*\)[[:space:]]*$/\1/p' "$1" | head -n1; }

# count_results NAME SCRIPT LOG RC: tallies the TAP lines one script printed into LOG.
# Results missing from the declared plan, or a non-zero exit with no `not ok` line, are
# failures; `1..0 # SKIP reason` skips the whole plan.
count_results() {
    local name=$1 script=$2 log=$3 rc=$4 plan ok bad skip printed whole
    plan=$(declared_plan "$script")
    whole=$(sed -n 's/^1\.\.0 # SKIP //p' "$log" | head -n1)
    skip=$(grep -cE '^ok - .* # SKIP' "$log" || true)
    ok=$(($(grep -c '^ok - ' "$log" || true) - skip))
    bad=$(grep -c '^not ok - ' "$log" || true)
    passed=$((passed + ok))
    failed=$((failed + bad))
    while IFS= read -r line; do
        [ -n "$line" ] && failures+=("$name: ${line#not ok - }")
    done < <(grep '^not ok - ' "$log" || true)
    while IFS= read -r line; do
        [ -n "$line" ] && record_skip 1 "$name: ${line#ok - }"
    done < <(grep -E '^ok - .* # SKIP' "$log" || true)
    if [ -n "$whole" ] && [ "$rc" -eq 0 ]; then
        record_skip "${plan:-1}" "$name: all ${plan:-?} results # SKIP $whole"
        return
    fi
    if [ -z "$plan" ]; then
        record_failure "$name: declares no 'plan N' line ($script)"
    else
        printed=$((ok + skip + bad))
        [ "$printed" -ge "$plan" ] ||
            record_failure "$name: printed $printed of its $plan planned results (log: $log)"
    fi
    if [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ]; then
        record_failure "$name: exited $rc without saying why (log: $log)"
    fi
}

# A whole script that did not run here: each of its planned results is a skip, or under CI a
# failure when CI must run it.
script_not_run() { # SCRIPT REASON
    local name plan
    name=$(basename "$1" .sh)
    plan=$(declared_plan "$1")
    if [ "${CI:-}" = true ]; then
        record_failure "$name: not run in CI: $2"
    else
        record_skip "${plan:-1}" "$name: all ${plan:-?} results # SKIP $2"
    fi
}

wanted() { [ -z "$only" ] || [[ "$1" == *"$only"* ]]; }

if [ "${CI:-}" = true ]; then
    [ "$(id -u)" = 0 ] || record_failure "CI must run as root: the root-only tests would be skipped"
    [ "$use_guest" = yes ] || record_failure "CI must run the guest tests: --no-guest given"
fi

# The tests check behaviour, not speed: without link-time optimisation each of the ~35 test
# binaries links in seconds instead of a quarter of a minute, which halves the build. The
# benchmarks (benches/) build with the release profile's LTO.
export CARGO_PROFILE_RELEASE_LTO=${CARGO_PROFILE_RELEASE_LTO:-off}

# The guest's prepare step also installs the Debian packages the tests need; run it first,
# since the cargo tests use some of them too (rdma-core's headers, for the rdma crate's
# layout test). It runs again, as a quick check, before the guest tests.
if [ "$use_guest" = yes ]; then
    stage "packages and the test guest"
    scripts/guest/prepare.sh || echo "test.sh: prepare failed; the guest stage reports it" >&2
fi

stage "build"
cargo build --release --workspace --bins

stage "cargo test"
cargo_log="$logdir/cargo-test.log"
cargo_args=(--release --workspace --no-fail-fast)
test_args=()
# The tests that need root (loop devices, hugepages) are #[ignore]d with their reason; as
# root they run like any other.
[ "$(id -u)" = 0 ] && test_args+=(--include-ignored)
[ -n "$only" ] && test_args+=("$only")
set +e
cargo test "${cargo_args[@]}" -- "${test_args[@]}" 2>&1 | tee "$cargo_log"
cargo_rc=${PIPESTATUS[0]}
# plexd's panic policy, with the panics injected by a test-only build (cargo feature
# fault-injection), then plain binaries again for the tests below.
if [ -z "$only" ] || [[ panic_policy == *"$only"* ]]; then
    cargo test --release -p plexd --features fault-injection --test panic_policy 2>&1 |
        tee -a "$cargo_log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && cargo_rc=$rc
    cargo build --release -p plexd --bins
fi
set -e
# One "Running …" or "Doc-tests …" line per test binary, each answered by one
# "test result: ok. 16 passed; 0 failed; 1 ignored; …" line.
cargo_binaries=$(grep -cE '^ *(Running|Doc-tests) ' "$cargo_log" || true)
cargo_reports=$(grep -c '^test result:' "$cargo_log" || true)
sum_field() { awk -v f="$1" '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ "^" f) n += $i } END { print n+0 }' "$cargo_log"; }
passed=$((passed + $(sum_field passed)))
cargo_bad=$(sum_field failed)
failed=$((failed + cargo_bad))
while IFS= read -r line; do
    [ -n "$line" ] && failures+=("cargo: ${line#test }")
done < <(grep -E '^test .* \.\.\. FAILED$' "$cargo_log" || true)
while IFS= read -r line; do
    [ -n "$line" ] && record_skip 1 "cargo: ${line#test }"
done < <(grep -E '^test .* \.\.\. ignored' "$cargo_log" || true)
if [ "$cargo_reports" -lt "$cargo_binaries" ]; then
    record_failure "cargo test: only $cargo_reports of $cargo_binaries test binaries reported (see $cargo_log)"
fi
if [ "$cargo_rc" -ne 0 ] && [ "$cargo_bad" -eq 0 ]; then
    record_failure "cargo test exited $cargo_rc with no failed test (build error? see $cargo_log)"
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
    [ "$rc" -eq 124 ] && echo "not ok - $name: timed out after 900 s" | tee -a "$log"
    count_results "$name" "$script" "$log" "$rc"
}

for t in tests/host/*.sh; do
    [ -e "$t" ] || continue
    wanted "$t" || continue
    case "$(basename "$t")" in *nvmf_host*|guest_runner*) needs_guest=yes ;; *) needs_guest=no ;; esac
    if [ "$needs_guest" = yes ] && [ "$use_guest" = no ]; then
        script_not_run "$t" "needs the test guest (--no-guest)"
        continue
    fi
    run_script "$t"
done

guest_tests=()
for t in tests/guest/*.sh; do
    case "$(basename "$t")" in lib.sh|all.sh) continue ;; esac
    wanted "$t" && guest_tests+=("$t")
done

# Splits the guest's log at all.sh's "--- guest: NAME" lines and tallies each script, so a
# script that never started (the guest died, or timed out before it) is a failure too.
count_guest_log() { # LOG RC
    local log=$1 rc=$2 t name part prc
    for t in "${guest_tests[@]}"; do
        name=$(basename "$t" .sh)
        part="$logdir/guest-$name.log"
        awk -v want="--- guest: $name" '
            $0 == want { on = 1; next }
            /^--- guest: / { on = 0 }
            on' "$log" >"$part"
        if ! grep -qx -- "--- guest: $name" "$log"; then
            record_failure "guest: $name never started (guest exit $rc; log: $log)"
            continue
        fi
        prc=$(sed -n "s/^--- guest: $name finished in .* (exit \([0-9]*\))\$/\1/p" "$log" | head -n1)
        count_results "$name" "$t" "$part" "${prc:-1}"
    done
}

# run_guest LOG SCRIPT...: one guest boot runs the scripts through all.sh; sets guest_rc.
run_guest() {
    local log=$1
    shift
    set +e
    # Two emulated controllers: the PCIe driver's tests drive both at once; two more
    # share an IOMMU group, for the refusal that names the other device.
    scripts/guest/run.sh --nvme --nvme --nvme-shared-group --nvme-size 512M --hugepages 256 --timeout 1500 -- \
        bash tests/guest/all.sh "$@" 2>&1 | tee "$log"
    guest_rc=${PIPESTATUS[0]}
    set -e
}

# The guest scripts LOG has no "finished" line for, in the order they run.
unfinished_guest_tests() { # LOG
    local t
    for t in "${guest_tests[@]}"; do
        grep -aqE -- "^--- guest: $(basename "$t" .sh) finished in " "$1" || echo "$t"
    done
}

if [ ${#guest_tests[@]} -gt 0 ] && [ "$use_guest" = no ]; then
    for t in "${guest_tests[@]}"; do script_not_run "$t" "needs the test guest (--no-guest)"; done
elif [ ${#guest_tests[@]} -gt 0 ]; then
    stage "test guest: prepare"
    if scripts/guest/prepare.sh; then
        stage "test guest: ${guest_tests[*]}"
        log="$logdir/guest.log"
        run_guest "$log" "${guest_tests[@]}"
        rc=$guest_rc
        # The emulator can fail under TCG, not a test: once, in CI, QEMU aborted on an
        # assertion in its softmmu (iotlb_to_section) while the PCIe tests drove the emulated
        # controllers; once an emulated CPU's timer stopped firing and the guest stalled
        # (run.sh stops it). A fresh guest then runs the interrupted script again from its
        # start, and those after it. Only once, and only for QEMU's own abort or crash or a
        # stalled CPU; a timeout or a failing test is never run again.
        crash=$(grep -a -m1 -E '^run\.sh: guest failed: (qemu exited with status (134|139)$|guest stalled: )' "$log" || true)
        mapfile -t rest < <(unfinished_guest_tests "$log")
        if [ "$rc" -ne 0 ] && [ -n "$crash" ] && [ ${#rest[@]} -gt 0 ]; then
            why=$(grep -a '^qemu-system-x86_64: ' "$log" | grep -v -m1 ': terminating on signal' || echo "${crash#run.sh: guest failed: }")
            interrupted=$(basename "${rest[0]}" .sh)
            notices+=("the emulator failed during guest: $interrupted ($why); a fresh guest ran it again, and the ${#rest[@]} script(s) from it on")
            stage "test guest, after the emulator failed: ${rest[*]}"
            run_guest "$logdir/guest-rerun.log" "${rest[@]}"
            rc=$guest_rc
            # The interrupted script's partial section no longer counts: its header is renamed.
            { sed "s|^--- guest: $interrupted\$|--- guest (interrupted by the emulator; run again below): $interrupted|" "$log"
              cat "$logdir/guest-rerun.log"; } >"$logdir/guest-all.log"
            log="$logdir/guest-all.log"
        fi
        count_guest_log "$log" "$rc"
    else
        record_failure "guest: scripts/guest/prepare.sh failed; no guest test ran (${guest_tests[*]})"
    fi
fi

echo
if [ ${#notices[@]} -gt 0 ]; then
    echo "noticed:"
    printf '  %s\n' "${notices[@]}"
fi
if [ ${#skips[@]} -gt 0 ]; then
    echo "skipped:"
    printf '  %s\n' "${skips[@]}"
fi
if [ ${#failures[@]} -gt 0 ]; then
    echo "failures:"
    printf '  %s\n' "${failures[@]}"
fi
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
