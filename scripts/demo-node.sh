#!/usr/bin/env bash
# The node side of scripts/demo-host.sh, run inside the test guest: the kernel's NVMe/TCP initiator
# connects to plexd on the host (10.0.2.2), then a filesystem goes on the volume.
set -euo pipefail
: "${NQN:?}" "${PORT:?}"
# shellcheck source=tests/guest/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../tests/guest/lib.sh"
host=10.0.2.2

modprobe nvme-tcp
modprobe xfs
echo "\$ nvme discover -t tcp -a $host -s $PORT"
nvme discover -t tcp -a "$host" -s "$PORT"
echo "\$ nvme connect -t tcp -a $host -s $PORT -n $NQN"
nvme connect -t tcp -a "$host" -s "$PORT" -n "$NQN"

# The block device, found by its subsystem NQN (device names do not follow namespace IDs).
dev=$(wait_for_nvme_dev "$NQN" 1 20)
nvme list
echo "\$ mkfs.xfs $dev && mount $dev /mnt"
mkfs.xfs -q -f "$dev"
mkdir -p /mnt
mount "$dev" /mnt
echo "hello from a plexstor volume" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/blob bs=1M count=8 status=none
sum=$(md5sum < /mnt/blob)
sync
umount /mnt
mount "$dev" /mnt
cat /mnt/hello.txt
[ "$(md5sum < /mnt/blob)" = "$sum" ] && echo "8 MiB file read back intact after remount"
df -h /mnt
umount /mnt
nvme disconnect -n "$NQN"
