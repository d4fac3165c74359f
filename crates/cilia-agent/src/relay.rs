//! Cluster-wide visibility: every agent serves a read-only peer API over
//! TCP ([`serve_peer_api`]: flows, status, healthz), and the agent a user
//! asks fans a question out to every node's peer API at once, merging the
//! answers (`cilia observe --cluster`, `cilia status --cluster`).
//!
//! Invariants: one slow or dead node costs the answer at most
//! [`PEER_TIMEOUT`] and is named in it (`unreachable`), never an error of
//! the whole request; the local node is read directly, never over TCP; the
//! peer API has no route that changes state.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cilia_api::{ApiClient, ClusterFlows, Flow, FlowsQuery, Node, Status, UnreachableNode};
use tokio::sync::watch;

use crate::api::AgentState;

/// How long a node's peer API may take to answer one relayed request.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster as the control plane publishes it, for `/v1/nodes` and the
/// relay. The integrator fills it; readers only borrow the watches.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// This node's name (`--node-name`).
    pub node_name: String,
    /// Every known node, this one included (`local: true`), as last seen.
    pub nodes: watch::Receiver<Vec<Node>>,
    /// The health prober's latest results (`None`: nothing probes).
    pub health: Option<watch::Receiver<Arc<crate::health::HealthReport>>>,
}

/// The lowercased host name (of the agent's UTS namespace): the node's
/// name when no cluster names it; `localhost` if it cannot be read.
pub fn host_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// One node as the relay asks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    pub name: String,
    /// `host:port` of its peer API.
    pub peer_api: Option<String>,
    /// This agent's own node: read directly.
    pub local: bool,
}

impl From<&Node> for PeerNode {
    fn from(n: &Node) -> Self {
        Self {
            name: n.name.clone(),
            peer_api: n.peer_api.clone(),
            local: n.local,
        }
    }
}

type Answer<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send>>;

/// Asks every remote node of `nodes` at once through `ask` (given its peer
/// API address), each bounded by `timeout`; answers in `nodes`' order, the
/// local node's (not asked) as `Err` of nothing: callers fill it in.
async fn ask_remotes<T: Send + 'static>(
    nodes: &[PeerNode],
    timeout: Duration,
    ask: impl Fn(String) -> Answer<T>,
) -> Vec<Option<Result<T, String>>> {
    let asks = nodes.iter().map(|n| {
        let fut: Option<Answer<T>> = match (&n.local, &n.peer_api) {
            (true, _) => None,
            (false, None) => Some(Box::pin(async {
                Err("the node publishes no peer API address".to_string())
            })),
            (false, Some(addr)) => Some(ask(addr.clone())),
        };
        async move {
            let fut = fut?;
            Some(match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                )),
            })
        }
    });
    futures_util::future::join_all(asks).await
}

