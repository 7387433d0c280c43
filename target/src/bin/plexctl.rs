//! plexctl: plexd's command line over its JSON-RPC socket.
//!
//! `plexctl call METHOD '{params}'` reaches any method; the other subcommands call one and
//! print a table for people. A new area (`nvmf`, `volume`) is one more `Cmd` variant with its
//! own subcommand enum and printer.

use clap::{Parser, Subcommand};
// 1536 → "1.5 KiB": the volume crate's, so sizes read the same in every table.
use plexd::rpc::server::{Frame, Framer};
use plexstor_volume::size::human as human_bytes;
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
    /// Volumes mirrored across the nodes of a nodes file (-s is not used: each node's
    /// socket comes from that file).
    Volume(plexstor_volume::cli::VolumeArgs),
    /// Logical volume stores.
    Lvstore {
        #[command(subcommand)]
        cmd: LvstoreCmd,
    },
}

#[derive(Subcommand, Debug)]
enum LvstoreCmd {
    /// Checks a store's metadata: every cluster owned at most once, every parent there,
    /// the journal whole. A live store (by name) is read back from its base and compared
    /// with plexd's view; `--file` reads a device or image directly, with no plexd.
    Check {
        /// The store's name (live).
        name: Option<String>,
        /// A file or block device holding a store (offline).
        #[arg(long, conflicts_with = "name")]
        file: Option<PathBuf>,
    },
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
    /// The result lacks what plexctl needs from it (a field renamed or gone in plexd).
    Reply(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Rpc { code, message } => write!(f, "error {code}: {message}"),
            CallError::Transport(m) => f.write_str(m),
            CallError::Reply(m) => write!(f, "unexpected reply from {m}"),
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
        // plexd's own framer: a large reply (20 K bdevs) arrives in many reads, and parsing
        // the whole buffer again after each one made listing them quadratic.
        let mut framer = Framer::default();
        let mut chunk = [0u8; 16384];
        let resp = loop {
            match framer.next_frame() {
                Frame::Value(v, _) => break v,
                Frame::Malformed(e) => {
                    return Err(CallError::Transport(format!("plexd sent bad JSON: {e}")))
                }
                Frame::Incomplete => {}
            }
            let n = self.stream.read(&mut chunk).map_err(io)?;
            if n == 0 {
                return Err(CallError::Transport(
                    "plexd closed the connection without an answer".into(),
                ));
            }
            framer.push(&chunk[..n]);
        };
        if let Some(e) = resp.get("error") {
            return match (e["code"].as_i64(), e["message"].as_str()) {
                (Some(code), Some(message)) => Err(CallError::Rpc {
                    code,
                    message: message.to_string(),
                }),
                _ => Err(CallError::Transport(format!(
                    "{method}: an error without an integer code and a message string: {e}"
                ))),
            };
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
    // Volumes talk to many nodes; the volume crate does it all.
    if let Cmd::Volume(v) = args.cmd {
        return plexstor_volume::cli::run(v, timeout)
            .map_err(|e| CallError::Transport(e.to_string()));
    }
    if let Cmd::Lvstore {
        cmd: LvstoreCmd::Check {
            file: Some(path), ..
        },
    } = &args.cmd
    {
        return check_offline(path);
    }
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
        Cmd::Bdev { cmd: BdevCmd::List } => {
            print!("{}", bdev_list(&c.call("bdev_get_bdevs", None)?)?.render())
        }
        Cmd::Bdev {
            cmd: BdevCmd::Iostat,
        } => print!(
            "{}",
            bdev_iostat(&c.call("bdev_get_iostat", None)?)?.render()
        ),
        Cmd::Reactors => print!(
            "{}",
            reactors(&c.call("framework_get_reactors", None)?)?.render()
        ),
        Cmd::Version => println!("{}", version(&c.call("spdk_get_version", None)?)?),
        Cmd::SaveConfig => print_json(&c.call("save_config", None)?),
        Cmd::Volume(_) => unreachable!("dispatched above"),
        Cmd::Lvstore {
            cmd: LvstoreCmd::Check { name, .. },
        } => {
            let name = name.ok_or_else(|| {
                CallError::Transport("give a store name, or --file for an offline store".into())
            })?;
            let v = c.call("bdev_lvol_check_lvstore", Some(json!({"lvs_name": name})))?;
            let problems: Vec<String> = v["problems"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| p.as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .unwrap_or_default();
            report_check(&format!("store {name} ({})", v["uuid"]), &v, &problems)?;
        }
    }
    Ok(())
}

/// Prints a store check; fails when it found problems.
fn report_check(what: &str, v: &Value, problems: &[String]) -> Result<(), CallError> {
    println!(
        "{what}: {} clusters, {} free, {} lvols and snapshots",
        v["total_data_clusters"], v["free_clusters"], v["lvols"]
    );
    if problems.is_empty() {
        println!("no problems found");
        return Ok(());
    }
    for p in problems {
        println!("problem: {p}");
    }
    Err(CallError::Transport(format!(
        "{} problems found",
        problems.len()
    )))
}

fn check_offline(path: &Path) -> Result<(), CallError> {
    use plexd::bdev::lvol::image;
    use std::io::Seek;
    let fail = |e: String| CallError::Transport(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let size = f
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| fail(e.to_string()))?;
    match image::read_file(&mut f, size) {
        Ok(Some((sb, st))) => {
            let v = json!({
                "total_data_clusters": st.total_clusters,
                "free_clusters": st.free_clusters(),
                "lvols": st.blobs.len(),
            });
            report_check(&format!("store {} ({})", st.name, sb.uuid), &v, &st.check())
        }
        Ok(None) => Err(fail("holds no volume store".into())),
        Err(e) => {
            println!("problem: {e}");
            Err(fail("the store cannot be loaded".into()))
        }
    }
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Rows under headers, as the table commands print them.
#[derive(Debug, PartialEq)]
struct Table {
    headers: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

impl Table {
    /// The table as text, columns padded to their widest cell, one line per row.
    fn render(&self) -> String {
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (w, cell) in width.iter_mut().zip(r) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let out: Vec<String> = cells.zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
            out.join("  ").trim_end().to_string() + "\n"
        };
        let mut text = line(&mut self.headers.iter().copied());
        for r in &self.rows {
            text += &line(&mut r.iter().map(String::as_str));
        }
        text
    }
}

/// A value inside a method's reply, with its path for errors. A field a table needs that is
/// missing or of another type is an error naming the method and the field, never a silent 0:
/// a renamed field in plexd must break plexctl loudly, not print zeros.
#[derive(Clone, Copy)]
struct Reply<'a> {
    method: &'a str,
    path: &'a str,
    value: &'a Value,
}

impl<'a> Reply<'a> {
    fn new(method: &'a str, result: &'a Value) -> Reply<'a> {
        Reply {
            method,
            path: "result",
            value: result,
        }
    }

    fn error(&self, field: &str, want: &str) -> CallError {
        let found = match self.value.get(field) {
            None => "missing".to_string(),
            Some(v) => format!("{v}"),
        };
        CallError::Reply(format!(
            "{}: {}.{field} should be {want}, is {found}",
            self.method, self.path
        ))
    }

    fn field(&self, field: &str) -> Option<&'a Value> {
        self.value.get(field)
    }

