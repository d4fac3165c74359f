//! Endpoint lifecycle: create, delete, restore after a restart.
//!
//! Invariants:
//! * A record is written (state `creating`, addresses allocated) before any
//!   device exists, so an agent that dies mid-create finds the record on
//!   restart and rolls it back: nothing half-made survives.
//! * A failed create undoes everything it did and changes no state.
//! * Delete first disconnects (map entries withdrawn, record `deleting`),
//!   then removes the link pins, the policy map and the devices, and last
//!   the record: a crash during delete leaves a record to finish on restart.
//!   A CNI DEL returns after the disconnect; the rest, RCU grace periods in
//!   the kernel, runs after it (see [`reap`]).
//! * A program is replaced only by swapping it inside its pinned link after
//!   its successor passed the verifier (restore, `datapath reload`): an
//!   endpoint's traffic never meets a missing program.
//!
//! Create runs in three phases so that the slow part holds no lock (see
//! docs/ARCHITECTURE.md, "Locking"): [`EndpointManager::begin_create`]
//! (under the endpoints' lock: validate, allocate, record `creating`),
//! [`PendingEndpoint::prepare`] (no lock: the endpoint's own devices over
//! rtnetlink, and — without fast attach — loading and verifying its
//! specialized programs), and [`EndpointManager::finish_create`] (under the
//! lock again: policy map, attach, publish, `ready`). An endpoint between
//! the first and the last is in `creating`; nothing deletes it meanwhile
//! ([`EndpointError::Busy`]). With fast attach (the agent's default, see
//! [`specialize`]) the endpoint is attached to the generic program and its
//! specialized build is verified and swapped in after the create returns.

pub mod labels;
pub mod netdev;
mod relabel;
pub mod rtnl;
mod socklb;
pub mod spares;
pub mod specialize;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Condvar, Mutex};

use cilia_abi::{EndpointConfig, EndpointInfo, CILIA_ID_HOST};
use cilia_api::{
    DatapathReloadResult, EndpointCreate, EndpointReload, EndpointState, LinkReload, ReloadOutcome,
};
use cilia_datapath::DatapathError;
use tracing::{info, warn};

use self::netdev::{Netdev, NetdevError, VethSpec};
use crate::ipam::Pool;
use crate::policy::repository::PolicyState;
use crate::policy::ImportError;
use crate::store::{EndpointRecord, Store, StoreError};
use cilia_abi::{EndpointEntry, IpcacheEntry};
use cilia_datapath::{Datapath, LoadedPrograms};

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Labels(#[from] cilia_api::labels::LabelError),
    #[error(transparent)]
    Ifname(cilia_api::limits::InputError),
    #[error(transparent)]
    Input(#[from] cilia_api::limits::InputError),
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("endpoint {0} not found")]
    NotFound(u16),
    #[error("namespace {shown}: {1}", shown = cilia_api::limits::excerpt(.0))]
    Namespace(String, String),
    #[error(transparent)]
    Policy(#[from] ImportError),
    #[error("{0}")]
    NoSuchPolicy(String),
    #[error("trace: {0}")]
    Trace(String),
    #[error("label source {shown} is not supported (known: podman)", shown = cilia_api::limits::excerpt(.0))]
    LabelSource(String),
    #[error("endpoint {0} is still being created; retry once its create has returned")]
    Busy(u16),
    #[error("endpoint {0}: setting up its devices or programs panicked; rolled back")]
    SetupPanicked(u16),
    #[error(transparent)]
    NamedPort(#[from] cilia_policy::named::NamedPortError),
    /// The cluster (etcd) could not take a change that must be the same on
    /// every node; nothing was changed.
    #[error("{0}")]
    Cluster(String),
}

/// Bounds how many endpoint program loads run at once. A load is CPU-bound
/// (the verifier) and holds parsed copies of the object and of the
/// kernel's BTF: more loads at once finish no sooner and only add memory.
pub struct LoadSlots {
    max: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

/// One of [`LoadSlots`], given back on drop.
struct LoadSlot<'a>(&'a LoadSlots);

impl LoadSlots {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// The agent's: one load at a time. Each load parses the kernel's BTF
    /// anew (aya 0.14's `EbpfLoader::new` always does: about 12 MiB for a
    /// few tens of milliseconds), which dominated the agent's peak RSS with
    /// two at once (docs/benchmarks.md); the other phases of the other
    /// creates use the other CPUs meanwhile.
    pub fn agent() -> Self {
        Self::new(1)
    }

    fn acquire(&self) -> LoadSlot<'_> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used >= self.max {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += 1;
        LoadSlot(self)
    }
}

impl Drop for LoadSlot<'_> {
    fn drop(&mut self) {
        let mut used = self.0.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= 1;
        self.0.freed.notify_one();
    }
}

/// An endpoint recorded as `creating` by [`EndpointManager::begin_create`],
/// with what [`PendingEndpoint::prepare`] needs to set up its devices and
/// programs without the manager.
pub struct PendingEndpoint {
    rec: EndpointRecord,
    spec: VethSpec,
    netdev: Arc<dyn Netdev>,
    datapath: DatapathHandle,
    loads: Arc<LoadSlots>,
    /// Fast attach: the generic program now, the specialized one later.
    specialize: Option<specialize::Specializer>,
    /// The steps so far (the lock, the record), for the create's log line.
    begun: Phases,
}

/// What [`PendingEndpoint::prepare`] made: the host device and the loaded,
/// verified (not attached) programs; `None` for the generic program.
pub struct PreparedEndpoint {
    ifindex: u32,
    programs: Option<LoadedPrograms>,
    /// How long the veth took, and the programs' loading if they were.
    setup: Phases,
}

impl PendingEndpoint {
    pub fn id(&self) -> u16 {
        self.rec.id
    }

    /// The slow part of a create, run without the endpoints' lock: it
    /// touches only this endpoint's own devices (named after its id) and
    /// loads programs no one else sees yet. What it made is undone by
    /// [`EndpointManager::finish_create`] when it fails, and by restore
    /// after a crash (the record is still `creating`).
    pub fn prepare(&self) -> Result<PreparedEndpoint, EndpointError> {
        let mut setup = Phases::start();
        let ifindex = self.netdev.create(&self.spec)?;
        setup.mark("veth");
        crate::crash::point("endpoint-create:after-veth");
        if let Some(spec) = self.specialize.as_ref().filter(|s| s.generic_usable()) {
            let generic = self.datapath.prepare_generic();
            setup.mark("generic");
            match generic {
                Ok(()) => {
                    return Ok(PreparedEndpoint {
                        ifindex,
                        programs: None,
                        setup,
                    })
                }
                Err(e) => spec.set_unavailable(e.to_string()),
            }
        }
        let programs = {
            let _slot = self.loads.acquire();
            self.datapath
                .load_endpoint(&config_of(&self.rec, ifindex))?
        };
        setup.mark("load");
        Ok(PreparedEndpoint {
            ifindex,
            programs: Some(programs),
            setup,
        })
    }
}

/// Creates an endpoint holding `manager`'s lock only for the bookkeeping
/// at the start and the end (see the module's doc): creates of different
/// endpoints set up their devices and load their programs at once, and
/// readers never wait behind a verifier.
pub fn create_unlocked(
    manager: &Mutex<EndpointManager>,
    req: EndpointCreate,
) -> Result<EndpointRecord, EndpointError> {
    let lock = || manager.lock().unwrap_or_else(|p| p.into_inner());
    let asked = std::time::Instant::now();
    // Deletes finish in the background (see `reap`): an ADD that finds
    // the pool or the ids exhausted while one is finishing waits for it
    // (bounded), as it would have had the DEL waited itself.
    let ifname = req.ifname.clone().unwrap_or_else(|| "eth0".into());
    let mut pending = loop {
        let mut m = lock();
        // A delete in flight may still have its device in this namespace
        // under this name (a runtime reconnecting a running container):
        // creating ours now would fail on the name.
        if asked.elapsed() < REAP_WAIT && m.deleting_device_in(&req.netns, &ifname)? {
            drop(m);
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        }
        match m.begin_create(req.clone()) {
            Err(e) if is_exhausted(&e) && !m.deleting.is_empty() && asked.elapsed() < REAP_WAIT => {
                drop(m);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            begun => break begun?,
        }
    };
    pending.begun.waited_since(asked);
    // A panic here must still reach `finish_create`, which rolls back and
    // takes the endpoint out of the in-flight set (else it stays busy).
    let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pending.prepare()))
        .unwrap_or_else(|_| Err(EndpointError::SetupPanicked(pending.id())));
    lock().finish_create(pending, prepared)
}

/// An endpoint [`EndpointManager::disconnect`] took off the network whose
/// kernel side is still to be removed.
pub struct Disconnected {
    rec: EndpointRecord,
    phases: Phases,
}

impl Disconnected {
    pub fn id(&self) -> u16 {
        self.rec.id
    }
}

/// Removes a disconnected endpoint's programs, policy map and devices.
/// Needs no lock of the agent's: every step waits in the kernel for RCU
/// grace periods (~10-15 ms each here, under the RTNL lock), which is
/// most of a delete. Detaching and removing the veth run at once, so the
/// policy map's wait overlaps the device's. In either order the policy map
/// goes only after both programs are off the device (`detach_endpoint`
/// unpins the links first, and a link's release waits for a device removal
/// in progress), so no packet meets the endpoint's program without its
/// policy. Every step is idempotent: a retry after a failure or a crash
/// finishes what is left.
pub fn remove_kernel_side(
    datapath: &DatapathHandle,
    netdev: &dyn Netdev,
    rec: &EndpointRecord,
) -> Result<(), EndpointError> {
    let (detached, veth) = std::thread::scope(|s| {
        let veth = s.spawn(|| netdev.delete(&rec.host_ifname));
        let detached = datapath.detach_endpoint(rec.id);
        let veth = veth
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (detached, veth)
    });
    detached?;
    crate::crash::point("endpoint-delete:after-detach");
    veth?;
    crate::crash::point("endpoint-delete:after-veth");
    Ok(())
}

/// Finishes the deletes of `gone` holding `manager`'s lock only for the
/// bookkeeping at the end of each: the kernel cleanup runs unlocked (what a
/// CNI DEL no longer waits for, see `DELETE /v1/endpoints?background=true`).
/// Failures are logged; the endpoint then stays `deleting` with the reason.
pub fn reap(manager: &Mutex<EndpointManager>, gone: Vec<Disconnected>) {
    let lock = || manager.lock().unwrap_or_else(|p| p.into_inner());
    let (datapath, netdev) = {
        let mgr = lock();
        (mgr.datapath.clone(), mgr.netdev.clone())
    };
    for gone in gone {
        let id = gone.id();
        let cleaned = remove_kernel_side(&datapath, netdev.as_ref(), &gone.rec);
        let finished = lock().finish_delete(gone, cleaned);
        if let Err(e) = finished {
            warn!(id, error = %e, "finishing the endpoint's delete failed; it stays `deleting` (a delete of it or a restart tries again)");
        }
    }
}

/// How long a create waits for deletes being finished in the background
/// (when it finds no free address or id, or its device's name still taken
/// in its namespace). A burst of 100 DELs leaves ~100 cleanups of ~50 ms
/// each queued behind the RTNL lock: 5 s was measured to be too short for
/// 100 DELs then 100 ADDs into the same namespaces (a debug build); well
/// under the CNI plugin's 120 s.
const REAP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn is_exhausted(e: &EndpointError) -> bool {
    matches!(
        e,
        EndpointError::Store(
            StoreError::IdsExhausted | StoreError::Ipam(crate::ipam::IpamError::Exhausted { .. })
        )
    )
}

/// Node-wide addressing the endpoints share.
#[derive(Debug, Clone)]
pub struct Pools {
    pub v6: Pool,
    pub v4: Option<Pool>,
}

/// The datapath, shared by the subsystems that write it (endpoints, the
/// policy) and the readers: it locks each map on its own, for the
/// duration of one operation, so it needs no lock around it.
pub type DatapathHandle = Arc<dyn Datapath>;

