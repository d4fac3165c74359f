//! End-to-end policy: a real agent in a node namespace, endpoints in their
//! own namespaces, real TCP between them, policies imported through the
//! `cilia` CLI and enforced by the loaded BPF programs.
//!
//! A "world" outside the cluster is a namespace of the test's own, wired to
//! the node namespace with a veth pair and documentation addresses only
//! (203.0.113.0/24, 2001:db8:1::/64); forwarding is switched on inside the
//! node namespace only.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cilia_testnet::{ip_of, privileged, AgentOptions, Netns, TestAgent};

const CNP_RULE1: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/starwars/cnp-l3-l4.yaml"
);
const NP_RULE1: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/starwars/networkpolicy-l3-l4.yaml"
);
const CNP_L7: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/starwars/cnp-l7.yaml"
);
const DENY_TIEFIGHTER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/starwars/deny-tiefighter.yaml"
);

/// How long a connect or a read may take before the flow counts as dropped.
const DROP_TIMEOUT: Duration = Duration::from_secs(1);

fn id_of(ep: &serde_json::Value) -> String {
    ep["id"].as_u64().unwrap().to_string()
}

/// A TCP echo server in a namespace: accepts (bounded in count and time)
/// until dropped; each connection echoes until EOF, error or 30 s idle.
struct EchoServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: &Netns, bind: SocketAddr) -> Self {
        let listener = ns.run(|| TcpListener::bind(bind).unwrap());
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(180);
            let mut accepted = 0;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline && accepted < 64 {
                match listener.accept() {
                    Ok((conn, _)) => {
                        accepted += 1;
                        std::thread::spawn(move || echo(conn));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => break,
                }
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 1024];
    for _ in 0..1000 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// One echo round trip on an open connection.
fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    conn.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    conn.read_exact(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    if buf == msg {
        Ok(())
    } else {
        Err(format!("echo mismatch: {buf:?}"))
    }
}

/// Opens a TCP connection from inside `from` (1 s connect timeout, 1 s read
/// timeout).
fn connect(from: &Netns, to: SocketAddr) -> Result<TcpStream, String> {
    let conn = from
        .run(|| TcpStream::connect_timeout(&to, DROP_TIMEOUT))
        .map_err(|e| format!("connect {to}: {e}"))?;
    conn.set_read_timeout(Some(DROP_TIMEOUT)).unwrap();
    conn.set_write_timeout(Some(DROP_TIMEOUT)).unwrap();
    Ok(conn)
}

/// A fresh connection from `from` to `to` completes one echo round trip.
fn tcp_talks(from: &Netns, to: SocketAddr) -> Result<(), String> {
    let mut conn = connect(from, to)?;
    round_trip(&mut conn, b"hello deathstar")
}

fn assert_talks(from: &Netns, to: SocketAddr, what: &str) {
    if let Err(e) = tcp_talks(from, to) {
        panic!("{what}: expected the connection to work, got {e}");
    }
}

/// The connection is dropped (a timeout), not refused or answered.
fn assert_blocked(from: &Netns, to: SocketAddr, what: &str) {
    match tcp_talks(from, to) {
        Ok(()) => panic!("{what}: expected the connection to be dropped, but it worked"),
        Err(e) => assert!(
            e.contains("timed out") || e.contains("temporarily unavailable"),
            "{what}: expected a drop (timeout), got {e}"
        ),
    }
}

/// `cilia policy import -` with inline YAML, asserting success.
fn import_yaml(agent: &TestAgent, yaml: &str) {
    let out = agent.cli_stdin(&["policy", "import", "-"], yaml);
    assert!(
        out.status.success(),
        "policy import failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
}

fn policy_names(agent: &TestAgent) -> Vec<String> {
    let list = agent.cli_json(&["policy", "get"]);
    list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

fn trace(agent: &TestAgent, src: &str, dst: &str, dport: &str) -> serde_json::Value {
    agent.cli_json(&[
        "policy",
        "trace",
        "--src",
        src,
        "--dst",
        dst,
        "--dport",
        dport,
        "--datapath",
    ])
}

/// The Star Wars demo: three endpoints and a TCP echo server on the
/// deathstar's port 80 (both families, one dual-stack socket).
struct Starwars {
    deathstar: serde_json::Value,
    tiefighter: serde_json::Value,
    xwing: serde_json::Value,
    ds_ns: Netns,
    tf_ns: Netns,
    xw_ns: Netns,
    _server: EchoServer,
}

impl Starwars {
    fn new(agent: &TestAgent) -> Self {
        let (ds_ns, tf_ns, xw_ns) = (
            Netns::new("cep").unwrap(),
            Netns::new("cep").unwrap(),
            Netns::new("cep").unwrap(),
        );
        let deathstar = agent.create_endpoint(&ds_ns, "org=empire,class=deathstar");
        let tiefighter = agent.create_endpoint(&tf_ns, "org=empire,class=tiefighter");
        let xwing = agent.create_endpoint(&xw_ns, "org=alliance,class=xwing");
        let server = EchoServer::start(&ds_ns, "[::]:80".parse().unwrap());
        Self {
            deathstar,
            tiefighter,
            xwing,
            ds_ns,
            tf_ns,
            xw_ns,
            _server: server,
        }
    }

    fn deathstar(&self, family: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip_of(&self.deathstar, family), port)
    }
}

fn policy_denied_drops(agent: &TestAgent) -> u64 {
    drops(agent, "Policy denied")
}

/// Packets the datapath dropped for `reason`, both directions.
fn drops(agent: &TestAgent, reason: &str) -> u64 {
    agent
        .cli_json(&["bpf", "metrics", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == "drop" && m["reason"] == reason)
        .map(|m| m["packets"].as_u64().unwrap())
        .sum()
}

/// Shared body of the CNP and NetworkPolicy flavours of the Star Wars demo.
fn only_the_empire_lands(policy_file: &str) {
    let agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    for family in ["ipv6", "ipv4"] {
        assert_talks(&sw.tf_ns, sw.deathstar(family, 80), "tiefighter, no policy");
        assert_talks(&sw.xw_ns, sw.deathstar(family, 80), "xwing, no policy");
    }
    assert_eq!(policy_denied_drops(&agent), 0);

    agent.cli_ok(&["policy", "import", policy_file]);
    for family in ["ipv6", "ipv4"] {
        assert_talks(&sw.tf_ns, sw.deathstar(family, 80), "tiefighter -> :80");
        assert_blocked(&sw.xw_ns, sw.deathstar(family, 80), "xwing -> :80");
        assert_blocked(&sw.tf_ns, sw.deathstar(family, 81), "tiefighter -> :81");
    }
    assert!(policy_denied_drops(&agent) > 0, "a Policy denied drop");

    let t = trace(&agent, &id_of(&sw.xwing), &id_of(&sw.deathstar), "80/TCP");
    assert_eq!(t["verdict"], "DENIED", "{t:#}");
    assert_eq!(t["datapath"], "DENIED", "{t:#}");
    let t = trace(
        &agent,
        &id_of(&sw.tiefighter),
        &id_of(&sw.deathstar),
        "80/TCP",
    );
    assert_eq!(t["verdict"], "ALLOWED", "{t:#}");
    assert_eq!(t["datapath"], "ALLOWED", "{t:#}");
}

#[test]
fn starwars_cnp_lets_only_the_empire_land() {
    privileged!("starwars_cnp_lets_only_the_empire_land");
    only_the_empire_lands(CNP_RULE1);
}

#[test]
fn starwars_networkpolicy_lets_only_the_empire_land() {
    privileged!("starwars_networkpolicy_lets_only_the_empire_land");
    only_the_empire_lands(NP_RULE1);
}

/// `policy trace --http-*` on the Star Wars L7 policy: the landing request
/// is allowed by the HTTP rule, the exhaust-port request gets 403, the
/// xwing is denied at L3/L4, and without a request the trace says the flow
/// goes to the proxy.
#[test]
fn trace_runs_an_http_request_through_the_l7_rules() {
    privileged!("trace_runs_an_http_request_through_the_l7_rules");
    let agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    agent.cli_ok(&["policy", "import", CNP_L7]);
    let (tie, ds, xwing) = (
        id_of(&sw.tiefighter),
        id_of(&sw.deathstar),
        id_of(&sw.xwing),
    );
    let http_trace = |src: &str, method: &str, path: &str| {
        agent.cli_json(&[
            "policy",
            "trace",
            "--src",
            src,
            "--dst",
            &ds,
            "--dport",
            "80/TCP",
            "--http-method",
            method,
            "--http-path",
            path,
            "--http-header",
            "X-Ship: tie",
        ])
    };
    let t = http_trace(&tie, "POST", "/v1/request-landing");
    assert_eq!(t["verdict"], "ALLOWED", "{t:#}");
    assert_eq!(t["http_verdict"], "ALLOWED", "{t:#}");
    let ingress = &t["steps"][1];
    assert_eq!(ingress["direction"], "ingress", "{t:#}");
    assert_eq!(ingress["l7"]["redirected"], true, "{t:#}");
    assert_eq!(
        ingress["l7"]["matched"],
        "CiliumNetworkPolicy default/rule1 ingress[0] toPorts[0].rules.http[0]",
        "{t:#}"
    );
    let t = http_trace(&tie, "PUT", "/v1/exhaust-port");
    assert_eq!(t["verdict"], "ALLOWED", "{t:#}");
    assert_eq!(t["http_verdict"], "DENIED", "{t:#}");
    assert!(t.to_string().contains("403 Access denied"), "{t:#}");
    let t = http_trace(&xwing, "POST", "/v1/request-landing");
    assert_eq!(t["verdict"], "DENIED", "{t:#}");
    assert!(t["http_verdict"].is_null(), "{t:#}");

    let table = agent.cli_ok(&[
        "policy", "trace", "--src", &tie, "--dst", &ds, "--dport", "80/TCP",
    ]);
    assert!(table.contains("redirected to the L7 proxy"), "{table}");
    assert!(table.contains("decide per request"), "{table}");
}

#[test]
fn ingress_deny_names_the_rule() {
    privileged!("ingress_deny_names_the_rule");
    let agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    agent.cli_ok(&["policy", "import", CNP_RULE1]);
    assert_talks(
        &sw.tf_ns,
        sw.deathstar("ipv6", 80),
        "tiefighter under rule1",
    );

    agent.cli_ok(&["policy", "import", DENY_TIEFIGHTER]);
    for family in ["ipv6", "ipv4"] {
        assert_blocked(&sw.tf_ns, sw.deathstar(family, 80), "denied tiefighter");
    }
    let t = trace(
        &agent,
        &id_of(&sw.tiefighter),
        &id_of(&sw.deathstar),
        "80/TCP",
    );
    assert_eq!(t["verdict"], "DENIED", "{t:#}");
    assert_eq!(t["datapath"], "DENIED", "{t:#}");
    assert!(t.to_string().contains("deny-tiefighter"), "{t:#}");
    let table = agent.cli_ok(&[
        "policy",
        "trace",
        "--src",
        &id_of(&sw.tiefighter),
        "--dst",
        &id_of(&sw.deathstar),
        "--dport",
        "80/TCP",
    ]);
    assert!(table.contains("deny-tiefighter"), "{table}");
}

#[test]
fn a_deny_document_on_its_separator_line_is_enforced_and_reported() {
    privileged!("a_deny_document_on_its_separator_line_is_enforced_and_reported");
    let agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    let allow = std::fs::read_to_string(CNP_RULE1).unwrap();
    // Valid YAML: the second document's content starts on its `---` line.
    let stream = format!(
        "{allow}--- {{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {{name: deny-tf}}, spec: {{endpointSelector: {{matchLabels: {{class: deathstar}}}}, ingressDeny: [{{fromEndpoints: [{{matchLabels: {{class: tiefighter}}}}]}}]}}}}\n---\n"
    );
    let out = agent.cli_stdin(&["policy", "import", "-"], &stream);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "stdin: read 3 document(s)",
        "note: document 3 is empty: skipped",
        "created CiliumNetworkPolicy default/rule1",
        "created CiliumNetworkPolicy default/deny-tf",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in:\n{text}"
        );
    }
    for family in ["ipv6", "ipv4"] {
        assert_blocked(&sw.tf_ns, sw.deathstar(family, 80), "denied tiefighter");
    }
    // Both are stored (as normalised documents); a second import replaces them.
    let mut names = policy_names(&agent);
    names.sort();
    assert_eq!(names, ["deny-tf", "rule1"]);
    let out = agent.cli_stdin(&["policy", "import", "-"], &stream);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("replaced CiliumNetworkPolicy default/deny-tf") && !text.contains("created"),
        "{text}"
    );
}

/// A world namespace wired to the node namespace: the node side is
/// 203.0.113.1 / 2001:db8:1::1, the world answers on 203.0.113.10 and
/// 203.0.113.11 (and 2001:db8:1::10) and routes the endpoint ranges back via
/// the node. Forwarding is switched on in the node namespace only.
fn world(agent: &TestAgent) -> Netns {
    let root_fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let w = Netns::new("cwld").unwrap();
    w.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "wld0",
        "netns",
        agent.node.name(),
    ])
    .unwrap();
    let node = &agent.node;
    node.ip(&["addr", "add", "203.0.113.1/24", "dev", "wld0"])
        .unwrap();
    node.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "wld0", "nodad"])
        .unwrap();
    node.ip(&["link", "set", "wld0", "up"]).unwrap();
    for addr in ["203.0.113.10/24", "203.0.113.11/24"] {
        w.ip(&["addr", "add", addr, "dev", "eth0"]).unwrap();
    }
    w.ip(&["addr", "add", "2001:db8:1::10/64", "dev", "eth0", "nodad"])
        .unwrap();
    w.ip(&["link", "set", "eth0", "up"]).unwrap();
    w.ip(&["route", "add", "10.200.0.0/24", "via", "203.0.113.1"])
        .unwrap();
    w.ip(&[
        "-6",
        "route",
        "add",
        "fd00:c1a::/112",
        "via",
        "2001:db8:1::1",
    ])
    .unwrap();
    node.sh("echo 1 > /proc/sys/net/ipv4/ip_forward && \
         echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")
        .unwrap();
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        root_fwd,
        "the root namespace's forwarding is untouched"
    );
    w
}