    fn u64(&self, field: &str) -> Result<u64, CallError> {
        self.field(field)
            .and_then(Value::as_u64)
            .ok_or_else(|| self.error(field, "an unsigned integer"))
    }

    fn str(&self, field: &str) -> Result<&'a str, CallError> {
        self.field(field)
            .and_then(Value::as_str)
            .ok_or_else(|| self.error(field, "a string"))
    }

    /// A string that may be absent or null (SPDK leaves some out).
    fn opt_str(&self, field: &str) -> Result<Option<&'a str>, CallError> {
        match self.field(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.error(field, "a string or null")),
        }
    }

    fn bool(&self, field: &str) -> Result<bool, CallError> {
        self.field(field)
            .and_then(Value::as_bool)
            .ok_or_else(|| self.error(field, "true or false"))
    }

    /// The elements of an array field, each with its path (`result.bdevs[2]`), or of the
    /// reply itself when `field` is None.
    fn items(&self, field: Option<&str>) -> Result<Vec<(String, &'a Value)>, CallError> {
        let (array, path) = match field {
            None => (self.value.as_array(), self.path.to_string()),
            Some(f) => (
                self.field(f).and_then(Value::as_array),
                format!("{}.{f}", self.path),
            ),
        };
        let array = array.ok_or_else(|| match field {
            Some(f) => self.error(f, "an array"),
            None => CallError::Reply(format!(
                "{}: {} should be an array, is {}",
                self.method, self.path, self.value
            )),
        })?;
        Ok(array
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{path}[{i}]"), v))
            .collect())
    }

    fn at(&self, path: &'a str, value: &'a Value) -> Reply<'a> {
        Reply {
            method: self.method,
            path,
            value,
        }
    }
}

