//! Incremental merge: an endpoint's merged policy that moves from one [`Basis`] to
//! the next by taking out the contributions that left and putting in the ones that
//! arrived, and says which map entries that changed.
//!
//! Why: [`PolicyRepository::merge`] rebuilds the whole resolution, so an endpoint
//! selected by many policies pays for all of them on every change, and its caller
//! then has to encode and compare every entry to find the few that moved. Here the
//! cost of a change is the keys of the contributions that changed (plus, where a key
//! starts or stops holding a deny or an allow, the longer prefixes under it), not the
//! endpoint's total entries.
//!
//! Invariant: after [`PolicyRepository::update_merged`] with a basis just returned
//! by [`PolicyRepository::basis`], [`MergedPolicy::resolved`] equals
//! [`PolicyRepository::merge`] of that basis, and applying each returned
//! [`PolicyDelta`] in turn to an empty map gives exactly its entries. It holds
//! because each key keeps every contribution's claim on it (its first allow and
//! first deny rule there) sorted by policy key, which is the merge order: the first
//! claim is the one `merge` keeps, and the map entry follows from the first claims
//! and the ancestors' claims by the same rule ([`normalized_verdict`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use smallvec::SmallVec;

use crate::incremental::{Basis, Contribution, ContributionId, PolicyRepository};
use crate::l7::ResolvedL7;
use crate::resolve::{
    ancestors, is_ancestor, l7_entry, l7_positions, normalized_verdict, Candidates, Key, L7View,
    SHORT_SCAN_LIMIT,
};
use crate::{Direction, EntryKey, MapEntry, ResolvedPolicy, RuleRef, Verdict};

/// One contribution's claim on a key: its first allow or first deny rule there.
#[derive(Debug, Clone)]
struct Claim {
    part: Arc<Contribution>,
    /// Index into `part.rules`.
    rule: u32,
    deny: bool,
}

impl Claim {
    fn rule_ref(&self) -> Option<&RuleRef> {
        self.part.rules.get(self.rule as usize)
    }
}

/// A key's map entry, if it has one: its verdict and the claim that decided it.
type Decided = Option<(Verdict, Claim)>;

/// Merged contributions by id, in basis order.
type Parts = Vec<(ContributionId, Arc<Contribution>)>;

/// A key's presence (deny, allow) and entry before an update changed it.
type Recorded = (Key, (bool, bool), Decided);

/// What one key of the merged policy is claimed by, and the entry it has in the map.
///
/// Kept small (32 bytes, no allocation for a key one contribution claims, as
/// most are): the agent keeps a merged policy per endpoint, and a large CIDR
/// policy gives each endpoint tens of thousands of keys.
#[derive(Debug, Default)]
struct KeyState {
    /// Allow and deny claims, sorted by policy key: the first of each kind wins.
    claims: SmallVec<[Claim; 1]>,
    /// The verdict of the key's entry in the L3/L4 merge (before the L7
    /// overlay), if it has one; its claim is the first one of that kind.
    verdict: Option<Verdict>,
    /// The last update that recorded this key's state before changing it.
    seen: u32,
}

impl KeyState {
    /// (has a deny, has an allow): what longer prefixes under the key look at.
    fn presence(&self) -> (bool, bool) {
        let deny = self.claims.iter().any(|c| c.deny);
        let allow = self.claims.iter().any(|c| !c.deny);
        (deny, allow)
    }

    /// The first claim of one kind: the one a merge keeps.
    fn first(&self, deny: bool) -> Option<&Claim> {
        self.claims.iter().find(|c| c.deny == deny)
    }

    fn allows(&self) -> impl Iterator<Item = &Claim> {
        self.claims.iter().filter(|c| !c.deny)
    }

    /// The key's L3/L4 entry: its verdict and the claim that decided it.
    fn entry(&self) -> Decided {
        self.entry_ref().map(|(v, c)| (v, c.clone()))
    }

    /// [`Self::entry`] without cloning the claim (an atomic increment and
    /// decrement of its contribution's count, per entry of a whole map).
    fn entry_ref(&self) -> Option<(Verdict, &Claim)> {
        let verdict = self.verdict?;
        Some((verdict, self.first(verdict == Verdict::Deny)?))
    }