/// A client endpoint, a world with servers on 203.0.113.10:8080 and
/// 203.0.113.11:8080, and the check that both are reachable without policy.
fn client_and_world(agent: &TestAgent) -> (Netns, Netns, [EchoServer; 2]) {
    let client = Netns::new("cep").unwrap();
    agent.create_endpoint(&client, "app=client");
    let w = world(agent);
    let servers = [
        EchoServer::start(&w, "203.0.113.10:8080".parse().unwrap()),
        EchoServer::start(&w, "203.0.113.11:8080".parse().unwrap()),
    ];
    for host in ["203.0.113.10:8080", "203.0.113.11:8080"] {
        assert_talks(&client, host.parse().unwrap(), "world without policy");
    }
    (client, w, servers)
}

/// A started agent and the client and world of [`client_and_world`], then a
/// CiliumNetworkPolicy `name` that gives the client the `egress` rules (a YAML
/// list at the indentation of `spec.egress`).
fn client_and_world_under_egress(
    name: &str,
    egress: &str,
) -> (TestAgent, Netns, Netns, [EchoServer; 2]) {
    let agent = TestAgent::start(AgentOptions::default());
    let (client, world, servers) = client_and_world(&agent);
    import_yaml(
        &agent,
        &format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n\
             spec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:{egress}"
        ),
    );
    (agent, client, world, servers)
}

