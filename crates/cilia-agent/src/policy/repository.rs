//! The policy repository and everything that depends on it, as methods of
//! the endpoint manager (it owns the state they change): importing and
//! deleting policies, namespace labels, CIDR identities, regenerating every
//! endpoint's policy map, and tracing a verdict.
//!
//! Invariant: `resolved` always holds exactly what each ready endpoint's
//! policy map was last programmed from, so `trace` and `bpf policy get`
//! explain the datapath's actual state.
//!
//! A change is parsed once, then planned, committed and applied: the plan
//! resolves through `cilia_policy::PolicyRepository`, which keeps each
//! policy's resolved contribution and the identities each peer selects, so
//! only new or changed policies (and those whose peers see new identities)
//! are resolved again; an endpoint whose contributions, closed state and
//! audit mode are what its map was programmed from (`programmed`) is
//! neither merged nor written, and the ipcache gets only the CIDR
//! identities that came or went.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use cilia_abi::{
    CtEntry, EndpointPolicy, IpcacheEntry, PolicyDelta, CILIA_ID_HEALTH, CILIA_ID_HOST,
    CILIA_ID_INIT, CILIA_ID_REMOTE_NODE, CILIA_ID_UNMANAGED, CILIA_ID_WORLD,
};
use cilia_api::limits::excerpt;
use cilia_api::EndpointState;
use cilia_policy::{Direction, IdentityCache, Labels, NamedPorts, Verdict};
use tracing::{info, warn};

use std::sync::Arc;

use crate::endpoint::netdev::Netdev;
use crate::endpoint::{config_of, DatapathHandle, EndpointError, Pools};
use crate::policy;
use crate::policy::cidr::{CidrRefs, RefsDelta};
use crate::store::{
    security_labels, CidrAllocator, CidrChange, EndpointRecord, Store, StoredPolicy,
    DEFAULT_NAMESPACE, FIRST_CIDR_IDENTITY, NAMESPACE_LABEL,
};

/// Reserved identities and their label names.
pub const RESERVED: &[(u32, &str)] = cilia_policy::reserved::NAMED;

// The policy crate's reserved identities are the datapath's.
const _: () = {
    use cilia_policy::reserved as r;
    assert!(r::HOST == CILIA_ID_HOST && r::WORLD == CILIA_ID_WORLD);
    assert!(r::UNMANAGED == CILIA_ID_UNMANAGED && r::HEALTH == CILIA_ID_HEALTH);
    assert!(r::INIT == CILIA_ID_INIT && r::REMOTE_NODE == CILIA_ID_REMOTE_NODE);
};

/// Identities given to a label set that no endpoint has, for tracing: one
/// per side (the two may differ), below the CIDR identities (which selectors
/// of labels never match) and above every endpoint identity.
const HYPOTHETICAL_SRC: u32 = cilia_policy::LOCAL_CIDR_IDENTITY_BASE - 2;
const HYPOTHETICAL_DST: u32 = cilia_policy::LOCAL_CIDR_IDENTITY_BASE - 1;

fn is_hypothetical(identity: u32) -> bool {
    identity == HYPOTHETICAL_SRC || identity == HYPOTHETICAL_DST
}

/// One side of a traced connection.
#[derive(Debug, Clone)]
pub struct Party {
    pub description: String,
    pub endpoint: Option<EndpointRecord>,
    /// Security labels, when the party is (or could be) an endpoint.
    pub labels: Option<BTreeMap<String, String>>,
    pub identity: u32,
    pub ip: Option<IpAddr>,
}

/// One direction's verdict in a trace.
#[derive(Debug, Clone)]
pub struct TraceStep {
    pub direction: Direction,
    pub subject: String,
    pub verdict: Verdict,
    pub reason: String,
    pub rules: Vec<String>,
}

/// A complete trace: both directions, and optionally the kernel's answer.
#[derive(Debug, Clone)]
pub struct Trace {
    pub src: Party,
    pub dst: Party,
    pub steps: Vec<TraceStep>,
    pub verdict: Verdict,
    /// tc verdict of the real program on a synthesized packet.
    pub datapath: Option<u32>,
    /// Whether the program redirected that packet's flow to the L7 proxy (a
    /// test run cannot hand it to the proxy's socket, so its verdict is a
    /// drop; the flow's conntrack entry says what the program decided).
    pub datapath_to_proxy: bool,
}

/// What an endpoint's policy map was programmed from.
#[derive(Debug)]
pub struct Programmed {
    /// Its merged policy, moved by each change (see
    /// `cilia_policy::MergedPolicy`); `None`: closed by a broken stored
    /// policy.
    merged: Option<cilia_policy::MergedPolicy>,
    audit: bool,
}

impl Programmed {
    fn enforcement(&self) -> cilia_abi::Enforcement {
        enforcement_of(self.merged.as_ref(), self.audit)
    }
}

/// The enforcement of a merged policy (`None`: closed, both directions).
fn enforcement_of(
    merged: Option<&cilia_policy::MergedPolicy>,
    audit: bool,
) -> cilia_abi::Enforcement {
    match merged {
        Some(m) => crate::datapath::enforcement(
            m.enforced(Direction::Ingress),
            m.enforced(Direction::Egress),
            audit,
        ),
        None => crate::datapath::enforcement(true, true, audit),
    }
}

/// Map entries with the enforcement marker (one for both directions).
fn map_size(entries: usize, enforcement: cilia_abi::Enforcement) -> usize {
    entries + usize::from(enforcement.ingress || enforcement.egress)
}

/// How one endpoint's map changes.
enum Change {
    /// The whole map, swapped in at once: a first programming, or a move
    /// between closed and resolved.
    Full {
        policy: EndpointPolicy,
        merged: Option<cilia_policy::MergedPolicy>,
        audit: bool,
    },
    /// Ordered deltas (`PolicyDelta::ordered`); the endpoint's merged
    /// policy in `programmed` has already moved.
    Delta {
        steps: Vec<PolicyDelta>,
        audit: bool,
    },
}

/// One endpoint's change, checked, not yet written.
struct PlannedEndpoint {
    id: u16,
    change: Change,
}

/// A regeneration, computed and checked, not yet written.
struct Plan {
    cidr: CidrPlan,
    /// Live endpoints whose map changes.
    endpoints: Vec<PlannedEndpoint>,
    /// Endpoints whose merged policy moved while planning: moved back
    /// should the plan be abandoned.
    moved: Vec<u16>,
}

/// How a regeneration changes the CIDR identities.
enum CidrPlan {
    /// At start-up, or after a failed write: every prefix, given its id by
    /// the store's whole set (`prefixes`); the ipcache is walked.
    Whole {
        refs: CidrRefs,
        prefixes: std::collections::BTreeSet<ipnet::IpNet>,
        change: CidrChange,
    },
    /// Only the prefixes that come or go.
    Change { refs: RefsDelta, change: CidrChange },
}

impl CidrPlan {
    fn change(&self) -> &CidrChange {
        match self {
            Self::Whole { change, .. } | Self::Change { change, .. } => change,
        }
    }
}

fn cidr_entry(prefix: &ipnet::IpNet, identity: u32) -> IpcacheEntry {
    IpcacheEntry {
        prefix: *prefix,
        identity,
        tunnel: None,
    }
}

