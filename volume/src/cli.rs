//! `plexctl volume …`: the arguments and what each command prints. Steps go to stderr as
//! they happen; results (tables, JSON) to stdout.

use crate::{size, table, Cluster, CreateOpts, Error};
use clap::{Args, Subcommand};
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct VolumeArgs {
    /// The nodes file (JSON; see the README). Volumes are recorded in NAME.state.json beside it.
    #[arg(
        short = 'f',
        long = "nodes-file",
        default_value = "/etc/plexstor/nodes.json"
    )]
    pub nodes_file: PathBuf,
    #[command(subcommand)]
    pub cmd: VolumeCmd,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Make a volume mirrored over 1-3 nodes and export it from the first (its owner).
    Create {
        name: String,
        /// Usable size, e.g. 10G (binary units).
        #[arg(long)]
        size: String,
        /// How many plexes (1-3); defaults to the number of --nodes.
        #[arg(long = "mirror-count")]
        mirror_count: Option<usize>,
        /// Nodes for the plexes, owner first, e.g. n2,n3; default: the least used.
        #[arg(long, value_delimiter = ',')]
        nodes: Option<Vec<String>>,
        /// The mirror's region (one bitmap bit), e.g. 1M.
        #[arg(long = "region-size")]
        region_size: Option<String>,
    },
    /// One line per volume.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A volume's plexes as its owner sees them.
    Describe {
        name: String,
        /// Refresh every second until no resync runs (or Ctrl-C).
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Move a volume to another node holding one of its plexes (failover).
    Attach {
        name: String,
        #[arg(long)]
        node: String,
    },
    /// Grow a volume in use: every plex, then the mirror; connected hosts see the new size.
    Resize {
        name: String,
        /// The new usable size, e.g. 20G (binary units); volumes only grow.
        #[arg(long)]
        size: String,
    },
    /// Take a point-in-time snapshot of a volume in use (every plex in sync, at one point).
    Snapshot { name: String, snapshot: String },
    /// Make a new volume from a snapshot: thin clones of its plexes, mirrored at once.
    Clone {
        name: String,
        snapshot: String,
        /// The new volume's name.
        new: String,
    },
    /// Bring back the plexes whose nodes returned; each resyncs only what it missed.
    Rejoin { name: String },
    /// Take a volume down on every node and delete its plexes.
    Delete {
        name: String,
        /// Forget the volume even if some node could not be cleaned.
        #[arg(long)]
        force: bool,
    },
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Runs one volume command; `timeout` bounds each RPC.
pub fn run(args: VolumeArgs, timeout: Duration) -> Result<(), Error> {
    // Check what needs no node first, so a typo never reaches one.
    if let VolumeCmd::Create {
        name,
        size: s,
        region_size,
        ..
    } = &args.cmd
    {
        crate::check_volume_name(name)?;
        size::parse_size(s).map_err(Error::Invalid)?;
        if let Some(r) = region_size {
            size::check_region(size::parse_size(r).map_err(Error::Invalid)?)
                .map_err(Error::Invalid)?;
        }
    }
    let mut c = Cluster::open(&args.nodes_file)?;
    c.timeout = timeout;
    c.progress = Box::new(|m| eprintln!("{m}"));
    match args.cmd {
        VolumeCmd::Create {
            name,
            size: s,
            mirror_count,
            nodes,
            region_size,
        } => {
            let mirror_count = match (mirror_count, &nodes) {
                (Some(n), _) => n,
                (None, Some(list)) => list.len(),
                (None, None) => {
                    return Err(Error::Invalid(
                        "give --mirror-count (or --nodes to choose them)".into(),
                    ))
                }
            };
            let o = CreateOpts {
                name,
                size: size::parse_size(&s).map_err(Error::Invalid)?,
                mirror_count,
                nodes,
                region_size: region_size
                    .map(|r| size::parse_size(&r))
                    .transpose()
                    .map_err(Error::Invalid)?,
            };
            let rec = c.create(&o)?;
            println!("{}", rec.nqn);
        }
        VolumeCmd::List { json } => {
            let rows = c.list()?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        json!({"name": r.name, "size": r.size, "owner": r.owner,
                               "plexes": r.plexes, "state": r.state})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
            } else {
                let mut t = table::Table::new(&["NAME", "SIZE", "OWNER", "PLEXES", "STATE"]);
                for r in rows {
                    t.rows.push(vec![
                        r.name,
                        size::human(r.size),
                        r.owner,
                        r.plexes.join(","),
                        r.state,
                    ]);
                }
                print!("{}", t.render());
            }
        }
        VolumeCmd::Describe { name, watch, json } => describe(&mut c, &name, watch, json)?,
        VolumeCmd::Attach { name, node } => {
            let r = c.attach(&name, &node)?;
            if !r.warnings.is_empty() {
                eprintln!(
                    "moved with {} warning(s): the plexes skipped rejoin once their nodes answer",
                    r.warnings.len()
                );
            }
        }
        VolumeCmd::Resize { name, size: s } => {
            let r = c.resize(&name, size::parse_size(&s).map_err(Error::Invalid)?)?;
            if !r.warnings.is_empty() {
                eprintln!(
                    "{} plex(es) not grown yet: they grow when they rejoin",
                    r.warnings.len()
                );
            }
        }
        VolumeCmd::Snapshot { name, snapshot } => {
            c.snapshot(&name, &snapshot)?;
        }
        VolumeCmd::Clone {
            name,
            snapshot,
            new,
        } => {
            let rec = c.clone_volume(&name, &snapshot, &new)?;
            println!("{}", rec.nqn);
        }
        VolumeCmd::Rejoin { name } => {
            let r = c.rejoin(&name)?;
            if !r.warnings.is_empty() {
                eprintln!("{} plex(es) could not rejoin yet", r.warnings.len());
            }
        }
        VolumeCmd::Delete { name, force } => {
            c.delete(&name, force)?;
        }
    }
    Ok(())
}

fn describe(c: &mut Cluster, name: &str, watch: bool, as_json: bool) -> Result<(), Error> {
    if watch {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    }
    let clear = watch && !as_json && std::io::stdout().is_terminal();
    loop {
        let d = c.describe(name)?;
        if as_json {
            let v = json!({"volume": d.record, "mirror": d.mirror});
            if watch {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
            }
        } else {
            if clear {
                print!("\x1b[H\x1b[2J");
            }
            print!("{}", table::describe(&d.mirror).map_err(Error::Refused)?);
        }
        if !watch {
            return Ok(());
        }
        if !table::resync_running(&d.mirror) {
            eprintln!("no resync running: stopped watching");
            return Ok(());
        }
        // The refresh interval; Ctrl-C is checked ten times a second within it.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(1) {
            if INTERRUPTED.load(Ordering::SeqCst) {
                eprintln!("interrupted: stopped watching");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
