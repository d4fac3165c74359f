//! IP address management: one pool per family, carved from a configured
//! range. Pure logic over the set of addresses in use; persistence (and so
//! the guarantee that an address is never handed out twice, even across
//! restarts) belongs to the store, which runs allocation inside its write
//! transaction.
//!
//! Reserved in every pool: the network address and the first host address
//! (the node's router, every endpoint's gateway); in IPv4 also broadcast.
//!
//! Quarantine: a released address or endpoint id is not handed out again
//! while a never-used one is left, and released ones come back least
//! recently released first (FIFO). A new container so never inherits the
//! conntrack entries, identity caches or peers' flows of the one that just
//! left, unless the pool is that small.
//!
//! The store keeps a high-water mark per pool (and for ids): fresh ones
//! come from above it. A release is recorded (with its sequence number) only
//! once the mark has reached the pool's end: before that the order of
//! releases cannot matter, because nothing released is reused until then.
//! So an IPv6 /64 that never wraps keeps no record of its releases, and a
//! pool that did wrap keeps at most one per address. After the wrap, the
//! addresses released without a record (all released before any recorded
//! one) come back first, lowest first, then the recorded ones, least
//! recently released first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("IPAM range {range}: too small: no address left after network, router and broadcast")]
    RangeTooSmall { range: IpNet },
    #[error("IPAM pool {range} is exhausted: all {capacity} addresses are allocated")]
    Exhausted { range: IpNet, capacity: u64 },
    #[error("address {ip} is already allocated")]
    AlreadyAllocated { ip: IpAddr },
    #[error("address {ip} is outside the IPAM range {range}")]
    OutOfRange { ip: IpAddr, range: IpNet },
    #[error("address {ip} is reserved in {range} (network, router or broadcast)")]
    Reserved { ip: IpAddr, range: IpNet },
}

/// One family's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    range: IpNet,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Orders addresses of one family numerically (string order would put
/// 10.0.0.10 below 10.0.0.9).
pub fn address_order(ip: IpAddr) -> u128 {
    to_u128(ip)
}

impl Pool {
    pub fn new(range: IpNet) -> Result<Self, IpamError> {
        let range = range.trunc();
        let pool = Self { range };
        if pool.capacity() < 1 {
            return Err(IpamError::RangeTooSmall { range });
        }
        Ok(pool)
    }

    pub fn range(&self) -> IpNet {
        self.range
    }

    fn host_bits(&self) -> u32 {
        u32::from(self.range.max_prefix_len() - self.range.prefix_len())
    }

    fn first(&self) -> u128 {
        to_u128(self.range.network())
    }

    fn addr_at(&self, v: u128) -> IpAddr {
        match self.range {
            IpNet::V4(_) => IpAddr::V4((v as u32).into()),
            IpNet::V6(_) => IpAddr::V6(v.into()),
        }
    }

    /// The node's router address: the first host address of the range.
    pub fn router(&self) -> IpAddr {
        self.addr_at(self.first() + 1)
    }

    /// Number of allocatable addresses (saturating at `u64::MAX`).
    pub fn capacity(&self) -> u64 {
        let reserved: u128 = if self.range.addr().is_ipv4() { 3 } else { 2 };
        let size: u128 = if self.host_bits() >= 127 {
            u128::MAX
        } else {
            1u128 << self.host_bits()
        };
        u64::try_from(size.saturating_sub(reserved)).unwrap_or(u64::MAX)
    }

    fn last_allocatable(&self) -> u128 {
        let size_minus_one = if self.host_bits() >= 128 {
            u128::MAX
        } else {
            (1u128 << self.host_bits()) - 1
        };
        let last = self.first() + size_minus_one;
        if self.range.addr().is_ipv4() {
            last - 1 // broadcast
        } else {
            last
        }
    }

    /// Checks that `ip` may be allocated given the addresses in `used`.
    pub fn check(&self, ip: IpAddr, used: &BTreeSet<IpAddr>) -> Result<(), IpamError> {
        if !self.range.contains(&ip) {
            return Err(IpamError::OutOfRange {
                ip,
                range: self.range,
            });
        }
        let v = to_u128(ip);
        if v < self.first() + 2 || v > self.last_allocatable() {
            return Err(IpamError::Reserved {
                ip,
                range: self.range,
            });
        }
        if used.contains(&ip) {
            return Err(IpamError::AlreadyAllocated { ip });
        }
        Ok(())
    }

    /// The lowest free address. Cost grows with the number of addresses in
    /// use below the answer, never with the size of the range.
    pub fn next_free(&self, used: &BTreeSet<IpAddr>) -> Result<IpAddr, IpamError> {
        let candidate = self.lowest_free_from(self.first() + 2, used);
        if candidate > self.last_allocatable() {
            return Err(IpamError::Exhausted {
                range: self.range,
                capacity: self.capacity(),
            });
        }
        Ok(self.addr_at(candidate))
    }

    /// The last allocatable address (the highest a mark can reach).
    pub fn last(&self) -> IpAddr {
        self.addr_at(self.last_allocatable())
    }

