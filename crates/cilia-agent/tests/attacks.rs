//! Ways around the policy, tried with real traffic between namespaces: a
//! real agent, endpoints created through the CLI, policies imported as
//! YAML, packets sent by the kernel's own stack. Each attack is shown
//! stopped beside the legitimate traffic that still flows.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use cilia_testnet::{ip_of, privileged, AgentOptions, Netns, TestAgent};

/// One endpoint per label set, each in a namespace of its own.
fn endpoints<const N: usize>(
    agent: &TestAgent,
    labels: [&str; N],
) -> [(Netns, serde_json::Value); N] {
    labels.map(|l| {
        let ns = Netns::new("cep").unwrap();
        let ep = agent.create_endpoint(&ns, l);
        (ns, ep)
    })
}

/// Imports a policy given as YAML text.
fn import(agent: &TestAgent, yaml: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    agent.cli_ok(&["policy", "import", file.path().to_str().unwrap()]);
}

/// A started agent with a resolver and a client endpoint, `policy` imported.
fn resolver_and_client_under(policy: &str) -> (TestAgent, [(Netns, serde_json::Value); 2]) {
    let agent = TestAgent::start(AgentOptions::default());
    let endpoints = endpoints(&agent, ["app=resolver", "app=client"]);
    import(&agent, policy);
    (agent, endpoints)
}

/// A UDP socket bound in `ns` on every address of the family of `ip`.
fn udp_listener(ns: &Netns, ip: IpAddr, port: u16) -> UdpSocket {
    let any: IpAddr = if ip.is_ipv6() {
        "::".parse().unwrap()
    } else {
        "0.0.0.0".parse().unwrap()
    };
    let sock = ns.run(|| UdpSocket::bind(SocketAddr::new(any, port)).unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    sock
}

/// Sends `payload` from `ns` to `to` (bounded: three tries) and reports
/// what `listener` received: the datagram's length, or None.
fn send_and_receive(
    ns: &Netns,
    to: SocketAddr,
    payload: &[u8],
    listener: &UdpSocket,
    dst_opts: bool,
) -> Option<usize> {
    let sender = ns.run(|| {
        let any: IpAddr = if to.is_ipv6() {
            "::".parse().unwrap()
        } else {
            "0.0.0.0".parse().unwrap()
        };
        UdpSocket::bind(SocketAddr::new(any, 0)).unwrap()
    });
    if dst_opts {
        set_destination_options(&sender);
    }
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        sender.send_to(payload, to).unwrap();
        if let Ok((n, _)) = listener.recv_from(&mut buf) {
            return Some(n);
        }
    }
    None
}

/// Makes the kernel put an (empty, padded) IPv6 Destination Options header
/// in front of the UDP header of every datagram the socket sends.
fn set_destination_options(sock: &UdpSocket) {
    // next header (filled in by the kernel), length 0 (8 bytes), PadN of 4.
    let opts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: a valid fd and a buffer of the length given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            opts.as_ptr().cast(),
            opts.len() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
}

const DNS_ONLY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: dns-only
spec:
  endpointSelector:
    matchLabels:
      app: resolver
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "5353"
        protocol: UDP
"#;

#[test]
fn datagrams_larger_than_the_mtu_pass_an_l4_policy_whole_and_denied_ones_stay_out() {
    privileged!("large_udp_under_l4_policy");
    let (_agent, [(rs, resolver), (cl, _)]) = resolver_and_client_under(DNS_ONLY);
    let big = vec![0x5a; 4000]; // three fragments at MTU 1500
    for family in ["ipv6", "ipv4"] {
        let ip = ip_of(&resolver, family);
        let allowed = udp_listener(&rs, ip, 5353);
        let denied = udp_listener(&rs, ip, 5354);
        assert_eq!(
            send_and_receive(&cl, SocketAddr::new(ip, 5353), &big, &allowed, false),
            Some(4000),
            "{family}: a fragmented datagram to an allowed port arrives whole"
        );
        assert_eq!(
            send_and_receive(&cl, SocketAddr::new(ip, 5354), &big, &denied, false),
            None,
            "{family}: a fragmented datagram to a denied port does not arrive"
        );
        assert_eq!(
            send_and_receive(&cl, SocketAddr::new(ip, 5354), b"small", &denied, false),
            None,
            "{family}: nor does a small one"
        );
    }
}

