#!/usr/bin/env python3
"""NVMe/TCP over loopback: plexd and SPDK's nvmf_tgt side by side in one run, each driven by
SPDK's spdk_nvme_perf and by plexperf, with the machine's ceiling (benches/tcp_ceiling).

Targets on core 0 (plexd: one reactor; SPDK: nvmf_tgt -m 0x1), hosts on core 1 (-c 0x2), one
connection over 127.0.0.1. Each target exports a null and a malloc bdev (512 B blocks) as two
subsystems, with the same transport options (TRANSPORT below). Rows: 4 KiB randread/randwrite
at QD1, QD32, QD128 and 128 KiB sequential read/write at QD32, per bdev.

Interleaved: both targets run for the whole run, the one not being measured frozen (SIGSTOP),
so neither start-up nor an idle poller weighs on the other. For each repetition: the ceiling
once (both targets frozen), then for each bdev and row, each target in turn with each host
against it; the order of targets and of hosts is reversed every other repetition. The report
gives medians of the repetitions:
  - plexd ÷ SPDK: plexd's rate over nvmf_tgt's, the same host (spdk_nvme_perf) against both;
  - plexperf ÷ spdk_nvme_perf: our host over SPDK's, against the same target (one column each);
  - ÷ ceiling: each target's rate (host spdk_nvme_perf) over the loopback ceiling's ops/s at
    the same shape and queue depth (4 KiB rows only);
  - busy ns/IO and "per core, plexd ÷ SPDK": each target's busy reactor time (passes in which a
    poller did work, as both count it) over the I/Os its bdevs served, host spdk_nvme_perf. On
    two cores the host's core often sets the pace, and then both targets give the same IOPS
    while one of them has time to spare: this column shows it;
  - idle CPU of each target (3 s, no host connected): SPDK polls; plexd should not.
It is written, with the machine, its load before and after, the share of each core the
hypervisor stole during the run, and the exact commands, to
benches/reports/nvmf_tcp-<date>.md.

SPDK's programs are looked for in ../shared/spdk/bin (or $SPDK_BIN_DIR). Where they are absent
the run says so and measures plexd with plexperf only (and the ceiling). Their runtime
packages are installed if missing, as tests/guest/lib.sh does; as root, hugepages are reserved
with scripts/setup.sh for the run and the machine's count is put back at the end.

Usage: benches/nvmf_tcp.py [--time 5] [--reps 3] [--bdevs null,malloc]
                           [--workloads 'randread qd32,128k'] [--no-spdk] [--no-ceiling]
                           [--tcp-cc cubic|keep|...]
       benches/nvmf_tcp.py --time 1 --reps 1 --bdevs null --workloads '4k randread qd32'
                           (a quick check that it works; not a measurement)
A --workloads item selects the rows whose label has all its words, e.g. "qd1", "randwrite",
"4k randread qd128". Needs release builds (cargo build --release). Run on a quiet machine
(nothing else on the two cores: no build, no other benchmark); the report records the load.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLEXD = os.path.join(REPO, "build/release/plexd")
PLEXPERF = os.path.join(REPO, "build/release/plexperf")
CEILING = os.path.join(REPO, "build/release/tcp_ceiling")
SPDK_BIN_DIR = os.path.normpath(os.environ.get("SPDK_BIN_DIR", os.path.join(REPO, "../shared/spdk/bin")))
# As tests/guest/lib.sh's SPDK_PACKAGES (../shared/spdk/README.md).
SPDK_PACKAGES = ["libnuma1", "libuuid1", "libssl3", "libkeyutils1", "libaio1"]
NQN = "nqn.2026-11.io.plexstor:bench"


def build_release():
    """Brings the release binaries up to date with the profile's LTO. scripts/test.sh builds
    them without LTO into the same place; a benchmark must measure what users run."""
    subprocess.run(["cargo", "build", "--release", "--workspace", "--bins", "-q"], cwd=REPO, check=True)
TARGET_CORES = "0x1"
HOST_CORES = "0x2"
SPDK_TGT_MEM_MB = 1024   # nvmf_tgt -s: the 512 MiB malloc bdev and the transport's buffers
SPDK_PERF_MEM_MB = 256   # spdk_nvme_perf -s: QD128 x 128 KiB of buffers, with room to spare
HUGEPAGES_MB = SPDK_TGT_MEM_MB + SPDK_PERF_MEM_MB + 1024  # + plexd's malloc and pools, plexperf

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

BDEVS = {  # kind -> (create method, params other than the name)
    "null": ("bdev_null_create", {"num_blocks": 8 << 20, "block_size": 512}),
    "malloc": ("bdev_malloc_create", {"num_blocks": 1 << 20, "block_size": 512}),
}

# The same on both targets, spelled out where their defaults differ (SPDK's in-capsule data is
# 4 KiB and its max_io_size 128 KiB; plexd's are 8 KiB and 1 MiB). c2h_success is on in both.
TRANSPORT = {"trtype": "TCP", "max_queue_depth": 128, "in_capsule_data_size": 8192,
             "max_io_size": 131072, "io_unit_size": 131072}

TARGET_NAMES = {"plexd": "plexd", "spdk": "nvmf_tgt"}
HOST_NAMES = {"spdk": "spdk_nvme_perf", "plexperf": "plexperf"}


class Rpc:
    def __init__(self, path, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
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
                raise RuntimeError(f"the target closed the socket during {method}")
            buf += chunk
            try:
                resp = json.loads(buf)
            except ValueError:
                continue
            if "error" in resp:
                raise RuntimeError(f"{method}: {resp['error']}")
            return resp["result"]

    def close(self):
        self.sock.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User + system CPU seconds of process PID, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spdk_bin(name):
    path = os.path.join(SPDK_BIN_DIR, name)
    return path if os.access(path, os.X_OK) else None


class Target:
    """An NVMe-oF target process on core 0, "plexd" or "spdk" (nvmf_tgt), listening on PORT
    with one subsystem per export (bdev kind, bdev name, subsystem NQN)."""

    def __init__(self, kind, exports, port, idle_poll_us=1000, transport=None, spdk_sock=None):
        self.kind = kind
        self.dir = tempfile.mkdtemp(prefix=f"{kind}bench.")
        self.sock = os.path.join(self.dir, f"{kind}.sock")
        self.logpath = os.path.join(self.dir, f"{kind}.log")
        self.log = open(self.logpath, "w")
        if kind == "plexd":
            self.cmd = [PLEXD, "-m", TARGET_CORES, "-r", self.sock, "--idle-poll-us", str(idle_poll_us)]
        else:
            self.cmd = [spdk_bin("nvmf_tgt"), "-m", TARGET_CORES, "-s", str(SPDK_TGT_MEM_MB), "-r", self.sock]
            if spdk_sock:
                self.cmd.append("--wait-for-rpc")  # socket options only before the framework starts
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.paused = False
        self.config = []  # (method, params), in order: the report prints them
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(self.sock):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")
                time.sleep(0.05)
            self.rpc = Rpc(self.sock)
            if kind == "spdk":
                if spdk_sock:
                    self.configure("sock_impl_set_options", spdk_sock)
                    self.configure("framework_start_init", None)
                self.rpc.call("framework_wait_init")
            for bdev, name, nqn in exports:
                method, params = BDEVS[bdev]
                self.configure(method, dict(params, name=name))
            self.configure("nvmf_create_transport", transport or {"trtype": "TCP"})
            for bdev, name, nqn in exports:
                self.configure("nvmf_create_subsystem", {"nqn": nqn, "allow_any_host": True})
                self.configure("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": name}})
                self.configure("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": {
                    "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}})
        except BaseException:
            self.stop()
            raise

    @property
    def name(self):
        return TARGET_NAMES[self.kind]

    def configure(self, method, params):
        self.rpc.call(method, params)
        self.config.append((method, params))

    def log_tail(self):
        self.log.flush()
        with open(self.logpath, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-3:])

    def pause(self):
        if not self.paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self):
        if self.paused:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def alive(self):
        return self.proc.poll() is None

    def work_counters(self):
        """(busy ns of its reactors, reads + writes of its bdevs) so far. Both targets count a
        reactor pass busy when a poller did work (SPDK in TSC ticks, plexd in ns), so the
        difference over a run, divided by the I/Os it served, is the core time each I/O cost:
        what "per core" means when the host, not the target, sets the pace."""
        r = self.rpc.call("framework_get_reactors")
        busy = sum(x["busy"] for x in r["reactors"]) * 1e9 / r["tick_rate"]
        ios = sum(b["num_read_ops"] + b["num_write_ops"] for b in self.rpc.call("bdev_get_iostat")["bdevs"])
        return busy, ios, self.group_busy_passes(r)

    def group_busy_passes(self, reactors):
        """How many times the NVMe-oF poll group's poller did work so far (SPDK: the TCP
        transport's poller, nvmf_TCP, in thread_get_pollers; plexd: nvmf_tcp_poll_group_* in
        framework_get_reactors), 0 before the first connection made one, None where none is
        found after that. I/Os over this is the batch a productive pass
        handled: a pass has a cost of its own (epoll_wait, recv, writev), so the larger the
        batches the host's pace brings, the less each I/O pays, whichever target it is."""
        if self.kind == "spdk":
            threads = self.rpc.call("thread_get_pollers")["threads"]
            pollers = [p for t in threads for p in t.get("active_pollers", [])
                       if p["name"] in ("nvmf_TCP", "nvmf_poll_group_poll")]
        else:
            pollers = [p for x in reactors["reactors"] for p in x.get("pollers", [])
                       if p["name"].startswith("nvmf_tcp_poll_group")]
        # plexd makes its poll group with the first connection.
        return sum(p["busy_count"] for p in pollers) if pollers or self.kind == "plexd" else None

    def idle_cpu_pct(self, seconds=3.0):
        c0 = cpu_seconds(self.proc.pid)
        time.sleep(seconds)
        return (cpu_seconds(self.proc.pid) - c0) / seconds * 100

    def stop(self):
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "rpc"):
            self.rpc.close()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Plexd(Target):
    """plexd exporting one bdev of kind BDEV, named "bench", as NQN (what benches/qos.py uses),
    with plexd's default transport options."""

    def __init__(self, bdev, port, idle_poll_us=1000):
        super().__init__("plexd", [(bdev, "bench", NQN)], port, idle_poll_us)


