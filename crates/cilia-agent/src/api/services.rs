//! Services (`/v1/services`) and the load balancer's kernel view
//! (`/v1/bpf/lb`). Changes go through the services subsystem's own lock;
//! reads take none.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use cilia_api::{ApiError, BpfLb, Service, ServiceImport, ServiceImportResult, ServiceSpec};

use super::{json_body, AppError, Shared};
use crate::service::{ServiceError, Services};

impl From<ServiceError> for AppError {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        let (status, code) = match &e {
            ServiceError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid-service"),
            ServiceError::Refused { .. } => (StatusCode::BAD_REQUEST, "invalid-services"),
            ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ServiceError::NodePortUnavailable { .. } => {
                (StatusCode::BAD_REQUEST, "nodeport-unavailable")
            }
            ServiceError::FrontendInUse { .. } => (StatusCode::CONFLICT, "frontend-in-use"),
            ServiceError::IdsExhausted => (StatusCode::SERVICE_UNAVAILABLE, "ids-exhausted"),
            ServiceError::Store(crate::store::StoreError::LbBackendsFull { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "backends-full")
            }
            ServiceError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store"),
            ServiceError::Datapath { .. } | ServiceError::Maps { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "datapath")
            }
        };
        AppError::new(status, code, msg)
    }
}

/// Runs `f` on the services subsystem, on the blocking pool.
async fn with_services<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&Services) -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, AppError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state.services).map_err(AppError::from))
        .await
        .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

#[utoipa::path(get, path = "/v1/services", responses((status = 200, body = Vec<Service>)))]
pub(super) async fn list_services(
    State(state): State<Shared>,
) -> Result<Json<Vec<Service>>, AppError> {
    with_services(&state, |s| s.list()).await.map(Json)
}

#[utoipa::path(get, path = "/v1/services/{id}", params(("id" = u16, Path)),
    responses((status = 200, body = Service), (status = 404, body = ApiError)))]
pub(super) async fn get_service(
    State(state): State<Shared>,
    Path(id): Path<u16>,
) -> Result<Json<Service>, AppError> {
    with_services(&state, move |s| s.get(id)).await.map(Json)
}

#[utoipa::path(post, path = "/v1/services", request_body = ServiceSpec,
    responses((status = 200, body = Service),
        (status = 400, body = ApiError, description = "invalid-service: the field and the reason"),
        (status = 409, body = ApiError, description = "frontend-in-use: another service id has this frontend")))]
pub(super) async fn update_service(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Json<Service>, AppError> {
    let spec: ServiceSpec = json_body(&body)?;
    with_services(&state, move |s| s.update(&spec))
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/services/import", request_body = ServiceImport,
    responses((status = 200, body = ServiceImportResult),
        (status = 400, body = ApiError, description = "invalid-services: each refused entry as services[INDEX].FIELD: reason; nothing applied")))]
pub(super) async fn import_services(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Json<ServiceImportResult>, AppError> {
    let import: ServiceImport = json_body(&body)?;
    with_services(&state, move |s| s.import(&import.services, import.prune))
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/v1/services/{id}", params(("id" = u16, Path)),
    responses((status = 200), (status = 404, body = ApiError)))]
pub(super) async fn delete_service(
    State(state): State<Shared>,
    Path(id): Path<u16>,
) -> Result<(), AppError> {
    with_services(&state, move |s| s.delete(id)).await
}

#[utoipa::path(get, path = "/v1/bpf/lb", responses((status = 200, body = BpfLb)))]
pub(super) async fn bpf_lb(State(state): State<Shared>) -> Result<Json<BpfLb>, AppError> {
    with_services(&state, |s| {
        s.kernel_view().map_err(|error| ServiceError::Maps {
            context: "reading the load balancer's maps",
            error: Box::new(error),
        })
    })
    .await
    .map(Json)
}
