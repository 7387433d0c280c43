#!/usr/bin/env bash
# Every cargo-fuzz target still builds and runs: a target broken by an API change, or one that
# crashes on an input kept in the repo (fuzz/corpus/<target>/, past findings), fails here
# rather than on the next long fuzzing session (scripts/fuzz.sh).
#
#   tests/host/fuzz_smoke.sh      prints "ok - NAME" / "not ok - NAME: REASON"; exit 1 on failure
#
# Each target runs FUZZ_SMOKE_SECONDS (default 5) over the repo corpus, writing new inputs to a
# scratch directory so the repo's corpus is never touched; a crashing input lands in
# fuzz/artifacts/<target>/. The targets are built unoptimised (`--dev`): a smoke run needs
# them to build and to survive the corpus, not speed, and a cold optimised build of the
# sanitized targets took most of this script's four minutes in CI. scripts/fuzz.sh builds
# them optimised for long sessions.
# cargo-fuzz is installed from crates.io if missing.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 3

SECONDS_PER_TARGET=${FUZZ_SMOKE_SECONDS:-5}
# cargo-fuzz wants nightly-only sanitizer flags; this lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
cd "$REPO/fuzz" || bail "fuzz directory" "no $REPO/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "# installing cargo-fuzz from crates.io (once)"
    cargo install --locked cargo-fuzz >&2 || bail "cargo-fuzz installed" "cargo install cargo-fuzz failed"
fi
pass "cargo-fuzz installed ($(cargo fuzz --version 2>/dev/null))"

mapfile -t targets < <(cargo fuzz list 2>/dev/null)
[ ${#targets[@]} -gt 0 ] || bail "fuzz targets build" "cargo fuzz list found no targets"
check "fuzz targets build (${targets[*]})" cargo fuzz build --dev ||
    bail "fuzz targets run" "not run: the build failed"

mkdir -p "$REPO/build"
SCRATCH=$(mktemp -d "$REPO/build/fuzz-smoke.XXXXXX") || bail "fuzz targets run" "no scratch directory"
trap 'rm -rf "$SCRATCH"' EXIT

# Runs TARGET for SECONDS_PER_TARGET; its output is shown only if it fails.
run_target() {
    local target=$1 corpora
    corpora=("$SCRATCH/$target")
    mkdir -p "${corpora[0]}"
    [ -d "$REPO/fuzz/corpus/$target" ] && corpora+=("$REPO/fuzz/corpus/$target")
    cargo fuzz run --dev "$target" "${corpora[@]}" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048
}

broken=()
for t in "${targets[@]}"; do
    if ! out=$(run_target "$t" 2>&1); then
        printf '%s\n' "$out" | grep -E 'ERROR|panicked|SUMMARY|Test unit written' | tail -n 8 | sed "s/^/# $t: /"
        broken+=("$t")
    fi
done
if [ ${#broken[@]} -eq 0 ]; then
    pass "fuzz targets run ${SECONDS_PER_TARGET}s each over fuzz/corpus"
else
    fail "fuzz targets run" "crashed: ${broken[*]} (inputs in fuzz/artifacts/<target>/; scripts/fuzz.sh 60 ${broken[*]} fuzzes on)"
fi

finish