    /// Sets the entry from the verdict `normalized_verdict` gives.
    fn decide(&mut self, verdict: Option<Verdict>) {
        self.verdict = verdict.filter(|v| self.first(*v == Verdict::Deny).is_some());
    }
}

/// An endpoint's merged policy, kept between changes (see the module docs). Start
/// from [`MergedPolicy::default`] (empty: no entries, nothing enforced) and move it
/// with [`PolicyRepository::update_merged`].
#[derive(Debug, Default)]
pub struct MergedPolicy {
    basis: Basis,
    /// The contributions merged, in basis (policy key) order.
    parts: Parts,
    ingress: usize,
    egress: usize,
    keys: BTreeMap<Key, KeyState>,
    /// The L7 side (boxed: most endpoints have none, and the agent keeps a
    /// merged policy per endpoint).
    l7: Box<L7State>,
    /// Map entries, proxied ones included.
    entries: usize,
    /// Counts updates: marks the keys an update already recorded, so recording
    /// costs no hashing.
    generation: u32,
    /// The basis and contributions before the last update, for
    /// [`MergedPolicy::revert_update`].
    previous: Option<(Basis, Parts)>,
}

/// The L7 side of a merged policy.
#[derive(Debug, Default)]
struct L7State {
    /// Keys with HTTP claims (how many contributions claim HTTP rules
    /// there): where proxied entries start. The claims themselves stay in the
    /// contributions, read only when the proxied entries are derived.
    http_keys: BTreeMap<Key, usize>,
    /// The proxied entries (see `resolve::l7_entry`), which replace or add to
    /// the L3/L4 entries: the rule that decides each, and its L7 policy.
    overlay: BTreeMap<Key, (Claim, ResolvedL7)>,
}

/// A map entry of a merged policy with the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedEntry {
    /// The entry; its `rule` is the index in [`MergedPolicy::resolved`]'s rules at
    /// the time (indexes shift as policies come and go: name rules by `rule_ref`).
    pub entry: MapEntry,
    /// The rule that decided the entry.
    pub rule_ref: RuleRef,
}

/// What a move of a [`MergedPolicy`] to a new basis changed in its map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDelta {
    /// The new ingress default-deny state, when it changed.
    pub ingress_enforced: Option<bool>,
    /// The new egress default-deny state, when it changed.
    pub egress_enforced: Option<bool>,
    /// Entries that are new, or whose verdict or deciding rule changed; sorted by key.
    pub upserted: Vec<MergedEntry>,
    /// Entries that left the map, as they were (rule index `u32::MAX` when the
    /// deciding policy left too); sorted by key.
    pub removed: Vec<MergedEntry>,
    /// Whether the L7 policies of the proxied entries changed (what the
    /// proxy must be told; see [`MergedPolicy::l7_entries`]). A change of an
    /// entry's `proxy` flag is an upsert.
    pub l7_changed: bool,
}

impl PolicyDelta {
    /// Whether the map and the enforcement state stay as they were.
    pub fn is_empty(&self) -> bool {
        self.ingress_enforced.is_none()
            && self.egress_enforced.is_none()
            && self.upserted.is_empty()
            && self.removed.is_empty()
            && !self.l7_changed
    }
}

impl MergedPolicy {
    /// An empty merged policy: what an endpoint has before its first update.
    pub fn new() -> Self {
        Self::default()
    }

    /// The basis this merged policy stands for.
    pub fn basis(&self) -> &Basis {
        &self.basis
    }

