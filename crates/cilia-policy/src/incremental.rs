//! Incremental resolution: what [`crate::resolve`] computes, kept per policy, so that
//! a change costs the policies and identities it changes, not the whole policy set.
//!
//! A *contribution* is what one policy adds to the resolution of the endpoints its
//! rules select: the enforcement flags, its rule references and its candidate map keys
//! (the first allow and the first deny rule of the policy for each key). It depends only
//! on the policy, on which of its rules select the subject and on the identities its
//! peers select, so it is kept by (policy key, selecting rules) and shared by every
//! endpoint those same rules select.
//!
//! The *selector cache* remembers the identities each peer (endpoint selector, CIDR,
//! entity) of a kept contribution selects. When identities appear or disappear, only
//! the peers that may see them are evaluated again (a CIDR identity is looked up among
//! the CIDR peers that contain it, never against every peer), and only contributions
//! using a peer whose identities changed are dropped, to be recomputed when asked for.
//!
//! Nothing here walks what an import leaves alone: which rules select a subject is
//! decided per *subject group* (a policy's rules sharing one selector, usually all
//! of them), not per rule; a label change looks at the selector and entity peers
//! only, never the (many) CIDR peers; and [`PolicyRepository::change_identities`]
//! takes the identities that changed, where [`PolicyRepository::set_identities`]
//! has to compare every identity to find them. Merging follows the change too:
//! see [`crate::MergedPolicy`].
//!
//! Invariant: for every subject, [`PolicyRepository::resolve`] returns exactly what
//! [`crate::resolve`] returns for the same policies in key order and the same
//! identities. It holds because resolution is a first-wins merge in policy order:
//! contributions are merged in key order with their rule indexes offset by the rules
//! before them, a key keeps the first allow and the first deny rule seen, and the
//! normalization for longest-prefix match runs on the merged keys as in `resolve`. (A
//! rule identical to an earlier one in another policy is expanded again here; being
//! later, it never wins a key, so skipping it, as `resolve` does, changes nothing.)

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{Entity, Peer};
use crate::named::NamedPorts;
use crate::resolve::{
    add_candidates, add_l7_overlay, for_each_peer_rule, normalize, peer_identities, Candidates,
    Expanded, HttpClaim, HttpClaims, Key, NamedCtx,
};
use crate::{Direction, IdentityCache, IdentityId, Labels, Policy, ResolvedPolicy, RuleRef};

/// Identifies a computed contribution; a recomputation gets a new one.
pub(crate) type ContributionId = u64;

/// What a subject's resolution was merged from: the contributions, in policy order. Two
/// equal bases give equal resolutions, so an endpoint whose basis did not change needs
/// neither a merge nor a map write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Basis(pub(crate) Vec<ContributionId>);

/// One policy's part of a resolution (see the module docs). Shared (`Arc`) with the
/// merged policies built from it, which need it to take it out again after the
/// repository dropped it.
#[derive(Debug)]
pub(crate) struct Contribution {
    /// The policy's key: contributions merge in key order.
    pub(crate) policy: Arc<str>,
    /// Indexes of the policy's subject groups (see [`SubjectGroup`]) that select.
    groups: Vec<u32>,
    /// The subject's port names that the groups' ingress rules use: a
    /// contribution is shared by subjects agreeing on these.
    subject_ports: NamedPorts,
    /// The port names the egress rules use: they resolve against the peer
    /// identities' port names, so a change of those drops the contribution.
    egress_names: Vec<Arc<str>>,
    pub(crate) ingress_enforced: bool,
    pub(crate) egress_enforced: bool,
    pub(crate) rules: Vec<RuleRef>,
    /// Sorted by key; rule indexes into `rules`.
    pub(crate) keys: Vec<(Key, Candidates)>,
    /// The HTTP rules claimed per key (a few keys, if any); sorted by key.
    pub(crate) http: Vec<(Key, Vec<HttpClaim>)>,
    /// Distinct peers whose identities the keys were expanded from.
    peers: Vec<Peer>,
}

/// The identities of one peer, and the contributions that used them.
#[derive(Debug)]
struct PeerEntry {
    ids: BTreeSet<IdentityId>,
    users: HashSet<ContributionId>,
}

/// The rules of one policy that share a subject selector. Policies are usually
/// written with one `endpointSelector` for many rules, so finding which rules
/// select an endpoint costs a match per group, not per rule.
#[derive(Debug)]
struct SubjectGroup {
    subject: Arc<crate::labels::Selector>,
    rules: Vec<usize>,
    /// Port names of the rules' ingress sections (resolved against the subject).
    ingress_names: BTreeSet<Arc<str>>,
}

