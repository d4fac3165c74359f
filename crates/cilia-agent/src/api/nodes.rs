//! The cluster as this agent sees it (`/v1/nodes`) and the cluster-wide
//! reads the relay answers (`/v1/cluster/flows`, `/v1/cluster/status`).
//! Without a cluster, the node list is this node alone and the cluster
//! routes answer for it alone.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::Json;
use cilia_api::{ClusterFlows, ClusterStatus, Flow, FlowsQuery, Node, NodeStatusEntry};
use serde::Deserialize;

use super::{bad_request, flows, status, AgentState, AppError, Shared};
use crate::relay::{self, PeerNode};

/// This node as it knows itself when no cluster describes it.
fn local_node(state: &AgentState) -> Node {
    Node {
        name: state.node_name(),
        ipv6_range: state.pools.v6.range().to_string(),
        ipv4_range: state.pools.v4.as_ref().map(|p| p.range().to_string()),
        tunnel: "disabled".into(),
        local: true,
        ..Default::default()
    }
}

/// Milliseconds from an RFC 3339 time to `now` (0 for a time ahead).
fn age_ms(time: &str, now: SystemTime) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(time).ok()?;
    Some(now.duration_since(t).map_or(0, |d| d.as_millis() as u64))
}

/// The node list: the cluster's (this node included even if the cluster
/// has not listed it yet), each with its heartbeat's age and this agent's
/// latest probes of it.
pub(super) fn node_list(state: &AgentState, now: SystemTime) -> Vec<Node> {
    let mut nodes = match &state.cluster {
        Some(c) => c.nodes.borrow().clone(),
        None => Vec::new(),
    };
    if !nodes.iter().any(|n| n.local) {
        nodes.insert(0, local_node(state));
    }
    let health = state
        .cluster
        .as_ref()
        .and_then(|c| c.health.as_ref())
        .map(|h| h.borrow().clone());
    for n in &mut nodes {
        if n.heartbeat_age_ms.is_none() {
            n.heartbeat_age_ms = n.last_heartbeat.as_deref().and_then(|t| age_ms(t, now));
        }
        if let Some(h) = health.as_ref().and_then(|h| h.get(&n.name)) {
            n.health = Some(h.clone());
        }
    }
    nodes
}

fn peers(state: &AgentState) -> Vec<PeerNode> {
    node_list(state, UNIX_EPOCH)
        .iter()
        .map(PeerNode::from)
        .collect()
}

#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = Vec<Node>)))]
pub(super) async fn list_nodes(State(state): State<Shared>) -> Json<Vec<Node>> {
    Json(node_list(&state, SystemTime::now()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct ClusterFlowsQuery {
    /// Only the last N matching flows of each node, then of all.
    last: Option<usize>,
    /// Not served for the cluster (a 400): follow one node's `/v1/flows`.
    #[serde(default)]
    follow: bool,
}

#[utoipa::path(get, path = "/v1/cluster/flows", params(cilia_api::flows::FlowFilter, ClusterFlowsQuery),
    responses((status = 200, body = ClusterFlows, description = "Every answering node's flows, by time, each with its node; the nodes that did not answer"),
        (status = 400, description = "A filter is invalid, or follow was asked", body = cilia_api::ApiError)))]
pub(super) async fn cluster_flows(
    State(state): State<Shared>,
    Query(filter): Query<cilia_api::flows::FlowFilter>,
    Query(q): Query<ClusterFlowsQuery>,
) -> Result<Json<ClusterFlows>, AppError> {
    if q.follow {
        return Err(bad_request(
            "invalid-request",
            "follow is not served for the whole cluster; follow one node's flows",
        ));
    }
    let matcher = flows::compile(filter.clone())?;
    let local: Vec<Flow> = flows::recent_matching(&state, &matcher, q.last)
        .iter()
        .map(|f| (**f).clone())
        .collect();
    let query = FlowsQuery {
        filter,
        last: q.last,
        follow: false,
    };
    let nodes = peers(&state);
    Ok(Json(
        relay::cluster_flows(&nodes, &query, local, relay::PEER_TIMEOUT).await,
    ))
}

#[utoipa::path(get, path = "/v1/cluster/status",
    responses((status = 200, body = ClusterStatus, description = "Every node's status, or why it did not answer")))]
pub(super) async fn cluster_status(State(state): State<Shared>) -> Json<ClusterStatus> {
    let nodes = peers(&state);
    let local = status::status(State(state.clone()))
        .await
        .map(|Json(s)| s)
        .map_err(|e| e.1.message);
    let answers = relay::cluster_statuses(&nodes, local, relay::PEER_TIMEOUT).await;
    Json(ClusterStatus {
        nodes: answers
            .into_iter()
            .map(|(name, answer)| match answer {
                Ok(s) => NodeStatusEntry {
                    name,
                    reachable: true,
                    status: Some(s),
                    error: None,
                },
                Err(e) => NodeStatusEntry {
                    name,
                    reachable: false,
                    status: None,
                    error: Some(e),
                },
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use std::time::Duration;

    use super::*;

    #[test]
    fn heartbeat_age_is_measured_from_its_rfc3339_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let beat = humantime::format_rfc3339_millis(now - Duration::from_millis(1500)).to_string();
        assert_eq!(age_ms(&beat, now), Some(1500));
        assert_eq!(age_ms("yesterday", now), None);
    }
}
