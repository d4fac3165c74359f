//! `#[repr(C)]` mirror of `bpf/include/cilia/abi.h`, the only structures the
//! agent and the BPF datapath exchange. The header is the source of truth:
//! every `CILIA_*` constant is generated from its `#define` lines by
//! `build.rs` (its comment becomes the constant's doc; `build/consts.rs`
//! holds the table of Rust types), and `tests` below compare every size,
//! field offset and constant against the header compiled by the host C
//! compiler, so the two cannot drift apart.

#![no_std]

// The generator of the constants (run by build.rs); the tests run it on
// small headers to check what it refuses.
#[cfg(test)]
extern crate std;
#[cfg(test)]
#[path = "../build/consts.rs"]
mod generator;

include!(concat!(env!("OUT_DIR"), "/consts.rs"));

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

pub mod prefilter;
pub use prefilter::{PrefilterCount, PrefilterEntry, PrefilterKey, PREFILTER_SLOTS};
pub mod rows;
pub use rows::{
    addr_filter_bit, ct_key_canon, lb_other_generation, CtEntry, Direction, EndpointEntry,
    EndpointPolicy, Enforcement, IpcacheEntry, LbAlgorithm, LbBackend, LbBackendState, LbFrontend,
    LbMaster, LbService, LbServiceFlags, MetricKind, MetricsEntry, NodeConfig, PolicyDelta,
    PolicyEntry, TunnelMode, Verdict,
};

/// Human name of a forward or drop reason, as printed by the CLI and metrics.
pub fn reason_name(kind: u8, reason: u8) -> &'static str {
    match (kind, reason) {
        (CILIA_METRIC_FORWARD, CILIA_FWD_ENDPOINT) => "to-endpoint",
        (CILIA_METRIC_FORWARD, CILIA_FWD_STACK) => "to-stack",
        (CILIA_METRIC_FORWARD, CILIA_FWD_ND_REPLY) => "nd-reply",
        (CILIA_METRIC_FORWARD, CILIA_FWD_ARP_REPLY) => "arp-reply",
        (CILIA_METRIC_FORWARD, CILIA_FWD_PROXY) => "to-proxy",
        (CILIA_METRIC_FORWARD, CILIA_FWD_TUNNEL) => "to-overlay",
        (CILIA_METRIC_FORWARD, CILIA_FWD_NATIVE) => "to-node",
        (CILIA_METRIC_FORWARD, CILIA_FWD_XDP) => "xdp-nodeport",
        (CILIA_METRIC_FORWARD, CILIA_FWD_ABSORBED) => "absorbed",
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
        (CILIA_METRIC_DROP, CILIA_DROP_PROXY_UNAVAILABLE) => "L7 proxy unavailable",
        (CILIA_METRIC_DROP, CILIA_DROP_PROXY_PATH) => "L7 redirect not possible on this path",
        (CILIA_METRIC_DROP, CILIA_DROP_UNKNOWN_NODE) => "Tunnel packet from an unknown node",
        (CILIA_METRIC_DROP, CILIA_DROP_NO_ROUTE) => "No route to endpoint",
        (CILIA_METRIC_DROP, CILIA_DROP_PREFILTER) => "Source in a prefilter CIDR",
        (CILIA_METRIC_DROP, CILIA_DROP_NO_BACKEND) => "Service without an active backend",
        (CILIA_METRIC_DROP, CILIA_DROP_LB_FRAGMENT) => "Fragment to a service frontend",
        (CILIA_METRIC_DROP, CILIA_DROP_TUNNEL_PORT) => "Endpoint UDP to a node's tunnel port",
        (CILIA_METRIC_DROP, CILIA_DROP_UNCONFIGURED) => "Endpoint device not configured",
        (CILIA_METRIC_DROP, CILIA_DROP_DSR_FORGED) => "Forged DSR frontend",
        (CILIA_METRIC_DROP, CILIA_DROP_NO_POLICY) => "Endpoint policy map missing",
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
    /// Value of the ipcache. `tunnel_family != 0`: the prefix is remote, on
    /// the node whose underlay address is `tunnel`.
    #[derive(Default)]
    pub struct IpcacheValue {
        pub identity: u32,
        pub flags: u32,
        pub tunnel: [u8; 16],
        pub tunnel_family: u8,
        pub pad: [u8; 3],
        pub encap_key: u32,
    }

    /// Value of the nodes map (key: the node's underlay address as an
    /// [`EndpointKey`]).
    #[derive(Default)]
    pub struct NodeValue {
        pub flags: u32,
        pub pad: u32,
    }

    /// The node's tunnel settings (`struct node_config`, the one slot of
    /// `cilia_node_config`); the row is [`rows::NodeConfig`].
    #[derive(Default)]
    pub struct NodeConfigValue {
        pub tunnel_mode: u32,
        pub tunnel_ifindex: u32,
        pub underlay_ifindex: u32,
        /// The overlay's UDP port, host byte order; 0: no overlay.
        pub tunnel_port: u32,
    }
}

