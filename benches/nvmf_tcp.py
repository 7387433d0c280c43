#!/usr/bin/env python3
"""NVMe/TCP benchmark: plexd (one reactor, core 0) against plexperf (core 1) over loopback.

For each bdev (null, malloc) it runs 4 KiB randread/randwrite at QD1, QD32, QD128 and 128 KiB
sequential read/write at QD32, prints one table and writes it, with the machine and the exact
commands, to benches/reports/nvmf_tcp-<date>.md. It also samples plexd's CPU use while idle,
since an idle SPDK target burns its whole core.

Usage: benches/nvmf_tcp.py [--time 5] [--reps 1] [--bdevs null,malloc] [--idle-poll-us 1000]
Needs release builds (cargo build --release) and, for fair numbers, hugepages
(HUGEMEM=1024 scripts/setup.sh). Run on a quiet machine; figures move by ±20 % here.
"""

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLEXD = os.path.join(REPO, "build/release/plexd")
PLEXPERF = os.path.join(REPO, "build/release/plexperf")
NQN = "nqn.2026-11.io.plexstor:bench"

WORKLOADS = [  # (label, pattern, io size, queue depth)
    ("4k randread qd1", "randread", 4096, 1),
    ("4k randread qd32", "randread", 4096, 32),
    ("4k randread qd128", "randread", 4096, 128),
    ("4k randwrite qd1", "randwrite", 4096, 1),
    ("4k randwrite qd32", "randwrite", 4096, 32),
    ("4k randwrite qd128", "randwrite", 4096, 128),
    ("128k read qd32", "read", 131072, 32),
    ("128k write qd32", "write", 131072, 32),
]

# SPDK's nvmf_tgt + spdk_nvme_perf on a machine like ours (2 cores, one each, loopback), as
# quoted by issue 4: IOPS, or MB/s (10^6) for the 128 KiB rows. Not measured side by side with
# us (SPDK cannot be built here), so the ratio is a pointer, not a verdict: runs move ±20 %.
SPDK_REFERENCE = {
    ("null", "4k randread qd32"): ("iops", 360_000),
    ("null", "4k randwrite qd32"): ("iops", 380_000),
    ("malloc", "4k randread qd1"): ("iops", 42_000),
    ("malloc", "4k randread qd32"): ("iops", 245_000),
    ("malloc", "4k randwrite qd32"): ("iops", 210_000),
    ("malloc", "128k read qd32"): ("mb_s", 1_780),
    ("malloc", "128k write qd32"): ("mb_s", 1_760),
}

BDEVS = {  # name -> (create method, params)
    "null": ("bdev_null_create", {"name": "bench", "num_blocks": 8 << 20, "block_size": 512}),
    "malloc": ("bdev_malloc_create", {"name": "bench", "num_blocks": 1 << 20, "block_size": 512}),
}


