//! Domain rows of the datapath maps, and the one place where they are
//! encoded into (and decoded from) the map keys and values above.
//!
//! Everything here is in host byte order with std address types; the
//! byte-order swaps, prefix-length arithmetic and flag bits of the ABI live
//! only in this module. The datapath interface (`cilia_datapath::Datapath`)
//! takes and returns these rows, so neither the agent nor the API layer ever
//! handles a raw key.
//!
//! Invariants: `decode(encode(x))` re-encodes to the same map entries for
//! every row; an encoded policy holds at most one value per key, and where
//! two entries land on the same key the deny wins.

extern crate alloc;

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::*;

/// Traffic direction as seen from the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// The `CILIA_DIR_*` code.
    pub fn code(self) -> u8 {
        match self {
            Direction::Ingress => CILIA_DIR_INGRESS,
            Direction::Egress => CILIA_DIR_EGRESS,
        }
    }

    /// The direction of a `CILIA_DIR_*` code; `None` for any other.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            CILIA_DIR_INGRESS => Some(Direction::Ingress),
            CILIA_DIR_EGRESS => Some(Direction::Egress),
            _ => None,
        }
    }
}

/// What a policy entry decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Allow,
    Deny,
}

/// Bits of a policy key before the protocol: identity (32) + direction (8).
const POLICY_L3_BITS: u32 = 40;
/// Bits of a policy key up to the port: + protocol (8).
const POLICY_PROTO_BITS: u32 = 48;

/// Mask with the `len` leading bits of a port set.
fn port_mask(len: u8) -> u16 {
    match len.min(16) {
        0 => 0,
        len => u16::MAX << (16 - u32::from(len)),
    }
}

/// One entry of an endpoint's policy: traffic with `identity` in
/// `direction` matching protocol and port gets `verdict`.
///
/// Match kinds: `proto == 0` matches every protocol and port (L3 only; the
/// port fields are ignored); `port_prefix_len == 0` matches every port of
/// `proto`; otherwise the ports whose `port_prefix_len` leading bits equal
/// `port`'s (16: exactly `port`). A port range is a list of such prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    pub direction: Direction,
    /// The peer's numeric identity.
    pub identity: u32,
    /// IP protocol number; 0: any.
    pub proto: u8,
    /// First port of the prefix.
    pub port: u16,
    /// Significant leading bits of `port`, 0 to 16.
    pub port_prefix_len: u8,
    pub verdict: Verdict,
    /// Cookie of the rule that made the entry (0: none), carried by the
    /// datapath's verdict events.
    pub rule: u32,
    /// L7 proxy port to redirect to (host byte order; the map value holds
    /// it in network byte order); 0: none. Meaningful on TCP allow entries.
    pub proxy_port: u16,
}

impl PolicyEntry {
    /// The map key of the entry.
    pub fn key(&self) -> PolicyKey {
        let (prefixlen, dport) = if self.proto == 0 {
            (POLICY_L3_BITS, 0)
        } else {
            let len = self.port_prefix_len.min(16);
            (
                POLICY_PROTO_BITS + u32::from(len),
                self.port & port_mask(len),
            )
        };
        PolicyKey {
            prefixlen,
            identity: self.identity.to_be(),
            direction: self.direction.code(),
            proto: self.proto,
            dport: dport.to_be(),
        }
    }

    /// The map value of the entry.
    pub fn value(&self) -> PolicyValue {
        PolicyValue {
            verdict: match self.verdict {
                Verdict::Allow => CILIA_VERDICT_ALLOW,
                Verdict::Deny => CILIA_VERDICT_DENY,
            },
            match_kind: self.match_kind(),
            proxy_port: self.proxy_port.to_be(),
            rule: self.rule,
        }
    }

    /// The `CILIA_MATCH_*` kind verdict events report for this entry.
    pub fn match_kind(&self) -> u8 {
        match (self.proto, self.port_prefix_len) {
            (0, _) => CILIA_MATCH_L3,
            (_, 0) => CILIA_MATCH_PROTO,
            _ => CILIA_MATCH_PORT,
        }
    }

    /// The ports the entry matches, first and last; `None` for any port.
    pub fn port_range(&self) -> Option<(u16, u16)> {
        if self.proto == 0 || self.port_prefix_len == 0 {
            return None;
        }
        let mask = port_mask(self.port_prefix_len);
        let first = self.port & mask;
        Some((first, first | !mask))
    }

    /// The entry a map entry stands for; `None` for the enforcement marker
    /// or a key of an unknown direction.
    pub fn decode(key: &PolicyKey, value: &PolicyValue) -> Option<Self> {
        let identity = u32::from_be(key.identity);
        if *key == Enforcement::marker_key() || value.verdict == CILIA_VERDICT_MARKER {
            return None;
        }
        let direction = Direction::from_code(key.direction)?;
        let (port, port_prefix_len) = if key.proto == 0 {
            (0, 0)
        } else {
            (
                u16::from_be(key.dport),
                key.prefixlen.saturating_sub(POLICY_PROTO_BITS).min(16) as u8,
            )
        };
        Some(Self {
            direction,
            identity,
            proto: key.proto,
            port,
            port_prefix_len,
            verdict: if value.verdict == CILIA_VERDICT_DENY {
                Verdict::Deny
            } else {
                Verdict::Allow
            },
            rule: value.rule,
            proxy_port: u16::from_be(value.proxy_port),
        })
    }
}

/// Which directions of an endpoint deny what no entry allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Enforcement {
    pub ingress: bool,
    pub egress: bool,
    /// Audit mode: a denied packet is reported, not dropped.
    pub audit: bool,
}

impl Enforcement {
    /// The map's enforcement marker (see `CILIA_POLICY_MARKER_PREFIX` in
    /// abi.h): one entry holding both directions' flags, none when neither
    /// direction is enforced.
    pub fn encode(&self) -> BTreeMap<PolicyKey, PolicyValue> {
        let mut out = BTreeMap::new();
        if self.ingress || self.egress {
            let flags = |enforced: bool| match (enforced, self.audit) {
                (false, _) => 0,
                (true, false) => CILIA_ENFORCE,
                (true, true) => CILIA_ENFORCE | CILIA_ENFORCE_AUDIT,
            };
            out.insert(
                Self::marker_key(),
                PolicyValue {
                    verdict: CILIA_VERDICT_MARKER,
                    match_kind: flags(self.ingress)
                        | flags(self.egress) << CILIA_ENFORCE_EGRESS_SHIFT,
                    ..Default::default()
                },
            );
        }
        out
    }

    /// The marker's key: identity 0 ("any"), the identity's 32 bits alone.
    pub fn marker_key() -> PolicyKey {
        PolicyKey {
            prefixlen: CILIA_POLICY_MARKER_PREFIX,
            identity: 0,
            direction: 0,
            proto: 0,
            dport: 0,
        }
    }

    /// The enforcement a marker's value stands for.
    pub fn decode(value: &PolicyValue) -> Self {
        let ingress = value.match_kind & 0xf;
        let egress = value.match_kind >> CILIA_ENFORCE_EGRESS_SHIFT;
        Self {
            ingress: ingress & CILIA_ENFORCE != 0,
            egress: egress & CILIA_ENFORCE != 0,
            audit: (ingress | egress) & CILIA_ENFORCE_AUDIT != 0,
        }
    }
}

/// An endpoint's complete policy: what its policy map holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub enforcement: Enforcement,
    pub entries: Vec<PolicyEntry>,
}

