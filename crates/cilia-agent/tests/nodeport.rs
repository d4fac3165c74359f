//! End-to-end NodePort: two agents in node namespaces on a fabric, a
//! backend pod on node 2, and a client outside the cluster (a "world"
//! namespace on the fabric, 198.51.100.200) reaching the service at each
//! node's own address. Driven through `cilia service update` on every node
//! (services are per node: each node gets the same service, same id).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cilia_testnet::cluster::{
    exchange, node_ipv4, node_ipv6, poll, tcp_connect, EchoServer, NodeOptions,
};
use cilia_testnet::{cluster_prerequisites, Cluster, Tunnel};

const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;
/// How long cluster state may take to reach every node.
const CONVERGE: Duration = Duration::from_secs(30);

/// Two nodes with `args` on each agent, the cluster converged.
fn two_nodes(args: &[&str]) -> Cluster {
    let mut cluster = Cluster::new(2);
    for n in 1..=2 {
        let mut options = NodeOptions::new(Tunnel::Vxlan);
        options.extra_args = args.iter().map(|a| a.to_string()).collect();
        cluster.start_node(n, &options);
    }
    cluster
        .wait_nodes_listed(CONVERGE)
        .unwrap_or_else(|e| panic!("{e}\nnode1's log:\n{}", cluster.agent(1).log_text()));
    cluster
}

