//! End-to-end L7: a real agent in a node namespace, the deathstar (an HTTP
//! server) and two ships in their own namespaces, HTTP policies imported
//! through the `cilia` CLI, flows redirected by the BPF programs to the
//! `cilia-proxy` the agent runs, requests decided per request.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

use cilia_testnet::{bin, ip_of, privileged, AgentOptions, Netns, TestAgent};

const CNP_L3_L4: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/starwars/cnp-l3-l4.yaml"
);
const CNP_L7: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/starwars/cnp-l7.yaml"
);

/// The L7 policy plus `GET /whoami` and `PUT /v1/exhaust-port` for
/// tiefighters only: the same name, so importing it replaces rule1.
const CNP_L7_WIDER: &str = r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "rule1"
spec:
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: "POST"
          path: "/v1/request-landing"
        - method: "GET"
          path: "/whoami"
        - method: "PUT"
          path: "/v1/exhaust-port"
          headers:
          - "X-Has-Force: true"
"#;

/// How long a connect or a read may take before the flow counts as dropped.
const DROP_TIMEOUT: Duration = Duration::from_secs(1);

struct StarWars {
    agent: TestAgent,
    deathstar: serde_json::Value,
    tiefighter_ns: Netns,
    xwing_ns: Netns,
    tiefighter: serde_json::Value,
    _deathstar_ns: Netns,
    _server: Child,
}