fn subject_groups(policy: &Policy) -> Vec<SubjectGroup> {
    let mut groups: Vec<SubjectGroup> = Vec::new();
    let mut index: HashMap<&crate::labels::Selector, usize> = HashMap::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        let g = *index.entry(&rule.subject).or_insert_with(|| {
            groups.push(SubjectGroup {
                subject: rule.subject.clone(),
                rules: Vec::new(),
                ingress_names: BTreeSet::new(),
            });
            groups.len() - 1
        });
        groups[g].rules.push(i);
        let names = rule
            .ingress
            .iter()
            .chain(&rule.ingress_deny)
            .flat_map(|pr| &pr.named)
            .map(|n| n.name.clone());
        groups[g].ingress_names.extend(names);
    }
    groups
}

/// A policy selecting a subject: its key, the policy, the selecting subject
/// groups and the subject's port names their ingress rules use.
type Selecting = (Arc<str>, Arc<Policy>, Vec<u32>, NamedPorts);

/// Peer → identities, for the peers of kept contributions.
#[derive(Debug, Default)]
struct SelectorCache {
    peers: HashMap<Peer, PeerEntry>,
    /// The selector and entity peers: the ones a label change may concern. Kept
    /// apart so that a change does not walk the (many) CIDR peers to find them.
    label_peers: HashSet<Peer>,
    /// CIDR peers by their CIDR, and the prefix lengths in use per family (true:
    /// IPv6): a changed CIDR identity concerns only the peers whose CIDR contains it.
    cidr_peers: HashMap<IpNet, HashSet<Peer>>,
    cidr_lens: BTreeMap<(bool, u8), usize>,
}

impl SelectorCache {
    /// The identities of `peer` (computed on first use), recording `user`.
    fn use_peer(
        &mut self,
        peer: &Peer,
        cache: &IdentityCache,
        user: ContributionId,
    ) -> &BTreeSet<IdentityId> {
        if !self.peers.contains_key(peer) {
            if let Peer::Cidr { cidr, .. } = peer {
                // Keyed by network address: the lookup truncates too.
                self.cidr_peers
                    .entry(cidr.trunc())
                    .or_default()
                    .insert(peer.clone());
                *self.cidr_lens.entry(family_len(cidr)).or_default() += 1;
            } else {
                self.label_peers.insert(peer.clone());
            }
            let ids = peer_identities(peer, cache);
            self.peers.insert(
                peer.clone(),
                PeerEntry {
                    ids,
                    users: HashSet::new(),
                },
            );
        }
        let entry = self
            .peers
            .get_mut(peer)
            .unwrap_or_else(|| unreachable!("inserted above"));
        entry.users.insert(user);
        &entry.ids
    }

    /// Forgets `user` of `peer`, and the peer once nobody uses it.
    fn release(&mut self, peer: &Peer, user: ContributionId) {
        let Some(entry) = self.peers.get_mut(peer) else {
            return;
        };
        entry.users.remove(&user);
        if !entry.users.is_empty() {
            return;
        }
        self.peers.remove(peer);
        self.label_peers.remove(peer);
        if let Peer::Cidr { cidr, .. } = peer {
            let key = cidr.trunc();
            if let Some(set) = self.cidr_peers.get_mut(&key) {
                set.remove(peer);
                if set.is_empty() {
                    self.cidr_peers.remove(&key);
                }
            }
            let len = family_len(cidr);
            if let Some(n) = self.cidr_lens.get_mut(&len) {
                *n -= 1;
                if *n == 0 {
                    self.cidr_lens.remove(&len);
                }
            }
        }
    }

    /// The cached CIDR peers whose CIDR contains `prefix`.
    fn cidr_peers_containing<'a>(&'a self, prefix: &IpNet, out: &mut HashSet<&'a Peer>) {
        let v6 = matches!(prefix, IpNet::V6(_));
        for ((_, len), _) in self.cidr_lens.range((v6, 0)..=(v6, prefix.prefix_len())) {
            let Ok(covering) = IpNet::new(prefix.addr(), *len) else {
                continue;
            };
            if let Some(peers) = self.cidr_peers.get(&covering.trunc()) {
                out.extend(peers);
            }
        }
    }
}

fn family_len(net: &IpNet) -> (bool, u8) {
    (matches!(net, IpNet::V6(_)), net.prefix_len())
}