impl EndpointPolicy {
    /// The map entries: the enforcement markers and one value per key,
    /// the deny where an allow and a deny land on the same key.
    pub fn encode(&self) -> BTreeMap<PolicyKey, PolicyValue> {
        let mut out = self.enforcement.encode();
        insert_deny_wins(&mut out, &self.entries);
        out
    }

    /// The policy a map holds. Entries come in key order.
    pub fn decode<'a>(map: impl IntoIterator<Item = (&'a PolicyKey, &'a PolicyValue)>) -> Self {
        let mut policy = EndpointPolicy::default();
        for (key, value) in map {
            if *key == Enforcement::marker_key() {
                policy.enforcement = Enforcement::decode(value);
            } else if let Some(entry) = PolicyEntry::decode(key, value) {
                policy.entries.push(entry);
            }
        }
        policy
    }
}

fn insert_deny_wins(out: &mut BTreeMap<PolicyKey, PolicyValue>, entries: &[PolicyEntry]) {
    for entry in entries {
        let value = entry.value();
        let slot = out.entry(entry.key()).or_insert(value);
        if value.verdict == CILIA_VERDICT_DENY {
            *slot = value;
        }
    }
}

/// A change to an endpoint's policy, written without reading the map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDelta {
    /// Entries to write (deny wins among them on a shared key; an existing
    /// value under the key is replaced).
    pub upserts: Vec<PolicyEntry>,
    /// Entries to delete, by key: verdict, rule and proxy port are ignored.
    pub removes: Vec<PolicyEntry>,
    /// New enforcement, when it changed.
    pub enforcement: Option<Enforcement>,
}

impl PolicyDelta {
    /// The keys to delete and the entries to write. A key both removed and
    /// upserted is only written.
    pub fn encode(&self) -> (BTreeSet<PolicyKey>, BTreeMap<PolicyKey, PolicyValue>) {
        let mut upserts = BTreeMap::new();
        let mut removes: BTreeSet<PolicyKey> = self.removes.iter().map(|e| e.key()).collect();
        if let Some(enforcement) = &self.enforcement {
            let marker = enforcement.encode();
            if marker.is_empty() {
                removes.insert(Enforcement::marker_key());
            }
            upserts.extend(marker);
        }
        insert_deny_wins(&mut upserts, &self.upserts);
        removes.retain(|k| !upserts.contains_key(k));
        (removes, upserts)
    }
}

impl Enforcement {
    /// The enforcement an encoded policy's marker stands for.
    pub fn of(map: &BTreeMap<PolicyKey, PolicyValue>) -> Self {
        map.get(&Self::marker_key())
            .map(Self::decode)
            .unwrap_or_default()
    }
}

impl PolicyDelta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty() && self.enforcement.is_none()
    }

    /// The deltas that move an endpoint's map from `old` to `new` (both
    /// encoded), in the order to write them: no packet between two writes
    /// meets a policy more open than both `old` and `new`.
    ///
    /// A delta is written removals first, then upserts, so the first delta
    /// takes out the allows that go and writes the denies that come (the
    /// map only gets stricter than `old`), and turns on any enforcement
    /// that comes (audit off); then every deny of `new` is in place and
    /// every allow left is one of `new`'s keys. The second takes out the
    /// denies that go and writes the allows that come or change, and the
    /// final enforcement: from there on the map is `new`.
    pub fn steps(
        old: &BTreeMap<PolicyKey, PolicyValue>,
        new: &BTreeMap<PolicyKey, PolicyValue>,
    ) -> Vec<PolicyDelta> {
        let removed = old
            .iter()
            .filter(|(key, _)| !new.contains_key(key))
            .filter_map(|(key, value)| PolicyEntry::decode(key, value));
        let upserted = new
            .iter()
            .filter(|(key, value)| old.get(key) != Some(value))
            .filter_map(|(key, value)| PolicyEntry::decode(key, value));
        Self::ordered(
            removed,
            upserted,
            Enforcement::of(old),
            Enforcement::of(new),
        )
    }

    /// [`PolicyDelta::steps`] from a change already known: the entries
    /// that leave (as they were: their verdict says which step removes
    /// them), those that come or change (as they will be), and the
    /// enforcement before and after.
    pub fn ordered(
        removed: impl IntoIterator<Item = PolicyEntry>,
        upserted: impl IntoIterator<Item = PolicyEntry>,
        was: Enforcement,
        will: Enforcement,
    ) -> Vec<PolicyDelta> {
        let (mut first, mut second) = (PolicyDelta::default(), PolicyDelta::default());
        for entry in removed {
            match entry.verdict {
                Verdict::Allow => first.removes.push(entry),
                Verdict::Deny => second.removes.push(entry),
            }
        }
        for entry in upserted {
            match entry.verdict {
                Verdict::Deny => first.upserts.push(entry),
                Verdict::Allow => second.upserts.push(entry),
            }
        }
        if was != will {
            let strictest = Enforcement {
                ingress: was.ingress || will.ingress,
                egress: was.egress || will.egress,
                audit: was.audit && will.audit,
            };
            if strictest != was {
                first.enforcement = Some(strictest);
            }
            if will != strictest {
                second.enforcement = Some(will);
            }
        }
        [first, second]
            .into_iter()
            .filter(|d| !d.is_empty())
            .collect()
    }
}

/// One conntrack entry: a flow, its source and destination as its first
/// packet went. The map holds it under one key for both directions (the
/// ends in canonical order, [`ct_key_canon`]) with `CILIA_CT_SWAPPED` when
/// the flow began at the key's second end; [`CtEntry::decode`] and
/// [`CtEntry::key`] translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtEntry {
    pub proto: u8,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub packets: u64,
    pub bytes: u64,
    /// Expiry on CLOCK_MONOTONIC_COARSE (the datapath's deadline clock), in nanoseconds.
    pub expires_ns: u64,
    pub seen_reply: bool,
    pub closing: bool,
    /// Revoked by a policy change (kept so the flow cannot be revived).
    pub denied: bool,
    /// The policy revision the flow was last checked against.
    pub policy_revision: u32,
    /// The endpoint whose budget the entry counts against.
    pub owner: u16,
    /// The client leg of an L7-redirected flow: its packets go to the
    /// proxy's socket at `proxy_port`.
    pub to_proxy: bool,
    /// A flow the L7 proxy opened for a client: replies go to the proxy.
    pub from_proxy: bool,
    /// The proxy port of a `to_proxy` flow; 0 otherwise.
    pub proxy_port: u16,
    /// A service entry (`CILIA_CT_SERVICE`): the client's tuple to a
    /// frontend, pinning the flow to `backend_id`.
    pub service: bool,
    /// A flow to a service backend: the service's rev-NAT id; else 0.
    pub rev_nat: u16,
    /// A service entry's backend; else 0.
    pub backend_id: u32,
}

/// Puts a conntrack key's ends in the datapath's canonical order
/// (`ct_key_of` in `bpf/lib/conntrack.h`): each end, its port as stored
/// (network byte order) then its address as four 32-bit words in host byte
/// order, compared lexicographically, the smaller first. Returns whether
/// the ends were exchanged.
pub fn ct_key_canon(key: &mut CtKey) -> bool {
    let end = |port: u16, addr: &[u8; 16]| {
        let word = |i: usize| {
            u32::from_ne_bytes([
                addr[4 * i],
                addr[4 * i + 1],
                addr[4 * i + 2],
                addr[4 * i + 3],
            ])
        };
        (port, [word(0), word(1), word(2), word(3)])
    };
    let swap = end(key.sport, &key.saddr) > end(key.dport, &key.daddr);
    if swap {
        exchange_ends(key);
    }
    swap
}

