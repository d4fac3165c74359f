//! `cilia bpf`: the datapath's maps, read back from the kernel by the agent.

use cilia_api::{ApiClient, BpfPolicy};
use clap::Subcommand;

use crate::output::{cells, print_one, print_rows, print_table, Output};

#[derive(Debug, Subcommand)]
pub enum BpfCmd {
    /// Datapath endpoint map: endpoints
    #[command(subcommand)]
    Endpoint(BpfEndpointCmd),
    /// Datapath packet counters.
    #[command(subcommand)]
    Metrics(BpfMetricsCmd),
    /// The ipcache: prefix -> identity.
    #[command(subcommand)]
    Ipcache(BpfListCmd),
    /// Connection tracking entries.
    #[command(subcommand)]
    Ct(BpfListCmd),
    /// An endpoint's policy map.
    #[command(subcommand)]
    Policy(BpfPolicyCmd),
    /// The load balancer: services (slots, Maglev shares) and backends.
    #[command(subcommand)]
    Lb(BpfLbCmd),
}

#[derive(Debug, Subcommand)]
pub enum BpfLbCmd {
    /// Read the services and backends maps back from the kernel.
    ///
    /// Example: cilia bpf lb list
    List,
}

#[derive(Debug, Subcommand)]
pub enum BpfListCmd {
    /// Read the map back from the kernel.
    ///
    /// Example: cilia bpf ct list
    List,
}

#[derive(Debug, Subcommand)]
pub enum BpfPolicyCmd {
    /// Read an endpoint's policy map back from the kernel.
    ///
    /// Example: cilia bpf policy get 1
    Get { endpoint: u16 },
}

#[derive(Debug, Subcommand)]
pub enum BpfEndpointCmd {
    /// The kernel's endpoints map, read back.
    ///
    /// Example: cilia bpf endpoint list
    List,
}

#[derive(Debug, Subcommand)]
pub enum BpfMetricsCmd {
    /// Forwarded and dropped packets by reason, summed over CPUs.
    ///
    /// Example: cilia bpf metrics list
    List,
}

pub async fn run(cmd: BpfCmd, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        BpfCmd::Endpoint(BpfEndpointCmd::List) => print_rows(
            output,
            &client.bpf_endpoints().await?,
            &[
                "ADDRESS", "ENDPOINT", "IFINDEX", "IDENTITY", "MAC", "NODE MAC",
            ],
            |e| {
                cells(&[
                    &e.address,
                    &e.endpoint_id,
                    &e.ifindex,
                    &e.identity,
                    &e.mac,
                    &e.node_mac,
                ])
            },
        ),
        BpfCmd::Metrics(BpfMetricsCmd::List) => print_rows(
            output,
            &client.bpf_metrics().await?,
            &["KIND", "REASON", "DIRECTION", "PACKETS", "BYTES"],
            |m| cells(&[&m.kind, &m.reason, &m.direction, &m.packets, &m.bytes]),
        ),
        BpfCmd::Ipcache(BpfListCmd::List) => print_rows(
            output,
            &client.bpf_ipcache().await?,
            &["PREFIX", "IDENTITY", "NODE"],
            |e| cells(&[&e.prefix, &e.identity, &e.tunnel.as_deref().unwrap_or("-")]),
        ),
        BpfCmd::Ct(BpfListCmd::List) => print_rows(
            output,
            &client.bpf_ct().await?,
            &[
                "PROTO",
                "SOURCE",
                "DESTINATION",
                "IDENTITIES",
                "PACKETS",
                "BYTES",
                "EXPIRES",
                "STATE",
                "REV",
                "PROXY",
            ],
            |e| {
                let state = ct_state(e);
                cells(&[
                    &e.proto,
                    &e.source,
                    &e.destination,
                    &format!("{} -> {}", e.src_identity, e.dst_identity),
                    &e.packets,
                    &e.bytes,
                    &format!("{}s", e.expires_in),
                    &state,
                    &e.policy_revision,
                    &e.proxy.as_deref().unwrap_or("-"),
                ])
            },
        ),
        BpfCmd::Lb(BpfLbCmd::List) => crate::service::print_bpf_lb(output, &client.bpf_lb().await?),
        BpfCmd::Policy(BpfPolicyCmd::Get { endpoint }) => {
            print_one(output, &client.bpf_policy(endpoint).await?, print_policy)
        }
    }
}

/// A conntrack entry's state in one word: `revoked` (a policy change
/// withdrew it: its packets are dropped), `closing` (a TCP flow that
/// ended), `established` (a reply was seen), `new` (none yet).
fn ct_state(e: &cilia_api::model::BpfCtEntry) -> &'static str {
    if e.denied {
        "revoked"
    } else if e.closing {
        "closing"
    } else if e.seen_reply {
        "established"
    } else {
        "new"
    }
}

fn enforcement(enforced: bool) -> &'static str {
    if enforced {
        "enforced (default deny)"
    } else {
        "not enforced (default allow)"
    }
}

fn print_policy(p: &BpfPolicy) {
    outln!(
        "Endpoint {}: ingress {}, egress {}",
        p.endpoint,
        enforcement(p.ingress_enforced),
        enforcement(p.egress_enforced)
    );
    print_table(
        &["DIRECTION", "IDENTITY", "PROTO", "PORT", "VERDICT", "RULE"],
        p.entries
            .iter()
            .map(|e| {
                let identity: &dyn std::fmt::Display =
                    if e.identity == 0 { &"any" } else { &e.identity };
                let verdict = match e.proxy_port {
                    Some(port) => format!("{} (proxy :{port})", e.verdict),
                    None => e.verdict.clone(),
                };
                cells(&[
                    &e.direction,
                    identity,
                    &e.protocol,
                    &e.port,
                    &verdict,
                    &e.rule,
                ])
            })
            .collect(),
    )
}