/// The policy set and identities of a node, with the per-policy contributions and the
/// selector cache that make re-resolving after a change cheap. Pure: no I/O.
#[derive(Debug, Default)]
pub struct PolicyRepository {
    policies: BTreeMap<Arc<str>, Arc<Policy>>,
    identities: IdentityCache,
    /// Each policy's rules grouped by subject selector, by policy key.
    groups: HashMap<Arc<str>, Vec<SubjectGroup>>,
    selectors: SelectorCache,
    contributions: HashMap<ContributionId, Arc<Contribution>>,
    /// (policy key, selecting subject groups, the subject's port names
    /// their ingress rules use) → contribution.
    by_rules: HashMap<(Arc<str>, Vec<u32>, NamedPorts), ContributionId>,
    /// Port name → the contributions whose egress rules use it.
    by_egress_name: HashMap<Arc<str>, HashSet<ContributionId>>,
    by_policy: HashMap<Arc<str>, Vec<ContributionId>>,
    next_id: ContributionId,
}

impl PolicyRepository {
    /// An empty repository: no policies, no identities.
    pub fn new() -> Self {
        Self::default()
    }

    /// The identities resolution selects from.
    pub fn identities(&self) -> &IdentityCache {
        &self.identities
    }

    /// A kept contribution, shared with the merged policies that use it.
    pub(crate) fn contribution(&self, id: ContributionId) -> Option<Arc<Contribution>> {
        self.contributions.get(&id).cloned()
    }

    /// How many contributions are kept (for tests and metrics).
    pub fn contributions(&self) -> usize {
        self.contributions.len()
    }

