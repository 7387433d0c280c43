#!/usr/bin/env bash
# Prepares the test guest: host tools from Debian packages, a Debian kernel
# (downloaded and unpacked, never installed), an uncompressed vmlinux for QEMU's
# PVH entry, and a small busybox initramfs. Everything lands in $REPO/.guest and
# is reused: a second run does nothing but check.
#
#   scripts/guest/prepare.sh [--quiet] [--refresh] [--kernel-suite SUITE]
#
# --refresh          download the newest kernel of the suite even if one is cached
# --kernel-suite S   Debian suite to take linux-image-amd64 from
#                    (default: <codename>-backports, i.e. 6.12 on bookworm;
#                    "bookworm" gives 6.1). Also env GUEST_KERNEL_SUITE.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GUEST_SCRIPTS=$REPO/scripts/guest
GUEST_DIR=${PLEXSTOR_GUEST_DIR:-$REPO/.guest}
APT_DIR=$GUEST_DIR/apt

QUIET=0
REFRESH=0
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
KERNEL_SUITE=${GUEST_KERNEL_SUITE:-$CODENAME-backports}

# Modules the initramfs loads: to reach the host's root over 9p, and what
# stage 1 sets up besides (network, configfs). Their dependencies are resolved
# against the extracted kernel with modprobe.
STAGE1_MODULES=(virtio_pci 9pnet_virtio 9p overlay virtio_net configfs)

# command-or-file  package  [suite]   (host tools run.sh, the guest and tests need;
# the guest's PATH has /usr/bin/python3, not a pyenv one)
HOST_PACKAGES=(
    "qemu-system-x86_64 qemu-system-x86 backports"
    "/usr/share/qemu/pvh.bin qemu-system-data backports"
    "busybox busybox-static"
    "nvme nvme-cli"
    "fio fio"
    "mkfs.xfs xfsprogs"
    "mkfs.ext4 e2fsprogs"
    "modprobe kmod"
    "depmod kmod"
    "zstd zstd"
    "xz xz-utils"
    "cpio cpio"
    "ip iproute2"
    "lspci pciutils"
    "/usr/bin/python3 python3"
    "timeout coreutils"
    "flock util-linux"
    # NVMe/RDMA over soft-RoCE (rdma_rxe) in the guest: the rxe verbs provider, ibv_devices,
    # rping for a first check, and the verbs and CM libraries the rdma crate loads.
    "/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so ibverbs-providers"
    "/usr/lib/x86_64-linux-gnu/libibverbs.so.1 libibverbs1"
    "/usr/lib/x86_64-linux-gnu/librdmacm.so.1 librdmacm1"
    "rping rdmacm-utils"
    "ibv_devices ibverbs-utils"
    # The headers the rdma crate's layout test checks our declarations against.
    "/usr/include/infiniband/verbs.h libibverbs-dev"
    "/usr/include/rdma/rdma_cma.h librdmacm-dev"
)

say() { [ "$QUIET" = 1 ] || echo "prepare: $*" >&2; }
die() { echo "prepare: error: $*" >&2; exit 1; }

parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
            --quiet) QUIET=1 ;;
            --refresh) REFRESH=1 ;;
            --kernel-suite) KERNEL_SUITE=${2:?--kernel-suite needs a suite}; shift ;;
            -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
            *) die "unknown option $1" ;;
        esac
        shift
    done
}

# --- apt, with a private configuration -------------------------------------
# The machine's /etc/apt lacks bookworm-backports, and bookworm's qemu 7.2 would
# force the removal of the newer qemu-utils already installed from backports.
# So we keep our own sources and package lists under .guest/apt and never touch
# /etc/apt or the system's lists.

