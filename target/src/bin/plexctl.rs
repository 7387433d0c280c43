//! plexctl: plexd's command line over its JSON-RPC socket.
//!
//! `plexctl call METHOD '{params}'` reaches any method; the other subcommands call one and
//! print a table for people. A new area (`nvmf`, `volume`) is one more `Cmd` variant with its
//! own subcommand enum and printer.

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "plexctl",
    version,
    about = "Control a running plexd over its JSON-RPC socket"
)]
struct Args {
    /// plexd's JSON-RPC socket.
    #[arg(short = 's', long = "socket", default_value = "/var/tmp/plexd.sock")]
    socket: PathBuf,
    /// Seconds to wait for an answer.
    #[arg(short = 't', long = "timeout", default_value_t = 60.0)]
    timeout: f64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Call any method; prints its result as JSON.
    Call {
        method: String,
        /// Parameters as a JSON object, e.g. '{"name": "Malloc0"}'.
        params: Option<String>,
        /// Print the result on one line (for scripts).
        #[arg(long)]
        compact: bool,
    },
    /// Block devices.
    Bdev {
        #[command(subcommand)]
        cmd: BdevCmd,
    },
    /// Reactors: core, load, sleep state and pollers.
    Reactors,
    /// plexd's version.
    Version,
    /// The configuration that `plexd -c FILE` loads back, as JSON.
    SaveConfig,
}

#[derive(Subcommand, Debug)]
enum BdevCmd {
    /// One line per bdev.
    List,
    /// I/O counters per bdev.
    Iostat,
}

/// Why a call failed.
#[derive(Debug)]
enum CallError {
    /// plexd answered with a JSON-RPC error.
    Rpc { code: i64, message: String },
    /// The socket failed, or the answer was not JSON-RPC.
    Transport(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Rpc { code, message } => write!(f, "error {code}: {message}"),
            CallError::Transport(m) => f.write_str(m),
        }
    }
}

/// A synchronous JSON-RPC client: one request, then read until one whole JSON value.
struct Client {
    stream: UnixStream,
    next_id: u64,
}

impl Client {
    fn connect(path: &Path, timeout: Duration) -> Result<Client, CallError> {
        let stream = UnixStream::connect(path).map_err(|e| {
            CallError::Transport(format!(
                "cannot connect to {}: {e} (is plexd running? -s chooses the socket)",
                path.display()
            ))
        })?;
        let t = Some(timeout).filter(|t| !t.is_zero());
        let _ = stream.set_read_timeout(t);
        let _ = stream.set_write_timeout(t);
        Ok(Client { stream, next_id: 1 })
    }

    fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if let Some(p) = params {
            req["params"] = p;
        }
        let io = |e: std::io::Error| CallError::Transport(format!("socket: {e}"));
        self.stream
            .write_all(req.to_string().as_bytes())
            .map_err(io)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16384];
        let resp = loop {
            let mut s = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            match s.next() {
                Some(Ok(v)) => break v,
                Some(Err(e)) if !e.is_eof() => {
                    return Err(CallError::Transport(format!("plexd sent bad JSON: {e}")))
                }
                _ => {}
            }
            let n = self.stream.read(&mut chunk).map_err(io)?;
            if n == 0 {
                return Err(CallError::Transport(
                    "plexd closed the connection without an answer".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        if let Some(e) = resp.get("error") {
            return Err(CallError::Rpc {
                code: e["code"].as_i64().unwrap_or(0),
                message: e["message"].as_str().unwrap_or("(no message)").to_string(),
            });
        }
        resp.get("result")
            .cloned()
            .ok_or_else(|| CallError::Transport(format!("answer without a result: {resp}")))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plexctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), CallError> {
    let timeout = Duration::try_from_secs_f64(args.timeout.max(0.0)).unwrap_or(Duration::ZERO);
    // Parse what we can before connecting, so a typo never reaches plexd.
    let params = match &args.cmd {
        Cmd::Call {
            params: Some(text), ..
        } => Some(
            serde_json::from_str::<Value>(text)
                .map_err(|e| CallError::Transport(format!("parameters are not valid JSON: {e}")))?,
        ),
        _ => None,
    };
    let mut c = Client::connect(&args.socket, timeout)?;
    match args.cmd {
        Cmd::Call {
            method, compact, ..
        } => {
            let v = c.call(&method, params)?;
            if compact {
                println!("{v}");
            } else {
                print_json(&v);
            }
        }
        Cmd::Bdev { cmd: BdevCmd::List } => bdev_list(&c.call("bdev_get_bdevs", None)?),
        Cmd::Bdev {
            cmd: BdevCmd::Iostat,
        } => bdev_iostat(&c.call("bdev_get_iostat", None)?),
        Cmd::Reactors => reactors(&c.call("framework_get_reactors", None)?),
        Cmd::Version => {
            let v = c.call("spdk_get_version", None)?;
            println!("{}", v["version"].as_str().unwrap_or("unknown"));
        }
        Cmd::SaveConfig => print_json(&c.call("save_config", None)?),
    }
    Ok(())
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Prints rows under headers, columns padded to their widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let out: Vec<String> = cells.zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", out.join("  ").trim_end());
    };
    line(&mut headers.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
}

/// 1536 → "1.5 KiB".
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn bdev_list(v: &Value) {
    let rows: Vec<Vec<String>> = items(v)
        .map(|b| {
            // The module is the key of driver_specific; product_name when a module says nothing.
            let module = b["driver_specific"]
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_else(|| b["product_name"].as_str().unwrap_or("?").to_string());
            let bs = u(&b["block_size"]);
            vec![
                b["name"].as_str().unwrap_or("?").to_string(),
                module,
                human_bytes(bs.saturating_mul(u(&b["num_blocks"]))),
                bs.to_string(),
                b["claimed_by"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| if b["claimed"] == true { "yes" } else { "no" }.into()),
                b["uuid"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    table(
        &["NAME", "MODULE", "SIZE", "BLOCK", "CLAIMED", "UUID"],
        &rows,
    );
}

fn bdev_iostat(v: &Value) {
    let tick_rate = u(&v["tick_rate"]).max(1) as f64;
    // Average latency in microseconds from total ticks over ops.
    let avg_us = |ticks: &Value, ops: u64| {
        if ops == 0 {
            "-".to_string()
        } else {
            format!("{:.1}", u(ticks) as f64 / ops as f64 / tick_rate * 1e6)
        }
    };
    let rows: Vec<Vec<String>> = items(&v["bdevs"])
        .map(|b| {
            let (r, w) = (u(&b["num_read_ops"]), u(&b["num_write_ops"]));
            vec![
                b["name"].as_str().unwrap_or("?").to_string(),
                r.to_string(),
                human_bytes(u(&b["bytes_read"])),
                avg_us(&b["read_latency_ticks"], r),
                w.to_string(),
                human_bytes(u(&b["bytes_written"])),
                avg_us(&b["write_latency_ticks"], w),
                u(&b["num_unmap_ops"]).to_string(),
                u(&b["num_flush_ops"]).to_string(),
                u(&b["io_error"]).to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "READS",
            "READ",
            "R-LAT(us)",
            "WRITES",
            "WRITTEN",
            "W-LAT(us)",
            "UNMAPS",
            "FLUSHES",
            "ERRORS",
        ],
        &rows,
    );
}

fn reactors(v: &Value) {
    let rows: Vec<Vec<String>> = items(&v["reactors"])
        .map(|r| {
            let (busy, idle) = (u(&r["busy"]), u(&r["idle"]));
            let pct = if busy + idle == 0 {
                0.0
            } else {
                busy as f64 * 100.0 / (busy + idle) as f64
            };
            let pollers: Vec<&str> = items(&r["pollers"])
                .filter_map(|p| p["name"].as_str())
                .collect();
            vec![
                u(&r["lcore"]).to_string(),
                format!("{pct:.1}"),
                if r["in_interrupt"] == true {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
                u(&r["sleeps"]).to_string(),
                u(&r["wakeups"]).to_string(),
                if pollers.is_empty() {
                    "-".into()
                } else {
                    pollers.join(",")
                },
            ]
        })
        .collect();
    table(
        &["CORE", "BUSY%", "SLEEPING", "SLEEPS", "WAKEUPS", "POLLERS"],
        &rows,
    );
}
