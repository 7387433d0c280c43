//! tcp_ceiling: what the kernel alone costs for NVMe/TCP traffic over loopback, so that a
//! target's throughput per core can be stated as a fraction of what the machine allows.
//!
//! One TCP connection on 127.0.0.1: a "host" thread (pinned to `--host-core`) keeps QD commands
//! in flight against a "target" thread (pinned to `--target-core`). The PDUs have NVMe/TCP's
//! sizes and common headers, and nothing else is done with them: no NVMe command is decoded, no
//! bdev is called, no buffer is looked up. Per 4 KiB I/O:
//!
//! - read:  host sends a CapsuleCmd (72 B); target sends C2HData (24 B header + 4 KiB) with
//!   LAST_PDU|SUCCESS set (c2h_success, the default of plexd and SPDK), or, with `--read-resp`,
//!   also a 24 B CapsuleResp.
//! - write: host sends a CapsuleCmd with the data in capsule (72 B + 4 KiB); target sends a
//!   CapsuleResp (24 B: 8 B common header + 16 B completion).
//!
//! Both sides use non-blocking sockets with TCP_NODELAY and batch whatever is there: one recv
//! of up to 256 KiB, then one writev of every reply that is due, with the data sent from one
//! static buffer (no copy in user space). By default both spin, as a polling target does on its
//! own core; `--block` sleeps in poll(2) when there is nothing to do. Each side's user and
//! system CPU over the measured window is printed too.
//!
//! `--target-io` changes only how the target side reaches its socket (spin, epoll, io_uring with
//! a single-shot or a multishot recv), to see what each costs the kernel before a target is
//! built on it: `benches/reports/tcp_ceiling_io-*.md`.
//!
//! Usage: tcp_ceiling [-w read,write] [-q 1,32,128] [-o 4096] [-t 2] [--target-io spin] [--json]

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

mod uring;
mod wire;
use uring::target_uring;
use wire::*;

const RECV_BUF: usize = 256 << 10;

/// Phases the host announces to the target, so both measure the same window.
const WARMUP: u8 = 0;
const MEASURING: u8 = 1;
const DONE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "tcp_ceiling",
    about = "Loopback TCP pair exchanging NVMe/TCP-sized PDUs at a queue depth, no NVMe processing: the kernel's share, per core"
)]
struct Cli {
    /// Traffic shapes, comma-separated.
    #[arg(short = 'w', long, value_delimiter = ',', default_value = "read,write")]
    workloads: Vec<Shape>,
    /// Queue depths, comma-separated.
    #[arg(
        short = 'q',
        long = "qd",
        value_delimiter = ',',
        default_value = "1,32,128"
    )]
    qds: Vec<usize>,
    /// Data bytes per I/O.
    #[arg(short = 'o', long, default_value_t = 4096)]
    io_size: usize,
    /// Measured seconds per row.
    #[arg(short = 't', long, default_value_t = 2.0)]
    time: f64,
    /// Warm-up seconds per row, before measuring.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Core of the target side.
    #[arg(long, default_value_t = 0)]
    target_core: usize,
    /// Core of the host side.
    #[arg(long, default_value_t = 1)]
    host_core: usize,
    /// Sleep in poll(2) when there is nothing to do, instead of spinning.
    #[arg(long)]
    block: bool,
    /// Reads: a 24 B CapsuleResp after the data too (a target with c2h_success off).
    #[arg(long)]
    read_resp: bool,
    /// How the target side reaches its socket: `spin` (recv and writev on a non-blocking
    /// socket every pass), `epoll` (an epoll_wait(0) each pass first, as a target serving
    /// many connections does), `uring` (one io_uring: a recv and a writev in flight, one
    /// io_uring_enter a pass, none when nothing is due), `uring-multishot` (the same with one
    /// multishot recv into a ring of provided buffers). The host side always spins.
    #[arg(long, value_enum, default_value_t = TargetIo::Spin)]
    target_io: TargetIo,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TargetIo {
    Spin,
    Epoll,
    Uring,
    UringMultishot,
}

impl TargetIo {
    fn name(self) -> &'static str {
        match self {
            TargetIo::Spin => "spin",
            TargetIo::Epoll => "epoll",
            TargetIo::Uring => "uring",
            TargetIo::UringMultishot => "uring-multishot",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Shape {
    Read,
    Write,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Read => "read",
            Shape::Write => "write",
        }
    }
}