#[test]
fn egress_to_cidr_reaches_only_the_listed_world_host() {
    privileged!("egress_to_cidr_reaches_only_the_listed_world_host");
    let (agent, client, _world, _servers) = client_and_world_under_egress(
        "to-world-host",
        r#"
  - toCIDR:
    - 203.0.113.10/32
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"#,
    );
    assert_talks(&client, "203.0.113.10:8080".parse().unwrap(), "listed host");
    assert_blocked(&client, "203.0.113.11:8080".parse().unwrap(), "other host");

    let ipcache = agent.cli_json(&["bpf", "ipcache", "list"]);
    let entry = ipcache
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["prefix"] == "203.0.113.10/32")
        .unwrap_or_else(|| panic!("203.0.113.10/32 in the ipcache: {ipcache:#}"));
    assert!(
        entry["identity"].as_u64().unwrap() >= 16_777_216,
        "a local CIDR identity: {entry}"
    );
}

#[test]
fn egress_to_cidr_set_honours_except() {
    privileged!("egress_to_cidr_set_honours_except");
    let (_agent, client, _world, _servers) = client_and_world_under_egress(
        "to-world-but-one",
        r#"
  - toCIDRSet:
    - cidr: 203.0.113.0/24
      except:
      - 203.0.113.11/32
"#,
    );
    assert_talks(
        &client,
        "203.0.113.10:8080".parse().unwrap(),
        "inside the set",
    );
    assert_blocked(&client, "203.0.113.11:8080".parse().unwrap(), "the except");
}