const DENY_UDP_9999: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: no-9999
spec:
  endpointSelector:
    matchLabels:
      app: resolver
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
  ingressDeny:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "9999"
        protocol: UDP
"#;

#[test]
fn an_l4_deny_holds_for_datagrams_behind_a_destination_options_header() {
    privileged!("dstopts_vs_l4_deny");
    let (agent, [(rs, resolver), (cl, _)]) = resolver_and_client_under(DENY_UDP_9999);
    let ip = ip_of(&resolver, "ipv6");
    let denied = udp_listener(&rs, ip, 9999);
    let open = udp_listener(&rs, ip, 9998);
    assert_eq!(
        send_and_receive(&cl, SocketAddr::new(ip, 9998), b"hello", &open, true),
        Some(5),
        "other ports still pass with the header"
    );
    assert_eq!(
        send_and_receive(&cl, SocketAddr::new(ip, 9999), b"hello", &denied, true),
        None,
        "the denied port stays denied behind the header"
    );
    let drops = agent.cli_ok(&["observe", "-o", "json", "--verdict", "DROPPED"]);
    assert!(drops.contains("9999"), "the drop is observed: {drops}");
}

/// One endpoint opening new flows as fast as it can meets its conntrack
/// budget; another endpoint's open connection and its new flows are not
/// touched. Reports what it measured.
#[test]
fn a_flow_churning_endpoint_exhausts_only_its_own_conntrack_budget() {
    privileged!("ct_budget_isolation");
    const BUDGET: usize = 200;
    const CHURN: usize = 600;
    let agent = TestAgent::start_with_env(
        AgentOptions::default(),
        &[("CILIA_CT_BUDGET", &BUDGET.to_string())],
    );
    let [(srv, server), (churn, churner), (victim, _)] =
        endpoints(&agent, ["app=server", "app=churn", "app=victim"]);
    let ip = ip_of(&server, "ipv4");

    // The victim's long-lived connection, opened before the churn.
    let listener = srv.run(|| std::net::TcpListener::bind("0.0.0.0:7000").unwrap());
    let mut conn = victim.run(|| {
        std::net::TcpStream::connect_timeout(&SocketAddr::new(ip, 7000), Duration::from_secs(2))
            .unwrap()
    });
    let (mut accepted, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    // The churn: every datagram from a fresh socket, kept open so that no
    // source port (and so no flow) repeats.
    let sink = udp_listener(&srv, ip, 7001);
    sink.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let sent = churn.run(|| {
        let mut open = Vec::with_capacity(CHURN);
        for _ in 0..CHURN {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = s.send_to(b"x", SocketAddr::new(ip, 7001));
            open.push(s);
        }
        open.len()
    });
    let mut received = 0;
    let mut buf = [0u8; 16];
    while sink.recv_from(&mut buf).is_ok() {
        received += 1;
    }
    println!("churn: {sent} new flows sent, {received} admitted, budget {BUDGET}");
    assert!(
        received <= BUDGET,
        "the churner got {received} flows past a budget of {BUDGET}"
    );
    assert!(
        received >= BUDGET / 2,
        "the churner's first flows pass ({received})"
    );

    // The victim's connection still carries data, both ways ...
    use std::io::{Read, Write};
    conn.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    accepted.read_exact(&mut got).unwrap();
    accepted.write_all(b"pong").unwrap();
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    // ... and it can still open new flows.
    let sink2 = udp_listener(&srv, ip, 7002);
    assert_eq!(
        send_and_receive(&victim, SocketAddr::new(ip, 7002), b"new", &sink2, false),
        Some(3)
    );
    let drops = agent.cli_ok(&["observe", "-o", "json", "--verdict", "DROPPED"]);
    assert!(
        drops.contains("Endpoint conntrack budget exhausted"),
        "the refused flows are observed by name"
    );
    // And `cilia status` names the endpoint at its budget.
    let status = agent.cli_json(&["status"]);
    let ct = status["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "conntrack")
        .unwrap()
        .clone();
    assert_eq!(ct["status"], "degraded", "{ct}");
    let at_budget = format!(
        "endpoint {} holds {BUDGET} conntrack entries",
        churner["id"]
    );
    assert!(ct["errors"].to_string().contains(&at_budget), "{ct}");
}

/// A raw ICMPv6 socket in `ns` (the kernel fills in the checksum and the
/// source address), with the given hop limit for what it sends.
fn icmp6_socket(ns: &Netns, hop_limit: i32) -> std::net::UdpSocket {
    ns.run(|| {
        // SAFETY: plain socket calls; the fd is owned by the returned socket.
        unsafe {
            let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            for opt in [libc::IPV6_UNICAST_HOPS, libc::IPV6_MULTICAST_HOPS] {
                let rc = libc::setsockopt(
                    fd,
                    libc::IPPROTO_IPV6,
                    opt,
                    (&hop_limit as *const i32).cast(),
                    std::mem::size_of::<i32>() as libc::socklen_t,
                );
                assert_eq!(rc, 0);
            }
            <std::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }
    })
}

/// Whether an ICMPv6 message of `icmp_type` arrives on `sock` within a second.
fn icmp6_arrives(sock: &std::net::UdpSocket, icmp_type: u8) -> bool {
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            if n > 0 && buf[0] == icmp_type {
                return true;
            }
        }
    }
    false
}

