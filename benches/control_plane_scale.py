#!/usr/bin/env python3
"""The control plane at scale: creating, listing and deleting many bdevs and subsystems.

For N and 2N objects (default 5,000 bdevs and 1,000 subsystems, each with a namespace) it
times create, list and delete over one JSON-RPC connection, and reads plexd's resident
memory before, after the list, and after the delete. Linear work shows as a 2N ÷ N time
ratio near 2 (quadratic near 4); memory after a large list should fall back.

Usage: benches/control_plane_scale.py [--bdevs 5000] [--subsystems 1000]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvmf_tcp import Rpc, build_release  # noqa: E402  (one JSON-RPC client for every bench)
PLEXD = os.path.join(REPO, "build/release/plexd")


class Plexd:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="cpscale.")
        path = os.path.join(self.dir, "plexd.sock")
        self.proc = subprocess.Popen([PLEXD, "-m", "0x1", "-r", path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.rpc = Rpc(path)

    def call(self, method, params=None):
        return self.rpc.call(method, params)

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bdevs(n):
    p = Plexd()
    try:
        rss0 = p.rss_kib()
        create = timed(lambda: [p.call("bdev_null_create", {"name": f"b{k}", "num_blocks": 1024,
                                                            "block_size": 512})
                                for k in range(n)])
        rss1 = p.rss_kib()
        listed = timed(lambda: p.call("bdev_get_bdevs"))
        rss2 = p.rss_kib()
        delete = timed(lambda: [p.call("bdev_null_delete", {"name": f"b{k}"}) for k in range(n)])
        return create, listed, delete, (rss0, rss1, rss2, p.rss_kib())
    finally:
        p.stop()


def subsystems(n):
    p = Plexd()
    try:
        p.call("nvmf_create_transport", {"trtype": "TCP"})
        rss0 = p.rss_kib()

        def make():
            for k in range(n):
                nqn = f"nqn.2026-12.io.plexstor:scale{k}"
                p.call("bdev_null_create", {"name": f"b{k}", "num_blocks": 1024, "block_size": 512})
                p.call("nvmf_create_subsystem", {"nqn": nqn, "allow_any_host": True})
                p.call("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": f"b{k}"}})
        create = timed(make)
        rss1 = p.rss_kib()
        listed = timed(lambda: p.call("nvmf_get_subsystems"))
        rss2 = p.rss_kib()
        delete = timed(lambda: [p.call("nvmf_delete_subsystem",
                                       {"nqn": f"nqn.2026-12.io.plexstor:scale{k}"})
                                for k in range(n)])
        return create, listed, delete, (rss0, rss1, rss2, p.rss_kib())
    finally:
        p.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bdevs", type=int, default=5000)
    ap.add_argument("--subsystems", type=int, default=1000)
    args = ap.parse_args()
    build_release()
    print("| objects | N | create s | list s | delete s | RSS KiB: start / made / after list / after delete |")
    print("|---|---:|---:|---:|---:|---|")
    for kind, fn, n in (("bdevs", bdevs, args.bdevs), ("subsystems", subsystems, args.subsystems)):
        rows = [(m, fn(m)) for m in (n, 2 * n)]
        for m, (c, lst, d, rss) in rows:
            print(f"| {kind} | {m:,} | {c:.2f} | {lst:.2f} | {d:.2f} | {' / '.join(map(str, rss))} |")
        (_, a), (_, b) = rows
        print(f"| {kind} | 2N ÷ N | {b[0] / a[0]:.2f} | {b[1] / a[1]:.2f} | {b[2] / a[2]:.2f} | |")


if __name__ == "__main__":
    main()
