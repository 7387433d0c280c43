//! Which cores: SPDK-style core masks, and pinning a thread to its core.

use super::*;

/// Parses an SPDK-style core mask: `0x3`, `3` (hex), `[0,1]` or `0-1,4`.
pub fn parse_core_mask(s: &str) -> Result<Vec<usize>, ReactorError> {
    let bad = || ReactorError::BadMask(s.to_string());
    let t = s.trim();
    let mut cores = Vec::new();
    if t.starts_with('[') || t.contains(',') || t.contains('-') {
        let inner = t.trim_start_matches('[').trim_end_matches(']');
        for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = b.trim().parse().map_err(|_| bad())?;
                if a > b || b >= 1024 {
                    return Err(bad());
                }
                cores.extend(a..=b);
            } else {
                let c: usize = part.parse().map_err(|_| bad())?;
                if c >= 1024 {
                    return Err(bad());
                }
                cores.push(c);
            }
        }
    } else {
        let hex = t.trim_start_matches("0x").trim_start_matches("0X");
        if hex.is_empty() || hex.len() > 32 {
            return Err(bad());
        }
        let mask = u128::from_str_radix(hex, 16).map_err(|_| bad())?;
        cores.extend((0..128).filter(|i| mask & (1u128 << i) != 0));
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        return Err(ReactorError::EmptyMask);
    }
    Ok(cores)
}

/// Renders cores back as a hex mask, as SPDK prints them.
pub fn core_mask_string(cores: &[usize]) -> String {
    let mask = cores.iter().fold(0u128, |m, &c| m | (1u128 << c.min(127)));
    format!("0x{mask:x}")
}

pub(super) fn num_configured_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}

pub(super) fn pin_to_core(core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0) targets
    // the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
