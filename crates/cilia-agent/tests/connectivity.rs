//! End-to-end: a real agent in a node namespace, endpoints in their own
//! namespaces, real ICMP/TCP/UDP between them, driven through the `cilia`
//! CLI. The node has IP forwarding off and no bridge: BPF forwards.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use cilia_testnet::{ip_of, privileged, AgentOptions, Netns, TestAgent};

fn ping(from: &Netns, to: IpAddr) -> bool {
    from.command("ping")
        .args(["-c", "2", "-i", "0.2", "-W", "2", &to.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

/// One TCP echo round trip from `client` to `server`'s `addr`.
fn tcp_echo(server: &Netns, client: &Netns, addr: IpAddr) {
    let listener = server.run(|| TcpListener::bind(SocketAddr::new(addr, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        conn.write_all(&buf[..n]).unwrap();
    });
    let mut conn = client.run(|| {
        TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(5)).unwrap()
    });
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"hello over tcp").unwrap();
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello over tcp");
    srv.join().unwrap();
}

/// One UDP echo round trip.
fn udp_echo(server: &Netns, client: &Netns, addr: IpAddr) {
    let srv_sock = server.run(|| UdpSocket::bind(SocketAddr::new(addr, 0)).unwrap());
    let port = srv_sock.local_addr().unwrap().port();
    srv_sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let srv = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, peer) = srv_sock.recv_from(&mut buf).unwrap();
        srv_sock.send_to(&buf[..n], peer).unwrap();
    });
    let unspecified: IpAddr = if addr.is_ipv6() {
        "::".parse().unwrap()
    } else {
        "0.0.0.0".parse().unwrap()
    };
    let sock = client.run(|| UdpSocket::bind(SocketAddr::new(unspecified, 0)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(b"hello over udp", SocketAddr::new(addr, port))
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello over udp");
    srv.join().unwrap();
}

#[test]
fn two_endpoints_exchange_ping_tcp_udp_in_both_families_with_forwarding_off() {
    privileged!("two_endpoints_exchange_traffic");
    let agent = TestAgent::start(AgentOptions::default());
    let fwd = agent
        .node
        .sh("cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/all/forwarding")
        .unwrap();
    assert_eq!(
        fwd.split_whitespace().collect::<Vec<_>>(),
        ["0", "0"],
        "forwarding must be off"
    );
    let (c1, c2) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    let a = agent.create_endpoint(&c1, "app=a");
    let b = agent.create_endpoint(&c2, "app=b");
    assert!(
        !agent
            .node
            .ip(&["link", "show", "type", "bridge"])
            .unwrap()
            .contains("state"),
        "no bridge"
    );

    for family in ["ipv6", "ipv4"] {
        let (ia, ib) = (ip_of(&a, family), ip_of(&b, family));
        assert!(ping(&c1, ib), "{family} ping a -> b");
        assert!(ping(&c2, ia), "{family} ping b -> a");
        tcp_echo(&c2, &c1, ib);
        tcp_echo(&c1, &c2, ia);
        udp_echo(&c2, &c1, ib);
    }
    // The node's router addresses are reachable too (to the host stack).
    let status = agent.cli_json(&["status"]);
    for pool in ["ipv6", "ipv4"] {
        let router: IpAddr = status["ipam"][pool]["router"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(ping(&c1, router), "ping node router {router}");
    }
    // The kernel map holds both families of both endpoints.
    let bpf = agent.cli_json(&["bpf", "endpoint", "list"]);
    assert_eq!(bpf.as_array().unwrap().len(), 4, "{bpf}");
    // Forwarding went through the endpoint programs.
    let metrics = agent.cli_json(&["bpf", "metrics", "list"]);
    let to_endpoint = metrics
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["reason"] == "to-endpoint")
        .expect("to-endpoint counter");
    assert!(to_endpoint["packets"].as_u64().unwrap() >= 8);
}

/// One TCP exchange from `client` to `server`'s `addr` that ends
/// gracefully (FIN each way, no RST), the server closing first or the
/// client. Returns the server's port, or the open connection with
/// `keep_open`.
fn tcp_exchange_closed(
    server: &Netns,
    client: &Netns,
    addr: IpAddr,
    server_first: bool,
    keep_open: bool,
) -> (u16, Option<(TcpStream, std::thread::JoinHandle<TcpStream>)>) {
    let listener = server.run(|| TcpListener::bind(SocketAddr::new(addr, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        conn.write_all(&buf[..n]).unwrap();
        if !server_first {
            // Wait for the client's FIN (end of stream), then close.
            assert_eq!(conn.read(&mut buf).unwrap(), 0, "the client's FIN");
        }
        conn
    });
    let mut conn = client.run(|| {
        TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(5)).unwrap()
    });
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"bye").unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(conn.read(&mut buf).unwrap(), 3);
    if keep_open {
        return (port, Some((conn, srv)));
    }
    if server_first {
        drop(srv.join().unwrap()); // the server's FIN
        assert_eq!(conn.read(&mut buf).unwrap(), 0, "the server's FIN");
        drop(conn);
    } else {
        drop(conn);
        drop(srv.join().unwrap());
    }
    (port, None)
}

