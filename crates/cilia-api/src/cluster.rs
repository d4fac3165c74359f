//! The cluster as one agent sees it: the nodes it knows (`GET /v1/nodes`),
//! their health as its prober measured it, and the cluster-wide answers of
//! the relay (`/v1/cluster/flows`, `/v1/cluster/status`) that name the
//! nodes which did not answer instead of failing as a whole.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;
use utoipa::ToSchema;

use crate::model::{Flow, Status};

/// A node of the cluster: its addressing, how to reach its agent, and how
/// this agent last heard of it.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub name: String,
    /// Underlay addresses (what tunnels and native routes go to).
    #[schema(value_type = Vec<String>)]
    pub addresses: Vec<IpAddr>,
    /// The node's IPv6 pod range, e.g. `fd00:c1a:1::/112`.
    pub ipv6_range: String,
    pub ipv4_range: Option<String>,
    /// Addresses of the node's health endpoint (probed by the other nodes).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub health_addresses: Vec<IpAddr>,
    /// `host:port` of the node's read-only peer API, if it serves one.
    pub peer_api: Option<String>,
    /// `vxlan`, `native` or `disabled`.
    #[serde(default)]
    pub tunnel: String,
    /// This agent's own node.
    #[serde(default)]
    pub local: bool,
    /// The node's last heartbeat, RFC 3339 UTC.
    pub last_heartbeat: Option<String>,
    /// Age of that heartbeat when the list was made, ms.
    pub heartbeat_age_ms: Option<u64>,
    /// This agent's probes of the node's health addresses (absent for the
    /// local node and when nothing probes).
    pub health: Option<NodeHealth>,
}

/// The latest probes of one node's health addresses, per kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeHealth {
    /// ICMP (v4) or ICMPv6 echo, one per address.
    #[serde(default)]
    pub icmp: Vec<ProbeResult>,
    /// TCP connect to the health port, one per address.
    #[serde(default)]
    pub tcp: Vec<ProbeResult>,
}

impl NodeHealth {
    /// Whether any probe of any kind got an answer.
    pub fn any_reachable(&self) -> bool {
        self.icmp.iter().chain(&self.tcp).any(|p| p.reachable)
    }
}

/// The latest probe of one address.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProbeResult {
    #[schema(value_type = String)]
    pub address: IpAddr,
    pub reachable: bool,
    /// Round trip (echo) or connect time, ms; absent when unreachable.
    pub latency_ms: Option<f64>,
    /// When the probe was made, RFC 3339 UTC (absent: not probed yet).
    pub last_probe: Option<String>,
    /// Why it failed (timeout, refused, …).
    pub error: Option<String>,
}

/// A node that did not answer a cluster-wide request, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UnreachableNode {
    pub node: String,
    pub error: String,
}

/// `GET /v1/cluster/flows`: every answering node's recent flows matching
/// the filter, oldest first by wall-clock time, each with its `node`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterFlows {
    pub flows: Vec<Flow>,
    /// Nodes whose flows are missing from `flows`.
    #[serde(default)]
    pub unreachable: Vec<UnreachableNode>,
}

/// One node's entry in `GET /v1/cluster/status`.
#[skip_serializing_none]
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeStatusEntry {
    pub name: String,
    pub reachable: bool,
    /// Its `GET /v1/status`, when it answered.
    pub status: Option<Status>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// `GET /v1/cluster/status`: every node's status, or why it is missing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    pub nodes: Vec<NodeStatusEntry>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;

    #[test]
    fn a_node_without_health_or_heartbeat_leaves_them_out() {
        let node = Node {
            name: "node1".into(),
            addresses: vec!["198.51.100.1".parse().unwrap()],
            ipv6_range: "fd00:c1a:1::/112".into(),
            tunnel: "vxlan".into(),
            local: true,
            ..Default::default()
        };
        let json = serde_json::to_value(&node).unwrap();
        for absent in ["ipv4_range", "peer_api", "last_heartbeat", "health"] {
            assert!(json.get(absent).is_none(), "{absent} in {json}");
        }
        assert_eq!(json["addresses"], serde_json::json!(["198.51.100.1"]));
        assert_eq!(serde_json::from_value::<Node>(json).unwrap(), node);
    }

    #[test]
    fn cluster_flows_of_a_fully_answering_cluster_read_without_unreachable() {
        let back: ClusterFlows = serde_json::from_str(r#"{"flows": []}"#).unwrap();
        assert!(back.unreachable.is_empty());
    }
}
