//! cilia-cni under a real runtime: podman 4.3 (CNI backend, runc) runs
//! busybox containers on a cilia network served by a test agent in its own
//! node namespace. Traffic only flows between these containers.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cilia_testnet::{require_privileges, AgentOptions};
use common::{text, World};

macro_rules! privileged {
    ($name:literal) => {
        if !require_privileges($name) {
            return;
        }
        if std::process::Command::new("podman")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{}: podman is not installed (scripts/setup.sh installs it)",
                $name
            );
            eprintln!("SKIPPED {}: podman is not installed", $name);
            return;
        }
    };
}

const SLEEP: &[&str] = &["/bin/sleep", "600"];

fn can_reach(w: &World, from: &str, url: &str) -> bool {
    let out = w
        .podman
        // busybox-static 1.35's `wget -T` segfaults: bound it with timeout.
        .exec(
            from,
            &["/bin/timeout", "3", "/bin/wget", "-q", "-O", "-", url],
        );
    let ok = out.status.success() && text(&out.stdout).contains("cilia-ok");
    if !ok {
        eprintln!(
            "{from} -> {url}: {:?} {:?} {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr).trim()
        );
    }
    ok
}

fn ping(w: &World, from: &str, addr: &str) -> bool {
    w.podman
        .exec(from, &["/bin/ping", "-c", "1", "-W", "2", addr])
        .status
        .success()
}

#[test]
fn podman_connectivity_labels_policy_and_cleanup() {
    privileged!("podman_connectivity_labels_policy_and_cleanup");
    let w = World::new(AgentOptions::default());
    let p = &w.podman;
    let web = p.start_ok(
        "web",
        &["--label", "app=web"],
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    );
    let client = p.start_ok("client", &["--label", "app=client"], SLEEP);
    let other = p.start_ok("other", &["--label", "app=other"], SLEEP);

    // The podman labels reach the endpoints (learned by the agent).
    let started = Instant::now();
    let web_ep = w.wait_endpoint(&web, Duration::from_secs(10), |e| {
        e["labels"]["app"] == "web" && e["labels_pending"] == false
    });
    eprintln!("labels learned after {:?}", started.elapsed());
    assert_eq!(web_ep["state"], "ready");
    for (id, app) in [(&client, "client"), (&other, "other")] {
        w.wait_endpoint(id, Duration::from_secs(10), |e| {
            e["labels"]["app"] == app && e["labels_pending"] == false
        });
    }
    let v6 = web_ep["ipv6"].as_str().unwrap().to_string();
    let v4 = web_ep["ipv4"].as_str().unwrap().to_string();

    // The container sees the agent's addresses on eth0.
    let addrs = text(
        &p.exec("client", &["/bin/ip", "addr", "show", "eth0"])
            .stdout,
    );
    let client_ep = w.agent.endpoint_of_container(&client);
    assert!(
        addrs.contains(client_ep["ipv6"].as_str().unwrap()),
        "{addrs}"
    );

    // Connectivity over both families, ICMP and TCP.
    assert!(ping(&w, "client", &v6), "client cannot ping web over IPv6");
    assert!(ping(&w, "client", &v4), "client cannot ping web over IPv4");
    let url6 = format!("http://[{v6}]:8080/");
    let url4 = format!("http://{v4}:8080/");
    assert!(can_reach(&w, "client", &url6));
    assert!(can_reach(&w, "client", &url4));
    assert!(can_reach(&w, "other", &url6));

    // A policy selecting by podman label: only app=client may reach app=web.
    let policy = p.dir.join("web-policy.yaml");
    std::fs::write(
        &policy,
        r#"apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: web-from-client
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
"#,
    )
    .unwrap();
    w.agent
        .cli_ok(&["policy", "import", policy.to_str().unwrap()]);
    assert!(can_reach(&w, "client", &url6), "client denied over IPv6");
    assert!(can_reach(&w, "client", &url4), "client denied over IPv4");
    assert!(
        !can_reach(&w, "other", &url6),
        "other reached web over IPv6"
    );
    assert!(
        !can_reach(&w, "other", &url4),
        "other reached web over IPv4"
    );
    assert!(!ping(&w, "other", &v6), "other pinged web");

    // podman rm -f: CNI DEL removes endpoints, addresses and pins.
    p.ok(&["rm", "-f", "-t", "0", "web", "client", "other"]);
    w.agent.wait_deletes_finished();
    assert_eq!(w.agent.endpoints(), Vec::<serde_json::Value>::new());
    let bpf_eps = w.agent.cli_json(&["bpf", "endpoint", "list"]);
    assert_eq!(bpf_eps.as_array().unwrap().len(), 0, "{bpf_eps}");
    let status = w.agent.cli_json(&["status"]);
    assert_eq!(status["ipam"]["ipv6"]["used"], 0, "{status}");
    assert_eq!(status["ipam"]["ipv4"]["used"], 0, "{status}");
    for sub in ["links", "policy"] {
        let dir = w.agent.bpf_root.path().join(sub);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "pins left in {}: {left:?}", dir.display());
    }
    let links = w.agent.node.ip(&["-o", "link"]).unwrap();
    assert!(!links.contains("lxc"), "lxc devices left: {links}");
}

