//! REST API over the unix socket: JSON in and out, errors as
//! [`cilia_api::ApiError`] with a stable code, described by the OpenAPI
//! document served at `/openapi.json`.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cilia_api::{
    ApiError, BpfCtEntry, BpfEndpoint, BpfIpcacheEntry, BpfMetric, BpfPolicy, BpfPolicyEntry,
    DatapathReload, DatapathReloadResult, Endpoint, EndpointCreate, EndpointLabels, EndpointState,
    Identity, IpamStatus, KernelFeature, Namespace, PolicyChange, PolicyDocument, PolicyImport,
    PolicyList, PoolStatus, Status, TraceRequest, TraceResponse, TraceStep,
};
use cilia_datapath::FeatureReport;
use serde::Deserialize;
use utoipa::OpenApi;

use crate::endpoint::netdev::{format_mac, NetdevError};
use crate::endpoint::{EndpointError, EndpointManager};
use crate::ipam::{IpamError, Pool};
use crate::policy::repository::{PolicyState, PolicySummary};
use crate::store::{EndpointRecord, StoreError};

/// Shared by all handlers: one handle per subsystem, each locked on its
/// own (docs/ARCHITECTURE.md, "Locking"). Their operations are blocking
/// (netlink, BPF syscalls, fsync) and run on the blocking pool. Reads
/// (endpoint list and get, status, metrics, observe) take none of these
/// locks: they read the store, the readers' map handle or a published
/// summary.
pub struct AgentState {
    /// The endpoint lifecycle (records, devices, programs, IPAM), held
    /// briefly by each change; a create holds it only at its start and end
    /// (see `endpoint::create_unlocked`). Lock order: endpoints, policy.
    pub endpoints: Mutex<EndpointManager>,
    /// The policy subsystem (imports, traces, regeneration).
    pub policy: Arc<Mutex<PolicyState>>,
    /// What readers see of `policy`, replaced after every change.
    pub policy_summary: tokio::sync::watch::Receiver<Arc<PolicySummary>>,
    /// The state's store, for reads in transactions of their own.
    pub store: Arc<crate::store::Store>,
    /// Node-wide addressing (fixed at start).
    pub pools: crate::endpoint::Pools,
    /// The datapath, shared by every subsystem; readers (scrapes, status,
    /// `bpf` listings, conntrack GC) use it under no lock of the agent's.
    pub datapath: crate::endpoint::DatapathHandle,
    pub metrics: crate::metrics::AgentMetrics,
    /// Endpoint creates in progress at once (the others queue here, as
    /// tasks, not as blocking threads): each holds a thread and memory, and
    /// more than a few per CPU finish no sooner (see [`create_permits`]).
    pub creates: Arc<tokio::sync::Semaphore>,
    pub monitor: Arc<crate::monitor::Monitor>,
    pub features: FeatureReport,
    pub state_dir: String,
    pub bpf_root: String,
}

pub type Shared = Arc<AgentState>;

/// Endpoint creates let in at once: two per CPU, so that one create's
/// device setup (netlink, kernel locks) overlaps another's program load.
pub fn create_permits() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub struct AppError(StatusCode, ApiError);

impl AppError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self(
            status,
            ApiError {
                code: code.into(),
                message: message.into(),
            },
        )
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<EndpointError> for AppError {
    fn from(e: EndpointError) -> Self {
        let msg = e.to_string();
        let (status, code) = match &e {
            EndpointError::Labels(_) => (StatusCode::BAD_REQUEST, "invalid-labels"),
            EndpointError::Ifname(_) => (StatusCode::BAD_REQUEST, "invalid-ifname"),
            EndpointError::Netdev(NetdevError::Netns { .. }) => {
                (StatusCode::BAD_REQUEST, "invalid-netns")
            }
            EndpointError::Netdev(NetdevError::IfnameTaken { .. }) => {
                (StatusCode::CONFLICT, "ifname-taken")
            }
            EndpointError::Store(StoreError::Ipam(IpamError::Exhausted { .. })) => {
                (StatusCode::SERVICE_UNAVAILABLE, "ipam-exhausted")
            }
            EndpointError::Store(StoreError::IdsExhausted) => {
                (StatusCode::SERVICE_UNAVAILABLE, "ids-exhausted")
            }
            EndpointError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            EndpointError::Busy(_) => (StatusCode::CONFLICT, "endpoint-busy"),
            EndpointError::Datapath(cilia_datapath::DatapathError::IncompatiblePin { .. }) => {
                (StatusCode::CONFLICT, "map-layout-changed")
            }
            EndpointError::Datapath(_) => (StatusCode::INTERNAL_SERVER_ERROR, "datapath"),
            EndpointError::Namespace(..) => (StatusCode::BAD_REQUEST, "invalid-namespace"),
            EndpointError::Policy(_) => (StatusCode::BAD_REQUEST, "invalid-policy"),
            EndpointError::NoSuchPolicy(_) => (StatusCode::NOT_FOUND, "not-found"),
            EndpointError::Trace(_) => (StatusCode::BAD_REQUEST, "invalid-trace"),
            EndpointError::LabelSource(_) => (StatusCode::BAD_REQUEST, "invalid-request"),
            EndpointError::Input(_) => (StatusCode::BAD_REQUEST, "invalid-request"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        AppError::new(status, code, msg)
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EndpointError> + Send + 'static,
) -> Result<T, AppError> {
    tokio::task::spawn_blocking(move || f().map_err(AppError::from))
        .await
        .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

/// Runs `f` on the blocking pool under one subsystem's lock.
async fn with_locked<S: Send + 'static, T: Send + 'static>(
    state: &Shared,
    lock: fn(&AgentState) -> &Mutex<S>,
    f: impl FnOnce(&mut S) -> Result<T, EndpointError> + Send + 'static,
) -> Result<T, AppError> {
    let state = state.clone();
    blocking(move || f(&mut lock(&state).lock().unwrap_or_else(|p| p.into_inner()))).await
}

/// Runs an endpoint lifecycle change under the endpoints' lock.
async fn with_endpoints<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&mut EndpointManager) -> Result<T, EndpointError> + Send + 'static,
) -> Result<T, AppError> {
    with_locked(state, |s| &s.endpoints, f).await
}

/// Runs policy work under the policy subsystem's lock only.
async fn with_policy<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&mut PolicyState) -> Result<T, EndpointError> + Send + 'static,
) -> Result<T, AppError> {
    with_locked(state, |s| &s.policy, f).await
}

