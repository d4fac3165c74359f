//! `cilia-policy`: Kubernetes / Cilium network policy parsing and per-endpoint
//! policy-map resolution for cilia.
//!
//! Pure logic, no I/O: YAML text goes in ([`parse_policies`]), and for one endpoint
//! (given by its labels) the resolver ([`resolve`]) produces the entries of the
//! endpoint's BPF LPM-trie policy map. [`evaluate`] is the executable specification of
//! how the datapath looks packets up in that map, and [`trace`] explains a verdict.
//! [`PolicyRepository`] gives the same resolutions incrementally: per-policy
//! contributions and a selector cache, so a change costs what it changes. A
//! [`MergedPolicy`] per endpoint carries that through to the map: moved to a new
//! basis, it returns the [`PolicyDelta`] of entries to write and remove, so an
//! endpoint selected by 100,000 rules does not pay for them all when 10,000 arrive.
//!
//! Supported inputs: `networking.k8s.io/v1 NetworkPolicy`, `cilium.io/v2
//! CiliumNetworkPolicy` and `cilium.io/v2 CiliumClusterwideNetworkPolicy`.
//!
//! # Semantics decided here (see the tests for each)
//! - Default deny for Cilium policies follows the `enableDefaultDeny` API reference: "If not
//!   specified, the default is true for each traffic direction that has rules, and false
//!   otherwise. For example, if a policy only has Ingress or IngressDeny rules, then the
//!   default for ingress is true and egress is false." So deny-only policies enable default
//!   deny; `ingress: []` has no rules; `ingress: [{}]` has one rule that allows nothing; an
//!   explicit `true` is taken as given even without rules.
//! - NetworkPolicy `policyTypes` default: Ingress, plus Egress when `egress` is non-empty.
//!   Rules of a direction not listed in explicit `policyTypes` are ignored.
//! - A CIDR peer of prefix length 0 also selects `reserved:world` (addresses without a
//!   more specific CIDR identity).
//! - `fromEndpoints: [{}]` in a clusterwide policy selects every pod (identities with a
//!   namespace label), not reserved identities.
//! - A Cilium rule with ports but no peers applies to every peer (map identity 0); a rule
//!   with neither selects no peer. `toPorts` entries without `ports` cover all ports.
//! - Deny wins over allow wherever they overlap; see [`resolve`] for the encoding.
//! - A `fromEndpoints`/`toEndpoints` selector of a namespaced Cilium policy is limited to
//!   the policy's namespace unless it matches on the namespace itself: the key
//!   `io.kubernetes.pod.namespace`, or a namespace label
//!   `io.cilium.k8s.namespace.labels.<key>` (with or without a `k8s:`/`any:` source).
//!   Then it reaches every namespace it matches, as in current Cilium. Selectors of
//!   reserved identities (`reserved:host` …) are never namespace-limited.
//! - Selector keys and values follow Kubernetes label syntax; a key may carry one source
//!   prefix (`k8s:`, `any:`, `reserved:`). The policy set stays within [`limits`].
//! - L7 HTTP rules (`toPorts[].rules.http`, see [`l7`]) are compiled at parse time; they
//!   need explicit single TCP ports, only allow sections may have them, and an empty
//!   `http` list restricts nothing (upstream: "If no rules are specified, then all
//!   traffic is permitted"). The HTTP rules of a (direction, peer, TCP port) are the
//!   union over every allow rule covering it, and any L4-only allow among those lets
//!   every request through (still via the proxy): a proxied [`MapEntry`] of a peer
//!   folds in the broader and identity-0 rules covering its port, so the entry the
//!   datapath picks (the peer's own allowing hit, else identity 0's) carries them all.
//!   A deny covering a packet wins: it is never redirected.
//! - A port may be a name (an IANA service name, see [`named`]): at ingress it
//!   resolves against the port names the subject endpoint declares
//!   ([`resolve_with_ports`], [`PolicyRepository::basis_with_ports`]), at egress
//!   against each peer identity's ([`IdentityCache::set_named_ports`]: the
//!   union over its endpoints), every peer (identity 0) meaning each identity
//!   that declares it. No declaration, no entry. `endPort` cannot go with a
//!   name; HTTP rules on a named port apply on the number it resolves to.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod eval;
mod incremental;
pub mod l7;
mod labels;
pub mod limits;
mod merged;
mod model;
pub mod named;
mod parse;
mod ports;
mod radix;
mod resolve;
pub mod workload;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use l7::ResolvedL7;

