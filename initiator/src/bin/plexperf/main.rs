//! plexperf: NVMe-oF I/O benchmark and verifier, after SPDK's `spdk_nvme_perf`.

mod state;
mod verify;
mod worker;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use initiator::discovery;
use initiator::histogram::{Histogram, LatencySummary};
use initiator::{Controller, CtrlrEvent, CtrlrOpts, CtrlrState, TransportId};
use serde::Serialize;

use worker::{Job, JobResult, JobSpec, Pattern};

#[derive(Parser, Debug)]
#[command(
    name = "plexperf",
    version,
    about = "NVMe over Fabrics benchmark and data verifier (like spdk_nvme_perf)"
)]
struct Cli {
    /// Transport ID, SPDK syntax: 'trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:NQN [ns:N]'. Repeatable.
    #[arg(short = 'r', long = "transport", required = true)]
    trids: Vec<String>,
    /// Queue depth per queue pair.
    #[arg(short = 'q', long = "io-depth", default_value_t = 32)]
    depth: u32,
    /// I/O size in bytes (a multiple of the namespace block size).
    #[arg(short = 'o', long = "io-size", default_value_t = 4096)]
    io_size: u32,
    /// Workload: read, write, randread, randwrite, rw, randrw.
    #[arg(short = 'w', long = "io-pattern", default_value = "randread")]
    workload: String,
    /// Read percentage for rw/randrw.
    #[arg(short = 'M', long = "rwmixread", default_value_t = 50)]
    rwmix: u32,
    /// Run time in seconds (after warm-up).
    #[arg(short = 't', long = "time", default_value_t = 10)]
    time: u64,
    /// Completions a queue pair hands over per poll before the new commands they free go
    /// out (0: no limit), as spdk_nvme_perf's -C. Default: half the queue depth.
    #[arg(short = 'C', long = "max-completion-per-poll")]
    max_completions: Option<usize>,
    /// Core mask: one thread per core, pinned, each owning its queue pairs.
    #[arg(short = 'c', long = "core-mask", default_value = "0x1")]
    core_mask: String,
    /// Queue pairs per namespace.
    #[arg(short = 'P', long = "num-qpairs", default_value_t = 1)]
    qpairs: u32,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Write self-describing blocks and check every read (LBA, generation, CRC32C).
    #[arg(long)]
    verify: bool,
    /// With --verify: load what an earlier run acknowledged from FILE (if it exists), check
    /// every block against it, and save this run's record there at exit. A write that failed
    /// or was in flight may read back as either its data or what was there before.
    #[arg(long = "verify-state", value_name = "FILE", requires = "verify")]
    verify_state: Option<std::path::PathBuf>,
    /// Use only the first BYTES of each namespace (default: all).
    #[arg(long)]
    size: Option<u64>,
    /// Request NVMe/TCP header digests.
    #[arg(long)]
    hdgst: bool,
    /// Request NVMe/TCP data digests.
    #[arg(long)]
    ddgst: bool,
    /// Host NQN (default: a UUID-based one).
    #[arg(long)]
    hostnqn: Option<String>,
    /// Print the controller and namespaces, then exit (no I/O).
    #[arg(long)]
    identify: bool,
    /// PCIe: describe every transfer with PRPs (lists past two pages), even where the
    /// controller takes SGLs.
    #[arg(long)]
    prp_only: bool,
    /// Treat each -r as a discovery controller: print the discovery log, then exit.
    #[arg(long)]
    discover: bool,
    /// Seconds between reconnect attempts (SPDK reconnect_delay_sec).
    #[arg(long, default_value_t = 1)]
    reconnect_delay_sec: u64,
    /// Seconds without a connection before pending I/O fails (SPDK fast_io_fail_timeout_sec; 0 = never).
    #[arg(long, default_value_t = 0)]
    fast_io_fail_timeout_sec: u64,
    /// Seconds before giving up on a lost controller (SPDK ctrlr_loss_timeout_sec; -1 = forever).
    #[arg(long, default_value_t = 30, allow_negative_numbers = true)]
    ctrlr_loss_timeout_sec: i64,
    /// I/O timeout in seconds before abort (0 = none).
    #[arg(long, default_value_t = 30)]
    io_timeout_sec: u64,
    /// Machine-readable report on stdout.
    #[arg(long)]
    json: bool,
    /// Random seed.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
}