/// Reads the store in a transaction of its own, under no lock.
async fn with_store<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&crate::store::Store) -> Result<T, EndpointError> + Send + 'static,
) -> Result<T, AppError> {
    let state = state.clone();
    blocking(move || f(&state.store)).await
}

/// Runs `f` on the datapath (blocking pool), under no lock of the agent's.
async fn with_maps<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&dyn cilia_datapath::Datapath) -> Result<T, EndpointError> + Send + 'static,
) -> Result<T, AppError> {
    let state = state.clone();
    blocking(move || f(state.datapath.as_ref())).await
}

pub fn endpoint_view(rec: &EndpointRecord) -> Endpoint {
    Endpoint {
        id: rec.id,
        netns: rec.netns.clone(),
        ifname: rec.ifname.clone(),
        host_ifname: rec.host_ifname.clone(),
        ipv6: rec.ipv6.to_string(),
        ipv4: rec.ipv4.map(|a| a.to_string()),
        labels: rec.labels.clone(),
        namespace: rec.namespace.clone(),
        identity: rec.identity,
        mac: format_mac(&rec.mac),
        host_mac: format_mac(&rec.host_mac),
        state: rec.state,
        reason: rec.reason.clone(),
        container_id: rec.container_id.clone(),
        network: rec.network.clone(),
        labels_pending: rec.label_source.is_some(),
        policy_audit: rec.policy_audit,
    }
}

fn pool_status(pool: &Pool, used: &std::collections::BTreeSet<std::net::IpAddr>) -> PoolStatus {
    PoolStatus {
        range: pool.range().to_string(),
        router: pool.router().to_string(),
        used: pool.used(used),
        capacity: pool.capacity(),
    }
}

#[utoipa::path(get, path = "/v1/status", responses((status = 200, body = Status)))]
async fn status(State(state): State<Shared>) -> Result<Json<Status>, AppError> {
    let features = state.features.clone();
    let (state_dir, bpf_root) = (state.state_dir.clone(), state.bpf_root.clone());
    let monitor_level = state.monitor.wanted_level();
    let flows = state.monitor.recent().len();
    let s = state.clone();
    let snap =
        tokio::task::spawn_blocking(move || crate::metrics::scrape(&s.store, s.datapath.as_ref()))
            .await
            .map_err(|e| {
                AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })??;
    let summary = state.policy_summary.borrow().clone();
    let pools = state.pools.clone();
    let ct_gc_runs = state.metrics.ct_gc_runs.get();
    with_store(&state, move |store| {
        let endpoints = store.endpoints()?;
        let used = store.allocated()?;
        let not_ready = endpoints
            .iter()
            .filter(|e| e.state != EndpointState::Ready)
            .count();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            health: if not_ready == 0 { "ok" } else { "degraded" }.into(),
            kernel: features.kernel.clone(),
            features: features
                .features
                .iter()
                .map(|f| KernelFeature {
                    name: f.name.into(),
                    present: f.present,
                    required: f.required,
                    detail: f.detail.clone(),
                })
                .collect(),
            endpoints: endpoints.len(),
            endpoints_not_ready: not_ready,
            ipam: IpamStatus {
                ipv6: pool_status(&pools.v6, &used),
                ipv4: pools.v4.as_ref().map(|p| pool_status(p, &used)),
            },
            state_dir,
            bpf_root,
            policy_revision: store.policy_revision()?,
            policies: summary.documents,
            policy_errors: summary.errors.clone(),
            subsystems: subsystems(
                &summary,
                ct_gc_runs,
                &endpoints,
                &snap,
                monitor_level,
                flows,
            ),
            maps: snap
                .map_fill
                .iter()
                .map(|(map, entries, capacity)| cilia_api::MapPressure {
                    map: map.clone(),
                    entries: *entries,
                    capacity: *capacity,
                })
                .collect(),
        })
    })
    .await
    .map(Json)
}

