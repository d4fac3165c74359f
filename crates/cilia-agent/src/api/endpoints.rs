//! The endpoint lifecycle as the CNI plugin and the CLI drive it: create,
//! list, get, relabel, configure and delete endpoints (`/v1/endpoints`).
//! Changes run under the endpoints' lock; reads go to the store.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use cilia_api::{ApiError, Endpoint, EndpointCreate, EndpointLabels};
use serde::Deserialize;

use super::{bad_request, json_body, with_endpoints, with_store, AppError, Shared};
use crate::endpoint::netdev::format_mac;
use crate::endpoint::EndpointError;
use crate::store::EndpointRecord;

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
        named_ports: rec.named_ports.clone(),
        k8s_pod: rec.k8s_pod.clone(),
        node: None,
        gateways: None,
    }
}

/// An endpoint's view as the API answers it: on this agent's node.
fn on_node(ep: Endpoint, node: &str) -> Endpoint {
    Endpoint {
        node: Some(node.to_string()),
        ..ep
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct ContainerQuery {
    /// Only the endpoints of this container (runtime's container id).
    container_id: Option<String>,
    /// With `container_id`: only this interface.
    ifname: Option<String>,
    /// Only the attachments of this CNI network (endpoints recorded without
    /// a network match any, see `EndpointRecord::attached_to`).
    network: Option<String>,
    /// DELETE only: answer once the endpoints are disconnected (addresses
    /// withdrawn, state `deleting`); their programs, policy maps and
    /// devices are removed right after, which frees their ids and
    /// addresses. What a CNI DEL asks for: the kernel's part of a delete
    /// (RCU grace periods, ~45 ms here) is then off the runtime's path.
    background: Option<bool>,
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
pub(super) async fn list_endpoints(
    State(state): State<Shared>,
    Query(q): Query<ContainerQuery>,
) -> Result<Json<Vec<Endpoint>>, AppError> {
    q.check()?;
    if q.background.is_some() {
        return Err(bad_request(
            "invalid-request",
            "background applies to DELETE only",
        ));
    }
    let node = state.node_name();
    with_store(&state, move |store| {
        Ok(store
            .endpoints()?
            .iter()
            .filter(|r| q.matches(r))
            .map(|r| on_node(endpoint_view(r), &node))
            .collect())
    })
    .await
    .map(Json)
}

#[utoipa::path(delete, path = "/v1/endpoints", params(ContainerQuery),
    responses((status = 200, body = usize, description = "number of endpoints deleted (0 is not an error); with background=true, disconnected and being removed"),
        (status = 409, body = ApiError, description = "endpoint-busy: a selected endpoint's create has not returned yet")))]
pub(super) async fn delete_container(
    State(state): State<Shared>,
    Query(q): Query<ContainerQuery>,
) -> Result<Json<usize>, AppError> {
    q.check()?;
    if q.container_id.is_none() {
        return Err(bad_request("invalid-request", "container_id is required"));
    }
    if q.background != Some(true) {
        return with_endpoints(&state, move |mgr| mgr.delete_matching(|r| q.matches(r)))
            .await
            .map(Json);
    }
    let (gone, disconnected) = with_endpoints(&state, move |mgr| {
        Ok(mgr.disconnect_matching(|r| q.matches(r)))
    })
    .await?;
    let count = gone.len();
    if !gone.is_empty() {
        let state = state.clone();
        tokio::spawn(async move {
            // Closed only at shutdown: the records stay `deleting` and the
            // next start finishes them.
            let Ok(_permit) = state.reaps.clone().acquire_owned().await else {
                return;
            };
            let reaped =
                tokio::task::spawn_blocking(move || crate::endpoint::reap(&state.endpoints, gone));
            if let Err(e) = reaped.await {
                tracing::error!(error = %e, "a background delete panicked; its endpoints stay `deleting` until the next start");
            }
        });
    }
    disconnected.map_err(AppError::from)?;
    Ok(Json(count))
}

#[utoipa::path(put, path = "/v1/endpoints/{id}/config", params(("id" = u16, Path)), request_body = cilia_api::EndpointSettings,
    responses((status = 200, body = Endpoint), (status = 404, body = ApiError)))]
pub(super) async fn set_endpoint_config(
    State(state): State<Shared>,
    Path(id): Path<u16>,
    body: Bytes,
) -> Result<Json<Endpoint>, AppError> {
    let req: cilia_api::EndpointSettings = json_body(&body)?;
    let node = state.node_name();
    with_endpoints(&state, move |mgr| {
        mgr.set_policy_audit(id, req.policy_audit)
            .map(|r| on_node(endpoint_view(&r), &node))
    })
    .await
    .map(Json)
}

#[utoipa::path(put, path = "/v1/endpoints/{id}/labels", params(("id" = u16, Path)), request_body = EndpointLabels,
    responses((status = 200, body = Endpoint), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub(super) async fn set_endpoint_labels(
    State(state): State<Shared>,
    Path(id): Path<u16>,
    body: Bytes,
) -> Result<Json<Endpoint>, AppError> {
    let req: EndpointLabels = json_body(&body)?;
    let node = state.node_name();
    with_endpoints(&state, move |mgr| {
        mgr.set_labels(id, &req.labels)
            .map(|r| on_node(endpoint_view(&r), &node))
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
pub(super) async fn create_endpoint(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<(StatusCode, Json<Endpoint>), AppError> {
    let req: EndpointCreate = json_body(&body)?;
    // Not `with_endpoints`: the create takes the endpoints' lock only for its
    // first and last phase (see `endpoint::create_unlocked`).
    let state = state.clone();
    let node = state.node_name();
    let pools = state.pools.clone();
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
            .map(|r| {
                let gateways = cilia_api::EndpointGateways {
                    ipv6: pools.v6.router().to_string(),
                    ipv4: pools
                        .v4
                        .as_ref()
                        .filter(|_| r.ipv4.is_some())
                        .map(|p| p.router().to_string()),
                };
                Endpoint {
                    gateways: Some(gateways),
                    ..on_node(endpoint_view(&r), &node)
                }
            })
            .map_err(AppError::from)
    })
    .await
    .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map(|e| (StatusCode::CREATED, Json(e)))
}

#[utoipa::path(get, path = "/v1/endpoints/{id}", params(("id" = u16, Path)),
    responses((status = 200, body = Endpoint), (status = 404, body = ApiError)))]
pub(super) async fn get_endpoint(
    State(state): State<Shared>,
    Path(id): Path<u16>,
) -> Result<Json<Endpoint>, AppError> {
    let node = state.node_name();
    with_store(&state, move |store| {
        store
            .endpoints()?
            .iter()
            .find(|r| r.id == id)
            .map(|r| on_node(endpoint_view(r), &node))
            .ok_or(EndpointError::NotFound(id))
    })
    .await
    .map(Json)
}

#[utoipa::path(delete, path = "/v1/endpoints/{id}", params(("id" = u16, Path)),
    responses((status = 204), (status = 404, body = ApiError),
        (status = 409, body = ApiError, description = "endpoint-busy: its create has not returned yet")))]
pub(super) async fn delete_endpoint(
    State(state): State<Shared>,
    Path(id): Path<u16>,
) -> Result<StatusCode, AppError> {
    with_endpoints(&state, move |mgr| mgr.delete(id))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}
