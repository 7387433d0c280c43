#!/usr/bin/env bash
# SPDK's own JSON-RPC client drives plexd: the methods we share with SPDK must take what
# `spdk-rpc` (PyPI package `spdk`) sends and answer in a shape it prints and parses.
#
#   tests/host/spdk_rpc.sh        prints "ok - NAME" / "not ok - NAME: REASON"; exit 1 on failure
#
# PLEXD=path/to/plexd skips the build; see tests/host/lib/spdk_rpc_common.sh.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 63

# shellcheck source=lib/spdk_rpc_common.sh
. "$REPO/tests/host/lib/spdk_rpc_common.sh"
spdk_rpc_venv
spdk_rpc_plexd -m 0x1

IMG=$WORK/uring0.img
truncate -s 16M "$IMG"

expect "spdk_get_version" '"plexstor" in j["version"] and "major" in j["fields"]' spdk_get_version
expect "rpc_get_methods" '"bdev_uring_create" in j and "bdev_get_bdevs" in j' rpc_get_methods
expect "rpc_get_methods --current --include-aliases" '"save_config" in j' rpc_get_methods -c -i
expect "bdev_malloc_create" 'out.strip() == "M0"' bdev_malloc_create -b M0 64 512
expect "bdev_malloc_create with a uuid" 'out.strip() == "M1"' \
    bdev_malloc_create -b M1 -u 0b5c6f3e-9a55-4d2c-8a51-0d6c3c2f8e11 1 4096
expect "bdev_malloc_create without a name" 'out.strip() == "Malloc0"' bdev_malloc_create 8 512
expect "bdev_null_create" 'out.strip() == "N0"' bdev_null_create N0 128 4096
expect "bdev_uring_create" 'out.strip() == "U0"' bdev_uring_create "$IMG" U0 4096
expect "bdev_uring_create without a block size" 'out.strip() == "U1"' bdev_uring_create "$IMG" U1
expect "bdev_get_bdevs lists them" '
sorted(b["name"] for b in j) == ["M0", "M1", "Malloc0", "N0", "U0", "U1"]
and {b["name"]: b["num_blocks"] for b in j}["M0"] == 131072
and {b["name"]: b["num_blocks"] for b in j}["U0"] == 4096
and {b["name"]: b["uuid"] for b in j}["M1"] == "0b5c6f3e-9a55-4d2c-8a51-0d6c3c2f8e11"
and {b["name"]: b["product_name"] for b in j}["U0"] == "URING bdev"' bdev_get_bdevs
expect "bdev_get_bdevs -b" 'len(j) == 1 and j[0]["block_size"] == 4096 and "uring" in j[0]["driver_specific"]' \
    bdev_get_bdevs -b U0
expect "bdev_get_iostat" 'len(j["bdevs"]) == 6 and "tick_rate" in j' bdev_get_iostat
expect "bdev_get_iostat --names" '[b["name"] for b in j["bdevs"]] == ["M0", "N0"]' \
    bdev_get_iostat --names M0,N0
expect "framework_get_reactors" 'len(j["reactors"]) == 1 and "lcore" in j["reactors"][0]' framework_get_reactors

# spdk-rpc builds save_config from framework_get_subsystems + framework_get_config.
if rpc save_config >"$WORK/config.json" 2>"$WORK/save.err"; then
    expect_cfg=$(python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))
bdev = [s for s in c["subsystems"] if s["subsystem"] == "bdev"][0]["config"]
print(" ".join(sorted(e["method"] for e in bdev)))' "$WORK/config.json" 2>&1)
    want="bdev_malloc_create bdev_malloc_create bdev_malloc_create bdev_null_create bdev_uring_create bdev_uring_create"
    if [ "$expect_cfg" = "$want" ]; then pass "save_config"; else fail "save_config" "methods: $expect_cfg"; fi
else
    fail "save_config" "$(tail -n 1 "$WORK/save.err")"
fi

expect "bdev_malloc_delete" 'out.strip() == ""' bdev_malloc_delete M0
expect "bdev_malloc_delete (M1)" 'out.strip() == ""' bdev_malloc_delete M1
expect "bdev_malloc_delete (Malloc0)" 'out.strip() == ""' bdev_malloc_delete Malloc0
expect "bdev_null_delete" 'out.strip() == ""' bdev_null_delete N0
expect "bdev_uring_delete" 'out.strip() == ""' bdev_uring_delete U0
expect "bdev_uring_delete (U1)" 'out.strip() == ""' bdev_uring_delete U1
expect "bdev_get_bdevs empty after deletes" 'j == []' bdev_get_bdevs

