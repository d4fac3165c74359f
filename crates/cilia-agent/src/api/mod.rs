//! REST API over the unix socket: JSON in and out, errors as
//! [`cilia_api::ApiError`] with a stable code, described by the OpenAPI
//! document served at `/openapi.json`.

mod bpf;
mod endpoints;
mod flows;
mod nodes;
mod policy;
mod prefilter;
mod services;
mod status;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cilia_api::{
    ApiError, BpfEndpoint, BpfMetric, DatapathReload, DatapathReloadResult, Endpoint,
    EndpointCreate, EndpointLabels, EndpointState, IpamStatus, KernelFeature, PoolStatus, Status,
};
use cilia_datapath::FeatureReport;
use utoipa::OpenApi;

use crate::endpoint::netdev::NetdevError;
use crate::endpoint::{EndpointError, EndpointManager};
use crate::ipam::IpamError;
use crate::policy::repository::{PolicyState, PolicySummary};
use crate::store::StoreError;

pub use endpoints::endpoint_view;
// For `ApiDoc`'s `paths(...)`, which names each handler without its module:
// given `status::status`, utoipa tags the operation "status", and the
// document would change with the file layout.
use self::{
    bpf::*, endpoints::*, flows::*, nodes::*, policy::*, prefilter::*, services::*, status::*,
};

/// Shared by all handlers: one handle per subsystem, each locked on its
/// own (docs/ARCHITECTURE.md, "Locking"). Their operations are blocking
/// (netlink, BPF syscalls, fsync) and run on the blocking pool. Reads
/// (endpoint list and get, status, metrics, observe) take none of these
/// locks: they read the store, the readers' map handle or a published
/// summary.
pub struct AgentState {
    /// Fast attach's background specializer (unset: fast attach off).
    pub specializer: std::sync::OnceLock<crate::endpoint::specialize::Specializer>,
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
    /// Background deletes' kernel cleanups running at once (the others
    /// queue as tasks): a burst of CNI DELs starts no thread per DEL, and
    /// the RTNL lock they all wait on lets no more than a few progress.
    pub reaps: Arc<tokio::sync::Semaphore>,
    pub monitor: Arc<crate::monitor::Monitor>,
    pub features: FeatureReport,
    pub state_dir: String,
    pub bpf_root: String,
    /// The L7 proxy's state, as its supervisor last saw it.
    pub proxy: tokio::sync::watch::Receiver<crate::proxy::ProxyStatus>,
    /// Port of the L7 proxy's listeners.
    pub proxy_port: u16,
    /// The L7 proxy's view of the policy (whether any entry needs it).
    pub l7_summary: tokio::sync::watch::Receiver<Arc<crate::proxy::L7Summary>>,
    /// How far the proxy's policy has caught up with `l7_summary`.
    pub proxy_covered: tokio::sync::watch::Receiver<crate::proxy::Covered>,
    /// The cluster this node is part of (`None`: a single node, which
    /// `/v1/nodes` and the cluster routes show alone).
    pub cluster: Option<crate::relay::ClusterView>,
    /// The cluster link (etcd mode), for status.
    pub multinode: Option<Arc<crate::multinode::MultiNode>>,
    /// How the socket load balancer stands (fixed at start).
    pub socket_lb: crate::socklb::SocketLbState,
    /// The services subsystem (load balancing).
    pub services: Arc<crate::service::Services>,
    /// The XDP prefilter (its own lock, for changes only).
    pub prefilter: Arc<crate::prefilter::Prefilter>,
    /// NodePort acceleration, as started (`--lb-acceleration`).
    pub lb_acceleration: crate::lbaccel::LbAcceleration,
    /// The Kubernetes connection, when the agent watches an API server.
    pub k8s: Option<Arc<crate::k8s::K8sView>>,
}

impl AgentState {
    /// This node's name: the cluster's name for it, else the lowercased
    /// host name (the default of `--node-name`).
    pub fn node_name(&self) -> String {
        match &self.cluster {
            Some(c) => c.node_name.clone(),
            None => crate::relay::host_node_name(),
        }
    }
}