fn subsystems(
    policy: &PolicySummary,
    ct_gc_runs: u64,
    endpoints: &[EndpointRecord],
    snap: &crate::metrics::Snapshot,
    monitor_level: u32,
    flows: usize,
) -> Vec<cilia_api::SubsystemStatus> {
    let sub =
        |name: &str, ok: bool, detail: String, errors: Vec<String>| cilia_api::SubsystemStatus {
            name: name.into(),
            status: if ok { "ok" } else { "degraded" }.into(),
            detail,
            errors,
        };
    let not_ready: Vec<String> = endpoints
        .iter()
        .filter(|e| e.state != EndpointState::Ready)
        .map(|e| {
            format!(
                "endpoint {}: {}",
                e.id,
                e.reason.as_deref().unwrap_or("not ready")
            )
        })
        .collect();
    let pending = endpoints
        .iter()
        .filter(|e| e.label_source.is_some())
        .count();
    let lost: u64 = snap
        .datapath
        .iter()
        .filter(|(kind, ..)| *kind == cilia_abi::CILIA_METRIC_LOST)
        .map(|(_, _, _, packets, _)| packets)
        .sum();
    let full: Vec<String> = snap
        .map_fill
        .iter()
        .filter(|(_, e, c)| *c > 0 && *e * 10 >= *c * 9)
        .map(|(m, e, c)| format!("map {m} is {e}/{c} full"))
        .collect();
    let level = match monitor_level {
        cilia_abi::CILIA_MONITOR_OFF => "off",
        cilia_abi::CILIA_MONITOR_DROPS => "drops and policy verdicts",
        _ => "drops, policy verdicts and traces",
    };
    vec![
        sub(
            "endpoints",
            not_ready.is_empty(),
            format!(
                "{} endpoints, {} not ready",
                endpoints.len(),
                not_ready.len()
            ),
            not_ready,
        ),
        sub(
            "policy",
            policy.errors.is_empty(),
            format!(
                "{} policies, revision {}",
                policy.documents, snap.policy_revision
            ),
            policy.errors.clone(),
        ),
        sub(
            "labels",
            true,
            format!("{pending} endpoints waiting for runtime labels (init identity)"),
            vec![],
        ),
        sub(
            "monitor",
            lost == 0,
            format!("events: {level}; {flows} flows buffered; {lost} events lost"),
            vec![],
        ),
        sub(
            "conntrack",
            true,
            format!(
                "{} live entries at the last GC; {} GC runs",
                snap.conntrack_entries, ct_gc_runs
            ),
            vec![],
        ),
        sub(
            "bpf-maps",
            full.is_empty(),
            format!("{} maps", snap.map_fill.len()),
            full,
        ),
    ]
}

#[utoipa::path(get, path = "/v1/healthz", responses((status = 200, description = "agent is serving")))]
async fn healthz() -> &'static str {
    "ok"
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct ContainerQuery {
    /// Only the endpoints of this container (runtime's container id).
    container_id: Option<String>,
    /// With `container_id`: only this interface.
    ifname: Option<String>,
    /// Only the attachments of this CNI network (endpoints recorded without
    /// a network match any, see `EndpointRecord::attached_to`).
    network: Option<String>,
}

impl ContainerQuery {
    fn matches(&self, r: &EndpointRecord) -> bool {
        (self.container_id.is_none() || r.container_id == self.container_id)
            && self.ifname.as_ref().is_none_or(|i| &r.ifname == i)
            && self.network.as_ref().is_none_or(|n| r.attached_to(n))
    }

    /// Same bounds as on create: a query never carries what no endpoint can have.
    fn check(&self) -> Result<(), AppError> {
        let bad = |e: cilia_api::limits::InputError| bad_request("invalid-request", e.to_string());
        if let Some(cid) = &self.container_id {
            cilia_api::limits::check_container_id("container_id", cid).map_err(bad)?;
        }
        if let Some(ifname) = &self.ifname {
            cilia_api::limits::check_ifname("ifname", ifname).map_err(bad)?;
        }
        if let Some(network) = &self.network {
            // A CNI network name has the container id's character set.
            cilia_api::limits::check_container_id("network", network).map_err(bad)?;
        }
        Ok(())
    }
}

#[utoipa::path(get, path = "/v1/endpoints", params(ContainerQuery), responses((status = 200, body = Vec<Endpoint>)))]
async fn list_endpoints(
    State(state): State<Shared>,
    Query(q): Query<ContainerQuery>,
) -> Result<Json<Vec<Endpoint>>, AppError> {
    q.check()?;
    with_store(&state, move |store| {
        Ok(store
            .endpoints()?
            .iter()
            .filter(|r| q.matches(r))
            .map(endpoint_view)
            .collect())
    })
    .await
    .map(Json)
}

