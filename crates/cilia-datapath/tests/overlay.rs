//! Two nodes with real traffic: node namespaces joined by a veth pair (the
//! underlay: 198.51.100.N/24 and 2001:db8:100::N/64), each with its own
//! `BpfDatapath` (own bpffs root, own maps), one endpoint, and the other
//! node's endpoint in its ipcache with that node as tunnel (IPv6 entries
//! via the IPv6 underlay, IPv4 via the IPv4 one, so both outer families
//! are used). In VXLAN mode each node has an external-mode VXLAN device
//! with the overlay programs; in native mode the underlay device has
//! `cil_from_netdev` and the nodes never forward (ip_forward stays 0).
//! The L7 case puts the transparent relay of `common::relay` (the proxy's
//! part, as in `l7_redirect.rs`) in the receiving node.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use cilia_abi::*;
use cilia_datapath::packet::Mac;
use cilia_datapath::BpfDatapath;
use cilia_testnet::{BpfRoot, Netns};

mod common;
use common::relay::{Relay, PROXY_PORT};
use common::serve::{exchange, Echo};
use common::*;

/// Identity of node 1's endpoint (admitted by node 2's policy tests).
const X_IDENTITY: u32 = 1001;
/// Another identity, which node 2's policy does not admit.
const Y_IDENTITY: u32 = 1099;
const B_IDENTITY: u32 = 1002;
/// Underlay MTU 1500 minus the IPv6 VXLAN overhead (70).
const OVERLAY_MTU: u32 = 1430;
const ECHO_PORT: u16 = 8080;

fn under4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, n)
}
fn under6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, u16::from(n))
}
fn pod6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xc1a, u16::from(n), 0, 0, 0, 0, 0x10)
}
fn pod4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, n, 10)
}
fn gw6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xc1a, u16::from(n), 0, 0, 0, 0, 1)
}
fn gw4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, n, 1)
}

fn mac(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One node: its namespace, its endpoint's namespace, its datapath.
struct Node {
    n: u8,
    ns: Netns,
    ep: Netns,
    dp: BpfDatapath,
    config: EndpointConfig,
}

impl Node {
    /// Re-specializes the endpoint with another identity (swapped into
    /// its links, as the agent does on a label change).
    fn set_identity(&mut self, identity: u32) {
        self.config.identity = identity;
        let config = self.config;
        self.ns
            .run(|| self.dp.attach_endpoint(&config, "lxc0"))
            .unwrap();
    }

    fn counted(&self, kind: u8, reason: u8) -> u64 {
        self.dp
            .metrics()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.kind == kind && k.reason == reason)
            .map(|(_, v)| v.packets)
            .sum()
    }
}

struct Cluster {
    nodes: [Node; 2],
    // Dropped last: the links pinned in it keep the programs attached.
    _root: BpfRoot,
}

