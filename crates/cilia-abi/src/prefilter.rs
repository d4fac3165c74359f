//! Rows of the XDP prefilter's maps (`cilia_prefilter_v4`, `_v6`,
//! `cilia_prefilter_counters`): a source CIDR and its counter slot, and
//! what was dropped for it. The only encoder and decoder of their keys.

use core::net::IpAddr;

use ipnet::IpNet;

use crate::{PrefilterV4Key, PrefilterV6Key, PrefilterValue, CILIA_PREFILTER_MAX};

/// Counter slots of `cilia_prefilter_counters`: one per CIDR of either
/// family, so `0..PREFILTER_SLOTS`.
pub const PREFILTER_SLOTS: u32 = CILIA_PREFILTER_MAX * 2;

/// One prefilter CIDR: packets from `cidr` are dropped and counted in slot
/// `counter` (below [`PREFILTER_SLOTS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefilterEntry {
    pub cidr: IpNet,
    pub counter: u32,
}

/// The key of a CIDR in the trie of its family (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PrefilterKey {
    V4(PrefilterV4Key),
    V6(PrefilterV6Key),
}

impl PrefilterKey {
    /// The key of `cidr`; host bits are cleared (the agent refuses CIDRs
    /// with host bits set before they get here).
    pub fn of(cidr: &IpNet) -> Self {
        match cidr.network() {
            IpAddr::V4(a) => Self::V4(PrefilterV4Key {
                prefixlen: u32::from(cidr.prefix_len()),
                addr: a.octets(),
            }),
            IpAddr::V6(a) => Self::V6(PrefilterV6Key {
                prefixlen: u32::from(cidr.prefix_len()),
                addr: a.octets(),
            }),
        }
    }
}

impl PrefilterEntry {
    pub fn key(&self) -> PrefilterKey {
        PrefilterKey::of(&self.cidr)
    }

    pub fn value(&self) -> PrefilterValue {
        PrefilterValue {
            counter: self.counter,
            pad: 0,
        }
    }

    /// The entry of a `cilia_prefilter_v4` element; `None` for a prefix
    /// length beyond 32.
    pub fn decode_v4(key: &PrefilterV4Key, value: &PrefilterValue) -> Option<Self> {
        let len = u8::try_from(key.prefixlen).ok()?;
        let cidr = IpNet::new(IpAddr::from(key.addr), len).ok()?;
        Some(Self {
            cidr,
            counter: value.counter,
        })
    }

    /// The entry of a `cilia_prefilter_v6` element; `None` for a prefix
    /// length beyond 128.
    pub fn decode_v6(key: &PrefilterV6Key, value: &PrefilterValue) -> Option<Self> {
        let len = u8::try_from(key.prefixlen).ok()?;
        let cidr = IpNet::new(IpAddr::from(key.addr), len).ok()?;
        Some(Self {
            cidr,
            counter: value.counter,
        })
    }
}

/// A prefilter CIDR with what it dropped (summed over CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefilterCount {
    pub entry: PrefilterEntry,
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_both_tries() {
        for (cidr, counter) in [("203.0.113.0/24", 3), ("2001:db8:1::/48", 70000)] {
            let entry = PrefilterEntry {
                cidr: cidr.parse().unwrap(),
                counter,
            };
            let back = match entry.key() {
                PrefilterKey::V4(k) => PrefilterEntry::decode_v4(&k, &entry.value()),
                PrefilterKey::V6(k) => PrefilterEntry::decode_v6(&k, &entry.value()),
            };
            assert_eq!(back, Some(entry));
        }
    }

    #[test]
    fn key_clears_host_bits_and_decode_refuses_long_prefixes() {
        let k = PrefilterKey::of(&"198.51.100.7/24".parse().unwrap());
        assert_eq!(
            k,
            PrefilterKey::V4(PrefilterV4Key {
                prefixlen: 24,
                addr: [198, 51, 100, 0]
            })
        );
        let bad = PrefilterV4Key {
            prefixlen: 33,
            addr: [0; 4],
        };
        assert_eq!(
            PrefilterEntry::decode_v4(&bad, &PrefilterValue::default()),
            None
        );
    }
}
