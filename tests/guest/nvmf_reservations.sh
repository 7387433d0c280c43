#!/usr/bin/env bash
# NVMe reservations at plexd, driven by the kernel's initiator and nvme-cli.
#
# Run on the host: boots the test guest and runs itself inside. Two controllers of the same
# subsystem, with different host NQNs and Host IDs, stand for two hosts: A registers and
# takes a Write Exclusive reservation, `nvme resv-report --eds` shows what plexd holds, B's
# writes are refused with Reservation Conflict (its reads are not), B preempts A (preempt and
# abort), after which A's writes are refused and B's land; the reservation, persisted in the
# namespace's ptpl_file, survives plexd restarting from its saved configuration.
#
# Commands go to each host's controller character device (/dev/nvmeX), so each runs as that
# host whatever multipath does with the shared namespace's block device.
#
#   tests/guest/nvmf_reservations.sh          (needs: cargo build --release -p plexd)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
plan 25
REPO=$GUEST_LIB_REPO

PLEXD=${PLEXD:-$REPO/build/release/plexd}
if ! in_guest; then
    [ -x "$PLEXD" ] || { echo "build plexd first: cargo build --release -p plexd" >&2; exit 2; }
    reexec_in_guest --timeout 300 --env PLEXD="$PLEXD" -- "$0" "$@"
fi
NQN=nqn.2024-01.io.plexstor:resv1
ADDR=127.0.0.1
PORT=4421
WORK=$(mktemp -d /tmp/nvmf-resv.XXXXXX)
SOCK=$WORK/plexd.sock
PTPL=$WORK/ns1.ptpl
PLEXD_PID=
ID_A=aaaaaaaa-0000-4000-8000-00000000000a
ID_B=bbbbbbbb-0000-4000-8000-00000000000b
HOST_A=nqn.2014-08.org.nvmexpress:uuid:$ID_A
HOST_B=nqn.2014-08.org.nvmexpress:uuid:$ID_B
KEY_A=0xa1
KEY_B=0xb2

cleanup() {
    nvme disconnect -n "$NQN" >/dev/null 2>&1
    [ -n "$PLEXD_PID" ] && kill -KILL "$PLEXD_PID" 2>/dev/null
}
trap cleanup EXIT

configure() {
    rpc bdev_malloc_create '{"name": "Malloc0", "num_blocks": 8192, "block_size": 512}' &&
        rpc nvmf_create_transport '{"trtype": "TCP"}' &&
        rpc nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"allow_any_host\": true}" &&
        rpc nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"Malloc0\", \"ptpl_file\": \"$PTPL\"}}" &&
        rpc nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"$ADDR\", \"trsvcid\": \"$PORT\"}}"
}

