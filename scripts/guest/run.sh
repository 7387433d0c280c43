#!/usr/bin/env bash
# Boots the test guest (Debian kernel under QEMU, the host's / read-only with a
# throw-away overlay), runs COMMAND inside as root in the same working
# directory, prints its output and exits with its exit status.
#
#   scripts/guest/run.sh [options] -- COMMAND [ARG...]
#
#   --nvme               add an emulated NVMe controller behind a virtual IOMMU
#                        (repeatable; serials plexstor-nvme0, plexstor-nvme1, ...)
#   --nvme-size SIZE     size of each NVMe namespace (default 1G, sparse image)
#   --nvme-shared-group  add two small NVMe controllers behind one PCI-to-PCI bridge,
#                        so they share an IOMMU group (serials plexstor-grp0 and 1)
#   --iommu              virtual IOMMU even without --nvme
#   --mem MiB            guest memory (default 2048)
#   --smp N              guest CPUs (default 2)
#   --hugepages N        reserve N 2 MiB hugepages, hugetlbfs at /dev/hugepages
#   --fwd HOST:GUEST     host's 127.0.0.1:HOST reaches guest port GUEST (repeatable)
#   --out DIR            writable share, mounted in the guest at the same path;
#                        $GUEST_OUT names it (without --out: a scratch dir)
#   --env NAME=VALUE     export into the command's environment (repeatable)
#   --timeout SEC        kill the guest after SEC seconds (default 600)
#   --boot-timeout SEC   give up on a boot (and retry) if COMMAND has not
#                        started after SEC seconds (default 180)
#   --append ARGS        extra kernel command-line arguments
#   --verbose            show the kernel's boot messages
#   --no-retry           don't retry a failed boot
#
# Exit status: COMMAND's, or 125 if the guest failed (timeout, panic, stall,
# no status); a one-line reason is printed to stderr. Inside, PLEXSTOR_GUEST=1.
#
# A guest whose emulated CPU stops taking timer interrupts (the kernel says
# "rcu_preempt kthread timer wakeup didn't happen") makes no progress again;
# it is stopped at once, with the reason "guest stalled: ...", not at --timeout.

# QEMU's options are comma-separated lists, not mistaken array syntax.
# shellcheck disable=SC2054
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GUEST_SCRIPTS=$REPO/scripts/guest
GUEST_DIR=${PLEXSTOR_GUEST_DIR:-$REPO/.guest}
GUEST_FAILED=125

NVME_COUNT=0
NVME_SIZE=1G
IOMMU=0
NVME_GROUP=0
MEM=2048
SMP=2
HUGEPAGES=0
FWDS=()
OUT=
ENVS=()
TIMEOUT=600
BOOT_TIMEOUT=180
BOOT_HUNG=0
STALL_LINE=
APPEND=
VERBOSE=0
RETRY=1
COMMAND=()

QEMU_PID_FILE=
TIMEOUT_PID=
CURRENT_RUN=

