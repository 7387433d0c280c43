#!/usr/bin/env bash
# SPDK's own JSON-RPC client (spdk-rpc, with its defaults) against plexd's volume stores:
# every bdev_lvol_* method it sends is accepted with SPDK's parameters and answers in SPDK's
# shape. The data path, crashes and damaged metadata are tested in target/tests/lvol*.rs.
#
#   tests/host/spdk_rpc_lvol.sh   prints "ok - NAME" / "not ok - NAME: REASON"; exit 1 on failure
#
# PLEXD = path skips the build; see tests/host/lib/spdk_rpc_common.sh for the venv.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 36
# shellcheck source=lib/spdk_rpc_common.sh
. "$REPO/tests/host/lib/spdk_rpc_common.sh"

spdk_rpc_venv
spdk_rpc_plexd -m 0x1

UUID_RE='len(out.strip()) == 36 and out.strip().count("-") == 4'
expect "bdev_malloc_create 256 MiB" 'out.strip() == "M0"' bdev_malloc_create -b M0 256 512
expect "bdev_lvol_create_lvstore with spdk-rpc's defaults (4 MiB clusters)" "$UUID_RE" \
    bdev_lvol_create_lvstore M0 lvs
expect "bdev_lvol_get_lvstores: SPDK's fields, clusters counted" '
len(j) == 1 and j[0]["name"] == "lvs" and j[0]["base_bdev"] == "M0"
and j[0]["cluster_size"] == 4194304 and j[0]["block_size"] == 512
and j[0]["free_clusters"] == j[0]["total_data_clusters"] > 50' bdev_lvol_get_lvstores
refused "a second store on a claimed bdev is refused" 'in use' bdev_lvol_create_lvstore M0 lvs2
expect "bdev_lvol_create -t (thin)" "$UUID_RE" bdev_lvol_create -l lvs -t v1 64
expect "bdev_lvol_create (thick)" "$UUID_RE" bdev_lvol_create -l lvs thick 8
expect "bdev_lvol_get_lvols: allocated against provisioned" '
{l["name"]: (l["is_thin_provisioned"], l["num_allocated_clusters"]) for l in j}
 == {"v1": (True, 0), "thick": (False, 2)} and all(l["alias"] == "lvs/" + l["name"] for l in j)' \
    bdev_lvol_get_lvols
expect "the thick lvol took its clusters from the store" \
    'j[0]["total_data_clusters"] - j[0]["free_clusters"] == 2' bdev_lvol_get_lvstores -l lvs
expect "an lvol is a bdev named by its UUID, aliased store/name" '
j[0]["aliases"] == ["lvs/v1"] and j[0]["num_blocks"] == 64 * 2048
and j[0]["product_name"] == "Logical Volume"' bdev_get_bdevs -b lvs/v1
expect "bdev_lvol_snapshot" "$UUID_RE" bdev_lvol_snapshot lvs/v1 snap1
expect "the snapshot is read-only; v1 is now its clone" '
{l["name"]: (l["is_snapshot"], l["is_clone"]) for l in j if l["name"] in ("v1", "snap1")}
 == {"v1": (False, True), "snap1": (True, False)}' bdev_lvol_get_lvols -l lvs
expect "bdev_lvol_clone" "$UUID_RE" bdev_lvol_clone lvs/snap1 c1
refused "a writable lvol cannot be cloned" 'snapshot' bdev_lvol_clone lvs/v1 c2
refused "bdev_lvol_delete of a snapshot with clones names them" 'c1' bdev_lvol_delete lvs/snap1
expect "bdev_lvol_resize grows" 'out.strip() == ""' bdev_lvol_resize lvs/c1 128
expect "the bdev grew" 'j[0]["num_blocks"] == 128 * 2048' bdev_get_bdevs -b lvs/c1
expect "bdev_lvol_resize shrinks" 'out.strip() == ""' bdev_lvol_resize lvs/c1 16
expect "bdev_lvol_set_read_only" 'out.strip() == ""' bdev_lvol_set_read_only lvs/thick
expect "it says so" '[l["is_read_only"] for l in j if l["name"] == "thick"] == [True]' \
    bdev_lvol_get_lvols
expect "bdev_lvol_rename" 'out.strip() == ""' bdev_lvol_rename lvs/thick frozen
expect "renamed" '"frozen" in [l["name"] for l in j] and "thick" not in [l["name"] for l in j]' \
    bdev_lvol_get_lvols
expect "the bdev answers to its new alias" 'j[0]["aliases"] == ["lvs/frozen"]' bdev_get_bdevs -b lvs/frozen
expect "bdev_lvol_decouple_parent" 'out.strip() == ""' bdev_lvol_decouple_parent lvs/c1
expect "c1 is no clone now; snap1 keeps v1" '
{l["name"]: (l["is_clone"], l.get("clones")) for l in j if l["name"] in ("c1", "snap1")}
 == {"c1": (False, None), "snap1": (False, ["v1"])}' bdev_lvol_get_lvols -l lvs
refused "bdev_lvol_decouple_parent of an lvol without a parent" 'no parent' \
    bdev_lvol_decouple_parent lvs/c1
expect "bdev_lvol_inflate" 'out.strip() == ""' bdev_lvol_inflate lvs/v1
expect "v1 is thick, whole and no clone now" '[(l["is_clone"], l["is_thin_provisioned"],
  l["num_allocated_clusters"] == l["num_clusters"]) for l in j if l["name"] == "v1"]
 == [(False, False, True)]' bdev_lvol_get_lvols -l lvs
expect "bdev_lvol_delete of the snapshot no one depends on" 'out.strip() == ""' \
    bdev_lvol_delete lvs/snap1
expect "bdev_lvol_delete of the clone" 'out.strip() == ""' bdev_lvol_delete lvs/c1
expect "bdev_lvol_rename_lvstore" 'out.strip() == ""' bdev_lvol_rename_lvstore lvs store2
expect "the store answers to its new name" 'j[0]["name"] == "store2"' \
    bdev_lvol_get_lvstores -l store2
expect "its lvols' aliases follow" 'j[0]["aliases"] == ["store2/frozen"]' \
    bdev_get_bdevs -b store2/frozen
expect "bdev_lvol_delete_lvstore takes its lvols with it" 'out.strip() == ""' \
    bdev_lvol_delete_lvstore -l store2
expect "no store, no lvol bdev left" 'not any(b["product_name"] == "Logical Volume" for b in j)' \
    bdev_get_bdevs
finish
