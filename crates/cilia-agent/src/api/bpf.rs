//! The datapath as the kernel holds it, for debugging what the agent
//! programmed (`/v1/bpf/...`: endpoints, metrics, ipcache, conntrack, policy
//! maps), and the reload of every endpoint's programs (`/v1/datapath/reload`).
//! Listings read the maps under no lock of the agent's.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use cilia_api::{
    ApiError, BpfCtEntry, BpfEndpoint, BpfIpcacheEntry, BpfMetric, BpfPolicy, BpfPolicyEntry,
    DatapathReload, DatapathReloadResult,
};

use super::{json_body, with_endpoints, with_maps, with_store, AppError, Shared};
use crate::endpoint::netdev::format_mac;
use crate::endpoint::EndpointError;

/// What a `/v1/bpf/...` listing of a map's entries answers.
type Listing<T> = Result<Json<Vec<T>>, AppError>;

/// One map's entries as the API shows them, in `order`: a map's own walk
/// order is its hash order, and two listings should compare line by line.
async fn sorted_listing<E: 'static, T: Send + 'static>(
    state: &Shared,
    read: fn(&dyn cilia_datapath::Datapath) -> Result<Vec<E>, cilia_datapath::DatapathError>,
    view: fn(E) -> T,
    order: fn(&T, &T) -> std::cmp::Ordering,
) -> Listing<T> {
    with_maps(state, move |dp| {
        let mut out: Vec<T> = read(dp)?.into_iter().map(view).collect();
        out.sort_by(order);
        Ok(out)
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/bpf/endpoints", responses((status = 200, body = Vec<BpfEndpoint>)))]
pub(super) async fn bpf_endpoints(State(state): State<Shared>) -> Listing<BpfEndpoint> {
    sorted_listing(
        &state,
        |dp| dp.endpoints(),
        |e| BpfEndpoint {
            address: e.ip.to_string(),
            endpoint_id: e.endpoint_id,
            ifindex: e.ifindex,
            identity: e.identity,
            mac: format_mac(&e.mac),
            node_mac: format_mac(&e.node_mac),
        },
        |a, b| (a.endpoint_id, &a.address).cmp(&(b.endpoint_id, &b.address)),
    )
    .await
}

#[utoipa::path(get, path = "/v1/bpf/ipcache", responses((status = 200, body = Vec<BpfIpcacheEntry>)))]
pub(super) async fn bpf_ipcache(State(state): State<Shared>) -> Listing<BpfIpcacheEntry> {
    sorted_listing(
        &state,
        |dp| dp.ipcache(),
        |e| BpfIpcacheEntry {
            prefix: e.prefix.to_string(),
            identity: e.identity,
            tunnel: e.tunnel.map(|t| t.to_string()),
        },
        |a, b| a.prefix.cmp(&b.prefix),
    )
    .await
}

#[utoipa::path(get, path = "/v1/bpf/metrics", responses((status = 200, body = Vec<BpfMetric>)))]
pub(super) async fn bpf_metrics(State(state): State<Shared>) -> Listing<BpfMetric> {
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
pub(super) async fn reload_datapath(
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
pub(super) async fn bpf_ct(State(state): State<Shared>) -> Listing<BpfCtEntry> {
    // A walk of the whole table, under the conntrack map's own lock only.
    with_maps(&state, |dp| {
        let now = cilia_datapath::datapath_clock_ns();
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
                closing: e.closing,
                policy_revision: e.policy_revision,
                proxy: if e.to_proxy {
                    Some("to-proxy".into())
                } else if e.from_proxy {
                    Some("from-proxy".into())
                } else {
                    None
                },
            })
            .collect())
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/bpf/policy/{id}", params(("id" = u16, Path)),
    responses((status = 200, body = BpfPolicy), (status = 404, body = ApiError)))]
pub(super) async fn bpf_policy(
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
                    rule: rules.name(e.rule).unwrap_or_default(),
                    proxy_port: (e.proxy_port != 0).then_some(e.proxy_port),
                })
                .collect(),
        })
    })
    .await
    .map(Json)
}
