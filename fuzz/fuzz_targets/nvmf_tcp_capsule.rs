//! The NVMe/TCP target's receive path on arbitrary host bytes: PDU decoding, capsule and SGL
//! checks, Connect, admin and I/O commands. It must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    plexd::nvmf::tcp::fuzzing::run_conn(data);
});