/// The same NodePort service (id 30) on both nodes, one backend.
fn nodeport_service(cluster: &Cluster, family: &str, backend: SocketAddr, extra: &[&str]) {
    let frontend = match family {
        "ipv6" => format!("[::]:{NODE_PORT}/tcp"),
        _ => format!("0.0.0.0:{NODE_PORT}/tcp"),
    };
    for n in 1..=2 {
        let mut args = vec![
            "service".to_string(),
            "update".into(),
            "--id".into(),
            if family == "ipv6" { "36" } else { "34" }.into(),
            "--frontend".into(),
            frontend.clone(),
            "--backends".into(),
            backend.to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster.agent(n).cli_ok(&args);
    }
}

fn node_addr(n: u8, family: &str) -> IpAddr {
    if family == "ipv6" {
        IpAddr::V6(node_ipv6(n))
    } else {
        IpAddr::V4(node_ipv4(n))
    }
}

/// Whether the world client gets an echo through `to` (bounded retries:
/// the remote pod's ipcache entry may still be on its way).
fn world_reaches(world: &cilia_testnet::Netns, to: SocketAddr, within: Duration) -> bool {
    poll(within, || {
        tcp_connect(world, to, Duration::from_secs(1))
            .and_then(|mut c| exchange(&mut c, b"nodeport"))
            .is_ok()
    })
}

/// The flags node 1's kernel holds for the NodePort service of `family`
/// (`cilia bpf lb list -o json`).
fn kernel_flags(cluster: &Cluster, family: &str) -> Vec<String> {
    let id = if family == "ipv6" { 36 } else { 34 };
    let lb = cluster.agent(1).cli_json(&["bpf", "lb", "list"]);
    let service = lb["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("service {id} in {lb}"))
        .clone();
    serde_json::from_value(service["flags"].clone()).unwrap()
}

fn scenario(args: &[&str]) {
    let cluster = two_nodes(args);
    let backend = cluster.pod(2, "app=web");
    let world = cluster.fabric.attach(200).unwrap();
    for family in ["ipv4", "ipv6"] {
        let _server = EchoServer::start(&backend.ns, backend.ip(family), BACKEND_PORT);
        let backend_addr = SocketAddr::new(backend.ip(family), BACKEND_PORT);
        nodeport_service(&cluster, family, backend_addr, &[]);
        let listed = cluster.agent(1).cli_json(&["service", "list"]);
        assert!(
            listed
                .to_string()
                .contains("\"external_traffic_policy\":\"Cluster\""),
            "{listed}"
        );
        // The node with the backend, and the one without (its node sends
        // the flow on to node 2).
        for n in [2, 1] {
            let to = SocketAddr::new(node_addr(n, family), NODE_PORT);
            assert!(
                world_reaches(&world, to, CONVERGE),
                "{family}: the world client cannot reach the NodePort at node{n} {to}\nnode{n}'s log:\n{}",
                cluster.agent(n).log_text()
            );
        }
        let mode = if args.contains(&"dsr") { "dsr" } else { "snat" };
        let mut expected = vec!["nodeport"];
        if mode == "dsr" {
            expected.push("dsr");
        }
        assert_eq!(kernel_flags(&cluster, family), expected, "{family} {mode}");
        // externalTrafficPolicy=Local: only node 2 (the backend's) serves.
        nodeport_service(
            &cluster,
            family,
            backend_addr,
            &["--external-traffic-policy", "local"],
        );
        expected.insert(1, "local");
        assert_eq!(kernel_flags(&cluster, family), expected, "{family} {mode}");
        let table = cluster.agent(1).cli_ok(&["bpf", "lb", "list"]);
        assert!(
            table.contains("FLAGS") && table.contains(&expected.join(",")),
            "{family} {mode}: the human table shows the flags:\n{table}"
        );
        let on_2 = SocketAddr::new(node_addr(2, family), NODE_PORT);
        assert!(
            world_reaches(&world, on_2, CONVERGE),
            "{family}: Local at node2"
        );
        let on_1 = SocketAddr::new(node_addr(1, family), NODE_PORT);
        assert!(
            tcp_connect(&world, on_1, Duration::from_secs(1)).is_err(),
            "{family}: a Local NodePort on a node without backend must drop"
        );
        for n in 1..=2 {
            cluster.agent(n).cli_ok(&[
                "service",
                "delete",
                if family == "ipv6" { "36" } else { "34" },
            ]);
        }
    }
}

#[test]
fn world_reaches_a_nodeport_on_every_node_in_snat_mode_and_local_only_on_the_backends() {
    cluster_prerequisites!("world_reaches_a_nodeport_in_snat_mode");
    scenario(&[]);
}

#[test]
fn world_reaches_a_nodeport_on_every_node_in_dsr_mode() {
    cluster_prerequisites!("world_reaches_a_nodeport_in_dsr_mode");
    scenario(&["--lb-mode", "dsr"]);
}

#[test]
fn a_nodeport_service_is_refused_on_a_single_node_agent() {
    cluster_prerequisites!("a_nodeport_service_is_refused_on_a_single_node_agent");
    let agent = cilia_testnet::TestAgent::start(cilia_testnet::AgentOptions::default());
    let out = agent.cli(&[
        "service",
        "update",
        "--frontend",
        "0.0.0.0:30080/tcp",
        "--backends",
        "10.200.0.9:8080",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NodePort") && err.contains("multi-node"),
        "{err}"
    );
    let listed = agent.cli_json(&["service", "list"]);
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(0),
        "nothing stored: {listed}"
    );
}

#[test]
fn native_lb_acceleration_is_refused_without_nodeport_support() {
    cluster_prerequisites!("native_lb_acceleration_is_refused_without_nodeport_support");
    let node = cilia_testnet::Netns::new("cnode").unwrap();
    let e = cilia_testnet::TestAgent::start_in(
        node,
        cilia_testnet::AgentOptions::default(),
        vec!["--lb-acceleration".into(), "native".into()],
    )
    .err()
    .expect("a single-node agent refuses --lb-acceleration native");
    assert!(
        e.contains("--lb-acceleration native needs NodePort support"),
        "{e}"
    );
}

/// Native routing, `--lb-acceleration native` on both nodes: the world
/// client reaches a backend on node 2 through node 1, `cilia status` (text
/// and JSON) says how the acceleration runs, the metric names its mode,
/// and a restart without the flag turns it off.
#[test]
fn world_reaches_a_nodeport_with_native_lb_acceleration_and_status_reports_it() {
    cluster_prerequisites!("world_reaches_a_nodeport_with_native_lb_acceleration");
    let mut cluster = Cluster::new(2);
    for n in 1..=2 {
        let mut options = NodeOptions::new(Tunnel::Native);
        options.extra_args = vec!["--lb-acceleration".into(), "native".into()];
        cluster.start_node(n, &options);
    }
    cluster
        .wait_nodes_listed(CONVERGE)
        .unwrap_or_else(|e| panic!("{e}\nnode1's log:\n{}", cluster.agent(1).log_text()));
    let status = cluster.agent(1).cli_ok(&["status"]);
    let line = status
        .lines()
        .find(|l| l.starts_with("LB accel:"))
        .unwrap_or_else(|| panic!("no LB accel line: {status}"));
    assert!(
        line.contains("native on eth0"),
        "veth has native XDP: {line}"
    );
    let json = cluster.agent(1).cli_json(&["status"]);
    let sub = json["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "lb-acceleration")
        .unwrap_or_else(|| panic!("{json}"))
        .clone();
    assert!(
        sub["detail"]
            .as_str()
            .unwrap()
            .starts_with("native on eth0"),
        "{sub}"
    );
    let metrics = cluster.agent(1).scrape_metrics();
    assert!(
        metrics.contains("cilia_lb_acceleration{device=\"eth0\",mode=\"native\"} 1"),
        "{metrics}"
    );

    let backend = cluster.pod(2, "app=web");
    let world = cluster.fabric.attach(200).unwrap();
    let mut servers = Vec::new();
    for family in ["ipv4", "ipv6"] {
        servers.push(EchoServer::start(
            &backend.ns,
            backend.ip(family),
            BACKEND_PORT,
        ));
        nodeport_service(
            &cluster,
            family,
            SocketAddr::new(backend.ip(family), BACKEND_PORT),
            &[],
        );
        let to = SocketAddr::new(node_addr(1, family), NODE_PORT);
        assert!(
            world_reaches(&world, to, CONVERGE),
            "{family}: the world client cannot reach the NodePort at node1 {to}\nnode1's log:\n{}",
            cluster.agent(1).log_text()
        );
    }

    // Restarted without the flag: off, and said so.
    let agent = cluster.agent_mut(1);
    let args: Vec<String> = agent
        .args()
        .iter()
        .filter(|a| *a != "--lb-acceleration" && *a != "native")
        .cloned()
        .collect();
    agent.kill9();
    agent.set_args(args);
    agent.spawn().unwrap();
    let status = cluster.agent(1).cli_ok(&["status"]);
    assert!(
        status.contains("LB accel:     disabled (--lb-acceleration disabled)"),
        "{status}"
    );
    let to = SocketAddr::new(node_addr(1, "ipv4"), NODE_PORT);
    assert!(world_reaches(&world, to, CONVERGE), "tc serves it again");
}
