//! End-to-end services (ClusterIP, east-west): a real agent, a client
//! endpoint and three backend endpoints in their own namespaces, services
//! made with the `cilia` CLI, real TCP and UDP from the client to the
//! service's frontend (VIP), translated by the endpoint programs.
//!
//! Every backend answers each new TCP connection with its name and a
//! newline, then echoes; each UDP datagram with its name. The client's
//! sockets are connected to the VIP, so a reply that does not come from the
//! VIP (a missing rev-NAT) never reaches them. VIPs are documentation
//! addresses (2001:db8:5e::/48, 192.0.2.0/24): only the load balancer
//! gives them meaning, no packet leaves the test's namespaces.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cilia_testnet::{ip_of, privileged, AgentOptions, Netns, TestAgent};

const VIP6: &str = "2001:db8:5e::10";
const VIP4: &str = "192.0.2.10";
/// The backends' port (the frontends use 80 and 53).
const BACKEND_PORT: u16 = 8080;
/// New flows per service in a spread check: with 3 backends chosen at
/// random, one backend gets none of 30 with probability 3 * (2/3)^30 < 2e-5.
const FLOWS: usize = 30;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A backend's servers: TCP and UDP on its addresses of both families, port
/// [`BACKEND_PORT`], answering with `name`. Bounded in time and count;
/// stopped on drop.
struct Backend {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    fn start(ns: &Netns, name: &str, addrs: &[IpAddr]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for addr in addrs {
            let bind = SocketAddr::new(*addr, BACKEND_PORT);
            let listener = ns.run(|| TcpListener::bind(bind).unwrap());
            listener.set_nonblocking(true).unwrap();
            let (flag, name_tcp) = (stop.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(240);
                let mut accepted = 0;
                while !flag.load(Ordering::Relaxed) && Instant::now() < deadline && accepted < 400 {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            accepted += 1;
                            let name = name_tcp.clone();
                            std::thread::spawn(move || serve_tcp(conn, &name));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => break,
                    }
                }
            }));
            let sock = ns.run(|| UdpSocket::bind(bind).unwrap());
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let (flag, name_udp) = (stop.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(240);
                let mut buf = [0u8; 64];
                while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(name_udp.as_bytes(), peer);
                    }
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends the name, then echoes until EOF, error or 60 s idle.
fn serve_tcp(mut conn: TcpStream, name: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    if conn.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 256];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// A connection to a service: the stream and the backend's name.
struct Conn {
    stream: BufReader<TcpStream>,
    backend: String,
}

/// Connects `client` to `frontend`, checks the peer is the frontend, reads
/// the backend's name.
fn connect(client: &Netns, frontend: SocketAddr) -> Conn {
    let stream = client
        .run(|| TcpStream::connect_timeout(&frontend, IO_TIMEOUT))
        .unwrap_or_else(|e| panic!("connect to {frontend}: {e}"));
    assert_eq!(
        stream.peer_addr().unwrap(),
        frontend,
        "the client sees the VIP"
    );
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut stream = BufReader::new(stream);
    let mut backend = String::new();
    stream
        .read_line(&mut backend)
        .unwrap_or_else(|e| panic!("{frontend}: reading the backend's name: {e}"));
    Conn {
        stream,
        backend: backend.trim().to_string(),
    }
}

/// Whether a connection to `frontend` succeeds within a second.
fn connects(client: &Netns, frontend: SocketAddr) -> bool {
    client
        .run(|| TcpStream::connect_timeout(&frontend, Duration::from_secs(1)))
        .is_ok()
}

