//! `cilia node list`: the cluster's nodes as this agent knows them, with
//! this agent's latest health probes of each and its heartbeat's age.

use cilia_api::{ApiClient, Node, NodeHealth, ProbeResult};
use clap::Subcommand;

use crate::output::{print_rows, Output};

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// The nodes of the cluster: addresses, pod ranges, health, heartbeat.
    ///
    /// Example: cilia node list -o json
    List,
}

pub async fn run(cmd: NodeCmd, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::List => {
            let nodes = client.nodes().await?;
            print_rows(
                output,
                &nodes,
                &[
                    "NAME",
                    "ADDRESSES",
                    "IPV6 RANGE",
                    "IPV4 RANGE",
                    "HEALTH",
                    "HEARTBEAT",
                ],
                row,
            )
        }
    }
}

fn row(n: &Node) -> Vec<String> {
    let name = if n.local {
        format!("{} (local)", n.name)
    } else {
        n.name.clone()
    };
    let addresses = if n.addresses.is_empty() {
        "-".to_string()
    } else {
        n.addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    vec![
        name,
        addresses,
        n.ipv6_range.clone(),
        n.ipv4_range.clone().unwrap_or_else(|| "-".into()),
        health_text(n),
        heartbeat_text(n.heartbeat_age_ms),
    ]
}

/// `icmp ok 0.12ms, tcp ok 0.30ms`; `unreachable` when no probe answered;
/// `-` for the local node and nodes not probed (yet).
fn health_text(n: &Node) -> String {
    match &n.health {
        _ if n.local => "-".into(),
        None => "-".into(),
        Some(h) if h.icmp.is_empty() && h.tcp.is_empty() => "-".into(),
        Some(h) if !h.any_reachable() => "unreachable".into(),
        Some(NodeHealth { icmp, tcp }) => [("icmp", icmp), ("tcp", tcp)]
            .into_iter()
            .filter(|(_, probes)| !probes.is_empty())
            .map(|(kind, probes)| format!("{kind} {}", probes_text(probes)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// `ok 0.12ms` (the slowest address's latency) when every address
/// answered, `1/2 ok` when some did, `unreachable` when none did.
fn probes_text(probes: &[ProbeResult]) -> String {
    let ok = probes.iter().filter(|p| p.reachable).count();
    if ok == probes.len() {
        let slowest = probes
            .iter()
            .filter_map(|p| p.latency_ms)
            .fold(0.0_f64, f64::max);
        format!("ok {slowest:.2}ms")
    } else if ok == 0 {
        "unreachable".into()
    } else {
        format!("{ok}/{} ok", probes.len())
    }
}

/// `850ms ago`, `12s ago`, `3m 5s ago`; `-` without a heartbeat.
fn heartbeat_text(age_ms: Option<u64>) -> String {
    match age_ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms ago"),
        Some(ms) => format!(
            "{} ago",
            humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(addr: &str, latency_ms: Option<f64>) -> ProbeResult {
        ProbeResult {
            address: addr.parse().unwrap(),
            reachable: latency_ms.is_some(),
            latency_ms,
            last_probe: Some("2026-12-02T12:00:00.000Z".into()),
            error: latency_ms
                .is_none()
                .then(|| "no echo reply within 1s".into()),
        }
    }

    fn node(health: Option<NodeHealth>) -> Node {
        Node {
            name: "node2".into(),
            addresses: vec![
                "198.51.100.2".parse().unwrap(),
                "2001:db8:100::2".parse().unwrap(),
            ],
            ipv6_range: "fd00:c1a:2::/112".into(),
            ipv4_range: Some("10.200.2.0/24".into()),
            tunnel: "vxlan".into(),
            heartbeat_age_ms: Some(3_200),
            health,
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_node_shows_each_probe_kind_with_its_slowest_latency() {
        let n = node(Some(NodeHealth {
            icmp: vec![
                probe("10.200.2.5", Some(0.12)),
                probe("fd00:c1a:2::5", Some(0.08)),
            ],
            tcp: vec![
                probe("10.200.2.5", Some(0.3)),
                probe("fd00:c1a:2::5", Some(0.25)),
            ],
        }));
        assert_eq!(
            row(&n),
            [
                "node2",
                "198.51.100.2,2001:db8:100::2",
                "fd00:c1a:2::/112",
                "10.200.2.0/24",
                "icmp ok 0.12ms, tcp ok 0.30ms",
                "3s ago"
            ]
        );
    }

    #[test]
    fn a_node_no_probe_reaches_is_unreachable_and_a_partial_one_says_how_much() {
        let down = node(Some(NodeHealth {
            icmp: vec![probe("10.200.2.5", None)],
            tcp: vec![probe("10.200.2.5", None)],
        }));
        assert_eq!(health_text(&down), "unreachable");
        let partial = node(Some(NodeHealth {
            icmp: vec![probe("10.200.2.5", Some(0.1)), probe("fd00:c1a:2::5", None)],
            tcp: vec![probe("10.200.2.5", None)],
        }));
        assert_eq!(health_text(&partial), "icmp 1/2 ok, tcp unreachable");
    }

    #[test]
    fn the_local_node_and_unprobed_nodes_show_no_health() {
        let local = Node {
            local: true,
            heartbeat_age_ms: None,
            ..node(None)
        };
        let r = row(&local);
        assert_eq!(r[0], "node2 (local)");
        assert_eq!((r[4].as_str(), r[5].as_str()), ("-", "-"));
        assert_eq!(health_text(&node(None)), "-");
    }

    #[test]
    fn heartbeat_ages_read_in_the_unit_that_fits() {
        assert_eq!(
            [Some(850), Some(12_400), Some(185_000), None].map(heartbeat_text),
            ["850ms ago", "12s ago", "3m 5s ago", "-"]
        );
    }
}
