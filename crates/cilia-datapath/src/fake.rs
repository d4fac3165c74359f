//! An in-memory [`Datapath`]: no kernel, no root, for unit tests of the
//! agent's bookkeeping (policy repository, endpoint lifecycle, restore).
//!
//! It keeps what the kernel would: policy, ipcache, endpoints, the load
//! balancer and conntrack as *encoded* map entries (through
//! `cilia_abi::rows`, like
//! [`crate::BpfDatapath`]), so a test also exercises the encoding. The
//! state is public ([`FakeDatapath::state`]) for tests to inspect and
//! arrange (attached programs of another build, a link on the wrong
//! device, conntrack rows).
//!
//! Hooks, by operation name (the [`Datapath`] method's name):
//! * [`FakeDatapath::fail_next`]: the next N calls fail with
//!   [`DatapathError::Injected`];
//! * [`FakeDatapath::gate`]: calls block until the returned [`Gate`] is
//!   released (at most 10 s), so a test can hold a slow walk open;
//! * [`FakeDatapath::calls`]: how often an operation was called;
//! * [`FakeDatapath::event_sender`]: events for the reader
//!   [`Datapath::event_reader`] hands out.
//!
//! Compiled always, not behind a feature: it is small, needs nothing
//! beyond this crate's dependencies, and a feature enabled only by
//! dev-dependencies would make a crate's normal and test builds compile
//! this crate differently.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use cilia_abi::{
    CtEntry, CtKey, CtValue, EndpointConfig, EndpointEntry, EndpointPolicy, Event, IpcacheEntry,
    IpcacheKey, IpcacheValue, LbBackend, LbBackendValue, LbFrontend, LbMaster, LbRevNatValue,
    LbService, LbServiceKey, LbServiceValue, LbStats, MetricsEntry, MetricsKey, MetricsValue,
    NodeConfig, NodeConfigValue, PolicyDelta, PolicyKey, PolicyValue, PrefilterCount,
    PrefilterEntry, PrefilterKey, PrefilterValue,
};
use ipnet::IpNet;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::endpoint::{EndpointReload, LinkCheck, LinkSwap, PolicyUpdate};
use crate::error::DatapathError;
use crate::events::EventReader;
use crate::interface::{Datapath, LoadedPrograms};
use crate::node::NodeLinks;
use crate::prefilter::{PrefilterLink, PrefilterMode};
use crate::socklb::SocketLbLinks;

/// How long a gated call waits for its release at most.
const GATE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the fake kernel holds. Maps are kept encoded, as the kernel has
/// them.
#[derive(Debug, Default, Clone)]
pub struct FakeState {
    /// Configuration of each endpoint's attached programs (their links).
    pub attached: BTreeMap<u16, EndpointConfig>,
    /// Endpoints whose attached programs an older build made.
    pub other_build: BTreeSet<u16>,
    /// Endpoints attached to the generic program (not yet specialized).
    pub generic: BTreeSet<u16>,
    /// Why the generic program cannot be loaded (`None`: it can).
    pub generic_unavailable: Option<String>,
    /// Device the links report instead of the attached one.
    pub link_ifindex: Option<u32>,
    /// Pinned shared maps no longer of this build's layout
    /// ([`Datapath::check_pins`] refuses).
    pub pins_changed: bool,
    pub endpoints: BTreeMap<IpAddr, EndpointEntry>,
    pub ipcache: BTreeMap<IpcacheKey, IpcacheValue>,
    pub policy: BTreeMap<u16, BTreeMap<PolicyKey, PolicyValue>>,
    /// Successful policy writes (set or update), per endpoint.
    pub policy_writes: BTreeMap<u16, usize>,
    /// Ids with a spare (empty, unused) policy map.
    pub policy_spares: std::collections::BTreeSet<u16>,
    pub ct: HashMap<CtKey, CtValue>,
    pub metrics: BTreeMap<MetricsKey, MetricsValue>,
    pub policy_revision: u32,
    pub ct_budget: u32,
    pub monitor_level: u32,
    /// Live conntrack entries at the last GC.
    pub ct_live: Option<u64>,
    /// The "clock" conntrack GC compares expiries with, in ns.
    pub now_ns: u64,
    /// What [`Datapath::ct_pressure`] answers (cleared by a GC, as a GC
    /// resets the counts the real one compares with).
    pub ct_pressure: bool,
    /// What [`Datapath::ct_budget_use`] reports each endpoint holds.
    pub ct_held: BTreeMap<u16, u32>,
    /// What [`Datapath::test_run`] answers.
    pub test_verdict: u32,
    /// The node's tunnel settings, encoded.
    pub node_config: NodeConfigValue,
    /// Underlay addresses in the nodes map.
    pub nodes: BTreeSet<IpAddr>,
    /// Device the overlay programs are attached to.
    pub overlay_device: Option<String>,
    /// Device the native-routing program is attached to.
    pub netdev_device: Option<String>,
    /// Node links swapped by [`Datapath::reload_node_programs`].
    pub node_reloads: usize,
    /// The cgroup the socket LB is attached to.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Cookies of the namespaces the socket LB serves.
    pub lb_netns: BTreeSet<u64>,
    /// The backends map (backend id -> encoded backend).
    pub lb_backends: BTreeMap<u32, LbBackendValue>,
    /// The services map: each frontend's master entry and the slots of
    /// its generation(s), encoded.
    pub lb_services: BTreeMap<LbServiceKey, LbServiceValue>,
    /// The rev-NAT map.
    pub lb_revnat: BTreeMap<u16, LbRevNatValue>,
    /// Each service's Maglev table, by rev-NAT id.
    pub lb_maglev: BTreeMap<u16, Vec<u32>>,
    /// Successful service writes (upserts), by rev-NAT id.
    pub lb_service_writes: BTreeMap<u16, usize>,
    /// The configured Maglev table size (0: not set, the default applies).
    pub maglev_size: u32,
    /// Per-service counters, by rev-NAT id (summed over CPUs).
    pub lb_stats: BTreeMap<u16, LbStats>,
    /// Devices the prefilter is attached to, with their mode.
    pub prefilter_links: BTreeMap<String, PrefilterMode>,
    /// Devices whose "driver" refuses native XDP (the prefilter falls
    /// back to generic mode there).
    pub prefilter_no_native: BTreeSet<String>,
    /// Devices NodePort acceleration runs on, with their mode.
    pub lb_acceleration_links: BTreeMap<String, PrefilterMode>,
    /// The prefilter tries, encoded.
    pub prefilter: BTreeMap<PrefilterKey, PrefilterValue>,
    /// Drops per counter slot (packets, bytes), for tests to arrange.
    pub prefilter_counters: BTreeMap<u32, (u64, u64)>,
}

