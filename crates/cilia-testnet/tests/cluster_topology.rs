//! The multi-node harness itself, without agents: the fabric joins the node
//! namespaces in both families and goes nowhere else, etcd on the bridge
//! answers every node, survives `kill -9` with its data, and everything
//! is removed on drop.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;

use cilia_testnet::cluster::{
    node_ipv4, node_ipv6, ping, send_vxlan, Cluster, Fabric, VxlanFrame, FABRIC_IPV4,
};
use cilia_testnet::etcd::http_exchange;
use cilia_testnet::{cluster_prerequisites, privileged};

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

#[test]
fn nodes_reach_each_other_over_both_underlay_families_and_nothing_else() {
    privileged!("fabric_underlay");
    let fabric = Fabric::new(3).unwrap();
    for (from, to) in [(1, 2), (1, 3), (2, 3), (3, 1)] {
        let ns = fabric.node(from);
        assert!(
            ping(ns, IpAddr::V4(node_ipv4(to))),
            "node{from} -> node{to} v4"
        );
        assert!(
            ping(ns, IpAddr::V6(node_ipv6(to))),
            "node{from} -> node{to} v6"
        );
    }
    // Only the connected underlay routes: no default route anywhere.
    for ns in [fabric.ns(), fabric.node(1), fabric.node(2), fabric.node(3)] {
        for family in ["-4", "-6"] {
            let routes = ns.ip(&[family, "route", "show", "default"]).unwrap();
            assert_eq!(routes.trim(), "", "{} has a default route", ns.name());
        }
    }
    // A stranger joins at .99 and is reachable too (the attacker's seat).
    let stranger = fabric.attach(99).unwrap();
    assert!(ping(&stranger, IpAddr::V4(node_ipv4(1))));
}

#[test]
fn dropping_the_fabric_removes_every_namespace() {
    privileged!("fabric_drop");
    let fabric = Fabric::new(2).unwrap();
    let names: Vec<String> = [fabric.ns(), fabric.node(1), fabric.node(2)]
        .iter()
        .map(|ns| ns.name().to_string())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("cnode")), "{names:?}");
    assert!(names.iter().all(|n| netns_exists(n)));
    // Even after a panic inside a test body.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _fabric = fabric;
        panic!("test body failed");
    }));
    assert!(result.is_err());
    assert!(names.iter().all(|n| !netns_exists(n)), "{names:?}");
}

#[test]
fn etcd_in_the_fabric_answers_health_from_inside_every_node() {
    cluster_prerequisites!("etcd_health_from_nodes");
    let cluster = Cluster::new(3);
    assert_eq!(cluster.etcd.endpoint(), "http://198.51.100.254:2379");
    for n in 1..=3 {
        let (code, body) = cluster
            .node_ns(n)
            .run(|| {
                http_exchange(
                    cluster.etcd.client_addr(),
                    &format!(
                        "GET /health HTTP/1.1\r\nHost: {FABRIC_IPV4}\r\nConnection: close\r\n\r\n"
                    ),
                )
            })
            .unwrap();
        assert_eq!(code, 200, "node{n}: {body}");
        assert!(body.contains("\"true\""), "node{n}: {body}");
    }
}

#[test]
fn etcd_keeps_its_data_across_kill_9_and_start_again() {
    cluster_prerequisites!("etcd_kill9_restart");
    let mut cluster = Cluster::new(1);
    cluster.etcd.put("cilia/test/key", "value-1").unwrap();
    assert!(cluster.etcd.holds("cilia/test/key", "value-1").unwrap());
    cluster.etcd.stop_kill9();
    assert!(!cluster.etcd.is_running());
    assert!(cluster.etcd.get("/health").is_err(), "etcd is down");
    cluster.etcd.start_again().unwrap();
    assert!(cluster.etcd.holds("cilia/test/key", "value-1").unwrap());
    assert!(!cluster.etcd.holds("cilia/test/key", "other").unwrap());
}

