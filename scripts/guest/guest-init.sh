#!/bin/bash
# Stage 2 of the test guest: PID 1 after switch_root, running from the host's /
# (read-only over 9p, with a tmpfs overlay on top). Sets up what a test needs
# (mounts, modules, network, hugepages), runs the command that run.sh wrote
# into the control share, writes its exit status there and reboots (QEMU runs
# with -no-reboot, so a reboot ends it).
#
# No `set -e`: PID 1 must always reach the point where it reports and reboots.
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

CTL=/run/plexstor-guest      # run.sh's per-run directory, a writable 9p share
NINEP_RW=trans=virtio,version=9p2000.L,msize=262144

fail() {
    echo "PLEXSTOR-GUEST-FAIL: stage2: $*"
    reboot_now
}

# QEMU's isa-debug-exit port ends the VM at once and quietly; the sysrq reboot
# (which QEMU's -no-reboot also turns into an exit) is the fallback.
reboot_now() {
    sync
    printf '\000' | dd of=/dev/port bs=1 seek=$((0xf4)) count=1 status=none 2>/dev/null
    sleep 1
    echo b >/proc/sysrq-trigger
    sleep 30
}

mount_pseudo_filesystems() {
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
    mkdir -p /run/lock /dev/pts /dev/shm /dev/hugepages /dev/mqueue
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
    mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
    # devtmpfs lacks these; bash's <(...) needs /dev/fd.
    ln -sfn /proc/self/fd /dev/fd
    ln -sfn /proc/self/fd/0 /dev/stdin
    ln -sfn /proc/self/fd/1 /dev/stdout
    ln -sfn /proc/self/fd/2 /dev/stderr
}

mount_shares() {
    mkdir -p "$CTL"
    mount -t 9p -o "$NINEP_RW" pxsctl "$CTL" || fail "mount of the control share"
    # shellcheck source=/dev/null
    . "$CTL/run.env" || fail "no run.env in the control share"
    if [ -n "${RUN_OUT_PATH:-}" ]; then
        # Same path as on the host, so a test can name files the same way.
        mkdir -p "$RUN_OUT_PATH"
        mount -t 9p -o "$NINEP_RW" pxsout "$RUN_OUT_PATH" || fail "mount of the --out share"
    fi
}

# The host has no /lib/modules for this kernel; the extracted tree does.
mount_kernel_modules() {
    mkdir -p /lib/modules
    mount --bind "$RUN_MODULES" /lib/modules || fail "bind mount of $RUN_MODULES"
    modprobe configfs && mount -t configfs configfs /sys/kernel/config
}

# User-mode networking: the guest is 10.0.2.15, the host 10.0.2.2.
bring_up_network() {
    hostname plexstor-guest
    ip link set lo up
    modprobe virtio_net || fail "modprobe virtio_net"
    ip link set eth0 up || fail "no eth0"
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
}

reserve_hugepages() {
    [ "${RUN_HUGEPAGES:-0}" -gt 0 ] || return 0
    local got
    # Normally already reserved by hugepages= on the kernel command line.
    got=$(cat /proc/sys/vm/nr_hugepages)
    if [ "$got" -lt "$RUN_HUGEPAGES" ]; then
        echo "$RUN_HUGEPAGES" >/proc/sys/vm/nr_hugepages
        got=$(cat /proc/sys/vm/nr_hugepages)
    fi
    [ "$got" -ge "$RUN_HUGEPAGES" ] ||
        echo "guest-init: warning: only $got of $RUN_HUGEPAGES hugepages reserved"
    mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages
}

run_command() {
    local rc
    read -r uptime _ </proc/uptime
    echo "$uptime" >"$CTL/started"
    # A clean environment: only what run.sh passes plus sane defaults.
    env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/root/.cargo/bin \
        HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb LANG=C.UTF-8 \
        PLEXSTOR_GUEST=1 GUEST_OUT="$RUN_GUEST_OUT" \
        setsid /bin/bash "$CTL/cmd.sh" </dev/null
    rc=$?
    echo "$rc" >"$CTL/status.tmp" && mv "$CTL/status.tmp" "$CTL/status"
}

main() {
    # Plain \n line ends for the command's output (the serial tty would make
    # them \r\n, and test runners would read "ok - name\r").
    stty -onlcr </dev/console 2>/dev/null
    mount_pseudo_filesystems
    mount_shares
    mount_kernel_modules
    bring_up_network
    reserve_hugepages
    run_command
    reboot_now
}

main
