//! The services subsystem: services (frontend → backends) from the API,
//! persisted in the store, written to the datapath's load-balancing maps.
//!
//! Invariants:
//! * The store is written first, then the datapath; at start
//!   ([`Services::restore`]) every stored service is written again and
//!   what the kernel holds beyond them is removed, so a crash between the
//!   two steps heals at the next start.
//! * Backends are written before the service rows that name them, and
//!   removed only after no service row names them (the datapath's
//!   `upsert_lb_service` swaps a service's slots atomically for packets).
//! * Terminating and quarantined backends stay in the backends map (flows
//!   pinned to them finish) but are in no slot and no Maglev table.
//! * Changes are serialized by one mutex of this subsystem; reads (list,
//!   get, the kernel view) take no lock of the agent's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use cilia_api::{
    BpfLb, BpfLbBackend, BpfLbMaglevShare, BpfLbService, ServiceAffinity, ServiceBackend,
    ServiceSpec,
};
use cilia_datapath::{Datapath, DatapathError};
use cilia_lb::{Algorithm, Backend, BackendState, Frontend, LbError, Service};

use crate::store::{ServiceChange, Store, StoreError, StoredServices};

/// Why a service operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is not a valid service (HTTP 400).
    #[error("service: {0}")]
    Invalid(#[from] LbError),
    #[error("service {0} not found")]
    NotFound(u16),
    /// The frontend belongs to another service (HTTP 409).
    #[error("service {id}: frontend {frontend} is already used by service {other}")]
    FrontendInUse {
        id: u16,
        frontend: String,
        other: u16,
    },
    #[error("all 65535 service ids are in use")]
    IdsExhausted,
    /// A NodePort service on an agent that serves no underlay device
    /// (HTTP 400).
    #[error("service {id}: frontend {frontend} is a NodePort (every address of the node): it needs the node's underlay device, which the agent serves in multi-node mode (--kvstore etcd)")]
    NodePortUnavailable { id: u16, frontend: String },
    /// Entries of an import refused (HTTP 400); nothing was applied.
    #[error("{}", refused_message(*.total, .errors))]
    Refused {
        /// Entries in the import.
        total: usize,
        /// Each refused entry, by index.
        errors: Vec<EntryError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The change is stored; the datapath did not take it (it is written
    /// again at the next change of the service or the next agent start).
    /// (The datapath's error is in the message, not a `source`: the
    /// API answers with the message alone.)
    #[error("service {id}: stored, but writing it to the datapath failed: {error}")]
    Datapath { id: u16, error: Box<DatapathError> },
    /// Reading or restoring the load balancer's maps failed.
    #[error("{context}: {error}")]
    Maps {
        context: &'static str,
        error: Box<DatapathError>,
    },
}

/// Why one entry of an import was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError {
    /// Its index in the import's list.
    pub index: usize,
    /// The field, as the API names it (`frontend`, `backends[1].state`, …).
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for EntryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "services[{}].{}: {}",
            self.index, self.field, self.reason
        )
    }
}

impl EntryError {
    fn new(index: usize, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            index,
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An entry's model error, under the field it names.
    fn lb(index: usize, e: &LbError) -> Self {
        match e {
            LbError::Frontend { input, reason } => {
                Self::new(index, "frontend", format!("{input:?}: {reason}"))
            }
            LbError::Backend { input, reason } => {
                Self::new(index, "backends", format!("{input:?}: {reason}"))
            }
            LbError::Field { field, reason } => Self::new(index, field.clone(), reason.clone()),
        }
    }
}

/// How many refused entries an error message lists (the count says the rest).
const REFUSED_LISTED: usize = 20;

fn refused_message(total: usize, errors: &[EntryError]) -> String {
    let listed: Vec<String> = errors
        .iter()
        .take(REFUSED_LISTED)
        .map(ToString::to_string)
        .collect();
    let more = errors.len().saturating_sub(REFUSED_LISTED);
    format!(
        "services: {} of {total} entries refused, nothing applied: {}{}",
        errors.len(),
        listed.join("; "),
        if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        }
    )
}