#[derive(Serialize)]
struct NsReport {
    name: String,
    trid: String,
    nsid: u32,
    iops: f64,
    mib_s: f64,
    reads: u64,
    writes: u64,
    errors: u64,
    latency_us: LatencySummary,
}

#[derive(Serialize, Default)]
struct VerifyReport {
    verified_blocks: u64,
    unwritten_blocks: u64,
    mismatches: u64,
    samples: Vec<String>,
}

/// The NVMe/TCP digests one queue negotiated (ICResp), next to what it asked for.
#[derive(Serialize)]
struct QueueDigests {
    trid: String,
    qid: u16,
    #[serde(flatten)]
    digests: initiator::Digests,
}

#[derive(Serialize)]
struct Report {
    workload: String,
    io_size: u32,
    depth: u32,
    seconds: f64,
    namespaces: Vec<NsReport>,
    total: NsReport,
    verify: Option<VerifyReport>,
    reconnects: u64,
    first_error: Option<String>,
    /// Per queue (admin queue qid 0 included), as connected before the run.
    digests: Vec<QueueDigests>,
}

fn parse_mask(s: &str) -> Result<Vec<usize>, String> {
    let h = s.trim_start_matches("0x").trim_start_matches("0X");
    let m = u64::from_str_radix(h, 16).map_err(|_| format!("core mask `{s}` is not hex"))?;
    let cores: Vec<usize> = (0..64).filter(|i| m & (1 << i) != 0).collect();
    if cores.is_empty() {
        return Err("core mask selects no core".into());
    }
    Ok(cores)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("plexperf: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let (pattern, read_pct) = match cli.workload.as_str() {
        "read" => (Pattern::Seq, 100),
        "write" => (Pattern::Seq, 0),
        "randread" => (Pattern::Rand, 100),
        "randwrite" => (Pattern::Rand, 0),
        "rw" => (Pattern::Seq, cli.rwmix.min(100)),
        "randrw" => (Pattern::Rand, cli.rwmix.min(100)),
        w => {
            return Err(format!(
                "unknown workload `{w}` (read, write, randread, randwrite, rw, randrw)"
            ))
        }
    };
    let cores = parse_mask(&cli.core_mask)?;
    if cli.depth == 0 || cli.io_size == 0 || cli.qpairs == 0 {
        return Err("-q, -o and -P must be positive".into());
    }
    let trids: Vec<TransportId> = cli
        .trids
        .iter()
        .map(|s| {
            s.parse::<TransportId>()
                .map_err(|e| format!("-r '{s}': {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut opts = CtrlrOpts {
        hdgst: cli.hdgst,
        ddgst: cli.ddgst,
        num_io_queues: cli.qpairs.clamp(1, 1024) as u16,
        io_queue_size: (cli.depth + 1).min(65535) as u16,
        reconnect_delay: Duration::from_secs(cli.reconnect_delay_sec),
        fast_io_fail_timeout: (cli.fast_io_fail_timeout_sec > 0)
            .then(|| Duration::from_secs(cli.fast_io_fail_timeout_sec)),
        ctrlr_loss_timeout: u64::try_from(cli.ctrlr_loss_timeout_sec)
            .ok()
            .map(Duration::from_secs),
        io_timeout: (cli.io_timeout_sec > 0).then(|| Duration::from_secs(cli.io_timeout_sec)),
        pcie_sgl: !cli.prp_only,
        ..CtrlrOpts::default()
    };
    if let Some(h) = &cli.hostnqn {
        opts.hostnqn = h.clone();
    }

    if cli.discover {
        for t in &trids {
            let mut c = Controller::connect(t, &opts).map_err(|e| format!("{t}: {e}"))?;
            let log = discovery::get_log(&mut c).map_err(|e| format!("{t}: discovery log: {e}"))?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&log).unwrap_or_default());
            } else {
                println!(
                    "Discovery Log (genctr {}, {} records) from {t}",
                    log.genctr,
                    log.entries.len()
                );
                for (i, e) in log.entries.iter().enumerate() {
                    println!("=====Discovery Log Entry {i}======");
                    println!(
                        "trtype:  {}",
                        if e.trtype == 3 {
                            "tcp".to_string()
                        } else {
                            e.trtype.to_string()
                        }
                    );
                    println!(
                        "adrfam:  {}",
                        match e.adrfam {
                            1 => "ipv4",
                            2 => "ipv6",
                            _ => "other",
                        }
                    );
                    println!("subtype: {}", e.subtype_name());
                    println!("portid:  {}", e.portid);
                    println!("trsvcid: {}", e.trsvcid);
                    println!("subnqn:  {}", e.subnqn);
                    println!("traddr:  {}", e.traddr);
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    let mut ctrlrs = Vec::new();
    for t in &trids {
        // One queue pair per -P per namespace tested (cores share them out): ask for exactly
        // that many, counted by the controller at bring-up when no namespace is named.
        let mut topts = opts.clone();
        if t.nsid.is_none() {
            topts.io_queues_per_namespace = topts.num_io_queues;
        }
        let c = Controller::connect(t, &topts).map_err(|e| format!("{t}: {e}"))?;
        ctrlrs.push(c);
    }

    if cli.identify {
        for c in &ctrlrs {
            let i = c.info();
            if cli.json {
                #[derive(Serialize)]
                struct Id<'a> {
                    trid: String,
                    controller: &'a initiator::ctrlr::CtrlrInfo,
                    namespaces: &'a [initiator::Namespace],
                }
                let id = Id {
                    trid: c.trid().to_string(),
                    controller: i,
                    namespaces: c.namespaces(),
                };
                println!("{}", serde_json::to_string_pretty(&id).unwrap_or_default());
                continue;
            }
            println!("Controller {}", c.trid());
            println!("  cntlid:          {}", i.cntlid);
            println!("  NVMe version:    {}", i.version);
            println!("  model:           {}", i.model);
            println!("  serial:          {}", i.serial);
            println!("  firmware:        {}", i.firmware);
            println!("  subnqn:          {}", i.subnqn);
            println!("  max transfer:    {} bytes", i.max_transfer);
            println!("  in-capsule data: {} bytes", i.in_capsule_data);
            println!("  max queue size:  {}", i.max_queue_entries);
            println!("  I/O queues:      {}", i.io_queues);
            let yes = |b: bool| if b { "yes" } else { "no" };
            println!("  shadow doorbells: {}", yes(i.shadow_doorbells));
            println!("  SGLs:            {}", yes(i.sgls));
            println!("  digests:         {}", i.digests.describe());
            for n in c.namespaces() {
                println!(
                    "  Namespace {}: {} blocks of {} bytes ({} MiB)",
                    n.nsid,
                    n.blocks,
                    n.block_size,
                    n.size_bytes() >> 20
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    // One job per (controller, namespace, qpair index), spread over the cores round-robin.
    let run_id = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1) as u32)
        | 1;
    let mut prior = match &cli.verify_state {
        Some(p) => Some(state::Prior::load(p, cli.io_size)?),
        None => None,
    };
    let mut names = Vec::new();
    let mut digests = Vec::new();
    let mut per_core: Vec<Vec<Job>> = (0..cores.len()).map(|_| Vec::new()).collect();
    let mut next = 0usize;
    for (ci, c) in ctrlrs.iter_mut().enumerate() {
        let nss: Vec<_> = c
            .namespaces()
            .iter()
            .filter(|n| trids[ci].nsid.is_none_or(|want| want == n.nsid))
            .cloned()
            .collect();
        if nss.is_empty() {
            return Err(format!("{}: no active namespace to test", trids[ci]));
        }
        let needed = nss.len() * cli.qpairs as usize;
        let granted = usize::from(c.info().io_queues);
        if granted < needed {
            return Err(format!(
                "{}: the target granted {granted} I/O queues, but {} namespace(s) × -P {} \
                 need {needed}; lower -P, name one namespace (ns:N in -r), or raise the \
                 target's max_io_qpairs_per_ctrlr",
                trids[ci],
                nss.len(),
                cli.qpairs
            ));
        }
        digests.push(QueueDigests {
            trid: trids[ci].to_string(),
            qid: 0,
            digests: c.info().digests,
        });
        for ns in nss {
            if !cli.io_size.is_multiple_of(ns.block_size) {
                return Err(format!(
                    "-o {} is not a multiple of namespace {}'s block size {}",
                    cli.io_size, ns.nsid, ns.block_size
                ));
            }
            if cli.io_size > c.info().max_transfer {
                return Err(format!(
                    "-o {} exceeds the controller's maximum transfer {}",
                    cli.io_size,
                    c.info().max_transfer
                ));
            }
            let io_blocks = cli.io_size / ns.block_size;
            let bytes = cli.size.unwrap_or(u64::MAX).min(ns.size_bytes());
            let units = bytes / u64::from(cli.io_size);
            let per_q = units / u64::from(cli.qpairs);
            if per_q == 0 {
                return Err(format!(
                    "namespace {} is too small for {} queue pairs of -o {}",
                    ns.nsid, cli.qpairs, cli.io_size
                ));
            }
            let ns_index = names.len();
            names.push((trids[ci].clone(), ns.nsid));
            for p in 0..u64::from(cli.qpairs) {
                let qp = c
                    .alloc_io_qpair(Some((cli.depth + 1).min(65535) as u16))
                    .map_err(|e| format!("{}: I/O queue pair: {e}", trids[ci]))?;
                digests.push(QueueDigests {
                    trid: trids[ci].to_string(),
                    qid: qp.qid(),
                    digests: qp.digests(),
                });
                let depth = (cli.depth as usize).min(qp.depth() as usize);
                // Each queue pair gets its own slice so --verify never races two writers.
                let (lo, hi) = if cli.verify {
                    (p * per_q, (p + 1) * per_q)
                } else {
                    (0, units)
                };
                let spec = JobSpec {
                    ns_index,
                    nsid: ns.nsid,
                    block_size: ns.block_size,
                    io_blocks,
                    units_lo: lo,
                    units_hi: hi,
                    depth,
                    max_completions: cli.max_completions.unwrap_or(depth.div_ceil(2)),
                    read_pct,
                    pattern,
                    verify: cli.verify,
                    run_id,
                    seed: cli.seed ^ (ns_index as u64 * 7919 + p * 104_729 + 1),
                };
                let before = match prior.as_mut() {
                    Some(p) => p.take(ns_index, lo, hi)?,
                    None => None,
                };
                let job = Job::new(spec, qp, before).map_err(|e| {
                    format!("I/O buffers of -q {} -o {}: {e}", cli.depth, cli.io_size)
                })?;
                per_core[next % cores.len()].push(job);
                next += 1;
            }
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    // SIGINT or SIGTERM ends the run early, as -t would: in-flight I/O drains, then the
    // report (and --verify-state) is written.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    let warmup = Duration::from_secs(cli.warmup);
    let duration = Duration::from_secs(cli.time);
    // Latencies are timed in ticks: measure their rate here, not in a worker's first I/O.
    initiator::ticks::calibrate();
    let started = std::time::Instant::now();
    let mut handles = Vec::new();
    for (i, jobs) in per_core.into_iter().enumerate() {
        if jobs.is_empty() {
            continue;
        }
        let core = cores[i];
        let stop = stop.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("plexperf-{core}"))
                .spawn(move || worker::run(core, jobs, warmup, duration, stop))
                .map_err(|e| format!("spawn: {e}"))?,
        );
    }

    // The main thread owns the controllers: keep-alive, AER and reconnects happen here.
    let mut reconnects = 0u64;
    let mut was_down = vec![false; ctrlrs.len()];
    while handles.iter().any(|h| !h.is_finished()) {
        if STOP_SIGNAL.load(Ordering::Relaxed) && !stop.swap(true, Ordering::Relaxed) {
            eprintln!("plexperf: stopping early on a signal");
        }
        for (i, c) in ctrlrs.iter_mut().enumerate() {
            c.poll();
            while let Some(ev) = c.next_event() {
                match ev {
                    CtrlrEvent::State(CtrlrState::Connected) if was_down[i] => {
                        was_down[i] = false;
                        reconnects += 1;
                        eprintln!("plexperf: {} reconnected", c.trid());
                    }
                    CtrlrEvent::State(s) => {
                        was_down[i] = s != CtrlrState::Connected;
                        eprintln!("plexperf: {} is {:?}", c.trid(), s);
                    }
                    other => eprintln!("plexperf: {}: {other:?}", c.trid()),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut results: Vec<JobResult> = Vec::new();
    for h in handles {
        results.extend(h.join().map_err(|_| "worker thread panicked".to_string())?);
    }

    // A run stopped early by a signal measured for less than -t.
    let secs = started
        .elapsed()
        .saturating_sub(warmup)
        .min(duration)
        .as_secs_f64()
        .max(1e-9);
    let mut per_ns: Vec<(u64, u64, u64, u64, u64, Histogram)> = names
        .iter()
        .map(|_| (0, 0, 0, 0, 0, Histogram::new()))
        .collect();
    let mut ver = VerifyReport::default();
    let mut first_error = None;
    for r in &results {
        let e = &mut per_ns[r.ns_index];
        e.0 += r.ios;
        e.1 += r.bytes;
        e.2 += r.reads;
        e.3 += r.writes;
        e.4 += r.errors;
        e.5.merge(&r.hist);
        ver.verified_blocks += r.verified_blocks;
        ver.unwritten_blocks += r.unwritten_blocks;
        ver.mismatches += r.mismatches;
        ver.samples.extend(r.mismatch_samples.iter().cloned());
        if first_error.is_none() {
            first_error = r.first_error.clone();
        }
    }
    let mk = |name: String, trid: String, nsid: u32, v: &(u64, u64, u64, u64, u64, Histogram)| {
        NsReport {
            name,
            trid,
            nsid,
            iops: v.0 as f64 / secs,
            mib_s: v.1 as f64 / secs / (1024.0 * 1024.0),
            reads: v.2,
            writes: v.3,
            errors: v.4,
            latency_us: v.5.summary(),
        }
    };
    let mut tot = (0, 0, 0, 0, 0, Histogram::new());
    let mut nsr = Vec::new();
    for (i, v) in per_ns.iter().enumerate() {
        let (t, nsid) = &names[i];
        let name = if t.trtype == initiator::TrType::Pcie {
            format!("PCIe ({}) NSID {nsid}", t.traddr)
        } else {
            format!("{} ({}:{}) NSID {nsid}", t.subnqn, t.traddr, t.trsvcid)
        };
        nsr.push(mk(name, t.to_string(), *nsid, v));
        tot.0 += v.0;
        tot.1 += v.1;
        tot.2 += v.2;
        tot.3 += v.3;
        tot.4 += v.4;
        tot.5.merge(&v.5);
    }
    let total = mk("Total".into(), String::new(), 0, &tot);
    let failed = tot.4 > 0 || ver.mismatches > 0 || (tot.0 == 0 && cli.time > 0);
    let report = Report {
        workload: cli.workload.clone(),
        io_size: cli.io_size,
        depth: cli.depth,
        seconds: secs,
        namespaces: nsr,
        total,
        verify: cli.verify.then_some(ver),
        reconnects,
        first_error,
        digests,
    };
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_table(&report);
    }
    if let (Some(path), Some(p)) = (&cli.verify_state, &prior) {
        let jobs = results.iter_mut().filter_map(|r| {
            let (lo, hi) = r.range;
            r.units.take().map(|u| (r.ns_index, lo, hi, u))
        });
        p.save(path, jobs)?;
    }
    for c in ctrlrs {
        if let Err(e) = c.detach() {
            tracing::warn!("detach: {e}");
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

static STOP_SIGNAL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_SIGNAL.store(true, Ordering::Relaxed);
}

fn print_table(r: &Report) {
    println!(
        "plexperf: {} -o {} -q {} for {:.0} s",
        r.workload, r.io_size, r.depth, r.seconds
    );
    println!("{:=<150}", "");
    println!(
        "{:<60} {:>12} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "Device",
        "IOPS",
        "MiB/s",
        "avg(us)",
        "min(us)",
        "max(us)",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "p99.99"
    );
    for n in r.namespaces.iter().chain(std::iter::once(&r.total)) {
        let l = &n.latency_us;
        println!(
            "{:<60} {:>12.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            n.name, n.iops, n.mib_s, l.avg_us, l.min_us, l.max_us, l.p50_us, l.p90_us, l.p99_us, l.p99_9_us, l.p99_99_us
        );
    }
    println!("errors: {}  reconnects: {}", r.total.errors, r.reconnects);
    for q in &r.digests {
        println!(
            "digests: {} qid {}: {}",
            q.trid,
            q.qid,
            q.digests.describe()
        );
    }
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
    if let Some(v) = &r.verify {
        println!(
            "verify: {} blocks checked, {} never written, {} mismatches",
            v.verified_blocks, v.unwritten_blocks, v.mismatches
        );
        for s in &v.samples {
            println!("  MISMATCH {s}");
        }
    }
}