abi_struct! {
    /// Key of `cilia_lb_services`: a frontend's master entry (`slot` 0) or
    /// one of its backend slots (`slot` 1..count of generation `gen`).
    #[derive(Default, Hash, PartialOrd, Ord)]
    pub struct LbServiceKey {
        pub addr: [u8; 16],
        /// Network byte order.
        pub port: u16,
        pub proto: u8,
        pub family: u8,
        pub slot: u16,
        pub gen: u8,
        pub pad: u8,
    }

    /// Value of `cilia_lb_services`: the master's backend count, rev-NAT
    /// id, generation, algorithm and flags, or a slot's backend id.
    #[derive(Default)]
    pub struct LbServiceValue {
        pub backend_id: u32,
        pub count: u16,
        pub rev_nat: u16,
        pub gen: u8,
        pub algorithm: u8,
        pub flags: u8,
        pub pad: u8,
        pub affinity_timeout: u32,
    }

    /// Value of `cilia_lb_backends` (key: the backend id, `u32`).
    #[derive(Default)]
    pub struct LbBackendValue {
        pub addr: [u8; 16],
        /// Network byte order.
        pub port: u16,
        pub family: u8,
        pub state: u8,
    }

    /// Value of `cilia_lb_revnat` (key: the rev-NAT id, `u16`).
    #[derive(Default)]
    pub struct LbRevNatValue {
        pub addr: [u8; 16],
        /// Network byte order.
        pub port: u16,
        pub family: u8,
        pub pad: u8,
    }

    /// Key of `cilia_lb_nat` (NodePort translations): a tuple as the
    /// packet carries it (ports in network byte order) and the kind of
    /// entry (`CILIA_NAT_OUT`, `_IN`, `_REVNAT`).
    #[derive(Default, Hash, PartialOrd, Ord)]
    pub struct LbNatKey {
        pub saddr: [u8; 16],
        pub daddr: [u8; 16],
        pub sport: u16,
        pub dport: u16,
        pub proto: u8,
        pub family: u8,
        pub dir: u8,
        pub pad: u8,
    }

    /// Value of `cilia_lb_nat`: OUT the SNAT address/port, IN the client
    /// to restore (`fport` the nodePort), REVNAT the node address and
    /// nodePort of a local backend's replies.
    #[derive(Default)]
    pub struct LbNatValue {
        pub addr: [u8; 16],
        /// Network byte order.
        pub port: u16,
        /// Network byte order.
        pub fport: u16,
        pub backend_id: u32,
        pub expires: u64,
        pub rev_nat: u16,
        pub family: u8,
        /// IN entries: `CILIA_NAT_*`, the flow's closing state.
        pub flags: u8,
        pub pad: [u8; 4],
    }

    /// Key of the affinity LRU map: a client of a service.
    #[derive(Default, Hash, PartialOrd, Ord)]
    pub struct LbAffinityKey {
        pub addr: [u8; 16],
        pub rev_nat: u16,
        pub family: u8,
        pub pad: u8,
    }

    /// Value of the affinity map.
    #[derive(Default)]
    pub struct LbAffinityValue {
        pub last_used: u64,
        pub backend_id: u32,
        pub pad: u32,
    }

    /// Value of the per-CPU `cilia_lb_stats` array (index: rev-NAT id).
    #[derive(Default)]
    pub struct LbStats {
        pub flows: u64,
        pub packets: u64,
        pub bytes: u64,
    }

    /// Key of `cilia_lb_sock` (LRU): a socket translated by the socket
    /// load balancer and an address it was translated to or from.
    #[derive(Default, Hash, PartialOrd, Ord)]
    pub struct LbSockKey {
        pub cookie: u64,
        pub addr: [u8; 16],
        /// Network byte order.
        pub port: u16,
        pub family: u8,
        /// `CILIA_LB_SOCK_REVERSE` or `CILIA_LB_SOCK_FORWARD`.
        pub kind: u8,
        pub pad: [u8; 4],
    }

    /// Value of `cilia_lb_sock`: the frontend (reverse) or backend
    /// (forward) of the translation, its backend id and service.
    #[derive(Default)]
    pub struct LbSockValue {
        pub addr: [u8; 16],
        /// Network byte order.
        pub port: u16,
        pub family: u8,
        pub pad: u8,
        pub backend_id: u32,
        pub rev_nat: u16,
        pub pad2: u16,
    }

    /// Value of `cilia_lb_sock_storage` (socket storage): the socket LB's
    /// state of one translated socket. Only the kernel reads it; mirrored
    /// for its size (the pin check) and the layout test.
    #[derive(Default)]
    pub struct LbSockStorage {
        pub frontend: [u8; 16],
        pub backend: [u8; 16],
        /// Network byte order.
        pub frontend_port: u16,
        /// Network byte order.
        pub backend_port: u16,
        /// 0: no connected translation.
        pub family: u8,
        /// `CILIA_LB_SOCK_F_*`.
        pub flags: u8,
        pub pad: [u8; 2],
    }

    /// Key of `cilia_prefilter_v4` (LPM trie).
    #[derive(Default, Hash, PartialOrd, Ord)]
    pub struct PrefilterV4Key {
        pub prefixlen: u32,
        pub addr: [u8; 4],
    }

    /// Key of `cilia_prefilter_v6` (LPM trie).
    #[derive(Default, Hash, PartialOrd, Ord)]
    pub struct PrefilterV6Key {
        pub prefixlen: u32,
        pub addr: [u8; 16],
    }

    /// Value of both prefilter tries: the CIDR's counter slot.
    #[derive(Default)]
    pub struct PrefilterValue {
        pub counter: u32,
        pub pad: u32,
    }
}

