//! Listening sockets: each accepted by a thread of its own, which hands every connection
//! round-robin to a reactor's poll group.
//!
//! The acceptor thread sleeps in a blocking `accept` and wakes only for a connection, so no
//! reactor pays for accepting (no failed `accept4` polled on a busy loop, no throttle delaying
//! a new connection), and no reactor is special: every one, reactor 0 included, only receives
//! connections, and one that is busy does not hold up the others' new connections. Stopping a
//! listener shuts its socket down, which wakes the blocked `accept` (Linux returns EINVAL), and
//! joins the thread, so the port is free again when `stop` returns.

use super::conn::Conn;
use crate::app::App;
use crate::nvmf::subsystem::ListenAddr;
use crate::nvmf::{NvmfError, TransportOpts};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the acceptor waits after an accept error other than a stop (out of descriptors,
/// say) before it tries again, so a persistent error does not spin a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Stops a listener: closes the socket and ends its acceptor thread.
pub struct ListenerHandle {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ListenerHandle {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: shutdown on a descriptor the Arc keeps open; it only changes socket state.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// Binds `addr` (errors reach the RPC caller) and starts its acceptor thread.
pub fn start(
    app: &App,
    addr: &ListenAddr,
    opts: Arc<TransportOpts>,
) -> Result<ListenerHandle, NvmfError> {
    let sa = addr
        .socket_addr()
        .ok_or_else(|| NvmfError::InvalidParam(format!("bad address {addr}")))?;
    let listen_err = |source| NvmfError::Listen {
        addr: addr.to_string(),
        source,
    };
    let l = Arc::new(TcpListener::bind(sa).map_err(listen_err)?);
    let stop = Arc::new(AtomicBool::new(false));
    let target = app.nvmf.clone();
    let reactors = app.reactors.handles().clone();
    if reactors.is_empty() {
        return Err(NvmfError::InvalidParam("no reactor".into()));
    }
    let (listener, stopped, a) = (l.clone(), stop.clone(), addr.clone());
    let thread = std::thread::Builder::new()
        .name(format!("nvmf_tcp_accept_{}", addr.trsvcid))
        .spawn(move || {
            let addr = a;
            loop {
                let accepted = listener.accept();
                if stopped.load(Ordering::Acquire) {
                    break;
                }
                match accepted {
                    Ok((sock, _)) => {
                        let h = &reactors[target.next_reactor(reactors.len())];
                        let (t, o, a) = (target.clone(), opts.clone(), addr.clone());
                        let id = h.id();
                        h.send(move |ctx| match Conn::new(sock, t, o, a, id) {
                            Ok(c) => super::add_conn(ctx, Box::new(c)),
                            Err(e) => {
                                crate::log_limited!(WARN, "nvmf/tcp: cannot set up connection: {e}")
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        crate::log_limited!(WARN, "nvmf/tcp: accept on {addr}: {e}");
                        std::thread::sleep(ERROR_BACKOFF);
                    }
                }
            }
            tracing::info!("nvmf/tcp: stopped listening on {addr}");
        })
        .map_err(listen_err)?;
    tracing::info!("nvmf/tcp: listening on {addr}");
    Ok(ListenerHandle {
        stop,
        listener: l,
        thread: Mutex::new(Some(thread)),
    })
}