def trid(port, nqn=NQN):
    return f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{nqn}"


def plexperf_cmd(port, pattern, size, qd, seconds, nqn=NQN, warmup=1):
    return [PLEXPERF, "-r", trid(port, nqn), "-q", str(qd), "-o", str(size), "-w", pattern,
            "-t", str(seconds), "--warmup", str(warmup), "-c", HOST_CORES, "--json"]


def run_perf(cmd):
    """Runs plexperf; its "total": iops, mib_s, latency_us {avg_us, min_us, max_us, p99_us, …}."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"plexperf failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)["total"]


def spdk_perf_cmd(port, pattern, size, qd, seconds, nqn=NQN, warmup=1):
    # -L: software latency tracking, for the percentiles (a histogram tally per I/O on top of
    # the time stamps spdk_nvme_perf takes anyway for its average).
    return [spdk_bin("spdk_nvme_perf"), "-r", trid(port, nqn), "-q", str(qd), "-o", str(size),
            "-w", pattern, "-t", str(seconds), "-a", str(warmup), "-c", HOST_CORES,
            "-s", str(SPDK_PERF_MEM_MB), "-L"]


# "Total : IOPS MiB/s Average min max" (latencies in µs), after the per-namespace lines.
SPDK_TOTAL = re.compile(r"^Total\s*:\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)
# -L's summary: one block per namespace and core, "  99.00000% :   123.456us".
SPDK_SUMMARY = re.compile(r"^Summary latency data for ", re.M)
SPDK_PERCENTILE = re.compile(r"^\s*([\d.]+)%\s*:\s*([\d.]+)us\s*$", re.M)
# SPDK's host logs this for each I/O queue it has itself disconnected while tearing down
# (against SPDK's own nvmf_tgt too): not an error of the run.
SPDK_TEARDOWN = re.compile(r"DISCONNECTED\] CQ transport error -6 ")


def parse_spdk_perf(text):
    """spdk_nvme_perf's output as plexperf's "total" shape; percentiles only where its -L
    summary is there for exactly one namespace and core (None otherwise)."""
    m = SPDK_TOTAL.search(text)
    if not m:
        raise ValueError("no Total line")
    iops, mib_s, avg, lo, hi = (float(x) for x in m.groups())
    pct = {}
    if len(SPDK_SUMMARY.findall(text)) == 1:
        block = text[SPDK_SUMMARY.search(text).end():]
        for p, us in SPDK_PERCENTILE.findall(block):
            pct.setdefault(round(float(p), 5), float(us))
    errors = [line for line in text.splitlines()
              if "*ERROR*" in line and not SPDK_TEARDOWN.search(line)]
    return {"iops": iops, "mib_s": mib_s, "error_lines": errors,
            "latency_us": {"avg_us": avg, "min_us": lo, "max_us": hi,
                           "p99_us": pct.get(99.0), "p99_9_us": pct.get(99.9)}}


def run_spdk_perf(cmd, seconds):
    with tempfile.TemporaryDirectory(prefix="spdkperf.") as cwd:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, cwd=cwd)
    text = out.stdout + out.stderr
    try:
        res = parse_spdk_perf(text)
    except ValueError as e:
        tail = " | ".join(text.strip().splitlines()[-4:])
        raise RuntimeError(f"spdk_nvme_perf exited {out.returncode}, {e}: {tail}") from None
    if out.returncode != 0 or res["iops"] <= 0:
        raise RuntimeError(f"spdk_nvme_perf exited {out.returncode} with {res['iops']} IOPS")
    return res


def ceiling_cmd(shapes, qds, seconds):
    return [CEILING, "-w", ",".join(shapes), "-q", ",".join(str(q) for q in qds),
            "-o", "4096", "-t", str(seconds), "--warmup", "1", "--target-core", "0",
            "--host-core", "1", "--json"]


def run_ceiling(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"tcp_ceiling failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return {(r["workload"], r["qd"]): r for r in json.loads(out.stdout)["rows"]}


def ceiling_key(label):
    """The ceiling's (shape, qd) for a 4 KiB random row, else None."""
    m = re.fullmatch(r"4k rand(read|write) qd(\d+)", label)
    return (m.group(1), int(m.group(2))) if m else None