#[derive(Debug, Default)]
struct GateState {
    entered: usize,
    released: bool,
}

/// Holds the calls of one operation until released (see
/// [`FakeDatapath::gate`]). Dropping it releases them.
#[derive(Debug, Clone)]
pub struct Gate {
    shared: Arc<(Mutex<GateState>, Condvar)>,
}

impl Gate {
    /// Waits until `calls` calls have reached the gate (or `timeout`
    /// passed); returns whether they did.
    pub fn wait_entered(&self, calls: usize, timeout: Duration) -> bool {
        let (state, cond) = &*self.shared;
        let guard = lock(state);
        let (guard, _) = cond
            .wait_timeout_while(guard, timeout, |s| s.entered < calls)
            .unwrap_or_else(|p| p.into_inner());
        guard.entered >= calls
    }

    /// Lets every held and future call through.
    pub fn release(&self) {
        let (state, cond) = &*self.shared;
        lock(state).released = true;
        cond.notify_all();
    }

    fn pass(&self) {
        let (state, cond) = &*self.shared;
        let mut guard = lock(state);
        guard.entered += 1;
        cond.notify_all();
        let _ = cond
            .wait_timeout_while(guard, GATE_TIMEOUT, |s| !s.released)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Makes the error an injected failure returns.
type MakeError = Arc<dyn Fn() -> DatapathError + Send + Sync>;

#[derive(Default)]
struct Hooks {
    failures: HashMap<&'static str, (usize, Option<MakeError>)>,
    gates: HashMap<&'static str, Gate>,
    calls: HashMap<&'static str, usize>,
}

/// See the module docs.
pub struct FakeDatapath {
    state: Mutex<FakeState>,
    hooks: Mutex<Hooks>,
    events_tx: UnboundedSender<Event>,
    events_rx: Mutex<Option<UnboundedReceiver<Event>>>,
}

impl Default for FakeDatapath {
    fn default() -> Self {
        let (events_tx, events_rx) = unbounded_channel();
        Self {
            state: Mutex::default(),
            hooks: Mutex::default(),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
        }
    }
}

impl std::fmt::Debug for FakeDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDatapath").finish_non_exhaustive()
    }
}

/// The decoded master entries of the services map.
fn masters(state: &FakeState) -> impl Iterator<Item = LbMaster> + '_ {
    state
        .lb_services
        .iter()
        .filter_map(|(k, v)| LbMaster::decode(k, v))
}