first_uri_matching() {
    local pattern=$1 fallback=$2 uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
              /etc/apt/sources.list.d/*.sources 2>/dev/null |
          grep -v '^[[:space:]]*#' | grep -oE "https?://[^ ]*${pattern}/?( |$)" | head -n1 | tr -d ' ' || true)
    echo "${uri:-$fallback}"
}

write_private_apt_sources() {
    local debian security
    debian=$(first_uri_matching '/debian' http://deb.debian.org/debian)
    security=$(first_uri_matching '/debian-security' http://deb.debian.org/debian-security)
    mkdir -p "$APT_DIR/sources.list.d" "$APT_DIR/lists/partial"
    cat > "$APT_DIR/sources.list.d/plexstor-guest.sources" <<EOF
Types: deb
URIs: $debian
Suites: $CODENAME $CODENAME-updates $CODENAME-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $CODENAME-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

APT_OPTS=()
setup_private_apt() {
    write_private_apt_sources
    APT_OPTS=(
        -o "Dir::Etc::SourceList=/dev/null"
        -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
        -o "Dir::State::Lists=$APT_DIR/lists"
        -o "APT::Sandbox::User=root"
    )
}

# Refresh the private package lists when missing or older than a day.
apt_update_if_stale() {
    local stamp=$APT_DIR/updated
    if [ "${1:-}" != force ] && [ -e "$stamp" ] &&
       [ -n "$(find "$stamp" -mmin -1440 2>/dev/null)" ]; then
        return 0
    fi
    say "apt-get update (private lists in ${APT_DIR#"$REPO"/})"
    apt-get "${APT_OPTS[@]}" -q update >"$APT_DIR/update.log" 2>&1 ||
        { cat "$APT_DIR/update.log" >&2; die "apt-get update failed"; }
    touch "$stamp"
}

package_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

have_tool() {
    case $1 in
        /*) [ -e "$1" ] ;;
        *) PATH=$PATH:/usr/sbin:/sbin command -v "$1" >/dev/null 2>&1 ;;
    esac
}

# Install only what is missing (installing a present package would upgrade it).
ensure_host_packages() {
    local entry tool pkg suite main=() backports=()
    for entry in "${HOST_PACKAGES[@]}"; do
        read -r tool pkg suite <<<"$entry"
        if have_tool "$tool" && { [ "$pkg" != busybox-static ] || package_installed busybox-static; }; then
            continue
        fi
        if [ "${suite:-}" = backports ]; then backports+=("$pkg"); else main+=("$pkg"); fi
    done
    [ ${#main[@]} -eq 0 ] && [ ${#backports[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing host packages (${main[*]} ${backports[*]}); run as root"
    setup_private_apt
    apt_update_if_stale
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" -y -q --no-install-recommends install)
    mapfile -t backports < <(printf '%s\n' "${backports[@]}" | sort -u | grep . || true)
    mapfile -t main < <(printf '%s\n' "${main[@]}" | sort -u | grep . || true)
    if [ ${#backports[@]} -gt 0 ]; then
        say "installing from $CODENAME-backports: ${backports[*]}"
        "${install[@]}" -t "$CODENAME-backports" "${backports[@]}" >"$APT_DIR/install.log" 2>&1 ||
            { tail -n 30 "$APT_DIR/install.log" >&2; die "apt-get install ${backports[*]} failed"; }
    fi
    if [ ${#main[@]} -gt 0 ]; then
        say "installing: ${main[*]}"
        "${install[@]}" "${main[@]}" >"$APT_DIR/install.log" 2>&1 ||
            { tail -n 30 "$APT_DIR/install.log" >&2; die "apt-get install ${main[*]} failed"; }
    fi
}

# --- the kernel --------------------------------------------------------------

# Prints "package version" of the linux-image-* package that linux-image-amd64
# in $KERNEL_SUITE depends on.
resolve_kernel_package() {
    local meta_version depends
    meta_version=$(apt-cache "${APT_OPTS[@]}" madison linux-image-amd64 |
        awk -F'|' -v s=" $KERNEL_SUITE" '
            { gsub(/^ +| +$/, "", $2) }
            index($3, s "/") || index($3, s "-security/") || index($3, s "-updates/") { print $2; exit }')
    [ -n "$meta_version" ] || die "no linux-image-amd64 in suite $KERNEL_SUITE"
    depends=$(apt-cache "${APT_OPTS[@]}" show "linux-image-amd64=$meta_version" |
        sed -n 's/^Depends: *//p' | head -n1)
    # e.g. "linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)"
    [[ $depends =~ ^(linux-image-[^ ,]+)\ \(=\ ([^\)]+)\) ]] ||
        die "cannot read the kernel package from 'Depends: $depends'"
    echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
}

