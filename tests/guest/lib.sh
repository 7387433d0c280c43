# shellcheck shell=bash
# Helpers for test scripts, sourced:  . "$REPO/tests/guest/lib.sh"
#
# Reporting (TAP lines, which scripts/test.sh reads):
#   plan N                    "1..N": the script prints N results. Write it at the top as a
#                             literal number; test.sh reads it from the file before running,
#                             so a script that stops early or never runs is a failure too
#   pass NAME                 prints "ok - NAME"
#   fail NAME REASON          prints "not ok - NAME: REASON" (does not exit)
#   skip [--required] NAME REASON
#                             prints "ok - NAME # SKIP REASON". --required: CI must run this
#                             (it needs root, the guest, ...), so under CI=true it fails instead
#   skip_all [--required] REASON
#                             the whole plan is skipped: prints "1..0 # SKIP REASON", exits
#   check NAME CMD [ARG...]   runs CMD; pass, or fail with its last output line
#   bail NAME REASON          fail and finish at once (for steps later ones need)
#   finish                    prints the tally; exits 1 if anything failed or the plan was missed
#
# Guest:
#   in_guest                        true inside scripts/guest/run.sh's guest
#   reexec_in_guest [RUN.SH OPTS]   on the host, boot the guest and run the
#                                   calling script in it (exits with its status)
#   load_modules MOD...             modprobe each (no udev in the guest)
#
# NVMe-oF with the kernel's own target (nvmet, configured through configfs):
#   nvmet_export_bdev NQN PORT DEV [ADDR]   export block device DEV as namespace 1
#   nvmet_export_ramdisk NQN PORT [ADDR]    the same with a fresh brd RAM disk
#   nvmet_clear                             remove every nvmet port and subsystem
# The kernel's initiator:
#   nvme_connect_tcp NQN ADDR PORT [nvme-cli connect options...]
#   wait_for_nvme_dev NQN [NSID] [TIMEOUT_S]  prints /dev/nvmeXnY of that namespace
#   wait_for_no_nvme_dev NQN [TIMEOUT_S]      until no block device of NQN is left
#   fio_verify DEV [SIZE]                     write, read back and verify with fio
# plexd:
#   rpc METHOD [JSON]               plexd's JSON-RPC on $SOCK through plexctl; prints the
#                                   result on one line, or the error on stderr and fails
#   wait_for_plexd PID [TIMEOUT_S]  until plexd (process PID) answers on $SOCK
#   no_controllers NQN              true when subsystem NQN has no controller; sets CTRLS
#                                   to what nvmf_subsystem_get_controllers said
# PCI (the guest's emulated NVMe controllers):
#   driver_of BDF                   the driver bound to PCI device BDF, or "none"
#   nvme_bdf_of NQN                 the PCI address of the kernel's controller of subsystem NQN
# Host side:
#   free_tcp_port                   a TCP port nobody listens on, on 127.0.0.1
# SPDK's own programs as peers (../shared/spdk/bin, absent on some machines):
#   spdk_bin NAME                   prints the path of SPDK's program NAME; fails if absent
#   spdk_prepare MEM_MB             installs the Debian packages SPDK's programs need and
#                                   grows the hugepage reservation by MEM_MB (never shrinks
#                                   it); spdk_restore puts the machine's count back
#   spdk_rpc_install                SPDK's JSON-RPC client (PyPI spdk==$SPDK_PY_VERSION, in a
#                                   venv under .guest/ so the host's Python is never touched),
#                                   installed or replaced as needed; sets SPDK_RPC
# Waiting (never a bare sleep):
#   wait_until TIMEOUT_S CMD [ARG...]   runs CMD every 0.1 s until it succeeds; fails after
#                                       TIMEOUT_S seconds

GUEST_LIB_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Exported so that `sh -c "$(declare -f rpc); …"` finds it too.
export PLEXCTL=${PLEXCTL:-$GUEST_LIB_REPO/build/release/plexctl}
TESTS_PASSED=0
TESTS_FAILED=0
TESTS_SKIPPED=0
TESTS_PLANNED=

# ---- reporting ---------------------------------------------------------------

plan() {
    TESTS_PLANNED=$1
    echo "1..$1"
}

pass() {
    TESTS_PASSED=$((TESTS_PASSED + 1))
    echo "ok - $1"
}

