# Shared by the host tests that drive plexd with SPDK's own JSON-RPC client (`spdk-rpc`, PyPI
# package `spdk`). Source after tests/guest/lib.sh and `plan`; it prints two results:
#   spdk_rpc_venv       "spdk-rpc VERSION installed and runs" (installs it into a venv)
#   spdk_rpc_plexd ARGS "plexd started" (plexd ARGS on a fresh socket; killed at exit)
# then offers rpc, expect and refused. Files below tests/host/lib/ are not tests themselves.
#
# The venv is lib.sh's (spdk_rpc_install). PLEXD=path/to/plexd skips the build.

spdk_rpc_venv() {
    local err
    err=$(spdk_rpc_install 2>&1 >/dev/null) ||
        bail "spdk-rpc $SPDK_PY_VERSION installed and runs" "$(tail -n1 <<<"$err")"
    pass "spdk-rpc $(spdk_rpc_version) installed and runs"
}

PLEXD_PID=
WORK=
spdk_rpc_cleanup() {
    if [ -n "$PLEXD_PID" ]; then
        kill "$PLEXD_PID" 2>/dev/null
        wait "$PLEXD_PID" 2>/dev/null
    fi
    [ -n "$WORK" ] && rm -rf "$WORK"
}

plexd_socket_up() {
    kill -0 "$PLEXD_PID" 2>/dev/null || return 0 # dead: stop waiting, the check below says so
    [ -S "$SOCK" ]
}

# spdk_rpc_plexd [PLEXD-ARGS...]: builds plexd if $PLEXD is unset, starts it on $SOCK in $WORK.
spdk_rpc_plexd() {
    if [ -z "${PLEXD:-}" ]; then
        # Release, as scripts/test.sh has just built it: then this is a no-op.
        (cd "$REPO" && cargo build -q --release -p plexd --bin plexd) ||
            bail "build plexd" "cargo build failed"
        PLEXD=$REPO/build/release/plexd
    fi
    # On disk, not tmpfs, so the uring bdev gets O_DIRECT.
    mkdir -p "$REPO/build"
    WORK=$(mktemp -d "$REPO/build/spdk-rpc.XXXXXX")
    SOCK=$WORK/plexd.sock
    trap spdk_rpc_cleanup EXIT
    "$PLEXD" --no-pin -r "$SOCK" "$@" >"$WORK/plexd.log" 2>&1 &
    PLEXD_PID=$!
    wait_until 10 plexd_socket_up
    if kill -0 "$PLEXD_PID" 2>/dev/null && [ -S "$SOCK" ]; then
        pass "plexd started"
    else
        bail "start plexd" "no socket: $(tail -n 3 "$WORK/plexd.log")"
    fi
}

rpc() { "$SPDK_RPC" -s "$SOCK" -t 10 "$@"; }

# expect NAME PYTHON-ASSERTION METHOD [ARGS...]: runs spdk-rpc; its stdout must succeed and
# satisfy the assertion, a Python expression over `out` (text) and `j` (parsed JSON, or None).
expect() {
    local name=$1 cond=$2 out rc=0
    shift 2
    out=$(rpc "$@" 2>&1) || rc=$?
    if [ "$rc" != 0 ]; then
        printf '%s\n' "$out" | tail -n 12 | sed 's/^/# /'
        fail "$name" "spdk-rpc $1 exited $rc"
        return
    fi
    if OUT=$out python3 -c '
import base64, json, os, sys
out = os.environ["OUT"]
try:
    j = json.loads(out)
except ValueError:
    j = None
sys.exit(0 if eval("(" + sys.argv[1] + ")") else 1)' "$cond"; then
        pass "$name"
    else
        printf '%s\n' "$out" | head -n 20 | sed 's/^/# /'
        fail "$name" "output does not satisfy: $cond"
    fi
}

# refused NAME PATTERN METHOD [ARGS...]: spdk-rpc must fail, and its output match PATTERN.
refused() {
    local name=$1 pattern=$2 out rc=0
    shift 2
    out=$(rpc "$@" 2>&1) || rc=$?
    if [ "$rc" != 0 ] && printf '%s' "$out" | grep -q -- "$pattern"; then
        pass "$name"
    else
        printf '%s\n' "$out" | tail -n 8 | sed 's/^/# /'
        fail "$name" "exit $rc, no '$pattern' in the output"
    fi
}