fn pin(core: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0) pins the
    // calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// This thread's (user, system) CPU time so far.
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: rusage is plain data, filled in by getrusage.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// Share of one core spent in user space and in the kernel between two samples.
#[derive(Clone, Copy, Default)]
struct Cpu {
    user_pct: f64,
    sys_pct: f64,
}

struct Window {
    at: Instant,
    cpu: (Duration, Duration),
}

impl Window {
    fn now() -> Window {
        Window {
            at: Instant::now(),
            cpu: thread_cpu(),
        }
    }

    fn cpu_until(&self, end: &Window) -> Cpu {
        let wall = (end.at - self.at).as_secs_f64().max(1e-9);
        Cpu {
            user_pct: (end.cpu.0 - self.cpu.0).as_secs_f64() / wall * 100.0,
            sys_pct: (end.cpu.1 - self.cpu.1).as_secs_f64() / wall * 100.0,
        }
    }
}

fn wait_readable(fd: RawFd, want_write: bool) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN | if want_write { libc::POLLOUT } else { 0 },
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 10) };
}

fn setup(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)
}

struct Job {
    core: usize,
    block: bool,
    target_io: TargetIo,
    segs: Vec<Vec<u8>>,
    phase: Arc<AtomicU8>,
}

/// The target: answers every I/O the host sends until the host closes; its CPU in the window.
fn target(listener: TcpListener, mut job: Job) -> io::Result<Cpu> {
    pin(job.core)?;
    let (stream, _) = listener.accept()?;
    setup(&stream)?;
    let mut side = TargetSide {
        out: Outbox::new(std::mem::take(&mut job.segs)),
        framer: Framer::default(),
        buf: vec![0u8; RECV_BUF],
        seen: WARMUP,
        from: None,
        cpu: Cpu::default(),
    };
    match job.target_io {
        TargetIo::Spin | TargetIo::Epoll => target_posix(stream, &job, &mut side)?,
        TargetIo::Uring | TargetIo::UringMultishot => target_uring(stream, &job, &mut side)?,
    }
    Ok(side.cpu)
}

/// What the target keeps whichever way it reaches the socket.
struct TargetSide {
    out: Outbox,
    framer: Framer,
    buf: Vec<u8>,
    seen: u8,
    from: Option<Window>,
    cpu: Cpu,
}

impl TargetSide {
    /// Takes `n` received bytes; queues the replies they complete.
    fn received(&mut self, n: usize) {
        self.out.queued += self.framer.feed(&self.buf[..n]);
    }

    /// Follows the host's phase: the CPU window opens when it measures and closes when it is done.
    fn follow(&mut self, job: &Job) {
        let phase = job.phase.load(Ordering::Relaxed);
        if phase != self.seen {
            self.seen = phase;
            match phase {
                MEASURING => self.from = Some(Window::now()),
                _ => {
                    if let Some(f) = &self.from {
                        self.cpu = f.cpu_until(&Window::now());
                    }
                }
            }
        }
    }
}

fn target_posix(mut stream: TcpStream, job: &Job, side: &mut TargetSide) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let epoll = if job.target_io == TargetIo::Epoll {
        Some(Epoll::new(fd)?)
    } else {
        None
    };
    loop {
        let mut busy = side.out.flush(fd)?;
        let readable = epoll.as_ref().is_none_or(|e| e.readable());
        if readable {
            match stream.read(&mut side.buf) {
                Ok(0) => break,
                Ok(n) => {
                    busy = true;
                    side.received(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e),
            }
        }
        side.follow(job);
        if !busy && job.block {
            wait_readable(fd, side.out.queued > 0);
        }
    }
    Ok(())
}