/// Flows of `addr`'s peer API for `query` (never followed).
pub async fn peer_flows(addr: String, query: FlowsQuery) -> Result<Vec<Flow>, String> {
    let query = FlowsQuery {
        follow: false,
        ..query
    };
    let mut flows = Vec::new();
    let mut bad = None;
    ApiClient::peer(addr)
        .flows(&query, |line| match line.item() {
            Ok(cilia_api::StreamItem::Flow(f)) => {
                flows.push(*f);
                true
            }
            Ok(cilia_api::StreamItem::Lost { .. }) => true,
            Err(e) => {
                bad = Some(format!("undecodable flow line: {e}"));
                false
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    match bad {
        Some(e) => Err(e),
        None => Ok(flows),
    }
}

/// `addr`'s `GET /v1/status`.
pub async fn peer_status(addr: String) -> Result<Status, String> {
    ApiClient::peer(addr)
        .status()
        .await
        .map_err(|e| e.to_string())
}

/// The cluster's flows for `query`: `local` (this node's own, already
/// filtered) and every other node's through its peer API.
pub async fn cluster_flows(
    nodes: &[PeerNode],
    query: &FlowsQuery,
    local: Vec<Flow>,
    timeout: Duration,
) -> ClusterFlows {
    let answers = ask_remotes(nodes, timeout, |addr| {
        Box::pin(peer_flows(addr, query.clone()))
    })
    .await;
    let mut local = Some(local);
    let per_node = nodes
        .iter()
        .zip(answers)
        .map(|(n, a)| {
            let answer = a.unwrap_or_else(|| Ok(local.take().unwrap_or_default()));
            (n.name.clone(), answer)
        })
        .collect();
    merge_flows(per_node, query.last)
}

/// Every node's status: `local` for this node, the others' from their peer
/// API; `Err` with the reason for a node that did not answer.
pub async fn cluster_statuses(
    nodes: &[PeerNode],
    local: Result<Status, String>,
    timeout: Duration,
) -> Vec<(String, Result<Status, String>)> {
    let answers = ask_remotes(nodes, timeout, |addr| Box::pin(peer_status(addr))).await;
    let mut local = Some(local);
    nodes
        .iter()
        .zip(answers)
        .map(|(n, a)| {
            let answer = a.unwrap_or_else(|| {
                local
                    .take()
                    .unwrap_or_else(|| Err("a second local node in the list".into()))
            });
            (n.name.clone(), answer)
        })
        .collect()
}

/// One stream of the nodes' flows: each tagged with its node, ordered by
/// wall-clock time (`time_ns`; equal times keep the nodes' order), the
/// last `last` of them when given; the nodes that did not answer, with
/// their reason.
pub fn merge_flows(
    per_node: Vec<(String, Result<Vec<Flow>, String>)>,
    last: Option<usize>,
) -> ClusterFlows {
    let mut out = ClusterFlows::default();
    for (node, answer) in per_node {
        match answer {
            Ok(flows) => out.flows.extend(flows.into_iter().map(|f| Flow {
                node: Some(node.clone()),
                ..f
            })),
            Err(error) => out.unreachable.push(UnreachableNode { node, error }),
        }
    }
    // Stable: a node's own flows keep their order among equal times.
    out.flows.sort_by_key(|f| f.time_ns);
    if let Some(n) = last {
        let skip = out.flows.len().saturating_sub(n);
        out.flows.drain(..skip);
    }
    out
}

/// Serves the read-only peer API (`GET /v1/flows`, `/v1/status`,
/// `/v1/healthz`) on `listener` until the task is dropped or fails.
pub async fn serve_peer_api(
    listener: tokio::net::TcpListener,
    state: Arc<AgentState>,
) -> std::io::Result<()> {
    axum::serve(listener, crate::api::peer_router(state)).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;

    fn flow(time_ns: u64, verdict: &str) -> Flow {
        Flow {
            time_ns,
            verdict: verdict.into(),
            event: "drop".into(),
            ..Default::default()
        }
    }

    #[test]
    fn merged_flows_are_ordered_by_time_and_tagged_with_their_node() {
        let merged = merge_flows(
            vec![
                ("node1".into(), Ok(vec![flow(10, "a"), flow(30, "c")])),
                ("node2".into(), Ok(vec![flow(20, "b"), flow(30, "d")])),
            ],
            None,
        );
        let seen: Vec<(u64, &str, &str)> = merged
            .flows
            .iter()
            .map(|f| (f.time_ns, f.verdict.as_str(), f.node.as_deref().unwrap()))
            .collect();
        assert_eq!(
            seen,
            [
                (10, "a", "node1"),
                (20, "b", "node2"),
                (30, "c", "node1"),
                (30, "d", "node2")
            ]
        );
        assert!(merged.unreachable.is_empty());
    }

    #[test]
    fn last_keeps_the_newest_flows_of_the_whole_cluster() {
        let merged = merge_flows(
            vec![
                ("node1".into(), Ok(vec![flow(1, "a"), flow(4, "d")])),
                ("node2".into(), Ok(vec![flow(2, "b"), flow(3, "c")])),
            ],
            Some(2),
        );
        let times: Vec<u64> = merged.flows.iter().map(|f| f.time_ns).collect();
        assert_eq!(times, [3, 4]);
    }

    #[test]
    fn a_node_that_did_not_answer_is_named_with_its_reason() {
        let merged = merge_flows(
            vec![
                ("node1".into(), Ok(vec![flow(1, "a")])),
                ("node2".into(), Err("connection refused".into())),
            ],
            None,
        );
        assert_eq!(merged.flows.len(), 1);
        assert_eq!(
            merged.unreachable,
            [UnreachableNode {
                node: "node2".into(),
                error: "connection refused".into()
            }]
        );
    }

    /// A port on loopback that nothing listens on: bound, then closed.
    fn closed_port() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        addr
    }

    #[tokio::test]
    async fn a_closed_peer_port_makes_the_node_unreachable_not_the_request() {
        let nodes = [
            PeerNode {
                name: "node1".into(),
                peer_api: None,
                local: true,
            },
            PeerNode {
                name: "node2".into(),
                peer_api: Some(closed_port()),
                local: false,
            },
            PeerNode {
                name: "node3".into(),
                peer_api: None,
                local: false,
            },
        ];
        let out = cluster_flows(
            &nodes,
            &FlowsQuery::default(),
            vec![flow(5, "local")],
            PEER_TIMEOUT,
        )
        .await;
        assert_eq!(out.flows.len(), 1);
        assert_eq!(out.flows[0].node.as_deref(), Some("node1"));
        let names: Vec<&str> = out.unreachable.iter().map(|u| u.node.as_str()).collect();
        assert_eq!(names, ["node2", "node3"]);
        assert!(
            out.unreachable[0].error.contains("peer API"),
            "{}",
            out.unreachable[0].error
        );
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_costs_at_most_the_timeout() {
        // Accepts (the kernel does, from the backlog) but never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nodes = [PeerNode {
            name: "slow".into(),
            peer_api: Some(silent.local_addr().unwrap().to_string()),
            local: false,
        }];
        let started = std::time::Instant::now();
        let out = cluster_statuses(&nodes, Err("unused".into()), Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        let err = out[0].1.as_ref().unwrap_err();
        assert!(err.contains("no answer within 300ms"), "{err}");
    }
}
