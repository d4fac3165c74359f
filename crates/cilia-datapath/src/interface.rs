//! The datapath as the agent sees it: operations in domain terms —
//! install an endpoint, set its policy, publish ipcache entries, read
//! conntrack as typed rows — over plain rows from [`cilia_abi::rows`].
//!
//! What crosses this interface is never a raw map key or value: every
//! byte-order swap, prefix length and flag bit is encoded and decoded once,
//! in `cilia_abi::rows`. [`BpfDatapath`] implements it on the kernel;
//! [`crate::fake::FakeDatapath`] in memory, storing the same encoded map
//! entries, so the agent's bookkeeping is unit-tested without root.
//!
//! Every method takes `&self`: one `Arc<dyn Datapath>` is shared by every
//! subsystem of the agent without an outer lock. [`BpfDatapath`] locks each
//! map handle on its own, only for its syscalls, so a conntrack walk never
//! waits behind a policy write; writes of one endpoint's policy are
//! serialized per endpoint. Ordering the lifecycle of one endpoint
//! (attach, reload, detach) is the caller's job.

use std::any::Any;
use std::net::IpAddr;
use std::path::Path;

use cilia_abi::{
    CtEntry, EndpointConfig, EndpointEntry, EndpointPolicy, IpcacheEntry, LbBackend, LbFrontend,
    LbService, LbStats, MetricsEntry, NodeConfig, PolicyDelta, PrefilterCount, PrefilterEntry,
};
use ipnet::IpNet;

use crate::endpoint::{BpfDatapath, EndpointReload, LinkCheck, LoadedEndpoint, PolicyUpdate};
use crate::error::DatapathError;
use crate::events::EventReader;
use crate::node::NodeLinks;
use crate::nodeport::NodePortOptions;
use crate::prefilter::PrefilterLink;
use crate::socklb::SocketLbLinks;

/// What one conntrack GC removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtGcReport {
    /// Entries past their lifetime.
    pub expired: usize,
    /// Entries of TCP connections that ended, removed before their close
    /// timeout because their endpoint neared its budget.
    pub closed_early: usize,
}

/// The per-endpoint conntrack budget in force and what endpoints hold
/// against it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtBudgetUse {
    /// Entries one endpoint may hold.
    pub budget: u32,
    /// Endpoint id -> entries it holds (those holding none absent; 0:
    /// flows charged to no local endpoint).
    pub held: std::collections::BTreeMap<u16, u32>,
}

/// An endpoint's programs loaded and verified by
/// [`Datapath::load_endpoint`], not yet attached; what is inside is the
/// implementation's business.
pub struct LoadedPrograms {
    config: EndpointConfig,
    programs: Box<dyn Any + Send>,
}

impl LoadedPrograms {
    /// Wraps an implementation's loaded programs for `config`.
    pub fn new(config: EndpointConfig, programs: impl Any + Send) -> Self {
        Self {
            config,
            programs: Box::new(programs),
        }
    }

    /// The configuration the programs were specialized for.
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// The implementation's programs, if they are a `T`.
    pub fn into_programs<T: Any>(self) -> Option<T> {
        self.programs.downcast::<T>().ok().map(|b| *b)
    }
}

impl std::fmt::Debug for LoadedPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPrograms")
            .field("endpoint_id", &self.config.endpoint_id)
            .finish()
    }
}

pub trait Datapath: Send + Sync {
    // Endpoint programs.

