#!/usr/bin/env python3
"""How long a snapshot and a clone of an lvol take, with 1 GiB and with 10 GiB written to it.

A snapshot in plexd's volume store moves no data and copies no cluster map: the lvol's blob
becomes the snapshot and the lvol gets a new, empty blob over it, in one journal transaction
(docs/lvol-on-disk-format.md). So its time must not depend on how much was written. For each
size, REPS times: a fresh plexd with a 12 GiB malloc bdev, a store on it (4 MiB clusters), a
thin 10 GiB lvol exported over NVMe/TCP, SIZE written to it with plexperf (128 KiB sequential
writes until every cluster of SIZE is allocated), then bdev_lvol_snapshot and bdev_lvol_clone,
each timed from the request to the answer over JSON-RPC. The report gives every time and the
medians.

Usage: benches/lvol_snapshot_time.py [--reps 3] [--out FILE]
Needs build/release/plexd and build/release/plexperf (cargo build --release).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvmf_tcp import Rpc, free_port, build_release  # noqa: E402  (one JSON-RPC client for every bench)

PLEXD = os.path.join(REPO, "build/release/plexd")
PLEXPERF = os.path.join(REPO, "build/release/plexperf")
GIB = 1 << 30
CLUSTER = 4 << 20
NQN = "nqn.2026-12.io.plexstor:snaptime"


def one_run(written_gib):
    """Snapshot and clone times (seconds) after writing `written_gib` GiB."""
    work = tempfile.mkdtemp(prefix="snaptime.")
    sock = os.path.join(work, "plexd.sock")
    log = open(os.path.join(work, "plexd.log"), "w")
    proc = subprocess.Popen([PLEXD, "-m", "0x1", "-r", sock], stdout=log, stderr=log)
    try:
        rpc = Rpc(sock)
        rpc.call("bdev_malloc_create", {"name": "M0", "num_blocks": 12 * GIB // 512,
                                        "block_size": 512})
        rpc.call("bdev_lvol_create_lvstore", {"bdev_name": "M0", "lvs_name": "lvs"})
        rpc.call("bdev_lvol_create", {"lvol_name": "vol", "size_in_mib": 10 * 1024,
                                      "thin_provision": True, "lvs_name": "lvs"})
        port = free_port()
        rpc.call("nvmf_create_transport", {"trtype": "TCP"})
        rpc.call("nvmf_create_subsystem", {"nqn": NQN, "allow_any_host": True})
        rpc.call("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": "lvs/vol"}})
        rpc.call("nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": {
            "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}})
        want = written_gib * GIB // CLUSTER

        def allocated():
            return next(v["num_allocated_clusters"] for v in rpc.call("bdev_lvol_get_lvols")
                        if v["name"] == "vol")

        trid = f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN}"
        t0 = time.monotonic()
        # Each run starts at block 0; one long enough to pass the end (first writes here run
        # at 0.5 GB/s or more) wraps around within SIZE.
        secs = 4 * written_gib + 2
        for _ in range(3):
            subprocess.run([PLEXPERF, "-r", trid, "-q", "32", "-o", "131072", "-w", "write",
                            "-t", str(secs), "--warmup", "0", "--size", str(written_gib * GIB)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if allocated() >= want:
                break
            secs *= 2
        else:
            raise RuntimeError(f"only {allocated()} of {want} clusters written")
        write_s = time.monotonic() - t0
        t = time.perf_counter()
        rpc.call("bdev_lvol_snapshot", {"lvol_name": "lvs/vol", "snapshot_name": "snap"})
        snap_s = time.perf_counter() - t
        t = time.perf_counter()
        rpc.call("bdev_lvol_clone", {"snapshot_name": "lvs/snap", "clone_name": "clone"})
        clone_s = time.perf_counter() - t
        snap = next(v for v in rpc.call("bdev_lvol_get_lvols") if v["name"] == "snap")
        # The snapshot holds what was written (plexperf may have gone a little past it).
        assert snap["num_allocated_clusters"] >= want, snap
        return snap_s, clone_s, write_s
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        subprocess.run(["rm", "-rf", work])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    build_release()
    for b in (PLEXD, PLEXPERF):
        if not os.access(b, os.X_OK):
            sys.exit(f"no {b}: cargo build --release")
    load_start = open("/proc/loadavg").read().split()[:3]
    runs = {1: [], 10: []}
    for rep in range(args.reps):
        for gib in (1, 10):
            r = one_run(gib)
            runs[gib].append(r)
            print(f"  {gib:2d} GiB written (in {r[2]:.1f} s): snapshot {r[0] * 1e3:.2f} ms, "
                  f"clone {r[1] * 1e3:.2f} ms", file=sys.stderr)
    load_end = open("/proc/loadavg").read().split()[:3]
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    lines = [
        "# lvol snapshot and clone time against data written",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, plexstor {rev}; plexd `-m 0x1`, a 12 GiB malloc bdev,",
        "a store with 4 MiB clusters, a thin 10 GiB lvol exported over NVMe/TCP; 1 GiB or 10 GiB",
        "written to it with plexperf, then each call timed over JSON-RPC (request to answer). "
        f"{args.reps} fresh plexd per size.",
        "",
        f"- load average (1, 5, 15 min): {' '.join(load_start)} at start, {' '.join(load_end)} at end",
        "",
        "| written | bdev_lvol_snapshot (median) | bdev_lvol_clone (median) | every snapshot (ms) | every clone (ms) |",
        "|---|---:|---:|---|---|",
    ]
    for gib in (1, 10):
        s = [r[0] * 1e3 for r in runs[gib]]
        c = [r[1] * 1e3 for r in runs[gib]]
        lines.append(f"| {gib} GiB | {statistics.median(s):.2f} ms | {statistics.median(c):.2f} ms "
                     f"| {', '.join(f'{x:.2f}' for x in s)} | {', '.join(f'{x:.2f}' for x in c)} |")
    lines += [
        "",
        "Both are one journal transaction each (the snapshot also waits for the lvol's I/O in",
        "flight, none here): their time is the metadata write and its flushes, whatever was written.",
        "",
        f"Run as `benches/lvol_snapshot_time.py --reps {args.reps}`.",
    ]
    report = "\n".join(lines) + "\n"
    out = args.out or os.path.join(REPO, "benches/reports", f"lvol_snapshot-{time.strftime('%Y%m%d-%H%M')}.md")
    with open(out, "w") as f:
        f.write(report)
    print(report)
    print(f"report: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
