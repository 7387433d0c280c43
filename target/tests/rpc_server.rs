//! The JSON-RPC server of the real `plexd` binary against bad input and real clients, its
//! startup errors, save_config and reload, and `plexctl` over it.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PLEXD: &str = env!("CARGO_BIN_EXE_plexd");
const PLEXCTL: &str = env!("CARGO_BIN_EXE_plexctl");

/// A plexd of our own on a socket in a temp dir; killed when dropped.
struct Plexd {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    /// Where its socket, log and test files live.
    dir: PathBuf,
    _owned: Option<tempfile::TempDir>,
}

fn temp_dir() -> tempfile::TempDir {
    // The build dir is on disk (the uring bdev wants O_DIRECT) and cleaned with it.
    tempfile::Builder::new()
        .prefix("rpc-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

impl Plexd {
    fn start(extra: &[&str]) -> Plexd {
        let owned = temp_dir();
        let dir = owned.path().to_path_buf();
        Self::launch(dir.clone(), dir.join("plexd.sock"), Some(owned), extra)
    }

    /// A plexd in a directory the caller keeps (to restart on the same files).
    fn start_in(dir: &Path, sock: PathBuf, extra: &[&str]) -> Plexd {
        Self::launch(dir.to_path_buf(), sock, None, extra)
    }

    fn launch(
        dir: PathBuf,
        sock: PathBuf,
        owned: Option<tempfile::TempDir>,
        extra: &[&str],
    ) -> Plexd {
        let log = dir.join(format!("plexd-{}.log", std::process::id()));
        let child = spawn_plexd(&sock, &log, extra);
        let d = Plexd {
            child,
            sock,
            log,
            dir,
            _owned: owned,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("plexd did not come up: {}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// One request on a fresh connection; the whole response.
    fn call(&self, method: &str, params: Value) -> Value {
        let mut s = self.connect();
        let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        s.write_all(req.to_string().as_bytes()).unwrap();
        read_value(&mut s).expect("an answer")
    }

    fn ok(&self, method: &str, params: Value) -> Value {
        let r = self.call(method, params);
        assert!(r.get("error").is_none(), "{method} failed: {r}");
        r["result"].clone()
    }

    fn stop(mut self) {
        kill(&mut self.child);
    }
}

impl Drop for Plexd {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

fn kill(child: &mut Child) {
    // SIGTERM first so plexd removes its socket, then make sure.
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn spawn_plexd(sock: &Path, log: &Path, extra: &[&str]) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(PLEXD)
        .args(["--no-pin", "-m", "0x1", "-r"])
        .arg(sock)
        .args(extra)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("plexd starts")
}

/// Runs plexd to its exit (for startup errors), with a deadline.
fn run_plexd(args: &[&str]) -> Output {
    let mut child = Command::new(PLEXD)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("plexd {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Reads one whole JSON value; None when the server closes first.
fn read_value(s: &mut UnixStream) -> Option<Value> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => return Some(v),
            Some(Err(e)) if !e.is_eof() => panic!("server sent bad JSON: {e}"),
            _ => {}
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads `n` values from one stream (responses may arrive in one read).
fn read_values(s: &mut UnixStream, n: usize) -> Vec<Value> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut out = Vec::new();
    while out.len() < n {
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        let mut used = 0;
        while let Some(Ok(v)) = it.next() {
            out.push(v);
            used = it.byte_offset();
        }
        buf.drain(..used);
        if out.len() >= n {
            break;
        }
        let k = s.read(&mut chunk).unwrap();
        assert!(k > 0, "server closed after {} of {n} answers", out.len());
        buf.extend_from_slice(&chunk[..k]);
    }
    out
}

/// True when nothing has arrived to be read (without waiting).
fn nothing_to_read(s: &mut UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = s.read(&mut b);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// True when the server has closed its side (EOF, nothing more to read).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
}

fn error_of(r: &Value) -> (i64, String) {
    let e = r
        .get("error")
        .unwrap_or_else(|| panic!("not an error: {r}"));
    (
        e["code"].as_i64().unwrap(),
        e["message"].as_str().unwrap().to_string(),
    )
}

#[test]
fn malformed_json_gets_a_parse_error_then_close() {
    let d = Plexd::start(&[]);
    let mut s = d.connect();
    s.write_all(br#"{"jsonrpc": "2.0", "id": 1 "method": "spdk_get_version"}"#)
        .unwrap();
    let r = read_value(&mut s).expect("an error reply");
    assert_eq!(error_of(&r).0, -32700);
    assert!(closed(&mut s));
    // Unterminated: the error comes without waiting for a closing brace.
    let mut s = d.connect();
    s.write_all(br#"{"jsonrpc" "2.0", "params": {"#).unwrap();
    let r = read_value(&mut s).expect("an error reply");
    assert_eq!(error_of(&r).0, -32700);
    assert!(closed(&mut s));
    // Others are still served.
    assert!(d.ok("spdk_get_version", Value::Null)["version"].is_string());
}

#[test]
fn a_request_split_across_writes_is_answered_once_whole() {
    let d = Plexd::start(&[]);
    let mut s = d.connect();
    let req = br#"{"jsonrpc": "2.0", "id": 42, "method": "spdk_get_version"}"#;
    let (parts, last) = req.split_at(req.len() - 9);
    for part in parts.chunks(9) {
        s.write_all(part).unwrap();
        s.flush().unwrap();
        // Spaces the writes out so that plexd reads them apart (not a wait for anything),
        // and checks it does not answer a part.
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            nothing_to_read(&mut s),
            "answered before the request was whole"
        );
    }
    s.write_all(last).unwrap();
    let r = read_value(&mut s).unwrap();
    assert_eq!(r["id"], 42);
    assert!(r["result"]["version"].is_string());
}

#[test]
fn two_requests_in_one_write_get_two_answers_in_order() {
    let d = Plexd::start(&[]);
    let mut s = d.connect();
    s.write_all(
        br#"{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"}{"jsonrpc":"2.0","id":2,"method":"rpc_get_methods"}"#,
    )
    .unwrap();
    let rs = read_values(&mut s, 2);
    assert_eq!(
        (rs[0]["id"].clone(), rs[1]["id"].clone()),
        (json!(1), json!(2))
    );
    assert!(rs[1]["result"]
        .as_array()
        .unwrap()
        .contains(&json!("bdev_uring_create")));
}

#[test]
fn an_oversized_request_is_refused_and_closed() {
    let d = Plexd::start(&[]);
    let mut s = d.connect();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"bdev_get_bdevs","params":{"name":""#)
        .unwrap();
    let chunk = vec![b'a'; 1 << 20];
    // plexd may close while we are still writing: stop at the first failed write.
    for _ in 0..8 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let r = read_value(&mut s).expect("an error before the close");
    let (code, msg) = error_of(&r);
    assert_eq!(code, -32600);
    assert!(msg.contains("larger than"), "{msg}");
    assert!(closed(&mut s));
    assert!(d.ok("spdk_get_version", Value::Null)["version"].is_string());
}

#[test]
fn a_client_leaving_mid_request_does_not_disturb_others() {
    let d = Plexd::start(&[]);
    let mut other = d.connect();
    let mut leaver = d.connect();
    leaver
        .write_all(br#"{"jsonrpc":"2.0","id":1,"method":"bdev_malloc_cre"#)
        .unwrap();
    other
        .write_all(br#"{"jsonrpc":"2.0","id":7,"method":"spdk_get_version"}"#)
        .unwrap();
    assert_eq!(read_value(&mut other).unwrap()["id"], 7);
    // The leaver goes mid-request; plexd closing its side shows it has seen that.
    leaver.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        closed(&mut leaver),
        "plexd did not close the half-sent connection"
    );
    drop(leaver);
    other
        .write_all(br#"{"jsonrpc":"2.0","id":8,"method":"bdev_get_bdevs"}"#)
        .unwrap();
    let r = read_value(&mut other).unwrap();
    assert_eq!(
        (r["id"].clone(), r["result"].clone()),
        (json!(8), json!([]))
    );
}

#[test]
fn bad_parameters_name_the_field() {
    let d = Plexd::start(&[]);
    let cases = [
        (
            json!({"name": "M0", "num_blocks": "lots", "block_size": 512}),
            "num_blocks",
        ),
        (
            json!({"name": "M0", "num_blocks": 64, "block_size": 512, "colour": "red"}),
            "colour",
        ),
        (json!({"name": "M0", "block_size": 512}), "num_blocks"),
        (
            json!({"name": "M0", "num_blocks": -1, "block_size": 512}),
            "num_blocks",
        ),
    ];
    for (params, field) in cases {
        let r = d.call("bdev_malloc_create", params.clone());
        let (code, msg) = error_of(&r);
        assert_eq!(code, -32602, "{params}");
        assert!(msg.contains(field), "{params}: {msg}");
    }
    let r = d.call("bdev_malloc_create", json!([64, 512]));
    assert_eq!(error_of(&r).0, -32602, "positional params");
    let r = d.call("bdev_uring_create", json!({"name": "U0", "filename": 7}));
    let (code, msg) = error_of(&r);
    assert_eq!(code, -32602);
    assert!(msg.contains("filename"), "{msg}");
}

#[test]
fn unknown_method_batch_and_invalid_requests() {
    let d = Plexd::start(&[]);
    let (code, msg) = error_of(&d.call("no_such_method", Value::Null));
    assert_eq!(code, -32601);
    assert!(msg.contains("no_such_method"), "{msg}");

    let mut s = d.connect();
    s.write_all(br#"[{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"}]"#)
        .unwrap();
    let (code, msg) = error_of(&read_value(&mut s).unwrap());
    assert_eq!(code, -32600);
    assert!(msg.contains("batch"), "{msg}");

    s.write_all(br#"{"jsonrpc":"1.0","id":2,"method":"spdk_get_version"}"#)
        .unwrap();
    assert_eq!(error_of(&read_value(&mut s).unwrap()).0, -32600);
    s.write_all(br#"{"jsonrpc":"2.0","id":{"x":1},"method":"spdk_get_version"}"#)
        .unwrap();
    assert_eq!(error_of(&read_value(&mut s).unwrap()).0, -32600);
    s.write_all(br#"{"jsonrpc":"2.0","id":3,"method":5}"#)
        .unwrap();
    assert_eq!(error_of(&read_value(&mut s).unwrap()).0, -32600);
    // The connection survives request-level errors.
    s.write_all(br#"{"jsonrpc":"2.0","id":4,"method":"spdk_get_version"}"#)
        .unwrap();
    assert_eq!(read_value(&mut s).unwrap()["id"], 4);
}

#[test]
fn notifications_get_no_reply() {
    let d = Plexd::start(&[]);
    let mut s = d.connect();
    s.write_all(
        br#"{"jsonrpc":"2.0","method":"bdev_null_create","params":{"name":"N0","num_blocks":8,"block_size":512}}
            {"jsonrpc":"2.0","id":9,"method":"bdev_get_bdevs"}"#,
    )
    .unwrap();
    let r = read_value(&mut s).unwrap();
    assert_eq!(r["id"], 9, "the notification was answered: {r}");
    assert_eq!(r["result"][0]["name"], "N0", "but it ran");
}

#[test]
fn socket_is_private_and_taken_once() {
    let d = Plexd::start(&[]);
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let log = d.dir.join("second.log");
    let mut second = spawn_plexd(&d.sock, &log, &[]);
    let status = second.wait().unwrap();
    assert!(!status.success());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(err.contains("already serving"), "{err}");
    // The first one is untouched.
    assert!(d.ok("spdk_get_version", Value::Null)["version"].is_string());
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = temp_dir();
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists(), "a dead listener leaves its file");
    let d = Plexd::start_in(dir.path(), sock, &[]);
    assert!(d.ok("spdk_get_version", Value::Null)["version"].is_string());
}

#[test]
fn save_config_then_restart_with_it_restores_the_bdevs() {
    let dir = temp_dir();
    let sock = dir.path().join("plexd.sock");
    let d = Plexd::start_in(dir.path(), sock.clone(), &[]);
    let img = dir.path().join("u0.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    d.ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 2048, "block_size": 4096}),
    );
    d.ok(
        "bdev_null_create",
        json!({"name": "N0", "num_blocks": 1 << 20, "block_size": 512,
               "uuid": "6a1c3d1e-0b3c-4e59-9d9a-2c4e1b1f0a77"}),
    );
    assert_eq!(
        d.ok(
            "bdev_uring_create",
            json!({"name": "U0", "filename": img, "block_size": 4096}),
        ),
        "U0"
    );
    let summary = |v: &Value| -> Vec<(String, u64, u64, String)> {
        let mut s: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_string(),
                    b["num_blocks"].as_u64().unwrap(),
                    b["block_size"].as_u64().unwrap(),
                    b["uuid"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        s.sort();
        s
    };
    let before = summary(&d.ok("bdev_get_bdevs", Value::Null));
    assert_eq!(before.len(), 3);
    let config = d.ok("save_config", Value::Null);
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    d.stop();
    let d2 = Plexd::start_in(dir.path(), sock, &["-c", path.to_str().unwrap()]);
    let after = summary(&d2.ok("bdev_get_bdevs", Value::Null));
    assert_eq!(before, after);
    d2.stop();
}

#[test]
fn startup_errors_exit_non_zero_and_say_why() {
    let out = run_plexd(&["--no-pin", "-m", "0xZZ", "-r", "/nonexistent/x.sock"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("core mask"), "{err}");

    let out = run_plexd(&[
        "--no-pin",
        "-m",
        "0x8000000000",
        "-r",
        "/nonexistent/x.sock",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("core 39 is not available"), "{err}");

    let dir = temp_dir();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let sock = dir.path().join("s.sock");
    let out = run_plexd(&[
        "--no-pin",
        "-r",
        sock.to_str().unwrap(),
        "-c",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not valid JSON"), "{err}");
}

fn plexctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(PLEXCTL)
        .arg("-s")
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn plexctl_calls_methods_and_prints_tables() {
    let d = Plexd::start(&[]);
    let o = plexctl(
        &d.sock,
        &[
            "call",
            "bdev_malloc_create",
            r#"{"name":"M0","num_blocks":2048,"block_size":512}"#,
        ],
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o).trim(), "\"M0\"");

    let o = plexctl(&d.sock, &["bdev", "list"]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    for col in ["NAME", "MODULE", "SIZE", "BLOCK", "CLAIMED", "UUID"] {
        assert!(header.contains(col), "{header}");
    }
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("M0") && row.contains("malloc") && row.contains("1 MiB"),
        "{row}"
    );

    let o = plexctl(&d.sock, &["bdev", "iostat"]);
    assert!(o.status.success() && stdout(&o).contains("M0"), "{o:?}");
    let o = plexctl(&d.sock, &["reactors"]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).starts_with("CORE"), "{}", stdout(&o));
    assert_eq!(stdout(&o).lines().count(), 2, "one reactor");
    let o = plexctl(&d.sock, &["version"]);
    assert!(stdout(&o).contains("plexstor"), "{o:?}");
    let o = plexctl(&d.sock, &["save-config"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["subsystems"][0]["config"][0]["method"],
        "bdev_malloc_create"
    );

    let o = plexctl(
        &d.sock,
        &["call", "bdev_malloc_delete", r#"{"name":"nope"}"#],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("-19") && err.contains("nope"), "{err}");
    let o = plexctl(&d.sock, &["call", "no_such", "{}"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("-32601"));
    let o = plexctl(&d.sock, &["call", "spdk_get_version", "{oops"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not valid JSON"));
    let o = plexctl(&d.dir.join("none.sock"), &["version"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is plexd running"));
}