#[utoipa::path(delete, path = "/v1/endpoints", params(ContainerQuery),
    responses((status = 200, body = usize, description = "number of endpoints deleted (0 is not an error)"),
        (status = 409, body = ApiError, description = "endpoint-busy: a selected endpoint's create has not returned yet")))]
async fn delete_container(
    State(state): State<Shared>,
    Query(q): Query<ContainerQuery>,
) -> Result<Json<usize>, AppError> {
    q.check()?;
    if q.container_id.is_none() {
        return Err(bad_request("invalid-request", "container_id is required"));
    }
    with_endpoints(&state, move |mgr| mgr.delete_matching(|r| q.matches(r)))
        .await
        .map(Json)
}

#[utoipa::path(put, path = "/v1/endpoints/{id}/config", params(("id" = u16, Path)), request_body = cilia_api::EndpointSettings,
    responses((status = 200, body = Endpoint), (status = 404, body = ApiError)))]
async fn set_endpoint_config(
    State(state): State<Shared>,
    Path(id): Path<u16>,
    body: Bytes,
) -> Result<Json<Endpoint>, AppError> {
    let req: cilia_api::EndpointSettings = json_body(&body)?;
    with_endpoints(&state, move |mgr| {
        mgr.set_policy_audit(id, req.policy_audit)
            .map(|r| endpoint_view(&r))
    })
    .await
    .map(Json)
}

#[utoipa::path(put, path = "/v1/endpoints/{id}/labels", params(("id" = u16, Path)), request_body = EndpointLabels,
    responses((status = 200, body = Endpoint), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn set_endpoint_labels(
    State(state): State<Shared>,
    Path(id): Path<u16>,
    body: Bytes,
) -> Result<Json<Endpoint>, AppError> {
    let req: EndpointLabels = json_body(&body)?;
    with_endpoints(&state, move |mgr| {
        mgr.set_labels(id, &req.labels).map(|r| endpoint_view(&r))
    })
    .await
    .map(Json)
}

#[utoipa::path(
    post,
    path = "/v1/endpoints",
    request_body = EndpointCreate,
    responses(
        (status = 201, body = Endpoint),
        (status = 400, body = ApiError, description = "bad labels, netns or ifname"),
        (status = 409, body = ApiError, description = "ifname already taken in the netns"),
        (status = 503, body = ApiError, description = "IPAM pool exhausted"),
    )
)]
async fn create_endpoint(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<(StatusCode, Json<Endpoint>), AppError> {
    let req: EndpointCreate = json_body(&body)?;
    // Not `with_manager`: the create takes the manager's lock only for its
    // first and last phase (see `endpoint::create_unlocked`).
    let state = state.clone();
    let permit = state.creates.clone().acquire_owned().await.map_err(|e| {
        AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting-down",
            e.to_string(),
        )
    })?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        crate::endpoint::create_unlocked(&state.endpoints, req)
            .map(|r| endpoint_view(&r))
            .map_err(AppError::from)
    })
    .await
    .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map(|e| (StatusCode::CREATED, Json(e)))
}

#[utoipa::path(get, path = "/v1/endpoints/{id}", params(("id" = u16, Path)),
    responses((status = 200, body = Endpoint), (status = 404, body = ApiError)))]
async fn get_endpoint(
    State(state): State<Shared>,
    Path(id): Path<u16>,
) -> Result<Json<Endpoint>, AppError> {
    with_store(&state, move |store| {
        store
            .endpoints()?
            .iter()
            .find(|r| r.id == id)
            .map(endpoint_view)
            .ok_or(EndpointError::NotFound(id))
    })
    .await
    .map(Json)
}

#[utoipa::path(delete, path = "/v1/endpoints/{id}", params(("id" = u16, Path)),
    responses((status = 204), (status = 404, body = ApiError),
        (status = 409, body = ApiError, description = "endpoint-busy: its create has not returned yet")))]
