//! `cilia`: command-line client of the cilia agent. A thin layer over the
//! REST API: parse arguments, call, print a table or JSON.

use std::io::Write;
use std::path::PathBuf;

use cilia_api::{BpfEndpoint, BpfMetric, Client, Endpoint, EndpointCreate, Status};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
}

/// Command-line client of cilia-agent.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "CILIA_SOCKET", default_value = cilia_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format of commands that print data.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Agent health, kernel features, endpoint count, IPAM usage.
    ///
    /// Example: cilia status -o json
    Status,
    /// Manage endpoints (a network namespace connected by cilia).
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Read the datapath's BPF maps back from the kernel.
    #[command(subcommand)]
    Bpf(BpfCmd),
}

#[derive(Debug, Subcommand)]
enum EndpointCmd {
    /// Connect a network namespace: veth, addresses, routes, BPF program.
    ///
    /// Example: cilia endpoint create --netns web1 --labels app=web,tier=front
    Create {
        /// Network namespace: a name under /run/netns or a path.
        #[arg(long)]
        netns: String,
        /// Labels: k=v[,k=v…].
        #[arg(long, default_value = "")]
        labels: String,
        /// Interface name inside the namespace.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Namespace the endpoint belongs to (label io.kubernetes.pod.namespace).
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// List endpoints.
    ///
    /// Example: cilia endpoint list
    List,
    /// Show one endpoint.
    ///
    /// Example: cilia endpoint get 1
    Get { id: u16 },
    /// Delete an endpoint and everything created for it.
    ///
    /// Example: cilia endpoint delete 1
    Delete { id: u16 },
}

#[derive(Debug, Subcommand)]
enum BpfCmd {
    /// Datapath endpoint map: endpoints
    #[command(subcommand)]
    Endpoint(BpfEndpointCmd),
    /// Datapath packet counters.
    #[command(subcommand)]
    Metrics(BpfMetricsCmd),
}

#[derive(Debug, Subcommand)]
enum BpfEndpointCmd {
    /// The kernel's endpoints map, read back.
    ///
    /// Example: cilia bpf endpoint list
    List,
}

#[derive(Debug, Subcommand)]
enum BpfMetricsCmd {
    /// Forwarded and dropped packets by reason, summed over CPUs.
    ///
    /// Example: cilia bpf metrics list
    List,
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Prints rows as aligned columns.
fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header.iter().map(|s| s.to_string()).collect()));
    for row in rows {
        println!("{}", line(row));
    }
}