fn node(root: &BpfRoot, n: u8, mode: TunnelMode, identity: u32) -> Node {
    let ns = Netns::new("cnode").unwrap();
    let ep = Netns::new("cep").unwrap();
    let (m, node_m) = if n == 1 {
        (A_MAC, A_NODE_MAC)
    } else {
        (B_MAC, B_NODE_MAC)
    };
    ns.sh("ip link set lo up").unwrap();
    if mode == TunnelMode::Vxlan {
        ns.sh(&format!(
            "set -e
             ip link add cilia_vxlan type vxlan external dstport 8472 nolearning
             ip link set cilia_vxlan addrgenmode none
             ip link set cilia_vxlan arp off mtu {OVERLAY_MTU} up"
        ))
        .unwrap();
    }
    ns.sh(&format!(
        "set -e
         ip link add lxc0 address {hm} mtu {OVERLAY_MTU} type veth peer name eth0 address {em} mtu {OVERLAY_MTU} netns {ep}
         ip link set lxc0 up
         ip route add {v6}/128 dev lxc0; ip route add {v4}/32 dev lxc0",
        hm = mac(node_m),
        em = mac(m),
        ep = ep.name(),
        v6 = pod6(n),
        v4 = pod4(n),
    ))
    .unwrap();
    ep.sh(&format!(
        "set -e
         ip link set lo up
         ip addr add {v6}/128 dev eth0 nodad; ip addr add {v4}/32 dev eth0
         ip link set eth0 up
         ip -6 route add {gw6}/128 dev eth0; ip -6 route add default via {gw6} dev eth0
         ip route add {gw4}/32 dev eth0; ip route add default via {gw4} dev eth0",
        v6 = pod6(n),
        v4 = pod4(n),
        gw6 = gw6(n),
        gw4 = gw4(n),
    ))
    .unwrap();
    let dp = BpfDatapath::open(&root.path().join(format!("node{n}"))).unwrap();
    let ifindex = ns.run(|| nix::net::if_::if_nametoindex("lxc0").unwrap());
    let config = EndpointConfig {
        ipv6: pod6(n).octets(),
        ipv4: pod4(n).octets(),
        mac: m,
        node_mac: node_m,
        ifindex,
        identity,
        endpoint_id: u16::from(n),
        enable_ipv4: 1,
        monitor: 1,
    };
    ns.run(|| dp.attach_endpoint(&config, "lxc0")).unwrap();
    let info = EndpointInfo {
        ifindex,
        identity,
        endpoint_id: u16::from(n),
        flags: 0,
        mac: m,
        node_mac: node_m,
    };
    dp.upsert_endpoint(IpAddr::V6(pod6(n)), info).unwrap();
    dp.upsert_endpoint(IpAddr::V4(pod4(n)), info).unwrap();
    dp.set_policy(info.endpoint_id, &Default::default())
        .unwrap(); // empty: nothing selects it
    Node {
        n,
        ns,
        ep,
        dp,
        config,
    }
}

/// Two nodes in `mode`, each knowing the other's endpoint and underlay
/// addresses.
fn cluster(mode: TunnelMode) -> Cluster {
    let root = BpfRoot::new();
    let nodes = [
        node(&root, 1, mode, X_IDENTITY),
        node(&root, 2, mode, B_IDENTITY),
    ];
    nodes[0]
        .ns
        .sh(&format!(
            "ip link add eth0 type veth peer name eth0 netns {}",
            nodes[1].ns.name()
        ))
        .unwrap();
    for (i, node) in nodes.iter().enumerate() {
        let peer = &nodes[1 - i];
        let n = node.n;
        node.ns
            .sh(&format!(
                "set -e
                 ip addr add {u4}/24 dev eth0; ip addr add {u6}/64 dev eth0 nodad
                 ip link set eth0 up",
                u4 = under4(n),
                u6 = under6(n),
            ))
            .unwrap();
        let (tunnel_ifindex, underlay_ifindex) = node.ns.run(|| {
            (
                nix::net::if_::if_nametoindex("cilia_vxlan").unwrap_or(0),
                nix::net::if_::if_nametoindex("eth0").unwrap(),
            )
        });
        node.dp
            .set_node_config(&NodeConfig {
                tunnel_mode: mode,
                tunnel_ifindex,
                underlay_ifindex,
                tunnel_port: if mode == TunnelMode::Vxlan { 8472 } else { 0 },
            })
            .unwrap();
        match mode {
            TunnelMode::Vxlan => node
                .ns
                .run(|| node.dp.attach_overlay("cilia_vxlan"))
                .unwrap(),
            TunnelMode::Native => node.ns.run(|| node.dp.attach_netdev("eth0")).unwrap(),
            TunnelMode::Off => {}
        }
        node.dp
            .publish_nodes(&[under4(peer.n).into(), under6(peer.n).into()])
            .unwrap();
        for (prefix, tunnel) in [
            (
                ipnet::IpNet::from(IpAddr::V6(pod6(peer.n))),
                IpAddr::V6(under6(peer.n)),
            ),
            (
                ipnet::IpNet::from(IpAddr::V4(pod4(peer.n))),
                IpAddr::V4(under4(peer.n)),
            ),
        ] {
            let row = IpcacheEntry {
                prefix,
                identity: peer.config.identity,
                tunnel: Some(tunnel),
            };
            node.dp
                .upsert_ipcache_value(row.key(), row.value())
                .unwrap();
        }
    }
    Cluster { nodes, _root: root }
}