# A failing call: spdk-rpc prints the JSON-RPC error and exits non-zero.
rc=0
out=$(rpc bdev_malloc_delete M0 2>&1) || rc=$?
if [ "$rc" != 0 ] && printf '%s' "$out" | grep -q '"code": -19' &&
    printf '%s' "$out" | grep -q 'no bdev named M0'; then
    pass "deleting a missing bdev fails with -19 (ENODEV)"
else
    printf '%s\n' "$out" | sed 's/^/# /'
    fail "deleting a missing bdev fails with -19 (ENODEV)" "exit $rc"
fi

# load_config replays what save_config wrote.
if [ -s "$WORK/config.json" ]; then
    expect "load_config" 'True' load_config -j "$WORK/config.json"
    expect "load_config restores bdevs and uuids" '
sorted(b["name"] for b in j) == ["M0", "M1", "Malloc0", "N0", "U0", "U1"]
and {b["name"]: b["uuid"] for b in j}["M1"] == "0b5c6f3e-9a55-4d2c-8a51-0d6c3c2f8e11"' bdev_get_bdevs
fi

# ---- NVMe-oF, end to end, with spdk-rpc's default arguments -----------------------------------
# plexd exports a namespace and attaches it back through its own listener with bdev_nvme.
NQN=nqn.2016-06.io.spdk:spdk-rpc-test
PORT=$(free_tcp_port)

# A feature plexd lacks, asked for: refused by name and value, not as an unknown field.
refused "nvmf_create_transport -t TCP --dif-insert-or-strip is refused by name" \
    'dif_insert_or_strip=true is not supported by plexd' nvmf_create_transport -t TCP --dif-insert-or-strip
expect "nvmf_create_transport -t TCP" 'out.strip() == ""' nvmf_create_transport -t TCP
expect "bdev_malloc_create for a namespace" 'out.strip() == "NS0"' bdev_malloc_create -b NS0 8 512
expect "nvmf_create_subsystem" 'out.strip() == ""' nvmf_create_subsystem "$NQN" -a -s SPDK00000000000001
expect "nvmf_subsystem_add_ns" 'out.strip() == ""' nvmf_subsystem_add_ns "$NQN" NS0
expect "nvmf_subsystem_add_listener" 'out.strip() == ""' \
    nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$PORT" -f ipv4
refused "bdev_nvme_attach_controller --allow-unrecognized-csi is refused by name" \
    'allow_unrecognized_csi=true is not supported by plexd' \
    bdev_nvme_attach_controller -b R0 -t tcp -a 127.0.0.1 -s "$PORT" -n "$NQN" --allow-unrecognized-csi
expect "bdev_nvme_attach_controller" 'out.split() == ["R0n1"]' \
    bdev_nvme_attach_controller -b R0 -t tcp -a 127.0.0.1 -s "$PORT" -f ipv4 -n "$NQN"
expect "nvmf_get_transports" 'len(j) == 1 and j[0]["trtype"].upper() == "TCP"' nvmf_get_transports
expect "nvmf_get_subsystems" '
[s for s in j if s["nqn"] == "'"$NQN"'"][0]["namespaces"][0]["bdev_name"] == "NS0"' nvmf_get_subsystems
expect "nvmf_subsystem_get_controllers" 'len(j) == 1 and j[0]["num_io_qpairs"] >= 1' \
    nvmf_subsystem_get_controllers "$NQN"
expect "nvmf_subsystem_get_qpairs" 'len(j) >= 2 and {q["qid"] for q in j} >= {0, 1}' \
    nvmf_subsystem_get_qpairs "$NQN"
expect "bdev_nvme_get_controllers" '[c["name"] for c in j] == ["R0"]' bdev_nvme_get_controllers
expect "bdev_nvme_reset_controller" 'out.strip() == ""' bdev_nvme_reset_controller R0
# Reconnected, not merely not yet reset: plexd logs the reconnection.
r0_connected() {
    grep -q "controller reconnected" "$WORK/plexd.log" &&
        rpc bdev_nvme_get_controllers -n R0 2>/dev/null | grep -q '"state": "connected"'
}
if wait_until 10 r0_connected; then
    pass "after bdev_nvme_reset_controller R0 reconnects"
else
    fail "after bdev_nvme_reset_controller R0 reconnects" "$(rpc bdev_nvme_get_controllers -n R0 2>&1 | grep state)"
fi
refused "bdev_nvme_reset_controller of an unknown controller is refused by name" \
    'no NVMe controller named R9' bdev_nvme_reset_controller R9
expect "bdev_get_bdevs -b R0n1" 'j[0]["num_blocks"] == 16384 and j[0]["block_size"] == 512' \
    bdev_get_bdevs -b R0n1