    /// Whether addresses never handed out are left above `high`, a
    /// high-water mark of this pool: whether the pool has not wrapped yet.
    pub fn fresh_left_above(&self, high: IpAddr) -> bool {
        self.range.contains(&high) && to_u128(high) < self.last_allocatable()
    }

    /// The lowest address above `high` (the highest ever handed out from
    /// this pool) not in `used`: the next never handed out, found without
    /// the released ones. `None` when `high` is not of this pool or no such
    /// address is left (the caller falls back to the quarantine).
    pub fn next_fresh_above(&self, high: IpAddr, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        if !self.range.contains(&high) {
            return None;
        }
        let start = (self.first() + 2).max(to_u128(high).saturating_add(1));
        let candidate = self.lowest_free_from(start, used);
        (candidate <= self.last_allocatable()).then(|| self.addr_at(candidate))
    }

    /// The lowest address from `start` on (as a number) not in `used`; may
    /// lie past the range's end. Walks the addresses in use in order: its
    /// cost grows with them, never with the size of the range.
    fn lowest_free_from(&self, start: u128, used: &BTreeSet<IpAddr>) -> u128 {
        let mut candidate = start;
        let in_range = used
            .iter()
            .filter(|ip| self.range.contains(*ip))
            .map(|ip| to_u128(*ip));
        for taken in in_range {
            if taken < candidate {
                continue;
            }
            if taken > candidate {
                break;
            }
            candidate += 1;
        }
        candidate
    }

    /// The address to hand out next, given the addresses in use and the
    /// released ones with their release sequence numbers: the lowest address
    /// never handed out, else the least recently released one.
    pub fn next_quarantined(
        &self,
        used: &BTreeSet<IpAddr>,
        released: &BTreeMap<IpAddr, u64>,
    ) -> Result<IpAddr, IpamError> {
        let mut seen: BTreeSet<IpAddr> = used.clone();
        seen.extend(released.keys().copied());
        if let Ok(fresh) = self.next_free(&seen) {
            return Ok(fresh);
        }
        released
            .iter()
            .filter(|(ip, _)| self.range.contains(*ip) && self.check(**ip, used).is_ok())
            .min_by_key(|(ip, seq)| (**seq, **ip))
            .map(|(ip, _)| *ip)
            .ok_or(IpamError::Exhausted {
                range: self.range,
                capacity: self.capacity(),
            })
    }

    /// Number of addresses of `used` inside this pool.
    pub fn used(&self, used: &BTreeSet<IpAddr>) -> u64 {
        used.iter().filter(|ip| self.range.contains(*ip)).count() as u64
    }
}

