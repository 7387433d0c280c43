//! bdevperf: I/O straight into plexd's bdevs, inside one process, no network.
//!
//! Our counterpart of SPDK's `bdevperf`, with its options (`-q -o -w -t -c -m`, and `-M -T -f
//! -s`) and its result table, so that the cost of a bdev module alone can be measured and
//! compared with SPDK's on the same JSON config file. The config is what plexd loads at start
//! (`plexd -c`), which is SPDK's format too; it is replayed through plexd's own RPC methods.
//!
//! One job per bdev (every bdev nothing else claimed, as SPDK picks its leaves, or those named
//! by `-T`), spread over the reactors of `-m` in turn. A job is a poller on its reactor: it
//! opens an I/O channel there, keeps `-q` I/Os in flight with buffers from the DMA pool, and
//! times each I/O with the CPU's cycle counter, as SPDK does, so that the harness adds as
//! little as SPDK's own does.

use anyhow::{anyhow, bail, Context};
use clap::Parser;
// I/O is timed in ticks (the CPU's cycle counter where the kernel trusts it), as SPDK's
// bdevperf times it (`spdk_get_ticks`).
use initiator::ticks;
use plexd::app::App;
use plexd::bdev::{BdevEntry, BdevIo, IoBufs, IoChannel, IoCompletion, IoType};
use plexd::reactor::{self, core_mask_string, parse_core_mask, PollStatus, Poller, ReactorConfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "bdevperf",
    version,
    about = "I/O straight into plexd's bdevs, no network: SPDK's bdevperf for plexd",
    after_help = "Example: bdevperf -c malloc.json -q 32 -o 4096 -w randread -t 10 -m 0x1\n\n\
The config is plexd's (and SPDK's) JSON format, e.g. {\"subsystems\": [{\"subsystem\": \
\"bdev\", \"config\": [{\"method\": \"bdev_malloc_create\", \"params\": {\"name\": \"Malloc0\", \
\"num_blocks\": 131072, \"block_size\": 512}}]}]}; the same file runs SPDK's bdevperf \
(--json). One job per bdev that nothing else claimed (or per -T), on the cores of -m in turn.\n\n\
Exit status: 0 when every job ran without a failed I/O; 1 when an I/O failed, a job could not \
start, or the config was refused; 2 for bad arguments; 70 on a bug (a panic)."
)]
struct Args {
    /// I/Os each job keeps in flight.
    #[arg(short = 'q', long = "queue-depth", value_name = "DEPTH",
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    depth: u32,
    /// I/O size in bytes; k and m suffixes are KiB and MiB (4096, 4k, 128k).
    #[arg(short = 'o', long = "io-size", value_name = "SIZE", value_parser = parse_size)]
    io_size: u64,
    /// Workload: read, write, randread, randwrite, rw, randrw (rw and randrw need -M).
    #[arg(short = 'w', long = "workload", value_name = "TYPE", value_parser = parse_workload)]
    workload: Workload,
    /// Run time in seconds.
    #[arg(short = 't', long = "time", value_name = "SECONDS", value_parser = parse_seconds)]
    time: f64,
    /// JSON config that creates the bdevs (what plexd -c loads; SPDK's format).
    #[arg(short = 'c', long = "config", alias = "json", value_name = "FILE")]
    config: PathBuf,
    /// Cores to run reactors on: a hex mask (0x3) or a list ([0,1], 0-1).
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    cpumask: String,
    /// Read percentage for rw and randrw.
    #[arg(short = 'M', long = "rwmixread", value_name = "PERCENT",
          value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmixread: Option<u32>,
    /// Run only on this bdev (repeatable); default: every bdev nothing else claimed.
    #[arg(short = 'T', long = "bdev", value_name = "BDEV")]
    bdevs: Vec<String>,
    /// Keep going after an I/O fails (by default a job stops at its first failure).
    #[arg(short = 'f', long = "continue-on-error")]
    continue_on_error: bool,
    /// Upper bound for DMA memory in MiB (0 = no bound).
    #[arg(short = 's', long = "mem-size", default_value_t = 0)]
    mem_size: usize,
    /// Do not pin reactors to their cores (for shared test machines).
    #[arg(long = "no-pin")]
    no_pin: bool,
    /// Log filter (tracing's env-filter syntax); RUST_LOG overrides it.
    #[arg(short = 'L', long = "log", default_value = "warn")]
    log: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Read,
    Write,
    RandRead,
    RandWrite,
    Rw,
    RandRw,
}