class Rpc:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.id = 0

    def call(self, method, params=None):
        self.id += 1
        req = {"jsonrpc": "2.0", "id": self.id, "method": method}
        if params is not None:
            req["params"] = params
        self.sock.sendall(json.dumps(req).encode())
        buf = b""
        while True:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise RuntimeError(f"plexd closed the socket during {method}")
            buf += chunk
            try:
                resp = json.loads(buf)
            except ValueError:
                continue
            if "error" in resp:
                raise RuntimeError(f"{method}: {resp['error']}")
            return resp["result"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Plexd:
    def __init__(self, bdev, port, idle_poll_us):
        self.dir = tempfile.mkdtemp(prefix="plexbench.")
        self.sock = os.path.join(self.dir, "plexd.sock")
        self.log = open(os.path.join(self.dir, "plexd.log"), "w")
        self.cmd = [PLEXD, "-m", "0x1", "-r", self.sock, "--idle-poll-us", str(idle_poll_us)]
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(100):
            if os.path.exists(self.sock):
                break
            time.sleep(0.05)
        rpc = Rpc(self.sock)
        method, params = BDEVS[bdev]
        rpc.call(method, params)
        rpc.call("nvmf_create_transport", {"trtype": "TCP"})
        rpc.call("nvmf_create_subsystem", {"nqn": NQN, "allow_any_host": True})
        rpc.call("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": "bench"}})
        rpc.call("nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": {
            "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}})
        self.rpc = rpc

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


def plexperf_cmd(port, pattern, size, qd, seconds):
    trid = f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN}"
    return [PLEXPERF, "-r", trid, "-q", str(qd), "-o", str(size), "-w", pattern,
            "-t", str(seconds), "-c", "0x2", "--json"]


def run_perf(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"plexperf failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)["total"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", type=int, default=5, help="seconds per run (after 1 s warm-up)")
    ap.add_argument("--reps", type=int, default=1, help="runs per cell; the median is reported")
    ap.add_argument("--bdevs", default="null,malloc")
    ap.add_argument("--idle-poll-us", type=int, default=1000)
    ap.add_argument("--report", help="report file (default benches/reports/nvmf_tcp-DATE.md)")
    args = ap.parse_args()
    for binary in (PLEXD, PLEXPERF):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} is missing: run cargo build --release first")

    rows = []
    idle = {}
    commands = []
    for bdev in args.bdevs.split(","):
        port = free_port()
        plexd = Plexd(bdev, port, args.idle_poll_us)
        commands.append(" ".join(plexd.cmd))
        try:
            time.sleep(1.0)
            c0 = cpu_seconds(plexd.proc.pid)
            time.sleep(3.0)
            idle[bdev] = (cpu_seconds(plexd.proc.pid) - c0) / 3.0 * 100
            for label, pattern, size, qd in WORKLOADS:
                cmd = plexperf_cmd(port, pattern, size, qd, args.time)
                if not commands or commands[-1] != " ".join(cmd):
                    commands.append(" ".join(cmd))
                runs = [run_perf(cmd) for _ in range(args.reps)]
                med = sorted(runs, key=lambda r: r["iops"])[len(runs) // 2]
                lat = med["latency_us"]
                rows.append((bdev, label, med["iops"], med["mib_s"], lat["avg_us"],
                             lat["p99_us"], lat["p99_9_us"],
                             statistics.pstdev([r["iops"] for r in runs]) if len(runs) > 1 else 0.0))
                print(f"{bdev:7} {label:20} {med['iops']:>10.0f} IOPS {med['mib_s']:>9.1f} MiB/s "
                      f"avg {lat['avg_us']:.1f} us p99 {lat['p99_us']:.1f} us", flush=True)
        finally:
            plexd.stop()

    table = ["| bdev | workload | IOPS | MiB/s | avg µs | p99 µs | p99.9 µs | vs SPDK's figure |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for bdev, label, iops, mib, avg, p99, p999, _ in rows:
        ref = SPDK_REFERENCE.get((bdev, label))
        if ref is None:
            vs = ""
        elif ref[0] == "iops":
            vs = f"{iops / ref[1]:.2f}× of {ref[1] / 1000:.0f} K"
        else:
            vs = f"{mib * 1.048576 / ref[1]:.2f}× of {ref[1] / 1000:.2f} GB/s"
        table.append(f"| {bdev} | {label} | {iops:,.0f} | {mib:,.1f} | {avg:.1f} | {p99:.1f} | {p999:.1f} | {vs} |")
    idle_line = ", ".join(f"{b}: {v:.1f} %" for b, v in idle.items())
    text = "\n".join(table)
    print()
    print(text)
    print(f"\nplexd CPU while idle (3 s sample): {idle_line}")

    now = datetime.datetime.now()
    report = args.report or os.path.join(REPO, "benches/reports", f"nvmf_tcp-{now:%Y%m%d-%H%M}.md")
    os.makedirs(os.path.dirname(report), exist_ok=True)
    git = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    with open(report, "w") as f:
        f.write(f"# NVMe/TCP over loopback, {now:%Y-%m-%d %H:%M}\n\n")
        f.write(f"Commit {git}; {platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}; "
                f"plexd one reactor on core 0, plexperf on core 1; {args.time} s per run after 1 s "
                f"warm-up, median of {args.reps}.\n\n")
        f.write(text + "\n\n")
        f.write("The last column compares with SPDK's figures quoted in issue 4 (nvmf_tgt and "
                "spdk_nvme_perf on a machine like this one), not measured in this run.\n\n")
        f.write(f"plexd CPU while idle (3 s sample): {idle_line}\n\n")
        f.write("Commands:\n\n```\n" + "\n".join(commands) + "\n```\n")
    print(f"\nreport: {report}")


if __name__ == "__main__":
    main()
