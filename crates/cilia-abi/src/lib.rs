//! `#[repr(C)]` mirror of `bpf/include/cilia/abi.h`, the only structures the
//! agent and the BPF datapath exchange. The header is the source of truth:
//! `tests` below compare every size, field offset and constant against the
//! header compiled by the host C compiler, so the two cannot drift apart.

#![no_std]

/// Capacity of the endpoints map.
pub const CILIA_ENDPOINTS_MAX: u32 = 65536;
/// Family tag of IPv4 keys.
pub const CILIA_FAMILY_IPV4: u8 = 4;
/// Family tag of IPv6 keys.
pub const CILIA_FAMILY_IPV6: u8 = 6;

/// Metric kind: forwarded packets.
pub const CILIA_METRIC_FORWARD: u8 = 1;
/// Metric kind: dropped packets.
pub const CILIA_METRIC_DROP: u8 = 2;

pub const CILIA_FWD_ENDPOINT: u8 = 1;
pub const CILIA_FWD_STACK: u8 = 2;
pub const CILIA_FWD_ND_REPLY: u8 = 3;
pub const CILIA_FWD_ARP_REPLY: u8 = 4;

pub const CILIA_DROP_INVALID: u8 = 130;
pub const CILIA_DROP_UNSUPPORTED_L3: u8 = 131;
pub const CILIA_DROP_SPOOFED_SOURCE: u8 = 132;
pub const CILIA_DROP_TTL_EXCEEDED: u8 = 133;
pub const CILIA_DROP_UNSUPPORTED_ND: u8 = 134;
pub const CILIA_DROP_MULTICAST: u8 = 135;
pub const CILIA_DROP_REDIRECT_FAILED: u8 = 136;
pub const CILIA_DROP_WRITE_FAILED: u8 = 137;

pub const CILIA_DIR_EGRESS: u8 = 1;
pub const CILIA_DIR_INGRESS: u8 = 2;

/// Human name of a forward or drop reason, as printed by the CLI and metrics.
pub fn reason_name(kind: u8, reason: u8) -> &'static str {
    match (kind, reason) {
        (CILIA_METRIC_FORWARD, CILIA_FWD_ENDPOINT) => "to-endpoint",
        (CILIA_METRIC_FORWARD, CILIA_FWD_STACK) => "to-stack",
        (CILIA_METRIC_FORWARD, CILIA_FWD_ND_REPLY) => "nd-reply",
        (CILIA_METRIC_FORWARD, CILIA_FWD_ARP_REPLY) => "arp-reply",
        (CILIA_METRIC_DROP, CILIA_DROP_INVALID) => "Invalid packet",
        (CILIA_METRIC_DROP, CILIA_DROP_UNSUPPORTED_L3) => "Unsupported L3 protocol",
        (CILIA_METRIC_DROP, CILIA_DROP_SPOOFED_SOURCE) => "Invalid source address",
        (CILIA_METRIC_DROP, CILIA_DROP_TTL_EXCEEDED) => "TTL exceeded",
        (CILIA_METRIC_DROP, CILIA_DROP_UNSUPPORTED_ND) => "Unsupported ND message",
        (CILIA_METRIC_DROP, CILIA_DROP_MULTICAST) => "Multicast not routed",
        (CILIA_METRIC_DROP, CILIA_DROP_REDIRECT_FAILED) => "Redirect failed",
        (CILIA_METRIC_DROP, CILIA_DROP_WRITE_FAILED) => "Packet rewrite failed",
        _ => "unknown",
    }
}

/// Per-endpoint load-time specialization (`CILIA_CONFIG` in `.rodata`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointConfig {
    pub ipv6: [u8; 16],
    pub ipv4: [u8; 4],
    pub mac: [u8; 6],
    pub node_mac: [u8; 6],
    pub ifindex: u32,
    pub identity: u32,
    pub endpoint_id: u16,
    pub enable_ipv4: u8,
    pub pad: u8,
}

/// Key of the endpoints map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub pad: [u8; 3],
}

impl EndpointKey {
    pub fn from_ip(ip: core::net::IpAddr) -> Self {
        let mut key = EndpointKey::default();
        match ip {
            core::net::IpAddr::V4(v4) => {
                key.addr[..4].copy_from_slice(&v4.octets());
                key.family = CILIA_FAMILY_IPV4;
            }
            core::net::IpAddr::V6(v6) => {
                key.addr = v6.octets();
                key.family = CILIA_FAMILY_IPV6;
            }
        }
        key
    }

    /// The address this key stands for, or `None` for an unknown family.
    pub fn ip(&self) -> Option<core::net::IpAddr> {
        match self.family {
            CILIA_FAMILY_IPV4 => Some(core::net::IpAddr::V4(core::net::Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            ))),
            CILIA_FAMILY_IPV6 => Some(core::net::IpAddr::V6(self.addr.into())),
            _ => None,
        }
    }
}

/// Value of the endpoints map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ifindex: u32,
    pub identity: u32,
    pub endpoint_id: u16,
    pub flags: u16,
    pub mac: [u8; 6],
    pub node_mac: [u8; 6],
}

/// Key of the per-CPU metrics map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricsKey {
    pub kind: u8,
    pub reason: u8,
    pub dir: u8,
    pub pad: u8,
}

/// Value of the per-CPU metrics map (one per CPU; sum them).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "aya")]
mod pod {
    // SAFETY: all types are #[repr(C)], made only of integers and byte
    // arrays with explicit padding fields, so every bit pattern is valid and
    // there are no implicit padding bytes.
    unsafe impl aya::Pod for super::EndpointConfig {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::MetricsKey {}
    unsafe impl aya::Pod for super::MetricsValue {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{offset_of, size_of};

