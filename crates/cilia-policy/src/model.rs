//! Internal policy model shared by all three input kinds.

use std::sync::Arc;

use ipnet::IpNet;

use crate::l7::HttpRuleSpec;

use crate::labels::Selector;

/// One rule (a NetworkPolicy, or one `spec` of a Cilium policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Which endpoints the rule applies to (namespace restriction included).
    /// Equal selectors of one parse share one allocation, so resolution
    /// matches each distinct one once (see `parse::share_subjects`).
    pub(crate) subject: Arc<Selector>,
    /// Index in a Cilium `specs` list (0 otherwise).
    pub(crate) spec: usize,
    pub(crate) ingress: Vec<PeerRule>,
    pub(crate) ingress_deny: Vec<PeerRule>,
    pub(crate) egress: Vec<PeerRule>,
    pub(crate) egress_deny: Vec<PeerRule>,
    /// Whether the rule puts selected endpoints into default deny at ingress.
    pub(crate) enforce_ingress: bool,
    /// Whether the rule puts selected endpoints into default deny at egress.
    pub(crate) enforce_egress: bool,
}

impl Rule {
    /// The rule's four peer sections as (direction, deny, section), deny
    /// before allow in each direction: the order in which resolution visits
    /// them, so a deny entry is in place before an allow could shadow it.
    pub(crate) fn sections(&self) -> [(crate::Direction, bool, &[PeerRule]); 4] {
        use crate::Direction::{Egress, Ingress};
        [
            (Ingress, true, &self.ingress_deny),
            (Ingress, false, &self.ingress),
            (Egress, true, &self.egress_deny),
            (Egress, false, &self.egress),
        ]
    }
}

/// One entry of an ingress/egress (deny) section: peers x ports. Built by
/// [`PeerRule::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerRule {
    /// Union of peers. Empty = selects no peer at all.
    pub(crate) peers: Vec<Peer>,
    /// Union of port ranges. Never empty (all ports is an explicit full range)
    /// unless `named` is not.
    pub(crate) ports: Vec<PortRange>,
    /// Named ports, resolved per endpoint (see [`crate::named`]).
    pub(crate) named: Vec<NamedPortRule>,
    /// HTTP rules of some of `ports`, by index into `ports` (ascending); a
    /// port range without an entry here is L4-only. Only allow rules have any,
    /// and only on single TCP ports (the parser refuses the rest).
    pub(crate) l7: Vec<(usize, Arc<PortL7>)>,
    /// A hash of the fields above, taken once: resolution hashes every
    /// peer rule of every selecting policy (to expand each distinct one
    /// once), which hashing the peers and ports each time made a
    /// twentieth of a large resolution.
    digest: u64,
}

/// Hashes the digest (equal rules have equal digests: same fields, same
/// fixed-key hasher).
impl std::hash::Hash for PeerRule {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

impl PeerRule {
    pub(crate) fn new(
        peers: Vec<Peer>,
        ports: Vec<PortRange>,
        named: Vec<NamedPortRule>,
        l7: Vec<(usize, Arc<PortL7>)>,
    ) -> Self {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same digest in every process.
        let mut h = std::hash::DefaultHasher::new();
        (&peers, &ports, &named, &l7).hash(&mut h);
        PeerRule {
            digest: h.finish(),
            peers,
            ports,
            named,
            l7,
        }
    }

    /// The HTTP rules of `ports[index]`, if it has any.
    pub(crate) fn l7_of(&self, index: usize) -> Option<&Arc<PortL7>> {
        self.l7
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .map(|at| &self.l7[at].1)
    }
}

/// A port given by name: resolved against the subject's named ports
/// (ingress) or each peer identity's (egress).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct NamedPortRule {
    pub(crate) name: Arc<str>,
    /// 0: any of TCP, UDP and SCTP the name is declared with.
    pub(crate) proto: u8,
    /// The HTTP rules of the `toPorts` entry, if it has any.
    pub(crate) l7: Option<Arc<PortL7>>,
}

/// The HTTP rules of one `toPorts` entry, compiled once at parse time (so a bad
/// regular expression is a parse error) and kept in their source form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PortL7 {
    /// Index of the `toPorts` entry within its rule (for traces: `toPorts[i].rules.http[j]`).
    pub(crate) to_ports: usize,
    /// `rules.http`, never empty (an empty list is no L7 restriction).
    pub(crate) http: Vec<HttpRuleSpec>,
}

/// A set of peer identities.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Peer {
    /// Every identity, known or not (map identity 0).
    Any,
    /// Identities whose labels match.
    Selector(Selector),
    /// CIDR identities inside `cidr` and not inside any `except`.
    Cidr { cidr: IpNet, except: Vec<IpNet> },
    /// A Cilium entity.
    Entity(Entity),
}

/// Cilium entities (`all` is modelled as [`Peer::Any`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Entity {
    World,
    Cluster,
    Host,
    RemoteNode,
    Init,
    Health,
    Unmanaged,
}

/// Protocol plus inclusive port range. `proto == 0` = any protocol: with the full
/// range it matches every protocol, otherwise only TCP, UDP and SCTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PortRange {
    pub(crate) proto: u8,
    pub(crate) first: u16,
    pub(crate) last: u16,
}

impl PortRange {
    pub(crate) const ALL: PortRange = PortRange {
        proto: 0,
        first: 0,
        last: u16::MAX,
    };

    pub(crate) fn all_ports(&self) -> bool {
        self.first == 0 && self.last == u16::MAX
    }
}

pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_SCTP: u8 = 132;
/// Protocols a port-qualified ANY rule expands to.
pub(crate) const PORT_PROTOCOLS: [u8; 3] = [PROTO_TCP, PROTO_UDP, PROTO_SCTP];

#[cfg(test)]
mod tests {
    use super::{Peer, PeerRule, PortRange};
    use std::hash::BuildHasher;

    /// Equal peer rules hash equal (the digest is of the content, not of
    /// the allocation), different ones apart.
    #[test]
    fn a_peer_rule_hashes_its_content() {
        let rule = |port: u16| {
            PeerRule::new(
                vec![Peer::Cidr {
                    cidr: "192.0.2.0/24".parse().expect("cidr"),
                    except: Vec::new(),
                }],
                vec![PortRange {
                    proto: 6,
                    first: port,
                    last: port,
                }],
                Vec::new(),
                Vec::new(),
            )
        };
        let state = std::hash::RandomState::new();
        assert_eq!(rule(80), rule(80));
        assert_eq!(state.hash_one(rule(80)), state.hash_one(rule(80)));
        assert_ne!(rule(80), rule(443));
        assert_ne!(state.hash_one(rule(80)), state.hash_one(rule(443)));
    }
}
