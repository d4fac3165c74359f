//! Policy resolution for one endpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;
use smallvec::{smallvec, SmallVec};

use crate::l7::{HttpOrigin, HttpRuleSpec, L7Policy, ResolvedL7};
use crate::labels::{Requirement, Selector};
use crate::model::{Entity, Peer, PeerRule, PortL7, PortRange, PORT_PROTOCOLS};
use crate::named::NamedPorts;
use crate::ports::{port_range_prefixes, prefix_mask};
use crate::{
    reserved, Direction, IdentityId, Labels, MapEntry, Policy, ResolvedPolicy, RuleRef, Verdict,
    LOCAL_CIDR_IDENTITY_BASE,
};

/// Every identity the resolver can select: endpoint and reserved identities by labels,
/// CIDR identities by prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityCache {
    labels: BTreeMap<IdentityId, Labels>,
    cidrs: BTreeMap<IdentityId, IpNet>,
    /// CIDR identities by (family, network address, prefix length): the
    /// identities inside a rule's CIDR are one range of this map, so a CIDR
    /// peer costs O(log n + matches), not a scan of every CIDR identity.
    by_prefix: BTreeMap<(u8, u128, u8), IdentityId>,
    /// `by_prefix` as one sorted array, built on the first use after a
    /// change: a CIDR peer's identities are then a run of adjacent memory
    /// found by one binary search (walking the tree cost a node visit per
    /// identity, half of a resolution's peer expansion).
    prefix_runs: PrefixRuns,
    /// The port names of identities with local endpoints (the union over
    /// those endpoints): what egress named ports resolve against.
    named_ports: BTreeMap<IdentityId, NamedPorts>,
    /// Labelled identities by label key: a selector requiring a key (`In`,
    /// `Exists`) can only select identities that carry it, so it scans the
    /// rarest of its keys instead of every identity.
    by_label_key: BTreeMap<String, BTreeSet<IdentityId>>,
}

/// A sorted copy of the prefix index (see `IdentityCache::prefix_runs`):
/// the keys and, apart, the identities in the same order, so the
/// identities inside a CIDR are one slice to copy. State derived from
/// `by_prefix`, so it takes no part in comparisons.
#[derive(Debug, Clone, Default)]
struct PrefixRuns(OnceLock<(Vec<PrefixIndex>, Vec<IdentityId>)>);

/// (family, network address, prefix length): the prefix index's order.
type PrefixIndex = (u8, u128, u8);

impl PartialEq for PrefixRuns {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PrefixRuns {}

fn prefix_index(net: &IpNet) -> (u8, u128, u8) {
    match net {
        IpNet::V4(v4) => (4, u128::from(u32::from(v4.network())), v4.prefix_len()),
        IpNet::V6(v6) => (6, u128::from(v6.network()), v6.prefix_len()),
    }
}

fn last_address(net: &IpNet) -> u128 {
    match net {
        IpNet::V4(v4) => u128::from(u32::from(v4.broadcast())),
        IpNet::V6(v6) => u128::from(v6.broadcast()),
    }
}

impl IdentityCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an endpoint or reserved identity.
    pub fn insert_labels(&mut self, id: IdentityId, labels: Labels) {
        self.replace_labels(id, labels);
    }

    /// Adds (or replaces) a CIDR identity. The prefix is truncated to its network address.
    pub fn insert_cidr(&mut self, id: IdentityId, cidr: IpNet) {
        self.replace_cidr(id, cidr);
    }

    /// Adds (or replaces) a labelled identity; returns the labels it had.
    pub(crate) fn replace_labels(&mut self, id: IdentityId, labels: Labels) -> Option<Labels> {
        for key in labels.0.keys() {
            self.by_label_key.entry(key.clone()).or_default().insert(id);
        }
        let old = self.labels.insert(id, labels);
        if let Some(old) = &old {
            self.unindex_labels(id, old);
        }
        old
    }