/// Exchanges a conntrack key's two ends (address and port).
fn exchange_ends(key: &mut CtKey) {
    core::mem::swap(&mut key.saddr, &mut key.daddr);
    core::mem::swap(&mut key.sport, &mut key.dport);
}

impl CtEntry {
    /// The entry of a map entry; `None` for an unknown family.
    pub fn decode(key: &CtKey, value: &CtValue) -> Option<Self> {
        let mut key = *key;
        if value.flags & CILIA_CT_SWAPPED != 0 {
            exchange_ends(&mut key);
        }
        let addr = |a: [u8; 16]| {
            EndpointKey {
                addr: a,
                family: key.family,
                pad: [0; 3],
            }
            .ip()
        };
        Some(Self {
            proto: key.proto,
            source: SocketAddr::new(addr(key.saddr)?, u16::from_be(key.sport)),
            destination: SocketAddr::new(addr(key.daddr)?, u16::from_be(key.dport)),
            src_identity: value.src_identity,
            dst_identity: value.dst_identity,
            packets: value.packets,
            bytes: value.bytes,
            expires_ns: value.expires,
            seen_reply: value.flags & CILIA_CT_SEEN_REPLY != 0,
            closing: value.flags & CILIA_CT_CLOSING != 0,
            denied: value.flags & CILIA_CT_DENIED != 0,
            policy_revision: value.policy_rev,
            owner: value.owner,
            to_proxy: value.flags & CILIA_CT_TO_PROXY != 0,
            from_proxy: value.flags & CILIA_CT_FROM_PROXY != 0,
            proxy_port: u16::from_be(value.proxy_port),
            service: value.flags & CILIA_CT_SERVICE != 0,
            rev_nat: value.rev_nat,
            backend_id: value.backend_id,
        })
    }

    /// The map key of the entry, in canonical order (source and
    /// destination are taken to be of one family: the source's).
    pub fn key(&self) -> CtKey {
        self.canonical().0
    }

    /// The canonical key, and whether the flow began at its second end.
    fn canonical(&self) -> (CtKey, bool) {
        let src = EndpointKey::from_ip(self.source.ip());
        let mut key = CtKey {
            saddr: src.addr,
            daddr: EndpointKey::from_ip(self.destination.ip()).addr,
            sport: self.source.port().to_be(),
            dport: self.destination.port().to_be(),
            proto: self.proto,
            family: src.family,
            kind: if self.service {
                CILIA_CT_KEY_SERVICE
            } else {
                CILIA_CT_KEY_FLOW
            },
            pad: 0,
        };
        let swapped = ct_key_canon(&mut key);
        (key, swapped)
    }

    /// The map value of the entry.
    pub fn value(&self) -> CtValue {
        let flag = |set: bool, bit: u16| if set { bit } else { 0 };
        CtValue {
            expires: self.expires_ns,
            packets: self.packets,
            bytes: self.bytes,
            policy_rev: self.policy_revision,
            src_identity: self.src_identity,
            dst_identity: self.dst_identity,
            flags: flag(self.seen_reply, CILIA_CT_SEEN_REPLY)
                | flag(self.closing, CILIA_CT_CLOSING)
                | flag(self.denied, CILIA_CT_DENIED)
                | flag(self.to_proxy, CILIA_CT_TO_PROXY)
                | flag(self.from_proxy, CILIA_CT_FROM_PROXY)
                | flag(self.service, CILIA_CT_SERVICE)
                | flag(self.canonical().1, CILIA_CT_SWAPPED),
            owner: self.owner,
            proxy_port: self.proxy_port.to_be(),
            rev_nat: self.rev_nat,
            backend_id: self.backend_id,
        }
    }
}

/// One ipcache entry: addresses of `prefix` have `identity`; with a
/// `tunnel`, they live on the node whose underlay address that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheEntry {
    pub prefix: IpNet,
    pub identity: u32,
    /// The underlay address of the node holding the prefix; `None`: not
    /// remote (this node's, or outside the cluster).
    pub tunnel: Option<IpAddr>,
}

impl IpcacheEntry {
    /// The LPM key of a prefix (host bits cleared).
    pub fn key_of(prefix: &IpNet) -> IpcacheKey {
        IpcacheKey::new(prefix.network(), prefix.prefix_len())
    }

    pub fn key(&self) -> IpcacheKey {
        Self::key_of(&self.prefix)
    }

    pub fn value(&self) -> IpcacheValue {
        let (tunnel, tunnel_family) = match self.tunnel {
            Some(ip) => {
                let k = EndpointKey::from_ip(ip);
                (k.addr, k.family)
            }
            None => ([0; 16], 0),
        };
        IpcacheValue {
            identity: self.identity,
            flags: 0,
            tunnel,
            tunnel_family,
            pad: [0; 3],
            encap_key: 0,
        }
    }

    /// The entry of a map entry; `None` for an unknown family or a prefix
    /// length beyond the address (of the prefix or the tunnel).
    pub fn decode(key: &IpcacheKey, value: &IpcacheValue) -> Option<Self> {
        let (ip, len) = key.prefix()?;
        let tunnel = match value.tunnel_family {
            0 => None,
            family => Some(
                EndpointKey {
                    addr: value.tunnel,
                    family,
                    pad: [0; 3],
                }
                .ip()?,
            ),
        };
        Some(Self {
            prefix: IpNet::new(ip, len).ok()?,
            identity: value.identity,
            tunnel,
        })
    }
}

/// How packets for remote prefixes (ipcache entries with a tunnel) leave
/// the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TunnelMode {
    /// Through the node's stack, like any other destination.
    #[default]
    Off,
    /// Encapsulated in VXLAN, the source identity in the VNI.
    Vxlan,
    /// Routed over the underlay device, the remote node as next hop.
    Native,
}

impl TunnelMode {
    /// The `CILIA_TUNNEL_*` code.
    pub fn code(self) -> u32 {
        match self {
            TunnelMode::Off => CILIA_TUNNEL_OFF,
            TunnelMode::Vxlan => CILIA_TUNNEL_VXLAN,
            TunnelMode::Native => CILIA_TUNNEL_NATIVE,
        }
    }

    /// The mode of a `CILIA_TUNNEL_*` code; `None` for any other.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            CILIA_TUNNEL_OFF => Some(TunnelMode::Off),
            CILIA_TUNNEL_VXLAN => Some(TunnelMode::Vxlan),
            CILIA_TUNNEL_NATIVE => Some(TunnelMode::Native),
            _ => None,
        }
    }
}

/// The node's tunnel settings (the one slot of `cilia_node_config`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    pub tunnel_mode: TunnelMode,
    /// The VXLAN device (external mode); used in [`TunnelMode::Vxlan`].
    pub tunnel_ifindex: u32,
    /// The device holding the node's underlay address; used in
    /// [`TunnelMode::Native`].
    pub underlay_ifindex: u32,
    /// The overlay's UDP port ([`TunnelMode::Vxlan`]); 0 otherwise. Endpoint
    /// UDP to a node's address on it is dropped (`CILIA_DROP_TUNNEL_PORT`).
    pub tunnel_port: u16,
}

impl NodeConfig {
    pub fn value(&self) -> NodeConfigValue {
        NodeConfigValue {
            tunnel_mode: self.tunnel_mode.code(),
            tunnel_ifindex: self.tunnel_ifindex,
            underlay_ifindex: self.underlay_ifindex,
            tunnel_port: u32::from(self.tunnel_port),
        }
    }

