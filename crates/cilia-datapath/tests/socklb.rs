//! The socket load balancer with real sockets: a node namespace joined to
//! three backend namespaces by veth pairs (backend N: 10.201.N.2/24 and
//! fd00:c2:N::2/64, the node 10.201.N.1 and fd00:c2:N::1), the services
//! written straight into the pinned LB maps, the socket LB attached to a
//! cgroup v2 directory made for the test. Clients are child processes
//! (this test binary again, running `socklb_client_helper`) placed in that
//! cgroup and in the node namespace: cgroup membership is per process, so
//! the test's own threads stay outside.
//!
//! The frontends (192.0.2.10, 2001:db8::10) are routed nowhere in the node
//! namespace and owned by no backend, and no tc program is attached: a
//! connection that reaches a backend proves its packets carried the
//! backend's address from the first one (the backend's accepted socket
//! shows it as its local address), with no per-packet NAT on the way.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cilia_abi::*;
use cilia_datapath::socklb::{cgroup_id, default_cgroup_root, netns_cookie};
use cilia_datapath::BpfDatapath;
use cilia_testnet::netns::unique_name;
use cilia_testnet::{BpfRoot, Netns};

mod common;
use common::serve::Serving;
use common::*;

const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const VIP_TCP_PORT: u16 = 80;
const VIP_UDP_PORT: u16 = 53;
/// A frontend of a service without an active backend.
const VIP_EMPTY_PORT: u16 = 81;
/// A frontend of a service with client affinity over the three backends.
const VIP_AFFINITY_PORT: u16 = 82;
const SERVICE_AFFINITY: u16 = 16;
const BACKEND_TCP_PORT: u16 = 8080;
const BACKEND_UDP_PORT: u16 = 5353;
const SERVICE_TCP4: u16 = 11;
const SERVICE_TCP6: u16 = 12;
const SERVICE_UDP4: u16 = 13;
const SERVICE_UDP6: u16 = 14;
const BACKENDS: u8 = 3;
/// Names the helper reads its work from (unset: the helper does nothing).
const CLIENT_ENV: &str = "CILIA_SOCKLB_CLIENT";

fn backend4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, n, 2)
}
fn backend6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xc2, u16::from(n), 0, 0, 0, 0, 2)
}