/// How external clients of a NodePort service reach a backend on another
/// node (`--lb-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LbMode {
    /// The node translates the client's address to its own: replies come
    /// back through it.
    #[default]
    Snat,
    /// Direct server return: the backend's node answers the client itself
    /// (the frontend travels in an IP option / IPv6 destination option).
    Dsr,
}

/// See the module doc.
pub struct Services {
    store: Arc<Store>,
    datapath: Arc<dyn Datapath>,
    maglev_size: u32,
    /// How NodePort services reach remote backends (`--lb-mode`); `None`:
    /// the agent serves no underlay device, NodePort services are refused.
    nodeport: Option<LbMode>,
    /// Orders changes (store then datapath) of this process; guards no data.
    writer: Mutex<()>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("maglev_size", &self.maglev_size)
            .finish_non_exhaustive()
    }
}

/// A service as the API shows it, with its backends' ids.
pub fn service_view(service: &Service, ids: &BTreeMap<SocketAddr, u32>) -> cilia_api::Service {
    cilia_api::Service {
        id: service.id,
        frontend: service.frontend.to_string(),
        algorithm: service.algorithm.as_str().into(),
        affinity: service
            .affinity_timeout
            .map(|timeout_secs| ServiceAffinity { timeout_secs }),
        external_traffic_policy: service.is_nodeport().then(|| {
            if service.external_local {
                "Local".into()
            } else {
                "Cluster".into()
            }
        }),
        backends: service
            .backends
            .iter()
            .map(|b| ServiceBackend {
                id: ids.get(&b.addr).copied().unwrap_or(0),
                address: b.addr.to_string(),
                weight: b.weight,
                state: b.state.as_str().into(),
            })
            .collect(),
    }
}

/// The model of an API spec (its id still to be decided: 0 when absent).
pub fn parse_spec(spec: &ServiceSpec) -> Result<Service, LbError> {
    let frontend: Frontend = spec.frontend.parse()?;
    let mut backends = Vec::with_capacity(spec.backends.len());
    for (i, b) in spec.backends.iter().enumerate() {
        let mut backend = Backend::parse(&b.address)?;
        if let Some(w) = b.weight {
            backend.weight = w;
        }
        if let Some(state) = &b.state {
            backend.state = state.parse().map_err(|_| LbError::Field {
                field: format!("backends[{i}].state"),
                reason: format!("{state:?} is not active, terminating or quarantined"),
            })?;
        }
        backends.push(backend);
    }
    let algorithm = match &spec.algorithm {
        Some(a) => a.parse()?,
        None => Algorithm::Random,
    };
    if spec.id == Some(0) {
        return Err(LbError::Field {
            field: "id".into(),
            reason: "0 is not a service id (1-65535)".into(),
        });
    }
    Ok(Service {
        id: spec.id.unwrap_or(0),
        frontend,
        backends,
        algorithm,
        affinity_timeout: spec.affinity.as_ref().map(|a| a.timeout_secs),
        external_local: match spec.external_traffic_policy.as_deref() {
            None => false,
            Some(p) if p.eq_ignore_ascii_case("cluster") => false,
            Some(p) if p.eq_ignore_ascii_case("local") => true,
            Some(p) => {
                return Err(LbError::Field {
                    field: "external_traffic_policy".into(),
                    reason: format!("{p:?} is not Cluster or Local"),
                })
            }
        },
    })
}

impl Services {
    /// `maglev_size` must have passed [`cilia_lb::check_table_size`].
    pub fn new(store: Arc<Store>, datapath: Arc<dyn Datapath>, maglev_size: u32) -> Self {
        Self {
            store,
            datapath,
            maglev_size,
            nodeport: None,
            writer: Mutex::new(()),
        }
    }

    /// Serves NodePort services in `mode` (the agent has an underlay
    /// device with the node programs).
    pub fn with_nodeport(mut self, mode: LbMode) -> Self {
        self.nodeport = Some(mode);
        self
    }

    pub fn maglev_size(&self) -> u32 {
        self.maglev_size
    }