/// A connection that ended gives its endpoint's conntrack budget back
/// within the close timeout (10 s), whichever side closed first: after the
/// FINs, the last ACK must not give the entry an established connection's
/// six hours (it did: an endpoint then ran out of its budget of 32,768
/// entries after 32,768 short connections in six hours). An open
/// connection stays established.
#[test]
fn connections_that_ended_leave_conntrack_within_the_close_timeout() {
    privileged!("ct_closed_connections");
    let agent = TestAgent::start(AgentOptions::default());
    let (c1, c2) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    agent.create_endpoint(&c1, "app=a");
    let b = agent.create_endpoint(&c2, "app=b");
    let mut closed = Vec::new();
    for family in ["ipv6", "ipv4"] {
        let ib = ip_of(&b, family);
        for server_first in [false, true] {
            closed.push(tcp_exchange_closed(&c2, &c1, ib, server_first, false).0);
        }
    }
    let (open_port, open) = tcp_exchange_closed(&c2, &c1, ip_of(&b, "ipv4"), false, true);
    // The last ACKs are on their way when the calls return.
    std::thread::sleep(Duration::from_millis(300));
    let ct = agent.cli_json(&["bpf", "ct", "list"]);
    let entry = |port: u16| {
        ct.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["proto"] == "TCP"
                    && e["destination"]
                        .as_str()
                        .unwrap()
                        .parse::<SocketAddr>()
                        .unwrap()
                        .port()
                        == port
            })
            .unwrap_or_else(|| panic!("no conntrack entry to port {port}: {ct}"))
            .clone()
    };
    for port in closed {
        let e = entry(port);
        assert_eq!(e["closing"], true, "{e}");
        assert!(e["expires_in"].as_u64().unwrap() <= 10, "{e}");
    }
    let e = entry(open_port);
    assert_eq!(e["closing"], false, "{e}");
    assert!(e["expires_in"].as_u64().unwrap() > 3600, "{e}");
    drop(open);
}

