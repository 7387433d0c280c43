#!/usr/bin/env bash
# plexd on the HOST (127.0.0.1:PORT), the test guest's kernel initiator connecting to it as
# 10.0.2.2:PORT and running a short fio verify.
#
#   tests/host/nvmf_host_plexd.sh          (needs: cargo build --release -p plexd)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tests/guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 5

PLEXD=${PLEXD:-$REPO/build/release/plexd}
NQN=nqn.2024-01.io.plexstor:hostplexd
PORT=$(free_tcp_port)
WORK=$(mktemp -d /tmp/nvmf-host.XXXXXX)
SOCK=$WORK/plexd.sock
PLEXD_PID=

[ -x "$PLEXD" ] || { echo "build plexd first: cargo build --release -p plexd" >&2; exit 2; }


cleanup() {
    [ -n "$PLEXD_PID" ] && kill "$PLEXD_PID" 2>/dev/null && wait "$PLEXD_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

"$PLEXD" -m 0x1 --no-pin -r "$SOCK" --idle-poll-us 200 >"$WORK/plexd.log" 2>&1 &
PLEXD_PID=$!
wait_for_plexd "$PLEXD_PID" || bail "plexd starts" "$(tail -n 3 "$WORK/plexd.log")"
check "plexd on the host configured" sh -c "
    $(declare -f rpc); SOCK=$SOCK
    rpc bdev_malloc_create '{\"name\": \"Malloc0\", \"num_blocks\": 32768, \"block_size\": 512}' &&
    rpc nvmf_create_transport '{\"trtype\": \"TCP\"}' &&
    rpc nvmf_create_subsystem '{\"nqn\": \"$NQN\", \"allow_any_host\": true}' &&
    rpc nvmf_subsystem_add_ns '{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"Malloc0\"}}' &&
    rpc nvmf_subsystem_add_listener '{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT\"}}'
" || finish

# The guest's part: connect to the host through user-mode networking, verify, disconnect.
inner='
. "$REPO/tests/guest/lib.sh"
load_modules nvme nvme-tcp || exit 1
nvme discover -t tcp -a 10.0.2.2 -s "$PORT" | grep -q "$NQN" || { echo "discovery misses $NQN"; exit 1; }
nvme_connect_tcp "$NQN" 10.0.2.2 "$PORT" -i 2 || exit 1
dev=$(wait_for_nvme_dev "$NQN" 1 30) || exit 1
fio_verify "$dev" 2M || { echo "fio verify failed"; exit 1; }
nvme disconnect -n "$NQN" >/dev/null && wait_for_no_nvme_dev "$NQN" 20
'
guest_ok=yes
check "guest kernel initiator: discover, connect, fio verify, disconnect via 10.0.2.2:$PORT" \
    "$REPO/scripts/guest/run.sh" --timeout 300 --env REPO="$REPO" --env PORT="$PORT" --env NQN="$NQN" \
    -- bash -c "$inner" || guest_ok=no

# What plexd saw of it: the guest's writes reached the bdev, and once the guest disconnected
# no controller is left. Only meaningful after a guest that connected, wrote and disconnected.
writes=$(rpc bdev_get_iostat '{"name": "Malloc0"}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["bdevs"][0]["num_write_ops"])')
if [ "${writes:-0}" -gt 0 ]; then
    pass "plexd served the guest's writes ($writes write commands on Malloc0)"
else
    fail "plexd served the guest's writes" "num_write_ops ${writes:-unknown}"
fi
if [ "$guest_ok" = no ]; then
    fail "plexd controllers cleaned up after the guest disconnected" "not checked: the guest step failed"
elif wait_until 10 no_controllers "$NQN"; then
    pass "plexd controllers cleaned up after the guest disconnected"
else
    fail "plexd controllers cleaned up after the guest disconnected" "$CTRLS"
fi
grep -q panicked "$WORK/plexd.log" && fail "plexd never panicked" "see $WORK/plexd.log" || pass "plexd never panicked"
finish