    /// Whether the given direction is in default-deny mode.
    pub fn enforced(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress > 0,
            Direction::Egress => self.egress > 0,
        }
    }

    /// How many map entries the policy has (enforcement markers not counted).
    pub fn entry_count(&self) -> usize {
        self.entries
    }

    /// The whole resolution, as [`PolicyRepository::merge`] gives it for the same
    /// basis. Costs every entry: for traces and first programming, not per change.
    pub fn resolved(&self) -> ResolvedPolicy {
        let offsets = self.offsets();
        let mut out = ResolvedPolicy {
            ingress_enforced: self.ingress > 0,
            egress_enforced: self.egress > 0,
            entries: Vec::with_capacity(self.entries),
            rules: self
                .parts
                .iter()
                .flat_map(|(_, c)| c.rules.iter().cloned())
                .collect(),
            l7: self
                .l7
                .overlay
                .iter()
                .map(|(k, (_, l7))| (*k, l7.clone()))
                .collect(),
        };
        for (key, state) in &self.keys {
            if self.l7.overlay.contains_key(key) {
                continue;
            }
            if let Some((verdict, claim)) = state.entry_ref() {
                out.entries.push(map_entry(
                    *key,
                    verdict,
                    global_rule(&offsets, claim),
                    false,
                ));
            }
        }
        for (key, (claim, _)) in &self.l7.overlay {
            let entry = map_entry(*key, Verdict::Allow, global_rule(&offsets, claim), true);
            let at = out.entries.partition_point(|e| e.key() < *key);
            out.entries.insert(at, entry);
        }
        out
    }

    /// Every proxied entry with its L7 policy (as in
    /// [`ResolvedPolicy::l7_entries`]): what the agent hands to the proxy.
    pub fn l7_entries(&self) -> impl Iterator<Item = (EntryKey, &ResolvedL7)> {
        self.l7.overlay.iter().map(|(k, (_, l7))| (*k, l7))
    }

    /// The proxied entries of the current claims (see `resolve::l7_entry`).
    fn compute_overlay(&self, offsets: &Offsets) -> BTreeMap<Key, (Claim, ResolvedL7)> {
        if self.l7.http_keys.is_empty() {
            return BTreeMap::new();
        }
        // Every contribution with an L4-only allow or HTTP rules on a key has
        // an allow claim there: the key's allow claims, in policy order, lead
        // to them.
        let view = |k: &Key| -> Option<L7View<Claim>> {
            let s = self.keys.get(k)?;
            let mut l4 = None;
            let mut http = Vec::new();
            for claim in s.allows() {
                let part = &claim.part;
                if l4.is_none() {
                    l4 = part
                        .keys
                        .binary_search_by_key(k, |(key, _)| *key)
                        .ok()
                        .and_then(|at| part.keys[at].1.l4)
                        .map(|rule| Claim {
                            part: part.clone(),
                            rule,
                            deny: false,
                        });
                }
                if let Ok(at) = part.http.binary_search_by_key(k, |(key, _)| *key) {
                    http.extend(part.http[at].1.iter().map(|(rule, l7)| {
                        (
                            Claim {
                                part: part.clone(),
                                rule: *rule,
                                deny: false,
                            },
                            l7.clone(),
                        )
                    }));
                }
            }
            Some(L7View {
                deny: s.presence().0,
                allow: s.first(false).cloned(),
                l4,
                http,
            })
        };
        let order = |c: &Claim| global_rule(offsets, c);
        let rule_ref = |c: &Claim| c.rule_ref().cloned();
        let next_key = |after: Key| self.keys.range(after..).next().map(|(k, _)| *k);
        l7_positions(self.l7.http_keys.keys().copied(), &next_key)
            .into_iter()
            .filter_map(|key| l7_entry(key, &view, &order, &rule_ref))
            .map(|(entry, claim, l7)| (entry.key(), (claim, l7)))
            .collect()
    }

    /// Index of each part's first rule in the merged rule list, by part address.
    fn offsets(&self) -> Offsets {
        let mut offsets = Vec::with_capacity(self.parts.len());
        let mut at: u32 = 0;
        for (_, c) in &self.parts {
            offsets.push((Arc::as_ptr(c), at));
            at = at.saturating_add(u32::try_from(c.rules.len()).unwrap_or(u32::MAX));
        }
        offsets.sort_unstable_by_key(|(p, _)| *p);
        Offsets(offsets)
    }

    /// Moves back to where the last [`PolicyRepository::update_merged`] started from
    /// (once; later calls do nothing) and returns what that changes in the map: the
    /// last delta undone. For a caller that updates endpoints while planning and
    /// gives up before writing them; it costs what the update cost, even when the
    /// repository has since dropped the contributions the policy had before.
    pub fn revert_update(&mut self) -> PolicyDelta {
        let Some((basis, parts)) = self.previous.take() else {
            return PolicyDelta::default();
        };
        let before: HashSet<ContributionId> = parts.iter().map(|(id, _)| *id).collect();
        let now: HashSet<ContributionId> = self.parts.iter().map(|(id, _)| *id).collect();
        let removed: Vec<Arc<Contribution>> = self
            .parts
            .iter()
            .filter(|(id, _)| !before.contains(id))
            .map(|(_, c)| c.clone())
            .collect();
        let added: Vec<Arc<Contribution>> = parts
            .iter()
            .filter(|(id, _)| !now.contains(id))
            .map(|(_, c)| c.clone())
            .collect();
        self.parts = parts;
        self.basis = basis;
        self.apply(&removed, &added)
    }

    /// Whether an ancestor of `key` holds a deny / an allow.
    fn covered(&self, key: Key) -> (bool, bool) {
        let (direction, identity, ..) = key;
        // Ancestors sort before the key within its (direction, identity) group,
        // and most groups (a CIDR identity's) hold one key: one range probe.
        if self
            .keys
            .range((direction, identity, 0, 0, 0)..key)
            .next()
            .is_none()
        {
            return (false, false);
        }
        ancestors(key)
            .into_iter()
            .filter_map(|a| self.keys.get(&a))
            .fold((false, false), |(d, a), s| {
                let (sd, sa) = s.presence();
                (d || sd, a || sa)
            })
    }

    /// The next update's generation. When the counter wraps, every key's mark is
    /// cleared first, so no key is taken as already recorded.
    fn next_generation(&mut self) -> u32 {
        if self.generation == u32::MAX {
            for state in self.keys.values_mut() {
                state.seen = 0;
            }
            self.generation = 0;
        }
        self.generation += 1;
        self.generation
    }

    /// Builds the whole state of a merged policy that holds nothing yet from
    /// `parts` (in basis order) at once.
    ///
    /// Why not [`Self::apply`]: it pays several ordered-map operations per key
    /// (insert, record, the flip check, the ancestor probe, the descendant range),
    /// which is what an endpoint's first programming paid for every key; with a
    /// large CIDR policy (44,595 keys) that was 80 ms. Here the contributions'
    /// sorted keys are merged in one sort (none for a single contribution), the
    /// entries follow in one pass over the sorted keys as in `resolve::normalize`,
    /// and the ordered map is built from sorted input.
    fn fill(&mut self, parts: Parts) {
        debug_assert!(self.parts.is_empty() && self.keys.is_empty());
        let generation = self.next_generation();
        for (_, c) in &parts {
            self.ingress += usize::from(c.ingress_enforced);
            self.egress += usize::from(c.egress_enforced);
            for (key, _) in &c.http {
                *self.l7.http_keys.entry(*key).or_default() += 1;
            }
        }
        // Every contribution's claims, in key order and, within a key, in basis
        // (policy key) order, the merge order: a stable sort of them all, or one
        // contribution's own sorted keys as they are.
        let claimed: usize = parts.iter().map(|(_, c)| c.keys.len()).sum();
        let with_keys = parts.iter().filter(|(_, c)| !c.keys.is_empty()).count();
        let claims: Box<dyn Iterator<Item = (Key, u32, Candidates)>> = if with_keys > 1 {
            let mut claims: Vec<(Key, u32, Candidates)> = Vec::with_capacity(claimed);
            claims.extend(parts.iter().enumerate().flat_map(part_claims));
            claims.sort_by_key(|(k, _, _)| *k);
            Box::new(claims.into_iter())
        } else {
            Box::new(parts.iter().enumerate().flat_map(part_claims))
        };
        let mut states: Vec<(Key, KeyState)> = Vec::with_capacity(claimed);
        for (key, part, cand) in claims {
            if states.last().is_none_or(|(k, _)| *k != key) {
                states.push((
                    key,
                    KeyState {
                        seen: generation,
                        ..KeyState::default()
                    },
                ));
            }
            let Some((_, state)) = states.last_mut() else {
                continue;
            };
            let part = &parts[part as usize].1;
            for (rule, deny) in [(cand.allow, false), (cand.deny, true)] {
                if let Some(rule) = rule {
                    state.claims.push(Claim {
                        part: part.clone(),
                        rule,
                        deny,
                    });
                }
            }
        }
        states.retain(|(_, s)| !s.claims.is_empty());
        // The entries, in one pass: a key's ancestors are the shorter prefixes of
        // its own (direction, identity) group, which sort before it.
        let mut group_start = 0;
        let mut short: Vec<(Key, (bool, bool))> = Vec::new();
        let mut entries = 0;
        for i in 0..states.len() {
            let key = states[i].0;
            let group = &states[group_start].0;
            if (group.0, group.1) != (key.0, key.1) {
                group_start = i;
                short.clear();
            }
            let covered = if short.len() > SHORT_SCAN_LIMIT {
                let seen = &states[group_start..i];
                ancestors(key)
                    .into_iter()
                    .filter_map(|a| seen.binary_search_by_key(&a, |(k, _)| *k).ok())
                    .fold((false, false), |(d, a), j| {
                        let (sd, sa) = seen[j].1.presence();
                        (d || sd, a || sa)
                    })
            } else {
                short
                    .iter()
                    .filter(|(anc, _)| is_ancestor(*anc, key))
                    .fold((false, false), |(d, a), (_, (sd, sa))| (d || *sd, a || *sa))
            };
            let state = &mut states[i].1;
            state.decide(normalized_verdict(state.presence(), covered));
            entries += usize::from(state.verdict.is_some());
            if key.2 == 0 || key.4 < 16 {
                short.push((key, state.presence()));
            }
        }
        self.parts = parts;
        self.keys = states.into_iter().collect();
        let offsets = self.offsets();
        self.l7.overlay = self.compute_overlay(&offsets);
        let overlay_only = self
            .l7
            .overlay
            .keys()
            .filter(|k| self.keys.get(k).is_none_or(|s| s.verdict.is_none()))
            .count();
        self.entries = entries + overlay_only;
    }

    /// Every map entry, L3/L4 and proxied, in key order: (key, (verdict,
    /// deciding claim, proxy)).
    fn finals(&self) -> Vec<(Key, Final)> {
        let overlay = &self.l7.overlay;
        let mut out: Vec<(Key, Final)> = self
            .keys
            .iter()
            .filter(|(k, _)| !overlay.contains_key(k))
            .filter_map(|(k, s)| s.entry().map(|(v, c)| (*k, (v, c, false))))
            .collect();
        out.extend(
            overlay
                .iter()
                .map(|(k, (c, _))| (*k, (Verdict::Allow, c.clone(), true))),
        );
        out.sort_by_key(|(k, _)| *k);
        out
    }

    /// What moving from the map of `old` to this one's changes, found by
    /// comparing both policies' entries in key order (for a policy built at
    /// once, where there is no per-key record of what changed). Entries that
    /// left name their rule with this policy's rule indexes, `u32::MAX` when
    /// its policy left, as [`Self::apply`] does.
    fn delta_from(&self, old: &MergedPolicy) -> PolicyDelta {
        let offsets = self.offsets();
        let was = (old.ingress > 0, old.egress > 0);
        let now = (self.ingress > 0, self.egress > 0);
        let mut delta = PolicyDelta {
            ingress_enforced: (was.0 != now.0).then_some(now.0),
            egress_enforced: (was.1 != now.1).then_some(now.1),
            l7_changed: overlay_changed(&old.l7.overlay, &self.l7.overlay),
            ..PolicyDelta::default()
        };
        let mut before = old.finals().into_iter().peekable();
        let mut after = self.finals().into_iter().peekable();
        loop {
            let order = match (before.peek(), after.peek()) {
                (None, None) => break,
                (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
            };
            let (was, now) = match order {
                std::cmp::Ordering::Less => (before.next(), None),
                std::cmp::Ordering::Greater => (None, after.next()),
                std::cmp::Ordering::Equal => (before.next(), after.next()),
            };
            match (was, now) {
                (Some((key, (v, c, proxy))), None) => {
                    delta
                        .removed
                        .push(merged_entry(key, v, &c, proxy, &offsets));
                }
                (was, Some((key, now))) => {
                    if !was.is_some_and(|(_, was)| same_final(&was, &now)) {
                        let (v, c, proxy) = now;
                        delta
                            .upserted
                            .push(merged_entry(key, v, &c, proxy, &offsets));
                    }
                }
                (None, None) => break,
            }
        }
        delta.upserted.sort_by_key(|e| e.entry);
        delta.removed.sort_by_key(|e| e.entry);
        delta
    }

    /// Takes `removed` out and puts `added` in; returns what changed in the map.
    /// `parts` must already be the new parts (for rule indexes).
    fn apply(&mut self, removed: &[Arc<Contribution>], added: &[Arc<Contribution>]) -> PolicyDelta {
        let was = (self.ingress > 0, self.egress > 0);
        let generation = self.next_generation();
        // Every key whose entry may change, with its presence and entry before.
        let mut before: Vec<Recorded> = Vec::new();
        let record = |before: &mut Vec<Recorded>, key: Key, state: &mut KeyState| {
            if state.seen != generation {
                state.seen = generation;
                before.push((key, state.presence(), state.entry()));
            }
        };
        for c in removed {
            self.ingress -= usize::from(c.ingress_enforced);
            self.egress -= usize::from(c.egress_enforced);
            for (key, cand) in &c.keys {
                let Some(state) = self.keys.get_mut(key) else {
                    continue;
                };
                record(&mut before, *key, state);
                if cand.allow.is_some() || cand.deny.is_some() {
                    state.claims.retain(|cl| !Arc::ptr_eq(&cl.part, c));
                }
            }
            for (key, _) in &c.http {
                if let Some(n) = self.l7.http_keys.get_mut(key) {
                    *n -= 1;
                    if *n == 0 {
                        self.l7.http_keys.remove(key);
                    }
                }
            }
        }
        for c in added {
            self.ingress += usize::from(c.ingress_enforced);
            self.egress += usize::from(c.egress_enforced);
            for (key, cand) in &c.keys {
                let state = self.keys.entry(*key).or_default();
                record(&mut before, *key, state);
                for (rule, deny) in [(cand.allow, false), (cand.deny, true)] {
                    if let Some(rule) = rule {
                        insert_claim(&mut state.claims, c, rule, deny);
                    }
                }
            }
            for (key, _) in &c.http {
                *self.l7.http_keys.entry(*key).or_default() += 1;
            }
        }
        // A key that starts or stops holding a deny or an allow changes what the
        // longer prefixes under it keep.
        let flipped: Vec<Key> = before
            .iter()
            .filter(|(key, presence, _)| {
                self.keys
                    .get(key)
                    .map_or((false, false), KeyState::presence)
                    != *presence
            })
            .map(|(key, ..)| *key)
            .collect();
        for key in flipped {
            for (d, state) in self.keys.range_mut(descendants(key)) {
                if is_descendant(*d, key) {
                    record(&mut before, *d, state);
                }
            }
        }
        let offsets = self.offsets();
        let mut delta = PolicyDelta {
            ingress_enforced: (was.0 != (self.ingress > 0)).then_some(self.ingress > 0),
            egress_enforced: (was.1 != (self.egress > 0)).then_some(self.egress > 0),
            ..PolicyDelta::default()
        };
        let mut empty: Vec<Key> = Vec::new();
        // The L3/L4 entries that changed: (key, before, after).
        let mut changed: Vec<(Key, Decided, Decided)> = Vec::new();
        for (key, _, old) in before {
            let covered = self.covered(key);
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            state.decide(normalized_verdict(state.presence(), covered));
            let new = state.entry();
            let same = match (&old, &new) {
                (None, None) => true,
                (Some((va, ca)), Some((vb, cb))) => va == vb && ca.rule_ref() == cb.rule_ref(),
                _ => false,
            };
            if !same {
                changed.push((key, old, new.clone()));
            }
            if state.claims.is_empty() {
                empty.push(key);
            }
        }
        for key in empty {
            self.keys.remove(&key);
        }
        // The proxied entries replace the L3/L4 entries of their keys: the map
        // changes where either changed.
        let overlay = self.compute_overlay(&offsets);
        let old_overlay = std::mem::replace(&mut self.l7.overlay, overlay);
        delta.l7_changed = overlay_changed(&old_overlay, &self.l7.overlay);
        // (key, entry before, entry after).
        type Slot = Option<Final>;
        let l4 = |d: Decided| d.map(|(v, c)| (v, c, false));
        let finals: Vec<(Key, Slot, Slot)> = if old_overlay.is_empty() && self.l7.overlay.is_empty()
        {
            // No L7 before or after: the L3/L4 changes are the map's.
            changed
                .into_iter()
                .map(|(key, old, new)| (key, l4(old), l4(new)))
                .collect()
        } else {
            let changed: BTreeMap<Key, (Decided, Decided)> = changed
                .into_iter()
                .map(|(key, old, new)| (key, (old, new)))
                .collect();
            let mut keys: BTreeSet<Key> = changed.keys().copied().collect();
            keys.extend(old_overlay.keys().copied());
            keys.extend(self.l7.overlay.keys().copied());
            let proxied =
                |(claim, _): &(Claim, ResolvedL7)| Some((Verdict::Allow, claim.clone(), true));
            keys.into_iter()
                .map(|key| {
                    let (base_old, base_new) = match changed.get(&key) {
                        Some((old, new)) => (old.clone(), new.clone()),
                        None => {
                            let now = self.keys.get(&key).and_then(KeyState::entry);
                            (now.clone(), now)
                        }
                    };
                    let was = old_overlay.get(&key).map_or_else(|| l4(base_old), proxied);
                    let now = self
                        .l7
                        .overlay
                        .get(&key)
                        .map_or_else(|| l4(base_new), proxied);
                    (key, was, now)
                })
                .collect()
        };
        for (key, was, now) in finals {
            let same = match (&was, &now) {
                (None, None) => true,
                (Some(a), Some(b)) => same_final(a, b),
                _ => false,
            };
            if same {
                continue;
            }
            if let Some((v, c, proxy)) = &was {
                if now.is_none() {
                    self.entries -= 1;
                    delta
                        .removed
                        .push(merged_entry(key, *v, c, *proxy, &offsets));
                }
            }
            if let Some((v, c, proxy)) = &now {
                if was.is_none() {
                    self.entries += 1;
                }
                delta
                    .upserted
                    .push(merged_entry(key, *v, c, *proxy, &offsets));
            }
        }
        delta.upserted.sort_by_key(|e| e.entry);
        delta.removed.sort_by_key(|e| e.entry);
        delta
    }
}