async fn delete_endpoint(
    State(state): State<Shared>,
    Path(id): Path<u16>,
) -> Result<StatusCode, AppError> {
    with_endpoints(&state, move |mgr| mgr.delete(id))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/bpf/endpoints", responses((status = 200, body = Vec<BpfEndpoint>)))]
async fn bpf_endpoints(State(state): State<Shared>) -> Result<Json<Vec<BpfEndpoint>>, AppError> {
    with_maps(&state, |dp| {
        let mut out: Vec<BpfEndpoint> = dp
            .endpoints()?
            .into_iter()
            .map(|e| BpfEndpoint {
                address: e.ip.to_string(),
                endpoint_id: e.endpoint_id,
                ifindex: e.ifindex,
                identity: e.identity,
                mac: format_mac(&e.mac),
                node_mac: format_mac(&e.node_mac),
            })
            .collect();
        out.sort_by(|a, b| (a.endpoint_id, &a.address).cmp(&(b.endpoint_id, &b.address)));
        Ok(out)
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/bpf/metrics", responses((status = 200, body = Vec<BpfMetric>)))]
async fn bpf_metrics(State(state): State<Shared>) -> Result<Json<Vec<BpfMetric>>, AppError> {
    with_maps(&state, |dp| {
        Ok(dp
            .metrics()?
            .into_iter()
            .map(|m| BpfMetric {
                kind: if m.kind == cilia_abi::MetricKind::Drop {
                    "drop"
                } else {
                    "forward"
                }
                .into(),
                reason: m.reason_name().into(),
                direction: if m.direction == Some(cilia_abi::Direction::Egress) {
                    "egress"
                } else {
                    "ingress"
                }
                .into(),
                packets: m.packets,
                bytes: m.bytes,
            })
            .collect())
    })
    .await
    .map(Json)
}

#[utoipa::path(post, path = "/v1/datapath/reload", request_body = DatapathReload,
    responses(
        (status = 200, body = DatapathReloadResult, description = "per endpoint: reloaded, unchanged, failed (with the reason; it keeps its old programs) or skipped"),
        (status = 409, body = ApiError, description = "a pinned map no longer has this build's layout (code map-layout-changed): nothing was swapped; restart the agent to migrate it"),
    ))]
async fn reload_datapath(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Json<DatapathReloadResult>, AppError> {
    let req: DatapathReload = if body.is_empty() {
        DatapathReload::default()
    } else {
        json_body(&body)?
    };
    with_endpoints(&state, move |mgr| mgr.reload_datapath(req.force))
        .await
        .map(Json)
}

fn bad_request(code: &str, message: impl Into<String>) -> AppError {
    AppError::new(StatusCode::BAD_REQUEST, code, message)
}

/// Longest message of a JSON syntax error: serde quotes the offending
/// value whole, which for a hostile body is anything but one short line.
const MAX_JSON_ERROR_CHARS: usize = 200;

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, AppError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let msg = match msg.char_indices().nth(MAX_JSON_ERROR_CHARS) {
            Some((cut, _)) => format!("{}… ({} bytes)", &msg[..cut], msg.len()),
            None => msg,
        };
        bad_request("invalid-request", format!("request body: {msg}"))
    })
}

#[utoipa::path(post, path = "/v1/policy", request_body = PolicyImport,
    responses((status = 200, body = PolicyChange), (status = 400, body = ApiError, description = "invalid policy: file, document, field and reason, or a policy limit passed"),
        (status = 413, body = ApiError, description = "body over MAX_BODY_BYTES (8 MiB), code body-too-large")))]
