//! `cilia monitor` (live datapath events) and `cilia observe` (recent
//! flows, filtered, optionally followed): both print the agent's NDJSON
//! stream, as sent (`-o json`) or one line per flow.

use cilia_api::flows::FlowFilter;
use cilia_api::{ApiClient, Flow, FlowPeer, FlowsQuery, StreamItem, StreamLine};
use clap::Args;

use crate::output::{labels_of, Output};

#[derive(Debug, Args)]
pub struct MonitorArgs {
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
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
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
}

pub async fn monitor(args: MonitorArgs, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    let filter = FlowFilter {
        types: (!args.types.is_empty()).then(|| args.types.join(",")),
        related_to: args.related_to,
        ..Default::default()
    };
    if !output.json() {
        eprintln!("Listening for events (Ctrl-C to stop)...");
    }
    client
        .monitor(&filter, |line| {
            print_line(line, output, |f| print_monitor_line(f, args.verbose))
        })
        .await?;
    Ok(())
}

pub async fn observe(args: ObserveArgs, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    let since_ns = match args.since {
        None => None,
        Some(s) => {
            let d =
                humantime::parse_duration(&s).map_err(|e| anyhow::anyhow!("--since {s:?}: {e}"))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .saturating_sub(d);
            Some(now.as_nanos() as u64)
        }
    };
    let query = FlowsQuery {
        filter: FlowFilter {
            from_label: args.from_label,
            to_label: args.to_label,
            from_ip: args.from_ip,
            to_ip: args.to_ip,
            namespace: args.namespace,
            verdict: args.verdict,
            protocol: args.protocol,
            port: args.port,
            since_ns,
            ..Default::default()
        },
        last: args.last,
        follow: args.follow,
    };
    client
        .flows(&query, |line| print_line(line, output, print_observe_line))
        .await?;
    Ok(())
}

/// Prints one stream line: as sent for `-o json`, else a flow through
/// `on_flow`, a lost-events warning, or a line it cannot decode as it is.
/// Always keeps the stream going.
fn print_line(line: StreamLine<'_>, output: Output, on_flow: impl Fn(&Flow)) -> bool {
    if output.json() {
        outln!("{}", line.text());
        return true;
    }
    match line.item() {
        Ok(StreamItem::Flow(f)) => on_flow(&f),
        Ok(StreamItem::Lost { lost }) => {
            outln!("WARNING: {lost} events lost (the reader fell behind)")
        }
        Err(_) => outln!("{}", line.text()),
    }
    true
}

fn peer_text(p: &FlowPeer) -> String {
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

fn protocol_text(f: &Flow) -> &str {
    if f.protocol.is_empty() {
        "-"
    } else {
        &f.protocol
    }
}

fn print_monitor_line(f: &Flow, verbose: bool) {
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
    outln!(
        "{time} {what} {} ep {} identity {}->{} {} {} -> {} len {}{policy}",
        f.direction,
        f.observed_at,
        f.source.identity,
        f.destination.identity,
        protocol_text(f),
        peer_text(&f.source),
        peer_text(&f.destination),
        f.length,
    );
    if verbose {
        if let Some(d) = &f.data {
            outln!("    {d}");
        }
    }
}

fn print_observe_line(f: &Flow) {
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
    outln!(
        "{time}  {} -> {} {} {}{reason}{policy}",
        peer_text(&f.source),
        peer_text(&f.destination),
        protocol_text(f),
        f.verdict,
    );
}
