//! The real `plexd` binary as a child process, for tests of what it does as a whole: start with a
//! config, answer JSON-RPC, exit and say why.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const PLEXD: &str = env!("CARGO_BIN_EXE_plexd");
/// Far beyond any start-up or scheduling delay on a loaded machine: running out means plexd
/// hung or never came up.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct Plexd {
    pub child: Child,
    pub sock: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
}

/// A directory of its own on disk, cleaned with the build dir.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("plexd-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

impl Plexd {
    /// Starts plexd (unpinned, with `extra` arguments) without waiting for it.
    pub fn spawn(extra: &[&str]) -> Plexd {
        let dir = temp_dir();
        let sock = dir.path().join("plexd.sock");
        let log = dir.path().join("plexd.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(PLEXD)
            .arg("--no-pin")
            .arg("-r")
            .arg(&sock)
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("plexd starts");
        Plexd {
            child,
            sock,
            log,
            dir,
        }
    }

    /// Starts plexd and waits until it answers on its socket.
    pub fn start(extra: &[&str]) -> Plexd {
        let mut d = Self::spawn(extra);
        wait_until_up(&mut d.child, &d.sock, &d.log);
        d
    }

    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// One JSON-RPC call: the result, or the error's (code, message).
    pub fn call(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        rpc_call(&self.sock, method, params)
    }

    /// Sends one request and does not wait for the answer (plexd may exit instead).
    pub fn send_only(&self, method: &str, params: Value) {
        let mut s = UnixStream::connect(&self.sock).expect("plexd's socket");
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        s.write_all(req.to_string().as_bytes()).unwrap();
        // Half-close only: plexd may still answer, nobody reads it.
        let _ = s.shutdown(std::net::Shutdown::Write);
        std::mem::forget(s);
    }

    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e:?}"))
    }

    /// Waits for plexd to exit on its own; panics if it is still running at the deadline.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "plexd is still running: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Plexd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs plexd to its exit (for start-up errors): its status and everything it printed.
pub fn run_to_exit(extra: &[&str]) -> (ExitStatus, String) {
    let mut d = Plexd::spawn(extra);
    let st = d.wait_exit();
    (st, d.log_text())
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `v` as JSON into `dir`, returning the path.
pub fn write_json(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
    p
}

/// What plexd printed to `log` so far (empty if nothing yet).
pub fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits until the plexd `child` answers on `sock`; panics, with its `log`, if it exits or
/// [`DEADLINE`] passes first.
pub fn wait_until_up(child: &mut Child, sock: &Path, log: &Path) {
    let deadline = Instant::now() + DEADLINE;
    while UnixStream::connect(sock).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("plexd exited ({st}) at start: {}", read_log(log));
        }
        assert!(
            Instant::now() < deadline,
            "plexd did not come up: {}",
            read_log(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One JSON-RPC call to the plexd on `sock`: the result, or the error's (code, message).
/// Panics when plexd cannot be reached or does not answer.
pub fn rpc_call(sock: &Path, method: &str, params: Value) -> Result<Value, (i64, String)> {
    try_rpc_call(sock, method, params).unwrap_or_else(|e| panic!("{e}"))
}

/// As [`rpc_call`], with a plexd that is gone or goes away mid-call an `Err` of its own
/// (for tests that kill plexd under a caller).
pub fn try_rpc_call(
    sock: &Path,
    method: &str,
    params: Value,
) -> Result<Result<Value, (i64, String)>, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("plexd's socket: {e}"))?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
    if !params.is_null() {
        req["params"] = params;
    }
    s.write_all(req.to_string().as_bytes())
        .map_err(|e| format!("{method}: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let reply: Value = loop {
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => break v,
            Some(Err(e)) if !e.is_eof() => panic!("plexd sent bad JSON: {e}"),
            _ => {}
        }
        let n = s
            .read(&mut chunk)
            .map_err(|e| format!("{method}: no answer: {e}"))?;
        if n == 0 {
            return Err(format!("{method}: plexd closed without answering"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    Ok(match reply.get("error") {
        Some(e) => Err((
            e["code"].as_i64().unwrap_or(0),
            e["message"].as_str().unwrap_or("").to_string(),
        )),
        None => Ok(reply["result"].clone()),
    })
}
