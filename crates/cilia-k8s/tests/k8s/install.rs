//! The shipped install manifests (`install/kubernetes/`): every object parses
//! into its typed Kubernetes object with no field the type does not know,
//! the ClusterRole grants exactly what the agent calls
//! (`cilia_k8s::access::AGENT_ACCESS`), and the DaemonSet has what issue #15
//! asks of it: host network, privilege, the host paths the agent and the CNI
//! plugin share, the init container installing the plugin, probes, the node
//! name, every node and taint. That the image's agent accepts every flag
//! used here is `tests/image.sh`'s part.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cilia_k8s::access::{triples, AGENT_ACCESS};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

fn install_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../install/kubernetes")
}

/// Every `*.yaml` under `install/kubernetes/`, sorted.
fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&install_dir(), &mut out);
    out.sort();
    out
}

/// The YAML documents of a file, as JSON values (empty documents skipped).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            let v = serde_norway::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The first place where `typed` (the object read into its type and written
/// back) lost or changed something of `raw`: a misspelt or misplaced field
/// is dropped by k8s-openapi's lenient reader, and shows up here.
fn first_difference(raw: &Value, typed: &Value, at: &str) -> Option<String> {
    match (raw, typed) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            None => Some(format!("{at}.{k}: unknown to the typed object")),
            Some(w) => first_difference(v, w, &format!("{at}.{k}")),
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, &format!("{at}[{i}]"))),
        _ if raw == typed => None,
        _ => Some(format!("{at}: {raw} read as {typed}")),
    }
}

/// Reads `doc` strictly as `T`: the typed object must keep every field.
fn strict<T: DeserializeOwned + serde::Serialize>(doc: &Value, what: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    if let Some(d) = first_difference(doc, &back, "") {
        panic!("{what}: {d}");
    }
    typed
}

/// [`strict`], for a document only checked.
fn check<T: DeserializeOwned + serde::Serialize>(doc: &Value, what: &str) {
    let _: T = strict(doc, what);
}

/// The objects of `cilia.yaml`, typed.
struct Install {
    service_account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    config: ConfigMap,
    daemonset: DaemonSet,
}

fn install() -> Install {
    let path = install_dir().join("cilia.yaml");
    let mut by_kind: BTreeMap<String, Value> = BTreeMap::new();
    for doc in documents(&path) {
        let kind = doc["kind"].as_str().unwrap().to_string();
        assert!(
            by_kind.insert(kind.clone(), doc).is_none(),
            "two {kind} in cilia.yaml"
        );
    }
    let mut take = |kind: &str| {
        by_kind
            .remove(kind)
            .unwrap_or_else(|| panic!("cilia.yaml has no {kind}"))
    };
    let i = Install {
        service_account: strict(&take("ServiceAccount"), "ServiceAccount"),
        role: strict(&take("ClusterRole"), "ClusterRole"),
        binding: strict(&take("ClusterRoleBinding"), "ClusterRoleBinding"),
        config: strict(&take("ConfigMap"), "ConfigMap"),
        daemonset: strict(&take("DaemonSet"), "DaemonSet"),
    };
    assert!(
        by_kind.is_empty(),
        "unexpected objects: {:?}",
        by_kind.keys()
    );
    i
}

fn pod(i: &Install) -> &PodSpec {
    i.daemonset
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn agent(i: &Install) -> &Container {
    let p = pod(i);
    assert_eq!(p.containers.len(), 1, "one container: the agent");
    &p.containers[0]
}

/// hostPath of the pod volume `name`.
fn host_path<'a>(p: &'a PodSpec, name: &str) -> &'a str {
    let v = p
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"));
    &v.host_path
        .as_ref()
        .unwrap_or_else(|| panic!("volume {name} is no hostPath"))
        .path
}

/// `(host path, propagation, read-only)` of what is mounted at `at`.
fn mount(p: &PodSpec, c: &Container, at: &str) -> (String, String, bool) {
    let m = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == at)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {at}", c.name));
    (
        host_path(p, &m.name).to_string(),
        m.mount_propagation.clone().unwrap_or_default(),
        m.read_only.unwrap_or(false),
    )
}

