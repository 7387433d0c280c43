#!/usr/bin/env bash
# Smoke test of the test guest: proves it gives what interop tests need.
# Run it on the host (it boots the guest through scripts/guest/run.sh and runs
# itself inside) or inside an existing guest.
#
# In the guest: the modules load; the kernel's nvmet exports a brd RAM disk over
# NVMe/TCP on 127.0.0.1; nvme-cli discovers and connects with the kernel's
# initiator; fio writes and verifies; ext4 mounts on it; disconnect and cleanup.
# Across the guest boundary: the guest reaches a host service at 10.0.2.2, and
# the host reaches a guest service through run.sh --fwd.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"

MODULES=(nvme nvme-tcp nvmet nvmet-tcp vfio-pci xfs ext4 brd configfs virtio_net)
NQN=nqn.2024-01.io.plexstor:smoke
PORT=4430    # not 4420: other guest tests in the same boot use that
GUEST_ECHO_PORT=5001

# ---- host side ---------------------------------------------------------------

# A one-shot service on the host's loopback for the guest to reach as 10.0.2.2.
serve_once_on_host() {
    local port=$1
    # exec: the caller's $! is then the server itself, which it can kill.
    exec timeout 300 python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1)
c, _ = s.accept(); c.sendall(b"hello-from-host\n"); c.close()' "$port"
}

# Keeps knocking on the forwarded port until the guest's listener answers.
# (Before the guest listens, user-mode networking accepts and then closes.)
read_from_guest_via_fwd() {
    local port=$1 out=$2 reply i
    for ((i = 0; i < 600; i++)); do
        if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
            reply=
            read -r -t 2 reply <&3 || true
            exec 3<&-
            if [ "$reply" = hello-from-guest ]; then
                echo "$reply" >"$out"
                return 0
            fi
        fi
        sleep 0.5
    done
    return 1
}

# Started from the host, the guest also talks to the host both ways; the guest leaves what
# it saw in the --out share and the host reports it. (The guest's own lines are its own TAP
# stream, with its own plan.)
run_from_host() {
    local host_port fwd_port out server poller rc=0 host_results=4
    plan "$host_results"
    host_port=$(free_tcp_port)
    fwd_port=$(free_tcp_port)
    out=$(mktemp -d "${TMPDIR:-/tmp}/guest-smoke.XXXXXX")
    serve_once_on_host "$host_port" >/dev/null &
    server=$!
    read_from_guest_via_fwd "$fwd_port" "$out/fwd-reply" &
    poller=$!
    "$GUEST_LIB_REPO/scripts/guest/run.sh" --fwd "$fwd_port:$GUEST_ECHO_PORT" \
        --env "SMOKE_HOST_PORT=$host_port" --out "$out" --timeout 300 --hugepages 16 \
        -- "$HERE/smoke.sh" "$@" || rc=$?
    kill "$server" "$poller" 2>/dev/null || true
    wait "$server" "$poller" 2>/dev/null || true

    # The guest's own lines were streamed above; add what crossed the guest boundary.
    if [ "$(cat "$out/from-host" 2>/dev/null)" = hello-from-host ]; then
        pass "guest reaches the host at 10.0.2.2"
    else
        fail "guest reaches the host at 10.0.2.2" "got '$(cat "$out/from-host" 2>/dev/null)'"
    fi
    if [ -e "$out/guest-served" ]; then
        pass "guest service accepted a connection from the host"
    else
        fail "guest service accepted a connection from the host" "nothing connected in 120s"
    fi
    if [ -s "$out/fwd-reply" ]; then
        pass "host reaches a guest service through --fwd"
    else
        fail "host reaches a guest service through --fwd" "no reply on 127.0.0.1:$fwd_port"
    fi
    if [ -s "$out/guest-console.log" ]; then
        pass "guest console log comes back through --out"
    else
        fail "guest console log comes back through --out" "no $out/guest-console.log"
    fi
    rm -rf "$out"
    [ "$rc" = 0 ] || fail "guest smoke test" "run.sh exited $rc"
    finish
}

# ---- guest side --------------------------------------------------------------

