//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4), with weights.
//!
//! Each backend has a preference list over the table's entries, a
//! permutation given by two hashes of its address: `offset = h1 % M`,
//! `skip = h2 % (M - 1) + 1`, the j-th preference `(offset + j * skip) % M`
//! (a permutation because `M` is prime). Backends take turns claiming their
//! next still-free preferred entry until the table is full. With weights,
//! in turn `r` a backend of weight `w` may hold up to `ceil(r * w / w_max)`
//! entries, so its share is `w / sum(w)` up to one entry per backend.
//!
//! Properties (tested below): each backend's share is its weighted share;
//! removing one of N backends moves few entries that did not point at it
//! (the preference lists of the others do not change); the table depends
//! only on the set of (address, weight) pairs, not on their order or ids.

use std::net::SocketAddr;

use crate::model::LbError;

/// Smallest table size the agent accepts.
pub const MIN_TABLE_SIZE: u32 = 1021;
/// Largest table size the agent accepts.
pub const MAX_TABLE_SIZE: u32 = 131_071;

/// A backend as the table sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend {
    pub id: u32,
    pub addr: SocketAddr,
    /// 0: not in the table.
    pub weight: u32,
}

/// Whether `n` is prime (trial division: table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Checks a configured table size: a prime in
/// [`MIN_TABLE_SIZE`]..=[`MAX_TABLE_SIZE`].
pub fn check_table_size(size: u32) -> Result<u32, LbError> {
    let err = |reason: String| LbError::Field {
        field: "maglev table size".into(),
        reason,
    };
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
        return Err(err(format!(
            "{size} is outside {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE}"
        )));
    }
    if !is_prime(size) {
        return Err(err(format!(
            "{size} is not prime (e.g. 1021, 4093, 16381, 65521, 131071)"
        )));
    }
    Ok(size)
}