abi_struct! {
    /// Key of a per-endpoint policy LPM trie: `[identity][direction][proto][port]`.
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
        /// L7 proxy port of an allow entry, network byte order; 0: none.
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
        /// `CILIA_CT_KEY_FLOW` or `CILIA_CT_KEY_SERVICE` (a service pin).
        pub kind: u8,
        pub pad: u8,
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
        /// `CILIA_CT_TO_PROXY`: the L7 proxy's port, network byte order.
        pub proxy_port: u16,
        /// Flow to a service backend: the service's rev-NAT id; else 0.
        pub rev_nat: u16,
        /// `CILIA_CT_SERVICE` entry: the backend the flow is pinned to. Any
        /// other: its cached deliveries (`CILIA_CT_FAST_*`, see
        /// `bpf/lib/fast.h`), forward in the low 16 bits, reply in the high.
        pub backend_id: u32,
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
        /// Entries of every service's Maglev table; 0: CILIA_LB_MAGLEV_SIZE_DEFAULT.
        pub maglev_size: u32,
    }
}

abi_struct! {
    /// The datapath clock's calibration (`struct clock_config`): `cil_now()`
    /// is `jiffies * tick_ns + base_ns` (wrapping); `tick_ns` 0 makes it
    /// read the coarse clock instead.
    #[derive(Default)]
    pub struct ClockConfig {
        /// Nanoseconds per jiffy (the kernel's TICK_NSEC).
        pub tick_ns: u64,
        /// CLOCK_MONOTONIC_COARSE minus `jiffies * tick_ns`, wrapping.
        pub base_ns: u64,
    }
}

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
            IpcacheValue as "ipcache_value" { identity, flags, tunnel, tunnel_family, encap_key }
            NodeValue as "node_value" { flags }
            NodeConfigValue as "node_config" { tunnel_mode, tunnel_ifindex, underlay_ifindex, tunnel_port }
            PolicyKey as "policy_key" { prefixlen, identity, direction, proto, dport }
            PolicyValue as "policy_value" { verdict, match_kind as "match", proxy_port, rule }
            CtKey as "ct_key" { saddr, daddr, sport, dport, proto, family, kind }
            CtValue as "ct_value" { expires, packets, bytes, policy_rev, src_identity, dst_identity, flags, owner, proxy_port, rev_nat, backend_id }
            LbServiceKey as "lb_service_key" { addr, port, proto, family, slot, gen }
            LbServiceValue as "lb_service_value" { backend_id, count, rev_nat, gen, algorithm, flags, affinity_timeout }
            LbBackendValue as "lb_backend" { addr, port, family, state }
            LbRevNatValue as "lb_revnat" { addr, port, family }
            LbAffinityKey as "lb_affinity_key" { addr, rev_nat, family }
            LbNatKey as "lb_nat_key" { saddr, daddr, sport, dport, proto, family, dir }
            LbNatValue as "lb_nat_value" { addr, port, fport, backend_id, expires, rev_nat, family, flags }
            LbAffinityValue as "lb_affinity_value" { last_used, backend_id }
            PrefilterV4Key as "prefilter_v4_key" { prefixlen, addr }
            PrefilterV6Key as "prefilter_v6_key" { prefixlen, addr }
            PrefilterValue as "prefilter_value" { counter }
            LbStats as "lb_stats" { flows, packets, bytes }
            LbSockKey as "lb_sock_key" { cookie, addr, port, family, kind }
            LbSockValue as "lb_sock_value" { addr, port, family, backend_id, rev_nat }
            LbSockStorage as "lb_sock_storage" { frontend, backend, frontend_port, backend_port, family, flags }
            FragKey as "frag_key" { saddr, daddr, id, proto, family }
            FragValue as "frag_value" { expires, sport, dport }
            GlobalConfig as "global_config" { policy_rev, monitor_level, ct_budget, maglev_size }
            ClockConfig as "clock_config" { tick_ns, base_ns }
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

    /// abi.h → Rust: every `CILIA_` macro the C preprocessor sees has a Rust
    /// constant of the value the C compiler gives it.
    #[test]
    fn every_constant_matches_the_c_header() {
        for (name, c) in C_CONSTANTS {
            let Some((_, rust)) = RUST_CONSTANTS.iter().find(|(n, _)| n == name) else {
                panic!("abi.h defines {name} but the Rust mirror does not");
            };
            assert_eq!(rust, c, "{name}: Rust and abi.h disagree");
        }
    }

    /// Rust → abi.h: every generated constant is a macro of the C header, so
    /// the datapath cannot lack what userspace assumes.
    #[test]
    fn every_rust_constant_is_defined_in_the_c_header() {
        for (name, _) in RUST_CONSTANTS {
            assert!(
                C_CONSTANTS.iter().any(|(n, _)| n == name),
                "the Rust mirror defines {name} but abi.h does not"
            );
        }
        assert!(
            RUST_CONSTANTS.len() > 50,
            "only {} constants generated: parser broken?",
            RUST_CONSTANTS.len()
        );
    }

    /// A hand-written copy could drift from the header: the constants come
    /// only from the generated file.
    #[test]
    fn no_abi_constant_is_hand_written() {
        for (file, source) in [
            ("lib.rs", include_str!("lib.rs")),
            ("rows.rs", include_str!("rows.rs")),
        ] {
            for line in source.lines() {
                assert!(
                    !line
                        .trim_start()
                        .starts_with(concat!("pub const ", "CILIA_")),
                    "{file} hand-writes an abi.h constant: {line}"
                );
            }
        }
    }

    /// What `build.rs` accepts and refuses when it generates the constants.
    mod generator {
        use crate::generator as consts;
        use consts::{generate, parse};

        fn only(header: &str) -> consts::Define {
            let mut defines = parse(header).expect("header parses");
            assert_eq!(defines.len(), 1, "one define expected");
            defines.remove(0)
        }

        #[test]
        fn hex_suffixed_and_parenthesized_literals_are_read() {
            for (text, value) in [
                ("42", 42),
                ("0xffffffff", 0xffff_ffff),
                ("0X10U", 16),
                ("(65536UL)", 65536),
                ("( (7) )", 7),
                ("0", 0),
            ] {
                let d = only(&std::format!("#define CILIA_ID_X {text}\n"));
                assert_eq!(d.value, value, "{text}");
            }
        }

        #[test]
        fn type_rules_pick_by_name_first_match_wins() {
            for (name, ty) in [
                ("CILIA_CT_MAX", "u32"),
                ("CILIA_CT_STATE_NEW", "u8"),
                ("CILIA_CT_TCP_CLOSE", "u32"),
                ("CILIA_CT_DENIED", "u16"),
                ("CILIA_EVENT_CAPLEN", "usize"),
                ("CILIA_EVENTS_SIZE", "u32"),
                ("CILIA_FRAG_TIMEOUT", "u64"),
                ("CILIA_ENFORCE", "u8"),
                ("CILIA_MONITOR_OFF", "u32"),
            ] {
                assert_eq!(consts::rust_type(name), Some(ty), "{name}");
            }
        }

        #[test]
        fn a_define_no_type_rule_covers_fails_naming_it() {
            let err = parse("#define CILIA_NEW_THING 3\n").err().expect("refused");
            assert!(err.contains("CILIA_NEW_THING"), "{err}");
            assert!(err.contains("no type rule"), "{err}");
        }

        #[test]
        fn a_define_with_a_non_literal_value_fails_naming_it() {
            for value in ["(1 << 22)", "CILIA_ID_HOST", "-1", "010", "1.5", ""] {
                let header = std::format!("#define CILIA_ID_X {value}\n");
                let err = parse(&header).err().expect("refused");
                assert!(err.contains("CILIA_ID_X"), "{value}: {err}");
                assert!(err.contains("not an integer literal"), "{value}: {err}");
            }
        }

        #[test]
        fn a_function_like_define_fails_naming_it() {
            let err = parse("#define CILIA_ID_X(a) 1\n").err().expect("refused");
            assert!(err.contains("CILIA_ID_X"), "{err}");
        }

        #[test]
        fn a_value_too_big_for_its_type_fails_naming_it() {
            let err = parse("#define CILIA_DROP_X 256\n").err().expect("refused");
            assert!(err.contains("CILIA_DROP_X") && err.contains("u8"), "{err}");
        }

        #[test]
        fn the_include_guard_and_other_macros_are_not_constants() {
            let defines = parse("#ifndef CILIA_ABI_H\n#define CILIA_ABI_H\n#define OTHER 1\n")
                .expect("header parses");
            assert!(defines.is_empty());
        }

        #[test]
        fn the_comment_on_the_line_and_above_the_group_become_docs() {
            let header = "/* Drop reasons (kind CILIA_METRIC_DROP).\n * Never reuse. */\n\
                          #define CILIA_DROP_A 1 /* first [a] */\n\
                          #define CILIA_DROP_B 2\n\
                          \n\
                          #define CILIA_DROP_C 3\n";
            let defines = parse(header).expect("header parses");
            let group = ["Drop reasons (kind `CILIA_METRIC_DROP`).", "Never reuse."];
            assert_eq!(defines[0].doc, ["first \\[a\\]", "", group[0], group[1]]);
            assert_eq!(defines[1].doc, group);
            assert!(defines[2].doc.is_empty(), "a blank line ends the group");
        }

        #[test]
        fn generated_source_documents_and_types_each_constant() {
            let rust = generate("/* Capacity. */\n#define CILIA_CT_MAX 0x10\n").expect("ok");
            assert!(rust.contains("/// Capacity.\n"), "{rust}");
            assert!(
                rust.contains("pub const CILIA_CT_MAX: u32 = 16;\n"),
                "{rust}"
            );
        }

        #[test]
        fn the_real_header_generates() {
            let header = include_str!("../../../bpf/include/cilia/abi.h");
            assert_eq!(parse(header).expect("abi.h parses").len(), RUST_LEN);
        }
        const RUST_LEN: usize = super::RUST_CONSTANTS.len();
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
