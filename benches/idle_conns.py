#!/usr/bin/env python3
"""Idle connections against a busy one: what each idle NVMe/TCP connection costs plexd.

One plexd (one reactor, core 0, malloc bdev) serves a busy host (plexperf, core 1, 4 KiB
randread QD32) while N other connections sit idle: each has done ICReq and a Fabrics Connect
of an admin queue, then sends nothing. For N in 0, 100, 1000, 4000 it reports the busy host's
IOPS (and the ratio to N = 0) and plexd's resident memory per idle connection; then closes
them and reports whether plexd's memory came back.

Given several plexd binaries (--plexd A --plexd B), it runs each in turn for every N, in the
same run, so a change to the poll group is measured side by side with what it replaces.

Usage: benches/idle_conns.py [--time 4] [--counts 0,100,1000,4000] [--plexd PATH ...]
"""

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvmf_tcp import Rpc, build_release  # noqa: E402  (one JSON-RPC client for every bench)
PLEXPERF = os.path.join(REPO, "build/release/plexperf")
NQN = "nqn.2026-12.io.plexstor:idle-bench"
HOSTNQN = "nqn.2026-12.io.plexstor:idle-host"


def icreq():
    # Common header: ICReq (0), flags, HLEN 128, PDO 0, PLEN 128; PFV 0, HPDA 0, no digests,
    # MAXR2T 0.
    return struct.pack("<BBBBI", 0x00, 0, 128, 0, 128) + bytes(120)


HOSTID = os.urandom(16)


def connect_capsule(cid, qid=0, cntlid=0xFFFF, sqsize=31):
    """A Fabrics Connect (admin queue by default; SQSIZE 0's based; no keep-alive) with its
    1 KiB of data in the capsule."""
    data = bytearray(1024)
    data[0:16] = HOSTID
    data[16:18] = struct.pack("<H", cntlid)
    data[256:256 + len(NQN)] = NQN.encode()
    data[512:512 + len(HOSTNQN)] = HOSTNQN.encode()
    sqe = bytearray(64)
    sqe[0] = 0x7F  # Fabrics
    sqe[1] = 0x40  # SGL, data in the capsule
    struct.pack_into("<H", sqe, 2, cid)
    sqe[4] = 0x01  # Connect
    # SGL: data block, offset 0 (in capsule), length 1024, type 0x01 subtype 0x01.
    struct.pack_into("<QI", sqe, 24, 0, 1024)
    sqe[39] = 0x01  # data block descriptor, offset subtype
    struct.pack_into("<HH", sqe, 40, 0, qid)  # RECFMT 0, QID
    struct.pack_into("<H", sqe, 44, sqsize)
    struct.pack_into("<I", sqe, 48, 0)  # KATO 0: none
    hlen = 8 + 64
    return struct.pack("<BBBBI", 0x04, 0, hlen, hlen, hlen + 1024) + bytes(sqe) + bytes(data)


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("plexd closed an idle connection")
        buf += chunk
    return buf


def open_idle(port, n):
    """N connected admin queues, pipelined in batches so 4,000 take seconds, not minutes."""
    socks = []
    batch = 200
    for start in range(0, n, batch):
        group = []
        for _ in range(min(batch, n - start)):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(icreq())
            group.append(s)
        for s in group:
            recv_exact(s, 128)  # ICResp
            s.sendall(connect_capsule(1))
        for s in group:
            hdr = recv_exact(s, 8)
            rest = recv_exact(s, struct.unpack_from("<I", hdr, 4)[0] - 8)
            status = struct.unpack_from("<H", rest, 14)[0] >> 1
            if hdr[0] != 0x05 or status != 0:
                raise RuntimeError(f"Connect failed: PDU type {hdr[0]}, status {status:#x}")
        socks.extend(group)
    return socks