    /// Makes `policies` (key → policy; key order is resolution order) the policy set.
    /// A policy under an unchanged key that is the same (`Arc`) or equal keeps its
    /// contributions; the others' are dropped.
    pub fn set_policies<'a>(
        &mut self,
        policies: impl IntoIterator<Item = (&'a str, &'a Arc<Policy>)>,
    ) {
        let mut next: BTreeMap<Arc<str>, Arc<Policy>> = BTreeMap::new();
        for (key, policy) in policies {
            let key: Arc<str> = match self.policies.get_key_value(key) {
                Some((k, old)) if Arc::ptr_eq(old, policy) || **old == **policy => {
                    next.insert(k.clone(), old.clone());
                    continue;
                }
                Some((k, _)) => k.clone(),
                None => Arc::from(key),
            };
            next.insert(key, policy.clone());
        }
        let gone: Vec<Arc<str>> = self
            .policies
            .iter()
            .filter(|(k, old)| next.get(*k).is_none_or(|new| !Arc::ptr_eq(old, new)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.groups.remove(&key);
            for id in self.by_policy.remove(&key).unwrap_or_default() {
                self.drop_contribution(id);
            }
        }
        for (key, policy) in &next {
            if !self.groups.contains_key(key) {
                self.groups.insert(key.clone(), subject_groups(policy));
            }
        }
        self.policies = next;
    }

    /// Makes `identities` the identities resolution selects from. Only peers that may
    /// see an identity that appeared, disappeared or changed are evaluated again, and
    /// only the contributions of peers whose identities changed are dropped.
    pub fn set_identities(&mut self, identities: IdentityCache) {
        let old = std::mem::replace(&mut self.identities, identities);
        let new = &self.identities;
        let mut changed_prefixes: Vec<IpNet> = Vec::new();
        let mut changed_cidr_ids: Vec<IdentityId> = Vec::new();
        diff_maps(old.cidrs_map(), new.cidrs_map(), |id, a, b| {
            changed_cidr_ids.push(id);
            changed_prefixes.extend(a.into_iter().chain(b).copied());
        });
        let labels_changed = old.labels_map() != new.labels_map()
            || changed_cidr_ids
                .iter()
                .any(|id| old.labels(*id).is_some() || new.labels(*id).is_some());
        let mut changed_names: BTreeSet<String> = BTreeSet::new();
        let empty = NamedPorts::new();
        diff_maps(old.named_ports_map(), new.named_ports_map(), |_, a, b| {
            changed_names.extend(a.unwrap_or(&empty).changed_names(b.unwrap_or(&empty)));
        });
        self.reselect(&changed_prefixes, labels_changed);
        self.drop_egress_names(&changed_names);
    }

    /// Changes the port names of some identities (see
    /// [`IdentityCache::set_named_ports`]; empty: none): the contributions
    /// whose egress rules use a name whose numbers changed are dropped.
    pub fn change_named_ports(
        &mut self,
        changes: impl IntoIterator<Item = (IdentityId, NamedPorts)>,
    ) {
        let mut changed_names: BTreeSet<String> = BTreeSet::new();
        for (id, ports) in changes {
            let new = ports.clone();
            let old = self.identities.set_named_ports(id, ports);
            changed_names.extend(old.changed_names(&new));
        }
        self.drop_egress_names(&changed_names);
    }

    fn drop_egress_names(&mut self, names: &BTreeSet<String>) {
        let stale: BTreeSet<ContributionId> = names
            .iter()
            .filter_map(|n| self.by_egress_name.get(n.as_str()))
            .flatten()
            .copied()
            .collect();
        for id in stale {
            self.drop_contribution(id);
        }
    }

    /// Changes some identities in place: each `(id, Some(labels))` adds or
    /// replaces a labelled identity, `(id, None)` removes it; the same for CIDR
    /// identities. The same as [`Self::set_identities`] with the changed cache, but
    /// costs the changes, not a comparison of every identity (a node with many
    /// CIDR identities gains or loses a few at a time).
    pub fn change_identities(
        &mut self,
        labels: impl IntoIterator<Item = (IdentityId, Option<Labels>)>,
        cidrs: impl IntoIterator<Item = (IdentityId, Option<IpNet>)>,
    ) {
        let mut labels_changed = false;
        for (id, new) in labels {
            labels_changed |= match new {
                Some(l) => self
                    .identities
                    .replace_labels(id, l.clone())
                    .is_none_or(|old| old != l),
                None => self.identities.remove_labels(id).is_some(),
            };
        }
        let mut changed_prefixes: Vec<IpNet> = Vec::new();
        for (id, new) in cidrs {
            let old = match new {
                Some(net) => self.identities.replace_cidr(id, net),
                None => self.identities.remove_cidr(id),
            };
            if old != new.map(|n| n.trunc()) {
                changed_prefixes.extend(old.into_iter().chain(new.map(|n| n.trunc())));
                labels_changed |= self.identities.labels(id).is_some();
            }
        }
        self.reselect(&changed_prefixes, labels_changed);
    }

    /// Evaluates again the peers that may see identities of `changed_prefixes` or
    /// (when `labels_changed`) of changed labels; drops the contributions of those
    /// whose identities changed.
    fn reselect(&mut self, changed_prefixes: &[IpNet], labels_changed: bool) {
        if !labels_changed && changed_prefixes.is_empty() {
            return;
        }
        let new = &self.identities;
        let mut candidates: HashSet<&Peer> = HashSet::new();
        for peer in &self.selectors.label_peers {
            let maybe = match peer {
                Peer::Any | Peer::Cidr { .. } => false,
                Peer::Selector(_) => labels_changed,
                Peer::Entity(Entity::World) => !changed_prefixes.is_empty(),
                // Cluster: every labelled identity that is not a CIDR one; a CIDR
                // identity on a labelled id counts as a label change.
                Peer::Entity(Entity::Cluster) => labels_changed,
                // Fixed reserved identities.
                Peer::Entity(_) => false,
            };
            if maybe {
                candidates.insert(peer);
            }
        }
        for prefix in changed_prefixes {
            self.selectors
                .cidr_peers_containing(prefix, &mut candidates);
        }
        let mut changed: Vec<(Peer, BTreeSet<IdentityId>)> = Vec::new();
        for peer in candidates {
            let ids = peer_identities(peer, new);
            if self.selectors.peers.get(peer).is_some_and(|e| e.ids != ids) {
                changed.push((peer.clone(), ids));
            }
        }
        let mut stale: BTreeSet<ContributionId> = BTreeSet::new();
        for (peer, ids) in changed {
            if let Some(entry) = self.selectors.peers.get_mut(&peer) {
                entry.ids = ids;
                stale.extend(entry.users.iter().copied());
            }
        }
        for id in stale {
            self.drop_contribution(id);
        }
    }

    /// What `subject`'s resolution is merged from, computing missing contributions.
    /// Costs a selector match per subject group of each policy, not one per rule.
    pub fn basis(&mut self, subject: &Labels) -> Basis {
        self.basis_with_ports(subject, &NamedPorts::new())
    }

    /// [`Self::basis`] of an endpoint declaring the port names `ports`
    /// (what its ingress rules' named ports resolve against).
    pub fn basis_with_ports(&mut self, subject: &Labels, ports: &NamedPorts) -> Basis {
        let selecting: Vec<Selecting> = self
            .policies
            .iter()
            .filter_map(|(key, policy)| {
                let groups = self.groups.get(key)?;
                let matched: Vec<u32> = groups
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| g.subject.matches(subject))
                    .filter_map(|(i, _)| u32::try_from(i).ok())
                    .collect();
                if matched.is_empty() {
                    return None;
                }
                let mut names: BTreeSet<Arc<str>> = BTreeSet::new();
                if !ports.is_empty() {
                    for g in &matched {
                        if let Some(g) = groups.get(*g as usize) {
                            names.extend(g.ingress_names.iter().cloned());
                        }
                    }
                }
                let relevant = if names.is_empty() {
                    NamedPorts::new()
                } else {
                    ports.restricted_to(&names)
                };
                Some((key.clone(), policy.clone(), matched, relevant))
            })
            .collect();
        let mut basis = Vec::with_capacity(selecting.len());
        for (key, policy, matched, relevant) in selecting {
            let lookup = (key, matched, relevant);
            let id = match self.by_rules.get(&lookup).copied() {
                Some(id) => id,
                None => {
                    let (key, matched, relevant) = lookup;
                    self.compute(key, &policy, matched, relevant)
                }
            };
            basis.push(id);
        }
        Basis(basis)
    }

    /// Resolves the policy of one endpoint, as [`crate::resolve`] does, from kept
    /// contributions; also returns its basis.
    pub fn resolve(&mut self, subject: &Labels) -> (ResolvedPolicy, Basis) {
        let basis = self.basis(subject);
        (self.merge(&basis), basis)
    }

    /// [`Self::resolve`] of an endpoint declaring the port names `ports`, as
    /// [`crate::resolve_with_ports`] does.
    pub fn resolve_with_ports(
        &mut self,
        subject: &Labels,
        ports: &NamedPorts,
    ) -> (ResolvedPolicy, Basis) {
        let basis = self.basis_with_ports(subject, ports);
        (self.merge(&basis), basis)
    }

    /// The resolution a basis (just returned by [`Self::basis`]) stands for.
    pub fn merge(&self, basis: &Basis) -> ResolvedPolicy {
        let mut out = ResolvedPolicy::default();
        let parts: Vec<&Contribution> = basis
            .0
            .iter()
            .filter_map(|id| self.contributions.get(id).map(|c| &**c))
            .collect();
        let mut merged: Vec<(Key, Candidates)> = Vec::new();
        let mut http: HttpClaims = BTreeMap::new();
        let with_keys = parts.iter().filter(|c| !c.keys.is_empty()).count();
        for c in &parts {
            let offset = u32::try_from(out.rules.len()).unwrap_or(u32::MAX);
            out.ingress_enforced |= c.ingress_enforced;
            out.egress_enforced |= c.egress_enforced;
            out.rules.extend(c.rules.iter().cloned());
            let shift = |r: Option<u32>| r.map(|r| r.saturating_add(offset));
            merged.extend(c.keys.iter().map(|(k, cand)| {
                (
                    *k,
                    Candidates {
                        allow: shift(cand.allow),
                        deny: shift(cand.deny),
                        l4: shift(cand.l4),
                    },
                )
            }));
            for (k, claims) in &c.http {
                http.entry(*k).or_default().extend(
                    claims
                        .iter()
                        .map(|(r, l7)| (r.saturating_add(offset), l7.clone())),
                );
            }
        }
        if with_keys > 1 {
            // Stable: among equal keys, earlier policies stay first.
            merged.sort_by_key(|(k, _)| *k);
            merged.dedup_by(|later, first| {
                if later.0 != first.0 {
                    return false;
                }
                first.1.allow = first.1.allow.or(later.1.allow);
                first.1.deny = first.1.deny.or(later.1.deny);
                first.1.l4 = first.1.l4.or(later.1.l4);
                true
            });
        }
        out.entries = normalize(merged.iter().copied());
        let at = |k: &Key| merged.partition_point(|(m, _)| m < k);
        add_l7_overlay(
            &mut out,
            &http,
            |k| merged.get(at(k)).filter(|(m, _)| m == k).map(|(_, c)| *c),
            |after| merged.get(at(&after)).map(|(k, _)| *k),
        );
        out
    }

    fn compute(
        &mut self,
        policy_key: Arc<str>,
        policy: &Policy,
        groups: Vec<u32>,
        subject_ports: NamedPorts,
    ) -> ContributionId {
        let id = self.next_id;
        self.next_id += 1;
        let policy_name: Arc<str> = policy.qualified_name().into();
        // Rule order decides which rule wins a key: the groups' rules, merged.
        let mut rules: Vec<usize> = self
            .groups
            .get(&policy_key)
            .map(|all| {
                groups
                    .iter()
                    .filter_map(|g| all.get(*g as usize))
                    .flat_map(|g| g.rules.iter().copied())
                    .collect()
            })
            .unwrap_or_default();
        rules.sort_unstable();
        let mut c = Contribution {
            policy: policy_key.clone(),
            groups: groups.clone(),
            subject_ports: NamedPorts::new(),
            egress_names: Vec::new(),
            ingress_enforced: false,
            egress_enforced: false,
            rules: Vec::new(),
            keys: Vec::new(),
            http: Vec::new(),
            peers: Vec::new(),
        };
        let mut keys: BTreeMap<Key, Candidates> = BTreeMap::new();
        let mut http: HttpClaims = BTreeMap::new();
        let mut expanded = Expanded::default();
        let mut used: HashSet<&Peer> = HashSet::new();
        let mut egress_names: BTreeSet<Arc<str>> = BTreeSet::new();
        for &ri in &rules {
            let Some(rule) = policy.rules.get(ri) else {
                continue;
            };
            c.ingress_enforced |= rule.enforce_ingress;
            c.egress_enforced |= rule.enforce_egress;
            for_each_peer_rule(
                &mut c.rules,
                &mut expanded,
                (policy, &policy_name),
                rule,
                |direction, deny, pr, rule_idx| {
                    if direction == Direction::Egress {
                        egress_names.extend(pr.named.iter().map(|n| n.name.clone()));
                    }
                    let ids: Vec<IdentityId> = if pr.peers.contains(&Peer::Any) {
                        vec![0]
                    } else {
                        let mut set = BTreeSet::new();
                        for peer in &pr.peers {
                            set.extend(self.selectors.use_peer(peer, &self.identities, id));
                            used.insert(peer);
                        }
                        set.into_iter().collect()
                    };
                    let named = NamedCtx {
                        subject: &subject_ports,
                        identities: &self.identities,
                    };
                    add_candidates(
                        &mut keys, &mut http, direction, deny, &ids, pr, rule_idx, named,
                    );
                },
            );
        }
        c.keys = keys.into_iter().collect();
        c.http = http.into_iter().collect();
        c.peers = used.into_iter().cloned().collect();
        for name in &egress_names {
            self.by_egress_name
                .entry(name.clone())
                .or_default()
                .insert(id);
        }
        c.egress_names = egress_names.into_iter().collect();
        c.subject_ports = subject_ports.clone();
        self.by_rules
            .insert((policy_key.clone(), groups, subject_ports), id);
        self.by_policy.entry(policy_key).or_default().push(id);
        self.contributions.insert(id, Arc::new(c));
        id
    }

    fn drop_contribution(&mut self, id: ContributionId) {
        let Some(c) = self.contributions.remove(&id) else {
            return;
        };
        for peer in &c.peers {
            self.selectors.release(peer, id);
        }
        self.by_rules
            .remove(&(c.policy.clone(), c.groups.clone(), c.subject_ports.clone()));
        for name in &c.egress_names {
            if let Some(ids) = self.by_egress_name.get_mut(name) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_egress_name.remove(name);
                }
            }
        }
        if let Some(ids) = self.by_policy.get_mut(&c.policy) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_policy.remove(&c.policy);
            }
        }
    }
}

/// Calls `f(id, old, new)` for every id whose value differs between two sorted maps.
fn diff_maps<V: PartialEq>(
    old: &BTreeMap<IdentityId, V>,
    new: &BTreeMap<IdentityId, V>,
    mut f: impl FnMut(IdentityId, Option<&V>, Option<&V>),
) {
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, va)), Some((kb, vb))) if ka == kb => {
                if va != vb {
                    f(**ka, Some(va), Some(vb));
                }
                a.next();
                b.next();
            }
            (Some((ka, va)), Some((kb, _))) if ka < kb => {
                f(**ka, Some(va), None);
                a.next();
            }
            (Some((ka, va)), None) => {
                f(**ka, Some(va), None);
                a.next();
            }
            (_, Some((kb, vb))) => {
                f(**kb, None, Some(vb));
                b.next();
            }
        }
    }
}