/// A cgroup v2 directory of the test's own, removed on drop.
struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    fn new() -> Self {
        let root = default_cgroup_root().expect("this test needs a cgroup v2 mount");
        let path = root.join(unique_name("cilia-test-"));
        std::fs::create_dir(&path).unwrap();
        Self { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The clients have exited; an emptied cgroup can be removed.
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The node, three backends with TCP and UDP servers answering their own
/// name, the datapath (own bpffs root) and the test cgroup.
struct Lab {
    node: Netns,
    _backends: Vec<Netns>,
    dp: BpfDatapath,
    cgroup: TestCgroup,
    /// Local address of every accepted TCP connection, per backend.
    accepted: Arc<Mutex<Vec<(u8, SocketAddr)>>>,
    _servers: Vec<Serving>,
    _root: BpfRoot,
}

impl Lab {
    fn new() -> Self {
        let node = Netns::new("slnode").unwrap();
        let mut backends = Vec::new();
        for n in 1..=BACKENDS {
            let b = Netns::new("slbe").unwrap();
            let veth = format!("sl{n}");
            node.ip(&[
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                b.name(),
            ])
            .unwrap();
            node.ip(&["addr", "add", &format!("10.201.{n}.1/24"), "dev", &veth])
                .unwrap();
            node.ip(&[
                "addr",
                "add",
                &format!("fd00:c2:{n}::1/64"),
                "dev",
                &veth,
                "nodad",
            ])
            .unwrap();
            node.ip(&["link", "set", &veth, "up"]).unwrap();
            b.ip(&["addr", "add", &format!("10.201.{n}.2/24"), "dev", "eth0"])
                .unwrap();
            b.ip(&[
                "addr",
                "add",
                &format!("fd00:c2:{n}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ])
            .unwrap();
            b.ip(&["link", "set", "eth0", "up"]).unwrap();
            backends.push(b);
        }
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let mut servers = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            let n = i as u8 + 1;
            servers.push(tcp_server(b, n, accepted.clone()));
            servers.push(udp_server(b, n));
        }
        let root = BpfRoot::new();
        let dp = BpfDatapath::open(root.path()).unwrap();
        let lab = Self {
            node,
            _backends: backends,
            dp,
            cgroup: TestCgroup::new(),
            accepted,
            _servers: servers,
            _root: root,
        };
        lab.write_services();
        lab
    }

    /// The four services (TCP and UDP, both families) over the three
    /// backends, the one without backends, and the affinity service over
    /// the IPv4 TCP service's backends, written through the datapath.
    fn write_services(&self) {
        let mut rows = Vec::new();
        for (rev_nat, proto, port, backend_port) in [
            (SERVICE_TCP4, 6u8, VIP_TCP_PORT, BACKEND_TCP_PORT),
            (SERVICE_TCP6, 6, VIP_TCP_PORT, BACKEND_TCP_PORT),
            (SERVICE_UDP4, 17, VIP_UDP_PORT, BACKEND_UDP_PORT),
            (SERVICE_UDP6, 17, VIP_UDP_PORT, BACKEND_UDP_PORT),
        ] {
            let v6 = rev_nat == SERVICE_TCP6 || rev_nat == SERVICE_UDP6;
            let vip: IpAddr = if v6 { VIP6.into() } else { VIP4.into() };
            let backends: Vec<LbBackend> = (1..=BACKENDS)
                .map(|n| {
                    let ip: IpAddr = if v6 {
                        backend6(n).into()
                    } else {
                        backend4(n).into()
                    };
                    LbBackend {
                        id: backend_id(rev_nat, n),
                        addr: SocketAddr::new(ip, backend_port),
                        state: LbBackendState::Active,
                    }
                })
                .collect();
            self.dp.upsert_lb_backends(&backends).unwrap();
            rows.push(LbService {
                rev_nat,
                frontend: LbFrontend {
                    addr: vip,
                    port,
                    proto,
                },
                algorithm: LbAlgorithm::Random,
                affinity_timeout: None,
                slots: backends.iter().map(|b| b.id).collect(),
                maglev: None,
                flags: Default::default(),
            });
        }
        rows.push(LbService {
            rev_nat: 15,
            frontend: LbFrontend {
                addr: VIP4.into(),
                port: VIP_EMPTY_PORT,
                proto: 6,
            },
            algorithm: LbAlgorithm::Random,
            affinity_timeout: None,
            slots: Vec::new(),
            maglev: None,
            flags: Default::default(),
        });
        rows.push(LbService {
            rev_nat: SERVICE_AFFINITY,
            frontend: LbFrontend {
                addr: VIP4.into(),
                port: VIP_AFFINITY_PORT,
                proto: 6,
            },
            algorithm: LbAlgorithm::Random,
            affinity_timeout: Some(60),
            slots: (1..=BACKENDS)
                .map(|n| backend_id(SERVICE_TCP4, n))
                .collect(),
            maglev: None,
            flags: Default::default(),
        });
        for row in &rows {
            self.dp.upsert_lb_service(row).unwrap();
        }
    }

    /// Flows the socket LB counted for a service (all CPUs).
    fn flows(&self, rev_nat: u16) -> u64 {
        self.dp.lb_stats(rev_nat).unwrap().flows
    }

    fn register(&self, ns: &Netns) {
        let file = std::fs::File::open(ns.path()).unwrap();
        self.dp
            .add_lb_netns(netns_cookie(&file).unwrap(), 0)
            .unwrap();
    }

    /// Runs the client helper in the test cgroup inside `ns`.
    fn client(&self, ns: &Netns, work: &str) -> Vec<Outcome> {
        run_client(&self.cgroup.path, &ns.path(), work)
    }
}

fn backend_id(rev_nat: u16, n: u8) -> u32 {
    u32::from(rev_nat) * 100 + u32::from(n)
}

/// A TCP server on [::]:BACKEND_TCP_PORT answering "b<N>" to every
/// request (read to the client's end of it) and recording the
/// connection's local address.
fn tcp_server(ns: &Netns, n: u8, accepted: Arc<Mutex<Vec<(u8, SocketAddr)>>>) -> Serving {
    Serving::start(
        ns,
        || {
            let l = TcpListener::bind(SocketAddr::from(([0u16; 8], BACKEND_TCP_PORT))).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        },
        move |l| {
            while let Ok((mut conn, _)) = l.accept() {
                let local = conn.local_addr().unwrap();
                accepted
                    .lock()
                    .unwrap()
                    .push((n, SocketAddr::new(local.ip().to_canonical(), local.port())));
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(WAIT)).unwrap();
                // Read the request to its end first: closing with unread
                // data would reset the connection under the client.
                let mut request = Vec::new();
                let _ = conn.read_to_end(&mut request);
                let _ = conn.write_all(format!("b{n}").as_bytes());
                let _ = conn.shutdown(Shutdown::Write);
            }
        },
    )
}

/// A UDP server on [::]:BACKEND_UDP_PORT answering "b<N>" to every datagram.
fn udp_server(ns: &Netns, n: u8) -> Serving {
    Serving::start(
        ns,
        || {
            let s = UdpSocket::bind(SocketAddr::from(([0u16; 8], BACKEND_UDP_PORT))).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        },
        move |s| {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(format!("b{n}").as_bytes(), from);
            }
        },
    )
}

/// What one exchange of the helper reported: the peer the socket showed
/// (getpeername for TCP, recvfrom's source for UDP) and the answer, or
/// the error.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Answer { peer: SocketAddr, reply: String },
    Failed(String),
}

impl Outcome {
    fn reply(&self) -> &str {
        match self {
            Outcome::Answer { reply, .. } => reply,
            Outcome::Failed(e) => panic!("exchange failed: {e}"),
        }
    }
    fn peer(&self) -> SocketAddr {
        match self {
            Outcome::Answer { peer, .. } => *peer,
            Outcome::Failed(e) => panic!("exchange failed: {e}"),
        }
    }
}

/// Starts this test binary as the client helper, in `cgroup` (it writes
/// its own pid into `cgroup.procs` before anything else) and in the
/// network namespace `netns`, with `work` ("tcp|udp ADDR COUNT", `;`
/// separated), and parses its `RESULT` lines.
fn run_client(cgroup: &Path, netns: &Path, work: &str) -> Vec<Outcome> {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && exec nsenter --net="$2" -- "$3" --exact socklb_client_helper --nocapture --test-threads=1"#)
        .arg("sh")
        .arg(cgroup)
        .arg(netns)
        .arg(&exe)
        .env(CLIENT_ENV, work)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client helper failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        // libtest prints "test … ..." before the first line, unterminated.
        .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .map(|l| {
            let mut parts = l.splitn(2, ' ');
            match (parts.next(), parts.next()) {
                (Some("ERR"), Some(e)) => Outcome::Failed(e.to_string()),
                (Some(peer), Some(reply)) => Outcome::Answer {
                    peer: peer.parse().unwrap(),
                    reply: reply.to_string(),
                },
                _ => panic!("bad helper line {l:?}"),
            }
        })
        .collect()
}

/// The client side, run only inside the helper process: each item of
/// `CILIA_SOCKLB_CLIENT` is `tcp ADDR COUNT` (COUNT connections),
/// `udp ADDR COUNT` (COUNT datagrams from one socket) or `udpc ADDR COUNT`
/// (the same from one connected socket).
#[test]
fn socklb_client_helper() {
    let Ok(work) = std::env::var(CLIENT_ENV) else {
        return;
    };
    for item in work.split(';') {
        let parts: Vec<&str> = item.split_whitespace().collect();
        let addr: SocketAddr = parts[1].parse().unwrap();
        let count: usize = parts[2].parse().unwrap();
        match parts[0] {
            "tcp" => {
                for _ in 0..count {
                    println!("RESULT {}", tcp_exchange(addr));
                }
            }
            "udp" | "udpc" => {
                // udpc: a connected socket, translated by connect() once;
                // its datagrams go without a destination of their own, and
                // its peer must be the source its replies show.
                let connected = parts[0] == "udpc";
                let bind: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0".parse().unwrap()
                } else {
                    "[::]:0".parse().unwrap()
                };
                let s = UdpSocket::bind(bind).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                if connected {
                    s.connect(addr).unwrap();
                }
                for _ in 0..count {
                    let mut buf = [0u8; 64];
                    let sent = if connected {
                        s.send(b"hi")
                    } else {
                        s.send_to(b"hi", addr)
                    };
                    let line = sent
                        .and_then(|_| s.recv_from(&mut buf))
                        .and_then(|(len, from)| {
                            let peer = if connected { s.peer_addr()? } else { from };
                            if peer != from {
                                return Ok(format!(
                                    "ERR getpeername {peer}, recvfrom's source {from}"
                                ));
                            }
                            Ok(format!("{from} {}", String::from_utf8_lossy(&buf[..len])))
                        })
                        .unwrap_or_else(|e| format!("ERR {e}"));
                    println!("RESULT {line}");
                }
            }
            other => panic!("unknown helper work {other}"),
        }
    }
}

