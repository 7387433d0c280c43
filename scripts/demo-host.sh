#!/usr/bin/env bash
# The user's day in one command, on one machine:
#   hugepages (setup.sh) -> plexd -> a volume created over JSON-RPC -> exported over NVMe/TCP
#   -> a node (the QEMU test guest, with the Linux kernel's initiator) runs `nvme connect`,
#   mkfs.xfs, mounts it, writes and reads files.
# The host kernel here has no NVMe/TCP initiator, so the "pod's node" is the test guest; it
# reaches plexd on the host as 10.0.2.2.
#
# Usage: scripts/demo-host.sh [--no-guest]     (--no-guest stops after showing the volume)
# Environment: HUGEMEM (MiB, default 1024), PORT (default 4420), SOCK (default /var/tmp/plexd-demo.sock)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
use_guest=yes
[ "${1:-}" = "--no-guest" ] && use_guest=no

PORT=${PORT:-4420}
SOCK=${SOCK:-/var/tmp/plexd-demo.sock}
NQN=nqn.2026-11.io.plexstor:demo-vol1
plexd=build/release/plexd
plexctl=build/release/plexctl

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ctl() { "$plexctl" -s "$SOCK" "$@"; }

say "Building plexd and plexctl (release)"
cargo build --release -p plexd --bins

say "Reserving hugepages (scripts/setup.sh)"
HUGEMEM=${HUGEMEM:-1024} scripts/setup.sh
scripts/setup.sh status

say "Starting plexd: reactors on core 0, JSON-RPC on $SOCK"
log=$(mktemp /tmp/plexd-demo.XXXXXX.log)
"$plexd" -m 0x1 -r "$SOCK" >"$log" 2>&1 &
plexd_pid=$!
cleanup() {
    kill "$plexd_pid" 2>/dev/null && wait "$plexd_pid" 2>/dev/null
    echo "plexd log: $log"
}
trap cleanup EXIT
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
ctl version

say "Creating a 512 MiB volume (malloc bdev) and a null bdev over JSON-RPC"
ctl call bdev_malloc_create '{"name": "vol1", "num_blocks": 1048576, "block_size": 512}'
ctl call bdev_null_create '{"name": "null0", "num_blocks": 262144, "block_size": 4096}'
ctl bdev list

if ! ctl call rpc_get_methods | grep -q nvmf_create_subsystem; then
    say "This build has no NVMe-oF target yet; stopping here."
    exit 0
fi

say "Exporting vol1 over NVMe/TCP as $NQN on port $PORT"
ctl call nvmf_create_transport '{"trtype": "TCP"}'
ctl call nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"allow_any_host\": true, \"serial_number\": \"PLEX0001\"}"
ctl call nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"vol1\"}}"
ctl call nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT\"}}"
ctl call nvmf_get_subsystems

if [ "$use_guest" = no ]; then
    say "Skipping the node side (--no-guest). Connect from a Linux host with:"
    echo "  nvme connect -t tcp -a <this host> -s $PORT -n $NQN"
    exit 0
fi

say "On the pod's node (the test guest): nvme connect, mkfs.xfs, mount, write, read"
scripts/guest/run.sh --timeout 600 -- env NQN="$NQN" PORT="$PORT" bash scripts/demo-node.sh

say "What plexd saw"
ctl bdev iostat
ctl call nvmf_subsystem_get_controllers "{\"nqn\": \"$NQN\"}"
say "Done. The configuration plexd would restart with (plexd -c FILE):"
ctl save-config
