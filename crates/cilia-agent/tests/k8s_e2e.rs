//! End to end against a real Kubernetes API server (1.28+), when
//! `CILIA_E2E_KUBECONFIG` names a kubeconfig for one; every run says how
//! many e2e tests ran, or that none could and why.
//!
//! The scenario is issue #15's, done as kubelet would: pods created as API
//! objects on a node of the cluster (`CILIA_E2E_NODE`, else the first node
//! listed), `cilia-cni` ADD with their namespace and name in `CNI_ARGS`, the
//! labels arriving at the endpoints, the Star Wars CiliumNetworkPolicy
//! applied through the API and enforced on real TCP between the endpoints,
//! a pod relabelled and its endpoint's identity changing.
//!
//! The agent runs in a node namespace of the test's own, which reaches
//! nothing outside: a forwarder listening on that namespace's loopback
//! carries the agent's connections to the API server (from the test's
//! namespace, where the kubeconfig works). The server's certificate is
//! checked against its own name (`tls-server-name`). Needs the cilium.io/v2
//! CRDs (`install/kubernetes/crds/`) applied; everything the test creates
//! lives in a namespace of its own, deleted at the end.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cilia_testnet::cluster::poll;
use cilia_testnet::{bin, ip_of, privileged, AgentOptions, Netns, TestAgent};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// Carries connections from a loopback port of `ns` to `upstream`, until
/// dropped (bounded: 30 min, 1024 connections).
struct Forwarder {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    fn start(ns: &Netns, upstream: SocketAddr) -> Self {
        let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(1800);
            let mut accepted = 0;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline && accepted < 1024 {
                let Ok((inner, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                accepted += 1;
                let Ok(outer) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                else {
                    continue;
                };
                inner.set_nonblocking(false).unwrap();
                for (mut from, mut to) in [
                    (inner.try_clone().unwrap(), outer.try_clone().unwrap()),
                    (outer, inner),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { port, stop }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The kubeconfig's server, as `host:port` and the host alone.
fn server_of(config: &kube::config::Kubeconfig) -> (SocketAddr, String) {
    let context = config.current_context.clone().unwrap();
    let ctx = config
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.clone())
        .unwrap();
    let cluster = config
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.clone())
        .unwrap();
    let server = cluster.server.unwrap();
    let authority = server
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("{server}: the e2e test expects an https server"))
        .split('/')
        .next()
        .unwrap();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse().unwrap()),
        _ => (authority, 443u16),
    };
    let host = host.trim_matches(['[', ']']).to_string();
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap();
    (addr, host)
}

/// The kubeconfig with every cluster's server at `127.0.0.1:port`, the
/// certificate still checked against `host`.
fn through_forwarder(config: &kube::config::Kubeconfig, port: u16, host: &str) -> String {
    let mut config = config.clone();
    for c in &mut config.clusters {
        if let Some(cluster) = c.cluster.as_mut() {
            cluster.server = Some(format!("https://127.0.0.1:{port}"));
            if host.parse::<std::net::IpAddr>().is_err() {
                cluster.tls_server_name = Some(host.to_string());
            }
        }
    }
    // JSON is YAML: kubeconfig readers take it.
    serde_json::to_string(&config).unwrap()
}

fn pod(ns: &str, name: &str, node: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.9",
                 "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]}]}}))
    .unwrap()
}

fn cni_add(agent: &TestAgent, netns: &Netns, ns: &str, name: &str) -> Value {
    let conf = json!({"cniVersion": "1.0.0", "name": "cilia", "type": "cilia-cni",
                      "socket": agent.socket, "retrySeconds": 0});
    let container = format!("e2e-{name}");
    let mut child = Command::new(bin("cilia-cni"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &container)
        .env("CNI_NETNS", netns.path())
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
        )
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cilia-cni ADD {ns}/{name}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    agent.endpoint_of_container(&container)
}

fn endpoint(agent: &TestAgent, id: u64) -> Value {
    agent
        .endpoints()
        .into_iter()
        .find(|e| e["id"] == id)
        .unwrap()
}

fn connects(from: &Netns, to: SocketAddr) -> bool {
    from.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(1)))
        .is_ok()
}

