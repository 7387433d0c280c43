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

async fn write_json(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    stream.write_all(&out).await
}

fn error_reply(e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": null, "error": {"code": e.code, "message": e.message}})
}

async fn serve_connection(app: Arc<App>, mut stream: UnixStream) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // Answer every complete request already buffered, in order.
        loop {
            match next_frame(&buf) {
                Frame::Value(req, used) => {
                    buf.drain(..used);
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
        if buf.iter().all(u8::is_ascii_whitespace) {
            buf.clear();
        }
        if buf.len() > MAX_REQUEST_BYTES {
            let e = RpcError::new(
                super::INVALID_REQUEST,
                format!("request larger than {MAX_REQUEST_BYTES} bytes"),
            );
            let _ = write_json(&mut stream, &error_reply(e)).await;
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) => {
                if !buf.is_empty() {
                    tracing::debug!("rpc client left with {} bytes of a request", buf.len());
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
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
}