/// `bdev list` from `bdev_get_bdevs`'s result.
fn bdev_list(result: &Value) -> Result<Table, CallError> {
    let reply = Reply::new("bdev_get_bdevs", result);
    let mut rows = Vec::new();
    for (path, b) in reply.items(None)? {
        let b = reply.at(&path, b);
        // The module is the key of driver_specific; product_name when a module says nothing.
        let module = match b
            .field("driver_specific")
            .and_then(Value::as_object)
            .and_then(|o| o.keys().next())
        {
            Some(m) => m.clone(),
            None => b.str("product_name")?.to_string(),
        };
        let block_size = b.u64("block_size")?;
        let num_blocks = b.u64("num_blocks")?;
        let bytes = block_size.checked_mul(num_blocks).ok_or_else(|| {
            CallError::Reply(format!(
                "bdev_get_bdevs: {path}: {num_blocks} blocks of {block_size} bytes overflow 64 bits"
            ))
        })?;
        let claimed = match b.opt_str("claimed_by")? {
            Some(by) => by.to_string(),
            None if b.bool("claimed")? => "yes".into(),
            None => "no".into(),
        };
        rows.push(vec![
            b.str("name")?.to_string(),
            module,
            human_bytes(bytes),
            block_size.to_string(),
            claimed,
            b.str("uuid")?.to_string(),
        ]);
    }
    Ok(Table {
        headers: &["NAME", "MODULE", "SIZE", "BLOCK", "CLAIMED", "UUID"],
        rows,
    })
}