    /// The settings of a map value; `None` for an unknown mode.
    pub fn decode(value: &NodeConfigValue) -> Option<Self> {
        Some(Self {
            tunnel_mode: TunnelMode::from_code(value.tunnel_mode)?,
            tunnel_ifindex: value.tunnel_ifindex,
            underlay_ifindex: value.underlay_ifindex,
            tunnel_port: u16::try_from(value.tunnel_port).ok()?,
        })
    }
}

/// One local endpoint address in the endpoints map: where the datapath
/// delivers packets for `ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointEntry {
    pub ip: IpAddr,
    pub ifindex: u32,
    pub identity: u32,
    pub endpoint_id: u16,
    pub flags: u16,
    pub mac: [u8; 6],
    pub node_mac: [u8; 6],
}

impl EndpointEntry {
    /// The row of an address and its map value.
    pub fn new(ip: IpAddr, info: EndpointInfo) -> Self {
        Self {
            ip,
            ifindex: info.ifindex,
            identity: info.identity,
            endpoint_id: info.endpoint_id,
            flags: info.flags,
            mac: info.mac,
            node_mac: info.node_mac,
        }
    }

    pub fn key(&self) -> EndpointKey {
        EndpointKey::from_ip(self.ip)
    }

    pub fn info(&self) -> EndpointInfo {
        EndpointInfo {
            ifindex: self.ifindex,
            identity: self.identity,
            endpoint_id: self.endpoint_id,
            flags: self.flags,
            mac: self.mac,
            node_mac: self.node_mac,
        }
    }

    /// The row of a map entry; `None` for an unknown family.
    pub fn decode(key: &EndpointKey, info: &EndpointInfo) -> Option<Self> {
        Some(Self::new(key.ip()?, *info))
    }
}

/// What a metrics counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricKind {
    Forward,
    Drop,
    /// Events lost because the ring buffer was full.
    Lost,
    Unknown(u8),
}

impl MetricKind {
    pub fn from_code(code: u8) -> Self {
        match code {
            CILIA_METRIC_FORWARD => MetricKind::Forward,
            CILIA_METRIC_DROP => MetricKind::Drop,
            CILIA_METRIC_LOST => MetricKind::Lost,
            other => MetricKind::Unknown(other),
        }
    }

    pub fn code(self) -> u8 {
        match self {
            MetricKind::Forward => CILIA_METRIC_FORWARD,
            MetricKind::Drop => CILIA_METRIC_DROP,
            MetricKind::Lost => CILIA_METRIC_LOST,
            MetricKind::Unknown(code) => code,
        }
    }
}

/// One datapath counter, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetricsEntry {
    pub kind: MetricKind,
    /// `CILIA_FWD_*` or `CILIA_DROP_*` code; [`Self::reason_name`] names it.
    pub reason: u8,
    /// `None` where the counter has no direction.
    pub direction: Option<Direction>,
    pub packets: u64,
    pub bytes: u64,
}

impl MetricsEntry {
    pub fn decode(key: &MetricsKey, value: &MetricsValue) -> Self {
        Self {
            kind: MetricKind::from_code(key.kind),
            reason: key.reason,
            direction: Direction::from_code(key.dir),
            packets: value.packets,
            bytes: value.bytes,
        }
    }

    pub fn key(&self) -> MetricsKey {
        MetricsKey {
            kind: self.kind.code(),
            reason: self.reason,
            dir: self.direction.map(Direction::code).unwrap_or(0),
            pad: 0,
        }
    }

    pub fn value(&self) -> MetricsValue {
        MetricsValue {
            packets: self.packets,
            bytes: self.bytes,
        }
    }

    /// Human name of the reason, as the CLI and metrics print it.
    pub fn reason_name(&self) -> &'static str {
        reason_name(self.kind.code(), self.reason)
    }
}

/// How a service picks the backend of a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbAlgorithm {
    /// A random active backend (`CILIA_LB_ALG_RANDOM`).
    Random,
    /// The service's Maglev table, by the client's hash (`CILIA_LB_ALG_MAGLEV`).
    Maglev,
}

/// A backend's state: only active ones receive new flows; the others keep
/// the flows pinned to them until those end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbBackendState {
    Active,
    Terminating,
    Quarantined,
}

/// A service frontend: the address, port and protocol clients connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbFrontend {
    pub addr: IpAddr,
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
}

/// One backend of the backends map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbBackend {
    /// Agent-assigned, never 0.
    pub id: u32,
    pub addr: SocketAddr,
    pub state: LbBackendState,
}

/// One service as the datapath holds it: the master entry, its slots, its
/// rev-NAT entry and (for Maglev) its table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LbService {
    /// The service's rev-NAT id (1..=65535), also its Maglev table's key.
    pub rev_nat: u16,
    pub frontend: LbFrontend,
    pub algorithm: LbAlgorithm,
    /// Client-address affinity: its timeout in seconds; `None`: off.
    pub affinity_timeout: Option<u32>,
    /// Active backend ids, in slot order (slot 1 first); empty: new flows
    /// are dropped with `CILIA_DROP_NO_BACKEND`.
    pub slots: Vec<u32>,
    /// `Maglev`: the lookup table (backend id per entry, the configured
    /// table size long); `None` otherwise.
    pub maglev: Option<Vec<u32>>,
    /// NodePort services only (an unspecified frontend address): how
    /// external traffic is served. Read back from the master entry.
    pub flags: LbServiceFlags,
}

/// What a NodePort service does with external traffic, as its master
/// entry's `CILIA_LB_FLAG_*` bits say (affinity is
/// [`LbService::affinity_timeout`]; NodePort itself is the unspecified
/// frontend address).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LbServiceFlags {
    /// externalTrafficPolicy=Local (`CILIA_LB_FLAG_LOCAL`).
    pub local: bool,
    /// Direct server return to remote backends (`CILIA_LB_FLAG_DSR`).
    pub dsr: bool,
}

impl LbServiceFlags {
    /// The `CILIA_LB_FLAG_*` bits.
    pub fn bits(self) -> u8 {
        (if self.local { CILIA_LB_FLAG_LOCAL } else { 0 })
            | if self.dsr { CILIA_LB_FLAG_DSR } else { 0 }
    }

    /// The flags of a master entry's bits (the others ignored).
    pub fn from_bits(bits: u8) -> Self {
        Self {
            local: bits & CILIA_LB_FLAG_LOCAL != 0,
            dsr: bits & CILIA_LB_FLAG_DSR != 0,
        }
    }
}

impl LbService {
    /// A NodePort service: its frontend stands for every node address.
    pub fn is_nodeport(&self) -> bool {
        self.frontend.addr.is_unspecified()
    }

    /// The service's flags as names, for humans and JSON: `nodeport`,
    /// `local`, `dsr`, `affinity`.
    pub fn flag_names(&self) -> Vec<&'static str> {
        [
            (self.is_nodeport(), "nodeport"),
            (self.flags.local, "local"),
            (self.flags.dsr, "dsr"),
            (self.affinity_timeout.is_some(), "affinity"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

impl LbAlgorithm {
    /// The `CILIA_LB_ALG_*` code.
    pub fn code(self) -> u8 {
        match self {
            LbAlgorithm::Random => CILIA_LB_ALG_RANDOM,
            LbAlgorithm::Maglev => CILIA_LB_ALG_MAGLEV,
        }
    }

    /// The algorithm of a `CILIA_LB_ALG_*` code; `None` for any other.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            CILIA_LB_ALG_RANDOM => Some(LbAlgorithm::Random),
            CILIA_LB_ALG_MAGLEV => Some(LbAlgorithm::Maglev),
            _ => None,
        }
    }
}

impl LbBackendState {
    /// The `CILIA_LB_BACKEND_*` code.
    pub fn code(self) -> u8 {
        match self {
            LbBackendState::Active => CILIA_LB_BACKEND_ACTIVE,
            LbBackendState::Terminating => CILIA_LB_BACKEND_TERMINATING,
            LbBackendState::Quarantined => CILIA_LB_BACKEND_QUARANTINED,
        }
    }

