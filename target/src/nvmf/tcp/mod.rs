//! The NVMe/TCP transport: listeners and per-reactor poll groups of connections.

pub mod conn;
pub mod fuzzing;
pub mod group;
pub mod listener;

use crate::reactor::{fn_poller, ReactorCtx};
use conn::Conn;
use group::PollGroup;

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
    let inbox = ctx.local::<Inbox>();
    inbox.new.push(conn);
    if inbox.started {
        return;
    }
    let mut group = match PollGroup::new(ctx) {
        Ok(g) => g,
        Err(e) => {
            // The connection is dropped (closed); the next one tries again.
            tracing::error!("nvmf/tcp: no poll group on reactor {}: {e}", ctx.id());
            ctx.local::<Inbox>().new.clear();
            return;
        }
    };
    ctx.local::<Inbox>().started = true;
    let name = format!("nvmf_tcp_poll_group_{:03}", ctx.id());
    ctx.add_poller(fn_poller(name, move |ctx| {
        let inbox = ctx.local::<Inbox>();
        for c in inbox.new.drain(..) {
            group.add(c);
        }
        group.poll()
    }));
}