/// The policy subsystem: the imported policies, their incremental
/// resolution, the CIDR identities and the node's addresses in the ipcache,
/// and what each endpoint's policy map was programmed from. Locked on its
/// own (see `EndpointManager::policy`): the endpoint lifecycle tells it
/// which endpoints are live ([`PolicyState::apply_policy`],
/// [`PolicyState::forget`]); it reads records and identities from the
/// store and writes only policy maps and the ipcache.
pub struct PolicyState {
    pub(crate) store: Arc<Store>,
    pub(crate) datapath: DatapathHandle,
    pub(crate) netdev: Arc<dyn Netdev>,
    pub(crate) pools: Pools,
    /// Imported policies by key (`kind/namespace/name`), with their source.
    /// Shared (`Arc`) with `repository`, which keeps each one's resolved
    /// contributions while the same policy stays imported.
    pub(crate) policy_docs: BTreeMap<String, (StoredPolicy, Arc<cilia_policy::Policy>)>,
    /// Incremental resolution of `policy_docs` against the identities:
    /// synced with both before every use.
    pub(crate) repository: cilia_policy::PolicyRepository,
    /// What each live endpoint's map was last programmed from, so a
    /// change writes only its difference and an endpoint whose inputs did
    /// not change is not touched.
    pub(crate) programmed: BTreeMap<u16, Programmed>,
    /// Endpoints whose policy map this subsystem keeps current: from their
    /// first programming (before their program is attached) until
    /// [`PolicyState::forget`]. A regeneration writes these even while
    /// their record still says `creating`.
    pub(crate) live: std::collections::BTreeSet<u16>,
    /// Whether the ipcache's CIDR entries were reconciled with a walk of
    /// the whole map since start; afterwards only differences are written.
    pub(crate) ipcache_walked: bool,
    /// Local CIDR identities of the CIDRs the policies mention: what the
    /// store holds, once `ipcache_walked`.
    pub(crate) cidr_ids: BTreeMap<ipnet::IpNet, u32>,
    /// The prefixes each policy of `policy_docs` mentions, counted, as of
    /// `cidr_ids` (once `ipcache_walked`).
    pub(crate) cidr_refs: CidrRefs,
    /// The free ids of `cidr_ids` (once `ipcache_walked`).
    pub(crate) cidr_allocator: CidrAllocator,
    /// Stored policies that failed to parse at start-up: they close the
    /// endpoints they may select (see `policy::BrokenPolicy`).
    pub(crate) policy_errors: Vec<policy::BrokenPolicy>,
    /// Rule cookies of the entries in the policy maps.
    pub(crate) rule_cookies: policy::RuleCookies,
    pub(crate) metrics: crate::metrics::AgentMetrics,
    /// The node's addresses, as `host` in the ipcache (see `node`).
    pub(crate) node_addrs: std::collections::BTreeSet<IpAddr>,
    /// Map capacities policy changes are checked against.
    pub(crate) limits: policy::Limits,
    /// The identities `repository` was last given (see `sync_repository`).
    synced: Option<Synced>,
    /// The endpoints that declare port names: (identity, names) by id.
    /// Read from the store once, then kept by the changes that pass here
    /// (`apply_policy`, `plan`, `forget`), so a sync reads no records.
    endpoint_names: Option<BTreeMap<u16, (u32, NamedPorts)>>,
    /// What readers (status, the monitor's names, `bpf policy get`) see of
    /// this state, replaced after every change, so they never wait for it.
    pub(crate) summary: tokio::sync::watch::Sender<Arc<PolicySummary>>,
    /// The L7 proxy's view (see `crate::proxy`), republished with the
    /// summary: every publication bumps its generation, so the proxy's
    /// policy is rebuilt after endpoint changes too (their addresses and
    /// identities name the proxy's clients).
    pub(crate) l7: tokio::sync::watch::Sender<Arc<crate::proxy::L7Summary>>,
    /// Port of the L7 proxy's listeners: the value of proxied entries.
    pub(crate) proxy_port: u16,
    /// The cluster, when the agent is in one: imported policies are written
    /// there first, so one import applies on every node.
    pub(crate) cluster: Option<crate::cluster::ClusterClient>,
    /// Other nodes' ipcache entries (their pods, pod ranges and addresses),
    /// as last written; they take precedence over CIDR identities of the
    /// same prefix, the node's own addresses over them.
    pub(crate) remote_ipcache: BTreeMap<ipnet::IpNet, IpcacheEntry>,
    /// Identities allocated by other nodes, with their labels (from the
    /// cluster), for policies that select peers by label.
    pub(crate) remote_identities: BTreeMap<u32, BTreeMap<String, String>>,
    /// Whether the cluster's policy set was adopted once since start.
    pub(crate) cluster_policies_synced: bool,
}

/// The cache of the labelled identities and the CIDR identities.
fn identity_cache(
    labels: &BTreeMap<u32, Labels>,
    cidr_ids: &BTreeMap<ipnet::IpNet, u32>,
    named: &BTreeMap<u32, NamedPorts>,
) -> IdentityCache {
    let mut cache = IdentityCache::new();
    for (id, l) in labels {
        cache.insert_labels(*id, l.clone());
    }
    for (id, ports) in named {
        cache.set_named_ports(*id, ports.clone());
    }
    for (prefix, id) in cidr_ids {
        cache.insert_cidr(*id, *prefix);
    }
    cache
}

/// Identities as last given to the repository.
struct Synced {
    labels: BTreeMap<u32, Labels>,
    /// The identities' port names (the union over their endpoints).
    named: BTreeMap<u32, NamedPorts>,
    /// The CIDR identities the repository has are `cidr_ids` changed by
    /// this (a plan's change, until it is applied or undone).
    pending: CidrChange,
}

/// The readers' view of the policy subsystem (see [`PolicyState::summary`]).
#[derive(Debug, Default, Clone)]
pub struct PolicySummary {
    /// Imported policies.
    pub documents: usize,
    /// One line per stored policy that no longer parses.
    pub errors: Vec<String>,
    /// Names of the rules behind policy map entries, by rule cookie.
    pub rule_names: policy::RuleNames,
    /// Labels of the identities other nodes allocated (cluster mode), so
    /// flows from their pods are named.
    pub remote_identities: Arc<BTreeMap<u32, BTreeMap<String, String>>>,
}

impl PolicyState {
    pub fn new(
        store: Arc<Store>,
        datapath: DatapathHandle,
        netdev: Arc<dyn Netdev>,
        pools: Pools,
    ) -> Self {
        Self {
            store,
            datapath,
            netdev,
            pools,
            policy_docs: BTreeMap::new(),
            repository: cilia_policy::PolicyRepository::new(),
            programmed: BTreeMap::new(),
            live: std::collections::BTreeSet::new(),
            ipcache_walked: false,
            cidr_ids: BTreeMap::new(),
            cidr_refs: CidrRefs::default(),
            cidr_allocator: CidrAllocator::default(),
            policy_errors: Vec::new(),
            rule_cookies: policy::RuleCookies::default(),
            metrics: crate::metrics::AgentMetrics::default(),
            node_addrs: std::collections::BTreeSet::new(),
            limits: policy::Limits::default(),
            synced: None,
            endpoint_names: None,
            summary: tokio::sync::watch::Sender::new(Arc::default()),
            l7: tokio::sync::watch::Sender::new(Arc::default()),
            proxy_port: cilia_proxy::control::DEFAULT_PROXY_PORT,
            cluster: None,
            remote_ipcache: BTreeMap::new(),
            remote_identities: BTreeMap::new(),
            cluster_policies_synced: false,
        }
    }