#[test]
fn every_manifest_parses_into_its_typed_object_with_no_unknown_field() {
    let files = manifests();
    assert!(files.len() >= 3, "{files:?}");
    for path in files {
        for (n, doc) in documents(&path).iter().enumerate() {
            let what = format!("{} document {n}", path.display());
            match doc["kind"].as_str() {
                Some("ServiceAccount") => check::<ServiceAccount>(doc, &what),
                Some("ClusterRole") => check::<ClusterRole>(doc, &what),
                Some("ClusterRoleBinding") => check::<ClusterRoleBinding>(doc, &what),
                Some("ConfigMap") => check::<ConfigMap>(doc, &what),
                Some("DaemonSet") => check::<DaemonSet>(doc, &what),
                Some("CustomResourceDefinition") => check::<CustomResourceDefinition>(doc, &what),
                other => panic!("{what}: kind {other:?} is not checked by this test"),
            }
        }
    }
}

#[test]
fn the_strict_reader_refuses_a_misspelt_field() {
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "x", "namespace": "kube-system" },
        "date": { "A": "b" },
    });
    let e = std::panic::catch_unwind(|| strict::<ConfigMap>(&doc, "misspelt")).unwrap_err();
    let msg = e.downcast_ref::<String>().unwrap();
    assert_eq!(msg, "misspelt: .date: unknown to the typed object");
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_calls() {
    let i = install();
    let mut granted = Vec::new();
    for rule in i.role.rules.as_ref().unwrap() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.as_ref().unwrap() {
            for res in rule.resources.as_ref().unwrap() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    granted.push((group.clone(), res.clone(), verb.clone()));
                }
            }
        }
    }
    granted.sort();
    let before = granted.len();
    granted.dedup();
    assert_eq!(before, granted.len(), "a grant is repeated");
    assert_eq!(granted, triples(AGENT_ACCESS));
    assert!(i.role.aggregation_rule.is_none());
}

#[test]
fn the_binding_gives_the_role_to_the_daemonsets_service_account() {
    let i = install();
    let sa = &i.service_account.metadata;
    assert_eq!(i.binding.role_ref.kind, "ClusterRole");
    assert_eq!(i.binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(
        Some(&i.binding.role_ref.name),
        i.role.metadata.name.as_ref()
    );
    let subjects = i.binding.subjects.as_ref().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.namespace);
    assert_eq!(pod(&i).service_account_name, sa.name);
    assert_eq!(sa.namespace.as_deref(), Some("kube-system"));
    assert_eq!(i.daemonset.metadata.namespace, sa.namespace);
    assert_eq!(i.config.metadata.namespace, sa.namespace);
}

#[test]
fn the_daemonset_runs_a_privileged_host_network_agent_on_every_node() {
    let i = install();
    let spec = i.daemonset.spec.as_ref().unwrap();
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    // The template's labels are what the selector selects.
    let selected = spec.selector.match_labels.as_ref().unwrap();
    let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref();
    for (k, v) in selected {
        assert_eq!(labels.unwrap().get(k), Some(v));
    }
    let p = pod(&i);
    assert_eq!(p.host_network, Some(true));
    assert_eq!(
        p.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // One toleration with no key and operator Exists tolerates every taint.
    let tolerations = p.tolerations.as_ref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "{tolerations:?}"
    );
    let a = agent(&i);
    let sc = a.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(true));
    assert_eq!(a.command.as_deref(), Some(&["cilia-agent".to_string()][..]));
    assert!(a
        .args
        .as_ref()
        .unwrap()
        .contains(&"--k8s-in-cluster".into()));
    // Init container and agent run the one image build-image.sh tags.
    let image = format!("localhost/cilia:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(a.image.as_ref(), Some(&image));
    for c in p.init_containers.as_ref().unwrap() {
        assert_eq!(c.image.as_ref(), Some(&image), "{}", c.name);
    }
}

