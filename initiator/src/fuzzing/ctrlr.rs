//! Drives a whole [`Controller`] over NVMe/TCP against a target whose answers a fuzz input
//! scripts, for the fuzz target `fuzz/fuzz_targets/nvme_tcp_ctrlr.rs`. The queue harness
//! (`super`) puts raw bytes on the wire; this one speaks the protocol correctly and lies in
//! what it says: register values, Identify data, namespace lists, features granted, error
//! statuses, short data, answers given twice or never, asynchronous events, dropped
//! connections. What plexd's controller layer does with those answers (bring-up, the
//! namespace scan, I/O queue creation, keep-alive, async events, reset and reconnect,
//! shutdown) must end in an error or a working controller, never in a panic, and never lose
//! or double-complete an I/O.
//!
//! The target (`target.rs`) runs on its own thread, since bring-up waits for its answers.

use std::time::{Duration, Instant};

use crate::ctrlr::{Controller, CtrlrEvent, CtrlrState};
use crate::error::IoError;
use crate::opts::CtrlrOpts;
use crate::qpair::IoCompletion;
use crate::trid::TransportId;
use nvme_spec::Status;

mod target;

use target::{Running, SUBNQN};

/// What the host did in one run, for the tests to check.
#[derive(Debug, Default)]
struct Outcome {
    connected: bool,
    namespaces: usize,
    /// The I/O that came back, by tag, with whether it succeeded.
    io: Vec<(u64, bool)>,
    /// The controller was back up after the reset.
    reconnected: bool,
    /// What the controller reported to its owner, in order.
    events: Vec<CtrlrEvent>,
    /// Commands the target answered, shutdown included.
    answered: usize,
    /// Entries of the discovery log read (discovery mode), if it was read.
    discovered: Option<usize>,
}

/// The I/O the run submits: (tag, write?, blocks).
fn io_plan(size: u8) -> [(u64, bool, u32); 2] {
    let blocks = [1, 8, 128, 256][usize::from(size & 3)];
    [(1, false, blocks), (2, true, blocks)]
}