#[test]
fn revoking_a_policy_stops_an_established_connection() {
    privileged!("revoking_a_policy_stops_an_established_connection");
    let agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    agent.cli_ok(&["policy", "import", CNP_RULE1]);

    let mut conn = connect(&sw.tf_ns, sw.deathstar("ipv6", 80)).unwrap();
    round_trip(&mut conn, b"first").unwrap();
    round_trip(&mut conn, b"second").unwrap();

    agent.cli_ok(&["policy", "delete", "rule1"]);
    import_yaml(
        &agent,
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rebels-only
spec:
  endpointSelector:
    matchLabels:
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: alliance
"#,
    );
    let after = round_trip(&mut conn, b"after revocation");
    assert!(after.is_err(), "the open connection must stop: {after:?}");
    assert_blocked(&sw.tf_ns, sw.deathstar("ipv6", 80), "new tiefighter flow");
    assert_talks(&sw.xw_ns, sw.deathstar("ipv6", 80), "xwing now allowed");
}

#[test]
fn replies_flow_through_conntrack() {
    privileged!("replies_flow_through_conntrack");
    let agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    let tf_server = EchoServer::start(&sw.tf_ns, "[::]:0".parse().unwrap());
    import_yaml(
        &agent,
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: deathstar-from-tiefighter
spec:
  endpointSelector:
    matchLabels:
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        class: tiefighter
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: tiefighter-closed
spec:
  endpointSelector:
    matchLabels:
      class: tiefighter
  ingress:
  - {}
"#,
    );
    for family in ["ipv6", "ipv4"] {
        assert_talks(&sw.tf_ns, sw.deathstar(family, 80), "request and reply");
        let tf = SocketAddr::new(ip_of(&sw.tiefighter, family), tf_server.port);
        assert_blocked(&sw.ds_ns, tf, "deathstar -> tiefighter");
        assert_blocked(&sw.xw_ns, sw.deathstar(family, 80), "xwing -> deathstar");
    }
    // The allowed flow has one CT entry, opened by tiefighter, that saw replies.
    let ct = agent.cli_json(&["bpf", "ct", "list"]);
    let port80: Vec<_> = ct
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["destination"].as_str().unwrap().ends_with(":80"))
        .collect();
    assert_eq!(port80.len(), 2, "one entry per family: {ct:#}");
    for e in port80 {
        assert_eq!(e["seen_reply"], true, "{e}");
        assert_eq!(e["src_identity"], sw.tiefighter["identity"], "{e}");
    }
    let dport = format!("{}/TCP", tf_server.port);
    let t = trace(
        &agent,
        &id_of(&sw.deathstar),
        &id_of(&sw.tiefighter),
        &dport,
    );
    assert_eq!(t["verdict"], "DENIED", "{t:#}");
    assert_eq!(t["datapath"], "DENIED", "{t:#}");
}

