//! The sort under a large resolution: its claim log (often ~10^5 claims of
//! 12 bytes) sorted by a packed 64-bit key.
//!
//! Why a sort of our own: the keys of one resolution differ in few bits (a
//! CIDR policy: the ~10 low bits of the identity and the ~8 bits of the
//! port), and where those bits lie depends on the policy. A byte-wise radix
//! sort (as `radsort`'s) pays one scatter pass per byte that differs, four
//! for such a policy; digits cut to the bits that differ, up to
//! [`MAX_DIGIT_BITS`] each, need two. The scatter passes are most of the
//! sort's time, and the sort was a third of a CIDR resolution.

/// Widest digit: a histogram of 2^11 counters (8 KiB) stays in the first
/// level cache, and the scatter's 2^11 write streams in the second.
const MAX_DIGIT_BITS: u32 = 11;

/// Below this many items a comparison sort is cheaper than the histograms.
const SMALL: usize = 128;

/// Sorts `items` by `key`, stably: a least-significant-digit radix sort
/// over the bits in which the keys differ, in digits of at most
/// [`MAX_DIGIT_BITS`] bits.
#[cfg(test)]
pub(crate) fn sort_by_key<T: Copy>(items: &mut [T], key: impl Fn(&T) -> u64) {
    let first = items.first().map_or(0, &key);
    let differing = items.iter().fold(0u64, |acc, t| acc | (key(t) ^ first));
    sort_by_key_differing(items, key, differing);
}

/// [`sort_by_key`] given the key bits that differ between items (or more:
/// every bit that can differ), which whoever filled `items` can keep
/// cheaply as the keys' OR xor their AND.
pub(crate) fn sort_by_key_differing<T: Copy>(
    items: &mut [T],
    key: impl Fn(&T) -> u64,
    differing: u64,
) {
    if items.len() < SMALL {
        items.sort_by_key(|t| key(t));
        return;
    }
    let digits = digits(differing);
    if digits.is_empty() {
        return;
    }
    // One pass counts every digit's values.
    let mut counts = vec![[0u32; BUCKETS]; digits.len()];
    for t in items.iter() {
        let k = key(t);
        for (count, digit) in counts.iter_mut().zip(&digits) {
            count[digit.of(k)] += 1;
        }
    }
    let mut buf = vec![items[0]; items.len()];
    let mut in_buf = false;
    for (count, digit) in counts.iter_mut().zip(&digits) {
        // A digit with one value keeps the order as it is.
        if count.iter().any(|&c| c as usize == items.len()) {
            continue;
        }
        // Counts become each value's first position.
        let mut at = 0u32;
        for c in count.iter_mut() {
            let n = *c;
            *c = at;
            at += n;
        }
        let (src, dst) = if in_buf {
            (&buf[..], &mut *items)
        } else {
            (&items[..], &mut buf[..])
        };
        for t in src {
            let slot = &mut count[digit.of(key(t))];
            dst[*slot as usize] = *t;
            *slot += 1;
        }
        in_buf = !in_buf;
    }
    if in_buf {
        items.copy_from_slice(&buf);
    }
}

/// Values of a digit.
const BUCKETS: usize = 1 << MAX_DIGIT_BITS;

/// A run of key bits sorted in one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digit {
    shift: u32,
    mask: u64,
}

impl Digit {
    fn of(self, key: u64) -> usize {
        // (The mask is at most `BUCKETS - 1`; saying so spares a bounds check.)
        ((key >> self.shift) & self.mask) as usize & (BUCKETS - 1)
    }
}

/// The digits, least significant first, that cover every set bit of
/// `differing`: each starts at the lowest bit not yet covered.
fn digits(mut differing: u64) -> Vec<Digit> {
    let mut out = Vec::new();
    while differing != 0 {
        let shift = differing.trailing_zeros();
        let bits = MAX_DIGIT_BITS.min(64 - shift);
        let mask = u64::MAX >> (64 - bits);
        out.push(Digit { shift, mask });
        differing &= !(mask << shift);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{digits, sort_by_key, Digit, MAX_DIGIT_BITS, SMALL};
    use proptest::prelude::*;

    #[test]
    fn digits_cover_only_the_differing_bits() {
        assert_eq!(digits(0), vec![]);
        // Two runs of differing bits, each narrower than a digit.
        let d = digits(0xff << 5 | 0x3ff << 29);
        assert_eq!(
            d,
            vec![
                Digit {
                    shift: 5,
                    mask: 0x7ff
                },
                Digit {
                    shift: 29,
                    mask: 0x7ff
                }
            ]
        );
        // Every bit: six digits, the last one cut at bit 63.
        let all = digits(u64::MAX);
        assert_eq!(all.len(), 6);
        assert_eq!(all[5].shift, 5 * MAX_DIGIT_BITS);
        assert_eq!(all[5].mask, (1 << (64 - 5 * MAX_DIGIT_BITS)) - 1);
        assert_eq!(digits(1 << 63), vec![Digit { shift: 63, mask: 1 }]);
    }

    /// Keys from a few chosen bit positions (so the digits vary), each item
    /// tagged with its position: the sort must be stable.
    fn keys() -> impl Strategy<Value = Vec<u64>> {
        let masks = prop::sample::select(vec![
            u64::MAX,
            0xffff_ffff,
            0x3ff << 29 | 0xff << 5,
            1 << 63 | 0xff,
            0x7ff << 11,
            0b1,
        ]);
        (masks, 0..SMALL * 8).prop_flat_map(|(mask, n)| {
            prop::collection::vec(any::<u64>().prop_map(move |k| k & mask), n)
        })
    }

    proptest! {
        #[test]
        fn sorts_stably_like_the_standard_sort(keys in keys()) {
            let mut items: Vec<(u64, u32)> =
                keys.iter().enumerate().map(|(i, k)| (*k, i as u32)).collect();
            let mut expected = items.clone();
            expected.sort_by_key(|(k, _)| *k);
            sort_by_key(&mut items, |(k, _)| *k);
            prop_assert_eq!(items, expected);
        }
    }
}
