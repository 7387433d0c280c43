#!/bin/bash
# Stage 2 of the test guest: PID 1 after switch_root, running from the host's /
# (read-only over 9p, with a tmpfs overlay on top). Stage 1 (initramfs-init)
# has set everything up; this runs the command run.sh wrote into the control
# share, writes its exit status there and ends the VM.
#
# No `set -e`: PID 1 must always reach the point where it reports and exits.
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

CTL=/run/plexstor-guest      # run.sh's per-run directory, a writable 9p share

# QEMU's isa-debug-exit port ends the VM at once and quietly; a sysrq reboot
# (which QEMU's -no-reboot also turns into an exit) is the fallback.
end_vm() {
    sync
    printf '\000' | dd of=/dev/port bs=1 seek=$((0xf4)) count=1 status=none 2>/dev/null
    sleep 1
    echo b >/proc/sysrq-trigger
    sleep 30
}

run_command() {
    local rc uptime _
    read -r uptime _ </proc/uptime
    echo "$uptime" >"$CTL/started"
    # A clean environment: sane defaults plus what cmd.sh exports.
    env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/root/.cargo/bin \
        HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb LANG=C.UTF-8 \
        PLEXSTOR_GUEST=1 \
        setsid /bin/bash "$CTL/cmd.sh" </dev/null
    rc=$?
    echo "$rc" >"$CTL/status.tmp" && mv "$CTL/status.tmp" "$CTL/status"
}

# Plain \n line ends for the command's output (the serial tty would make them
# \r\n, and test runners would read "ok - name\r").
stty -onlcr </dev/console 2>/dev/null
run_command
end_vm
