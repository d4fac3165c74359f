//! The agent with Kubernetes: a real agent in a node namespace, watching a
//! fake API server bound on the node namespace's loopback
//! (`k8s/fake_api.rs`), endpoints created by the real `cilia-cni` with
//! kubelet's `CNI_ARGS`, real TCP between them. What the API server says
//! — pod labels, namespace labels, policies — must reach the endpoints'
//! identities and the datapath, and a lost API server must change nothing.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod k8s {
    pub mod fake_api;
}

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cilia_testnet::cluster::poll;
use cilia_testnet::{bin, ip_of, privileged, AgentOptions, Netns, TestAgent};
use k8s::fake_api::FakeApi;
use serde_json::{json, Value};

const NODE: &str = "node-k8s-test";
/// The reserved identity of an endpoint whose labels are not known yet.
const INIT_IDENTITY: u64 = 5;
/// How long an API server change may take to reach an endpoint.
const PROPAGATION: Duration = Duration::from_secs(15);

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"nodeName": NODE, "serviceAccountName": format!("sa-{name}"),
                    "containers": [{"name": "main", "image": "scratch",
                                    "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]}]}})
}

/// The Star Wars rule 1: only the empire's ships reach the deathstar on TCP
/// 80 — by the port's name, `http`, which only the deathstar pod's container
/// declares (named ports come from the pod).
fn cnp_rule1(ns: &str) -> Value {
    json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "rule1", "namespace": ns},
           "spec": {"description": "L3-L4 policy to restrict deathstar access to empire ships only",
                    "endpointSelector": {"matchLabels": {"org": "empire", "class": "deathstar"}},
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"org": "empire"}}],
                                 "toPorts": [{"ports": [{"port": "http", "protocol": "TCP"}]}]}]}})
}

/// An agent watching a fake API server that already holds `objects`.
struct K8sNode {
    agent: TestAgent,
    fake: FakeApi,
    _dir: tempfile::TempDir,
}

