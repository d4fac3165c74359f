//! The cluster views of a single agent (no cluster configured): the node
//! list is the agent's own node, and `--cluster` answers for it alone, as
//! the single node's commands do.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use cilia_testnet::{privileged, AgentOptions, Netns, TestAgent};

#[test]
fn a_single_agent_is_a_cluster_of_its_own_node() {
    privileged!("a_single_agent_is_a_cluster_of_its_own_node");
    let agent = TestAgent::start(AgentOptions::default());
    let nodes = agent.cli_json(&["node", "list"]);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let me = &nodes[0];
    assert_eq!(me["local"], true);
    assert_eq!(me["ipv6_range"], "fd00:c1a::/112");
    assert_eq!(me["ipv4_range"], "10.200.0.0/24");
    let name = me["name"].as_str().unwrap().to_string();

    let table = agent.cli_ok(&["node", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains(&format!("{name} (local)")), "{table}");

    let ns = Netns::new("cep").unwrap();
    let ep = agent.create_endpoint(&ns, "app=web");
    assert_eq!(ep["node"], name.as_str());

    let status = agent.cli_json(&["status", "--cluster"]);
    let entries = status["nodes"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["name"], name.as_str());
    assert_eq!(entries[0]["reachable"], true);
    assert_eq!(entries[0]["status"]["endpoints"], 1);
    let table = agent.cli_ok(&["status", "--cluster"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..3], [name.as_str(), "yes", "ok"], "{table}");

    let out = agent.cli(&["observe", "--cluster", "--last", "5"]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = agent.cli(&["observe", "--cluster", "--follow"]);
    assert!(!refused.status.success());
}