fn tcp_exchange(addr: SocketAddr) -> String {
    let run = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(WAIT))?;
        let peer = s.peer_addr()?;
        s.write_all(b"hi")?;
        s.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(format!("{peer} {reply}"))
    };
    run().unwrap_or_else(|e| format!("ERR {e}"))
}

fn per_backend(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for o in outcomes {
        *out.entry(o.reply().to_string()).or_default() += 1;
    }
    out
}

#[test]
fn attach_is_pinned_reused_and_detached() {
    privileged!("attach_is_pinned_reused_and_detached");
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).unwrap();
    let cgroup = TestCgroup::new();
    assert_eq!(dp.socket_lb_links().unwrap(), None);
    dp.attach_socket_lb(&cgroup.path).unwrap();
    let links = dp.socket_lb_links().unwrap().unwrap();
    assert_eq!(links.programs, 8);
    assert_eq!(links.cgroup_id, cgroup_id(&cgroup.path).unwrap());
    let ids = |dp: &BpfDatapath| -> Vec<u32> {
        ["connect4", "sendmsg6", "getpeername4"]
            .iter()
            .map(|n| {
                cilia_datapath::inspect::cgroup_link_target(&dp.socklb_link_pin(n))
                    .unwrap()
                    .link_id
            })
            .collect()
    };
    let before = ids(&dp);
    // A restarted agent attaches again: the same links, new programs.
    let again = BpfDatapath::open(root.path()).unwrap();
    again.attach_socket_lb(&cgroup.path).unwrap();
    assert_eq!(ids(&again), before);
    let program = |dp: &BpfDatapath| {
        cilia_datapath::inspect::cgroup_link_target(&dp.socklb_link_pin("recvmsg6"))
            .unwrap()
            .program_id
    };
    let old_program = program(&again);
    assert_eq!(again.reload_socket_lb().unwrap(), 8);
    assert_eq!(ids(&again), before, "a reload keeps the links");
    assert_ne!(program(&again), old_program, "a reload swaps the programs");
    again.detach_socket_lb().unwrap();
    assert_eq!(again.socket_lb_links().unwrap(), None);
    again.detach_socket_lb().unwrap();
}

