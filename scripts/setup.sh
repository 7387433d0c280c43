#!/usr/bin/env bash
# Prepares a machine for plexd, like SPDK's scripts/setup.sh: reserves
# hugepages, mounts hugetlbfs, and binds NVMe controllers to vfio-pci so plexd
# can drive them from userspace. `reset` gives them back to the kernel.
#
#   scripts/setup.sh [config]   reserve hugepages, bind NVMe devices to vfio-pci
#   scripts/setup.sh status     hugepages per node and size; NVMe devices
#   scripts/setup.sh reset      NVMe devices back to the kernel's nvme driver
#   scripts/setup.sh help
#
# Environment:
#   HUGEMEM=MiB          memory to reserve as hugepages (default 2048)
#   NRHUGE=N             number of hugepages instead (overrides HUGEMEM)
#   HUGEPGSZ=kB          hugepage size (default: the kernel's default, e.g. 2048)
#   HUGE_EVEN_ALLOC=yes  split the pages evenly across NUMA nodes
#   PCI_ALLOWED="BDF.."  only these devices (e.g. "0000:00:04.0 0000:00:05.0")
#   PCI_BLOCKED="BDF.."  never these devices
#   CLEAR_HUGE=yes       reset: also release all hugepages
#
# A device with a mounted filesystem, an active swap area or a holder (device
# mapper, md) on any of its namespaces is never touched. Running twice is fine.
set -euo pipefail

SYSFS_PCI=/sys/bus/pci
NVME_CLASS=0x010802
HUGE_MOUNT=/dev/hugepages

BIND_FAILURES=0