async fn import_policy(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Json<PolicyChange>, AppError> {
    let req: PolicyImport = json_body(&body)?;
    with_policy(&state, move |policy| {
        policy.import_policies(&req.source, &req.yaml)
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/policy", responses((status = 200, body = PolicyList)))]
async fn get_policy(State(state): State<Shared>) -> Result<Json<PolicyList>, AppError> {
    with_policy(&state, |mgr| {
        Ok(PolicyList {
            revision: mgr.policy_revision()?,
            policies: mgr
                .policy_documents()
                .into_iter()
                .map(|p| PolicyDocument {
                    kind: p.kind,
                    namespace: p.namespace,
                    name: p.name,
                    yaml: p.yaml,
                })
                .collect(),
            errors: mgr.policy_errors().to_vec(),
        })
    })
    .await
    .map(Json)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct PolicyDeleteQuery {
    /// Policy name (all kinds and namespaces unless `namespace` is given).
    name: Option<String>,
    namespace: Option<String>,
    /// Delete every policy.
    #[serde(default)]
    all: bool,
}

#[utoipa::path(delete, path = "/v1/policy", params(PolicyDeleteQuery),
    responses((status = 200, body = PolicyChange), (status = 404, body = ApiError)))]
async fn delete_policy(
    State(state): State<Shared>,
    Query(q): Query<PolicyDeleteQuery>,
) -> Result<Json<PolicyChange>, AppError> {
    if q.name.is_none() && !q.all {
        return Err(bad_request(
            "invalid-request",
            "give a policy name or all=true",
        ));
    }
    with_policy(&state, move |mgr| {
        let (revision, policies) =
            mgr.delete_policies(q.name.as_deref(), q.namespace.as_deref())?;
        Ok(PolicyChange {
            revision,
            policies,
            ..Default::default()
        })
    })
    .await
    .map(Json)
}

fn verdict_name(v: cilia_policy::Verdict) -> String {
    match v {
        cilia_policy::Verdict::Allow => "ALLOWED".into(),
        cilia_policy::Verdict::Deny => "DENIED".into(),
    }
}

#[utoipa::path(post, path = "/v1/policy/trace", request_body = TraceRequest,
    responses((status = 200, body = TraceResponse), (status = 400, body = ApiError)))]
async fn trace_policy(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Json<TraceResponse>, AppError> {
    let req: TraceRequest = json_body(&body)?;
    let (port, proto) =
        cilia_api::parse_port_proto(&req.dport).map_err(|e| bad_request("invalid-trace", e))?;
    with_policy(&state, move |mgr| {
        let t = mgr.trace(&req.src, &req.dst, proto, port, req.datapath)?;
        Ok(TraceResponse {
            src: t.src.description.clone(),
            src_identity: t.src.identity,
            dst: t.dst.description.clone(),
            dst_identity: t.dst.identity,
            verdict: verdict_name(t.verdict),
            steps: t
                .steps
                .iter()
                .map(|s| TraceStep {
                    direction: match s.direction {
                        cilia_policy::Direction::Ingress => "ingress".into(),
                        cilia_policy::Direction::Egress => "egress".into(),
                    },
                    subject: s.subject.clone(),
                    verdict: verdict_name(s.verdict),
                    reason: s.reason.clone(),
                    rules: s.rules.clone(),
                })
                .collect(),
            datapath: t.datapath.map(|v| {
                if v == cilia_datapath::testrun::TC_ACT_SHOT {
                    "DENIED"
                } else {
                    "ALLOWED"
                }
                .into()
            }),
        })
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/identities", responses((status = 200, body = Vec<Identity>)))]
async fn list_identities(State(state): State<Shared>) -> Result<Json<Vec<Identity>>, AppError> {
    with_policy(&state, |mgr| mgr.identities()).await.map(Json)
}

#[utoipa::path(get, path = "/v1/identities/{id}", params(("id" = u32, Path)),
    responses((status = 200, body = Identity), (status = 404, body = ApiError)))]
async fn get_identity(
    State(state): State<Shared>,
    Path(id): Path<u32>,
) -> Result<Json<Identity>, AppError> {
    let all = with_policy(&state, |mgr| mgr.identities()).await?;
    all.into_iter()
        .find(|i| i.id == id)
        .map(Json)
        .ok_or_else(|| {
            AppError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("identity {id} not found"),
            )
        })
}

#[utoipa::path(get, path = "/v1/namespaces", responses((status = 200, body = Vec<Namespace>)))]
async fn list_namespaces(State(state): State<Shared>) -> Result<Json<Vec<Namespace>>, AppError> {
    with_policy(&state, |mgr| {
        Ok(mgr
            .namespaces()?
            .into_iter()
            .map(|(name, labels)| Namespace { name, labels })
            .collect())
    })
    .await
    .map(Json)
}

#[utoipa::path(put, path = "/v1/namespaces/{name}", params(("name" = String, Path)), request_body = Namespace,
    responses((status = 200, body = Namespace), (status = 400, body = ApiError)))]