fn labels_text(e: &Endpoint) -> String {
    if e.labels.is_empty() {
        return "-".into();
    }
    e.labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_endpoints(list: &[Endpoint]) {
    print_table(
        &["ID", "STATE", "IPV6", "IPV4", "NETNS", "LABELS"],
        list.iter()
            .map(|e| {
                vec![
                    e.id.to_string(),
                    format!("{:?}", e.state).to_lowercase(),
                    e.ipv6.clone(),
                    e.ipv4.clone().unwrap_or_else(|| "-".into()),
                    e.netns.clone(),
                    labels_text(e),
                ]
            })
            .collect(),
    );
}

fn print_endpoint(e: &Endpoint) {
    println!("ID:          {}", e.id);
    println!("State:       {:?}", e.state);
    if let Some(r) = &e.reason {
        println!("Reason:      {r}");
    }
    println!("IPv6:        {}", e.ipv6);
    println!("IPv4:        {}", e.ipv4.as_deref().unwrap_or("-"));
    println!("Netns:       {}", e.netns);
    println!("Interface:   {} ({})", e.ifname, e.mac);
    println!("Host side:   {} ({})", e.host_ifname, e.host_mac);
    println!("Labels:      {}", labels_text(e));
    if let Some(c) = &e.container_id {
        println!("Container:   {c}");
    }
}

fn print_status(s: &Status) {
    println!("Agent:        {} (version {})", s.health, s.version);
    println!("Kernel:       {}", s.kernel);
    let features: Vec<String> = s
        .features
        .iter()
        .map(|f| format!("{}{}", f.name, if f.present { "" } else { " (MISSING)" }))
        .collect();
    println!("Features:     {}", features.join(", "));
    println!(
        "Endpoints:    {} ({} not ready)",
        s.endpoints, s.endpoints_not_ready
    );
    println!(
        "IPAM IPv6:    {}/{} used in {} (router {})",
        s.ipam.ipv6.used, s.ipam.ipv6.capacity, s.ipam.ipv6.range, s.ipam.ipv6.router
    );
    match &s.ipam.ipv4 {
        Some(p) => println!(
            "IPAM IPv4:    {}/{} used in {} (router {})",
            p.used, p.capacity, p.range, p.router
        ),
        None => println!("IPAM IPv4:    disabled"),
    }
    println!("State dir:    {}", s.state_dir);
    println!("BPF root:     {}", s.bpf_root);
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Status => {
            let s: Status = client.get("/v1/status").await?;
            if json {
                print_json(&s)?
            } else {
                print_status(&s)
            }
        }
        Command::Endpoint(EndpointCmd::Create {
            netns,
            labels,
            ifname,
            namespace,
        }) => {
            let labels = cilia_api::labels::parse_labels(&labels)?;
            let req = EndpointCreate {
                netns,
                labels,
                ifname: Some(ifname),
                container_id: None,
                namespace: Some(namespace),
            };
            let e: Endpoint = client.post("/v1/endpoints", &req).await?;
            if json {
                print_json(&e)?
            } else {
                println!(
                    "endpoint {} created: ipv6 {} ipv4 {}",
                    e.id,
                    e.ipv6,
                    e.ipv4.as_deref().unwrap_or("-")
                );
            }
        }
        Command::Endpoint(EndpointCmd::List) => {
            let list: Vec<Endpoint> = client.get("/v1/endpoints").await?;
            if json {
                print_json(&list)?
            } else {
                print_endpoints(&list)
            }
        }
        Command::Endpoint(EndpointCmd::Get { id }) => {
            let e: Endpoint = client.get(&format!("/v1/endpoints/{id}")).await?;
            if json {
                print_json(&e)?
            } else {
                print_endpoint(&e)
            }
        }
        Command::Endpoint(EndpointCmd::Delete { id }) => {
            client.delete(&format!("/v1/endpoints/{id}")).await?;
            if !json {
                println!("endpoint {id} deleted");
            }
        }
        Command::Bpf(BpfCmd::Endpoint(BpfEndpointCmd::List)) => {
            let list: Vec<BpfEndpoint> = client.get("/v1/bpf/endpoints").await?;
            if json {
                print_json(&list)?
            } else {
                print_table(
                    &[
                        "ADDRESS", "ENDPOINT", "IFINDEX", "IDENTITY", "MAC", "NODE MAC",
                    ],
                    list.iter()
                        .map(|e| {
                            vec![
                                e.address.clone(),
                                e.endpoint_id.to_string(),
                                e.ifindex.to_string(),
                                e.identity.to_string(),
                                e.mac.clone(),
                                e.node_mac.clone(),
                            ]
                        })
                        .collect(),
                )
            }
        }
        Command::Bpf(BpfCmd::Metrics(BpfMetricsCmd::List)) => {
            let list: Vec<BpfMetric> = client.get("/v1/bpf/metrics").await?;
            if json {
                print_json(&list)?
            } else {
                print_table(
                    &["KIND", "REASON", "DIRECTION", "PACKETS", "BYTES"],
                    list.iter()
                        .map(|m| {
                            vec![
                                m.kind.clone(),
                                m.reason.clone(),
                                m.direction.clone(),
                                m.packets.to_string(),
                                m.bytes.to_string(),
                            ]
                        })
                        .collect(),
                )
            }
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cilia: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
