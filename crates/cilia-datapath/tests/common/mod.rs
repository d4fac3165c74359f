//! What the datapath fixture files share: two endpoints A and B (MACs and
//! addresses), the guard that runs a test only with privileges (and
//! fails, never skips, under CI=true), and for tests with real traffic the
//! servers and the transparent relay that plays the L7 proxy.

#![allow(dead_code)] // each test file uses its own subset
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use cilia_datapath::packet::Mac;

pub mod fixture;
pub mod icmp;
pub mod l4;
pub mod relay;
pub mod serve;

/// Every wait of the tests with real traffic ends by then.
pub const WAIT: Duration = Duration::from_secs(5);

pub const A_MAC: Mac = [0x0a, 0, 0, 0, 0, 0xa1];
pub const A_NODE_MAC: Mac = [0x0a, 0, 0, 0, 0, 0xa2];
pub const B_MAC: Mac = [0x0a, 0, 0, 0, 0, 0xb1];
pub const B_NODE_MAC: Mac = [0x0a, 0, 0, 0, 0, 0xb2];

pub fn a6() -> Ipv6Addr {
    "fd00:c1::a".parse().unwrap()
}
pub fn b6() -> Ipv6Addr {
    "fd00:c1::b".parse().unwrap()
}
pub fn gw6() -> Ipv6Addr {
    "fd00:c1::1".parse().unwrap()
}
pub fn a4() -> Ipv4Addr {
    "10.200.0.10".parse().unwrap()
}
pub fn b4() -> Ipv4Addr {
    "10.200.0.11".parse().unwrap()
}
pub fn gw4() -> Ipv4Addr {
    "10.200.0.1".parse().unwrap()
}

/// Returns from the test unless it may use BPF and network admin.
macro_rules! privileged {
    ($name:literal) => {
        if !cilia_testnet::require_privileges($name) {
            return;
        }
    };
}
pub(crate) use privileged;

/// Packets the datapath counted of `kind` (`CILIA_METRIC_*`) for `reason`
/// (any reason: `None`), over both directions and every CPU.
pub fn counted_any(dp: &cilia_datapath::BpfDatapath, kind: u8, reason: Option<u8>) -> u64 {
    dp.metrics()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.kind == kind && reason.is_none_or(|r| k.reason == r))
        .map(|(_, v)| v.packets)
        .sum()
}

/// Packets the datapath counted of `kind` for `reason`.
pub fn counted(dp: &cilia_datapath::BpfDatapath, kind: u8, reason: u8) -> u64 {
    counted_any(dp, kind, Some(reason))
}

/// Drops the datapath counted for `reason`.
pub fn drops(dp: &cilia_datapath::BpfDatapath, reason: u8) -> u64 {
    counted(dp, cilia_abi::CILIA_METRIC_DROP, reason)
}

/// `n` addresses of each family for the address filter tests, spread by a
/// multiplicative hash of their index: IPv6 `v6[0]:v6[1]:h1::h2:h3`, IPv4
/// `v4 | h & v4_mask`; `low` is or-ed into the last 16 bits of both (a bit
/// that keeps them off the fixture's own addresses).
pub fn spread_addrs(n: u32, v6: [u16; 2], v4: u32, v4_mask: u32, low: u16) -> Vec<IpAddr> {
    (0..n)
        .flat_map(|i| {
            let x = i.wrapping_mul(2_654_435_761);
            let (hi, mid, lo) = ((x >> 24) as u16, (x >> 16) as u16, x as u16 | low);
            [
                IpAddr::V6(Ipv6Addr::new(v6[0], v6[1], hi, 0, 0, 0, mid, lo)),
                IpAddr::V4(Ipv4Addr::from(v4 | (x & v4_mask) | u32::from(low))),
            ]
        })
        .collect()
}

/// Zeroes every word of the pinned address filter `name` under `root`.
pub fn zero_filter(root: &Path, name: &str) {
    let path = root.join("maps").join(name);
    let mut filter: aya::maps::Array<_, u64> =
        aya::maps::Map::Array(aya::maps::MapData::from_pin(&path).unwrap())
            .try_into()
            .unwrap();
    for i in 0..cilia_abi::CILIA_ADDR_FILTER_WORDS {
        filter.set(i, 0, 0).unwrap();
    }
}