#[test]
fn served_netns_set_is_kept() {
    privileged!("served_netns_set_is_kept");
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).unwrap();
    let ns = Netns::new("slns").unwrap();
    let cookie = netns_cookie(&std::fs::File::open(ns.path()).unwrap()).unwrap();
    let own = cilia_datapath::socklb::current_netns_cookie().unwrap();
    assert_ne!(cookie, own, "two namespaces, two cookies");
    dp.add_lb_netns(cookie, 7).unwrap();
    dp.add_lb_netns(own, 0).unwrap();
    let mut want = vec![cookie, own];
    want.sort_unstable();
    assert_eq!(dp.lb_netns().unwrap(), want);
    dp.remove_lb_netns(cookie).unwrap();
    dp.remove_lb_netns(cookie).unwrap();
    assert_eq!(dp.lb_netns().unwrap(), vec![own]);
}

#[test]
fn tcp_connect_to_frontend_reaches_a_backend_and_shows_the_frontend() {
    privileged!("tcp_connect_to_frontend_reaches_a_backend_and_shows_the_frontend");
    let lab = Lab::new();
    lab.dp.attach_socket_lb(&lab.cgroup.path).unwrap();
    lab.register(&lab.node);
    let vip4 = SocketAddr::from((VIP4, VIP_TCP_PORT));
    let vip6 = SocketAddr::from((VIP6, VIP_TCP_PORT));
    let out = lab.client(&lab.node, &format!("tcp {vip4} 1;tcp {vip6} 1"));
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0].peer(), vip4, "getpeername shows the IPv4 frontend");
    assert_eq!(out[1].peer(), vip6, "getpeername shows the IPv6 frontend");
    assert!(out[0].reply().starts_with('b') && out[1].reply().starts_with('b'));
    // The backends saw their own addresses as destination: the packets
    // carried them, nobody translated per packet (no tc program here).
    let accepted = lab.accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    for (n, local) in accepted {
        let want4 = SocketAddr::from((backend4(n), BACKEND_TCP_PORT));
        let want6 = SocketAddr::from((backend6(n), BACKEND_TCP_PORT));
        assert!(
            local == want4 || local == want6,
            "backend {n} accepted on {local}"
        );
    }
    assert_eq!(lab.flows(SERVICE_TCP4), 1);
    assert_eq!(lab.flows(SERVICE_TCP6), 1);
}

