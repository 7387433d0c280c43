#!/usr/bin/env bash
# SPDK's nvmf_tgt as the far end of plexd's bdev_nvme, and SPDK's bdevperf (SPDK's bdev_nvme
# host, the one Mayastor and Longhorn use) as a host of plexd:
#
#   bdevperf --verify --> plexd (re-export of Nvme0n1) --bdev_nvme--> SPDK nvmf_tgt (malloc)
#   plexperf --verify --/
#
# Both targets are driven with SPDK's own client, spdk-rpc, with its defaults. nvmf_tgt is then
# killed and started again from its saved config: plexd's controller must go to reconnecting,
# come back, and carry verified I/O again.
#
#   tests/host/spdk_tgt_peer.sh     (needs: cargo build --release -p plexd -p initiator)
#
# Where SPDK's programs are absent every result is skipped, saying so.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tests/guest/lib.sh
. "$REPO/tests/guest/lib.sh"
plan 10

RESULTS=(
    "SPDK's nvmf_tgt exports a malloc bdev (configured with spdk-rpc)"
    "plexd attaches it with spdk-rpc bdev_nvme_attach_controller"
    "plexperf --verify through plexd's re-export to nvmf_tgt"
    "the writes reached nvmf_tgt's bdev"
    "SPDK's bdevperf -w verify through plexd"
    "nvmf_tgt killed: plexd's controller is reconnecting"
    "nvmf_tgt restarted from its saved config: connected again"
    "plexperf --verify after the reconnect"
    "spdk-rpc bdev_nvme_detach_controller removes Nvme0n1"
    "plexd never panicked"
)
TGT=$(spdk_bin nvmf_tgt)
BDEVPERF=$(spdk_bin bdevperf)
if [ -z "$TGT" ] || [ -z "$BDEVPERF" ]; then
    for r in "${RESULTS[@]}"; do skip "$r" "no nvmf_tgt or bdevperf in $SPDK_BIN_DIR"; done
    finish
fi
PLEXD=${PLEXD:-$REPO/build/release/plexd}
PLEXPERF=${PLEXPERF:-$REPO/build/release/plexperf}
for b in "$PLEXD" "$PLEXPERF"; do
    [ -x "$b" ] || bail "${RESULTS[0]}" "missing $b: cargo build --release -p plexd -p initiator"
done

SPDK_MEM_MB=512
WORK=$(mktemp -d /tmp/spdk-tgt-peer.XXXXXX)
SOCK=$WORK/plexd.sock
SPDK_SOCK=$WORK/spdk.sock
PLEXD_PID=
TGT_PID=
cleanup() {
    [ -n "$TGT_PID" ] && kill -KILL "$TGT_PID" 2>/dev/null && wait "$TGT_PID" 2>/dev/null
    [ -n "$PLEXD_PID" ] && kill "$PLEXD_PID" 2>/dev/null && wait "$PLEXD_PID" 2>/dev/null
    spdk_restore
    rm -rf "$WORK"
}
trap cleanup EXIT
# nvmf_tgt and bdevperf, one after the other, each with its own memory.
spdk_prepare $((2 * SPDK_MEM_MB)) 2>"$WORK/prepare.err" ||
    bail "${RESULTS[0]}" "$(tail -n1 "$WORK/prepare.err")"
spdk_rpc_install 2>"$WORK/prepare.err" || bail "${RESULTS[0]}" "$(tail -n1 "$WORK/prepare.err")"

SPDK_NQN=nqn.2016-06.io.spdk:peer
PLEX_NQN=nqn.2026-12.io.plexstor:reexport
SPDK_PORT=$(free_tcp_port)
PLEX_PORT=$(free_tcp_port)
spdk() { "$SPDK_RPC" -s "$SPDK_SOCK" -t 10 "$@"; }
plexd_spdk_rpc() { "$SPDK_RPC" -s "$SOCK" -t 30 "$@"; }