/// Whether `from` gets an echo reply from `to` (a few tries: the first
/// packets may wait for the underlay's neighbour resolution).
fn ping(from: &Netns, to: IpAddr) -> bool {
    from.sh(&format!("ping -c 3 -i 0.2 -W 2 -w 4 {to}")).is_ok()
}

/// Sends `payload` to the echo server at `to` from inside `from` and
/// returns what came back (an error if the connection failed).
fn echo(from: &Netns, to: IpAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    exchange(from, SocketAddr::new(to, ECHO_PORT), payload, WAIT).map(|(_, back)| back)
}

fn payload() -> Vec<u8> {
    (0..1400u32).map(|i| (i % 251) as u8).collect()
}

/// Node 2's endpoint admits identity X only (all protocols).
fn admit_only_x(node: &Node) {
    let policy = EndpointPolicy {
        enforcement: Enforcement {
            ingress: true,
            egress: false,
            audit: false,
        },
        entries: vec![PolicyEntry {
            direction: Direction::Ingress,
            identity: X_IDENTITY,
            proto: 0,
            port: 0,
            port_prefix_len: 0,
            verdict: Verdict::Allow,
            rule: 9,
            proxy_port: 0,
        }],
    };
    node.dp
        .set_policy(node.config.endpoint_id, &policy.encode())
        .unwrap();
    node.dp.bump_policy_revision().unwrap();
}

fn both_families(n: u8) -> [IpAddr; 2] {
    [IpAddr::V6(pod6(n)), IpAddr::V4(pod4(n))]
}

#[test]
fn endpoints_on_two_nodes_talk_through_the_vxlan_overlay_in_both_families() {
    privileged!("endpoints_on_two_nodes_talk_through_the_vxlan_overlay_in_both_families");
    let c = cluster(TunnelMode::Vxlan);
    let [n1, n2] = &c.nodes;
    let _echo = Echo::start(&n2.ep, &[ECHO_PORT]);
    for to in both_families(2) {
        assert!(ping(&n1.ep, to), "ping {to}");
        // A full-size segment crosses: the endpoint MTU leaves room for
        // the encapsulation.
        assert_eq!(echo(&n1.ep, to, &payload()).unwrap(), payload(), "{to}");
    }
    assert!(ping(&n2.ep, IpAddr::V6(pod6(1))));
    assert!(n1.counted(CILIA_METRIC_FORWARD, CILIA_FWD_TUNNEL) > 0);
    assert!(n2.counted(CILIA_METRIC_FORWARD, CILIA_FWD_ENDPOINT) > 0);
    // The receiver charged its conntrack entries to its endpoint.
    let ct = n2.dp.list_ct().unwrap();
    assert!(!ct.is_empty());
    assert!(ct.iter().all(|(_, v)| v.owner == 2), "{ct:?}");
}

#[test]
fn receiver_enforces_its_ingress_policy_on_the_identity_in_the_vni() {
    privileged!("receiver_enforces_its_ingress_policy_on_the_identity_in_the_vni");
    let mut c = cluster(TunnelMode::Vxlan);
    admit_only_x(&c.nodes[1]);
    let _echo = Echo::start(&c.nodes[1].ep, &[ECHO_PORT]);
    for to in both_families(2) {
        assert!(ping(&c.nodes[0].ep, to), "X is admitted: {to}");
    }
    // Node 2's ipcache still says X for the sender's addresses: only the
    // VNI tells it the sender is Y now.
    c.nodes[0].set_identity(Y_IDENTITY);
    let denied = c.nodes[1].counted(CILIA_METRIC_DROP, CILIA_DROP_POLICY);
    for to in both_families(2) {
        assert!(!ping(&c.nodes[0].ep, to), "Y is not admitted: {to}");
        assert!(echo(&c.nodes[0].ep, to, b"hi").is_err(), "{to}");
    }
    assert!(c.nodes[1].counted(CILIA_METRIC_DROP, CILIA_DROP_POLICY) > denied);
    c.nodes[0].set_identity(X_IDENTITY);
    assert!(ping(&c.nodes[0].ep, IpAddr::V4(pod4(2))), "X again");
}