def select_workloads(spec):
    if not spec:
        return list(WORKLOADS)
    chosen = []
    for item in spec.split(","):
        words = item.split()
        hits = [w for w in WORKLOADS if all(x in w[0].split() for x in words)]
        if not hits:
            sys.exit(f"--workloads: '{item}' matches no row of: {', '.join(w[0] for w in WORKLOADS)}")
        chosen += [w for w in hits if w not in chosen]
    return [w for w in WORKLOADS if w in chosen]


# ---- the machine ------------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def proc_times():
    """{pid: (name, CPU seconds)} of every process."""
    tck = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        fields = s.rsplit(")", 1)[1].split()
        out[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / tck)
    return out


def machine_activity(seconds=2.0):
    """(busy % of all cores, [(name, pid, % of a core)] of processes over 1 %) over SECONDS."""
    def stat():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = stat()
    p0 = proc_times()
    time.sleep(seconds)
    t1, i1 = stat()
    p1 = proc_times()
    busy = 100.0 * (1 - (i1 - i0) / max(t1 - t0, 1))
    me = os.getpid()
    others = sorted(((name, pid, (c - p0[pid][1]) / seconds * 100)
                     for pid, (name, c) in p1.items() if pid in p0 and pid != me),
                    key=lambda x: -x[2])
    return busy, [o for o in others if o[2] >= 1.0]