say() { echo "run.sh: $*" >&2; }
die() { echo "run.sh: error: $*" >&2; exit 2; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
            --nvme) NVME_COUNT=$((NVME_COUNT + 1)) ;;
            --nvme-size) NVME_SIZE=${2:?}; shift ;;
            --nvme-shared-group) NVME_GROUP=1 ;;
            --iommu) IOMMU=1 ;;
            --mem) MEM=${2:?}; shift ;;
            --smp) SMP=${2:?}; shift ;;
            --hugepages) HUGEPAGES=${2:?}; shift ;;
            --fwd) FWDS+=("${2:?}"); shift ;;
            --out) OUT=${2:?}; shift ;;
            --env) ENVS+=("${2:?}"); shift ;;
            --timeout) TIMEOUT=${2:?}; shift ;;
            --boot-timeout) BOOT_TIMEOUT=${2:?}; shift ;;
            --append) APPEND+=" ${2:?}"; shift ;;
            --verbose) VERBOSE=1 ;;
            --no-retry) RETRY=0 ;;
            -h|--help) usage; exit 0 ;;
            --) shift; COMMAND=("$@"); break ;;
            *) die "unknown option $1 (did you forget '--' before the command?)" ;;
        esac
        shift
    done
    [ ${#COMMAND[@]} -gt 0 ] || { usage >&2; die "no command given"; }
    local n
    for n in "$MEM" "$SMP" "$HUGEPAGES" "$TIMEOUT" "$BOOT_TIMEOUT"; do
        [[ $n =~ ^[0-9]+$ ]] || die "not a number: $n"
    done
    local f
    for f in "${FWDS[@]}"; do
        [[ $f =~ ^[0-9]+:[0-9]+$ ]] || die "--fwd wants HOSTPORT:GUESTPORT, got $f"
    done
    for f in "${ENVS[@]}"; do
        [[ $f =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants NAME=VALUE, got $f"
    done
    if [ -n "$OUT" ]; then
        mkdir -p "$OUT"
        OUT=$(cd "$OUT" && pwd)
    fi
    # Paths travel on the kernel command line and in 9p mount options.
    [[ $REPO != *[[:space:]]* && $OUT != *[[:space:]]* ]] || die "paths with spaces are not supported"
    [ $((HUGEPAGES * 2)) -lt "$MEM" ] || die "--hugepages $HUGEPAGES does not fit in --mem $MEM"
}

# --- one boot ----------------------------------------------------------------

# The control share: cmd.sh (the command, run by guest-init.sh) and what the
# guest writes back (started, status).
write_control_files() {
    local run=$1 guest_out=$OUT e
    [ -n "$guest_out" ] || { mkdir -p "$run/out"; guest_out=/run/plexstor-guest/out; }
    {
        echo "# written by scripts/guest/run.sh"
        printf 'export GUEST_OUT=%q\n' "$guest_out"
        for e in "${ENVS[@]}"; do printf 'export %q\n' "$e"; done
        printf 'export PLEXSTOR_GUEST_NVME=%q\n' "$NVME_COUNT"
        printf 'cd %q || exit 125\n' "$PWD"
        printf 'exec'; printf ' %q' "${COMMAND[@]}"; printf '\n'
    } >"$run/cmd.sh"
}

kernel_command_line() {
    local args=(
        console=ttyS0 panic=-1 rdinit=/init
        # Under emulation on a loaded host the IO-APIC timer check panics now
        # and then, and the TSC deadline timer causes RCU stalls.
        no_timer_check lapic=notscdeadline
        mitigations=off random.trust_cpu=on
        "plexstor.stage2=$GUEST_SCRIPTS/guest-init.sh"
        "plexstor.modules=$GUEST_MODULES"
    )
    [ -z "$OUT" ] || args+=("plexstor.out=$OUT")
    [ "$VERBOSE" = 1 ] || args+=(quiet loglevel=4)
    [ "$(use_iommu)" = 0 ] || args+=(intel_iommu=on iommu=pt)
    [ "$HUGEPAGES" = 0 ] || args+=(hugepagesz=2M "hugepages=$HUGEPAGES")
    echo "${args[*]}$APPEND"
}

use_iommu() { if [ "$IOMMU" = 1 ] || [ "$NVME_COUNT" -gt 0 ] || [ "$NVME_GROUP" = 1 ]; then echo 1; else echo 0; fi; }

qemu_command() {
    local run=$1 netdev=user,id=net0 f i
    for f in "${FWDS[@]}"; do netdev+=",hostfwd=tcp:127.0.0.1:${f%%:*}-:${f##*:}"; done
    local cmd=(
        qemu-system-x86_64 -name plexstor-guest
        -machine q35 -accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEM"
        -nodefaults -no-user-config -display none -no-reboot
        -pidfile "$run/qemu.pid"
        -device isa-debug-exit,iobase=0xf4,iosize=0x04
        -chardev "stdio,id=console,signal=off,logfile=$run/console.log"
        -serial chardev:console
        -kernel "$GUEST_VMLINUX" -initrd "$GUEST_INITRD"
        -append "$(kernel_command_line)"
    )
    # intel-iommu has to come before the PCI devices it translates for.
    [ "$(use_iommu)" = 0 ] || cmd+=(-device intel-iommu,intremap=on,caching-mode=on)
    cmd+=(
        -fsdev local,id=hostroot,path=/,readonly=on,security_model=none,multidevs=remap
        -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
        -fsdev "local,id=pxsctl,path=$run,security_model=none"
        -device virtio-9p-pci,fsdev=pxsctl,mount_tag=pxsctl
        -netdev "$netdev" -device virtio-net-pci,netdev=net0
    )
    if [ -n "$OUT" ]; then
        cmd+=(-fsdev "local,id=pxsout,path=$OUT,security_model=none"
              -device virtio-9p-pci,fsdev=pxsout,mount_tag=pxsout)
    fi
    # mdts=8: 1 MiB per command (the default, 7, is 512 KiB), as many SSDs allow, so a
    # 1 MiB I/O runs unsplit on a 256-entry PRP list.
    for ((i = 0; i < NVME_COUNT; i++)); do
        truncate -s "$NVME_SIZE" "$run/nvme$i.img"
        cmd+=(-drive "file=$run/nvme$i.img,if=none,id=nvme$i,format=raw"
              -device "nvme,serial=plexstor-nvme$i,drive=nvme$i,mdts=8")
    done
    # A conventional PCI bridge: the IOMMU sees its devices' DMA under the bridge's requester
    # ID, so it cannot isolate them and the kernel puts them in one group.
    if [ "$NVME_GROUP" = 1 ]; then
        cmd+=(-device pci-bridge,id=grpbridge,chassis_nr=1)
        for i in 0 1; do
            truncate -s 16M "$run/grp$i.img"
            cmd+=(-drive "file=$run/grp$i.img,if=none,id=grp$i,format=raw"
                  -device "nvme,serial=plexstor-grp$i,drive=grp$i,bus=grpbridge,addr=$((i + 1))")
        done
    fi
    printf '%s\0' "${cmd[@]}"
}

stop_qemu() {
    local pid
    if [ -n "$QEMU_PID_FILE" ] && [ -s "$QEMU_PID_FILE" ]; then
        pid=$(cat "$QEMU_PID_FILE")
        kill "$pid" 2>/dev/null || true
    fi
    if [ -n "$TIMEOUT_PID" ]; then
        kill "$TIMEOUT_PID" 2>/dev/null || true
        wait "$TIMEOUT_PID" 2>/dev/null || true
        TIMEOUT_PID=
    fi
}

on_signal() {
    say "interrupted, stopping the guest"
    stop_qemu
    if [ -n "$CURRENT_RUN" ]; then rm -rf "$CURRENT_RUN"; fi
    exit 130
}

# Why a boot produced no status: one line for people and for the retry logic.
failure_reason() {
    local run=$1 qemu_rc=$2 marker
    if [ "$BOOT_HUNG" = 1 ]; then
        echo "boot timeout: the command had not started after ${BOOT_TIMEOUT}s"
    elif [ -n "$STALL_LINE" ]; then
        echo "guest stalled: $STALL_LINE"
    elif [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
        if [ -e "$run/started" ]; then
            echo "timeout after ${TIMEOUT}s (the command was still running)"
        else
            echo "timeout after ${TIMEOUT}s (the guest had not finished booting)"
        fi
    elif marker=$(grep -a -m1 -o 'PLEXSTOR-GUEST-FAIL: .*' "$run/console.log" 2>/dev/null); then
        echo "${marker#PLEXSTOR-GUEST-FAIL: }" | tr -d '\r'
    elif grep -aq 'Kernel panic' "$run/console.log" 2>/dev/null; then
        echo "kernel panic: $(grep -a -m1 -o 'Kernel panic.*' "$run/console.log" | tr -d '\r')"
    elif [ "$qemu_rc" != 0 ]; then
        echo "qemu exited with status $qemu_rc"
    else
        echo "no status from the guest (it stopped before the command finished)"
    fi
}

# The kernel's words for a CPU whose timer no longer fires. Seen under TCG on a
# busy host even with lapic=notscdeadline: the CPU idles for good, RCU can end
# no grace period, and every task that waits for one (blkid, kblockd) hangs.
STALL_PATTERN="rcu_preempt kthread timer wakeup didn't happen"

# Returns when QEMU has ended, stopping it early in two cases: COMMAND has not
# started within --boot-timeout (a boot that hangs, seen under emulation on a
# loaded host, should not eat the whole --timeout before the retry), or the
# console shows a stalled CPU (STALL_PATTERN).
watch_guest() {
    local run=$1 t0=$2 line
    while kill -0 "$TIMEOUT_PID" 2>/dev/null; do
        if [ ! -e "$run/started" ] &&
           [ $(( (${EPOCHREALTIME/./} - t0) / 1000000 )) -ge "$BOOT_TIMEOUT" ]; then
            BOOT_HUNG=1
            stop_qemu
            return 0
        fi
        if line=$(grep -a -m1 -F "$STALL_PATTERN" "$run/console.log" 2>/dev/null); then
            STALL_LINE=$(printf '%s' "$line" | tr -d '\r')
            stop_qemu
            return 0
        fi
        sleep 1
    done
}

# Boots once. Sets BOOT_RC (the command's status, or empty), BOOT_REASON and
# BOOT_STARTED (1 if the command had started).
boot_once() {
    local run=$1 qemu_rc=0 t0=${EPOCHREALTIME/./}
    local -a cmd
    mapfile -d '' -t cmd < <(qemu_command "$run")
    write_control_files "$run"
    QEMU_PID_FILE=$run/qemu.pid
    # In the background so that a signal reaches our trap (and kills QEMU)
    # at once; timeout guards against a guest that hangs.
    timeout -k 10 "$TIMEOUT" "${cmd[@]}" </dev/null &
    TIMEOUT_PID=$!
    BOOT_HUNG=0 STALL_LINE=
    watch_guest "$run" "$t0"
    if [ -n "$TIMEOUT_PID" ]; then
        wait "$TIMEOUT_PID" || qemu_rc=$?
        TIMEOUT_PID=
    fi
    BOOT_RC='' BOOT_REASON='' BOOT_STARTED=0
    [ -e "$run/started" ] && BOOT_STARTED=1
    if [ -s "$run/status" ]; then
        BOOT_RC=$(cat "$run/status")
        local booted elapsed_ds
        booted=$(cat "$run/started")                       # e.g. 6.52
        elapsed_ds=$(( (${EPOCHREALTIME/./} - t0) / 100000 )) # tenths of a second
        say "guest: command started ${booted%?}s after boot; total $((elapsed_ds / 10)).$((elapsed_ds % 10))s; status $BOOT_RC"
    else
        BOOT_REASON=$(failure_reason "$run" "$qemu_rc")
    fi
    if [ -n "$OUT" ]; then cp "$run/console.log" "$OUT/guest-console.log" 2>/dev/null || true; fi
}

main() {
    parse_args "$@"
    "$GUEST_SCRIPTS/prepare.sh" --quiet
    # shellcheck source=/dev/null
    . "$GUEST_DIR/guest.env"
    mkdir -p "$GUEST_DIR/runs"
    # Left behind only by a run.sh that was killed outright (SIGKILL).
    find "$GUEST_DIR/runs" -mindepth 1 -maxdepth 1 -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
    trap on_signal INT TERM HUP

    local attempt run
    for attempt in 1 2; do
        run=$(mktemp -d "$GUEST_DIR/runs/run.XXXXXX")
        CURRENT_RUN=$run
        boot_once "$run"
        if [ -n "$BOOT_RC" ]; then
            rm -rf "$run"
            exit "$BOOT_RC"
        fi
        if [ "$BOOT_STARTED" = 0 ] && [ "$RETRY" = 1 ] && [ "$attempt" = 1 ]; then
            say "boot failed: $BOOT_REASON; retrying once"
            rm -rf "$run"
            continue
        fi
        # The console was already streamed to stdout; one line says why.
        say "guest failed: $BOOT_REASON"
        rm -rf "$run"
        exit "$GUEST_FAILED"
    done
}

main "$@"
