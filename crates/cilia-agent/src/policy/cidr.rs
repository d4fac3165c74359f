//! Which CIDR prefixes the imported policies mention, kept per policy with
//! a reference count per prefix, so a change finds the prefixes that come
//! and go from the policies it changes, not from all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cilia_policy::Policy;
use ipnet::IpNet;

use crate::store::StoredPolicy;

/// A policy (compared by pointer: a changed policy is a new `Arc`) and the
/// prefixes it mentions, sorted.
type DocPrefixes = (Arc<Policy>, Vec<IpNet>);

/// The prefixes of each imported policy and how many policies mention each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CidrRefs {
    /// By policy key.
    docs: BTreeMap<String, DocPrefixes>,
    /// How many policies mention each prefix (never 0).
    counts: BTreeMap<IpNet, usize>,
}

/// How a change of policies moves [`CidrRefs`]: computed without changing
/// them, applied only once the change is.
#[derive(Debug, Default)]
pub struct RefsDelta {
    /// Policies whose prefixes change: `None` when the key goes.
    docs: Vec<(String, Option<DocPrefixes>)>,
    /// Prefixes by the change in their count, for those that change.
    counts: BTreeMap<IpNet, isize>,
    /// Prefixes no policy mentioned and one now does.
    pub appear: BTreeSet<IpNet>,
    /// Prefixes some policy mentioned and none now does.
    pub disappear: BTreeSet<IpNet>,
}

fn prefixes_of(policy: &Policy) -> Vec<IpNet> {
    cilia_policy::cidr_prefixes(std::iter::once(policy))
        .into_iter()
        .collect()
}

impl CidrRefs {
    /// The prefixes of every policy in `docs`.
    pub fn of(docs: &BTreeMap<String, (StoredPolicy, Arc<Policy>)>) -> Self {
        let mut refs = Self::default();
        let delta = refs.delta(docs);
        refs.apply(delta);
        refs
    }

    /// Every prefix some policy mentions.
    pub fn prefixes(&self) -> impl Iterator<Item = &IpNet> {
        self.counts.keys()
    }

