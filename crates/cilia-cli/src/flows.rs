//! `cilia monitor` (live datapath events and L7 requests) and `cilia
//! observe` (recent flows, filtered, optionally followed): both print the
//! agent's NDJSON stream, as sent (`-o json`) or one line per flow.

use cilia_api::flows::FlowFilter;
use cilia_api::{ApiClient, Flow, FlowL7, FlowPeer, FlowsQuery, StreamItem, StreamLine};
use clap::Args;

use crate::output::{labels_of, Output};

/// The event types of `--type`.
const EVENT_TYPES: [&str; 6] = ["drop", "trace", "policy-verdict", "debug", "l7", "service"];

/// A repeated flag as the API's comma-separated list (`None`: not given).
fn list(values: Vec<String>) -> Option<String> {
    (!values.is_empty()).then(|| values.join(","))
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Event types to show (repeatable): drop, trace, policy-verdict, debug
    /// (the conntrack state of every packet), l7 (HTTP requests the L7 proxy
    /// handled), service (a new flow to a service given a backend).
    #[arg(long = "type", value_parser = EVENT_TYPES)]
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
    /// FORWARDED, DROPPED, AUDIT or ERROR (an L7 request whose upstream failed).
    #[arg(long, value_parser = ["FORWARDED", "DROPPED", "AUDIT", "ERROR"])]
    verdict: Option<String>,
    /// TCP, UDP, SCTP, ICMP, ICMPv6, or HTTP (L7 flows).
    #[arg(long)]
    protocol: Option<String>,
    /// Either side's port.
    #[arg(long)]
    port: Option<u16>,
    /// Event types (repeatable): drop, trace, policy-verdict, debug, l7,
    /// service.
    ///
    /// Example: cilia observe --type l7 --verdict DROPPED
    #[arg(long = "type", value_parser = EVENT_TYPES)]
    types: Vec<String>,
    /// Only L7 flows of this HTTP method (repeatable, any case).
    #[arg(long = "http-method")]
    http_methods: Vec<String>,
    /// Only L7 flows whose request target (path and query) matches this
    /// regular expression as a whole, as a policy's `path` rule does.
    ///
    /// Example: cilia observe --http-path '/v1/.*'
    #[arg(long)]
    http_path: Option<String>,
    /// Only flows newer than this (e.g. 30s, 5m, 1h).
    #[arg(long)]
    since: Option<String>,
    /// Only the last N matching flows.
    #[arg(long)]
    last: Option<usize>,
    /// Keep following new flows.
    #[arg(short, long, conflicts_with = "cluster")]
    follow: bool,
    /// The flows of every node (asked through this agent), merged by time,
    /// each line naming its node; nodes that did not answer are named on
    /// standard error. `--last N`: the newest N of the whole cluster.
    #[arg(long)]
    cluster: bool,
}

pub async fn monitor(args: MonitorArgs, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    let filter = FlowFilter {
        types: list(args.types),
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
            types: list(args.types),
            http_method: list(args.http_methods),
            http_path: args.http_path,
            ..Default::default()
        },
        last: args.last,
        follow: args.follow,
    };
    if args.cluster {
        let answer = client.cluster_flows(&query).await?;
        for f in &answer.flows {
            if output.json() {
                // One JSON object per line, as the single-node stream.
                outln!("{}", serde_json::to_string(f)?);
            } else {
                print_observe_line(f);
            }
        }
        for u in &answer.unreachable {
            eprintln!("{}", unreachable_text(u));
        }
        return Ok(());
    }
    client
        .flows(&query, |line| print_line(line, output, print_observe_line))
        .await?;
    Ok(())
}