fail() {
    TESTS_FAILED=$((TESTS_FAILED + 1))
    echo "not ok - $1: ${2:-failed}"
}

# True when a skip of something CI must run has to fail instead.
skip_is_failure() { [ "$1" = --required ] && [ "${CI:-}" = true ]; }

skip() {
    local required=
    [ "$1" = --required ] && { required=$1; shift; }
    if skip_is_failure "$required"; then
        fail "$1" "${2:-} (CI must run this; it may not be skipped there)"
        return 0
    fi
    TESTS_SKIPPED=$((TESTS_SKIPPED + 1))
    echo "ok - $1 # SKIP ${2:-}"
}

skip_all() {
    local required=
    [ "$1" = --required ] && { required=$1; shift; }
    if skip_is_failure "$required"; then
        bail "${0##*/}" "skipped whole: $1 (CI must run this; it may not be skipped there)"
    fi
    echo "1..0 # SKIP $1"
    exit 0
}

# check NAME CMD...: the command's output is kept quiet unless it fails.
check() {
    local name=$1 out rc=0
    shift
    out=$("$@" 2>&1) || rc=$?
    if [ "$rc" = 0 ]; then
        pass "$name"
    else
        printf '%s\n' "$out" | tail -n 15 | sed 's/^/# /'
        fail "$name" "exit $rc: $(printf '%s\n' "$out" | grep . | tail -n1)"
    fi
    return "$rc"
}

bail() {
    fail "$1" "$2"
    finish
}

finish() {
    local printed=$((TESTS_PASSED + TESTS_FAILED + TESTS_SKIPPED))
    if [ -n "$TESTS_PLANNED" ] && [ "$printed" -lt "$TESTS_PLANNED" ]; then
        fail "${0##*/} plan" "planned $TESTS_PLANNED results, printed $printed"
    elif [ -n "$TESTS_PLANNED" ] && [ "$printed" -gt "$TESTS_PLANNED" ]; then
        # Not a failure of the code under test, but the plan is stale: say so loudly.
        fail "${0##*/} plan" "planned $TESTS_PLANNED results, printed $printed: update the plan"
    fi
    echo "# ${TESTS_PASSED} passed, ${TESTS_FAILED} failed, ${TESTS_SKIPPED} skipped"
    [ "$TESTS_FAILED" = 0 ] && exit 0
    exit 1
}

# ---- the guest ---------------------------------------------------------------

in_guest() { [ "${PLEXSTOR_GUEST:-}" = 1 ]; }

# Called at the top of a guest test with the calling script's "$0" and
# arguments after the run.sh options, e.g.
#   reexec_in_guest --nvme -- "$0" "$@"
reexec_in_guest() {
    in_guest && return 0
    exec "$GUEST_LIB_REPO/scripts/guest/run.sh" "$@"
}

load_modules() {
    local m
    for m in "$@"; do
        modprobe "$m" || return 1
    done
}

# ---- nvmet (the kernel's NVMe-oF target) -------------------------------------

NVMET_CFS=/sys/kernel/config/nvmet

nvmet_ready() {
    load_modules nvmet nvmet-tcp || return 1
    if [ ! -d "$NVMET_CFS" ]; then
        mount -t configfs configfs /sys/kernel/config 2>/dev/null || true
    fi
    [ -d "$NVMET_CFS" ] || { echo "no $NVMET_CFS (configfs not mounted?)" >&2; return 1; }
}