impl Workload {
    const ALL: [(&'static str, Workload); 6] = [
        ("read", Workload::Read),
        ("write", Workload::Write),
        ("randread", Workload::RandRead),
        ("randwrite", Workload::RandWrite),
        ("rw", Workload::Rw),
        ("randrw", Workload::RandRw),
    ];

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, w)| *w == self)
            .map(|(n, _)| *n)
            .expect("every workload has a name")
    }

    fn random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }

    fn mixed(self) -> bool {
        matches!(self, Workload::Rw | Workload::RandRw)
    }
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    Workload::ALL
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, w)| *w)
        .ok_or_else(|| {
            let spdk_only = ["verify", "reset", "unmap", "flush", "write_zeroes"];
            let known = "read, write, randread, randwrite, rw, randrw";
            if spdk_only.contains(&s) {
                format!("workload {s:?} is SPDK bdevperf's, not ours yet; ours: {known}")
            } else {
                format!("unknown workload {s:?}; one of {known}")
            }
        })
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size in bytes (4096, 4k, 128k, 1m)"))?;
    match n.checked_shl(shift).filter(|v| *v >> shift == n) {
        Some(0) => Err("the I/O size must be more than 0 bytes".into()),
        Some(v) => Ok(v),
        None => Err(format!("{s:?} is too large")),
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t > 0.0 && t <= 1e6 => Ok(t),
        _ => Err(format!("{s:?} is not a run time in seconds (more than 0)")),
    }
}

/// What every job runs, the same for all.
#[derive(Clone, Debug)]
struct Spec {
    depth: u32,
    io_size: u64,
    workload: Workload,
    /// Percentage of reads.
    read_pct: u32,
    duration: Duration,
    continue_on_error: bool,
}

/// Set by SIGINT: every job stops submitting, drains and reports, as SPDK's does.
static STOP: AtomicBool = AtomicBool::new(false);