/// A level-triggered epoll set of one socket, asked without waiting: what a target serving many
/// connections pays each pass to learn which have news.
struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    fn new(fd: RawFd) -> io::Result<Epoll> {
        use std::os::fd::FromRawFd;
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` is a fresh descriptor owned by nothing else.
        let ep = unsafe { std::os::fd::OwnedFd::from_raw_fd(ep) };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: 0,
        };
        // SAFETY: plain epoll_ctl on descriptors we hold open; `ev` outlives the call.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll(ep))
    }

    fn readable(&self) -> bool {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for one event; timeout 0.
        unsafe { libc::epoll_wait(self.0.as_raw_fd(), &mut ev, 1, 0) > 0 }
    }
}

struct HostResult {
    ios: u64,
    secs: f64,
    cpu: Cpu,
}

/// The host: keeps `qd` I/Os in flight, measures after the warm-up, then drains and closes.
fn host(addr: SocketAddr, job: Job, qd: usize, warmup: f64, time: f64) -> io::Result<HostResult> {
    pin(job.core)?;
    let mut stream = TcpStream::connect(addr)?;
    setup(&stream)?;
    let fd = stream.as_raw_fd();
    let mut out = Outbox::new(job.segs);
    let mut framer = Framer::default();
    let mut buf = vec![0u8; RECV_BUF];
    out.queued = qd;
    let (mut issued, mut completed) = (qd as u64, 0u64);
    let measure_at = Instant::now() + Duration::from_secs_f64(warmup);
    let length = Duration::from_secs_f64(time);
    let mut from: Option<(Window, u64)> = None;
    let mut result = None;
    loop {
        let mut busy = out.flush(fd)?;
        match stream.read(&mut buf) {
            Ok(0) => return Err(io::Error::other("the target closed the connection")),
            Ok(n) => {
                busy = true;
                let done = framer.feed(&buf[..n]);
                completed += done as u64;
                if result.is_none() {
                    out.queued += done;
                    issued += done as u64;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if result.is_some() {
            if completed == issued {
                break;
            }
        } else {
            match &from {
                None if Instant::now() >= measure_at => {
                    job.phase.store(MEASURING, Ordering::Relaxed);
                    from = Some((Window::now(), completed));
                }
                Some((w, c0)) if w.at.elapsed() >= length => {
                    let end = Window::now();
                    job.phase.store(DONE, Ordering::Relaxed);
                    result = Some(HostResult {
                        ios: completed - c0,
                        secs: (end.at - w.at).as_secs_f64(),
                        cpu: w.cpu_until(&end),
                    });
                }
                _ => {}
            }
        }
        if !busy && job.block {
            wait_readable(fd, out.queued > 0);
        }
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(result.expect("measured before draining"))
}

struct Row {
    shape: Shape,
    qd: usize,
    ops_s: f64,
    avg_us: f64,
    host: Cpu,
    target: Cpu,
}

fn run_row(cli: &Cli, shape: Shape, qd: usize) -> io::Result<Row> {
    let (host_segs, target_segs) = messages(shape, cli.io_size, cli.read_resp);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let tjob = Job {
        core: cli.target_core,
        block: cli.block,
        target_io: cli.target_io,
        segs: target_segs,
        phase: phase.clone(),
    };
    let hjob = Job {
        core: cli.host_core,
        block: cli.block,
        target_io: TargetIo::Spin,
        segs: host_segs,
        phase,
    };
    let t = thread::Builder::new()
        .name("target".into())
        .spawn(move || target(listener, tjob))?;
    let (warmup, time) = (cli.warmup, cli.time);
    let h = thread::Builder::new()
        .name("host".into())
        .spawn(move || host(addr, hjob, qd, warmup, time))?;
    let hr = h
        .join()
        .map_err(|_| io::Error::other("host thread panicked"))?;
    let tr = t
        .join()
        .map_err(|_| io::Error::other("target thread panicked"))?;
    let (hr, tcpu) = (hr?, tr?);
    let ops_s = hr.ios as f64 / hr.secs;
    Ok(Row {
        shape,
        qd,
        ops_s,
        avg_us: qd as f64 / ops_s * 1e6,
        host: hr.cpu,
        target: tcpu,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.qds.contains(&0) || cli.io_size == 0 || cli.time <= 0.0 {
        eprintln!("tcp_ceiling: queue depths, --io-size and --time must be positive");
        return ExitCode::from(2);
    }
    let mode = if cli.block { "poll(2)" } else { "spin" };
    if cli.block && cli.target_io != TargetIo::Spin {
        eprintln!("tcp_ceiling: --block goes with --target-io spin only");
        return ExitCode::from(2);
    }
    if !cli.json {
        println!(
            "loopback TCP, one connection, target core {} ({}), host core {}, {} B I/O, {mode} when \
             idle, {} s per row after {} s warm-up",
            cli.target_core,
            cli.target_io.name(),
            cli.host_core,
            cli.io_size,
            cli.time,
            cli.warmup
        );
        println!(
            "{:6} {:>4} {:>12} {:>10} {:>8}  {:>15}  {:>15}",
            "shape", "qd", "ops/s", "MiB/s", "avg µs", "target usr/sys%", "host usr/sys%"
        );
    }
    let mut rows = Vec::new();
    for &shape in &cli.workloads {
        for &qd in &cli.qds {
            let row = match run_row(&cli, shape, qd) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("tcp_ceiling: {} qd{qd}: {e}", shape.name());
                    return ExitCode::FAILURE;
                }
            };
            if !cli.json {
                println!(
                    "{:6} {:>4} {:>12.0} {:>10.1} {:>8.2}  {:>7.0}/{:<7.0}  {:>7.0}/{:<7.0}",
                    row.shape.name(),
                    row.qd,
                    row.ops_s,
                    row.ops_s * cli.io_size as f64 / 1048576.0,
                    row.avg_us,
                    row.target.user_pct,
                    row.target.sys_pct,
                    row.host.user_pct,
                    row.host.sys_pct
                );
            }
            rows.push(row);
        }
    }
    if cli.json {
        let cpu = |c: Cpu| {
            format!(
                "{{\"user_pct\": {:.1}, \"sys_pct\": {:.1}}}",
                c.user_pct, c.sys_pct
            )
        };
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"workload\": \"{}\", \"qd\": {}, \"io_size\": {}, \"ops_s\": {:.1}, \
                     \"mib_s\": {:.2}, \"avg_us\": {:.3}, \"target_cpu\": {}, \"host_cpu\": {}}}",
                    r.shape.name(),
                    r.qd,
                    cli.io_size,
                    r.ops_s,
                    r.ops_s * cli.io_size as f64 / 1048576.0,
                    r.avg_us,
                    cpu(r.target),
                    cpu(r.host)
                )
            })
            .collect();
        println!(
            "{{\"mode\": \"{mode}\", \"target_io\": \"{}\", \"read_resp\": {}, \"target_core\": {}, \
             \"host_core\": {}, \"time_s\": {}, \"rows\": [{}]}}",
            cli.target_io.name(),
            cli.read_resp,
            cli.target_core,
            cli.host_core,
            cli.time,
            items.join(", ")
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each way of reaching the socket answers every I/O, reads and writes: the host only
    /// finishes a row once every command it issued is answered, and it fails if the target
    /// closes early.
    #[test]
    fn every_target_io_answers_every_io() {
        for io in ["spin", "epoll", "uring", "uring-multishot"] {
            let cli = Cli::parse_from([
                "tcp_ceiling",
                "-t",
                "0.2",
                "--warmup",
                "0.05",
                "--target-io",
                io,
            ]);
            for shape in [Shape::Read, Shape::Write] {
                let row = run_row(&cli, shape, 8).unwrap_or_else(|e| panic!("{io}: {e}"));
                assert!(row.ops_s > 0.0, "{io} {}: no I/O answered", shape.name());
            }
        }
    }

    #[test]
    fn framer_counts_ios_across_any_split() {
        let (cmd, reply) = messages(Shape::Read, 4096, false);
        let one: Vec<u8> = reply.concat();
        let stream: Vec<u8> = one.repeat(3);
        for cut in [1, 7, 8, 9, 100, 4119, 4120, 4121, 10_000] {
            let mut f = Framer::default();
            let n = f.feed(&stream[..cut]) + f.feed(&stream[cut..]);
            assert_eq!(n, 3, "cut at {cut}");
        }
        let mut f = Framer::default();
        assert_eq!(f.feed(&cmd.concat().repeat(5)), 5);
        let (_, reply) = messages(Shape::Read, 4096, true);
        let mut f = Framer::default();
        assert_eq!(f.feed(&reply.concat().repeat(4)), 4);
        let (cmd, reply) = messages(Shape::Write, 4096, false);
        assert_eq!(cmd.concat().len(), 72 + 4096);
        assert_eq!(reply.concat().len(), 24);
    }
}