/// The endpoints' lifecycle: records, devices, programs. It owns the
/// endpoints and their addressing; the policy of each endpoint belongs to
/// [`PolicyState`], which it tells about endpoints coming, changing and
/// going (lock order: endpoints, then policy, then the datapath).
pub struct EndpointManager {
    pub(crate) store: Arc<Store>,
    pub(crate) datapath: DatapathHandle,
    pub(crate) netdev: Arc<dyn Netdev>,
    pub(crate) pools: Pools,
    /// Endpoints between `begin_create` and `finish_create`: not to be
    /// deleted meanwhile.
    pub(crate) creating: BTreeSet<u16>,
    /// Endpoints between `disconnect` and `finish_delete`: not to be
    /// deleted again meanwhile.
    pub(crate) deleting: BTreeSet<u16>,
    /// Shared with every [`PendingEndpoint`].
    pub(crate) loads: Arc<LoadSlots>,
    /// The policy subsystem, locked on its own: imports and traces never
    /// wait for the endpoints' lock.
    pub(crate) policy: Arc<Mutex<PolicyState>>,
    /// The namespace the agent runs in, which no endpoint may use.
    pub(crate) agent_netns: std::path::PathBuf,
    /// Re-specialize and re-attach every endpoint at restore (set when the
    /// datapath recreated pinned maps the old programs still use).
    pub reattach_all: bool,
    /// The MTU of new endpoints' devices (`None`: the kernel's default);
    /// set in overlay mode to leave room for the tunnel's headers.
    pub mtu: Option<u32>,
    /// The node's netns cookie when the socket load balancer is on: then
    /// every ready endpoint's namespace is served too (see `socklb`).
    pub socket_lb: Option<u64>,
    /// Netns cookie each endpoint's namespace was served under.
    pub(crate) lb_netns: BTreeMap<u16, u64>,
    /// Fast attach (see [`specialize`]); `None`: creates load and verify
    /// the specialized programs before attaching.
    pub specialize: Option<specialize::Specializer>,
    /// Empty policy maps prepared for the next ids (see [`spares`]);
    /// `None`: each create puts its map in place itself.
    pub spares: Option<spares::PolicySpares>,
    /// The agent watches Kubernetes: an endpoint naming its pod takes its
    /// labels from the pod (see `crate::k8s`).
    pub kubernetes: bool,
}

pub(crate) fn config_of(rec: &EndpointRecord, ifindex: u32) -> EndpointConfig {
    EndpointConfig {
        ipv6: rec.ipv6.octets(),
        ipv4: rec.ipv4.map(|a| a.octets()).unwrap_or_default(),
        mac: rec.mac,
        node_mac: rec.host_mac,
        ifindex,
        identity: rec.identity,
        endpoint_id: rec.id,
        enable_ipv4: u8::from(rec.ipv4.is_some()),
        monitor: 1,
    }
}

pub(crate) fn info_of(rec: &EndpointRecord, ifindex: u32) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        identity: rec.identity,
        endpoint_id: rec.id,
        flags: 0,
        mac: rec.mac,
        node_mac: rec.host_mac,
    }
}

impl EndpointManager {
    pub fn new(
        store: Store,
        datapath: DatapathHandle,
        netdev: Box<dyn Netdev>,
        pools: Pools,
    ) -> Self {
        let store = Arc::new(store);
        let netdev: Arc<dyn Netdev> = Arc::from(netdev);
        let policy = PolicyState::new(
            store.clone(),
            datapath.clone(),
            netdev.clone(),
            pools.clone(),
        );
        Self {
            store,
            datapath,
            netdev,
            pools,
            creating: BTreeSet::new(),
            deleting: BTreeSet::new(),
            loads: Arc::new(LoadSlots::agent()),
            policy: Arc::new(Mutex::new(policy)),
            agent_netns: netdev::AGENT_NETNS.into(),
            reattach_all: false,
            mtu: None,
            kubernetes: false,
            socket_lb: None,
            lb_netns: BTreeMap::new(),
            specialize: None,
            spares: None,
        }
    }

    /// Asks for spare policy maps for the ids the next creates will get.
    fn top_up_spares(&self) {
        if let Some(spares) = &self.spares {
            spares.top_up();
        }
    }

    /// Removes the policy maps of ids that have no endpoint (spares of an
    /// earlier agent, or what a crash between steps left), keeping the
    /// empty ones of ids the next creates will get. Runs at restore, before
    /// any create can take an id.
    fn sweep_policy_maps(&self) -> Result<(), EndpointError> {
        let records: BTreeSet<u16> = self.store.endpoints()?.iter().map(|r| r.id).collect();
        let next = self.store.next_endpoint_ids(spares::SPARES_AHEAD)?;
        let mut removed = Vec::new();
        for id in self.dp().endpoint_policy_ids()? {
            if records.contains(&id) {
                continue;
            }
            let empty = self
                .dp()
                .endpoint_policy(id)?
                .is_none_or(|p| p.entries.is_empty() && p.enforcement == Default::default());
            if next.contains(&id) && empty && self.spares.is_some() {
                // Empty and for an id a create will take: harmless. This
                // agent did not make it, so that create switches to a map
                // of its own as when there is no spare.
                continue;
            }
            self.dp().remove_endpoint_policy(id)?;
            removed.push(id);
        }
        if !removed.is_empty() {
            info!(ids = ?removed, "removed policy maps of ids without an endpoint");
        }
        Ok(())
    }

    /// The policy subsystem, locked (after the endpoints: see the lock order).
    pub fn policy(&self) -> std::sync::MutexGuard<'_, PolicyState> {
        self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The policy subsystem's handle, to lock without the endpoints.
    pub fn policy_handle(&self) -> Arc<Mutex<PolicyState>> {
        self.policy.clone()
    }

    fn dp(&self) -> &dyn Datapath {
        self.datapath.as_ref()
    }