# ctrl_of HOSTNQN: the kernel's controller of our subsystem for that host NQN, via sysfs.
ctrl_of() {
    local c
    for c in /sys/class/nvme/nvme*; do
        [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$NQN" ] || continue
        [ "$(cat "$c/hostnqn" 2>/dev/null)" = "$1" ] || continue
        [ "$(cat "$c/state" 2>/dev/null)" = live ] || continue
        [ -c "/dev/${c##*/}" ] || continue
        echo "/dev/${c##*/}"
        return 0
    done
    return 1
}

connect_host() { # connect_host HOSTNQN HOSTID: prints its controller's character device
    local line
    load_modules nvme-tcp || return 1
    # Straight to the kernel: nvme-cli 2.3 takes the second host for the first ("already
    # connected", --duplicate-connect or not), though the kernel tells them apart by host NQN.
    exec 3<>/dev/nvme-fabrics || return 1
    printf '%s' "transport=tcp,traddr=$ADDR,trsvcid=$PORT,nqn=$NQN,hostnqn=$1,hostid=$2,nr_io_queues=1" >&3 ||
        { exec 3<&-; return 1; }
    read -r line <&3
    exec 3<&-
    echo "# $line" >&2
    wait_until 20 ctrl_of "$1" >/dev/null || { echo "no live controller for $1" >&2; return 1; }
    ctrl_of "$1"
}

# io DEV write|read LBA [FILE]: one 512-byte block through the controller's I/O queue.
io() {
    local dev=$1 op=$2 lba=$3 file=${4:-}
    if [ "$op" = write ]; then
        nvme io-passthru "$dev" --opcode=0x1 --namespace-id=1 --data-len=512 --write \
            --input-file="$file" --cdw10="$lba" --cdw11=0 --cdw12=0
    else
        nvme io-passthru "$dev" --opcode=0x2 --namespace-id=1 --data-len=512 --read \
            --cdw10="$lba" --cdw11=0 --cdw12=0 --raw-binary
    fi
}

# refused_with_conflict CMD...: CMD fails and nvme-cli names a Reservation Conflict.
refused_with_conflict() {
    local out rc=0
    out=$("$@" 2>&1 >/dev/null) || rc=$?
    if [ "$rc" = 0 ]; then
        echo "it succeeded"
        return 1
    fi
    grep -Eiq 'reservation.?conflict' <<<"$out" && return 0
    echo "failed otherwise (exit $rc): $out"
    return 1
}

# report DEV PYTHON-ASSERTION: resv-report --eds as JSON, `r` in the assertion. Host IDs
# are compared as bare lowercase hex (nvme-cli prints them so).
report() {
    local out
    out=$(nvme resv-report "$1" --namespace-id=1 --eds --output-format=json 2>&1) || { echo "$out"; return 1; }
    python3 -c '
import json, re, sys
r = json.loads(sys.argv[1])
def hexid(s): return re.sub("[^0-9a-f]", "", str(s).lower())
regs = {hexid(e["hostid"]): e for e in r.get("regctlext", [])}
A, B = hexid(sys.argv[3]), hexid(sys.argv[4])
ok = eval(sys.argv[2])
if not ok: print(json.dumps(r))
sys.exit(0 if ok else 1)
' "$out" "$2" "$ID_A" "$ID_B"
}

load_modules nvme nvme-tcp || bail modules "cannot load nvme-tcp"
if start_plexd; then pass "plexd starts"; else bail "plexd starts" "see log above"; fi
check "configure (namespace with a ptpl_file)" configure || finish

CA=$(connect_host "$HOST_A" "$ID_A") || bail "host A connects" "no controller"
pass "host A connects ($CA)"
CB=$(connect_host "$HOST_B" "$ID_B") || bail "host B connects" "no controller"
pass "host B connects as another host ($CB)"

idc=$(nvme id-ctrl "$CA" --output-format=json 2>&1)
if python3 -c 'import json,sys; c=json.loads(sys.argv[1]); sys.exit(0 if c["oncs"] & 0x20 and c["ctratt"] & 1 else 1)' "$idc" 2>/dev/null; then
    pass "id-ctrl: ONCS reservations, CTRATT 128-bit host ID"
else
    fail "id-ctrl: ONCS reservations, CTRATT 128-bit host ID" "$(grep -Eo '"(oncs|ctratt)" *: *[0-9]+' <<<"$idc" | tr '\n' ' ')"
fi
idn=$(nvme id-ns "$CA" --namespace-id=1 --output-format=json 2>&1)
if python3 -c 'import json,sys; n=json.loads(sys.argv[1]); sys.exit(0 if n["rescap"] == 0xff else 1)' "$idn" 2>/dev/null; then
    pass "id-ns: RESCAP has every type, IEKEY 1.3 and PTPL"
else
    fail "id-ns: RESCAP has every type, IEKEY 1.3 and PTPL" "$(grep -Eo '"rescap" *: *[0-9]+' <<<"$idn")"
fi

# ---- A takes the namespace ------------------------------------------------------------
check "A registers (persisting through power loss)" \
    nvme resv-register "$CA" --namespace-id=1 --nrkey=$KEY_A --rrega=0 --cptpl=3
check "A acquires Write Exclusive" \
    nvme resv-acquire "$CA" --namespace-id=1 --crkey=$KEY_A --rtype=1 --racqa=0
check "resv-report: A holds Write Exclusive with its key" \
    report "$CB" 'r["rtype"] == 1 and r["regctl"] == 1 and r["ptpls"] == 1 and regs[A]["rkey"] == 0xa1 and regs[A]["rcsts"] == 1'
head -c 512 /dev/zero | tr '\0' 'A' >"$WORK/a.blk"
head -c 512 /dev/zero | tr '\0' 'B' >"$WORK/b.blk"
check "A's write goes through" io "$CA" write 0 "$WORK/a.blk"
check "B's write is refused: Reservation Conflict" refused_with_conflict io "$CB" write 0 "$WORK/b.blk"
reads_a() { io "$1" read 0 >"$WORK/r.blk" && cmp -s "$WORK/r.blk" "$WORK/a.blk"; }
check "B may still read (Write Exclusive), and sees A's data" reads_a "$CB"
no_eds() { ! nvme resv-report "$CB" --namespace-id=1 >/dev/null 2>&1; }
check "resv-report without --eds is refused (128-bit host IDs)" no_eds

# ---- B preempts A -----------------------------------------------------------------------
check "B registers" nvme resv-register "$CB" --namespace-id=1 --nrkey=$KEY_B --rrega=0
check "B's acquire conflicts while A holds" refused_with_conflict \
    nvme resv-acquire "$CB" --namespace-id=1 --crkey=$KEY_B --rtype=1 --racqa=0
check "B preempts A (preempt and abort)" \
    nvme resv-acquire "$CB" --namespace-id=1 --crkey=$KEY_B --prkey=$KEY_A --rtype=1 --racqa=2
check "resv-report: B alone, holding Write Exclusive" \
    report "$CA" 'r["rtype"] == 1 and r["regctl"] == 1 and list(regs) == [B] and regs[B]["rkey"] == 0xb2 and regs[B]["rcsts"] == 1'
check "A's write is now refused: Reservation Conflict" refused_with_conflict io "$CA" write 1 "$WORK/a.blk"
b_writes() { io "$CB" write 0 "$WORK/b.blk" >/dev/null && io "$CA" read 0 >"$WORK/r.blk" && cmp -s "$WORK/r.blk" "$WORK/b.blk"; }
check "B's write lands (A reads it back)" b_writes
ptpl_on() { nvme get-feature "$CB" --namespace-id=1 --feature-id=0x83 2>&1 | grep -Eq 'Current value: *0x0*1$'; }
check "Get Features Reservation Persistence: on" ptpl_on

# ---- restart: the reservation comes back from the ptpl_file ---------------------------
saved() { rpc save_config >"$WORK/saved.json" && grep -q "\"ptpl_file\":\"$PTPL\"" "$WORK/saved.json"; }
check "save_config carries ptpl_file" saved
nvme disconnect -n "$NQN" >/dev/null 2>&1
wait_for_no_nvme_dev "$NQN" 20 >/dev/null
stop_plexd
if start_plexd -c "$WORK/saved.json"; then
    pass "plexd restarts from the saved configuration"
else
    bail "plexd restarts from the saved configuration" "see log above"
fi
CA=$(connect_host "$HOST_A" "$ID_A") || bail "hosts reconnect" "no controller for A"
CB=$(connect_host "$HOST_B" "$ID_B") || bail "hosts reconnect" "no controller for B"
check "after the restart resv-report still shows B holding, persisted" \
    report "$CA" 'r["rtype"] == 1 and list(regs) == [B] and regs[B]["rcsts"] == 1 and r["ptpls"] == 1'
check "after the restart A's write is still refused" refused_with_conflict io "$CA" write 1 "$WORK/a.blk"
nvme disconnect -n "$NQN" >/dev/null 2>&1
stop_plexd
if grep -q "panicked" "$WORK/plexd.log"; then
    grep -B2 -A5 panicked "$WORK/plexd.log" | sed 's/^/# /'
    fail "plexd never panicked" "see log"
else
    pass "plexd never panicked"
fi
finish