async fn set_namespace(
    State(state): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Namespace>, AppError> {
    let req: Namespace = json_body(&body)?;
    with_endpoints(&state, move |mgr| {
        mgr.set_namespace(&name, &req.labels)?;
        Ok(Namespace {
            name,
            labels: req.labels,
        })
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/bpf/ipcache", responses((status = 200, body = Vec<BpfIpcacheEntry>)))]
async fn bpf_ipcache(State(state): State<Shared>) -> Result<Json<Vec<BpfIpcacheEntry>>, AppError> {
    with_maps(&state, |dp| {
        let mut out: Vec<BpfIpcacheEntry> = dp
            .ipcache()?
            .into_iter()
            .map(|e| BpfIpcacheEntry {
                prefix: e.prefix.to_string(),
                identity: e.identity,
            })
            .collect();
        out.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        Ok(out)
    })
    .await
    .map(Json)
}

fn proto_name(proto: u8) -> String {
    match proto {
        0 => "ANY".into(),
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        other => other.to_string(),
    }
}

#[utoipa::path(get, path = "/v1/bpf/ct", responses((status = 200, body = Vec<BpfCtEntry>)))]
async fn bpf_ct(State(state): State<Shared>) -> Result<Json<Vec<BpfCtEntry>>, AppError> {
    // A walk of the whole table, under the conntrack map's own lock only.
    with_maps(&state, |dp| {
        let now = cilia_datapath::monotonic_ns();
        Ok(dp
            .conntrack()?
            .into_iter()
            .filter(|e| e.expires_ns > now)
            .map(|e| BpfCtEntry {
                proto: proto_name(e.proto),
                source: e.source.to_string(),
                destination: e.destination.to_string(),
                src_identity: e.src_identity,
                dst_identity: e.dst_identity,
                packets: e.packets,
                bytes: e.bytes,
                expires_in: (e.expires_ns - now) / 1_000_000_000,
                seen_reply: e.seen_reply,
                denied: e.denied,
                policy_revision: e.policy_revision,
            })
            .collect())
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/bpf/policy/{id}", params(("id" = u16, Path)),
    responses((status = 200, body = BpfPolicy), (status = 404, body = ApiError)))]
async fn bpf_policy(
    State(state): State<Shared>,
    Path(id): Path<u16>,
) -> Result<Json<BpfPolicy>, AppError> {
    if !with_store(&state, move |store| {
        Ok(store.endpoints()?.iter().any(|r| r.id == id))
    })
    .await?
    {
        return Err(EndpointError::NotFound(id).into());
    }
    let summary = state.policy_summary.borrow().clone();
    with_maps(&state, move |dp| {
        let policy = dp.endpoint_policy(id)?.unwrap_or_default();
        let rules = &summary.rule_names;
        Ok(BpfPolicy {
            endpoint: id,
            ingress_enforced: policy.enforcement.ingress,
            egress_enforced: policy.enforcement.egress,
            entries: policy
                .entries
                .iter()
                .map(|e| BpfPolicyEntry {
                    direction: match e.direction {
                        cilia_abi::Direction::Egress => "egress",
                        cilia_abi::Direction::Ingress => "ingress",
                    }
                    .into(),
                    identity: e.identity,
                    protocol: proto_name(e.proto),
                    port: match e.port_range() {
                        None => "*".to_string(),
                        Some((first, last)) if first == last => first.to_string(),
                        Some((first, last)) => format!("{first}-{last}"),
                    },
                    verdict: match e.verdict {
                        cilia_abi::Verdict::Deny => "deny",
                        cilia_abi::Verdict::Allow => "allow",
                    }
                    .into(),
                    rule: rules
                        .get(e.rule.wrapping_sub(1) as usize)
                        .cloned()
                        .unwrap_or_default(),
                })
                .collect(),
        })
    })
    .await
    .map(Json)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct StreamQuery {
    /// Only the last N matching flows of the ring (before following).
    last: Option<usize>,
    /// Keep the stream open and send new flows as they happen.
    #[serde(default)]
    follow: bool,
}

fn ndjson_line(item: &cilia_api::StreamItem) -> Result<Bytes, std::convert::Infallible> {
    let mut line = serde_json::to_vec(item).unwrap_or_default();
    line.push(b'\n');
    Ok(Bytes::from(line))
}

/// Live flows matching `filter`, as NDJSON lines; `lost` lines when the
/// listener fell behind. The guard keeps the datapath's event level up for
/// as long as the stream lives.
fn live_stream(
    state: &Shared,
    filter: cilia_api::flows::FlowFilter,
    backlog: Vec<crate::monitor::FlowRef>,
) -> axum::body::Body {
    use futures_util::StreamExt;
    use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
    let (rx, guard) = state
        .monitor
        .subscribe(filter.wants_traces(), filter.wants_debug());
    let backlog = futures_util::stream::iter(
        backlog
            .into_iter()
            .map(|f| ndjson_line(&cilia_api::StreamItem::Flow(Box::new((*f).clone())))),
    );
    let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |item| {
        let _keep = &guard;
        let line = match item {
            Ok(flow) if filter.matches(&flow) => Some(ndjson_line(&cilia_api::StreamItem::Flow(
                Box::new((*flow).clone()),
            ))),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                Some(ndjson_line(&cilia_api::StreamItem::Lost { lost: n }))
            }
        };
        std::future::ready(line)
    });
    axum::body::Body::from_stream(backlog.chain(live))
}

fn ndjson(body: axum::body::Body) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/flows", params(cilia_api::flows::FlowFilter, StreamQuery),
    responses((status = 200, description = "NDJSON: one Flow (or {\"lost\": n}) per line", body = Vec<cilia_api::Flow>)))]
async fn flows(
    State(state): State<Shared>,
    Query(filter): Query<cilia_api::flows::FlowFilter>,
    Query(q): Query<StreamQuery>,
) -> Response {
    let mut recent: Vec<_> = state
        .monitor
        .recent()
        .into_iter()
        .filter(|f| filter.matches(f))
        .collect();
    if let Some(n) = q.last {
        let skip = recent.len().saturating_sub(n);
        recent.drain(..skip);
    }
    if q.follow {
        return ndjson(live_stream(&state, filter, recent));
    }
    let body: Vec<u8> = recent
        .into_iter()
        .flat_map(|f| {
            ndjson_line(&cilia_api::StreamItem::Flow(Box::new((*f).clone())))
                .map(|b| b.to_vec())
                .unwrap_or_default()
        })
        .collect();
    ndjson(axum::body::Body::from(body))
}

#[utoipa::path(get, path = "/v1/monitor", params(cilia_api::flows::FlowFilter),
    responses((status = 200, description = "NDJSON stream of live events while connected", body = Vec<cilia_api::Flow>)))]
