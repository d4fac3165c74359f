//! `cilia status`: the agent's health, features, endpoints, IPAM and policy.

use cilia_api::{ApiClient, NodeStatusEntry, Status};
use clap::Args;

use crate::output::{print_one, print_table, Output};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Also each subsystem's health and the BPF maps' fill levels.
    #[arg(short, long)]
    verbose: bool,
    /// Every node's status, one line each (asked through this agent;
    /// nodes that did not answer are named with the reason).
    #[arg(long, conflicts_with = "verbose")]
    cluster: bool,
}

pub async fn run(args: StatusArgs, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    if args.cluster {
        let c = client.cluster_status().await?;
        return print_one(output, &c, |c| {
            print_table(
                &["NODE", "REACHABLE", "HEALTH", "ENDPOINTS", "DETAIL"],
                c.nodes.iter().map(cluster_row).collect(),
            )
        });
    }
    let s = client.status().await?;
    print_one(output, &s, |s| {
        print_status(s);
        if args.verbose {
            print_status_verbose(s);
        }
    })
}

/// One node of `status --cluster`: its overall health, endpoint count and
/// degraded subsystems; for an unreachable node, why.
fn cluster_row(n: &NodeStatusEntry) -> Vec<String> {
    match (&n.status, &n.error) {
        (Some(s), _) => {
            let degraded: Vec<&str> = s
                .subsystems
                .iter()
                .filter(|sub| sub.status == "degraded")
                .map(|sub| sub.name.as_str())
                .collect();
            let detail = if degraded.is_empty() {
                String::new()
            } else {
                format!("degraded: {}", degraded.join(", "))
            };
            vec![
                n.name.clone(),
                "yes".into(),
                s.health.clone(),
                format!("{} ({} not ready)", s.endpoints, s.endpoints_not_ready),
                detail,
            ]
        }
        (None, error) => vec![
            n.name.clone(),
            "no".into(),
            "-".into(),
            "-".into(),
            error.clone().unwrap_or_else(|| "no answer".into()),
        ],
    }
}

fn print_status(s: &Status) {
    outln!("Agent:        {} (version {})", s.health, s.version);
    outln!("Kernel:       {}", s.kernel);
    let features: Vec<String> = s
        .features
        .iter()
        .map(|f| format!("{}{}", f.name, if f.present { "" } else { " (MISSING)" }))
        .collect();
    outln!("Features:     {}", features.join(", "));
    outln!(
        "Endpoints:    {} ({} not ready)",
        s.endpoints,
        s.endpoints_not_ready
    );
    outln!(
        "IPAM IPv6:    {}/{} used in {} (router {})",
        s.ipam.ipv6.used,
        s.ipam.ipv6.capacity,
        s.ipam.ipv6.range,
        s.ipam.ipv6.router
    );
    match &s.ipam.ipv4 {
        Some(p) => outln!(
            "IPAM IPv4:    {}/{} used in {} (router {})",
            p.used,
            p.capacity,
            p.range,
            p.router
        ),
        None => outln!("IPAM IPv4:    disabled"),
    }
    outln!(
        "Policies:     {} (revision {})",
        s.policies,
        s.policy_revision
    );
    for e in &s.policy_errors {
        outln!("Policy error: {e}");
    }
    if let Some(lb) = s.subsystems.iter().find(|sub| sub.name == "socket-lb") {
        outln!("Socket LB:    {}", lb.detail);
    }
    if let Some(p) = s.subsystems.iter().find(|sub| sub.name == "prefilter") {
        outln!("Prefilter:    {}", p.detail);
    }
    if let Some(a) = s
        .subsystems
        .iter()
        .find(|sub| sub.name == "lb-acceleration")
    {
        outln!("LB accel:     {}", a.detail);
    }
    outln!("State dir:    {}", s.state_dir);
    outln!("BPF root:     {}", s.bpf_root);
}

fn print_status_verbose(s: &Status) {
    outln!("Subsystems:");
    for sub in &s.subsystems {
        outln!("  {:<10} {:<9} {}", sub.name, sub.status, sub.detail);
        for e in &sub.errors {
            outln!("             - {e}");
        }
    }
    outln!("BPF maps:");
    for m in &s.maps {
        let pct = if m.capacity == 0 {
            0.0
        } else {
            m.entries as f64 * 100.0 / m.capacity as f64
        };
        outln!(
            "  {:<28} {:>8} / {:<8} ({pct:.1}%)",
            m.map,
            m.entries,
            m.capacity
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(health: &str, degraded: &[&str]) -> Status {
        let subsystems: Vec<_> = degraded
            .iter()
            .map(|name| serde_json::json!({"name": name, "status": "degraded", "detail": ""}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "health": health, "kernel": "6.8", "features": [],
            "endpoints": 3, "endpoints_not_ready": 1,
            "ipam": {"ipv6": {"range": "fd00:c1a:1::/112", "router": "fd00:c1a:1::1",
                              "used": 3, "capacity": 65533}, "ipv4": null},
            "state_dir": "/var/lib/cilia", "bpf_root": "/sys/fs/bpf/cilia",
            "policy_revision": 4, "policies": 2, "subsystems": subsystems
        }))
        .unwrap()
    }

    #[test]
    fn a_cluster_status_line_shows_health_endpoints_and_degraded_subsystems() {
        let n = NodeStatusEntry {
            name: "node1".into(),
            reachable: true,
            status: Some(status("degraded", &["endpoints"])),
            error: None,
        };
        assert_eq!(
            cluster_row(&n),
            [
                "node1",
                "yes",
                "degraded",
                "3 (1 not ready)",
                "degraded: endpoints"
            ]
        );
    }

    #[test]
    fn an_unreachable_node_is_named_with_the_reason() {
        let n = NodeStatusEntry {
            name: "node2".into(),
            reachable: false,
            status: None,
            error: Some("no answer within 2s".into()),
        };
        assert_eq!(
            cluster_row(&n),
            ["node2", "no", "-", "-", "no answer within 2s"]
        );
    }
}
