#!/usr/bin/env bash
# SPDK's own JSON-RPC client against plexd's rate limits, latency histograms and NVMe-oF
# statistics: bdev_set_qos_limit (and its assigned_rate_limits / save_config), the histogram
# methods (decoded as SPDK's scripts decode them), nvmf_get_stats. A one-second plexperf run
# gives the counters something to count; nothing here asserts on time.
#
#   tests/host/spdk_rpc_stats.sh   prints "ok - NAME" / "not ok - NAME: REASON"; exit 1 on failure
#
# PLEXD / PLEXPERF = paths skip the builds; see tests/host/lib/spdk_rpc_common.sh for the venv.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 30
# shellcheck source=lib/spdk_rpc_common.sh
. "$REPO/tests/host/lib/spdk_rpc_common.sh"

spdk_rpc_venv
spdk_rpc_plexd -m 0x1

if [ -z "${PLEXPERF:-}" ]; then
    (cd "$REPO" && cargo build -q --release -p initiator --bin plexperf) ||
        bail "build plexperf" "cargo build failed"
    PLEXPERF=$REPO/build/release/plexperf
fi

# ---- bdev_set_qos_limit -----------------------------------------------------------------------
limits() { # the Python test that bdev Q0's assigned_rate_limits are IOPS, RW, R, W
    echo "j[0][\"assigned_rate_limits\"] == {\"rw_ios_per_sec\": $1, \"rw_mbytes_per_sec\": $2, \
\"r_mbytes_per_sec\": $3, \"w_mbytes_per_sec\": $4}"
}
expect "bdev_malloc_create" 'out.strip() == "Q0"' bdev_malloc_create -b Q0 64 512
expect "a new bdev has no limits" "$(limits 0 0 0 0)" bdev_get_bdevs -b Q0
expect "bdev_set_qos_limit" 'out.strip() == ""' \
    bdev_set_qos_limit Q0 --rw-ios-per-sec 20001 --r-mbytes-per-sec 100
expect "IOPS are rounded up to a multiple of 1000, as SPDK does" "$(limits 21000 0 100 0)" \
    bdev_get_bdevs -b Q0
expect "bdev_set_qos_limit of one limit" 'out.strip() == ""' bdev_set_qos_limit Q0 --w-mbytes-per-sec 10
expect "limits not given are kept" "$(limits 21000 0 100 10)" bdev_get_bdevs -b Q0
refused "bdev_set_qos_limit without a limit is refused" 'at least one of' bdev_set_qos_limit Q0
refused "bdev_set_qos_limit on a missing bdev is -19" '"code": -19' \
    bdev_set_qos_limit NoSuch --rw-ios-per-sec 1000
refused "a negative limit is refused by name" 'rw_ios_per_sec' \
    bdev_set_qos_limit Q0 --rw-ios-per-sec -5
expect "save_config keeps the limits as bdev_set_qos_limit after the bdev" '
[(e["method"], e["params"].get("name")) for e in
 [s for s in j["subsystems"] if s["subsystem"] == "bdev"][0]["config"]]
 == [("bdev_malloc_create", "Q0"), ("bdev_set_qos_limit", "Q0")]
and [s for s in j["subsystems"] if s["subsystem"] == "bdev"][0]["config"][1]["params"]
 == {"name": "Q0", "rw_ios_per_sec": 21000, "r_mbytes_per_sec": 100, "w_mbytes_per_sec": 10}' \
    save_config
expect "zero lifts a limit" 'out.strip() == ""' \
    bdev_set_qos_limit Q0 --rw-ios-per-sec 0 --r-mbytes-per-sec 0 --w-mbytes-per-sec 0
expect "no limits left" "$(limits 0 0 0 0)" bdev_get_bdevs -b Q0

# ---- histograms -------------------------------------------------------------------------------
refused "bdev_get_histogram before enabling is refused" 'not enabled' bdev_get_histogram Q0
refused "an unknown --opc is refused" 'invalid I/O type' bdev_enable_histogram Q0 --histogram --opc bogus
refused "an empty nanosecond range is refused" 'must be smaller' \
    bdev_enable_histogram Q0 --histogram --min-nsec 10 --max-nsec 10
expect "bdev_enable_histogram --opc read" 'out.strip() == ""' bdev_enable_histogram Q0 --histogram --opc read
# What SPDK's scripts/histogram.py reads: little-endian u64 counts, (1 << granularity) per range.
HIST_SHAPE='set(j) == {"histogram", "granularity", "min_range", "max_range", "tsc_rate"}
and j["granularity"] == 7 and j["tsc_rate"] == 1000000000
and len(base64.b64decode(j["histogram"])) == (j["max_range"] - j["min_range"] + 1) * 128 * 8'
expect "bdev_get_histogram: SPDK's shape, empty" "$HIST_SHAPE"' and not any(base64.b64decode(j["histogram"]))' \
    bdev_get_histogram Q0
