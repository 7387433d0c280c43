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

fn inconsistent(msg: impl Into<String>) -> SbError {
    SbError::Inconsistent(msg.into())
}

// ---- geometry -------------------------------------------------------------------------------

/// One of the two header slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Even sequence numbers live in A, odd in B, so consecutive writes alternate and a torn
    /// write can only damage the slot that did not hold the newest header.
    pub fn for_seq(seq: u64) -> Slot {
        if seq & 1 == 0 {
            Slot::A
        } else {
            Slot::B
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// Where the next header goes after one read from `current`.
pub fn next_slot(current: Slot) -> Slot {
    current.other()
}

fn check_block_size(block_size: u32) -> Result<(), SbError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(SbError::Geometry(format!(
            "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

fn check_region_size(region_size: u64, block_size: u32) -> Result<(), SbError> {
    if !region_size.is_power_of_two()
        || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size)
        || region_size < u64::from(block_size)
    {
        return Err(SbError::Geometry(format!(
            "region size {region_size} is not a power of two from {MIN_REGION_SIZE} to \
             {MAX_REGION_SIZE} and at least the block size {block_size}"
        )));
    }
    Ok(())
}

/// Blocks in one header slot: 4 KiB rounded up to whole blocks.
pub fn header_slot_blocks(block_size: u32) -> Result<u64, SbError> {
    check_block_size(block_size)?;
    Ok(slot_blocks(block_size))
}

fn slot_blocks(block_size: u32) -> u64 {
    (HEADER_BYTES as u64).div_ceil(u64::from(block_size))
}

/// The blocks of a header slot, which a reader needs before it knows the region size (and so
/// the rest of the [`Layout`]).
pub fn header_slot_range(block_size: u32, slot: Slot) -> Result<Range<u64>, SbError> {
    let n = header_slot_blocks(block_size)?;
    let start = match slot {
        Slot::A => 0,
        Slot::B => n,
    };
    Ok(start..start + n)
}

/// Regions one bitmap chunk of `block_size` bytes covers; always a multiple of 64, so a chunk
/// holds whole words of the in-memory [`Bitmap`].
pub fn regions_per_chunk(block_size: u32) -> u64 {
    (u64::from(block_size).saturating_sub(CHUNK_HEADER_BYTES as u64)) * 8
}

/// First data block for a bitmap of `chunks` chunks: past both slots and the chunks, rounded
/// up to [`DATA_ALIGN_BYTES`].
fn data_offset_for(block_size: u32, chunks: u32) -> u64 {
    let bs = u64::from(block_size);
    let end = (2 * slot_blocks(block_size) + u64::from(chunks)) * bs;
    end.next_multiple_of(DATA_ALIGN_BYTES) / bs
}

/// Where everything sits on one plex, in blocks of the plex:
///
/// ```text
/// | slot A | slot B | bitmap chunk 0 .. chunk n-1 | (pad to 1 MiB) | data ...
/// ```
///
/// Data blocks and regions are numbered from the start of the data area, as the mirror's own
/// LBAs are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    block_size: u32,
    region_size: u64,
    plex_blocks: u64,
    /// Chunks reserved for the bitmap; enough for regions over the whole plex at creation.
    bitmap_chunks: u32,
    data_offset_blocks: u64,
    data_blocks: u64,
}

impl Layout {
    /// The layout for a fresh plex of `plex_blocks` blocks: a bitmap big enough for the whole
    /// plex, and data on all the rest.
    pub fn new(block_size: u32, plex_blocks: u64, region_size: u64) -> Result<Layout, SbError> {
        check_block_size(block_size)?;
        check_region_size(region_size, block_size)?;
        let plex_bytes = u128::from(plex_blocks) * u128::from(block_size);
        let plex_bytes = u64::try_from(plex_bytes).map_err(|_| {
            SbError::Geometry(format!(
                "plex of {plex_blocks} blocks of {block_size} bytes exceeds 2^64 bytes"
            ))
        })?;
        let regions = plex_bytes.div_ceil(region_size);
        let chunks = regions.div_ceil(regions_per_chunk(block_size)).max(1);
        let chunks = u32::try_from(chunks).map_err(|_| {
            SbError::Geometry(format!(
                "a bitmap of {regions} regions needs more than 2^32 chunks; use larger regions"
            ))
        })?;
        let data_offset_blocks = data_offset_for(block_size, chunks);
        let need_blocks = data_offset_blocks + 1;
        if plex_blocks < need_blocks {
            return Err(SbError::PlexTooSmall {
                need_blocks,
                have_blocks: plex_blocks,
            });
        }
        Ok(Layout {
            block_size,
            region_size,
            plex_blocks,
            bitmap_chunks: chunks,
            data_offset_blocks,
            data_blocks: plex_blocks - data_offset_blocks,
        })
    }

    /// Checks geometry as a header records it. The smallest plex that holds it is assumed;
    /// [`Layout::from_superblock`] sets the real size.
    fn from_parts(
        block_size: u32,
        region_size: u64,
        bitmap_chunks: u32,
        data_offset_blocks: u64,
        data_blocks: u64,
    ) -> Result<Layout, SbError> {
        check_block_size(block_size).map_err(|e| inconsistent(e.to_string()))?;
        check_region_size(region_size, block_size).map_err(|e| inconsistent(e.to_string()))?;
        let bs = u64::from(block_size);
        if bitmap_chunks == 0 {
            return Err(inconsistent("bitmap has no chunks"));
        }
        let bitmap_end = 2 * slot_blocks(block_size) + u64::from(bitmap_chunks);
        if data_offset_blocks < bitmap_end {
            return Err(inconsistent(format!(
                "data offset {data_offset_blocks} lies inside the metadata, which ends at block {bitmap_end}"
            )));
        }
        if (u128::from(data_offset_blocks) * u128::from(bs)) % u128::from(DATA_ALIGN_BYTES) != 0 {
            return Err(inconsistent(format!(
                "data offset {data_offset_blocks} is not a multiple of {DATA_ALIGN_BYTES} bytes"
            )));
        }
        if data_blocks == 0 {
            return Err(inconsistent("mirror has no data blocks"));
        }
        let end = data_offset_blocks
            .checked_add(data_blocks)
            .filter(|&e| u128::from(e) * u128::from(bs) <= u128::from(u64::MAX))
            .ok_or_else(|| inconsistent("data area ends past 2^64 bytes"))?;
        let layout = Layout {
            block_size,
            region_size,
            plex_blocks: end,
            bitmap_chunks,
            data_offset_blocks,
            data_blocks,
        };
        let capacity = u128::from(bitmap_chunks) * u128::from(layout.regions_per_chunk());
        if u128::from(layout.regions()) > capacity {
            return Err(inconsistent(format!(
                "{} regions do not fit a bitmap of {bitmap_chunks} chunks",
                layout.regions()
            )));
        }
        Ok(layout)
    }

    /// The layout a header describes, on a plex that now has `plex_blocks` blocks. A plex that
    /// grew keeps its geometry (the data never moves); one that shrank below the recorded data
    /// is refused.
    pub fn from_superblock(sb: &Superblock, plex_blocks: u64) -> Result<Layout, SbError> {
        let mut l = Layout::from_parts(
            sb.block_size,
            sb.region_size,
            sb.bitmap_chunks,
            sb.data_offset_blocks,
            sb.mirror_blocks,
        )?;
        if plex_blocks < l.plex_blocks {
            return Err(SbError::PlexTooSmall {
                need_blocks: l.plex_blocks,
                have_blocks: plex_blocks,
            });
        }
        l.plex_blocks = plex_blocks;
        Ok(l)
    }

    /// The same geometry on plexes of (at least) `plex_blocks`, with `data_blocks` of data:
    /// how a mirror grows once every plex has. The data never moves, so the bitmap reserved at
    /// creation bounds the growth ([`Layout::max_data_blocks`]).
    pub fn resized(&self, plex_blocks: u64, data_blocks: u64) -> Result<Layout, SbError> {
        Layout {
            plex_blocks,
            ..*self
        }
        .with_data_blocks(data_blocks)
    }

    /// The most regions the reserved bitmap covers.
    pub fn max_regions(&self) -> u64 {
        u64::from(self.bitmap_chunks) * self.regions_per_chunk()
    }

    /// The most data blocks the reserved bitmap covers.
    pub fn max_data_blocks(&self) -> u64 {
        self.max_regions().saturating_mul(self.region_blocks())
    }

    /// The same layout with a data area of `data_blocks` (the mirror's size, the smallest of
    /// its plexes'), which must fit both the plex and the bitmap.
    pub fn with_data_blocks(&self, data_blocks: u64) -> Result<Layout, SbError> {
        let room = self.plex_blocks - self.data_offset_blocks;
        if data_blocks == 0 || data_blocks > room {
            return Err(SbError::Geometry(format!(
                "{data_blocks} data blocks requested, the plex has room for 1 to {room}"
            )));
        }
        let l = Layout {
            data_blocks,
            ..*self
        };
        let capacity = u128::from(self.bitmap_chunks) * u128::from(self.regions_per_chunk());
        if u128::from(l.regions()) > capacity {
            return Err(SbError::Geometry(format!(
                "{} regions do not fit the bitmap's {} chunks",
                l.regions(),
                self.bitmap_chunks
            )));
        }
        Ok(l)
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    pub fn region_blocks(&self) -> u64 {
        self.region_size / u64::from(self.block_size)
    }

    pub fn plex_blocks(&self) -> u64 {
        self.plex_blocks
    }

    pub fn slot_blocks(&self) -> u64 {
        slot_blocks(self.block_size)
    }

    /// Plex blocks of a header slot.
    pub fn slot_range(&self, slot: Slot) -> Range<u64> {
        let n = self.slot_blocks();
        match slot {
            Slot::A => 0..n,
            Slot::B => n..2 * n,
        }
    }

    /// Chunks reserved for the bitmap (may exceed [`Layout::chunk_count`] once the data area is
    /// smaller than the plex).
    pub fn bitmap_chunks(&self) -> u32 {
        self.bitmap_chunks
    }

    /// Chunks that cover the regions of the data area: the ones to read at open and to write
    /// (zeroed) at creation.
    pub fn chunk_count(&self) -> u32 {
        // Never more than bitmap_chunks, which is a u32.
        self.regions().div_ceil(self.regions_per_chunk()) as u32
    }

    /// Plex block of bitmap chunk `index`.
    pub fn chunk_block(&self, index: u32) -> u64 {
        2 * self.slot_blocks() + u64::from(index)
    }

    /// Plex blocks of the chunks that [`Layout::chunk_count`] counts, in order.
    pub fn bitmap_range(&self) -> Range<u64> {
        let start = self.chunk_block(0);
        start..start + u64::from(self.chunk_count())
    }

    pub fn data_offset_blocks(&self) -> u64 {
        self.data_offset_blocks
    }

    /// The mirror's usable size on this plex, in blocks. Need not be a whole number of regions.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// Regions of the data area; the last one may be partial.
    pub fn regions(&self) -> u64 {
        self.data_blocks.div_ceil(self.region_blocks())
    }

    pub fn regions_per_chunk(&self) -> u64 {
        regions_per_chunk(self.block_size)
    }

    /// Region of a data block (numbered from the start of the data area).
    pub fn region_of(&self, data_block: u64) -> u64 {
        data_block / self.region_blocks()
    }

    /// Regions a run of data blocks touches.
    pub fn regions_of(&self, data_blocks: Range<u64>) -> Range<u64> {
        if data_blocks.is_empty() {
            return 0..0;
        }
        self.region_of(data_blocks.start)..self.region_of(data_blocks.end - 1) + 1
    }

    /// Data blocks of a region; the last region's range stops at the end of the data.
    pub fn region_range(&self, region: u64) -> Range<u64> {
        let rb = self.region_blocks();
        let start = region.saturating_mul(rb).min(self.data_blocks);
        start..start.saturating_add(rb).min(self.data_blocks)
    }

    /// Bitmap chunk holding a region's bit.
    pub fn chunk_of(&self, region: u64) -> u32 {
        u32::try_from(region / self.regions_per_chunk()).unwrap_or(u32::MAX)
    }

    /// Regions whose bits chunk `index` holds, clipped to [`Layout::regions`].
    pub fn regions_in_chunk(&self, index: u32) -> Range<u64> {
        let per = self.regions_per_chunk();
        let regions = self.regions();
        let start = (u64::from(index) * per).min(regions);
        start..(start + per).min(regions)
    }
}

// ---- header ---------------------------------------------------------------------------------

/// What the mirror knows about one plex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlexState {
    /// Holds the same data as every other in-sync plex.
    InSync,
    /// Missed writes since this time; the bitmap says where.
    OutOfSync { since_unix_secs: u64 },
    /// Being copied to; regions before `next_region` are done, so a restart resumes there.
    Resyncing { next_region: u64 },
    /// Added to the mirror, holds nothing of it yet: needs a full copy.
    New,
    /// Taken out of service; the code is the mirror's, this format does not interpret it.
    Faulted { reason: u32 },
}

impl PlexState {
    fn code_and_arg(self) -> (u8, u64) {
        match self {
            PlexState::InSync => (1, 0),
            PlexState::OutOfSync { since_unix_secs } => (2, since_unix_secs),
            PlexState::Resyncing { next_region } => (3, next_region),
            PlexState::New => (4, 0),
            PlexState::Faulted { reason } => (5, u64::from(reason)),
        }
    }

    fn from_code(code: u8, arg: u64) -> Result<PlexState, String> {
        let no_arg = |s| {
            if arg == 0 {
                Ok(s)
            } else {
                Err(format!(
                    "state code {code} carries argument {arg}, must be 0"
                ))
            }
        };
        match code {
            1 => no_arg(PlexState::InSync),
            2 => Ok(PlexState::OutOfSync {
                since_unix_secs: arg,
            }),
            3 => Ok(PlexState::Resyncing { next_region: arg }),
            4 => no_arg(PlexState::New),
            5 => u32::try_from(arg)
                .map(|reason| PlexState::Faulted { reason })
                .map_err(|_| format!("fault reason {arg} exceeds 32 bits")),
            _ => Err(format!("unknown plex state code {code}")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlexRecord {
    pub uuid: Uuid,
    /// Node that serves the plex; at most [`MAX_NODE_BYTES`] bytes, may be empty.
    pub node: String,
    /// How to find it again: a bdev name, or `nqn…/nsid`; at most [`MAX_LOCATION_BYTES`].
    pub location: String,
    pub state: PlexState,
    /// The mirror generation at which this plex was last known in sync.
    pub in_sync_generation: u64,
}

/// A mirror header, the same on every plex but for `this_plex`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every header write; its parity picks the slot ([`Slot::for_seq`]).
    pub seq: u64,
    /// Bumped on every membership or plex-state change.
    pub generation: u64,
    pub mirror_uuid: Uuid,
    /// 1 to [`MAX_NAME_BYTES`] bytes of UTF-8.
    pub mirror_name: String,
    /// The plex this copy of the header lives on; must be in `plexes`.
    pub this_plex: Uuid,
    pub block_size: u32,
    pub region_size: u64,
    /// The mirror's size in blocks.
    pub mirror_blocks: u64,
    /// Plex block where data starts (recorded so data never moves if the plex grows).
    pub data_offset_blocks: u64,
    pub bitmap_chunks: u32,
    /// Set at clean shutdown, cleared before the first write after open: while set, the
    /// bitmap need not be consulted.
    pub clean: bool,
    pub plexes: Vec<PlexRecord>,
}

/// Byte offsets of the v1 header (see docs/mirror-on-disk-format.md).
mod hdr {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const CRC: usize = 12;
    pub const SEQ: usize = 16;
    pub const GENERATION: usize = 24;
    pub const MIRROR_UUID: usize = 32;
    pub const THIS_PLEX: usize = 48;
    pub const BLOCK_SIZE: usize = 64;
    pub const BITMAP_CHUNKS: usize = 68;
    pub const REGION_SIZE: usize = 72;
    pub const MIRROR_BLOCKS: usize = 80;
    pub const DATA_OFFSET: usize = 88;
    pub const FLAGS: usize = 96;
    pub const NAME_LEN: usize = 100;
    pub const PLEX_COUNT: usize = 101;
    pub const NAME: usize = 128;
    pub const PLEXES: usize = 256;
    pub const PLEX_RECORD: usize = 256;
    pub const FLAG_CLEAN: u32 = 1;
    /// Bytes that v1 reserves: zero when written, refused when not.
    pub const RESERVED: [(usize, usize); 3] = [(102, 128), (192, 256), (1280, super::HEADER_BYTES)];
}

/// Byte offsets inside a plex record.
mod rec {
    pub const UUID: usize = 0;
    pub const IN_SYNC_GEN: usize = 16;
    pub const STATE_ARG: usize = 24;
    pub const STATE: usize = 32;
    pub const NODE_LEN: usize = 33;
    pub const LOCATION_LEN: usize = 34;
    pub const NODE: usize = 40;
    pub const LOCATION: usize = 72;
    pub const RESERVED: [(usize, usize); 2] = [(35, 40), (200, 256)];
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

/// A string field: `len` bytes of UTF-8 in a `max`-byte area, the rest zero.
fn get_str(area: &[u8], len: u8, what: &str) -> Result<String, SbError> {
    let len = usize::from(len);
    if len > area.len() {
        return Err(inconsistent(format!(
            "{what} length {len} exceeds its {} bytes",
            area.len()
        )));
    }
    if area[len..].iter().any(|&b| b != 0) {
        return Err(inconsistent(format!(
            "{what} has non-zero bytes past its length"
        )));
    }
    String::from_utf8(area[..len].to_vec())
        .map_err(|_| inconsistent(format!("{what} is not UTF-8")))
}

fn first_nonzero(b: &[u8], range: (usize, usize)) -> Option<usize> {
    b[range.0..range.1]
        .iter()
        .position(|&x| x != 0)
        .map(|p| p + range.0)
}

/// True if sequence number `a` was written after `b`, allowing for wrap-around: the two slots
/// are at most a few writes apart, never 2^63.
fn seq_newer(a: u64, b: u64) -> bool {
    (a.wrapping_sub(b) as i64) > 0
}

impl Superblock {
    /// The first header of a new mirror (seq 0, generation 1, not clean), with its geometry
    /// from `layout`, whose data area must already be the mirror's size.
    pub fn new(
        mirror_uuid: Uuid,
        mirror_name: &str,
        this_plex: Uuid,
        layout: &Layout,
        plexes: Vec<PlexRecord>,
    ) -> Result<Superblock, SbError> {
        let sb = Superblock {
            seq: 0,
            generation: 1,
            mirror_uuid,
            mirror_name: mirror_name.to_owned(),
            this_plex,
            block_size: layout.block_size,
            region_size: layout.region_size,
            mirror_blocks: layout.data_blocks,
            data_offset_blocks: layout.data_offset_blocks,
            bitmap_chunks: layout.bitmap_chunks,
            clean: false,
            plexes,
        };
        sb.validate()?;
        Ok(sb)
    }

    /// The slot this header belongs in.
    pub fn slot(&self) -> Slot {
        Slot::for_seq(self.seq)
    }

    /// Geometry of this header on a plex of `plex_blocks` blocks.
    pub fn layout(&self, plex_blocks: u64) -> Result<Layout, SbError> {
        Layout::from_superblock(self, plex_blocks)
    }

    /// Rules shared by encode and decode, so whatever encodes also decodes.
    fn validate(&self) -> Result<Layout, SbError> {
        if self.mirror_uuid.is_nil() {
            return Err(inconsistent("mirror UUID is nil"));
        }
        if self.this_plex.is_nil() {
            return Err(inconsistent("this-plex UUID is nil"));
        }
        if self.mirror_name.is_empty() || self.mirror_name.len() > MAX_NAME_BYTES {
            return Err(inconsistent(format!(
                "mirror name of {} bytes, must be 1 to {MAX_NAME_BYTES}",
                self.mirror_name.len()
            )));
        }
        let layout = Layout::from_parts(
            self.block_size,
            self.region_size,
            self.bitmap_chunks,
            self.data_offset_blocks,
            self.mirror_blocks,
        )?;
        if self.plexes.is_empty() || self.plexes.len() > MAX_PLEXES {
            return Err(inconsistent(format!(
                "{} plexes, must be 1 to {MAX_PLEXES}",
                self.plexes.len()
            )));
        }
        for (i, p) in self.plexes.iter().enumerate() {
            if p.uuid.is_nil() {
                return Err(inconsistent(format!("plex {i} has a nil UUID")));
            }
            if self.plexes[..i].iter().any(|q| q.uuid == p.uuid) {
                return Err(inconsistent(format!("plex {} is listed twice", p.uuid)));
            }
            if p.node.len() > MAX_NODE_BYTES {
                return Err(inconsistent(format!(
                    "plex {i} node name of {} bytes, at most {MAX_NODE_BYTES}",
                    p.node.len()
                )));
            }
            if p.location.len() > MAX_LOCATION_BYTES {
                return Err(inconsistent(format!(
                    "plex {i} location of {} bytes, at most {MAX_LOCATION_BYTES}",
                    p.location.len()
                )));
            }
            if p.in_sync_generation > self.generation {
                return Err(inconsistent(format!(
                    "plex {i} in sync at generation {}, after the mirror's {}",
                    p.in_sync_generation, self.generation
                )));
            }
            if let PlexState::Resyncing { next_region } = p.state {
                if next_region > layout.regions() {
                    return Err(inconsistent(format!(
                        "plex {i} resync resumes at region {next_region}, the mirror has {}",
                        layout.regions()
                    )));
                }
            }
        }
        if !self.plexes.iter().any(|p| p.uuid == self.this_plex) {
            return Err(inconsistent(format!(
                "this plex {} is not in the plex table",
                self.this_plex
            )));
        }
        Ok(layout)
    }

    /// One slot's bytes: [`HEADER_BYTES`] rounded up to whole blocks, zero past the header.
    pub fn encode(&self) -> Result<Vec<u8>, SbError> {
        self.validate()?;
        let mut b = vec![0u8; (slot_blocks(self.block_size) * u64::from(self.block_size)) as usize];
        put(&mut b, hdr::MAGIC, &HEADER_MAGIC);
        put(&mut b, hdr::VERSION, &FORMAT_VERSION.to_le_bytes());
        put(&mut b, hdr::SEQ, &self.seq.to_le_bytes());
        put(&mut b, hdr::GENERATION, &self.generation.to_le_bytes());
        put(&mut b, hdr::MIRROR_UUID, self.mirror_uuid.as_bytes());
        put(&mut b, hdr::THIS_PLEX, self.this_plex.as_bytes());
        put(&mut b, hdr::BLOCK_SIZE, &self.block_size.to_le_bytes());
        put(
            &mut b,
            hdr::BITMAP_CHUNKS,
            &self.bitmap_chunks.to_le_bytes(),
        );
        put(&mut b, hdr::REGION_SIZE, &self.region_size.to_le_bytes());
        put(
            &mut b,
            hdr::MIRROR_BLOCKS,
            &self.mirror_blocks.to_le_bytes(),
        );
        put(
            &mut b,
            hdr::DATA_OFFSET,
            &self.data_offset_blocks.to_le_bytes(),
        );
        let flags = if self.clean { hdr::FLAG_CLEAN } else { 0 };
        put(&mut b, hdr::FLAGS, &flags.to_le_bytes());
        // Lengths fit a byte: validate() bounded them.
        b[hdr::NAME_LEN] = self.mirror_name.len() as u8;
        b[hdr::PLEX_COUNT] = self.plexes.len() as u8;
        put(&mut b, hdr::NAME, self.mirror_name.as_bytes());
        for (i, p) in self.plexes.iter().enumerate() {
            let r = &mut b[hdr::PLEXES + i * hdr::PLEX_RECORD..][..hdr::PLEX_RECORD];
            let (code, arg) = p.state.code_and_arg();
            put(r, rec::UUID, p.uuid.as_bytes());
            put(r, rec::IN_SYNC_GEN, &p.in_sync_generation.to_le_bytes());
            put(r, rec::STATE_ARG, &arg.to_le_bytes());
            r[rec::STATE] = code;
            r[rec::NODE_LEN] = p.node.len() as u8;
            r[rec::LOCATION_LEN] = p.location.len() as u8;
            put(r, rec::NODE, p.node.as_bytes());
            put(r, rec::LOCATION, p.location.as_bytes());
        }
        let crc = crc_skipping(&b[..HEADER_BYTES], hdr::CRC);
        put(&mut b, hdr::CRC, &crc.to_le_bytes());
        Ok(b)
    }

    /// Decodes a header from the start of `bytes` (at least [`HEADER_BYTES`]; the rest of the
    /// slot is ignored). Checks magic, then checksum, then version: the first three fields keep
    /// their place and the CRC its coverage in every version, so a damaged version field reads
    /// as damage rather than as a format this build lacks.
    pub fn decode(bytes: &[u8]) -> Result<Superblock, SbError> {
        if bytes.len() < HEADER_BYTES {
            return Err(SbError::ShortBuffer {
                need: HEADER_BYTES as u64,
                got: bytes.len() as u64,
            });
        }
        let b = &bytes[..HEADER_BYTES];
        let magic: [u8; 8] = b[..8].try_into().expect("8 bytes");
        if magic != HEADER_MAGIC {
            return Err(SbError::BadMagic { found: magic });
        }
        let stored = get_u32(b, hdr::CRC);
        let computed = crc_skipping(b, hdr::CRC);
        if stored != computed {
            return Err(SbError::BadChecksum { stored, computed });
        }
        let version = get_u32(b, hdr::VERSION);
        if version != FORMAT_VERSION {
            return Err(SbError::UnsupportedVersion(version));
        }
        for r in hdr::RESERVED {
            if let Some(at) = first_nonzero(b, r) {
                return Err(inconsistent(format!(
                    "reserved header byte {at} is not zero"
                )));
            }
        }
        let flags = get_u32(b, hdr::FLAGS);
        if flags & !hdr::FLAG_CLEAN != 0 {
            return Err(inconsistent(format!("unknown header flags {flags:#x}")));
        }
        let name = get_str(
            &b[hdr::NAME..][..MAX_NAME_BYTES],
            b[hdr::NAME_LEN],
            "mirror name",
        )?;
        let count = usize::from(b[hdr::PLEX_COUNT]);
        if count > MAX_PLEXES {
            return Err(inconsistent(format!(
                "{count} plexes, at most {MAX_PLEXES}"
            )));
        }
        let mut plexes = Vec::with_capacity(count);
        for i in 0..PLEX_RECORD_SLOTS {
            let r = &b[hdr::PLEXES + i * hdr::PLEX_RECORD..][..hdr::PLEX_RECORD];
            if i >= count {
                if let Some(at) = first_nonzero(r, (0, hdr::PLEX_RECORD)) {
                    return Err(inconsistent(format!(
                        "unused plex record {i} has non-zero byte {at}"
                    )));
                }
                continue;
            }
            for res in rec::RESERVED {
                if let Some(at) = first_nonzero(r, res) {
                    return Err(inconsistent(format!(
                        "reserved byte {at} of plex record {i} is not zero"
                    )));
                }
            }
            let what = format!("plex {i} node name");
            let node = get_str(&r[rec::NODE..][..MAX_NODE_BYTES], r[rec::NODE_LEN], &what)?;
            let what = format!("plex {i} location");
            let location = get_str(
                &r[rec::LOCATION..][..MAX_LOCATION_BYTES],
                r[rec::LOCATION_LEN],
                &what,
            )?;
            plexes.push(PlexRecord {
                uuid: get_uuid(r, rec::UUID),
                node,
                location,
                state: PlexState::from_code(r[rec::STATE], get_u64(r, rec::STATE_ARG))
                    .map_err(|e| inconsistent(format!("plex {i}: {e}")))?,
                in_sync_generation: get_u64(r, rec::IN_SYNC_GEN),
            });
        }
        let sb = Superblock {
            seq: get_u64(b, hdr::SEQ),
            generation: get_u64(b, hdr::GENERATION),
            mirror_uuid: get_uuid(b, hdr::MIRROR_UUID),
            mirror_name: name,
            this_plex: get_uuid(b, hdr::THIS_PLEX),
            block_size: get_u32(b, hdr::BLOCK_SIZE),
            region_size: get_u64(b, hdr::REGION_SIZE),
            mirror_blocks: get_u64(b, hdr::MIRROR_BLOCKS),
            data_offset_blocks: get_u64(b, hdr::DATA_OFFSET),
            bitmap_chunks: get_u32(b, hdr::BITMAP_CHUNKS),
            clean: flags & hdr::FLAG_CLEAN != 0,
            plexes,
        };
        // Every byte is a field checked above or reserved, so the encoding is canonical. This
        // backstop keeps it so if a field is ever added without its check: a header that would
        // not be written back byte for byte is refused rather than half understood.
        let again = sb.encode()?;
        if let Some(at) = (0..HEADER_BYTES).find(|&i| again[i] != b[i]) {
            return Err(inconsistent(format!(
                "header byte {at} is not in canonical form"
            )));
        }
        Ok(sb)
    }

    /// Decodes the header read from `slot`, which must be the slot its seq belongs in (a header
    /// found in the wrong slot was misdirected or copied, and is not trusted), and, if
    /// `expect` names a mirror, must belong to it.
    pub fn decode_slot(
        bytes: &[u8],
        slot: Slot,
        expect: Option<Uuid>,
    ) -> Result<Superblock, SbError> {
        let sb = Superblock::decode(bytes)?;
        if sb.slot() != slot {
            return Err(inconsistent(format!(
                "header with seq {} found in slot {slot}, belongs in slot {}",
                sb.seq,
                sb.slot()
            )));
        }
        match expect {
            Some(expected) if expected != sb.mirror_uuid => Err(SbError::ForeignMirror {
                expected,
                found: sb.mirror_uuid,
            }),
            _ => Ok(sb),
        }
    }
}

/// The header [`pick_header`] chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Picked {
    pub superblock: Superblock,
    pub slot: Slot,
    /// Why the other slot was not used, if it was not valid: worth a log line, and the next
    /// header write (to that slot) repairs it.
    pub other_problem: Option<SbError>,
}

/// Chooses the current header from the bytes of slots A and B: the valid one with the newer
/// seq, or the only valid one. `expect` (the mirror's UUID, when the caller knows it) turns a
/// slot of another mirror into [`SbError::ForeignMirror`].
///
/// Two valid slots of different mirrors are refused: that is a mirror creation (which writes
/// both slots) interrupted on a plex that held another mirror, and neither header can be
/// trusted to be the one wanted.
pub fn pick_header(a: &[u8], b: &[u8], expect: Option<Uuid>) -> Result<Picked, SbError> {
    let ra = Superblock::decode_slot(a, Slot::A, expect);
    let rb = Superblock::decode_slot(b, Slot::B, expect);
    match (ra, rb) {
        (Ok(sa), Ok(sb)) => {
            if sa.mirror_uuid != sb.mirror_uuid {
                return Err(inconsistent(format!(
                    "slot A holds mirror {}, slot B mirror {}: an interrupted mirror creation?",
                    sa.mirror_uuid, sb.mirror_uuid
                )));
            }
            let (superblock, slot) = if seq_newer(sa.seq, sb.seq) {
                (sa, Slot::A)
            } else {
                (sb, Slot::B)
            };
            Ok(Picked {
                superblock,
                slot,
                other_problem: None,
            })
        }
        (Ok(sa), Err(e)) => Ok(Picked {
            superblock: sa,
            slot: Slot::A,
            other_problem: Some(e),
        }),
        (Err(e), Ok(sb)) => Ok(Picked {
            superblock: sb,
            slot: Slot::B,
            other_problem: Some(e),
        }),
        (Err(a), Err(b)) => Err(SbError::NoValidHeader {
            a: Box::new(a),
            b: Box::new(b),
        }),
    }
}

// ---- write-intent bitmap ----------------------------------------------------------------------

/// Byte offsets of a bitmap chunk.
mod chunk {
    pub const MAGIC: usize = 0;
    pub const CRC: usize = 8;
    pub const INDEX: usize = 12;
    pub const MIRROR_UUID: usize = 16;
    pub const BITS: usize = super::CHUNK_HEADER_BYTES;
}

/// One bit per region, set while the region may differ between plexes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitmap({} of {} set)", self.count(), self.len)
    }
}

impl Bitmap {
    /// `len` clear bits.
    pub fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// `len` bits with those in `ranges` set (clipped to `len`).
    pub fn from_ranges(len: u64, ranges: impl IntoIterator<Item = Range<u64>>) -> Bitmap {
        let mut b = Bitmap::new(len);
        for r in ranges {
            b.set_range(r);
        }
        b
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bits as words, bit `i` at `words[i / 64] >> (i % 64)`; bits past `len` are zero.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// False for a bit past the end.
    pub fn test(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i` and says whether it was set before (a bit that was clear needs its chunk
    /// written before the data). Bits past the end are ignored: no region lives there.
    pub fn set(&mut self, i: u64) -> bool {
        let was = self.test(i);
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
        was
    }

    /// Clears bit `i` and says whether it was set before.
    pub fn clear(&mut self, i: u64) -> bool {
        let was = self.test(i);
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
        was
    }

    pub fn set_range(&mut self, r: Range<u64>) {
        self.fill(r, true);
    }

    pub fn clear_range(&mut self, r: Range<u64>) {
        self.fill(r, false);
    }

    pub fn set_all(&mut self) {
        self.set_range(0..self.len);
    }

    fn fill(&mut self, r: Range<u64>, value: bool) {
        let (start, end) = (r.start.min(self.len), r.end.min(self.len));
        let mut i = start;
        while i < end {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (end - (i - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            i += hi - lo;
        }
    }

    /// Set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Indexes of the set bits, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(wi as u64 * 64 + u64::from(bit))
            })
        })
    }

    /// The words chunk `index` of `layout` holds (fewer than a full chunk's at the end).
    pub fn chunk_words(&self, layout: &Layout, index: u32) -> &[u64] {
        let per_words = (layout.regions_per_chunk() / 64) as usize;
        let start = (index as usize)
            .saturating_mul(per_words)
            .min(self.words.len());
        &self.words[start..(start + per_words).min(self.words.len())]
    }

    /// Chunk `index` of this bitmap as the block to write at `layout.chunk_block(index)`.
    pub fn encode_chunk(
        &self,
        layout: &Layout,
        mirror_uuid: Uuid,
        index: u32,
    ) -> Result<Vec<u8>, SbError> {
        if index >= layout.chunk_count() {
            return Err(SbError::Geometry(format!(
                "chunk {index} requested, the bitmap has {}",
                layout.chunk_count()
            )));
        }
        encode_chunk(
            mirror_uuid,
            index,
            self.chunk_words(layout, index),
            layout.block_size(),
        )
    }
}

/// A bitmap chunk of `block_size` bytes holding `words` (fewer than the chunk holds are padded
/// with zero). The caller must not pass bits for regions the mirror lacks: readers refuse them.
pub fn encode_chunk(
    mirror_uuid: Uuid,
    index: u32,
    words: &[u64],
    block_size: u32,
) -> Result<Vec<u8>, SbError> {
    check_block_size(block_size)?;
    let per_words = (regions_per_chunk(block_size) / 64) as usize;
    if words.len() > per_words {
        return Err(SbError::Geometry(format!(
            "{} words do not fit a chunk of {block_size} bytes ({per_words} words)",
            words.len()
        )));
    }
    let mut b = vec![0u8; block_size as usize];
    put(&mut b, chunk::MAGIC, &CHUNK_MAGIC);
    put(&mut b, chunk::INDEX, &index.to_le_bytes());
    put(&mut b, chunk::MIRROR_UUID, mirror_uuid.as_bytes());
    for (i, w) in words.iter().enumerate() {
        put(&mut b, chunk::BITS + i * 8, &w.to_le_bytes());
    }
    let crc = crc_skipping(&b, chunk::CRC);
    put(&mut b, chunk::CRC, &crc.to_le_bytes());
    Ok(b)
}

/// Decodes one bitmap chunk (`bytes` is exactly one block) into its words, checking it is
/// chunk `index` of mirror `mirror_uuid` and that no bit is set at or past `regions` (the
/// number of regions this chunk covers).
pub fn decode_chunk(
    bytes: &[u8],
    mirror_uuid: Uuid,
    index: u32,
    regions: u64,
) -> Result<Vec<u64>, SbError> {
    let block_size = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    check_block_size(block_size)?;
    let magic: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
    if magic != CHUNK_MAGIC {
        return Err(SbError::BadMagic { found: magic });
    }
    let stored = get_u32(bytes, chunk::CRC);
    let computed = crc_skipping(bytes, chunk::CRC);
    if stored != computed {
        return Err(SbError::BadChecksum { stored, computed });
    }
    let found = get_uuid(bytes, chunk::MIRROR_UUID);
    if found != mirror_uuid {
        return Err(SbError::ForeignMirror {
            expected: mirror_uuid,
            found,
        });
    }
    let at = get_u32(bytes, chunk::INDEX);
    if at != index {
        return Err(inconsistent(format!(
            "chunk {at} found where chunk {index} belongs"
        )));
    }
    let words: Vec<u64> = bytes[chunk::BITS..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let past = Bitmap {
        words: words.clone(),
        len: words.len() as u64 * 64,
    }
    .iter_set()
    .find(|&i| i >= regions);
    if let Some(i) = past {
        return Err(inconsistent(format!(
            "chunk {index} sets bit {i}, it covers only {regions} regions"
        )));
    }
    Ok(words)
}

/// A chunk [`decode_bitmap`] could not use; its regions were taken as dirty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkProblem {
    pub index: u32,
    pub regions: Range<u64>,
    pub error: SbError,
}

/// The bitmap from the bytes of chunks `0..layout.chunk_count()` read back to back. A chunk
/// that is missing, torn, or not this mirror's counts as all dirty: the worst a bad chunk can
/// cause is extra resync, never a skipped one.
pub fn decode_bitmap(
    layout: &Layout,
    mirror_uuid: Uuid,
    bytes: &[u8],
) -> (Bitmap, Vec<ChunkProblem>) {
    let mut bitmap = Bitmap::new(layout.regions());
    let mut problems = Vec::new();
    let bs = layout.block_size() as usize;
    let per_words = (layout.regions_per_chunk() / 64) as usize;
    for index in 0..layout.chunk_count() {
        let regions = layout.regions_in_chunk(index);
        let start = index as usize * bs;
        let decoded = match bytes.get(start..start + bs) {
            Some(b) => decode_chunk(b, mirror_uuid, index, regions.end - regions.start),
            None => Err(SbError::ShortBuffer {
                need: (start + bs) as u64,
                got: bytes.len() as u64,
            }),
        };
        match decoded {
            Ok(words) => {
                let first = index as usize * per_words;
                let end = (first + per_words).min(bitmap.words.len());
                bitmap.words[first..end].copy_from_slice(&words[..end - first]);
            }
            Err(error) => {
                bitmap.set_range(regions.clone());
                problems.push(ChunkProblem {
                    index,
                    regions,
                    error,
                });
            }
        }
    }
    (bitmap, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn uuid(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn plex(n: u8, state: PlexState) -> PlexRecord {
        PlexRecord {
            uuid: uuid(n),
            node: format!("node-{n}"),
            location: format!("nqn.2024-01.io.plexstor:disk{n}/1"),
            state,
            in_sync_generation: 1,
        }
    }

    /// A header with every field away from its default.
    fn sample(block_size: u32) -> Superblock {
        let layout = Layout::new(
            block_size,
            8 * GIB / u64::from(block_size),
            DEFAULT_REGION_SIZE,
        )
        .unwrap()
        .with_data_blocks(5 * GIB / u64::from(block_size) + 3)
        .unwrap();
        let mut sb = Superblock::new(
            uuid(0xaa),
            "mirror0",
            uuid(2),
            &layout,
            vec![
                plex(1, PlexState::InSync),
                plex(2, PlexState::Resyncing { next_region: 77 }),
                plex(
                    3,
                    PlexState::OutOfSync {
                        since_unix_secs: 1_700_000_000,
                    },
                ),
            ],
        )
        .unwrap();
        sb.seq = 6;
        sb.generation = 9;
        sb.clean = true;
        sb
    }

    fn every_state() -> Vec<PlexState> {
        vec![
            PlexState::InSync,
            PlexState::OutOfSync {
                since_unix_secs: u64::MAX,
            },
            PlexState::Resyncing { next_region: 0 },
            PlexState::New,
            PlexState::Faulted { reason: u32::MAX },
        ]
    }

    /// Rewrites the header's CRC, so a test can reach the checks behind it.
    fn fix_crc(b: &mut [u8]) {
        let crc = crc_skipping(&b[..HEADER_BYTES], hdr::CRC);
        b[hdr::CRC..hdr::CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[track_caller]
    fn inconsistent_msg(r: Result<Superblock, SbError>) -> String {
        match r {
            Err(SbError::Inconsistent(m)) => m,
            other => panic!("expected Inconsistent, got {other:?}"),
        }
    }

    #[test]
    fn header_round_trips_byte_for_byte() {
        for bs in [512, 4096, 8192, 64 << 10] {
            let sb = sample(bs);
            let bytes = sb.encode().unwrap();
            assert_eq!(
                bytes.len() as u64,
                header_slot_blocks(bs).unwrap() * u64::from(bs)
            );
            let back = Superblock::decode(&bytes).unwrap();
            assert_eq!(back, sb);
            assert_eq!(back.encode().unwrap(), bytes);
        }
        for state in every_state() {
            let mut sb = sample(512);
            sb.plexes = vec![PlexRecord {
                uuid: uuid(2),
                node: String::new(),
                location: "l".repeat(MAX_LOCATION_BYTES),
                state,
                in_sync_generation: 0,
            }];
            sb.mirror_name = "é".repeat(MAX_NAME_BYTES / 2);
            sb.clean = false;
            let back = Superblock::decode(&sb.encode().unwrap()).unwrap();
            assert_eq!(back, sb);
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let good = sample(512).encode().unwrap();
        for at in 0..HEADER_BYTES {
            for x in [0x01, 0x80, 0xff] {
                let mut b = good.clone();
                b[at] ^= x;
                match Superblock::decode(&b) {
                    Err(SbError::BadMagic { .. }) => assert!(at < 8),
                    Err(SbError::BadChecksum { .. }) => assert!(at >= 8),
                    other => panic!("byte {at} ^ {x:#x}: {other:?}"),
                }
            }
        }
        // Bytes past the header are not covered and not read.
        let mut b = good.clone();
        b[HEADER_BYTES - 1 + 1..].fill(0x5a);
        assert_eq!(Superblock::decode(&b).unwrap(), sample(512));
    }

    /// With the checksum made right again, a changed byte is either refused by a field check
    /// or read as a header that encodes back to exactly those bytes: nothing is half read.
    #[test]
    fn flipped_bytes_behind_a_good_checksum_never_read_differently() {
        let good = sample(4096).encode().unwrap();
        let mut accepted = 0;
        for at in 8..HEADER_BYTES {
            if at == hdr::CRC {
                continue;
            }
            for x in [0x01, 0x02, 0x80, 0xff] {
                let mut b = good.clone();
                b[at] ^= x;
                fix_crc(&mut b);
                match Superblock::decode(&b) {
                    Ok(sb) => {
                        accepted += 1;
                        assert_eq!(sb.encode().unwrap()[..HEADER_BYTES], b[..HEADER_BYTES]);
                    }
                    Err(SbError::Inconsistent(_)) | Err(SbError::UnsupportedVersion(_)) => {}
                    Err(e) => panic!("byte {at} ^ {x:#x}: {e:?}"),
                }
            }
        }
        // Seq, generation, names, times… do change under flips; the test must see some.
        assert!(accepted > 100, "{accepted}");
    }

    #[test]
    fn each_refusal_says_why() {
        let good = sample(512).encode().unwrap();
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            fix_crc(&mut b);
            Superblock::decode(&b)
        };

        assert_eq!(
            Superblock::decode(&good[..100]),
            Err(SbError::ShortBuffer {
                need: 4096,
                got: 100
            })
        );
        assert!(matches!(
            Superblock::decode(&[0; 4096]),
            Err(SbError::BadMagic {
                found: [0, 0, 0, 0, 0, 0, 0, 0]
            })
        ));
        assert_eq!(
            edit(&|b| b[hdr::VERSION] = 2),
            Err(SbError::UnsupportedVersion(2))
        );
        let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + rec::STATE] = 9));
        assert!(m.contains("unknown plex state code 9"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + 256 + rec::STATE] = 4));
        assert!(m.contains("carries argument"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::NAME] = 0xff));
        assert!(m.contains("not UTF-8"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::NAME_LEN] = 65));
        assert!(m.contains("exceeds"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::NAME_LEN] = 3));
        assert!(m.contains("past its length"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::NAME_LEN] = 0));
        assert!(m.contains("past its length"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::PLEX_COUNT] = 4));
        assert!(m.contains("4 plexes"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::PLEX_COUNT] = 2));
        assert!(m.contains("unused plex record 2"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + 3 * 256 + 100] = 1));
        assert!(m.contains("unused plex record 3"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::FLAGS] = 2));
        assert!(m.contains("flags"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[110] = 1));
        assert!(m.contains("reserved header byte 110"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[4000] = 1));
        assert!(m.contains("reserved header byte 4000"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + 256 + 210] = 1));
        assert!(m.contains("reserved byte 210 of plex record 1"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::BLOCK_SIZE + 1] = 3));
        assert!(m.contains("block size"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::REGION_SIZE] = 1));
        assert!(m.contains("region size"), "{m}");
        let m = inconsistent_msg(edit(&|b| {
            b[hdr::DATA_OFFSET..][..8].copy_from_slice(&3u64.to_le_bytes())
        }));
        assert!(m.contains("inside the metadata"), "{m}");
        let m = inconsistent_msg(edit(&|b| {
            b[hdr::BITMAP_CHUNKS..][..4].copy_from_slice(&1u32.to_le_bytes())
        }));
        assert!(m.contains("do not fit a bitmap"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::THIS_PLEX] = 9));
        assert!(m.contains("not in the plex table"), "{m}");
        let m = inconsistent_msg(edit(&|b| {
            b[hdr::PLEXES + 256..][..16].copy_from_slice(&[1; 16])
        }));
        assert!(m.contains("listed twice"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::MIRROR_UUID..][..16].fill(0)));
        assert!(m.contains("nil"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::GENERATION..][..8].fill(0)));
        assert!(m.contains("after the mirror's"), "{m}");
        let m = inconsistent_msg(edit(&|b| b[hdr::PLEXES + 256 + rec::STATE_ARG + 4] = 1));
        assert!(m.contains("resync resumes at region"), "{m}");
        let m = inconsistent_msg(edit(&|b| {
            b[hdr::PLEXES + rec::STATE] = 5;
            b[hdr::PLEXES + rec::STATE_ARG + 4] = 1;
        }));
        assert!(m.contains("fault reason"), "{m}");
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        type Edit = Box<dyn Fn(&mut Superblock)>;
        let bad: Vec<Edit> = vec![
            Box::new(|s| s.mirror_name = "n".repeat(65)),
            Box::new(|s| s.mirror_name.clear()),
            Box::new(|s| s.plexes.push(plex(4, PlexState::New))),
            Box::new(|s| s.plexes.clear()),
            Box::new(|s| s.plexes[0].node = "n".repeat(33)),
            Box::new(|s| s.plexes[0].location = "n".repeat(129)),
            Box::new(|s| s.plexes[0].uuid = Uuid::nil()),
            Box::new(|s| s.plexes[0].uuid = uuid(3)),
            Box::new(|s| s.this_plex = uuid(7)),
            Box::new(|s| s.mirror_blocks = 0),
            Box::new(|s| s.block_size = 520),
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut sb = sample(512);
            f(&mut sb);
            assert!(
                matches!(sb.encode(), Err(SbError::Inconsistent(_))),
                "case {i}"
            );
        }
    }

    fn slots(a: &Superblock, b: &Superblock) -> (Vec<u8>, Vec<u8>) {
        (a.encode().unwrap(), b.encode().unwrap())
    }

    fn at_seq(seq: u64) -> Superblock {
        let mut s = sample(512);
        s.seq = seq;
        s.generation = 10 + seq % 5;
        s
    }

    #[test]
    fn newer_slot_wins() {
        let (a, b) = slots(&at_seq(6), &at_seq(7));
        let p = pick_header(&a, &b, None).unwrap();
        assert_eq!(
            (p.slot, p.superblock.seq, p.other_problem),
            (Slot::B, 7, None)
        );
        let (a, b) = slots(&at_seq(8), &at_seq(7));
        let p = pick_header(&a, &b, Some(uuid(0xaa))).unwrap();
        assert_eq!((p.slot, p.superblock.seq), (Slot::A, 8));
        assert_eq!(next_slot(p.slot), Slot::B);
        assert_eq!(Slot::for_seq(p.superblock.seq + 1), next_slot(p.slot));
    }

    #[test]
    fn seq_wraps() {
        let (a, b) = slots(&at_seq(0), &at_seq(u64::MAX));
        let p = pick_header(&a, &b, None).unwrap();
        assert_eq!((p.slot, p.superblock.seq), (Slot::A, 0));
        let (a, b) = slots(&at_seq(u64::MAX - 1), &at_seq(u64::MAX));
        assert_eq!(pick_header(&a, &b, None).unwrap().slot, Slot::B);
    }

    #[test]
    fn torn_write_leaves_the_older_slot() {
        let (a, old_b) = slots(&at_seq(4), &at_seq(3));
        // The new B changes bytes in the first and the third 512-byte sector.
        let mut next = at_seq(5);
        next.plexes[2].location = "moved".into();
        let new_b = next.encode().unwrap();
        let mut torn = 0;
        for cut in (0..=HEADER_BYTES).step_by(512) {
            // Sectors written in order or out of order, over the old B or over zeros (a new
            // plex): the result is the new header whole or the old A, never a mix.
            let mut head_new = old_b.clone();
            head_new[..cut].copy_from_slice(&new_b[..cut]);
            let mut tail_new = old_b.clone();
            tail_new[cut..].copy_from_slice(&new_b[cut..]);
            let mut over_zero = vec![0; new_b.len()];
            over_zero[..cut].copy_from_slice(&new_b[..cut]);
            for b in [head_new, tail_new, over_zero] {
                let p = pick_header(&a, &b, None).unwrap();
                if p.slot == Slot::B {
                    assert_eq!(p.superblock, next, "cut {cut}");
                } else {
                    assert_eq!(p.superblock, at_seq(4), "cut {cut}");
                    if b != old_b {
                        torn += 1;
                        assert!(p.other_problem.is_some());
                    }
                }
            }
        }
        assert!(torn >= 4, "{torn}");
        // A fresh plex: B never written.
        let p = pick_header(&a, &[0; 4096], None).unwrap();
        assert!(matches!(p.other_problem, Some(SbError::BadMagic { .. })));
    }

    #[test]
    fn unusable_slots_are_named() {
        let a = at_seq(4).encode().unwrap();
        // A header in the wrong slot (a misdirected write) is not trusted.
        match pick_header(&a, &a, None).unwrap().other_problem {
            Some(SbError::Inconsistent(m)) => assert!(m.contains("slot B"), "{m}"),
            other => panic!("{other:?}"),
        }
        match pick_header(&[0; 4096], &a[..10], None) {
            Err(SbError::NoValidHeader { a, b }) => {
                assert!(matches!(*a, SbError::BadMagic { .. }));
                assert!(matches!(*b, SbError::ShortBuffer { .. }));
            }
            other => panic!("{other:?}"),
        }
        let (a, b) = slots(&at_seq(4), &at_seq(5));
        let err = pick_header(&a, &b, Some(uuid(0xbb))).unwrap_err();
        let SbError::NoValidHeader { a: ea, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            **ea,
            SbError::ForeignMirror {
                expected: uuid(0xbb),
                found: uuid(0xaa)
            }
        );
        assert!(err.to_string().contains("slot A"));
        // Both valid, different mirrors: an interrupted creation; neither is trusted.
        let mut other = at_seq(5);
        other.mirror_uuid = uuid(0xbb);
        let (a, b) = slots(&at_seq(4), &other);
        assert!(matches!(
            pick_header(&a, &b, None),
            Err(SbError::Inconsistent(_))
        ));
        // …unless the caller says which mirror it wants.
        let p = pick_header(&a, &b, Some(uuid(0xaa))).unwrap();
        assert_eq!(p.slot, Slot::A);
        assert!(matches!(
            p.other_problem,
            Some(SbError::ForeignMirror { .. })
        ));
    }

    // ---- layout ------------------------------------------------------------------------------

    fn check_invariants(l: &Layout) {
        let bs = u64::from(l.block_size());
        assert_eq!(l.slot_range(Slot::A).end, l.slot_range(Slot::B).start);
        assert!(l.slot_blocks() * bs >= HEADER_BYTES as u64);
        assert_eq!(l.bitmap_range().start, l.slot_range(Slot::B).end);
        assert!(l.chunk_count() <= l.bitmap_chunks());
        assert!(l.chunk_block(l.bitmap_chunks() - 1) < l.data_offset_blocks());
        assert_eq!(l.data_offset_blocks() * bs % DATA_ALIGN_BYTES, 0);
        assert!(l.data_offset_blocks() + l.data_blocks() <= l.plex_blocks());
        let rb = l.region_blocks();
        assert!(l.regions() * rb >= l.data_blocks());
        assert!((l.regions() - 1) * rb < l.data_blocks());
        assert_eq!(l.region_of(l.data_blocks() - 1), l.regions() - 1);
        assert_eq!(l.region_range(l.regions() - 1).end, l.data_blocks());
        assert_eq!(l.chunk_of(l.regions() - 1), l.chunk_count() - 1);
        assert_eq!(l.regions_in_chunk(0).start, 0);
        assert_eq!(l.regions_in_chunk(l.chunk_count() - 1).end, l.regions());
        assert!(l.regions_in_chunk(l.chunk_count()).is_empty());
        assert_eq!(l.regions_per_chunk() % 64, 0);
        assert_eq!(l.regions_of(0..l.data_blocks()), 0..l.regions());
    }

    #[test]
    fn layout_arithmetic_over_odd_sizes() {
        for bs in [512u32, 4096] {
            let mut region = MIN_REGION_SIZE;
            while region <= 64 * MIB {
                // The smallest plex that fits, found by the error, then a few just above it.
                let need = match Layout::new(bs, 1, region) {
                    Err(SbError::PlexTooSmall {
                        need_blocks,
                        have_blocks: 1,
                    }) => need_blocks,
                    other => panic!("{other:?}"),
                };
                assert!(matches!(
                    Layout::new(bs, need - 1, region),
                    Err(SbError::PlexTooSmall { .. })
                ));
                let ten_tib = (10u64 << 40) / u64::from(bs);
                for plex in [need, need + 1, need + 7, need + 4095, ten_tib, ten_tib + 3] {
                    let l = Layout::new(bs, plex, region).unwrap();
                    assert_eq!(l.data_offset_blocks() + l.data_blocks(), plex);
                    check_invariants(&l);
                    // The header records it; a reader gets the same layout back, also after
                    // the plex grew.
                    let sb = Superblock::new(uuid(1), "m", uuid(2), &l, vec![plex_rec(2)]).unwrap();
                    let back = Superblock::decode(&sb.encode().unwrap()).unwrap();
                    assert_eq!(back.layout(plex).unwrap(), l);
                    let grown = back.layout(plex + 12345).unwrap();
                    assert_eq!(grown.data_offset_blocks(), l.data_offset_blocks());
                    assert_eq!(grown.data_blocks(), l.data_blocks());
                    assert!(matches!(
                        back.layout(plex - 1),
                        Err(SbError::PlexTooSmall { .. })
                    ));
                    // A smaller mirror on this plex.
                    let half = l.with_data_blocks(l.data_blocks().div_ceil(2)).unwrap();
                    check_invariants(&half);
                }
                region *= 2;
            }
        }
    }

    fn plex_rec(n: u8) -> PlexRecord {
        plex(n, PlexState::InSync)
    }

    #[test]
    fn layout_known_values() {
        // 512-byte blocks: 8-block slots, 3840 regions per chunk.
        let l = Layout::new(512, (10u64 << 40) / 512, MIB).unwrap();
        assert_eq!(l.slot_range(Slot::B), 8..16);
        assert_eq!(l.bitmap_chunks(), (10u64 << 20).div_ceil(3840) as u32);
        assert_eq!(l.data_offset_blocks(), 2 * MIB / 512);
        // 4096-byte blocks: one-block slots.
        let l = Layout::new(4096, 1 << 20, MIB).unwrap();
        assert_eq!(l.slot_range(Slot::A), 0..1);
        assert_eq!(l.bitmap_range(), 2..3);
        assert_eq!(l.data_offset_blocks(), 256);
        assert_eq!(l.regions(), (4 * GIB - MIB) / MIB);
        assert_eq!(l.region_of(255), 0);
        assert_eq!(l.region_of(256), 1);
        assert_eq!(l.regions_of(255..257), 0..2);
        assert_eq!(l.regions_of(5..5), 0..0);
        // Smallest plex: 1 MiB of metadata and one block.
        assert_eq!(
            Layout::new(4096, 10, DEFAULT_REGION_SIZE),
            Err(SbError::PlexTooSmall {
                need_blocks: 257,
                have_blocks: 10
            })
        );
        let l = Layout::new(4096, 257, DEFAULT_REGION_SIZE).unwrap();
        assert_eq!((l.data_blocks(), l.regions()), (1, 1));
        assert_eq!(l.region_range(0), 0..1);
    }

    #[test]
    fn layout_refuses_bad_geometry() {
        for (bs, plex, region) in [
            (520, 1 << 30, MIB),
            (256, 1 << 30, MIB),
            (1 << 17, 1 << 30, MIB),
            (512, 1 << 30, 3 * MIB),
            (512, 1 << 30, 32 << 10),
            (512, 1 << 30, 2 * GIB),
            (64 << 10, 1 << 30, 64 << 10),
            (512, u64::MAX, MIB),
        ] {
            if bs == 64 << 10 {
                // Region equal to the block size is fine.
                assert!(Layout::new(bs, plex, region).is_ok());
                continue;
            }
            assert!(
                matches!(Layout::new(bs, plex, region), Err(SbError::Geometry(_))),
                "{bs} {plex} {region}"
            );
        }
        let l = Layout::new(4096, 1 << 20, MIB).unwrap();
        assert!(l.with_data_blocks(0).is_err());
        assert!(l.with_data_blocks(l.data_blocks() + 1).is_err());
        // Largest plex whose bitmap chunk index still fits 32 bits.
        assert!(Layout::new(512, u64::MAX / 512, MIN_REGION_SIZE).is_err());
        let l = Layout::new(64 << 10, u64::MAX >> 16, MAX_REGION_SIZE).unwrap();
        check_invariants(&l);
    }

    // ---- bitmap ------------------------------------------------------------------------------

    #[test]
    fn bitmap_operations() {
        let mut b = Bitmap::new(200);
        assert_eq!((b.len(), b.count(), b.is_empty()), (200, 0, false));
        assert!(!b.set(3));
        assert!(b.set(3));
        assert!(b.test(3));
        assert!(!b.set(500));
        assert!(!b.test(500));
        b.set_range(60..130);
        assert_eq!(b.count(), 71);
        b.clear_range(64..128);
        assert_eq!(
            b.iter_set().collect::<Vec<_>>(),
            vec![3, 60, 61, 62, 63, 128, 129]
        );
        assert!(b.clear(3));
        assert!(!b.clear(3));
        b.set_all();
        assert_eq!(b.count(), 200);
        assert_eq!(b.words()[3] >> 8, 0, "bits past len stay zero");
        let c = Bitmap::from_ranges(200, [0..1, 190..1000]);
        assert_eq!(
            c.iter_set().collect::<Vec<_>>(),
            [0].into_iter().chain(190..200).collect::<Vec<_>>()
        );
        // Every range against a bit-by-bit model.
        for start in 0..70 {
            for end in start..140 {
                let b = Bitmap::from_ranges(130, std::iter::once(start..end));
                let want: Vec<u64> = (start..end.min(130)).collect();
                assert_eq!(b.iter_set().collect::<Vec<_>>(), want);
            }
        }
    }

    #[test]
    fn chunks_round_trip() {
        let mirror = uuid(0xaa);
        let l = Layout::new(512, 20 * GIB / 512, 64 << 10).unwrap();
        assert!(l.chunk_count() > 3);
        let mut bm = Bitmap::new(l.regions());
        for r in (0..l.regions()).step_by(37) {
            bm.set(r);
        }
        bm.set(l.regions() - 1);
        let mut all = Vec::new();
        for i in 0..l.chunk_count() {
            let c = bm.encode_chunk(&l, mirror, i).unwrap();
            assert_eq!(c.len(), 512);
            let r = l.regions_in_chunk(i);
            let words = decode_chunk(&c, mirror, i, r.end - r.start).unwrap();
            assert_eq!(encode_chunk(mirror, i, &words, 512).unwrap(), c);
            all.extend(c);
        }
        assert!(bm.encode_chunk(&l, mirror, l.chunk_count()).is_err());
        let (back, problems) = decode_bitmap(&l, mirror, &all);
        assert_eq!(problems, vec![]);
        assert_eq!(back, bm);
    }

    #[test]
    fn bad_chunks_make_their_regions_dirty() {
        let mirror = uuid(0xaa);
        let l = Layout::new(512, 20 * GIB / 512, 64 << 10).unwrap();
        let clean = Bitmap::new(l.regions());
        let chunks: Vec<Vec<u8>> = (0..l.chunk_count())
            .map(|i| clean.encode_chunk(&l, mirror, i).unwrap())
            .collect();
        let last = l.chunk_count() - 1;

        // Any damaged byte of chunk 1: exactly its regions are dirty.
        for at in 0..512 {
            let mut bytes = chunks.concat();
            bytes[512 + at] ^= 0x10;
            let (bm, problems) = decode_bitmap(&l, mirror, &bytes);
            assert_eq!(problems.len(), 1, "byte {at}");
            assert_eq!(problems[0].index, 1);
            assert!(matches!(
                problems[0].error,
                SbError::BadChecksum { .. } | SbError::BadMagic { .. }
            ));
            assert_eq!(
                bm,
                Bitmap::from_ranges(l.regions(), [l.regions_in_chunk(1)])
            );
        }

        // Another mirror's chunk, a chunk at the wrong index, a never-written chunk, a chunk
        // with bits past the mirror's end, and chunks missing from a short read.
        let mut bytes = chunks.concat();
        let bs = 512;
        bytes[0..bs].copy_from_slice(&clean.encode_chunk(&l, uuid(0xbb), 0).unwrap());
        bytes[bs..2 * bs].copy_from_slice(&chunks[2]);
        bytes[2 * bs..3 * bs].fill(0);
        let past = vec![u64::MAX; (l.regions_per_chunk() / 64) as usize];
        let last_at = last as usize * bs;
        bytes[last_at..last_at + bs]
            .copy_from_slice(&encode_chunk(mirror, last, &past, 512).unwrap());
        let (bm, problems) = decode_bitmap(&l, mirror, &bytes);
        let kinds: Vec<(u32, &SbError)> = problems.iter().map(|p| (p.index, &p.error)).collect();
        assert!(matches!(kinds[0], (0, SbError::ForeignMirror { .. })));
        assert!(matches!(kinds[1], (1, SbError::Inconsistent(_))));
        assert!(matches!(kinds[2], (2, SbError::BadMagic { .. })));
        assert!(matches!(kinds[3], (i, SbError::Inconsistent(_)) if i == last));
        let want: Vec<_> = [0, 1, 2, last]
            .iter()
            .map(|&i| l.regions_in_chunk(i))
            .collect();
        assert_eq!(bm, Bitmap::from_ranges(l.regions(), want));

        let (bm, problems) = decode_bitmap(&l, mirror, &chunks.concat()[..bs + 100]);
        assert_eq!(problems.len() as u32, l.chunk_count() - 1);
        assert!(matches!(problems[0].error, SbError::ShortBuffer { .. }));
        assert_eq!(bm.count(), l.regions() - l.regions_per_chunk());

        // decode_chunk itself on odd lengths.
        for len in [0, 8, 100, 511, 513, 4095] {
            assert!(matches!(
                decode_chunk(&vec![0; len], mirror, 0, 1),
                Err(SbError::Geometry(_))
            ));
        }
        assert!(encode_chunk(mirror, 0, &past, 512).is_ok());
        assert!(encode_chunk(mirror, 0, &[0; 61], 512).is_err());
    }
}