# The nvmet port (a configfs directory) listening on ADDR:PORT over TRTYPE (tcp or rdma,
# default tcp), created if missing; prints its directory.
nvmet_port() {
    local addr=$1 port=$2 trtype=${3:-tcp} dir id=1
    for dir in "$NVMET_CFS"/ports/*; do
        [ -d "$dir" ] || continue
        if [ "$(cat "$dir/addr_traddr")" = "$addr" ] && [ "$(cat "$dir/addr_trsvcid")" = "$port" ] &&
            [ "$(cat "$dir/addr_trtype")" = "$trtype" ]; then
            echo "$dir"
            return 0
        fi
    done
    while [ -e "$NVMET_CFS/ports/$id" ]; do id=$((id + 1)); done
    dir=$NVMET_CFS/ports/$id
    mkdir "$dir" || return 1
    echo "$trtype" >"$dir/addr_trtype"
    echo ipv4 >"$dir/addr_adrfam"
    echo "$addr" >"$dir/addr_traddr"
    echo "$port" >"$dir/addr_trsvcid"
    echo "$dir"
}

nvmet_tcp_port() { nvmet_port "$1" "$2" tcp; }

# nvmet_export_bdev NQN PORT DEV [ADDR=127.0.0.1] [TRTYPE=tcp]: subsystem NQN (any host
# allowed) with DEV as namespace 1, listening on ADDR:PORT. Use ADDR 10.0.2.15
# (or 0.0.0.0) for a target the host reaches through run.sh --fwd.
nvmet_export_bdev() {
    local nqn=$1 port=$2 dev=$3 addr=${4:-127.0.0.1} trtype=${5:-tcp} sub portdir
    [ -b "$dev" ] || { echo "$dev is not a block device" >&2; return 1; }
    nvmet_ready || return 1
    sub=$NVMET_CFS/subsystems/$nqn
    mkdir "$sub" || return 1
    echo 1 >"$sub/attr_allow_any_host"
    mkdir "$sub/namespaces/1"
    echo "$dev" >"$sub/namespaces/1/device_path"
    echo 1 >"$sub/namespaces/1/enable" || return 1
    portdir=$(nvmet_port "$addr" "$port" "$trtype") || return 1
    ln -s "$sub" "$portdir/subsystems/$nqn"
}

# A brd RAM disk not yet used by any nvmet namespace. brd is loaded once with
# NVMET_RAMDISKS disks of NVMET_RAMDISK_MIB each (memory is taken on write).
unused_ramdisk() {
    local n dev
    if [ ! -d /sys/module/brd ]; then
        modprobe brd rd_nr="${NVMET_RAMDISKS:-8}" rd_size=$((${NVMET_RAMDISK_MIB:-128} * 1024)) || return 1
    fi
    for ((n = 0; n < 64; n++)); do
        dev=/dev/ram$n
        [ -b "$dev" ] || break
        if ! grep -qsx "$dev" "$NVMET_CFS"/subsystems/*/namespaces/*/device_path; then
            echo "$dev"
            return 0
        fi
    done
    echo "no unused brd RAM disk (raise NVMET_RAMDISKS before the first use)" >&2
    return 1
}

# nvmet_export_ramdisk NQN PORT [ADDR=127.0.0.1] [TRTYPE=tcp]
nvmet_export_ramdisk() {
    local nqn=$1 port=$2 addr=${3:-127.0.0.1} trtype=${4:-tcp} dev
    nvmet_ready || return 1
    [ "$trtype" = tcp ] || load_modules "nvmet-$trtype" || return 1
    dev=$(unused_ramdisk) || return 1
    nvmet_export_bdev "$nqn" "$port" "$dev" "$addr" "$trtype"
}

# Undo every nvmet export: links, namespaces, subsystems, ports (in that order;
# configfs refuses to remove a directory still in use). Fails, naming what is left, unless
# nothing is.
nvmet_clear() {
    local link ns sub port left
    [ -d "$NVMET_CFS" ] || return 0
    for link in "$NVMET_CFS"/ports/*/subsystems/*; do
        [ -L "$link" ] && rm -f "$link"
    done
    for ns in "$NVMET_CFS"/subsystems/*/namespaces/*; do
        [ -d "$ns" ] || continue
        echo 0 >"$ns/enable"
        rmdir "$ns"
    done
    for sub in "$NVMET_CFS"/subsystems/*; do
        [ -d "$sub" ] && rmdir "$sub"
    done
    for port in "$NVMET_CFS"/ports/*; do
        [ -d "$port" ] && rmdir "$port"
    done
    left=$(find "$NVMET_CFS/subsystems" "$NVMET_CFS/ports" -mindepth 1 -maxdepth 1 2>/dev/null)
    [ -z "$left" ] || { echo "nvmet still has: $left" >&2; return 1; }
}

# ---- soft-RoCE ---------------------------------------------------------------

# rxe_up: an RDMA device, rxe0, on the guest's network interface (made once per boot and
# left for the next test); sets RXE_ADDR to the interface's IPv4 address.
rxe_up() {
    local netdev
    netdev=$(ip -o -4 route show default | awk '{print $5; exit}')
    netdev=${netdev:-eth0}
    RXE_ADDR=$(ip -o -4 addr show "$netdev" | awk '{split($4, a, "/"); print a[1]; exit}')
    [ -n "$RXE_ADDR" ] || { echo "no IPv4 address on $netdev" >&2; return 1; }
    load_modules rdma_rxe || return 1
    # (`rdma link show rxe0` fails even when it exists: it wants rxe0/1.)
    [ -e /sys/class/infiniband/rxe0 ] || rdma link add rxe0 type rxe netdev "$netdev"
}

# Reliable-connection queue pairs on the RDMA devices (ours and the kernel's).
rc_queue_pairs() { rdma res show qp 2>/dev/null | grep -c 'type RC' || true; }

# ---- plexperf (our host) ----------------------------------------------------

# json_field FILE PYTHON-EXPR: evaluates EXPR with `r` bound to the JSON report.
json_field() {
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# plexperf_ok NAME OUT: the run in OUT exited 0 with I/O done, no error and no verify mismatch.
plexperf_ok() {
    local name=$1 out=$2 ios errs mism
    ios=$(json_field "$out" 'r["total"]["reads"] + r["total"]["writes"]') || ios=0
    errs=$(json_field "$out" 'r["total"]["errors"]') || errs=?
    mism=$(json_field "$out" '(r["verify"] or {}).get("mismatches", 0)') || mism=?
    if [ "$ios" -gt 0 ] && [ "$errs" = 0 ] && [ "$mism" = 0 ]; then
        pass "$name ($ios I/Os, $(json_field "$out" 'round(r["total"]["iops"])') IOPS)"
    else
        sed 's/^/# /' "$out" | tail -n 30
        fail "$name" "ios=$ios errors=$errs mismatches=$mism"
    fi
}

# plexperf_check NAME OUT ARGS...: runs $PERF on $TRID with --json into OUT and checks it.
plexperf_check() {
    local name=$1 out=$2 rc=0
    shift 2
    timeout 120 "$PERF" -r "$TRID" --json --warmup 0 "$@" >"$out" 2>"$out.err" || rc=$?
    if [ "$rc" != 0 ]; then
        sed 's/^/# /' "$out.err" | tail -n 20
        fail "$name" "plexperf exited $rc"
        return 0
    fi
    plexperf_ok "$name" "$out"
}

# plexperf_identify_ok NAME: $PERF identifies the controller at $TRID, with namespace 1 and
# subsystem $NQN.
plexperf_identify_ok() {
    local out
    if out=$("$PERF" -r "$TRID" --identify 2>&1) && grep -q "Namespace 1: " <<<"$out" &&
        grep -q "subnqn: *$NQN" <<<"$out"; then
        pass "$1: controller and namespace 1 ($(grep 'Namespace 1' <<<"$out" | sed 's/^ *//'))"
    else
        printf '%s\n' "$out" | sed 's/^/# /'
        fail "$1" "no namespace 1 or wrong subnqn"
    fi
}

