//! `#[repr(C)]` mirror of `bpf/include/cilia/abi.h`, the only structures the
//! agent and the BPF datapath exchange. The header is the source of truth:
//! `tests` below compare every size, field offset and constant against the
//! header compiled by the host C compiler, so the two cannot drift apart.

#![no_std]

/// Declares a `#[repr(C)]` mirror of an abi.h struct with the derives every
/// one has (plus the given ones) and, with the `aya` feature, `aya::Pod`.
macro_rules! abi_struct {
    ($($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* })+) => {
        $(
            $(#[$meta])*
            #[repr(C)]
            #[derive(Debug, Clone, Copy, PartialEq, Eq)]
            pub struct $name { $($body)* }

            // SAFETY: the struct is #[repr(C)], made only of integers and
            // byte arrays with explicit padding fields, so every bit pattern
            // is valid and there are no implicit padding bytes (the layout
            // test below checks every offset against abi.h).
            #[cfg(feature = "aya")]
            unsafe impl aya::Pod for $name {}
        )+
    };
}

pub mod rows;
pub use rows::{
    CtEntry, Direction, EndpointEntry, EndpointPolicy, Enforcement, IpcacheEntry, MetricKind,
    MetricsEntry, PolicyDelta, PolicyEntry, Verdict,
};

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

pub const CILIA_DROP_POLICY: u8 = 138;
pub const CILIA_DROP_CT_FULL: u8 = 139;
pub const CILIA_DROP_EXT_HDR: u8 = 140;
pub const CILIA_DROP_FRAG_NO_FLOW: u8 = 141;
pub const CILIA_DROP_ND_INVALID: u8 = 142;
pub const CILIA_DROP_CT_BUDGET: u8 = 143;

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
        (CILIA_METRIC_DROP, CILIA_DROP_POLICY) => "Policy denied",
        (CILIA_METRIC_DROP, CILIA_DROP_CT_FULL) => "Conntrack full",
        (CILIA_METRIC_DROP, CILIA_DROP_EXT_HDR) => "Invalid IPv6 extension header",
        (CILIA_METRIC_DROP, CILIA_DROP_FRAG_NO_FLOW) => "Fragment of unknown datagram",
        (CILIA_METRIC_DROP, CILIA_DROP_ND_INVALID) => "Invalid ND message",
        (CILIA_METRIC_DROP, CILIA_DROP_CT_BUDGET) => "Endpoint conntrack budget exhausted",
        _ => "unknown",
    }
}

abi_struct! {
    /// Per-endpoint load-time specialization (`CILIA_CONFIG` in `.rodata`).
    #[derive(Default)]
    pub struct EndpointConfig {
        pub ipv6: [u8; 16],
        pub ipv4: [u8; 4],
        pub mac: [u8; 6],
        pub node_mac: [u8; 6],
        pub ifindex: u32,
        pub identity: u32,
        pub endpoint_id: u16,
        pub enable_ipv4: u8,
        /// 1: event code kept; 0: pruned by the verifier (benchmark baseline).
        pub monitor: u8,
    }
}