fn create_in_namespace(
    agent: &TestAgent,
    netns: &Netns,
    labels: &str,
    ns: &str,
) -> serde_json::Value {
    agent.cli_json(&[
        "endpoint",
        "create",
        "--netns",
        netns.name(),
        "--labels",
        labels,
        "--namespace",
        ns,
    ])
}

#[test]
fn namespace_selector_via_namespace_labels() {
    privileged!("namespace_selector_via_namespace_labels");
    let agent = TestAgent::start(AgentOptions::default());
    agent.cli_ok(&["namespace", "set", "prod", "--labels", "team=pay"]);
    agent.cli_ok(&["namespace", "set", "dev"]);
    let (srv_ns, prod_ns, dev_ns) = (
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
    );
    let server = create_in_namespace(&agent, &srv_ns, "app=ledger", "prod");
    create_in_namespace(&agent, &prod_ns, "app=shop", "prod");
    create_in_namespace(&agent, &dev_ns, "app=shop", "dev");
    let _echo = EchoServer::start(&srv_ns, "[::]:80".parse().unwrap());
    let target = SocketAddr::new(ip_of(&server, "ipv4"), 80);

    import_yaml(
        &agent,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: pay-team-only
  namespace: prod
spec:
  podSelector:
    matchLabels:
      app: ledger
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          team: pay
"#,
    );
    assert_talks(&prod_ns, target, "from prod");
    assert_blocked(&dev_ns, target, "from dev");

    agent.cli_ok(&["namespace", "set", "dev", "--labels", "team=pay"]);
    assert_talks(&dev_ns, target, "from dev once labelled team=pay");
    assert_talks(
        &dev_ns,
        SocketAddr::new(ip_of(&server, "ipv6"), 80),
        "from dev over IPv6",
    );
}

/// Asserts a CLI failure with a one-line message containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

#[test]
fn invalid_policy_is_rejected_and_keeps_the_last_good_state() {
    privileged!("invalid_policy_is_rejected_and_keeps_the_last_good_state");
    let agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    agent.cli_ok(&["policy", "import", CNP_RULE1]);
    let before = agent.cli_json(&["policy", "get"]);
    let bpf_before = agent.cli_json(&["bpf", "policy", "get", &id_of(&sw.deathstar)]);

    let mixed = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: valid-one
spec:
  endpointSelector:
    matchLabels:
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: alliance
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bad-port
spec:
  endpointSelector:
    matchLabels:
      class: deathstar
  ingress:
  - toPorts:
    - ports:
      - port: "eighty!"
        protocol: TCP
"#;
    assert_one_line_error(
        &agent.cli_stdin(&["policy", "import", "-"], mixed),
        "spec.ingress[0].toPorts[0].ports[0].port",
    );
    let fqdn = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: to-fqdn
spec:
  endpointSelector:
    matchLabels:
      class: tiefighter
  egress:
  - toFQDNs:
    - matchName: example.com
"#;
    assert_one_line_error(
        &agent.cli_stdin(&["policy", "import", "-"], fqdn),
        "not supported",
    );

    assert_eq!(policy_names(&agent), ["rule1"]);
    assert_eq!(before, agent.cli_json(&["policy", "get"]), "same revision");
    assert_eq!(
        bpf_before,
        agent.cli_json(&["bpf", "policy", "get", &id_of(&sw.deathstar)]),
        "same kernel policy map"
    );
    assert_talks(&sw.tf_ns, sw.deathstar("ipv6", 80), "tiefighter");
    assert_blocked(&sw.xw_ns, sw.deathstar("ipv6", 80), "xwing");
}