# plexperf_discovers NAME [PATTERN]: the discovery log at $DISC lists $NQN (and, if given,
# a line matching PATTERN, case-insensitive).
plexperf_discovers() {
    local out
    if out=$("$PERF" -r "$DISC" --discover 2>&1) && grep -q "subnqn: *$NQN" <<<"$out" &&
        { [ -z "${2:-}" ] || grep -qi -- "$2" <<<"$out"; }; then
        pass "$1"
    else
        printf '%s\n' "$out" | sed 's/^/# /'
        fail "$1" "not found"
    fi
}

# plexperf_pattern_round_trip READ_NAME: 1 MiB written sequentially in 4 KiB blocks with
# --verify, then every block read back and checked (LBA, generation, CRC32C): none may be
# missing or wrong. Three results; files in $WORK.
plexperf_pattern_round_trip() {
    local unwritten checked
    plexperf_check "write a 1 MiB pattern (4 KiB, in-capsule, --verify)" "$WORK/w.json" \
        -w write -o 4096 -q 8 -t 3 --verify --size 1048576
    plexperf_check "$1" "$WORK/r.json" -w read -o 4096 -q 8 -t 2 --verify --size 1048576
    unwritten=$(json_field "$WORK/r.json" 'r["verify"]["unwritten_blocks"]')
    checked=$(json_field "$WORK/r.json" 'r["verify"]["verified_blocks"]')
    if [ "$unwritten" = 0 ] && [ "$checked" -ge 2048 ]; then
        pass "read back: $checked blocks verified, none unwritten"
    else
        fail "read back covers the pattern" "verified=$checked unwritten=$unwritten"
    fi
}

