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
/// byte may have arrived. A resumable scan of brackets, strings and escapes finds that point,
/// keeping its state between reads so each byte is scanned once; a request trickled in one
/// byte per read then costs linear time rather than a fresh parse of the whole buffer on
/// every read.
///
/// Work stays linear for any input: each value reaches the parser once whole (its scanned end
/// is where the parser also finds it complete, since the scan follows the parser's rules for
/// strings and escapes) plus probes of at most twice its length (see `probe`).
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
    scan: Scan,
    /// The pending value's length at which to next try a full parse (see `probe`).
    probe_at: usize,
    /// Bytes given to the JSON parser so far (tests check it stays linear).
    pub parsed_bytes: u64,
}

/// Where the scan of the value at the front of the unconsumed buffer stands. Offsets are
/// into `Framer::buf`.
#[derive(Default)]
struct Scan {
    /// Where the value being scanned begins: white space before it is stepped over.
    start: usize,
    /// The next byte to scan.
    pos: usize,
    depth: usize,
    in_str: bool,
    /// The previous byte was a backslash inside a string.
    esc: bool,
    /// Bytes of a `\uXXXX` escape still to come. The parser takes the four bytes after `\u`
    /// whatever they are, so a quote among them does not end the string for it either.
    hex_left: u8,
    /// Inside a bare number or literal at the top level.
    scalar: bool,
}

impl Scan {
    /// A scan that starts afresh at `at`.
    fn at(at: usize) -> Scan {
        Scan {
            start: at,
            pos: at,
            ..Scan::default()
        }
    }

    /// Scans on from `pos`; returns the end of a value (exclusive) once one may be complete.
    fn find_end(&mut self, buf: &[u8]) -> Option<usize> {
        while self.pos < buf.len() {
            let b = buf[self.pos];
            self.pos += 1;
            if self.in_str {
                if self.hex_left > 0 {
                    self.hex_left -= 1;
                } else if self.esc {
                    self.esc = false;
                    if b == b'u' {
                        self.hex_left = 4;
                    }
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
                // At the top level nothing has begun yet: the value starts after this.
                b' ' | b'\t' | b'\n' | b'\r' if self.depth == 0 => self.start = self.pos,
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
        // Drop what is done with (values handed out, white space) once it is at least half
        // the buffer, so the copy is paid for by those bytes and stays linear overall.
        let done = self.scan.start;
        if done > 0 && done >= self.buf.len() / 2 {
            self.buf.drain(..done);
            self.scan.start = 0;
            self.scan.pos -= done;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes held: the part of a request received so far.
    pub fn buffered(&self) -> usize {
        self.pending().len()
    }

    /// The bytes held (a request not yet whole).
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.scan.start..]
    }

    /// With no value's end in sight, a full parse now and then catches a request that went
    /// wrong early (`{"a" 1`) instead of waiting for a bracket that may never come. Probing
    /// only when the pending value has doubled keeps its probes under twice its length.
    fn probe(&mut self) -> Frame {
        let pending = self.buf.len() - self.scan.start;
        if pending == 0 || pending < self.probe_at {
            return Frame::Incomplete;
        }
        self.probe_at = pending * 2;
        self.parsed_bytes += pending as u64;
        match next_frame(self.pending()) {
            Frame::Malformed(m) => Frame::Malformed(m),
            _ => Frame::Incomplete,
        }
    }

    /// The next whole value, if it has arrived. The count with it is the value's own bytes
    /// (white space before it was dropped as it was scanned past).
    pub fn next_frame(&mut self) -> Frame {
        loop {
            let Some(end) = self.scan.find_end(&self.buf) else {
                return self.probe();
            };
            let start = self.scan.start;
            self.parsed_bytes += (end - start) as u64;
            match next_frame(&self.buf[start..end]) {
                Frame::Value(v, used) => {
                    // A bare number's end is the byte after it, which belongs to what follows.
                    self.scan = Scan::at(start + used);
                    self.probe_at = 0;
                    return Frame::Value(v, used);
                }
                // The scan follows the parser's rules for strings and escapes, so the two
                // should never disagree here. Scanning on still frames right, but each retry
                // parses the value again: the fuzz target's work bound would catch it.
                Frame::Incomplete => continue,
                malformed => return malformed,
            }
        }
    }
}

/// Writes `v` and a newline; returns how many bytes that was.
async fn write_json(stream: &mut UnixStream, v: &Value) -> std::io::Result<usize> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    stream.write_all(&out).await.map(|_| out.len())
}

/// Replies this large leave their JSON tree's many small blocks in malloc's arenas; after
/// one, the heap is trimmed so plexd's memory returns to what it holds for good.
const TRIM_AFTER_REPLY_BYTES: usize = 1 << 20;

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
                        let written = write_json(&mut stream, &resp).await;
                        drop(resp);
                        match written {
                            Err(_) => return,
                            Ok(n) if n >= TRIM_AFTER_REPLY_BYTES => {
                                // SAFETY: malloc_trim only returns free heap pages to the
                                // kernel.
                                unsafe { libc::malloc_trim(0) };
                            }
                            Ok(_) => {}
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
        let cases: [&[u8]; 13] = [
            br#"{"a":1}  {"b":[2,{"c":"}]\"{"}]} "#,
            // A quote inside the four bytes after `\u` does not end the string.
            br#""\u0041" "\u"""" "x""#,
            br#"{"s":"\ud83d\ude00"} ["\ud83d\u"}"]"] "#,
            br#""\ud83d" "\ud83d\"" 1"#,
            b"[\"\\u12\"]\"]",
            b"\"\xff\\u\"\"\"2\"",
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

    /// A fuzzer finding: an unfinished string with invalid UTF-8 and a `\\u` escape cut short
    /// by quotes. The scanner took `\\u"` for a whole escape and the closing quote after it for
    /// the string's end while the parser wanted four more bytes, so every later quote sent the
    /// whole buffer through the parser again.
    #[test]
    fn the_fuzzed_unicode_escape_cut_short_is_framed_in_linear_work() {
        let mut input = b"C1\"".to_vec();
        input.extend_from_slice(&[0xff; 128]);
        input.extend_from_slice(b"C\\u\"\"\"2\"CT");
        assert_eq!(input.len(), 141);
        // As the fuzz target reads its input: the first byte picks the piece size, and a
        // newline ends the stream.
        let step = input[0] as usize % 64 + 1;
        let mut stream = input[1..].to_vec();
        stream.push(b'\n');
        let (vals, bad, parsed) = framed(&stream, step);
        assert_eq!((vals, bad), (vec![json!(1)], true));
        assert!(
            parsed <= 4 * stream.len() as u64 + 64,
            "{parsed} bytes parsed for a {}-byte stream",
            stream.len()
        );
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