impl StarWars {
    fn start() -> Self {
        let agent = TestAgent::start(AgentOptions::default());
        let ds_ns = Netns::new("cep").unwrap();
        let tf_ns = Netns::new("cep").unwrap();
        let xw_ns = Netns::new("cep").unwrap();
        let deathstar = agent.create_endpoint(&ds_ns, "org=empire,class=deathstar");
        let tiefighter = agent.create_endpoint(&tf_ns, "org=empire,class=tiefighter");
        agent.create_endpoint(&xw_ns, "org=alliance,class=xwing");
        // Killed with its namespace (the namespace's drop ends its processes).
        let server = ds_ns.command(bin("deathstar")).arg("80").spawn().unwrap();
        let sw = Self {
            agent,
            deathstar,
            tiefighter_ns: tf_ns,
            xwing_ns: xw_ns,
            tiefighter,
            _deathstar_ns: ds_ns,
            _server: server,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while request(&sw.tiefighter_ns, sw.addr("ipv6"), "GET", "/healthz", &[]).is_err() {
            assert!(Instant::now() < deadline, "the deathstar never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        sw
    }

    fn addr(&self, family: &str) -> SocketAddr {
        SocketAddr::new(ip_of(&self.deathstar, family), 80)
    }

    fn import(&self, path: &str) {
        self.agent.cli_ok(&["policy", "import", path]);
    }

    fn import_text(&self, yaml: &str) {
        let out = self.agent.cli_stdin(&["policy", "import", "-"], yaml);
        assert!(
            out.status.success(),
            "import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The proxy's pid, once the agent reports it running.
    fn proxy_pid(&self, within: Duration) -> u32 {
        let deadline = Instant::now() + within;
        loop {
            let status = self.agent.cli_json(&["status"]);
            let proxy = status["subsystems"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == "l7-proxy")
                .cloned()
                .unwrap();
            let detail = proxy["detail"].as_str().unwrap_or_default();
            if let Some(pid) = detail
                .strip_prefix("pid ")
                .and_then(|rest| rest.split(',').next())
                .and_then(|p| p.parse().ok())
            {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy is not running: {proxy}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An HTTP/1.1 response: status and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
}

fn open(from: &Netns, to: SocketAddr) -> Result<TcpStream, String> {
    let conn = from
        .run(|| TcpStream::connect_timeout(&to, DROP_TIMEOUT))
        .map_err(|e| format!("connect {to}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    Ok(conn)
}

/// One request on an open keep-alive connection.
fn send(
    conn: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read status: {e}"))?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        reader
            .read_line(&mut h)
            .map_err(|e| format!("read header: {e}"))?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().map_err(|e| format!("length: {e}"))?;
            }
        }
    }
    let mut body = vec![0u8; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    // The reader may only have buffered this response: the connection is
    // request/response, one at a time.
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request on a fresh connection.
fn request(
    from: &Netns,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut conn = open(from, to)?;
    send(&mut conn, method, path, headers)
}

/// Retries a request until it gets an answer (the proxy starts on first
/// use), bounded.
fn first_answer(from: &Netns, to: SocketAddr, method: &str, path: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match request(from, to, method, path, &[]) {
            Ok(r) => return r,
            Err(e) => {
                assert!(Instant::now() < deadline, "no answer within 15 s: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn star_wars_at_l7_lands_the_tiefighter_refuses_the_exhaust_port_and_drops_the_xwing() {
    privileged!("star_wars_at_l7");
    let sw = StarWars::start();
    sw.import(CNP_L3_L4);
    sw.import(CNP_L7);
    for family in ["ipv6", "ipv4"] {
        let ds = sw.addr(family);
        let landed = first_answer(&sw.tiefighter_ns, ds, "POST", "/v1/request-landing");
        assert_eq!(
            (landed.status, landed.body.as_str()),
            (200, "Ship landed\n"),
            "{family}"
        );
        let port = request(&sw.tiefighter_ns, ds, "PUT", "/v1/exhaust-port", &[]).unwrap();
        assert_eq!(port.status, 403, "{family}: {port:?}");
        assert_eq!(port.body.trim_end(), "Access denied", "{family}");
        assert!(
            request(&sw.xwing_ns, ds, "POST", "/v1/request-landing", &[]).is_err(),
            "{family}: the xwing is dropped at L3/L4"
        );
    }
}

#[test]
fn one_keep_alive_connection_mixes_allowed_and_denied_requests() {
    privileged!("one_keep_alive_connection_mixes_allowed_and_denied_requests");
    let sw = StarWars::start();
    sw.import(CNP_L7);
    first_answer(
        &sw.tiefighter_ns,
        sw.addr("ipv4"),
        "POST",
        "/v1/request-landing",
    );
    let mut conn = open(&sw.tiefighter_ns, sw.addr("ipv4")).unwrap();
    for round in 0..3 {
        let ok = send(&mut conn, "POST", "/v1/request-landing", &[]).unwrap();
        assert_eq!(ok.status, 200, "round {round}");
        let denied = send(&mut conn, "PUT", "/v1/exhaust-port", &[]).unwrap();
        assert_eq!(denied.status, 403, "round {round}");
        // Anchored: a longer path is not the allowed one.
        let longer = send(&mut conn, "POST", "/v1/request-landing/now", &[]).unwrap();
        assert_eq!(longer.status, 403, "round {round}");
    }
}

#[test]
fn the_deathstar_sees_the_tiefighters_own_address_through_the_proxy() {
    privileged!("the_deathstar_sees_the_tiefighters_own_address_through_the_proxy");
    let sw = StarWars::start();
    sw.import_text(CNP_L7_WIDER);
    for family in ["ipv6", "ipv4"] {
        let who = first_answer(&sw.tiefighter_ns, sw.addr(family), "GET", "/whoami");
        assert_eq!(who.status, 200, "{family}: {who:?}");
        let seen: IpAddr = who.body.trim().parse().unwrap();
        assert_eq!(seen, ip_of(&sw.tiefighter, family), "{family}");
    }
}

#[test]
fn header_rules_decide_per_request() {
    privileged!("header_rules_decide_per_request");
    let sw = StarWars::start();
    sw.import_text(CNP_L7_WIDER);
    let ds = sw.addr("ipv6");
    first_answer(&sw.tiefighter_ns, ds, "POST", "/v1/request-landing");
    let mut conn = open(&sw.tiefighter_ns, ds).unwrap();
    assert_eq!(
        send(&mut conn, "PUT", "/v1/exhaust-port", &[])
            .unwrap()
            .status,
        403
    );
    let with_force = send(
        &mut conn,
        "PUT",
        "/v1/exhaust-port",
        &[("X-Has-Force", "true")],
    )
    .unwrap();
    assert_eq!(with_force.status, 503, "forwarded: {with_force:?}");
    assert_eq!(with_force.body, "Panic: deathstar exploded\n");
}

#[test]
fn a_policy_change_reaches_an_open_connection_without_closing_it() {
    privileged!("a_policy_change_reaches_an_open_connection_without_closing_it");
    let sw = StarWars::start();
    sw.import(CNP_L7);
    let ds = sw.addr("ipv4");
    first_answer(&sw.tiefighter_ns, ds, "POST", "/v1/request-landing");
    let mut conn = open(&sw.tiefighter_ns, ds).unwrap();
    assert_eq!(send(&mut conn, "GET", "/whoami", &[]).unwrap().status, 403);
    sw.import_text(CNP_L7_WIDER);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = send(&mut conn, "GET", "/whoami", &[]).unwrap();
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new policy never applied: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_proxy_fails_closed_and_is_restarted() {
    privileged!("a_killed_proxy_fails_closed_and_is_restarted");
    let sw = StarWars::start();
    sw.import(CNP_L7);
    let ds = sw.addr("ipv6");
    first_answer(&sw.tiefighter_ns, ds, "POST", "/v1/request-landing");
    let pid = sw.proxy_pid(Duration::from_secs(5));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Never around the proxy: whatever answers is the proxy's verdict.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = request(&sw.tiefighter_ns, ds, "PUT", "/v1/exhaust-port", &[]) {
            assert_eq!(r.status, 403, "the exhaust port is never reached");
        }
        if let Ok(r) = request(&sw.tiefighter_ns, ds, "POST", "/v1/request-landing", &[]) {
            if r.status == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the proxy was not restarted");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ne!(
        sw.proxy_pid(Duration::from_secs(5)),
        pid,
        "a new proxy runs"
    );
}

#[test]
fn an_agent_crash_and_restart_keep_an_open_l7_connection() {
    privileged!("an_agent_crash_and_restart_keep_an_open_l7_connection");
    let mut sw = StarWars::start();
    sw.import(CNP_L7);
    let ds = sw.addr("ipv4");
    first_answer(&sw.tiefighter_ns, ds, "POST", "/v1/request-landing");
    let mut conn = open(&sw.tiefighter_ns, ds).unwrap();
    assert_eq!(
        send(&mut conn, "POST", "/v1/request-landing", &[])
            .unwrap()
            .status,
        200
    );
    sw.agent.kill9();
    assert_eq!(
        send(&mut conn, "POST", "/v1/request-landing", &[])
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        send(&mut conn, "PUT", "/v1/exhaust-port", &[])
            .unwrap()
            .status,
        403
    );
    sw.agent.spawn().unwrap();
    assert_eq!(
        send(&mut conn, "POST", "/v1/request-landing", &[])
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        send(&mut conn, "PUT", "/v1/exhaust-port", &[])
            .unwrap()
            .status,
        403
    );
}

#[test]
fn requests_appear_in_observe_as_l7_flows() {
    privileged!("requests_appear_in_observe_as_l7_flows");
    let sw = StarWars::start();
    sw.import(CNP_L7);
    let ds = sw.addr("ipv6");
    first_answer(&sw.tiefighter_ns, ds, "POST", "/v1/request-landing");
    request(&sw.tiefighter_ns, ds, "PUT", "/v1/exhaust-port", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = sw.agent.cli_ok(&[
            "observe",
            "--type",
            "l7",
            "--http-method",
            "PUT",
            "-o",
            "json",
        ]);
        let denied = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|f| f["verdict"] == "DROPPED");
        if let Some(f) = denied {
            let text = f.to_string();
            assert!(text.contains("/v1/exhaust-port"), "{text}");
            assert!(text.contains("403"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no L7 flow for the PUT: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // And in the metrics, by verdict and status class.
    let metrics = sw.agent.scrape_metrics();
    for line in [
        "cilia_proxy_http_requests_total{verdict=\"DROPPED\",status=\"4xx\"} 1",
        "cilia_proxy_http_request_duration_seconds_count{verdict=\"DROPPED\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    assert!(
        metrics.contains("cilia_proxy_http_requests_total{verdict=\"FORWARDED\",status=\"2xx\"}"),
        "{metrics}"
    );
}

#[test]
fn trace_runs_the_loaded_program_and_the_http_rules_on_a_redirected_flow() {
    privileged!("trace_runs_the_loaded_program_and_the_http_rules_on_a_redirected_flow");
    let sw = StarWars::start();
    sw.import(CNP_L7);
    first_answer(
        &sw.tiefighter_ns,
        sw.addr("ipv6"),
        "POST",
        "/v1/request-landing",
    );
    let tf = sw.tiefighter["id"].to_string();
    let ds = sw.deathstar["id"].to_string();
    let trace = |method: &str, path: &str| {
        sw.agent.cli_json(&[
            "policy",
            "trace",
            "--src",
            &tf,
            "--dst",
            &ds,
            "--dport",
            "80/TCP",
            "--datapath",
            "--http-method",
            method,
            "--http-path",
            path,
        ])
    };
    let landing = trace("POST", "/v1/request-landing");
    assert_eq!(landing["verdict"], "ALLOWED", "{landing}");
    assert_eq!(
        landing["datapath"], "ALLOWED",
        "the program redirects it: {landing}"
    );
    assert_eq!(landing["http_verdict"], "ALLOWED", "{landing}");
    let port = trace("PUT", "/v1/exhaust-port");
    assert_eq!(port["datapath"], "ALLOWED", "{port}");
    assert_eq!(port["http_verdict"], "DENIED", "{port}");
}

#[test]
fn an_import_with_the_first_http_rule_returns_once_the_proxy_enforces_it() {
    privileged!("an_import_with_the_first_http_rule_returns_once_the_proxy_enforces_it");
    let sw = StarWars::start();
    sw.import(CNP_L7);
    // No retry: the very next connection is served by the proxy.
    let landed = request(
        &sw.tiefighter_ns,
        sw.addr("ipv4"),
        "POST",
        "/v1/request-landing",
        &[],
    )
    .unwrap();
    assert_eq!(landed.status, 200);
}

/// Egress HTTP rules of the client: its requests are checked on the way
/// out, whatever the server's own policy.
const CNP_EGRESS_L7: &str = r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "tiefighter-egress"
spec:
  endpointSelector:
    matchLabels:
      class: tiefighter
  egress:
  - toEndpoints:
    - matchLabels:
        class: deathstar
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: "GET"
          path: "/whoami"
"#;

#[test]
fn egress_http_rules_check_the_clients_requests_on_the_way_out() {
    privileged!("egress_http_rules_check_the_clients_requests_on_the_way_out");
    let sw = StarWars::start();
    sw.import_text(CNP_EGRESS_L7);
    for family in ["ipv6", "ipv4"] {
        let ds = sw.addr(family);
        let who = first_answer(&sw.tiefighter_ns, ds, "GET", "/whoami");
        assert_eq!(who.status, 200, "{family}: {who:?}");
        let seen: IpAddr = who.body.trim().parse().unwrap();
        assert_eq!(seen, ip_of(&sw.tiefighter, family), "{family}");
        let landing = request(&sw.tiefighter_ns, ds, "POST", "/v1/request-landing", &[]).unwrap();
        assert_eq!(landing.status, 403, "{family}: {landing:?}");
        // The xwing has no egress policy: it reaches the deathstar directly.
        let xwing = request(&sw.xwing_ns, ds, "POST", "/v1/request-landing", &[]).unwrap();
        assert_eq!(xwing.status, 200, "{family}");
    }
}