#[test]
fn policies_survive_an_agent_restart() {
    privileged!("policies_survive_an_agent_restart");
    let mut agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    agent.cli_ok(&["policy", "import", CNP_RULE1]);
    assert_blocked(&sw.xw_ns, sw.deathstar("ipv4", 80), "xwing before restart");

    agent.kill9();
    agent.spawn().unwrap();
    assert_eq!(policy_names(&agent), ["rule1"]);
    for family in ["ipv6", "ipv4"] {
        assert_talks(
            &sw.tf_ns,
            sw.deathstar(family, 80),
            "tiefighter after restart",
        );
        assert_blocked(&sw.xw_ns, sw.deathstar(family, 80), "xwing after restart");
    }
    let t = trace(&agent, &id_of(&sw.xwing), &id_of(&sw.deathstar), "80/TCP");
    assert_eq!(t["verdict"], "DENIED", "{t:#}");
    assert_eq!(t["datapath"], "DENIED", "{t:#}");
}

#[test]
fn identities_and_yaml_listing_reflect_labels_and_policies() {
    privileged!("identities_and_yaml_listing");
    let agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    let twin_ns = Netns::new("cep").unwrap();
    // A second tiefighter shares the first one's identity.
    let twin = agent.create_endpoint(&twin_ns, "org=empire,class=tiefighter");
    assert_eq!(twin["identity"], sw.tiefighter["identity"]);
    assert_ne!(sw.tiefighter["identity"], sw.xwing["identity"]);

    let ids = agent.cli_json(&["identity", "list"]);
    let ids = ids.as_array().unwrap();
    for (id, label) in [
        (1, "reserved:host"),
        (2, "reserved:world"),
        (5, "reserved:init"),
    ] {
        assert!(
            ids.iter()
                .any(|i| i["id"] == id && i["labels"].get(label).is_some()),
            "reserved identity {id} ({label}) listed"
        );
    }
    let tf_id = sw.tiefighter["identity"].as_u64().unwrap();
    assert!(tf_id >= 256);
    let one = agent.cli_json(&["identity", "get", &tf_id.to_string()]);
    assert_eq!(one["labels"]["class"], "tiefighter");
    assert_eq!(one["labels"]["io.kubernetes.pod.namespace"], "default");
    assert_eq!(one["endpoints"].as_array().unwrap().len(), 2);

    agent.cli_ok(&["policy", "import", CNP_RULE1]);
    let yaml = agent.cli_ok(&["policy", "get", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: CiliumNetworkPolicy") && yaml.contains("rule1"),
        "{yaml}"
    );
    // The listing re-imports as is.
    let again = agent.cli_stdin(&["policy", "import", "-"], &yaml);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(policy_names(&agent).len(), 1);

    // Deleting the twin leaves the shared identity; deleting both frees it.
    agent.cli_ok(&["endpoint", "delete", &id_of(&twin)]);
    assert!(agent
        .cli(&["identity", "get", &tf_id.to_string()])
        .status
        .success());
    agent.cli_ok(&["endpoint", "delete", &id_of(&sw.tiefighter)]);
    assert!(!agent
        .cli(&["identity", "get", &tf_id.to_string()])
        .status
        .success());
}

/// A UDP socket in the node namespace that sends with `src` as its source
/// address although the node does not hold it (IP_TRANSPARENT, as any
/// process with CAP_NET_ADMIN or a raw socket can).
fn node_socket_with_borrowed_source(agent: &TestAgent, src: IpAddr) -> std::net::UdpSocket {
    use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType};
    let IpAddr::V4(src) = src else {
        panic!("IPv4 expected")
    };
    agent.node.run(|| {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        setsockopt(&fd, sockopt::IpTransparent, &true).unwrap();
        let addr = nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(src, 0));
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).unwrap();
        std::net::UdpSocket::from(fd)
    })
}

fn udp_arrives(receiver: &std::net::UdpSocket, send: impl FnOnce()) -> bool {
    receiver.set_read_timeout(Some(DROP_TIMEOUT)).unwrap();
    send();
    let mut buf = [0u8; 64];
    receiver.recv_from(&mut buf).is_ok()
}