    /// The state of a `CILIA_LB_BACKEND_*` code; `None` for any other.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            CILIA_LB_BACKEND_ACTIVE => Some(LbBackendState::Active),
            CILIA_LB_BACKEND_TERMINATING => Some(LbBackendState::Terminating),
            CILIA_LB_BACKEND_QUARANTINED => Some(LbBackendState::Quarantined),
            _ => None,
        }
    }
}

/// An address as the LB maps hold it: 16 bytes (IPv4 in the first 4) and
/// the `CILIA_FAMILY_*`.
fn lb_addr(ip: IpAddr) -> ([u8; 16], u8) {
    let k = EndpointKey::from_ip(ip);
    (k.addr, k.family)
}

/// The frontend filter's bit of an address (`addr_filter_bit` in
/// `bpf/lib/lb.h`; see `CILIA_ADDR_FILTER_WORDS` in `abi.h`): the address's
/// words in host order, as the datapath reads them, xor-folded and hashed.
pub fn addr_filter_bit(ip: IpAddr) -> u32 {
    let (addr, _) = lb_addr(ip);
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let x = word(0) ^ word(4) ^ word(8) ^ word(12);
    x.wrapping_mul(CILIA_ADDR_FILTER_MUL) >> 16
}

fn lb_ip(addr: [u8; 16], family: u8) -> Option<IpAddr> {
    EndpointKey {
        addr,
        family,
        pad: [0; 3],
    }
    .ip()
}

/// The generation the next update of a service writes its slots in: the
/// one the master does not use (1 when there is no master yet).
pub fn lb_other_generation(gen: u8) -> u8 {
    if gen == 1 {
        2
    } else {
        1
    }
}

impl LbFrontend {
    /// The key of the frontend's entry `slot` (0: the master) of generation
    /// `gen` (0 for the master).
    pub fn key(&self, slot: u16, gen: u8) -> LbServiceKey {
        let (addr, family) = lb_addr(self.addr);
        LbServiceKey {
            addr,
            port: self.port.to_be(),
            proto: self.proto,
            family,
            slot,
            gen,
            pad: 0,
        }
    }

    /// The key of the master entry.
    pub fn master_key(&self) -> LbServiceKey {
        self.key(0, 0)
    }

    /// The frontend of any of its keys; `None` for an unknown family.
    pub fn decode(key: &LbServiceKey) -> Option<Self> {
        Some(Self {
            addr: lb_ip(key.addr, key.family)?,
            port: u16::from_be(key.port),
            proto: key.proto,
        })
    }

    /// The rev-NAT entry: what replies of the service's flows carry as
    /// their source.
    pub fn revnat_value(&self) -> LbRevNatValue {
        let (addr, family) = lb_addr(self.addr);
        LbRevNatValue {
            addr,
            port: self.port.to_be(),
            family,
            pad: 0,
        }
    }

    /// The address and port of a rev-NAT entry; `None` for an unknown family.
    pub fn decode_revnat(value: &LbRevNatValue) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            lb_ip(value.addr, value.family)?,
            u16::from_be(value.port),
        ))
    }
}

impl LbBackend {
    /// The backends map value (the key is `id`).
    pub fn value(&self) -> LbBackendValue {
        let (addr, family) = lb_addr(self.addr.ip());
        LbBackendValue {
            addr,
            port: self.addr.port().to_be(),
            family,
            state: self.state.code(),
        }
    }

    /// The backend of a map entry; `None` for an unknown family or state.
    pub fn decode(id: u32, value: &LbBackendValue) -> Option<Self> {
        Some(Self {
            id,
            addr: SocketAddr::new(lb_ip(value.addr, value.family)?, u16::from_be(value.port)),
            state: LbBackendState::from_code(value.state)?,
        })
    }
}

/// A decoded master entry: everything of a service but its slots' backends
/// and its Maglev table, which live in other entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LbMaster {
    pub frontend: LbFrontend,
    pub rev_nat: u16,
    pub algorithm: LbAlgorithm,
    pub affinity_timeout: Option<u32>,
    /// The generation (1 or 2) of the slots in use.
    pub gen: u8,
    /// Slots 1..=count of `gen` hold the active backends.
    pub count: u16,
    pub flags: LbServiceFlags,
}

impl LbMaster {
    /// The master of a map entry; `None` for a key that is not a master's,
    /// an unknown family or algorithm, or a generation other than 1 and 2.
    pub fn decode(key: &LbServiceKey, value: &LbServiceValue) -> Option<Self> {
        if key.slot != 0 || key.gen != 0 || !matches!(value.gen, 1 | 2) {
            return None;
        }
        Some(Self {
            frontend: LbFrontend::decode(key)?,
            rev_nat: value.rev_nat,
            algorithm: LbAlgorithm::from_code(value.algorithm)?,
            affinity_timeout: (value.flags & CILIA_LB_FLAG_AFFINITY != 0)
                .then_some(value.affinity_timeout),
            gen: value.gen,
            count: value.count,
            flags: LbServiceFlags::from_bits(value.flags),
        })
    }
}

impl LbService {
    /// The master entry's value, pointing at the slots of generation `gen`.
    /// The slot count saturates at `CILIA_LB_SLOTS_MAX`; callers check the
    /// length first ([`Self::slot_entries`] writes no more).
    pub fn master_value(&self, gen: u8) -> LbServiceValue {
        let count = self.slots.len().min(CILIA_LB_SLOTS_MAX as usize) as u16;
        LbServiceValue {
            backend_id: 0,
            count,
            rev_nat: self.rev_nat,
            gen,
            algorithm: self.algorithm.code(),
            flags: if self.affinity_timeout.is_some() {
                CILIA_LB_FLAG_AFFINITY
            } else {
                0
            } | if self.frontend.addr.is_unspecified() {
                CILIA_LB_FLAG_NODEPORT
            } else {
                0
            } | self.flags.bits(),
            pad: 0,
            affinity_timeout: self.affinity_timeout.unwrap_or(0),
        }
    }