# start_tgt [--json CONFIG]: nvmf_tgt on core 1 (plexd takes core 0), up when it answers.
start_tgt() {
    rm -f "$SPDK_SOCK"
    "$TGT" -m 0x2 -s "$SPDK_MEM_MB" -r "$SPDK_SOCK" "$@" >>"$WORK/nvmf_tgt.log" 2>&1 &
    TGT_PID=$!
    wait_until 30 spdk spdk_get_version >/dev/null 2>&1
}
configure_tgt() {
    spdk bdev_malloc_create -b Malloc0 64 512 &&
        spdk nvmf_create_transport -t TCP &&
        spdk nvmf_create_subsystem "$SPDK_NQN" -a -s SPDK00000000000001 &&
        spdk nvmf_subsystem_add_ns "$SPDK_NQN" Malloc0 &&
        spdk nvmf_subsystem_add_listener "$SPDK_NQN" -t tcp -a 127.0.0.1 -s "$SPDK_PORT" -f ipv4
}
if start_tgt && configure_tgt >"$WORK/configure.log" 2>&1; then
    pass "${RESULTS[0]}"
else
    sed 's/^/# /' "$WORK/configure.log" "$WORK/nvmf_tgt.log" 2>/dev/null | tail -n 12
    bail "${RESULTS[0]}" "nvmf_tgt did not come up or refused its configuration"
fi
spdk save_config >"$WORK/spdk-config.json"

"$PLEXD" -m 0x1 --no-pin -r "$SOCK" --idle-poll-us 200 >"$WORK/plexd.log" 2>&1 &
PLEXD_PID=$!
wait_for_plexd "$PLEXD_PID" || bail "${RESULTS[1]}" "plexd: $(tail -n 3 "$WORK/plexd.log")"

# SPDK's client with its defaults, plus the reconnect policy the restart below needs.
names=$(plexd_spdk_rpc bdev_nvme_attach_controller -b Nvme0 -t tcp -a 127.0.0.1 -f ipv4 \
    -s "$SPDK_PORT" -n "$SPDK_NQN" --ctrlr-loss-timeout-sec -1 --reconnect-delay-sec 1 2>&1)
if [ "$(tr -d ' \n' <<<"$names")" = "Nvme0n1" ]; then
    pass "${RESULTS[1]} (Nvme0n1)"
else
    bail "${RESULTS[1]}" "got: $(tail -n1 <<<"$names")"
fi

reexport() {
    plexd_spdk_rpc nvmf_create_transport -t TCP &&
        plexd_spdk_rpc nvmf_create_subsystem "$PLEX_NQN" -a &&
        plexd_spdk_rpc nvmf_subsystem_add_ns "$PLEX_NQN" Nvme0n1 &&
        plexd_spdk_rpc nvmf_subsystem_add_listener "$PLEX_NQN" -t tcp -a 127.0.0.1 -s "$PLEX_PORT" -f ipv4
}
reexport >"$WORK/reexport.log" 2>&1 || bail "${RESULTS[2]}" "re-export: $(tail -n1 "$WORK/reexport.log")"

# plexperf_verify NAME: a 4 KiB randrw --verify run through the re-export, checked.
plexperf_verify() {
    local name=$1 out=$WORK/plexperf.json v
    if ! timeout 60 "$PLEXPERF" -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PLEX_PORT subnqn:$PLEX_NQN" \
        --json --warmup 0 --verify -w randrw -M 50 -o 4096 -q 8 -t 2 --size 8388608 -c 0x2 \
        >"$out" 2>"$out.err"; then
        fail "$name" "plexperf: $(tail -n1 "$out.err")"
        return
    fi
    v=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); t=r["total"]; v=r["verify"]
print(t["writes"], t["errors"], v["mismatches"], v["verified_blocks"])' "$out")
    read -r writes errs mism verified <<<"$v"
    if [ "$writes" -gt 0 ] && [ "$errs" = 0 ] && [ "$mism" = 0 ] && [ "$verified" -gt 0 ]; then
        pass "$name ($writes writes, $verified blocks verified)"
    else
        fail "$name" "writes=$writes errors=$errs mismatches=$mism verified=$verified"
    fi
}
plexperf_verify "${RESULTS[2]}"