    /// Loads `config`'s programs and attaches them to `host_ifname` (swapped
    /// into the endpoint's pinned links when it has some).
    fn attach(&self, config: &EndpointConfig, host_ifname: &str) -> Result<(), EndpointError> {
        let loaded = self.dp().load_endpoint(config)?;
        Ok(self.dp().attach_endpoint(loaded, host_ifname)?)
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    pub fn datapath(&self) -> DatapathHandle {
        self.datapath.clone()
    }

    pub fn list(&self) -> Result<Vec<EndpointRecord>, EndpointError> {
        Ok(self.store.endpoints()?)
    }

    pub fn get(&self, id: u16) -> Result<EndpointRecord, EndpointError> {
        self.list()?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or(EndpointError::NotFound(id))
    }

    pub fn allocated(&self) -> Result<std::collections::BTreeSet<IpAddr>, EndpointError> {
        Ok(self.store.allocated()?)
    }

    /// Sets up the node side shared by all endpoints (router addresses).
    pub fn ensure_router(&mut self) -> Result<(), EndpointError> {
        let r6 = match self.pools.v6.router() {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => unreachable!("IPv6 pool"),
        };
        let r4 = self.pools.v4.as_ref().and_then(|p| match p.router() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        self.netdev.ensure_router(r6, r4)?;
        let mut routers = vec![IpAddr::V6(r6)];
        routers.extend(r4.map(IpAddr::V4));
        let entries: Vec<IpcacheEntry> = routers
            .into_iter()
            .map(|ip| IpcacheEntry {
                prefix: ipnet::IpNet::from(ip),
                identity: CILIA_ID_HOST,
                tunnel: None,
            })
            .collect();
        self.dp().publish_ipcache(&entries)?;
        Ok(())
    }

    /// Creates an endpoint in one go, holding `self` throughout (restore,
    /// tests); the API uses [`create_unlocked`].
    pub fn create(&mut self, req: EndpointCreate) -> Result<EndpointRecord, EndpointError> {
        let pending = self.begin_create(req)?;
        let prepared = pending.prepare();
        self.finish_create(pending, prepared)
    }

    fn routers(&self) -> (Ipv6Addr, Option<Ipv4Addr>) {
        let router6 = match self.pools.v6.router() {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => unreachable!("IPv6 pool"),
        };
        let router4 = self.pools.v4.as_ref().and_then(|p| match p.router() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        (router6, router4)
    }

    /// First phase of a create: checks the request, replaces what an
    /// earlier ADD of the same container left, allocates the id and
    /// addresses and writes the `creating` record, in one transaction.
    pub fn begin_create(&mut self, req: EndpointCreate) -> Result<PendingEndpoint, EndpointError> {
        // Every field is checked before anything is allocated (README, "Input limits").
        cilia_api::labels::validate_endpoint_labels(&req.labels)?;
        self.begin_create_checked(req)
    }

    /// The node's health endpoint (cluster mode): an endpoint in `netns`
    /// with the reserved identity `health`, in its own Kubernetes-style
    /// namespace so that no namespaced policy selects it. Only the agent
    /// makes it: the API refuses `reserved:` labels. Returns the existing
    /// one when there is one.
    pub fn ensure_health_endpoint(&mut self, netns: &str) -> Result<EndpointRecord, EndpointError> {
        if let Some(rec) = self
            .store
            .endpoints()?
            .into_iter()
            .find(|r| r.labels.contains_key(crate::store::HEALTH_LABEL))
        {
            return Ok(rec);
        }
        let req = EndpointCreate {
            netns: netns.to_string(),
            labels: [(crate::store::HEALTH_LABEL.to_string(), String::new())].into(),
            ifname: None,
            container_id: None,
            network: None,
            namespace: Some(crate::store::HEALTH_NAMESPACE.into()),
            label_source: None,
            named_ports: Vec::new(),
            k8s_pod: None,
        };
        let pending = self.begin_create_checked(req)?;
        let prepared = pending.prepare();
        self.finish_create(pending, prepared)
    }

    fn begin_create_checked(
        &mut self,
        req: EndpointCreate,
    ) -> Result<PendingEndpoint, EndpointError> {
        let mut begun = Phases::start();
        let ifname = req.ifname.clone().unwrap_or_else(|| "eth0".into());
        cilia_api::limits::check_ifname("ifname", &ifname).map_err(EndpointError::Ifname)?;
        if let Some(cid) = &req.container_id {
            cilia_api::limits::check_container_id("container_id", cid)?;
        }
        cilia_api::limits::check_netns("netns", &req.netns)?;
        if req.named_ports.len() > cilia_api::limits::MAX_NAMED_PORTS {
            return Err(cilia_api::limits::InputError::new(
                "named_ports",
                &format!("{} given", req.named_ports.len()),
                format!("at most {}", cilia_api::limits::MAX_NAMED_PORTS),
            )
            .into());
        }
        let named_ports = crate::policy::checked_named_ports(&req.named_ports)?;
        let netns = netdev::open_netns(&req.netns, &self.agent_netns)?;
        let namespace = req
            .namespace
            .clone()
            .unwrap_or_else(|| crate::store::DEFAULT_NAMESPACE.into());
        cilia_api::labels::validate_value(&namespace)
            .map_err(|reason| EndpointError::Namespace(namespace.clone(), reason))?;
        let mut labels: BTreeMap<String, String> = req.labels.clone();
        let mut label_source = match req.label_source.as_deref() {
            None => None,
            Some("podman") if labels.is_empty() => Some("podman".to_string()),
            Some("podman") => None, // labels given: nothing to learn
            Some(other) => return Err(EndpointError::LabelSource(other.to_string())),
        };
        let k8s_pod = req.k8s_pod.clone();
        let mut namespace = namespace;
        if let (true, Some(pod)) = (self.kubernetes, &k8s_pod) {
            // The pod's labels, from the API server, are the endpoint's:
            // `init` until the pod watch knows them, whatever the runtime says.
            cilia_api::labels::validate_value(&pod.namespace)
                .map_err(|reason| EndpointError::Namespace(pod.namespace.clone(), reason))?;
            namespace = pod.namespace.clone();
            labels.clear();
            label_source = Some(crate::k8s::LABEL_SOURCE.to_string());
        }
        if label_source.as_deref() == Some("podman") && req.container_id.is_none() {
            return Err(EndpointError::LabelSource(
                "podman (needs container_id)".to_string(),
            ));
        }
        // A runtime retrying ADD after a crash: replace what is left of the
        // earlier attempt for the same container, interface and network.
        if let Some(cid) = &req.container_id {
            let stale: Vec<u16> = self
                .store
                .endpoints()?
                .into_iter()
                .filter(|r| r.container_id.as_deref() == Some(cid.as_str()) && r.ifname == ifname)
                // One being deleted in the background is going already
                // (its device is named after its id, so it is in no way).
                .filter(|r| !self.deleting.contains(&r.id))
                .filter(|r| match &req.network {
                    Some(n) => r.attached_to(n),
                    None => true,
                })
                .map(|r| r.id)
                .collect();
            for id in stale {
                warn!(id, container = %cid, "replacing the endpoint of an earlier ADD for the same container");
                self.delete(id)?;
            }
        }
        let rec =
            self.store
                .create_endpoint(&self.pools.v6, self.pools.v4.as_ref(), |id, v6, v4| {
                    EndpointRecord {
                        id,
                        netns: netns.path.display().to_string(),
                        ifname: ifname.clone(),
                        host_ifname: netdev::host_ifname(id),
                        ipv6: v6,
                        ipv4: v4,
                        labels,
                        mac: netdev::endpoint_mac(id, false),
                        host_mac: netdev::endpoint_mac(id, true),
                        state: EndpointState::Creating,
                        reason: None,
                        container_id: req.container_id.clone(),
                        namespace: namespace.clone(),
                        identity: 0,
                        label_source: label_source.clone(),
                        policy_audit: false,
                        network: req.network.clone(),
                        named_ports: named_ports.clone(),
                        k8s_pod: k8s_pod.clone(),
                    }
                })?;
        crate::crash::point("endpoint-create:after-record");
        self.creating.insert(rec.id);
        let (router6, router4) = self.routers();
        Ok(PendingEndpoint {
            spec: VethSpec {
                netns,
                host_ifname: rec.host_ifname.clone(),
                host_mac: rec.host_mac,
                ifname: rec.ifname.clone(),
                mac: rec.mac,
                ipv6: rec.ipv6,
                ipv4: rec.ipv4,
                router6,
                router4,
                mtu: self.mtu,
            },
            rec,
            netdev: self.netdev.clone(),
            datapath: self.datapath.clone(),
            loads: self.loads.clone(),
            specialize: self.specialize.clone(),
            begun: {
                begun.mark("record");
                begun
            },
        })
    }

    /// Last phase of a create: with what `prepared` made, programs the
    /// policy map, attaches, publishes and marks the endpoint ready, then
    /// regenerates the others' policies if it brings a new identity; or
    /// rolls everything back.
    pub fn finish_create(
        &mut self,
        mut pending: PendingEndpoint,
        prepared: Result<PreparedEndpoint, EndpointError>,
    ) -> Result<EndpointRecord, EndpointError> {
        self.creating.remove(&pending.rec.id);
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                warn!(id = pending.rec.id, error = %e, "endpoint creation failed; rolling back");
                self.rollback(&pending.rec);
                return Err(e);
            }
        };
        // Labels or the namespace's labels may have been set while the
        // lock was free: the record is what the endpoint must be now.
        let rec = match self.get(pending.rec.id) {
            Ok(rec) => rec,
            Err(e) => {
                self.rollback(&pending.rec);
                return Err(e);
            }
        };
        let mut phases = Phases::start();
        let connected = self
            .connect(&rec, prepared, &mut phases)
            .and_then(|generic| {
                self.serve_netns(&rec, &pending.spec.netns.file)
                    .map(|()| generic)
            });
        match connected {
            Ok(generic) => {
                let mut ready = rec;
                ready.state = EndpointState::Ready;
                if let Err(e) = self.store.update_endpoint(&ready) {
                    self.rollback(&ready);
                    return Err(e.into());
                }
                phases.mark("ready");
                phases.include(std::mem::replace(&mut pending.begun, Phases::start()));
                self.top_up_spares();
                crate::crash::point("endpoint-create:after-ready");
                info!(id = ready.id, ipv6 = %ready.ipv6, ipv4 = ?ready.ipv4, generic,
                    took_ms = phases.total_ms(), phases = %phases, "endpoint created");
                if generic {
                    if let Some(spec) = &self.specialize {
                        spec.queue(ready.id);
                    }
                }
                // Only a new identity can change what the others' policies
                // select; an identity shared with another endpoint (or the
                // reserved init) is already in every map it belongs in.
                // Port names change what the others' egress named ports resolve to.
                let new_identity = self.identity_is_new(&ready)? || !ready.named_ports.is_empty();
                let regenerated = if new_identity {
                    self.policy().regenerate()
                } else {
                    Ok(())
                };
                if let Err(e) = regenerated {
                    warn!(id = ready.id, error = %e, "policy regeneration failed; rolling back");
                    self.rollback(&ready);
                    return Err(e);
                }
                Ok(ready)
            }
            Err(e) => {
                warn!(id = rec.id, error = %e, "endpoint creation failed; rolling back");
                self.rollback(&rec);
                Err(e)
            }
        }
    }

    /// Policy map, program, map entries for a recorded endpoint whose
    /// devices and programs `prepared` holds. Whether it was attached to the
    /// generic program.
    fn connect(
        &mut self,
        rec: &EndpointRecord,
        prepared: PreparedEndpoint,
        phases: &mut Phases,
    ) -> Result<bool, EndpointError> {
        let PreparedEndpoint {
            ifindex,
            programs,
            setup,
        } = prepared;
        phases.include(setup);
        // The policy map exists before the program can see a packet: a new
        // endpoint is never briefly open when a policy selects it.
        self.policy().apply_policy(rec)?;
        phases.mark("policy");
        crate::crash::point("endpoint-create:after-policy");
        // Programs loaded for an older version of the record (an identity
        // changed meanwhile) are not used: they are loaded again.
        let config = config_of(rec, ifindex);
        let generic = programs.is_none();
        match programs {
            Some(programs) => {
                let programs = if *programs.config() == config {
                    programs
                } else {
                    self.dp().load_endpoint(&config)?
                };
                self.dp().attach_endpoint(programs, &rec.host_ifname)?;
            }
            // The configuration is read at attach: labels set meanwhile
            // are already in it.
            None => self
                .dp()
                .attach_endpoint_generic(&config, &rec.host_ifname)?,
        }
        phases.mark("attach");
        crate::crash::point("endpoint-create:after-attach");
        self.publish(rec, ifindex)?;
        phases.mark("publish");
        crate::crash::point("endpoint-create:after-publish");
        Ok(generic)
    }

    /// Publishes an endpoint's addresses: delivery info and identity, in
    /// `cilia_endpoints` only; local endpoint addresses are never ipcache
    /// entries (see `node`).
    pub(crate) fn publish(
        &mut self,
        rec: &EndpointRecord,
        ifindex: u32,
    ) -> Result<(), EndpointError> {
        for ip in rec.ips() {
            self.dp()
                .publish_endpoint(&EndpointEntry::new(ip, info_of(rec, ifindex)))?;
        }
        Ok(())
    }

    /// Best-effort undo of everything `create` may have done.
    fn rollback(&mut self, rec: &EndpointRecord) {
        self.teardown(rec);
        if let Err(e) = self.store.delete_endpoint(rec) {
            warn!(id = rec.id, error = %e, "rollback could not remove the record");
        }
    }

    /// Removes the kernel side of an endpoint; logs what it cannot remove.
    fn teardown(&mut self, rec: &EndpointRecord) {
        for ip in rec.ips() {
            if let Err(e) = self.dp().withdraw_endpoint(ip) {
                warn!(id = rec.id, %ip, error = %e, "cannot remove endpoint map entry");
            }
        }
        self.policy().forget(rec.id);
        if let Err(e) = self.unserve_netns(rec.id) {
            warn!(id = rec.id, error = %e, "cannot stop serving the endpoint's namespace (socket LB)");
        }
        if let Err(e) = self.dp().detach_endpoint(rec.id) {
            warn!(id = rec.id, error = %e, "cannot remove link pin");
        }
        if let Err(e) = self.netdev.delete(&rec.host_ifname) {
            warn!(id = rec.id, error = %e, "cannot delete veth");
        }
    }

    /// Deletes an endpoint, all of it, before returning (the API's
    /// `DELETE /v1/endpoints/{id}`, the CLI, a create replacing a stale
    /// endpoint, restore). [`EndpointManager::disconnect`], the kernel
    /// cleanup and [`EndpointManager::finish_delete`] under one lock hold.
    pub fn delete(&mut self, id: u16) -> Result<(), EndpointError> {
        let gone = self.disconnect(id)?;
        let cleaned = remove_kernel_side(&self.datapath, self.netdev.as_ref(), &gone.rec);
        self.finish_delete(gone, cleaned)
    }

    /// Whether an endpoint being deleted in the background has its device
    /// named `ifname` in the network namespace `netns` (compared by the
    /// namespace's inode: runtimes name one namespace by several paths).
    fn deleting_device_in(&self, netns: &str, ifname: &str) -> Result<bool, EndpointError> {
        use std::os::unix::fs::MetadataExt;
        if self.deleting.is_empty() {
            return Ok(false);
        }
        let inode = |path: &str| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let Some(want) = inode(netns) else {
            return Ok(false);
        };
        Ok(self.store.endpoints()?.iter().any(|r| {
            self.deleting.contains(&r.id) && r.ifname == ifname && inode(&r.netns) == Some(want)
        }))
    }

    /// The first step of every delete, under the lock: the endpoint's
    /// addresses are withdrawn (nothing is delivered to it any more), its
    /// namespace is no longer served, and its record says `deleting`, so
    /// that an agent that dies before the delete is finished finishes it
    /// at restart. Its programs stay attached with their policy map until
    /// [`remove_kernel_side`]: whatever the container still sends meets
    /// its policy. Until [`EndpointManager::finish_delete`] the endpoint is
    /// [`EndpointError::Busy`] to other deletes, and its id and addresses
    /// stay allocated.
    pub fn disconnect(&mut self, id: u16) -> Result<Disconnected, EndpointError> {
        if self.creating.contains(&id) || self.deleting.contains(&id) {
            return Err(EndpointError::Busy(id));
        }
        let mut phases = Phases::start();
        let mut rec = self.get(id)?;
        for ip in rec.ips() {
            self.dp().withdraw_endpoint(ip)?;
        }
        phases.mark("unpublish");
        crate::crash::point("endpoint-delete:after-unpublish");
        self.unserve_netns(rec.id)?;
        phases.mark("unserve");
        if rec.state != EndpointState::Deleting {
            rec.state = EndpointState::Deleting;
            rec.reason = None;
            self.store.update_endpoint(&rec)?;
        }
        phases.mark("record");
        // No regeneration programs its map from here on: its delete removes
        // the map without a lock of the policy's, and a write after that
        // would make the map again, left behind by the endpoint.
        self.policy().forget(id);
        crate::crash::point("endpoint-delete:after-disconnect");
        self.deleting.insert(id);
        Ok(Disconnected { rec, phases })
    }

    /// The last step of every delete, under the lock, once
    /// [`remove_kernel_side`] returned `cleaned`: the endpoint's conntrack
    /// entries, its record (freeing its id and addresses) and its policy
    /// go. If the kernel cleanup failed, the record stays `deleting` with
    /// the reason; a delete of it (or a restart) tries again.
    pub fn finish_delete(
        &mut self,
        gone: Disconnected,
        cleaned: Result<(), EndpointError>,
    ) -> Result<(), EndpointError> {
        let Disconnected {
            mut rec,
            mut phases,
        } = gone;
        self.deleting.remove(&rec.id);
        phases.mark("detach+veth");
        if let Err(e) = cleaned {
            rec.reason = Some(format!("removing its devices and programs failed: {e}"));
            if let Err(store) = self.store.update_endpoint(&rec) {
                warn!(id = rec.id, error = %store, "cannot record why the delete failed");
            }
            return Err(e);
        }
        // Nothing the endpoint was allowed may outlive it into the flows of
        // whoever gets its address or id next. After the kernel cleanup:
        // until then its program could still create entries.
        self.dp().purge_conntrack(rec.id, &rec.ips())?;
        phases.mark("conntrack");
        self.store.delete_endpoint(&rec)?;
        phases.mark("store");
        self.policy().forget(rec.id);
        // Policies of the others may have selected its identity, if it was
        // the last endpoint carrying it.
        if self.identity_is_new(&rec)? || !rec.named_ports.is_empty() {
            self.policy().regenerate()?;
        }
        phases.mark("policy");
        info!(id = rec.id, took_ms = phases.total_ms(), phases = %phases, "endpoint deleted");
        Ok(())
    }

    /// Whether `rec` is the only endpoint with its (non-reserved) identity.
    fn identity_is_new(&self, rec: &EndpointRecord) -> Result<bool, EndpointError> {
        if rec.identity < crate::store::FIRST_ENDPOINT_IDENTITY {
            return Ok(false);
        }
        Ok(!self
            .store
            .endpoints()?
            .iter()
            .any(|other| other.id != rec.id && other.identity == rec.identity))
    }

    /// Makes a ready endpoint's attached programs what its record says: a
    /// missing link is attached; a link whose device is not the endpoint's
    /// current one (the device was re-created, say) is replaced; a program
    /// whose baked-in configuration (identity, addresses, ifindex, MACs)
    /// differs from the record — or any program, when `reattach_all` —
    /// is re-specialized and swapped in through its pinned link. A matching
    /// one is left alone (no reload).
    fn reconcile_program(
        &mut self,
        rec: &EndpointRecord,
        ifindex: u32,
    ) -> Result<(), EndpointError> {
        let expected = config_of(rec, ifindex);
        let links = self.dp().check_links(&expected)?;
        let wrong_device = links
            .as_ref()
            .is_some_and(|l| l.iter().any(|l| l.ifindex != ifindex));
        let stale = links.as_ref().is_none_or(|l| {
            self.reattach_all || l.iter().any(|l| !l.config_matches || !l.build_matches)
        });
        if wrong_device {
            warn!(
                id = rec.id,
                ifindex, "pinned link is not on the endpoint's device; re-attaching"
            );
            self.dp().detach_endpoint(rec.id)?;
        } else if !stale {
            return Ok(());
        } else if links
            .as_ref()
            .is_some_and(|l| l.iter().any(|l| !l.build_matches))
        {
            info!(
                id = rec.id,
                "program was built by another cilia build; re-specializing"
            );
        } else if links.is_some() {
            info!(
                id = rec.id,
                "program does not match the endpoint's record; re-specializing"
            );
        }
        self.policy().apply_policy(rec)?;
        self.attach(&expected, &rec.host_ifname)?;
        Ok(())
    }

    /// `cilia datapath reload`: re-specializes every ready endpoint's
    /// programs from this build and swaps them into its pinned links,
    /// keeping links, maps and connections. Refused as a whole (nothing
    /// touched) when a pinned shared map no longer has this build's layout.
    /// One endpoint's failure (a verifier rejection, say) leaves it on its
    /// old programs and is reported; the others go on.
    pub fn reload_datapath(&mut self, force: bool) -> Result<DatapathReloadResult, EndpointError> {
        self.dp().check_pins()?;
        let mut endpoints = Vec::new();
        for rec in self.store.endpoints()? {
            let mut result = EndpointReload {
                endpoint_id: rec.id,
                outcome: ReloadOutcome::Skipped,
                reason: None,
                links: Vec::new(),
            };
            if rec.state != EndpointState::Ready {
                result.reason = Some(format!(
                    "endpoint is {}",
                    rec.reason.as_deref().unwrap_or("not ready")
                ));
                endpoints.push(result);
                continue;
            }
            let Some(ifindex) = self.netdev.ifindex(&rec.host_ifname) else {
                result.outcome = ReloadOutcome::Failed;
                result.reason = Some(format!("interface {} no longer exists", rec.host_ifname));
                endpoints.push(result);
                continue;
            };
            match self.dp().reload_endpoint(&config_of(&rec, ifindex), force) {
                Ok(done) => {
                    result.outcome = if done.swapped {
                        ReloadOutcome::Reloaded
                    } else {
                        ReloadOutcome::Unchanged
                    };
                    result.links = done
                        .links
                        .iter()
                        .map(|l| LinkReload {
                            program: l.program.to_string(),
                            link_id: l.link_id,
                            old_program_id: l.old_program_id,
                            new_program_id: l.new_program_id,
                        })
                        .collect();
                }
                Err(e) => {
                    warn!(id = rec.id, error = %e, "datapath reload failed; the endpoint keeps its old programs");
                    result.outcome = ReloadOutcome::Failed;
                    result.reason = Some(e.to_string());
                }
            }
            endpoints.push(result);
        }
        // The node programs (cluster mode) swap inside their pinned links too.
        match self.dp().reload_node_programs() {
            Ok(0) => {}
            Ok(n) => info!(links = n, "node programs reloaded"),
            Err(e) => {
                warn!(error = %e, "reloading the node programs failed; they keep their old programs")
            }
        }
        match self.dp().reload_socket_lb() {
            Ok(0) => {}
            Ok(n) => info!(links = n, "socket LB programs reloaded"),
            Err(e) => {
                warn!(error = %e, "reloading the socket LB programs failed; they keep their old programs")
            }
        }
        let count = |o: ReloadOutcome| endpoints.iter().filter(|e| e.outcome == o).count();
        let result = DatapathReloadResult {
            reloaded: count(ReloadOutcome::Reloaded),
            unchanged: count(ReloadOutcome::Unchanged),
            failed: count(ReloadOutcome::Failed),
            skipped: count(ReloadOutcome::Skipped),
            endpoints,
        };
        info!(
            reloaded = result.reloaded,
            unchanged = result.unchanged,
            failed = result.failed,
            skipped = result.skipped,
            "datapath reloaded"
        );
        Ok(result)
    }

    /// Reconciles recorded endpoints with the kernel after a (re)start:
    /// half-created ones are rolled back; ready ones keep running untouched
    /// (their pinned links never stopped), with map entries re-published and
    /// a missing attachment re-made; endpoints whose interface is gone are
    /// marked not ready with the reason.
    pub fn restore(&mut self) -> Result<(), EndpointError> {
        {
            let mut policy = self.policy();
            policy.load_policies()?;
            policy.withdraw_stale_ipcache_entries()?;
            policy.sync_node_addresses()?;
        }
        for mut rec in self.store.endpoints()? {
            if rec.state == EndpointState::Creating {
                warn!(
                    id = rec.id,
                    "rolling back endpoint left half-created by a previous agent"
                );
                self.rollback(&rec);
                continue;
            }
            if rec.state == EndpointState::Deleting {
                warn!(
                    id = rec.id,
                    "finishing the delete of an endpoint a previous agent had disconnected"
                );
                if let Err(e) = self.delete(rec.id) {
                    warn!(id = rec.id, error = %e, "finishing the delete failed; the endpoint stays `deleting`");
                }
                continue;
            }
            let Some(ifindex) = self.netdev.ifindex(&rec.host_ifname) else {
                let reason = format!(
                    "interface {} no longer exists (namespace deleted?)",
                    rec.host_ifname
                );
                warn!(id = rec.id, %reason, "endpoint not ready");
                for ip in rec.ips() {
                    let _ = self.dp().withdraw_endpoint(ip);
                }
                let _ = self.dp().detach_endpoint(rec.id);
                rec.state = EndpointState::NotReady;
                rec.reason = Some(reason);
                self.store.update_endpoint(&rec)?;
                continue;
            };
            let result = (|| -> Result<(), EndpointError> {
                self.reconcile_program(&rec, ifindex)?;
                self.publish(&rec, ifindex)
            })();
            let (state, reason) = match result {
                Ok(()) => (EndpointState::Ready, None),
                Err(e) => (EndpointState::NotReady, Some(e.to_string())),
            };
            if rec.state != state || rec.reason != reason {
                rec.state = state;
                rec.reason = reason;
                self.store.update_endpoint(&rec)?;
            }
        }
        self.sweep_policy_maps()?;
        self.top_up_spares();
        self.policy().regenerate()?;
        // Every endpoint program is of this build now. A program of an older
        // build rewrote conntrack entries' revision without clearing the
        // deliveries they cache (bpf/lib/fast.h): a new revision makes
        // every cache written before it untrusted.
        self.dp().bump_policy_revision()?;
        Ok(())
    }
}

/// Endpoints whose labels are still to be learned: (id, source, container
/// id). A read of the store: the label learner never waits for a create.
pub fn pending_labels(store: &Store) -> Result<Vec<(u16, String, String)>, EndpointError> {
    Ok(store
        .endpoints()?
        .into_iter()
        .filter(|r| r.state == EndpointState::Ready)
        // Kubernetes endpoints learn their labels from the pod watch.
        .filter(|r| r.label_source.as_deref() != Some(crate::k8s::LABEL_SOURCE))
        .filter_map(|r| Some((r.id, r.label_source?, r.container_id?)))
        .collect())
}

/// How long each step of one endpoint operation took, for its log line: a
/// slow ADD or DEL says where its time went without a profiler.
struct Phases {
    started: std::time::Instant,
    last: std::time::Instant,
    steps: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    fn start() -> Self {
        let now = std::time::Instant::now();
        Phases {
            started: now,
            last: now,
            steps: Vec::new(),
        }
    }