expect "bdev_nvme_detach_controller" 'out.strip() == ""' bdev_nvme_detach_controller R0
# Reservations persist in a ptpl_file, passed as SPDK's client passes it; a damaged file is
# refused by name, not dropped.
echo '{"ptpl": true, "bdev_uuid": ' >"$WORK/bad.ptpl"
expect "bdev_malloc_create for a persistent namespace" 'out.strip() == "NS1"' bdev_malloc_create -b NS1 8 512
refused "nvmf_subsystem_add_ns --ptpl-file with a damaged file is refused, naming it" \
    "ptpl_file $WORK/bad.ptpl" nvmf_subsystem_add_ns "$NQN" NS1 -n 2 -p "$WORK/bad.ptpl"
expect "nvmf_subsystem_add_ns --ptpl-file" 'out.strip() == ""' \
    nvmf_subsystem_add_ns "$NQN" NS1 -n 2 -p "$WORK/ns1.ptpl"
expect "save_config keeps the ptpl_file" '
"'"$WORK/ns1.ptpl"'" in [c["params"]["namespace"].get("ptpl_file") for s in j["subsystems"]
    for c in (s["config"] or []) if c["method"] == "nvmf_subsystem_add_ns"]' save_config
expect "nvmf_subsystem_remove_ns (2)" 'out.strip() == ""' nvmf_subsystem_remove_ns "$NQN" 2
expect "bdev_malloc_delete (NS1)" 'out.strip() == ""' bdev_malloc_delete NS1
# The host list: named hosts only, then back.
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:5b0c7a52-6e34-4f5e-9d0a-2f4ad1b0c001
subsystem_is() { echo '[s for s in j if s["nqn"] == "'"$NQN"'"][0]'"$1"; }
expect "nvmf_subsystem_add_host" 'out.strip() == ""' nvmf_subsystem_add_host "$NQN" "$HOSTNQN"
expect "nvmf_subsystem_allow_any_host --no-allow-any-host" 'out.strip() == ""' \
    nvmf_subsystem_allow_any_host "$NQN" --no-allow-any-host
expect "nvmf_get_subsystems shows the named host only" \
    "$(subsystem_is '["allow_any_host"] is False') and $(subsystem_is '["hosts"]') == [{'nqn': '$HOSTNQN'}]" \
    nvmf_get_subsystems
expect "nvmf_subsystem_remove_host" 'out.strip() == ""' nvmf_subsystem_remove_host "$NQN" "$HOSTNQN"
expect "nvmf_subsystem_allow_any_host --allow-any-host" 'out.strip() == ""' \
    nvmf_subsystem_allow_any_host "$NQN" --allow-any-host
expect "nvmf_get_subsystems: any host again, none named" \
    "$(subsystem_is '["allow_any_host"] is True') and $(subsystem_is '["hosts"]') == []" nvmf_get_subsystems
expect "nvmf_subsystem_remove_listener" 'out.strip() == ""' \
    nvmf_subsystem_remove_listener "$NQN" -t tcp -a 127.0.0.1 -s "$PORT" -f ipv4
expect "nvmf_subsystem_remove_ns" 'out.strip() == ""' nvmf_subsystem_remove_ns "$NQN" 1
expect "nvmf_delete_subsystem" 'out.strip() == ""' nvmf_delete_subsystem "$NQN"
expect "bdev_malloc_delete (NS0)" 'out.strip() == ""' bdev_malloc_delete NS0

# Every method plexd serves must be driven through spdk-rpc by one of the spdk_* scripts, or
# be in the SPDK save_config file that spdk_config.sh replays with spdk-rpc load_config, so a
# new method cannot skip SPDK's client. plexd's own methods, which SPDK's client does not know
# (bdev_mirror_*, bdev_lvol_check_lvstore), must instead be called by a test of their own under
# target/tests/.
untested=$(rpc rpc_get_methods | python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)))' |
    while read -r m; do
        case $m in
        bdev_mirror_* | bdev_lvol_check_lvstore)
            grep -qw -- "\"$m\"" "$REPO"/target/tests/*.rs || echo "$m"
            continue
            ;;
        esac
        grep -qw -- "$m" "$REPO"/tests/host/spdk_*.sh ||
            grep -q "\"method\": \"$m\"" "$REPO/target/tests/data/spdk-save_config-nvmf_tgt.json" ||
            echo "$m"
    done)
if [ -z "$untested" ]; then
    pass "every method plexd serves is driven through spdk-rpc (plexd's own: by its tests)"
else
    fail "every method plexd serves is driven through spdk-rpc" "not here: $(echo $untested)"
fi
kill -0 "$PLEXD_PID" 2>/dev/null && pass "plexd still running" || fail "plexd still running" "it died"
finish