pub use error::PolicyError;
pub use eval::{evaluate, trace, trace_http, Evaluation, HttpTrace, TraceResult};
pub use incremental::{Basis, PolicyRepository};
pub use ipnet::IpNet;
pub use limits::{check_limits, LimitError};
pub use merged::{MergedEntry, MergedPolicy, PolicyDelta};
pub use named::{is_port_name, NamedPorts};
pub use parse::{parse_policies, parse_stream, PolicyDocument, PolicyStream, NODES_PER_BYTE};
pub use ports::port_range_prefixes;
pub use resolve::{cidr_prefixes, resolve, resolve_with_ports, IdentityCache};

/// Numeric security identity.
pub type IdentityId = u32;

/// Well-known reserved identities (same numbering as upstream Cilium).
pub mod reserved {
    /// The local host.
    pub const HOST: u32 = 1;
    /// Everything outside the cluster that has no more specific (CIDR) identity.
    pub const WORLD: u32 = 2;
    /// Endpoints not managed by the CNI.
    pub const UNMANAGED: u32 = 3;
    /// The health-check endpoints.
    pub const HEALTH: u32 = 4;
    /// Endpoints whose identity is not resolved yet.
    pub const INIT: u32 = 5;
    /// Other nodes of the cluster.
    pub const REMOTE_NODE: u32 = 6;

    /// Every reserved identity with its name: its one label is
    /// `reserved:<name>` (see [`labels`]).
    pub const NAMED: &[(u32, &str)] = &[
        (HOST, "host"),
        (WORLD, "world"),
        (UNMANAGED, "unmanaged"),
        (HEALTH, "health"),
        (INIT, "init"),
        (REMOTE_NODE, "remote-node"),
    ];

    /// The labels of the reserved identity called `name`.
    pub fn labels(name: &str) -> super::Labels {
        super::Labels::from_pairs([(format!("reserved:{name}"), "")])
    }
}

/// CIDR identities are allocated at or above this value.
pub const LOCAL_CIDR_IDENTITY_BASE: u32 = 1 << 24;
/// Label carrying an endpoint's Kubernetes namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix under which the labels of an endpoint's namespace appear on the endpoint
/// (followed by the namespace label key).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// Labels of an endpoint/identity: key -> value. Keys carry no source prefix
/// (selectors may write `k8s:app` or `any:app`; those prefixes are stripped when matching).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(pub BTreeMap<String, String>);

impl Labels {
    /// Builds labels from `(key, value)` pairs.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Labels(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// Which resource a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    /// `networking.k8s.io/v1 NetworkPolicy`.
    NetworkPolicy,
    /// `cilium.io/v2 CiliumNetworkPolicy`.
    CiliumNetworkPolicy,
    /// `cilium.io/v2 CiliumClusterwideNetworkPolicy`.
    CiliumClusterwideNetworkPolicy,
}

/// One parsed policy document, in the crate's internal model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `metadata.name`.
    pub name: String,
    /// Namespace of a namespaced policy (`metadata.namespace`, default `default`);
    /// `None` for clusterwide policies.
    pub namespace: Option<String>,
    /// Resource kind.
    pub kind: PolicyKind,
    pub(crate) rules: Vec<model::Rule>,
}

impl Policy {
    /// `ns/name` for namespaced policies, `name` for clusterwide ones.
    pub fn qualified_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// Traffic direction, relative to the subject endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic towards the endpoint.
    Ingress,
    /// Traffic from the endpoint.
    Egress,
}

/// Verdict of a map entry or a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Let the packet through.
    Allow,
    /// Drop the packet.
    Deny,
}

