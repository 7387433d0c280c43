//! The mirror's on-disk metadata, as bytes: where it sits on a plex ([`Layout`]), the header kept
//! in two alternating slots ([`Superblock`], [`pick_header`]), and the write-intent bitmap kept in
//! one checksummed chunk per block ([`encode_chunk`], [`decode_bitmap`], [`Bitmap`]).
//!
//! No I/O here: the mirror reads and writes the block ranges this module names and hands the
//! bytes over. Every decoder takes untrusted bytes and answers with an [`SbError`], never a panic
//! (fuzzed by `fuzz/fuzz_targets/mirror_superblock.rs`). The format is written down in
//! `docs/mirror-on-disk-format.md`; a change here is a change there.

use std::fmt;
use std::ops::Range;
use thiserror::Error;
use uuid::Uuid;

/// The format this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_MAGIC: [u8; 8] = *b"PLXMIRSB";
pub const CHUNK_MAGIC: [u8; 8] = *b"PLXMIRBM";
/// Bytes of a header that carry meaning (and the CRC's coverage). A slot is this rounded up to
/// whole blocks; bytes past it are ignored on read and written as zero.
pub const HEADER_BYTES: usize = 4096;
/// Bytes at the start of each bitmap chunk before its bits.
pub const CHUNK_HEADER_BYTES: usize = 32;
/// Plexes a v1 mirror may have.
pub const MAX_PLEXES: usize = 3;
/// Plex records the v1 header has room for; records past [`MAX_PLEXES`] must be zero.
pub const PLEX_RECORD_SLOTS: usize = 4;
pub const MAX_NAME_BYTES: usize = 64;
pub const MAX_NODE_BYTES: usize = 32;
pub const MAX_LOCATION_BYTES: usize = 128;
pub const DEFAULT_REGION_SIZE: u64 = 1 << 20;
pub const MIN_REGION_SIZE: u64 = 64 << 10;
pub const MAX_REGION_SIZE: u64 = 1 << 30;
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 64 << 10;
/// Mirror data starts on a multiple of this many bytes, so the data of a 4 KiB-sector or
/// RAID-striped plex stays aligned whatever the bitmap's size.
pub const DATA_ALIGN_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SbError {
    #[error("bad magic {found:02x?}: not plexstor mirror metadata")]
    BadMagic { found: [u8; 8] },
    #[error("format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("inconsistent metadata: {0}")]
    Inconsistent(String),
    #[error("metadata of mirror {found}, expected mirror {expected}")]
    ForeignMirror { expected: Uuid, found: Uuid },
    #[error("{got} bytes given, {need} needed")]
    ShortBuffer { need: u64, got: u64 },
    #[error("plex too small: metadata and one data block need {need_blocks} blocks, plex has {have_blocks}")]
    PlexTooSmall { need_blocks: u64, have_blocks: u64 },
    #[error("invalid geometry: {0}")]
    Geometry(String),
    #[error("no valid header: slot A: {a}; slot B: {b}")]
    NoValidHeader { a: Box<SbError>, b: Box<SbError> },
}

mod bitmap;
mod header;
mod layout;
#[cfg(test)]
mod tests;

pub use bitmap::*;
pub use header::*;
pub use layout::*;

fn inconsistent(msg: impl Into<String>) -> SbError {
    SbError::Inconsistent(msg.into())
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn get_uuid(b: &[u8], off: usize) -> Uuid {
    Uuid::from_bytes(b[off..off + 16].try_into().expect("16 bytes"))
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// CRC32C of `bytes` with the 4-byte field at `crc_off` taken as zero.
fn crc_skipping(bytes: &[u8], crc_off: usize) -> u32 {
    let crc = crc32c::crc32c(&bytes[..crc_off]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &bytes[crc_off + 4..])
}