impl Conn {
    /// One echo round trip.
    fn echo(&mut self, text: &str) -> std::io::Result<String> {
        self.stream.get_mut().write_all(text.as_bytes())?;
        let mut buf = vec![0u8; text.len()];
        self.stream.read_exact(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// One UDP question to `frontend` from a fresh socket connected to it:
/// the name of the backend that answered (only an answer from the
/// frontend's address reaches a connected socket).
fn udp_ask(client: &Netns, frontend: SocketAddr) -> String {
    let any: SocketAddr = if frontend.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let sock = client.run(|| UdpSocket::bind(any).unwrap());
    sock.connect(frontend).unwrap();
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    sock.send(b"who").unwrap();
    let mut buf = [0u8; 64];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("{frontend}: no answer from the VIP: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The test's network: an agent, a client, three backends (serving).
struct Net {
    agent: TestAgent,
    client: Netns,
    client_ep: serde_json::Value,
    backend_eps: Vec<serde_json::Value>,
    _backend_ns: Vec<Netns>,
    _servers: Vec<Backend>,
}

/// The agent with its defaults: the socket LB translates the client's
/// connect()/sendmsg(), so its packets never meet the per-packet LB.
fn net() -> Net {
    net_with(&[])
}

/// The agent with the socket LB off: every flow meets the per-packet LB in
/// the client's from-container program.
fn net_per_packet() -> Net {
    net_with(&["--socket-lb", "off"])
}

fn net_with(args: &[&str]) -> Net {
    let agent = TestAgent::start_in(
        Netns::new("cnode").unwrap(),
        AgentOptions::default(),
        args.iter().map(|a| a.to_string()).collect(),
    )
    .unwrap();
    let client = Netns::new("csvc").unwrap();
    let client_ep = agent.create_endpoint(&client, "app=client");
    let mut backend_eps = Vec::new();
    let mut backend_ns = Vec::new();
    let mut servers = Vec::new();
    for i in 1..=3 {
        let ns = Netns::new("cbe").unwrap();
        let ep = agent.create_endpoint(&ns, "app=backend");
        let addrs = [ip_of(&ep, "ipv6"), ip_of(&ep, "ipv4")];
        servers.push(Backend::start(&ns, &format!("b{i}"), &addrs));
        backend_eps.push(ep);
        backend_ns.push(ns);
    }
    Net {
        agent,
        client,
        client_ep,
        backend_eps,
        _backend_ns: backend_ns,
        _servers: servers,
    }
}

impl Net {
    /// The backends' `ADDR:PORT` list of a family, for `--backends`.
    fn backends(&self, family: &str, which: &[usize]) -> String {
        which
            .iter()
            .map(|i| {
                SocketAddr::new(ip_of(&self.backend_eps[*i], family), BACKEND_PORT).to_string()
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn update(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["service", "update"];
        all.extend_from_slice(args);
        self.agent.cli_json(&all)
    }
}

fn vip(family: &str, port: u16) -> SocketAddr {
    let ip: IpAddr = if family == "ipv6" { VIP6 } else { VIP4 }.parse().unwrap();
    SocketAddr::new(ip, port)
}

fn frontend(family: &str, port: u16, proto: &str) -> String {
    format!("{}/{proto}", vip(family, port))
}

#[test]
fn clusterip_spreads_tcp_and_udp_over_three_backends_and_replies_come_from_the_vip() {
    privileged!("clusterip_spreads_tcp_and_udp");
    clusterip_scenario(&net(), "socket");
}

#[test]
fn clusterip_through_the_per_packet_load_balancer_alone() {
    privileged!("clusterip_through_the_per_packet_load_balancer_alone");
    clusterip_scenario(&net_per_packet(), "per-packet");
}

/// Spread over three backends, both families, TCP and UDP, random and
/// Maglev; the client sees the VIP; the service flows name the load
/// balancer that chose (`balancer`) and are counted per service.
fn clusterip_scenario(net: &Net, balancer: &str) {
    let mut ids = BTreeMap::new();
    for family in ["ipv6", "ipv4"] {
        let backends = net.backends(family, &[0, 1, 2]);
        // IPv4 TCP by Maglev, the others at random: both spread.
        let algorithm = if family == "ipv4" { "maglev" } else { "random" };
        for (port, proto) in [(80, "tcp"), (53, "udp")] {
            let s = net.update(&[
                "--frontend",
                &frontend(family, port, proto),
                "--backends",
                &backends,
                "--algorithm",
                if proto == "tcp" { algorithm } else { "random" },
            ]);
            assert_eq!(s["backends"].as_array().unwrap().len(), 3, "{s}");
            ids.insert((family, proto), s["id"].as_u64().unwrap());
        }
    }
    for family in ["ipv6", "ipv4"] {
        let mut tcp: BTreeMap<String, usize> = BTreeMap::new();
        let mut udp: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..FLOWS {
            let mut conn = connect(&net.client, vip(family, 80));
            assert_eq!(conn.echo("ping").unwrap(), "ping");
            *tcp.entry(conn.backend).or_default() += 1;
            *udp.entry(udp_ask(&net.client, vip(family, 53)))
                .or_default() += 1;
        }
        for (proto, spread) in [("tcp", &tcp), ("udp", &udp)] {
            assert_eq!(
                spread.keys().map(String::as_str).collect::<Vec<_>>(),
                ["b1", "b2", "b3"],
                "{family} {proto}: every backend gets flows: {spread:?}"
            );
        }
    }
    // The agent's and the kernel's views.
    let list = net.agent.cli_json(&["service", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 4, "{list}");
    let lb = net.agent.cli_json(&["bpf", "lb", "list"]);
    let services = lb["services"].as_array().unwrap();
    assert_eq!(services.len(), 4, "{lb}");
    assert!(
        services
            .iter()
            .all(|s| s["slots"].as_array().unwrap().len() == 3),
        "{lb}"
    );
    assert_eq!(lb["backends"].as_array().unwrap().len(), 6, "{lb}");
    let maglev = services
        .iter()
        .find(|s| s["algorithm"] == "maglev")
        .unwrap();
    assert_eq!(maglev["maglev"].as_array().unwrap().len(), 3, "{lb}");
    // The Maglev properties hold for the table as read back from the
    // kernel's map: it is full, and each backend holds its share (1/3)
    // within 5 %.
    let size = lb["maglev_table_size"].as_u64().unwrap();
    let shares: Vec<u64> = maglev["maglev"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["entries"].as_u64().unwrap())
        .collect();
    assert_eq!(shares.iter().sum::<u64>(), size, "{lb}");
    for entries in &shares {
        let share = *entries as f64 / size as f64;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.05 / 3.0,
            "{shares:?} of {size}"
        );
    }
    // Flows name their service; metrics count them per service.
    let v6_tcp = ids[&("ipv6", "tcp")];
    let flows = net
        .agent
        .cli_ok(&["observe", "-o", "json", "--type", "service"]);
    let named = flows
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|f| f["service"]["id"] == v6_tcp)
        .unwrap_or_else(|| panic!("no service flow of service {v6_tcp}:\n{flows}"));
    assert_eq!(
        named["service"]["frontend"],
        frontend("ipv6", 80, "tcp"),
        "{named}"
    );
    assert_eq!(named["source"]["endpoint"], net.client_ep["id"], "{named}");
    assert_eq!(named["service"]["balancer"], balancer, "{named}");
    let metrics = net.agent.scrape_metrics();
    let line = format!("cilia_service_flows_total{{service=\"{v6_tcp}\"}} ");
    let flows_counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert!(flows_counted >= FLOWS as u64, "{flows_counted}");
    assert!(
        metrics.contains("cilia_service_packets_total{service="),
        "{metrics}"
    );
}

#[test]
fn affinity_keeps_a_client_on_one_backend() {
    privileged!("affinity_keeps_a_client_on_one_backend");
    let net = net();
    for family in ["ipv6", "ipv4"] {
        net.update(&[
            "--frontend",
            &frontend(family, 80, "tcp"),
            "--backends",
            &net.backends(family, &[0, 1, 2]),
            "--affinity",
            "client-ip",
            "--affinity-timeout",
            "1h",
        ]);
        let first = connect(&net.client, vip(family, 80)).backend;
        for _ in 0..10 {
            assert_eq!(
                connect(&net.client, vip(family, 80)).backend,
                first,
                "{family}"
            );
        }
    }
    let s = net.agent.cli_json(&["service", "get", "1"]);
    assert_eq!(s["affinity"]["timeout_secs"], 3600, "{s}");
}

#[test]
fn policy_of_the_backend_applies_to_flows_through_the_service() {
    privileged!("policy_of_the_backend_applies");
    let net = net();
    let other = Netns::new("csvc").unwrap();
    net.agent.create_endpoint(&other, "app=other");
    for family in ["ipv6", "ipv4"] {
        net.update(&[
            "--frontend",
            &frontend(family, 80, "tcp"),
            "--backends",
            &net.backends(family, &[0, 1, 2]),
        ]);
    }
    let policy = format!(
        r#"apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "backend-from-client"
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "{BACKEND_PORT}"
        protocol: TCP
"#
    );
    let out = net.agent.cli_stdin(&["policy", "import", "-"], &policy);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for family in ["ipv6", "ipv4"] {
        // The backend's policy decides on the translated flow: its port is
        // the backend's (8080), not the frontend's (80).
        let mut conn = connect(&net.client, vip(family, 80));
        assert_eq!(conn.echo("allowed").unwrap(), "allowed", "{family}");
        assert!(
            !connects(&other, vip(family, 80)),
            "{family}: app=other is denied"
        );
    }
    let drops = net
        .agent
        .cli_ok(&["observe", "-o", "json", "--verdict", "DROPPED"]);
    assert!(
        drops.lines().any(|l| l.contains("Policy denied")),
        "the denied flow is a policy drop:\n{drops}"
    );
}

#[test]
fn a_backend_removed_mid_stream_is_reselected_and_a_terminating_one_keeps_its_flows() {
    privileged!("a_backend_removed_mid_stream");
    let net = net_per_packet();
    for family in ["ipv6", "ipv4"] {
        let fe = frontend(family, 80, "tcp");
        let both = net.backends(family, &[0, 1]);
        let s = net.update(&["--frontend", &fe, "--backends", &both]);
        let id = s["id"].as_u64().unwrap().to_string();
        // Terminating: the flow pinned to it goes on; new flows avoid it.
        let mut pinned = connect(&net.client, vip(family, 80));
        let index = if pinned.backend == "b1" { 0 } else { 1 };
        let spec = serde_json::json!({
            "id": s["id"],
            "frontend": fe,
            "backends": [
                {"address": SocketAddr::new(ip_of(&net.backend_eps[index], family), BACKEND_PORT).to_string(),
                 "state": "terminating"},
                {"address": SocketAddr::new(ip_of(&net.backend_eps[1 - index], family), BACKEND_PORT).to_string()},
            ],
        });
        update_json(&net.agent, &spec);
        assert_eq!(pinned.echo("still here").unwrap(), "still here", "{family}");
        let survivor = format!("b{}", 2 - index);
        for _ in 0..5 {
            assert_eq!(
                connect(&net.client, vip(family, 80)).backend,
                survivor,
                "{family}"
            );
        }
        let lb = net.agent.cli_json(&["bpf", "lb", "list"]);
        let states: Vec<&str> = lb["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["state"].as_str().unwrap())
            .collect();
        assert!(states.contains(&"terminating"), "{lb}");
        // Removed: its flows are re-selected; the new backend does not
        // know the connection and resets it.
        net.update(&[
            "--id",
            &id,
            "--frontend",
            &fe,
            "--backends",
            &net.backends(family, &[1 - index]),
        ]);
        let deadline = Instant::now() + IO_TIMEOUT;
        let reset = loop {
            match pinned.echo("gone?") {
                Err(e) => break e,
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Ok(_) => panic!("{family}: the removed backend still serves the flow"),
            }
        };
        assert!(
            matches!(
                reset.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ),
            "{family}: {reset}"
        );
        assert_eq!(connect(&net.client, vip(family, 80)).backend, survivor);
        net.agent.cli_ok(&["service", "delete", &id]);
        assert!(!connects(&net.client, vip(family, 80)), "{family}: deleted");
    }
    let lb = net.agent.cli_json(&["bpf", "lb", "list"]);
    assert!(lb["services"].as_array().unwrap().is_empty(), "{lb}");
    assert!(lb["backends"].as_array().unwrap().is_empty(), "{lb}");
}

/// With the socket LB, a connection is made to the backend itself: removing
/// that backend from the service does not touch it (it goes on while the
/// backend answers); new connections avoid the backend at once.
#[test]
fn with_the_socket_lb_a_removed_backend_keeps_its_connection_and_gets_no_new_ones() {
    privileged!("with_the_socket_lb_a_removed_backend_keeps_its_connection");
    let net = net();
    for family in ["ipv6", "ipv4"] {
        let fe = frontend(family, 81, "tcp");
        let s = net.update(&[
            "--frontend",
            &fe,
            "--backends",
            &net.backends(family, &[0, 1]),
        ]);
        let id = s["id"].as_u64().unwrap().to_string();
        let mut pinned = connect(&net.client, vip(family, 81));
        let index = if pinned.backend == "b1" { 0 } else { 1 };
        net.update(&[
            "--id",
            &id,
            "--frontend",
            &fe,
            "--backends",
            &net.backends(family, &[1 - index]),
        ]);
        assert_eq!(pinned.echo("still here").unwrap(), "still here", "{family}");
        let survivor = format!("b{}", 2 - index);
        for _ in 0..5 {
            assert_eq!(
                connect(&net.client, vip(family, 81)).backend,
                survivor,
                "{family}"
            );
        }
        net.agent.cli_ok(&["service", "delete", &id]);
    }
}

/// `POST /v1/services` with a JSON spec (backend states have no CLI flag:
/// health checking sets them).
fn update_json(agent: &TestAgent, spec: &serde_json::Value) {
    let body = spec.to_string();
    let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    let request = format!(
        "POST /v1/services HTTP/1.1\r\nHost: cilia\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn services_keep_working_while_the_agent_is_down_and_are_restored_at_start() {
    privileged!("services_survive_an_agent_restart");
    let mut net = net();
    for family in ["ipv6", "ipv4"] {
        net.update(&[
            "--frontend",
            &frontend(family, 80, "tcp"),
            "--backends",
            &net.backends(family, &[0, 1, 2]),
            "--algorithm",
            "maglev",
        ]);
    }
    let before = kernel_view(&net.agent);
    let services = net.agent.cli_json(&["service", "list"]);
    net.agent.kill9();
    // The maps are pinned: the datapath balances without the agent.
    for family in ["ipv6", "ipv4"] {
        let mut conn = connect(&net.client, vip(family, 80));
        assert_eq!(conn.echo("agent down").unwrap(), "agent down", "{family}");
    }
    net.agent.spawn().unwrap();
    assert_eq!(net.agent.cli_json(&["service", "list"]), services);
    assert_eq!(
        kernel_view(&net.agent),
        before,
        "the same rows, tables and ids"
    );
    for family in ["ipv6", "ipv4"] {
        let mut conn = connect(&net.client, vip(family, 80));
        assert_eq!(conn.echo("agent back").unwrap(), "agent back", "{family}");
    }
}

/// `cilia bpf lb list`, services and backends sorted by id (the kernel's
/// hash maps list them in no particular order).
fn kernel_view(agent: &TestAgent) -> serde_json::Value {
    let mut lb = agent.cli_json(&["bpf", "lb", "list"]);
    for list in ["services", "backends"] {
        lb[list]
            .as_array_mut()
            .unwrap()
            .sort_by_key(|x| x["id"].as_u64().unwrap());
    }
    lb
}

/// The client is the service's only backend (its own server on both
/// families): a connection to the VIP comes back to it, and the client
/// sees the VIP as its peer.
fn hairpin_scenario(net: &Net, balancer: &str) {
    let addrs = [ip_of(&net.client_ep, "ipv6"), ip_of(&net.client_ep, "ipv4")];
    let _me = Backend::start(&net.client, "self", &addrs);
    for (family, port) in [("ipv6", 90), ("ipv4", 91)] {
        let own = SocketAddr::new(ip_of(&net.client_ep, family), BACKEND_PORT).to_string();
        net.update(&[
            "--frontend",
            &frontend(family, port, "tcp"),
            "--backends",
            &own,
        ]);
        let mut conn = connect(&net.client, vip(family, port));
        assert_eq!(conn.backend, "self", "{balancer} {family}");
        assert_eq!(
            conn.echo("hairpin").unwrap(),
            "hairpin",
            "{balancer} {family}"
        );
    }
}

#[test]
fn a_client_that_is_its_own_backend_reaches_itself_through_the_per_packet_load_balancer() {
    privileged!("hairpin_per_packet");
    hairpin_scenario(&net_per_packet(), "per-packet");
}

#[test]
fn a_client_that_is_its_own_backend_reaches_itself_through_the_socket_load_balancer() {
    privileged!("hairpin_socket");
    hairpin_scenario(&net(), "socket");
}