# ---- the kernel's NVMe host (initiator) --------------------------------------

nvme_connect_tcp() {
    local nqn=$1 addr=$2 port=$3
    shift 3
    load_modules nvme-tcp || return 1
    nvme connect -t tcp -n "$nqn" -a "$addr" -s "$port" "$@"
}

# Block devices (one per line) of namespace NSID of subsystem NQN. Reads sysfs
# rather than guessing names: on 6.x with native multipath the Y of nvmeXnY is
# not the namespace id, and nvmeXcYnZ are hidden per-path devices.
nvme_devs_of() {
    local nqn=$1 nsid=${2:-} blk name
    for blk in /sys/block/nvme*; do
        [ -e "$blk" ] || continue
        name=${blk##*/}
        [[ $name =~ ^nvme[0-9]+n[0-9]+$ ]] || continue
        [ "$(cat "$blk/device/subsysnqn" 2>/dev/null)" = "$nqn" ] || continue
        [ -z "$nsid" ] || [ "$(cat "$blk/nsid" 2>/dev/null)" = "$nsid" ] || continue
        echo "/dev/$name"
    done
}

# wait_for_nvme_dev NQN [NSID=1] [TIMEOUT_S=20]: prints the device once its
# node exists (writing to a missing /dev node would silently create a file).
wait_for_nvme_dev() {
    local nqn=$1 nsid=${2:-1} timeout=${3:-20} dev i
    for ((i = 0; i < timeout * 10; i++)); do
        dev=$(nvme_devs_of "$nqn" "$nsid" | head -n1)
        if [ -n "$dev" ] && [ -b "$dev" ]; then
            echo "$dev"
            return 0
        fi
        sleep 0.1
    done
    echo "no block device for $nqn namespace $nsid after ${timeout}s" >&2
    return 1
}

wait_for_no_nvme_dev() {
    local nqn=$1 timeout=${2:-20} i
    for ((i = 0; i < timeout * 10; i++)); do
        [ -z "$(nvme_devs_of "$nqn")" ] && return 0
        sleep 0.1
    done
    echo "block devices of $nqn still present after ${timeout}s" >&2
    return 1
}

# fio_verify DEV [SIZE=8M]: random writes with checksums, read back, verified.
fio_verify() {
    local dev=$1 size=${2:-8M}
    [ -b "$dev" ] || { echo "$dev is not a block device" >&2; return 1; }
    fio --name=verify --filename="$dev" --size="$size" --rw=randwrite --bs=4k \
        --ioengine=libaio --direct=1 --iodepth=8 --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --output-format=terse --minimal >/dev/null
}


# ---- plexd serving the kernel's host, in the guest ------------------------------
# These use the caller's PLEXD (binary), SOCK (RPC socket), WORK (scratch directory, plexd.log
# goes there) and NQN (the subsystem under test).

# jq-less field access: jget JSON PYTHON-EXPR (the value is `v`).
jget() {
    python3 -c 'import json,sys; v=json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2"
}

start_plexd() {
    rm -f "$SOCK"
    "$PLEXD" -m 0x3 --no-pin -r "$SOCK" --idle-poll-us 200 "$@" >>"$WORK/plexd.log" 2>&1 &
    PLEXD_PID=$!
    wait_for_plexd "$PLEXD_PID" && return 0
    tail -n 20 "$WORK/plexd.log" >&2
    return 1
}

stop_plexd() {
    [ -n "$PLEXD_PID" ] || return 0
    kill "${1:--TERM}" "$PLEXD_PID" 2>/dev/null
    wait "$PLEXD_PID" 2>/dev/null
    PLEXD_PID=
}

ctrl_of_dev() { # /dev/nvme1n1 -> nvme1: the kernel's controller of that namespace, via sysfs
    local d=${1#/dev/} dir c
    dir=$(readlink -f "/sys/block/$d/device")
    # Without native multipath, the namespace's device is the controller itself.
    c=$(basename "$dir")
    [[ $c =~ ^nvme[0-9]+$ ]] && { echo "$c"; return 0; }
    # With it, nvmeXnY belongs to the subsystem (nvme-subsysX), which lists its controllers.
    for c in "$dir"/nvme*; do
        c=$(basename "$c")
        [[ $c =~ ^nvme[0-9]+$ ]] && { echo "$c"; return 0; }
    done
    echo "no controller found for $1" >&2
    return 1
}

controllers() { jget "$(rpc nvmf_subsystem_get_controllers "{\"nqn\": \"$NQN\"}")" 'len(v)'; }

controllers_are() { [ "$(controllers)" = "$1" ]; }

wait_controllers() { # wait_controllers N
    wait_until 10 controllers_are "$1" && return 0
    echo "plexd has $(controllers) controllers, want $1" >&2
    return 1
}

fs_roundtrip() { # fs_roundtrip DEV MKFS...
    local dev=$1 mnt=$WORK/mnt
    shift
    mkdir -p "$mnt"
    "$@" "$dev" >/dev/null 2>&1 || { echo "$* failed" >&2; return 1; }
    mount "$dev" "$mnt" || return 1
    head -c 3M /dev/urandom >"$WORK/a.bin"
    cp "$WORK/a.bin" "$mnt/a.bin" && mkdir "$mnt/d" && seq 1 20000 >"$mnt/d/seq.txt" && sync || return 1
    umount "$mnt" || return 1
    mount "$dev" "$mnt" || return 1
    cmp "$WORK/a.bin" "$mnt/a.bin" && [ "$(tail -n1 "$mnt/d/seq.txt")" = 20000 ] || { umount "$mnt"; return 1; }
    if [ "${FSTRIM:-0}" = 1 ]; then
        rm "$mnt/a.bin" && sync && fstrim -v "$mnt" || { umount "$mnt"; return 1; }
    fi
    umount "$mnt"
}

# connect_failfast TRANSPORT ADDR: connects to $NQN at ADDR:$PORT with 2 I/O queues, a 1 s
# reconnect delay and I/O failing after 3 s without a connection. nvme-cli here has no
# --fast_io_fail_tmo, so the options go to the kernel directly.
connect_failfast() {
    local line
    exec 3<>/dev/nvme-fabrics || return 1
    printf '%s' "transport=$1,traddr=$2,trsvcid=$PORT,nqn=$NQN,nr_io_queues=2,reconnect_delay=1,ctrl_loss_tmo=120,fast_io_fail_tmo=3" >&3 || { exec 3<&-; return 1; }
    read -r line <&3
    exec 3<&-
    echo "$line"
}

fio_seq() { # fio_seq DEV BS SIZE
    fio --name=seq --filename="$1" --size="$3" --rw=write --bs="$2" --ioengine=libaio --direct=1 \
        --iodepth=4 --verify=crc32c --do_verify=1 --verify_fatal=1 --minimal >/dev/null
}

# ---- host side ---------------------------------------------------------------

driver_of() {
    local link=/sys/bus/pci/devices/$1/driver
    if [ -e "$link" ]; then basename "$(readlink -f "$link")"; else echo none; fi
}

nvme_bdf_of() {
    local ctrl
    for ctrl in /sys/class/nvme/nvme*; do
        [ "$(cat "$ctrl/subsysnqn" 2>/dev/null)" = "$1" ] && basename "$(readlink -f "$ctrl/device")"
    done
    return 0
}

free_tcp_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo $((20000 + RANDOM % 20000))
}

wait_until() {
    local timeout=$1 deadline
    shift
    deadline=$((SECONDS + timeout))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# ---- plexd -------------------------------------------------------------------

# plex_files_differ FILE1 FILE2 BLOCKS: "same" if the data areas of two plex files (their last
# BLOCKS 512-byte blocks, where a mirror keeps data) match, else the first block that differs.
plex_files_differ() {
    python3 - "$@" <<'EOF'
import sys
a, b, n = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read(), int(sys.argv[3])
oa, ob = len(a) - n * 512, len(b) - n * 512
bad = next((i for i in range(n)
            if a[oa + i * 512:oa + (i + 1) * 512] != b[ob + i * 512:ob + (i + 1) * 512]), None)
print("same" if bad is None else f"differ at mirror block {bad}")
EOF
}

rpc() {
    "$PLEXCTL" -s "$SOCK" call --compact "$@"
}

plexd_answers() {
    kill -0 "$1" 2>/dev/null || return 2
    [ -S "$SOCK" ] && rpc spdk_get_version >/dev/null 2>&1
}

wait_for_plexd() {
    local pid=$1 timeout=${2:-20} rc=0
    wait_until "$timeout" plexd_answers "$pid" 2>/dev/null || rc=$?
    # wait_until stops on the first success; a dead plexd fails every try until the deadline,
    # so look once more to tell the two apart.
    kill -0 "$pid" 2>/dev/null || { echo "plexd (pid $pid) exited" >&2; return 1; }
    [ "$rc" = 0 ] || echo "plexd does not answer on $SOCK after ${timeout}s" >&2
    return "$rc"
}

no_controllers() {
    CTRLS=$(rpc nvmf_subsystem_get_controllers "{\"nqn\": \"$1\"}")
    [ "$CTRLS" = "[]" ]
}

# ---- SPDK's programs ---------------------------------------------------------

SPDK_BIN_DIR=$GUEST_LIB_REPO/../shared/spdk/bin
SPDK_PACKAGES=(libnuma1 libuuid1 libssl3 libkeyutils1 libaio1)
SPDK_PREVIOUS_PAGES=

spdk_bin() {
    [ -x "$SPDK_BIN_DIR/$1" ] || return 1
    echo "$(cd "$SPDK_BIN_DIR" && pwd)/$1"
}

hugepages_nr_file() {
    echo "/sys/kernel/mm/hugepages/hugepages-$(awk '/^Hugepagesize:/ { print $2 }' /proc/meminfo)kB/nr_hugepages"
}

spdk_prepare() {
    local mem_mb=$1 missing p page_kb nr_file
    missing=$(for p in "${SPDK_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    if [ -n "$missing" ]; then
        echo "# installing" $missing
        # shellcheck disable=SC2086 # one package a word
        { apt-get update -q && apt-get install -y -q $missing; } >&2 ||
            { echo "apt-get install $missing failed" >&2; return 1; }
    fi
    nr_file=$(hugepages_nr_file)
    page_kb=$(awk '/^Hugepagesize:/ { print $2 }' /proc/meminfo)
    SPDK_PREVIOUS_PAGES=$(cat "$nr_file")
    # A BDF that does not exist: setup.sh must touch no NVMe device of this machine.
    PCI_ALLOWED=ffff:ff:1f.7 HUGEMEM=$(((SPDK_PREVIOUS_PAGES * page_kb) / 1024 + mem_mb + 64)) \
        "$GUEST_LIB_REPO/scripts/setup.sh" >/dev/null 2>&1 ||
        { echo "scripts/setup.sh could not reserve ${mem_mb} MiB more of hugepages" >&2; return 1; }
}

spdk_restore() {
    [ -n "$SPDK_PREVIOUS_PAGES" ] || return 0
    echo "$SPDK_PREVIOUS_PAGES" >"$(hugepages_nr_file)" 2>/dev/null
}

# The client version the tests were written against; newer ones may send new parameters.
SPDK_PY_VERSION=${SPDK_PY_VERSION:-26.9}
SPDK_VENV=${PLEXSTOR_SPDK_VENV:-$GUEST_LIB_REPO/.guest/spdk-venv}
SPDK_RPC=$SPDK_VENV/bin/spdk-rpc

spdk_rpc_version() { "$SPDK_VENV/bin/pip" show spdk 2>/dev/null | sed -n 's/^Version: //p'; }

spdk_rpc_install() {
    if [ "$(spdk_rpc_version)" != "$SPDK_PY_VERSION" ]; then
        echo "# installing spdk==$SPDK_PY_VERSION from PyPI into $SPDK_VENV"
        { python3 -m venv "$SPDK_VENV" && "$SPDK_VENV/bin/pip" install -q "spdk==$SPDK_PY_VERSION"; } >&2 ||
            { echo "pip install spdk==$SPDK_PY_VERSION into $SPDK_VENV failed" >&2; return 1; }
    fi
    [ "$(spdk_rpc_version)" = "$SPDK_PY_VERSION" ] && "$SPDK_RPC" --help 2>&1 | grep -q -- '--server' ||
        { echo "spdk-rpc in $SPDK_VENV is '$(spdk_rpc_version)', not $SPDK_PY_VERSION, or does not run" >&2; return 1; }
}