    /// Drops `id` from the key index for the keys of `old` it no longer has.
    fn unindex_labels(&mut self, id: IdentityId, old: &Labels) {
        let now = self.labels.get(&id);
        for key in old.0.keys() {
            if now.is_some_and(|l| l.0.contains_key(key)) {
                continue;
            }
            if let Some(ids) = self.by_label_key.get_mut(key) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_label_key.remove(key);
                }
            }
        }
    }

    /// The labelled (non-CIDR) identities `sel` selects, in id order.
    pub(crate) fn select<'a>(&'a self, sel: &'a Selector) -> impl Iterator<Item = IdentityId> + 'a {
        // The identities of each key the selector requires (`None`: a key
        // no identity carries); the rarest bounds what it can select.
        let rarest = sel
            .requirements
            .iter()
            .filter_map(|r| match r {
                Requirement::In(k, _) | Requirement::Exists(k) => {
                    Some(self.by_label_key.get(k.as_str()))
                }
                Requirement::NotIn(..) | Requirement::DoesNotExist(_) => None,
            })
            .min_by_key(|ids| ids.map_or(0, BTreeSet::len));
        let candidates: Box<dyn Iterator<Item = IdentityId> + 'a> = match rarest {
            None => Box::new(self.labels.keys().copied()),
            Some(ids) => Box::new(ids.into_iter().flatten().copied()),
        };
        candidates.filter(move |&id| {
            !self.is_cidr_identity(id) && self.labels.get(&id).is_some_and(|l| sel.matches(l))
        })
    }

    /// Adds (or replaces) a CIDR identity; returns the prefix it had.
    pub(crate) fn replace_cidr(&mut self, id: IdentityId, cidr: IpNet) -> Option<IpNet> {
        let cidr = cidr.trunc();
        let old = self.cidrs.insert(id, cidr);
        self.prefix_runs = PrefixRuns::default();
        if let Some(old) = old {
            self.by_prefix.remove(&prefix_index(&old));
        }
        self.by_prefix.insert(prefix_index(&cidr), id);
        old
    }

    /// Removes a labelled identity; returns its labels.
    pub fn remove_labels(&mut self, id: IdentityId) -> Option<Labels> {
        let old = self.labels.remove(&id)?;
        self.unindex_labels(id, &old);
        Some(old)
    }

    /// Removes a CIDR identity; returns its prefix.
    pub fn remove_cidr(&mut self, id: IdentityId) -> Option<IpNet> {
        let old = self.cidrs.remove(&id)?;
        self.by_prefix.remove(&prefix_index(&old));
        self.prefix_runs = PrefixRuns::default();
        Some(old)
    }

    /// Sets the port names of an identity (the union over its local
    /// endpoints; empty: none); returns the ones it had.
    pub fn set_named_ports(&mut self, id: IdentityId, ports: NamedPorts) -> NamedPorts {
        let old = if ports.is_empty() {
            self.named_ports.remove(&id)
        } else {
            self.named_ports.insert(id, ports)
        };
        old.unwrap_or_default()
    }

    /// The port names of an identity, if it has any.
    pub fn named_ports(&self, id: IdentityId) -> Option<&NamedPorts> {
        self.named_ports.get(&id)
    }

    /// Every identity with port names (for diffing two caches).
    pub(crate) fn named_ports_map(&self) -> &BTreeMap<IdentityId, NamedPorts> {
        &self.named_ports
    }

    /// CIDR identities whose prefix lies inside `cidr` (equal included), in
    /// prefix order.
    ///
    /// They are one run of the sorted index, from `(family, first address,
    /// len)` to the last address: a prefix whose network address lies in
    /// `cidr` but is shorter than `cidr` must be aligned to a larger block,
    /// and the only such address in `cidr` is its first, so those prefixes
    /// all sort before `(family, first, len)`.
    pub(crate) fn cidr_identities_within(&self, cidr: &IpNet) -> &[IdentityId] {
        let (family, first, len) = prefix_index(cidr);
        let last = (family, last_address(cidr), u8::MAX);
        let (keys, ids) = self
            .prefix_runs
            .0
            .get_or_init(|| self.by_prefix.iter().map(|(k, id)| (*k, *id)).unzip());
        let start = keys.partition_point(|k| *k < (family, first, len));
        let end = start + keys[start..].partition_point(|k| *k <= last);
        &ids[start..end]
    }

    /// Every identity with labels, as a map (for diffing two caches).
    pub(crate) fn labels_map(&self) -> &BTreeMap<IdentityId, Labels> {
        &self.labels
    }

    /// Every CIDR identity, as a map (for diffing two caches).
    pub(crate) fn cidrs_map(&self) -> &BTreeMap<IdentityId, IpNet> {
        &self.cidrs
    }

    /// Labels of an identity, if known.
    pub fn labels(&self, id: IdentityId) -> Option<&Labels> {
        self.labels.get(&id)
    }

    /// Prefix of a CIDR identity, if known.
    pub fn cidr(&self, id: IdentityId) -> Option<&IpNet> {
        self.cidrs.get(&id)
    }

    /// All identities with labels.
    pub fn label_identities(&self) -> impl Iterator<Item = (IdentityId, &Labels)> {
        self.labels.iter().map(|(id, l)| (*id, l))
    }

    /// All CIDR identities.
    pub fn cidr_identities(&self) -> impl Iterator<Item = (IdentityId, &IpNet)> {
        self.cidrs.iter().map(|(id, c)| (*id, c))
    }

    pub(crate) fn is_cidr_identity(&self, id: IdentityId) -> bool {
        self.cidrs.contains_key(&id) || id >= LOCAL_CIDR_IDENTITY_BASE
    }
}

/// The identities a peer selects: every identity (map identity 0), or a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerSet {
    Any,
    Some(BTreeSet<IdentityId>),
}

/// Reserved identities that belong to the `cluster` entity even when not in the cache.
const CLUSTER_RESERVED: [IdentityId; 5] = [
    reserved::HOST,
    reserved::REMOTE_NODE,
    reserved::INIT,
    reserved::HEALTH,
    reserved::UNMANAGED,
];

/// Whether a CIDR peer selects the prefix `net` of a CIDR identity.
pub(crate) fn cidr_selects(cidr: &IpNet, except: &[IpNet], net: &IpNet) -> bool {
    cidr.contains(net) && !except.iter().any(|e| e.contains(net))
}

/// Whether `peer` selects identity `id` (brute force, used for one identity at a time).
pub(crate) fn peer_selects(peer: &Peer, id: IdentityId, cache: &IdentityCache) -> bool {
    match peer {
        Peer::Any => true,
        Peer::Selector(sel) => {
            !cache.is_cidr_identity(id) && cache.labels(id).is_some_and(|l| sel.matches(l))
        }
        Peer::Cidr { cidr, except } => match cache.cidr(id) {
            Some(net) => cidr_selects(cidr, except, net),
            // A zero-length prefix also covers addresses without a more specific
            // identity, which the ipcache maps to reserved:world.
            None => id == reserved::WORLD && cidr.prefix_len() == 0,
        },
        Peer::Entity(e) => match e {
            Entity::World => id == reserved::WORLD || cache.cidr(id).is_some(),
            Entity::Cluster => {
                id != reserved::WORLD
                    && !cache.is_cidr_identity(id)
                    && (CLUSTER_RESERVED.contains(&id) || cache.labels(id).is_some())
            }
            Entity::Host => id == reserved::HOST,
            Entity::RemoteNode => id == reserved::REMOTE_NODE,
            Entity::Init => id == reserved::INIT,
            Entity::Health => id == reserved::HEALTH,
            Entity::Unmanaged => id == reserved::UNMANAGED,
        },
    }
}