def connect_queue(port, qid=0, cntlid=0xFFFF, sqsize=31):
    """ICReq and Connect on a new socket; returns it and the controller ID."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(icreq())
    recv_exact(s, 128)
    s.sendall(connect_capsule(1, qid, cntlid, sqsize))
    hdr = recv_exact(s, 8)
    rest = recv_exact(s, struct.unpack_from("<I", hdr, 4)[0] - 8)
    if struct.unpack_from("<H", rest, 14)[0] >> 1:
        raise RuntimeError("Connect failed")
    return s, struct.unpack_from("<H", rest, 0)[0]


def greedy_host(port, writes=120, size=1 << 20):
    """A host that sends `writes` writes of `size` bytes by R2T and never answers one: it holds
    every data buffer the target lends it. Returns its sockets (keep them open)."""
    admin, cntlid = connect_queue(port)
    # Property Set CC = EN, IOSQES 6, IOCQES 4: I/O queues need an enabled controller.
    sqe = bytearray(64)
    sqe[0], sqe[1], sqe[4] = 0x7F, 0x40, 0x00
    struct.pack_into("<H", sqe, 2, 2)
    struct.pack_into("<IQ", sqe, 44, 0x14, 1 | 6 << 16 | 4 << 20)
    admin.sendall(struct.pack("<BBBBI", 0x04, 0, 72, 0, 72) + bytes(sqe))
    hdr = recv_exact(admin, 8)
    recv_exact(admin, struct.unpack_from("<I", hdr, 4)[0] - 8)
    io, _ = connect_queue(port, qid=1, cntlid=cntlid, sqsize=127)
    for k in range(writes):
        sqe = bytearray(64)
        sqe[0] = 0x01  # Write
        sqe[1] = 0x40
        struct.pack_into("<HI", sqe, 2, 10 + k, 1)  # CID, NSID 1
        struct.pack_into("<QI", sqe, 24, 0, size)  # SGL: transport data block, `size` bytes
        sqe[39] = 0x5A
        struct.pack_into("<QI", sqe, 40, k * (size // 512), size // 512 - 1)  # SLBA, NLB
        io.sendall(struct.pack("<BBBBI", 0x04, 0, 72, 0, 72) + bytes(sqe))
    return [admin, io]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


class Target:
    def __init__(self, binary, port):
        self.dir = tempfile.mkdtemp(prefix="idlebench.")
        self.sock = os.path.join(self.dir, "plexd.sock")
        self.log = open(os.path.join(self.dir, "plexd.log"), "w")
        self.proc = subprocess.Popen([binary, "-m", "0x1", "-r", self.sock],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        rpc = Rpc(self.sock).call
        rpc("bdev_malloc_create", {"name": "m", "num_blocks": 262144, "block_size": 512})
        rpc("nvmf_create_transport", {"trtype": "TCP"})
        rpc("nvmf_create_subsystem", {"nqn": NQN, "allow_any_host": True,
                                                 "max_cntlid": 65519})
        rpc("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": "m"}})
        rpc("nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": {
            "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}})

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


def busy_iops(port, seconds):
    trid = f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN}"
    out = subprocess.run([PLEXPERF, "-r", trid, "-q", "32", "-o", "4096", "-w", "randread",
                          "-t", str(seconds), "-c", "0x2", "--json"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"plexperf: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)["total"]["iops"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", type=int, default=4)
    ap.add_argument("--counts", default="0,100,1000,4000")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians")
    ap.add_argument("--greedy", action="store_true",
                    help="also: the busy host beside one holding its whole buffer share")
    ap.add_argument("--plexd", action="append",
                    help="plexd binary (repeatable; default build/release/plexd)")
    args = ap.parse_args()
    build_release()
    binaries = args.plexd or [os.path.join(REPO, "build/release/plexd")]
    counts = [int(c) for c in args.counts.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(counts) * 2 + 1024
    if hard < want:
        sys.exit(f"need {want} open files (ulimit -Hn is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    load_start = loadavg()
    # Interleaved: every repetition measures each binary at each count in turn; medians.
    samples = {}  # (binary, idle) -> [(iops, kib_per_conn, rss_before, rss_after)]
    cases = counts + (["greedy"] if args.greedy else [])
    for rep in range(args.reps):
        for bi, binary in enumerate(binaries):
            port = 14420 + rep * len(binaries) + bi
            t = Target(binary, port)
            try:
                for n in cases:
                    rss0 = rss_kib(t.proc.pid)
                    socks = greedy_host(port) if n == "greedy" else open_idle(port, n)
                    time.sleep(0.5)  # let plexd settle (the greedy host: lend what it will)
                    rss1 = rss_kib(t.proc.pid)
                    iops = busy_iops(port, args.time)
                    for s in socks:
                        s.close()
                    time.sleep(1)  # let plexd see the closes before reading its memory
                    rss2 = rss_kib(t.proc.pid)
                    per = (rss1 - rss0) / n if n not in (0, "greedy") else None
                    samples.setdefault((binary, n), []).append((iops, per, rss0, rss2))
                    print(f"rep {rep + 1}: {binary}: {n} idle: {iops:10,.0f} IOPS, "
                          f"RSS {rss0} -> {rss1} -> {rss2} KiB", flush=True)
            finally:
                t.stop()
    rows = []
    for binary in binaries:
        base = statistics.median(x[0] for x in samples[(binary, cases[0])])
        for n in cases:
            xs = samples[(binary, n)]
            iops = statistics.median(x[0] for x in xs)
            pers = [x[1] for x in xs if x[1] is not None]
            rows.append({"plexd": binary, "idle": n, "iops": iops, "ratio": iops / base,
                         "kib_per_conn": statistics.median(pers) if pers else None,
                         "rss_before": xs[-1][2], "rss_after": xs[-1][3],
                         "spread": (max(x[0] for x in xs) - min(x[0] for x in xs)) / iops})
    load_end = loadavg()

    os.makedirs(os.path.join(REPO, "benches/reports"), exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    path = os.path.join(REPO, f"benches/reports/idle_conns-{stamp}.md")
    with open(path, "w") as f:
        f.write(f"# Idle connections against a busy one ({stamp})\n\n")
        f.write(f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.release()}. "
                f"Load average {load_start} at the start, {load_end} at the end.\n\n")
        f.write(f"plexd on core 0 (malloc, 512 B blocks); plexperf on core 1, 4 KiB randread "
                f"QD32 for {args.time} s while N other connections (ICReq + admin Connect) "
                f"sit idle. The row `greedy`: beside one host that sent 120 writes of 1 MiB "
                f"and answers none of their R2Ts.\n\n")
        f.write(f"{args.reps} repetitions, interleaved (each binary at each count in turn); "
                f"medians; spread = (max - min) / median of the IOPS.\n\n")
        f.write("| plexd | idle | IOPS | vs 0 idle | spread | KiB RSS per idle conn | RSS after close (KiB) |\n")
        f.write("|---|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            per = f"{r['kib_per_conn']:.1f}" if r["kib_per_conn"] is not None else ""
            f.write(f"| {r['plexd']} | {r['idle']} | {r['iops']:,.0f} | {r['ratio']:.2f} | "
                    f"{r['spread']:.0%} | {per} | {r['rss_after']} (from {r['rss_before']}) |\n")
        f.write(f"\nCommand: `{' '.join(sys.argv)}`\n")
    print(f"report: {path}")


if __name__ == "__main__":
    main()