/// An endpoint opening short connections at a steady rate holds the
/// entries of those that ended in the last close timeout (10 s) plus those
/// that expired since the last GC. With GCs only every 10 s, 20
/// connections per second meet a budget of 150 (200 closed ones within
/// the close timeout alone): SYNs dropped as *budget exhausted*, each
/// connect delayed by a retransmission. The agent collects as soon as an
/// endpoint nears its budget, and then also takes the endpoint's closed
/// entries idle for a second, so none is.
#[test]
fn steady_short_connections_are_not_held_to_the_gc_interval() {
    privileged!("ct_gc_early");
    const RATE: u64 = 20;
    const SECONDS: u64 = 25;
    let agent = TestAgent::start_with_env(AgentOptions::default(), &[("CILIA_CT_BUDGET", "150")]);
    let (c1, c2) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    agent.create_endpoint(&c1, "app=a");
    let b = agent.create_endpoint(&c2, "app=b");
    let addr = SocketAddr::new(ip_of(&b, "ipv4"), 7100);
    let listener = c2.run(|| TcpListener::bind(addr).unwrap());
    let server = std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 8];
            let n = conn.read(&mut buf).unwrap();
            if &buf[..n] == b"end" {
                return;
            }
            conn.write_all(&buf[..n]).unwrap();
            // The client closes first; then this end closes.
            let _ = conn.read(&mut buf);
        }
    });
    let slow = c1.run(move || {
        let start = std::time::Instant::now();
        let mut slow = Vec::new();
        for i in 0..RATE * SECONDS {
            let at = start + Duration::from_millis(i * 1000 / RATE);
            std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
            let t = std::time::Instant::now();
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            conn.write_all(b"x").unwrap();
            let mut buf = [0u8; 1];
            conn.read_exact(&mut buf).unwrap();
            drop(conn);
            // A SYN dropped is sent again after a second.
            if t.elapsed() > Duration::from_millis(800) {
                slow.push((i, t.elapsed()));
            }
        }
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap()
            .write_all(b"end")
            .unwrap();
        slow
    });
    server.join().unwrap();
    let text = agent.scrape_metrics();
    let sum = |name: &str, filter: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let budget_drops = 0.0 + sum("cilia_drop_count_total{", "budget exhausted");
    let early = sum("cilia_conntrack_gc_early_runs_total", "");
    let closed = sum("cilia_conntrack_gc_closed_early_total", "");
    println!(
        "{} connections, {} slow, {budget_drops} budget drops, {early} early GCs, \
         {closed} closed entries collected early",
        RATE * SECONDS,
        slow.len()
    );
    // The drops decide; slow connects (a SYN sent again after a second)
    // are reported with them, not judged alone: a loaded machine can be
    // slow without a drop.
    assert_eq!(
        budget_drops, 0.0,
        "new flows dropped at the budget; connections delayed: {slow:?}"
    );
    assert!(early > 0.0, "the budget was neared: early GCs ran");
    assert!(closed > 0.0, "closed entries were collected early");
}

/// `--ct-max` sizes the node's conntrack table: the endpoint programs,
/// whose object declares the default size, use the table the agent
/// pinned, and status reports its capacity.
#[test]
fn a_conntrack_table_sized_by_configuration_carries_traffic() {
    privileged!("ct_max_configured");
    let agent = TestAgent::start_with_env(AgentOptions::default(), &[("CILIA_CT_MAX", "4096")]);
    let (c1, c2) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    agent.create_endpoint(&c1, "app=a");
    let b = agent.create_endpoint(&c2, "app=b");
    for family in ["ipv6", "ipv4"] {
        tcp_echo(&c2, &c1, ip_of(&b, family));
    }
    let status = agent.cli_json(&["status"]);
    let ct = status["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == "cilia_ct")
        .unwrap()
        .clone();
    assert_eq!(ct["capacity"], 4096, "{ct}");
    // The flows are in the table the agent pinned (and reads back).
    let flows = agent.cli_json(&["bpf", "ct", "list"]);
    let tcp = flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["proto"] == "TCP")
        .count();
    assert!(tcp >= 2, "{flows}");
    // A datapath reload keeps the table as configured.
    agent.cli_ok(&["datapath", "reload"]);
    tcp_echo(&c2, &c1, ip_of(&b, "ipv4"));
}

#[test]
fn ipv6_only_agent_gives_endpoints_no_ipv4() {
    privileged!("ipv6_only_agent");
    let agent = TestAgent::start(AgentOptions {
        ipv4_range: None,
        ..AgentOptions::default()
    });
    let (c1, c2) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    let a = agent.create_endpoint(&c1, "");
    let b = agent.create_endpoint(&c2, "");
    assert!(a["ipv4"].is_null());
    assert!(ping(&c2, ip_of(&a, "ipv6")));
    tcp_echo(&c1, &c2, ip_of(&a, "ipv6"));
    assert!(b["ipv4"].is_null());
    assert_eq!(
        agent.cli_json(&["status"])["ipam"]["ipv4"],
        serde_json::Value::Null
    );
}