    /// Specializes and verifies an endpoint's programs. Touches no shared
    /// state, so loads of different endpoints run in parallel.
    fn load_endpoint(&self, config: &EndpointConfig) -> Result<LoadedPrograms, DatapathError>;
    /// Attaches loaded programs to the endpoint's host-side device, swapping
    /// them atomically into its pinned links when it has some.
    fn attach_endpoint(
        &self,
        loaded: LoadedPrograms,
        host_ifname: &str,
    ) -> Result<(), DatapathError>;
    /// Attaches the agent's one generic endpoint program (verified once;
    /// `config` goes into its map) to the endpoint's host-side device: the
    /// endpoint is enforced at once, without a verifier run. Attach its
    /// specialized programs later with [`Datapath::attach_endpoint`], which
    /// swaps them into the same links.
    /// [`DatapathError::GenericUnavailable`] when this kernel cannot verify
    /// the generic program.
    fn attach_endpoint_generic(
        &self,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError>;
    /// Loads the generic program ahead of the first endpoint that needs it.
    fn prepare_generic(&self) -> Result<(), DatapathError>;
    /// Detaches the endpoint's programs and removes its policy. Nothing to
    /// remove is not an error.
    fn detach_endpoint(&self, endpoint_id: u16) -> Result<(), DatapathError>;
    fn endpoint_attached(&self, endpoint_id: u16) -> bool;
    /// How the endpoint's pinned links stand against `expected` (device,
    /// baked-in configuration, build); `None` when a link pin is missing.
    fn check_links(
        &self,
        expected: &EndpointConfig,
    ) -> Result<Option<Vec<LinkCheck>>, DatapathError>;
    /// Re-specializes an attached endpoint from this build and swaps the
    /// programs into its links; a rejected program leaves the old attached.
    /// Without `force`, programs already this build's with `config` stay.
    fn reload_endpoint(
        &self,
        config: &EndpointConfig,
        force: bool,
    ) -> Result<EndpointReload, DatapathError>;
    /// Refuses, naming map and difference, when a pinned shared map no
    /// longer has this build's layout.
    fn check_pins(&self) -> Result<(), DatapathError>;
    /// Runs a freshly loaded copy of an endpoint's from-container program on
    /// `packet` (BPF_PROG_TEST_RUN) and returns its tc verdict.
    fn test_run(&self, config: &EndpointConfig, packet: &[u8]) -> Result<u32, DatapathError>;

    // The endpoints map: where local addresses are delivered.

    fn publish_endpoint(&self, entry: &EndpointEntry) -> Result<(), DatapathError>;
    /// Absent is not an error.
    fn withdraw_endpoint(&self, ip: IpAddr) -> Result<(), DatapathError>;
    fn endpoints(&self) -> Result<Vec<EndpointEntry>, DatapathError>;

    // Policy.

    /// Replaces the endpoint's policy; every packet meets either the old
    /// policy or the new one.
    fn set_endpoint_policy(
        &self,
        endpoint_id: u16,
        policy: &EndpointPolicy,
    ) -> Result<PolicyUpdate, DatapathError>;
    /// Writes only `delta`, without reading the endpoint's map; each key
    /// changes atomically, the delta as a whole does not. An endpoint
    /// without a policy gets the delta's upserts as its policy.
    fn update_endpoint_policy(
        &self,
        endpoint_id: u16,
        delta: &PolicyDelta,
    ) -> Result<PolicyUpdate, DatapathError>;
    /// The policy the datapath uses for the endpoint; `None` without one.
    fn endpoint_policy(&self, endpoint_id: u16) -> Result<Option<EndpointPolicy>, DatapathError>;
    fn remove_endpoint_policy(&self, endpoint_id: u16) -> Result<(), DatapathError>;
    /// Prepares an empty policy map for an id no endpoint has yet, so that
    /// the first policy write of the endpoint that gets it skips the
    /// kernel's wait of a map-in-map update. Nothing may use the id.
    /// `false`: the id already has a map, left as it is.
    fn spare_endpoint_policy(&self, endpoint_id: u16) -> Result<bool, DatapathError>;
    /// Every id with a policy map (endpoints' and spares).
    fn endpoint_policy_ids(&self) -> Result<Vec<u16>, DatapathError>;
    /// Bumps the policy revision: established flows meet policy again on
    /// their next forward packet. Returns the new revision.
    fn bump_policy_revision(&self) -> Result<u32, DatapathError>;

    // The ipcache.

    fn publish_ipcache(&self, entries: &[IpcacheEntry]) -> Result<(), DatapathError>;
    /// Absent prefixes are not an error.
    fn withdraw_ipcache(&self, prefixes: &[IpNet]) -> Result<(), DatapathError>;
    fn ipcache(&self) -> Result<Vec<IpcacheEntry>, DatapathError>;

    // Conntrack.

    /// Every entry, expired ones included.
    fn conntrack(&self) -> Result<Vec<CtEntry>, DatapathError>;
    /// Deletes expired entries (and, for an endpoint near its budget, the
    /// idle entries of its connections that ended) and recounts each
    /// endpoint's budget use.
    fn gc_conntrack(&self) -> Result<CtGcReport, DatapathError>;
    /// Whether an endpoint nears its conntrack budget with entries a GC may
    /// free (see `BpfDatapath::ct_pressure`): cheap, asked between GCs.
    fn ct_pressure(&self) -> Result<bool, DatapathError>;
    /// The budget in force and what each endpoint holds against it now.
    fn ct_budget_use(&self) -> Result<CtBudgetUse, DatapathError>;
    /// Entries the conntrack table holds at most.
    fn ct_capacity(&self) -> u32;
    /// Live entries as of the last [`Datapath::gc_conntrack`] (None before
    /// one): cheap, unlike walking the table.
    fn ct_live(&self) -> Option<u64>;
    /// Deletes the entries an endpoint created or that carry one of its
    /// addresses, and resets its budget; returns how many were deleted.
    fn purge_conntrack(&self, endpoint_id: u16, addrs: &[IpAddr]) -> Result<usize, DatapathError>;
    /// Deletes one entry (by its tuple). Absent is not an error.
    fn remove_conntrack(&self, entry: &CtEntry) -> Result<(), DatapathError>;
    /// Conntrack entries each endpoint may hold (0: the built-in default).
    fn set_ct_budget(&self, budget: u32) -> Result<(), DatapathError>;

    // Other nodes: the node programs and maps (see "Multi-node datapath"
    // in docs/ARCHITECTURE.md).

    /// Sets how packets for remote prefixes (ipcache entries with a
    /// tunnel) leave the node: tunnel mode and devices.
    fn set_node_config(&self, config: &NodeConfig) -> Result<(), DatapathError>;
    fn node_config(&self) -> Result<NodeConfig, DatapathError>;
    /// Attaches the overlay programs to the VXLAN device (ingress and
    /// egress), swapping them into their pinned links when there are some.
    fn attach_overlay(&self, vxlan_ifname: &str) -> Result<(), DatapathError>;
    /// Attaches the native-routing program to the underlay device's
    /// ingress, swapping it into its pinned link when there is one.
    fn attach_netdev(&self, ifname: &str) -> Result<(), DatapathError>;
    /// Detaches every node program. Nothing attached is not an error.
    fn detach_node_programs(&self) -> Result<(), DatapathError>;
    /// Detaches the overlay programs only (switching to native routing):
    /// unlike a detach of everything, the programs of the mode that stays
    /// keep running through a restart. Nothing attached is not an error.
    fn detach_overlay(&self) -> Result<(), DatapathError>;
    /// Detaches the native-routing program only (switching to the
    /// overlay). Nothing attached is not an error.
    fn detach_netdev(&self) -> Result<(), DatapathError>;
    /// Which devices the node programs are attached to.
    fn node_links(&self) -> Result<NodeLinks, DatapathError>;
    /// Swaps this build's node programs into their pinned links (datapath
    /// reload); returns how many links were swapped.
    fn reload_node_programs(&self) -> Result<usize, DatapathError>;
    /// Adds underlay addresses of nodes whose tunnel packets are accepted.
    fn publish_nodes(&self, addrs: &[IpAddr]) -> Result<(), DatapathError>;
    /// Absent addresses are not an error.
    fn withdraw_nodes(&self, addrs: &[IpAddr]) -> Result<(), DatapathError>;
    fn nodes(&self) -> Result<Vec<IpAddr>, DatapathError>;

    // Load balancing (see "Load balancing" in docs/ARCHITECTURE.md).

    /// Adds or replaces backends (by id). A service's slots may name only
    /// backends written before it.
    fn upsert_lb_backends(&self, backends: &[LbBackend]) -> Result<(), DatapathError>;
    /// Absent ids are not an error. Flows pinned to a removed backend are
    /// re-selected on their next packet.
    fn remove_lb_backends(&self, ids: &[u32]) -> Result<(), DatapathError>;
    /// Adds or replaces a service (by frontend), atomically for packets:
    /// rev-NAT entry and Maglev table first, then the slots of the other
    /// generation, then the master entry, then the old slots are deleted.
    fn upsert_lb_service(&self, service: &LbService) -> Result<(), DatapathError>;
    /// Removes a service's master entry, slots, rev-NAT entry and Maglev
    /// table; absent is not an error.
    fn remove_lb_service(&self, frontend: &LbFrontend, rev_nat: u16) -> Result<(), DatapathError>;
    /// The services as the kernel holds them (Maglev tables included).
    fn lb_services(&self) -> Result<Vec<LbService>, DatapathError>;
    fn lb_backends(&self) -> Result<Vec<LbBackend>, DatapathError>;
    /// Sets the Maglev table size the datapath reads (`global_config`).
    fn set_maglev_size(&self, size: u32) -> Result<(), DatapathError>;
    /// Per-service counters (`cilia_lb_stats`, summed over CPUs) of the
    /// services in the rev-NAT map, by rev-NAT id.
    fn lb_stats(&self) -> Result<Vec<(u16, LbStats)>, DatapathError>;

    // Socket-level load balancing (see "Socket-level load balancing" in
    // docs/ARCHITECTURE.md).

    /// Attaches the socket LB's programs to the cgroup v2 directory
    /// `cgroup`, swapping them into their pinned links when those are on
    /// that cgroup already (a link on another cgroup is detached first).
    fn attach_socket_lb(&self, cgroup: &Path) -> Result<(), DatapathError>;
    /// Detaches the socket LB. Nothing attached is not an error.
    fn detach_socket_lb(&self) -> Result<(), DatapathError>;
    /// Where the socket LB is attached; `None` when it is not.
    fn socket_lb_links(&self) -> Result<Option<SocketLbLinks>, DatapathError>;
    /// Swaps this build's socket LB programs into their pinned links
    /// (datapath reload); returns how many links were swapped.
    fn reload_socket_lb(&self) -> Result<usize, DatapathError>;
    /// Lets the socket LB translate sockets of the network namespace with
    /// this cookie (`SO_NETNS_COOKIE`).
    fn add_lb_netns(&self, cookie: u64, endpoint_id: u16) -> Result<(), DatapathError>;
    /// Absent is not an error.
    fn remove_lb_netns(&self, cookie: u64) -> Result<(), DatapathError>;
    /// Cookies of the namespaces the socket LB serves, sorted.
    fn lb_netns(&self) -> Result<Vec<u64>, DatapathError>;

    // The XDP prefilter (see "XDP prefilter" in docs/ARCHITECTURE.md).

    /// Attaches the prefilter to a node device: native XDP, else generic
    /// XDP (the link says which mode, and why native was refused). A
    /// pinned link of the device keeps its mode and gets this build's
    /// program swapped in.
    fn attach_prefilter(&self, ifname: &str) -> Result<PrefilterLink, DatapathError>;
    /// Not attached is not an error.
    fn detach_prefilter(&self, ifname: &str) -> Result<(), DatapathError>;
    /// The devices the prefilter is attached to.
    fn prefilter_links(&self) -> Result<Vec<PrefilterLink>, DatapathError>;
    /// Turns NodePort acceleration on for the node's underlay device: the
    /// device's XDP program (shared with a prefilter there) gets the XDP
    /// NodePort path; native XDP, else generic (the link says which, and
    /// why). `force_generic`: generic XDP without trying native.
    fn attach_lb_acceleration(
        &self,
        ifname: &str,
        force_generic: bool,
    ) -> Result<PrefilterLink, DatapathError>;
    /// Not on is not an error.
    fn detach_lb_acceleration(&self, ifname: &str) -> Result<(), DatapathError>;
    /// The devices NodePort acceleration runs on.
    fn lb_acceleration_links(&self) -> Result<Vec<PrefilterLink>, DatapathError>;
    /// Adds CIDRs (or moves them to another counter slot), one atomic
    /// update each; a CIDR new to the kernel starts its counts at zero, one
    /// already there with the same slot keeps them.
    fn upsert_prefilter(&self, entries: &[PrefilterEntry]) -> Result<(), DatapathError>;
    /// Absent CIDRs are not an error.
    fn remove_prefilter(&self, cidrs: &[IpNet]) -> Result<(), DatapathError>;
    /// The CIDRs with their drops (summed over CPUs), sorted.
    fn prefilter(&self) -> Result<Vec<PrefilterCount>, DatapathError>;
    /// Adds or replaces a NodePort service (frontend address 0.0.0.0 or
    /// `::`: every address of the node, served at the underlay device) as
    /// [`Datapath::upsert_lb_service`] does, with its traffic policy and
    /// mode (see [`NodePortOptions`]).
    fn upsert_nodeport_service(
        &self,
        service: &LbService,
        options: NodePortOptions,
    ) -> Result<(), DatapathError>;

    // Observability.

    /// Forward and drop counters, summed over CPUs.
    fn metrics(&self) -> Result<Vec<MetricsEntry>, DatapathError>;
    /// Which events the datapath emits (`CILIA_MONITOR_*`).
    fn set_monitor_level(&self, level: u32) -> Result<(), DatapathError>;
    /// The reader of the datapath's events (flows, drops, verdicts), handed
    /// out once; `None` afterwards. Must be called inside a tokio runtime.
    fn event_reader(&self) -> Result<Option<EventReader>, DatapathError>;
}

impl Datapath for BpfDatapath {
    fn load_endpoint(&self, config: &EndpointConfig) -> Result<LoadedPrograms, DatapathError> {
        Ok(LoadedPrograms::new(*config, self.loader().load(config)?))
    }
    fn attach_endpoint(
        &self,
        loaded: LoadedPrograms,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        let config = *loaded.config();
        match loaded.into_programs::<LoadedEndpoint>() {
            Some(programs) => self.attach_loaded(programs, host_ifname),
            // Loaded by another implementation: load again here.
            None => BpfDatapath::attach_endpoint(self, &config, host_ifname),
        }
    }
    fn attach_endpoint_generic(
        &self,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        BpfDatapath::attach_endpoint_generic(self, config, host_ifname)
    }
    fn prepare_generic(&self) -> Result<(), DatapathError> {
        BpfDatapath::prepare_generic(self)
    }
    fn detach_endpoint(&self, endpoint_id: u16) -> Result<(), DatapathError> {
        BpfDatapath::detach_endpoint(self, endpoint_id)
    }
    fn endpoint_attached(&self, endpoint_id: u16) -> bool {
        BpfDatapath::endpoint_attached(self, endpoint_id)
    }
    fn check_links(
        &self,
        expected: &EndpointConfig,
    ) -> Result<Option<Vec<LinkCheck>>, DatapathError> {
        BpfDatapath::check_links(self, expected)
    }
    fn reload_endpoint(
        &self,
        config: &EndpointConfig,
        force: bool,
    ) -> Result<EndpointReload, DatapathError> {
        BpfDatapath::reload_endpoint(self, config, force)
    }
    fn check_pins(&self) -> Result<(), DatapathError> {
        BpfDatapath::check_pins(self)
    }
    fn test_run(&self, config: &EndpointConfig, packet: &[u8]) -> Result<u32, DatapathError> {
        Ok(self.test_program(config)?.run(packet)?.verdict)
    }
    fn publish_endpoint(&self, entry: &EndpointEntry) -> Result<(), DatapathError> {
        self.upsert_endpoint(entry.ip, entry.info())
    }
    fn withdraw_endpoint(&self, ip: IpAddr) -> Result<(), DatapathError> {
        self.remove_endpoint(ip)
    }
    fn endpoints(&self) -> Result<Vec<EndpointEntry>, DatapathError> {
        Ok(self
            .list_endpoints()?
            .iter()
            .filter_map(|(k, v)| EndpointEntry::decode(k, v))
            .collect())
    }
    fn set_endpoint_policy(
        &self,
        endpoint_id: u16,
        policy: &EndpointPolicy,
    ) -> Result<PolicyUpdate, DatapathError> {
        self.set_policy(endpoint_id, &policy.encode())
    }
    fn update_endpoint_policy(
        &self,
        endpoint_id: u16,
        delta: &PolicyDelta,
    ) -> Result<PolicyUpdate, DatapathError> {
        let (removes, upserts) = delta.encode();
        self.update_policy(endpoint_id, &removes, &upserts)
    }
    fn endpoint_policy(&self, endpoint_id: u16) -> Result<Option<EndpointPolicy>, DatapathError> {
        Ok(self
            .get_policy(endpoint_id)?
            .map(|map| EndpointPolicy::decode(&map)))
    }
    fn remove_endpoint_policy(&self, endpoint_id: u16) -> Result<(), DatapathError> {
        self.remove_policy(endpoint_id)
    }
    fn spare_endpoint_policy(&self, endpoint_id: u16) -> Result<bool, DatapathError> {
        self.spare_policy(endpoint_id)
    }
    fn endpoint_policy_ids(&self) -> Result<Vec<u16>, DatapathError> {
        self.policy_ids()
    }
    fn bump_policy_revision(&self) -> Result<u32, DatapathError> {
        BpfDatapath::bump_policy_revision(self)
    }
    fn publish_ipcache(&self, entries: &[IpcacheEntry]) -> Result<(), DatapathError> {
        entries
            .iter()
            .try_for_each(|e| self.upsert_ipcache_value(e.key(), e.value()))?;
        self.revised(!entries.is_empty())
    }
    fn withdraw_ipcache(&self, prefixes: &[IpNet]) -> Result<(), DatapathError> {
        prefixes
            .iter()
            .try_for_each(|p| self.remove_ipcache(IpcacheEntry::key_of(p)))?;
        self.revised(!prefixes.is_empty())
    }
    fn ipcache(&self) -> Result<Vec<IpcacheEntry>, DatapathError> {
        Ok(self
            .list_ipcache()?
            .iter()
            .filter_map(|(k, v)| IpcacheEntry::decode(k, v))
            .collect())
    }
    fn conntrack(&self) -> Result<Vec<CtEntry>, DatapathError> {
        Ok(self
            .list_ct()?
            .iter()
            .filter_map(|(k, v)| CtEntry::decode(k, v))
            .collect())
    }
    fn gc_conntrack(&self) -> Result<CtGcReport, DatapathError> {
        self.gc_ct()
    }
    fn ct_pressure(&self) -> Result<bool, DatapathError> {
        BpfDatapath::ct_pressure(self)
    }
    fn ct_budget_use(&self) -> Result<CtBudgetUse, DatapathError> {
        BpfDatapath::ct_budget_use(self)
    }
    fn ct_capacity(&self) -> u32 {
        BpfDatapath::ct_capacity(self)
    }
    fn ct_live(&self) -> Option<u64> {
        BpfDatapath::ct_live(self)
    }
    fn purge_conntrack(&self, endpoint_id: u16, addrs: &[IpAddr]) -> Result<usize, DatapathError> {
        self.purge_ct(endpoint_id, addrs)
    }
    fn remove_conntrack(&self, entry: &CtEntry) -> Result<(), DatapathError> {
        self.remove_ct(entry.key())
    }
    fn set_ct_budget(&self, budget: u32) -> Result<(), DatapathError> {
        BpfDatapath::set_ct_budget(self, budget)
    }
    fn set_node_config(&self, config: &NodeConfig) -> Result<(), DatapathError> {
        BpfDatapath::set_node_config(self, config)?;
        self.revised(true)
    }
    fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        BpfDatapath::node_config(self)
    }
    fn attach_overlay(&self, vxlan_ifname: &str) -> Result<(), DatapathError> {
        BpfDatapath::attach_overlay(self, vxlan_ifname)
    }
    fn attach_netdev(&self, ifname: &str) -> Result<(), DatapathError> {
        BpfDatapath::attach_netdev(self, ifname)
    }
    fn detach_node_programs(&self) -> Result<(), DatapathError> {
        BpfDatapath::detach_node_programs(self)
    }
    fn detach_overlay(&self) -> Result<(), DatapathError> {
        BpfDatapath::detach_overlay(self)
    }
    fn detach_netdev(&self) -> Result<(), DatapathError> {
        BpfDatapath::detach_netdev(self)
    }
    fn node_links(&self) -> Result<NodeLinks, DatapathError> {
        BpfDatapath::node_links(self)
    }
    fn reload_node_programs(&self) -> Result<usize, DatapathError> {
        BpfDatapath::reload_node_programs(self)
    }
    fn publish_nodes(&self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        BpfDatapath::publish_nodes(self, addrs)?;
        self.revised(!addrs.is_empty())
    }
    fn withdraw_nodes(&self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        BpfDatapath::withdraw_nodes(self, addrs)?;
        self.revised(!addrs.is_empty())
    }
    fn nodes(&self) -> Result<Vec<IpAddr>, DatapathError> {
        BpfDatapath::nodes(self)
    }
    fn upsert_lb_backends(&self, backends: &[LbBackend]) -> Result<(), DatapathError> {
        BpfDatapath::upsert_lb_backends(self, backends)
    }
    fn remove_lb_backends(&self, ids: &[u32]) -> Result<(), DatapathError> {
        BpfDatapath::remove_lb_backends(self, ids)
    }
    fn upsert_lb_service(&self, service: &LbService) -> Result<(), DatapathError> {
        BpfDatapath::upsert_lb_service(self, service)?;
        self.revised(true)
    }
    fn remove_lb_service(&self, frontend: &LbFrontend, rev_nat: u16) -> Result<(), DatapathError> {
        BpfDatapath::remove_lb_service(self, frontend, rev_nat)?;
        self.revised(true)
    }
    fn lb_services(&self) -> Result<Vec<LbService>, DatapathError> {
        BpfDatapath::lb_services(self)
    }
    fn lb_backends(&self) -> Result<Vec<LbBackend>, DatapathError> {
        BpfDatapath::lb_backends(self)
    }
    fn upsert_nodeport_service(
        &self,
        service: &LbService,
        options: NodePortOptions,
    ) -> Result<(), DatapathError> {
        BpfDatapath::upsert_nodeport_service(self, service, options)?;
        self.revised(true)
    }
    fn set_maglev_size(&self, size: u32) -> Result<(), DatapathError> {
        BpfDatapath::set_maglev_size(self, size)
    }
    fn attach_socket_lb(&self, cgroup: &Path) -> Result<(), DatapathError> {
        BpfDatapath::attach_socket_lb(self, cgroup)
    }
    fn detach_socket_lb(&self) -> Result<(), DatapathError> {
        BpfDatapath::detach_socket_lb(self)
    }
    fn socket_lb_links(&self) -> Result<Option<SocketLbLinks>, DatapathError> {
        BpfDatapath::socket_lb_links(self)
    }
    fn reload_socket_lb(&self) -> Result<usize, DatapathError> {
        BpfDatapath::reload_socket_lb(self)
    }
    fn add_lb_netns(&self, cookie: u64, endpoint_id: u16) -> Result<(), DatapathError> {
        BpfDatapath::add_lb_netns(self, cookie, endpoint_id)
    }
    fn remove_lb_netns(&self, cookie: u64) -> Result<(), DatapathError> {
        BpfDatapath::remove_lb_netns(self, cookie)
    }
    fn lb_netns(&self) -> Result<Vec<u64>, DatapathError> {
        BpfDatapath::lb_netns(self)
    }
    fn lb_stats(&self) -> Result<Vec<(u16, LbStats)>, DatapathError> {
        crate::lbstats::read(self)
    }
    fn attach_prefilter(&self, ifname: &str) -> Result<PrefilterLink, DatapathError> {
        BpfDatapath::attach_prefilter(self, ifname)
    }
    fn detach_prefilter(&self, ifname: &str) -> Result<(), DatapathError> {
        BpfDatapath::detach_prefilter(self, ifname)
    }
    fn prefilter_links(&self) -> Result<Vec<PrefilterLink>, DatapathError> {
        BpfDatapath::prefilter_links(self)
    }
    fn attach_lb_acceleration(
        &self,
        ifname: &str,
        force_generic: bool,
    ) -> Result<PrefilterLink, DatapathError> {
        BpfDatapath::attach_lb_acceleration(self, ifname, force_generic)
    }
    fn detach_lb_acceleration(&self, ifname: &str) -> Result<(), DatapathError> {
        BpfDatapath::detach_lb_acceleration(self, ifname)
    }
    fn lb_acceleration_links(&self) -> Result<Vec<PrefilterLink>, DatapathError> {
        BpfDatapath::lb_acceleration_links(self)
    }
    fn upsert_prefilter(&self, entries: &[PrefilterEntry]) -> Result<(), DatapathError> {
        BpfDatapath::upsert_prefilter(self, entries)
    }
    fn remove_prefilter(&self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        BpfDatapath::remove_prefilter(self, cidrs)
    }
    fn prefilter(&self) -> Result<Vec<PrefilterCount>, DatapathError> {
        BpfDatapath::prefilter(self)
    }
    fn metrics(&self) -> Result<Vec<MetricsEntry>, DatapathError> {
        Ok(BpfDatapath::metrics(self)?
            .iter()
            .map(|(k, v)| MetricsEntry::decode(k, v))
            .collect())
    }
    fn set_monitor_level(&self, level: u32) -> Result<(), DatapathError> {
        BpfDatapath::set_monitor_level(self, level)
    }
    fn event_reader(&self) -> Result<Option<EventReader>, DatapathError> {
        self.take_events_shared().map(EventReader::new).transpose()
    }
}