/// What the kernel would refuse or a broken caller would cause, as the
/// fake reports it.
fn invalid(operation: &str, reason: String) -> DatapathError {
    DatapathError::io(
        operation.to_string(),
        std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeDatapath {
    pub fn new() -> Self {
        Self::default()
    }

    /// The fake kernel's state, to inspect or arrange. Do not hold the
    /// guard across a call of the datapath: it takes the same lock.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        lock(&self.state)
    }

    /// The next `times` calls of `operation` fail with
    /// [`DatapathError::Injected`], changing nothing.
    pub fn fail_next(&self, operation: &'static str, times: usize) {
        lock(&self.hooks).failures.insert(operation, (times, None));
    }

    /// Like [`Self::fail_next`], failing with the errors `error` makes (a
    /// verifier rejection, a full map, ...).
    pub fn fail_next_with(
        &self,
        operation: &'static str,
        times: usize,
        error: impl Fn() -> DatapathError + Send + Sync + 'static,
    ) {
        lock(&self.hooks)
            .failures
            .insert(operation, (times, Some(Arc::new(error))));
    }

    /// From now on, calls of `operation` wait at the returned gate until it
    /// is released. Replaces an earlier gate of the operation.
    pub fn gate(&self, operation: &'static str) -> Gate {
        let gate = Gate {
            shared: Arc::default(),
        };
        lock(&self.hooks).gates.insert(operation, gate.clone());
        gate
    }

    /// Removes the gate of `operation` (releasing calls held there).
    pub fn ungate(&self, operation: &'static str) {
        let gate = lock(&self.hooks).gates.remove(operation);
        if let Some(gate) = gate {
            gate.release();
        }
    }

    /// How many times `operation` was called (failed calls included).
    pub fn calls(&self, operation: &'static str) -> usize {
        lock(&self.hooks).calls.get(operation).copied().unwrap_or(0)
    }

    /// Sends events to the reader [`Datapath::event_reader`] hands out.
    pub fn event_sender(&self) -> UnboundedSender<Event> {
        self.events_tx.clone()
    }

    /// Writes a conntrack row as the datapath would.
    pub fn insert_conntrack(&self, entry: &CtEntry) {
        self.state().ct.insert(entry.key(), entry.value());
    }

    /// The encoded policy map of an endpoint.
    pub fn policy_map(&self, endpoint_id: u16) -> Option<BTreeMap<PolicyKey, PolicyValue>> {
        self.state().policy.get(&endpoint_id).cloned()
    }

    /// Counts the call, waits at its gate, then fails it if a failure is
    /// due. Every operation starts here.
    fn enter(&self, operation: &'static str) -> Result<(), DatapathError> {
        let gate = {
            let mut hooks = lock(&self.hooks);
            *hooks.calls.entry(operation).or_default() += 1;
            hooks.gates.get(operation).cloned()
        };
        if let Some(gate) = gate {
            gate.pass();
        }
        let mut hooks = lock(&self.hooks);
        match hooks.failures.get_mut(operation) {
            Some((n, make)) if *n > 0 => {
                *n -= 1;
                Err(match make {
                    Some(make) => make(),
                    None => DatapathError::Injected { operation },
                })
            }
            _ => Ok(()),
        }
    }
}

impl Datapath for FakeDatapath {
    fn load_endpoint(&self, config: &EndpointConfig) -> Result<LoadedPrograms, DatapathError> {
        self.enter("load_endpoint")?;
        Ok(LoadedPrograms::new(*config, ()))
    }
    fn attach_endpoint(
        &self,
        loaded: LoadedPrograms,
        _host_ifname: &str,
    ) -> Result<(), DatapathError> {
        self.enter("attach_endpoint")?;
        let config = *loaded.config();
        let mut state = self.state();
        state.attached.insert(config.endpoint_id, config);
        state.other_build.remove(&config.endpoint_id);
        state.generic.remove(&config.endpoint_id);
        Ok(())
    }
    fn attach_endpoint_generic(
        &self,
        config: &EndpointConfig,
        _host_ifname: &str,
    ) -> Result<(), DatapathError> {
        self.enter("attach_endpoint_generic")?;
        let mut state = self.state();
        if let Some(reason) = &state.generic_unavailable {
            return Err(DatapathError::GenericUnavailable(reason.clone()));
        }
        state.attached.insert(config.endpoint_id, *config);
        state.generic.insert(config.endpoint_id);
        Ok(())
    }
    fn prepare_generic(&self) -> Result<(), DatapathError> {
        self.enter("prepare_generic")?;
        match &self.state().generic_unavailable {
            Some(reason) => Err(DatapathError::GenericUnavailable(reason.clone())),
            None => Ok(()),
        }
    }
    fn detach_endpoint(&self, endpoint_id: u16) -> Result<(), DatapathError> {
        self.enter("detach_endpoint")?;
        let mut state = self.state();
        state.generic.remove(&endpoint_id);
        state.attached.remove(&endpoint_id);
        state.policy.remove(&endpoint_id);
        state.policy_spares.remove(&endpoint_id);
        Ok(())
    }
    fn endpoint_attached(&self, endpoint_id: u16) -> bool {
        self.state().attached.contains_key(&endpoint_id)
    }
    fn check_links(
        &self,
        expected: &EndpointConfig,
    ) -> Result<Option<Vec<LinkCheck>>, DatapathError> {
        self.enter("check_links")?;
        let state = self.state();
        let Some(attached) = state.attached.get(&expected.endpoint_id) else {
            return Ok(None);
        };
        let link = LinkCheck {
            ifindex: state.link_ifindex.unwrap_or(attached.ifindex),
            // The generic program has no configuration of its own.
            config_matches: attached == expected && !state.generic.contains(&expected.endpoint_id),
            build_matches: !state.other_build.contains(&expected.endpoint_id),
        };
        Ok(Some(vec![link; 2]))
    }
    fn reload_endpoint(
        &self,
        config: &EndpointConfig,
        force: bool,
    ) -> Result<EndpointReload, DatapathError> {
        self.enter("reload_endpoint")?;
        let mut state = self.state();
        let id = config.endpoint_id;
        let Some(attached) = state.attached.get(&id).copied() else {
            return Err(DatapathError::NotAttached {
                endpoint_id: id,
                pin: format!("links/ep{id}").into(),
            });
        };
        let swapped = force
            || attached != *config
            || state.other_build.contains(&id)
            || state.generic.contains(&id);
        if swapped {
            state.attached.insert(id, *config);
            state.other_build.remove(&id);
            state.generic.remove(&id);
        }
        let links = [
            crate::object::PROG_FROM_CONTAINER,
            crate::object::PROG_TO_CONTAINER,
        ]
        .into_iter()
        .enumerate()
        .map(|(i, program)| LinkSwap {
            program,
            link_id: i as u32 + 1,
            old_program_id: 10 + 2 * i as u32,
            new_program_id: 10 + 2 * i as u32 + u32::from(swapped),
        })
        .collect();
        Ok(EndpointReload { swapped, links })
    }
    fn check_pins(&self) -> Result<(), DatapathError> {
        self.enter("check_pins")?;
        if self.state().pins_changed {
            return Err(DatapathError::IncompatiblePin {
                path: "maps".into(),
                reason: "pinned maps changed (fake)".into(),
            });
        }
        Ok(())
    }
    fn test_run(&self, _config: &EndpointConfig, _packet: &[u8]) -> Result<u32, DatapathError> {
        self.enter("test_run")?;
        Ok(self.state().test_verdict)
    }
    fn publish_endpoint(&self, entry: &EndpointEntry) -> Result<(), DatapathError> {
        self.enter("publish_endpoint")?;
        self.state().endpoints.insert(entry.ip, *entry);
        Ok(())
    }
    fn withdraw_endpoint(&self, ip: IpAddr) -> Result<(), DatapathError> {
        self.enter("withdraw_endpoint")?;
        self.state().endpoints.remove(&ip);
        Ok(())
    }
    fn endpoints(&self) -> Result<Vec<EndpointEntry>, DatapathError> {
        self.enter("endpoints")?;
        Ok(self.state().endpoints.values().copied().collect())
    }
    fn set_endpoint_policy(
        &self,
        endpoint_id: u16,
        policy: &EndpointPolicy,
    ) -> Result<PolicyUpdate, DatapathError> {
        self.enter("set_endpoint_policy")?;
        let new = policy.encode();
        let mut state = self.state();
        state.policy_spares.remove(&endpoint_id);
        let old = state.policy.remove(&endpoint_id).unwrap_or_default();
        let update = PolicyUpdate {
            added: new.iter().filter(|(k, v)| old.get(k) != Some(v)).count(),
            removed: old.keys().filter(|k| !new.contains_key(k)).count(),
        };
        state.policy.insert(endpoint_id, new);
        *state.policy_writes.entry(endpoint_id).or_default() += 1;
        Ok(update)
    }
    fn update_endpoint_policy(
        &self,
        endpoint_id: u16,
        delta: &PolicyDelta,
    ) -> Result<PolicyUpdate, DatapathError> {
        self.enter("update_endpoint_policy")?;
        let (removes, upserts) = delta.encode();
        let mut state = self.state();
        state.policy_spares.remove(&endpoint_id);
        let map = state.policy.entry(endpoint_id).or_default();
        let removed = removes.iter().filter(|k| map.remove(k).is_some()).count();
        let added = upserts.len();
        map.extend(upserts);
        *state.policy_writes.entry(endpoint_id).or_default() += 1;
        Ok(PolicyUpdate { added, removed })
    }
    fn endpoint_policy(&self, endpoint_id: u16) -> Result<Option<EndpointPolicy>, DatapathError> {
        self.enter("endpoint_policy")?;
        Ok(self
            .state()
            .policy
            .get(&endpoint_id)
            .map(EndpointPolicy::decode))
    }
    fn remove_endpoint_policy(&self, endpoint_id: u16) -> Result<(), DatapathError> {
        self.enter("remove_endpoint_policy")?;
        let mut state = self.state();
        state.policy.remove(&endpoint_id);
        state.policy_spares.remove(&endpoint_id);
        Ok(())
    }
    fn spare_endpoint_policy(&self, endpoint_id: u16) -> Result<bool, DatapathError> {
        self.enter("spare_endpoint_policy")?;
        let mut state = self.state();
        if state.policy.contains_key(&endpoint_id) || state.policy_spares.contains(&endpoint_id) {
            return Ok(false);
        }
        state.policy_spares.insert(endpoint_id);
        Ok(true)
    }
    fn endpoint_policy_ids(&self) -> Result<Vec<u16>, DatapathError> {
        self.enter("endpoint_policy_ids")?;
        let state = self.state();
        let mut ids: std::collections::BTreeSet<u16> = state.policy.keys().copied().collect();
        ids.extend(&state.policy_spares);
        Ok(ids.into_iter().collect())
    }
    fn bump_policy_revision(&self) -> Result<u32, DatapathError> {
        self.enter("bump_policy_revision")?;
        let mut state = self.state();
        state.policy_revision = state.policy_revision.wrapping_add(1);
        Ok(state.policy_revision)
    }
    fn publish_ipcache(&self, entries: &[IpcacheEntry]) -> Result<(), DatapathError> {
        self.enter("publish_ipcache")?;
        self.state()
            .ipcache
            .extend(entries.iter().map(|e| (e.key(), e.value())));
        Ok(())
    }
    fn withdraw_ipcache(&self, prefixes: &[IpNet]) -> Result<(), DatapathError> {
        self.enter("withdraw_ipcache")?;
        let mut state = self.state();
        for p in prefixes {
            state.ipcache.remove(&IpcacheEntry::key_of(p));
        }
        Ok(())
    }
    fn ipcache(&self) -> Result<Vec<IpcacheEntry>, DatapathError> {
        self.enter("ipcache")?;
        Ok(self
            .state()
            .ipcache
            .iter()
            .filter_map(|(k, v)| IpcacheEntry::decode(k, v))
            .collect())
    }
    fn conntrack(&self) -> Result<Vec<CtEntry>, DatapathError> {
        self.enter("conntrack")?;
        Ok(self
            .state()
            .ct
            .iter()
            .filter_map(|(k, v)| CtEntry::decode(k, v))
            .collect())
    }
    fn gc_conntrack(&self) -> Result<crate::CtGcReport, DatapathError> {
        self.enter("gc_conntrack")?;
        let mut state = self.state();
        let now = state.now_ns;
        let before = state.ct.len();
        state.ct.retain(|_, v| v.expires > now);
        state.ct_live = Some(state.ct.len() as u64);
        state.ct_pressure = false;
        Ok(crate::CtGcReport {
            expired: before - state.ct.len(),
            closed_early: 0,
        })
    }
    fn ct_pressure(&self) -> Result<bool, DatapathError> {
        self.enter("ct_pressure")?;
        Ok(self.state().ct_pressure)
    }
    fn ct_capacity(&self) -> u32 {
        cilia_abi::CILIA_CT_MAX
    }
    fn ct_budget_use(&self) -> Result<crate::CtBudgetUse, DatapathError> {
        self.enter("ct_budget_use")?;
        let state = self.state();
        Ok(crate::CtBudgetUse {
            budget: match state.ct_budget {
                0 => cilia_abi::CILIA_CT_BUDGET_DEFAULT,
                b => b,
            },
            held: state.ct_held.clone(),
        })
    }
    fn ct_live(&self) -> Option<u64> {
        self.state().ct_live
    }
    fn purge_conntrack(&self, endpoint_id: u16, addrs: &[IpAddr]) -> Result<usize, DatapathError> {
        self.enter("purge_conntrack")?;
        let mut state = self.state();
        let before = state.ct.len();
        state.ct.retain(|k, v| {
            let Some(row) = CtEntry::decode(k, v) else {
                return true;
            };
            !(row.owner == endpoint_id
                || addrs.contains(&row.source.ip())
                || addrs.contains(&row.destination.ip()))
        });
        Ok(before - state.ct.len())
    }
    fn set_node_config(&self, config: &NodeConfig) -> Result<(), DatapathError> {
        self.enter("set_node_config")?;
        self.state().node_config = config.value();
        Ok(())
    }
    fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        self.enter("node_config")?;
        Ok(NodeConfig::decode(&self.state().node_config).unwrap_or_default())
    }
    fn attach_overlay(&self, vxlan_ifname: &str) -> Result<(), DatapathError> {
        self.enter("attach_overlay")?;
        self.state().overlay_device = Some(vxlan_ifname.to_string());
        Ok(())
    }
    fn attach_netdev(&self, ifname: &str) -> Result<(), DatapathError> {
        self.enter("attach_netdev")?;
        self.state().netdev_device = Some(ifname.to_string());
        Ok(())
    }
    fn detach_node_programs(&self) -> Result<(), DatapathError> {
        self.enter("detach_node_programs")?;
        let mut state = self.state();
        state.overlay_device = None;
        state.netdev_device = None;
        Ok(())
    }
    fn detach_overlay(&self) -> Result<(), DatapathError> {
        self.enter("detach_overlay")?;
        self.state().overlay_device = None;
        Ok(())
    }
    fn detach_netdev(&self) -> Result<(), DatapathError> {
        self.enter("detach_netdev")?;
        self.state().netdev_device = None;
        Ok(())
    }
    /// The fake has no ifindexes: an attached device reads as ifindex 1.
    fn node_links(&self) -> Result<NodeLinks, DatapathError> {
        self.enter("node_links")?;
        let state = self.state();
        Ok(NodeLinks {
            overlay: state.overlay_device.as_ref().map(|_| 1),
            netdev: state.netdev_device.as_ref().map(|_| 1),
        })
    }
    fn reload_node_programs(&self) -> Result<usize, DatapathError> {
        self.enter("reload_node_programs")?;
        let mut state = self.state();
        let swapped = 2 * usize::from(state.overlay_device.is_some())
            + usize::from(state.netdev_device.is_some());
        state.node_reloads += swapped;
        Ok(swapped)
    }
    fn publish_nodes(&self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        self.enter("publish_nodes")?;
        self.state().nodes.extend(addrs.iter().copied());
        Ok(())
    }
    fn withdraw_nodes(&self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        self.enter("withdraw_nodes")?;
        let mut state = self.state();
        for ip in addrs {
            state.nodes.remove(ip);
        }
        Ok(())
    }
    fn nodes(&self) -> Result<Vec<IpAddr>, DatapathError> {
        self.enter("nodes")?;
        Ok(self.state().nodes.iter().copied().collect())
    }
    fn remove_conntrack(&self, entry: &CtEntry) -> Result<(), DatapathError> {
        self.enter("remove_conntrack")?;
        self.state().ct.remove(&entry.key());
        Ok(())
    }
    fn set_ct_budget(&self, budget: u32) -> Result<(), DatapathError> {
        self.enter("set_ct_budget")?;
        self.state().ct_budget = budget;
        Ok(())
    }
    fn attach_socket_lb(&self, cgroup: &Path) -> Result<(), DatapathError> {
        self.enter("attach_socket_lb")?;
        self.state().socket_lb_cgroup = Some(cgroup.to_path_buf());
        Ok(())
    }
    fn detach_socket_lb(&self) -> Result<(), DatapathError> {
        self.enter("detach_socket_lb")?;
        self.state().socket_lb_cgroup = None;
        Ok(())
    }
    /// The fake has no cgroup ids: an attached socket LB reads as cgroup 1.
    fn socket_lb_links(&self) -> Result<Option<SocketLbLinks>, DatapathError> {
        self.enter("socket_lb_links")?;
        Ok(self
            .state()
            .socket_lb_cgroup
            .as_ref()
            .map(|_| SocketLbLinks {
                cgroup_id: 1,
                programs: crate::socklb::SOCK_LINKS.len(),
            }))
    }
    fn reload_socket_lb(&self) -> Result<usize, DatapathError> {
        self.enter("reload_socket_lb")?;
        Ok(if self.state().socket_lb_cgroup.is_some() {
            crate::socklb::SOCK_LINKS.len()
        } else {
            0
        })
    }
    fn add_lb_netns(&self, cookie: u64, _endpoint_id: u16) -> Result<(), DatapathError> {
        self.enter("add_lb_netns")?;
        self.state().lb_netns.insert(cookie);
        Ok(())
    }
    fn remove_lb_netns(&self, cookie: u64) -> Result<(), DatapathError> {
        self.enter("remove_lb_netns")?;
        self.state().lb_netns.remove(&cookie);
        Ok(())
    }
    fn lb_netns(&self) -> Result<Vec<u64>, DatapathError> {
        self.enter("lb_netns")?;
        Ok(self.state().lb_netns.iter().copied().collect())
    }
    fn upsert_lb_backends(&self, backends: &[LbBackend]) -> Result<(), DatapathError> {
        self.enter("upsert_lb_backends")?;
        let mut state = self.state();
        for b in backends {
            if b.id == 0 {
                return Err(invalid("upsert_lb_backends", "backend id 0".into()));
            }
            state.lb_backends.insert(b.id, b.value());
        }
        Ok(())
    }
    fn remove_lb_backends(&self, ids: &[u32]) -> Result<(), DatapathError> {
        self.enter("remove_lb_backends")?;
        let mut state = self.state();
        for id in ids {
            state.lb_backends.remove(id);
        }
        Ok(())
    }
    /// Writes as the kernel maps hold a service (the other generation's
    /// slots, then the master, then the old slots deleted), refusing what
    /// would make a broken service: a slot or Maglev entry naming a backend
    /// not written before, a Maglev table of another size than the
    /// configured one, a rev-NAT id another frontend uses.
    fn upsert_lb_service(&self, service: &LbService) -> Result<(), DatapathError> {
        self.enter("upsert_lb_service")?;
        let mut state = self.state();
        let name = format!("service {} ({:?})", service.rev_nat, service.frontend);
        if let Some(id) = service
            .slots
            .iter()
            .chain(service.maglev.iter().flatten())
            .find(|id| **id != 0 && !state.lb_backends.contains_key(id))
        {
            return Err(invalid(
                "upsert_lb_service",
                format!("{name}: backend {id} is not in the backends map"),
            ));
        }
        if let Some(table) = &service.maglev {
            let size = match state.maglev_size {
                0 => cilia_abi::CILIA_LB_MAGLEV_SIZE_DEFAULT,
                n => n,
            };
            if table.len() != size as usize {
                return Err(invalid(
                    "upsert_lb_service",
                    format!(
                        "{name}: Maglev table of {} entries, not {size}",
                        table.len()
                    ),
                ));
            }
        }
        if let Some(other) =
            masters(&state).find(|m| m.rev_nat == service.rev_nat && m.frontend != service.frontend)
        {
            return Err(invalid(
                "upsert_lb_service",
                format!("{name}: rev-NAT id used by {:?}", other.frontend),
            ));
        }
        let master_key = service.frontend.master_key();
        let old = state
            .lb_services
            .get(&master_key)
            .and_then(|v| LbMaster::decode(&master_key, v));
        let gen = cilia_abi::lb_other_generation(old.map_or(0, |m| m.gen));
        state
            .lb_revnat
            .insert(service.rev_nat, service.frontend.revnat_value());
        match &service.maglev {
            Some(table) => state.lb_maglev.insert(service.rev_nat, table.clone()),
            None => state.lb_maglev.remove(&service.rev_nat),
        };
        state.lb_services.extend(service.slot_entries(gen));
        state
            .lb_services
            .insert(master_key, service.master_value(gen));
        if let Some(old) = old {
            for slot in 1..=old.count {
                state
                    .lb_services
                    .remove(&service.frontend.key(slot, old.gen));
            }
        }
        *state.lb_service_writes.entry(service.rev_nat).or_default() += 1;
        Ok(())
    }
    fn remove_lb_service(&self, frontend: &LbFrontend, rev_nat: u16) -> Result<(), DatapathError> {
        self.enter("remove_lb_service")?;
        let mut state = self.state();
        let key = frontend.master_key();
        let Some(master) = state
            .lb_services
            .get(&key)
            .and_then(|v| LbMaster::decode(&key, v))
            .filter(|m| m.rev_nat == rev_nat)
        else {
            return Ok(());
        };
        state.lb_services.remove(&key);
        for slot in 1..=master.count {
            state.lb_services.remove(&frontend.key(slot, master.gen));
        }
        state.lb_revnat.remove(&rev_nat);
        state.lb_maglev.remove(&rev_nat);
        state.lb_stats.remove(&rev_nat);
        Ok(())
    }
    fn lb_services(&self) -> Result<Vec<LbService>, DatapathError> {
        self.enter("lb_services")?;
        let state = self.state();
        let mut out: Vec<LbService> = masters(&state)
            .map(|m| {
                let slots = (1..=m.count)
                    .map(|slot| {
                        state
                            .lb_services
                            .get(&m.frontend.key(slot, m.gen))
                            .map_or(0, |v| v.backend_id)
                    })
                    .collect();
                LbService::from_master(&m, slots, state.lb_maglev.get(&m.rev_nat).cloned())
            })
            .collect();
        out.sort_by_key(|s| s.rev_nat);
        Ok(out)
    }
    fn lb_backends(&self) -> Result<Vec<LbBackend>, DatapathError> {
        self.enter("lb_backends")?;
        Ok(self
            .state()
            .lb_backends
            .iter()
            .filter_map(|(id, v)| LbBackend::decode(*id, v))
            .collect())
    }
    fn set_maglev_size(&self, size: u32) -> Result<(), DatapathError> {
        self.enter("set_maglev_size")?;
        self.state().maglev_size = size;
        Ok(())
    }
    fn lb_stats(&self) -> Result<Vec<(u16, LbStats)>, DatapathError> {
        self.enter("lb_stats")?;
        Ok(self
            .state()
            .lb_stats
            .iter()
            .map(|(id, s)| (*id, *s))
            .collect())
    }
    fn attach_prefilter(&self, ifname: &str) -> Result<PrefilterLink, DatapathError> {
        self.enter("attach_prefilter")?;
        let mut state = self.state();
        let (mode, native_error) = match state.prefilter_links.get(ifname) {
            Some(mode) => (*mode, None),
            None if state.prefilter_no_native.contains(ifname) => (
                PrefilterMode::Generic,
                Some("native XDP not supported by the fake device".to_string()),
            ),
            None => (PrefilterMode::Native, None),
        };
        state.prefilter_links.insert(ifname.to_string(), mode);
        Ok(PrefilterLink {
            ifname: ifname.to_string(),
            ifindex: 1,
            mode,
            native_error,
        })
    }
    fn detach_prefilter(&self, ifname: &str) -> Result<(), DatapathError> {
        self.enter("detach_prefilter")?;
        self.state().prefilter_links.remove(ifname);
        Ok(())
    }
    /// The fake has no ifindexes: an attached device reads as ifindex 1.
    fn prefilter_links(&self) -> Result<Vec<PrefilterLink>, DatapathError> {
        self.enter("prefilter_links")?;
        Ok(self
            .state()
            .prefilter_links
            .iter()
            .map(|(ifname, mode)| PrefilterLink {
                ifname: ifname.clone(),
                ifindex: 1,
                mode: *mode,
                native_error: None,
            })
            .collect())
    }
    fn attach_lb_acceleration(
        &self,
        ifname: &str,
        force_generic: bool,
    ) -> Result<PrefilterLink, DatapathError> {
        self.enter("attach_lb_acceleration")?;
        let mut state = self.state();
        let (mode, native_error) = match state.lb_acceleration_links.get(ifname) {
            Some(mode) => (*mode, None),
            None if force_generic => (
                PrefilterMode::Generic,
                Some("generic mode forced".to_string()),
            ),
            None if state.prefilter_no_native.contains(ifname) => (
                PrefilterMode::Generic,
                Some("native XDP not supported by the fake device".to_string()),
            ),
            None => (PrefilterMode::Native, None),
        };
        state.lb_acceleration_links.insert(ifname.to_string(), mode);
        Ok(PrefilterLink {
            ifname: ifname.to_string(),
            ifindex: 1,
            mode,
            native_error,
        })
    }
    fn detach_lb_acceleration(&self, ifname: &str) -> Result<(), DatapathError> {
        self.enter("detach_lb_acceleration")?;
        self.state().lb_acceleration_links.remove(ifname);
        Ok(())
    }
    fn lb_acceleration_links(&self) -> Result<Vec<PrefilterLink>, DatapathError> {
        self.enter("lb_acceleration_links")?;
        Ok(self
            .state()
            .lb_acceleration_links
            .iter()
            .map(|(ifname, mode)| PrefilterLink {
                ifname: ifname.clone(),
                ifindex: 1,
                mode: *mode,
                native_error: None,
            })
            .collect())
    }
    fn upsert_prefilter(&self, entries: &[PrefilterEntry]) -> Result<(), DatapathError> {
        self.enter("upsert_prefilter")?;
        let mut state = self.state();
        for entry in entries {
            let value = entry.value();
            if state.prefilter.get(&entry.key()) != Some(&value) {
                state.prefilter_counters.remove(&entry.counter);
                state.prefilter.insert(entry.key(), value);
            }
        }
        Ok(())
    }
    fn remove_prefilter(&self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        self.enter("remove_prefilter")?;
        let mut state = self.state();
        for cidr in cidrs {
            state.prefilter.remove(&PrefilterKey::of(cidr));
        }
        Ok(())
    }
    fn prefilter(&self) -> Result<Vec<PrefilterCount>, DatapathError> {
        self.enter("prefilter")?;
        let state = self.state();
        let mut out: Vec<PrefilterCount> = state
            .prefilter
            .iter()
            .filter_map(|(key, value)| {
                let entry = match key {
                    PrefilterKey::V4(k) => PrefilterEntry::decode_v4(k, value),
                    PrefilterKey::V6(k) => PrefilterEntry::decode_v6(k, value),
                }?;
                let (packets, bytes) = state
                    .prefilter_counters
                    .get(&entry.counter)
                    .copied()
                    .unwrap_or_default();
                Some(PrefilterCount {
                    entry,
                    packets,
                    bytes,
                })
            })
            .collect();
        out.sort();
        Ok(out)
    }
    fn upsert_nodeport_service(
        &self,
        service: &cilia_abi::LbService,
        options: crate::NodePortOptions,
    ) -> Result<(), DatapathError> {
        // The fake keeps services as the LB methods do; the traffic
        // policy and mode are the master's flags.
        self.upsert_lb_service(&options.apply(service))
    }
    fn metrics(&self) -> Result<Vec<MetricsEntry>, DatapathError> {
        self.enter("metrics")?;
        Ok(self
            .state()
            .metrics
            .iter()
            .map(|(k, v)| MetricsEntry::decode(k, v))
            .collect())
    }
    fn set_monitor_level(&self, level: u32) -> Result<(), DatapathError> {
        self.enter("set_monitor_level")?;
        self.state().monitor_level = level;
        Ok(())
    }
    fn event_reader(&self) -> Result<Option<EventReader>, DatapathError> {
        self.enter("event_reader")?;
        Ok(lock(&self.events_rx).take().map(EventReader::from_channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cilia_abi::{Direction, Enforcement, PolicyEntry, Verdict, CILIA_VERDICT_DENY};

    fn config(id: u16) -> EndpointConfig {
        EndpointConfig {
            endpoint_id: id,
            ifindex: 7,
            ..Default::default()
        }
    }

    fn entry(identity: u32, port: u16, verdict: Verdict) -> PolicyEntry {
        PolicyEntry {
            direction: Direction::Ingress,
            identity,
            proto: 6,
            port,
            port_prefix_len: 16,
            verdict,
            rule: 1,
            proxy_port: 0,
        }
    }

    fn attach(dp: &FakeDatapath, id: u16) {
        let loaded = dp.load_endpoint(&config(id)).unwrap();
        dp.attach_endpoint(loaded, "lxc1").unwrap();
    }

    #[test]
    fn attached_endpoint_reports_matching_links_until_detached() {
        let dp = FakeDatapath::new();
        attach(&dp, 5);
        assert!(dp.endpoint_attached(5));
        let links = dp.check_links(&config(5)).unwrap().unwrap();
        assert!(links.iter().all(|l| l.config_matches && l.build_matches));
        dp.detach_endpoint(5).unwrap();
        assert_eq!(dp.check_links(&config(5)).unwrap(), None);
    }

    #[test]
    fn policy_is_stored_encoded_and_reads_back_decoded() {
        let dp = FakeDatapath::new();
        let policy = EndpointPolicy {
            enforcement: Enforcement {
                ingress: true,
                ..Default::default()
            },
            entries: vec![entry(300, 80, Verdict::Allow)],
        };
        dp.set_endpoint_policy(5, &policy).unwrap();
        assert_eq!(dp.policy_map(5).unwrap(), policy.encode());
        assert_eq!(dp.endpoint_policy(5).unwrap(), Some(policy));
    }

    #[test]
    fn policy_update_touches_only_the_given_keys() {
        let dp = FakeDatapath::new();
        let keep = entry(300, 80, Verdict::Allow);
        let drop = entry(301, 80, Verdict::Allow);
        dp.set_endpoint_policy(
            5,
            &EndpointPolicy {
                entries: vec![keep, drop],
                ..Default::default()
            },
        )
        .unwrap();
        let denied = entry(302, 443, Verdict::Deny);
        let update = dp
            .update_endpoint_policy(
                5,
                &PolicyDelta {
                    upserts: vec![denied],
                    removes: vec![drop],
                    enforcement: None,
                },
            )
            .unwrap();
        assert_eq!((update.added, update.removed), (1, 1));
        let map = dp.policy_map(5).unwrap();
        assert!(map.contains_key(&keep.key()) && !map.contains_key(&drop.key()));
        assert_eq!(map[&denied.key()].verdict, CILIA_VERDICT_DENY);
    }

    #[test]
    fn injected_failures_fail_the_next_calls_only() {
        let dp = FakeDatapath::new();
        dp.fail_next("attach_endpoint", 1);
        let loaded = dp.load_endpoint(&config(5)).unwrap();
        assert!(matches!(
            dp.attach_endpoint(loaded, "lxc1"),
            Err(DatapathError::Injected {
                operation: "attach_endpoint"
            })
        ));
        assert!(!dp.endpoint_attached(5));
        attach(&dp, 5);
        assert!(dp.endpoint_attached(5));
        assert_eq!(dp.calls("attach_endpoint"), 2);
    }

    #[test]
    fn injected_failure_can_carry_a_chosen_error() {
        let dp = FakeDatapath::new();
        dp.fail_next_with("reload_endpoint", 1, || DatapathError::Verifier {
            name: "cil_from_container".into(),
            source: std::io::Error::from_raw_os_error(13),
            summary: "invalid bpf_context access".into(),
        });
        attach(&dp, 5);
        let err = dp.reload_endpoint(&config(5), true).unwrap_err();
        assert!(err.to_string().contains("verifier rejected"), "{err}");
        assert!(dp.reload_endpoint(&config(5), true).unwrap().swapped);
    }

    #[test]
    fn failed_policy_write_changes_nothing_and_is_not_counted() {
        let dp = FakeDatapath::new();
        dp.fail_next("set_endpoint_policy", 1);
        let policy = EndpointPolicy {
            entries: vec![entry(300, 80, Verdict::Allow)],
            ..Default::default()
        };
        assert!(dp.set_endpoint_policy(5, &policy).is_err());
        assert_eq!(dp.policy_map(5), None);
        dp.set_endpoint_policy(5, &policy).unwrap();
        assert_eq!(dp.state().policy_writes[&5], 1);
    }

    #[test]
    fn gated_call_waits_for_release() {
        let dp = Arc::new(FakeDatapath::new());
        let gate = dp.gate("conntrack");
        let walker = {
            let dp = dp.clone();
            std::thread::spawn(move || dp.conntrack().map(|rows| rows.len()))
        };
        assert!(gate.wait_entered(1, Duration::from_secs(5)));
        assert!(!walker.is_finished());
        // Other operations are not held.
        dp.set_ct_budget(10).unwrap();
        gate.release();
        assert_eq!(walker.join().unwrap().unwrap(), 0);
    }

    #[test]
    fn conntrack_gc_removes_expired_rows_and_purge_an_endpoints() {
        let dp = FakeDatapath::new();
        let row = |sport: u16, owner: u16, expires_ns: u64| CtEntry {
            proto: 6,
            source: std::net::SocketAddr::new("fd00::1".parse().unwrap(), sport),
            destination: "[fd00::2]:80".parse().unwrap(),
            src_identity: 300,
            dst_identity: 301,
            packets: 1,
            bytes: 60,
            expires_ns,
            seen_reply: false,
            closing: false,
            denied: false,
            policy_revision: 0,
            owner,
            to_proxy: false,
            from_proxy: false,
            proxy_port: 0,
            service: false,
            rev_nat: 0,
            backend_id: 0,
        };
        dp.insert_conntrack(&row(1000, 5, 10));
        dp.insert_conntrack(&row(1001, 5, 100));
        dp.insert_conntrack(&row(1002, 6, 100));
        dp.state().now_ns = 50;
        assert_eq!(dp.gc_conntrack().unwrap().expired, 1);
        assert_eq!(dp.ct_live(), Some(2));
        assert_eq!(dp.purge_conntrack(5, &[]).unwrap(), 1);
        assert_eq!(dp.conntrack().unwrap(), vec![row(1002, 6, 100)]);
    }

    #[test]
    fn ipcache_round_trips_through_the_encoded_map() {
        let dp = FakeDatapath::new();
        let e = IpcacheEntry {
            prefix: "2001:db8::/32".parse().unwrap(),
            identity: 2,
            tunnel: None,
        };
        dp.publish_ipcache(&[e]).unwrap();
        assert_eq!(dp.ipcache().unwrap(), vec![e]);
        dp.withdraw_ipcache(&[e.prefix]).unwrap();
        assert!(dp.ipcache().unwrap().is_empty());
    }

    #[test]
    fn reload_swaps_only_programs_that_differ_unless_forced() {
        let dp = FakeDatapath::new();
        attach(&dp, 5);
        assert!(!dp.reload_endpoint(&config(5), false).unwrap().swapped);
        assert!(dp.reload_endpoint(&config(5), true).unwrap().swapped);
        dp.state().other_build.insert(5);
        assert!(dp.reload_endpoint(&config(5), false).unwrap().swapped);
        assert!(matches!(
            dp.reload_endpoint(&config(6), false),
            Err(DatapathError::NotAttached { endpoint_id: 6, .. })
        ));
    }

    #[tokio::test]
    async fn events_sent_to_the_fake_reach_its_reader_once() {
        let dp = FakeDatapath::new();
        let mut reader = dp.event_reader().unwrap().unwrap();
        assert!(dp.event_reader().unwrap().is_none());
        let event = Event::from_bytes(&[0u8; std::mem::size_of::<Event>()]).unwrap();
        dp.event_sender().send(event).unwrap();
        let mut out = Vec::new();
        let n = reader.read(&mut out, Duration::from_secs(5)).await.unwrap();
        assert_eq!((n, out), (1, vec![event]));
    }

    fn lb_service(rev_nat: u16, slots: Vec<u32>) -> LbService {
        LbService {
            rev_nat,
            frontend: LbFrontend {
                addr: "2001:db8::10".parse().unwrap(),
                port: 80,
                proto: 6,
            },
            algorithm: cilia_abi::LbAlgorithm::Random,
            affinity_timeout: None,
            slots,
            maglev: None,
            flags: Default::default(),
        }
    }

    fn lb_backend(id: u32) -> LbBackend {
        LbBackend {
            id,
            addr: format!("[2001:db8::{id}]:8080").parse().unwrap(),
            state: cilia_abi::LbBackendState::Active,
        }
    }

    #[test]
    fn a_service_naming_an_unwritten_backend_is_refused() {
        let dp = FakeDatapath::new();
        dp.upsert_lb_backends(&[lb_backend(1)]).unwrap();
        let e = dp
            .upsert_lb_service(&lb_service(7, vec![1, 2]))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("backend 2 is not in the backends map"),
            "{e}"
        );
        dp.upsert_lb_backends(&[lb_backend(2)]).unwrap();
        dp.upsert_lb_service(&lb_service(7, vec![1, 2])).unwrap();
        assert_eq!(dp.lb_services().unwrap(), vec![lb_service(7, vec![1, 2])]);
    }

    #[test]
    fn a_service_update_flips_the_generation_and_deletes_the_old_slots() {
        let dp = FakeDatapath::new();
        dp.upsert_lb_backends(&[lb_backend(1), lb_backend(2), lb_backend(3)])
            .unwrap();
        let first = lb_service(7, vec![1, 2, 3]);
        dp.upsert_lb_service(&first).unwrap();
        dp.upsert_lb_service(&lb_service(7, vec![3])).unwrap();
        {
            let state = dp.state();
            let master = state.lb_services[&first.frontend.master_key()];
            assert_eq!((master.gen, master.count), (2, 1));
            assert_eq!(state.lb_services.len(), 2, "master + one slot of gen 2");
            assert!(state.lb_revnat.contains_key(&7));
        }
        assert_eq!(dp.lb_services().unwrap(), vec![lb_service(7, vec![3])]);
        dp.remove_lb_service(&first.frontend, 7).unwrap();
        let state = dp.state();
        assert!(state.lb_services.is_empty() && state.lb_revnat.is_empty());
    }

    #[test]
    fn a_maglev_table_must_have_the_configured_size() {
        let dp = FakeDatapath::new();
        dp.upsert_lb_backends(&[lb_backend(1)]).unwrap();
        dp.set_maglev_size(1021).unwrap();
        let mut s = lb_service(7, vec![1]);
        s.maglev = Some(vec![1; 16381]);
        assert!(dp.upsert_lb_service(&s).is_err());
        s.maglev = Some(vec![1; 1021]);
        dp.upsert_lb_service(&s).unwrap();
    }

    #[test]
    fn removing_a_service_needs_its_rev_nat_id() {
        let dp = FakeDatapath::new();
        dp.upsert_lb_backends(&[lb_backend(1)]).unwrap();
        let s = lb_service(7, vec![1]);
        dp.upsert_lb_service(&s).unwrap();
        dp.remove_lb_service(&s.frontend, 8).unwrap();
        assert_eq!(dp.lb_services().unwrap().len(), 1);
        dp.remove_lb_service(&s.frontend, 7).unwrap();
        assert!(dp.lb_services().unwrap().is_empty());
        dp.remove_lb_backends(&[1, 99]).unwrap();
        assert!(dp.lb_backends().unwrap().is_empty());
    }
}
