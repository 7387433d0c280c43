use super::*;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

fn test_config(n: usize, idle_poll_us: u64) -> ReactorConfig {
    ReactorConfig {
        cores: vec![0; n]
            .iter()
            .enumerate()
            .map(|(i, _)| i % num_configured_cpus())
            .collect(),
        idle_poll_us,
        pin: false,
    }
}

#[test]
fn core_masks_parse_like_spdk() {
    assert_eq!(parse_core_mask("0x3").unwrap(), vec![0, 1]);
    assert_eq!(parse_core_mask("5").unwrap(), vec![0, 2]);
    assert_eq!(parse_core_mask("[0,1]").unwrap(), vec![0, 1]);
    assert_eq!(parse_core_mask("0-2,5").unwrap(), vec![0, 1, 2, 5]);
    assert!(matches!(
        parse_core_mask("0x0"),
        Err(ReactorError::EmptyMask)
    ));
    assert!(parse_core_mask("zz").is_err());
    assert!(parse_core_mask("3-1").is_err());
    assert_eq!(core_mask_string(&[0, 1]), "0x3");
}

#[test]
fn a_core_the_machine_lacks_is_refused() {
    let cfg = ReactorConfig {
        cores: vec![1000],
        idle_poll_us: 0,
        pin: true,
    };
    assert!(matches!(
        Reactors::start(cfg),
        Err(ReactorError::NoSuchCore { core: 1000, .. })
    ));
}

#[test]
fn messages_run_on_their_reactor_and_answer() {
    let r = Reactors::start(test_config(2, 100)).unwrap();
    for h in r.handles().iter() {
        let (id, name) = h
            .call_blocking(|ctx| (ctx.id(), std::thread::current().name().map(String::from)))
            .unwrap();
        assert_eq!(id, h.id());
        assert_eq!(name.unwrap(), format!("reactor_{}", h.core()));
    }
}

#[test]
fn pollers_run_until_done_and_locals_persist() {
    let r = Reactors::start(test_config(1, 0)).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    r.get(0).unwrap().send(move |ctx| {
        let n = Rc::new(std::cell::Cell::new(0));
        ctx.add_poller(fn_poller("count_to_10", move |ctx| {
            *ctx.local::<u32>() += 1;
            n.set(n.get() + 1);
            c.store(n.get(), Ordering::SeqCst);
            if n.get() == 10 {
                PollStatus::Done
            } else {
                PollStatus::Busy
            }
        }));
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while count.load(Ordering::SeqCst) < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(count.load(Ordering::SeqCst), 10);
    let (pollers, local) = r
        .get(0)
        .unwrap()
        .call_blocking(|ctx| (ctx.pollers().len(), *ctx.local::<u32>()))
        .unwrap();
    assert_eq!(pollers, 0, "a Done poller is removed");
    assert_eq!(local, 10);
}

/// Polls `cond` until it holds; panics with `what` after a deadline far beyond any
/// scheduling delay on a loaded machine.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn idle_reactor_sleeps_and_wakes_for_messages() {
    // A sleep only an event can end: without the wake-up the message would wait an hour,
    // far past the 30 s the test waits for it.
    let r = Reactors::start_with_max_sleep(test_config(1, 50), Duration::from_secs(3600)).unwrap();
    let h = r.get(0).unwrap().clone();
    let shared = h.shared.clone();
    wait_until("the idle reactor to sleep", || {
        shared.sleeping.load(Ordering::SeqCst) && shared.stats.sleeps.load(Ordering::SeqCst) > 0
    });
    let sleeps = shared.stats.sleeps.load(Ordering::SeqCst);
    let wakeups = shared.stats.wakeups.load(Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    h.send(move |_| tx.send(()).unwrap());
    rx.recv_timeout(Duration::from_secs(30))
        .expect("a message wakes a sleeping reactor");
    // Exactly one sleep ended, by an event (the eventfd), not by its time running out.
    assert_eq!(shared.stats.wakeups.load(Ordering::SeqCst), wakeups + 1);
    // Idle again afterwards, it goes back to sleep.
    wait_until("the reactor to sleep again", || {
        shared.stats.sleeps.load(Ordering::SeqCst) > sleeps
    });
    assert_eq!(shared.stats.wakeups.load(Ordering::SeqCst), wakeups + 1);
}

#[test]
fn a_reactor_sleeps_until_a_requested_wake_up() {
    // A poller waiting for time (as rate-limited I/O does): idle, but asks to be run again
    // 2 ms on. Sleeps last an hour unless cut short, so every deadline the poller sees
    // pass proves a sleep ended at the time it asked for, not at MAX_SLEEP.
    let r = Reactors::start_with_max_sleep(test_config(1, 50), Duration::from_secs(3600)).unwrap();
    let h = r.get(0).unwrap().clone();
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    let mut deadline = 0u64;
    h.send(move |ctx| {
        ctx.add_poller(fn_poller("timer", move |_| {
            let now = now_ns();
            if deadline != 0 && now >= deadline {
                seen2.fetch_add(1, Ordering::SeqCst);
                deadline = 0;
            }
            if deadline == 0 {
                deadline = now + 2_000_000;
            }
            wake_by(deadline);
            PollStatus::Idle
        }));
    });
    wait_until("five timed wake-ups", || seen.load(Ordering::SeqCst) >= 5);
    assert!(h.shared.stats.sleeps.load(Ordering::SeqCst) >= 5);
}

#[test]
fn stop_drops_pollers_on_their_thread() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            let on_reactor = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("reactor_"));
            self.0.store(on_reactor, Ordering::SeqCst);
        }
    }
    let dropped_on_reactor = Arc::new(AtomicBool::new(false));
    let r = Reactors::start(test_config(1, 100)).unwrap();
    let d = dropped_on_reactor.clone();
    r.get(0)
        .unwrap()
        .call_blocking(move |ctx| {
            let flag = Flag(d);
            ctx.add_poller(fn_poller("holder", move |_| {
                let _ = &flag;
                PollStatus::Idle
            }));
        })
        .unwrap();
    r.stop();
    assert!(dropped_on_reactor.load(Ordering::SeqCst));
}
