//! Sizes as people write them, and how big a plex must be for a mirror of a given size.

/// The block size of every plex this crate makes.
pub const BLOCK_SIZE: u64 = 512;
/// The mirror's default region (one bit of its write-intent bitmap).
pub const DEFAULT_REGION: u64 = 1 << 20;

// The mirror's on-disk layout (docs/mirror-on-disk-format.md), as far as sizing needs it.
const HEADER_BYTES: u64 = 4096;
const CHUNK_HEADER_BYTES: u64 = 32;
const DATA_ALIGN: u64 = 1 << 20;

/// "10G", "512MiB", "1.5T", "4096": bytes. Units are binary (K = 1024), as for block devices.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("size {s:?} is not a number with an optional unit, like 10G");
    if num.is_empty() {
        return Err(bad());
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        u => {
            return Err(format!(
                "size {s:?}: unknown unit {u:?} (use K, M, G, T or P)"
            ))
        }
    };
    let bytes = match num.split_once('.') {
        None => num
            .parse::<u64>()
            .map_err(|_| bad())?
            .checked_mul(1 << shift),
        Some((whole, frac)) => {
            if frac.is_empty() || frac.len() > 6 {
                return Err(bad());
            }
            let whole = if whole.is_empty() {
                0
            } else {
                whole.parse::<u64>().map_err(|_| bad())?
            };
            let f: u64 = frac.parse().map_err(|_| bad())?;
            let scale = 10u64.pow(frac.len() as u32);
            whole.checked_mul(1 << shift).and_then(|w| {
                let part = (u128::from(f) << shift) / u128::from(scale);
                w.checked_add(u64::try_from(part).ok()?)
            })
        }
    }
    .ok_or_else(|| format!("size {s:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("size {s:?} must be more than zero"));
    }
    Ok(bytes)
}

/// 10737418240 → "10 GiB", 1536 → "1.5 KiB".
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Bytes a plex of `plex_bytes` gives up to the mirror's metadata: two header slots, the
/// bitmap (one bit per region of the whole plex, chunks of one block with a 32-byte header),
/// padding so data starts on a 1 MiB boundary.
pub fn metadata_bytes(plex_bytes: u64, region: u64) -> u64 {
    let slot = HEADER_BYTES.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let per_chunk = (BLOCK_SIZE - CHUNK_HEADER_BYTES) * 8;
    let chunks = plex_bytes.div_ceil(region).div_ceil(per_chunk).max(1);
    (2 * slot + chunks * BLOCK_SIZE).next_multiple_of(DATA_ALIGN)
}

/// The plex size for a mirror of at least `size` bytes: the size rounded up to whole MiB
/// (so every plex is the same, block-aligned), plus its metadata.
pub fn plex_bytes_for(size: u64, region: u64) -> Result<u64, String> {
    check_region(region)?;
    let data = size
        .checked_next_multiple_of(DATA_ALIGN)
        .ok_or("size too large")?;
    // The bitmap covers the whole plex, metadata included: grow until it fits.
    let mut plex = data + metadata_bytes(data, region);
    while plex - metadata_bytes(plex, region) < data {
        plex += DATA_ALIGN;
    }
    Ok(plex)
}

pub fn check_region(region: u64) -> Result<(), String> {
    if !(64 << 10..=1 << 30).contains(&region) || !region.is_power_of_two() {
        return Err(format!(
            "region size {region} must be a power of two from 64 KiB to 1 GiB"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size(" 512m ").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5T").unwrap(), 3 << 39);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(".5K").unwrap(), 512);
    }

    #[test]
    fn bad_sizes_say_why() {
        for (s, want) in [
            ("", "not a number"),
            ("G", "not a number"),
            ("10X", "unknown unit"),
            ("0", "more than zero"),
            ("1.G", "not a number"),
            ("99999999999P", "too large"),
            ("1.2.3G", "not a number"),
            ("-1G", "not a number"),
        ] {
            let e = parse_size(s).unwrap_err();
            assert!(e.contains(want), "{s:?}: {e}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(100), "100 B");
    }

    /// The mirror's own layout rule (`superblock/layout.rs`, `Layout::new`), restated, to check the
    /// sizing against: data = plex − metadata.
    fn mirror_data_bytes(plex: u64, region: u64) -> u64 {
        let regions = plex.div_ceil(region);
        let chunks = regions.div_ceil((512 - 32) * 8).max(1);
        let offset = ((2 * 8 + chunks) * 512).next_multiple_of(1 << 20);
        plex - offset
    }

    #[test]
    fn plexes_leave_the_mirror_at_least_the_size_asked_for() {
        for size in [
            1,
            (1 << 20) - 1,
            32 << 20,
            10 << 30,
            (3 << 40) + 12345,
            // Where the bitmap spills into another chunk.
            3840 << 20,
            3839 << 20,
        ] {
            for region in [64 << 10, 1 << 20, 1 << 30] {
                let plex = plex_bytes_for(size, region).unwrap();
                let data = mirror_data_bytes(plex, region);
                assert!(
                    data >= size,
                    "size {size} region {region}: plex {plex} gives {data}"
                );
                // Not wasteful: at most the alignment beyond what is needed.
                assert!(
                    data < size + (2 << 20),
                    "size {size} region {region}: {data}"
                );
                assert_eq!(plex % (1 << 20), 0);
            }
        }
    }

    #[test]
    fn metadata_is_a_mebibyte_for_ordinary_volumes() {
        assert_eq!(metadata_bytes(10 << 30, 1 << 20), 1 << 20);
        assert!(plex_bytes_for(1 << 20, 1000).is_err());
    }
}