/// The endpoint id to hand out next (ids are 1..=65535): the lowest never
/// handed out, else one released without a record (before the ids wrapped),
/// else the least recently released; `None` when all are used. `high` is
/// the high-water mark, if recorded.
pub fn next_endpoint_id(
    used: &BTreeSet<u16>,
    released: &BTreeMap<u16, u64>,
    high: Option<u16>,
) -> Option<u16> {
    // Ids are handed out in increasing order, so the never-used ones are
    // those above the mark and every id in use or released.
    let highest = used
        .iter()
        .chain(released.keys())
        .chain(high.iter())
        .copied()
        .max()
        .unwrap_or(0);
    if let Some(fresh) = highest.checked_add(1) {
        return Some(fresh);
    }
    // Every id was handed out once: a hole below the highest that is
    // neither in use nor recorded was released before the ids wrapped
    // (or before quarantine existed), so before every recorded one.
    if let Some(hole) = (1..=u16::MAX).find(|id| !used.contains(id) && !released.contains_key(id)) {
        return Some(hole);
    }
    released
        .iter()
        .filter(|(id, _)| !used.contains(*id))
        .min_by_key(|(id, seq)| (**seq, **id))
        .map(|(id, _)| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: &str) -> Pool {
        Pool::new(s.parse().unwrap()).unwrap()
    }

    fn set(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn router_is_the_first_host_address_and_is_never_allocated() {
        let p = pool("10.200.0.0/24");
        assert_eq!(p.router().to_string(), "10.200.0.1");
        assert_eq!(p.next_free(&set(&[])).unwrap().to_string(), "10.200.0.2");
        assert!(matches!(
            p.check("10.200.0.1".parse().unwrap(), &set(&[])),
            Err(IpamError::Reserved { .. })
        ));
    }

    #[test]
    fn allocation_fills_holes_first() {
        let p = pool("fd00:c1::/120");
        let used = set(&["fd00:c1::2", "fd00:c1::4"]);
        assert_eq!(p.next_free(&used).unwrap().to_string(), "fd00:c1::3");
    }

    #[test]
    fn ipv4_pool_excludes_network_router_and_broadcast() {
        let p = pool("192.0.2.0/30");
        assert_eq!(p.capacity(), 1);
        let one = p.next_free(&set(&[])).unwrap();
        assert_eq!(one.to_string(), "192.0.2.2");
        let err = p.next_free(&set(&["192.0.2.2"])).unwrap_err();
        assert!(
            matches!(err, IpamError::Exhausted { capacity: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("exhausted"));
    }

    #[test]
    fn exhausted_ipv6_pool_is_a_clear_error() {
        let p = pool("fd00::/126");
        let used = set(&["fd00::2", "fd00::3"]);
        assert!(p
            .next_free(&used)
            .unwrap_err()
            .to_string()
            .contains("fd00::/126 is exhausted"));
    }

    #[test]
    fn double_allocation_and_out_of_range_are_rejected() {
        let p = pool("10.0.0.0/24");
        let used = set(&["10.0.0.5"]);
        assert_eq!(
            p.check("10.0.0.5".parse().unwrap(), &used),
            Err(IpamError::AlreadyAllocated {
                ip: "10.0.0.5".parse().unwrap()
            })
        );
        assert!(matches!(
            p.check("10.0.1.5".parse().unwrap(), &used),
            Err(IpamError::OutOfRange { .. })
        ));
    }

    #[test]
    fn too_small_ranges_are_refused() {
        assert!(Pool::new("10.0.0.0/31".parse().unwrap()).is_err());
        assert!(Pool::new("fd00::/127".parse().unwrap()).is_err());
    }

    #[test]
    fn huge_ipv6_ranges_saturate_capacity() {
        assert_eq!(pool("fd00::/32").capacity(), u64::MAX);
        assert_eq!(pool("fd00::/64").capacity(), u64::MAX - 1);
    }

    fn released(ips: &[(&str, u64)]) -> BTreeMap<IpAddr, u64> {
        ips.iter().map(|(s, q)| (s.parse().unwrap(), *q)).collect()
    }

    #[test]
    fn a_released_address_is_not_handed_out_while_a_fresh_one_is_left() {
        let p = pool("10.0.0.0/29"); // .2 to .6
        let used = set(&["10.0.0.3"]);
        let got = p
            .next_quarantined(&used, &released(&[("10.0.0.2", 1)]))
            .unwrap();
        assert_eq!(got.to_string(), "10.0.0.4");
    }

    #[test]
    fn released_addresses_come_back_least_recently_released_first() {
        let p = pool("fd00::/126"); // ::2 and ::3
        let got = p
            .next_quarantined(&set(&[]), &released(&[("fd00::2", 9), ("fd00::3", 4)]))
            .unwrap();
        assert_eq!(got.to_string(), "fd00::3", "released at 4, before ::2 at 9");
    }

    #[test]
    fn a_pool_of_used_and_no_released_addresses_is_exhausted() {
        let p = pool("fd00::/126");
        let err = p
            .next_quarantined(&set(&["fd00::2", "fd00::3"]), &BTreeMap::new())
            .unwrap_err();
        assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
    }

    #[test]
    fn a_released_endpoint_id_waits_behind_fresh_ids() {
        let used = BTreeSet::from([2u16]);
        let released = BTreeMap::from([(1u16, 1u64)]);
        assert_eq!(next_endpoint_id(&used, &released, None), Some(3));
        assert_eq!(
            next_endpoint_id(&BTreeSet::new(), &BTreeMap::new(), None),
            Some(1)
        );
    }

    #[test]
    fn once_every_id_was_used_the_least_recently_released_comes_back() {
        let used: BTreeSet<u16> = (1..=u16::MAX).filter(|id| *id != 7 && *id != 9).collect();
        let released = BTreeMap::from([(7u16, 20u64), (9u16, 10u64)]);
        assert_eq!(next_endpoint_id(&used, &released, None), Some(9));
        let all: BTreeSet<u16> = (1..=u16::MAX).collect();
        assert_eq!(next_endpoint_id(&all, &BTreeMap::new(), None), None);
    }

    #[test]
    fn after_the_ids_wrapped_an_unrecorded_release_comes_before_a_recorded_one() {
        // 3 was released before the wrap (no record), 5 after it.
        let used: BTreeSet<u16> = (1..=u16::MAX).filter(|id| *id != 3 && *id != 5).collect();
        let released = BTreeMap::from([(5u16, 1u64)]);
        assert_eq!(next_endpoint_id(&used, &released, Some(u16::MAX)), Some(3));
        // Below the mark nothing is fresh, even with nothing in use above.
        assert_eq!(
            next_endpoint_id(&BTreeSet::new(), &BTreeMap::new(), Some(40)),
            Some(41)
        );
    }

    #[test]
    fn a_pool_has_fresh_addresses_until_its_mark_reaches_the_last_one() {
        let p = pool("10.0.0.0/29"); // .2 to .6
        assert_eq!(p.last().to_string(), "10.0.0.6");
        assert!(p.fresh_left_above("10.0.0.5".parse().unwrap()));
        assert!(!p.fresh_left_above("10.0.0.6".parse().unwrap()));
        assert!(
            !p.fresh_left_above("10.0.1.2".parse().unwrap()),
            "not this pool's mark"
        );
        let v6 = pool("fd00::/64");
        assert!(v6.fresh_left_above("fd00::ffff".parse().unwrap()));
        assert_eq!(v6.last().to_string(), "fd00::ffff:ffff:ffff:ffff");
    }
}
