//! Port range <-> port prefix conversion.

/// Splits the inclusive range `first..=last` into the minimal list of
/// `(port, prefix_len)` prefixes covering exactly that range, in ascending order.
/// Returns an empty list if `first > last`.
pub fn port_range_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last);
    while start <= end {
        // Largest aligned block starting at `start` that does not pass `end`.
        let mut bits = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while bits > 0 && start + (1u32 << bits) - 1 > end {
            bits -= 1;
        }
        // start < 65536 here, and 16 - bits <= 16.
        out.push((start as u16, (16 - bits) as u8));
        start += 1u32 << bits;
    }
    out
}

/// Whether `port` lies in the prefix `prefix/len`.
pub(crate) fn prefix_contains(prefix: u16, len: u8, port: u16) -> bool {
    let mask = prefix_mask(len);
    (port & mask) == (prefix & mask)
}

/// Mask with the `len` leading bits of a u16 set.
pub(crate) fn prefix_mask(len: u8) -> u16 {
    if len == 0 {
        0
    } else {
        u16::MAX << (16 - u32::from(len.min(16)))
    }
}
