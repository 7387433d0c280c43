//! A small blocking JSON-RPC 2.0 client for plexd's Unix socket.
//!
//! plexd reads a stream of JSON values and answers each request with one JSON value, with or
//! without a newline between them; so a reply is read as the next whole JSON value on the
//! stream. This crate speaks only that wire protocol and links nothing of plexd.

use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// plexd's `-errno` for "no such device": what its delete methods answer for a thing that is
/// already gone.
pub const ENODEV: i64 = -(libc::ENODEV as i64);
/// `-errno` for "exists".
pub const EEXIST: i64 = -(libc::EEXIST as i64);
pub const EAGAIN: i64 = -(libc::EAGAIN as i64);
/// JSON-RPC "invalid params": plexd's answer for some "no such" cases too.
pub const INVALID_PARAMS: i64 = -32602;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The socket could not be reached or broke: the node is taken as down.
    #[error("{socket}: {what}")]
    Unreachable { socket: PathBuf, what: String },
    /// plexd answered with an error.
    #[error("{method}: error {code}: {message}")]
    Rpc {
        method: String,
        code: i64,
        message: String,
    },
    /// The answer was not what JSON-RPC promises.
    #[error("{method}: bad reply: {what}")]
    Protocol { method: String, what: String },
}

impl RpcError {
    pub fn code(&self) -> Option<i64> {
        match self {
            RpcError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, RpcError::Unreachable { .. })
    }

    /// The thing asked for does not exist (teardown treats that as done).
    pub fn is_gone(&self) -> bool {
        self.code() == Some(ENODEV)
    }

    pub fn is_exists(&self) -> bool {
        self.code() == Some(EEXIST)
    }
}

/// One connection to one plexd.
pub struct Client {
    socket: PathBuf,
    writer: UnixStream,
    // Kept across calls: it may hold the start of a later reply.
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    /// Connects; `timeout` bounds each read and write (a hung node is then reported, not
    /// waited on forever).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Client, RpcError> {
        let unreachable = |e: std::io::Error| RpcError::Unreachable {
            socket: socket.to_path_buf(),
            what: e.to_string(),
        };
        let s = UnixStream::connect(socket).map_err(unreachable)?;
        let t = Some(timeout).filter(|t| !t.is_zero());
        s.set_read_timeout(t).map_err(unreachable)?;
        s.set_write_timeout(t).map_err(unreachable)?;
        let r = s.try_clone().map_err(unreachable)?;
        Ok(Client {
            socket: socket.to_path_buf(),
            writer: s,
            reader: BufReader::new(r),
            next_id: 1,
        })
    }

    /// Calls `method`; `params` null sends none.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, RpcError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        let broken = |what: String| RpcError::Unreachable {
            socket: self.socket.clone(),
            what: format!("{method}: {what}"),
        };
        self.writer
            .write_all(req.to_string().as_bytes())
            .map_err(|e| broken(e.to_string()))?;
        let mut values = serde_json::Deserializer::from_reader(&mut self.reader).into_iter();
        let resp: Value = match values.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) if e.is_io() || e.is_eof() => return Err(broken(e.to_string())),
            Some(Err(e)) => {
                return Err(RpcError::Protocol {
                    method: method.into(),
                    what: format!("not JSON: {e}"),
                })
            }
            None => {
                return Err(broken(
                    "plexd closed the connection without an answer".into(),
                ))
            }
        };
        if resp.get("id") != Some(&json!(id)) {
            return Err(RpcError::Protocol {
                method: method.into(),
                what: format!("answer to another request: {resp}"),
            });
        }
        if let Some(e) = resp.get("error") {
            return match (e["code"].as_i64(), e["message"].as_str()) {
                (Some(code), Some(message)) => Err(RpcError::Rpc {
                    method: method.into(),
                    code,
                    message: message.into(),
                }),
                _ => Err(RpcError::Protocol {
                    method: method.into(),
                    what: format!("an error without code and message: {e}"),
                }),
            };
        }
        resp.get("result")
            .cloned()
            .ok_or_else(|| RpcError::Protocol {
                method: method.into(),
                what: format!("neither result nor error: {resp}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A fake plexd that answers each request with `replies[i]`, split in two writes and
    /// without newlines, as a real stream may arrive.
    fn serve(replies: Vec<String>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            for r in replies {
                let _ = s.read(&mut buf).unwrap();
                let (a, b) = r.as_bytes().split_at(r.len() / 2);
                s.write_all(a).unwrap();
                s.flush().unwrap();
                s.write_all(b).unwrap();
            }
        });
        (dir, path)
    }

    #[test]
    fn results_and_errors_are_told_apart_across_split_replies() {
        let (_d, path) = serve(vec![
            r#"{"jsonrpc":"2.0","id":1,"result":[1,2]}"#.into(),
            r#"{"jsonrpc":"2.0","id":2,"error":{"code":-19,"message":"no bdev x"}}"#.into(),
            r#"{"jsonrpc":"2.0","id":3,"error":{"code":"x"}}"#.into(),
        ]);
        let mut c = Client::connect(&path, Duration::from_secs(10)).unwrap();
        assert_eq!(c.call("a", Value::Null).unwrap(), json!([1, 2]));
        let e = c.call("b", json!({})).unwrap_err();
        assert!(e.is_gone(), "{e}");
        assert_eq!(e.to_string(), "b: error -19: no bdev x");
        let e = c.call("c", json!({})).unwrap_err();
        assert!(matches!(e, RpcError::Protocol { .. }), "{e}");
    }

    #[test]
    fn a_dead_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let e = Client::connect(&dir.path().join("none.sock"), Duration::from_secs(1))
            .err()
            .expect("no socket there");
        assert!(e.is_unreachable(), "{e}");
    }
}