/// The identities one peer selects (a set; [`Peer::Any`] is the caller's case), by the
/// same rules as [`Resolver::peer_set`], which is the union of these over a rule's peers.
pub(crate) fn peer_identities(peer: &Peer, cache: &IdentityCache) -> BTreeSet<IdentityId> {
    match peer {
        Peer::Any => BTreeSet::new(),
        Peer::Selector(sel) => cache.select(sel).collect(),
        Peer::Cidr { cidr, .. } => cache
            .cidr_identities_within(cidr)
            .iter()
            .copied()
            .chain([reserved::WORLD])
            .filter(|id| peer_selects(peer, *id, cache))
            .collect(),
        Peer::Entity(_) => cache
            .label_identities()
            .map(|(id, _)| id)
            .chain(cache.cidr_identities().map(|(id, _)| id))
            .chain(CLUSTER_RESERVED)
            .chain([reserved::WORLD])
            .filter(|id| peer_selects(peer, *id, cache))
            .collect(),
    }
}

/// Resolution state: selector results are memoized (many rules share selectors).
struct Resolver<'a> {
    cache: &'a IdentityCache,
    selector_memo: HashMap<Selector, BTreeSet<IdentityId>>,
}

/// A peer rule's identities: a run of the cache's prefix index, or a range
/// of the resolution's own array of identities.
enum PeerIds<'a> {
    Cached(&'a [IdentityId]),
    Owned(std::ops::Range<usize>),
}

impl PeerIds<'_> {
    fn get<'s>(&'s self, all: &'s [IdentityId]) -> &'s [IdentityId] {
        match self {
            PeerIds::Cached(ids) => ids,
            PeerIds::Owned(range) => &all[range.clone()],
        }
    }
}

impl<'a> Resolver<'a> {
    /// The identities `peers` select, each once, as map identities (`[0]`:
    /// every identity). Same selection as [`Self::peer_set`], without building a set
    /// per rule: a CIDR peer without exceptions takes its run of the prefix
    /// index as is (the index only holds prefixes inside it) — for a single
    /// such peer without copying it. Others are appended to `ids`, one
    /// array for every rule of the resolution.
    fn peer_ids(&mut self, peers: &[Peer], ids: &mut Vec<IdentityId>) -> PeerIds<'a> {
        if let [Peer::Cidr { cidr, except }] = peers {
            if except.is_empty() && cidr.prefix_len() != 0 {
                return PeerIds::Cached(self.cache.cidr_identities_within(cidr));
            }
        }
        let start = ids.len();
        self.append_peer_ids(peers, ids);
        PeerIds::Owned(start..ids.len())
    }

    fn append_peer_ids(&mut self, peers: &[Peer], ids: &mut Vec<IdentityId>) {
        let plain_cidrs = !peers.is_empty()
            && peers
                .iter()
                .all(|p| matches!(p, Peer::Cidr { except, .. } if except.is_empty()));
        if plain_cidrs {
            let start = ids.len();
            for peer in peers {
                let Peer::Cidr { cidr, .. } = peer else {
                    continue;
                };
                ids.extend_from_slice(self.cache.cidr_identities_within(cidr));
                // As in `peer_selects`: a zero-length prefix also selects world.
                if cidr.prefix_len() == 0 && self.cache.cidr(reserved::WORLD).is_none() {
                    ids.push(reserved::WORLD);
                }
            }
            // One peer's range holds each identity once; only a union
            // needs ordering to drop the ones two peers share.
            if peers.len() > 1 {
                let mut union = ids.split_off(start);
                union.sort_unstable();
                union.dedup();
                ids.append(&mut union);
            }
            return;
        }
        match self.peer_set(peers) {
            PeerSet::Any => ids.push(0),
            PeerSet::Some(set) => ids.extend(set),
        }
    }

    fn peer_set(&mut self, peers: &[Peer]) -> PeerSet {
        let mut ids = BTreeSet::new();
        for peer in peers {
            match peer {
                Peer::Any => return PeerSet::Any,
                Peer::Selector(sel) => {
                    let cache = self.cache;
                    let set = self
                        .selector_memo
                        .entry(sel.clone())
                        .or_insert_with(|| cache.select(sel).collect());
                    ids.extend(set.iter().copied());
                }
                Peer::Cidr { cidr, .. } => {
                    let candidates = self
                        .cache
                        .cidr_identities_within(cidr)
                        .iter()
                        .copied()
                        .chain([reserved::WORLD]);
                    for id in candidates {
                        if peer_selects(peer, id, self.cache) {
                            ids.insert(id);
                        }
                    }
                }
                Peer::Entity(_) => {
                    let candidates = self
                        .cache
                        .label_identities()
                        .map(|(id, _)| id)
                        .chain(self.cache.cidr_identities().map(|(id, _)| id))
                        .chain(CLUSTER_RESERVED)
                        .chain([reserved::WORLD]);
                    for id in candidates {
                        if peer_selects(peer, id, self.cache) {
                            ids.insert(id);
                        }
                    }
                }
            }
        }
        PeerSet::Some(ids)
    }
}

/// Key of a map entry without the verdict: (direction, identity, proto, port, prefix len).
pub(crate) type Key = (Direction, IdentityId, u8, u16, u8);

/// The peer rules already expanded, by (direction, deny, rule). Hashed with
/// foldhash: a rule is hashed whole (peers, ports, HTTP rules) once per rule of
/// every policy, which SipHash made a tenth of a large resolution.
pub(crate) type Expanded<'a> =
    HashSet<(Direction, bool, &'a PeerRule), foldhash::fast::RandomState>;

/// Walks `rule`'s peer rules in resolution order (deny before allow in
/// each direction). Every one is recorded in `rules` (map entries name it
/// by index); `visit` gets (direction, deny, peer rule, its index) for those
/// not `expanded` before: an identical earlier one already holds every key
/// a later one would produce.
pub(crate) fn for_each_peer_rule<'a>(
    rules: &mut Vec<RuleRef>,
    expanded: &mut Expanded<'a>,
    (policy, policy_name): (&Policy, &Arc<str>),
    rule: &'a crate::model::Rule,
    mut visit: impl FnMut(Direction, bool, &'a PeerRule, u32),
) {
    for (direction, deny, section) in rule.sections() {
        for (index, pr) in section.iter().enumerate() {
            let rule_idx = u32::try_from(rules.len()).unwrap_or(u32::MAX);
            rules.push(RuleRef {
                policy: policy_name.clone(),
                kind: policy.kind,
                direction,
                index,
                deny,
                spec: rule.spec,
            });
            // A rule with HTTP rules is always expanded: every rule behind an L7
            // entry is named there, the later identical ones too.
            if expanded.insert((direction, deny, pr)) || !pr.l7.is_empty() {
                visit(direction, deny, pr, rule_idx);
            }
        }
    }
}

/// The HTTP rules claimed on each key, with the claiming rule (sorted by rule
/// index within a key: the order rules are visited in).
pub(crate) type HttpClaims = BTreeMap<Key, Vec<HttpClaim>>;

/// One rule's claim of HTTP rules on a key: (rule index, the rules).
pub(crate) type HttpClaim = (u32, Arc<PortL7>);

/// A port key and the HTTP rules of the range it came from.
type PortKey<'a> = ((u8, u16, u8), Option<&'a Arc<PortL7>>);