fn main() {
    // A panic on any thread ends the process with status 70, as in plexd (see plexd::fatal).
    plexd::fatal::install_process_wide();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("bdevperf: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the jobs and prints the table; `Ok(false)` when some job failed.
fn run(args: Args) -> anyhow::Result<bool> {
    let cores = parse_core_mask(&args.cpumask)?;
    let read_pct = match (args.workload, args.rwmixread) {
        (Workload::Read | Workload::RandRead, _) => 100,
        (Workload::Write | Workload::RandWrite, _) => 0,
        (_, Some(m)) => m,
        (w, None) => bail!("workload {} needs -M (the read percentage)", w.name()),
    };
    if args.io_size > dma::MAX_BUF_SIZE as u64 {
        bail!(
            "I/O size {} is larger than the largest DMA buffer ({} bytes)",
            args.io_size,
            dma::MAX_BUF_SIZE
        );
    }
    let path = &args.config;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("config {} is not valid JSON", path.display()))?;
    without_nvmf(&mut config, path);
    dma::set_memory_limit(args.mem_size << 20);

    let app = App::start(ReactorConfig {
        cores,
        idle_poll_us: 1000,
        pin: !args.no_pin,
    })
    .context("cannot start reactors")?;
    // The control plane, as in plexd: it replays the config, and stays up for the run for
    // modules whose devices need it (bdev_nvme).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bdevperf-ctl")
        .enable_all()
        .build()
        .context("cannot start the control-plane runtime")?;
    let result = (|| {
        rt.block_on(app.load_config(&config))
            .map_err(|e| anyhow!("config {}: {}", path.display(), e.message))?;
        let bdevs = pick_bdevs(&app, &args)?;
        let spec = Spec {
            depth: args.depth,
            io_size: args.io_size,
            workload: args.workload,
            read_pct,
            duration: Duration::from_secs_f64(args.time),
            continue_on_error: args.continue_on_error,
        };
        for b in &bdevs {
            check_bdev(b, &spec)?;
        }
        // From here on, Ctrl-C ends the run early with its results rather than the process.
        rt.spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                STOP.store(true, Ordering::Relaxed);
            }
        });
        println!("Running I/O for {} seconds...", args.time);
        let results = run_jobs(&app, &bdevs, &spec);
        print_table(&results, &spec);
        let mut ok = true;
        for r in &results {
            if let Some(e) = &r.error {
                eprintln!("bdevperf: job {}: {e}", r.name);
                ok = false;
            }
        }
        Ok(ok)
    })();
    app.reactors.stop();
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Drops the config's `nvmf` section, saying so, as SPDK's bdevperf skips it (no NVMe-oF
/// target is linked into it): the same file then gives both programs the same jobs, where
/// namespaces would otherwise claim the bdevs here, and no listener opens a port.
fn without_nvmf(config: &mut serde_json::Value, path: &std::path::Path) {
    if let Some(subs) = config
        .get_mut("subsystems")
        .and_then(serde_json::Value::as_array_mut)
    {
        let before = subs.len();
        subs.retain(|s| s.get("subsystem").and_then(serde_json::Value::as_str) != Some("nvmf"));
        if subs.len() != before {
            eprintln!(
                "bdevperf: skipping the nvmf section of {}: bdevperf has no NVMe-oF target \
                 (SPDK's skips it too)",
                path.display()
            );
        }
    }
}

/// The bdevs to run on: those `-T` names, or every bdev nothing else claimed (the bottom of a
/// mirror is not run on by itself), in creation order.
fn pick_bdevs(app: &App, args: &Args) -> anyhow::Result<Vec<Arc<BdevEntry>>> {
    let path = args.config.display();
    if !args.bdevs.is_empty() {
        return args
            .bdevs
            .iter()
            .map(|n| {
                app.bdevs
                    .get(n)
                    .map_err(|_| anyhow!("-T {n}: config {path} creates no bdev of that name"))
            })
            .collect();
    }
    let all = app.bdevs.list();
    let free: Vec<_> = all
        .iter()
        .filter(|e| e.claimed_by().is_none())
        .cloned()
        .collect();
    if free.is_empty() {
        if all.is_empty() {
            bail!("config {path} creates no bdev to run I/O on");
        }
        bail!("every bdev config {path} creates is claimed by another; name one with -T");
    }
    Ok(free)
}

fn check_bdev(entry: &BdevEntry, spec: &Spec) -> anyhow::Result<()> {
    let info = entry.info();
    let bs = info.block_size as u64;
    let name = entry.name();
    if !spec.io_size.is_multiple_of(bs) {
        bail!(
            "I/O size {} is not a multiple of {name}'s block size {bs}",
            spec.io_size
        );
    }
    if spec.io_size > info.size_bytes() {
        bail!(
            "I/O size {} is larger than {name} ({} bytes)",
            spec.io_size,
            info.size_bytes()
        );
    }
    if let (Some(owner), true) = (entry.claimed_by(), spec.read_pct < 100) {
        bail!("{name} is claimed by {owner}: writes into it would go under its owner");
    }
    for (t, wanted) in [
        (IoType::Read, spec.read_pct > 0),
        (IoType::Write, spec.read_pct < 100),
    ] {
        if wanted && !info.io_types.contains(t) {
            bail!("{name} does not support {t:?} I/O");
        }
    }
    Ok(())
}

/// What a job measured; latencies in [`initiator::ticks`].
#[derive(Debug)]
struct JobResult {
    index: usize,
    name: String,
    core: usize,
    runtime: Duration,
    ios: u64,
    failed: u64,
    total_ticks: u64,
    min_ticks: u64,
    max_ticks: u64,
    /// Why the job stopped early or never started.
    error: Option<String>,
}

impl JobResult {
    fn failed_to_start(index: usize, name: &str, core: usize, why: String) -> JobResult {
        JobResult {
            index,
            name: name.to_string(),
            core,
            runtime: Duration::ZERO,
            ios: 0,
            failed: 0,
            total_ticks: 0,
            min_ticks: 0,
            max_ticks: 0,
            error: Some(why),
        }
    }

    fn ticks_us(&self, t: u64) -> f64 {
        ticks::to_ns(t) as f64 / 1e3
    }
}

/// Starts one job per bdev, on the reactors in turn, and waits for every one.
fn run_jobs(app: &App, bdevs: &[Arc<BdevEntry>], spec: &Spec) -> Vec<JobResult> {
    let handles = app.reactors.handles();
    let (tx, rx) = mpsc::channel();
    for (i, entry) in bdevs.iter().enumerate() {
        let h = &handles[i % handles.len()];
        let (entry, spec, tx) = (entry.clone(), spec.clone(), tx.clone());
        h.send(move |ctx| match Job::new(i, entry, spec, tx.clone()) {
            Ok(job) => {
                ctx.add_poller(Box::new(job));
            }
            Err((name, why)) => {
                let _ = tx.send(JobResult::failed_to_start(i, &name, ctx.core(), why));
            }
        });
    }
    drop(tx);
    // A device that never completes an I/O would keep its job draining for ever: give up on
    // it well after the run's end.
    let deadline = Instant::now() + spec.duration + Duration::from_secs(30);
    let mut results = Vec::new();
    while results.len() < bdevs.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => results.push(r),
            Err(_) => break,
        }
    }
    for (i, entry) in bdevs.iter().enumerate() {
        if !results.iter().any(|r| r.index == i) {
            let core = handles[i % handles.len()].core();
            let why = "did not finish 30 s after the run's end: I/O still in flight".to_string();
            results.push(JobResult::failed_to_start(i, entry.name(), core, why));
        }
    }
    results.sort_by_key(|r| r.index);
    results
}