/// The IPv6 + UDP headers of a datagram from `src` to `dst` (what an ICMPv6
/// error quotes).
fn quoted_udp6(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (src, dst) else {
        panic!("IPv6 expected")
    };
    let mut p = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 8, 0, 0]);
    p
}

const B_ONLY_FROM_C: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: b-only-from-c
spec:
  endpointSelector:
    matchLabels:
      app: b
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: c
"#;

#[test]
fn an_icmp_error_quoting_the_senders_own_flow_does_not_reach_a_peer_that_denies_it() {
    privileged!("icmp_error_real_traffic");
    let agent = TestAgent::start(AgentOptions::default());
    let [(a_ns, a), (b_ns, b), (c_ns, c)] = endpoints(&agent, ["app=a", "app=b", "app=c"]);
    import(&agent, B_ONLY_FROM_C);
    let (a6, b6, c6) = (ip_of(&a, "ipv6"), ip_of(&b, "ipv6"), ip_of(&c, "ipv6"));

    // a has a live flow of its own, to c.
    let c_sink = udp_listener(&c_ns, c6, 7100);
    let from_a = a_ns.run(|| UdpSocket::bind(SocketAddr::new(a6, 7200)).unwrap());
    from_a.send_to(b"hi", SocketAddr::new(c6, 7100)).unwrap();
    let mut buf = [0u8; 8];
    c_sink.recv_from(&mut buf).unwrap();

    // The attack: a "port unreachable" to b quoting that flow.
    let b_raw = icmp6_socket(&b_ns, 64);
    let a_raw = icmp6_socket(&a_ns, 64);
    let mut error = vec![1, 4, 0, 0, 0, 0, 0, 0];
    error.extend_from_slice(&quoted_udp6(a6, c6, 7200, 7100));
    a_raw.send_to(&error, SocketAddr::new(b6, 0)).unwrap();
    assert!(
        !icmp6_arrives(&b_raw, 1),
        "an error quoting a's own flow must not reach b, whose policy denies a"
    );

    // The legitimate case: c's datagram to a closed port of b comes back to
    // c as b's kernel's port unreachable, related to c's flow.
    let c_raw = icmp6_socket(&c_ns, 64);
    let from_c = c_ns.run(|| UdpSocket::bind(SocketAddr::new(c6, 0)).unwrap());
    from_c.send_to(b"x", SocketAddr::new(b6, 7999)).unwrap();
    assert!(
        icmp6_arrives(&c_raw, 1),
        "b's port unreachable about c's datagram reaches c"
    );
}