abi_struct! {
    /// Key of the endpoints map.
    #[derive(Default, Hash)]
    pub struct EndpointKey {
        pub addr: [u8; 16],
        pub family: u8,
        pub pad: [u8; 3],
    }
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

abi_struct! {
    /// Value of the endpoints map.
    #[derive(Default)]
    pub struct EndpointInfo {
        pub ifindex: u32,
        pub identity: u32,
        pub endpoint_id: u16,
        pub flags: u16,
        pub mac: [u8; 6],
        pub node_mac: [u8; 6],
    }
}

abi_struct! {
    /// Key of the per-CPU metrics map.
    #[derive(Default, Hash, PartialOrd, Ord)]
    pub struct MetricsKey {
        pub kind: u8,
        pub reason: u8,
        pub dir: u8,
        pub pad: u8,
    }
}

abi_struct! {
    /// Value of the per-CPU metrics map (one per CPU; sum them).
    #[derive(Default)]
    pub struct MetricsValue {
        pub packets: u64,
        pub bytes: u64,
    }
}

pub const CILIA_ID_HOST: u32 = 1;
pub const CILIA_ID_WORLD: u32 = 2;
pub const CILIA_ID_UNMANAGED: u32 = 3;
pub const CILIA_ID_HEALTH: u32 = 4;
pub const CILIA_ID_INIT: u32 = 5;
pub const CILIA_ID_REMOTE_NODE: u32 = 6;
/// Key identity of the per-endpoint enforcement flags in a policy map.
pub const CILIA_ID_ENFORCEMENT: u32 = 0xffff_ffff;

pub const CILIA_IPCACHE_MAX: u32 = 524288;
pub const CILIA_POLICY_MAX: u32 = 131072;
pub const CILIA_POLICY_ENDPOINTS_MAX: u32 = 65536;
pub const CILIA_CT_MAX: u32 = 262144;
pub const CILIA_METRICS_MAX: u32 = 1024;
pub const CILIA_CT_BUDGET_DEFAULT: u32 = 32768;
pub const CILIA_FRAG_MAX: u32 = 16384;
pub const CILIA_IPV6_EXT_MAX: u32 = 8;
pub const CILIA_FRAG_TIMEOUT: u64 = 30;

pub const CILIA_VERDICT_ALLOW: u8 = 1;
pub const CILIA_VERDICT_DENY: u8 = 2;

pub const CILIA_CT_SEEN_REPLY: u16 = 1;
pub const CILIA_CT_CLOSING: u16 = 2;
/// The flow was revoked by a policy change (kept, so it cannot be revived
/// from the other side).
pub const CILIA_CT_DENIED: u16 = 4;
pub const CILIA_CT_TCP_TIMEOUT: u32 = 21600;
pub const CILIA_CT_TCP_SYN_TIMEOUT: u32 = 60;
pub const CILIA_CT_TCP_CLOSE: u32 = 10;
pub const CILIA_CT_OTHER_TIMEOUT: u32 = 60;

abi_struct! {
    /// Key of the ipcache LPM trie. `prefixlen` = 32 (family + padding) + the
    /// address prefix length.
    #[derive(Default, Hash, PartialOrd, Ord)]
    pub struct IpcacheKey {
        pub prefixlen: u32,
        pub family: u8,
        pub pad: [u8; 3],
        pub addr: [u8; 16],
    }
}

impl IpcacheKey {
    pub fn new(addr: core::net::IpAddr, prefix_len: u8) -> Self {
        let ep = EndpointKey::from_ip(addr);
        Self {
            prefixlen: 32 + u32::from(prefix_len),
            family: ep.family,
            pad: [0; 3],
            addr: ep.addr,
        }
    }

    /// The prefix this key stands for: address and prefix length.
    pub fn prefix(&self) -> Option<(core::net::IpAddr, u8)> {
        let ip = EndpointKey {
            addr: self.addr,
            family: self.family,
            pad: [0; 3],
        }
        .ip()?;
        Some((ip, self.prefixlen.saturating_sub(32) as u8))
    }
}

abi_struct! {
    #[derive(Default)]
    pub struct IpcacheValue {
        pub identity: u32,
        pub flags: u32,
    }
}

abi_struct! {
    /// Key of a per-endpoint policy LPM trie: [identity][direction][proto][port].
    #[derive(Default, Hash, PartialOrd, Ord)]
    pub struct PolicyKey {
        pub prefixlen: u32,
        /// Network byte order.
        pub identity: u32,
        pub direction: u8,
        pub proto: u8,
        /// Network byte order.
        pub dport: u16,
    }
}

abi_struct! {
    #[derive(Default)]
    pub struct PolicyValue {
        pub verdict: u8,
        /// `match` in C: CILIA_MATCH_* of this entry.
        pub match_kind: u8,
        pub proxy_port: u16,
        pub rule: u32,
    }
}

abi_struct! {
    #[derive(Default, Hash)]
    pub struct CtKey {
        pub saddr: [u8; 16],
        pub daddr: [u8; 16],
        /// Network byte order.
        pub sport: u16,
        /// Network byte order.
        pub dport: u16,
        pub proto: u8,
        pub family: u8,
        pub pad: [u8; 2],
    }

    #[derive(Default)]
    pub struct CtValue {
        pub expires: u64,
        pub packets: u64,
        pub bytes: u64,
        pub policy_rev: u32,
        pub src_identity: u32,
        pub dst_identity: u32,
        pub flags: u16,
        /// Endpoint whose program created the entry: the budget it counts on.
        pub owner: u16,
    }

    /// Key of the fragments map: one fragmented datagram.
    #[derive(Default, Hash)]
    pub struct FragKey {
        pub saddr: [u8; 16],
        pub daddr: [u8; 16],
        pub id: u32,
        pub proto: u8,
        pub family: u8,
        pub pad: [u8; 2],
    }

    /// Value of the fragments map: the ports of the datagram's first fragment.
    #[derive(Default)]
    pub struct FragValue {
        pub expires: u64,
        pub sport: u16,
        pub dport: u16,
        pub pad: [u8; 4],
    }
}

abi_struct! {
    #[derive(Default)]
    pub struct GlobalConfig {
        pub policy_rev: u32,
        pub monitor_level: u32,
        /// Conntrack entries one endpoint may hold; 0: CILIA_CT_BUDGET_DEFAULT.
        pub ct_budget: u32,
        pub pad: u32,
    }
}

pub const CILIA_MATCH_NONE: u8 = 0;
pub const CILIA_MATCH_L3: u8 = 1;
pub const CILIA_MATCH_PROTO: u8 = 2;
pub const CILIA_MATCH_PORT: u8 = 3;
pub const CILIA_ENFORCE: u8 = 1;
pub const CILIA_ENFORCE_AUDIT: u8 = 2;
pub const CILIA_MONITOR_OFF: u32 = 0;
pub const CILIA_MONITOR_DROPS: u32 = 1;
pub const CILIA_MONITOR_TRACE: u32 = 2;
pub const CILIA_MONITOR_DEBUG: u32 = 3;
pub const CILIA_EVENT_DEBUG: u8 = 4;
pub const CILIA_CT_STATE_NEW: u8 = 1;
pub const CILIA_CT_STATE_ESTABLISHED: u8 = 2;
pub const CILIA_CT_STATE_REPLY: u8 = 3;
pub const CILIA_CT_STATE_RELATED: u8 = 4;
pub const CILIA_CT_STATE_REVOKED: u8 = 5;

/// Name of a conntrack state reported by debug events.
pub fn ct_state_name(state: u8) -> &'static str {
    match state {
        CILIA_CT_STATE_NEW => "new",
        CILIA_CT_STATE_ESTABLISHED => "established",
        CILIA_CT_STATE_REPLY => "reply",
        CILIA_CT_STATE_RELATED => "related",
        CILIA_CT_STATE_REVOKED => "revoked",
        _ => "unknown",
    }
}
pub const CILIA_EVENTS_SIZE: u32 = 1 << 22;
pub const CILIA_EVENT_CAPLEN: usize = 64;
pub const CILIA_EVENT_DROP: u8 = 1;
pub const CILIA_EVENT_TRACE: u8 = 2;
pub const CILIA_EVENT_POLICY_VERDICT: u8 = 3;
pub const CILIA_VERDICT_AUDIT: u8 = 3;
pub const CILIA_METRIC_LOST: u8 = 3;