impl K8sNode {
    fn start(objects: Vec<Value>, extra: &[&str]) -> Self {
        let node = Netns::new("cnode").unwrap();
        let fake = FakeApi::start(&node);
        for o in objects {
            fake.put(o);
        }
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = fake.kubeconfig(dir.path());
        let mut args = vec![
            "--k8s-kubeconfig".to_string(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            NODE.into(),
            "--k8s-sync-timeout".into(),
            "15s".into(),
            // Creates wait for their own programs only: these tests are
            // about labels and policy, not about the generic program.
            "--fast-attach".into(),
            "off".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let agent = TestAgent::start_in(node, AgentOptions::default(), args)
            .unwrap_or_else(|log| panic!("agent did not start: {log}"));
        Self {
            agent,
            fake,
            _dir: dir,
        }
    }

    /// CNI ADD as kubelet runs it for pod `ns/name`: the endpoint's JSON.
    fn cni_add(&self, netns: &Netns, ns: &str, name: &str) -> Value {
        let conf = json!({"cniVersion": "1.0.0", "name": "cilia", "type": "cilia-cni",
                          "socket": self.agent.socket, "retrySeconds": 0});
        let container = format!("ctr-{name}");
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container}"
        );
        let mut child = Command::new(bin("cilia-cni"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &container)
            .env("CNI_NETNS", netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", &args)
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
            "cilia-cni ADD {ns}/{name}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.agent.endpoint_of_container(&container)
    }

    fn endpoint(&self, id: u64) -> Value {
        self.agent
            .endpoints()
            .into_iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("no endpoint {id}"))
    }

    /// Waits until endpoint `id` satisfies `check`; its JSON.
    fn wait_endpoint(&self, id: u64, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = poll(PROPAGATION, || {
            last = self.endpoint(id);
            check(&last)
        });
        assert!(
            ok,
            "endpoint {id}: {what} within {PROPAGATION:?}: {last}\nagent log: {}",
            self.agent.log_text()
        );
        last
    }

    fn identity_labels(&self, identity: u64) -> Value {
        self.agent
            .cli_json(&["identity", "get", &identity.to_string()])["labels"]
            .clone()
    }

    fn kubernetes_status(&self) -> Value {
        let status = self.agent.cli_json(&["status"]);
        status["subsystems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "kubernetes")
            .cloned()
            .unwrap_or_else(|| panic!("no kubernetes subsystem: {status}"))
    }
}

/// Accepts TCP connections on `addr` inside `ns` until dropped (bounded:
/// 120 s, 256 connections); each is closed at once.
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.run(|| TcpListener::bind(addr).unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut accepted = 0;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline && accepted < 256 {
                match listener.accept() {
                    Ok(_) => accepted += 1,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a TCP connection from `from` to `to` is established within 1 s.
fn connects(from: &Netns, to: SocketAddr) -> bool {
    from.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(1)))
        .is_ok()
}

/// Waits until `from` → `to` connects exactly when `allowed`.
fn wait_verdict(node: &K8sNode, from: &Netns, to: SocketAddr, allowed: bool, what: &str) {
    let ok = poll(PROPAGATION, || connects(from, to) == allowed);
    assert!(
        ok,
        "{what}: expected {} within {PROPAGATION:?}\nagent log: {}",
        if allowed {
            "to connect"
        } else {
            "to be dropped"
        },
        node.agent.log_text()
    );
}

#[test]
fn pod_and_namespace_labels_from_the_api_server_make_the_endpoints_identity() {
    privileged!("pod_and_namespace_labels_from_the_api_server_make_the_endpoints_identity");
    let node = K8sNode::start(
        vec![
            namespace("empire", json!({"team": "dark"})),
            pod(
                "empire",
                "deathstar",
                json!({"org": "empire", "class": "deathstar", "pod-template-hash": "abc"}),
            ),
        ],
        &[],
    );
    let status = node.kubernetes_status();
    assert_eq!(status["status"], "ok", "{status}");
    let detail = status["detail"].as_str().unwrap();
    assert!(detail.contains("v1.28.0-fake"), "{detail}");
    assert!(
        detail.contains("pods synced watching 1 objects"),
        "{detail}"
    );
    assert!(detail.contains("ciliumnetworkpolicies synced"), "{detail}");
    // Only this node's pods are asked for.
    let requests = node.fake.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains(&format!("fieldSelector=spec.nodeName%3D{NODE}"))),
        "{requests:?}"
    );

    // CNI ADD naming the pod: the pod's labels arrive, the identity leaves `init`.
    let ns = Netns::new("cep").unwrap();
    let ep = node.cni_add(&ns, "empire", "deathstar");
    let id = ep["id"].as_u64().unwrap();
    assert_eq!(ep["namespace"], "empire", "{ep}");
    assert_eq!(
        ep["k8s_pod"],
        json!({"namespace": "empire", "name": "deathstar"}),
        "{ep}"
    );
    let ep = node.wait_endpoint(id, "the pod's labels", |e| {
        e["labels"]["class"] == "deathstar" && e["identity"].as_u64() != Some(INIT_IDENTITY)
    });
    assert_eq!(ep["labels"]["org"], "empire", "{ep}");
    assert_eq!(
        ep["labels"]["io.cilium.k8s.policy.serviceaccount"], "sa-deathstar",
        "{ep}"
    );
    assert!(ep["labels"].get("pod-template-hash").is_none(), "{ep}");
    let ports: Vec<String> = ep["named_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}={}/{}",
                p["name"].as_str().unwrap(),
                p["protocol"].as_str().unwrap(),
                p["port"]
            )
        })
        .collect();
    assert_eq!(ports, ["http=TCP/80"], "{ep}");
    let first = ep["identity"].as_u64().unwrap();
    let labels = node.identity_labels(first);
    assert_eq!(
        labels["io.cilium.k8s.namespace.labels.team"], "dark",
        "{labels}"
    );
    assert_eq!(labels["io.kubernetes.pod.namespace"], "empire", "{labels}");

    // `kubectl label pod`: the endpoint moves to its new identity.
    node.fake.put(pod(
        "empire",
        "deathstar",
        json!({"org": "empire", "class": "deathstar", "version": "v2"}),
    ));
    let ep = node.wait_endpoint(id, "the pod's new label", |e| {
        e["labels"]["version"] == "v2"
    });
    let second = ep["identity"].as_u64().unwrap();
    assert_ne!(second, first, "{ep}");

    // `kubectl label namespace`: the namespace's endpoints follow, live.
    node.fake.put(namespace("empire", json!({"team": "light"})));
    let ep = node.wait_endpoint(id, "the namespace's new label", |e| {
        e["identity"].as_u64() != Some(second)
    });
    let labels = node.identity_labels(ep["identity"].as_u64().unwrap());
    assert_eq!(
        labels["io.cilium.k8s.namespace.labels.team"], "light",
        "{labels}"
    );

    // A pod claiming a reserved label is refused: its endpoint keeps what it has.
    let third = ep["identity"].as_u64().unwrap();
    node.fake.put(pod(
        "empire",
        "deathstar",
        json!({"org": "empire", "io.kubernetes.pod.namespace": "kube-system"}),
    ));
    let refused = poll(PROPAGATION, || {
        node.kubernetes_status()["errors"]
            .as_array()
            .is_some_and(|e| {
                e.iter().any(|m| {
                    m.as_str()
                        .unwrap_or("")
                        .contains("io.kubernetes.pod.namespace")
                })
            })
    });
    assert!(refused, "{}", node.kubernetes_status());
    assert_eq!(node.endpoint(id)["identity"].as_u64(), Some(third));
}