/// One entry of a per-endpoint LPM policy map.
///
/// Key bit order in the trie is `[direction:8][identity:32][proto:8][port:16]`;
/// `identity == 0` means "any identity" (it is looked up separately, see [`evaluate`]),
/// `proto == 0` means "any protocol" (then `port` and `port_prefix_len` are 0), and
/// `port_prefix_len` is how many leading bits of `port` matter (0 = all ports,
/// 16 = exactly `port`). Bits of `port` beyond the prefix are always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MapEntry {
    /// Direction byte of the key.
    pub direction: Direction,
    /// Peer identity, 0 = any.
    pub identity: IdentityId,
    /// IP protocol, 0 = any.
    pub proto: u8,
    /// Destination port (prefix).
    pub port: u16,
    /// Number of significant leading bits of `port`.
    pub port_prefix_len: u8,
    /// What to do with matching packets.
    pub verdict: Verdict,
    /// Index into [`ResolvedPolicy::rules`] of the rule this entry came from.
    pub rule: u32,
    /// Whether an allowed packet of this entry goes to the L7 proxy: an allow
    /// rule covering it has HTTP rules (see [`ResolvedPolicy::l7`] for what
    /// they allow). Always false for deny entries.
    pub proxy: bool,
}

/// The key of a policy map entry: (direction, identity, proto, port, port prefix length).
pub type EntryKey = (Direction, IdentityId, u8, u16, u8);

impl MapEntry {
    /// The entry's key.
    pub fn key(&self) -> EntryKey {
        (
            self.direction,
            self.identity,
            self.proto,
            self.port,
            self.port_prefix_len,
        )
    }

    /// Total LPM prefix length of the key in bits (direction and identity always
    /// count: 40 for any-protocol entries, `48 + port_prefix_len` otherwise).
    pub fn prefix_len(&self) -> u32 {
        if self.proto == 0 {
            40
        } else {
            48 + u32::from(self.port_prefix_len)
        }
    }

    /// Whether the entry's key prefix covers a packet with these fields.
    pub fn matches(
        &self,
        direction: Direction,
        identity: IdentityId,
        proto: u8,
        port: u16,
    ) -> bool {
        if self.direction != direction || self.identity != identity {
            return false;
        }
        if self.proto == 0 {
            return true;
        }
        self.proto == proto && ports::prefix_contains(self.port, self.port_prefix_len, port)
    }
}

/// Identifies the policy rule behind map entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    /// `ns/name`, or `name` for clusterwide policies (shared by the rules of
    /// one policy: a resolution names every peer rule it expands).
    pub policy: std::sync::Arc<str>,
    /// Kind of the policy.
    pub kind: PolicyKind,
    /// Section direction.
    pub direction: Direction,
    /// Index of the rule within its section (`ingress`, `egress`, `ingressDeny`, `egressDeny`).
    pub index: usize,
    /// Whether the rule is from a deny section.
    pub deny: bool,
    /// Index into a Cilium policy's `specs` list (0 for `spec` and for NetworkPolicy).
    pub spec: usize,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let section = match (self.kind, self.direction, self.deny) {
            (_, Direction::Ingress, false) => "ingress",
            (_, Direction::Egress, false) => "egress",
            (_, Direction::Ingress, true) => "ingressDeny",
            (_, Direction::Egress, true) => "egressDeny",
        };
        let kind = match self.kind {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        };
        if self.spec > 0 {
            write!(
                f,
                "{kind} {} specs[{}].{section}[{}]",
                self.policy, self.spec, self.index
            )
        } else {
            write!(f, "{kind} {} {section}[{}]", self.policy, self.index)
        }
    }
}

/// The resolved policy of one endpoint: enforcement state and map entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedPolicy {
    /// Whether ingress is in default-deny mode.
    pub ingress_enforced: bool,
    /// Whether egress is in default-deny mode.
    pub egress_enforced: bool,
    /// Policy map entries, sorted by key.
    pub entries: Vec<MapEntry>,
    /// Every rule of every policy section that applies to the endpoint.
    pub rules: Vec<RuleRef>,
    /// The L7 policy of every entry with `proxy` set, by entry key.
    pub l7: BTreeMap<EntryKey, ResolvedL7>,
}

impl ResolvedPolicy {
    /// Whether the given direction is in default-deny mode.
    pub fn enforced(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress_enforced,
            Direction::Egress => self.egress_enforced,
        }
    }

    /// Every proxied entry with its L7 policy: what the agent hands to the proxy.
    pub fn l7_entries(&self) -> impl Iterator<Item = (EntryKey, &ResolvedL7)> {
        self.l7.iter().map(|(k, l7)| (*k, l7))
    }
}