impl PolicyRepository {
    /// Moves `merged` to `basis` (just returned by [`Self::basis`]) and returns what
    /// changed in its map. Costs the contributions that left and arrived, not the
    /// entries that stay; an equal basis costs nothing. From
    /// [`MergedPolicy::default`] it builds the whole policy (every entry upserted).
    pub fn update_merged(&self, merged: &mut MergedPolicy, basis: &Basis) -> PolicyDelta {
        merged.previous = Some((merged.basis.clone(), merged.parts.clone()));
        if merged.basis == *basis {
            return PolicyDelta::default();
        }
        let mut old: HashMap<ContributionId, Arc<Contribution>> =
            std::mem::take(&mut merged.parts).into_iter().collect();
        let mut parts = Vec::with_capacity(basis.0.len());
        let mut added = Vec::new();
        for id in &basis.0 {
            if let Some(c) = old.remove(id) {
                parts.push((*id, c));
            } else if let Some(c) = self.contribution(*id) {
                added.push(c.clone());
                parts.push((*id, c));
            }
        }
        let removed: Vec<Arc<Contribution>> = old.into_values().collect();
        let keys_of = |cs: &[Arc<Contribution>]| cs.iter().map(|c| c.keys.len()).sum::<usize>();
        let changed = keys_of(&removed) + keys_of(&added);
        let kept = parts.iter().map(|(_, c)| c.keys.len()).sum::<usize>() - keys_of(&added);
        if changed.saturating_mul(REBUILD_RATIO) > kept {
            // Most keys change (a first programming; a policy edited whole,
            // the usual case for an endpoint selected by one policy): built
            // again at once and compared, cheaper than the per-key path for
            // that many keys.
            let previous = merged.previous.take();
            let generation = merged.generation;
            let old = std::mem::take(merged);
            merged.generation = generation;
            merged.basis = basis.clone();
            merged.fill(parts);
            merged.previous = previous;
            return merged.delta_from(&old);
        }
        merged.parts = parts;
        merged.basis = basis.clone();
        merged.apply(&removed, &added)
    }
}