writes=$(spdk bdev_get_iostat --names Malloc0 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["bdevs"][0]["num_write_ops"])')
if [ "${writes:-0}" -gt 0 ]; then
    pass "${RESULTS[3]} ($writes write commands on nvmf_tgt's Malloc0)"
else
    fail "${RESULTS[3]}" "num_write_ops ${writes:-unknown}"
fi

# bdevperf runs SPDK's bdev_nvme against plexd; its verify workload writes, reads back and
# compares. It takes core 0 (plexd is not pinned there), as nvmf_tgt holds core 1.
cat >"$WORK/bdevperf.json" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_nvme_attach_controller",
  "params": {"name": "Plex", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
             "trsvcid": "$PLEX_PORT", "subnqn": "$PLEX_NQN"}}]}]}
EOF
rc=0
(cd "$WORK" && timeout 120 "$BDEVPERF" -m 0x1 -s "$SPDK_MEM_MB" -r "$WORK/bdevperf.sock" \
    --json "$WORK/bdevperf.json" -q 16 -o 4096 -w verify -t 3) >"$WORK/bdevperf.log" 2>&1 || rc=$?
# Its summary: "Total : <IOPS> <MiB/s> <Fail/s> <TO/s> ...": verify failures count as Fail/s.
# (Its progress line ends in a carriage return, not a newline.)
summary=$(tr '\r' '\n' <"$WORK/bdevperf.log" |
    awk '$1 == "Total" && $2 == ":" { print $3, $5, $6 }' | tail -n1)
read -r iops fails timeouts <<<"$summary"
if [ "$rc" = 0 ] && [ -n "$iops" ] && python3 -c 'import sys; i,f,t=map(float,sys.argv[1:]); sys.exit(0 if i > 0 and f == 0 and t == 0 else 1)' \
    "$iops" "$fails" "$timeouts" && ! grep -q "Verify failed\|miscompare" "$WORK/bdevperf.log"; then
    pass "${RESULTS[4]} ($iops IOPS, no failure)"
else
    sed 's/^/# /' "$WORK/bdevperf.log" | tail -n 15
    fail "${RESULTS[4]}" "exit $rc, Total: ${summary:-none}"
fi

state() {
    plexd_spdk_rpc bdev_nvme_get_controllers -n Nvme0 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["ctrlrs"][0]["state"])'
}
state_is() { [ "$(state)" = "$1" ]; }
kill -KILL "$TGT_PID" && wait "$TGT_PID" 2>/dev/null
TGT_PID=
if wait_until 30 state_is reconnecting; then
    pass "${RESULTS[5]}"
else
    fail "${RESULTS[5]}" "state $(state)"
fi
if start_tgt --json "$WORK/spdk-config.json" && wait_until 30 state_is connected; then
    pass "${RESULTS[6]}"
else
    sed 's/^/# /' "$WORK/nvmf_tgt.log" | tail -n 8
    fail "${RESULTS[6]}" "state $(state)"
fi
plexperf_verify "${RESULTS[7]}"

plexd_spdk_rpc nvmf_delete_subsystem "$PLEX_NQN" >/dev/null 2>&1
if plexd_spdk_rpc bdev_nvme_detach_controller Nvme0 >"$WORK/detach.log" 2>&1 &&
    [ "$(rpc bdev_get_bdevs)" = "[]" ] && [ "$(rpc bdev_nvme_get_controllers)" = "[]" ]; then
    pass "${RESULTS[8]}"
else
    fail "${RESULTS[8]}" "$(tail -n1 "$WORK/detach.log"); bdevs $(rpc bdev_get_bdevs)"
fi
if grep -q panicked "$WORK/plexd.log"; then
    fail "${RESULTS[9]}" "$(grep -m1 panicked "$WORK/plexd.log")"
else
    pass "${RESULTS[9]}"
fi
finish