#[test]
fn tunnel_packets_from_an_address_that_is_no_known_node_are_dropped() {
    privileged!("tunnel_packets_from_an_address_that_is_no_known_node_are_dropped");
    let c = cluster(TunnelMode::Vxlan);
    let [n1, n2] = &c.nodes;
    assert!(ping(&n1.ep, IpAddr::V6(pod6(2))));
    n2.dp
        .withdraw_nodes(&[under4(1).into(), under6(1).into()])
        .unwrap();
    assert!(n2.dp.nodes().unwrap().is_empty());
    for to in both_families(2) {
        assert!(!ping(&n1.ep, to), "{to}");
    }
    assert!(drops(&n2.dp, CILIA_DROP_UNKNOWN_NODE) >= 2);
    n2.dp.publish_nodes(&[under6(1).into()]).unwrap();
    assert!(ping(&n1.ep, IpAddr::V6(pod6(2))), "known again (IPv6)");
    assert!(
        !ping(&n1.ep, IpAddr::V4(pod4(2))),
        "IPv4 underlay still unknown"
    );
}

#[test]
fn endpoints_on_two_nodes_talk_by_native_routing_without_ip_forwarding() {
    privileged!("endpoints_on_two_nodes_talk_by_native_routing_without_ip_forwarding");
    let c = cluster(TunnelMode::Native);
    let [n1, n2] = &c.nodes;
    admit_only_x(n2);
    let _echo = Echo::start(&n2.ep, &[ECHO_PORT]);
    for to in both_families(2) {
        assert!(ping(&n1.ep, to), "ping {to}");
        assert_eq!(echo(&n1.ep, to, &payload()).unwrap(), payload(), "{to}");
    }
    assert!(n1.counted(CILIA_METRIC_FORWARD, CILIA_FWD_NATIVE) > 0);
    assert!(n2.counted(CILIA_METRIC_FORWARD, CILIA_FWD_ENDPOINT) > 0);
    for node in [n1, n2] {
        let sysctls = node
            .ns
            .sh("cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/all/forwarding")
            .unwrap();
        assert_eq!(sysctls.split_whitespace().collect::<Vec<_>>(), ["0", "0"]);
    }
}