/// One queue slot: its buffers while it is free, and when its I/O went out.
struct Slot {
    bufs: Option<IoBufs>,
    submitted: u64,
    /// The I/O in flight from this slot, to check that its completion names it.
    io_type: IoType,
    offset_blocks: u64,
}

impl Slot {
    /// Why completion `c` is not the I/O this slot sent (of `io_blocks` blocks), if it is not.
    /// A module must hand back the I/O it was given: a mismatch is a module's bug, counted as
    /// a failure.
    fn mismatch(&self, c: &IoCompletion, io_blocks: u64) -> Option<String> {
        let same = c.io_type == self.io_type
            && c.offset_blocks == self.offset_blocks
            && c.num_blocks == io_blocks;
        (!same).then(|| {
            format!(
                "a completion for {:?} of {io_blocks} blocks at block {} came back as {:?} of {} \
                 blocks at block {}",
                self.io_type, self.offset_blocks, c.io_type, c.num_blocks, c.offset_blocks
            )
        })
    }
}

/// One job: a poller keeping `depth` I/Os in flight on one bdev.
struct Job {
    index: usize,
    poller_name: String,
    ch: IoChannel,
    spec: Spec,
    io_blocks: u64,
    /// I/Os of `io_blocks` that fit in the bdev.
    span: u64,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Completions of one poll, kept for its allocation.
    completed: Vec<IoCompletion>,
    rng: u64,
    next_seq: u64,
    /// When the first poll ran: by the wall clock, and on the reactor's loop clock (ns).
    started: Option<(Instant, u64)>,
    stopping: bool,
    ios: u64,
    failed: u64,
    total_ticks: u64,
    min_ticks: u64,
    max_ticks: u64,
    first_error: Option<String>,
    done: mpsc::Sender<JobResult>,
}

