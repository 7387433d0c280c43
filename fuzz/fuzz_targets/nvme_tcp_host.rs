//! The NVMe/TCP host's receive path on arbitrary bytes from a target: ICResp, the Connect
//! response, CapsuleResp, C2HData (staged and read in place, with digests), R2T and
//! C2HTermReq, whole or in pieces. plexd runs this host for its remote plexes, so it must
//! never panic, and every command must come back exactly once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    initiator::fuzzing::run(data);
});
