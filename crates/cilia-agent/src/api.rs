//! REST API over the unix socket: JSON in and out, errors as
//! [`cilia_api::ApiError`] with a stable code, described by the OpenAPI
//! document served at `/openapi.json`.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cilia_abi::{reason_name, CILIA_DIR_EGRESS, CILIA_METRIC_DROP};
use cilia_api::{
    ApiError, BpfEndpoint, BpfMetric, Endpoint, EndpointCreate, EndpointState, IpamStatus,
    KernelFeature, PoolStatus, Status,
};
use cilia_datapath::FeatureReport;
use utoipa::OpenApi;

use crate::endpoint::{EndpointError, EndpointManager};
use crate::ipam::{IpamError, Pool};
use crate::netdev::{format_mac, NetdevError};
use crate::store::{EndpointRecord, StoreError};

/// Shared by all handlers. The manager sits behind a std mutex because every
/// operation on it is blocking (netlink via iproute2, BPF syscalls, fsync)
/// and runs on the blocking pool; one writer at a time is also what keeps
/// allocation and device names race-free.
pub struct AgentState {
    pub manager: Mutex<EndpointManager>,
    pub features: FeatureReport,
    pub state_dir: String,
    pub bpf_root: String,
}

pub type Shared = Arc<AgentState>;

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
            EndpointError::Datapath(_) => (StatusCode::INTERNAL_SERVER_ERROR, "datapath"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        AppError::new(status, code, msg)
    }
}

/// Runs blocking manager work off the async threads.
async fn with_manager<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&mut EndpointManager) -> Result<T, EndpointError> + Send + 'static,
) -> Result<T, AppError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut mgr = state
            .manager
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut mgr).map_err(AppError::from)
    })
    .await
    .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
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
    with_manager(&state, move |mgr| {
        let endpoints = mgr.list()?;
        let used = mgr.allocated()?;
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
                ipv6: pool_status(&mgr.pools().v6, &used),
                ipv4: mgr.pools().v4.as_ref().map(|p| pool_status(p, &used)),
            },
            state_dir,
            bpf_root,
        })
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/healthz", responses((status = 200, description = "agent is serving")))]
async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/v1/endpoints", responses((status = 200, body = Vec<Endpoint>)))]
async fn list_endpoints(State(state): State<Shared>) -> Result<Json<Vec<Endpoint>>, AppError> {
    with_manager(&state, |mgr| {
        Ok(mgr.list()?.iter().map(endpoint_view).collect())
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
    let req: EndpointCreate = serde_json::from_slice(&body).map_err(|e| {
        AppError::new(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            format!("request body: {e}"),
        )
    })?;
    with_manager(&state, move |mgr| {
        mgr.create(req).map(|r| endpoint_view(&r))
    })
    .await
    .map(|e| (StatusCode::CREATED, Json(e)))
}

#[utoipa::path(get, path = "/v1/endpoints/{id}", params(("id" = u16, Path)),
    responses((status = 200, body = Endpoint), (status = 404, body = ApiError)))]
async fn get_endpoint(
    State(state): State<Shared>,
    Path(id): Path<u16>,
) -> Result<Json<Endpoint>, AppError> {
    with_manager(&state, move |mgr| mgr.get(id).map(|r| endpoint_view(&r)))
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/v1/endpoints/{id}", params(("id" = u16, Path)),
    responses((status = 204), (status = 404, body = ApiError)))]
async fn delete_endpoint(
    State(state): State<Shared>,
    Path(id): Path<u16>,
) -> Result<StatusCode, AppError> {
    with_manager(&state, move |mgr| mgr.delete(id))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/bpf/endpoints", responses((status = 200, body = Vec<BpfEndpoint>)))]
async fn bpf_endpoints(State(state): State<Shared>) -> Result<Json<Vec<BpfEndpoint>>, AppError> {
    with_manager(&state, |mgr| {
        let mut out: Vec<BpfEndpoint> = mgr
            .datapath()
            .list_endpoints()?
            .into_iter()
            .map(|(k, v)| BpfEndpoint {
                address: k
                    .ip()
                    .map(|ip| ip.to_string())
                    .unwrap_or_else(|| "?".into()),
                endpoint_id: v.endpoint_id,
                ifindex: v.ifindex,
                identity: v.identity,
                mac: format_mac(&v.mac),
                node_mac: format_mac(&v.node_mac),
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
    with_manager(&state, |mgr| {
        Ok(mgr
            .datapath()
            .metrics()?
            .into_iter()
            .map(|(k, v)| BpfMetric {
                kind: if k.kind == CILIA_METRIC_DROP {
                    "drop"
                } else {
                    "forward"
                }
                .into(),
                reason: reason_name(k.kind, k.reason).into(),
                direction: if k.dir == CILIA_DIR_EGRESS {
                    "egress"
                } else {
                    "ingress"
                }
                .into(),
                packets: v.packets,
                bytes: v.bytes,
            })
            .collect())
    })
    .await
    .map(Json)
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
        create_endpoint,
        get_endpoint,
        delete_endpoint,
        bpf_endpoints,
        bpf_metrics
    ),
    components(schemas(
        ApiError,
        Status,
        KernelFeature,
        IpamStatus,
        PoolStatus,
        Endpoint,
        EndpointCreate,
        EndpointState,
        BpfEndpoint,
        BpfMetric
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

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/healthz", get(healthz))
        .route("/v1/status", get(status))
        .route("/v1/endpoints", get(list_endpoints).post(create_endpoint))
        .route(
            "/v1/endpoints/{id}",
            get(get_endpoint).delete(delete_endpoint),
        )
        .route("/v1/bpf/endpoints", get(bpf_endpoints))
        .route("/v1/bpf/metrics", get(bpf_metrics))
        .fallback(not_found)
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_describes_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/status",
            "/v1/healthz",
            "/v1/endpoints",
            "/v1/endpoints/{id}",
            "/v1/bpf/endpoints",
            "/v1/bpf/metrics",
        ] {
            assert!(paths.contains_key(p), "{p} missing from OpenAPI");
        }
    }
}
