//! plexd's policy for its own bugs: a panic on any thread, a reactor's poller or message or
//! the JSON-RPC server, ends the process at once with status 70 and a message naming the
//! thread, the poller, the panic and its location, for the supervisor to restart it.
//!
//! The panics are injected through a hidden RPC method that only a build with the cargo
//! feature `fault-injection` has:
//!   cargo test --release -p plexd --features fault-injection --test panic_policy
//! (scripts/test.sh runs it so). Without the feature these tests are not built: `#[ignore]` is
//! kept for tests that need root, which scripts/test.sh runs as root; the plain build instead
//! checks that the method does not exist.

mod plexd_proc;

#[cfg(feature = "fault-injection")]
use plexd::fatal::PANIC_EXIT_STATUS;
use plexd_proc::*;
use serde_json::json;

#[cfg(feature = "fault-injection")]
/// Two reactors where the machine has two cores, to show that a reactor other than 0 is
/// named; else one.
fn mask_and_reactor() -> (&'static str, usize, &'static str) {
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    if ncpu >= 2 {
        ("0-1", 1, "reactor_1")
    } else {
        ("0x1", 0, "reactor_0")
    }
}

#[cfg(feature = "fault-injection")]
/// Injects a panic at `site` and checks that plexd exits by the policy, saying `expect`.
fn injected(site: &str, expect: &[&str]) {
    let (mask, reactor, _) = mask_and_reactor();
    let mut d = Plexd::start(&["-m", mask]);
    // The reactor sites answer before they panic, the RPC site not at all: nobody waits.
    d.send_only(
        "plexd_inject_panic",
        json!({"site": site, "reactor": reactor}),
    );
    let st = d.wait_exit();
    let log = d.log_text();
    assert_eq!(st.code(), Some(PANIC_EXIT_STATUS), "{st}: {log}");
    for e in expect {
        assert!(log.contains(e), "no {e:?} in: {log}");
    }
    assert!(
        log.contains("injected panic (fault-injection), at "),
        "{log}"
    );
    assert!(log.contains("src/fatal.rs:"), "the location: {log}");
}

#[test]
#[cfg(feature = "fault-injection")]
fn a_panic_in_a_poller_ends_plexd_naming_reactor_and_poller() {
    let (_, _, thread) = mask_and_reactor();
    injected(
        "poller",
        &[
            &format!("plexd: FATAL: panic on thread {thread} in poller \"fault_injection\": "),
            "exiting with status 70",
        ],
    );
}

#[test]
#[cfg(feature = "fault-injection")]
fn a_panic_in_a_reactor_message_ends_plexd() {
    let (_, _, thread) = mask_and_reactor();
    injected(
        "message",
        &[&format!(
            "panic on thread {thread} outside any poller (a message or the reactor itself)"
        )],
    );
}

#[test]
#[cfg(feature = "fault-injection")]
fn a_panic_on_the_rpc_server_ends_plexd_too() {
    injected("rpc", &["plexd: FATAL: panic on thread plexd-ctl: "]);
}

#[test]
#[cfg(not(feature = "fault-injection"))]
fn a_build_without_the_feature_has_no_way_to_inject() {
    let d = Plexd::start(&["-m", "0x1"]);
    let (code, msg) = d
        .call("plexd_inject_panic", json!({"site": "poller"}))
        .unwrap_err();
    assert_eq!(code, -32601, "{msg}");
}
