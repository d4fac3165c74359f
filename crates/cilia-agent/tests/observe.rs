//! Flows and the live monitor, from real traffic: "why was this dropped?"
//! answered with the reason, both identities and the deciding policy. L7
//! flows (HTTP requests the proxy reports) are recorded through the agent's
//! monitor as the proxy client does, then selected as `cilia observe` does.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cilia_testnet::{bin, require_privileges, AgentOptions, Netns, TestAgent};

const RULE1: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/starwars/cnp-l3-l4.yaml"
);
const DENY_TIEFIGHTER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/starwars/deny-tiefighter.yaml"
);

fn ipv4_of(ep: &serde_json::Value) -> IpAddr {
    ep["ipv4"].as_str().unwrap().parse().unwrap()
}

/// A deathstar and an xwing, each in a namespace of its own, under RULE1 (the
/// xwing may not land): their namespaces and the deathstar's endpoint.
fn deathstar_and_xwing_under_rule1(agent: &TestAgent) -> (Netns, Netns, serde_json::Value) {
    let (ds, xw) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    let deathstar = agent.create_endpoint(&ds, "org=empire,class=deathstar");
    agent.create_endpoint(&xw, "org=alliance,class=xwing");
    agent.cli_ok(&["policy", "import", RULE1]);
    (ds, xw, deathstar)
}

/// A connect that is expected to be dropped (times out).
fn try_connect(from: &Netns, to: SocketAddr) -> bool {
    from.run(|| TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok())
}

/// Polls `cilia observe` until a flow matches `pred` (bounded).
fn wait_for_flow(
    agent: &TestAgent,
    args: &[&str],
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut all = vec!["observe", "-o", "json"];
        all.extend(args);
        let out = agent.cli_ok(&all);
        let found = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|f| pred(f));
        if let Some(f) = found {
            return f;
        }
        assert!(Instant::now() < deadline, "no matching flow in:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn observe_names_reason_identities_and_policy_of_a_drop() {
    if !require_privileges("observe_names_reason_identities_and_policy_of_a_drop") {
        return;
    }
    let agent = TestAgent::start(AgentOptions::default());
    let (ds, tf, xw) = (
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
    );
    let deathstar = agent.create_endpoint(&ds, "org=empire,class=deathstar");
    let tiefighter = agent.create_endpoint(&tf, "org=empire,class=tiefighter");
    agent.create_endpoint(&xw, "org=alliance,class=xwing");
    let listener = ds.run(|| TcpListener::bind("0.0.0.0:80").unwrap());
    listener.set_nonblocking(true).unwrap();
    let port80 = SocketAddr::new(ipv4_of(&deathstar), 80);
    agent.cli_ok(&["policy", "import", RULE1]);

    assert!(!try_connect(&xw, port80), "xwing must be dropped");
    let started = Instant::now();
    let drop = wait_for_flow(
        &agent,
        &["--verdict", "DROPPED", "--to-label", "class=deathstar"],
        |f| f["source"]["labels"]["class"] == "xwing",
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "visible within a second"
    );
    assert_eq!(drop["drop_reason"], "Policy denied");
    assert_eq!(drop["policy"], "default deny");
    assert_eq!(drop["direction"], "ingress");
    assert_eq!(drop["protocol"], "TCP");
    assert_eq!(drop["destination"]["port"], 80);
    assert_eq!(drop["destination"]["identity"], deathstar["identity"]);
    assert!(drop["source"]["identity"].as_u64().unwrap() >= 256);
    // The dropped connection shows as drops only: no FORWARDED flow (such
    // as a debug event nobody asked for) precedes them.
    let xwing_flows = agent.cli_ok(&["observe", "-o", "json", "--from-label", "class=xwing"]);
    let verdicts: Vec<String> = xwing_flows
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|f| format!("{} {}", f["event"], f["verdict"]))
        .collect();
    assert!(
        !verdicts.is_empty() && verdicts.iter().all(|v| v == "\"drop\" \"DROPPED\""),
        "{verdicts:?}"
    );

    // The allowed tiefighter shows as a forwarded policy verdict naming rule1.
    assert!(try_connect(&tf, port80), "tiefighter lands");
    let allowed = wait_for_flow(
        &agent,
        &["--verdict", "FORWARDED", "--from-label", "class=tiefighter"],
        |f| f["event"] == "policy-verdict",
    );
    assert!(
        allowed["policy"].as_str().unwrap().contains("rule1"),
        "{allowed}"
    );

    // A drop by an ingressDeny rule names that rule.
    agent.cli_ok(&["policy", "import", DENY_TIEFIGHTER]);
    let mut src_port_flows = 0;
    while try_connect(&tf, port80) {
        src_port_flows += 1;
        assert!(src_port_flows < 3, "tiefighter must now be denied");
    }
    let denied = wait_for_flow(
        &agent,
        &["--verdict", "DROPPED", "--from-label", "class=tiefighter"],
        |f| {
            f["policy"]
                .as_str()
                .is_some_and(|p| p.contains("deny-tiefighter"))
        },
    );
    assert_eq!(denied["source"]["identity"], tiefighter["identity"]);

    // Human output is one line per flow.
    let text = agent.cli_ok(&[
        "observe",
        "--verdict",
        "DROPPED",
        "--protocol",
        "TCP",
        "--last",
        "1",
    ]);
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert!(text.contains("DROPPED (Policy denied)"), "{text}");
}

