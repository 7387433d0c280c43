#!/usr/bin/env python3
"""QoS benchmark: how closely plexd holds a bdev to its rate limit, and what QoS costs when no
limit is set.

1. Accuracy, end to end: plexd (one reactor, core 0) exports a malloc bdev over NVMe/TCP;
   plexperf (core 1) drives it at a queue depth well above what the limit allows, for --time
   seconds, once per limit kind (rw_ios_per_sec with 4 KiB random reads, w_mbytes_per_sec
   with 128 KiB writes, r_mbytes_per_sec with 128 KiB reads). Achieved rate must be within
   ±5 % of the limit.
2. Cost with no limit: the bdev layer's ns per I/O (cargo bench bdev_layer -- qos) for a bdev
   with no limit and one whose limit is set but never binds, and end to end plexperf IOPS on
   an unlimited bdev. With --baseline REV (a commit from before QoS, e.g. e60710d) the same
   bench row is built and run at REV in a temporary worktree, so "no limit" is compared with
   "no QoS compiled in". Each layer row is the median of --reps runs.

Usage: benches/qos.py [--time 10] [--reps 5] [--iops 20000] [--mbps 64] [--baseline REV]
       benches/qos.py --time 2 --reps 1 --no-layer      (a quick check that it works)
Needs release builds (cargo build --release -p plexd -p initiator). Run on a quiet machine:
anything else on the two cores moves these numbers.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvmf_tcp  # noqa: E402  (Plexd, plexperf_cmd, run_perf, free_port)

REPO = nvmf_tcp.REPO


def accuracy(args):
    cases = [
        # (limit, value, unit of the achieved figure, pattern, io size, queue depth)
        ("rw_ios_per_sec", args.iops, "iops", "randread", 4096, 32),
        ("w_mbytes_per_sec", args.mbps, "mib_s", "randwrite", 131072, 8),
        ("r_mbytes_per_sec", args.mbps, "mib_s", "randread", 131072, 8),
    ]
    rows, ok = [], True
    for limit, value, unit, pattern, size, qd in cases:
        port = nvmf_tcp.free_port()
        d = nvmf_tcp.Plexd("malloc", port, args.idle_poll_us)
        try:
            d.rpc.call("bdev_set_qos_limit", {"name": "bench", limit: value})
            got = nvmf_tcp.run_perf(nvmf_tcp.plexperf_cmd(port, pattern, size, qd, args.time))
        finally:
            d.stop()
        achieved = got[unit]
        err = (achieved - value) / value * 100
        good = abs(err) <= 5
        ok &= good
        rows.append(f"| {limit}={value} | {pattern} {size // 1024} KiB QD{qd} | "
                    f"{achieved:,.1f} {unit} | {err:+.2f} % | {'ok' if good else 'OUT OF ±5 %'} |")
    print("\n## Accuracy (achieved rate against the limit)\n")
    print("| limit | workload | achieved | error | within ±5 % |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return ok


def layer_rows(cwd, reps, target_dir=None):
    """Median ns/io per row label of `cargo bench bdev_layer -- qos` (or, for a baseline
    without the qos rows, its null read rows)."""
    env = dict(os.environ)
    if target_dir:
        env["CARGO_TARGET_DIR"] = target_dir
    found = {}
    for _ in range(reps):
        out = subprocess.run(["cargo", "bench", "-q", "-p", "plexd", "--bench", "bdev_layer",
                              "--", "qos"], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"cargo bench failed in {cwd}: {out.stderr[-800:]}")
        for line in out.stdout.splitlines():
            m = re.match(r"(\S+)\s+read\s+qd (\d+)\s+([\d.]+) ns/io", line)
            if m and m.group(1) in ("no-limit", "qos-on", "null"):
                found.setdefault((m.group(1), int(m.group(2))), []).append(float(m.group(3)))
    return {k: statistics.median(v) for k, v in found.items()}


def cost(args):
    print("\n## Cost with no limit\n")
    if not args.no_layer:
        cur = layer_rows(REPO, args.reps)
        base = {}
        if args.baseline:
            wt = tempfile.mkdtemp(prefix="qos-baseline.")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", wt, args.baseline],
                           check=True, capture_output=True)
            try:
                base = layer_rows(wt, args.reps, target_dir=os.path.join(REPO, "build/qos-baseline"))
            finally:
                subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", wt],
                               capture_output=True)
        print("| queue depth | no limit (ns/io) | limit set, never binding (ns/io) |"
              + (f" before QoS, {args.baseline} (ns/io) |" if args.baseline else ""))
        print("|---|---|---|" + ("---|" if args.baseline else ""))
        for qd in (1, 32):
            row = f"| {qd} | {cur.get(('no-limit', qd), float('nan')):.1f} | " \
                  f"{cur.get(('qos-on', qd), float('nan')):.1f} |"
            if args.baseline:
                row += f" {base.get(('null', qd), float('nan')):.1f} |"
            print(row)
    port = nvmf_tcp.free_port()
    d = nvmf_tcp.Plexd("malloc", port, args.idle_poll_us)
    try:
        got = nvmf_tcp.run_perf(nvmf_tcp.plexperf_cmd(port, "randread", 4096, 32, args.time))
    finally:
        d.stop()
    print(f"\nEnd to end, unlimited malloc bdev, 4 KiB randread QD32: {got['iops']:,.0f} IOPS "
          "(compare with benches/reports/nvmf_tcp-*.md from before QoS)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", type=int, default=10, help="seconds per plexperf run")
    ap.add_argument("--reps", type=int, default=5, help="bdev_layer runs per row (median)")
    ap.add_argument("--iops", type=int, default=20000, help="rw_ios_per_sec to test")
    ap.add_argument("--mbps", type=int, default=64, help="r/w_mbytes_per_sec to test")
    ap.add_argument("--idle-poll-us", type=int, default=1000)
    ap.add_argument("--baseline", help="a commit without QoS to compare the layer cost with")
    ap.add_argument("--no-layer", action="store_true", help="skip the cargo bench rows")
    args = ap.parse_args()
    nvmf_tcp.build_release()
    for b in (nvmf_tcp.PLEXD, nvmf_tcp.PLEXPERF):
        if not os.access(b, os.X_OK):
            sys.exit(f"missing {b}: cargo build --release -p plexd -p initiator")
    print(f"# plexd QoS benchmark ({args.time} s per run)")
    ok = accuracy(args)
    cost(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