say() { echo "$*"; }
warn() { echo "warning: $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

# Shell built-ins rather than cat/awk/readlink in loops: where plexd runs that
# hardly matters, but in the emulated test guest every exec costs ~0.1-1 s.

# read_into VAR FILE: first line of FILE into VAR (empty if unreadable).
read_into() {
    local -n _var=$1
    _var=
    IFS= read -r _var 2>/dev/null <"$2" || true
}

# meminfo_value VAR FIELD: e.g. meminfo_value kb Hugepagesize
meminfo_value() {
    local -n _out=$1
    local key value _
    _out=
    while read -r key value _; do
        if [ "$key" = "$2:" ]; then _out=$value; return 0; fi
    done </proc/meminfo
}

# Lines of stdin joined with SEP.
join_lines() {
    local sep=$1 line out='' first=1
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        if [ "$first" = 1 ]; then out=$line first=0; else out+=$sep$line; fi
    done
    echo "$out"
}

hugetlbfs_mounted() {
    local _src mnt type _rest
    while read -r _src mnt type _rest; do
        [ "$mnt" = "$HUGE_MOUNT" ] && [ "$type" = hugetlbfs ] && return 0
    done </proc/mounts
    return 1
}

require_root() {
    [ "$(id -u)" = 0 ] || die "this needs root (hugepages and driver binding are system-wide)"
}

# ---- hugepages -------------------------------------------------------------

default_hugepage_kb() {
    local kb
    meminfo_value kb Hugepagesize
    echo "$kb"
}

hugepage_kb() {
    local kb=${HUGEPGSZ:-$(default_hugepage_kb)}
    kb=${kb%kB}
    kb=${kb%k}
    [ -d "/sys/kernel/mm/hugepages/hugepages-${kb}kB" ] ||
        die "hugepage size ${kb}kB is not supported here (have: $(find /sys/kernel/mm/hugepages -mindepth 1 -maxdepth 1 -printf '%f ' 2>/dev/null))"
    echo "$kb"
}

numa_nodes() {
    local n
    for n in /sys/devices/system/node/node[0-9]*; do
        if [ -d "$n/hugepages" ]; then echo "${n##*/}"; fi
    done
}

# Writes COUNT into a nr_hugepages file; compacts memory once if the kernel
# could not find enough contiguous memory.
write_nr_hugepages() {
    local file=$1 count=$2 got
    echo "$count" >"$file"
    read_into got "$file"
    if [ "$got" -lt "$count" ]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
        echo 1 >/proc/sys/vm/compact_memory 2>/dev/null || true
        echo "$count" >"$file"
    fi
}

# Hugepages are taken from ordinary memory: asking for (nearly) all of it
# leaves the kernel nothing and the machine stalls (HUGEMEM's default of 2048
# does exactly that in a 2 GiB VM). Keep an eighth, and at least 256 MiB.
refuse_to_starve_the_machine() {
    local pages=$1 kb=$2 total_kb keep_kb
    meminfo_value total_kb MemTotal
    keep_kb=$((total_kb / 8 > 262144 ? total_kb / 8 : 262144))
    if [ $((pages * kb)) -gt $((total_kb - keep_kb)) ]; then
        die "$((pages * kb / 1024)) MiB of hugepages would leave this machine ($((total_kb / 1024)) MiB) too little memory; set HUGEMEM to at most $(((total_kb - keep_kb) / 1024))"
    fi
}

reserve_hugepages() {
    local kb pages nodes per_node node total=0 got
    kb=$(hugepage_kb)
    if [ -n "${NRHUGE:-}" ]; then
        [[ $NRHUGE =~ ^[0-9]+$ ]] || die "NRHUGE must be a number of pages, got '$NRHUGE'"
        pages=$NRHUGE
    else
        [[ ${HUGEMEM:-2048} =~ ^[0-9]+$ ]] || die "HUGEMEM must be MiB, got '$HUGEMEM'"
        # Round up: HUGEMEM=3 with 2 MiB pages gives 2 pages, not 1.
        pages=$(((${HUGEMEM:-2048} * 1024 + kb - 1) / kb))
    fi
    refuse_to_starve_the_machine "$pages" "$kb"
    mapfile -t nodes < <(numa_nodes)
    if [ "${HUGE_EVEN_ALLOC:-no}" = yes ] && [ ${#nodes[@]} -gt 0 ]; then
        per_node=$(((pages + ${#nodes[@]} - 1) / ${#nodes[@]}))
        for node in "${nodes[@]}"; do
            write_nr_hugepages "/sys/devices/system/node/$node/hugepages/hugepages-${kb}kB/nr_hugepages" "$per_node"
            read_into got "/sys/devices/system/node/$node/hugepages/hugepages-${kb}kB/nr_hugepages"
            total=$((total + got))
        done
        pages=$((per_node * ${#nodes[@]}))
    else
        write_nr_hugepages "/sys/kernel/mm/hugepages/hugepages-${kb}kB/nr_hugepages" "$pages"
        read_into total "/sys/kernel/mm/hugepages/hugepages-${kb}kB/nr_hugepages"
    fi
    if [ "$total" -lt "$pages" ]; then
        warn "only $total of $pages hugepages of ${kb}kB could be reserved (memory too fragmented or too small);" \
             "reserve them at boot instead: hugepagesz=${kb}K hugepages=$pages on the kernel command line"
        return 1
    fi
    say "hugepages: $total x ${kb}kB reserved ($((total * kb / 1024)) MiB)"
}

mount_hugetlbfs() {
    local kb
    kb=$(hugepage_kb)
    hugetlbfs_mounted && return 0
    mkdir -p "$HUGE_MOUNT"
    if [ "$kb" = "$(default_hugepage_kb)" ]; then
        mount -t hugetlbfs nodev "$HUGE_MOUNT"
    else
        mount -t hugetlbfs -o "pagesize=${kb}K" nodev "$HUGE_MOUNT"
    fi
    say "hugetlbfs mounted at $HUGE_MOUNT"
}

clear_hugepages() {
    local f
    for f in /sys/kernel/mm/hugepages/hugepages-*/nr_hugepages \
             /sys/devices/system/node/node*/hugepages/hugepages-*/nr_hugepages; do
        [ -e "$f" ] && echo 0 >"$f"
    done
    local left
    meminfo_value left HugePages_Total
    if [ "${left:-0}" -gt 0 ]; then
        warn "$left hugepages still in use (by running programs or files in $HUGE_MOUNT); they are freed when released"
    fi
    say "hugepages released"
}

# ---- PCI / NVMe --------------------------------------------------------------

# "00:04.0" -> "0000:00:04.0"
normalize_bdf() {
    local bdf=${1,,}
    [[ $bdf =~ ^[0-9a-f]{4}: ]] || bdf=0000:$bdf
    echo "$bdf"
}

in_list() {
    local needle=$1 item
    shift
    for item in "$@"; do
        [ "$(normalize_bdf "$item")" = "$needle" ] && return 0
    done
    return 1
}

# NVMe controllers (BDFs) that PCI_ALLOWED / PCI_BLOCKED let us manage.
nvme_devices() {
    local dev bdf allowed blocked class
    read -r -a allowed <<<"${PCI_ALLOWED:-}"
    read -r -a blocked <<<"${PCI_BLOCKED:-}"
    for dev in "$SYSFS_PCI"/devices/*; do
        read_into class "$dev/class"
        [ "$class" = "$NVME_CLASS" ] || continue
        bdf=${dev##*/}
        if [ ${#allowed[@]} -gt 0 ] && ! in_list "$bdf" "${allowed[@]}"; then continue; fi
        if [ ${#blocked[@]} -gt 0 ] && in_list "$bdf" "${blocked[@]}"; then continue; fi
        echo "$bdf"
    done
}

current_driver() {
    local link=$SYSFS_PCI/devices/$1/driver target
    if [ -e "$link" ]; then
        target=$(readlink "$link")
        echo "${target##*/}"
    else
        echo "-"
    fi
}

# Block devices (names) served by the controller at BDF: its namespaces, the
# multipath heads over them, and their partitions.
block_devices_of() {
    local bdf=$1 ctrl name blk part
    for ctrl in "$SYSFS_PCI/devices/$bdf"/nvme/nvme*; do
        [ -d "$ctrl" ] || continue
        name=${ctrl##*/}
        for blk in /sys/block/nvme*; do
            [ -e "$blk" ] || continue
            # Non-multipath namespaces and per-path devices hang off the
            # controller; a multipath head's device is its subsystem, which
            # links to every controller in it.
            if [ "$blk/device" -ef "$ctrl" ] || [ -e "$blk/device/$name" ]; then
                echo "${blk##*/}"
                for part in "$blk/${blk##*/}"p*; do
                    if [ -e "$part" ]; then echo "${part##*/}"; fi
                done
            fi
        done
    done
    return 0
}

# Why a block device must not be taken away, or nothing.
block_device_use() {
    local name=$1 majmin mm mnt src holder holders=() _rest
    read_into majmin "/sys/class/block/$name/dev"
    [ -n "$majmin" ] || return 0
    # By device number (mountinfo's 3rd field), which also catches a mount
    # made through another name for the same device; by name as a fallback.
    while read -r _ _ mm _ mnt _rest; do
        if [ "$mm" = "$majmin" ]; then echo "$name is mounted on $mnt"; return 0; fi
    done </proc/self/mountinfo
    while read -r src mnt _rest; do
        if [ "$src" = "/dev/$name" ]; then echo "$name is mounted on $mnt"; return 0; fi
    done </proc/mounts
    while read -r src _rest; do
        if [ "$src" = "/dev/$name" ]; then echo "$name is an active swap area"; return 0; fi
    done </proc/swaps
    for holder in "/sys/class/block/$name/holders"/*; do
        [ -e "$holder" ] && holders+=("${holder##*/}")
    done
    if [ ${#holders[@]} -gt 0 ]; then echo "$name is held by ${holders[*]}"; fi
}

# Reasons (one per line) why the controller at BDF is in use, or nothing.
device_in_use() {
    local blk
    for blk in $(block_devices_of "$1"); do
        block_device_use "$blk"
    done
    return 0
}

iommu_enabled() {
    [ -n "$(ls -A /sys/kernel/iommu_groups 2>/dev/null)" ]
}

explain_missing_iommu() {
    cat >&2 <<'EOF'
warning: no IOMMU is active (/sys/kernel/iommu_groups is empty), so vfio-pci
cannot take NVMe devices. To enable it:
  - turn on VT-d (Intel) or AMD-Vi / IOMMU in the firmware setup;
  - boot with intel_iommu=on iommu=pt (Intel) or amd_iommu=on iommu=pt (AMD);
  - in a QEMU VM add a virtual IOMMU: -machine q35 -device intel-iommu,intremap=on,caching-mode=on
    (scripts/guest/run.sh --nvme does this).
Debian's kernels are built without vfio's no-IOMMU mode.
EOF
}

vfio_pci_available() {
    [ -d "$SYSFS_PCI/drivers/vfio-pci" ] && return 0
    modprobe vfio-pci 2>/dev/null || true
    [ -d "$SYSFS_PCI/drivers/vfio-pci" ]
}

# Binds BDF to DRIVER through driver_override (which also keeps the kernel
# from handing it back to another driver on the next probe).
bind_to() {
    local bdf=$1 driver=$2 dev=$SYSFS_PCI/devices/$1 i
    if [ -e "$dev/driver" ]; then
        echo "$bdf" >"$dev/driver/unbind"
    fi
    if [ "$driver" = nvme ]; then
        echo >"$dev/driver_override"     # clears it
    else
        echo "$driver" >"$dev/driver_override"
    fi
    echo "$bdf" >"$SYSFS_PCI/drivers_probe" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        [ "$(current_driver "$bdf")" = "$driver" ] && return 0
        sleep 0.1
    done
    return 1
}

vfio_group_of() {
    local target
    target=$(readlink "$SYSFS_PCI/devices/$1/iommu_group")
    echo "${target##*/}"
}

# vfio can only use a group whose every device is bound to vfio-pci (or to no
# driver); PCI bridges are fine.
warn_about_group_members() {
    local bdf=$1 member drv
    for member in "$SYSFS_PCI/devices/$bdf/iommu_group/devices"/*; do
        member=${member##*/}
        [ "$member" = "$bdf" ] && continue
        drv=$(current_driver "$member")
        case $drv in vfio-pci|-|pcieport) ;; *)
            warn "$bdf shares IOMMU group $(vfio_group_of "$bdf") with $member (driver $drv); vfio needs the whole group" ;;
        esac
    done
}

bind_nvme_to_vfio() {
    local bdf=$1 reasons driver
    driver=$(current_driver "$bdf")
    if [ "$driver" = vfio-pci ]; then
        say "$bdf: already bound to vfio-pci (/dev/vfio/$(vfio_group_of "$bdf"))"
        return 0
    fi
    reasons=$(device_in_use "$bdf")
    if [ -n "$reasons" ]; then
        say "$bdf: skipped, in use: $(join_lines '; ' <<<"$reasons")"
        return 0
    fi
    if [ ! -e "$SYSFS_PCI/devices/$bdf/iommu_group" ]; then
        say "$bdf: skipped, it has no IOMMU group"
        return 0
    fi
    if bind_to "$bdf" vfio-pci; then
        say "$bdf: $driver -> vfio-pci (/dev/vfio/$(vfio_group_of "$bdf"))"
        warn_about_group_members "$bdf"
    else
        warn "$bdf: binding to vfio-pci failed (driver now: $(current_driver "$bdf")); see dmesg"
        BIND_FAILURES=$((BIND_FAILURES + 1))
    fi
}

give_back_to_kernel() {
    local bdf=$1 driver
    driver=$(current_driver "$bdf")
    if [ "$driver" = nvme ]; then
        say "$bdf: already bound to nvme"
        return 0
    fi
    modprobe nvme 2>/dev/null || true
    if bind_to "$bdf" nvme; then
        say "$bdf: $driver -> nvme"
    else
        warn "$bdf: binding to nvme failed (driver now: $(current_driver "$bdf"))"
        BIND_FAILURES=$((BIND_FAILURES + 1))
    fi
}

# ---- actions ---------------------------------------------------------------

configure() {
    require_root
    local rc=0 bdf devices
    reserve_hugepages || rc=1
    mount_hugetlbfs
    mapfile -t devices < <(nvme_devices)
    if [ ${#devices[@]} -eq 0 ]; then
        say "no NVMe devices (PCI class $NVME_CLASS) to bind${PCI_ALLOWED:+ among PCI_ALLOWED}; nothing else to do"
        return "$rc"
    fi
    if ! vfio_pci_available; then
        say "vfio-pci driver not available (modprobe vfio-pci failed); NVMe devices stay with the kernel"
        return "$rc"
    fi
    if ! iommu_enabled; then
        explain_missing_iommu
        say "NVMe devices stay with the kernel"
        return "$rc"
    fi
    for bdf in "${devices[@]}"; do
        bind_nvme_to_vfio "$bdf"
    done
    [ "$BIND_FAILURES" = 0 ] || rc=1
    return "$rc"
}

reset() {
    require_root
    local bdf devices rc=0
    mapfile -t devices < <(nvme_devices)
    if [ ${#devices[@]} -eq 0 ]; then
        say "no NVMe devices (PCI class $NVME_CLASS)${PCI_ALLOWED:+ among PCI_ALLOWED}"
    fi
    for bdf in "${devices[@]}"; do
        give_back_to_kernel "$bdf"
    done
    [ "${CLEAR_HUGE:-no}" != yes ] || clear_hugepages
    [ "$BIND_FAILURES" = 0 ] || rc=1
    return "$rc"
}

# hugepages-2048kB before hugepages-1048576kB
hugepage_dirs() {
    find "$1" -mindepth 1 -maxdepth 1 -name 'hugepages-*' | sort -t- -k2 -n
}

status_hugepages() {
    local dir node size free total
    echo "Hugepages"
    printf '%-8s %-12s %8s %8s\n' node size free total
    if [ -n "$(numa_nodes)" ]; then
        for node in $(numa_nodes); do
            for dir in $(hugepage_dirs "/sys/devices/system/node/$node/hugepages"); do
                size=${dir##*hugepages-}
                read_into free "$dir/free_hugepages"
                read_into total "$dir/nr_hugepages"
                printf '%-8s %-12s %8s %8s\n' "$node" "$size" "$free" "$total"
            done
        done
    else
        for dir in $(hugepage_dirs /sys/kernel/mm/hugepages); do
            size=${dir##*hugepages-}
            read_into free "$dir/free_hugepages"
            read_into total "$dir/nr_hugepages"
            printf '%-8s %-12s %8s %8s\n' - "$size" "$free" "$total"
        done
    fi
    if hugetlbfs_mounted; then
        echo "hugetlbfs: mounted at $HUGE_MOUNT"
    else
        echo "hugetlbfs: not mounted at $HUGE_MOUNT"
    fi
}

status_nvme() {
    local bdf dev node blks in_use devices vendor device
    echo
    echo "NVMe devices"
    # Status lists every NVMe device; PCI_ALLOWED/PCI_BLOCKED only narrow it.
    mapfile -t devices < <(nvme_devices)
    if [ ${#devices[@]} -eq 0 ]; then
        echo "none (no PCI device of class $NVME_CLASS)"
        return 0
    fi
    printf '%-13s %-6s %-6s %-4s %-9s %-5s %-24s %s\n' BDF vendor device numa driver group "block devices" "in use (mounted, swap, holders)"
    for bdf in "${devices[@]}"; do
        dev=$SYSFS_PCI/devices/$bdf
        read_into node "$dev/numa_node"
        [ "${node:--1}" -ge 0 ] 2>/dev/null || node=-
        blks=$(block_devices_of "$bdf" | join_lines ,)
        in_use=$(device_in_use "$bdf" | join_lines '; ')
        read_into vendor "$dev/vendor"
        read_into device "$dev/device"
        printf '%-13s %-6s %-6s %-4s %-9s %-5s %-24s %s\n' "$bdf" \
            "${vendor#0x}" "${device#0x}" "$node" \
            "$(current_driver "$bdf")" "$( [ -e "$dev/iommu_group" ] && vfio_group_of "$bdf" || echo -)" \
            "${blks:--}" "${in_use:-no}"
    done
    if ! iommu_enabled; then echo "(no IOMMU active: vfio-pci cannot be used here)"; fi
}

status() {
    status_hugepages
    status_nvme
}

main() {
    local action=${1:-config}
    case $action in
        config) configure ;;
        status) status ;;
        reset) reset ;;
        help|-h|--help) usage ;;
        *) usage >&2; die "unknown action '$action'" ;;
    esac
}

main "$@"