/// Packets the datapath counted, by kind ("drop", "forward") and reason.
fn counted(agent: &TestAgent, kind: &str, reason: Option<&str>) -> u64 {
    agent
        .cli_json(&["bpf", "metrics", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == kind && reason.is_none_or(|r| m["reason"] == r))
        .map(|m| m["packets"].as_u64().unwrap())
        .sum()
}

/// A container's kernel probes its link-local address (DAD) and reports its
/// multicast groups (MLD) when its interface comes up: real chatter from
/// real namespaces, absorbed by the datapath, so a quiet node shows no
/// drops at all and the flow ring holds nothing for it.
#[test]
fn new_endpoints_start_without_a_single_drop() {
    if !require_privileges("new_endpoints_start_without_a_single_drop") {
        return;
    }
    let agent = TestAgent::start(AgentOptions {
        ipv4_range: Some("10.200.0.0/24".into()),
        ..AgentOptions::default()
    });
    let namespaces: Vec<Netns> = (0..3).map(|_| Netns::new("cep").unwrap()).collect();
    for (i, ns) in namespaces.iter().enumerate() {
        agent.create_endpoint(ns, &format!("app=quiet{i}"));
    }
    // The kernel's unsolicited MLDv2 reports repeat within a second (the
    // default robustness and report interval); DAD sends its probe after
    // up to a second too. Wait until each endpoint was heard from, and a
    // little past the last repetition.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counted(&agent, "forward", Some("absorbed")) < namespaces.len() as u64 {
        assert!(Instant::now() < deadline, "no link chatter absorbed");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        counted(&agent, "drop", None),
        0,
        "drops on a quiet node: {}",
        agent.cli_ok(&["bpf", "metrics", "list"])
    );
    let dropped = agent.cli_ok(&["observe", "--verdict", "DROPPED", "-o", "json"]);
    assert!(dropped.trim().is_empty(), "dropped flows: {dropped}");
}