impl PolicyRepository {
    /// A merged policy standing for `basis` (just returned by [`Self::basis`]),
    /// built at once: what [`Self::update_merged`] from [`MergedPolicy::new`]
    /// gives, without the delta (every entry) that a first programming, which
    /// writes the whole map from [`MergedPolicy::resolved`], does not need.
    pub fn merged(&self, basis: &Basis) -> MergedPolicy {
        let mut merged = MergedPolicy::new();
        merged.previous = Some((Basis::default(), Vec::new()));
        merged.basis = basis.clone();
        merged.fill(
            basis
                .0
                .iter()
                .filter_map(|id| self.contribution(*id).map(|c| (*id, c)))
                .collect(),
        );
        merged
    }
}

/// An entry of the map: (verdict, deciding claim, proxy).
type Final = (Verdict, Claim, bool);

/// Whether two entries are the same in the map: verdict, proxy flag and the
/// rule named (by reference: rule indexes shift as policies come and go).
fn same_final((va, ca, pa): &Final, (vb, cb, pb): &Final) -> bool {
    va == vb && pa == pb && ca.rule_ref() == cb.rule_ref()
}

/// Whether the proxied entries' L7 policies differ (what the proxy is told).
fn overlay_changed(
    old: &BTreeMap<Key, (Claim, ResolvedL7)>,
    new: &BTreeMap<Key, (Claim, ResolvedL7)>,
) -> bool {
    old.len() != new.len()
        || old
            .iter()
            .zip(new)
            .any(|((ka, (_, la)), (kb, (_, lb)))| ka != kb || la != lb)
}

