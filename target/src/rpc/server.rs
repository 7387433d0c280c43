//! The Unix socket server: framing, limits, and connection handling.

use super::{handle_request, RpcError, PARSE_ERROR};
use crate::app::App;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The largest single request we buffer; a client sending more is told so and cut off.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// A listening control socket; the file is removed when this is dropped.
pub struct RpcServer {
    path: PathBuf,
    listener: UnixListener,
}

impl RpcServer {
    /// Binds `path` with mode 0600. A stale socket left by a dead plexd is replaced; a live one
    /// is an error, so two daemons never share a socket.
    pub fn bind(path: &Path) -> std::io::Result<RpcServer> {
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another plexd is already serving {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(RpcServer {
            path: path.to_path_buf(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(&self, app: Arc<App>) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(app.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!("rpc accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds and serves in one call.
pub async fn serve(app: Arc<App>, path: &Path) -> std::io::Result<()> {
    let server = RpcServer::bind(path)?;
    server.run(app).await;
    Ok(())
}

/// What the framing found at the front of a buffer.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A whole JSON value and how many bytes it took (with leading white space).
    Value(Value, usize),
    /// Only white space, or a value cut short: read more.
    Incomplete,
    /// Not JSON: the message says where.
    Malformed(String),
}

/// Takes the first JSON value off the front of `buf`.
pub fn next_frame(buf: &[u8]) -> Frame {
    let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    match stream.next() {
        None => Frame::Incomplete,
        // A number that runs to the end of the buffer may go on in the next read ("12" then
        // "3"): wait for the byte that ends it.
        Some(Ok(Value::Number(_))) if stream.byte_offset() == buf.len() => Frame::Incomplete,
        Some(Ok(v)) => Frame::Value(v, stream.byte_offset()),
        Some(Err(e)) if e.is_eof() => Frame::Incomplete,
        Some(Err(e)) => Frame::Malformed(e.to_string()),
    }
}

/// Splits a byte stream into JSON values, handing bytes to the parser only once a value's last
/// byte may have arrived. A scan of brackets, strings and escapes finds that point, so a request
/// trickled in one byte per read costs linear time rather than a fresh parse of the whole
/// buffer on every read.
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
    scan: Scan,
    /// The buffer length at which to next try a full parse (see `probe`).
    probe_at: usize,
    /// Bytes given to the JSON parser so far (tests check it stays linear).
    pub parsed_bytes: u64,
}

/// Where the scan of the value at the front of the buffer stands.
#[derive(Default)]
struct Scan {
    pos: usize,
    depth: usize,
    in_str: bool,
    esc: bool,
    /// Inside a bare number or literal at the top level.
    scalar: bool,
}

impl Scan {
    fn at_top(&self) -> bool {
        self.depth == 0 && !self.in_str && !self.scalar
    }

    /// Scans on from `pos`; returns the end of a value (exclusive) once one may be complete.
    fn find_end(&mut self, buf: &[u8]) -> Option<usize> {
        while self.pos < buf.len() {
            let b = buf[self.pos];
            self.pos += 1;
            if self.in_str {
                if self.esc {
                    self.esc = false;
                } else if b == b'\\' {
                    self.esc = true;
                } else if b == b'"' {
                    self.in_str = false;
                    if self.depth == 0 {
                        return Some(self.pos);
                    }
                }
                continue;
            }
            if self.scalar {
                // A number or literal ends at the first byte that cannot go on with it; the
                // parser sees that byte too, so it knows the number is whole.
                if !(b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.') {
                    self.scalar = false;
                    return Some(self.pos);
                }
                continue;
            }
            match b {
                b'"' => self.in_str = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' if self.depth <= 1 => {
                    self.depth = 0;
                    return Some(self.pos);
                }
                b'}' | b']' => self.depth -= 1,
                b' ' | b'\t' | b'\n' | b'\r' => {}
                _ if self.depth > 0 => {}
                _ if b.is_ascii_alphanumeric() || b == b'-' => self.scalar = true,
                // Not JSON at all: let the parser say so now.
                _ => return Some(self.pos),
            }
        }
        None
    }
}

impl Framer {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held: the part of a request received so far.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The bytes held (a request not yet whole).
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// With no value's end in sight, a full parse now and then catches a request that went
    /// wrong early (`{"a" 1`) instead of waiting for a bracket that may never come. Probing
    /// only when the buffer has doubled keeps the total work linear.
    fn probe(&mut self) -> Frame {
        if self.buf.is_empty() || self.buf.len() < self.probe_at {
            return Frame::Incomplete;
        }
        self.probe_at = self.buf.len() * 2;
        self.parsed_bytes += self.buf.len() as u64;
        match next_frame(&self.buf) {
            Frame::Malformed(m) => Frame::Malformed(m),
            _ => Frame::Incomplete,
        }
    }

    /// The next whole value, if it has arrived.
    pub fn next_frame(&mut self) -> Frame {
        loop {
            // White space between values is dropped as it is scanned past.
            if self.scan.at_top()
                && self.scan.pos > 0
                && self.buf[..self.scan.pos]
                    .iter()
                    .all(u8::is_ascii_whitespace)
            {
                self.buf.drain(..self.scan.pos);
                self.scan.pos = 0;
            }
            let Some(end) = self.scan.find_end(&self.buf) else {
                return self.probe();
            };
            self.parsed_bytes += end as u64;
            match next_frame(&self.buf[..end]) {
                Frame::Value(v, used) => {
                    self.buf.drain(..used);
                    self.scan = Scan::default();
                    self.probe_at = 0;
                    return Frame::Value(v, used);
                }
                // Not expected at a scanned end; scanning on is always safe.
                Frame::Incomplete => continue,
                malformed => return malformed,
            }
        }
    }
}

async fn write_json(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    stream.write_all(&out).await
}

fn error_reply(e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": null, "error": {"code": e.code, "message": e.message}})
}

async fn serve_connection(app: Arc<App>, mut stream: UnixStream) {
    let mut framer = Framer::default();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // Answer every complete request already buffered, in order.
        loop {
            match framer.next_frame() {
                Frame::Value(req, _) => {
                    if let Some(resp) = handle_request(app.clone(), req).await {
                        if write_json(&mut stream, &resp).await.is_err() {
                            return;
                        }
                    }
                }
                Frame::Incomplete => break,
                Frame::Malformed(msg) => {
                    // The stream has lost its framing; nothing after this can be trusted.
                    let e = RpcError::new(PARSE_ERROR, format!("parse error: {msg}"));
                    let _ = write_json(&mut stream, &error_reply(e)).await;
                    return;
                }
            }
        }
        if framer.buffered() > MAX_REQUEST_BYTES {
            let e = RpcError::new(
                super::INVALID_REQUEST,
                format!("request larger than {MAX_REQUEST_BYTES} bytes"),
            );
            let _ = write_json(&mut stream, &error_reply(e)).await;
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) => {
                if framer.buffered() > 0 {
                    tracing::debug!(
                        "rpc client left with {} bytes of a request",
                        framer.buffered()
                    );
                }
                return;
            }
            Ok(n) => framer.push(&chunk[..n]),
            Err(e) => {
                tracing::debug!("rpc read failed: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_back_to_back_and_split() {
        let two = br#"{"a":1}  {"b":2}"#;
        let Frame::Value(v, used) = next_frame(two) else {
            panic!()
        };
        assert_eq!(v, json!({"a":1}));
        let Frame::Value(v, _) = next_frame(&two[used..]) else {
            panic!()
        };
        assert_eq!(v, json!({"b":2}));
        assert_eq!(next_frame(br#"{"a":"#), Frame::Incomplete);
        assert_eq!(next_frame(b"  \n "), Frame::Incomplete);
        assert_eq!(next_frame(b""), Frame::Incomplete);
        assert!(matches!(next_frame(b"{]"), Frame::Malformed(_)));
        assert!(matches!(next_frame(b"nope"), Frame::Malformed(_)));
        assert_eq!(
            next_frame(b"12"),
            Frame::Incomplete,
            "a number may continue"
        );
        assert!(matches!(next_frame(b"12 "), Frame::Value(_, 2)));
    }

    /// Feeds `bytes` to a framer in pieces of `step` and collects what it frames.
    fn framed(bytes: &[u8], step: usize) -> (Vec<Value>, bool, u64) {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            f.push(piece);
            loop {
                match f.next_frame() {
                    Frame::Value(v, _) => out.push(v),
                    Frame::Incomplete => break,
                    Frame::Malformed(_) => return (out, true, f.parsed_bytes),
                }
            }
        }
        (out, false, f.parsed_bytes)
    }

    #[test]
    fn framer_agrees_with_whole_buffer_framing() {
        let cases: [&[u8]; 8] = [
            br#"{"a":1}  {"b":[2,{"c":"}]\"{"}]} "#,
            b"12 true [] \"x\\\"y\" null\n",
            br#"{"a":1]"#,
            b"  \n\t ",
            b"{\"s\":\"\xff\"} ",
            b"} {}",
            br#"{"a":1} nope {"b":2}"#,
            b"-1e+5 -",
        ];
        for case in cases {
            let mut whole = Vec::new();
            let mut rest = case;
            let whole_bad = loop {
                match next_frame(rest) {
                    Frame::Value(v, used) => {
                        whole.push(v);
                        rest = &rest[used..];
                    }
                    Frame::Incomplete => break false,
                    Frame::Malformed(_) => break true,
                }
            };
            for step in [1, 2, 3, 7, case.len().max(1)] {
                let (vals, bad, _) = framed(case, step);
                let shown = String::from_utf8_lossy(case);
                assert_eq!(vals, whole, "{shown} in steps of {step}");
                assert_eq!(bad, whole_bad, "{shown} in steps of {step}");
            }
        }
    }

    #[test]
    fn an_unterminated_malformed_request_is_caught_without_its_end() {
        let mut f = Framer::default();
        f.push(br#"{"jsonrpc" "2.0", "id": 1, "params": {"#);
        assert!(matches!(f.next_frame(), Frame::Malformed(_)));
        let (_, bad, _) = framed(b"[1, 2, \"\n", 9);
        assert!(bad, "a control character in a string");
        // Trickled, it is caught once the buffer has doubled since the last probe.
        let (_, bad, _) = framed(b"[1, 2, \"\n                 ", 1);
        assert!(bad, "a control character in a string, trickled");
    }

    #[test]
    fn a_trickled_request_is_parsed_a_few_times_at_most() {
        let big = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"s":"{}","a":[{}]}}}}"#,
            "}]\\\"".repeat(20_000),
            "[1],".repeat(20_000) + "0"
        );
        let (vals, bad, parsed) = framed(big.as_bytes(), 1);
        assert_eq!((vals.len(), bad), (1, false));
        assert!(
            parsed <= 4 * big.len() as u64,
            "{parsed} bytes parsed for a {}-byte request",
            big.len()
        );
    }
}