/// The warning for a node whose flows are missing from a cluster answer.
fn unreachable_text(u: &cilia_api::UnreachableNode) -> String {
    format!(
        "WARNING: node {} did not answer, its flows are missing: {}",
        u.node, u.error
    )
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
        // A pod of another node: its identity's labels.
        (None, Some(ns)) if !p.labels.is_empty() => {
            format!("{ns}/identity {}({})", p.identity, labels_of(&p.labels))
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

/// A latency for people: µs below 0.1 ms, then ms, then s.
fn latency_text(us: u64) -> String {
    match us {
        0..100 => format!("{us}µs"),
        100..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// `PUT http://deathstar/v1/exhaust-port 403 0.4ms`.
fn http_text(l7: &FlowL7) -> String {
    let target = match &l7.host {
        Some(host) => format!("http://{host}{}", l7.path),
        None => l7.path.clone(),
    };
    format!(
        "{} {target} {} {}",
        l7.method,
        l7.status,
        latency_text(l7.latency_us)
    )
}

fn reason_text(f: &Flow) -> String {
    f.drop_reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default()
}

/// ` (summary of N)` on a summary flow: the N events of its kind, held back
/// by the monitor under load, that this flow stands for.
fn aggregated_text(f: &Flow) -> String {
    f.aggregated
        .map(|n| format!(" (summary of {n})"))
        .unwrap_or_default()
}

/// ` via service 7 [2001:db8::10]:80/tcp` on a service flow.
fn service_text(f: &Flow) -> String {
    f.service
        .as_ref()
        .map(|s| {
            let socket = if s.balancer == "socket" {
                " (socket LB)"
            } else {
                ""
            };
            format!(" via service {} {}{socket}", s.id, s.frontend)
        })
        .unwrap_or_default()
}

fn monitor_line(f: &Flow) -> String {
    let time = f.time.get(11..26).unwrap_or(&f.time);
    let policy = f
        .policy
        .as_deref()
        .map(|p| format!(" policy: {p}"))
        .unwrap_or_default();
    let head = format!(
        "{} ep {} identity {}->{}",
        f.direction, f.observed_at, f.source.identity, f.destination.identity
    );
    if let Some(l7) = &f.l7 {
        return format!(
            "{time} http-request {}{} {head} {} -> {} {}{policy}",
            f.verdict,
            reason_text(f),
            peer_text(&f.source),
            peer_text(&f.destination),
            http_text(l7),
        );
    }
    let what = match f.event.as_str() {
        "drop" => format!("drop ({})", f.drop_reason.as_deref().unwrap_or("?")),
        "trace" => format!("trace {}", f.trace.as_deref().unwrap_or("")),
        "debug" => format!("debug {}", f.trace.as_deref().unwrap_or("")),
        "service" => "service backend-selected".to_string(),
        _ => format!("policy-verdict {}", f.verdict),
    };
    format!(
        "{time} {what} {head} {} {} -> {}{} len {}{policy}{}",
        protocol_text(f),
        peer_text(&f.source),
        peer_text(&f.destination),
        service_text(f),
        f.length,
        aggregated_text(f),
    )
}

fn print_monitor_line(f: &Flow, verbose: bool) {
    outln!("{}", monitor_line(f));
    if verbose {
        if let Some(d) = &f.data {
            outln!("    {d}");
        }
    }
}

fn observe_line(f: &Flow) -> String {
    let time = f.time.get(0..23).unwrap_or(&f.time);
    let policy = f
        .policy
        .as_deref()
        .map(|p| format!(" [{p}]"))
        .unwrap_or_default();
    let what = match &f.l7 {
        Some(l7) => format!(
            "http-request {}{} {}",
            f.verdict,
            reason_text(f),
            http_text(l7)
        ),
        None => format!("{} {}{}", protocol_text(f), f.verdict, reason_text(f)),
    };
    // Only cluster answers name a node.
    let node = f
        .node
        .as_deref()
        .map(|n| format!("{n}  "))
        .unwrap_or_default();
    format!(
        "{time}  {node}{} -> {}{} {what}{policy}{}",
        peer_text(&f.source),
        peer_text(&f.destination),
        service_text(f),
        aggregated_text(f),
    )
}

fn print_observe_line(f: &Flow) {
    outln!("{}", observe_line(f));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u16, class: &str, ip: &str, port: u16, identity: u32) -> FlowPeer {
        FlowPeer {
            endpoint: Some(id),
            ip: Some(ip.into()),
            port: Some(port),
            identity,
            labels: std::sync::Arc::new([("class".to_string(), class.to_string())].into()),
            namespace: Some("default".into()),
        }
    }

    /// The tiefighter's `PUT /v1/exhaust-port`, denied by the deathstar's policy.
    fn denied_put() -> Flow {
        Flow {
            time: "2026-12-02T06:30:00.123456789Z".into(),
            event: "l7".into(),
            verdict: "DROPPED".into(),
            drop_reason: Some("L7 policy denied".into()),
            direction: "ingress".into(),
            observed_at: 1,
            source: peer(3, "tiefighter", "fd00::3", 40000, 300),
            destination: peer(1, "deathstar", "fd00::2", 80, 301),
            protocol: "TCP".into(),
            policy: Some("default/rule1".into()),
            l7: Some(FlowL7 {
                protocol: "http".into(),
                method: "PUT".into(),
                path: "/v1/exhaust-port".into(),
                host: Some("deathstar".into()),
                status: 403,
                latency_us: 412,
                verdict: "denied".into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn observe_prints_an_l7_flow_as_one_request_line() {
        assert_eq!(
            observe_line(&denied_put()),
            "2026-12-02T06:30:00.123  default/ep3(class=tiefighter) [fd00::3]:40000 -> \
             default/ep1(class=deathstar) [fd00::2]:80 http-request DROPPED (L7 policy denied) \
             PUT http://deathstar/v1/exhaust-port 403 0.4ms [default/rule1]"
        );
    }

    #[test]
    fn monitor_prints_an_l7_flow_with_endpoint_and_identities() {
        assert_eq!(
            monitor_line(&denied_put()),
            "06:30:00.123456 http-request DROPPED (L7 policy denied) ingress ep 1 identity 300->301 \
             default/ep3(class=tiefighter) [fd00::3]:40000 -> default/ep1(class=deathstar) [fd00::2]:80 \
             PUT http://deathstar/v1/exhaust-port 403 0.4ms policy: default/rule1"
        );
    }

    #[test]
    fn a_request_without_host_prints_its_path_alone() {
        let mut f = denied_put();
        let l7 = f.l7.as_mut().unwrap();
        l7.host = None;
        (l7.method, l7.status) = ("GET".into(), 200);
        (f.verdict, f.drop_reason, f.policy) = ("FORWARDED".into(), None, None);
        assert!(
            observe_line(&f).ends_with("http-request FORWARDED GET /v1/exhaust-port 200 0.4ms"),
            "{}",
            observe_line(&f)
        );
    }

    /// The same connection's SYN, dropped by the default deny.
    fn dropped_syn() -> Flow {
        Flow {
            event: "drop".into(),
            verdict: "DROPPED".into(),
            drop_reason: Some("Policy denied".into()),
            l7: None,
            policy: Some("default deny".into()),
            ..denied_put()
        }
    }

    #[test]
    fn a_service_flow_names_the_service_and_its_frontend() {
        let f = Flow {
            event: "service".into(),
            verdict: "FORWARDED".into(),
            drop_reason: None,
            l7: None,
            policy: None,
            service: Some(cilia_api::FlowService {
                id: 7,
                frontend: "[2001:db8::10]:80/tcp".into(),
                backend: "[fd00::2]:80".into(),
                balancer: "per-packet".into(),
            }),
            ..denied_put()
        };
        assert_eq!(
            observe_line(&f),
            "2026-12-02T06:30:00.123  default/ep3(class=tiefighter) [fd00::3]:40000 -> \
             default/ep1(class=deathstar) [fd00::2]:80 via service 7 [2001:db8::10]:80/tcp TCP FORWARDED"
        );
        assert!(
            monitor_line(&f).contains("service backend-selected"),
            "{}",
            monitor_line(&f)
        );
    }

    #[test]
    fn packet_flows_print_as_before() {
        let f = dropped_syn();
        assert_eq!(
            observe_line(&f),
            "2026-12-02T06:30:00.123  default/ep3(class=tiefighter) [fd00::3]:40000 -> \
             default/ep1(class=deathstar) [fd00::2]:80 TCP DROPPED (Policy denied) [default deny]"
        );
        assert!(monitor_line(&f).starts_with("06:30:00.123456 drop (Policy denied) ingress ep 1"));
    }

    #[test]
    fn a_summary_flow_says_how_many_events_it_stands_for() {
        let f = Flow {
            aggregated: Some(41),
            ..dropped_syn()
        };
        assert!(
            observe_line(&f).ends_with("[default deny] (summary of 41)"),
            "{}",
            observe_line(&f)
        );
        assert!(
            monitor_line(&f).ends_with("(summary of 41)"),
            "{}",
            monitor_line(&f)
        );
    }

    #[test]
    fn a_cluster_flow_names_its_node_after_the_time() {
        let f = Flow {
            node: Some("node2".into()),
            ..dropped_syn()
        };
        assert!(
            observe_line(&f).starts_with(
                "2026-12-02T06:30:00.123  node2  default/ep3(class=tiefighter) [fd00::3]:40000 -> "
            ),
            "{}",
            observe_line(&f)
        );
        assert_eq!(
            unreachable_text(&cilia_api::UnreachableNode {
                node: "node3".into(),
                error: "no answer within 2s".into()
            }),
            "WARNING: node node3 did not answer, its flows are missing: no answer within 2s"
        );
    }

    #[test]
    fn latencies_read_in_the_unit_that_fits() {
        assert_eq!(
            [7, 412, 25_000, 2_500_000].map(latency_text),
            ["7µs", "0.4ms", "25.0ms", "2.50s"]
        );
    }
}