impl Job {
    /// Opens the channel and takes the buffers, on the job's reactor (the pool's per-thread
    /// cache is that reactor's).
    fn new(
        index: usize,
        entry: Arc<BdevEntry>,
        spec: Spec,
        done: mpsc::Sender<JobResult>,
    ) -> Result<Job, (String, String)> {
        let name = entry.name().to_string();
        let fail = |what: &str, e: &dyn std::fmt::Display| (name.clone(), format!("{what}: {e}"));
        let ch = entry
            .open_channel()
            .map_err(|e| fail("cannot open an I/O channel", &e))?;
        let mut slots = Vec::with_capacity(spec.depth as usize);
        for _ in 0..spec.depth {
            let buf = dma::DmaBuf::zeroed(spec.io_size as usize)
                .map_err(|e| fail("cannot allocate I/O buffers", &e))?;
            slots.push(Slot {
                bufs: Some(smallvec::smallvec![buf.into()]),
                submitted: 0,
                io_type: IoType::Read,
                offset_blocks: 0,
            });
        }
        let bs = entry.info().block_size as u64;
        let io_blocks = spec.io_size / bs;
        let span = entry.info().num_blocks() / io_blocks;
        Ok(Job {
            index,
            poller_name: format!("bdevperf_{name}"),
            ch,
            io_blocks,
            span,
            free: (0..slots.len()).rev().collect(),
            completed: Vec::with_capacity(spec.depth as usize),
            slots,
            rng: (0x9e37_79b9_7f4a_7c15 ^ ticks::now() ^ ((index as u64) << 32)) | 1,
            next_seq: 0,
            started: None,
            stopping: false,
            ios: 0,
            failed: 0,
            total_ticks: 0,
            min_ticks: u64::MAX,
            max_ticks: 0,
            first_error: None,
            done,
            spec,
        })
    }

    /// xorshift64, as SPDK's `spdk_rand_xorshift64`.
    fn rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn next_io(&mut self, slot: usize) -> BdevIo {
        let at = if self.spec.workload.random() {
            self.rand() % self.span
        } else {
            let at = self.next_seq;
            self.next_seq = (at + 1) % self.span;
            at
        };
        let read = match self.spec.read_pct {
            100 => true,
            0 => false,
            pct => self.rand() % 100 < pct as u64,
        };
        let io_type = if read { IoType::Read } else { IoType::Write };
        let bufs = self.slots[slot]
            .bufs
            .take()
            .expect("a free slot has its buffers");
        BdevIo::new(
            io_type,
            at * self.io_blocks,
            self.io_blocks,
            bufs,
            slot as u64,
        )
    }

    /// Counts a failed I/O; the first says why, and stops the job unless told to go on.
    fn fail(&mut self, why: String) {
        self.failed += 1;
        self.first_error.get_or_insert(why);
        if !self.spec.continue_on_error {
            self.stopping = true;
        }
    }

    /// Sends `slot`'s next I/O, stamped `now`; false when the device's queue is full (the slot
    /// keeps its buffers and waits).
    fn submit(&mut self, slot: usize, now: u64) -> bool {
        let io = self.next_io(slot);
        let s = &mut self.slots[slot];
        (s.submitted, s.io_type, s.offset_blocks) = (now, io.io_type, io.offset_blocks);
        match self.ch.submit(io) {
            Ok(()) => true,
            Err(io) => {
                self.slots[slot].bufs = Some(io.bufs);
                false
            }
        }
    }

    fn finish(&mut self, core: usize) {
        let (t0, _) = self.started.expect("a finishing job has started");
        let runtime = t0.elapsed();
        let error = self.first_error.take().map(|e| {
            if self.failed > 1 {
                format!("{e} ({} I/Os failed)", self.failed)
            } else {
                e
            }
        });
        let _ = self.done.send(JobResult {
            index: self.index,
            name: self.ch.entry().name().to_string(),
            core,
            runtime,
            ios: self.ios,
            failed: self.failed,
            total_ticks: self.total_ticks,
            min_ticks: if self.ios == 0 { 0 } else { self.min_ticks },
            max_ticks: self.max_ticks,
            error,
        });
    }
}

impl Poller for Job {
    fn name(&self) -> &str {
        &self.poller_name
    }