#[test]
fn dropping_a_cluster_kills_etcd_and_removes_its_namespaces() {
    cluster_prerequisites!("cluster_drop");
    let cluster = Cluster::new(2);
    let fabric = cluster.fabric.ns().name().to_string();
    let pids = Command::new("ip")
        .args(["netns", "pids", &fabric])
        .output()
        .unwrap();
    let pids: Vec<i32> = String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(!pids.is_empty(), "etcd runs in the fabric");
    drop(cluster);
    assert!(!netns_exists(&fabric));
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "etcd pid {pid} still runs"
        );
    }
}

#[test]
fn an_agent_started_in_a_fabric_node_serves_pods_and_keeps_the_underlay() {
    privileged!("agent_in_fabric_node");
    // Today's single-node agent (no cluster flags): the harness part of
    // `Cluster::start_node`, i.e. an agent taking over a wired namespace.
    let mut fabric = Fabric::new(2).unwrap();
    let node = fabric.take_node(1);
    let name = node.name().to_string();
    let mut agent = cilia_testnet::TestAgent::start_in(
        node,
        cilia_testnet::AgentOptions {
            ipv6_range: cilia_testnet::cluster::node_ipv6_range(1),
            ipv4_range: Some(cilia_testnet::cluster::node_ipv4_range(1)),
        },
        vec!["--flow-buffer-size".into(), "100".into()],
    )
    .unwrap();
    assert_eq!(agent.node.name(), name);
    assert_eq!(agent.args(), ["--flow-buffer-size", "100"]);
    let (c1, c2) = (
        cilia_testnet::Netns::new("cep").unwrap(),
        cilia_testnet::Netns::new("cep").unwrap(),
    );
    let a = agent.create_endpoint(&c1, "app=a");
    let b = agent.create_endpoint(&c2, "app=b");
    assert!(a["ipv6"].as_str().unwrap().starts_with("fd00:c1a:1::"));
    let b4 = cilia_testnet::ip_of(&b, "ipv4");
    assert!(ping(&c1, b4));
    cilia_testnet::cluster::tcp_echo(&c2, &c1, b4, &[7; 1400]).unwrap();
    // The underlay still works beside it.
    assert!(ping(&agent.node, IpAddr::V4(node_ipv4(2))));
    // kill -9 and restart with the same flags.
    agent.kill9();
    assert!(!agent.is_running());
    agent.spawn().unwrap();
    assert!(agent.is_running());
    assert_eq!(agent.endpoints().len(), 2);
    drop(agent);
    assert!(!netns_exists(&name), "the agent removed its node namespace");
}

#[test]
fn a_crafted_vxlan_frame_is_delivered_by_a_kernel_vxlan_device() {
    privileged!("crafted_vxlan_frame");
    // What the spoofing test sends must be a valid frame: the kernel's own
    // VXLAN device (VNI 4242 on node1) decapsulates and delivers it.
    let fabric = Fabric::new(1).unwrap();
    let node = fabric.node(1);
    node.ip(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "4242",
        "dstport",
        "8472",
        "local",
        "198.51.100.1",
        "nolearning",
    ])
    .unwrap();
    node.ip(&["addr", "add", "10.99.0.1/24", "dev", "vx0"])
        .unwrap();
    node.ip(&["addr", "add", "fd00:99::1/64", "dev", "vx0", "nodad"])
        .unwrap();
    node.ip(&["link", "set", "vx0", "up"]).unwrap();
    let link = node.ip(&["-o", "link", "show", "vx0"]).unwrap();
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .to_string();
    let stranger = fabric.attach(99).unwrap();
    for (src, dst) in [("10.99.0.7", "10.99.0.1"), ("fd00:99::7", "fd00:99::1")] {
        let dst: IpAddr = dst.parse().unwrap();
        let listener = node
            .run(|| UdpSocket::bind(SocketAddr::new(dst, 0)))
            .unwrap();
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .unwrap();
        let frame = VxlanFrame {
            to: IpAddr::V4(node_ipv4(1)),
            vni: 4242,
            inner_dst_mac: mac.clone(),
            inner_src: src.parse().unwrap(),
            inner_dst: SocketAddr::new(dst, listener.local_addr().unwrap().port()),
            payload: "crafted".into(),
        };
        send_vxlan(&stranger, &frame, 3).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = listener.recv_from(&mut buf).expect("the crafted datagram");
        assert_eq!(&buf[..n], b"crafted");
        assert_eq!(from.ip(), frame.inner_src);
    }
}