    include!(concat!(env!("OUT_DIR"), "/c_layout.rs"));

    fn rust_layout(st: &str, field: &str) -> usize {
        match (st, field) {
            ("endpoint_config", "") => size_of::<EndpointConfig>(),
            ("endpoint_config", "ipv6") => offset_of!(EndpointConfig, ipv6),
            ("endpoint_config", "ipv4") => offset_of!(EndpointConfig, ipv4),
            ("endpoint_config", "mac") => offset_of!(EndpointConfig, mac),
            ("endpoint_config", "node_mac") => offset_of!(EndpointConfig, node_mac),
            ("endpoint_config", "ifindex") => offset_of!(EndpointConfig, ifindex),
            ("endpoint_config", "identity") => offset_of!(EndpointConfig, identity),
            ("endpoint_config", "endpoint_id") => offset_of!(EndpointConfig, endpoint_id),
            ("endpoint_config", "enable_ipv4") => offset_of!(EndpointConfig, enable_ipv4),
            ("endpoint_key", "") => size_of::<EndpointKey>(),
            ("endpoint_key", "addr") => offset_of!(EndpointKey, addr),
            ("endpoint_key", "family") => offset_of!(EndpointKey, family),
            ("endpoint_info", "") => size_of::<EndpointInfo>(),
            ("endpoint_info", "ifindex") => offset_of!(EndpointInfo, ifindex),
            ("endpoint_info", "identity") => offset_of!(EndpointInfo, identity),
            ("endpoint_info", "endpoint_id") => offset_of!(EndpointInfo, endpoint_id),
            ("endpoint_info", "flags") => offset_of!(EndpointInfo, flags),
            ("endpoint_info", "mac") => offset_of!(EndpointInfo, mac),
            ("endpoint_info", "node_mac") => offset_of!(EndpointInfo, node_mac),
            ("metrics_key", "") => size_of::<MetricsKey>(),
            ("metrics_key", "kind") => offset_of!(MetricsKey, kind),
            ("metrics_key", "reason") => offset_of!(MetricsKey, reason),
            ("metrics_key", "dir") => offset_of!(MetricsKey, dir),
            ("metrics_value", "") => size_of::<MetricsValue>(),
            ("metrics_value", "packets") => offset_of!(MetricsValue, packets),
            ("metrics_value", "bytes") => offset_of!(MetricsValue, bytes),
            _ => panic!("abi.h has {st}.{field} but the Rust mirror does not"),
        }
    }

    #[test]
    fn every_size_and_offset_matches_the_c_header() {
        for (st, field, c) in C_LAYOUT {
            assert_eq!(
                rust_layout(st, field),
                *c,
                "{st}.{field}: Rust and abi.h disagree"
            );
        }
    }

    #[test]
    fn every_constant_matches_the_c_header() {
        for (name, c) in C_CONSTANTS {
            let rust: u64 = match *name {
                "CILIA_ENDPOINTS_MAX" => CILIA_ENDPOINTS_MAX.into(),
                "CILIA_FAMILY_IPV4" => CILIA_FAMILY_IPV4.into(),
                "CILIA_FAMILY_IPV6" => CILIA_FAMILY_IPV6.into(),
                "CILIA_METRIC_FORWARD" => CILIA_METRIC_FORWARD.into(),
                "CILIA_METRIC_DROP" => CILIA_METRIC_DROP.into(),
                "CILIA_FWD_ENDPOINT" => CILIA_FWD_ENDPOINT.into(),
                "CILIA_FWD_STACK" => CILIA_FWD_STACK.into(),
                "CILIA_FWD_ND_REPLY" => CILIA_FWD_ND_REPLY.into(),
                "CILIA_FWD_ARP_REPLY" => CILIA_FWD_ARP_REPLY.into(),
                "CILIA_DROP_INVALID" => CILIA_DROP_INVALID.into(),
                "CILIA_DROP_UNSUPPORTED_L3" => CILIA_DROP_UNSUPPORTED_L3.into(),
                "CILIA_DROP_SPOOFED_SOURCE" => CILIA_DROP_SPOOFED_SOURCE.into(),
                "CILIA_DROP_TTL_EXCEEDED" => CILIA_DROP_TTL_EXCEEDED.into(),
                "CILIA_DROP_UNSUPPORTED_ND" => CILIA_DROP_UNSUPPORTED_ND.into(),
                "CILIA_DROP_MULTICAST" => CILIA_DROP_MULTICAST.into(),
                "CILIA_DROP_REDIRECT_FAILED" => CILIA_DROP_REDIRECT_FAILED.into(),
                "CILIA_DROP_WRITE_FAILED" => CILIA_DROP_WRITE_FAILED.into(),
                "CILIA_DIR_EGRESS" => CILIA_DIR_EGRESS.into(),
                "CILIA_DIR_INGRESS" => CILIA_DIR_INGRESS.into(),
                other => panic!("abi.h defines {other} but the Rust mirror does not"),
            };
            assert_eq!(rust, *c, "{name}: Rust and abi.h disagree");
        }
    }

    #[test]
    fn endpoint_key_round_trips_both_families() {
        for ip in ["10.1.2.3", "fd00::42"] {
            let ip: core::net::IpAddr = ip.parse().unwrap();
            assert_eq!(EndpointKey::from_ip(ip).ip(), Some(ip));
        }
    }
}