#[test]
fn kill_9_of_the_agent_loses_no_packets_and_restart_restores_endpoints() {
    privileged!("kill_9_of_the_agent");
    let mut agent = TestAgent::start(AgentOptions::default());
    let (c1, c2) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    agent.create_endpoint(&c1, "app=a");
    let b = agent.create_endpoint(&c2, "app=b");
    let before = agent.cli_json(&["endpoint", "list"]);

    // 150 pings 20 ms apart (3 s); the agent dies 1 s in and stays dead.
    let pinger = c1
        .command("ping")
        .args([
            "-c",
            "150",
            "-i",
            "0.02",
            "-W",
            "1",
            ip_of(&b, "ipv6").to_string().as_str(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    agent.kill9();
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("150 received, 0% packet loss"), "{text}");

    // Traffic keeps flowing with no agent at all, in both families.
    tcp_echo(&c2, &c1, ip_of(&b, "ipv4"));

    agent.spawn().unwrap();
    let after = agent.cli_json(&["endpoint", "list"]);
    assert_eq!(
        before, after,
        "same endpoints, same addresses after restart"
    );
    // Programs that match their records are left running, not reloaded.
    let log = agent.log_text();
    assert!(
        !log.contains("re-specializing") && !log.contains("re-attaching"),
        "{log}"
    );
    // No duplicate addresses: a new endpoint gets fresh ones.
    let c3 = Netns::new("cep").unwrap();
    let c = agent.create_endpoint(&c3, "app=c");
    for ep in after.as_array().unwrap() {
        assert_ne!(ep["ipv6"], c["ipv6"]);
        assert_ne!(ep["ipv4"], c["ipv4"]);
    }
    assert!(ping(&c3, ip_of(&b, "ipv4")));
}

#[test]
fn a_pinned_map_of_an_older_layout_is_recreated_and_endpoints_move_to_it() {
    privileged!("pin_migration");
    let mut agent = TestAgent::start(AgentOptions::default());
    let (c1, c2) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    agent.create_endpoint(&c1, "app=a");
    let b = agent.create_endpoint(&c2, "app=b");
    agent.kill9();
    // An older build's conntrack map: another type and sizes.
    let ct = agent.bpf_root.path().join("maps/cilia_ct");
    std::fs::remove_file(&ct).unwrap();
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&ct)
        .args([
            "type", "array", "key", "4", "value", "4", "entries", "1", "name", "old_ct",
        ])
        .output()
        .expect("bpftool (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    agent.spawn().unwrap();
    let log = agent.log_text();
    assert!(log.contains("recreating it empty"), "{log}");
    assert!(log.contains("re-attaching every endpoint"), "{log}");
    // The endpoints' programs use the new map: their flows show up in it.
    tcp_echo(&c2, &c1, ip_of(&b, "ipv4"));
    let flows = agent.cli_json(&["bpf", "ct", "list"]);
    assert!(
        !flows.as_array().unwrap().is_empty(),
        "flows tracked in the recreated map"
    );
}

#[test]
fn endpoint_delete_removes_devices_pins_map_entries_and_addresses() {
    privileged!("endpoint_delete");
    let agent = TestAgent::start(AgentOptions::default());
    let c1 = Netns::new("cep").unwrap();
    let a = agent.create_endpoint(&c1, "app=a");
    let id = a["id"].as_u64().unwrap().to_string();
    let host_if = a["host_ifname"].as_str().unwrap().to_string();
    let pin = agent.bpf_root.path().join("links").join(format!("ep{id}"));
    assert!(pin.exists());
    agent.cli_ok(&["endpoint", "delete", &id]);

    assert!(
        agent.node.ip(&["link", "show", &host_if]).is_err(),
        "host veth removed"
    );
    assert!(
        c1.ip(&["link", "show", "eth0"]).is_err(),
        "container side removed"
    );
    assert!(!pin.exists(), "link pin removed");
    assert_eq!(
        agent.cli_json(&["bpf", "endpoint", "list"]),
        serde_json::json!([])
    );
    assert_eq!(agent.cli_json(&["endpoint", "list"]), serde_json::json!([]));
    assert_eq!(agent.cli_json(&["status"])["ipam"]["ipv6"]["used"], 0);
    assert!(!agent.cli(&["endpoint", "get", &id]).status.success());
}

/// Asserts a CLI failure with a one-line message containing `needle`.
fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

#[test]
fn bad_input_gives_a_one_line_error_and_changes_nothing() {
    privileged!("bad_input");
    // A pool with exactly two addresses.
    let agent = TestAgent::start(AgentOptions {
        ipv6_range: "fd00:c1b::/126".into(),
        ipv4_range: Some("10.201.0.0/29".into()),
    });
    let (c1, c2, c3) = (
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
    );
    agent.create_endpoint(&c1, "app=a");
    let state = || {
        (
            agent.cli_ok(&["endpoint", "list", "-o", "json"]),
            agent.node.ip(&["-o", "link"]).unwrap(),
        )
    };
    let before = state();

    let ns = ["endpoint", "create", "--netns"];
    assert_one_line_error(
        &agent.cli(&[&ns[..], &["no-such-netns"]].concat()),
        "netns \"no-such-netns\": not found",
    );
    assert_one_line_error(
        &agent.cli(&[&ns[..], &[c2.name(), "--labels", "app"]].concat()),
        "label \"app\"",
    );
    assert_one_line_error(
        &agent.cli(&[&ns[..], &[c2.name(), "--labels", "a=1,a=2"]].concat()),
        "given twice",
    );
    assert_one_line_error(
        &agent.cli(&[&ns[..], &[c1.name()]].concat()),
        "eth0 already exists",
    );
    assert_one_line_error(
        &agent.cli(&["endpoint", "get", "999"]),
        "endpoint 999 not found",
    );
    assert_eq!(before, state(), "failed requests changed nothing");

    // Fill the pool, then one more.
    agent.create_endpoint(&c2, "app=b");
    let full = state();
    assert_one_line_error(
        &agent.cli(&[&ns[..], &[c3.name()]].concat()),
        "fd00:c1b::/126 is exhausted",
    );
    assert_eq!(full, state(), "exhaustion changed nothing");

    // A second agent on the same state dir refuses to start.
    let out = agent.run_second_agent(&agent.socket.with_extension("second"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another cilia-agent"), "{err}");
    assert_eq!(full, state(), "second agent changed nothing");
}

/// The agent re-executes itself once with glibc's per-thread malloc caches
/// off (`exec_without_thread_caches`: they held 3 MiB over create/delete
/// cycles), and is still the process named `cilia-agent` that was started.
#[test]
fn the_agent_runs_without_per_thread_malloc_caches_under_its_own_name() {
    privileged!("agent_tcache_off");
    let agent = TestAgent::start(AgentOptions::default());
    let pid = agent.pid().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let tunables: Vec<&[u8]> = environ
        .split(|b| *b == 0)
        .filter(|v| v.starts_with(b"GLIBC_TUNABLES="))
        .collect();
    // As given to the test (an operator's own setting stands), plus the
    // agent's.
    let given = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let expected = format!(
        "GLIBC_TUNABLES={}",
        cilia_agent::tunables_without_thread_caches(&given).unwrap_or(given)
    );
    assert_eq!(tunables, [expected.as_bytes()], "the agent's environment");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "cilia-agent");
    assert!(
        agent.cli(&["status"]).status.success(),
        "{}",
        agent.log_text()
    );
}

#[test]
fn the_agents_own_netns_and_paths_with_control_characters_are_refused() {
    privileged!("netns_refused");
    let agent = TestAgent::start(AgentOptions::default());
    let before = agent.node.ip(&["-o", "link"]).unwrap();
    let own = format!("/proc/{}/ns/net", agent.pid().unwrap());
    assert_one_line_error(
        &agent.cli(&["endpoint", "create", "--netns", &own]),
        "agent's own network namespace",
    );
    // Once, a newline in the path ran the rest of the line as an `ip`
    // command in the node's namespace.
    assert_one_line_error(
        &agent.cli(&[
            "endpoint",
            "create",
            "--netns",
            "/run/netns/x\nlink add evil0 type dummy",
        ]),
        "control character",
    );
    assert_eq!(before, agent.node.ip(&["-o", "link"]).unwrap());
    // A namespace of its own still works.
    let ns = Netns::new("cown").unwrap();
    assert_eq!(agent.create_endpoint(&ns, "app=a")["state"], "ready");
}

#[test]
fn api_serves_an_openapi_document() {
    privileged!("openapi");
    let agent = TestAgent::start(AgentOptions::default());
    let out = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&agent.socket)
        .arg("http://cilia/openapi.json")
        .output();
    // curl is optional on a machine; the API client crate is not.
    let doc: serde_json::Value = match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap(),
        _ => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(cilia_api::ApiClient::new(&agent.socket).openapi())
                .unwrap()
        }
    };
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/v1/endpoints"]["post"].is_object());
}