/// Polls `ctrlr` and `qpair` for `at_least`, then until both I/O are back or `limit` passes.
fn drive(
    ctrlr: &mut Controller,
    qpair: &mut crate::qpair::IoQpair<Vec<u8>>,
    back: &mut Vec<IoCompletion<Vec<u8>>>,
    at_least: Duration,
    limit: Duration,
) {
    let start = Instant::now();
    while (back.len() < 2 || start.elapsed() < at_least) && start.elapsed() < limit {
        ctrlr.poll();
        if qpair.poll(|c| back.push(c)) == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    // What the admin queue received meanwhile (an event the target sent before the I/O's
    // answers, say) is handled before the run goes on.
    for _ in 0..16 {
        if !ctrlr.poll() {
            break;
        }
    }
}

/// Fuzz entry. The first byte: bits 0 and 1 ask for header and data digests; bit 2 turns on
/// keep-alive (KATO 10 ms, so a few go out while the I/O runs); bit 3 opens an I/O queue and
/// submits a read and a write on the first namespace (bits 4 and 5: 1, 8, 128 or 256
/// blocks); bit 6 resets the controller afterwards, so bring-up runs again on a new
/// connection; bit 7 connects to the discovery NQN instead and reads the discovery log (the
/// other bits then have no effect). The rest is the target's script (see `target::Answer`).
pub fn run(input: &[u8]) {
    super::ignore_sigpipe();
    let _ = run_inner(input, FUZZ_PATIENCE);
}

/// How long the host waits for an answer the target holds back (connect, admin command, I/O)
/// when fuzzing: far longer than loopback needs, short enough to keep the fuzzer fast.
const FUZZ_PATIENCE: Duration = Duration::from_millis(50);

/// One run; `patience` bounds each wait for the target (see [`FUZZ_PATIENCE`]).
fn run_inner(input: &[u8], patience: Duration) -> Outcome {
    let mut out = Outcome::default();
    let Some((&mode, script)) = input.split_first() else {
        return out;
    };
    let Some(mut target) = Running::start(script) else {
        return out;
    };
    let keep_alive = if mode & 4 != 0 {
        Duration::from_millis(10)
    } else {
        Duration::ZERO
    };
    let opts = CtrlrOpts {
        hdgst: mode & 1 != 0,
        ddgst: mode & 2 != 0,
        keep_alive_timeout: keep_alive,
        admin_queue_size: 8,
        io_queue_size: 8,
        connect_timeout: patience,
        // Reached only when the target holds an answer back and keeps the connection.
        admin_timeout: patience,
        // An I/O held back is aborted, then the controller reset (checked every 100 ms).
        io_timeout: Some(patience),
        reconnect_delay: Duration::ZERO,
        ctrlr_loss_timeout: Some(Duration::ZERO),
        ..CtrlrOpts::default()
    };
    let subnqn = if mode & 128 != 0 {
        nvme_spec::fabrics::DISCOVERY_NQN
    } else {
        SUBNQN
    };
    let trid = TransportId::tcp(target.addr, subnqn);
    let Ok(mut ctrlr) = Controller::connect(&trid, &opts) else {
        return out;
    };
    if trid.is_discovery() {
        out.connected = true;
        out.discovered = crate::discovery::get_log(&mut ctrlr)
            .map(|l| l.entries.len())
            .ok();
        drop(ctrlr);
        out.answered = target.stop();
        return out;
    }
    out.connected = true;
    out.namespaces = ctrlr.namespaces().len();
    check_namespaces(&ctrlr);
    let first = ctrlr.namespaces().first().cloned();
    if let (true, Some(ns)) = (mode & 8 != 0, first) {
        if let Ok(mut qpair) = ctrlr.alloc_io_qpair::<Vec<u8>>(None) {
            let mut back = Vec::new();
            for (tag, write, blocks) in io_plan(mode >> 4) {
                let blocks = blocks.min(u32::try_from(ns.blocks).unwrap_or(u32::MAX));
                let buf = vec![tag as u8; blocks as usize * ns.block_size as usize];
                let r = if write {
                    qpair.write(ns.nsid, 0, blocks, buf, tag)
                } else {
                    qpair.read(ns.nsid, 0, blocks, buf, tag)
                };
                if r.is_err() {
                    // Refused at submit (larger than MDTS, say): back at once, failed.
                    back.push(IoCompletion {
                        tag,
                        result: Err(IoError::Nvme(Status::INVALID_FIELD)),
                        dw0: 0,
                        buf: None,
                    });
                }
            }
            // Long enough for keep-alives to go out (every KATO / 2).
            let at_least = keep_alive * 2;
            // Room for the timeout's abort and reset to run their course.
            drive(&mut ctrlr, &mut qpair, &mut back, at_least, patience * 6);
            qpair.abort_all(|c| back.push(c));
            let mut tags: Vec<u64> = back.iter().map(|c| c.tag).collect();
            tags.sort_unstable();
            assert_eq!(tags, [1, 2], "every I/O comes back exactly once");
            out.io = back.iter().map(|c| (c.tag, c.result.is_ok())).collect();
            out.io.sort_unstable();
        }
    }
    if mode & 64 != 0 && ctrlr.state() == CtrlrState::Connected {
        ctrlr.reset();
        let until = Instant::now() + patience * 2;
        while ctrlr.state() != CtrlrState::Connected
            && ctrlr.state() != CtrlrState::Failed
            && Instant::now() < until
        {
            ctrlr.poll();
        }
        out.reconnected = ctrlr.state() == CtrlrState::Connected;
        check_namespaces(&ctrlr);
    }
    while let Some(e) = ctrlr.next_event() {
        out.events.push(e);
    }
    // Shuts down through CC.SHN, answered by the script too.
    drop(ctrlr);
    out.answered = target.stop();
    out
}

/// What the owner relies on of a namespace list, whatever the target said.
fn check_namespaces(c: &Controller) {
    let ns = c.namespaces();
    assert!(
        ns.windows(2).all(|w| w[0].nsid < w[1].nsid),
        "namespaces in ascending order, each once"
    );
    for n in ns {
        assert!(n.nsid != 0 && n.blocks > 0, "{n:?}");
        assert!((512..=1 << 16).contains(&n.block_size), "{n:?}");
    }
    let info = c.info();
    assert!(
        info.max_queue_entries >= 2 && info.io_queues >= 1,
        "{info:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answers of a bring-up, in order: Connect, Property Get CAP, VS and CC, Property
    /// Set CC.EN, Property Get CSTS, Identify Controller, Set Features (async event
    /// configuration), the active namespace list, Identify Namespace 1, Set Features (number
    /// of queues). The Asynchronous Event Request is held, and answered by no record.
    const BRING_UP: usize = 11;
    const IO_CONNECT: usize = BRING_UP;
    const READ: usize = BRING_UP + 1;
    const WRITE: usize = BRING_UP + 2;

    /// Mode bits: an I/O queue, with 8- or 128-block I/O; a reset after.
    const IO_8: u8 = 8 | 1 << 4;
    const IO_128: u8 = 8 | 2 << 4;
    const RESET: u8 = 64;
    const DISCOVERY: u8 = 128;

    /// A script answering `at` commands by default, then with `record`.
    fn at(n: usize, record: &[u8]) -> Vec<u8> {
        let mut s = vec![0; n];
        s.extend_from_slice(record);
        s
    }

    fn run_with(mode: u8, script: &[u8]) -> Outcome {
        let mut input = vec![mode];
        input.extend_from_slice(script);
        run_inner(&input, PATIENCE)
    }

    /// Nothing a test waits for is held back, except in `held` below: a loaded machine must
    /// not turn a slow answer into a different outcome.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// As `run_with`, where the target holds an answer back: the host waits `patience`.
    fn held(mode: u8, script: &[u8], patience: Duration) -> Outcome {
        let mut input = vec![mode];
        input.extend_from_slice(script);
        run_inner(&input, patience)
    }

    #[test]
    fn default_answers_bring_the_controller_up_and_run_io_with_every_option() {
        for mode in [IO_8, IO_128 | RESET, IO_8 | 3, IO_128 | 3 | RESET, IO_8 | 4] {
            let o = run_with(mode, &[]);
            assert!(o.connected, "mode {mode:#x}: {o:?}");
            assert_eq!(o.namespaces, 1, "mode {mode:#x}");
            assert_eq!(o.io, [(1, true), (2, true)], "mode {mode:#x}");
            assert_eq!(o.reconnected, mode & RESET != 0, "mode {mode:#x}");
        }
    }

    #[test]
    fn a_refused_connect_or_a_failed_identify_fails_bring_up() {
        let refused = [1, 0x02, 0x00];
        assert!(!run_with(IO_8, &refused).connected);
        assert!(!run_with(IO_8, &at(6, &refused)).connected);
    }

    #[test]
    fn a_dropped_admin_connection_fails_bring_up_and_the_reset_reconnects() {
        assert!(!run_with(0, &at(3, &[4])).connected);
        // The reset's Connect finds the target gone from the old connection, not the new.
        let o = run_with(IO_8 | RESET, &at(WRITE + 1, &[]));
        assert!(o.reconnected, "{o:?}");
    }

    #[test]
    fn io_failed_by_the_target_comes_back_failed() {
        let o = run_with(IO_8, &at(READ, &[1, 0x04, 0x00]));
        assert_eq!(o.io, [(1, false), (2, true)], "{o:?}");
    }

    #[test]
    fn an_answer_given_twice_or_never_loses_no_io() {
        for record in [&[5u8][..], &[4]] {
            for i in [READ, WRITE] {
                let o = run_with(IO_8, &at(i, record));
                assert_eq!(o.io.len(), 2, "{record:?} at {i}: {o:?}");
            }
            // The I/O queue's Connect: the queue is refused, or works.
            let o = run_with(IO_8, &at(IO_CONNECT, record));
            assert!(o.io.is_empty() || o.io.len() == 2, "{o:?}");
        }
        // Held while the connection stays: the read times out and is aborted; still held,
        // the controller is reset, and the read fails once it is back.
        let o = held(IO_8, &at(READ, &[8]), Duration::from_millis(200));
        assert_eq!(o.io, [(1, false), (2, true)], "{o:?}");
        let (down, up) = (CtrlrState::Resetting, CtrlrState::Connected);
        assert_eq!(
            o.events,
            [CtrlrEvent::State(down), CtrlrEvent::State(up)],
            "{o:?}"
        );
        // A write carried by R2T and H2CData, answered twice.
        let o = run_with(IO_128, &at(WRITE, &[5]));
        assert_eq!(o.io.len(), 2, "{o:?}");
    }

    #[test]
    fn a_namespace_change_event_is_read_and_rescanned() {
        // The event: type 2 (notice), info 0 (namespace attribute changed), log page 4.
        let event = [7, 0x02, 0x00, 0x04, 0x00];
        let quiet = run_with(IO_8, &[]);
        let o = run_with(IO_8, &at(READ, &event));
        assert_eq!(o.io, [(1, true), (2, true)], "{o:?}");
        // The Changed Namespace List log page, the namespace list and Identify Namespace 1:
        // the same namespace, so no change is reported.
        assert_eq!(o.answered, quiet.answered + 3, "{o:?}");
        assert!(o.events.is_empty(), "{o:?}");
        // Another event is passed on to the owner as it came, after its log page is read.
        let smart = [7, 0x01, 0x00, 0x02, 0x00];
        let o = run_with(IO_8, &at(READ, &smart));
        assert_eq!(o.answered, quiet.answered + 1, "{o:?}");
        let aen = CtrlrEvent::Aen {
            ty: 1,
            info: 0,
            log_page: 2,
        };
        assert_eq!(o.events, [aen], "{o:?}");
    }

    #[test]
    fn the_discovery_log_is_read_whole_or_refused() {
        let quiet = run_with(DISCOVERY, &[]);
        assert_eq!(quiet.discovered, Some(1));
        // Discovery bring-up: Connect, CAP, VS, CC, CC.EN, CSTS, Identify; then the log's
        // header, its entry, the header again. A header claiming 5,000 records is refused.
        let numrec = [2, 2, 8, 0, 0x88, 9, 0, 0x13];
        assert_eq!(run_with(DISCOVERY, &at(7, &numrec)).discovered, None);
        // An unknown record format is refused.
        assert_eq!(
            run_with(DISCOVERY, &at(7, &[2, 1, 16, 0, 1])).discovered,
            None
        );
        // A generation that moves between the reads: read again, then the same log.
        let o = run_with(DISCOVERY, &at(9, &[2, 1, 0, 0, 2]));
        assert_eq!(o.discovered, Some(1), "{o:?}");
        assert_eq!(o.answered, quiet.answered + 3, "the log read twice: {o:?}");
    }

    #[test]
    fn odd_register_values_and_identify_data_end_in_errors_not_panics() {
        // CAP.MQES 0; CAP all ones; CSTS.CFS.
        for (i, dw) in [(1, [0u8; 8]), (1, [0xff; 8]), (5, [2, 0, 0, 0, 0, 0, 0, 0])] {
            let mut rec = vec![3];
            rec.extend_from_slice(&dw);
            run_with(IO_8, &at(i, &rec));
        }
        // MDTS 1 (a 4 KiB transfer at most): the 64 KiB I/O is refused at submit.
        let o = run_with(IO_128, &at(6, &[2, 1, 77, 0, 1]));
        assert!(o.connected);
        assert_eq!(o.io, [(1, false), (2, false)], "{o:?}");
        // A namespace of block size 2^0 (LBADS 0) is skipped.
        let o = run_with(IO_8, &at(9, &[2, 1, 130, 0, 0]));
        assert!(o.connected);
        assert_eq!(o.namespaces, 0, "{o:?}");
    }
}
