//! Node health probing between two namespaces that play two nodes' health
//! endpoints, joined by a veth: the prober in one sees the other's
//! responder (ICMP and TCP, both families, with a latency), and sees it
//! unreachable once the link is down. The namespaces are made by
//! `create_health_netns` itself, with the test prefix `cnode`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cilia_agent::health::{
    create_health_netns, delete_health_netns, HealthReport, HealthTarget, ProbeConfig, Prober,
    Responder,
};
use cilia_testnet::netns::unique_name;
use cilia_testnet::privileged;

/// A namespace made by `create_health_netns`, deleted on drop.
struct HealthNs {
    name: String,
    path: std::path::PathBuf,
}

impl HealthNs {
    fn new() -> Self {
        let name = unique_name("cnode");
        let path = create_health_netns(&name).unwrap();
        Self { name, path }
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for HealthNs {
    fn drop(&mut self) {
        let _ = delete_health_netns(&self.name);
    }
}

/// Waits (at most 15 s) for a report about node `b` that `done` accepts.
fn wait_for(
    report: &mut tokio::sync::watch::Receiver<Arc<HealthReport>>,
    what: &str,
    done: impl Fn(&cilia_api::NodeHealth) -> bool,
) -> cilia_api::NodeHealth {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(h) = report.borrow_and_update().get("b") {
            if done(h) {
                return h.clone();
            }
        }
        assert!(Instant::now() < deadline, "{what}: {:?}", report.borrow());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn probes_reach_a_peer_health_endpoint_and_lose_it_when_its_link_goes_down() {
    privileged!("probes_reach_a_peer_health_endpoint_and_lose_it_when_its_link_goes_down");
    let (a, b) = (HealthNs::new(), HealthNs::new());
    // Reused, not recreated: an agent restart keeps its health namespace.
    assert_eq!(create_health_netns(&a.name).unwrap(), a.path);
    let (va, vb) = (unique_name("cep"), unique_name("cep"));
    a.ip(&[
        "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &b.name,
    ]);
    for (ns, dev, v4, v6) in [
        (&a, &va, "192.0.2.1/24", "2001:db8:4240::1/64"),
        (&b, &vb, "192.0.2.2/24", "2001:db8:4240::2/64"),
    ] {
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["addr", "add", v4, "dev", dev]);
        ns.ip(&["addr", "add", v6, "dev", dev, "nodad"]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    let responder = Responder::start(&b.path, 0).unwrap();
    let peer: Vec<IpAddr> = vec![
        "192.0.2.2".parse().unwrap(),
        "2001:db8:4240::2".parse().unwrap(),
    ];
    let (_targets_tx, targets) = tokio::sync::watch::channel(vec![HealthTarget {
        node: "b".into(),
        addresses: peer.clone(),
    }]);
    let metrics = cilia_agent::metrics::AgentMetrics::default();
    let config = ProbeConfig {
        port: responder.port(),
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(500),
    };
    let (prober, mut report) = Prober::start(&a.path, config, targets, metrics.clone()).unwrap();

    let up = wait_for(&mut report, "all probes answered", |h| {
        h.icmp.len() == 2 && h.icmp.iter().chain(&h.tcp).all(|p| p.reachable)
    });
    for p in up.icmp.iter().chain(&up.tcp) {
        assert!(peer.contains(&p.address), "{p:?}");
        let ms = p.latency_ms.unwrap();
        assert!(ms > 0.0 && ms < 500.0, "{p:?}");
        assert!(p.error.is_none() && p.last_probe.is_some(), "{p:?}");
    }
    let text = cilia_agent::metrics::render(&Default::default(), &metrics);
    for needle in [
        "cilia_node_health_reachable{node=\"b\",probe=\"icmp\",address=\"192.0.2.2\"} 1",
        "cilia_node_health_reachable{node=\"b\",probe=\"tcp\",address=\"2001:db8:4240::2\"} 1",
        "cilia_node_health_latency_seconds{node=\"b\",probe=\"icmp\",address=\"2001:db8:4240::2\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing in:\n{text}");
    }

    // The peer's side goes down: nothing answers any more.
    b.ip(&["link", "set", &vb, "down"]);
    let down = wait_for(&mut report, "all probes failed", |h| {
        h.icmp.iter().chain(&h.tcp).all(|p| !p.reachable)
    });
    for p in down.icmp.iter().chain(&down.tcp) {
        assert!(p.latency_ms.is_none() && p.error.is_some(), "{p:?}");
    }
    let text = cilia_agent::metrics::render(&Default::default(), &metrics);
    assert!(
        text.contains(
            "cilia_node_health_reachable{node=\"b\",probe=\"icmp\",address=\"192.0.2.2\"} 0"
        ),
        "{text}"
    );
    drop(prober);
    drop(responder);
}

#[test]
fn a_responder_answers_both_families_on_one_port() {
    privileged!("a_responder_answers_both_families_on_one_port");
    let ns = HealthNs::new();
    ns.ip(&["link", "set", "lo", "up"]);
    let responder = Responder::start(&ns.path, 0).unwrap();
    let port = responder.port();
    let file = std::fs::File::open(&ns.path).unwrap();
    let lines: Vec<String> = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        ["127.0.0.1", "::1"]
            .iter()
            .map(|host| {
                use std::io::Read;
                let addr = std::net::SocketAddr::new(host.parse().unwrap(), port);
                let mut s =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut line = String::new();
                s.read_to_string(&mut line).unwrap();
                line
            })
            .collect()
    })
    .join()
    .unwrap();
    assert_eq!(lines, ["cilia-health ok\n", "cilia-health ok\n"]);
}