#[test]
fn a_node_process_borrowing_an_endpoints_address_is_not_that_endpoint() {
    privileged!("borrowed_source");
    let agent = TestAgent::start(AgentOptions::default());
    let (a_ns, b_ns) = (Netns::new("cspa").unwrap(), Netns::new("cspb").unwrap());
    let a = agent.create_endpoint(&a_ns, "app=a");
    let b = agent.create_endpoint(&b_ns, "app=b");
    import_yaml(
        &agent,
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: only-a
spec:
  endpointSelector:
    matchLabels:
      app: b
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: a
",
    );
    let (a_ip, b_ip) = (ip_of(&a, "ipv4"), ip_of(&b, "ipv4"));
    let receiver = b_ns.run(|| std::net::UdpSocket::bind(SocketAddr::new(b_ip, 0)).unwrap());
    let to = receiver.local_addr().unwrap();
    // The legitimate case: a itself reaches b.
    let from_a = a_ns.run(|| std::net::UdpSocket::bind(SocketAddr::new(a_ip, 0)).unwrap());
    assert!(
        udp_arrives(&receiver, || {
            from_a.send_to(b"from a", to).unwrap();
        }),
        "a -> b must pass"
    );
    // The node sending with a's address is not a.
    let spoof = node_socket_with_borrowed_source(&agent, a_ip);
    let before = drops(&agent, "Invalid source address");
    assert!(
        !udp_arrives(&receiver, || {
            spoof.send_to(b"not a", to).unwrap();
        }),
        "a node process with a's address must not pass b's policy as a"
    );
    // Local endpoints reach each other by redirect, never through the
    // node's stack: the datapath drops the forgery by name.
    assert!(
        drops(&agent, "Invalid source address") > before,
        "counted as a forged source"
    );
    let ipcache = agent.cli_json(&["bpf", "ipcache", "list"]);
    assert!(
        !ipcache.to_string().contains(&format!("\"{a_ip}/32\"")),
        "a local endpoint address is no ipcache entry: {ipcache:#}"
    );
}

#[test]
fn a_stored_policy_that_no_longer_parses_fails_closed_and_shows_in_status() {
    privileged!("broken_stored_policy");
    let mut agent = TestAgent::start(AgentOptions::default());
    let (a_ns, b_ns) = (Netns::new("cbra").unwrap(), Netns::new("cbrb").unwrap());
    let _a = agent.create_endpoint(&a_ns, "app=a");
    let b = agent.create_endpoint(&b_ns, "app=b");
    let server = EchoServer::start(&b_ns, SocketAddr::new(ip_of(&b, "ipv4"), 0));
    let to_b = SocketAddr::new(ip_of(&b, "ipv4"), server.port);
    assert_talks(&a_ns, to_b, "a -> b with no policy");

    // A policy stored by an earlier version that this one no longer parses.
    agent.kill9();
    {
        let store =
            cilia_agent::store::Store::open(&agent.state_dir.join(cilia_agent::paths::STATE_DB))
                .unwrap();
        store
            .put_policies(&[cilia_agent::store::StoredPolicy {
                kind: "CiliumNetworkPolicy".into(),
                namespace: Some("default".into()),
                name: "legacy".into(),
                yaml: "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: legacy\nspec:\n  endpointSelector: {}\n  retiredField: true\n".into(),
                origin: None,
            }])
            .unwrap();
    }
    agent.spawn().unwrap();
    assert_blocked(&a_ns, to_b, "a -> b while the stored policy is broken");
    let status = agent.cli_json(&["status"]);
    let errors = status["policy_errors"].to_string();
    assert!(
        errors.contains("CiliumNetworkPolicy default/legacy"),
        "{status:#}"
    );
    assert!(errors.contains("retiredField"), "{status:#}");
    let verbose = agent.cli_ok(&["status", "--verbose"]);
    assert!(verbose.contains("legacy"), "{verbose}");

    agent.cli_ok(&["policy", "delete", "legacy"]);
    assert_talks(&a_ns, to_b, "a -> b once the broken policy is deleted");
}

/// Three endpoints for the named-port tests: `web` declares
/// `http=TCP/8080`, `web2` (same labels, so the same identity) declares
/// nothing, `client`; echo servers on 8080 and 9090 of both web endpoints.
struct NamedPorts {
    web: serde_json::Value,
    web2: serde_json::Value,
    client_ns: Netns,
    _ns: [Netns; 2],
    _servers: [EchoServer; 4],
}

impl NamedPorts {
    fn new(agent: &TestAgent, web2_labels: &str) -> Self {
        let (web_ns, web2_ns, client_ns) = (
            Netns::new("cep").unwrap(),
            Netns::new("cep").unwrap(),
            Netns::new("cep").unwrap(),
        );
        let web = agent.cli_json(&[
            "endpoint",
            "create",
            "--netns",
            web_ns.name(),
            "--labels",
            "app=web",
            "--named-port",
            "http=TCP/8080",
        ]);
        let web2 = agent.create_endpoint(&web2_ns, web2_labels);
        agent.create_endpoint(&client_ns, "app=client");
        let servers = [
            EchoServer::start(&web_ns, "[::]:8080".parse().unwrap()),
            EchoServer::start(&web_ns, "[::]:9090".parse().unwrap()),
            EchoServer::start(&web2_ns, "[::]:8080".parse().unwrap()),
            EchoServer::start(&web2_ns, "[::]:9090".parse().unwrap()),
        ];
        Self {
            web,
            web2,
            client_ns,
            _ns: [web_ns, web2_ns],
            _servers: servers,
        }
    }

