//! Real plexd processes and a small NVMe/TCP driver for the bdev_nvme_* tests.
//!
//! I/O goes through the `initiator` crate directly rather than the plexperf binary: plexd
//! already depends on it (no cross-package binary path to find), and the tests need to
//! watch single I/Os fail and recover at chosen moments, which plexperf's timed runs hide.
#![allow(dead_code)]

use initiator::{Controller, CtrlrOpts, IoError, IoQpair, TransportId};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../plexd_proc/mod.rs"]
mod plexd_proc;

pub use plexd_proc::{free_port, PLEXD};
use plexd_proc::{read_log, rpc_call, try_rpc_call, wait_until_up};
pub const NQN_A: &str = "nqn.2024-01.io.plexstor:bdev-nvme-a";
pub const NQN_B: &str = "nqn.2024-01.io.plexstor:bdev-nvme-b";

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bdev-nvme-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// A plexd process on a socket in `dir`; killed when dropped.
pub struct Plexd {
    pub child: Child,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl Plexd {
    pub fn start(dir: &Path, tag: &str, extra: &[&str]) -> Plexd {
        let sock = dir.join(format!("{tag}.sock"));
        let log = dir.join(format!("{tag}.log"));
        let _ = std::fs::remove_file(&sock);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(PLEXD)
            .args([
                "-r",
                sock.to_str().unwrap(),
                "--no-pin",
                "--idle-poll-us",
                "200",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn plexd");
        let mut p = Plexd { child, sock, log };
        wait_until_up(&mut p.child, &p.sock, &p.log);
        p
    }

    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// One JSON-RPC call: Ok(result) or Err((code, message)).
    pub fn call(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        rpc_call(&self.sock, method, params)
    }

    /// As `call`, with a plexd that dies mid-call an `Err` rather than a panic.
    pub fn try_call(
        &self,
        method: &str,
        params: Value,
    ) -> Result<Result<Value, (i64, String)>, String> {
        try_rpc_call(&self.sock, method, params)
    }

    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e:?}\n{}", self.log_text()))
    }

    /// Exports `bdev` as namespace 1 of `nqn` on 127.0.0.1:`port`.
    pub fn export(&self, nqn: &str, bdev: &str, port: u16, transport: Value) {
        self.ok("nvmf_create_transport", transport);
        self.ok(
            "nvmf_create_subsystem",
            json!({"nqn": nqn, "allow_any_host": true, "serial_number": "SN0001"}),
        );
        self.ok(
            "nvmf_subsystem_add_ns",
            json!({"nqn": nqn, "namespace": {"bdev_name": bdev}}),
        );
        self.ok(
            "nvmf_subsystem_add_listener",
            json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                    "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
        );
    }

    pub fn ctrlr_state(&self, name: &str) -> String {
        let v = self.ok("bdev_nvme_get_controllers", json!({"name": name}));
        v[0]["ctrlrs"][0]["state"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    }

    /// Polls until the controller reports `want` (or panics after `within`).
    pub fn wait_state(&self, name: &str, want: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let s = self.ctrlr_state(name);
            if s == want {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < within,
                "controller {name} is {s}, not {want}, after {within:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Plexd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A synchronous NVMe/TCP host on one queue pair.
pub struct Driver {
    pub ctrlr: Controller,
    pub qp: IoQpair<Vec<u8>>,
    pub block_size: usize,
    next_tag: u64,
}

impl Driver {
    pub fn connect(port: u16, nqn: &str) -> Driver {
        let trid = TransportId::tcp(([127, 0, 0, 1], port).into(), nqn);
        let opts = CtrlrOpts {
            io_timeout: None,
            ..CtrlrOpts::default()
        };
        let mut ctrlr = Controller::connect(&trid, &opts).expect("connect to plexd's export");
        let block_size = ctrlr.namespace(1).expect("namespace 1").block_size as usize;
        let qp = ctrlr.alloc_io_qpair(Some(64)).expect("I/O qpair");
        Driver {
            ctrlr,
            qp,
            block_size,
            next_tag: 1,
        }
    }

    /// Runs one read or write to completion (or `timeout`): the result, the buffer, and how
    /// long it took.
    pub fn io(
        &mut self,
        write: bool,
        lba: u64,
        buf: Vec<u8>,
        timeout: Duration,
    ) -> (Result<(), IoError>, Vec<u8>, Duration) {
        let n = (buf.len() / self.block_size) as u32;
        let tag = self.next_tag;
        self.next_tag += 1;
        let t0 = Instant::now();
        let r = if write {
            self.qp.write(1, lba, n, buf, tag)
        } else {
            self.qp.read(1, lba, n, buf, tag)
        };
        if let Err(e) = r {
            panic!("submit refused: {:?}", e.kind);
        }
        let mut out = None;
        while out.is_none() {
            assert!(
                t0.elapsed() < timeout,
                "I/O did not complete in {timeout:?}"
            );
            self.ctrlr.poll();
            self.qp.poll(|c| {
                if c.tag == tag {
                    out = Some((c.result, c.buf.unwrap_or_default()));
                }
            });
            std::thread::sleep(Duration::from_micros(200));
        }
        let (r, b) = out.unwrap();
        (r, b, t0.elapsed())
    }

    pub fn write(&mut self, lba: u64, buf: Vec<u8>) -> Result<(), IoError> {
        self.io(true, lba, buf, Duration::from_secs(20)).0
    }

    pub fn read(&mut self, lba: u64, len: usize) -> Result<Vec<u8>, IoError> {
        let (r, b, _) = self.io(false, lba, vec![0u8; len], Duration::from_secs(20));
        r.map(|_| b)
    }
}

/// Bytes that say where they belong: every 8 bytes carry (seed, offset).
pub fn pattern(seed: u64, lba: u64, len: usize, bs: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, c) in v.chunks_mut(8).enumerate() {
        let x = seed.rotate_left(17) ^ (lba * bs as u64 + i as u64 * 8);
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}
