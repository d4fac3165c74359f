//! The XDP prefilter (`/v1/prefilter`): list, add and remove source CIDRs.
//! Changes run on the blocking pool under the prefilter's own lock only.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use cilia_api::{ApiError, Prefilter, PrefilterCidr, PrefilterCidrs, PrefilterDevice};
use serde::Deserialize;

use super::{json_body, AppError, Shared};
use crate::prefilter::{PrefilterError, View};

impl From<PrefilterError> for AppError {
    fn from(e: PrefilterError) -> Self {
        let (status, code) = match &e {
            PrefilterError::Invalid { .. } | PrefilterError::Empty => {
                (StatusCode::BAD_REQUEST, "invalid-cidr")
            }
            PrefilterError::NotFound { .. } => (StatusCode::NOT_FOUND, "not-found"),
            PrefilterError::Full { .. } => (StatusCode::CONFLICT, "prefilter-full"),
            PrefilterError::Device { .. } | PrefilterError::Datapath(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "datapath")
            }
            PrefilterError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        AppError::new(status, code, e.to_string())
    }
}

fn render(view: View) -> Prefilter {
    Prefilter {
        devices: view
            .devices
            .into_iter()
            .map(|d| PrefilterDevice {
                name: d.name,
                mode: d.link.mode.name().into(),
                note: d
                    .link
                    .native_error
                    .map(|why| format!("native XDP refused: {why}")),
            })
            .collect(),
        cidrs: view
            .cidrs
            .into_iter()
            .map(|(cidr, packets, bytes)| PrefilterCidr {
                cidr: cidr.to_string(),
                packets,
                bytes,
            })
            .collect(),
    }
}

/// Runs `f` on the prefilter, on the blocking pool.
async fn on_prefilter(
    state: &Shared,
    f: impl FnOnce(&crate::prefilter::Prefilter) -> Result<View, PrefilterError> + Send + 'static,
) -> Result<Json<Prefilter>, AppError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state.prefilter))
        .await
        .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map(|v| Json(render(v)))
        .map_err(AppError::from)
}

#[utoipa::path(get, path = "/v1/prefilter", responses((status = 200, body = Prefilter)))]
pub(super) async fn get_prefilter(
    State(state): State<Shared>,
) -> Result<Json<Prefilter>, AppError> {
    on_prefilter(&state, |p| p.view()).await
}

#[utoipa::path(post, path = "/v1/prefilter", request_body = PrefilterCidrs,
    responses((status = 200, body = Prefilter), (status = 400, body = ApiError),
              (status = 409, body = ApiError)))]
pub(super) async fn add_prefilter(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Json<Prefilter>, AppError> {
    let req: PrefilterCidrs = json_body(&body)?;
    on_prefilter(&state, move |p| p.add(&req.cidrs)).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct PrefilterDeleteQuery {
    /// CIDRs to remove, comma separated (instead of a body).
    cidrs: Option<String>,
}

#[utoipa::path(delete, path = "/v1/prefilter", params(PrefilterDeleteQuery),
    request_body = PrefilterCidrs,
    responses((status = 200, body = Prefilter), (status = 400, body = ApiError),
              (status = 404, body = ApiError)))]
pub(super) async fn delete_prefilter(
    State(state): State<Shared>,
    Query(q): Query<PrefilterDeleteQuery>,
    body: Bytes,
) -> Result<Json<Prefilter>, AppError> {
    let mut cidrs: Vec<String> = match q.cidrs {
        Some(list) => list.split(',').map(|c| c.trim().to_string()).collect(),
        None => Vec::new(),
    };
    if !body.is_empty() {
        cidrs.extend(json_body::<PrefilterCidrs>(&body)?.cidrs);
    }
    on_prefilter(&state, move |p| p.delete(&cidrs)).await
}
