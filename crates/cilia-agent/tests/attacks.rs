//! Ways around the policy, tried with real traffic between namespaces: a
//! real agent, endpoints created through the CLI, policies imported as
//! YAML, packets sent by the kernel's own stack. Each attack is shown
//! stopped beside the legitimate traffic that still flows.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use cilia_testnet::{require_privileges, AgentOptions, Netns, TestAgent};

macro_rules! privileged {
    ($name:literal) => {
        if !require_privileges($name) {
            return;
        }
    };
}

fn ip_of(ep: &serde_json::Value, family: &str) -> IpAddr {
    ep[family].as_str().unwrap().parse().unwrap()
}

/// Imports a policy given as YAML text.
fn import(agent: &TestAgent, yaml: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    agent.cli_ok(&["policy", "import", file.path().to_str().unwrap()]);
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
    let agent = TestAgent::start(AgentOptions::default());
    let (rs, cl) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    let resolver = agent.create_endpoint(&rs, "app=resolver");
    agent.create_endpoint(&cl, "app=client");
    import(&agent, DNS_ONLY);
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
    let agent = TestAgent::start(AgentOptions::default());
    let (rs, cl) = (Netns::new("cep").unwrap(), Netns::new("cep").unwrap());
    let resolver = agent.create_endpoint(&rs, "app=resolver");
    agent.create_endpoint(&cl, "app=client");
    import(&agent, DENY_UDP_9999);
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
    let (srv, churn, victim) = (
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
    );
    let server = agent.create_endpoint(&srv, "app=server");
    agent.create_endpoint(&churn, "app=churn");
    agent.create_endpoint(&victim, "app=victim");
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
}