    fn poll(&mut self, ctx: &mut reactor::ReactorCtx) -> PollStatus {
        let now = reactor::now_ns();
        let (_, start_ns) = *self.started.get_or_insert_with(|| (Instant::now(), now));
        if !self.stopping
            && (now.saturating_sub(start_ns) >= self.spec.duration.as_nanos() as u64
                || STOP.load(Ordering::Relaxed))
        {
            self.stopping = true;
        }
        // Each completion is taken in turn and its slot goes out again at once, with one
        // reading of the clock for both: SPDK's bdevperf resubmits from its completion
        // callback, so an I/O's latency there runs until the application handles it, behind
        // the completions handled before it. Timing a whole batch at delivery would count
        // less than SPDK counts for the same run.
        let mut completed = std::mem::take(&mut self.completed);
        self.ch.poll(&mut |c| completed.push(c));
        for c in completed.drain(..) {
            let now = ticks::now();
            let slot = c.tag as usize;
            // A slot still holding its buffers has no I/O out: such a tag is a module's bug.
            let Some(s) = self.slots.get(slot).filter(|s| s.bufs.is_none()) else {
                self.fail(format!(
                    "a {:?} completion at block {} came back with tag {}, which no I/O in flight has",
                    c.io_type, c.offset_blocks, c.tag
                ));
                continue;
            };
            let lat = now.wrapping_sub(s.submitted);
            let mismatch = s.mismatch(&c, self.io_blocks);
            if c.status.is_ok() && mismatch.is_none() {
                self.ios += 1;
                self.total_ticks += lat;
                self.min_ticks = self.min_ticks.min(lat);
                self.max_ticks = self.max_ticks.max(lat);
            } else {
                self.fail(mismatch.unwrap_or_else(|| {
                    format!(
                        "{:?} failed: {:?} at block {}",
                        c.io_type, c.status, c.offset_blocks
                    )
                }));
            }
            self.slots[slot].bufs = Some(c.bufs);
            if self.stopping || !self.submit(slot, now) {
                self.free.push(slot);
            }
        }
        self.completed = completed;
        if !self.stopping {
            // The first fill, and slots a full device queue handed back.
            while let Some(slot) = self.free.pop() {
                if !self.submit(slot, ticks::now()) {
                    self.free.push(slot);
                    break;
                }
            }
        } else if self.ch.in_flight() == 0 {
            self.finish(ctx.core());
            return PollStatus::Done;
        }
        // Never idle while running: the reactor must not sleep under a benchmark (SPDK's
        // never does), whatever the module's completions wake it by.
        PollStatus::Busy
    }
}

fn print_table(results: &[JobResult], spec: &Spec) {
    println!();
    println!("{:>107}", "Latency(us)");
    println!(
        " Device Information          : runtime(s)       IOPS      MiB/s     Fail/s     TO/s    \
         Average        min        max"
    );
    let mib = |iops: f64| iops * spec.io_size as f64 / (1u64 << 20) as f64;
    let (mut iops_sum, mut fail_sum, mut lat_sum_us, mut ios_sum) = (0.0, 0.0, 0.0, 0u64);
    let (mut min_us, mut max_us) = (f64::INFINITY, 0f64);
    for r in results {
        let mix = if spec.workload.mixed() {
            format!(", percentage: {}", spec.read_pct)
        } else {
            String::new()
        };
        println!(
            "Job: {} (Core Mask {}, workload: {}{mix}, depth: {}, IO size: {})",
            r.name,
            core_mask_string(&[r.core]),
            spec.workload.name(),
            spec.depth,
            spec.io_size
        );
        let secs = r.runtime.as_secs_f64();
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let (iops, fails) = (per_sec(r.ios), per_sec(r.failed));
        let avg = if r.ios > 0 {
            r.ticks_us(r.total_ticks) / r.ios as f64
        } else {
            0.0
        };
        let (min, max) = (r.ticks_us(r.min_ticks), r.ticks_us(r.max_ticks));
        println!(
            "\t {:<20}: {secs:>10.2} {iops:>10.2} {:>10.2} {fails:>10.2} {:>8.2} {avg:>10.2} \
             {min:>10.2} {max:>10.2}",
            r.name,
            mib(iops),
            0.0
        );
        iops_sum += iops;
        fail_sum += fails;
        lat_sum_us += r.ticks_us(r.total_ticks);
        ios_sum += r.ios;
        if r.ios > 0 {
            min_us = min_us.min(min);
            max_us = max_us.max(max);
        }
    }
    let avg = if ios_sum > 0 {
        lat_sum_us / ios_sum as f64
    } else {
        0.0
    };
    if !min_us.is_finite() {
        min_us = 0.0;
    }
    println!();
    println!(" {}", "=".repeat(115));
    println!();
    println!(
        " {:<28}: {:>10} {iops_sum:>10.2} {:>10.2} {fail_sum:>10.2} {:>8.2} {avg:>10.2} \
         {min_us:>10.2} {max_us:>10.2}",
        "Total",
        "",
        mib(iops_sum),
        0.0
    );
}