    /// Ends the step named `step` (it began where the previous one ended).
    fn mark(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        self.steps.push((step, now - self.last));
        self.last = now;
    }

    /// Rounded to 0.1 ms, as the steps are shown.
    fn total_ms(&self) -> f64 {
        (self.started.elapsed().as_secs_f64() * 1e4).round() / 10.0
    }

    /// Puts a first step `lock` before the others: from `asked`, when the
    /// operation asked for the lock, to when it started.
    fn waited_since(&mut self, asked: std::time::Instant) {
        let waited = self.started.saturating_duration_since(asked);
        self.steps.insert(0, ("lock", waited));
        self.started = self.started.min(asked);
    }

    /// Puts `earlier`'s steps (taken outside this operation's lock, say)
    /// before this one's, then the time between the two as `wait`; the
    /// start becomes `earlier`'s.
    fn include(&mut self, earlier: Phases) {
        let mut steps = earlier.steps;
        steps.push(("wait", self.started.saturating_duration_since(earlier.last)));
        steps.append(&mut self.steps);
        self.steps = steps;
        self.started = earlier.started;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, took)) in self.steps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{step}={:.1}ms", took.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::{Arc, Mutex};

    use cilia_datapath::fake::FakeDatapath;

    use super::*;

    /// What the fakes saw, shared with the test.
    /// The fake node's devices and addresses (the datapath is
    /// `cilia_datapath::fake::FakeDatapath`).
    #[derive(Default)]
    struct Kernel {
        devices: BTreeSet<String>,
        node_addrs: Vec<IpAddr>,
    }

    struct FakeNetdev(Arc<Mutex<Kernel>>);

    impl Netdev for FakeNetdev {
        fn create(&self, spec: &VethSpec) -> Result<u32, NetdevError> {
            self.0
                .lock()
                .unwrap()
                .devices
                .insert(spec.host_ifname.clone());
            Ok(7)
        }
        fn delete(&self, name: &str) -> Result<(), NetdevError> {
            self.0.lock().unwrap().devices.remove(name);
            Ok(())
        }
        fn ifindex(&self, name: &str) -> Option<u32> {
            self.0.lock().unwrap().devices.contains(name).then_some(7)
        }
        fn ensure_router(&self, _: Ipv6Addr, _: Option<Ipv4Addr>) -> Result<(), NetdevError> {
            Ok(())
        }
        fn node_addresses(&self) -> Result<Vec<IpAddr>, NetdevError> {
            Ok(self.0.lock().unwrap().node_addrs.clone())
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        kernel: Arc<Mutex<Kernel>>,
        dp: Arc<FakeDatapath>,
    }

    impl Harness {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            Self {
                path: dir.path().join("state.redb"),
                _dir: dir,
                kernel: Arc::default(),
                dp: Arc::new(FakeDatapath::new()),
            }
        }

        fn manager(&self) -> EndpointManager {
            self.manager_with_ranges("fd00::/120", "10.0.0.0/24")
        }

        /// A manager whose pools cover these ranges.
        fn manager_with_ranges(&self, v6: &str, v4: &str) -> EndpointManager {
            let mut mgr = EndpointManager::new(
                Store::open(&self.path).unwrap(),
                self.dp.clone(),
                Box::new(FakeNetdev(self.kernel.clone())),
                Pools {
                    v6: Pool::new(v6.parse().unwrap()).unwrap(),
                    v4: Some(Pool::new(v4.parse().unwrap()).unwrap()),
                },
            );
            // The requests use the test's own netns file: let it count as
            // another namespace.
            mgr.agent_netns = "/proc/self/ns/uts".into();
            mgr
        }
    }