#[test]
fn policies_from_the_api_server_are_enforced_reported_and_survive_a_lost_connection() {
    privileged!("policies_from_the_api_server_are_enforced_reported_and_survive_a_lost_connection");
    let node = K8sNode::start(
        vec![
            namespace("default", json!({})),
            pod(
                "default",
                "deathstar",
                json!({"org": "empire", "class": "deathstar"}),
            ),
            pod(
                "default",
                "tiefighter",
                json!({"org": "empire", "class": "tiefighter"}),
            ),
            pod(
                "default",
                "xwing",
                json!({"org": "alliance", "class": "xwing"}),
            ),
        ],
        &[],
    );
    let (ds_ns, tf_ns, xw_ns) = (
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
    );
    let mut ids = Vec::new();
    for (ns, name) in [
        (&ds_ns, "deathstar"),
        (&tf_ns, "tiefighter"),
        (&xw_ns, "xwing"),
    ] {
        let ep = node.cni_add(ns, "default", name);
        let id = ep["id"].as_u64().unwrap();
        node.wait_endpoint(id, "the pod's labels", |e| e["labels"]["class"] == name);
        ids.push(id);
    }
    let deathstar = SocketAddr::new(ip_of(&node.endpoint(ids[0]), "ipv4"), 80);
    let _server = Listener::start(&ds_ns, SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 80));
    wait_verdict(&node, &xw_ns, deathstar, true, "xwing before any policy");

    // kubectl apply of the Star Wars rule: the xwing is dropped, the
    // tiefighter still lands; `cilia policy get` names the source.
    node.fake.put(cnp_rule1("default"));
    wait_verdict(&node, &xw_ns, deathstar, false, "xwing under rule1");
    assert!(connects(&tf_ns, deathstar), "tiefighter under rule1");
    let list = node.agent.cli_json(&["policy", "get"]);
    let rule1 = list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "rule1")
        .cloned()
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(rule1["source"], "kubernetes", "{rule1}");
    assert_eq!(rule1["kind"], "CiliumNetworkPolicy", "{rule1}");
    // A policy imported by hand beside it is `local`.
    let local = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: by-hand, namespace: other}\nspec:\n  endpointSelector: {matchLabels: {app: none}}\n  ingress: [{}]\n";
    let out = node.agent.cli_stdin(&["policy", "import", "-"], local);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = node.agent.cli_json(&["policy", "get"]);
    let by_hand = list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "by-hand")
        .cloned()
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(by_hand["source"], "local", "{by_hand}");
    let table = node.agent.cli_ok(&["policy", "get"]);
    assert!(
        table.contains("SOURCE") && table.contains("kubernetes"),
        "{table}"
    );
    // The accepted CRD says so on its status.
    let valid = poll(PROPAGATION, || {
        node.fake
            .get("CiliumNetworkPolicy", "default", "rule1")
            .is_some_and(|o| o["status"]["conditions"][0]["status"] == "True")
    });
    assert!(
        valid,
        "{:?}",
        node.fake.get("CiliumNetworkPolicy", "default", "rule1")
    );

    // A policy cilia refuses: a False `Valid` condition naming the field on
    // the CRD, an Event for the NetworkPolicy; rule1 keeps working.
    node.fake.put(
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "to-fqdn", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"class": "xwing"}},
                 "egress": [{"toFQDNs": [{"matchName": "rebels.example.org"}]}]}}),
    );
    node.fake.put(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "np-bad", "namespace": "default"},
        "spec": {"podSelector": {}, "notAField": true}}),
    );
    let refused = poll(PROPAGATION, || {
        node.fake.patches().iter().any(|(path, body)| {
            path.ends_with("/ciliumnetworkpolicies/to-fqdn/status")
                && body["status"]["conditions"][0]["status"] == "False"
                && body["status"]["conditions"][0]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("toFQDNs")
        })
    });
    assert!(refused, "patches: {:?}", node.fake.patches());
    let evented = poll(PROPAGATION, || {
        node.fake
            .events()
            .iter()
            .any(|e| e["reason"] == "PolicyRefused" && e["involvedObject"]["name"] == "np-bad")
    });
    assert!(evented, "events: {:?}", node.fake.events());
    assert!(!connects(&xw_ns, deathstar), "xwing after the refusals");
    assert!(connects(&tf_ns, deathstar), "tiefighter after the refusals");

    // The API server goes away: the datapath stays as it is, the status
    // says what is wrong.
    node.fake.stop();
    let stopped = Instant::now();
    let degraded = poll(PROPAGATION, || {
        node.kubernetes_status()["status"] == "degraded"
    });
    assert!(degraded, "{}", node.kubernetes_status());
    assert!(
        !connects(&xw_ns, deathstar),
        "xwing while the API server is away"
    );
    assert!(
        connects(&tf_ns, deathstar),
        "tiefighter while the API server is away"
    );
    // Changes made meanwhile arrive when it is back (the watch resumes).
    node.fake.delete("CiliumNetworkPolicy", "default", "rule1");
    node.fake.restart(&node.agent.node);
    eprintln!("API server away for {:?}", stopped.elapsed());
    wait_verdict(
        &node,
        &xw_ns,
        deathstar,
        true,
        "xwing once rule1 is deleted",
    );
    // Every watch resumes within the longest backoff (30 s).
    let back = poll(Duration::from_secs(35), || {
        node.kubernetes_status()["status"] == "ok"
    });
    assert!(
        back,
        "{}\nrequests: {:?}\nagent log: {}",
        node.kubernetes_status(),
        node.fake.requests(),
        node.agent.log_text()
    );
    let list = node.agent.cli_json(&["policy", "get"]);
    assert!(
        !list["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "rule1"),
        "{list}"
    );
}

#[test]
fn start_up_fails_naming_the_kinds_that_did_not_sync() {
    privileged!("start_up_fails_naming_the_kinds_that_did_not_sync");
    let node = Netns::new("cnode").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port of the node's loopback.
    let port = node.run(|| {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let kubeconfig = dir.path().join("kubeconfig.yaml");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: http://127.0.0.1:{port}\n  name: c\n\
             contexts:\n- context:\n    cluster: c\n    user: u\n  name: c\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let started = Instant::now();
    let err = match TestAgent::start_in(
        node,
        AgentOptions::default(),
        vec![
            "--k8s-kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--k8s-sync-timeout".into(),
            "2s".into(),
        ],
    ) {
        Ok(_) => panic!("the agent started without an API server"),
        Err(log) => log,
    };
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");
    assert!(err.contains("not synced after 2s"), "{err}");
    for kind in [
        "pods",
        "namespaces",
        "networkpolicies",
        "ciliumnetworkpolicies",
        "ciliumclusterwidenetworkpolicies",
    ] {
        assert!(err.contains(kind), "{kind}: {err}");
    }
}