/// FNV-1a (64 bit) of `bytes` from `basis`, then a 64-bit finalizer so
/// that close addresses get unrelated offsets and skips.
fn hash(basis: u64, bytes: &[u8]) -> u64 {
    let mut h = basis;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The bytes a backend is hashed by: family, address, port.
fn address_bytes(addr: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(19);
    match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        std::net::IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

/// The table: `size` entries, each a backend id; all 0 when no backend
/// has a weight. `size` must be prime (see [`check_table_size`]).
pub fn table(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    let mut live: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() || m < 2 {
        return vec![0; size as usize];
    }
    // Turn order by address: the table does not depend on list order.
    live.sort_by_key(|b| b.addr);
    let prefs: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let bytes = address_bytes(b.addr);
            let offset = hash(0xcbf2_9ce4_8422_2325, &bytes) % m;
            let skip = hash(0x8422_2325_cbf2_9ce4, &bytes) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let w_max = u64::from(live.iter().map(|b| b.weight).max().unwrap_or(1));
    const FREE: u32 = u32::MAX;
    let mut entries = vec![FREE; size as usize];
    let mut next = vec![0u64; live.len()];
    let mut held = vec![0u64; live.len()];
    let mut filled = 0u64;
    let mut turn = 0u64;
    // Each turn the heaviest backend claims one entry: at most `m` turns.
    while filled < m {
        turn += 1;
        for (i, b) in live.iter().enumerate() {
            let allowed = (turn * u64::from(b.weight)).div_ceil(w_max);
            while held[i] < allowed && filled < m {
                let (offset, skip) = prefs[i];
                // A permutation of 0..m: a free entry comes within m steps.
                let mut c = (offset + next[i] * skip) % m;
                while entries[c as usize] != FREE {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                entries[c as usize] = i as u32;
                next[i] += 1;
                held[i] += 1;
                filled += 1;
            }
            if filled == m {
                break;
            }
        }
    }
    entries.into_iter().map(|i| live[i as usize].id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    const M: u32 = crate::DEFAULT_TABLE_SIZE;

    fn counts(table: &[u32]) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        for id in table {
            *out.entry(*id).or_default() += 1;
        }
        out
    }

    fn backend(id: u32, seed: u32, weight: u32) -> MaglevBackend {
        let ip = if seed.is_multiple_of(2) {
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + seed))
        } else {
            IpAddr::V6(Ipv6Addr::from(
                0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(seed),
            ))
        };
        MaglevBackend {
            id,
            addr: SocketAddr::new(ip, 8000 + (seed % 7) as u16),
            weight,
        }
    }

    /// Distinct backends 1..=n from distinct seeds.
    fn backends(seeds: &[u32], weights: &[u32]) -> Vec<MaglevBackend> {
        seeds
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (s, w))| backend(i as u32 + 1, *s, *w))
            .collect()
    }

    fn distinct_seeds(max: usize) -> impl Strategy<Value = Vec<u32>> {
        proptest::collection::btree_set(1u32..1_000_000, 2..=max)
            .prop_map(|s| s.into_iter().collect())
    }

    #[test]
    fn table_sizes_must_be_prime_and_in_range() {
        assert_eq!(check_table_size(16381), Ok(16381));
        assert_eq!(check_table_size(1021), Ok(1021));
        assert_eq!(check_table_size(131_071), Ok(131_071));
        let e = check_table_size(16384).expect_err("even").to_string();
        assert!(e.contains("16384 is not prime"), "{e}");
        let e = check_table_size(1019).expect_err("small").to_string();
        assert!(e.contains("outside 1021..=131071"), "{e}");
        assert!(check_table_size(262_139).is_err());
        assert!(is_prime(65521) && !is_prime(65535) && !is_prime(1) && is_prime(2));
    }

    #[test]
    fn no_weighted_backend_gives_an_empty_table() {
        let t = table(&backends(&[1, 2], &[0, 0]), 1021);
        assert_eq!(t.len(), 1021);
        assert!(t.iter().all(|id| *id == 0));
    }

    #[test]
    fn a_single_backend_holds_every_entry() {
        let t = table(&backends(&[9], &[3]), 1021);
        assert!(t.iter().all(|id| *id == 1));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn each_backend_gets_its_share_within_5_percent(seeds in distinct_seeds(40)) {
            let b = backends(&seeds, &vec![1; seeds.len()]);
            let t = table(&b, M);
            prop_assert_eq!(t.len(), M as usize);
            let share = f64::from(M) / seeds.len() as f64;
            let c = counts(&t);
            for x in &b {
                let n = c.get(&x.id).copied().unwrap_or(0) as f64;
                prop_assert!((n - share).abs() <= share * 0.05, "{} has {} of {}", x.id, n, share);
            }
        }

        #[test]
        fn weights_are_respected_and_weight_0_is_left_out(
            seeds in distinct_seeds(12),
            raw in proptest::collection::vec(0u32..=10, 12),
        ) {
            let mut weights: Vec<u32> = raw[..seeds.len()].to_vec();
            weights[0] = weights[0].max(1);
            let b = backends(&seeds, &weights);
            let t = table(&b, M);
            let total: u32 = weights.iter().sum();
            let c = counts(&t);
            for x in &b {
                let n = c.get(&x.id).copied().unwrap_or(0) as f64;
                let share = f64::from(M) * f64::from(x.weight) / f64::from(total);
                prop_assert!((n - share).abs() <= (share * 0.05).max(1.0),
                    "{} (weight {}) has {} of {}", x.id, x.weight, n, share);
                if x.weight == 0 {
                    prop_assert_eq!(n, 0.0);
                }
            }
        }

        #[test]
        fn removing_one_backend_moves_few_other_entries(
            seeds in distinct_seeds(30),
            pick in any::<prop::sample::Index>(),
        ) {
            let b = backends(&seeds, &vec![1; seeds.len()]);
            let before = table(&b, M);
            let gone = b[pick.index(b.len())].id;
            let rest: Vec<_> = b.iter().copied().filter(|x| x.id != gone).collect();
            let after = table(&rest, M);
            let kept: Vec<usize> = (0..before.len()).filter(|i| before[*i] != gone).collect();
            let moved = kept.iter().filter(|i| before[**i] != after[**i]).count();
            let bound = kept.len() / b.len() + M as usize / 100;
            prop_assert!(moved <= bound, "{} of {} moved (bound {})", moved, kept.len(), bound);
            prop_assert!(after.iter().all(|id| *id != gone));
        }

        #[test]
        fn the_table_depends_on_the_backends_not_their_order(seeds in distinct_seeds(20)) {
            let b = backends(&seeds, &vec![2; seeds.len()]);
            let mut reversed = b.clone();
            reversed.reverse();
            prop_assert_eq!(table(&b, 1021), table(&reversed, 1021));
            prop_assert_eq!(table(&b, 1021), table(&b, 1021));
        }
    }
}