    fn request() -> EndpointCreate {
        EndpointCreate {
            // Any namespace file other than `agent_netns` works for the
            // fake devices.
            netns: "/proc/self/ns/net".into(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            ifname: None,
            container_id: None,
            namespace: None,
            label_source: None,
            network: None,
            named_ports: Vec::new(),
            k8s_pod: None,
        }
    }

    #[test]
    fn create_records_a_ready_endpoint_with_devices_pin_and_map_entries() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let ep = mgr.create(request()).unwrap();
        assert_eq!(ep.state, EndpointState::Ready);
        assert_eq!(ep.ifname, "eth0");
        assert!(h.kernel.lock().unwrap().devices.contains(&ep.host_ifname));
        let d = h.dp.state();
        assert!(d.attached.contains_key(&ep.id));
        assert_eq!(d.endpoints.len(), 2);
    }

    #[test]
    fn an_endpoint_being_created_is_not_deleted_until_its_create_finishes() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let pending = mgr.begin_create(request()).unwrap();
        let id = pending.id();
        assert_eq!(mgr.get(id).unwrap().state, EndpointState::Creating);
        assert!(matches!(mgr.delete(id), Err(EndpointError::Busy(i)) if i == id));
        let prepared = pending.prepare();
        let ep = mgr.finish_create(pending, prepared).unwrap();
        assert_eq!(ep.state, EndpointState::Ready);
        mgr.delete(id).unwrap();
        assert!(mgr.list().unwrap().is_empty());
    }

    #[test]
    fn a_disconnected_endpoint_gets_no_traffic_and_holds_its_id_and_addresses_until_reaped() {
        let h = Harness::new();
        let mgr = Mutex::new(h.manager());
        let ep = mgr.lock().unwrap().create(request()).unwrap();
        let id = ep.id;
        let gone = mgr.lock().unwrap().disconnect(id).unwrap();
        {
            let mut m = mgr.lock().unwrap();
            let rec = m.get(id).unwrap();
            assert_eq!(rec.state, EndpointState::Deleting);
            assert!(h.dp.state().endpoints.is_empty(), "addresses withdrawn");
            assert!(h.dp.state().attached.contains_key(&id), "still enforcing");
            assert!(h.dp.state().policy.contains_key(&id), "with its policy");
            assert!(m.allocated().unwrap().contains(&IpAddr::V6(ep.ipv6)));
            assert!(matches!(m.delete(id), Err(EndpointError::Busy(i)) if i == id));
            // Deletes of its container leave it to the delete under way.
            assert_eq!(m.delete_matching(|_| true).unwrap(), 0);
            let again = m.create(request()).unwrap();
            assert_ne!(again.id, id, "its id is not handed out again");
            assert_ne!(again.ipv6, ep.ipv6, "nor its address");
            m.delete(again.id).unwrap();
        }
        reap(&mgr, vec![gone]);
        let m = mgr.lock().unwrap();
        assert!(m.list().unwrap().is_empty());
        assert!(!h.dp.state().attached.contains_key(&id));
        assert!(!h.dp.state().policy.contains_key(&id));
        assert!(h.kernel.lock().unwrap().devices.is_empty());
        assert!(!m.allocated().unwrap().contains(&IpAddr::V6(ep.ipv6)));
    }

    #[test]
    fn a_create_that_finds_the_pool_full_waits_for_the_deletes_being_finished() {
        let h = Harness::new();
        // One usable IPv4 address: network, router and broadcast aside.
        let mgr = Mutex::new(h.manager_with_ranges("fd00::/126", "10.0.0.0/30"));
        let first = create_unlocked(&mgr, request()).unwrap();
        let full = create_unlocked(&mgr, request()).unwrap_err();
        assert!(is_exhausted(&full), "{full}");
        let (gone, result) = mgr.lock().unwrap().disconnect_matching(|_| true);
        result.unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                reap(&mgr, gone);
            });
            let second = create_unlocked(&mgr, request()).unwrap();
            assert_eq!(second.ipv4, first.ipv4, "the freed address");
        });
        // With no delete in flight an exhausted pool is refused at once.
        let t = std::time::Instant::now();
        assert!(is_exhausted(&create_unlocked(&mgr, request()).unwrap_err()));
        assert!(t.elapsed() < REAP_WAIT);
    }

    #[test]
    fn a_create_into_the_namespace_of_a_delete_in_flight_waits_for_its_device_to_go() {
        let h = Harness::new();
        let mgr = Mutex::new(h.manager());
        let first = mgr.lock().unwrap().create(request()).unwrap();
        let (gone, result) = mgr.lock().unwrap().disconnect_matching(|_| true);
        result.unwrap();
        assert!(mgr
            .lock()
            .unwrap()
            .deleting_device_in("/proc/self/ns/net", "eth0")
            .unwrap());
        // Another name in that namespace, or that name elsewhere: no wait.
        let m = mgr.lock().unwrap();
        assert!(!m.deleting_device_in("/proc/self/ns/net", "eth1").unwrap());
        assert!(!m.deleting_device_in("/proc/self/ns/uts", "eth0").unwrap());
        drop(m);
        let reaped = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                reaped.store(true, std::sync::atomic::Ordering::SeqCst);
                reap(&mgr, gone);
            });
            let second = create_unlocked(&mgr, request()).unwrap();
            assert!(
                reaped.load(std::sync::atomic::Ordering::SeqCst),
                "waited for the reap"
            );
            assert_ne!(second.id, first.id);
        });
    }

    #[test]
    fn restore_finishes_a_delete_a_previous_agent_had_begun() {
        let h = Harness::new();
        let id = {
            let mut mgr = h.manager();
            let id = mgr.create(request()).unwrap().id;
            // The agent dies after answering the DEL, before the reap.
            drop(mgr.disconnect(id).unwrap());
            id
        };
        let mut mgr = h.manager();
        mgr.restore().unwrap();
        assert!(mgr.list().unwrap().is_empty());
        assert!(!h.dp.state().attached.contains_key(&id));
        assert!(h.kernel.lock().unwrap().devices.is_empty());
    }

    #[test]
    fn an_endpoint_being_deleted_is_left_to_its_delete_by_a_create_for_its_container() {
        let h = Harness::new();
        let mgr = Mutex::new(h.manager());
        let req = || EndpointCreate {
            container_id: Some("c1".into()),
            ..request()
        };
        let first = mgr.lock().unwrap().create(req()).unwrap().id;
        let (gone, result) = mgr.lock().unwrap().disconnect_matching(|_| true);
        result.unwrap();
        assert_eq!(gone.len(), 1);
        let second = mgr.lock().unwrap().create(req()).unwrap().id;
        assert_ne!(first, second);
        reap(&mgr, gone);
        let ids: Vec<u16> = mgr
            .lock()
            .unwrap()
            .list()
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![second]);
    }

    #[test]
    fn an_import_between_a_creates_policy_and_its_ready_record_reaches_the_new_endpoint() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let pending = mgr.begin_create(request()).unwrap();
        let id = pending.id();
        let creating = mgr.get(id).unwrap();
        // What `finish_create` does first, under the endpoints' lock: the
        // endpoint's map is written while its record still says `creating`.
        mgr.policy().apply_policy(&creating).unwrap();
        let before = h.dp.state().policy[&id].len();
        // An import takes only the policy's lock: it may run right here.
        mgr.policy().import_policies("t.yaml", THREE_CIDRS).unwrap();
        assert!(
            h.dp.state().policy[&id].len() > before,
            "the import programmed the endpoint being created"
        );
        let prepared = pending.prepare();
        mgr.finish_create(pending, prepared).unwrap();
    }

    #[test]
    fn other_endpoints_are_created_and_listed_while_one_sets_up_its_devices() {
        let h = Harness::new();
        let manager = Mutex::new(h.manager());
        let slow = manager.lock().unwrap().begin_create(request()).unwrap();
        // `slow` is between its phases: the lock is free for everyone else.
        let quick = create_unlocked(&manager, request()).unwrap();
        assert_eq!(quick.state, EndpointState::Ready);
        assert_eq!(manager.lock().unwrap().list().unwrap().len(), 2);
        let prepared = slow.prepare();
        let slow = manager
            .lock()
            .unwrap()
            .finish_create(slow, prepared)
            .unwrap();
        assert_eq!(slow.state, EndpointState::Ready);
        assert_ne!(slow.id, quick.id);
    }

    #[test]
    fn labels_set_during_a_create_are_those_its_program_is_attached_with() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let pending = mgr.begin_create(request()).unwrap();
        let prepared = pending.prepare();
        let relabelled = mgr
            .set_labels(pending.id(), &BTreeMap::from([("app".into(), "db".into())]))
            .unwrap();
        let ep = mgr.finish_create(pending, prepared).unwrap();
        assert_eq!(ep.identity, relabelled.identity);
        assert_eq!(h.dp.state().attached[&ep.id].identity, relabelled.identity);
    }

    #[test]
    fn a_failed_device_setup_rolls_back_the_record_and_addresses() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let pending = mgr.begin_create(request()).unwrap();
        let failed = Err(EndpointError::Netdev(NetdevError::Netlink {
            what: "creating veth".into(),
            reason: "test".into(),
        }));
        assert!(mgr.finish_create(pending, failed).is_err());
        assert!(mgr.list().unwrap().is_empty());
        assert!(mgr.allocated().unwrap().is_empty());
        assert!(h.kernel.lock().unwrap().devices.is_empty());
    }

    #[test]
    fn failed_attach_rolls_back_devices_record_and_addresses() {
        let h = Harness::new();
        let mut mgr = h.manager();
        h.dp.fail_next("attach_endpoint", usize::MAX);
        assert!(matches!(
            mgr.create(request()),
            Err(EndpointError::Datapath(_))
        ));
        let d = h.dp.state();
        assert!(h.kernel.lock().unwrap().devices.is_empty());
        assert!(d.attached.is_empty() && d.endpoints.is_empty());
        assert!(mgr.list().unwrap().is_empty());
        assert!(mgr.allocated().unwrap().is_empty());
    }

    #[test]
    fn restore_rolls_back_an_endpoint_left_half_created() {
        let h = Harness::new();
        {
            let store = Store::open(&h.path).unwrap();
            let pools = h.manager_pools();
            store
                .create_endpoint(&pools.v6, pools.v4.as_ref(), |id, v6, v4| EndpointRecord {
                    id,
                    netns: "/proc/self/ns/net".into(),
                    ifname: "eth0".into(),
                    host_ifname: netdev::host_ifname(id),
                    ipv6: v6,
                    ipv4: v4,
                    labels: BTreeMap::new(),
                    mac: [2; 6],
                    host_mac: [3; 6],
                    state: EndpointState::Creating,
                    reason: None,
                    container_id: None,
                    namespace: "default".into(),
                    identity: 0,
                    label_source: None,
                    policy_audit: false,
                    network: None,
                    named_ports: Vec::new(),
                    k8s_pod: None,
                })
                .unwrap();
            // The crash happened after the veth was made.
            h.kernel.lock().unwrap().devices.insert("lxc1".into());
        }
        let mut mgr = h.manager();
        mgr.restore().unwrap();
        assert!(mgr.list().unwrap().is_empty());
        assert!(mgr.allocated().unwrap().is_empty());
        assert!(h.kernel.lock().unwrap().devices.is_empty());
    }

    #[test]
    fn restore_marks_an_endpoint_whose_interface_vanished_not_ready() {
        let h = Harness::new();
        let id = h.manager().create(request()).unwrap().id;
        h.kernel.lock().unwrap().devices.clear();
        let mut mgr = h.manager();
        mgr.restore().unwrap();
        let ep = mgr.get(id).unwrap();
        assert_eq!(ep.state, EndpointState::NotReady);
        assert!(ep.reason.unwrap().contains("no longer exists"));
        assert!(
            h.dp.state().endpoints.is_empty(),
            "stale map entries withdrawn"
        );
    }

    #[test]
    fn restore_reattaches_a_ready_endpoint_that_lost_its_pin() {
        let h = Harness::new();
        let id = h.manager().create(request()).unwrap().id;
        h.dp.state().attached.clear();
        h.manager().restore().unwrap();
        assert!(h.dp.state().attached.contains_key(&id));
    }

    #[test]
    fn restore_removes_policy_maps_of_ids_without_an_endpoint() {
        let h = Harness::new();
        let id = h.manager().create(request()).unwrap().id;
        // What a crash or an earlier agent may leave: a map with entries for
        // ids that have no endpoint (id + 1 is the next create's, id + 40 no one's).
        let stale = cilia_abi::EndpointPolicy {
            enforcement: cilia_abi::Enforcement {
                ingress: true,
                egress: false,
                audit: false,
            },
            entries: Vec::new(),
        };
        h.dp.set_endpoint_policy(id + 40, &stale).unwrap();
        h.dp.set_endpoint_policy(id + 1, &stale).unwrap();
        h.manager().restore().unwrap();
        let kept: Vec<u16> = h.dp.state().policy.keys().copied().collect();
        assert_eq!(kept, vec![id], "only the endpoint's map is left");
    }

    #[test]
    fn creates_leave_spares_for_the_next_ids_which_the_next_create_fills() {
        let h = Harness::new();
        let mut mgr = h.manager();
        mgr.spares = Some(spares::PolicySpares::start(h.dp.clone(), mgr.store.clone()).unwrap());
        let first = mgr.create(request()).unwrap().id;
        let want: Vec<u16> = (first + 1..=first + spares::SPARES_AHEAD as u16).collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while h
            .dp
            .state()
            .policy_spares
            .iter()
            .copied()
            .collect::<Vec<_>>()
            != want
        {
            assert!(std::time::Instant::now() < deadline, "spares never made");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut second = request();
        second.container_id = Some("second".into());
        let next = mgr.create(second).unwrap().id;
        assert_eq!(next, first + 1);
        assert!(!h.dp.state().policy_spares.contains(&next), "filled");
        assert!(h.dp.state().policy.contains_key(&next));
    }

    fn ipcache_identity(h: &Harness, ip: &str) -> Option<u32> {
        let ip: IpAddr = ip.parse().unwrap();
        h.dp.state()
            .ipcache
            .get(&cilia_abi::IpcacheEntry::key_of(&crate::node::host_prefix(
                ip,
            )))
            .map(|v| v.identity)
    }

    #[test]
    fn node_addresses_are_host_in_the_ipcache_and_follow_changes() {
        let h = Harness::new();
        h.kernel.lock().unwrap().node_addrs =
            vec!["192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap()];
        let mut mgr = h.manager();
        mgr.restore().unwrap();
        assert_eq!(ipcache_identity(&h, "192.0.2.7"), Some(CILIA_ID_HOST));
        assert_eq!(ipcache_identity(&h, "2001:db8::7"), Some(CILIA_ID_HOST));
        assert_eq!(
            ipcache_identity(&h, "fd00::1"),
            Some(CILIA_ID_HOST),
            "router"
        );
        h.kernel.lock().unwrap().node_addrs = vec!["192.0.2.8".parse().unwrap()];
        mgr.policy().sync_node_addresses().unwrap();
        assert_eq!(ipcache_identity(&h, "192.0.2.7"), None, "address gone");
        assert_eq!(ipcache_identity(&h, "2001:db8::7"), None);
        assert_eq!(ipcache_identity(&h, "192.0.2.8"), Some(CILIA_ID_HOST));
        assert_eq!(
            ipcache_identity(&h, "fd00::1"),
            Some(CILIA_ID_HOST),
            "router stays"
        );
    }

    #[test]
    fn an_endpoint_address_never_carries_the_endpoints_identity_in_the_ipcache() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let ep = mgr.create(request()).unwrap();
        for ip in ep.ips() {
            assert_eq!(ipcache_identity(&h, &ip.to_string()), None, "{ip}");
        }
        // A node process that puts the endpoint's address on a node
        // interface makes it host, never the endpoint.
        h.kernel.lock().unwrap().node_addrs = vec![IpAddr::V6(ep.ipv6)];
        mgr.policy().sync_node_addresses().unwrap();
        assert_eq!(
            ipcache_identity(&h, &ep.ipv6.to_string()),
            Some(CILIA_ID_HOST)
        );
    }

    #[test]
    fn restore_withdraws_endpoint_entries_an_older_agent_left_in_the_ipcache() {
        let h = Harness::new();
        let ep = h.manager().create(request()).unwrap();
        h.dp.state().ipcache.insert(
            cilia_abi::IpcacheEntry::key_of(&crate::node::host_prefix(IpAddr::V6(ep.ipv6))),
            cilia_abi::IpcacheValue {
                identity: ep.identity,
                ..Default::default()
            },
        );
        h.manager().restore().unwrap();
        assert_eq!(ipcache_identity(&h, &ep.ipv6.to_string()), None);
    }

    /// Runs `walk` (which walks conntrack through the datapath) in
    /// a thread and, while it is inside the walk, creates and deletes an
    /// endpoint through the endpoints' lock.
    fn endpoint_changes_during_a_conntrack_walk(
        operation: &'static str,
        walk: impl FnOnce(&Mutex<EndpointManager>, &dyn Datapath) + Send,
    ) {
        let h = Harness::new();
        let manager = Mutex::new(h.manager());
        let gate = h.dp.gate(operation);
        std::thread::scope(|scope| {
            let (m, d) = (&manager, h.dp.as_ref());
            let walker = scope.spawn(move || walk(m, d));
            assert!(
                gate.wait_entered(1, std::time::Duration::from_secs(10)),
                "the walk started"
            );
            let mut mgr = manager
                .try_lock()
                .expect("the endpoints' lock is free during the walk");
            let ep = mgr.create(request()).unwrap();
            mgr.delete(ep.id).unwrap();
            drop(mgr);
            gate.release();
            walker.join().unwrap();
        });
    }

    #[test]
    fn a_metrics_scrape_never_holds_the_lock_endpoint_create_needs() {
        endpoint_changes_during_a_conntrack_walk("conntrack", |manager, dp| {
            let store = manager.lock().unwrap().store.clone();
            crate::metrics::scrape(&store, dp).unwrap();
        });
    }

    #[test]
    fn conntrack_gc_never_holds_the_lock_endpoint_create_needs() {
        endpoint_changes_during_a_conntrack_walk("gc_conntrack", |_, dp| {
            let m = crate::metrics::AgentMetrics::default();
            crate::metrics::collect_conntrack_garbage(dp, &m).unwrap();
            assert_eq!(m.ct_gc_runs.get(), 1);
        });
    }

    const THREE_CIDRS: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: cidrs
spec:
  endpointSelector: {}
  egress:
  - toCIDR:
    - 192.0.2.0/24
    - 198.51.100.0/24
    - 203.0.113.0/24
";

    /// What an import must leave untouched when it is refused.
    fn policy_state(h: &Harness, mgr: &EndpointManager) -> impl PartialEq + std::fmt::Debug {
        let k = h.dp.state().clone();
        let mut ipcache: Vec<_> = k.ipcache.iter().map(|(k, v)| (*k, v.identity)).collect();
        ipcache.sort_by_key(|(k, _)| (k.prefixlen, k.addr));
        let mut policy: Vec<_> = k.policy.iter().map(|(k, v)| (*k, v.clone())).collect();
        policy.sort_by_key(|(k, _)| *k);
        let (documents, cidr_ids) = {
            let p = mgr.policy();
            (p.policy_documents(), p.cidr_ids.clone())
        };
        (
            mgr.store.policies().unwrap(),
            documents,
            cidr_ids,
            ipcache,
            policy,
        )
    }

    /// An import of `THREE_CIDRS` that `limit` makes too large is refused
    /// with `reason` and changes nothing.
    fn a_refused_import_changes_nothing(limit: impl FnOnce(&mut PolicyState), reason: &str) {
        let h = Harness::new();
        let mut mgr = h.manager();
        mgr.create(request()).unwrap();
        limit(&mut mgr.policy());
        let before = policy_state(&h, &mgr);
        let err = mgr
            .policy()
            .import_policies("t.yaml", THREE_CIDRS)
            .unwrap_err();
        assert!(err.to_string().contains(reason), "{err}");
        assert_eq!(before, policy_state(&h, &mgr));
    }

    #[test]
    fn an_import_that_does_not_fit_the_ipcache_changes_nothing() {
        a_refused_import_changes_nothing(|p| p.limits.ipcache_entries = 2, "ipcache");
    }

    #[test]
    fn the_map_size_check_counts_the_cidr_identities_the_import_brings() {
        // Without its three CIDR identities the policy is one entry (the
        // egress enforcement flag); with them, four.
        a_refused_import_changes_nothing(|p| p.limits.policy_entries = 3, "policy map entries");
    }

    #[test]
    fn an_import_whose_programming_fails_rolls_the_store_back() {
        let h = Harness::new();
        let mut mgr = h.manager();
        mgr.create(request()).unwrap();
        let before = policy_state(&h, &mgr);
        h.dp.fail_next("update_endpoint_policy", 1);
        assert!(mgr.policy().import_policies("t.yaml", THREE_CIDRS).is_err());
        assert_eq!(before, policy_state(&h, &mgr));
    }

    #[test]
    fn an_import_that_fits_is_programmed_once_checked() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let ep = mgr.create(request()).unwrap();
        mgr.policy().limits.policy_entries = 4;
        mgr.policy().import_policies("t.yaml", THREE_CIDRS).unwrap();
        assert_eq!(mgr.policy().cidr_ids.len(), 3);
        assert_eq!(h.dp.state().policy[&ep.id].len(), 4);
    }

    const BROKEN: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: old
