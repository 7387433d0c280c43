//! The host's controller layer over NVMe/TCP against a target that answers every command,
//! correctly framed, with whatever the input says: register values, Identify data, namespace
//! lists, error statuses, short data, answers twice or never, asynchronous events, dropped
//! connections. Bring-up, I/O queues, keep-alive, events, reset and shutdown must end in an
//! error or a working controller, never a panic, and no I/O may be lost or completed twice.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    initiator::fuzzing::ctrlr::run(data);
});
