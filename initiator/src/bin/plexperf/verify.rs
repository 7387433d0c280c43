//! Self-describing blocks for `--verify`.
//!
//! Every block written carries: magic, its own LBA, a generation (run ID in the high half, the
//! per-unit write count in the low half) and a CRC32C of the whole block (computed with the CRC
//! field zeroed). A read checks all of it, so a block from the wrong place, a stale block, or a
//! torn/corrupted block is caught and reported with its LBA.

pub const MAGIC: u64 = 0x504c_5856_5246_5931; // "PLXVRFY1"
const CRC_AT: usize = 24;
const HDR: usize = 28;

fn block_crc(b: &[u8]) -> u32 {
    let c = crc32c::crc32c(&b[..CRC_AT]);
    crc32c::crc32c_append(c, &b[HDR..])
}

/// Fills one block.
pub fn fill(b: &mut [u8], lba: u64, gen: u64) {
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b[16..24].copy_from_slice(&gen.to_le_bytes());
    // Payload: a cheap xorshift stream seeded by (lba, gen), 8 bytes at a time.
    let mut x = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ gen ^ 0x2545_f491_4f6c_dd1d;
    for chunk in b[HDR..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = x.to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    b[CRC_AT..HDR].copy_from_slice(&[0; 4]);
    let c = block_crc(b);
    b[CRC_AT..HDR].copy_from_slice(&c.to_le_bytes());
}

/// What a read found in one block.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    Ok,
    /// No verify header: never written by plexperf --verify.
    Unwritten,
    Bad(String),
}

/// Checks one block read from `lba`; `want_gen` is the generation last written in this run
/// (None: unknown, e.g. written by an earlier run).
pub fn check(b: &[u8], lba: u64, want_gen: Option<u64>) -> Check {
    if b.len() < HDR + 8 {
        return Check::Bad("block too small".into());
    }
    let magic = u64::from_le_bytes(b[0..8].try_into().unwrap_or([0; 8]));
    if magic != MAGIC {
        return if want_gen.is_some() {
            Check::Bad("no verify header where a write completed".into())
        } else {
            Check::Unwritten
        };
    }
    let got_lba = u64::from_le_bytes(b[8..16].try_into().unwrap_or([0; 8]));
    let gen = u64::from_le_bytes(b[16..24].try_into().unwrap_or([0; 8]));
    let crc = u32::from_le_bytes(b[CRC_AT..HDR].try_into().unwrap_or([0; 4]));
    if got_lba != lba {
        return Check::Bad(format!("block holds LBA {got_lba}"));
    }
    if block_crc(b) != crc {
        return Check::Bad("checksum mismatch".into());
    }
    if let Some(w) = want_gen {
        if gen != w {
            return Check::Bad(format!("generation {gen:#x}, expected {w:#x}"));
        }
    }
    Check::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_check() {
        let mut b = vec![0u8; 4096];
        assert_eq!(check(&b, 5, None), Check::Unwritten);
        assert!(matches!(check(&b, 5, Some(1)), Check::Bad(_)));
        fill(&mut b, 5, 0x1_0000_0002);
        assert_eq!(check(&b, 5, Some(0x1_0000_0002)), Check::Ok);
        assert_eq!(check(&b, 5, None), Check::Ok);
        assert!(matches!(check(&b, 6, None), Check::Bad(_)));
        assert!(matches!(check(&b, 5, Some(3)), Check::Bad(_)));
        b[1000] ^= 1;
        assert!(matches!(check(&b, 5, None), Check::Bad(_)));
    }
}