#[test]
fn the_agent_mounts_the_host_paths_it_shares_with_the_host() {
    let i = install();
    let (p, a) = (pod(&i), agent(&i));
    let socket_dir = Path::new(cilia_api::DEFAULT_SOCKET).parent().unwrap();
    // (mount path, host path, propagation, read-only). The agent's default
    // paths (cilia-agent's `paths`): bpffs root /sys/fs/bpf/cilia, state
    // /var/lib/cilia, socket /var/run/cilia/cilia.sock.
    let table = [
        ("/sys/fs/bpf", "/sys/fs/bpf", "Bidirectional", false),
        (socket_dir.to_str().unwrap(), "/var/run/cilia", "", false),
        ("/var/lib/cilia", "/var/lib/cilia", "", false),
        ("/var/run/netns", "/var/run/netns", "Bidirectional", false),
        ("/opt/cni/bin", "/opt/cni/bin", "", true),
        ("/etc/cni/net.d", "/etc/cni/net.d", "", true),
        ("/host/sys/fs/cgroup", "/sys/fs/cgroup", "", true),
    ];
    for (at, host, propagation, read_only) in table {
        assert_eq!(
            mount(p, a, at),
            (host.to_string(), propagation.to_string(), read_only),
            "{at}"
        );
    }
    // The socket-LB cgroup flag points at the mounted host cgroup root.
    let data = i.config.data.as_ref().unwrap();
    assert_eq!(data["CILIA_SOCKET_LB_CGROUP"], "/host/sys/fs/cgroup");
}

#[test]
fn the_init_container_installs_the_cni_plugin_into_the_host_dirs() {
    let i = install();
    let p = pod(&i);
    let inits = p.init_containers.as_ref().unwrap();
    assert_eq!(inits.len(), 1);
    let c = &inits[0];
    // tests/image.sh runs this same command in the image.
    let command: Vec<&str> = c
        .command
        .as_ref()
        .unwrap()
        .iter()
        .map(|s| s.as_str())
        .collect();
    assert_eq!(
        command,
        [
            "cilia",
            "cni",
            "install",
            "--bin-dir",
            "/host/opt/cni/bin",
            "--conf-dir",
            "/host/etc/cni/net.d"
        ]
    );
    assert_eq!(
        mount(p, c, "/host/opt/cni/bin"),
        ("/opt/cni/bin".into(), String::new(), false)
    );
    assert_eq!(
        mount(p, c, "/host/etc/cni/net.d"),
        ("/etc/cni/net.d".into(), String::new(), false)
    );
}

#[test]
fn the_probes_ask_the_agent_over_its_socket() {
    let i = install();
    let a = agent(&i);
    for (name, probe) in [
        ("startup", &a.startup_probe),
        ("readiness", &a.readiness_probe),
        ("liveness", &a.liveness_probe),
    ] {
        let probe = probe.as_ref().unwrap_or_else(|| panic!("no {name} probe"));
        let exec = probe.exec.as_ref().unwrap_or_else(|| panic!("{name}"));
        assert_eq!(
            exec.command.as_deref(),
            Some(&["cilia".to_string(), "status".to_string()][..]),
            "{name}"
        );
        assert!(probe.timeout_seconds.unwrap_or(1) >= 2, "{name}");
    }
    // The socket the probes ask is the agent's: neither is moved by the config.
    let data = i.config.data.as_ref().unwrap();
    assert!(!data.contains_key("CILIA_SOCKET"));
}

#[test]
fn the_agent_knows_its_node_from_the_downward_api_and_its_flags_from_the_config_map() {
    let i = install();
    let a = agent(&i);
    let env = a.env.as_ref().unwrap();
    for name in ["K8S_NODE_NAME", "CILIA_NODE_NAME"] {
        let var = env
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        let field = var.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(field.field_path, "spec.nodeName", "{name}");
    }
    let from = a.env_from.as_ref().unwrap();
    assert_eq!(from.len(), 1);
    let cm = from[0].config_map_ref.as_ref().unwrap();
    assert_eq!(Some(&cm.name), i.config.metadata.name.as_ref());
    assert_eq!(cm.optional, None, "a missing ConfigMap stops the pod");
    // Only the agent's variables: CILIA_* (each checked against
    // `cilia-agent --help` by tests/image.sh) and the log filter.
    for key in i.config.data.as_ref().unwrap().keys() {
        assert!(key.starts_with("CILIA_") || key == "RUST_LOG", "{key}");
    }
}