    /// The backend slot entries of generation `gen`: slot 1 is `slots[0]`.
    pub fn slot_entries(&self, gen: u8) -> Vec<(LbServiceKey, LbServiceValue)> {
        self.slots
            .iter()
            .take(CILIA_LB_SLOTS_MAX as usize)
            .enumerate()
            .map(|(i, &backend_id)| {
                (
                    self.frontend.key(i as u16 + 1, gen),
                    LbServiceValue {
                        backend_id,
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    /// The service of a master and its slots' backends (slot 1 first) and
    /// Maglev table, as read back from the maps.
    pub fn from_master(master: &LbMaster, slots: Vec<u32>, maglev: Option<Vec<u32>>) -> Self {
        Self {
            rev_nat: master.rev_nat,
            frontend: master.frontend,
            algorithm: master.algorithm,
            affinity_timeout: master.affinity_timeout,
            slots,
            maglev,
            flags: master.flags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(source: &str, destination: &str) -> CtEntry {
        CtEntry {
            proto: 17,
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            src_identity: 0,
            dst_identity: 0,
            packets: 1,
            bytes: 0,
            expires_ns: 0,
            seen_reply: false,
            closing: false,
            denied: false,
            policy_revision: 0,
            owner: 1,
            to_proxy: false,
            from_proxy: false,
            proxy_port: 0,
            service: false,
            rev_nat: 0,
            backend_id: 0,
        }
    }

    /// Both directions of a flow have one key, and an entry decodes to the
    /// direction its flow began in, whichever end is the key's first:
    /// addresses that differ in any word, equal addresses with different
    /// ports (loopback-like), equal ports (ICMP echo), both families.
    #[test]
    fn a_flow_and_its_reply_share_one_canonical_key() {
        let pairs = [
            ("[fd00::a]:40000", "[fd00::b]:80"),
            ("[fd00::b]:40000", "[fd00::a]:80"),
            ("[fd00:1::5]:53", "[fd00:2::5]:53"),
            ("[fd00::1:0:0:5]:1", "[fd00::5]:1"),
            ("[fd00::a]:1000", "[fd00::a]:2000"),
            ("[fd00::a]:2000", "[fd00::a]:1000"),
            ("10.0.0.2:5000", "10.0.0.1:5000"),
            ("10.0.0.1:5000", "10.0.0.2:5000"),
            ("192.0.2.1:1", "10.0.0.1:65535"),
            ("[fd00::a]:7", "[fd00::a]:7"),
        ];
        for (a, b) in pairs {
            let there = flow(a, b);
            let back = flow(b, a);
            let key = there.key();
            assert_eq!(key, back.key(), "{a} <-> {b}: one key");
            let mut again = key;
            assert!(
                !ct_key_canon(&mut again),
                "{a} <-> {b}: a canonical key stays"
            );
            for e in [there, back] {
                let value = e.value();
                assert_eq!(
                    CtEntry::decode(&key, &value),
                    Some(e),
                    "{a} <-> {b}: the entry decodes as its flow began"
                );
                assert_eq!(
                    value.flags & CILIA_CT_SWAPPED != 0,
                    e.key().saddr != EndpointKey::from_ip(e.source.ip()).addr
                        || e.key().sport != e.source.port().to_be(),
                    "{a} <-> {b}: swapped exactly when the source is the second end"
                );
            }
        }
    }

    fn apply(map: &mut BTreeMap<PolicyKey, PolicyValue>, delta: &PolicyDelta) {
        let (removes, upserts) = delta.encode();
        for key in removes {
            map.remove(&key);
        }
        map.extend(upserts);
    }

    fn allow_port(identity: u32, port: u16) -> PolicyEntry {
        PolicyEntry {
            direction: Direction::Ingress,
            identity,
            proto: 6,
            port,
            port_prefix_len: 16,
            verdict: Verdict::Allow,
            rule: 1,
            proxy_port: 0,
        }
    }

    fn deny_port(identity: u32, port: u16) -> PolicyEntry {
        PolicyEntry {
            verdict: Verdict::Deny,
            ..allow_port(identity, port)
        }
    }

    fn policy(ingress: bool, audit: bool, entries: Vec<PolicyEntry>) -> EndpointPolicy {
        EndpointPolicy {
            enforcement: Enforcement {
                ingress,
                egress: false,
                audit,
            },
            entries,
        }
    }

    #[test]
    fn policy_steps_lead_from_the_old_map_to_the_new() {
        let old = policy(
            true,
            false,
            vec![allow_port(100, 80), deny_port(200, 0), allow_port(300, 443)],
        );
        let new = policy(
            false,
            false,
            vec![allow_port(100, 80), allow_port(200, 0), deny_port(300, 443)],
        );
        let (old, new) = (old.encode(), new.encode());
        let mut map = old.clone();
        for step in PolicyDelta::steps(&old, &new) {
            apply(&mut map, &step);
        }
        assert_eq!(map, new);
    }

    #[test]
    fn the_first_policy_step_only_removes_allows_and_adds_denies() {
        let old = policy(false, true, vec![allow_port(100, 80), deny_port(200, 0)]).encode();
        let new = policy(true, false, vec![deny_port(100, 80), allow_port(200, 0)]).encode();
        let steps = PolicyDelta::steps(&old, &new);
        assert_eq!(steps.len(), 2);
        assert!(steps[0].upserts.iter().all(|e| e.verdict == Verdict::Deny));
        assert!(steps[0].removes.iter().all(|e| e.verdict == Verdict::Allow));
        assert_eq!(
            steps[0].enforcement,
            Some(Enforcement {
                ingress: true,
                egress: false,
                audit: false
            })
        );
        assert!(steps[1].upserts.iter().all(|e| e.verdict == Verdict::Allow));
    }

    #[test]
    fn an_unchanged_policy_has_no_steps() {
        let map = policy(true, false, vec![allow_port(100, 80)]).encode();
        assert!(PolicyDelta::steps(&map, &map).is_empty());
    }

    extern crate std;
    use alloc::vec;

    fn allow(direction: Direction, identity: u32, proto: u8, port: u16, len: u8) -> PolicyEntry {
        PolicyEntry {
            direction,
            identity,
            proto,
            port,
            port_prefix_len: len,
            verdict: Verdict::Allow,
            rule: 1,
            proxy_port: 0,
        }
    }

    fn deny(e: PolicyEntry) -> PolicyEntry {
        PolicyEntry {
            verdict: Verdict::Deny,
            rule: 2,
            ..e
        }
    }

    #[test]
    fn policy_round_trips_through_the_map() {
        let policy = EndpointPolicy {
            enforcement: Enforcement {
                ingress: true,
                egress: false,
                audit: false,
            },
            entries: vec![
                allow(Direction::Ingress, 300, 6, 80, 16),
                allow(Direction::Ingress, 301, 0, 0, 0),
                deny(allow(Direction::Egress, 2, 17, 0, 0)),
                PolicyEntry {
                    proxy_port: 15001,
                    ..allow(Direction::Egress, 7, 6, 1024, 6)
                },
            ],
        };
        let map = policy.encode();
        let back = EndpointPolicy::decode(&map);
        assert_eq!(back.enforcement, policy.enforcement);
        let mut want = policy.entries.clone();
        want.sort_by_key(|e| e.key());
        assert_eq!(back.entries, want);
        assert_eq!(back.encode(), map);
    }

    #[test]
    fn proxy_port_is_host_order_in_the_row_and_network_order_in_the_map() {
        let e = PolicyEntry {
            proxy_port: 15080,
            ..allow(Direction::Ingress, 300, 6, 80, 16)
        };
        let v = e.value();
        assert_eq!(v.proxy_port.to_ne_bytes(), 15080u16.to_be_bytes());
        assert_eq!(PolicyEntry::decode(&e.key(), &v), Some(e));
    }

    #[test]
    fn deny_wins_over_allow_on_the_same_key() {
        let a = allow(Direction::Ingress, 300, 6, 80, 16);
        for entries in [vec![a, deny(a)], vec![deny(a), a]] {
            let map = EndpointPolicy {
                entries,
                ..Default::default()
            }
            .encode();
            assert_eq!(map.len(), 1);
            assert_eq!(map[&a.key()].verdict, CILIA_VERDICT_DENY);
            assert_eq!(map[&a.key()].rule, 2);
        }
    }

    #[test]
    fn keys_are_big_endian_with_the_kernel_prefix_length() {
        let key = allow(Direction::Egress, 0x0102_0304, 6, 8080, 16).key();
        assert_eq!(key.prefixlen, 64);
        assert_eq!(key.identity, 0x0102_0304u32.to_be());
        assert_eq!(key.dport, 8080u16.to_be());
        assert_eq!(key.direction, CILIA_DIR_EGRESS);
    }

    #[test]
    fn port_prefix_stands_for_a_port_range() {
        let e = allow(Direction::Ingress, 9, 6, 256, 8);
        assert_eq!(e.key().prefixlen, 56);
        assert_eq!(e.port_range(), Some((256, 511)));
        let map = EndpointPolicy {
            entries: vec![e],
            ..Default::default()
        }
        .encode();
        assert_eq!(
            EndpointPolicy::decode(&map).entries[0].port_range(),
            Some((256, 511))
        );
        assert_eq!(
            allow(Direction::Ingress, 9, 6, 443, 16).port_range(),
            Some((443, 443))
        );
    }

    #[test]
    fn host_bits_of_a_port_prefix_are_cleared() {
        let e = allow(Direction::Ingress, 9, 6, 300, 8);
        assert_eq!(u16::from_be(e.key().dport), 256);
    }

    #[test]
    fn l3_only_entries_ignore_ports_and_match_any_protocol() {
        let e = allow(Direction::Ingress, 9, 0, 80, 16);
        let k = e.key();
        assert_eq!((k.prefixlen, k.proto, k.dport), (40, 0, 0));
        assert_eq!(e.value().match_kind, CILIA_MATCH_L3);
        assert_eq!(e.port_range(), None);
    }

    #[test]
    fn protocol_only_entries_match_every_port() {
        let e = allow(Direction::Ingress, 9, 17, 0, 0);
        assert_eq!(e.key().prefixlen, 48);
        assert_eq!(e.value().match_kind, CILIA_MATCH_PROTO);
        assert_eq!(
            allow(Direction::Ingress, 9, 17, 53, 16).value().match_kind,
            CILIA_MATCH_PORT
        );
    }

    #[test]
    fn one_marker_carries_both_directions_and_the_audit_flag() {
        let both = Enforcement {
            ingress: true,
            egress: true,
            audit: true,
        };
        let policy = EndpointPolicy {
            enforcement: both,
            entries: vec![allow(Direction::Ingress, 300, 6, 80, 16)],
        };
        let map = policy.encode();
        assert_eq!(map.len(), 2);
        let marker = map[&Enforcement::marker_key()];
        assert_eq!(marker.verdict, CILIA_VERDICT_MARKER);
        let audited = CILIA_ENFORCE | CILIA_ENFORCE_AUDIT;
        assert_eq!(
            marker.match_kind,
            audited | audited << CILIA_ENFORCE_EGRESS_SHIFT
        );
        assert_eq!(EndpointPolicy::decode(&map), policy);
        // Each direction alone, with and without audit, decodes as it was.
        for ingress in [false, true] {
            for egress in [false, true] {
                for audit in [false, true] {
                    let e = Enforcement {
                        ingress,
                        egress,
                        audit,
                    };
                    let map = e.encode();
                    assert_eq!(map.is_empty(), !ingress && !egress);
                    if !map.is_empty() {
                        assert_eq!(Enforcement::of(&map), e);
                    }
                }
            }
        }
    }

    #[test]
    fn the_marker_is_no_entry_and_no_entry_is_the_marker() {
        let key = Enforcement::marker_key();
        // Identity 0 ("any") with the identity's bits alone: no entry's key,
        // since every entry fixes its direction (prefix 40 or more).
        assert_eq!((key.identity, key.prefixlen), (0, 32));
        let value = Enforcement {
            egress: true,
            ..Default::default()
        }
        .encode()[&key];
        assert_eq!(PolicyEntry::decode(&key, &value), None);
        for e in [
            allow(Direction::Ingress, 0, 0, 0, 0),
            allow(Direction::Egress, 0, 6, 80, 16),
            deny(allow(Direction::Egress, 0, 17, 0, 0)),
        ] {
            assert!(e.key().prefixlen >= 40 && e.key() != key);
            assert_ne!(e.value().verdict, CILIA_VERDICT_MARKER);
        }
    }

    #[test]
    fn delta_removes_the_marker_when_no_direction_is_enforced() {
        let (removes, upserts) = PolicyDelta {
            enforcement: Some(Enforcement::default()),
            ..Default::default()
        }
        .encode();
        assert!(removes.contains(&Enforcement::marker_key()));
        assert!(upserts.is_empty());
        let (removes, upserts) = PolicyDelta {
            enforcement: Some(Enforcement {
                ingress: true,
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode();
        assert!(removes.is_empty());
        assert_eq!(
            Enforcement::of(&upserts),
            Enforcement {
                ingress: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn delta_writes_a_key_both_removed_and_upserted() {
        let a = allow(Direction::Ingress, 300, 6, 80, 16);
        let (removes, upserts) = PolicyDelta {
            upserts: vec![deny(a)],
            removes: vec![a],
            enforcement: None,
        }
        .encode();
        assert!(removes.is_empty());
        assert_eq!(upserts[&a.key()].verdict, CILIA_VERDICT_DENY);
    }

    #[test]
    fn conntrack_rows_round_trip_both_families() {
        for (s, d) in [
            ("10.0.0.1:40000", "10.0.0.2:80"),
            ("[fd00::1]:5353", "[fd00::2]:53"),
        ] {
            let row = CtEntry {
                proto: 6,
                src_identity: 300,
                dst_identity: 301,
                packets: 3,
                bytes: 180,
                expires_ns: 123_000_000_000,
                seen_reply: true,
                denied: true,
                policy_revision: 4,
                owner: 12,
                to_proxy: true,
                proxy_port: 15080,
                rev_nat: 7,
                ..flow(s, d)
            };
            let (k, v) = (row.key(), row.value());
            // The key holds the ends in canonical order; the flag says
            // whether the source is the second.
            let swapped = v.flags & CILIA_CT_SWAPPED != 0;
            let (first, second) = if swapped {
                (row.destination, row.source)
            } else {
                (row.source, row.destination)
            };
            assert_eq!(
                (k.sport, k.dport),
                (first.port().to_be(), second.port().to_be())
            );
            assert_eq!(
                v.flags & !CILIA_CT_SWAPPED,
                CILIA_CT_SEEN_REPLY | CILIA_CT_DENIED | CILIA_CT_TO_PROXY
            );
            assert_eq!(v.proxy_port, 15080u16.to_be());
            assert_eq!(CtEntry::decode(&k, &v), Some(row));
        }
    }

    #[test]
    fn ipcache_rows_round_trip_and_clear_host_bits() {
        let row = IpcacheEntry {
            prefix: "10.1.0.0/16".parse().unwrap(),
            identity: 77,
            tunnel: None,
        };
        assert_eq!(IpcacheEntry::decode(&row.key(), &row.value()), Some(row));
        let sloppy: IpNet = "10.1.2.3/16".parse().unwrap();
        assert_eq!(IpcacheEntry::key_of(&sloppy), row.key());
        let v6 = IpcacheEntry {
            prefix: "2001:db8::/32".parse().unwrap(),
            identity: 2,
            tunnel: None,
        };
        assert_eq!(v6.key().prefixlen, 64);
        assert_eq!(IpcacheEntry::decode(&v6.key(), &v6.value()), Some(v6));
    }

    #[test]
    fn remote_ipcache_rows_carry_their_node_in_either_family() {
        for (prefix, node) in [
            ("fd00:c1a:2::7/128", "198.51.100.2"),
            ("10.200.2.0/24", "2001:db8:100::2"),
        ] {
            let row = IpcacheEntry {
                prefix: prefix.parse().unwrap(),
                identity: 300,
                tunnel: Some(node.parse().unwrap()),
            };
            let v = row.value();
            assert_ne!(v.tunnel_family, 0);
            assert_eq!(v.encap_key, 0);
            assert_eq!(IpcacheEntry::decode(&row.key(), &v), Some(row));
        }
        let v4 = IpcacheEntry {
            prefix: "10.200.2.7/32".parse().unwrap(),
            identity: 300,
            tunnel: Some("198.51.100.2".parse().unwrap()),
        }
        .value();
        assert_eq!(v4.tunnel_family, CILIA_FAMILY_IPV4);
        assert_eq!(&v4.tunnel[..4], &[198, 51, 100, 2]);
        assert_eq!(&v4.tunnel[4..], &[0; 12]);
    }

    #[test]
    fn node_config_rows_round_trip_every_mode() {
        for mode in [TunnelMode::Off, TunnelMode::Vxlan, TunnelMode::Native] {
            let row = NodeConfig {
                tunnel_mode: mode,
                tunnel_ifindex: 7,
                underlay_ifindex: 2,
                tunnel_port: 8472,
            };
            assert_eq!(NodeConfig::decode(&row.value()), Some(row));
        }
        let bad = NodeConfigValue {
            tunnel_mode: 9,
            ..Default::default()
        };
        assert_eq!(NodeConfig::decode(&bad), None);
    }

    #[test]
    fn endpoint_rows_round_trip() {
        let row = EndpointEntry {
            ip: "fd00::5".parse().unwrap(),
            ifindex: 9,
            identity: 300,
            endpoint_id: 5,
            flags: 0,
            mac: [2, 0, 0, 0, 0, 5],
            node_mac: [2, 0, 0, 0, 0, 1],
        };
        assert_eq!(EndpointEntry::decode(&row.key(), &row.info()), Some(row));
    }

    #[test]
    fn metrics_rows_name_their_reason() {
        let key = MetricsKey {
            kind: CILIA_METRIC_DROP,
            reason: CILIA_DROP_POLICY,
            dir: CILIA_DIR_INGRESS,
            pad: 0,
        };
        let row = MetricsEntry::decode(
            &key,
            &MetricsValue {
                packets: 2,
                bytes: 120,
            },
        );
        assert_eq!(row.kind, MetricKind::Drop);
        assert_eq!(row.direction, Some(Direction::Ingress));
        assert_eq!(row.reason_name(), "Policy denied");
        assert_eq!(row.key(), key);
    }
    mod lb {
        use super::*;
        use core::net::{Ipv4Addr, Ipv6Addr};

        fn service(addr: IpAddr) -> LbService {
            LbService {
                rev_nat: 513,
                frontend: LbFrontend {
                    addr,
                    port: 8080,
                    proto: 6,
                },
                algorithm: LbAlgorithm::Maglev,
                affinity_timeout: Some(10_800),
                slots: vec![7, 9, 70_000],
                maglev: None,
                flags: Default::default(),
            }
        }

        #[test]
        fn service_round_trips_through_master_and_slots_of_either_generation() {
            for addr in [
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10)),
                IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            ] {
                let svc = service(addr);
                for gen in [1, 2] {
                    let (k, v) = (svc.frontend.master_key(), svc.master_value(gen));
                    assert_eq!(k.port, 8080u16.to_be(), "port in network byte order");
                    assert_eq!((k.slot, k.gen), (0, 0));
                    assert_eq!(v.flags, CILIA_LB_FLAG_AFFINITY);
                    let master = LbMaster::decode(&k, &v).expect("master decodes");
                    assert_eq!((master.gen, master.count), (gen, 3));
                    let entries = svc.slot_entries(gen);
                    assert_eq!(entries.len(), 3);
                    for (i, (sk, sv)) in entries.iter().enumerate() {
                        assert_eq!((sk.slot, sk.gen), (i as u16 + 1, gen));
                        assert_eq!(LbFrontend::decode(sk), Some(svc.frontend));
                        assert!(LbMaster::decode(sk, sv).is_none(), "a slot is no master");
                    }
                    let slots = entries.iter().map(|(_, v)| v.backend_id).collect();
                    assert_eq!(LbService::from_master(&master, slots, None), svc);
                }
            }
        }

        #[test]
        fn service_without_affinity_has_no_flag_and_random_algorithm_code() {
            let mut svc = service(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)));
            svc.affinity_timeout = None;
            svc.algorithm = LbAlgorithm::Random;
            let v = svc.master_value(1);
            assert_eq!((v.flags, v.affinity_timeout), (0, 0));
            assert_eq!(v.algorithm, CILIA_LB_ALG_RANDOM);
            let m = LbMaster::decode(&svc.frontend.master_key(), &v).unwrap();
            assert_eq!(m.affinity_timeout, None);
            assert_eq!(m.algorithm, LbAlgorithm::Random);
        }

        #[test]
        fn a_frontend_of_the_unspecified_address_is_a_nodeport() {
            for any in [
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            ] {
                let mut svc = service(any);
                svc.affinity_timeout = None;
                assert_eq!(svc.master_value(1).flags, CILIA_LB_FLAG_NODEPORT, "{any}");
            }
            let svc = service(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)));
            assert_eq!(svc.master_value(1).flags & CILIA_LB_FLAG_NODEPORT, 0);
        }

        #[test]
        fn master_with_unknown_generation_or_algorithm_does_not_decode() {
            let svc = service(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)));
            let k = svc.frontend.master_key();
            assert!(LbMaster::decode(&k, &svc.master_value(3)).is_none());
            let mut v = svc.master_value(1);
            v.algorithm = 9;
            assert!(LbMaster::decode(&k, &v).is_none());
        }

        #[test]
        fn backend_round_trips_with_every_state() {
            for state in [
                LbBackendState::Active,
                LbBackendState::Terminating,
                LbBackendState::Quarantined,
            ] {
                for addr in ["[fd00::5]:80", "10.0.0.5:80"] {
                    let b = LbBackend {
                        id: 42,
                        addr: addr.parse().unwrap(),
                        state,
                    };
                    let v = b.value();
                    assert_eq!(v.port, 80u16.to_be());
                    assert_eq!(LbBackend::decode(42, &v), Some(b));
                }
            }
            let mut v = LbBackend {
                id: 1,
                addr: "10.0.0.5:80".parse().unwrap(),
                state: LbBackendState::Active,
            }
            .value();
            v.state = 0;
            assert_eq!(LbBackend::decode(1, &v), None);
        }

        #[test]
        fn revnat_entry_is_the_frontend_address_and_port() {
            let svc = service(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)));
            let v = svc.frontend.revnat_value();
            assert_eq!(&v.addr[..4], &[10, 96, 0, 10]);
            assert_eq!(v.family, CILIA_FAMILY_IPV4);
            assert_eq!(
                LbFrontend::decode_revnat(&v),
                Some("10.96.0.10:8080".parse().unwrap())
            );
        }

        #[test]
        fn other_generation_alternates_and_starts_at_one() {
            assert_eq!(lb_other_generation(0), 1);
            assert_eq!(lb_other_generation(1), 2);
            assert_eq!(lb_other_generation(2), 1);
        }
    }
}