/// How long an import that needs the L7 proxy waits for it to enforce.
/// A debug build's proxy on a loaded 2-CPU machine needs seconds to start.
pub const PROXY_START_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

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
            EndpointError::Cluster(_) => (StatusCode::SERVICE_UNAVAILABLE, "cluster-unavailable"),
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
            EndpointError::NamedPort(_) => (StatusCode::BAD_REQUEST, "invalid-request"),
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
        monitor_stream,
        list_nodes,
        cluster_flows,
        cluster_status,
        list_services,
        get_service,
        update_service,
        import_services,
        delete_service,
        bpf_lb,
        get_prefilter,
        add_prefilter,
        delete_prefilter
    ),
    components(schemas(
        ApiError,
        Status,
        KernelFeature,
        IpamStatus,
        PoolStatus,
        Endpoint,
        cilia_api::EndpointGateways,
        EndpointCreate,
        EndpointLabels,
        cilia_api::EndpointSettings,
        cilia_api::NamedPort,
        cilia_api::K8sPodRef,
        EndpointState,
        BpfEndpoint,
        BpfMetric,
        DatapathReload,
        DatapathReloadResult,
        cilia_api::EndpointReload,
        cilia_api::LinkReload,
        cilia_api::ReloadOutcome,
        cilia_api::Node,
        cilia_api::NodeHealth,
        cilia_api::ProbeResult,
        cilia_api::ClusterFlows,
        cilia_api::UnreachableNode,
        cilia_api::ClusterStatus,
        cilia_api::NodeStatusEntry,
        cilia_api::ServiceSpec,
        cilia_api::ServiceBackendSpec,
        cilia_api::ServiceImport,
        cilia_api::ServiceImportResult,
        cilia_api::ServiceAffinity,
        cilia_api::Service,
        cilia_api::ServiceBackend,
        cilia_api::BpfLb,
        cilia_api::BpfLbService,
        cilia_api::BpfLbMaglevShare,
        cilia_api::BpfLbBackend,
        cilia_api::FlowService,
        cilia_api::Prefilter,
        cilia_api::PrefilterCidrs,
        cilia_api::PrefilterCidr,
        cilia_api::PrefilterDevice
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
        .route("/v1/healthz", get(status::healthz))
        .route("/v1/status", get(status::status))
        .route(
            "/v1/endpoints",
            get(endpoints::list_endpoints)
                .post(endpoints::create_endpoint)
                .delete(endpoints::delete_container),
        )
        .route(
            "/v1/endpoints/{id}/labels",
            axum::routing::put(endpoints::set_endpoint_labels),
        )
        .route(
            "/v1/endpoints/{id}/config",
            axum::routing::put(endpoints::set_endpoint_config),
        )
        .route(
            "/v1/endpoints/{id}",
            get(endpoints::get_endpoint).delete(endpoints::delete_endpoint),
        )
        .route("/v1/bpf/endpoints", get(bpf::bpf_endpoints))
        .route("/v1/bpf/metrics", get(bpf::bpf_metrics))
        .route("/v1/bpf/ipcache", get(bpf::bpf_ipcache))
        .route("/v1/bpf/ct", get(bpf::bpf_ct))
        .route("/v1/bpf/policy/{id}", get(bpf::bpf_policy))
        .route(
            "/v1/datapath/reload",
            axum::routing::post(bpf::reload_datapath),
        )
        .route(
            "/v1/policy",
            get(policy::get_policy)
                .post(policy::import_policy)
                .delete(policy::delete_policy),
        )
        .route(
            "/v1/policy/trace",
            axum::routing::post(policy::trace_policy),
        )
        .route("/v1/identities", get(policy::list_identities))
        .route("/v1/identities/{id}", get(policy::get_identity))
        .route("/v1/namespaces", get(policy::list_namespaces))
        .route(
            "/v1/namespaces/{name}",
            axum::routing::put(policy::set_namespace),
        )
        .route("/v1/flows", get(flows::flows))
        .route("/v1/monitor", get(flows::monitor_stream))
        .route("/v1/nodes", get(nodes::list_nodes))
        .route("/v1/cluster/flows", get(nodes::cluster_flows))
        .route("/v1/cluster/status", get(nodes::cluster_status))
        .route(
            "/v1/services",
            get(services::list_services).post(services::update_service),
        )
        .route(
            "/v1/services/import",
            axum::routing::post(services::import_services),
        )
        .route(
            "/v1/services/{id}",
            get(services::get_service).delete(services::delete_service),
        )
        .route("/v1/bpf/lb", get(services::bpf_lb))
        .route(
            "/v1/prefilter",
            get(prefilter::get_prefilter)
                .post(prefilter::add_prefilter)
                .delete(prefilter::delete_prefilter),
        )
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

/// The read-only API other nodes' relays ask (`--peer-api-addr`, TCP):
/// flows, status and healthz, the same handlers as on the unix socket;
/// nothing here changes state.
pub fn peer_router(state: Shared) -> Router {
    Router::new()
        .route("/v1/healthz", get(status::healthz))
        .route("/v1/status", get(status::status))
        .route("/v1/flows", get(flows::flows))
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use axum::extract::State;

    use super::*;

    /// Devices nobody creates: the readers' test never sets one up.
    struct NoDevices;

    impl crate::endpoint::netdev::Netdev for NoDevices {
        fn create(
            &self,
            _: &crate::endpoint::netdev::VethSpec,
        ) -> Result<u32, crate::endpoint::netdev::NetdevError> {
            unreachable!("no endpoint is created")
        }
        fn delete(&self, _: &str) -> Result<(), crate::endpoint::netdev::NetdevError> {
            Ok(())
        }
        fn ifindex(&self, _: &str) -> Option<u32> {
            None
        }
        fn node_addresses(
            &self,
        ) -> Result<Vec<std::net::IpAddr>, crate::endpoint::netdev::NetdevError> {
            Ok(vec![])
        }
        fn ensure_router(
            &self,
            _: std::net::Ipv6Addr,
            _: Option<std::net::Ipv4Addr>,
        ) -> Result<(), crate::endpoint::netdev::NetdevError> {
            Ok(())
        }
    }

    /// An agent's shared state on the fake datapath and a fresh store.
    fn agent_state(dir: &std::path::Path) -> Shared {
        let datapath: crate::endpoint::DatapathHandle =
            Arc::new(cilia_datapath::fake::FakeDatapath::new());
        let pools = crate::endpoint::Pools {
            v6: crate::ipam::Pool::new("fd00::/120".parse().unwrap()).unwrap(),
            v4: None,
        };
        let manager = EndpointManager::new(
            crate::store::Store::open(&dir.join("state.redb")).unwrap(),
            datapath.clone(),
            Box::new(NoDevices),
            pools.clone(),
        );
        let metrics = crate::metrics::AgentMetrics::default();
        let policy_summary = manager.policy().subscribe();
        let services = Arc::new(crate::service::Services::new(
            manager.store.clone(),
            datapath.clone(),
            cilia_lb::DEFAULT_TABLE_SIZE,
        ));
        let prefilter = Arc::new(
            crate::prefilter::Prefilter::start(manager.store.clone(), datapath.clone(), &[])
                .unwrap(),
        );
        Arc::new(AgentState {
            specializer: std::sync::OnceLock::new(),
            policy: manager.policy_handle(),
            policy_summary,
            store: manager.store.clone(),
            endpoints: Mutex::new(manager),
            pools,
            datapath,
            metrics: metrics.clone(),
            creates: Arc::new(tokio::sync::Semaphore::new(1)),
            reaps: Arc::new(tokio::sync::Semaphore::new(1)),
            monitor: crate::monitor::Monitor::new(16, metrics),
            features: FeatureReport {
                kernel: "test".into(),
                features: vec![],
            },
            state_dir: dir.display().to_string(),
            bpf_root: dir.display().to_string(),
            proxy: tokio::sync::watch::channel(crate::proxy::ProxyStatus::NotNeeded).1,
            proxy_port: cilia_proxy::control::DEFAULT_PROXY_PORT,
            l7_summary: tokio::sync::watch::channel(Arc::default()).1,
            proxy_covered: tokio::sync::watch::channel(Default::default()).1,
            cluster: None,
            multinode: None,
            socket_lb: Default::default(),
            services,
            prefilter,
            lb_acceleration: crate::lbaccel::LbAcceleration::Disabled,
            k8s: None,
        })
    }

    fn service_spec(id: Option<u16>, frontend: &str, backends: &[&str]) -> Bytes {
        let spec = cilia_api::ServiceSpec {
            id,
            frontend: frontend.into(),
            backends: backends
                .iter()
                .map(|a| cilia_api::ServiceBackendSpec {
                    address: (*a).into(),
                    weight: None,
                    state: None,
                })
                .collect(),
            algorithm: None,
            affinity: None,
            external_traffic_policy: None,
        };
        Bytes::from(serde_json::to_vec(&spec).unwrap())
    }

    #[tokio::test]
    async fn a_service_import_is_400_listing_each_refused_entry_or_applies_all() {
        let dir = tempfile::tempdir().unwrap();
        let state = agent_state(dir.path());
        let body = |specs: &[Bytes], prune: bool| {
            let services: Vec<serde_json::Value> = specs
                .iter()
                .map(|b| serde_json::from_slice(b).unwrap())
                .collect();
            Bytes::from(
                serde_json::to_vec(&serde_json::json!({"services": services, "prune": prune}))
                    .unwrap(),
            )
        };
        let bad = services::import_services(
            State(state.clone()),
            body(
                &[
                    service_spec(None, "192.0.2.10:80/tcp", &["10.0.0.1:80"]),
                    service_spec(None, "192.0.2.11:80", &["10.0.0.1:80"]),
                ],
                false,
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (bad.0, bad.1.code.as_str()),
            (StatusCode::BAD_REQUEST, "invalid-services")
        );
        assert!(
            bad.1.message.contains(
                "1 of 2 entries refused, nothing applied: services[1].frontend: \"192.0.2.11:80\""
            ),
            "{}",
            bad.1.message
        );
        let list = services::list_services(State(state.clone()))
            .await
            .unwrap_or_else(|e| panic!("{:?}", e.1));
        assert!(list.0.is_empty());
        let done = services::import_services(
            State(state.clone()),
            body(
                &[
                    service_spec(None, "192.0.2.10:80/tcp", &["10.0.0.1:80"]),
                    service_spec(Some(7), "192.0.2.11:80/tcp", &["10.0.0.1:80"]),
                ],
                true,
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{:?}", e.1));
        assert_eq!((done.0.ids, done.0.created), (vec![1, 7], 2));
    }

    #[tokio::test]
    async fn service_errors_are_400_404_and_409_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let state = agent_state(dir.path());
        let created = services::update_service(
            State(state.clone()),
            service_spec(Some(3), "192.0.2.10:80/tcp", &["10.0.0.1:80"]),
        )
        .await
        .unwrap_or_else(|e| panic!("{:?}", e.1));
        assert_eq!(created.0.id, 3);
        let bad = services::update_service(
            State(state.clone()),
            service_spec(None, "192.0.2.10:80", &["10.0.0.1:80"]),
        )
        .await
        .unwrap_err();
        assert_eq!(bad.0, StatusCode::BAD_REQUEST);
        assert!(
            bad.1.message.contains("frontend \"192.0.2.10:80\""),
            "{}",
            bad.1.message
        );
        let taken = services::update_service(
            State(state.clone()),
            service_spec(Some(4), "192.0.2.10:80/tcp", &["10.0.0.1:80"]),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (taken.0, taken.1.code.as_str()),
            (StatusCode::CONFLICT, "frontend-in-use")
        );
        let missing = services::get_service(State(state.clone()), axum::extract::Path(9))
            .await
            .unwrap_err();
        assert_eq!(missing.0, StatusCode::NOT_FOUND);
        let gone = services::delete_service(State(state.clone()), axum::extract::Path(9))
            .await
            .unwrap_err();
        assert_eq!(gone.0, StatusCode::NOT_FOUND);
        services::delete_service(State(state.clone()), axum::extract::Path(3))
            .await
            .unwrap_or_else(|e| panic!("{:?}", e.1));
        let list = services::list_services(State(state.clone()))
            .await
            .unwrap_or_else(|e| panic!("{:?}", e.1));
        assert!(list.0.is_empty());
        let lb = services::bpf_lb(State(state))
            .await
            .unwrap_or_else(|e| panic!("{:?}", e.1));
        assert!(lb.0.services.is_empty() && lb.0.backends.is_empty());
    }

    /// `fut`'s output, or a panic naming `what` if it takes seconds: a read
    /// that waits for a lock another thread holds never finishes.
    async fn promptly<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(5), fut)
            .await
            .unwrap_or_else(|_| panic!("{what} waited for a subsystem's lock"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_answer_while_a_change_holds_the_endpoints_and_policy_locks() {
        let dir = tempfile::tempdir().unwrap();
        let state = agent_state(dir.path());
        // A long regeneration and a create's bookkeeping, both at once.
        let (held_tx, held) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let state = state.clone();
            std::thread::spawn(move || {
                let _endpoints = state.endpoints.lock().unwrap();
                let _policy = state.policy.lock().unwrap();
                held_tx.send(()).unwrap();
                let _ = release_rx.recv_timeout(std::time::Duration::from_secs(30));
            })
        };
        held.recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        let status = promptly("status", status::status(State(state.clone()))).await;
        assert!(status.is_ok());
        let query: endpoints::ContainerQuery = serde_json::from_str("{}").unwrap();
        let list = promptly(
            "endpoint list",
            endpoints::list_endpoints(State(state.clone()), axum::extract::Query(query)),
        )
        .await;
        assert!(list.is_ok());
        let get = promptly(
            "endpoint get",
            endpoints::get_endpoint(State(state.clone()), axum::extract::Path(1)),
        )
        .await;
        assert!(get.is_err(), "no endpoint 1: a 404, not a wait");
        let scrape = {
            let state = state.clone();
            tokio::task::spawn_blocking(move || {
                crate::metrics::scrape(&state.store, state.datapath.as_ref())
            })
        };
        assert!(promptly("metrics scrape", scrape).await.unwrap().is_ok());
        release.send(()).unwrap();
        holder.join().unwrap();
    }

    /// `state` with a cluster view listing `nodes` and a health report.
    fn in_cluster(
        state: Shared,
        nodes: Vec<cilia_api::Node>,
        health: crate::health::HealthReport,
    ) -> Shared {
        let mut state = Arc::try_unwrap(state).unwrap_or_else(|_| unreachable!("one owner"));
        state.cluster = Some(crate::relay::ClusterView {
            node_name: "node1".into(),
            nodes: tokio::sync::watch::channel(nodes).1,
            health: Some(tokio::sync::watch::channel(Arc::new(health)).1),
        });
        Arc::new(state)
    }

    fn node(name: &str, local: bool, peer_api: Option<String>) -> cilia_api::Node {
        cilia_api::Node {
            name: name.into(),
            local,
            peer_api,
            ..Default::default()
        }
    }

    #[test]
    fn a_single_agent_lists_itself_as_the_local_node() {
        let dir = tempfile::tempdir().unwrap();
        let state = agent_state(dir.path());
        let nodes = nodes::node_list(&state, std::time::SystemTime::now());
        assert_eq!(nodes.len(), 1);
        let n = &nodes[0];
        assert!(n.local && n.health.is_none());
        assert_eq!(n.name, crate::relay::host_node_name());
        assert_eq!(n.ipv6_range, "fd00::/120");
    }

    #[test]
    fn the_node_list_carries_each_nodes_probes_and_heartbeat_age() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let beat = humantime::format_rfc3339_millis(now - std::time::Duration::from_secs(2));
        let node2 = cilia_api::Node {
            last_heartbeat: Some(beat.to_string()),
            ..node("node2", false, None)
        };
        let health = cilia_api::NodeHealth {
            icmp: vec![cilia_api::ProbeResult {
                address: "10.200.2.9".parse().unwrap(),
                reachable: true,
                latency_ms: Some(0.2),
                last_probe: None,
                error: None,
            }],
            tcp: vec![],
        };
        let state = in_cluster(
            agent_state(dir.path()),
            vec![node("node1", true, None), node2],
            [("node2".to_string(), health.clone())].into(),
        );
        assert_eq!(state.node_name(), "node1");
        let nodes = nodes::node_list(&state, now);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].health.as_ref(), Some(&health));
        let age = nodes[1].heartbeat_age_ms.unwrap();
        assert!((2000..2010).contains(&age), "{age}");
        assert!(nodes[0].health.is_none());
    }

    fn l7_flow(time_unix_ns: u64) -> cilia_proxy::control::L7Flow {
        cilia_proxy::control::L7Flow {
            time_unix_ns,
            endpoint_id: 1,
            direction: cilia_proxy::control::L7Direction::Ingress,
            src: "[fd00::3]:40000".parse().unwrap(),
            dst: "[fd00::2]:80".parse().unwrap(),
            src_identity: 300,
            dst_identity: 301,
            method: "GET".into(),
            path: "/".into(),
            host: None,
            status: 200,
            latency_us: 10,
            verdict: cilia_proxy::control::L7Verdict::Forwarded,
            rules: vec![],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_reads_ask_peers_over_their_peer_api_and_name_the_silent_one() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let peer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = peer.local_addr().unwrap().to_string();
        let state_b = agent_state(dir_b.path());
        let server = tokio::spawn(crate::relay::serve_peer_api(peer, state_b.clone()));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let state = in_cluster(
            agent_state(dir_a.path()),
            vec![
                node("node1", true, None),
                node("node2", false, Some(peer_addr.clone())),
                node("node3", false, Some(closed)),
            ],
            Default::default(),
        );
        // One request on each node; node2's came first.
        state.monitor.record_l7(&l7_flow(200)).await;
        state_b.monitor.record_l7(&l7_flow(100)).await;
        let axum::Json(c) = nodes::cluster_status(State(state.clone())).await;
        let seen: Vec<(&str, bool)> = c
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.reachable))
            .collect();
        assert_eq!(seen, [("node1", true), ("node2", true), ("node3", false)]);
        assert_eq!(
            c.nodes[1].status.as_ref().unwrap().state_dir,
            dir_b.path().display().to_string()
        );
        assert!(c.nodes[2].error.as_deref().unwrap().contains("peer API"));

        let filter: cilia_api::flows::FlowFilter = serde_json::from_str("{}").unwrap();
        let q: nodes::ClusterFlowsQuery = serde_json::from_str("{}").unwrap();
        let axum::Json(flows) = nodes::cluster_flows(
            State(state.clone()),
            axum::extract::Query(filter),
            axum::extract::Query(q),
        )
        .await
        .unwrap_or_else(|_| panic!("cluster flows refused"));
        let seen: Vec<(u64, &str)> = flows
            .flows
            .iter()
            .map(|f| (f.time_ns, f.node.as_deref().unwrap()))
            .collect();
        assert_eq!(seen, [(100, "node2"), (200, "node1")]);
        let silent: Vec<&str> = flows.unreachable.iter().map(|u| u.node.as_str()).collect();
        assert_eq!(silent, ["node3"]);

        // The peer API serves reads only.
        let refused = cilia_api::ApiClient::peer(peer_addr.clone())
            .endpoints(&Default::default())
            .await;
        assert!(
            matches!(
                refused,
                Err(cilia_api::ClientError::Api { status: 404, .. })
            ),
            "{refused:?}"
        );
        server.abort();
    }

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
