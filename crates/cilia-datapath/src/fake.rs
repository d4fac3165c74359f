//! An in-memory [`Datapath`]: no kernel, no root, for unit tests of the
//! agent's bookkeeping (policy repository, endpoint lifecycle, restore).
//!
//! It keeps what the kernel would: policy, ipcache, endpoints and
//! conntrack as *encoded* map entries (through `cilia_abi::rows`, like
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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use cilia_abi::{
    CtEntry, CtKey, CtValue, EndpointConfig, EndpointEntry, EndpointPolicy, Event, IpcacheEntry,
    IpcacheKey, IpcacheValue, MetricsEntry, MetricsKey, MetricsValue, NodeConfig, NodeConfigValue,
    PolicyDelta, PolicyKey, PolicyValue,
};
use ipnet::IpNet;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::endpoint::{EndpointReload, LinkCheck, LinkSwap, PolicyUpdate};
use crate::error::DatapathError;
use crate::events::EventReader;
use crate::interface::{Datapath, LoadedPrograms};
use crate::node::NodeLinks;

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
    pub ct: HashMap<CtKey, CtValue>,
    pub metrics: BTreeMap<MetricsKey, MetricsValue>,
    pub policy_revision: u32,
    pub ct_budget: u32,
    pub monitor_level: u32,
    /// Live conntrack entries at the last GC.
    pub ct_live: Option<u64>,
    /// The "clock" conntrack GC compares expiries with, in ns.
    pub now_ns: u64,
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
        if let Some(gate) = lock(&self.hooks).gates.remove(operation) {
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
        Ok(())
    }
    fn detach_endpoint(&self, endpoint_id: u16) -> Result<(), DatapathError> {
        self.enter("detach_endpoint")?;
        let mut state = self.state();
        state.attached.remove(&endpoint_id);
        state.policy.remove(&endpoint_id);
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
            config_matches: attached == expected,
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
        let swapped = force || attached != *config || state.other_build.contains(&id);
        if swapped {
            state.attached.insert(id, *config);
            state.other_build.remove(&id);
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
        self.state().policy.remove(&endpoint_id);
        Ok(())
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
    fn gc_conntrack(&self) -> Result<usize, DatapathError> {
        self.enter("gc_conntrack")?;
        let mut state = self.state();
        let now = state.now_ns;
        let before = state.ct.len();
        state.ct.retain(|_, v| v.expires > now);
        state.ct_live = Some(state.ct.len() as u64);
        Ok(before - state.ct.len())
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
    fn upsert_lb_backends(&self, _backends: &[cilia_abi::LbBackend]) -> Result<(), DatapathError> {
        Err(DatapathError::Unimplemented("load balancing"))
    }
    fn remove_lb_backends(&self, _ids: &[u32]) -> Result<(), DatapathError> {
        Err(DatapathError::Unimplemented("load balancing"))
    }
    fn upsert_lb_service(&self, _service: &cilia_abi::LbService) -> Result<(), DatapathError> {
        Err(DatapathError::Unimplemented("load balancing"))
    }
    fn remove_lb_service(
        &self,
        _frontend: &cilia_abi::LbFrontend,
        _rev_nat: u16,
    ) -> Result<(), DatapathError> {
        Err(DatapathError::Unimplemented("load balancing"))
    }
    fn lb_services(&self) -> Result<Vec<cilia_abi::LbService>, DatapathError> {
        Err(DatapathError::Unimplemented("load balancing"))
    }
    fn lb_backends(&self) -> Result<Vec<cilia_abi::LbBackend>, DatapathError> {
        Err(DatapathError::Unimplemented("load balancing"))
    }
    fn set_maglev_size(&self, _size: u32) -> Result<(), DatapathError> {
        Err(DatapathError::Unimplemented("load balancing"))
    }
    fn upsert_nodeport_service(
        &self,
        service: &cilia_abi::LbService,
        _options: crate::NodePortOptions,
    ) -> Result<(), DatapathError> {
        // The fake keeps services as the LB methods do; the traffic
        // policy and mode matter only to packets.
        self.upsert_lb_service(service)
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
        assert_eq!(dp.gc_conntrack().unwrap(), 1);
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
}