def describe_activity(act):
    busy, others = act
    who = ", ".join(f"{n} (pid {p}) {pct:.0f} %" for n, p, pct in others[:5]) or "none"
    return f"all cores {busy:.0f} % busy; processes over 1 % of a core: {who}"


def load_avg():
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_times():
    """{core: (all ticks, steal ticks)} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *v = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in v]
                out[int(name[3:])] = (sum(v[:8]), v[7] if len(v) > 7 else 0)
    return out


def describe_steal(before, after):
    """Each core's time the hypervisor gave to others while it wanted to run, between two
    cpu_times(): a quiet guest can still lose its cycles to a busy host, and then every figure
    of the run is low and spread."""
    parts = []
    for core in sorted(after):
        if core not in before:
            continue
        total = after[core][0] - before[core][0]
        steal = after[core][1] - before[core][1]
        parts.append(f"core {core} {100.0 * steal / max(total, 1):.1f} %")
    return ", ".join(parts) or "not reported"


# ---- SPDK's prerequisites -----------------------------------------------------------------------

def install_spdk_packages():
    missing = [p for p in SPDK_PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        print(f"installing {' '.join(missing)} (SPDK's runtime packages)", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q"] + missing, check=True, stdout=subprocess.DEVNULL)


def reserve_hugepages(mb):
    """Grows the hugepage reservation by MB with scripts/setup.sh, as tests/guest/lib.sh's
    spdk_prepare does; returns a function that puts the machine's count back, or None."""
    if os.geteuid() != 0:
        print("not root: hugepages left as they are", flush=True)
        return None
    page_kb = meminfo("Hugepagesize")
    nr_file = f"/sys/kernel/mm/hugepages/hugepages-{page_kb}kB/nr_hugepages"
    with open(nr_file) as f:
        before = int(f.read())
    env = dict(os.environ, PCI_ALLOWED="ffff:ff:1f.7",  # a BDF that does not exist: no device is touched
               HUGEMEM=str(before * page_kb // 1024 + mb + 64))
    r = subprocess.run([os.path.join(REPO, "scripts/setup.sh")], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"scripts/setup.sh could not reserve {mb} MiB more of hugepages: "
              f"{r.stderr.strip()[-300:]}", flush=True)

    def restore():
        with open(nr_file, "w") as f:
            f.write(str(before))
    return restore


CC_SYSCTL = "/proc/sys/net/ipv4/tcp_congestion_control"


def set_congestion_control(name):
    """Makes NAME the TCP congestion control of new sockets for the run (all four programs
    and the ceiling share it); returns (what the machine had, what the run uses, a function
    that puts the machine's back or None). Some images default to BBR, whose pacing on
    loopback makes a run bistable: a connection that leaves BBR's start-up paces its own
    sends, one that does not never does, and which happens changed one 4 KiB write row by
    1.8x between two runs of the same binaries. Neither target's code decides it, so the
    bench fixes the algorithm."""
    try:
        with open(CC_SYSCTL) as f:
            before = f.read().strip()
    except OSError:
        return "unknown", "unknown", None
    if name in ("keep", before):
        return before, before, None
    try:
        with open(CC_SYSCTL, "w") as f:
            f.write(name)
    except OSError as e:
        print(f"cannot set the TCP congestion control to {name} ({e}); it stays {before}", flush=True)
        return before, before, None

    def restore():
        with open(CC_SYSCTL, "w") as f:
            f.write(before)
    return before, name, restore


# ---- the run ------------------------------------------------------------------------------------

def median_of(runs, key):
    vals = [key(r) for r in runs if key(r) is not None]
    return statistics.median(vals) if vals else None


def summarize(runs):
    """Medians of a cell's repetitions, and their spread (max−min over the median IOPS)."""
    iops = [r["iops"] for r in runs]
    lat = lambda k: median_of(runs, lambda r: r["latency_us"].get(k))  # noqa: E731
    med = statistics.median(iops)
    return {"iops": med, "mib_s": median_of(runs, lambda r: r["mib_s"]),
            "avg_us": lat("avg_us"), "p99_us": lat("p99_us"), "p99_9_us": lat("p99_9_us"),
            "busy_ns_per_io": median_of(runs, lambda r: r.get("busy_ns_per_io")),
            "ios_per_pass": median_of(runs, lambda r: r.get("ios_per_pass")),
            "spread": (max(iops) - min(iops)) / med if med else 0.0, "n": len(runs),
            "error_lines": sum(len(r.get("error_lines", [])) for r in runs),
            "io_errors": sum(r.get("errors", 0) for r in runs)}


def fmt_rate(label, cell, qd1_latency=True):
    """IOPS in K for 4 KiB rows, MiB/s for 128 KiB; QD1 with its mean latency."""
    if cell is None:
        return "–"
    if label.startswith("128k"):
        return f"{cell['mib_s']:,.0f} MiB/s"
    s = f"{cell['iops'] / 1000:,.0f} K"
    if qd1_latency and label.endswith(" qd1"):
        s += f" ({cell['avg_us']:.1f} µs)"
    return s


def rate(label, cell):
    return cell["mib_s"] if label.startswith("128k") else cell["iops"]


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "–"


def fnum(v, f="{:.1f}"):
    return f.format(v) if v is not None else "–"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", type=int, default=5, help="measured seconds per run (after 1 s warm-up)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians are reported")
    ap.add_argument("--bdevs", default="null,malloc")
    ap.add_argument("--workloads", "--rows", dest="workloads",
                    help="comma-separated rows to run, each by words of its label (default: all)")
    ap.add_argument("--no-spdk", action="store_true", help="plexd and plexperf only, even where SPDK is there")
    ap.add_argument("--no-ceiling", action="store_true", help="skip benches/tcp_ceiling")
    ap.add_argument("--idle-poll-us", type=int, default=1000, help="plexd --idle-poll-us")
    ap.add_argument("--spdk-sock-options", type=json.loads, metavar="JSON",
                    help="nvmf_tgt's sock_impl_set_options before its listeners, e.g. "
                         "'{\"impl_name\": \"posix\", \"enable_zerocopy_send_server\": false}' "
                         "(default: SPDK's own defaults)")
    ap.add_argument("--tcp-cc", default="cubic",
                    help="TCP congestion control for the run (default cubic, Linux's own default; "
                         "'keep' leaves the machine's), put back at the end")
    ap.add_argument("--report", help="report file (default benches/reports/nvmf_tcp-DATE.md)")
    args = ap.parse_args()
    build_release()
    bdevs = args.bdevs.split(",")
    for b in bdevs:
        if b not in BDEVS:
            sys.exit(f"--bdevs: unknown bdev '{b}' (known: {', '.join(BDEVS)})")
    workloads = select_workloads(args.workloads)
    for binary in [PLEXD, PLEXPERF] + ([] if args.no_ceiling else [CEILING]):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} is missing: run cargo build --release first")

    spdk_missing = [n for n in ("nvmf_tgt", "spdk_nvme_perf") if not spdk_bin(n)]
    if args.no_spdk:
        spdk_note = "SPDK left out (--no-spdk): plexd only."
    elif spdk_missing:
        spdk_note = (f"SPDK's {' and '.join(spdk_missing)} not found in {SPDK_BIN_DIR}: plexd only, "
                     "so no plexd ÷ SPDK.")
    else:
        spdk_note = None
    with_spdk = spdk_note is None
    if spdk_note:
        print(spdk_note, flush=True)
    targets_kinds = ["plexd", "spdk"] if with_spdk else ["plexd"]
    host_kinds = ["spdk", "plexperf"] if with_spdk else ["plexperf"]
    # The host whose figures compare targets, and the targets with the ceiling.
    ref_host = "spdk" if with_spdk else "plexperf"
    ceil_keys = sorted({k for w in workloads if (k := ceiling_key(w[0]))})
    with_ceiling = not args.no_ceiling and bool(ceil_keys)

    now = datetime.datetime.now()
    quiet_before = machine_activity()
    load_before = load_avg()
    steal_before = cpu_times()
    print(f"load average {load_before}; {describe_activity(quiet_before)}", flush=True)

    if with_spdk:
        install_spdk_packages()
    restore_hugepages = reserve_hugepages(HUGEPAGES_MB)
    hugepages = meminfo("HugePages_Total") * meminfo("Hugepagesize") // 1024
    machine_cc, run_cc, restore_cc = set_congestion_control(args.tcp_cc)

    commands = []

    def note(cmd):
        line = shlex.join(cmd)
        if line not in commands:
            commands.append(line)

    ports = {}
    for kind in targets_kinds:
        while (p := free_port()) in ports.values():
            pass
        ports[kind] = p
    exports = [(b, f"bench_{b}", f"{NQN}-{b}") for b in bdevs]
    targets = {}
    results = {}  # (bdev, label, target, host) -> [run, ...]
    ceiling_runs = {}  # (shape, qd) -> [row, ...]
    idle = {}
    try:
        for kind in targets_kinds:
            for t in targets.values():
                t.pause()
            print(f"starting {TARGET_NAMES[kind]}", flush=True)
            targets[kind] = Target(kind, exports, ports[kind], args.idle_poll_us, TRANSPORT,
                                   args.spdk_sock_options)
            note(targets[kind].cmd)

        def only(kind):
            """Lets the target KIND run (None: no target) and freezes the others."""
            for k, t in targets.items():
                if k != kind:
                    t.pause()
            if kind:
                targets[kind].resume()
                time.sleep(0.2)  # let it finish whatever the freeze interrupted

        for kind in targets_kinds:
            only(kind)
            time.sleep(1.0)
            idle[kind] = targets[kind].idle_cpu_pct()
            print(f"{TARGET_NAMES[kind]} idle: {idle[kind]:.1f} % of a core", flush=True)

        for rep in range(args.reps):
            order = targets_kinds if rep % 2 == 0 else targets_kinds[::-1]
            horder = host_kinds if rep % 2 == 0 else host_kinds[::-1]
            if with_ceiling:
                only(None)
                cmd = ceiling_cmd(sorted({s for s, _ in ceil_keys}), sorted({q for _, q in ceil_keys}), args.time)
                note(cmd)
                for key, row in run_ceiling(cmd).items():
                    ceiling_runs.setdefault(key, []).append(row)
                print(f"rep {rep + 1}: ceiling " + ", ".join(
                    f"{s} qd{q} {ceiling_runs[(s, q)][-1]['ops_s']:,.0f}/s" for s, q in ceil_keys), flush=True)
            for bdev, _, nqn in exports:
                for label, pattern, size, qd in workloads:
                    for tk in order:
                        only(tk)
                        for hk in horder:
                            before = targets[tk].work_counters()
                            if hk == "spdk":
                                cmd = spdk_perf_cmd(ports[tk], pattern, size, qd, args.time, nqn)
                                r = run_spdk_perf(cmd, args.time)
                            else:
                                cmd = plexperf_cmd(ports[tk], pattern, size, qd, args.time, nqn)
                                r = run_perf(cmd)
                            note(cmd)
                            if not targets[tk].alive():
                                raise RuntimeError(f"{targets[tk].name} exited: {targets[tk].log_tail()}")
                            after = targets[tk].work_counters()
                            served = after[1] - before[1]
                            r["busy_ns_per_io"] = (after[0] - before[0]) / served if served else None
                            passes = after[2] - before[2] if None not in (after[2], before[2]) else 0
                            r["ios_per_pass"] = served / passes if passes else None
                            results.setdefault((bdev, label, tk, hk), []).append(r)
                            lat = r["latency_us"]
                            print(f"rep {rep + 1}: {bdev:6} {label:18} {TARGET_NAMES[tk]:8} <- {HOST_NAMES[hk]:14} "
                                  f"{r['iops']:>10,.0f} IOPS {r['mib_s']:>9,.1f} MiB/s avg {lat['avg_us']:.1f} µs",
                                  flush=True)
    finally:
        for t in targets.values():
            t.stop()
        if restore_hugepages:
            restore_hugepages()
        if restore_cc:
            restore_cc()
    for kind, t in targets.items():
        commands.append(f"# {TARGET_NAMES[kind]}'s configuration, JSON-RPC on its -r socket, in order:")
        commands += [f"#   {method} {json.dumps(params)}" for method, params in t.config]
    steal_during = describe_steal(steal_before, cpu_times())
    quiet_after = machine_activity()
    load_after = load_avg()

    cells = {k: summarize(v) for k, v in results.items()}
    ceiling = {}
    for key, rows in ceiling_runs.items():
        ceiling[key] = {"ops_s": statistics.median(r["ops_s"] for r in rows),
                        "avg_us": statistics.median(r["avg_us"] for r in rows),
                        "target_cpu": rows[len(rows) // 2]["target_cpu"],
                        "host_cpu": rows[len(rows) // 2]["host_cpu"]}

    # ---- the tables ----
    main_rows = []
    if with_spdk:
        head = ("| bdev | workload | SPDK nvmf_tgt | plexd | plexd ÷ SPDK | busy ns/IO nvmf_tgt | "
                "busy ns/IO plexd | per core, plexd ÷ SPDK | plexd ÷ SPDK, host plexperf | "
                "plexperf ÷ spdk_nvme_perf (plexd) | plexperf ÷ spdk_nvme_perf (nvmf_tgt) |")
        sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        if with_ceiling:
            head += " plexd ÷ ceiling | nvmf_tgt ÷ ceiling |"
            sep += "---:|---:|"
    else:
        head = "| bdev | workload | plexd (plexperf) | avg µs | p99 µs |"
        sep = "|---|---|---:|---:|---:|"
        if with_ceiling:
            head += " plexd ÷ ceiling |"
            sep += "---:|"
    main_rows += [head, sep]
    for bdev in bdevs:
        for label, *_ in workloads:
            c = lambda tk, hk: cells.get((bdev, label, tk, hk))  # noqa: E731
            ck = ceiling_key(label)
            ceil = ceiling.get(ck) if with_ceiling and ck else None
            pd = c("plexd", ref_host)
            if with_spdk:
                sp = c("spdk", "spdk")
                pp, ps = c("plexd", "plexperf"), c("spdk", "plexperf")
                line = (f"| {bdev} | {label} | {fmt_rate(label, sp)} | {fmt_rate(label, pd)} | "
                        f"**{ratio(rate(label, pd), rate(label, sp))}** | "
                        f"{fnum(sp['busy_ns_per_io'], '{:,.0f}')} | {fnum(pd['busy_ns_per_io'], '{:,.0f}')} | "
                        f"**{ratio(sp['busy_ns_per_io'], pd['busy_ns_per_io'])}** | "
                        f"{ratio(rate(label, pp), rate(label, ps))} | "
                        f"{ratio(rate(label, pp), rate(label, pd))} | {ratio(rate(label, ps), rate(label, sp))} |")
                if with_ceiling:
                    line += (f" {ratio(pd['iops'], ceil['ops_s']) if ceil else '–'} |"
                             f" {ratio(sp['iops'], ceil['ops_s']) if ceil else '–'} |")
            else:
                line = (f"| {bdev} | {label} | {fmt_rate(label, pd, False)} | {fnum(pd['avg_us'])} | "
                        f"{fnum(pd['p99_us'])} |")
                if with_ceiling:
                    line += f" {ratio(pd['iops'], ceil['ops_s']) if ceil else '–'} |"
            main_rows.append(line)

    ceil_rows = []
    if with_ceiling:
        ceil_rows = ["| shape (4 KiB) | QD | ops/s | MiB/s | mean µs | target core usr/sys % | host core usr/sys % |",
                     "|---|---:|---:|---:|---:|---:|---:|"]
        for (shape, qd) in ceil_keys:
            r = ceiling[(shape, qd)]
            ceil_rows.append(f"| {shape} | {qd} | {r['ops_s']:,.0f} | {r['ops_s'] * 4096 / 1048576:,.1f} | "
                             f"{r['avg_us']:.1f} | {r['target_cpu']['user_pct']:.0f}/{r['target_cpu']['sys_pct']:.0f} | "
                             f"{r['host_cpu']['user_pct']:.0f}/{r['host_cpu']['sys_pct']:.0f} |")

    cell_rows = ["| bdev | workload | target | host | IOPS | MiB/s | avg µs | p99 µs | p99.9 µs | "
                 "busy ns/IO | I/Os per busy pass | spread |",
                 "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    errors = io_errors = 0
    for bdev in bdevs:
        for label, *_ in workloads:
            for tk in targets_kinds:
                for hk in host_kinds:
                    x = cells[(bdev, label, tk, hk)]
                    errors += x["error_lines"]
                    io_errors += x["io_errors"]
                    cell_rows.append(f"| {bdev} | {label} | {TARGET_NAMES[tk]} | {HOST_NAMES[hk]} | "
                                     f"{x['iops']:,.0f} | {x['mib_s']:,.1f} | {fnum(x['avg_us'])} | "
                                     f"{fnum(x['p99_us'])} | {fnum(x['p99_9_us'])} | "
                                     f"{fnum(x['busy_ns_per_io'], '{:,.0f}')} | {fnum(x['ios_per_pass'])} | "
                                     f"{x['spread'] * 100:.0f} % |")

    idle_line = "; ".join(f"{TARGET_NAMES[k]} {v:.1f} % of a core" for k, v in idle.items())
    git = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    machine = (f"{platform.node()}: {cpu_model()}, {os.cpu_count()} cores, "
               f"{meminfo('MemTotal') // 1024:,} MiB, kernel {platform.release()}; "
               f"{hugepages:,} MiB of hugepages reserved during the run; TCP congestion control "
               f"{run_cc} during the run" + (f" (the machine's is {machine_cc})" if machine_cc != run_cc else ""))
    how = (f"Targets on core 0 (plexd, one reactor, --idle-poll-us {args.idle_poll_us}"
           + ("; SPDK v26.05 nvmf_tgt -m 0x1" if with_spdk else "") + "), hosts on core 1 (plexperf"
           + (", spdk_nvme_perf -L" if with_spdk else "") + "), NVMe/TCP over 127.0.0.1, one connection. "
           f"Each target exports {', '.join(f'a {b} bdev' for b in bdevs)} (512 B blocks) with the same "
           f"transport options {json.dumps(TRANSPORT)}. {args.time} s per run after 1 s warm-up; "
           f"{args.reps} repetition(s), interleaved (per repetition: the ceiling, then for each row "
           "each target in turn, the other frozen with SIGSTOP, with each host; the order reversed "
           "every other repetition); medians."
           + (f" nvmf_tgt's socket options changed from SPDK's defaults: sock_impl_set_options "
              f"{json.dumps(args.spdk_sock_options)}." if args.spdk_sock_options else ""))

    out = []
    out.append(f"# NVMe/TCP over loopback, {now:%Y-%m-%d %H:%M}\n")
    out.append(f"Commit {git}; {machine}.\n")
    out.append(how + "\n")
    if spdk_note:
        out.append(f"**{spdk_note}**\n")
    out.append(f"Quiet? Load average (1/5/15 min) {load_before} at the start, {load_after} at the end. "
               f"Over 2 s before the run: {describe_activity(quiet_before)}. "
               f"Over 2 s after it: {describe_activity(quiet_after)}. "
               f"Stolen by the hypervisor during the run: {steal_during}.\n")
    if with_spdk:
        out.append("## plexd and SPDK's nvmf_tgt, the same host (spdk_nvme_perf) against both\n")
        out.append("IOPS (4 KiB; QD1 with its mean latency) or MiB/s (128 KiB). plexperf ÷ "
                   "spdk_nvme_perf: our host over SPDK's against the same target. ÷ ceiling: the "
                   "target's IOPS (spdk_nvme_perf) over the loopback ceiling's ops/s for the same "
                   "shape and queue depth. busy ns/IO: the target's reactor time in passes where a "
                   "poller did work (SPDK's framework_get_reactors busy ticks, plexd's busy ns) "
                   "over the reads and writes its bdevs served in the same span (bdev_get_iostat), "
                   "host spdk_nvme_perf: what each I/O cost the target's core. per core, plexd ÷ "
                   "SPDK: nvmf_tgt's busy ns/IO over plexd's. Where the host sets the pace (the "
                   "same IOPS from both targets), this, not the IOPS, says which target uses its "
                   "core better; but it also falls as the batches a pass handles grow, and the "
                   "batch size follows the pace of host and target together (the I/Os per busy "
                   "pass column below). plexd ÷ SPDK, host plexperf: the rates with our host, "
                   "which leaves more of the pace to the targets.\n")
    else:
        out.append("## plexd (host plexperf)\n")
    out.append("\n".join(main_rows) + "\n")
    if with_ceiling:
        out.append("## The ceiling: benches/tcp_ceiling, same run\n")
        out.append("One loopback TCP connection, target side on core 0, host side on core 1, both "
                   "spinning on non-blocking sockets; NVMe/TCP's PDU sizes (read: 72 B command out, "
                   "24 B C2H header + 4 KiB back with the success flag; write: 72 B + 4 KiB out, "
                   "24 B response back), no NVMe processing: what the kernel alone costs. Medians.\n")
        out.append("\n".join(ceil_rows) + "\n")
    out.append("## Every target and host (medians; spread: (max − min) ÷ median of the IOPS)\n")
    if with_spdk:
        out.append("spdk_nvme_perf's p99 and p99.9 are from its -L summary. I/Os per busy pass: "
                   "the I/Os the target's bdevs served over the passes in which its NVMe-oF poll "
                   "group did work (the poller's busy count), over the same span.\n")
    out.append("\n".join(cell_rows) + "\n")
    if errors:
        out.append(f"spdk_nvme_perf printed {errors} error line(s) other than its teardown's "
                   "\"CQ transport error -6\".\n")
    if io_errors:
        out.append(f"plexperf counted {io_errors} failed I/O(s).\n")
    out.append(f"## Idle CPU (3 s, no host connected)\n\n{idle_line}\n")
    out.append("## Commands\n\n```\n" + "\n".join(commands) + "\n```\n")
    text = "\n".join(out)

    print()
    print("\n".join(main_rows))
    if with_ceiling:
        print()
        print("\n".join(ceil_rows))
    print(f"\nidle: {idle_line}")
    print(f"load average {load_before} at the start, {load_after} at the end")
    print(f"stolen by the hypervisor during the run: {steal_during}")

    report = args.report or os.path.join(REPO, "benches/reports", f"nvmf_tcp-{now:%Y%m%d-%H%M}.md")
    os.makedirs(os.path.dirname(report), exist_ok=True)
    with open(report, "w") as f:
        f.write(text)
    print(f"\nreport: {report}")


if __name__ == "__main__":
    main()
