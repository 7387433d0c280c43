//! The JSON-RPC socket's framing and request checks over arbitrary bytes, as a client could
//! send them: take values off the front of the buffer, check each as a request, and make sure
//! the server's incremental `Framer`, fed the same bytes in pieces, frames exactly the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexd::rpc::server::{next_frame, Frame, Framer};
use plexd::rpc::{parse_request, MAX_REQUEST_BYTES};
use serde_json::Value;

/// What the server would do with `buf` received whole: the values it answers, and whether
/// it ends on a parse error.
fn frames(mut buf: &[u8]) -> (Vec<Value>, bool) {
    let mut out = Vec::new();
    loop {
        match next_frame(buf) {
            Frame::Value(v, used) => {
                assert!(
                    used > 0 && used <= buf.len(),
                    "frame used {used} of {}",
                    buf.len()
                );
                buf = &buf[used..];
                out.push(v);
            }
            Frame::Incomplete => return (out, false),
            Frame::Malformed(msg) => {
                assert!(!msg.is_empty());
                return (out, true);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_REQUEST_BYTES || data.is_empty() {
        return;
    }
    let (split, data) = (data[0] as usize, &data[1..]);
    let (values, _) = frames(data);
    for v in &values {
        match parse_request(v.clone()) {
            Ok(req) => {
                assert!(req.params.is_object() || req.params.is_null());
                if let Some(id) = &req.id {
                    assert!(id.is_number() || id.is_string() || id.is_null());
                }
            }
            Err(reply) => {
                assert_eq!(reply["jsonrpc"], "2.0");
                assert!(reply["error"]["code"].is_i64());
                assert!(reply["error"]["message"].is_string());
            }
        }
    }
    // The server's framer, fed in pieces of a size the input picks, frames exactly the same
    // values and never fails a stream that whole-buffer framing accepts. A final newline ends a trailing bare
    // number or literal, which the framer rightly waits on.
    let mut stream = data.to_vec();
    stream.push(b'\n');
    let (whole, whole_bad) = frames(&stream);
    let step = split % 64 + 1;
    let mut f = Framer::default();
    let mut got = Vec::new();
    let mut bad = false;
    'feed: for piece in stream.chunks(step) {
        f.push(piece);
        loop {
            match f.next_frame() {
                Frame::Value(v, _) => got.push(v),
                Frame::Incomplete => break,
                Frame::Malformed(_) => {
                    bad = true;
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got, whole);
    if bad {
        assert!(whole_bad, "the framer failed a stream that parses");
    } else if whole_bad {
        // The framer only probes unfinished values now and then; what it holds is malformed.
        assert!(matches!(next_frame(f.pending()), Frame::Malformed(_)));
    }
    // Linear work: each byte reaches the parser a bounded number of times.
    assert!(f.parsed_bytes <= 4 * stream.len() as u64 + 64);
});
