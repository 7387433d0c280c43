//! plexd: the plexstor node daemon.

use anyhow::Context;
use clap::Parser;
use plexd::app::App;
use plexd::reactor::{parse_core_mask, ReactorConfig};
use plexd::rpc::RpcServer;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "plexd",
    version,
    about = "plexstor node daemon: NVMe volumes over NVMe-oF",
    after_help = "Exit status: 0 after SIGTERM or SIGINT; 1 when plexd cannot start (bad \
arguments, a config it refuses, a socket in use); 70 when plexd hit a bug (a panic on any \
thread): it prints the thread, the reactor's poller, the panic message and its location, then \
exits at once rather than run on with a dead reactor. Run it under a supervisor that restarts \
it (systemd Restart=on-failure with RestartPreventExitStatus=1, or a Kubernetes pod); hosts \
reconnect to the restarted target."
)]
struct Args {
    /// Cores to run reactors on: a hex mask (0x3) or a list ([0,1], 0-1).
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    cpumask: String,
    /// JSON-RPC socket path.
    #[arg(
        short = 'r',
        long = "rpc-socket",
        default_value = "/var/tmp/plexd.sock"
    )]
    rpc_socket: PathBuf,
    /// Configuration to load at start (what `save_config` wrote).
    #[arg(short = 'c', long = "config", alias = "json")]
    config: Option<PathBuf>,
    /// Busy-poll this many microseconds after the last work before sleeping; 0 = always poll.
    #[arg(long = "idle-poll-us", default_value_t = 1000)]
    idle_poll_us: u64,
    /// Do not pin reactors to their cores (for shared test machines).
    #[arg(long = "no-pin")]
    no_pin: bool,
    /// Upper bound for DMA memory in MiB (0 = no bound).
    #[arg(short = 's', long = "mem-size", default_value_t = 0)]
    mem_size: usize,
    /// Log filter (tracing's env-filter syntax); RUST_LOG overrides it.
    #[arg(short = 'L', long = "log", default_value = "info")]
    log: String,
}

fn main() {
    // First: a panic on any thread from here on ends plexd with status 70 (see plexd::fatal).
    plexd::fatal::install_process_wide();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    // Colour only on a terminal: a log file or journal gets plain text to read and grep.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    if let Err(e) = run(args) {
        eprintln!("plexd: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cores = parse_core_mask(&args.cpumask)?;
    dma::set_memory_limit(args.mem_size << 20);
    let config = ReactorConfig {
        cores: cores.clone(),
        idle_poll_us: args.idle_poll_us,
        pin: !args.no_pin,
    };
    let saved = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            Some(
                serde_json::from_str::<serde_json::Value>(&text)
                    .with_context(|| format!("config {} is not valid JSON", path.display()))?,
            )
        }
        None => None,
    };
    let app = App::start(config).context("cannot start reactors")?;
    // The control plane: a small runtime whose threads float outside the reactors' cores.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("plexd-ctl")
        .enable_all()
        .build()
        .context("cannot start the control-plane runtime")?;
    let result = rt.block_on(async {
        if let (Some(saved), Some(path)) = (&saved, &args.config) {
            app.load_config(saved)
                .await
                .map_err(|e| anyhow::anyhow!("config {}: {}", path.display(), e))?;
            tracing::info!("loaded config {}", path.display());
        }
        let server = RpcServer::bind(&args.rpc_socket)
            .with_context(|| format!("cannot serve JSON-RPC on {}", args.rpc_socket.display()))?;
        tracing::info!(
            "plexd {} ready: {} reactor(s) on cores {:?}, idle poll {} us, JSON-RPC on {}",
            env!("CARGO_PKG_VERSION"),
            cores.len(),
            cores,
            args.idle_poll_us,
            args.rpc_socket.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = server.run(app.clone()) => {}
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        drop(server);
        anyhow::Ok(())
    });
    app.reactors.stop();
    // Controllers last: with the reactors gone no I/O is in flight to them.
    app.nvme.shutdown_all(std::time::Duration::from_secs(10));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}
