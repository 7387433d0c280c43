//! Small helpers shared by the structure modules.

/// Copies `s` into `dst` and pads the rest with ASCII spaces, as Identify's
/// SN/MN/FR fields require ("ASCII string, space padded"). Bytes beyond
/// `dst.len()` are dropped; non-printable bytes become `?` so a controller
/// never reports a field the host would reject.
pub(crate) fn fill_ascii_padded(dst: &mut [u8], s: &str) {
    let src = s.as_bytes();
    for (i, d) in dst.iter_mut().enumerate() {
        *d = match src.get(i) {
            Some(&b) if (0x20..0x7f).contains(&b) => b,
            Some(_) => b'?',
            None => b' ',
        };
    }
}

/// Reads a space-padded ASCII field, trimming trailing spaces and NULs.
/// Returns `None` when the field is not valid UTF-8.
pub(crate) fn read_ascii_padded(src: &[u8]) -> Option<&str> {
    let end = src
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |p| p + 1);
    core::str::from_utf8(src.get(..end)?).ok()
}

/// Copies `s` into a NUL-padded field (NQNs, discovery strings). Returns
/// `false` without touching `dst` if `s` plus a terminating NUL does not fit.
pub(crate) fn fill_nul_padded(dst: &mut [u8], s: &str) -> bool {
    let src = s.as_bytes();
    if src.len() >= dst.len() {
        return false;
    }
    for (i, d) in dst.iter_mut().enumerate() {
        *d = src.get(i).copied().unwrap_or(0);
    }
    true
}

/// The bytes of a NUL-terminated field up to (not including) the first NUL,
/// or the whole field if it has none.
pub(crate) fn until_nul(src: &[u8]) -> &[u8] {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    src.get(..end).unwrap_or(src)
}