abi_struct! {
    /// One datapath event, as read from the `cilia_events` ring buffer.
    pub struct Event {
        pub ts: u64,
        pub type_: u8,
        pub reason: u8,
        pub dir: u8,
        pub verdict: u8,
        pub endpoint_id: u16,
        pub peer_endpoint: u16,
        pub src_identity: u32,
        pub dst_identity: u32,
        pub rule: u32,
        pub len: u32,
        pub family: u8,
        pub proto: u8,
        pub match_kind: u8,
        pub caplen: u8,
        /// Network byte order.
        pub sport: u16,
        /// Network byte order.
        pub dport: u16,
        pub saddr: [u8; 16],
        pub daddr: [u8; 16],
        pub data: [u8; CILIA_EVENT_CAPLEN],
    }
}

impl Event {
    /// Reads an event from ring-buffer bytes; `None` if too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: Event is repr(C) plain data (integers and byte arrays, no
        // invalid bit patterns), the length is checked above, and
        // read_unaligned copes with any alignment of the buffer.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{offset_of, size_of};

    include!(concat!(env!("OUT_DIR"), "/c_layout.rs"));

    /// Every size and field offset of the Rust mirror, named as in abi.h:
    /// `Type as "c_name" { field, field as "c_field" }`.
    macro_rules! layouts {
        ($($ty:ident as $c:literal { $($f:ident $(as $cf:literal)?),* })*) => {{
            let mut out = std::vec::Vec::new();
            $(
                out.push(($c, "", size_of::<$ty>()));
                $(out.push(($c, layouts!(@name $f $($cf)?), offset_of!($ty, $f)));)*
            )*
            out
        }};
        (@name $f:ident $cf:literal) => { $cf };
        (@name $f:ident) => { stringify!($f) };
    }