/// What named ports resolve against: the subject's own (ingress) and each
/// peer identity's (egress).
#[derive(Clone, Copy)]
pub(crate) struct NamedCtx<'a> {
    pub(crate) subject: &'a NamedPorts,
    pub(crate) identities: &'a IdentityCache,
}

/// The keys of `pr`'s named ports for the peers `ids`: (identity, proto,
/// port, the HTTP rules). Ingress: the subject's numbers, for every peer.
/// Egress: each peer identity's numbers; for every peer (identity 0), each
/// identity declaring the name, as its own key (an address without
/// endpoints has no port names). A name that does not resolve adds nothing.
fn named_keys<'p>(
    named: NamedCtx<'_>,
    direction: Direction,
    ids: &[IdentityId],
    pr: &'p PeerRule,
) -> Vec<(IdentityId, u8, u16, Option<&'p Arc<PortL7>>)> {
    let mut out = Vec::new();
    for nr in &pr.named {
        let fits = |proto: u8| nr.proto == 0 || nr.proto == proto;
        match direction {
            Direction::Ingress => {
                for (proto, port) in named.subject.get(&nr.name).filter(|(p, _)| fits(*p)) {
                    out.extend(ids.iter().map(|id| (*id, proto, port, nr.l7.as_ref())));
                }
            }
            Direction::Egress => {
                for &id in ids {
                    let peers: Vec<(IdentityId, &NamedPorts)> = if id == 0 {
                        named
                            .identities
                            .named_ports_map()
                            .iter()
                            .map(|(id, p)| (*id, p))
                            .collect()
                    } else {
                        named
                            .identities
                            .named_ports(id)
                            .map(|p| (id, p))
                            .into_iter()
                            .collect()
                    };
                    for (peer, ports) in peers {
                        for (proto, port) in ports.get(&nr.name).filter(|(p, _)| fits(*p)) {
                            out.push((peer, proto, port, nr.l7.as_ref()));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Adds the keys of `ids` x `ports` in `direction` to the candidates (and
/// those of the named ports, resolved by `named`): the
/// first allow and the first deny rule to claim a key keep it; the first
/// L4-only allow is kept too, and every HTTP rule list claimed (in `http`).
#[allow(clippy::too_many_arguments)] // one call per peer rule, from two resolvers
pub(crate) fn add_candidates<M: CandidateMap>(
    keys: &mut M,
    http: &mut HttpClaims,
    direction: Direction,
    deny: bool,
    ids: &[IdentityId],
    pr: &PeerRule,
    rule_idx: u32,
    named: NamedCtx<'_>,
) {
    let port_keys: SmallVec<[PortKey; 4]> = pr
        .ports
        .iter()
        .enumerate()
        .flat_map(|(i, range)| {
            let l7 = pr.l7_of(i);
            port_keys(range).into_iter().map(move |k| (k, l7))
        })
        .collect();
    let mut claim = |keys: &mut M, key: Key, l7: Option<&Arc<PortL7>>| {
        keys.claim(key, deny, l7.is_none(), rule_idx);
        if let (false, Some(l7)) = (deny, l7) {
            let claims = http.entry(key).or_default();
            if !claims.iter().any(|(r, c)| *r == rule_idx && c == l7) {
                claims.push((rule_idx, l7.clone()));
            }
        }
    };
    for &((proto, port, len), l7) in &port_keys {
        match (deny, l7) {
            (false, Some(_)) => {
                for &id in ids {
                    claim(keys, (direction, id, proto, port, len), l7);
                }
            }
            // No HTTP rules to record: every identity's claim at once.
            _ => keys.claim_all(
                direction,
                ids,
                (proto, port, len),
                deny,
                l7.is_none(),
                rule_idx,
            ),
        }
    }
    if !pr.named.is_empty() {
        for (id, proto, port, l7) in named_keys(named, direction, ids, pr) {
            claim(keys, (direction, id, proto, port, 16), l7);
        }
    }
}

/// Where [`add_candidates`] records the claims on each key: the first allow
/// and the first deny rule to claim a key keep it, and the first allow without
/// HTTP rules (`l4`).
pub(crate) trait CandidateMap {
    /// Rule `rule` claims `key`.
    fn claim(&mut self, key: Key, deny: bool, l4: bool, rule: u32);

    /// Rule `rule` claims the port key `(proto, port, len)` of every identity in `ids`.
    fn claim_all(
        &mut self,
        direction: Direction,
        ids: &[IdentityId],
        (proto, port, len): (u8, u16, u8),
        deny: bool,
        l4: bool,
        rule: u32,
    ) {
        for &id in ids {
            self.claim((direction, id, proto, port, len), deny, l4, rule);
        }
    }
}

impl CandidateMap for BTreeMap<Key, Candidates> {
    fn claim(&mut self, key: Key, deny: bool, l4: bool, rule: u32) {
        let c = self.entry(key).or_default();
        if deny {
            c.deny.get_or_insert(rule);
            return;
        }
        c.allow.get_or_insert(rule);
        if l4 {
            c.l4.get_or_insert(rule);
        }
    }
}

/// The claims of one full resolution, in the order they come: often ~10^5
/// keys, each claimed once or a few times. Appending a claim and sorting them
/// once ([`ClaimLog::sorted`]) is several times cheaper in time and memory
/// than an ordered-map (or hash-map) insert per claim. The sort is a radix
/// sort on the packed key over the bits that differ between keys
/// ([`crate::radix`]: two passes for a typical CIDR policy). Rules are
/// visited in increasing index order; the candidates keep the lowest index
/// of each kind whatever the order of equal keys.
pub(crate) struct ClaimLog {
    claims: Vec<LogClaim>,
    /// The OR and the AND of every key so far: their xor holds the bits
    /// that differ between keys, all the sort needs to know about them.
    or: u64,
    and: u64,
}

impl Default for ClaimLog {
    fn default() -> Self {
        ClaimLog {
            claims: Vec::new(),
            or: 0,
            and: u64::MAX,
        }
    }
}

/// One claim of the log: the packed key, and the rule index with the kind
/// of claim in its top two bits ([`KIND_SHIFT`]). 12 bytes, not the 16 of a
/// `(u64, u32, u8)`: the log and the sort's buffer of the same size are most
/// of what a large resolution allocates.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
pub(crate) struct LogClaim {
    key: u64,
    rule_kind: u32,
}

/// Where a claim's kind starts in [`LogClaim::rule_kind`]: 0 deny, 1 allow
/// with HTTP rules, 2 allow. Rule indexes stay far below 2^30 (a policy set
/// holds at most [`crate::limits::MAX_RULES`] rules of at most
/// [`crate::limits::MAX_PEERS`] peer rules).
const KIND_SHIFT: u32 = 30;
const RULE_MASK: u32 = (1 << KIND_SHIFT) - 1;

fn log_claim(key: u64, deny: bool, l4: bool, rule: u32) -> LogClaim {
    debug_assert!(rule <= RULE_MASK, "rule index {rule}");
    let kind = match (deny, l4) {
        (true, _) => 0,
        (false, false) => 1,
        (false, true) => 2,
    };
    LogClaim {
        key,
        rule_kind: kind << KIND_SHIFT | rule.min(RULE_MASK),
    }
}

impl CandidateMap for ClaimLog {
    fn claim(&mut self, key: Key, deny: bool, l4: bool, rule: u32) {
        let key = pack_key(key);
        self.or |= key;
        self.and &= key;
        self.claims.push(log_claim(key, deny, l4, rule));
    }

    fn claim_all(
        &mut self,
        direction: Direction,
        ids: &[IdentityId],
        (proto, port, len): (u8, u16, u8),
        deny: bool,
        l4: bool,
        rule: u32,
    ) {
        // The packed key of identity 0; an identity only adds its bits.
        let base = log_claim(pack_key((direction, 0, proto, port, len)), deny, l4, rule);
        let Some(&first) = ids.first() else {
            return;
        };
        let (or, and) = ids
            .iter()
            .fold((first, first), |(o, a), &id| (o | id, a & id));
        self.or |= base.key | u64::from(or) << IDENTITY_SHIFT;
        self.and &= base.key | u64::from(and) << IDENTITY_SHIFT;
        self.claims.extend(ids.iter().map(|&id| LogClaim {
            key: base.key | u64::from(id) << IDENTITY_SHIFT,
            ..base
        }));
    }
}

impl ClaimLog {
    /// The candidates of every claimed key, in key order.
    pub(crate) fn sorted(&mut self) -> SortedCandidates<'_> {
        crate::radix::sort_by_key_differing(&mut self.claims, |c| c.key, self.or ^ self.and);
        SortedCandidates {
            claims: &self.claims,
        }
    }
}

/// The candidates of a sorted claim log, one key at a time.
pub(crate) struct SortedCandidates<'a> {
    claims: &'a [LogClaim],
}

impl Iterator for SortedCandidates<'_> {
    type Item = (Key, Candidates);

    fn next(&mut self) -> Option<(Key, Candidates)> {
        let key = self.claims.first()?.key;
        let mut c = Candidates::default();
        let keep = |slot: &mut Option<u32>, rule: u32| {
            *slot = Some(slot.map_or(rule, |r| r.min(rule)));
        };
        while let Some((&LogClaim { key: k, rule_kind }, rest)) = self.claims.split_first() {
            if k != key {
                break;
            }
            self.claims = rest;
            let rule = rule_kind & RULE_MASK;
            match rule_kind >> KIND_SHIFT {
                0 => keep(&mut c.deny, rule),
                1 => keep(&mut c.allow, rule),
                _ => {
                    keep(&mut c.allow, rule);
                    keep(&mut c.l4, rule);
                }
            }
        }
        Some((unpack_key(key), c))
    }

    /// At most one key per claim (most keys have one claim).
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.claims.len().min(1), Some(self.claims.len()))
    }
}

/// A key as one integer whose order is the key's order:
/// `[direction:1][identity:32][proto:8][port:16][prefix len:5]`.
/// Where a packed key's identity starts.
const IDENTITY_SHIFT: u32 = 29;

fn pack_key((direction, identity, proto, port, len): Key) -> u64 {
    debug_assert!(len <= 16, "port prefix length {len}");
    let direction = match direction {
        Direction::Ingress => 0u64,
        Direction::Egress => 1,
    };
    direction << 61
        | u64::from(identity) << IDENTITY_SHIFT
        | u64::from(proto) << 21
        | u64::from(port) << 5
        | u64::from(len)
}

fn unpack_key(k: u64) -> Key {
    let direction = if k >> 61 == 0 {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    (
        direction,
        (k >> 29) as u32,
        (k >> 21) as u8,
        (k >> 5) as u16,
        (k & 0x1f) as u8,
    )
}

/// First allow rule and first deny rule seen for a key, and the first allow
/// rule without HTTP rules (an L4-only allow lets every request through).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidates {
    pub(crate) allow: Option<u32>,
    pub(crate) deny: Option<u32>,
    pub(crate) l4: Option<u32>,
}

/// `(proto, port, prefix_len)` triples a port range expands to. Most
/// ranges are one port of one protocol: one key, no allocation.
pub(crate) fn port_keys(range: &PortRange) -> SmallVec<[(u8, u16, u8); 4]> {
    let protos: &[u8] = match range.proto {
        0 if range.all_ports() => return smallvec![(0, 0, 0)],
        0 => &PORT_PROTOCOLS,
        p if range.first == range.last => return smallvec![(p, range.first, 16)],
        p => return proto_keys(p, range).collect(),
    };
    protos.iter().flat_map(|p| proto_keys(*p, range)).collect()
}

fn proto_keys(proto: u8, range: &PortRange) -> impl Iterator<Item = (u8, u16, u8)> {
    port_range_prefixes(range.first, range.last)
        .into_iter()
        .map(move |(port, len)| (proto, port, len))
}

/// Resolves the policy of one endpoint (its labels include `io.kubernetes.pod.namespace`).
///
/// Entries are emitted so that [`crate::evaluate`] gives the policy's verdict for every
/// packet: within each (direction, identity) group — identity 0 being its own group —
/// an allow entry is dropped when an equal or shorter deny prefix covers it (the longest
/// match would otherwise return the allow), and entries made redundant by a shorter
/// entry with the same verdict are dropped.
pub fn resolve(
    policies: &[Policy],
    subject: &Labels,
    identities: &IdentityCache,
) -> ResolvedPolicy {
    resolve_with_ports(policies, subject, &NamedPorts::new(), identities)
}

/// [`resolve`] for an endpoint that declares port names (`subject_ports`):
/// ingress rules' named ports resolve against them, egress rules' against
/// the peer identities' (see [`IdentityCache::set_named_ports`]).
pub fn resolve_with_ports(
    policies: &[Policy],
    subject: &Labels,
    subject_ports: &NamedPorts,
    identities: &IdentityCache,
) -> ResolvedPolicy {
    let named = NamedCtx {
        subject: subject_ports,
        identities,
    };
    let mut out = ResolvedPolicy::default();
    let mut resolver = Resolver {
        cache: identities,
        selector_memo: HashMap::new(),
    };
    let mut keys = ClaimLog::default();
    let mut http: HttpClaims = BTreeMap::new();
    // A rule identical to an earlier one (same direction, verdict, peers and ports) adds
    // nothing: the earlier rule already holds every key it would produce.
    let mut expanded = Expanded::default();

    // Peers first, claims second: the claim log is then allocated once, at
    // about its final size.
    let mut expansions = Vec::new();
    let mut all_ids = Vec::new();
    // Whether each subject selector matches, by its (shared) allocation.
    let mut selects: HashMap<*const Selector, bool, foldhash::fast::RandomState> =
        HashMap::default();
    for policy in policies {
        let policy_name: Arc<str> = policy.qualified_name().into();
        for rule in &policy.rules {
            let matches = *selects
                .entry(Arc::as_ptr(&rule.subject))
                .or_insert_with(|| rule.subject.matches(subject));
            if !matches {
                continue;
            }
            out.ingress_enforced |= rule.enforce_ingress;
            out.egress_enforced |= rule.enforce_egress;
            for_each_peer_rule(
                &mut out.rules,
                &mut expanded,
                (policy, &policy_name),
                rule,
                |direction, deny, pr, rule_idx| {
                    let ids = resolver.peer_ids(&pr.peers, &mut all_ids);
                    expansions.push((direction, deny, pr, rule_idx, ids));
                },
            );
        }
    }
    keys.claims.reserve(
        expansions
            .iter()
            .map(|(_, _, pr, _, ids)| ids.get(&all_ids).len() * pr.ports.len().max(1))
            .sum(),
    );
    for &(direction, deny, pr, rule_idx, ref ids) in &expansions {
        let ids = ids.get(&all_ids);
        add_candidates(
            &mut keys, &mut http, direction, deny, ids, pr, rule_idx, named,
        );
    }
    drop(expansions);
    drop(all_ids);

    if http.is_empty() {
        // No proxied entry to place: the candidates never need to exist at once.
        out.entries = normalize(keys.sorted());
        return out;
    }
    let keys: Vec<(Key, Candidates)> = keys.sorted().collect();
    out.entries = normalize(keys.iter().copied());
    let overlay = l7_overlay(
        &http,
        |k| {
            keys.binary_search_by_key(k, |(k, _)| *k)
                .ok()
                .map(|i| keys[i].1)
        },
        |after| {
            let i = keys.partition_point(|(k, _)| *k < after);
            keys.get(i).map(|(k, _)| *k)
        },
        |r| out.rules.get(*r as usize).cloned(),
    );
    apply_overlay(&mut out, overlay);
    out
}

/// What one key holds, for the L7 overlay: its candidates and HTTP claims,
/// with rules as handles `R` (a global rule index, or a contribution's claim).
pub(crate) struct L7View<R> {
    pub(crate) deny: bool,
    pub(crate) allow: Option<R>,
    pub(crate) l4: Option<R>,
    pub(crate) http: Vec<(R, Arc<PortL7>)>,
}

/// The proxied entry of `key` (a single TCP port of one (direction, identity)
/// group), if it has one: the entry the datapath picks for a packet of that
/// port from that identity must carry every allow rule covering the packet
/// (Cilium's semantics: the L7 set of a port is the union of the HTTP rules of
/// every allow rule covering it, and any L4-only allow among them lets every
/// request through, still via the proxy). The datapath looks up the peer's own
/// group first and falls back to identity 0, so the entry folds in the group's
/// shorter prefixes and identity 0's prefixes covering the port. None when no
/// rule covering it has HTTP rules, when the group has no allow covering the
/// port (identity 0 then decides alone), or when a deny of the group covers it
/// (the packet is dropped, never redirected). `order` gives a handle's global
/// rule index (the merge order); the entry names the key's own first allow, or
/// the first allow of the group's shorter prefixes.
pub(crate) fn l7_entry<R: Clone>(
    key: Key,
    view: &dyn Fn(&Key) -> Option<L7View<R>>,
    order: &dyn Fn(&R) -> u32,
    rule_ref: &dyn Fn(&R) -> Option<RuleRef>,
) -> Option<(MapEntry, R, ResolvedL7)> {
    let (direction, identity, proto, port, len) = key;
    let own: Vec<Key> = std::iter::once(key).chain(ancestors(key)).collect();
    let wildcard: Vec<Key> = if identity == 0 {
        Vec::new()
    } else {
        let k0 = (direction, 0, proto, port, len);
        std::iter::once(k0).chain(ancestors(k0)).collect()
    };
    let own_views: Vec<L7View<R>> = own.iter().filter_map(view).collect();
    if own_views.iter().any(|v| v.deny) {
        return None;
    }
    let rule = match view(&key).and_then(|v| v.allow) {
        Some(r) => r,
        None => own_views
            .iter()
            .filter_map(|v| v.allow.clone())
            .min_by_key(|r| order(r))?,
    };
    let views: Vec<L7View<R>> = own_views
        .into_iter()
        .chain(wildcard.iter().filter_map(view))
        .collect();
    let mut http: Vec<(u32, &R, &Arc<PortL7>)> = views
        .iter()
        .flat_map(|v| v.http.iter().map(|(r, l7)| (order(r), r, l7)))
        .collect();
    if http.is_empty() {
        return None;
    }
    http.sort_by_key(|(o, _, l7)| (*o, l7.to_ports));
    let mut names: Vec<(u32, RuleRef)> = views
        .iter()
        .filter_map(|v| v.l4.as_ref())
        .chain(http.iter().map(|(_, r, _)| *r))
        .filter_map(|r| Some((order(r), rule_ref(r)?)))
        .collect();
    names.sort_by_key(|(o, _)| *o);
    names.dedup_by_key(|(o, _)| *o);
    let any_l4 = views.iter().any(|v| v.l4.is_some());
    let mut specs: Vec<HttpRuleSpec> = Vec::new();
    let mut origins: Vec<HttpOrigin> = Vec::new();
    if !any_l4 {
        for (_, r, l7) in &http {
            let Some(rule) = rule_ref(r) else { continue };
            for (i, spec) in l7.http.iter().enumerate() {
                if specs.contains(spec) {
                    continue;
                }
                specs.push(spec.clone());
                origins.push(HttpOrigin {
                    rule: rule.clone(),
                    to_ports: l7.to_ports,
                    http: i,
                });
            }
        }
    }
    let entry = MapEntry {
        direction,
        identity,
        proto,
        port,
        port_prefix_len: len,
        verdict: Verdict::Allow,
        rule: order(&rule),
        proxy: true,
    };
    let l7 = ResolvedL7 {
        policy: if any_l4 {
            L7Policy::AllowAll
        } else {
            L7Policy::Http(specs)
        },
        origins,
        rules: names.into_iter().map(|(_, r)| r).collect(),
    };
    Some((entry, rule, l7))
}

/// The keys that may hold a proxied entry: every key with HTTP claims, and
/// for each one of identity 0, the same port in every other group of its
/// direction (`next_key(after)`: the first key at or after `after`).
pub(crate) fn l7_positions(
    http_keys: impl Iterator<Item = Key>,
    next_key: &dyn Fn(Key) -> Option<Key>,
) -> BTreeSet<Key> {
    let mut out = BTreeSet::new();
    for key in http_keys {
        out.insert(key);
        let (direction, identity, proto, port, len) = key;
        if identity != 0 {
            continue;
        }
        let mut at = (direction, 1, 0, 0, 0);
        while let Some(k) = next_key(at) {
            if k.0 != direction {
                break;
            }
            out.insert((direction, k.1, proto, port, len));
            match k.1.checked_add(1) {
                Some(next) => at = (direction, next, 0, 0, 0),
                None => break,
            }
        }
    }
    out
}

/// The proxied entries of a resolution from its candidates and HTTP claims
/// (global rule indexes).
fn l7_overlay(
    http: &HttpClaims,
    candidates: impl Fn(&Key) -> Option<Candidates>,
    next_key: impl Fn(Key) -> Option<Key>,
    rule_ref: impl Fn(&u32) -> Option<RuleRef>,
) -> Vec<(MapEntry, ResolvedL7)> {
    if http.is_empty() {
        return Vec::new();
    }
    let view = |k: &Key| -> Option<L7View<u32>> {
        let c = candidates(k)?;
        Some(L7View {
            deny: c.deny.is_some(),
            allow: c.allow,
            l4: c.l4,
            http: http.get(k).cloned().unwrap_or_default(),
        })
    };
    l7_positions(http.keys().copied(), &next_key)
        .into_iter()
        .filter_map(|key| l7_entry(key, &view, &|r| *r, &rule_ref))
        .map(|(entry, _, l7)| (entry, l7))
        .collect()
}

/// Puts the proxied entries into a resolution (replacing the L4 entry of the
/// same key, if any) and its L7 table.
fn apply_overlay(out: &mut ResolvedPolicy, overlay: Vec<(MapEntry, ResolvedL7)>) {
    for (entry, l7) in overlay {
        match out
            .entries
            .binary_search_by_key(&entry.key(), MapEntry::key)
        {
            Ok(at) => out.entries[at] = entry,
            Err(at) => out.entries.insert(at, entry),
        }
        out.l7.insert(entry.key(), l7);
    }
}

/// [`l7_overlay`] and [`apply_overlay`] for the incremental merge.
pub(crate) fn add_l7_overlay(
    out: &mut ResolvedPolicy,
    http: &HttpClaims,
    candidates: impl Fn(&Key) -> Option<Candidates>,
    next_key: impl Fn(Key) -> Option<Key>,
) {
    let rules = out.rules.clone();
    let overlay = l7_overlay(http, candidates, next_key, |r| {
        rules.get(*r as usize).cloned()
    });
    apply_overlay(out, overlay);
}

/// The map entry a key's candidates leave once its ancestors are known
/// (`covered`: an ancestor holds a deny / an allow): a deny unless an
/// ancestor already denies; an allow unless an ancestor already decides.
/// That is what makes a longest-prefix match equal to "deny wins".
pub(crate) fn normalized_entry(
    key: Key,
    c: &Candidates,
    (ancestor_deny, ancestor_allow): (bool, bool),
) -> Option<MapEntry> {
    let (direction, identity, proto, port, len) = key;
    let entry = |verdict, rule| MapEntry {
        direction,
        identity,
        proto,
        port,
        port_prefix_len: len,
        verdict,
        rule,
        proxy: false,
    };
    match normalized_verdict(
        (c.deny.is_some(), c.allow.is_some()),
        (ancestor_deny, ancestor_allow),
    )? {
        Verdict::Deny => c.deny.map(|rule| entry(Verdict::Deny, rule)),
        Verdict::Allow => c.allow.map(|rule| entry(Verdict::Allow, rule)),
    }
}

/// The verdict a key keeps in the map, from whether it has a deny / an allow
/// candidate and whether an ancestor has one (see [`normalized_entry`]); shared
/// with the incremental merge so both encode deny-over-allow the same way.
pub(crate) fn normalized_verdict(
    (deny, allow): (bool, bool),
    (ancestor_deny, ancestor_allow): (bool, bool),
) -> Option<Verdict> {
    if deny {
        (!ancestor_deny).then_some(Verdict::Deny)
    } else {
        (allow && !ancestor_deny && !ancestor_allow).then_some(Verdict::Allow)
    }
}

/// Above this many shorter prefixes in one (direction, identity) group, a key's
/// ancestors are looked up in the map instead of scanning the group's list.
pub(crate) const SHORT_SCAN_LIMIT: usize = 32;

/// The normalized entries (see [`normalized_entry`]) of sorted candidate keys,
/// in key order, for longest-prefix-match evaluation.
///
/// A key's ancestors are the shorter prefixes of its own (direction, identity)
/// group — `(0, 0, 0)` or a prefix shorter than 16 bits — and sort before it,
/// so one pass that remembers the group's shorter prefixes seen so far (in key
/// order) finds them; most groups have none (exact ports only), which makes
/// the pass linear instead of one map lookup per possible ancestor.
pub(crate) fn normalize(keys: impl IntoIterator<Item = (Key, Candidates)>) -> Vec<MapEntry> {
    let keys = keys.into_iter();
    let (at_least, at_most) = keys.size_hint();
    let mut entries = Vec::with_capacity(at_most.unwrap_or(at_least));
    // The current group, and its keys so far that can be an ancestor.
    let mut group = None;
    let mut short: Vec<(Key, Candidates)> = Vec::new();
    for (key, c) in keys {
        let (direction, identity, proto, _, len) = key;
        if group != Some((direction, identity)) {
            group = Some((direction, identity));
            short.clear();
        }
        let covered = if short.is_empty() {
            (false, false)
        } else if short.len() > SHORT_SCAN_LIMIT {
            ancestors(key)
                .into_iter()
                .filter_map(|anc| short.binary_search_by_key(&anc, |(k, _)| *k).ok())
                .fold((false, false), |(d, a), i| {
                    (
                        d || short[i].1.deny.is_some(),
                        a || short[i].1.allow.is_some(),
                    )
                })
        } else {
            short
                .iter()
                .filter(|(anc, _)| is_ancestor(*anc, key))
                .fold((false, false), |(d, a), (_, anc)| {
                    (d || anc.deny.is_some(), a || anc.allow.is_some())
                })
        };
        entries.extend(normalized_entry(key, &c, covered));
        if proto == 0 || len < 16 {
            short.push((key, c));
        }
    }
    entries
}

/// Whether `anc` is one of [`ancestors`]`(key)`.
pub(crate) fn is_ancestor(anc: Key, key: Key) -> bool {
    let (direction, identity, proto, port, len) = key;
    if proto == 0 || anc.0 != direction || anc.1 != identity {
        return false;
    }
    match anc {
        (_, _, 0, 0, 0) => true,
        (_, _, p, anc_port, l) => p == proto && l < len && port & prefix_mask(l) == anc_port,
    }
}

/// Strictly shorter prefixes of the same (direction, identity) group that cover `key`.
pub(crate) fn ancestors(key: Key) -> Vec<Key> {
    let (direction, identity, proto, port, len) = key;
    if proto == 0 {
        return Vec::new();
    }
    let mut out = vec![(direction, identity, 0, 0, 0)];
    for l in 0..len {
        out.push((direction, identity, proto, port & prefix_mask(l), l));
    }
    out
}

/// All CIDR prefixes (CIDRs and their `except` prefixes) the given policies need
/// identities for.
pub fn cidr_prefixes<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for rule in policies.into_iter().flat_map(|p| &p.rules) {
        for pr in rule
            .ingress
            .iter()
            .chain(&rule.ingress_deny)
            .chain(&rule.egress)
            .chain(&rule.egress_deny)
        {
            for peer in &pr.peers {
                if let Peer::Cidr { cidr, except } = peer {
                    out.insert(*cidr);
                    out.extend(except.iter().copied());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{log_claim, LogClaim, KIND_SHIFT, RULE_MASK};

    /// A large resolution holds its claim log and a sort buffer of the same
    /// size at once: 12 bytes a claim.
    #[test]
    fn a_claim_stays_twelve_bytes_and_keeps_its_rule_and_kind() {
        assert_eq!(std::mem::size_of::<LogClaim>(), 12);
        for (deny, l4, kind) in [(true, true, 0), (false, false, 1), (false, true, 2)] {
            for rule in [0, 1, 99_999, RULE_MASK] {
                let c = log_claim(7, deny, l4, rule);
                let rule_kind = c.rule_kind;
                assert_eq!(
                    (rule_kind & RULE_MASK, rule_kind >> KIND_SHIFT),
                    (rule, kind)
                );
            }
        }
    }
}