# vmlinuz is a small decompressor followed by the compressed kernel (xz on
# Debian's 6.1, zstd on 6.12). Find each candidate magic number, decompress from
# there, and keep the first result that is an ELF file.
extract_vmlinux() {
    local vmlinuz=$1 out=$2 pair pattern tool offset
    for pair in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
        tool=${pair%%:*} pattern=${pair#*:}
        have_tool "$tool" || continue
        while read -r offset; do
            tail -c +"$((offset + 1))" "$vmlinuz" | "$tool" -dc >"$out.tmp" 2>/dev/null || true
            if [ "$(head -c 4 "$out.tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                mv "$out.tmp" "$out"
                return 0
            fi
        done < <(LC_ALL=C grep -obUaP "$pattern" "$vmlinuz" | cut -d: -f1)
    done
    rm -f "$out.tmp"
    die "no compressed ELF kernel found in $vmlinuz"
}

# Downloads and unpacks the kernel into $GUEST_DIR/kernel/<uname -r>.
fetch_kernel() {
    setup_private_apt
    apt_update_if_stale
    local pkg version deb tmp kver line
    line=$(resolve_kernel_package)
    read -r pkg version <<<"$line"
    say "kernel package: $pkg $version (suite $KERNEL_SUITE)"
    tmp=$GUEST_DIR/kernel/.download
    rm -rf "$tmp"
    mkdir -p "$tmp/root"
    if ! (cd "$tmp" && apt-get "${APT_OPTS[@]}" -q download "$pkg=$version" >download.log 2>&1); then
        # The archive moves on; a stale list names a file that no longer exists.
        apt_update_if_stale force
        line=$(resolve_kernel_package)
        read -r pkg version <<<"$line"
        (cd "$tmp" && apt-get "${APT_OPTS[@]}" -q download "$pkg=$version" >download.log 2>&1) ||
            { cat "$tmp/download.log" >&2; die "apt-get download $pkg failed"; }
    fi
    deb=$(ls "$tmp"/*.deb)
    dpkg-deb -x "$deb" "$tmp/root"
    rm -f "$deb"
    kver=$(ls "$tmp/root/lib/modules")
    if [ -z "$kver" ] || [ ! -f "$tmp/root/boot/vmlinuz-$kver" ]; then
        die "unexpected layout in $pkg"
    fi
    say "depmod and vmlinux for $kver"
    depmod -b "$tmp/root" "$kver"
    extract_vmlinux "$tmp/root/boot/vmlinuz-$kver" "$tmp/root/vmlinux"
    echo "$pkg $version" >"$tmp/root/package"
    rm -rf "${GUEST_DIR:?}/kernel/$kver"
    mv "$tmp/root" "$GUEST_DIR/kernel/$kver"
    rm -rf "$tmp"
    echo "$kver"
}

# Prints the uname -r of the cached kernel in use, or nothing.
current_kernel() {
    local kver
    kver=$(sed -n 's/^GUEST_KVER=//p' "$GUEST_DIR/guest.env" 2>/dev/null || true)
    if [ -n "$kver" ] && [ -f "$GUEST_DIR/kernel/$kver/vmlinux" ]; then echo "$kver"; fi
}

# --- the initramfs ----------------------------------------------------------

# Module files (absolute paths, in load order) for STAGE1_MODULES, built-ins
# skipped.
stage1_module_files() {
    local kroot=$1 kver=$2 m
    for m in "${STAGE1_MODULES[@]}"; do
        modprobe -d "$kroot" -S "$kver" --show-depends "$m" ||
            die "module $m not found in $kver"
    done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }'
}

decompress_module() {
    case $1 in
        *.ko.xz) xz -dc "$1" ;;
        *.ko.zst) zstd -dc "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
        *) cat "$1" ;;
    esac
}

initramfs_inputs_hash() {
    local kver=$1
    { echo "$kver ${STAGE1_MODULES[*]}"; cat "$GUEST_SCRIPTS/initramfs-init"; sha256sum "$(command -v busybox)"; } |
        sha256sum | cut -c1-16
}

build_initramfs() {
    local kver=$1 kroot=$GUEST_DIR/kernel/$1 out=$2 dir path n=0 name files
    files=$(stage1_module_files "$kroot" "$kver")
    rm -rf "$GUEST_DIR"/initramfs.*/    # leftovers of an interrupted build
    dir=$(mktemp -d "$GUEST_DIR/initramfs.XXXXXX")
    chmod 0755 "$dir"
    mkdir -p "$dir"/{bin,dev,proc,sys,lib/modules,lower,rw,newroot}
    cp "$(command -v busybox)" "$dir/bin/busybox"
    ln -s busybox "$dir/bin/sh"
    install -m 0755 "$GUEST_SCRIPTS/initramfs-init" "$dir/init"
    while read -r path; do
        n=$((n + 1))
        name=$(printf '%02d-%s.ko' "$n" "$(basename "${path%%.ko*}")")
        decompress_module "$path" >"$dir/lib/modules/$name"
    done <<<"$files"
    # Uncompressed: unpacking gzip under software emulation costs more than
    # reading a few extra MiB.
    (cd "$dir" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) >"$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$dir"
}

write_guest_env() {
    local kver=$1 initrd=$2
    cat >"$GUEST_DIR/guest.env.tmp" <<EOF
# written by scripts/guest/prepare.sh
GUEST_KVER=$kver
GUEST_KERNEL_PACKAGE="$(cat "$GUEST_DIR/kernel/$kver/package")"
GUEST_VMLINUX=$GUEST_DIR/kernel/$kver/vmlinux
GUEST_MODULES=$GUEST_DIR/kernel/$kver/lib/modules
GUEST_INITRD=$initrd
EOF
    mv "$GUEST_DIR/guest.env.tmp" "$GUEST_DIR/guest.env"
}

# Keep only what guest.env names (a kernel tree is ~120 MB).
prune_old_builds() {
    local kver=$1 initrd=$2 d
    for d in "$GUEST_DIR"/kernel/*/; do
        [ "$(basename "$d")" = "$kver" ] || rm -rf "$d"
    done
    find "$GUEST_DIR" -maxdepth 1 -name 'initramfs-*.cpio' ! -name "$(basename "$initrd")" -delete
}

main() {
    parse_args "$@"
    mkdir -p "$GUEST_DIR/kernel"
    # One prepare at a time; run.sh calls us on every boot.
    exec 9>"$GUEST_DIR/prepare.lock"
    flock 9

    local start=$SECONDS kver initrd
    ensure_host_packages

    kver=$(current_kernel)
    if [ -z "$kver" ] || [ "$REFRESH" = 1 ]; then
        kver=$(fetch_kernel)
    fi
    initrd=$GUEST_DIR/initramfs-$kver-$(initramfs_inputs_hash "$kver").cpio
    if [ ! -s "$initrd" ]; then
        say "building initramfs for $kver"
        build_initramfs "$kver" "$initrd"
    fi
    write_guest_env "$kver" "$initrd"
    prune_old_builds "$kver" "$initrd"
    say "ready: kernel $kver ($((SECONDS - start)) s)"
}

main "$@"