    /// Makes the other nodes' ipcache entries `desired`, writing only the
    /// difference. A node address of this node stays `host`; a prefix that
    /// stops being remote falls back to its CIDR identity, if it has one.
    pub fn set_remote_ipcache(
        &mut self,
        desired: BTreeMap<ipnet::IpNet, IpcacheEntry>,
    ) -> Result<(), EndpointError> {
        let publish: Vec<IpcacheEntry> = desired
            .iter()
            .filter(|(p, e)| self.remote_ipcache.get(p) != Some(e) && !self.is_node_prefix(p))
            .map(|(_, e)| *e)
            .collect();
        let mut fallback = Vec::new();
        let mut withdraw = Vec::new();
        for prefix in self
            .remote_ipcache
            .keys()
            .filter(|p| !desired.contains_key(p))
        {
            if self.is_node_prefix(prefix) {
                continue;
            }
            match self.cidr_ids.get(prefix) {
                Some(id) => fallback.push(cidr_entry(prefix, *id)),
                None => withdraw.push(*prefix),
            }
        }
        self.dp().publish_ipcache(&publish)?;
        self.dp().publish_ipcache(&fallback)?;
        self.dp().withdraw_ipcache(&withdraw)?;
        self.remote_ipcache = desired;
        // The L7 proxy names remote clients by these entries.
        self.publish_summary();
        Ok(())
    }

    /// Applies identities other nodes allocated (labels) or that were
    /// deleted (`None`), and regenerates the policy maps if any changed.
    pub fn change_remote_identities(
        &mut self,
        changes: Vec<(u32, Option<BTreeMap<String, String>>)>,
    ) {
        let mut changed = false;
        for (id, labels) in changes {
            changed |= match labels {
                Some(l) => self.remote_identities.insert(id, l.clone()).as_ref() != Some(&l),
                None => self.remote_identities.remove(&id).is_some(),
            };
        }
        if changed {
            if let Err(e) = self.regenerate() {
                warn!(error = %e, "regenerating policies for the cluster's identities failed");
            }
            self.publish_summary();
        }
    }

    /// Applies policies imported on other nodes (`put`, by key) and their
    /// deletions; after the cluster's first full listing (`synced`), also
    /// deletes the local policies the cluster does not hold any more.
    /// Policies equal to the local ones are skipped (a node's own imports
    /// come back this way).
    pub fn apply_cluster_policies(
        &mut self,
        put: &[StoredPolicy],
        delete: &[String],
        synced: bool,
    ) -> Result<(), EndpointError> {
        let mut candidate = self.policy_docs.clone();
        let mut broken = self.policy_errors.clone();
        let mut stored_put = Vec::new();
        let mut stored_delete: Vec<String> = Vec::new();
        for s in put {
            let key = s.key();
            let same = self.policy_docs.get(&key).is_some_and(|(l, _)| l == s)
                || self.policy_errors.iter().any(|b| &b.stored == s);
            if same {
                continue;
            }
            broken.retain(|b| b.stored.key() != key);
            candidate.remove(&key);
            match cilia_policy::parse_policies(&key, &s.yaml) {
                Ok(parsed) => {
                    for p in parsed {
                        candidate.insert(key.clone(), (s.clone(), std::sync::Arc::new(p)));
                    }
                }
                Err(e) => {
                    warn!(policy = %key, error = %e, "a cluster policy does not parse here; it closes the endpoints it may select");
                    broken.push(policy::BrokenPolicy {
                        stored: s.clone(),
                        error: e.to_string(),
                    });
                }
            }
            stored_put.push(s.clone());
        }
        let mut gone: BTreeSet<String> = delete.iter().cloned().collect();
        if synced && !self.cluster_policies_synced {
            self.cluster_policies_synced = true;
            // The cluster's set is the truth: what it does not hold was
            // deleted while this node was away.
            if let Some(cluster) = &self.cluster {
                match cluster.policies() {
                    Ok(all) => {
                        let keys: BTreeSet<String> = all.iter().map(|s| s.key()).collect();
                        let local: Vec<String> = self
                            .policy_docs
                            .keys()
                            .cloned()
                            .chain(self.policy_errors.iter().map(|b| b.stored.key()))
                            .collect();
                        gone.extend(local.into_iter().filter(|k| !keys.contains(k)));
                    }
                    Err(e) => warn!(error = %e, "listing the cluster's policies failed"),
                }
            }
        }
        for key in gone {
            if candidate.remove(&key).is_some() || broken.iter().any(|b| b.stored.key() == key) {
                broken.retain(|b| b.stored.key() != key);
                stored_delete.push(key);
            }
        }
        if stored_put.is_empty() && stored_delete.is_empty() {
            return Ok(());
        }
        let revision =
            self.change_policies_from(candidate, broken, &stored_put, &stored_delete, false)?;
        info!(
            revision,
            put = stored_put.len(),
            deleted = stored_delete.len(),
            "policies from the cluster applied"
        );
        Ok(())
    }