#[test]
fn podman_fifty_parallel_containers_get_unique_addresses() {
    privileged!("podman_fifty_parallel_containers_get_unique_addresses");
    let w = World::new(AgentOptions::default());
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= 50 {
                    return;
                }
                let out = w.podman.start(&format!("par{i}"), &[], SLEEP);
                if !out.status.success() {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("par{i}: {}", text(&out.stderr)));
                }
            });
        }
    });
    eprintln!("50 containers started in {:?}", started.elapsed());
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    let eps = w.agent.endpoints();
    assert_eq!(eps.len(), 50);
    let v6: BTreeSet<_> = eps.iter().map(|e| e["ipv6"].to_string()).collect();
    let v4: BTreeSet<_> = eps.iter().map(|e| e["ipv4"].to_string()).collect();
    let cids: BTreeSet<_> = eps.iter().map(|e| e["container_id"].to_string()).collect();
    assert_eq!((v6.len(), v4.len(), cids.len()), (50, 50, 50));
    assert!(eps.iter().all(|e| e["state"] == "ready"));
    let running: BTreeSet<_> = w.podman.running().into_iter().collect();
    assert_eq!(running.len(), 50);
    for e in &eps {
        assert!(running.contains(e["container_id"].as_str().unwrap()));
    }
}

#[test]
fn podman_shows_ipam_exhaustion() {
    privileged!("podman_shows_ipam_exhaustion");
    let w = World::new(AgentOptions {
        ipv6_range: "fd00:c1c::/126".into(),
        ipv4_range: None,
    });
    w.podman.start_ok("full1", &[], SLEEP);
    w.podman.start_ok("full2", &[], SLEEP);
    let out = w.podman.start("full3", &[], SLEEP);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    eprintln!("podman says: {err}");
    assert!(
        err.contains("IPAM pool fd00:c1c::/126 is exhausted"),
        "podman did not show the agent's message: {err}"
    );
    // The failed container left nothing behind; the others still work.
    assert_eq!(w.agent.endpoints().len(), 2);
    w.podman.ok(&["rm", "-f", "-t", "0", "full1"]);
    w.podman.ok(&["rm", "-f", "full3"]);
    w.podman.start_ok("full4", &[], SLEEP);
    assert_eq!(w.agent.endpoints().len(), 2);
}