#[test]
fn an_unusable_metrics_address_is_a_start_up_error_not_a_late_death() {
    privileged!("unusable_metrics_address");
    // A namespace whose loopback has no address: as a fresh one before
    // `ip link set lo up`.
    let node = Netns::new("cnode").unwrap();
    node.ip(&["addr", "del", "127.0.0.1/8", "dev", "lo"])
        .unwrap();
    let root = cilia_testnet::BpfRoot::new();
    let dir = std::env::temp_dir().join(format!("cilia-metrics-{}", std::process::id()));
    // Bounded: an agent that wrongly keeps running is killed, not waited on.
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg("--")
        .arg(cilia_testnet::bin("cilia-agent"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--bpf-root")
        .arg(root.path())
        .arg("--socket")
        .arg(dir.join("cilia.sock"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics address") && err.contains("loopback"),
        "{err}"
    );
    assert!(
        !err.contains("cilia-agent ready"),
        "failed before announcing readiness: {err}"
    );
}

/// The program ids behind endpoint `id`'s two pinned links.
fn program_ids(agent: &TestAgent, id: u64) -> Vec<(u32, u32)> {
    [format!("ep{id}"), format!("ep{id}_to")]
        .iter()
        .map(|p| {
            let t =
                cilia_datapath::inspect::link_target(&agent.bpf_root.path().join("links").join(p))
                    .unwrap();
            (t.link_id, t.program_id)
        })
        .collect()
}

#[test]
fn a_new_endpoint_is_enforced_at_once_by_the_generic_program_then_specialized_without_loss() {
    privileged!("fast_attach");
    let agent = TestAgent::start(AgentOptions::default());
    let out = agent.cli_stdin(
        &["policy", "import", "-"],
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: b-from-a\n\
         spec:\n  endpointSelector:\n    matchLabels:\n      app: b\n  ingress:\n  \
         - fromEndpoints:\n    - matchLabels:\n        app: a\n",
    );
    assert!(out.status.success(), "{out:?}");
    let (c1, c2, c3) = (
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
    );
    let a = agent.create_endpoint_fast(&c1, "app=a");
    let on_generic = program_ids(&agent, a["id"].as_u64().unwrap());
    let b = agent.create_endpoint_fast(&c2, "app=b");
    let c = agent.create_endpoint_fast(&c3, "app=c");
    let ib = ip_of(&b, "ipv6");
    // 300 pings 10 ms apart from a, through the swaps of a, b and c.
    let pinger = c1
        .command("ping")
        .args(["-c", "300", "-i", "0.01", "-W", "1", &ib.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // c is refused by b's policy from its very first packets.
    assert!(
        !c3.command("ping")
            .args(["-c", "1", "-W", "1", &ib.to_string()])
            .status()
            .unwrap()
            .success(),
        "c must not reach b"
    );
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("300 received, 0% packet loss"), "{text}");
    agent.wait_specialized(Duration::from_secs(60));
    let specialized = program_ids(&agent, a["id"].as_u64().unwrap());
    for (generic, special) in on_generic.iter().zip(&specialized) {
        assert_eq!(generic.0, special.0, "the same link");
        assert_ne!(generic.1, special.1, "the specialized program swapped in");
    }
    let status = agent.cli_json(&["status"]);
    let programs = status["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "endpoint-programs")
        .unwrap();
    assert_eq!(programs["status"], "ok", "{programs}");
    assert!(ping(&c1, ib));
    assert!(!ping(&c3, ib), "still refused on the specialized program");
    let _ = c;
}

#[test]
fn without_fast_attach_a_create_returns_with_the_specialized_programs() {
    privileged!("fast_attach_off");
    let agent = TestAgent::start_with_env(AgentOptions::default(), &[("CILIA_FAST_ATTACH", "off")]);
    let c1 = Netns::new("cep").unwrap();
    let a = agent.create_endpoint_fast(&c1, "app=a");
    let status = agent.cli_json(&["status"]);
    assert_eq!(status["endpoints_generic"], 0, "{status}");
    let ids = program_ids(&agent, a["id"].as_u64().unwrap());
    agent.cli_ok(&["datapath", "reload"]);
    assert_eq!(
        program_ids(&agent, a["id"].as_u64().unwrap()),
        ids,
        "already this build's specialized programs: nothing to reload"
    );
}
