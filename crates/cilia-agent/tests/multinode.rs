//! End-to-end multi-node: three agents, each in a node namespace wired to a
//! fabric (the underlay), sharing one etcd on the fabric's bridge; pods in
//! their own namespaces; real ICMP/TCP/UDP between nodes over the VXLAN
//! overlay and over native routing; everything driven through the `cilia`
//! CLI (see `cilia_testnet::cluster` for the addressing).
//!
//! The interface these tests hold the agent to (issue #13): the agent flags
//! `--node-name --node-ip --kvstore etcd --kvstore-endpoints --tunnel
//! {vxlan,disabled} --node-lease-ttl --peer-api-addr`; `cilia node list -o
//! json` (name, addresses, ipv6_range, ipv4_range, health); `node` on each
//! `cilia endpoint list` entry and on each `cilia observe --cluster` flow;
//! `cilia status --cluster`; the drop reason of a tunnel packet from an
//! address that is no node ("... unknown node").

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use cilia_testnet::cluster::{
    exchange, node_ipv4, node_ipv4_range, node_ipv6_range, node_name, node_names, ping, poll,
    send_vxlan, tcp_connect, tcp_echo, udp_echo, EchoServer, VxlanFrame, LEASE_TTL_SECS,
};
use cilia_testnet::{cluster_prerequisites, Cluster, Netns, Pod, TestAgent, Tunnel};

const CNP_L3_L4: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/starwars/cnp-l3-l4.yaml"
);

/// How long cluster state may take to reach every node.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long a connect may take before the flow counts as dropped.
const DROP_TIMEOUT: Duration = Duration::from_secs(1);
const FAMILIES: [&str; 2] = ["ipv6", "ipv4"];

/// Three nodes in `tunnel` mode, each listing all three.
fn three_nodes(tunnel: Tunnel) -> Cluster {
    let cluster = Cluster::start(3, tunnel);
    cluster
        .wait_nodes_listed(CONVERGE)
        .unwrap_or_else(|e| panic!("{e}\nnode1's log:\n{}", cluster.agent(1).log_text()));
    cluster
}

/// Polls until `from` pings `to` (the remote pod's entry has arrived).
fn wait_ping(from: &Pod, to: IpAddr) {
    assert!(
        poll(CONVERGE, || ping(&from.ns, to)),
        "node{} pod never reached {to}",
        from.node
    );
}

/// Whether a TCP connection to `to` opens within [`DROP_TIMEOUT`] and echoes.
fn tcp_reaches(from: &Netns, to: SocketAddr) -> bool {
    tcp_connect(from, to, DROP_TIMEOUT)
        .and_then(|mut c| exchange(&mut c, b"ping"))
        .is_ok()
}

/// One echo server per family on the pod's addresses, port `port`.
fn echo_servers(pod: &Pod, port: u16) -> Vec<EchoServer> {
    FAMILIES
        .iter()
        .map(|f| EchoServer::start(&pod.ns, pod.ip(f), port))
        .collect()
}

