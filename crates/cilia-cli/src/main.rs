//! `cilia`: command-line client of the cilia agent. A thin layer over the
//! REST API: parse arguments, call, print a table or JSON.

use std::io::Write;
use std::path::PathBuf;

use cilia_api::{
    BpfCtEntry, BpfEndpoint, BpfIpcacheEntry, BpfMetric, BpfPolicy, Client, Endpoint,
    EndpointCreate, Identity, Namespace, PolicyChange, PolicyImport, PolicyList, Status,
    TraceRequest, TraceResponse,
};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
    /// YAML (policy get only).
    Yaml,
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
    /// Example: cilia status --verbose
    Status {
        /// Also each subsystem's health and the BPF maps' fill levels.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Manage endpoints (a network namespace connected by cilia).
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Read the datapath's BPF maps back from the kernel.
    #[command(subcommand)]
    Bpf(BpfCmd),
    /// Import, inspect, delete, validate and trace network policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Security identities (labels -> number).
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// Namespaces and their labels (selected by namespaceSelector).
    #[command(subcommand)]
    Namespace(NamespaceCmd),
    /// The agent's BPF programs: hotfix them in place.
    #[command(subcommand)]
    Datapath(DatapathCmd),
    /// Stream datapath events live: drops, traces, policy verdicts.
    ///
    /// Example: cilia monitor --type drop --related-to 1
    Monitor {
        /// Event types to show (repeatable): drop, trace, policy-verdict, debug
        /// (the conntrack state of every packet).
        #[arg(long = "type", value_parser = ["drop", "trace", "policy-verdict", "debug"])]
        types: Vec<String>,
        /// Only events to or from this endpoint.
        #[arg(long)]
        related_to: Option<u16>,
        /// Also print the packet's first bytes (hex).
        #[arg(short, long)]
        verbose: bool,
    },
    /// Recent flows (drops, verdicts, and traces while monitored), filtered.
    ///
    /// Example: cilia observe --verdict DROPPED --to-label class=deathstar --last 20
    Observe {
        #[arg(long)]
        from_label: Option<String>,
        #[arg(long)]
        to_label: Option<String>,
        #[arg(long)]
        from_ip: Option<String>,
        #[arg(long)]
        to_ip: Option<String>,
        /// Either side in this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// FORWARDED, DROPPED or AUDIT.
        #[arg(long, value_parser = ["FORWARDED", "DROPPED", "AUDIT"])]
        verdict: Option<String>,
        /// TCP, UDP, SCTP, ICMP, ICMPv6.
        #[arg(long)]
        protocol: Option<String>,
        /// Either side's port.
        #[arg(long)]
        port: Option<u16>,
        /// Only flows newer than this (e.g. 30s, 5m, 1h).
        #[arg(long)]
        since: Option<String>,
        /// Only the last N matching flows.
        #[arg(long)]
        last: Option<usize>,
        /// Keep following new flows.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Import NetworkPolicy / CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy
    /// YAML (all documents or none); prints the new policy revision.
    ///
    /// Example: cilia policy import examples/starwars/cnp-l3-l4.yaml
    Import {
        /// YAML file, or - for standard input.
        file: String,
    },
    /// Show the imported policies.
    ///
    /// Example: cilia policy get -o yaml
    Get,
    /// Delete a policy by name, or all of them.
    ///
    /// Example: cilia policy delete rule1
    Delete {
        /// Policy name.
        #[arg(required_unless_present = "all")]
        name: Option<String>,
        /// Only the policy of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Delete every policy.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Check a policy file without an agent (offline).
    ///
    /// Example: cilia policy validate examples/starwars/cnp-l3-l4.yaml
    Validate {
        /// YAML file, or - for standard input.
        file: String,
    },
    /// Explain the verdict for a connection, from the state that programs the maps.
    ///
    /// Example: cilia policy trace --src org=alliance,class=xwing --dst 1 --dport 80/TCP --datapath
    Trace {
        /// Source: endpoint id, IP address, or labels k=v[,k=v…].
        #[arg(long)]
        src: String,
        /// Destination: endpoint id, IP address, or labels.
        #[arg(long)]
        dst: String,
        /// PORT/PROTO (80/TCP, 53/UDP, ICMP).
        #[arg(long)]
        dport: String,
        /// Also run the source endpoint's loaded program on a synthesized packet.
        #[arg(long)]
        datapath: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DatapathCmd {
    /// Re-specialize every endpoint's programs from the agent's build and
    /// swap them in through their pinned links, keeping maps and
    /// connections. An endpoint whose new program fails (the verifier's
    /// reason is shown) keeps its old one; exits 1 if any failed.
    ///
    /// Example: cilia datapath reload --force -o json
    Reload {
        /// Also swap programs that already are this build's with the
        /// endpoint's configuration (otherwise reported unchanged).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum IdentityCmd {
    /// List identities: reserved, endpoint and CIDR ones.
    ///
    /// Example: cilia identity list
    List,
    /// Show one identity.
    ///
    /// Example: cilia identity get 256
    Get { id: u32 },
}

#[derive(Debug, Subcommand)]
enum NamespaceCmd {
    /// Set a namespace's labels (replacing the old ones).
    ///
    /// Example: cilia namespace set prod --labels team=payments
    Set {
        name: String,
        /// Labels: k=v[,k=v…].
        #[arg(long, default_value = "")]
        labels: String,
    },
    /// List namespaces and their labels.
    ///
    /// Example: cilia namespace list
    List,
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
    /// Change an endpoint's settings.
    ///
    /// Example: cilia endpoint config 1 policy-audit=enabled
    Config {
        id: u16,
        /// policy-audit=enabled|disabled: would-be drops pass, reported as AUDIT.
        setting: String,
    },
}

#[derive(Debug, Subcommand)]
enum BpfCmd {
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
}

#[derive(Debug, Subcommand)]
enum BpfListCmd {
    /// Read the map back from the kernel.
    ///
    /// Example: cilia bpf ct list
    List,
}

#[derive(Debug, Subcommand)]
enum BpfPolicyCmd {
    /// Read an endpoint's policy map back from the kernel.
    ///
    /// Example: cilia bpf policy get 1
    Get { endpoint: u16 },
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

/// Prints a list as JSON, or as a table with one row per item.
fn print_rows<T: serde::Serialize>(
    json: bool,
    list: &[T],
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    if json {
        print_json(&list)
    } else {
        print_table(header, list.iter().map(row).collect());
        Ok(())
    }
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
    if let Some(n) = &e.network {
        println!("Network:     {n} (CNI, interface {})", e.ifname);
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
    println!(
        "Policies:     {} (revision {})",
        s.policies, s.policy_revision
    );
    for e in &s.policy_errors {
        println!("Policy error: {e}");
    }
    println!("State dir:    {}", s.state_dir);
    println!("BPF root:     {}", s.bpf_root);
}

fn print_status_verbose(s: &Status) {
    println!("Subsystems:");
    for sub in &s.subsystems {
        println!("  {:<10} {:<9} {}", sub.name, sub.status, sub.detail);
        for e in &sub.errors {
            println!("             - {e}");
        }
    }
    println!("BPF maps:");
    for m in &s.maps {
        let pct = if m.capacity == 0 {
            0.0
        } else {
            m.entries as f64 * 100.0 / m.capacity as f64
        };
        println!(
            "  {:<28} {:>8} / {:<8} ({pct:.1}%)",
            m.map, m.entries, m.capacity
        );
    }
}

fn read_input(file: &str) -> anyhow::Result<String> {
    use std::io::Read;
    if file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{file}: {e}"))
    }
}

fn labels_of(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn print_trace(t: &TraceResponse) {
    println!("From: {} (identity {})", t.src, t.src_identity);
    println!("To:   {} (identity {})", t.dst, t.dst_identity);
    for s in &t.steps {
        println!(
            "  {} of {}: {} — {}",
            s.direction, s.subject, s.verdict, s.reason
        );
        for r in &s.rules {
            println!("      rule: {r}");
        }
    }
    println!("Verdict: {}", t.verdict);
    if let Some(d) = &t.datapath {
        let agree = if *d == t.verdict {
            "agrees"
        } else {
            "DISAGREES"
        };
        println!("Datapath: {d} (the loaded program {agree} with the control plane)");
    }
}

fn query_string(filter: &cilia_api::flows::FlowFilter, extra: &[(&str, String)]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut push = |k: &str, v: String| {
        let enc: String = v
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        parts.push(format!("{k}={enc}"));
    };
    let f = filter.clone();
    for (k, v) in [
        ("from_label", f.from_label),
        ("to_label", f.to_label),
        ("from_ip", f.from_ip),
        ("to_ip", f.to_ip),
        ("namespace", f.namespace),
        ("verdict", f.verdict),
        ("protocol", f.protocol),
        ("types", f.types),
    ] {
        if let Some(v) = v {
            push(k, v);
        }
    }
    if let Some(p) = f.port {
        push("port", p.to_string());
    }
    if let Some(t) = f.since_ns {
        push("since_ns", t.to_string());
    }
    if let Some(id) = f.related_to {
        push("related_to", id.to_string());
    }
    for (k, v) in extra {
        push(k, v.clone());
    }
    parts.join("&")
}

fn peer_text(p: &cilia_api::FlowPeer) -> String {
    let addr = match (&p.ip, p.port) {
        (Some(ip), Some(port)) if ip.contains(':') => format!("[{ip}]:{port}"),
        (Some(ip), Some(port)) => format!("{ip}:{port}"),
        (Some(ip), None) => ip.clone(),
        _ => "?".into(),
    };
    let who = match (p.endpoint, &p.namespace) {
        (Some(id), Some(ns)) => {
            let labels = labels_of(&p.labels);
            format!("{ns}/ep{id}({labels})")
        }
        _ => format!("identity {}", p.identity),
    };
    format!("{who} {addr}")
}

fn print_monitor_line(f: &cilia_api::Flow, verbose: bool) {
    let time = f.time.get(11..26).unwrap_or(&f.time);
    let what = match f.event.as_str() {
        "drop" => format!("drop ({})", f.drop_reason.as_deref().unwrap_or("?")),
        "trace" => format!("trace {}", f.trace.as_deref().unwrap_or("")),
        "debug" => format!("debug {}", f.trace.as_deref().unwrap_or("")),
        _ => format!("policy-verdict {}", f.verdict),
    };
    let policy = f
        .policy
        .as_deref()
        .map(|p| format!(" policy: {p}"))
        .unwrap_or_default();
    println!(
        "{time} {what} {} ep {} identity {}->{} {} {} -> {} len {}{policy}",
        f.direction,
        f.observed_at,
        f.source.identity,
        f.destination.identity,
        if f.protocol.is_empty() {
            "-"
        } else {
            &f.protocol
        },
        peer_text(&f.source),
        peer_text(&f.destination),
        f.length,
    );
    if verbose {
        if let Some(d) = &f.data {
            println!("    {d}");
        }
    }
}

fn print_observe_line(f: &cilia_api::Flow) {
    let time = f.time.get(0..23).unwrap_or(&f.time);
    let reason = f
        .drop_reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    let policy = f
        .policy
        .as_deref()
        .map(|p| format!(" [{p}]"))
        .unwrap_or_default();
    println!(
        "{time}  {} -> {} {} {}{reason}{policy}",
        peer_text(&f.source),
        peer_text(&f.destination),
        if f.protocol.is_empty() {
            "-"
        } else {
            &f.protocol
        },
        f.verdict,
    );
}

async fn stream(
    client: &Client,
    path: &str,
    json: bool,
    on_flow: impl Fn(&cilia_api::Flow),
) -> anyhow::Result<()> {
    client
        .stream_lines(path, |line| {
            if json {
                println!("{line}");
                return true;
            }
            match serde_json::from_str::<cilia_api::StreamItem>(line) {
                Ok(cilia_api::StreamItem::Flow(f)) => on_flow(&f),
                Ok(cilia_api::StreamItem::Lost { lost }) => {
                    println!("WARNING: {lost} events lost (the reader fell behind)")
                }
                Err(_) => println!("{line}"),
            }
            true
        })
        .await?;
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    let json = cli.output != Output::Table;
    if cli.output == Output::Yaml && !matches!(cli.command, Command::Policy(PolicyCmd::Get)) {
        anyhow::bail!("-o yaml is only supported by `cilia policy get`; use -o json");
    }
    match cli.command {
        Command::Status { verbose } => {
            let s: Status = client.get("/v1/status").await?;
            if json {
                print_json(&s)?
            } else {
                print_status(&s);
                if verbose {
                    print_status_verbose(&s);
                }
            }
        }
        Command::Endpoint(EndpointCmd::Create {
            netns,
            labels,
            ifname,
            namespace,
        }) => {
            // Refused here, before anything reaches the agent (README, "Input limits").
            let labels = cilia_api::labels::parse_labels(&labels)
                .and_then(|l| cilia_api::labels::validate_endpoint_labels(&l).map(|()| l))
                .map_err(|e| e.in_field("--labels"))?;
            cilia_api::limits::check_ifname("--ifname", &ifname)?;
            let req = EndpointCreate {
                netns,
                labels,
                ifname: Some(ifname),
                container_id: None,
                namespace: Some(namespace),
                label_source: None,
                network: None,
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
        Command::Endpoint(EndpointCmd::Config { id, setting }) => {
            let audit = match setting.as_str() {
                "policy-audit=enabled" => true,
                "policy-audit=disabled" => false,
                other => anyhow::bail!(
                    "unknown setting {other:?}: use policy-audit=enabled or policy-audit=disabled"
                ),
            };
            let e: Endpoint = client
                .put(
                    &format!("/v1/endpoints/{id}/config"),
                    &cilia_api::EndpointSettings {
                        policy_audit: audit,
                    },
                )
                .await?;
            if json {
                print_json(&e)?
            } else {
                println!(
                    "endpoint {id}: policy audit {}",
                    if e.policy_audit {
                        "enabled"
                    } else {
                        "disabled"
                    }
                );
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
            print_rows(
                json,
                &list,
                &[
                    "ADDRESS", "ENDPOINT", "IFINDEX", "IDENTITY", "MAC", "NODE MAC",
                ],
                |e| {
                    vec![
                        e.address.clone(),
                        e.endpoint_id.to_string(),
                        e.ifindex.to_string(),
                        e.identity.to_string(),
                        e.mac.clone(),
                        e.node_mac.clone(),
                    ]
                },
            )?;
        }
        Command::Monitor {
            types,
            related_to,
            verbose,
        } => {
            let filter = cilia_api::flows::FlowFilter {
                types: (!types.is_empty()).then(|| types.join(",")),
                related_to,
                ..Default::default()
            };
            if !json {
                eprintln!("Listening for events (Ctrl-C to stop)...");
            }
            let path = format!("/v1/monitor?{}", query_string(&filter, &[]));
            stream(&client, &path, json, |f| print_monitor_line(f, verbose)).await?;
        }
        Command::Observe {
            from_label,
            to_label,
            from_ip,
            to_ip,
            namespace,
            verdict,
            protocol,
            port,
            since,
            last,
            follow,
        } => {
            let since_ns = match since {
                None => None,
                Some(s) => {
                    let d = humantime::parse_duration(&s)
                        .map_err(|e| anyhow::anyhow!("--since {s:?}: {e}"))?;
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .saturating_sub(d);
                    Some(now.as_nanos() as u64)
                }
            };
            let filter = cilia_api::flows::FlowFilter {
                from_label,
                to_label,
                from_ip,
                to_ip,
                namespace,
                verdict,
                protocol,
                port,
                since_ns,
                ..Default::default()
            };
            let mut extra = Vec::new();
            if let Some(n) = last {
                extra.push(("last", n.to_string()));
            }
            if follow {
                extra.push(("follow", "true".to_string()));
            }
            let path = format!("/v1/flows?{}", query_string(&filter, &extra));
            stream(&client, &path, json, print_observe_line).await?;
        }
        Command::Policy(PolicyCmd::Import { file }) => {
            let yaml = read_input(&file)?;
            // The agent would refuse it too, but only after the whole text crossed the socket.
            let max = cilia_policy::limits::MAX_POLICY_BYTES;
            if yaml.len() > max {
                anyhow::bail!(
                    "{file}: the policy text is {} bytes, more than the limit of {max} (MAX_POLICY_BYTES)",
                    yaml.len()
                );
            }
            let req = PolicyImport {
                source: if file == "-" { "stdin".into() } else { file },
                yaml,
            };
            let source = req.source.clone();
            let r: PolicyChange = client.post("/v1/policy", &req).await?;
            if json {
                print_json(&r)?
            } else {
                if let Some(n) = r.documents {
                    println!("{source}: read {n} document(s)");
                }
                for note in &r.notes {
                    println!("note: {note}");
                }
                for p in &r.created {
                    println!("created {p}");
                }
                for p in &r.replaced {
                    println!("replaced {p}");
                }
                println!("Revision: {}", r.revision);
            }
        }
        Command::Policy(PolicyCmd::Get) => {
            let list: PolicyList = client.get("/v1/policy").await?;
            match cli.output {
                Output::Json => print_json(&list)?,
                Output::Yaml => {
                    let docs: Vec<&str> = list.policies.iter().map(|p| p.yaml.trim_end()).collect();
                    println!("{}", docs.join("\n---\n"));
                }
                Output::Table => {
                    print_table(
                        &["KIND", "NAMESPACE", "NAME"],
                        list.policies
                            .iter()
                            .map(|p| {
                                vec![
                                    p.kind.clone(),
                                    p.namespace.clone().unwrap_or_else(|| "-".into()),
                                    p.name.clone(),
                                ]
                            })
                            .collect(),
                    );
                    println!("Revision: {}", list.revision);
                    for e in &list.errors {
                        println!("error (stored policy skipped): {e}");
                    }
                }
            }
        }
        Command::Policy(PolicyCmd::Delete {
            name,
            namespace,
            all,
        }) => {
            let path = match (&name, all) {
                (_, true) => "/v1/policy?all=true".to_string(),
                (Some(n), false) => match &namespace {
                    Some(ns) => format!("/v1/policy?name={n}&namespace={ns}"),
                    None => format!("/v1/policy?name={n}"),
                },
                (None, false) => anyhow::bail!("give a policy name or --all"),
            };
            let r: PolicyChange = client.delete_json(&path).await?;
            if json {
                print_json(&r)?
            } else {
                for p in &r.policies {
                    println!("deleted {p}");
                }
                println!("Revision: {}", r.revision);
            }
        }
        Command::Policy(PolicyCmd::Validate { file }) => {
            let yaml = read_input(&file)?;
            let source = if file == "-" { "stdin" } else { file.as_str() };
            let stream = cilia_policy::parse_stream(source, &yaml)?;
            if stream.policies.is_empty() {
                anyhow::bail!(
                    "{source}: no policy documents found ({} document(s) read, all empty)",
                    stream.documents
                );
            }
            println!("{source}: read {} document(s)", stream.documents);
            for i in &stream.empty {
                println!("note: document {i} is empty: skipped");
            }
            for d in &stream.policies {
                println!(
                    "valid: {:?} {} (document {})",
                    d.policy.kind,
                    d.policy.qualified_name(),
                    d.index
                );
            }
        }
        Command::Policy(PolicyCmd::Trace {
            src,
            dst,
            dport,
            datapath,
        }) => {
            cilia_api::parse_port_proto(&dport).map_err(|e| anyhow::anyhow!(e))?;
            let req = TraceRequest {
                src,
                dst,
                dport,
                datapath,
            };
            let t: TraceResponse = client.post("/v1/policy/trace", &req).await?;
            if json {
                print_json(&t)?
            } else {
                print_trace(&t)
            }
        }
        Command::Identity(IdentityCmd::List) => {
            let list: Vec<Identity> = client.get("/v1/identities").await?;
            print_rows(json, &list, &["ID", "KIND", "ENDPOINTS", "LABELS"], |i| {
                vec![
                    i.id.to_string(),
                    i.kind.clone(),
                    if i.endpoints.is_empty() {
                        "-".into()
                    } else {
                        i.endpoints
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                    labels_of(&i.labels),
                ]
            })?;
        }
        Command::Identity(IdentityCmd::Get { id }) => {
            let i: Identity = client.get(&format!("/v1/identities/{id}")).await?;
            if json {
                print_json(&i)?
            } else {
                println!("ID:        {}", i.id);
                println!("Kind:      {}", i.kind);
                println!("Labels:    {}", labels_of(&i.labels));
                println!("Endpoints: {:?}", i.endpoints);
            }
        }
        Command::Namespace(NamespaceCmd::Set { name, labels }) => {
            let labels =
                cilia_api::labels::parse_labels(&labels).map_err(|e| e.in_field("--labels"))?;
            let ns: Namespace = client
                .put(
                    &format!("/v1/namespaces/{name}"),
                    &Namespace {
                        name: String::new(),
                        labels,
                    },
                )
                .await?;
            if json {
                print_json(&ns)?
            } else {
                println!("namespace {} labels: {}", ns.name, labels_of(&ns.labels))
            }
        }
        Command::Namespace(NamespaceCmd::List) => {
            let list: Vec<Namespace> = client.get("/v1/namespaces").await?;
            print_rows(json, &list, &["NAMESPACE", "LABELS"], |n| {
                vec![n.name.clone(), labels_of(&n.labels)]
            })?;
        }
        Command::Bpf(BpfCmd::Ipcache(BpfListCmd::List)) => {
            let list: Vec<BpfIpcacheEntry> = client.get("/v1/bpf/ipcache").await?;
            print_rows(json, &list, &["PREFIX", "IDENTITY"], |e| {
                vec![e.prefix.clone(), e.identity.to_string()]
            })?;
        }
        Command::Bpf(BpfCmd::Ct(BpfListCmd::List)) => {
            let list: Vec<BpfCtEntry> = client.get("/v1/bpf/ct").await?;
            print_rows(
                json,
                &list,
                &[
                    "PROTO",
                    "SOURCE",
                    "DESTINATION",
                    "IDENTITIES",
                    "PACKETS",
                    "BYTES",
                    "EXPIRES",
                    "REPLY",
                    "REV",
                ],
                |e| {
                    vec![
                        e.proto.clone(),
                        e.source.clone(),
                        e.destination.clone(),
                        format!("{} -> {}", e.src_identity, e.dst_identity),
                        e.packets.to_string(),
                        e.bytes.to_string(),
                        format!("{}s", e.expires_in),
                        if e.denied {
                            "REVOKED"
                        } else if e.seen_reply {
                            "yes"
                        } else {
                            "no"
                        }
                        .into(),
                        e.policy_revision.to_string(),
                    ]
                },
            )?;
        }
        Command::Bpf(BpfCmd::Policy(BpfPolicyCmd::Get { endpoint })) => {
            let p: BpfPolicy = client.get(&format!("/v1/bpf/policy/{endpoint}")).await?;
            if json {
                print_json(&p)?
            } else {
                println!(
                    "Endpoint {}: ingress {}, egress {}",
                    p.endpoint,
                    if p.ingress_enforced {
                        "enforced (default deny)"
                    } else {
                        "not enforced (default allow)"
                    },
                    if p.egress_enforced {
                        "enforced (default deny)"
                    } else {
                        "not enforced (default allow)"
                    }
                );
                print_table(
                    &["DIRECTION", "IDENTITY", "PROTO", "PORT", "VERDICT", "RULE"],
                    p.entries
                        .iter()
                        .map(|e| {
                            vec![
                                e.direction.clone(),
                                if e.identity == 0 {
                                    "any".into()
                                } else {
                                    e.identity.to_string()
                                },
                                e.protocol.clone(),
                                e.port.clone(),
                                e.verdict.clone(),
                                e.rule.clone(),
                            ]
                        })
                        .collect(),
                )
            }
        }
        Command::Datapath(DatapathCmd::Reload { force }) => {
            let r: cilia_api::DatapathReloadResult = client
                .post("/v1/datapath/reload", &cilia_api::DatapathReload { force })
                .await?;
            if json {
                print_json(&r)?
            } else {
                print_table(
                    &[
                        "ENDPOINT",
                        "RESULT",
                        "LINK",
                        "PROGRAM (OLD -> NEW)",
                        "REASON",
                    ],
                    r.endpoints
                        .iter()
                        .map(|e| {
                            let ids = |f: fn(&cilia_api::LinkReload) -> String| {
                                e.links.iter().map(f).collect::<Vec<_>>().join(",")
                            };
                            vec![
                                e.endpoint_id.to_string(),
                                serde_json::to_value(e.outcome)
                                    .ok()
                                    .and_then(|v| v.as_str().map(String::from))
                                    .unwrap_or_default(),
                                ids(|l| l.link_id.to_string()),
                                ids(|l| format!("{} -> {}", l.old_program_id, l.new_program_id)),
                                e.reason.clone().unwrap_or_default(),
                            ]
                        })
                        .collect(),
                );
                println!(
                    "{} reloaded, {} unchanged, {} failed, {} skipped",
                    r.reloaded, r.unchanged, r.failed, r.skipped
                );
            }
            if r.failed > 0 {
                anyhow::bail!(
                    "{} endpoint(s) failed to reload and keep their old programs",
                    r.failed
                );
            }
        }
        Command::Bpf(BpfCmd::Metrics(BpfMetricsCmd::List)) => {
            let list: Vec<BpfMetric> = client.get("/v1/bpf/metrics").await?;
            print_rows(
                json,
                &list,
                &["KIND", "REASON", "DIRECTION", "PACKETS", "BYTES"],
                |m| {
                    vec![
                        m.kind.clone(),
                        m.reason.clone(),
                        m.direction.clone(),
                        m.packets.to_string(),
                        m.bytes.to_string(),
                    ]
                },
            )?;
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