#[test]
fn ipv4_mapped_connect_of_an_ipv6_socket_uses_the_ipv4_service() {
    privileged!("ipv4_mapped_connect_of_an_ipv6_socket_uses_the_ipv4_service");
    let lab = Lab::new();
    lab.dp.attach_socket_lb(&lab.cgroup.path).unwrap();
    lab.register(&lab.node);
    let mapped = SocketAddr::from((VIP4.to_ipv6_mapped(), VIP_TCP_PORT));
    let out = lab.client(&lab.node, &format!("tcp {mapped} 1"));
    assert_eq!(
        out[0].peer(),
        mapped,
        "getpeername shows the mapped frontend"
    );
    assert!(out[0].reply().starts_with('b'));
    let udp_mapped = SocketAddr::from((VIP4.to_ipv6_mapped(), VIP_UDP_PORT));
    let out = lab.client(&lab.node, &format!("udp {udp_mapped} 1"));
    assert_eq!(
        out[0].peer(),
        udp_mapped,
        "recvfrom shows the mapped frontend"
    );
    assert!(out[0].reply().starts_with('b'));
    assert_eq!(lab.flows(SERVICE_TCP4), 1);
}

#[test]
fn udp_round_trip_shows_the_frontend_as_source_and_sticks_to_one_backend() {
    privileged!("udp_round_trip_shows_the_frontend_as_source_and_sticks_to_one_backend");
    udp_round_trips("udp");
}

/// A connected UDP socket is translated by connect() alone (its sends
/// carry no address): its datagrams' source and its peer are the frontend.
#[test]
fn connected_udp_shows_the_frontend_as_source_and_peer() {
    privileged!("connected_udp_shows_the_frontend_as_source_and_peer");
    udp_round_trips("udpc");
}

/// Five datagrams from one socket (helper work `udp` or `udpc`) to each
/// family's UDP frontend: every reply shows the frontend, one backend per
/// socket, one flow per socket, not per datagram.
fn udp_round_trips(work: &str) {
    let lab = Lab::new();
    lab.dp.attach_socket_lb(&lab.cgroup.path).unwrap();
    lab.register(&lab.node);
    for vip in [
        SocketAddr::from((VIP4, VIP_UDP_PORT)),
        SocketAddr::from((VIP6, VIP_UDP_PORT)),
    ] {
        let out = lab.client(&lab.node, &format!("{work} {vip} 5"));
        assert_eq!(out.len(), 5, "{out:?}");
        for o in &out {
            assert_eq!(o.peer(), vip, "the reply's source is the frontend: {out:?}");
        }
        assert_eq!(
            per_backend(&out).len(),
            1,
            "one socket's datagrams go to one backend: {out:?}"
        );
    }
    assert_eq!(lab.flows(SERVICE_UDP4), 1);
    assert_eq!(lab.flows(SERVICE_UDP6), 1);
}

