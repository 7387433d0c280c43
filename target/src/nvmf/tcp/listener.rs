//! Listening sockets: accepted on reactor 0, each connection handed round-robin to a
//! reactor's poll group.

use super::conn::Conn;
use crate::app::App;
use crate::nvmf::subsystem::ListenAddr;
use crate::nvmf::{NvmfError, TransportOpts};
use crate::reactor::{fn_poller, now_ns, PollStatus};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How often a listener tries `accept`. Every try is a syscall, and the poller runs on every
/// loop of a busy reactor: trying each loop cost thousands of failed `accept4` calls a second
/// under load. A new connection waits at most this long (a sleeping reactor is woken by the
/// listening socket anyway).
const ACCEPT_INTERVAL_NS: u64 = 1_000_000;

/// Stops a listener; the socket closes on its reactor.
pub struct ListenerHandle {
    stop: Arc<AtomicBool>,
}

impl ListenerHandle {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Binds `addr` (errors reach the RPC caller) and starts accepting on reactor 0.
pub fn start(
    app: &App,
    addr: &ListenAddr,
    opts: Arc<TransportOpts>,
) -> Result<ListenerHandle, NvmfError> {
    let sa = addr
        .socket_addr()
        .ok_or_else(|| NvmfError::InvalidParam(format!("bad address {addr}")))?;
    let l = TcpListener::bind(sa).map_err(|source| NvmfError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| NvmfError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let handle = ListenerHandle { stop: stop.clone() };
    let target = app.nvmf.clone();
    let reactors = app.reactors.handles().clone();
    let addr = addr.clone();
    let home = reactors
        .first()
        .ok_or_else(|| NvmfError::InvalidParam("no reactor".into()))?
        .clone();
    tracing::info!("nvmf/tcp: listening on {addr}");
    home.send(move |ctx| {
        let fd = l.as_raw_fd();
        if let Err(e) = ctx.watch_fd(fd, false) {
            tracing::warn!("nvmf/tcp: cannot watch listener {addr}: {e}");
        }
        let mut last_try = 0u64;
        ctx.add_poller(fn_poller(
            format!("nvmf_tcp_accept_{}", addr.trsvcid),
            move |ctx| {
                if stop.load(Ordering::Acquire) {
                    ctx.unwatch_fd(fd);
                    tracing::info!("nvmf/tcp: stopped listening on {addr}");
                    return PollStatus::Done;
                }
                let now = now_ns();
                if now.wrapping_sub(last_try) < ACCEPT_INTERVAL_NS {
                    return PollStatus::Idle;
                }
                last_try = now;
                let mut busy = false;
                for _ in 0..16 {
                    match l.accept() {
                        Ok((sock, _)) => {
                            busy = true;
                            let i = target.next_reactor(reactors.len());
                            let h = &reactors[i];
                            let (t, o, a) = (target.clone(), opts.clone(), addr.clone());
                            let id = h.id();
                            h.send(move |ctx| match Conn::new(sock, t, o, a, id) {
                                Ok(c) => super::add_conn(ctx, Box::new(c)),
                                Err(e) => tracing::warn!("nvmf/tcp: cannot set up connection: {e}"),
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::warn!("nvmf/tcp: accept on {addr}: {e}");
                            break;
                        }
                    }
                }
                if busy {
                    PollStatus::Busy
                } else {
                    PollStatus::Idle
                }
            },
        ));
    });
    Ok(handle)
}