#[test]
fn podman_agent_crash_during_adds_leaves_no_half_endpoint() {
    privileged!("podman_agent_crash_during_adds_leaves_no_half_endpoint");
    let mut w = World::new(AgentOptions::default());
    let results = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    {
        let World { podman, agent } = &mut w;
        let podman = &*podman;
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= 16 {
                        return;
                    }
                    let out = podman.start(&format!("crash{i}"), &[], SLEEP);
                    results
                        .lock()
                        .unwrap()
                        .push((i, out.status.success(), text(&out.stderr)));
                });
            }
            // Let a few ADDs complete, then crash the agent mid-burst; the
            // plugin keeps retrying while it is down.
            let deadline = Instant::now() + Duration::from_secs(60);
            while results.lock().unwrap().len() < 3 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            agent.kill9();
            std::thread::sleep(Duration::from_millis(1500));
            agent.spawn().unwrap();
        });
    }
    let results = results.into_inner().unwrap();
    let failed: Vec<_> = results.iter().filter(|r| !r.1).collect();
    eprintln!(
        "{} of {} containers started across the crash; failures: {failed:#?}",
        results.len() - failed.len(),
        results.len()
    );
    // Containers whose start failed were cleaned up by podman (DEL).
    let running: BTreeSet<_> = w.podman.running().into_iter().collect();
    let eps = w.agent.endpoints();
    for e in &eps {
        assert_eq!(e["state"], "ready", "half endpoint: {e}");
        let cid = e["container_id"].as_str().unwrap();
        assert!(
            running.contains(cid),
            "endpoint {} belongs to no running container: {e}",
            e["id"]
        );
    }
    assert_eq!(
        eps.len(),
        running.len(),
        "every running container has its endpoint"
    );
    // No device without an endpoint on the node.
    let devices: BTreeSet<String> = w
        .agent
        .node
        .ip(&["-o", "link"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("lxc"))
        .collect();
    let expected: BTreeSet<String> = eps
        .iter()
        .map(|e| e["host_ifname"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(devices, expected, "lxc devices on the node vs endpoints");
    // And the survivors talk to each other.
    if eps.len() >= 2 {
        let names: Vec<String> = results
            .iter()
            .filter(|r| r.1)
            .map(|r| format!("crash{}", r.0))
            .collect();
        let id = w.podman.ok(&["inspect", "--format", "{{.Id}}", &names[1]]);
        let target = w.agent.endpoint_of_container(id.trim());
        assert!(ping(&w, &names[0], target["ipv6"].as_str().unwrap()));
    }
}

#[test]
fn podman_image_labels_do_not_become_the_containers_identity() {
    privileged!("podman_image_labels_do_not_become_the_containers_identity");
    let w = World::new(AgentOptions::default());
    // An image whose author tries to pick its containers' identity.
    let image = "localhost/cilia-labelled:test";
    let tar = w.podman.dir.join("rootfs.tar");
    w.podman.ok(&[
        "import",
        "--change",
        "LABEL role=admin",
        "--change",
        "LABEL tier=img",
        "--change",
        "LABEL io.kubernetes.pod.namespace=kube-system",
        tar.to_str().unwrap(),
        image,
    ]);
    let run = |name: &str, labels: &[&str]| {
        let out = w.podman.start_image(name, image, labels, SLEEP);
        assert!(
            out.status.success(),
            "podman run {name}: {}",
            common::text(&out.stderr)
        );
        common::text(&out.stdout).trim().to_string()
    };
    // Own labels: app (not in the image), tier set explicitly to the image's value.
    let own = run("own", &["--label", "app=web", "--label", "tier=img"]);
    let bare = run("bare", &[]);
    for (id, want) in [
        (&own, serde_json::json!({"app": "web", "tier": "img"})),
        (&bare, serde_json::json!({})),
    ] {
        let ep = w.wait_endpoint(id, Duration::from_secs(10), |e| {
            e["labels_pending"] == false
        });
        assert_eq!(ep["labels"], want, "{ep}");
        assert_eq!(ep["namespace"], "default", "{ep}");
    }
}

#[test]
fn podman_reserved_labels_are_dropped_and_reported_once() {
    privileged!("podman_reserved_labels_are_dropped_and_reported_once");
    let w = World::new(AgentOptions::default());
    let spoof = w.podman.start_ok(
        "spoof",
        &[
            "--label",
            "io.kubernetes.pod.namespace=kube-system",
            "--label",
            "app=x",
        ],
        SLEEP,
    );
    let ep = w.wait_endpoint(&spoof, Duration::from_secs(10), |e| {
        e["labels_pending"] == false
    });
    assert_eq!(ep["labels"], serde_json::json!({"app": "x"}), "{ep}");
    assert_eq!(ep["namespace"], "default", "{ep}");
    // Several learning rounds later, still reported once.
    std::thread::sleep(Duration::from_secs(2));
    let log = w.agent.log_text();
    assert_eq!(
        log.matches("ignoring container labels").count(),
        1,
        "agent log:\n{log}"
    );
    assert!(
        log.contains("io.kubernetes.pod.namespace=kube-system"),
        "{log}"
    );
}

#[test]
fn podman_passes_named_ports_through_cni_args() {
    privileged!("podman_passes_named_ports_through_cni_args");
    let w = World::new(AgentOptions::default());
    let out = w.podman.start_env(
        "named",
        &[("CNI_ARGS", "CILIA_NAMED_PORTS=http=TCP/8080,dns=UDP/53")],
        common::IMAGE,
        &["--label", "app=web"],
        SLEEP,
    );
    assert!(
        out.status.success(),
        "podman run: {}",
        common::text(&out.stderr)
    );
    let id = common::text(&out.stdout).trim().to_string();
    let ep = w.wait_endpoint(&id, Duration::from_secs(10), |_| true);
    assert_eq!(
        ep["named_ports"],
        serde_json::json!([
            {"name": "dns", "protocol": "UDP", "port": 53},
            {"name": "http", "protocol": "TCP", "port": 8080}
        ]),
        "{ep}"
    );
}
