#!/usr/bin/env bash
# Fuzzes every parser of untrusted input with cargo-fuzz (libFuzzer): NVMe/TCP PDUs and
# commands, the target's and the host's receive paths, the host's controller layer against a
# target that lies in well-framed answers, RDMA CM private data, JSON-RPC
# framing and requests, the mirror's and the volume store's on-disk metadata.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET...]
# cargo-fuzz wants a nightly compiler for its sanitizer flags; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them. Corpora persist in build/fuzz-corpus/<target> so each run
# starts where the last one stopped; crashes land in fuzz/artifacts/<target>/. Inputs kept in
# the repo, fuzz/corpus/<target>/ (past findings, seeds), are read too but never written:
# libFuzzer adds new inputs to the first corpus directory only.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo/fuzz"
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^plexstor-fuzz$')
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (once)"
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
status=0
for t in "${targets[@]}"; do
    corpus="$repo/build/fuzz-corpus/$t"
    mkdir -p "$corpus"
    corpora=("$corpus")
    [ -d "$repo/fuzz/corpus/$t" ] && corpora+=("$repo/fuzz/corpus/$t")
    echo "=== fuzzing $t for ${seconds}s (corpus ${corpora[*]})"
    if cargo fuzz run "$t" "${corpora[@]}" -- -max_total_time="$seconds" -rss_limit_mb=2048; then
        echo "ok - fuzz $t: no crash in ${seconds}s"
    else
        echo "not ok - fuzz $t: crashed; reproducer in fuzz/artifacts/$t/"
        status=1
    fi
done
exit $status