    /// The client reaches port 8080 (`http`) of `web` only; 9090 and web2
    /// (which declares no `http`) are dropped.
    fn assert_only_web_http_is_open(&self) {
        for family in ["ipv6", "ipv4"] {
            let at = |ep: &serde_json::Value, port| SocketAddr::new(ip_of(ep, family), port);
            assert_talks(&self.client_ns, at(&self.web, 8080), "client -> web http");
            assert_blocked(&self.client_ns, at(&self.web, 9090), "client -> web :9090");
            assert_blocked(
                &self.client_ns,
                at(&self.web2, 8080),
                "client -> web2 :8080 (no http)",
            );
        }
    }
}

fn named_port_ingress_opens_the_declared_number(policy: &str) {
    let agent = TestAgent::start(AgentOptions::default());
    let eps = NamedPorts::new(&agent, "app=web");
    assert_eq!(
        eps.web["named_ports"],
        serde_json::json!([{"name": "http", "protocol": "TCP", "port": 8080}])
    );
    import_yaml(&agent, policy);
    eps.assert_only_web_http_is_open();
    assert!(policy_denied_drops(&agent) > 0, "a Policy denied drop");
}

#[test]
fn cnp_ingress_on_a_named_port_opens_the_number_the_endpoint_declares() {
    privileged!("cnp_ingress_on_a_named_port_opens_the_number_the_endpoint_declares");
    named_port_ingress_opens_the_declared_number(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web-http
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: http
        protocol: TCP
"#,
    );
}

#[test]
fn networkpolicy_ingress_on_a_named_port_opens_the_number_the_endpoint_declares() {
    privileged!("networkpolicy_ingress_on_a_named_port_opens_the_number_the_endpoint_declares");
    named_port_ingress_opens_the_declared_number(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-http
spec:
  podSelector:
    matchLabels:
      app: web
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: client
    ports:
    - port: http
"#,
    );
}

#[test]
fn egress_on_a_named_port_reaches_only_peers_declaring_it() {
    privileged!("egress_on_a_named_port_reaches_only_peers_declaring_it");
    let agent = TestAgent::start(AgentOptions::default());
    // web2 gets an identity of its own: egress names resolve per identity.
    let eps = NamedPorts::new(&agent, "app=web,v=2");
    import_yaml(
        &agent,
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-to-http
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toEndpoints:
    - matchLabels:
        app: web
    toPorts:
    - ports:
      - port: http
"#,
    );
    eps.assert_only_web_http_is_open();
}

#[test]
fn a_port_name_declared_twice_with_different_numbers_is_refused_at_create() {
    privileged!("a_port_name_declared_twice_with_different_numbers_is_refused_at_create");
    let agent = TestAgent::start(AgentOptions::default());
    let ns = Netns::new("cep").unwrap();
    // Through the API, past the CLI's own check: the agent refuses.
    let req = cilia_api::EndpointCreate {
        netns: ns.name().to_string(),
        labels: Default::default(),
        ifname: None,
        container_id: None,
        network: None,
        namespace: None,
        label_source: None,
        named_ports: vec![
            "http=TCP/80".parse().unwrap(),
            "http=TCP/8080".parse().unwrap(),
        ],
        k8s_pod: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(cilia_api::ApiClient::new(&agent.socket).create_endpoint(&req))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "named port \"http\": declared twice with different ports: TCP/80 and TCP/8080"
    );
    assert!(agent.endpoints().is_empty());
}

#[test]
fn trace_of_labels_no_endpoint_has_meets_the_label_selectors() {
    privileged!("trace_of_labels_no_endpoint_has_meets_the_label_selectors");
    let agent = TestAgent::start(AgentOptions::default());
    let sw = Starwars::new(&agent);
    agent.cli_ok(&["policy", "import", CNP_RULE1]);
    let ds = id_of(&sw.deathstar);
    let verdict = |src: &str| {
        agent.cli_json(&[
            "policy", "trace", "--src", src, "--dst", &ds, "--dport", "80/TCP",
        ])["verdict"]
            .clone()
    };
    // No endpoint carries these labels: the trace gives them an identity of
    // its own, which the policy's fromEndpoints must still select or not.
    assert_eq!(verdict("org=empire,class=newship"), "ALLOWED");
    assert_eq!(verdict("org=alliance,class=newship"), "DENIED");
    // Both sides without an endpoint: each keeps its own labels.
    let both = agent.cli_json(&[
        "policy",
        "trace",
        "--src",
        "org=empire,class=newship",
        "--dst",
        "org=empire,class=deathstar,extra=1",
        "--dport",
        "80/TCP",
    ]);
    assert_eq!(both["verdict"], "ALLOWED", "{both}");
}