async fn monitor_stream(
    State(state): State<Shared>,
    Query(filter): Query<cilia_api::flows::FlowFilter>,
) -> Response {
    ndjson(live_stream(&state, filter, Vec::new()))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cilia agent API",
        description = "REST API of cilia-agent over its unix socket"
    ),
    paths(
        status,
        healthz,
        list_endpoints,
        set_endpoint_config,
        set_endpoint_labels,
        delete_container,
        create_endpoint,
        get_endpoint,
        delete_endpoint,
        bpf_endpoints,
        bpf_metrics,
        bpf_ipcache,
        bpf_ct,
        bpf_policy,
        reload_datapath,
        get_policy,
        import_policy,
        delete_policy,
        trace_policy,
        list_identities,
        get_identity,
        list_namespaces,
        set_namespace,
        flows,
        monitor_stream
    ),
    components(schemas(
        ApiError,
        Status,
        KernelFeature,
        IpamStatus,
        PoolStatus,
        Endpoint,
        EndpointCreate,
        EndpointLabels,
        cilia_api::EndpointSettings,
        EndpointState,
        BpfEndpoint,
        BpfMetric,
        DatapathReload,
        DatapathReloadResult,
        cilia_api::EndpointReload,
        cilia_api::LinkReload,
        cilia_api::ReloadOutcome
    ))
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found() -> AppError {
    AppError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such API path (see /openapi.json)",
    )
}

/// Largest accepted request body (a policy import is the largest; the
/// policy text itself is bounded by `cilia_policy::limits::MAX_POLICY_BYTES`,
/// and JSON escaping can make its body a little larger).
pub const MAX_BODY: usize = cilia_api::limits::MAX_BODY_BYTES;

/// Gives a body refused for its size the API's error shape, naming the limit
/// (axum's own answer is a bare text line).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return AppError::new(
            status,
            "body-too-large",
            format!("request body: larger than the limit of {MAX_BODY} bytes (MAX_BODY_BYTES)"),
        )
        .into_response();
    }
    // axum's own rejections (a path parameter that does not parse, a wrong
    // method or content type) are plain text that may echo the request:
    // the same one-line JSON error as every other, quoting an excerpt.
    let text = match axum::body::to_bytes(resp.into_body(), 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::NOT_FOUND => "not-found",
        s if s.is_server_error() => "internal",
        _ => "invalid-request",
    };
    // Its first line, at most 200 characters, no control characters: the
    // text is axum's, but the values it quotes are the caller's.
    let mut message: String = text
        .trim()
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(201)
        .collect();
    if message.chars().count() > 200 {
        message = message.chars().take(200).chain(['…']).collect();
    }
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_string();
    }
    AppError::new(status, code, message).into_response()
}

/// Records every request's duration by method and matched route (never the
/// raw path: ids would make unbounded label sets).
async fn record_duration(
    axum::extract::State(metrics): axum::extract::State<crate::metrics::AgentMetrics>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    metrics
        .api_requests
        .get_or_create(&vec![
            ("method".to_string(), method),
            ("route".to_string(), route),
        ])
        .observe(started.elapsed().as_secs_f64());
    resp
}

pub fn router(state: Shared, metrics: crate::metrics::AgentMetrics) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/healthz", get(healthz))
        .route("/v1/status", get(status))
        .route(
            "/v1/endpoints",
            get(list_endpoints)
                .post(create_endpoint)
                .delete(delete_container),
        )
        .route(
            "/v1/endpoints/{id}/labels",
            axum::routing::put(set_endpoint_labels),
        )
        .route(
            "/v1/endpoints/{id}/config",
            axum::routing::put(set_endpoint_config),
        )
        .route(
            "/v1/endpoints/{id}",
            get(get_endpoint).delete(delete_endpoint),
        )
        .route("/v1/bpf/endpoints", get(bpf_endpoints))
        .route("/v1/bpf/metrics", get(bpf_metrics))
        .route("/v1/bpf/ipcache", get(bpf_ipcache))
        .route("/v1/bpf/ct", get(bpf_ct))
        .route("/v1/bpf/policy/{id}", get(bpf_policy))
        .route("/v1/datapath/reload", axum::routing::post(reload_datapath))
        .route(
            "/v1/policy",
            get(get_policy).post(import_policy).delete(delete_policy),
        )
        .route("/v1/policy/trace", axum::routing::post(trace_policy))
        .route("/v1/identities", get(list_identities))
        .route("/v1/identities/{id}", get(get_identity))
        .route("/v1/namespaces", get(list_namespaces))
        .route("/v1/namespaces/{name}", axum::routing::put(set_namespace))
        .route("/v1/flows", get(flows))
        .route("/v1/monitor", get(monitor_stream))
        .fallback(not_found)
        // Policy imports of many thousand rules are large; the default 2 MB
        // would refuse them before the parser could say anything useful.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(json_errors))
        .route_layer(axum::middleware::from_fn_with_state(
            metrics,
            record_duration,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_describes_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        // Every route the router serves, read from this file's source so a
        // new route cannot be forgotten here.
        let source = include_str!("mod.rs");
        let router = &source[source.find("Router::new()").unwrap()..];
        let router = &router[..router.find(".fallback(").unwrap()];
        let mut checked = 0;
        for part in router.split(".route(").skip(1) {
            let path = part.split('"').nth(1).unwrap();
            if path == "/openapi.json" {
                continue; // the document itself
            }
            assert!(paths.contains_key(path), "{path} missing from OpenAPI");
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} routes found: parser broken?");
    }
}