#[test]
fn connections_spread_over_the_three_backends() {
    privileged!("connections_spread_over_the_three_backends");
    let lab = Lab::new();
    lab.dp.attach_socket_lb(&lab.cgroup.path).unwrap();
    lab.register(&lab.node);
    let vip = SocketAddr::from((VIP4, VIP_TCP_PORT));
    let out = lab.client(&lab.node, &format!("tcp {vip} 30"));
    let spread = per_backend(&out);
    // Random slots: all three miss one backend with p = 3 * (2/3)^30 < 2e-5.
    assert_eq!(
        spread.keys().cloned().collect::<Vec<_>>(),
        vec!["b1", "b2", "b3"],
        "{spread:?}"
    );
    assert_eq!(lab.flows(SERVICE_TCP4), 30);
}

#[test]
fn sockets_of_a_namespace_not_served_are_not_translated() {
    privileged!("sockets_of_a_namespace_not_served_are_not_translated");
    let lab = Lab::new();
    lab.dp.attach_socket_lb(&lab.cgroup.path).unwrap();
    lab.register(&lab.node);
    // Another namespace in the same cgroup, owning the frontend address
    // itself with a server of its own: untranslated, its client reaches
    // that server; translated, it would find no route to any backend.
    let other = Netns::new("slother").unwrap();
    other
        .ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])
        .unwrap();
    let _local = Serving::start(
        &other,
        || {
            let l = TcpListener::bind(SocketAddr::from((VIP4, VIP_TCP_PORT))).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        },
        |l| {
            while let Ok((mut conn, _)) = l.accept() {
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(WAIT)).unwrap();
                let mut request = Vec::new();
                let _ = conn.read_to_end(&mut request);
                let _ = conn.write_all(b"local");
                let _ = conn.shutdown(Shutdown::Write);
            }
        },
    );
    let vip = SocketAddr::from((VIP4, VIP_TCP_PORT));
    let out = lab.client(&other, &format!("tcp {vip} 1"));
    assert_eq!(out[0].reply(), "local");
    assert_eq!(lab.flows(SERVICE_TCP4), 0);
    // The served node namespace, at the same time, is translated.
    let out = lab.client(&lab.node, &format!("tcp {vip} 1"));
    assert!(out[0].reply().starts_with('b'), "{out:?}");
    // And once the node is no longer served, it is not.
    let file = std::fs::File::open(lab.node.path()).unwrap();
    lab.dp
        .remove_lb_netns(netns_cookie(&file).unwrap())
        .unwrap();
    let out = lab.client(&lab.node, &format!("tcp {vip} 1"));
    assert!(
        matches!(&out[0], Outcome::Failed(_)),
        "no route to the frontend without translation: {out:?}"
    );
    assert_eq!(lab.flows(SERVICE_TCP4), 1);
}

#[test]
fn connect_to_a_frontend_without_backend_is_refused() {
    privileged!("connect_to_a_frontend_without_backend_is_refused");
    let lab = Lab::new();
    lab.dp.attach_socket_lb(&lab.cgroup.path).unwrap();
    lab.register(&lab.node);
    let vip = SocketAddr::from((VIP4, VIP_EMPTY_PORT));
    let out = lab.client(&lab.node, &format!("tcp {vip} 1"));
    match &out[0] {
        Outcome::Failed(e) => assert!(e.contains("not permitted"), "{e}"),
        other => panic!("connected to a service without backends: {other:?}"),
    }
}

#[test]
fn affinity_keeps_every_socket_of_a_namespace_on_one_backend() {
    privileged!("affinity_keeps_every_socket_of_a_namespace_on_one_backend");
    let lab = Lab::new();
    lab.dp.attach_socket_lb(&lab.cgroup.path).unwrap();
    lab.register(&lab.node);
    let vip = SocketAddr::from((VIP4, VIP_AFFINITY_PORT));
    // Two client processes, ten sockets each: the client is the namespace.
    let mut out = lab.client(&lab.node, &format!("tcp {vip} 10"));
    out.extend(lab.client(&lab.node, &format!("tcp {vip} 10")));
    let spread = per_backend(&out);
    assert_eq!(spread.len(), 1, "{spread:?}");
    assert_eq!(lab.flows(SERVICE_AFFINITY), 20);
}