spec:
  endpointSelector: {}
  bogusField: 1
";

    /// Endpoints in `default` and `other`, then an agent restart that finds
    /// a stored CiliumNetworkPolicy `default/old` that no longer parses.
    fn restart_with_a_broken_stored_policy(h: &Harness) -> (EndpointManager, u16, u16) {
        let (in_default, in_other) = {
            let mut mgr = h.manager();
            let a = mgr.create(request()).unwrap();
            let mut req = request();
            req.namespace = Some("other".into());
            let b = mgr.create(req).unwrap();
            (a.id, b.id)
        };
        Store::open(&h.path)
            .unwrap()
            .put_policies(&[crate::store::StoredPolicy {
                kind: "CiliumNetworkPolicy".into(),
                namespace: Some("default".into()),
                name: "old".into(),
                yaml: BROKEN.into(),
                origin: None,
            }])
            .unwrap();
        let mut mgr = h.manager();
        mgr.restore().unwrap();
        (mgr, in_default, in_other)
    }

    fn enforced_directions(h: &Harness, id: u16) -> (usize, usize) {
        let k = h.dp.state();
        let entries = &k.policy[&id];
        let e = cilia_abi::Enforcement::of(entries);
        let flags = usize::from(e.ingress) + usize::from(e.egress);
        // Entries besides the one marker.
        let others = entries.len() - usize::from(flags > 0);
        (flags, others)
    }

    #[test]
    fn a_stored_policy_that_no_longer_parses_closes_its_namespace_both_ways() {
        let h = Harness::new();
        let (mgr, in_default, in_other) = restart_with_a_broken_stored_policy(&h);
        assert_eq!(
            enforced_directions(&h, in_default),
            (2, 0),
            "both directions enforced, nothing allowed"
        );
        assert_eq!(
            enforced_directions(&h, in_other),
            (0, 0),
            "other namespace open"
        );
        let errors = mgr.policy().policy_errors();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("CiliumNetworkPolicy default/old"),
            "{errors:?}"
        );
        assert!(
            errors[0].contains("endpoints in namespace default"),
            "{errors:?}"
        );
        assert!(errors[0].contains("bogusField"), "{errors:?}");
    }

    #[test]
    fn reimporting_a_broken_policy_in_valid_form_reopens_its_namespace() {
        let h = Harness::new();
        let (mgr, in_default, _) = restart_with_a_broken_stored_policy(&h);
        mgr.policy()
            .import_policies(
                "fixed.yaml",
                "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: old
spec:
  endpointSelector: {}
  ingress:
  - fromEntities:
    - all
",
            )
            .unwrap();
        assert!(mgr.policy().policy_errors().is_empty());
        let (flags, len) = enforced_directions(&h, in_default);
        assert_eq!(flags, 1, "ingress only");
        assert!(len > 0, "with its allow entry");
    }

    #[test]
    fn a_broken_stored_policy_can_be_deleted_by_name() {
        let h = Harness::new();
        let (mgr, in_default, _) = restart_with_a_broken_stored_policy(&h);
        let (_, names) = mgr.policy().delete_policies(Some("old"), None).unwrap();
        assert_eq!(names.len(), 1);
        assert!(mgr.policy().policy_errors().is_empty());
        assert!(mgr.store.policies().unwrap().is_empty());
        assert_eq!(enforced_directions(&h, in_default), (0, 0));
    }

    #[test]
    fn restore_leaves_a_program_that_matches_its_record_alone() {
        let h = Harness::new();
        h.manager().create(request()).unwrap();
        let before = h.dp.calls("attach_endpoint");
        h.manager().restore().unwrap();
        assert_eq!(h.dp.calls("attach_endpoint"), before, "no reload");
    }

    #[test]
    fn restore_respecializes_a_program_whose_config_differs_from_its_record() {
        let h = Harness::new();
        let ep = h.manager().create(request()).unwrap();
        // An older agent attached it with another identity.
        h.dp.state().attached.get_mut(&ep.id).unwrap().identity = 999;
        h.manager().restore().unwrap();
        assert_eq!(h.dp.state().attached[&ep.id].identity, ep.identity);
        assert_eq!(
            h.dp.calls("detach_endpoint"),
            0,
            "swapped through the pinned link"
        );
    }

    #[test]
    fn restore_respecializes_a_program_an_older_build_attached() {
        let h = Harness::new();
        let ep = h.manager().create(request()).unwrap();
        h.dp.state().other_build.insert(ep.id);
        let before = h.dp.calls("attach_endpoint");
        h.manager().restore().unwrap();
        assert_eq!(
            h.dp.calls("attach_endpoint"),
            before + 1,
            "swapped in this build's program"
        );
        assert_eq!(h.dp.calls("detach_endpoint"), 0, "through the pinned link");
    }

    /// Two ready endpoints and the outcome of a reload.
    fn reload(h: &Harness, force: bool) -> (u16, u16, DatapathReloadResult) {
        reload_after(h, force, |_| ())
    }

    /// [`reload`], with `before` run on the second endpoint's id first.
    fn reload_after(
        h: &Harness,
        force: bool,
        before: impl FnOnce(u16),
    ) -> (u16, u16, DatapathReloadResult) {
        let mut mgr = h.manager();
        let a = mgr.create(request()).unwrap().id;
        let b = mgr.create(request()).unwrap().id;
        before(b);
        (a, b, mgr.reload_datapath(force).unwrap())
    }

    fn outcome(r: &DatapathReloadResult, id: u16) -> &EndpointReload {
        r.endpoints.iter().find(|e| e.endpoint_id == id).unwrap()
    }

    #[test]
    fn a_forced_reload_swaps_every_ready_endpoints_programs() {
        let h = Harness::new();
        let (a, b, r) = reload(&h, true);
        assert_eq!((r.reloaded, r.unchanged, r.failed), (2, 0, 0));
        for id in [a, b] {
            let e = outcome(&r, id);
            assert_eq!(e.outcome, ReloadOutcome::Reloaded);
            assert_ne!(e.links[0].old_program_id, e.links[0].new_program_id);
        }
        assert_eq!(h.dp.calls("detach_endpoint"), 0, "nothing detached");
    }

    #[test]
    fn a_reload_leaves_programs_of_this_build_unchanged_and_swaps_an_older_builds() {
        let h = Harness::new();
        let (a, b, r) = reload_after(&h, false, |b| {
            h.dp.state().other_build.insert(b);
        });
        assert_eq!((a, b), (1, 2));
        assert_eq!(outcome(&r, a).outcome, ReloadOutcome::Unchanged);
        assert_eq!(outcome(&r, b).outcome, ReloadOutcome::Reloaded);
        assert!(
            h.dp.state().other_build.is_empty(),
            "the older build's program was swapped"
        );
    }

    #[test]
    fn a_verifier_rejection_fails_one_endpoint_and_the_others_go_on() {
        let h = Harness::new();
        h.dp.fail_next_with("reload_endpoint", 1, || DatapathError::Verifier {
            name: "cil_from_container".into(),
            source: std::io::Error::from_raw_os_error(13),
            summary: "invalid bpf_context access off=32752 size=8".into(),
        });
        let (a, b, r) = reload(&h, true);
        let failed = outcome(&r, a);
        assert_eq!(failed.outcome, ReloadOutcome::Failed);
        let reason = failed.reason.as_deref().unwrap();
        assert!(reason.contains("verifier rejected"), "{reason}");
        assert!(reason.contains("invalid bpf_context access"), "{reason}");
        assert_eq!(outcome(&r, b).outcome, ReloadOutcome::Reloaded);
        assert!(h.dp.state().attached.contains_key(&a), "still attached");
        assert_eq!(h.dp.calls("detach_endpoint"), 0);
    }

    #[test]
    fn a_reload_skips_endpoints_that_are_not_ready() {
        let h = Harness::new();
        let id = h.manager().create(request()).unwrap().id;
        h.kernel.lock().unwrap().devices.clear();
        let mut mgr = h.manager();
        mgr.restore().unwrap();
        let r = mgr.reload_datapath(true).unwrap();
        assert_eq!(outcome(&r, id).outcome, ReloadOutcome::Skipped);
        assert!(outcome(&r, id)
            .reason
            .as_deref()
            .unwrap()
            .contains("no longer exists"));
    }

    #[test]
    fn a_reload_is_refused_whole_when_a_pinned_map_changed_layout() {
        let h = Harness::new();
        let mut mgr = h.manager();
        mgr.create(request()).unwrap();
        h.dp.state().pins_changed = true;
        let e = mgr.reload_datapath(true).unwrap_err();
        assert!(e.to_string().contains("does not match this build"), "{e}");
        assert_eq!(h.dp.calls("reload_endpoint"), 0);
    }

    #[test]
    fn restore_replaces_a_link_attached_to_another_device() {
        let h = Harness::new();
        let ep = h.manager().create(request()).unwrap();
        // The device was deleted and re-created: the old link is defunct.
        h.dp.state().link_ifindex = Some(0);
        let before = h.dp.calls("detach_endpoint");
        h.manager().restore().unwrap();
        assert_eq!(
            h.dp.calls("detach_endpoint"),
            before + 1,
            "old link unpinned"
        );
        let d = h.dp.state();
        assert!(d.attached.contains_key(&ep.id), "new link pinned");
        assert!(d.policy.contains_key(&ep.id), "policy programmed again");
    }

    #[test]
    fn restore_reattaches_every_endpoint_when_maps_were_recreated() {
        let h = Harness::new();
        let mut mgr = h.manager();
        mgr.create(request()).unwrap();
        mgr.create(request()).unwrap();
        drop(mgr);
        let before = h.dp.calls("attach_endpoint");
        let mut mgr = h.manager();
        mgr.reattach_all = true;
        mgr.restore().unwrap();
        assert_eq!(h.dp.calls("attach_endpoint"), before + 2);
    }

    #[test]
    fn invalid_ifname_is_rejected_before_anything_is_allocated() {
        let h = Harness::new();
        let mut mgr = h.manager();
        for bad in ["a/b", "a\nb", "a\u{1}b", ""] {
            let mut req = request();
            req.ifname = Some(bad.into());
            assert!(
                matches!(mgr.create(req), Err(EndpointError::Ifname(_))),
                "{bad:?}"
            );
        }
        assert!(mgr.allocated().unwrap().is_empty());
    }

    #[test]
    fn ifname_outside_the_safe_charset_is_refused_naming_the_field() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let mut req = request();
        req.ifname = Some("eth0#x".into());
        let e = mgr.create(req).unwrap_err();
        assert!(matches!(e, EndpointError::Ifname(_)), "{e}");
        assert!(e.to_string().starts_with("ifname: \"eth0#x\""), "{e}");
        assert!(h.kernel.lock().unwrap().devices.is_empty());
        let mut req = request();
        req.ifname = Some("net1".into());
        assert_eq!(mgr.create(req).unwrap().ifname, "net1");
    }

    #[test]
    fn container_id_outside_the_cni_charset_is_refused() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let mut req = request();
        req.container_id = Some("../../etc".into());
        let e = mgr.create(req).unwrap_err();
        assert!(e.to_string().starts_with("container_id: "), "{e}");
        let mut req = request();
        req.container_id = Some("a".repeat(257));
        assert!(mgr.create(req).is_err());
        assert!(mgr.allocated().unwrap().is_empty());
        let mut req = request();
        req.container_id = Some("0f3e9a_b.c-d".into());
        assert!(mgr.create(req).is_ok());
    }

    #[test]
    fn reserved_and_excess_labels_are_refused_before_anything_is_allocated() {
        let h = Harness::new();
        let mut mgr = h.manager();
        for labels in [
            BTreeMap::from([("io.kubernetes.pod.namespace".into(), "kube-system".into())]),
            BTreeMap::from([("io.cilium.k8s.namespace.labels.team".into(), "a".into())]),
            (0..10_000).map(|i| (format!("k{i}"), "v".into())).collect(),
            BTreeMap::from([("app".into(), "a".repeat(65536))]),
        ] {
            let mut req = request();
            req.labels = labels;
            let e = mgr.create(req).unwrap_err();
            assert!(matches!(e, EndpointError::Labels(_)), "{e}");
            assert!(e.to_string().len() < 300, "{e}");
        }
        assert!(mgr.allocated().unwrap().is_empty());
    }

    #[test]
    fn learned_labels_never_reach_another_container_that_reused_the_id() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let waiting = |cid: &str| {
            let mut req = request();
            req.labels = BTreeMap::new();
            req.container_id = Some(cid.into());
            req.label_source = Some("podman".into());
            req
        };
        let first = mgr.create(waiting("c1")).unwrap();
        mgr.delete(first.id).unwrap();
        let second = mgr.create(waiting("c2")).unwrap();
        // Ids are quarantined, so here c2 gets another id; whatever id it
        // got, labels learned for c1 reach neither c1's old id nor c2's.
        let c1_labels = BTreeMap::from([("role".to_string(), "admin".to_string())]);
        for id in [first.id, second.id] {
            assert!(mgr
                .set_learned_labels(id, "c1", &c1_labels)
                .unwrap()
                .is_none());
        }
        let ep = mgr.get(second.id).unwrap();
        assert!(ep.labels.is_empty() && ep.label_source.is_some());
        let c2_labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        let ep = mgr
            .set_learned_labels(second.id, "c2", &c2_labels)
            .unwrap()
            .expect("applied to its own endpoint");
        assert_eq!(ep.labels, c2_labels);
        // Once applied, nothing more is learned for it.
        assert!(mgr
            .set_learned_labels(second.id, "c2", &c1_labels)
            .unwrap()
            .is_none());
    }

    fn named_port(s: &str) -> cilia_api::NamedPort {
        s.parse().unwrap()
    }

    /// Whether `subject`'s map allows `proto`/`port` in `direction` from/to `peer`'s identity.
    fn map_allows(h: &Harness, subject: u16, direction: u8, peer: u32, port: u16) -> bool {
        h.dp.state().policy.get(&subject).is_some_and(|entries| {
            entries.iter().any(|(k, v)| {
                k.direction == direction
                    && u32::from_be(k.identity) == peer
                    && k.proto == 6
                    && u16::from_be(k.dport) == port
                    && v.verdict == cilia_abi::CILIA_VERDICT_ALLOW
            })
        })
    }

    #[test]
    fn a_name_declared_twice_with_different_ports_is_refused_at_create() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let mut req = request();
        req.named_ports = vec![named_port("http=TCP/80"), named_port("http=TCP/8080")];
        let e = mgr.create(req).unwrap_err().to_string();
        assert_eq!(
            e,
            "named port \"http\": declared twice with different ports: TCP/80 and TCP/8080"
        );
        assert!(mgr.list().unwrap().is_empty());
        let mut req = request();
        req.named_ports = vec![named_port("HTTP=TCP/80")];
        let e = mgr.create(req).unwrap_err().to_string();
        assert!(
            e.starts_with("named port \"HTTP\": is not a port name"),
            "{e}"
        );
    }

    #[test]
    fn named_ports_are_kept_in_the_record_and_restored() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let mut req = request();
        req.named_ports = vec![
            named_port("http=tcp/8080"),
            named_port("dns=UDP/53"),
            named_port("http=TCP/8080"),
        ];
        let ep = mgr.create(req).unwrap();
        let shown: Vec<String> = ep.named_ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown, ["dns=UDP/53", "http=TCP/8080"]);
        let mut fresh = h.manager_from(&mut mgr);
        fresh.restore().unwrap();
        assert_eq!(fresh.get(ep.id).unwrap().named_ports, ep.named_ports);
    }

    #[test]
    fn a_peer_declaring_a_named_port_opens_it_in_the_egress_subjects_map() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let web = mgr.create(labelled("web")).unwrap();
        let egress = "  egress:\n  - toEndpoints: [{matchLabels: {app: db}}]\n    toPorts: [{ports: [{port: http, protocol: TCP}]}]\n";
        mgr.policy()
            .import_policies("a.yaml", &cnp("a", "web", egress))
            .unwrap();
        let mut req = labelled("db");
        req.named_ports = vec![named_port("http=TCP/8080")];
        let db = mgr.create(req).unwrap();
        let egress_dir = cilia_abi::CILIA_DIR_EGRESS;
        assert!(map_allows(&h, web.id, egress_dir, db.identity, 8080));
        assert!(!map_allows(&h, web.id, egress_dir, db.identity, 80));
        // Its last endpoint gone, the name resolves to nothing again.
        mgr.delete(db.id).unwrap();
        assert!(!map_allows(&h, web.id, egress_dir, db.identity, 8080));
    }

    fn labelled(app: &str) -> EndpointCreate {
        let mut req = request();
        req.labels = BTreeMap::from([("app".into(), app.into())]);
        req
    }

    fn cnp(name: &str, selected: &str, body: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: {selected}}}}}\n{body}"
        )
    }

    #[test]
    fn an_import_writes_only_the_maps_of_the_endpoints_whose_entries_change() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let web = mgr.create(labelled("web")).unwrap();
        let db = mgr.create(labelled("db")).unwrap();
        // Policy map writes so far; a change may take two (see
        // `PolicyDelta::steps`), so the test compares "written or not".
        let writes = |id: u16| h.dp.state().policy_writes[&id];
        let (web0, mut db0) = (writes(web.id), writes(db.id));
        let ingress = "  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n";
        mgr.policy()
            .import_policies("a.yaml", &cnp("a", "db", ingress))
            .unwrap();
        assert_eq!(writes(web.id), web0);
        assert!(writes(db.id) > db0);
        db0 = writes(db.id);
        // A policy selecting nobody, and one re-imported unchanged, write nothing.
        mgr.policy()
            .import_policies("b.yaml", &cnp("b", "nobody", ingress))
            .unwrap();
        mgr.policy()
            .import_policies("a.yaml", &cnp("a", "db", ingress))
            .unwrap();
        assert_eq!((writes(web.id), writes(db.id)), (web0, db0));
        // A new CIDR only db's policy can see rewrites db's map only.
        let cidr = "  ingress:\n  - fromCIDR: [192.0.2.0/24]\n";
        mgr.policy()
            .import_policies("c.yaml", &cnp("c", "db", cidr))
            .unwrap();
        assert_eq!(writes(web.id), web0);
        assert!(writes(db.id) > db0);
    }

    /// An endpoint's map with rule names for cookies: (verdict, match kind, rule).
    type NamedMap = BTreeMap<cilia_abi::PolicyKey, (u8, u8, Option<String>)>;
    type Step = Box<dyn Fn(&mut EndpointManager)>;

    /// Every endpoint's map as (key, verdict, match kind, rule name): rule
    /// cookies are numbered per agent, names are what they stand for.
    fn named_maps(h: &Harness, mgr: &EndpointManager) -> BTreeMap<u16, NamedMap> {
        let k = h.dp.state().clone();
        k.policy
            .iter()
            .map(|(id, entries)| {
                let named = entries
                    .iter()
                    .map(|(key, v)| {
                        let rule = mgr.policy().rule_name(v.rule);
                        (*key, (v.verdict, v.match_kind, rule))
                    })
                    .collect();
                (*id, named)
            })
            .collect()
    }

    #[test]
    fn incremental_regeneration_programs_what_a_restart_programs_from_scratch() {
        let h = Harness::new();
        let mut mgr = h.manager();
        let web = mgr.create(labelled("web")).unwrap();
        mgr.create(labelled("db")).unwrap();
        let to_db = "  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: '5432', protocol: TCP}]}]\n";
        let world = "  egress:\n  - toEntities: [world]\n  - toCIDR: [10.0.0.0/8, 192.0.2.0/24]\n  egressDeny:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]\n    toPorts: [{ports: [{port: '22'}]}]\n";
        let steps: Vec<Step> = vec![
            Box::new(|m| {
                m.policy()
                    .import_policies("a.yaml", &cnp("a", "db", to_db))
                    .unwrap();
            }),
            Box::new(|m| {
                m.policy()
                    .import_policies("b.yaml", &cnp("b", "web", world))
                    .unwrap();
            }),
            Box::new(|m| {
                m.create(labelled("web")).unwrap();
            }),
            Box::new(|m| {
                m.policy()
                    .import_policies(
                        "c.yaml",
                        &cnp("c", "db", "  ingress:\n  - fromCIDR: [10.1.2.0/24]\n"),
                    )
                    .unwrap();
            }),
            Box::new(move |m| {
                m.set_labels(web.id, &BTreeMap::from([("app".into(), "db".into())]))
                    .unwrap();
            }),
            Box::new(|m| {
                m.policy().delete_policies(Some("a"), None).unwrap();
            }),
            Box::new(|m| {
                m.create(labelled("cache")).unwrap();
            }),
            Box::new(|m| {
                let named = "  egress:\n  - toEndpoints: [{}]\n    toPorts: [{ports: [{port: http}]}]\n  ingress:\n  - toPorts: [{ports: [{port: http}]}]\n";
                m.policy()
                    .import_policies("d.yaml", &cnp("d", "cache", named))
                    .unwrap();
            }),
            Box::new(|m| {
                let mut req = labelled("cache");
                req.named_ports = vec![named_port("http=TCP/8080")];
                m.create(req).unwrap();
            }),
            Box::new(|m| {
                let mut req = labelled("db");
                req.named_ports = vec![named_port("http=TCP/80")];
                m.create(req).unwrap();
            }),
        ];
        for (i, step) in steps.iter().enumerate() {
            step(&mut mgr);
            let incremental = named_maps(&h, &mgr);
            let mut fresh = h.manager_from(&mut mgr);
            fresh.restore().unwrap();
            assert_eq!(incremental, named_maps(&h, &fresh), "after step {i}");
            mgr = fresh;
        }
    }

    /// The import benchmark (docs/benchmarks.md, "Policy import"): three
    /// endpoints, then `CILIA_IMPORTS` (10) imports of `CILIA_CHUNK`
    /// (10,000) rules each, shaped like `bench/policy-scale.sh`
    /// (`cilia_policy::workload::scale_policy`); prints each import's time and its ratio to the
    /// first (the same 10,000 rules' cost alone, measured in the same run).
    /// Stops early once the imports took `CILIA_BENCH_LIMIT_S` (300) s.
    /// Run: `cargo test --release -p cilia-agent --lib import_benchmark -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark: run explicitly, release build"]
    fn import_benchmark() {
        let (imports, chunk) = (
            bench_var("CILIA_IMPORTS", 10),
            bench_var("CILIA_CHUNK", 10_000),
        );
        let limit = std::time::Duration::from_secs(bench_var("CILIA_BENCH_LIMIT_S", 300) as u64);
        let h = Harness::new();
        let mut mgr = h.manager();
        let mut server = 0;
        for app in ["server", "client", "other"] {
            let mut req = request();
            req.labels = BTreeMap::from([("app".into(), app.into())]);
            let ep = mgr.create(req).unwrap();
            if app == "server" {
                server = ep.id;
            }
        }
        let docs: Vec<String> = (0..imports)
            .map(|k| cilia_policy::workload::scale_policy(k, chunk, k + 1 == imports))
            .collect();
        let started = std::time::Instant::now();
        let mut times = Vec::new();
        for (k, yaml) in docs.iter().enumerate() {
            let t = std::time::Instant::now();
            mgr.policy()
                .import_policies(&format!("cnp-{k}.yaml"), yaml)
                .unwrap();
            times.push(t.elapsed().as_secs_f64());
            let ratio = times[k] / times[0];
            println!(
                "import {}: {} rules on top of {}: {:.3} s (ratio to the first: {ratio:.2})",
                k + 1,
                chunk,
                k * chunk,
                times[k]
            );
            if started.elapsed() > limit {
                println!("stopped after {} imports: over the time limit", k + 1);
                break;
            }
        }
        let total: f64 = times.iter().sum();
        println!(
            "total {:.2} s for {} imports ({:.2}x the first import)",
            total,
            times.len(),
            total / times[0]
        );
        let entries = h.dp.state().policy[&server].len();
        println!("server policy map entries: {entries}");
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let peak = status
            .lines()
            .find(|l| l.starts_with("VmHWM"))
            .unwrap_or("");
        println!("peak memory (whole test process): {peak}");
    }

    /// A benchmark's setting from the environment, else `default`.
    fn bench_var(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Time to enforce (#11 point 5): on a node with `CILIA_ENDPOINTS`
    /// (1000) endpoints in 100 apps (`app=app-K`, ten endpoints each), one
    /// import of `CILIA_RULES` (10,000) rules: 100 CiliumNetworkPolicies in
    /// one file, policy K selecting `app-K` with 100 ingress rules, rule J
    /// allowing `app-((K+J) mod 100)` on TCP port 8000+J. Measures the
    /// import from the call until it returns, which is when every selected
    /// endpoint's policy map holds its new entries (the datapath here is
    /// the unit tests' fake: the kernel's map writes are not included; see
    /// docs/benchmarks.md for their cost). Run: `cargo test --release -p
    /// cilia-agent --lib enforce_benchmark -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark: run explicitly, release build"]
    fn enforce_benchmark() {
        let (endpoints, rules) = (
            bench_var("CILIA_ENDPOINTS", 1000),
            bench_var("CILIA_RULES", 10_000),
        );
        const APPS: usize = 100;
        let per_policy = rules.div_ceil(APPS);
        let h = Harness::new();
        let mut mgr = h.manager_with_ranges("fd00::/108", "10.0.0.0/16");
        let t = std::time::Instant::now();
        let mut ids = Vec::new();
        for i in 0..endpoints {
            let mut req = request();
            req.labels = BTreeMap::from([("app".into(), format!("app-{}", i % APPS))]);
            ids.push(mgr.create(req).unwrap().id);
        }
        println!(
            "{endpoints} endpoints created in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        let mut yaml = String::new();
        let mut written = 0;
        for k in 0..APPS {
            yaml.push_str(&format!(
                "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: enforce-{k}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: app-{k}\n  ingress:\n"
            ));
            for j in 0..per_policy.min(rules - written) {
                yaml.push_str(&format!(
                    "  - fromEndpoints:\n    - matchLabels:\n        app: app-{}\n    toPorts:\n    - ports:\n      - port: \"{}\"\n        protocol: TCP\n",
                    (k + j) % APPS,
                    8000 + j
                ));
                written += 1;
            }
        }
        let t = std::time::Instant::now();
        mgr.policy().import_policies("enforce.yaml", &yaml).unwrap();
        let took = t.elapsed().as_secs_f64();
        let state = h.dp.state();
        let entries: usize = ids
            .iter()
            .map(|id| state.policy.get(id).map_or(0, |m| m.len()))
            .sum();
        let enforced = ids
            .iter()
            .filter(|id| state.policy.get(id).is_some_and(|m| m.len() > per_policy))
            .count();
        println!(
            "import of {written} rules ({APPS} policies) on {endpoints} endpoints: {took:.3} s until \
             every endpoint's map was written; {enforced} endpoints enforced, {entries} map entries in all"
        );
        assert_eq!(enforced, endpoints, "every endpoint got its policy");
    }

    impl Harness {
        /// A new manager on the same state, as after a restart: `old` is
        /// dropped first (the store allows one opener).
        fn manager_from(&self, old: &mut EndpointManager) -> EndpointManager {
            let placeholder = EndpointManager::new(
                Store::open(&self.path.with_extension("placeholder")).unwrap(),
                self.dp.clone(),
                Box::new(FakeNetdev(self.kernel.clone())),
                self.manager_pools(),
            );
            drop(std::mem::replace(old, placeholder));
            self.manager()
        }

        fn manager_pools(&self) -> Pools {
            Pools {
                v6: Pool::new("fd00::/120".parse().unwrap()).unwrap(),
                v4: Some(Pool::new("10.0.0.0/24".parse().unwrap()).unwrap()),
            }
        }
    }
}
