#!/usr/bin/env python3
"""A sequence of NVMe/TCP runs against plexd and SPDK's nvmf_tgt, one after another, to see how
one run leaves the machine for the next: each run's IOPS and p99, and the target's own I/O rate
every half second during it (its bdev_get_iostat), so that a change of pace inside a run shows.

Targets and hosts as in benches/nvmf_tcp.py (whose Target class this uses): targets on core 0,
the one not in use frozen with SIGSTOP, hosts on core 1, a null bdev, 127.0.0.1, the same
transport options. A job is TARGET:HOST:PATTERN:QD[:SECONDS] with TARGET p (plexd) or s
(nvmf_tgt), HOST perf (spdk_nvme_perf, 1 s warm-up, 2 s measured unless SECONDS, then no
warm-up) or pp (plexperf, 1 s + 2 s, its rate only), or sleep:SECONDS.

  benches/nvmf_tcp_sequence.py s:pp:randread:128 p:perf:randwrite:32 p:perf:randwrite:32

Not a measurement of either target: a tool to look at run-to-run effects (see
benches/reports/nvmf_tcp_tries-20261204.md). It sets TCP congestion control and hugepages as
benches/nvmf_tcp.py does, and puts them back.
"""
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvmf_tcp as bench  # noqa: E402

NQN = bench.NQN + "-seq"
KINDS = {"p": "plexd", "s": "spdk"}


def parse_job(job):
    if job.startswith("sleep:"):
        return ("sleep", float(job[6:]))
    parts = job.split(":")
    numbers = parts[3:]
    if (len(parts) not in (4, 5) or parts[0] not in KINDS or parts[1] not in ("perf", "pp")
            or not all(n.isdigit() and int(n) > 0 for n in numbers)):
        sys.exit(f"bad job '{job}': TARGET:HOST:PATTERN:QD[:SECONDS], TARGET p|s, HOST perf|pp, "
                 "QD and SECONDS positive whole numbers")
    return ("run", KINDS[parts[0]], parts[1], parts[2], int(parts[3]),
            int(parts[4]) if len(parts) == 5 else None)


def run_traced(target, cmd):
    """Runs cmd to its end, sampling the target's served I/Os every 0.5 s: (output, rates in K/s)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rates, last = [], None
    while proc.poll() is None:
        ios, now = target.work_counters()[1], time.monotonic()
        if last:
            rates.append((ios - last[0]) / (now - last[1]) / 1e3)
        last = (ios, now)
        time.sleep(0.5)
    return proc.communicate()[0], rates


def main():
    jobs = [parse_job(j) for j in sys.argv[1:]]
    if not jobs:
        sys.exit(__doc__)
    kinds = sorted({j[1] for j in jobs if j[0] == "run"})
    if "spdk" in kinds and not bench.spdk_bin("nvmf_tgt"):
        sys.exit(f"SPDK's programs are not in {bench.SPDK_BIN_DIR}")
    bench.build_release()
    if "spdk" in kinds:
        bench.install_spdk_packages()
    restore_hugepages = bench.reserve_hugepages(bench.HUGEPAGES_MB)
    _, run_cc, restore_cc = bench.set_congestion_control("cubic")
    targets, ports = {}, {}
    try:
        for kind in kinds:
            ports[kind] = bench.free_port()
            targets[kind] = bench.Target(kind, [("null", "seq_null", NQN)], ports[kind],
                                         transport=bench.TRANSPORT)
        print(f"TCP congestion control {run_cc}; load average {bench.load_avg()}", flush=True)
        for job in jobs:
            if job[0] == "sleep":
                time.sleep(job[1])
                continue
            _, kind, host, pattern, qd, seconds = job
            for k, t in targets.items():
                t.resume() if k == kind else t.pause()
            time.sleep(0.2)
            if host == "perf":
                cmd = bench.spdk_perf_cmd(ports[kind], pattern, 4096, qd, seconds or 2, NQN,
                                          warmup=0 if seconds else 1)
            else:
                cmd = bench.plexperf_cmd(ports[kind], pattern, 4096, qd, seconds or 2, NQN)
            out, rates = run_traced(targets[kind], cmd)
            trace = " ".join(f"{r:.0f}" for r in rates)
            label = f"{bench.TARGET_NAMES[kind]:8} <- {host:4} {pattern} qd{qd}"
            if host == "perf":
                r = bench.parse_spdk_perf(out)
                p99 = re.search(r"^\s*99\.00000%\s*:\s*([\d.]+)us", out, re.M)
                print(f"{label}: {r['iops'] / 1e3:,.0f} K IOPS, p99 {p99.group(1) if p99 else '?'} µs; "
                      f"target K IOPS per 0.5 s: {trace}", flush=True)
            else:
                print(f"{label}: target K IOPS per 0.5 s: {trace}", flush=True)
    finally:
        for t in targets.values():
            t.stop()
        for restore in (restore_hugepages, restore_cc):
            if restore:
                restore()


if __name__ == "__main__":
    main()