    /// A receiver of the readers' view, current after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<PolicySummary>> {
        self.summary.subscribe()
    }

    /// Publishes the readers' view of the current state.
    fn publish_summary(&self) {
        let summary = PolicySummary {
            documents: self.policy_docs.len(),
            errors: self.policy_errors(),
            rule_names: self.rule_cookies.names(),
            remote_identities: Arc::new(self.remote_identities.clone()),
        };
        self.summary.send_replace(Arc::new(summary));
        self.l7.send_replace(Arc::new(self.l7_summary()));
    }

    /// A receiver of the L7 proxy's view, current after every change.
    pub fn subscribe_l7(&self) -> tokio::sync::watch::Receiver<Arc<crate::proxy::L7Summary>> {
        self.l7.subscribe()
    }

    /// Every programmed endpoint's L7 entries, and the identities of the
    /// prefixes that are not endpoints.
    fn l7_summary(&self) -> crate::proxy::L7Summary {
        let generation = self.l7.borrow().generation.wrapping_add(1);
        let endpoints: BTreeMap<u16, _> = self
            .programmed
            .iter()
            .filter_map(|(id, p)| {
                let merged = p.merged.as_ref()?;
                let entries = crate::datapath::l7_entries(merged);
                (!entries.0.is_empty() || !entries.1.is_empty()).then_some((*id, entries))
            })
            .collect();
        let prefixes = if endpoints.is_empty() {
            Vec::new()
        } else {
            // In the order of precedence, lowest first (the proxy keeps the
            // last of equal prefixes): CIDR identities, other nodes' pods and
            // ranges, the node's own addresses.
            self.cidr_ids
                .iter()
                .map(|(prefix, id)| cilia_proxy::control::PrefixIdentity {
                    prefix: *prefix,
                    identity: *id,
                })
                .chain(self.remote_ipcache.iter().map(|(prefix, e)| {
                    cilia_proxy::control::PrefixIdentity {
                        prefix: *prefix,
                        identity: e.identity,
                    }
                }))
                .chain(
                    self.node_addrs
                        .iter()
                        .map(|ip| cilia_proxy::control::PrefixIdentity {
                            prefix: crate::node::host_prefix(*ip),
                            identity: cilia_policy::reserved::HOST,
                        }),
                )
                .collect()
        };
        crate::proxy::L7Summary {
            generation,
            endpoints,
            prefixes,
        }
    }

    pub(crate) fn dp(&self) -> &dyn cilia_datapath::Datapath {
        self.datapath.as_ref()
    }

    /// Stops keeping an endpoint's policy map (it is being deleted or
    /// rolled back).
    pub fn forget(&mut self, id: u16) {
        self.live.remove(&id);
        self.programmed.remove(&id);
        if let Some(names) = &mut self.endpoint_names {
            names.remove(&id);
        }
        self.publish_summary();
    }

    /// Loads the stored policies (at start-up). Documents that no longer
    /// parse are kept in the store, reported in the status, and close the
    /// endpoints they may select (fail closed, never open).
    pub(crate) fn load_policies(&mut self) -> Result<(), EndpointError> {
        self.policy_docs.clear();
        self.policy_errors.clear();
        for stored in self.store.policies()? {
            match cilia_policy::parse_policies(&stored.key(), &stored.yaml) {
                Ok(parsed) => {
                    for p in parsed {
                        self.policy_docs
                            .insert(stored.key(), (stored.clone(), std::sync::Arc::new(p)));
                    }
                }
                Err(e) => {
                    let broken = policy::BrokenPolicy {
                        stored: stored.clone(),
                        error: e.to_string(),
                    };
                    warn!(policy = %stored.key(), error = %e, "{}", broken.describe());
                    self.policy_errors.push(broken);
                }
            }
        }
        self.publish_summary();
        Ok(())
    }

    pub(crate) fn policies(&self) -> Vec<cilia_policy::Policy> {
        self.policy_docs
            .values()
            .map(|(_, p)| (**p).clone())
            .collect()
    }

    /// Brings the incremental repository up to `policy_docs` and the
    /// identities: the labelled ones (reserved and endpoint identities, a
    /// few) and the CIDR identities, `cidr_ids` changed by `cidr`. Only
    /// what changed since the last sync is given to it (`synced`): the
    /// labels that differ, an earlier plan's unapplied CIDR change undone,
    /// and `cidr`; so the cost follows the change, not the number of CIDR
    /// identities.
    fn sync_repository(&mut self, cidr: &CidrChange) -> Result<(), EndpointError> {
        self.repository
            .set_policies(self.policy_docs.iter().map(|(k, (_, p))| (k.as_str(), p)));
        let labels = self.labelled_identities()?;
        self.load_endpoint_names()?;
        let named = self.identity_named_ports()?;
        let (label_changes, undo) = match self.synced.take() {
            None => {
                self.repository
                    .set_identities(identity_cache(&labels, &self.cidr_ids, &named));
                (Vec::new(), CidrChange::default())
            }
            Some(synced) => {
                let mut named_changes = Vec::new();
                for (id, ports) in &named {
                    if synced.named.get(id) != Some(ports) {
                        named_changes.push((*id, ports.clone()));
                    }
                }
                for id in synced.named.keys().filter(|id| !named.contains_key(id)) {
                    named_changes.push((*id, NamedPorts::new()));
                }
                self.repository.change_named_ports(named_changes);
                let mut label_changes = Vec::new();
                for (id, l) in &labels {
                    if synced.labels.get(id) != Some(l) {
                        label_changes.push((*id, Some(l.clone())));
                    }
                }
                for id in synced.labels.keys().filter(|id| !labels.contains_key(id)) {
                    label_changes.push((*id, None));
                }
                (label_changes, synced.pending)
            }
        };
        // In order, removals before additions each time: an id may move
        // from one prefix to another.
        let cidr_changes = undo
            .added
            .iter()
            .map(|(_, id)| (*id, None))
            .chain(undo.gone.iter().map(|(p, id)| (*id, Some(*p))))
            .chain(cidr.gone.iter().map(|(_, id)| (*id, None)))
            .chain(cidr.added.iter().map(|(p, id)| (*id, Some(*p))));
        self.repository
            .change_identities(label_changes, cidr_changes);
        self.synced = Some(Synced {
            labels,
            named,
            pending: cidr.clone(),
        });
        Ok(())
    }

    /// The reserved identities and the endpoints' identities, with their labels.
    fn labelled_identities(&self) -> Result<BTreeMap<u32, Labels>, EndpointError> {
        let mut out: BTreeMap<u32, Labels> = RESERVED
            .iter()
            .map(|&(id, name)| (id, cilia_policy::reserved::labels(name)))
            .collect();
        for (id, labels) in &self.remote_identities {
            out.insert(*id, Labels(labels.clone()));
        }
        for (id, labels) in self.store.identities()? {
            out.insert(id, Labels(labels));
        }
        Ok(out)
    }

    /// Records what `rec` declares in `endpoint_names` (once those are loaded).
    fn note_endpoint(&mut self, rec: &EndpointRecord) {
        let Some(names) = &mut self.endpoint_names else {
            return;
        };
        if rec.named_ports.is_empty() || rec.identity == 0 {
            names.remove(&rec.id);
        } else {
            names.insert(
                rec.id,
                (rec.identity, policy::named_ports_of(&rec.named_ports)),
            );
        }
    }

    /// Loads `endpoint_names` from the store, the first time.
    fn load_endpoint_names(&mut self) -> Result<(), EndpointError> {
        if self.endpoint_names.is_none() {
            let recs = self.store.endpoints()?;
            self.note_endpoints(&recs);
        }
        Ok(())
    }

    /// Makes `endpoint_names` those of `recs` (every endpoint record).
    fn note_endpoints(&mut self, recs: &[EndpointRecord]) {
        self.endpoint_names = Some(BTreeMap::new());
        for rec in recs {
            self.note_endpoint(rec);
        }
    }

    /// The port names of each identity: the union over the endpoints
    /// carrying it (what egress rules' named ports resolve against).
    /// Reads the store when `endpoint_names` is not loaded yet.
    fn identity_named_ports(&self) -> Result<BTreeMap<u32, NamedPorts>, EndpointError> {
        let mut out: BTreeMap<u32, NamedPorts> = BTreeMap::new();
        let mut add = |identity: u32, ports: &NamedPorts| {
            out.entry(identity).or_default().extend(ports);
        };
        match &self.endpoint_names {
            Some(names) => names.values().for_each(|(id, ports)| add(*id, ports)),
            None => {
                for rec in self.store.endpoints()? {
                    if !rec.named_ports.is_empty() && rec.identity != 0 {
                        add(rec.identity, &policy::named_ports_of(&rec.named_ports));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Forgets what every map was programmed from, so the next
    /// regeneration writes every ready endpoint's map (after the maps were
    /// re-created, say).
    pub fn forget_programmed(&mut self) {
        self.programmed.clear();
        self.ipcache_walked = false;
    }

    pub fn policy_revision(&self) -> Result<u64, EndpointError> {
        Ok(self.store.policy_revision()?)
    }

    pub fn policy_documents(&self) -> Vec<StoredPolicy> {
        self.policy_docs.values().map(|(s, _)| s.clone()).collect()
    }

    /// One line per stored policy that no longer parses: its name, what
    /// it closes and the parse error.
    pub fn policy_errors(&self) -> Vec<String> {
        self.policy_errors.iter().map(|b| b.describe()).collect()
    }

    /// The rule a policy map entry's cookie stands for.
    pub fn rule_name(&self, cookie: u32) -> Option<String> {
        self.rule_cookies.name(cookie)
    }

    /// Every identity the resolver may select.
    pub(crate) fn identity_cache(&self) -> Result<IdentityCache, EndpointError> {
        Ok(identity_cache(
            &self.labelled_identities()?,
            &self.cidr_ids,
            &self.identity_named_ports()?,
        ))
    }

    fn subject_labels(
        rec: &EndpointRecord,
        namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> BTreeMap<String, String> {
        let empty = BTreeMap::new();
        let ns_labels = namespaces.get(&rec.namespace).unwrap_or(&empty);
        security_labels(&rec.labels, &rec.namespace, ns_labels)
    }

    /// Resolves and programs one endpoint's policy map, whole (its map
    /// may be new, or gone with a detached program).
    pub(crate) fn apply_policy(&mut self, rec: &EndpointRecord) -> Result<(), EndpointError> {
        let namespaces = self.store.namespaces()?;
        self.load_endpoint_names()?;
        self.note_endpoint(rec);
        self.sync_repository(&CidrChange::default())?;
        let basis = self.endpoint_basis(rec, &namespaces);
        self.programmed.remove(&rec.id);
        let programmed = match self.plan_endpoint(rec, basis, &mut Vec::new()) {
            Ok(Some(planned)) => self.program(planned),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        self.publish_summary();
        programmed
    }

    /// Writes one endpoint's planned change; on failure what it was
    /// programmed from is forgotten, so the next regeneration writes it
    /// whole.
    fn program(&mut self, planned: PlannedEndpoint) -> Result<(), EndpointError> {
        self.live.insert(planned.id);
        match planned.change {
            Change::Delta { steps, audit } => {
                for step in &steps {
                    if let Err(e) = self.dp().update_endpoint_policy(planned.id, step) {
                        self.programmed.remove(&planned.id);
                        return Err(e.into());
                    }
                }
                if let Some(p) = self.programmed.get_mut(&planned.id) {
                    p.audit = audit;
                }
            }
            Change::Full {
                policy,
                merged,
                audit,
            } => {
                self.programmed.remove(&planned.id);
                self.dp().set_endpoint_policy(planned.id, &policy)?;
                self.programmed
                    .insert(planned.id, Programmed { merged, audit });
            }
        }
        Ok(())
    }

    /// What an endpoint's resolution is merged from (`None`: closed, since
    /// a broken stored policy may select it). The repository is synced.
    fn endpoint_basis(
        &mut self,
        rec: &EndpointRecord,
        namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Option<cilia_policy::Basis> {
        if self
            .policy_errors
            .iter()
            .any(|b| b.may_select(&rec.namespace))
        {
            return None;
        }
        let subject = Labels(Self::subject_labels(rec, namespaces));
        let ports = policy::named_ports_of(&rec.named_ports);
        Some(self.repository.basis_with_ports(&subject, &ports))
    }

    /// One endpoint's change toward `basis`, checked against the map's
    /// capacity; `None` when its map stays as it is. An endpoint programmed
    /// before moves its merged policy (recorded in `moved`) and gets the
    /// difference; any other gets its whole map.
    fn plan_endpoint(
        &mut self,
        rec: &EndpointRecord,
        basis: Option<cilia_policy::Basis>,
        moved: &mut Vec<u16>,
    ) -> Result<Option<PlannedEndpoint>, EndpointError> {
        let max = self.limits.policy_entries;
        let audit = rec.policy_audit;
        if let Some(p) = self.programmed.get_mut(&rec.id) {
            let was = p.enforcement();
            match (&mut p.merged, &basis) {
                (Some(merged), Some(basis)) => {
                    if merged.basis() == basis && p.audit == audit {
                        // Same inputs, same map: checked again, not rebuilt.
                        policy::check_size(rec.id, map_size(merged.entry_count(), was), max)?;
                        return Ok(None);
                    }
                    let delta = self.repository.update_merged(merged, basis);
                    moved.push(rec.id);
                    let will = enforcement_of(Some(merged), audit);
                    policy::check_size(rec.id, map_size(merged.entry_count(), will), max)?;
                    let proxy_port = self.proxy_port;
                    let removed: Vec<cilia_abi::PolicyEntry> = delta
                        .removed
                        .iter()
                        .map(|e| crate::datapath::policy_entry(&e.entry, 0, proxy_port))
                        .collect();
                    let cookies = &mut self.rule_cookies;
                    let upserted: Vec<cilia_abi::PolicyEntry> = delta
                        .upserted
                        .iter()
                        .map(|e| {
                            let cookie = cookies.cookie_of(&e.rule_ref);
                            crate::datapath::policy_entry(&e.entry, cookie, proxy_port)
                        })
                        .collect();
                    let steps = PolicyDelta::ordered(removed, upserted, was, will);
                    return Ok(Some(PlannedEndpoint {
                        id: rec.id,
                        change: Change::Delta { steps, audit },
                    }));
                }
                (None, None) if p.audit == audit => return Ok(None),
                _ => {}
            }
        }
        let merged = basis.map(|basis| self.repository.merged(&basis));
        let resolved = match &merged {
            Some(m) => m.resolved(),
            None => policy::closed_resolution(),
        };
        let policy = crate::datapath::endpoint_policy(
            &resolved,
            &mut self.rule_cookies,
            audit,
            self.proxy_port,
        );
        policy::check_size(
            rec.id,
            map_size(policy.entries.len(), policy.enforcement),
            max,
        )?;
        Ok(Some(PlannedEndpoint {
            id: rec.id,
            change: Change::Full {
                policy,
                merged,
                audit,
            },
        }))
    }

    /// Moves the merged policies a plan moved back (the plan is dropped
    /// unwritten).
    fn revert(&mut self, moved: &[u16]) {
        for id in moved {
            if let Some(Programmed {
                merged: Some(merged),
                ..
            }) = self.programmed.get_mut(id)
            {
                merged.revert_update();
            }
        }
    }

    /// Everything a regeneration will write, computed and checked before
    /// anything is written: the CIDR identities that come and go (found
    /// from the policies that changed, ids from `cidr_allocator`; at
    /// start-up from the store's whole set), the ipcache's room for them,
    /// and every endpoint's map change. On an error nothing has changed
    /// (what the repository was given is undone by its next sync).
    fn plan(&mut self) -> Result<Plan, EndpointError> {
        let cidr = if self.ipcache_walked {
            // `cidr_ids`, `cidr_refs` and `cidr_allocator` mirror the store
            // since the first regeneration: the change is found from the
            // policies that changed.
            let refs = self.cidr_refs.delta(&self.policy_docs);
            let gone = refs
                .disappear
                .iter()
                .filter_map(|p| self.cidr_ids.get(p).map(|id| (*p, *id)))
                .collect();
            let change = self.cidr_allocator.plan(gone, &refs.appear);
            CidrPlan::Change { refs, change }
        } else {
            let refs = CidrRefs::of(&self.policy_docs);
            let prefixes = refs.prefixes().copied().collect();
            let ids = self.store.plan_cidr_identities(&prefixes)?;
            let change = CidrChange::between(&self.cidr_ids, &ids);
            CidrPlan::Whole {
                refs,
                prefixes,
                change,
            }
        };
        let change = cidr.change();
        // The agent's ipcache entries are the node's addresses and the CIDR
        // prefixes (local endpoints are not entries, see `node`).
        let needed =
            self.node_addrs.len() + self.cidr_ids.len() - change.gone.len() + change.added.len();
        if needed > self.limits.ipcache_entries {
            return Err(policy::ImportError::IpcacheFull {
                needed,
                max: self.limits.ipcache_entries,
            }
            .into());
        }
        let namespaces = self.store.namespaces()?;
        let recs = self.store.endpoints()?;
        self.note_endpoints(&recs);
        self.sync_repository(cidr.change())?;
        let mut endpoints = Vec::new();
        let mut moved = Vec::new();
        for rec in recs {
            let basis = self.endpoint_basis(&rec, &namespaces);
            let live = rec.state == EndpointState::Ready || self.live.contains(&rec.id);
            // Not-live endpoints are checked too: they may come back.
            match self.plan_endpoint(&rec, basis, &mut moved) {
                Ok(Some(planned)) if live => endpoints.push(planned),
                Ok(_) => {}
                Err(e) => {
                    self.revert(&moved);
                    return Err(e);
                }
            }
        }
        Ok(Plan {
            cidr,
            endpoints,
            moved,
        })
    }

    /// Writes a checked plan: CIDR identities (store, then ipcache), the
    /// maps of the ready endpoints that change, then the revision bump.
    fn apply_plan(&mut self, plan: Plan) -> Result<(), EndpointError> {
        if let Err(e) = self.write_cidr_identities(plan.cidr) {
            // No map was written: what they were programmed from is as it was.
            self.revert(&plan.moved);
            return Err(e);
        }
        let mut planned = plan.endpoints.into_iter();
        while let Some(next) = planned.next() {
            if let Err(e) = self.program(next) {
                // The maps after it were not written: they are written
                // whole by the next regeneration.
                for rest in planned {
                    self.programmed.remove(&rest.id);
                }
                return Err(e);
            }
        }
        self.dp().bump_policy_revision()?;
        self.publish_summary();
        Ok(())
    }

    /// Writes a plan's CIDR identities: the store, its mirrors here and
    /// in the repository, then the ipcache.
    fn write_cidr_identities(&mut self, cidr: CidrPlan) -> Result<(), EndpointError> {
        let walk = !self.ipcache_walked;
        match &cidr {
            CidrPlan::Whole {
                prefixes, change, ..
            } => {
                let ids = self.store.sync_cidr_identities(prefixes)?;
                debug_assert_eq!(
                    ids,
                    {
                        let mut planned = self.cidr_ids.clone();
                        change.apply_to(&mut planned);
                        planned
                    },
                    "planned under the same lock"
                );
            }
            CidrPlan::Change { change, .. } => self.store.change_cidr_identities(change)?,
        }
        // The store holds the change: so do its mirrors, and the
        // repository has it for good.
        let change = match cidr {
            CidrPlan::Whole { refs, change, .. } => {
                self.cidr_refs = refs;
                change
            }
            CidrPlan::Change { refs, change } => {
                self.cidr_refs.apply(refs);
                change
            }
        };
        change.apply_to(&mut self.cidr_ids);
        if walk {
            self.cidr_allocator = CidrAllocator::of_used(self.cidr_ids.values());
        } else {
            self.cidr_allocator.apply(&change);
        }
        if let Some(synced) = &mut self.synced {
            synced.pending = CidrChange::default();
        }
        // Until the walk below, the ipcache may hold what an earlier agent
        // wrote: every entry is written once; afterwards, what changed.
        // Should a write fail, the next regeneration walks the map again.
        self.ipcache_walked = false;
        let publish: Vec<IpcacheEntry> = if walk {
            self.cidr_ids
                .iter()
                .filter(|(prefix, _)| {
                    !self.is_node_prefix(prefix) && !self.remote_ipcache.contains_key(prefix)
                })
                .map(|(prefix, id)| cidr_entry(prefix, *id))
                .collect()
        } else {
            // A node address stays `host` whatever a policy's CIDR says.
            change
                .added
                .iter()
                .filter(|(prefix, _)| {
                    !self.is_node_prefix(prefix) && !self.remote_ipcache.contains_key(prefix)
                })
                .map(|(prefix, id)| cidr_entry(prefix, *id))
                .collect()
        };
        self.dp().publish_ipcache(&publish)?;
        let withdraw: Vec<ipnet::IpNet> = if walk {
            let wanted: std::collections::BTreeSet<ipnet::IpNet> =
                self.cidr_ids.keys().map(|p| p.trunc()).collect();
            self.dp()
                .ipcache()?
                .into_iter()
                .filter(|e| {
                    e.identity >= FIRST_CIDR_IDENTITY && !wanted.contains(&e.prefix.trunc())
                })
                .map(|e| e.prefix)
                .collect()
        } else {
            change
                .gone
                .iter()
                .filter(|(prefix, id)| {
                    !self.cidr_ids.contains_key(prefix)
                        && *id >= FIRST_CIDR_IDENTITY
                        && !self.is_node_prefix(prefix)
                        && !self.remote_ipcache.contains_key(prefix)
                })
                .map(|(prefix, _)| *prefix)
                .collect()
        };
        self.dp().withdraw_ipcache(&withdraw)?;
        self.ipcache_walked = true;
        Ok(())
    }

    /// Recomputes and programs every ready endpoint's policy map, then bumps
    /// the datapath's policy revision so established flows meet the new
    /// policy on their next packet.
    pub fn regenerate(&mut self) -> Result<(), EndpointError> {
        let started = std::time::Instant::now();
        let result = self.plan().and_then(|plan| self.apply_plan(plan));
        self.metrics
            .regeneration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Imports policies, all or nothing: replaces same-named ones (a broken
    /// stored one included), keeps the rest. Every check — parsing, CIDR
    /// identities and ipcache room, every endpoint's map size — runs before
    /// the store or a map changes; should writing the datapath still fail,
    /// the store is rolled back and the previous policies re-programmed.
    /// Returns what the import did: documents read, policies created or
    /// replaced, the new revision.
    pub fn import_policies(
        &mut self,
        source: &str,
        yaml: &str,
    ) -> Result<cilia_api::PolicyChange, EndpointError> {
        self.import_policies_from(source, yaml, None)
    }

    /// [`Self::import_policies`], recording where the documents came from
    /// (`origin`: `None` for a local import, `kubernetes` for an object of
    /// the API server), which `cilia policy get` shows.
    pub fn import_policies_from(
        &mut self,
        source: &str,
        yaml: &str,
        origin: Option<&str>,
    ) -> Result<cilia_api::PolicyChange, EndpointError> {
        let mut import = policy::parse_import(source, yaml)?;
        for (stored, _) in &mut import.policies {
            stored.origin = origin.map(str::to_string);
        }
        let parsed = &import.policies;
        let mut candidate = self.policy_docs.clone();
        for (stored, p) in parsed {
            candidate.insert(
                stored.key(),
                (stored.clone(), std::sync::Arc::new(p.clone())),
            );
        }
        // The stored policies and the import together stay within the bounds
        // (README, "Input limits") before any resolution work starts.
        cilia_policy::check_limits(candidate.values().map(|(_, p)| &**p)).map_err(|e| {
            policy::ImportError::Limit {
                file: source.to_string(),
                source: e,
            }
        })?;
        let keys: Vec<String> = parsed.iter().map(|(s, _)| s.key()).collect();
        let mut broken = self.policy_errors.clone();
        broken.retain(|b| !keys.contains(&b.stored.key()));
        let stored: Vec<StoredPolicy> = parsed.iter().map(|(s, _)| s.clone()).collect();
        let existed: Vec<bool> = parsed
            .iter()
            .map(|(s, _)| self.policy_docs.contains_key(&s.key()))
            .collect();
        let revision = self.change_policies(candidate, broken, &stored, &[])?;
        let mut change = cilia_api::PolicyChange {
            revision,
            documents: Some(import.documents),
            notes: import
                .empty
                .iter()
                .map(|i| format!("document {i} is empty: skipped"))
                .collect(),
            ..Default::default()
        };
        for ((s, p), existed) in parsed.iter().zip(existed) {
            let name = format!("{} {}", s.kind, p.qualified_name());
            if existed {
                change.replaced.push(name.clone());
            } else {
                change.created.push(name.clone());
            }
            change.policies.push(name);
        }
        info!(
            revision,
            source,
            documents = import.documents,
            "policies imported"
        );
        Ok(change)
    }

    /// Plans with the candidate policy set, and only if every check passes
    /// stores the change (`put`, `delete`) and programs the plan; rolls the
    /// store and the in-memory set back if programming fails.
    fn change_policies(
        &mut self,
        candidate: BTreeMap<String, (StoredPolicy, std::sync::Arc<cilia_policy::Policy>)>,
        broken: Vec<policy::BrokenPolicy>,
        put: &[StoredPolicy],
        delete: &[String],
    ) -> Result<u64, EndpointError> {
        self.change_policies_from(candidate, broken, put, delete, true)
    }

    /// [`Self::change_policies`]; with `distribute`, a change that passes
    /// every check is written to the cluster before the local store, so
    /// that one import applies on every node (and an unreachable cluster
    /// refuses it, changing nothing).
    fn change_policies_from(
        &mut self,
        candidate: BTreeMap<String, (StoredPolicy, std::sync::Arc<cilia_policy::Policy>)>,
        broken: Vec<policy::BrokenPolicy>,
        put: &[StoredPolicy],
        delete: &[String],
        distribute: bool,
    ) -> Result<u64, EndpointError> {
        let started = std::time::Instant::now();
        let previous_docs = std::mem::replace(&mut self.policy_docs, candidate);
        let previous_broken = std::mem::replace(&mut self.policy_errors, broken);
        let restore_memory = |mgr: &mut Self| {
            mgr.policy_docs = previous_docs.clone();
            mgr.policy_errors = previous_broken.clone();
        };
        let plan = match self.plan() {
            Ok(plan) => plan,
            Err(e) => {
                restore_memory(self);
                return Err(e);
            }
        };
        if distribute {
            if let Some(cluster) = &self.cluster {
                let written = if put.is_empty() {
                    Ok(())
                } else {
                    cluster.put_policies(put)
                }
                .and_then(|()| {
                    if delete.is_empty() {
                        Ok(())
                    } else {
                        cluster.delete_policies(delete)
                    }
                });
                if let Err(e) = written {
                    self.revert(&plan.moved);
                    restore_memory(self);
                    return Err(EndpointError::Cluster(format!(
                        "{e}; the policy change must reach every node, so nothing was changed"
                    )));
                }
            }
        }
        // What the store held for every key this change touches, to put
        // back on failure.
        let touched: Vec<String> = put
            .iter()
            .map(|s| s.key())
            .chain(delete.iter().cloned())
            .collect();
        let stored = self
            .store
            .policies_with_keys(&touched)
            .and_then(|before| Ok((before, self.store.replace_policies(put, delete)?)));
        let (before, revision) = match stored {
            Ok(stored) => stored,
            Err(e) => {
                self.revert(&plan.moved);
                restore_memory(self);
                return Err(e.into());
            }
        };
        let applied = self.apply_plan(plan);
        self.metrics
            .regeneration
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = applied {
            warn!(error = %e, "programming the new policies failed; rolling back");
            let new_only: Vec<String> = touched
                .iter()
                .filter(|k| !before.iter().any(|s| &s.key() == *k))
                .cloned()
                .collect();
            if let Err(re) = self.store.replace_policies(&before, &new_only) {
                warn!(error = %re, "rolling the stored policies back failed");
            }
            restore_memory(self);
            if let Err(re) = self.regenerate() {
                warn!(error = %re, "re-programming the previous policies failed");
            }
            return Err(e);
        }
        Ok(revision)
    }

    /// Deletes policies by name (optionally within one namespace), or all;
    /// stored policies that no longer parse are found by name too.
    pub fn delete_policies(
        &mut self,
        name: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<(u64, Vec<String>), EndpointError> {
        let matches = |s: &StoredPolicy| {
            name.is_none_or(|n| s.name == n)
                && namespace.is_none_or(|ns| s.namespace.as_deref() == Some(ns))
        };
        let mut keys: Vec<String> = Vec::new();
        let mut names = Vec::new();
        for (k, (s, p)) in &self.policy_docs {
            if matches(s) {
                keys.push(k.clone());
                names.push(format!("{} {}", s.kind, p.qualified_name()));
            }
        }
        for b in self.policy_errors.iter().filter(|b| matches(&b.stored)) {
            keys.push(b.stored.key());
            names.push(format!("{} {} (unparsable)", b.stored.kind, b.stored.name));
        }
        if keys.is_empty() {
            return Err(EndpointError::NoSuchPolicy(match (name, namespace) {
                (Some(n), Some(ns)) => {
                    format!("policy {} not found", excerpt(&format!("{ns}/{n}")))
                }
                (Some(n), None) => format!("policy {} not found", excerpt(n)),
                _ => "no policies to delete".into(),
            }));
        }
        let mut candidate = self.policy_docs.clone();
        candidate.retain(|k, _| !keys.contains(k));
        let mut broken = self.policy_errors.clone();
        broken.retain(|b| !keys.contains(&b.stored.key()));
        let revision = self.change_policies(candidate, broken, &[], &keys)?;
        info!(revision, deleted = keys.len(), "policies deleted");
        Ok((revision, names))
    }

    /// Deletes the policies stored under `keys` ([`StoredPolicy::key`]);
    /// keys without a policy are skipped. Returns the new revision, or
    /// `None` when nothing was there.
    pub fn delete_policy_keys(&mut self, keys: &[String]) -> Result<Option<u64>, EndpointError> {
        let present: Vec<String> = keys
            .iter()
            .filter(|k| {
                self.policy_docs.contains_key(*k)
                    || self.policy_errors.iter().any(|b| &b.stored.key() == *k)
            })
            .cloned()
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        let mut candidate = self.policy_docs.clone();
        candidate.retain(|k, _| !present.contains(k));
        let mut broken = self.policy_errors.clone();
        broken.retain(|b| !present.contains(&b.stored.key()));
        let revision = self.change_policies(candidate, broken, &[], &present)?;
        info!(revision, deleted = present.len(), "policies deleted");
        Ok(Some(revision))
    }

    /// Keys of the stored policies that came from `origin`.
    pub fn policy_keys_of_origin(&self, origin: &str) -> Vec<String> {
        self.policy_docs
            .iter()
            .filter(|(_, (s, _))| s.origin.as_deref() == Some(origin))
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn namespaces(&self) -> Result<BTreeMap<String, BTreeMap<String, String>>, EndpointError> {
        let mut out = self.store.namespaces()?;
        for rec in self.store.endpoints()? {
            out.entry(rec.namespace).or_default();
        }
        out.entry(DEFAULT_NAMESPACE.into()).or_default();
        Ok(out)
    }

    /// All identities: reserved, endpoint, CIDR.
    pub fn identities(&self) -> Result<Vec<cilia_api::Identity>, EndpointError> {
        let endpoints = self.store.endpoints()?;
        let mut out: Vec<cilia_api::Identity> = RESERVED
            .iter()
            .map(|(id, name)| cilia_api::Identity {
                id: *id,
                kind: "reserved".into(),
                labels: BTreeMap::from([(format!("reserved:{name}"), String::new())]),
                endpoints: vec![],
            })
            .collect();
        for (id, labels) in self.store.identities()? {
            out.push(cilia_api::Identity {
                id,
                kind: "endpoint".into(),
                labels,
                endpoints: endpoints
                    .iter()
                    .filter(|e| e.identity == id)
                    .map(|e| e.id)
                    .collect(),
            });
        }
        for (id, labels) in &self.remote_identities {
            if out.iter().any(|i| i.id == *id) {
                continue;
            }
            out.push(cilia_api::Identity {
                id: *id,
                kind: "cluster".into(),
                labels: labels.clone(),
                endpoints: vec![],
            });
        }
        out.sort_by_key(|i| i.id);
        for (prefix, id) in &self.cidr_ids {
            out.push(cilia_api::Identity {
                id: *id,
                kind: "cidr".into(),
                labels: BTreeMap::from([
                    (format!("cidr:{prefix}"), String::new()),
                    ("reserved:world".into(), String::new()),
                ]),
                endpoints: vec![],
            });
        }
        Ok(out)
    }

    /// The identity the datapath would give a non-endpoint address.
    fn identity_of_address(&self, ip: IpAddr) -> u32 {
        if ip == self.pools.v6.router()
            || self.pools.v4.as_ref().is_some_and(|p| p.router() == ip)
            || self.node_addrs.contains(&ip)
        {
            return CILIA_ID_HOST;
        }
        self.cidr_ids
            .iter()
            .filter(|(prefix, _)| prefix.contains(&ip))
            .max_by_key(|(prefix, _)| prefix.prefix_len())
            .map(|(_, id)| *id)
            .unwrap_or(CILIA_ID_WORLD)
    }

    /// Interprets a trace party: an endpoint id, an address, or labels.
    /// `hypothetical`: the identity a label set no endpoint has gets.
    pub fn party(&self, spec: &str, hypothetical: u32) -> Result<Party, EndpointError> {
        let endpoints = self.store.endpoints()?;
        let namespaces = self.store.namespaces()?;
        let of_endpoint = |rec: &EndpointRecord, ip: Option<IpAddr>| Party {
            description: format!("endpoint {} ({})", rec.id, rec.namespace),
            endpoint: Some(rec.clone()),
            labels: Some(Self::subject_labels(rec, &namespaces)),
            identity: rec.identity,
            ip: ip.or(Some(IpAddr::V6(rec.ipv6))),
        };
        if let Ok(id) = spec.parse::<u16>() {
            let rec = endpoints
                .iter()
                .find(|r| r.id == id)
                .ok_or(EndpointError::NotFound(id))?;
            return Ok(of_endpoint(rec, None));
        }
        if let Ok(ip) = spec.parse::<IpAddr>() {
            if let Some(rec) = endpoints.iter().find(|r| r.ips().contains(&ip)) {
                return Ok(of_endpoint(rec, Some(ip)));
            }
            return Ok(Party {
                description: format!("address {ip}"),
                endpoint: None,
                labels: None,
                identity: self.identity_of_address(ip),
                ip: Some(ip),
            });
        }
        let mut labels = cilia_api::labels::parse_labels(spec)?;
        let namespace = labels
            .remove(NAMESPACE_LABEL)
            .or_else(|| labels.remove(&format!("k8s:{NAMESPACE_LABEL}")))
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        let empty = BTreeMap::new();
        let sec = security_labels(
            &labels,
            &namespace,
            namespaces.get(&namespace).unwrap_or(&empty),
        );
        let identity = self
            .store
            .identities()?
            .into_iter()
            .find(|(_, l)| *l == sec)
            .map(|(id, _)| id)
            .unwrap_or(hypothetical);
        Ok(Party {
            description: format!("labels {spec}"),
            endpoint: None,
            labels: Some(sec),
            identity,
            ip: None,
        })
    }

    /// Traces a connection from `src` to `dst` on `dport`/`proto` through
    /// the same resolution that programs the maps; with `datapath`, also
    /// through the source endpoint's real program (BPF_PROG_TEST_RUN).
    pub fn trace(
        &mut self,
        src: &str,
        dst: &str,
        proto: u8,
        dport: u16,
        datapath: bool,
    ) -> Result<Trace, EndpointError> {
        let src = self.party(src, HYPOTHETICAL_SRC)?;
        let dst = self.party(dst, HYPOTHETICAL_DST)?;
        let mut cache = self.identity_cache()?;
        for p in [&src, &dst] {
            if let (Some(labels), true) = (&p.labels, is_hypothetical(p.identity)) {
                cache.insert_labels(p.identity, Labels(labels.clone()));
            }
        }
        let policies = self.policies();
        let mut steps = Vec::new();
        for (direction, subject, peer) in [
            (Direction::Egress, &src, &dst),
            (Direction::Ingress, &dst, &src),
        ] {
            let Some(labels) = &subject.labels else {
                continue;
            };
            let programmed = subject
                .endpoint
                .as_ref()
                .and_then(|e| self.programmed.get(&e.id))
                .map(|p| p.merged.as_ref());
            // A hypothetical party is in no programmed map: resolve anew
            // with it in the cache (a closed endpoint stays closed).
            let anew = is_hypothetical(subject.identity) || is_hypothetical(peer.identity);
            let resolved = match programmed {
                Some(None) => policy::closed_resolution(),
                Some(Some(merged)) if !anew => merged.resolved(),
                _ => {
                    let ports = subject
                        .endpoint
                        .as_ref()
                        .map(|e| policy::named_ports_of(&e.named_ports))
                        .unwrap_or_default();
                    cilia_policy::resolve_with_ports(
                        &policies,
                        &Labels(labels.clone()),
                        &ports,
                        &cache,
                    )
                }
            };
            let t = cilia_policy::trace(&resolved, direction, peer.identity, proto, dport);
            steps.push(TraceStep {
                direction,
                subject: subject.description.clone(),
                verdict: t.verdict,
                reason: t.reason,
                rules: t.deciding_rules.iter().map(|r| r.to_string()).collect(),
            });
        }
        let verdict = if steps.iter().any(|s| s.verdict == Verdict::Deny) {
            Verdict::Deny
        } else {
            Verdict::Allow
        };
        let (datapath, datapath_to_proxy) = if datapath {
            let (verdict, to_proxy) = self.trace_datapath(&src, &dst, proto, dport)?;
            (Some(verdict), to_proxy)
        } else {
            (None, false)
        };
        Ok(Trace {
            src,
            dst,
            steps,
            verdict,
            datapath,
            datapath_to_proxy,
        })
    }

    /// Runs the source endpoint's real program on a synthesized first
    /// packet of the flow and removes the conntrack entry it may create;
    /// returns its verdict and whether that entry sends the flow to the L7
    /// proxy.
    fn trace_datapath(
        &mut self,
        src: &Party,
        dst: &Party,
        proto: u8,
        dport: u16,
    ) -> Result<(u32, bool), EndpointError> {
        let rec = src.endpoint.as_ref().ok_or_else(|| {
            EndpointError::Trace("--datapath needs an endpoint as the source".into())
        })?;
        let dst_ip = dst.ip.ok_or_else(|| {
            EndpointError::Trace(
                "--datapath needs a destination with an address (endpoint id or IP)".into(),
            )
        })?;
        let src_ip = match dst_ip {
            IpAddr::V6(_) => IpAddr::V6(rec.ipv6),
            IpAddr::V4(_) => IpAddr::V4(rec.ipv4.ok_or_else(|| {
                EndpointError::Trace(format!("endpoint {} has no IPv4 address", rec.id))
            })?),
        };
        let ifindex = self.netdev.ifindex(&rec.host_ifname).unwrap_or(0);
        const TRACE_SPORT: u16 = 65001;
        let packet = cilia_datapath::packet::flow_packet(
            rec.host_mac,
            rec.mac,
            src_ip,
            dst_ip,
            proto,
            TRACE_SPORT,
            dport,
        );
        let verdict = self.dp().test_run(&config_of(rec, ifindex), &packet)?;
        let icmp = proto == 1 || proto == 58;
        // ICMP echo: the identifier stands in for both ports.
        let dport = if icmp { TRACE_SPORT } else { dport };
        let (source, destination) = (
            SocketAddr::new(src_ip, TRACE_SPORT),
            SocketAddr::new(dst_ip, dport),
        );
        let to_proxy = self
            .dp()
            .conntrack()?
            .iter()
            .any(|e| e.source == source && e.destination == destination && e.to_proxy);
        self.dp().remove_conntrack(&CtEntry {
            proto,
            source,
            destination,
            src_identity: 0,
            dst_identity: 0,
            packets: 0,
            bytes: 0,
            expires_ns: 0,
            seen_reply: false,
            closing: false,
            denied: false,
            policy_revision: 0,
            owner: 0,
            to_proxy: false,
            from_proxy: false,
            proxy_port: 0,
            service: false,
            rev_nat: 0,
            backend_id: 0,
        })?;
        Ok((verdict, to_proxy))
    }
}