    /// How these refs move to `docs`: one walk of both key sets comparing
    /// policies by pointer; only the policies that changed are looked into.
    pub fn delta(&self, docs: &BTreeMap<String, (StoredPolicy, Arc<Policy>)>) -> RefsDelta {
        let mut delta = RefsDelta::default();
        let count = |delta: &mut RefsDelta, prefixes: &[IpNet], by: isize| {
            for p in prefixes {
                *delta.counts.entry(*p).or_default() += by;
            }
        };
        let (mut was, mut is) = (self.docs.iter().peekable(), docs.iter().peekable());
        loop {
            let order = match (was.peek(), is.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((k, _)), Some((l, _))) => k.cmp(l),
            };
            let (old, new) = match order {
                std::cmp::Ordering::Less => (was.next(), None),
                std::cmp::Ordering::Greater => (None, is.next()),
                std::cmp::Ordering::Equal => (was.next(), is.next()),
            };
            if let (Some((_, (p, _))), Some((_, (_, q)))) = (&old, &new) {
                if Arc::ptr_eq(p, q) {
                    continue;
                }
            }
            if let Some((_, (_, prefixes))) = &old {
                count(&mut delta, prefixes, -1);
            }
            match (old, new) {
                (_, Some((key, (_, policy)))) => {
                    let prefixes = prefixes_of(policy);
                    count(&mut delta, &prefixes, 1);
                    delta
                        .docs
                        .push((key.clone(), Some((policy.clone(), prefixes))));
                }
                (Some((key, _)), None) => delta.docs.push((key.clone(), None)),
                (None, None) => {}
            }
        }
        delta.counts.retain(|_, by| *by != 0);
        for (prefix, by) in &delta.counts {
            let before = self.counts.get(prefix).copied().unwrap_or(0);
            let after = before.saturating_add_signed(*by);
            if before == 0 && after > 0 {
                delta.appear.insert(*prefix);
            } else if before > 0 && after == 0 {
                delta.disappear.insert(*prefix);
            }
        }
        delta
    }

    /// Applies a delta computed from these refs.
    pub fn apply(&mut self, delta: RefsDelta) {
        for (key, doc) in delta.docs {
            match doc {
                Some(doc) => self.docs.insert(key, doc),
                None => self.docs.remove(&key),
            };
        }
        for (prefix, by) in delta.counts {
            let count = self.counts.entry(prefix).or_default();
            *count = count.saturating_add_signed(by);
            if *count == 0 {
                self.counts.remove(&prefix);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use cilia_datapath::fake::FakeDatapath;

    use super::*;
    use crate::endpoint::netdev::{Netdev, NetdevError, VethSpec};
    use crate::endpoint::Pools;
    use crate::ipam::Pool;
    use crate::policy::repository::PolicyState;
    use crate::store::{CidrAllocator, Store, FIRST_CIDR_IDENTITY};

    struct NoDevices;

    impl Netdev for NoDevices {
        fn create(&self, _: &VethSpec) -> Result<u32, NetdevError> {
            Ok(7)
        }
        fn delete(&self, _: &str) -> Result<(), NetdevError> {
            Ok(())
        }
        fn ifindex(&self, _: &str) -> Option<u32> {
            None
        }
        fn ensure_router(&self, _: Ipv6Addr, _: Option<Ipv4Addr>) -> Result<(), NetdevError> {
            Ok(())
        }
        fn node_addresses(&self) -> Result<Vec<IpAddr>, NetdevError> {
            Ok(Vec::new())
        }
    }

    fn policy_state(store: &Arc<Store>, dp: &Arc<FakeDatapath>) -> PolicyState {
        PolicyState::new(
            store.clone(),
            dp.clone(),
            Arc::new(NoDevices),
            Pools {
                v6: Pool::new("fd00::/120".parse().unwrap()).unwrap(),
                v4: Some(Pool::new("10.0.0.0/24".parse().unwrap()).unwrap()),
            },
        )
    }

    /// A small deterministic generator (xorshift), so a failure repeats.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Overlapping prefixes (nested, shared between policies).
    const PREFIXES: &[&str] = &[
        "203.0.113.0/24",
        "203.0.113.0/25",
        "203.0.113.128/26",
        "198.51.100.0/24",
        "198.51.100.7/32",
        "192.0.2.0/24",
        "2001:db8::/32",
        "2001:db8:1::/48",
    ];

    /// A policy named `p{name}` with a random few of `PREFIXES`, some with
    /// an `except`.
    fn random_policy(rng: &mut Rng, name: usize) -> String {
        let mut yaml = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p{name}\n\
             spec:\n  endpointSelector: {{}}\n  egress:\n"
        );
        for _ in 0..1 + rng.below(3) {
            let cidr = PREFIXES[rng.below(PREFIXES.len())];
            yaml.push_str(&format!("  - toCIDRSet:\n    - cidr: {cidr}\n"));
            if cidr == "203.0.113.0/24" && rng.below(2) == 0 {
                yaml.push_str("      except:\n      - 203.0.113.128/26\n");
            }
        }
        yaml
    }

    /// One policy map entry: its key and verdict, with its rule's name.
    type NamedEntry = (String, String);

    /// What a policy state shows of its CIDR identities: its ids, the
    /// store's, the CIDR entries of its ipcache, and the policy maps.
    type Shown = (
        BTreeMap<IpNet, u32>,
        BTreeMap<IpNet, u32>,
        Vec<(String, u32)>,
        BTreeMap<u16, Vec<NamedEntry>>,
    );

    fn shown(state: &PolicyState, store: &Store, dp: &FakeDatapath) -> Shown {
        let ipcache = dp
            .state()
            .ipcache
            .iter()
            .filter(|(_, v)| v.identity >= FIRST_CIDR_IDENTITY)
            .map(|(k, v)| (format!("{k:?}"), v.identity))
            .collect();
        let policy = dp
            .state()
            .policy
            .iter()
            .map(|(id, entries)| {
                let named = entries
                    .iter()
                    .map(|(key, v)| {
                        let rule = state.rule_name(v.rule);
                        (
                            format!("{key:?}"),
                            format!("{:?} {:?} {rule:?}", v.verdict, v.match_kind),
                        )
                    })
                    .collect();
                (*id, named)
            })
            .collect();
        (
            state.cidr_ids.clone(),
            store.stored_cidr_identities().unwrap(),
            ipcache,
            policy,
        )
    }

    /// What a fresh agent on the same store computes from scratch.
    fn from_scratch(store: &Arc<Store>) -> Shown {
        let dp = Arc::new(FakeDatapath::new());
        let mut fresh = policy_state(store, &dp);
        fresh.load_policies().unwrap();
        fresh.regenerate().unwrap();
        shown(&fresh, store, &dp)
    }

    #[test]
    fn changed_cidr_identities_are_what_a_restart_computes_from_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        // The ids a full computation gives, kept by a second store.
        let model = Store::open(&dir.path().join("model.redb")).unwrap();
        // One ready endpoint, selected by every policy.
        store
            .create_endpoint(
                &Pool::new("fd00::/120".parse().unwrap()).unwrap(),
                None,
                |id, ipv6, ipv4| crate::store::EndpointRecord {
                    id,
                    netns: "/run/netns/x".into(),
                    ifname: "eth0".into(),
                    host_ifname: format!("lxc{id}"),
                    ipv6,
                    ipv4,
                    labels: BTreeMap::new(),
                    mac: [2, 0, 0, 0, 0, 1],
                    host_mac: [2, 0, 0, 0, 0, 2],
                    state: cilia_api::EndpointState::Ready,
                    reason: None,
                    container_id: None,
                    namespace: crate::store::DEFAULT_NAMESPACE.into(),
                    identity: 0,
                    label_source: None,
                    policy_audit: false,
                    network: None,
                    named_ports: Vec::new(),
                    k8s_pod: None,
                },
            )
            .unwrap();
        let dp = Arc::new(FakeDatapath::new());
        let mut state = policy_state(&store, &dp);

        let mut rng = Rng(0x5eed_c1d4);
        let prefixes_of_state = |state: &PolicyState| -> BTreeSet<IpNet> {
            cilia_policy::cidr_prefixes(state.policy_docs.values().map(|(_, p)| &**p))
        };
        let (mut refused, mut rolled_back) = (0, 0);
        for step in 0..300 {
            let before = shown(&state, &store, &dp);
            let old = prefixes_of_state(&state);
            let name = rng.below(6);
            let key = format!("CiliumNetworkPolicy/default/p{name}");
            let mut candidate = state.policy_docs.clone();
            let injected = (rng.below(10) == 0).then(|| {
                [
                    "publish_ipcache",
                    "withdraw_ipcache",
                    "bump_policy_revision",
                ][rng.below(3)]
            });
            if let Some(op) = injected {
                dp.fail_next(op, 1);
            } else {
                // Small maps refuse some changes, at planning (not with an
                // injected failure: its roll-back must fit as it did).
                state.limits.ipcache_entries = [5, 7, 100][rng.below(3)];
                state.limits.policy_entries = [5, 7, 100][rng.below(3)];
            }
            let result = if rng.below(3) == 0 {
                candidate.remove(&key);
                state
                    .delete_policies(Some(&format!("p{name}")), None)
                    .map(|_| ())
            } else {
                let yaml = random_policy(&mut rng, name);
                for (stored, p) in crate::policy::parse_import("t.yaml", &yaml)
                    .unwrap()
                    .policies
                {
                    candidate.insert(stored.key(), (stored, Arc::new(p)));
                }
                state.import_policies("t.yaml", &yaml).map(|_| ())
            };
            if let Some(op) = injected {
                dp.fail_next(op, 0);
            }
            match result {
                Ok(()) => {
                    model
                        .sync_cidr_identities(&prefixes_of_state(&state))
                        .unwrap();
                }
                Err(e)
                    if e.to_string().contains("more than the map")
                        || e.to_string().contains("policy map entries") =>
                {
                    refused += 1;
                    assert_eq!(shown(&state, &store, &dp), before, "step {step}: {e}");
                }
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => {
                    // A write failed after the store took the change: it
                    // was rolled back by a regeneration with the old set.
                    assert!(injected.is_some(), "step {step}: {e}");
                    rolled_back += 1;
                    assert_eq!(prefixes_of_state(&state), old, "step {step}");
                    let tried = cilia_policy::cidr_prefixes(candidate.values().map(|(_, p)| &**p));
                    model.sync_cidr_identities(&tried).unwrap();
                    model.sync_cidr_identities(&old).unwrap();
                }
            }
            state.limits = crate::policy::Limits::default();
            let now = shown(&state, &store, &dp);
            assert_eq!(now.0, now.1, "step {step}: ids and store");
            assert_eq!(
                now.0,
                model.stored_cidr_identities().unwrap(),
                "step {step}: ids of a full computation"
            );
            let ids: Vec<u32> = now.2.iter().map(|(_, id)| *id).collect();
            let mut want: Vec<u32> = now.0.values().copied().collect();
            let mut got = ids.clone();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "step {step}: ipcache");
            assert_eq!(
                state.cidr_refs,
                CidrRefs::of(&state.policy_docs),
                "step {step}"
            );
            assert_eq!(
                state.cidr_allocator,
                CidrAllocator::of_used(state.cidr_ids.values()),
                "step {step}"
            );
            if step % 2 == 0 {
                // A regeneration that changes nothing undoes what a refused
                // plan gave the repository: it resolves with `cidr_ids`.
                state.regenerate().unwrap();
                let resolving: BTreeMap<u32, IpNet> = state
                    .repository
                    .identities()
                    .cidr_identities()
                    .map(|(id, p)| (id, p.trunc()))
                    .collect();
                let ids: BTreeMap<u32, IpNet> = state
                    .cidr_ids
                    .iter()
                    .map(|(p, id)| (*id, p.trunc()))
                    .collect();
                assert_eq!(
                    resolving, ids,
                    "step {step}: the repository's CIDR identities"
                );
            }
            if step % 25 == 0 {
                assert_eq!(from_scratch(&store), now, "step {step}: from scratch");
            }
        }
        assert!(refused > 0, "some imports did not fit the maps");
        assert!(rolled_back > 0, "some imports were rolled back");
        assert_eq!(from_scratch(&store), shown(&state, &store, &dp));
    }
}