check_guest_environment() {
    if [ "${PLEXSTOR_GUEST:-}" = 1 ] && [ "$PWD" = "$(pwd -P)" ]; then
        pass "PLEXSTOR_GUEST=1 and cwd $PWD"
    else
        fail "guest environment" "PLEXSTOR_GUEST=${PLEXSTOR_GUEST:-unset}"
    fi
    if ip -4 addr show eth0 | grep -q 'inet 10\.0\.2\.15/'; then
        pass "eth0 is up with 10.0.2.15"
    else
        fail "eth0 is up with 10.0.2.15" "$(ip -4 -o addr show eth0 2>&1)"
    fi
}

# run.sh --hugepages N puts hugepages=N on the kernel's command line: they must all be there.
check_hugepages() {
    local want total
    want=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^hugepages=//p')
    total=$(awk '/^HugePages_Total:/ { print $2 }' /proc/meminfo)
    if [ -n "$want" ] && [ "$want" -gt 0 ] && [ "$total" = "$want" ] &&
        grep -q '^nodev /dev/hugepages hugetlbfs' /proc/mounts; then
        pass "run.sh --hugepages $want: reserved, hugetlbfs on /dev/hugepages"
    else
        fail "run.sh --hugepages ${want:-?}" "HugePages_Total $total; $(grep hugetlbfs /proc/mounts)"
    fi
}

check_modules() {
    local m
    for m in "${MODULES[@]}"; do
        check "modprobe $m" modprobe "$m" || true
    done
}

# Only when started from the host (run_from_host), which reports the outcome from $GUEST_OUT.
exchange_with_host() {
    [ -n "${SMOKE_HOST_PORT:-}" ] || return 0
    # shellcheck disable=SC2016 # $1 is for the inner bash
    timeout 20 bash -c 'exec 3<>/dev/tcp/10.0.2.2/$1 && head -n1 <&3' _ "$SMOKE_HOST_PORT" \
        >"$GUEST_OUT/from-host" 2>&1 || true
    # One connection from the host through --fwd (its poller retries).
    if echo hello-from-guest | timeout 120 busybox nc -l -p "$GUEST_ECHO_PORT" >/dev/null; then
        touch "$GUEST_OUT/guest-served"
    fi
}

# shellcheck disable=SC2317 # called through check
mkfs_and_mount() {
    local dev=$1 mnt
    mnt=$(mktemp -d)
    mkfs.ext4 -q -F "$dev" &&
        mount "$dev" "$mnt" &&
        echo plexstor >"$mnt/hello" &&
        umount "$mnt" &&
        mount -o ro "$dev" "$mnt" &&
        grep -qx plexstor "$mnt/hello" &&
        umount "$mnt"
}

check_nvmet_loopback() {
    local dev
    check "nvmet exports a RAM disk on 127.0.0.1:$PORT" nvmet_export_ramdisk "$NQN" "$PORT" ||
        bail "nvmet loopback" "cannot go on without the export"
    if nvme discover -t tcp -a 127.0.0.1 -s "$PORT" | grep -q "subnqn: *$NQN"; then
        pass "nvme discover lists $NQN"
    else
        fail "nvme discover lists $NQN" "not in the discovery log"
    fi
    check "nvme connect -t tcp" nvme_connect_tcp "$NQN" 127.0.0.1 "$PORT" ||
        bail "nvmet loopback" "cannot go on without a connection"
    if dev=$(wait_for_nvme_dev "$NQN" 1 20); then
        pass "namespace 1 of $NQN appears as $dev"
    else
        bail "namespace appears" "no block device"
    fi
    check "fio writes and verifies 8 MiB on $dev" fio_verify "$dev" 8M || true
    check "ext4 on $dev mounts and keeps a file" mkfs_and_mount "$dev" || true
    check "nvme disconnect" nvme disconnect -n "$NQN" || true
    check "$dev goes away" wait_for_no_nvme_dev "$NQN" 20 || true
    check "nvmet configuration removed" nvmet_clear || true
}

run_in_guest() {
    plan 22
    check_guest_environment
    check_hugepages
    check_modules
    exchange_with_host
    check_nvmet_loopback
    finish
}

if in_guest; then
    run_in_guest
else
    run_from_host "$@"
fi
