//! IP address management: one pool per family, carved from a configured
//! range. Pure logic over the set of addresses in use; persistence (and so
//! the guarantee that an address is never handed out twice, even across
//! restarts) belongs to the store, which runs allocation inside its write
//! transaction.
//!
//! Reserved in every pool: the network address and the first host address
//! (the node's router, every endpoint's gateway); in IPv4 also broadcast.

use std::collections::BTreeSet;
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
        let mut candidate = self.first() + 2;
        let last = self.last_allocatable();
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
        if candidate > last {
            return Err(IpamError::Exhausted {
                range: self.range,
                capacity: self.capacity(),
            });
        }
        Ok(self.addr_at(candidate))
    }

    /// Number of addresses of `used` inside this pool.
    pub fn used(&self, used: &BTreeSet<IpAddr>) -> u64 {
        used.iter().filter(|ip| self.range.contains(*ip)).count() as u64
    }
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
}