/// The scenario; returns when every step held.
fn scenario(kubeconfig_path: &str, rt: &tokio::runtime::Runtime) {
    let file = kube::config::Kubeconfig::read_from(kubeconfig_path).unwrap();
    let client = rt.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(file.clone(), &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    });
    let version = rt.block_on(client.apiserver_version()).unwrap();
    eprintln!("k8s e2e: API server {}", version.git_version);
    let node_name = match std::env::var("CILIA_E2E_NODE") {
        Ok(n) => n,
        Err(_) => {
            let nodes: Api<Node> = Api::all(client.clone());
            let list = rt.block_on(nodes.list(&ListParams::default())).unwrap();
            list.items[0].metadata.name.clone().unwrap()
        }
    };
    let ns_name = cilia_testnet::netns::unique_name("cilia-e2e-").to_lowercase();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns_obj: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns_name}}),
    )
    .unwrap();
    rt.block_on(namespaces.create(&PostParams::default(), &ns_obj))
        .unwrap();
    // Deleted whatever happens below.
    struct Cleanup<'a>(&'a tokio::runtime::Runtime, Api<Namespace>, String);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self
                .0
                .block_on(self.1.delete(&self.2, &DeleteParams::default()));
        }
    }
    let _cleanup = Cleanup(rt, namespaces.clone(), ns_name.clone());

    // 1. Pods as API objects.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
    for (name, labels) in [
        ("deathstar", json!({"org": "empire", "class": "deathstar"})),
        (
            "tiefighter",
            json!({"org": "empire", "class": "tiefighter"}),
        ),
        ("xwing", json!({"org": "alliance", "class": "xwing"})),
    ] {
        rt.block_on(pods.create(
            &PostParams::default(),
            &pod(&ns_name, name, &node_name, labels),
        ))
        .unwrap();
    }

    // The agent, reaching the API server through the forwarder.
    let node = Netns::new("cnode").unwrap();
    let (upstream, host) = server_of(&file);
    let forwarder = Forwarder::start(&node, upstream);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, through_forwarder(&file, forwarder.port, &host)).unwrap();
    let agent = TestAgent::start_in(
        node,
        AgentOptions::default(),
        vec![
            "--k8s-kubeconfig".into(),
            path.display().to_string(),
            "--node-name".into(),
            node_name.clone(),
            "--fast-attach".into(),
            "off".into(),
        ],
    )
    .unwrap_or_else(|log| panic!("agent did not start: {log}"));

    // 1b. CNI ADD as kubelet; 2. the labels arrive.
    let netns: Vec<Netns> = (0..3).map(|_| Netns::new("cep").unwrap()).collect();
    let mut ids = Vec::new();
    for (ns, name) in netns.iter().zip(["deathstar", "tiefighter", "xwing"]) {
        let id = cni_add(&agent, ns, &ns_name, name)["id"].as_u64().unwrap();
        let arrived = poll(WAIT, || endpoint(&agent, id)["labels"]["class"] == name);
        assert!(arrived, "{name}: {}", endpoint(&agent, id));
        ids.push(id);
    }

    // 3. The Star Wars CNP through the API, enforced on real TCP.
    let deathstar = SocketAddr::new(ip_of(&endpoint(&agent, ids[0]), "ipv4"), 80);
    let listener = netns[0].run(|| TcpListener::bind("0.0.0.0:80").unwrap());
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            if listener.accept().is_err() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    assert!(
        poll(WAIT, || connects(&netns[2], deathstar)),
        "xwing before the policy"
    );
    let cnp_resource = ApiResource {
        group: "cilium.io".into(),
        version: "v2".into(),
        api_version: "cilium.io/v2".into(),
        kind: "CiliumNetworkPolicy".into(),
        plural: "ciliumnetworkpolicies".into(),
    };
    let cnps: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns_name, &cnp_resource);
    let rule1: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "rule1", "namespace": ns_name},
        "spec": {"endpointSelector": {"matchLabels": {"org": "empire", "class": "deathstar"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"org": "empire"}}],
                              "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}}))
    .unwrap();
    rt.block_on(cnps.create(&PostParams::default(), &rule1))
        .unwrap_or_else(|e| panic!("creating the CNP (are install/kubernetes/crds applied?): {e}"));
    assert!(
        poll(WAIT, || !connects(&netns[2], deathstar)),
        "xwing under rule1"
    );
    assert!(connects(&netns[1], deathstar), "tiefighter under rule1");

    // 4. Relabel a pod: its identity changes (and rule1 now admits it).
    let before = endpoint(&agent, ids[2])["identity"].as_u64();
    let patch = json!({"metadata": {"labels": {"org": "empire"}}});
    rt.block_on(pods.patch("xwing", &PatchParams::default(), &Patch::Merge(&patch)))
        .unwrap();
    assert!(
        poll(WAIT, || endpoint(&agent, ids[2])["identity"].as_u64()
            != before),
        "{}",
        endpoint(&agent, ids[2])
    );
    assert!(
        poll(WAIT, || connects(&netns[2], deathstar)),
        "relabelled xwing under rule1"
    );
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

/// Says how many e2e tests ran: on standard error, and appended to the
/// file `CILIA_E2E_REPORT` names (scripts/test.sh prints it after the
/// suite, since the test harness keeps a passing test's output to itself).
fn report(line: &str) {
    eprintln!("{line}");
    if let Ok(path) = std::env::var("CILIA_E2E_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("CILIA_E2E_REPORT {path}: {e}"));
        writeln!(f, "{line}").unwrap();
    }
}

#[test]
fn kubernetes_end_to_end() {
    let Ok(kubeconfig) = std::env::var("CILIA_E2E_KUBECONFIG") else {
        report("k8s e2e: none ran: CILIA_E2E_KUBECONFIG not set (no API server given)");
        return;
    };
    privileged!("kubernetes_end_to_end");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    scenario(&kubeconfig, &rt);
    report("k8s e2e: 1 tests ran");
}