fn import_yaml(agent: &TestAgent, yaml: &str) {
    let out = agent.cli_stdin(&["policy", "import", "-"], yaml);
    assert!(
        out.status.success(),
        "policy import failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
}

/// The agent's `cilia bpf ipcache list -o json`.
fn ipcache(agent: &TestAgent) -> Vec<serde_json::Value> {
    agent
        .cli_json(&["bpf", "ipcache", "list"])
        .as_array()
        .unwrap()
        .clone()
}

/// Whether the agent's kernel ipcache holds a host entry for `ip`.
fn ipcache_holds(agent: &TestAgent, ip: IpAddr) -> bool {
    let host = format!("{ip}/{}", if ip.is_ipv6() { 128 } else { 32 });
    ipcache(agent).iter().any(|e| e["prefix"] == host.as_str())
}

/// Packets the datapath dropped with a reason containing `needle` (any case).
fn drops_like(agent: &TestAgent, needle: &str) -> u64 {
    agent
        .cli_json(&["bpf", "metrics", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            m["kind"] == "drop"
                && m["reason"]
                    .as_str()
                    .is_some_and(|r| r.to_lowercase().contains(needle))
        })
        .map(|m| m["packets"].as_u64().unwrap())
        .sum()
}

// ---------------------------------------------------------------------------
// Pod to pod across nodes

fn pods_on_three_nodes_exchange_ping_tcp_udp_in_both_families(tunnel: Tunnel) {
    let c = three_nodes(tunnel);
    let pods: Vec<Pod> = (1..=3).map(|n| c.pod(n, &format!("app=p{n}"))).collect();
    for family in FAMILIES {
        for (a, b) in [(0, 1), (1, 2), (2, 0), (1, 0)] {
            let (from, to) = (&pods[a], &pods[b]);
            let what = format!("{family} node{} -> node{}", from.node, to.node);
            wait_ping(from, to.ip(family));
            tcp_echo(&to.ns, &from.ns, to.ip(family), b"hello over tcp")
                .unwrap_or_else(|e| panic!("{what} TCP: {e}"));
            udp_echo(&to.ns, &from.ns, to.ip(family)).unwrap_or_else(|e| panic!("{what} UDP: {e}"));
        }
    }
    // Each node lists its own endpoints, named with its node.
    for pod in &pods {
        let listed = c
            .agent(pod.node)
            .endpoints()
            .into_iter()
            .find(|e| e["id"] == pod.endpoint["id"])
            .unwrap();
        assert_eq!(listed["node"], node_name(pod.node), "{listed}");
    }
}

#[test]
fn pods_on_three_nodes_exchange_ping_tcp_udp_over_vxlan() {
    cluster_prerequisites!("pods_exchange_over_vxlan");
    pods_on_three_nodes_exchange_ping_tcp_udp_in_both_families(Tunnel::Vxlan);
}

#[test]
fn pods_on_three_nodes_exchange_ping_tcp_udp_over_native_routing() {
    cluster_prerequisites!("pods_exchange_over_native_routing");
    pods_on_three_nodes_exchange_ping_tcp_udp_in_both_families(Tunnel::Native);
}

fn a_1400_byte_tcp_payload_crosses(tunnel: Tunnel) {
    let c = three_nodes(tunnel);
    let (a, b) = (c.pod(1, "app=a"), c.pod(2, "app=b"));
    for family in FAMILIES {
        wait_ping(&a, b.ip(family));
        // One write of 1400 bytes: a full-size segment on the pod's link,
        // which must fit the overlay (or be sized down by the MTU).
        tcp_echo(&b.ns, &a.ns, b.ip(family), &[0x5a; 1400])
            .unwrap_or_else(|e| panic!("{family} 1400-byte payload: {e}"));
        // And a bulk transfer of many full-size segments.
        tcp_echo(&b.ns, &a.ns, b.ip(family), &vec![0xa5; 256 * 1024])
            .unwrap_or_else(|e| panic!("{family} 256 KiB: {e}"));
    }
}

#[test]
fn a_1400_byte_tcp_payload_crosses_the_vxlan_overlay() {
    cluster_prerequisites!("mtu_vxlan");
    a_1400_byte_tcp_payload_crosses(Tunnel::Vxlan);
}

#[test]
fn a_1400_byte_tcp_payload_crosses_native_routing() {
    cluster_prerequisites!("mtu_native");
    a_1400_byte_tcp_payload_crosses(Tunnel::Native);
}

// ---------------------------------------------------------------------------
// Policy and identities

fn starwars_policy_imported_once_applies_on_every_node(tunnel: Tunnel) {
    let c = three_nodes(tunnel);
    // Two deathstars (node1 and node3), the ships on node2.
    let ds1 = c.pod(1, "org=empire,class=deathstar");
    let ds3 = c.pod(3, "org=empire,class=deathstar");
    let tf = c.pod(2, "org=empire,class=tiefighter");
    let xw = c.pod(2, "org=alliance,class=xwing");
    let _servers: Vec<EchoServer> = [&ds1, &ds3]
        .iter()
        .flat_map(|ds| echo_servers(ds, 80))
        .collect();
    let targets: Vec<SocketAddr> = [&ds1, &ds3]
        .iter()
        .flat_map(|ds| FAMILIES.map(|f| SocketAddr::new(ds.ip(f), 80)))
        .collect();
    // Before any policy both ships land everywhere.
    for to in &targets {
        for ship in [&tf, &xw] {
            assert!(
                poll(CONVERGE, || tcp_reaches(&ship.ns, *to)),
                "before policy: {} never reached {to}",
                ship.endpoint["labels"]
            );
        }
    }

    // Imported once, on node1.
    c.agent(1).cli_ok(&["policy", "import", CNP_L3_L4]);

    for to in &targets {
        assert!(
            poll(CONVERGE, || !tcp_reaches(&xw.ns, *to)),
            "the xwing still lands on {to}"
        );
        assert!(tcp_reaches(&tf.ns, *to), "the tiefighter lands on {to}");
    }
    // Port 80 only.
    let _other: Vec<EchoServer> = echo_servers(&ds3, 81);
    assert!(!tcp_reaches(&tf.ns, SocketAddr::new(ds3.ip("ipv6"), 81)));
    // Every node's repository holds it.
    for n in 1..=3 {
        assert!(
            poll(CONVERGE, || c
                .agent(n)
                .cli_json(&["policy", "get"])
                .to_string()
                .contains("rule1")),
            "node{n} does not list rule1"
        );
    }
    // The drops were counted where the deathstars live.
    assert!(drops_like(c.agent(1), "policy denied") > 0);
    assert!(drops_like(c.agent(3), "policy denied") > 0);
    // Deleted once, on another node: gone everywhere, the xwing lands.
    c.agent(3).cli_ok(&["policy", "delete", "rule1"]);
    for n in 1..=3 {
        assert!(
            poll(CONVERGE, || !c
                .agent(n)
                .cli_json(&["policy", "get"])
                .to_string()
                .contains("rule1")),
            "node{n} still lists rule1 after its delete on node3"
        );
    }
    for to in &targets {
        assert!(
            poll(CONVERGE, || tcp_reaches(&xw.ns, *to)),
            "after the delete the xwing never lands on {to}"
        );
    }
}

#[test]
fn starwars_policy_imported_once_applies_on_every_node_over_vxlan() {
    cluster_prerequisites!("starwars_vxlan");
    starwars_policy_imported_once_applies_on_every_node(Tunnel::Vxlan);
}

#[test]
fn starwars_policy_imported_once_applies_on_every_node_over_native_routing() {
    cluster_prerequisites!("starwars_native");
    starwars_policy_imported_once_applies_on_every_node(Tunnel::Native);
}

#[test]
fn the_same_labels_get_the_same_identity_on_every_node() {
    cluster_prerequisites!("same_labels_same_identity");
    let c = three_nodes(Tunnel::Vxlan);
    let web: Vec<Pod> = (1..=3).map(|n| c.pod(n, "app=web,tier=front")).collect();
    let db = c.pod(1, "app=db");
    let id = web[0].identity();
    assert!(id >= 256, "an endpoint identity: {id}");
    for pod in &web {
        assert_eq!(pod.identity(), id, "node{}: {}", pod.node, pod.endpoint);
        let listed = c
            .agent(pod.node)
            .endpoints()
            .into_iter()
            .find(|e| e["id"] == pod.endpoint["id"])
            .unwrap();
        assert_eq!(listed["identity"], id, "node{}'s endpoint list", pod.node);
    }
    assert_ne!(db.identity(), id);
    // A remote pod's entry in the kernel carries that identity.
    let remote = web[1].ip("ipv6");
    assert!(
        poll(CONVERGE, || ipcache_holds(c.agent(1), remote)),
        "node1's ipcache never got {remote}"
    );
    let entry = ipcache(c.agent(1))
        .into_iter()
        .find(|e| e["prefix"] == format!("{remote}/128").as_str())
        .unwrap();
    assert_eq!(entry["identity"], id, "{entry}");

    // Three nodes create endpoints with a label set nobody has yet, at the
    // same moment: one identity for all. Several rounds, to meet the race.
    for round in 0..5 {
        let labels = format!("app=race{round}");
        let barrier = Barrier::new(3);
        let pods: Vec<Pod> = std::thread::scope(|s| {
            let threads: Vec<_> = (1..=3)
                .map(|n| {
                    let (c, labels, barrier) = (&c, &labels, &barrier);
                    s.spawn(move || {
                        let ns = Netns::new("cep").unwrap();
                        barrier.wait();
                        let endpoint = c.agent(n).create_endpoint(&ns, labels);
                        Pod {
                            ns,
                            endpoint,
                            node: n,
                        }
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let ids: Vec<u32> = pods.iter().map(Pod::identity).collect();
        assert!(
            ids.iter().all(|i| *i == ids[0]),
            "round {round}: {labels} got identities {ids:?}"
        );
        assert!(![id, db.identity()].contains(&ids[0]));
    }
}

// ---------------------------------------------------------------------------
// Failures: agent, etcd, node

fn established_flows_survive_kill_9_of_either_agent(tunnel: Tunnel) {
    let mut c = three_nodes(tunnel);
    let (a, b) = (c.pod(1, "app=client"), c.pod(2, "app=server"));
    let (_srv_a, srv_b) = (echo_servers(&a, 7000), echo_servers(&b, 7000));
    for family in FAMILIES {
        wait_ping(&a, b.ip(family));
        wait_ping(&b, a.ip(family));
    }
    let mut conns: Vec<TcpStream> = srv_b
        .iter()
        .map(|s| tcp_connect(&a.ns, s.addr, Duration::from_secs(3)).unwrap())
        .collect();
    for conn in &mut conns {
        exchange(conn, b"before").unwrap();
    }
    for victim in [1, 2] {
        c.kill9(victim);
        // Well within the 5 s lease: the node stays a member meanwhile.
        for i in 0..15 {
            for conn in &mut conns {
                exchange(conn, b"agent down")
                    .unwrap_or_else(|e| panic!("node{victim} down, exchange {i}: {e}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for family in FAMILIES {
            for (from, to) in [(&a, &b), (&b, &a)] {
                let to = SocketAddr::new(to.ip(family), 7000);
                assert!(
                    tcp_reaches(&from.ns, to),
                    "node{victim} down: new connection node{} -> {to}",
                    from.node
                );
            }
        }
        c.restart(victim);
        for conn in &mut conns {
            exchange(conn, b"agent back").unwrap();
        }
    }
    for family in FAMILIES {
        assert!(ping(&a.ns, b.ip(family)));
    }
}

#[test]
fn established_flows_survive_kill_9_of_either_agent_over_vxlan() {
    cluster_prerequisites!("kill9_vxlan");
    established_flows_survive_kill_9_of_either_agent(Tunnel::Vxlan);
}

#[test]
fn established_flows_survive_kill_9_of_either_agent_over_native_routing() {
    cluster_prerequisites!("kill9_native");
    established_flows_survive_kill_9_of_either_agent(Tunnel::Native);
}

#[test]
fn an_etcd_restart_keeps_flows_and_agents_resync() {
    cluster_prerequisites!("etcd_restart");
    let mut c = three_nodes(Tunnel::Vxlan);
    let (a, b) = (c.pod(1, "app=client"), c.pod(2, "app=server"));
    let srv_b = echo_servers(&b, 7000);
    wait_ping(&a, b.ip("ipv6"));
    let mut conn = tcp_connect(&a.ns, srv_b[0].addr, Duration::from_secs(3)).unwrap();
    exchange(&mut conn, b"before").unwrap();

    c.etcd.stop_kill9();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(3) {
        exchange(&mut conn, b"etcd down").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    // New connections between known pods need no etcd either.
    assert!(
        tcp_reaches(&a.ns, srv_b[1].addr),
        "new flow while etcd is down"
    );
    c.etcd.start_again().unwrap();
    exchange(&mut conn, b"etcd back").unwrap();

    c.wait_nodes_listed(CONVERGE).unwrap();
    // Every agent says it is connected and synced again.
    for n in 1..=3 {
        let agent = c.agent(n);
        let mut last = String::new();
        let synced = poll(CONVERGE, || {
            let status = agent.cli_json(&["status"]);
            last = status["subsystems"].to_string();
            status["subsystems"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|x| x["name"] == "kvstore" && x["status"] == "ok")
            })
        });
        assert!(synced, "node{n} did not resync with etcd: {last}");
    }
    // State made after the restart reaches the other nodes.
    let late = c.pod(3, "app=late");
    let _srv_late = echo_servers(&late, 7000);
    for family in FAMILIES {
        wait_ping(&a, late.ip(family));
        assert!(tcp_reaches(&a.ns, SocketAddr::new(late.ip(family), 7000)));
        assert!(tcp_reaches(&b.ns, SocketAddr::new(late.ip(family), 7000)));
    }
    exchange(&mut conn, b"still").unwrap();
}

#[test]
fn a_removed_node_leaves_the_other_nodes_after_its_lease() {
    cluster_prerequisites!("node_removed");
    let mut c = three_nodes(Tunnel::Vxlan);
    let doomed = c.pod(3, "app=doomed");
    let ips: Vec<IpAddr> = FAMILIES.iter().map(|f| doomed.ip(f)).collect();
    for n in [1, 2] {
        for ip in &ips {
            assert!(
                poll(CONVERGE, || ipcache_holds(c.agent(n), *ip)),
                "node{n}'s ipcache never got {ip}"
            );
        }
    }

    // Killed, namespace deleted, never restarted.
    c.remove_node(3);
    let gone = Duration::from_secs(u64::from(LEASE_TTL_SECS) + 20);
    for n in [1, 2] {
        assert!(
            poll(gone, || ips
                .iter()
                .all(|ip| !ipcache_holds(c.agent(n), *ip))),
            "node{n}'s ipcache still holds {ips:?} {gone:?} after node3 went"
        );
        assert!(
            poll(CONVERGE, || !node_names(c.agent(n)).contains(&node_name(3))),
            "node{n} still lists node3"
        );
    }
    // The others still talk.
    let (a, b) = (c.pod(1, "app=a"), c.pod(2, "app=b"));
    wait_ping(&a, b.ip("ipv4"));
}

// ---------------------------------------------------------------------------
// Attacks

#[test]
fn a_vxlan_packet_from_an_address_that_is_no_node_is_dropped() {
    cluster_prerequisites!("vxlan_spoofing");
    let c = three_nodes(Tunnel::Vxlan);
    let target = c.pod(1, "app=target");
    let peer = c.pod(2, "app=peer");
    let mac = target.endpoint["mac"].as_str().unwrap().to_string();
    let attacker = c.fabric.attach(99).unwrap();
    for family in FAMILIES {
        wait_ping(&peer, target.ip(family));
        let listener = target
            .ns
            .run(|| UdpSocket::bind(SocketAddr::new(target.ip(family), 0)))
            .unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        // The listener hears a real datagram from node2's pod.
        let sender = peer
            .ns
            .run(|| UdpSocket::bind(SocketAddr::new(peer.ip(family), 0)))
            .unwrap();
        sender
            .send_to(b"legit", SocketAddr::new(target.ip(family), port))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = listener.recv_from(&mut buf).expect("the legit datagram");
        assert_eq!(&buf[..n], b"legit");

        // A stranger on the underlay (198.51.100.99) forges node2's pod:
        // its identity as the VNI, its address as the inner source.
        let before = drops_like(c.agent(1), "unknown node");
        send_vxlan(
            &attacker,
            &VxlanFrame {
                to: IpAddr::V4(node_ipv4(1)),
                vni: peer.identity(),
                inner_dst_mac: mac.clone(),
                inner_src: peer.ip(family),
                inner_dst: SocketAddr::new(target.ip(family), port),
                payload: "forged".into(),
            },
            20,
        )
        .unwrap();
        match listener.recv_from(&mut buf) {
            Ok((n, from)) => panic!(
                "{family}: the pod got {:?} from {from}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{e}"
            ),
        }
        assert!(
            poll(Duration::from_secs(5), || drops_like(
                c.agent(1),
                "unknown node"
            ) > before),
            "{family}: node1 counted no drops of a tunnel packet from an unknown node: {}",
            c.agent(1).cli_ok(&["bpf", "metrics", "list"])
        );
    }
}

// ---------------------------------------------------------------------------
// Visibility

#[test]
fn observe_cluster_shows_a_cross_node_flow_with_node_names_and_status_cluster_lists_all_nodes() {
    cluster_prerequisites!("observe_cluster");
    let c = three_nodes(Tunnel::Vxlan);
    let (a, b) = (c.pod(1, "app=a"), c.pod(2, "app=b"));
    // A policy on b, so its new flows get verdicts.
    import_yaml(
        c.agent(1),
        r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "b-from-a"
spec:
  endpointSelector:
    matchLabels:
      app: b
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: a
"#,
    );
    let _srv = echo_servers(&b, 7000);
    let to = SocketAddr::new(b.ip("ipv4"), 7000);
    assert!(
        poll(CONVERGE, || tcp_reaches(&a.ns, to)),
        "a never reached b"
    );

    // Asked on node3, which saw none of it.
    let (src, dst) = (a.ip("ipv4").to_string(), b.ip("ipv4").to_string());
    let mut last = String::new();
    let found = poll(CONVERGE, || {
        // A new flow each round: the policy may reach node2 after the first.
        tcp_reaches(&a.ns, to);
        let out = c.agent(3).cli(&["observe", "--cluster", "-o", "json"]);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        let flows: Vec<serde_json::Value> = last
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|f: &serde_json::Value| f.get("event").is_some())
            .collect();
        flows.iter().all(|f| f["node"].is_string())
            && flows.iter().any(|f| {
                f["source"]["ip"] == src.as_str()
                    && f["destination"]["ip"] == dst.as_str()
                    && f["node"] == "node2"
            })
    });
    assert!(
        found,
        "no flow {src} -> {dst} observed on node2 (each flow naming its node):\n{last}"
    );

    let status = c.agent(3).cli_ok(&["status", "--cluster"]);
    for n in 1..=3 {
        assert!(status.contains(&node_name(n)), "{status}");
    }
}

/// Whether a node list entry's `health` says the node answered every
/// probe: `icmp` and `tcp` each a non-empty list of results, all reachable.
fn health_reachable(health: &serde_json::Value) -> bool {
    let all = |v: &serde_json::Value| {
        v.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|p| p["reachable"] == true))
    };
    all(&health["icmp"]) && all(&health["tcp"])
}

fn node_list_shows_every_node_reachable(tunnel: Tunnel) {
    let c = three_nodes(tunnel);
    for n in 1..=3 {
        let agent = c.agent(n);
        let mut last = serde_json::Value::Null;
        let ok = poll(Duration::from_secs(60), || {
            last = agent.cli_json(&["node", "list"]);
            let Some(nodes) = last.as_array() else {
                return false;
            };
            nodes.len() == 3
                && (1..=3).all(|m| {
                    nodes.iter().any(|node| {
                        node["name"] == node_name(m).as_str()
                            && node["addresses"]
                                .to_string()
                                .contains(&format!("\"{}\"", node_ipv4(m)))
                            && node["ipv6_range"] == node_ipv6_range(m).as_str()
                            && node["ipv4_range"] == node_ipv4_range(m).as_str()
                            && !node["last_heartbeat"].is_null()
                            && (m == n || health_reachable(&node["health"]))
                    })
                })
        });
        assert!(ok, "node{n}'s node list:\n{last:#}");
    }
}

#[test]
fn node_list_shows_every_node_reachable_over_vxlan() {
    cluster_prerequisites!("node_list_vxlan");
    node_list_shows_every_node_reachable(Tunnel::Vxlan);
}

#[test]
fn node_list_shows_every_node_reachable_over_native_routing() {
    cluster_prerequisites!("node_list_native");
    node_list_shows_every_node_reachable(Tunnel::Native);
}

const CLIENT_EGRESS: &str = r#"apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: client-egress
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toEndpoints:
    - matchLabels:
        app: server
"#;

/// An egress policy naming remote peers by label: the sender's node knows
/// the remote pods' identities from the cluster's ipcache, so a new server
/// on another node is reachable once its entry arrives, and a pod with
/// other labels is not.
fn egress_by_label_reaches_new_remote_servers_only(tunnel: Tunnel) {
    let c = three_nodes(tunnel);
    let client = c.pod(2, "app=client");
    import_yaml(c.agent(1), CLIENT_EGRESS);
    assert!(
        poll(CONVERGE, || c
            .agent(2)
            .cli_json(&["policy", "get"])
            .to_string()
            .contains("client-egress")),
        "node2 never got the policy"
    );
    // Servers created after the policy, with new identities' peers.
    let server = c.pod(1, "app=server");
    let other = c.pod(3, "app=other");
    let _s: Vec<EchoServer> = [&server, &other]
        .iter()
        .flat_map(|p| echo_servers(p, 7000))
        .collect();
    for family in FAMILIES {
        let to = SocketAddr::new(server.ip(family), 7000);
        assert!(
            poll(CONVERGE, || tcp_reaches(&client.ns, to)),
            "the client never reached the server at {to}"
        );
        let not = SocketAddr::new(other.ip(family), 7000);
        assert!(!tcp_reaches(&client.ns, not), "the client reached {not}");
    }
    // Later endpoints are announced too (each change, not only the first).
    for n in [1, 3] {
        let late = c.pod(n, "app=server");
        let _l = echo_servers(&late, 7000);
        let to = SocketAddr::new(late.ip("ipv4"), 7000);
        assert!(
            poll(CONVERGE, || tcp_reaches(&client.ns, to)),
            "the client never reached the later server on node{n} at {to}"
        );
    }
}

#[test]
fn egress_by_label_reaches_new_remote_servers_only_over_vxlan() {
    cluster_prerequisites!("egress_vxlan");
    egress_by_label_reaches_new_remote_servers_only(Tunnel::Vxlan);
}

#[test]
fn egress_by_label_reaches_new_remote_servers_only_over_native_routing() {
    cluster_prerequisites!("egress_native");
    egress_by_label_reaches_new_remote_servers_only(Tunnel::Native);
}