/// An update whose changed keys (those of the contributions that leave and
/// arrive) times this outnumber the keys of the contributions that stay
/// builds the merged policy again at once instead of moving it key by key:
/// the per-key path costs about 25 times a key of the build (1.8 µs against
/// 70 ns, replica (c) of the resolve bench), and the comparison of both maps
/// about as much again as the build.
const REBUILD_RATIO: usize = 8;

/// The claims of part `i` (its candidate keys, sorted), with the part's index.
fn part_claims(
    (i, (_, c)): (usize, &(ContributionId, Arc<Contribution>)),
) -> impl Iterator<Item = (Key, u32, Candidates)> + '_ {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    c.keys.iter().map(move |(k, cand)| (*k, i, *cand))
}

/// Inserts a claim after those of earlier policies (merge order).
fn insert_claim(
    claims: &mut SmallVec<[Claim; 1]>,
    part: &Arc<Contribution>,
    rule: u32,
    deny: bool,
) {
    let at = claims.partition_point(|c| c.part.policy < part.policy);
    claims.insert(
        at,
        Claim {
            part: part.clone(),
            rule,
            deny,
        },
    );
}

/// The key range holding every longer prefix under `key` (and maybe some that are
/// not under it: filter with [`is_descendant`]).
fn descendants(key: Key) -> std::ops::RangeInclusive<Key> {
    let (direction, identity, proto, port, len) = key;
    if proto == 0 {
        // Any protocol covers every protocol's keys of the group.
        (direction, identity, 1, 0, 0)..=(direction, identity, u8::MAX, u16::MAX, u8::MAX)
    } else {
        let last = port | !crate::ports::prefix_mask(len);
        (direction, identity, proto, port, 0)..=(direction, identity, proto, last, u8::MAX)
    }
}

