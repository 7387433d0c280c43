//! Where the metadata and the data sit on one plex: the two header slots, the bitmap chunks
//! and the data area, from the plex's block size and the mirror's region size.

use super::*;

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

pub(super) fn check_block_size(block_size: u32) -> Result<(), SbError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(SbError::Geometry(format!(
            "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

pub(super) fn check_region_size(region_size: u64, block_size: u32) -> Result<(), SbError> {
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

pub(super) fn slot_blocks(block_size: u32) -> u64 {
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
pub(super) fn data_offset_for(block_size: u32, chunks: u32) -> u64 {
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
    pub(super) block_size: u32,
    pub(super) region_size: u64,
    pub(super) plex_blocks: u64,
    /// Chunks reserved for the bitmap; enough for regions over the whole plex at creation.
    pub(super) bitmap_chunks: u32,
    pub(super) data_offset_blocks: u64,
    pub(super) data_blocks: u64,
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
    pub(super) fn from_parts(
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
