//! `cilia status`: the agent's health, features, endpoints, IPAM and policy.

use cilia_api::{ApiClient, Status};
use clap::Args;

use crate::output::{print_one, Output};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Also each subsystem's health and the BPF maps' fill levels.
    #[arg(short, long)]
    verbose: bool,
}

pub async fn run(args: StatusArgs, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    let s = client.status().await?;
    print_one(output, &s, |s| {
        print_status(s);
        if args.verbose {
            print_status_verbose(s);
        }
    })
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