fn is_descendant(d: Key, key: Key) -> bool {
    d != key && ancestors(d).contains(&key)
}

/// Index of each part's first rule in the merged rule list, sorted by part
/// address: looked up once per entry, so a binary search over a few parts
/// rather than a hash.
struct Offsets(Vec<(*const Contribution, u32)>);

fn global_rule(offsets: &Offsets, claim: &Claim) -> u32 {
    let part = Arc::as_ptr(&claim.part);
    offsets
        .0
        .binary_search_by_key(&part, |(p, _)| *p)
        .map_or(u32::MAX, |at| offsets.0[at].1.saturating_add(claim.rule))
}

fn map_entry(key: Key, verdict: Verdict, rule: u32, proxy: bool) -> MapEntry {
    let (direction, identity, proto, port, port_prefix_len) = key;
    MapEntry {
        direction,
        identity,
        proto,
        port,
        port_prefix_len,
        verdict,
        rule,
        proxy,
    }
}

fn merged_entry(
    key: Key,
    verdict: Verdict,
    claim: &Claim,
    proxy: bool,
    offsets: &Offsets,
) -> MergedEntry {
    MergedEntry {
        entry: map_entry(key, verdict, global_rule(offsets, claim), proxy),
        rule_ref: claim
            .rule_ref()
            .cloned()
            .unwrap_or_else(|| unreachable!("candidates index their contribution's rules")),
    }
}

#[cfg(test)]
mod tests {
    use super::KeyState;

    /// The agent keeps a key state per key per endpoint: tens of thousands
    /// under a large CIDR policy. 32 bytes, with one claim held inline.
    #[test]
    fn a_key_state_stays_small() {
        assert!(
            std::mem::size_of::<KeyState>() <= 32,
            "{}",
            std::mem::size_of::<KeyState>()
        );
    }
}