#[test]
fn node_programs_live_in_pinned_links_and_are_swapped_in_place() {
    privileged!("node_programs_live_in_pinned_links_and_are_swapped_in_place");
    let root = BpfRoot::new();
    let ns = Netns::new("cnode").unwrap();
    let add_vxlan = "ip link add cilia_vxlan type vxlan external dstport 8472 nolearning
                     ip link set cilia_vxlan arp off up";
    ns.sh(add_vxlan).unwrap();
    let ifindex = || ns.run(|| nix::net::if_::if_nametoindex("cilia_vxlan").unwrap());
    let target = |dp: &BpfDatapath, pin: &str| {
        cilia_datapath::inspect::link_target(&dp.node_link_pin(pin)).unwrap()
    };
    let dp = BpfDatapath::open(root.path()).unwrap();
    ns.run(|| dp.attach_overlay("cilia_vxlan")).unwrap();
    let first = target(&dp, "overlay_in");
    assert_eq!(first.ifindex, ifindex());
    assert_eq!(target(&dp, "overlay_out").ifindex, ifindex());
    drop(dp);

    // A restarted agent finds them attached, and swaps inside the links.
    let dp = BpfDatapath::open(root.path()).unwrap();
    assert_eq!(target(&dp, "overlay_in").program_id, first.program_id);
    ns.run(|| dp.attach_overlay("cilia_vxlan")).unwrap();
    let second = target(&dp, "overlay_in");
    assert_eq!(second.link_id, first.link_id);
    assert_ne!(second.program_id, first.program_id);
    assert_eq!(dp.reload_node_programs().unwrap(), 2);
    let third = target(&dp, "overlay_in");
    assert_eq!(third.link_id, first.link_id);
    assert_ne!(third.program_id, second.program_id);

    // The device made again: the old link is dropped, a new one made.
    ns.sh(&format!("ip link del cilia_vxlan\n{add_vxlan}"))
        .unwrap();
    ns.run(|| dp.attach_overlay("cilia_vxlan")).unwrap();
    let links = dp.node_links().unwrap();
    assert_eq!(links.overlay, Some(ifindex()));
    assert_eq!(links.netdev, None);
    assert_ne!(target(&dp, "overlay_in").link_id, first.link_id);

    // Detaching the other mode's program leaves the overlay running.
    dp.detach_netdev().unwrap();
    assert_eq!(dp.node_links().unwrap().overlay, Some(ifindex()));
    dp.detach_node_programs().unwrap();
    assert_eq!(dp.node_links().unwrap(), Default::default());
    assert!(!dp.node_link_pin("overlay_in").exists());
    dp.detach_node_programs().unwrap();
}

#[test]
fn a_flow_from_another_node_is_handed_to_the_l7_proxy_at_the_overlay() {
    privileged!("a_flow_from_another_node_is_handed_to_the_l7_proxy_at_the_overlay");
    let c = cluster(TunnelMode::Vxlan);
    let [n1, n2] = &c.nodes;
    // Node 2: the proxy's policy routing, and routes to node 1's endpoint
    // through the overlay for what its stack sends (the relay's answers).
    let mark = format!("{CILIA_MARK_TO_PROXY:#x}/{CILIA_MARK_MASK:#x}");
    let (table, pref) = (CILIA_PROXY_ROUTE_TABLE, CILIA_PROXY_RULE_PRIORITY);
    n2.ns
        .sh(&format!(
            "set -e
             ip rule add fwmark {mark} lookup {table} pref {pref}
             ip route add local 0.0.0.0/0 dev lo table {table}
             ip -6 rule add fwmark {mark} lookup {table} pref {pref}
             ip -6 route add local ::/0 dev lo table {table}
             ip route add {p4}/32 dev cilia_vxlan; ip -6 route add {p6}/128 dev cilia_vxlan",
            p4 = pod4(1),
            p6 = pod6(1),
        ))
        .unwrap();
    let policy = EndpointPolicy {
        enforcement: Enforcement {
            ingress: true,
            egress: false,
            audit: false,
        },
        entries: vec![PolicyEntry {
            direction: Direction::Ingress,
            identity: X_IDENTITY,
            proto: 6,
            port: ECHO_PORT,
            port_prefix_len: 16,
            verdict: Verdict::Allow,
            rule: 9,
            proxy_port: PROXY_PORT,
        }],
    };
    n2.dp
        .set_policy(n2.config.endpoint_id, &policy.encode())
        .unwrap();
    let _echo = Echo::start(&n2.ep, &[ECHO_PORT]);
    let relay = Relay::start(&n2.ns);
    for (to, from) in [
        (IpAddr::V6(pod6(2)), IpAddr::V6(pod6(1))),
        (IpAddr::V4(pod4(2)), IpAddr::V4(pod4(1))),
    ] {
        assert_eq!(echo(&n1.ep, to, &payload()).unwrap(), payload(), "{to}");
        assert!(
            relay.accepted().iter().any(|(c, _)| c.ip() == from),
            "the proxy served {from}"
        );
    }
    assert!(n2.counted(CILIA_METRIC_FORWARD, CILIA_FWD_PROXY) > 0);
    assert_eq!(drops(&n2.dp, CILIA_DROP_PROXY_PATH), 0);
}