    /// Rewrites the Local NodePort services (their slots hold this node's
    /// backends only) after the node's endpoints changed. Returns how many.
    pub fn refresh_local(&self) -> Result<usize, ServiceError> {
        if self.nodeport.is_none() {
            return Ok(0);
        }
        let _w = self.lock();
        let stored = self.store.services()?;
        let mut n = 0;
        for service in stored.services.values() {
            if service.is_nodeport() && service.external_local {
                self.write(service, &stored.backend_ids, None)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The addresses of this node's endpoints.
    fn local_addresses(
        &self,
    ) -> Result<std::collections::BTreeSet<std::net::IpAddr>, ServiceError> {
        Ok(self
            .store
            .endpoints()?
            .iter()
            .flat_map(|r| {
                std::iter::once(std::net::IpAddr::V6(r.ipv6))
                    .chain(r.ipv4.map(std::net::IpAddr::V4))
            })
            .collect())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // Guards no data: a poisoned lock is as good as a clean one.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// At agent start: sets the Maglev table size, writes every stored
    /// service (and its backends) to the datapath, and removes the
    /// services and backends the kernel holds that the store does not.
    /// Returns the number of services.
    pub fn restore(&self) -> Result<usize, ServiceError> {
        let _w = self.lock();
        let dp_err = |error| ServiceError::Maps {
            context: "restoring the load balancer's maps",
            error: Box::new(error),
        };
        self.datapath
            .set_maglev_size(self.maglev_size)
            .map_err(dp_err)?;
        let stored = self.store.services()?;
        // Services the store lacks go first: one may hold the rev-NAT id
        // of a stored service under another frontend, and removing it after
        // that service is written would remove the stored one's rev-NAT
        // entry and Maglev table.
        for row in self.datapath.lb_services().map_err(dp_err)? {
            let keep = stored
                .services
                .get(&row.rev_nat)
                .is_some_and(|s| cilia_lb::rows::frontend_row(s) == row.frontend);
            if !keep {
                tracing::info!(service = row.rev_nat, frontend = ?row.frontend, "removing a service the store does not have");
                self.datapath
                    .remove_lb_service(&row.frontend, row.rev_nat)
                    .map_err(dp_err)?;
            }
        }
        for service in stored.services.values() {
            if service.is_nodeport() && self.nodeport.is_none() {
                // Stored by an agent in multi-node mode: kept, not served.
                tracing::warn!(service = service.id, frontend = %service.frontend, "NodePort service not served: the agent serves no underlay device (multi-node mode)");
                continue;
            }
            self.write(service, &stored.backend_ids, None)?;
        }
        let known: std::collections::BTreeSet<u32> = stored.backend_ids.values().copied().collect();
        let stale: Vec<u32> = self
            .datapath
            .lb_backends()
            .map_err(dp_err)?
            .into_iter()
            .map(|b| b.id)
            .filter(|id| !known.contains(id))
            .collect();
        if !stale.is_empty() {
            self.datapath.remove_lb_backends(&stale).map_err(dp_err)?;
        }
        Ok(stored.services.len())
    }

    /// Writes a service's backends, then its rows; `previous` (the service
    /// it replaces) is removed first when its frontend differs.
    fn write(
        &self,
        service: &Service,
        ids: &BTreeMap<SocketAddr, u32>,
        previous: Option<&Service>,
    ) -> Result<(), ServiceError> {
        let dp_err = |error| ServiceError::Datapath {
            id: service.id,
            error: Box::new(error),
        };
        let nodeport = if service.is_nodeport() {
            Some(
                self.nodeport
                    .ok_or_else(|| ServiceError::NodePortUnavailable {
                        id: service.id,
                        frontend: service.frontend.to_string(),
                    })?,
            )
        } else {
            None
        };
        // externalTrafficPolicy=Local: only this node's backends get
        // (external) flows; the others stay in the backends map.
        let local;
        let service = if nodeport.is_some() && service.external_local {
            let here = self.local_addresses()?;
            let mut only_local = service.clone();
            for b in &mut only_local.backends {
                if !here.contains(&b.addr.ip()) && b.state == BackendState::Active {
                    b.state = BackendState::Quarantined;
                }
            }
            local = only_local;
            &local
        } else {
            service
        };
        let (backends, row) =
            cilia_lb::datapath_rows(service, |a| ids.get(&a).copied(), self.maglev_size)?;
        self.datapath
            .upsert_lb_backends(&backends)
            .map_err(dp_err)?;
        if let Some(prev) = previous.filter(|p| p.frontend != service.frontend) {
            self.datapath
                .remove_lb_service(&cilia_lb::rows::frontend_row(prev), prev.id)
                .map_err(dp_err)?;
        }
        match nodeport {
            Some(mode) => self
                .datapath
                .upsert_nodeport_service(
                    &row,
                    cilia_datapath::NodePortOptions {
                        external_local: service.external_local,
                        dsr: mode == LbMode::Dsr,
                    },
                )
                .map_err(dp_err),
            None => self.datapath.upsert_lb_service(&row).map_err(dp_err),
        }
    }

    /// The stored services with their backend ids.
    pub fn list(&self) -> Result<Vec<cilia_api::Service>, ServiceError> {
        Ok(self.store.with_services(|stored| {
            stored
                .services
                .values()
                .map(|s| service_view(s, &stored.backend_ids))
                .collect()
        })?)
    }

    pub fn get(&self, id: u16) -> Result<cilia_api::Service, ServiceError> {
        self.store
            .with_services(|stored| {
                stored
                    .services
                    .get(&id)
                    .map(|s| service_view(s, &stored.backend_ids))
            })?
            .ok_or(ServiceError::NotFound(id))
    }

    /// Creates or replaces a service: by id, or without one by frontend
    /// (a new frontend gets the lowest free id).
    pub fn update(&self, spec: &ServiceSpec) -> Result<cilia_api::Service, ServiceError> {
        let mut service = parse_spec(spec)?;
        let _w = self.lock();
        service.id = self
            .store
            .with_services(|stored| decide_id(&service, spec.id, stored))??;
        service.validate()?;
        if service.is_nodeport() && self.nodeport.is_none() {
            return Err(ServiceError::NodePortUnavailable {
                id: service.id,
                frontend: service.frontend.to_string(),
            });
        }
        let change = self.store.put_service(&service)?;
        self.apply(&service, &change)?;
        Ok(service_view(&service, &change.backend_ids))
    }

    /// Creates or replaces many services (each as [`Self::update`] would;
    /// with `prune`, also deletes the stored services the list does not
    /// name). All entries are checked first, against each other and the
    /// stored services: any refusal applies nothing. Then one store
    /// transaction, then the datapath: removed frontends first (deleted
    /// services, changed frontends), then every entry, then released
    /// backends.
    pub fn import(
        &self,
        specs: &[ServiceSpec],
        prune: bool,
    ) -> Result<cilia_api::ServiceImportResult, ServiceError> {
        let _w = self.lock();
        let stored = self.store.services()?;
        let plan = plan_import(specs, prune, &stored, self.nodeport.is_some())?;
        let mut result = cilia_api::ServiceImportResult {
            ids: plan.services.iter().map(|s| s.id).collect(),
            ..Default::default()
        };
        let mut puts = Vec::new();
        for service in &plan.services {
            match stored.services.get(&service.id) {
                None => result.created += 1,
                Some(old) if old == service => result.unchanged += 1,
                Some(_) => result.updated += 1,
            }
            if stored.services.get(&service.id) != Some(service) {
                puts.push(service.clone());
            }
        }
        let change = self.store.change_services(&puts, &plan.deletes)?;
        result.deleted = change.deleted.iter().map(|s| s.id).collect();
        // Frontends no service has any more go first: an entry may take a
        // frontend another service (deleted, or moved) had.
        let moved = puts
            .iter()
            .zip(&change.previous)
            .filter_map(|(new, old)| old.as_ref().filter(|o| o.frontend != new.frontend));
        for gone in change.deleted.iter().chain(moved) {
            self.datapath
                .remove_lb_service(&cilia_lb::rows::frontend_row(gone), gone.id)
                .map_err(|error| ServiceError::Datapath {
                    id: gone.id,
                    error: Box::new(error),
                })?;
        }
        for service in &plan.services {
            self.write(service, &change.backend_ids, None)?;
        }
        self.release(plan.services.first().map_or(0, |s| s.id), &change.released)?;
        Ok(result)
    }

    /// Writes a committed change to the datapath: the service (after its
    /// backends), then the removal of the backends it released.
    fn apply(&self, service: &Service, change: &ServiceChange) -> Result<(), ServiceError> {
        self.write(service, &change.backend_ids, change.previous.as_ref())?;
        self.release(service.id, &change.released)
    }

    fn release(&self, id: u16, released: &[u32]) -> Result<(), ServiceError> {
        if released.is_empty() {
            return Ok(());
        }
        self.datapath
            .remove_lb_backends(released)
            .map_err(|source| ServiceError::Datapath {
                id,
                error: Box::new(source),
            })
    }

    /// Deletes a service: its rows, then the backends no other service uses.
    pub fn delete(&self, id: u16) -> Result<(), ServiceError> {
        let _w = self.lock();
        let change = self
            .store
            .delete_service(id)?
            .ok_or(ServiceError::NotFound(id))?;
        if let Some(prev) = &change.previous {
            self.datapath
                .remove_lb_service(&cilia_lb::rows::frontend_row(prev), id)
                .map_err(|source| ServiceError::Datapath {
                    id,
                    error: Box::new(source),
                })?;
        }
        self.release(id, &change.released)
    }

    /// The load balancer's maps as the kernel holds them.
    pub fn kernel_view(&self) -> Result<BpfLb, DatapathError> {
        let services = self
            .datapath
            .lb_services()?
            .into_iter()
            .map(|s| {
                let frontend = format!(
                    "{}/{}",
                    SocketAddr::new(s.frontend.addr, s.frontend.port),
                    cilia_lb::Protocol::from_number(s.frontend.proto)
                        .map_or("?", cilia_lb::Protocol::as_str)
                );
                let maglev = s.maglev.as_ref().map(|table| {
                    let mut shares: BTreeMap<u32, u32> = BTreeMap::new();
                    for id in table {
                        *shares.entry(*id).or_default() += 1;
                    }
                    shares
                        .into_iter()
                        .map(|(backend, entries)| BpfLbMaglevShare { backend, entries })
                        .collect()
                });
                BpfLbService {
                    id: s.rev_nat,
                    frontend,
                    algorithm: match s.algorithm {
                        cilia_abi::LbAlgorithm::Random => "random",
                        cilia_abi::LbAlgorithm::Maglev => "maglev",
                    }
                    .into(),
                    affinity_timeout: s.affinity_timeout,
                    flags: s.flag_names().into_iter().map(String::from).collect(),
                    slots: s.slots,
                    maglev,
                }
            })
            .collect();
        let backends = self
            .datapath
            .lb_backends()?
            .into_iter()
            .map(|b| BpfLbBackend {
                id: b.id,
                address: b.addr.to_string(),
                state: match b.state {
                    cilia_abi::LbBackendState::Active => BackendState::Active,
                    cilia_abi::LbBackendState::Terminating => BackendState::Terminating,
                    cilia_abi::LbBackendState::Quarantined => BackendState::Quarantined,
                }
                .as_str()
                .into(),
            })
            .collect();
        Ok(BpfLb {
            maglev_table_size: self.maglev_size,
            services,
            backends,
        })
    }
}

/// An import, checked: its services with their ids, in the order given,
/// and the ids `prune` deletes.
#[derive(Debug)]
struct ImportPlan {
    services: Vec<Service>,
    deletes: Vec<u16>,
}

/// Checks an import against itself and `stored`, deciding the ids of the
/// entries without one (the stored service of their frontend's, else the
/// lowest id free after the import). Lists every refused entry.
fn plan_import(
    specs: &[ServiceSpec],
    prune: bool,
    stored: &StoredServices,
    nodeport: bool,
) -> Result<ImportPlan, ServiceError> {
    use std::collections::btree_map::Entry;
    let mut errors = Vec::new();
    let mut parsed: Vec<Option<Service>> = Vec::with_capacity(specs.len());
    // Ids and frontends the entries give, each to its first entry.
    let mut given_ids: BTreeMap<u16, usize> = BTreeMap::new();
    let mut frontends: BTreeMap<Frontend, usize> = BTreeMap::new();
    for (i, spec) in specs.iter().enumerate() {
        let service = match parse_spec(spec) {
            Ok(s) => s,
            Err(e) => {
                errors.push(EntryError::lb(i, &e));
                parsed.push(None);
                continue;
            }
        };
        if let Some(id) = spec.id {
            match given_ids.entry(id) {
                Entry::Vacant(v) => {
                    v.insert(i);
                }
                Entry::Occupied(o) => errors.push(EntryError::new(
                    i,
                    "id",
                    format!("{id} is also given by services[{}]", o.get()),
                )),
            }
        }
        match frontends.entry(service.frontend) {
            Entry::Vacant(v) => {
                v.insert(i);
            }
            Entry::Occupied(o) => errors.push(EntryError::new(
                i,
                "frontend",
                format!(
                    "{} is also given by services[{}]",
                    service.frontend,
                    o.get()
                ),
            )),
        }
        if service.is_nodeport() && !nodeport {
            errors.push(EntryError::new(
                i,
                "frontend",
                format!("{} is a NodePort (every address of the node): it needs the node's underlay device, which the agent serves in multi-node mode (--kvstore etcd)", service.frontend),
            ));
        }
        parsed.push(Some(service));
    }
    let stored_by_frontend: BTreeMap<Frontend, u16> = stored
        .services
        .values()
        .map(|s| (s.frontend, s.id))
        .collect();
    // An entry without id keeps its frontend's stored id, unless another
    // entry gives that id (to another frontend).
    for (i, service) in parsed.iter_mut().enumerate() {
        if let Some(s) = service.as_mut().filter(|_| specs[i].id.is_none()) {
            if let Some(id) = stored_by_frontend.get(&s.frontend) {
                if !given_ids.contains_key(id) {
                    s.id = *id;
                    given_ids.insert(*id, i);
                }
            }
        }
    }
    // The services after the import, but for the entries still without id.
    let mut after: BTreeMap<u16, Frontend> = if prune {
        BTreeMap::new()
    } else {
        stored
            .services
            .values()
            .map(|s| (s.id, s.frontend))
            .collect()
    };
    for s in parsed.iter().flatten().filter(|s| s.id != 0) {
        after.insert(s.id, s.frontend);
    }
    let mut free = 1u16;
    for (i, service) in parsed.iter_mut().enumerate() {
        let Some(s) = service.as_mut() else { continue };
        if s.id == 0 {
            while after.contains_key(&free) {
                match free.checked_add(1) {
                    Some(n) => free = n,
                    None => return Err(ServiceError::IdsExhausted),
                }
            }
            s.id = free;
            after.insert(free, s.frontend);
        }
        // A stored service kept by the import that has this frontend under
        // another id.
        if let Some(other) = stored_by_frontend.get(&s.frontend) {
            if *other != s.id && after.get(other) == Some(&s.frontend) {
                errors.push(EntryError::new(
                    i,
                    "frontend",
                    format!("{} is already used by service {other}", s.frontend),
                ));
                continue;
            }
        }
        if let Err(e) = s.validate() {
            errors.push(EntryError::lb(i, &e));
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.index);
        return Err(ServiceError::Refused {
            total: specs.len(),
            errors,
        });
    }
    let services: Vec<Service> = parsed.into_iter().flatten().collect();
    let deletes = if prune {
        let kept: std::collections::BTreeSet<u16> = services.iter().map(|s| s.id).collect();
        stored
            .services
            .keys()
            .copied()
            .filter(|id| !kept.contains(id))
            .collect()
    } else {
        Vec::new()
    };
    Ok(ImportPlan { services, deletes })
}

/// The id a spec's service gets: the given one (its frontend must not be
/// another service's), else the id of the frontend's service, else the
/// lowest free id.
fn decide_id(
    service: &Service,
    requested: Option<u16>,
    stored: &StoredServices,
) -> Result<u16, ServiceError> {
    let owner = stored.by_frontend(&service.frontend).map(|s| s.id);
    match (requested, owner) {
        (Some(id), Some(other)) if other != id => Err(ServiceError::FrontendInUse {
            id,
            frontend: service.frontend.to_string(),
            other,
        }),
        (Some(id), _) => Ok(id),
        (None, Some(id)) => Ok(id),
        (None, None) => (1..=u16::MAX)
            .find(|id| !stored.services.contains_key(id))
            .ok_or(ServiceError::IdsExhausted),
    }
}

#[cfg(test)]
mod tests;
