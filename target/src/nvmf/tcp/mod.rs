//! The NVMe/TCP transport: listeners and per-reactor poll groups of connections.

pub mod conn;
pub mod fuzzing;
pub mod listener;

use crate::reactor::{fn_poller, PollStatus, ReactorCtx};
use conn::Conn;

/// Connections handed to this reactor and not yet picked up by its poll group.
#[derive(Default)]
// Boxed: a connection is large (receive buffer, slots); moving pointers keeps hand-off cheap.
#[allow(clippy::vec_box)]
struct Inbox {
    started: bool,
    new: Vec<Box<Conn>>,
}

/// Hands `conn` to the poll group of the reactor we run on, starting the group's poller on
/// first use. One poller drives every connection of the reactor.
pub fn add_conn(ctx: &mut ReactorCtx, conn: Box<Conn>) {
    if let Err(e) = ctx.watch_fd(conn.fd(), false) {
        tracing::warn!("nvmf/tcp: cannot watch connection from {}: {e}", conn.peer);
    }
    let inbox = ctx.local::<Inbox>();
    inbox.new.push(conn);
    if inbox.started {
        return;
    }
    inbox.started = true;
    let mut conns: Vec<Box<Conn>> = Vec::with_capacity(64);
    let name = format!("nvmf_tcp_poll_group_{:03}", ctx.id());
    ctx.add_poller(fn_poller(name, move |ctx| {
        let inbox = ctx.local::<Inbox>();
        if !inbox.new.is_empty() {
            conns.append(&mut inbox.new);
        }
        let mut busy = false;
        let mut i = 0;
        while i < conns.len() {
            let (b, done) = conns[i].poll(ctx);
            busy |= b;
            if done {
                let c = conns.swap_remove(i);
                tracing::debug!("nvmf/tcp: connection from {} closed", c.peer);
            } else {
                i += 1;
            }
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }));
}
