#!/usr/bin/env bash
# A configuration SPDK's own save_config wrote (target/tests/data/spdk-save_config-nvmf_tgt.json:
# an nvmf_tgt with malloc bdevs, a TCP transport, a subsystem, namespaces, listeners, and the
# sections of SPDK subsystems plexd does not have) loads into plexd through SPDK's own client,
# `spdk-rpc load_config`, and through `plexd -c`; a changed option is refused by name.
#
#   tests/host/spdk_config.sh     prints "ok - NAME" / "not ok - NAME: REASON"; exit 1 on failure
#
# spdk-rpc comes from lib.sh's spdk_rpc_install. PLEXD=path/to/plexd skips the build.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 8

check "spdk-rpc $SPDK_PY_VERSION installed and runs" spdk_rpc_install || bail "spdk-rpc" "not installed"

if [ -z "${PLEXD:-}" ]; then
    (cd "$REPO" && cargo build -q --release -p plexd --bin plexd) || bail "build plexd" "cargo build failed"
    PLEXD=$REPO/build/release/plexd
fi
mkdir -p "$REPO/build"
WORK=$(mktemp -d "$REPO/build/spdk-config.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(free_tcp_port)
FIXTURE=$REPO/target/tests/data/spdk-save_config-nvmf_tgt.json
# The file as SPDK wrote it, its listeners moved off 4420 (something else may hold it).
sed "s/\"trsvcid\": \"4420\"/\"trsvcid\": \"$PORT\"/" "$FIXTURE" >"$WORK/spdk.json"
# The same with one option away from SPDK's default.
sed 's/"small_pool_count": 8192/"small_pool_count": 16384/' "$WORK/spdk.json" >"$WORK/changed.json"

# start_plexd NAME [ARGS...]: a plexd on $WORK/NAME.sock; sets SOCK.
start_plexd() {
    local name=$1
    shift
    SOCK=$WORK/$name.sock
    "$PLEXD" --no-pin -m 0x1 -r "$SOCK" "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    wait_until 20 test -S "$SOCK"
}
srpc() { "$SPDK_RPC" -s "$SOCK" -t 10 "$@"; }

# What the file describes is there: bdevs, transport, subsystem with namespaces and listener.
target_is_there() {
    local b t s
    b=$(srpc bdev_get_bdevs) && t=$(srpc nvmf_get_transports) && s=$(srpc nvmf_get_subsystems) ||
        return 1
    B=$b T=$t S=$s PORT=$PORT python3 -c '
import json, os
b = {x["name"]: x for x in json.loads(os.environ["B"])}
t = json.loads(os.environ["T"])
s = {x["nqn"]: x for x in json.loads(os.environ["S"])}
c = s["nqn.2016-06.io.spdk:cnode1"]
assert b["Malloc0"]["num_blocks"] == 131072 and b["Malloc1"]["block_size"] == 4096, b
assert [x["trtype"] for x in t] == ["TCP"] and t[0]["max_io_size"] == 131072, t
assert [(n["nsid"], n["bdev_name"]) for n in c["namespaces"]] == [(1, "Malloc0"), (2, "Malloc1")], c
assert any(a["trsvcid"] == os.environ["PORT"] for a in c["listen_addresses"]), c
'
}

# ---- spdk-rpc load_config into a running plexd ---------------------------------------------
if start_plexd rpc; then
    pass "plexd started"
    check "spdk-rpc load_config takes SPDK's save_config" srpc load_config -j "$WORK/spdk.json"
    check "load_config made the bdevs, transport, subsystem, namespaces, listener" target_is_there
    check "the listener accepts" python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 5).close()"
    out=$(srpc load_config -j "$WORK/changed.json" 2>&1) && rc=0 || rc=$?
    if [ "$rc" != 0 ] && grep -q "iobuf_set_options: small_pool_count=16384 is not supported" <<<"$out"; then
        pass "load_config refuses a changed option naming method and field"
    else
        printf '%s\n' "$out" | tail -n 5 | sed 's/^/# /'
        fail "load_config refuses a changed option naming method and field" "exit $rc"
    fi
else
    fail "plexd started" "no socket: $(tail -n 3 "$WORK/rpc.log")"
    for n in "load_config" "load_config made" "listener" "refusal"; do fail "$n" "not run: no plexd"; done
fi

# ---- plexd -c ---------------------------------------------------------------------------------
kill "${PIDS[0]}" 2>/dev/null
wait "${PIDS[0]}" 2>/dev/null
PIDS=()
if start_plexd cfg -c "$WORK/spdk.json"; then
    check "plexd -c SPDK's save_config: everything is there" target_is_there
else
    fail "plexd -c SPDK's save_config: everything is there" "$(tail -n 3 "$WORK/cfg.log")"
fi
out=$("$PLEXD" --no-pin -m 0x1 -r "$WORK/bad.sock" -c "$WORK/changed.json" 2>&1) && rc=0 || rc=$?
if [ "$rc" = 1 ] && grep -q "subsystem iobuf entry 0 (iobuf_set_options)" <<<"$out"; then
    pass "plexd -c refuses a changed option, naming section, method and field"
else
    printf '%s\n' "$out" | tail -n 5 | sed 's/^/# /'
    fail "plexd -c refuses a changed option, naming section, method and field" "exit $rc"
fi

finish