#[test]
fn monitor_streams_drops_live() {
    if !require_privileges("monitor_streams_drops_live") {
        return;
    }
    let agent = TestAgent::start(AgentOptions {
        ipv4_range: Some("10.200.0.0/24".into()),
        ..AgentOptions::default()
    });
    let (_ds, xw, deathstar) = deathstar_and_xwing_under_rule1(&agent);

    let mut child = Command::new(bin("cilia"))
        .arg("--socket")
        .arg(&agent.socket)
        .args(["monitor", "--type", "drop", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .find(|f| f["drop_reason"] == "Policy denied")
    });
    std::thread::sleep(Duration::from_millis(500));
    let target = SocketAddr::new(ipv4_of(&deathstar), 80);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reader.is_finished() && Instant::now() < deadline {
        try_connect(&xw, target);
    }
    let _ = child.kill();
    let _ = child.wait();
    let flow = reader
        .join()
        .unwrap()
        .expect("the monitor streamed the drop");
    assert_eq!(flow["event"], "drop");
    assert_eq!(flow["destination"]["endpoint"], deathstar["id"]);
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_scrape_matches_the_generated_traffic() {
    if !require_privileges("metrics_scrape_matches_the_generated_traffic") {
        return;
    }
    let agent = TestAgent::start(AgentOptions::default());
    let (_ds, xw, deathstar) = deathstar_and_xwing_under_rule1(&agent);
    let target = SocketAddr::new(ipv4_of(&deathstar), 80);
    for _ in 0..3 {
        assert!(!try_connect(&xw, target));
    }
    let text = agent.scrape_metrics();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    let denied = metric(
        &text,
        "cilia_drop_count_total{reason=\"Policy denied\",direction=\"ingress\"}",
    )
    .expect("policy drops exported");
    // The same counter the CLI reads from the kernel map.
    let cli = agent.cli_json(&["bpf", "metrics", "list"]);
    let kernel = cli
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["reason"] == "Policy denied" && m["direction"] == "ingress")
        .unwrap()["packets"]
        .as_f64()
        .unwrap();
    assert!(denied >= 3.0, "{denied}");
    assert!(kernel >= denied, "kernel {kernel} vs scraped {denied}");
    assert_eq!(metric(&text, "cilia_endpoints{state=\"ready\"}"), Some(2.0));
    assert!(text.contains("cilia_endpoint_regeneration_seconds_count"));
    assert!(text.contains(
        "cilia_api_request_duration_seconds_count{method=\"POST\",route=\"/v1/policy\"}"
    ));
    assert!(text.contains("cilia_bpf_map_pressure{map=\"cilia_ct\"}"));

    // The same state in `cilia status --verbose`.
    let status = agent.cli_ok(&["status", "--verbose"]);
    for needle in [
        "Subsystems:",
        "endpoints",
        "monitor",
        "cilia_ct",
        "cilia_ipcache",
    ] {
        assert!(status.contains(needle), "{needle} missing:\n{status}");
    }
    let json = agent.cli_json(&["status"]);
    let monitor = json["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "monitor")
        .unwrap();
    assert!(monitor["detail"]
        .as_str()
        .unwrap()
        .contains("drops and policy verdicts"));
}

#[test]
fn policy_audit_mode_lets_would_be_drops_pass_as_audit_verdicts() {
    if !require_privileges("policy_audit_mode") {
        return;
    }
    let agent = TestAgent::start(AgentOptions::default());
    let (ds, xw, deathstar) = deathstar_and_xwing_under_rule1(&agent);
    let _listener = ds.run(|| TcpListener::bind("0.0.0.0:80").unwrap());
    let target = SocketAddr::new(ipv4_of(&deathstar), 80);
    assert!(!try_connect(&xw, target), "enforced: dropped");

    let id = deathstar["id"].as_u64().unwrap().to_string();
    let out = agent.cli_json(&["endpoint", "config", &id, "policy-audit=enabled"]);
    assert_eq!(out["policy_audit"], true);
    assert!(try_connect(&xw, target), "audit: passes");
    let audit = wait_for_flow(&agent, &["--verdict", "AUDIT"], |f| {
        f["source"]["labels"]["class"] == "xwing"
    });
    assert_eq!(audit["policy"], "default deny");

    agent.cli_ok(&["endpoint", "config", &id, "policy-audit=disabled"]);
    assert!(!try_connect(&xw, target), "enforced again");
    let bad = agent.cli(&["endpoint", "config", &id, "policy-audit=maybe"]);
    assert!(!bad.status.success());
}

/// Sum of every sample of a metric family (lines starting with `name{` or `name `).
fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| {
            (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_flood_of_drops_keeps_memory_bounded_and_every_event_accounted() {
    if !require_privileges("flood_keeps_memory_bounded") {
        return;
    }
    let agent = TestAgent::start(AgentOptions::default());
    let (_ds, xw, deathstar) = deathstar_and_xwing_under_rule1(&agent);

    // Denied UDP as fast as one thread can send: every packet is a new
    // flow meeting the policy, so every packet is a drop event. Bounded in
    // count and time.
    let target = SocketAddr::new(ipv4_of(&deathstar), 9999);
    let sent = xw.run(|| {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut n = 0u64;
        while n < 400_000 && Instant::now() < deadline {
            if sock.send_to(b"flood", target).is_ok() {
                n += 1;
            }
        }
        n
    });
    assert!(sent > 10_000, "flood too small: {sent}");

    // Let the monitor drain, then account for every drop: each one was
    // either received by the monitor or counted as lost.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut drops, mut received, mut lost);
    loop {
        let text = agent.scrape_metrics();
        drops = metric_sum(&text, "cilia_drop_count_total", "");
        received = metric_sum(&text, "cilia_monitor_events_total", "type=\"drop\"");
        lost = metric_sum(&text, "cilia_events_lost_total", "type=\"drop\"");
        if received + lost >= drops || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(drops >= sent as f64 * 0.9, "drops {drops} for {sent} sent");
    let text = agent.scrape_metrics();
    assert_eq!(
        received + lost,
        drops,
        "received {received} + lost {lost} != drops {drops}\n{text}\nagent log:\n{}",
        agent.log_text()
    );

    // Bounded memory: the flow ring and channels are fixed-size.
    let pid = agent.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(
        rss_kib < 256 * 1024,
        "agent RSS {rss_kib} KiB after a flood of {sent} drops"
    );
}

/// The tiefighter's `PUT /v1/exhaust-port`, denied by the deathstar's
/// ingress L7 policy (endpoint 1, fd00::2).
fn denied_put() -> cilia_proxy::control::L7Flow {
    use cilia_proxy::control::{L7Direction, L7Flow, L7Verdict};
    L7Flow {
        time_unix_ns: 1_700_000_000_000_000_000,
        endpoint_id: 1,
        direction: L7Direction::Ingress,
        src: "[fd00::3]:40000".parse().unwrap(),
        dst: "[fd00::2]:80".parse().unwrap(),
        src_identity: 300,
        dst_identity: 301,
        method: "PUT".into(),
        path: "/v1/exhaust-port".into(),
        host: Some("deathstar".into()),
        status: 403,
        latency_us: 400,
        verdict: L7Verdict::Denied,
        rules: vec!["default/rule1".into()],
    }
}

#[tokio::test]
async fn observe_selects_l7_flows_by_type_method_and_path_with_the_other_filters() {
    use cilia_agent::monitor::{Monitor, Names};
    use cilia_api::flows::FlowFilter;
    let monitor = Monitor::new(16, cilia_agent::metrics::AgentMetrics::default());
    monitor.set_names(Names {
        endpoints: [(
            1,
            (
                std::sync::Arc::new([("class".to_string(), "deathstar".to_string())].into()),
                "default".to_string(),
            ),
        )]
        .into(),
        addresses: [("fd00::2".parse().unwrap(), 1)].into(),
        ..Names::default()
    });
    let landing = cilia_proxy::control::L7Flow {
        method: "POST".into(),
        path: "/v1/request-landing".into(),
        status: 200,
        verdict: cilia_proxy::control::L7Verdict::Forwarded,
        ..denied_put()
    };
    monitor.record_l7(&landing).await;
    monitor.record_l7(&denied_put()).await;

    let select = |filter: FlowFilter| -> Vec<serde_json::Value> {
        let matcher = filter.compile().unwrap();
        monitor
            .recent()
            .iter()
            .filter(|f| matcher.matches(f))
            .map(|f| serde_json::to_value(&**f).unwrap())
            .collect()
    };
    // `cilia observe --type l7 --http-method put --http-path '/v1/.*'
    //  --to-label class=deathstar --verdict DROPPED`
    let denied = select(FlowFilter {
        types: Some("l7".into()),
        http_method: Some("put".into()),
        http_path: Some("/v1/.*".into()),
        to_label: Some("class=deathstar".into()),
        verdict: Some("DROPPED".into()),
        ..Default::default()
    });
    assert_eq!(denied.len(), 1, "{denied:?}");
    let f = &denied[0];
    assert_eq!(f["event"], "l7");
    assert_eq!(f["drop_reason"], "L7 policy denied");
    assert_eq!(f["policy"], "default/rule1");
    assert_eq!(f["destination"]["labels"]["class"], "deathstar");
    assert_eq!(
        f["l7"],
        serde_json::json!({"protocol": "http", "method": "PUT", "path": "/v1/exhaust-port",
            "host": "deathstar", "status": 403, "latency_us": 400, "verdict": "denied"})
    );
    // The whole path must match; a packet-only filter still sees L7 flows.
    assert!(select(FlowFilter {
        http_path: Some("/v1/".into()),
        ..Default::default()
    })
    .is_empty());
    assert_eq!(
        select(FlowFilter {
            protocol: Some("TCP".into()),
            port: Some(80),
            ..Default::default()
        })
        .len(),
        2
    );
    assert!(select(FlowFilter {
        types: Some("drop,policy-verdict".into()),
        ..Default::default()
    })
    .is_empty());
}

#[test]
fn an_http_path_that_is_no_regex_is_refused_naming_the_parameter() {
    if !require_privileges("an_http_path_that_is_no_regex_is_refused_naming_the_parameter") {
        return;
    }
    let agent = TestAgent::start(AgentOptions::default());
    let out = agent.cli(&["observe", "--type", "l7", "--http-path", "/v1/("]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http_path") && err.contains("invalid regular expression"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A valid one lists nothing: no proxy has reported a request.
    assert_eq!(
        agent.cli_ok(&["observe", "--type", "l7", "--http-path", "/v1/.*"]),
        ""
    );
}
