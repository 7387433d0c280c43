//! The completion queue entry.

use super::*;

/// A 16-byte completion queue entry.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Completion {
    /// DW0: command specific result.
    pub result: U32,
    /// DW1: command specific (upper half of 64-bit results such as Property Get).
    pub dw1: U32,
    /// SQ head pointer.
    pub sqhd: U16,
    /// SQ identifier.
    pub sqid: U16,
    /// Identifier of the completed command.
    pub cid: U16,
    /// Status word: phase tag and [`Status`].
    pub status: U16,
}
const _: () = assert!(core::mem::size_of::<Completion>() == 16);

impl Default for Completion {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl Completion {
    /// Size of a completion queue entry in bytes.
    pub const SIZE: usize = 16;

    /// A completion for `cid` with `status`, phase 0 and zero result.
    pub fn new(cid: u16, status: Status) -> Self {
        let mut c = Self::new_zeroed();
        c.cid.set(cid);
        c.status.set(status.to_word(false));
        c
    }

    /// A successful completion for `cid` with result DW0.
    pub fn success(cid: u16, result: u32) -> Self {
        let mut c = Self::new(cid, Status::SUCCESS);
        c.result.set(result);
        c
    }

    /// Reads a completion from the first 16 bytes of `bytes` (copying it).
    pub fn read(bytes: &[u8]) -> Option<Self> {
        Self::read_from_prefix(bytes).ok().map(|(c, _)| c)
    }

    /// Command identifier.
    pub fn cid(&self) -> u16 {
        self.cid.get()
    }

    /// Decoded status (without phase).
    pub fn status(&self) -> Status {
        Status::from_word(self.status.get())
    }

    /// Phase tag.
    pub fn phase(&self) -> bool {
        self.status.get() & PHASE_BIT != 0
    }

    /// Sets the status, keeping the current phase tag.
    pub fn set_status(&mut self, status: Status) {
        let p = self.phase();
        self.status.set(status.to_word(p));
    }

    /// Sets the phase tag, keeping the status.
    pub fn set_phase(&mut self, phase: bool) {
        let s = self.status();
        self.status.set(s.to_word(phase));
    }

    /// DW0 | DW1 << 32, for 64-bit results (Property Get of an 8-byte property).
    pub fn result64(&self) -> u64 {
        u64::from(self.result.get()) | (u64::from(self.dw1.get()) << 32)
    }

    /// Sets DW0 and DW1 from a 64-bit result.
    pub fn set_result64(&mut self, v: u64) {
        self.result.set(v as u32);
        self.dw1.set((v >> 32) as u32);
    }
}