/// `bdev iostat` from `bdev_get_iostat`'s result.
fn bdev_iostat(result: &Value) -> Result<Table, CallError> {
    let reply = Reply::new("bdev_get_iostat", result);
    let tick_rate = reply.u64("tick_rate")?;
    if tick_rate == 0 {
        return Err(reply.error("tick_rate", "ticks per second, above 0"));
    }
    // Average latency in microseconds: total ticks over ops, ticks to seconds, to µs.
    let avg_us = |ticks: u64, ops: u64| {
        if ops == 0 {
            "-".to_string()
        } else {
            format!("{:.1}", ticks as f64 / ops as f64 / tick_rate as f64 * 1e6)
        }
    };
    let mut rows = Vec::new();
    for (path, b) in reply.items(Some("bdevs"))? {
        let b = reply.at(&path, b);
        let (reads, writes) = (b.u64("num_read_ops")?, b.u64("num_write_ops")?);
        rows.push(vec![
            b.str("name")?.to_string(),
            reads.to_string(),
            human_bytes(b.u64("bytes_read")?),
            avg_us(b.u64("read_latency_ticks")?, reads),
            writes.to_string(),
            human_bytes(b.u64("bytes_written")?),
            avg_us(b.u64("write_latency_ticks")?, writes),
            b.u64("num_unmap_ops")?.to_string(),
            b.u64("num_flush_ops")?.to_string(),
            b.u64("io_error")?.to_string(),
        ]);
    }
    Ok(Table {
        headers: &[
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
        rows,
    })
}

/// `reactors` from `framework_get_reactors`'s result.
fn reactors(result: &Value) -> Result<Table, CallError> {
    let reply = Reply::new("framework_get_reactors", result);
    let mut rows = Vec::new();
    for (path, r) in reply.items(Some("reactors"))? {
        let r = reply.at(&path, r);
        let (busy, idle) = (r.u64("busy")?, r.u64("idle")?);
        let total = busy.saturating_add(idle);
        let busy_pct = if total == 0 {
            0.0
        } else {
            busy as f64 * 100.0 / total as f64
        };
        let mut pollers = Vec::new();
        for (poller_path, p) in r.items(Some("pollers"))? {
            pollers.push(r.at(&poller_path, p).str("name")?.to_string());
        }
        rows.push(vec![
            r.u64("lcore")?.to_string(),
            format!("{busy_pct:.1}"),
            if r.bool("in_interrupt")? { "yes" } else { "no" }.to_string(),
            r.u64("sleeps")?.to_string(),
            r.u64("wakeups")?.to_string(),
            if pollers.is_empty() {
                "-".into()
            } else {
                pollers.join(",")
            },
        ]);
    }
    Ok(Table {
        headers: &["CORE", "BUSY%", "SLEEPING", "SLEEPS", "WAKEUPS", "POLLERS"],
        rows,
    })
}

/// `version` from `spdk_get_version`'s result.
fn version(result: &Value) -> Result<String, CallError> {
    Ok(Reply::new("spdk_get_version", result)
        .str("version")?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One bdev as plexd's `bdev_get_bdevs` describes it (the fields plexctl reads).
    fn malloc_bdev(name: &str, block_size: u64, num_blocks: u64) -> Value {
        json!({
            "name": name,
            "product_name": "Malloc disk",
            "block_size": block_size,
            "num_blocks": num_blocks,
            "uuid": "6e1c7a0e-5c1b-4a59-9c3e-1f3f4e2b9a10",
            "claimed": false,
            "claimed_by": null,
            "driver_specific": {"malloc": {}},
        })
    }

    fn error_text(r: Result<Table, CallError>) -> String {
        match r {
            Ok(t) => panic!("expected an error, got {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn human_bytes_picks_the_largest_whole_unit() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(3 << 40), "3 TiB");
        assert_eq!(human_bytes(5 << 50), "5 PiB");
        assert_eq!(human_bytes(u64::MAX), "16384 PiB");
    }

    #[test]
    fn bdev_list_sizes_are_blocks_times_block_size() {
        let mut claimed = malloc_bdev("Nvme0n1", 4096, 3 * 262_144 + 131_072);
        claimed["claimed"] = json!(true);
        claimed["claimed_by"] = json!("lvol");
        claimed["driver_specific"] = json!({"nvme": [{"trid": {}}]});
        let mut spdk_style = malloc_bdev("Null0", 512, 3);
        // SPDK says only whether a bdev is claimed, and a module may say nothing.
        spdk_style.as_object_mut().unwrap().remove("claimed_by");
        spdk_style["claimed"] = json!(true);
        spdk_style["driver_specific"] = json!({});
        spdk_style["product_name"] = json!("Null disk");
        let reply = json!([malloc_bdev("Malloc0", 512, 131_072), claimed, spdk_style]);
        let t = bdev_list(&reply).unwrap();
        let uuid = "6e1c7a0e-5c1b-4a59-9c3e-1f3f4e2b9a10";
        assert_eq!(
            t.rows,
            vec![
                // 131072 blocks of 512 bytes: 64 MiB.
                vec!["Malloc0", "malloc", "64 MiB", "512", "no", uuid],
                // 917504 blocks of 4 KiB: 3.5 GiB.
                vec!["Nvme0n1", "nvme", "3.5 GiB", "4096", "lvol", uuid],
                // 3 blocks of 512 bytes: 1.5 KiB.
                vec!["Null0", "Null disk", "1.5 KiB", "512", "yes", uuid],
            ]
        );
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("NAME     MODULE     SIZE     BLOCK  CLAIMED  UUID"));
        assert!(lines[2].starts_with("Nvme0n1  nvme       3.5 GiB  4096   lvol     "));
    }

    #[test]
    fn bdev_list_of_no_bdevs_is_the_headers() {
        let t = bdev_list(&json!([])).unwrap();
        assert_eq!(t.render(), "NAME  MODULE  SIZE  BLOCK  CLAIMED  UUID\n");
    }

    #[test]
    fn a_bdev_missing_a_field_is_an_error_naming_the_method_and_field() {
        for field in ["num_blocks", "block_size", "name", "uuid"] {
            let mut b = malloc_bdev("Malloc1", 512, 8);
            b.as_object_mut().unwrap().remove(field);
            let msg = error_text(bdev_list(&json!([malloc_bdev("Malloc0", 512, 8), b])));
            assert_eq!(
                msg,
                format!(
                    "unexpected reply from bdev_get_bdevs: result[1].{field} should be {}, is missing",
                    if field.ends_with("size") || field.starts_with("num") {
                        "an unsigned integer"
                    } else {
                        "a string"
                    }
                )
            );
        }
        // A renamed field reads as missing; one of the wrong type says what it found.
        let mut b = malloc_bdev("Malloc0", 512, 8);
        b["num_blocks"] = json!("8");
        let msg = error_text(bdev_list(&json!([b])));
        assert!(
            msg.contains("bdev_get_bdevs: result[0].num_blocks"),
            "{msg}"
        );
        assert!(msg.contains("is \"8\""), "{msg}");
        let msg = error_text(bdev_list(&json!({"bdevs": []})));
        assert!(
            msg.contains("bdev_get_bdevs: result should be an array"),
            "{msg}"
        );
    }

    #[test]
    fn a_size_beyond_64_bits_is_an_error() {
        let msg = error_text(bdev_list(&json!([malloc_bdev("Huge", 4096, u64::MAX / 2)])));
        assert!(msg.contains("bdev_get_bdevs: result[0]: "), "{msg}");
        assert!(msg.contains("overflow"), "{msg}");
    }

    fn iostat_bdev(name: &str) -> Value {
        json!({
            "name": name,
            "bytes_read": 0, "num_read_ops": 0, "read_latency_ticks": 0,
            "bytes_written": 0, "num_write_ops": 0, "write_latency_ticks": 0,
            "num_unmap_ops": 0, "num_flush_ops": 0, "io_error": 0,
        })
    }

    #[test]
    fn iostat_latency_is_ticks_per_op_at_the_tick_rate_in_microseconds() {
        let mut busy = iostat_bdev("Malloc0");
        // 4 reads of 4 KiB taking 3 ms in all at 1 GHz ticks: 750 µs each.
        busy["num_read_ops"] = json!(4);
        busy["bytes_read"] = json!(16384);
        busy["read_latency_ticks"] = json!(3_000_000);
        // 3 writes of 512 KiB taking 100 µs in all: 33.3 µs each.
        busy["num_write_ops"] = json!(3);
        busy["bytes_written"] = json!(3 * 512 * 1024);
        busy["write_latency_ticks"] = json!(100_000);
        busy["num_unmap_ops"] = json!(2);
        busy["num_flush_ops"] = json!(1);
        busy["io_error"] = json!(5);
        let reply = json!({"tick_rate": 1_000_000_000u64, "ticks": 7, "bdevs": [busy, iostat_bdev("Null0")]});
        let t = bdev_iostat(&reply).unwrap();
        assert_eq!(
            t.rows,
            vec![
                vec!["Malloc0", "4", "16 KiB", "750.0", "3", "1.5 MiB", "33.3", "2", "1", "5"],
                // No ops: no latency to average.
                vec!["Null0", "0", "0 B", "-", "0", "0 B", "-", "0", "0", "0"],
            ]
        );
        // The same ticks at SPDK's usual 2.4 GHz TSC: 3e6 / 4 / 2.4e9 s = 312.5 µs.
        let mut reply = reply;
        reply["tick_rate"] = json!(2_400_000_000u64);
        assert_eq!(bdev_iostat(&reply).unwrap().rows[0][3], "312.5");
    }

    #[test]
    fn iostat_without_a_tick_rate_is_an_error() {
        let msg = error_text(bdev_iostat(&json!({"bdevs": []})));
        assert_eq!(
            msg,
            "unexpected reply from bdev_get_iostat: result.tick_rate should be an unsigned integer, is missing"
        );
        let msg = error_text(bdev_iostat(&json!({"tick_rate": 0, "bdevs": []})));
        assert!(
            msg.contains("result.tick_rate should be ticks per second"),
            "{msg}"
        );
        let mut b = iostat_bdev("Malloc0");
        b.as_object_mut().unwrap().remove("write_latency_ticks");
        let msg = error_text(bdev_iostat(&json!({"tick_rate": 1000, "bdevs": [b]})));
        assert!(
            msg.contains("bdev_get_iostat: result.bdevs[0].write_latency_ticks should be an unsigned integer, is missing"),
            "{msg}"
        );
    }

    #[test]
    fn reactors_busy_share_and_pollers() {
        let reply = json!({"tick_rate": 1_000_000_000u64, "reactors": [
            {"lcore": 0, "busy": 250, "idle": 750, "in_interrupt": false, "sleeps": 3, "wakeups": 4,
             "pollers": [{"name": "nvmf_tgt_poll_group"}, {"name": "bdev_io"}]},
            {"lcore": 1, "busy": 0, "idle": 0, "in_interrupt": true, "sleeps": 9, "wakeups": 8,
             "pollers": []},
        ]});
        let t = reactors(&reply).unwrap();
        assert_eq!(
            t.rows,
            vec![
                vec!["0", "25.0", "no", "3", "4", "nvmf_tgt_poll_group,bdev_io"],
                vec!["1", "0.0", "yes", "9", "8", "-"],
            ]
        );
        let mut bad = reply.clone();
        bad["reactors"][1]["pollers"] = json!([{"id": 1}]);
        let msg = error_text(reactors(&bad));
        assert!(
            msg.contains("framework_get_reactors: result.reactors[1].pollers[0].name should be a string, is missing"),
            "{msg}"
        );
    }

    #[test]
    fn version_must_be_a_string() {
        assert_eq!(
            version(&json!({"version": "plexstor v0.1.0"})).unwrap(),
            "plexstor v0.1.0"
        );
        let msg = version(&json!({"fields": {}})).unwrap_err().to_string();
        assert!(
            msg.contains("spdk_get_version: result.version should be a string"),
            "{msg}"
        );
    }
}
