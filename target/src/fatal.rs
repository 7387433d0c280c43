//! What plexd does when its own code panics: it exits, at once and loudly.
//!
//! A panic is a bug. Before this policy, a panic in a poller ended its reactor thread in
//! silence: every connection and queue pair on that reactor hung, RPCs that reached it never
//! answered, and the listener kept handing it new connections. No part of plexd can repair
//! state a reactor owned when it died, so the only state that is known to be good is a fresh
//! process. The panic hook therefore prints one line naming the thread, the reactor's poller
//! (or message) that was running, the panic message and its source location, then a
//! backtrace, and ends the process with [`PANIC_EXIT_STATUS`]. The supervisor (systemd's
//! `Restart=on-failure`, a Kubernetes pod) starts plexd again from its config, and hosts
//! reconnect as they do after any target restart.
//!
//! - On reactor threads the policy holds wherever the reactors run (plexd, and tests that
//!   start reactors in their own process: a dead reactor there must fail loudly, not hang).
//! - On every other thread (JSON-RPC, control-plane runtime, `bdev_nvme`'s controller
//!   threads, the main thread) it holds once the process asked for it with
//!   [`install_process_wide`], which `plexd`'s `main` does first thing; in-process tests keep
//!   the default hook so that a failed assertion stays a failed test.
//! - The hook runs before any unwinding, so neither a `catch_unwind` (tokio catches panics of
//!   its tasks) nor `panic = "abort"` can lose the message; the release profile keeps
//!   `panic = "unwind"` all the same.
//! - The process ends with `_exit`: no destructors or `atexit` handlers run while other
//!   threads still use the state they would tear down.

use std::any::Any;
use std::cell::Cell;
use std::io::Write;
use std::panic::Location;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

/// plexd's exit status after a panic: `EX_SOFTWARE` ("internal software error") of
/// sysexits.h. Start-up errors (bad arguments, a config refused) exit with 1, so a supervisor
/// may restart on 70 and stop on 1 (systemd: `RestartPreventExitStatus=1`).
pub const PANIC_EXIT_STATUS: i32 = 70;

static PROCESS_WIDE: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

thread_local! {
    /// Set once on a reactor thread when its loop starts.
    static ON_REACTOR: Cell<bool> = const { Cell::new(false) };
    /// The name of the poller the reactor is running right now, if any: a pointer to the
    /// poller's name, which its slot owns and keeps alive for as long as the poll runs.
    static POLLER: Cell<Option<*const str>> = const { Cell::new(None) };
}

/// Installs the hook (once per process). Reactors call this when they start.
pub fn install_hook() {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if ON_REACTOR.with(Cell::get) || PROCESS_WIDE.load(Ordering::Acquire) {
                die(info.payload(), info.location());
            }
            previous(info);
        }));
    });
}

/// Makes a panic on any thread of this process end it (what `plexd` does).
pub fn install_process_wide() {
    PROCESS_WIDE.store(true, Ordering::Release);
    install_hook();
}

/// Marks the calling thread as a reactor.
pub(crate) fn enter_reactor() {
    install_hook();
    ON_REACTOR.with(|c| c.set(true));
}

/// Records which poller runs now (`None` between pollers). One thread-local store: cheap
/// enough for every poll.
#[inline]
pub(crate) fn set_poller(name: Option<&str>) {
    POLLER.with(|c| c.set(name.map(|n| n as *const str)));
}

fn die(payload: &(dyn Any + Send), location: Option<&Location<'_>>) -> ! {
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("unnamed thread");
    let what = if ON_REACTOR.with(Cell::get) {
        match POLLER.with(Cell::get) {
            // SAFETY: set_poller stores the name of the poller being polled on this thread;
            // its slot (and so the name) lives until the poll returns, and we are inside it.
            Some(name) => format!(" in poller {:?}", unsafe { &*name }),
            None => " outside any poller (a message or the reactor itself)".to_string(),
        }
    } else {
        String::new()
    };
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.as_str()
    } else {
        "(a panic without a message)"
    };
    let at = location
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_else(|| "an unknown location".into());
    let head = format!(
        "plexd: FATAL: panic on thread {thread}{what}: {msg}, at {at}\n\
         plexd: this is a bug in plexd; exiting with status {PANIC_EXIT_STATUS} so that its \
         supervisor restarts it and hosts reconnect\n"
    );
    let mut err = std::io::stderr().lock();
    // The line that says what happened goes out before the backtrace, which may take a while
    // to symbolize.
    let _ = err.write_all(head.as_bytes());
    let _ = err.flush();
    if std::env::var_os("RUST_BACKTRACE").as_deref() != Some("0".as_ref()) {
        let bt = std::backtrace::Backtrace::force_capture();
        let _ = writeln!(err, "plexd: backtrace:\n{bt}");
        let _ = err.flush();
    }
    // SAFETY: _exit ends the process without running anything else; always safe to call.
    unsafe { libc::_exit(PANIC_EXIT_STATUS) }
}

/// A hidden JSON-RPC method that makes plexd panic where a test asks, to test the policy
/// above. Only in builds with the cargo feature `fault-injection` (never in a release built
/// as documented), so no request can trigger it in production, by accident or otherwise.
#[cfg(feature = "fault-injection")]
pub mod injection {
    use crate::app::App;
    use crate::reactor::{fn_poller, PollStatus};
    use crate::rpc::{Methods, RpcError};
    use serde::Deserialize;
    use std::sync::Arc;

    pub const METHOD: &str = "plexd_inject_panic";

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "lowercase")]
    enum Site {
        /// A poller added to the reactor, panicking on its first run.
        Poller,
        /// A message run on the reactor.
        Message,
        /// The RPC handler itself, on a control-plane thread.
        Rpc,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inject {
        site: Site,
        /// The reactor's index (0..n in core-mask order).
        #[serde(default)]
        reactor: usize,
    }

    pub fn register(m: &mut Methods) {
        m.add(METHOD, |app: Arc<App>, p: Inject| async move {
            let h = app
                .reactors
                .get(p.reactor)
                .cloned()
                .ok_or_else(|| RpcError::invalid_params(format!("no reactor {}", p.reactor)))?;
            match p.site {
                Site::Poller => h.send(|ctx| {
                    ctx.add_poller(fn_poller("fault_injection", |_| -> PollStatus {
                        panic!("injected panic (fault-injection)")
                    }));
                }),
                Site::Message => h.send(|_| panic!("injected panic (fault-injection)")),
                Site::Rpc => panic!("injected panic (fault-injection)"),
            }
            Ok::<_, RpcError>(true)
        });
    }
}