#[test]
fn a_neighbour_advertisement_for_another_endpoints_address_is_dropped() {
    privileged!("nd_spoof_real_traffic");
    let agent = TestAgent::start(AgentOptions::default());
    let [(a_ns, a), (b_ns, b)] = endpoints(&agent, ["app=a", "app=b"]);
    let (a6, b6) = (ip_of(&a, "ipv6"), ip_of(&b, "ipv6"));
    let IpAddr::V6(b6_addr) = b6 else { panic!() };
    let lxc_a = a["host_ifname"].as_str().unwrap().to_string();
    let spoofed = |agent: &TestAgent| -> u64 {
        agent
            .cli_json(&["bpf", "metrics", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["kind"] == "drop" && m["reason"] == "Invalid source address")
            .map(|m| m["packets"].as_u64().unwrap())
            .sum()
    };
    let before = spoofed(&agent);

    // a claims b's address to the node, unsolicited (override flag), at
    // hop limit 255 so only the datapath stands in the way.
    let raw = icmp6_socket(&a_ns, 255);
    let mut na = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    na.extend_from_slice(&b6_addr.octets());
    na.extend_from_slice(&[2, 1, 0x0a, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb]);
    let all_nodes: IpAddr = "ff02::1".parse().unwrap();
    let ifindex = a_ns.run(|| nix::net::if_::if_nametoindex("eth0").unwrap());
    let to = std::net::SocketAddrV6::new(
        match all_nodes {
            IpAddr::V6(v) => v,
            _ => unreachable!(),
        },
        0,
        0,
        ifindex,
    );
    for _ in 0..3 {
        raw.send_to(&na, to).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let neigh = agent
        .node
        .ip(&["-6", "neigh", "show", "dev", &lxc_a])
        .unwrap_or_default();
    assert!(
        !neigh.contains(&b6.to_string()),
        "the node learned b's address on a's link: {neigh}"
    );
    assert!(
        spoofed(&agent) >= before + 3,
        "each advertisement is dropped as a forged source"
    );
    // a still reaches b: its own neighbour discovery works.
    let sink = udp_listener(&b_ns, b6, 7300);
    assert_eq!(
        send_and_receive(&a_ns, SocketAddr::new(b6, 7300), b"ok", &sink, false),
        Some(2)
    );
    let _ = a6;
}

/// Nothing an endpoint was allowed outlives it: its conntrack entries go
/// with it (and with its identity), so a successor at its address starts
/// from policy, not from a predecessor's open flows.
#[test]
fn deleting_or_relabelling_an_endpoint_purges_its_conntrack_entries() {
    privileged!("ct_purge");
    let agent = TestAgent::start(AgentOptions::default());
    let [(a_ns, a), (b_ns, b), (c_ns, c)] = endpoints(&agent, ["app=a", "app=b", "app=c"]);
    let (a4, b4, c4) = (ip_of(&a, "ipv4"), ip_of(&b, "ipv4"), ip_of(&c, "ipv4"));
    let sink = udp_listener(&b_ns, b4, 7400);
    for (ns, ip) in [(&a_ns, a4), (&c_ns, c4)] {
        let from = ns.run(|| UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap());
        from.send_to(b"x", SocketAddr::new(b4, 7400)).unwrap();
        let mut buf = [0u8; 4];
        sink.recv_from(&mut buf).unwrap();
    }
    let ct_mentions = |ip: IpAddr| {
        agent
            .cli_json(&["bpf", "ct", "list"])
            .to_string()
            .contains(&format!("\"{ip}:"))
    };
    assert!(ct_mentions(a4) && ct_mentions(c4), "both flows tracked");

    agent.cli_ok(&[
        "endpoint",
        "delete",
        a["id"].as_u64().unwrap().to_string().as_str(),
    ]);
    assert!(!ct_mentions(a4), "a's flows are gone with a");
    assert!(ct_mentions(c4), "c's flows stay");

    let c_id = c["id"].as_u64().unwrap() as u16;
    assert!(agent.set_labels(c_id, &[("app", "c2")]));
    assert!(!ct_mentions(c4), "c's flows are gone with its old identity");
}