# Reads from before the histogram (the examiners looking for a store or a plex superblock on the
# new bdev) are in iostat only; the histogram must count exactly the reads since.
check "bdev_get_iostat before any host" eval 'rpc bdev_get_iostat --names Q0 >"$WORK/iostat0.json"'

# ---- NVMe-oF, and I/O to count ------------------------------------------------------------------
NQN=nqn.2016-06.io.spdk:spdk-rpc-stats
PORT=$(free_tcp_port)
export_q0() {
    rpc nvmf_create_transport -t TCP &&
        rpc nvmf_create_subsystem "$NQN" -a -s SPDK00000000000002 &&
        rpc nvmf_subsystem_add_ns "$NQN" Q0 &&
        rpc nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$PORT" -f ipv4
}
check "Q0 exported over NVMe/TCP" export_q0
expect "nvmf_get_stats before any host" '
j["tick_rate"] == 1000000000 and len(j["poll_groups"]) == 1
and j["poll_groups"][0]["name"] == "nvmf_tgt_poll_group_000"
and j["poll_groups"][0]["transports"] == [{"trtype": "TCP"}]
and all(j["poll_groups"][0][k] == 0 for k in ("admin_qpairs", "io_qpairs", "current_admin_qpairs",
    "current_io_qpairs", "pending_bdev_io", "completed_nvme_io", "commands_past_queue_size"))' nvmf_get_stats
# A low limit keeps the load of the run small; the I/O over it waits, none fails.
expect "bdev_set_qos_limit 1000 IOPS" 'out.strip() == ""' bdev_set_qos_limit Q0 --rw-ios-per-sec 1000
TRID="trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$NQN"
perf_ok() {
    "$PLEXPERF" -r "$TRID" -q 8 -t 1 --warmup 0 -w randread --json >"$WORK/perf.json" &&
        python3 -c 'import json, sys; t = json.load(open(sys.argv[1]))["total"]
sys.exit(0 if t["reads"] > 0 and t["errors"] == 0 else 1)' "$WORK/perf.json"
}
check "plexperf reads through the limit without errors" perf_ok

hist_matches_iostat() {
    rpc bdev_get_histogram Q0 >"$WORK/hist.json" && rpc bdev_get_iostat --names Q0 >"$WORK/iostat.json" &&
        python3 -c '
import base64, json, struct, sys
h = json.load(open(sys.argv[1]))
raw = base64.b64decode(h["histogram"])
counts = struct.unpack("<%dQ" % (len(raw) // 8), raw)
reads = json.load(open(sys.argv[2]))["bdevs"][0]["num_read_ops"]
reads -= json.load(open(sys.argv[3]))["bdevs"][0]["num_read_ops"]
print("histogram", sum(counts), "iostat reads since it was enabled", reads)
sys.exit(0 if reads > 0 and sum(counts) == reads else 1)' "$WORK/hist.json" "$WORK/iostat.json" "$WORK/iostat0.json"
}
host_gone() {
    rpc nvmf_get_stats | python3 -c 'import json, sys
g = json.load(sys.stdin)["poll_groups"][0]
sys.exit(0 if g["current_admin_qpairs"] == 0 and g["current_io_qpairs"] == 0 else 1)'
}
wait_until 10 host_gone
# Both counters are read by two RPCs, so they are compared once the host is gone and no I/O
# can land between the two reads; a read the limit still held may finish just after.
check "the histogram counted every read iostat counted" wait_until 10 hist_matches_iostat
expect "nvmf_get_stats counts the host's queues and commands" '(lambda g:
g["admin_qpairs"] >= 1 and g["io_qpairs"] >= 1
and g["current_admin_qpairs"] == 0 and g["current_io_qpairs"] == 0
and g["completed_nvme_io"] >= json.load(open("'"$WORK"'/iostat.json"))["bdevs"][0]["num_read_ops"]
)(j["poll_groups"][0])' nvmf_get_stats
refused "nvmf_get_stats of another target is -19" '"code": -19' nvmf_get_stats -t other

expect "bdev_enable_histogram --no-histogram" 'out.strip() == ""' bdev_enable_histogram Q0 --no-histogram
refused "bdev_get_histogram after disabling is refused" 'not enabled' bdev_get_histogram Q0

kill -0 "$PLEXD_PID" 2>/dev/null && pass "plexd still running" || fail "plexd still running" "it died"
finish