    fn rust_layout(st: &str, field: &str) -> usize {
        let table: std::vec::Vec<(&str, &str, usize)> = layouts! {
            EndpointConfig as "endpoint_config" { ipv6, ipv4, mac, node_mac, ifindex, identity, endpoint_id, enable_ipv4, monitor }
            EndpointKey as "endpoint_key" { addr, family }
            EndpointInfo as "endpoint_info" { ifindex, identity, endpoint_id, flags, mac, node_mac }
            MetricsKey as "metrics_key" { kind, reason, dir }
            MetricsValue as "metrics_value" { packets, bytes }
            IpcacheKey as "ipcache_key" { prefixlen, family, addr }
            IpcacheValue as "ipcache_value" { identity, flags }
            PolicyKey as "policy_key" { prefixlen, identity, direction, proto, dport }
            PolicyValue as "policy_value" { verdict, match_kind as "match", proxy_port, rule }
            CtKey as "ct_key" { saddr, daddr, sport, dport, proto, family }
            CtValue as "ct_value" { expires, packets, bytes, policy_rev, src_identity, dst_identity, flags, owner }
            FragKey as "frag_key" { saddr, daddr, id, proto, family }
            FragValue as "frag_value" { expires, sport, dport }
            GlobalConfig as "global_config" { policy_rev, monitor_level, ct_budget }
            Event as "event" { ts, type_ as "type", reason, dir, verdict, endpoint_id, peer_endpoint, src_identity, dst_identity, rule, len, family, proto, match_kind as "match", caplen, sport, dport, saddr, daddr, data }
        };
        table
            .iter()
            .find(|(s, f, _)| *s == st && *f == field)
            .map(|(_, _, v)| *v)
            .unwrap_or_else(|| panic!("abi.h has {st}.{field} but the Rust mirror does not"))
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
                "CILIA_DROP_POLICY" => CILIA_DROP_POLICY.into(),
                "CILIA_DROP_CT_FULL" => CILIA_DROP_CT_FULL.into(),
                "CILIA_DROP_EXT_HDR" => CILIA_DROP_EXT_HDR.into(),
                "CILIA_DROP_FRAG_NO_FLOW" => CILIA_DROP_FRAG_NO_FLOW.into(),
                "CILIA_DROP_ND_INVALID" => CILIA_DROP_ND_INVALID.into(),
                "CILIA_DROP_CT_BUDGET" => CILIA_DROP_CT_BUDGET.into(),
                "CILIA_CT_BUDGET_DEFAULT" => CILIA_CT_BUDGET_DEFAULT.into(),
                "CILIA_FRAG_MAX" => CILIA_FRAG_MAX.into(),
                "CILIA_IPV6_EXT_MAX" => CILIA_IPV6_EXT_MAX.into(),
                "CILIA_FRAG_TIMEOUT" => CILIA_FRAG_TIMEOUT,
                "CILIA_ID_HOST" => CILIA_ID_HOST.into(),
                "CILIA_ID_WORLD" => CILIA_ID_WORLD.into(),
                "CILIA_ID_UNMANAGED" => CILIA_ID_UNMANAGED.into(),
                "CILIA_ID_HEALTH" => CILIA_ID_HEALTH.into(),
                "CILIA_ID_INIT" => CILIA_ID_INIT.into(),
                "CILIA_ID_REMOTE_NODE" => CILIA_ID_REMOTE_NODE.into(),
                "CILIA_ID_ENFORCEMENT" => CILIA_ID_ENFORCEMENT.into(),
                "CILIA_IPCACHE_MAX" => CILIA_IPCACHE_MAX.into(),
                "CILIA_POLICY_MAX" => CILIA_POLICY_MAX.into(),
                "CILIA_POLICY_ENDPOINTS_MAX" => CILIA_POLICY_ENDPOINTS_MAX.into(),
                "CILIA_CT_MAX" => CILIA_CT_MAX.into(),
                "CILIA_METRICS_MAX" => CILIA_METRICS_MAX.into(),
                "CILIA_VERDICT_ALLOW" => CILIA_VERDICT_ALLOW.into(),
                "CILIA_VERDICT_DENY" => CILIA_VERDICT_DENY.into(),
                "CILIA_CT_SEEN_REPLY" => CILIA_CT_SEEN_REPLY.into(),
                "CILIA_CT_CLOSING" => CILIA_CT_CLOSING.into(),
                "CILIA_CT_DENIED" => CILIA_CT_DENIED.into(),
                "CILIA_MATCH_NONE" => CILIA_MATCH_NONE.into(),
                "CILIA_MATCH_L3" => CILIA_MATCH_L3.into(),
                "CILIA_MATCH_PROTO" => CILIA_MATCH_PROTO.into(),
                "CILIA_MATCH_PORT" => CILIA_MATCH_PORT.into(),
                "CILIA_ENFORCE" => CILIA_ENFORCE.into(),
                "CILIA_ENFORCE_AUDIT" => CILIA_ENFORCE_AUDIT.into(),
                "CILIA_MONITOR_OFF" => CILIA_MONITOR_OFF.into(),
                "CILIA_MONITOR_DROPS" => CILIA_MONITOR_DROPS.into(),
                "CILIA_MONITOR_TRACE" => CILIA_MONITOR_TRACE.into(),
                "CILIA_MONITOR_DEBUG" => CILIA_MONITOR_DEBUG.into(),
                "CILIA_EVENT_DEBUG" => CILIA_EVENT_DEBUG.into(),
                "CILIA_CT_STATE_NEW" => CILIA_CT_STATE_NEW.into(),
                "CILIA_CT_STATE_ESTABLISHED" => CILIA_CT_STATE_ESTABLISHED.into(),
                "CILIA_CT_STATE_REPLY" => CILIA_CT_STATE_REPLY.into(),
                "CILIA_CT_STATE_RELATED" => CILIA_CT_STATE_RELATED.into(),
                "CILIA_CT_STATE_REVOKED" => CILIA_CT_STATE_REVOKED.into(),
                "CILIA_EVENTS_SIZE" => CILIA_EVENTS_SIZE.into(),
                "CILIA_EVENT_CAPLEN" => CILIA_EVENT_CAPLEN as u64,
                "CILIA_EVENT_DROP" => CILIA_EVENT_DROP.into(),
                "CILIA_EVENT_TRACE" => CILIA_EVENT_TRACE.into(),
                "CILIA_EVENT_POLICY_VERDICT" => CILIA_EVENT_POLICY_VERDICT.into(),
                "CILIA_VERDICT_AUDIT" => CILIA_VERDICT_AUDIT.into(),
                "CILIA_METRIC_LOST" => CILIA_METRIC_LOST.into(),
                "CILIA_CT_TCP_TIMEOUT" => CILIA_CT_TCP_TIMEOUT.into(),
                "CILIA_CT_TCP_SYN_TIMEOUT" => CILIA_CT_TCP_SYN_TIMEOUT.into(),
                "CILIA_CT_TCP_CLOSE" => CILIA_CT_TCP_CLOSE.into(),
                "CILIA_CT_OTHER_TIMEOUT" => CILIA_CT_OTHER_TIMEOUT.into(),
                other => panic!("abi.h defines {other} but the Rust mirror does not"),
            };
            assert_eq!(rust, *c, "{name}: Rust and abi.h disagree");
        }
    }

    /// The other direction: every `CILIA_*` constant of the Rust mirror is
    /// defined in abi.h, so the datapath cannot lack what userspace assumes.
    #[test]
    fn every_rust_constant_is_defined_in_the_c_header() {
        let source = include_str!("lib.rs");
        let c_names: std::collections::HashSet<&str> =
            C_CONSTANTS.iter().map(|(name, _)| *name).collect();
        let mut checked = 0;
        for line in source.lines() {
            let Some(rest) = line.trim_start().strip_prefix("pub const CILIA_") else {
                continue;
            };
            let name = std::format!("CILIA_{}", rest.split(':').next().unwrap_or_default());
            assert!(
                c_names.contains(name.as_str()),
                "the Rust mirror defines {name} but abi.h does not"
            );
            checked += 1;
        }
        assert!(
            checked > 50,
            "found only {checked} constants: parser broken?"
        );
    }

    /// The docs quote datapath figures as `` `CILIA_NAME` (value) ``; the
    /// value must be abi.h's.
    mod docs {
        extern crate std;
        use super::C_CONSTANTS;
        use std::format;
        use std::string::{String, ToString};
        use std::vec::Vec;

        /// Every `` `CILIA_NAME` (value) `` quotation in a text.
        fn quotations(text: &str) -> Vec<(String, String)> {
            let mut out = Vec::new();
            let mut rest = text;
            while let Some(i) = rest.find("`CILIA_") {
                let after = &rest[i + 1..];
                let Some(end) = after.find('`') else { break };
                let tail = &after[end + 1..];
                if let Some(open) = tail.strip_prefix(" (") {
                    if let Some(close) = open.find(')') {
                        let value = &open[..close];
                        if !value.is_empty() && value.chars().all(|c| c.is_ascii_digit()) {
                            out.push((after[..end].to_string(), value.to_string()));
                        }
                    }
                }
                rest = tail;
            }
            out
        }

        fn doc(path: &str) -> String {
            let full = format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
        }

        #[test]
        fn docs_quote_abi_constants_with_their_values() {
            let mut checked = 0;
            for path in ["README.md", "docs/ARCHITECTURE.md", "docs/benchmarks.md"] {
                for (name, value) in quotations(&doc(path)) {
                    let Some((_, c)) = C_CONSTANTS.iter().find(|(n, _)| *n == name) else {
                        panic!("{path}: `{name}` ({value}) names no constant of abi.h");
                    };
                    assert_eq!(
                        value,
                        c.to_string(),
                        "{path}: `{name}` is {c} in abi.h, the doc says {value}"
                    );
                    checked += 1;
                }
            }
            assert!(checked >= 7, "the map sizes are quoted by constant name");
        }

        #[test]
        fn map_sizes_in_the_architecture_doc_are_quoted_by_constant() {
            // A bare figure in a map row is how 16384 outlived the map's resize.
            for row in doc("docs/ARCHITECTURE.md")
                .lines()
                .filter(|l| l.starts_with("| `lxc.c` |"))
            {
                let mut bare = row.to_string();
                for (name, value) in quotations(row) {
                    bare = bare.replace(&format!("`{name}` ({value})"), "");
                }
                let figures: Vec<&str> = bare
                    .split(|c: char| !c.is_ascii_digit())
                    .filter(|n| n.len() >= 4)
                    .collect();
                assert!(
                    figures.is_empty(),
                    "{figures:?} in a map row of docs/ARCHITECTURE.md: quote sizes as `CILIA_NAME` (value)\n{row}"
                );
            }
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
