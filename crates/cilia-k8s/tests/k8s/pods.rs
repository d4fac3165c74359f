//! Pods into endpoint labels and named ports.

use std::collections::BTreeMap;

use cilia_api::NamedPort;
use cilia_k8s::pod::PodEndpoint;
use k8s_openapi::api::core::v1::Pod;

use crate::fixtures::{object, value};

fn deathstar() -> PodEndpoint {
    PodEndpoint::from_pod(&object("pod-deathstar.json")).expect("deathstar translates")
}

fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> Pod {
    let mut v = value("pod-deathstar.json");
    edit(&mut v);
    serde_json::from_value(v).expect("still a pod")
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn pod_identity_fields_come_from_metadata_and_spec() {
    let p = deathstar();
    assert_eq!(p.namespace, "default");
    assert_eq!(p.name, "deathstar-6fb5694d48-5hmds");
    assert_eq!(p.uid, "0c7bd5a6-4a51-4f1e-9a3e-0d6b2b8c1a01");
    assert_eq!(p.resource_version.as_deref(), Some("1187"));
    assert_eq!(p.node_name.as_deref(), Some("node-1"));
    assert_eq!(p.service_account, "deathstar");
    assert!(!p.host_network);
    assert_eq!(p.key(), "default/deathstar-6fb5694d48-5hmds");
}

#[test]
fn identity_irrelevant_labels_are_left_out_and_listed() {
    let p = deathstar();
    assert_eq!(
        p.labels,
        map(&[
            ("app.kubernetes.io/name", "deathstar"),
            ("class", "deathstar"),
            ("org", "empire")
        ])
    );
    assert_eq!(p.ignored_labels, vec!["pod-template-hash"]);
}

#[test]
fn endpoint_labels_add_service_account_and_cluster() {
    let labels = deathstar().endpoint_labels("default");
    assert_eq!(labels["io.cilium.k8s.policy.serviceaccount"], "deathstar");
    assert_eq!(labels["io.cilium.k8s.policy.cluster"], "default");
    assert_eq!(labels["org"], "empire");
    assert!(!labels.contains_key("io.kubernetes.pod.namespace"));
}

#[test]
fn identity_labels_add_namespace_and_namespace_labels() {
    let ns = map(&[
        ("kubernetes.io/metadata.name", "default"),
        ("team", "empire"),
    ]);
    let labels = deathstar().identity_labels("prod", &ns);
    assert_eq!(labels["io.kubernetes.pod.namespace"], "default");
    assert_eq!(labels["io.cilium.k8s.namespace.labels.team"], "empire");
    assert_eq!(
        labels["io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"],
        "default"
    );
    assert_eq!(labels["io.cilium.k8s.policy.cluster"], "prod");
    assert_eq!(
        cilia_k8s::labels::with_source(&map(&[("org", "empire")])),
        vec!["k8s:org=empire"]
    );
}

#[test]
fn named_ports_come_from_every_container_sorted_by_name() {
    let ports = deathstar().named_ports;
    let np = |name: &str, protocol: &str, port| NamedPort {
        name: name.into(),
        protocol: protocol.into(),
        port,
    };
    // 9090 has no name: no entry.
    assert_eq!(
        ports,
        vec![
            np("dns", "UDP", 53),
            np("http", "TCP", 80),
            np("metrics", "TCP", 9100)
        ]
    );
}

#[test]
fn a_pod_claiming_a_reserved_label_is_refused_naming_it() {
    let e = PodEndpoint::from_pod(&object("pod-reserved-label.json")).unwrap_err();
    assert_eq!(e.pod, "default/impostor");
    assert_eq!(
        e.field,
        "metadata.labels[\"io.cilium.k8s.policy.serviceaccount\"]"
    );
    assert!(e.reason.contains("reserved"), "{e}");
    for key in [
        "io.kubernetes.pod.namespace",
        "io.cilium.k8s.namespace.labels.team",
        "io.cilium.k8s.policy.cluster",
    ] {
        let pod = edited(|v| {
            v["metadata"]["labels"][key] = "x".into();
        });
        let e = PodEndpoint::from_pod(&pod).unwrap_err();
        assert!(
            e.field.contains(key) && e.reason.contains("reserved"),
            "{e}"
        );
    }
}

#[test]
fn one_port_name_for_two_ports_is_refused_naming_both_fields() {
    let pod = edited(|v| {
        v["spec"]["containers"][1]["ports"][0]["name"] = "http".into();
    });
    let e = PodEndpoint::from_pod(&pod).unwrap_err();
    assert_eq!(e.field, "spec.containers[1].ports[0]");
    assert!(e.reason.contains("spec.containers[0].ports[0]"), "{e}");
}

#[test]
fn the_same_port_name_twice_with_the_same_port_is_one_name() {
    let pod = edited(|v| {
        v["spec"]["containers"][1]["ports"][0] =
            serde_json::json!({"name": "http", "containerPort": 80, "protocol": "TCP"});
    });
    let p = PodEndpoint::from_pod(&pod).unwrap();
    assert_eq!(p.named_ports.iter().filter(|n| n.name == "http").count(), 1);
}

#[test]
fn an_invalid_port_name_is_refused_naming_the_field() {
    let pod = edited(|v| {
        v["spec"]["containers"][0]["ports"][0]["name"] = "HTTP_8080".into();
    });
    let e = PodEndpoint::from_pod(&pod).unwrap_err();
    assert_eq!(e.field, "spec.containers[0].ports[0]");
    assert!(e.reason.contains("not a port name"), "{e}");
}

#[test]
fn sidecar_init_containers_declare_ports_and_plain_ones_do_not() {
    let pod = edited(|v| {
        v["spec"]["initContainers"] = serde_json::json!([
            {"name": "proxy", "image": "x", "restartPolicy": "Always",
             "ports": [{"name": "admin", "containerPort": 15000, "protocol": "TCP"}]},
            {"name": "setup", "image": "x",
             "ports": [{"name": "setup", "containerPort": 1, "protocol": "TCP"}]}
        ]);
    });
    let names: Vec<String> = PodEndpoint::from_pod(&pod)
        .unwrap()
        .named_ports
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert!(names.contains(&"admin".to_string()), "{names:?}");
    assert!(!names.contains(&"setup".to_string()), "{names:?}");
}

#[test]
fn a_pod_without_service_account_has_the_default_one() {
    let pod = edited(|v| {
        let spec = v["spec"].as_object_mut().unwrap();
        spec.remove("serviceAccountName");
        spec.remove("serviceAccount");
    });
    assert_eq!(
        PodEndpoint::from_pod(&pod).unwrap().service_account,
        "default"
    );
}

#[test]
fn host_network_pods_are_marked() {
    let pod = edited(|v| v["spec"]["hostNetwork"] = true.into());
    assert!(PodEndpoint::from_pod(&pod).unwrap().host_network);
}

#[test]
fn a_pod_without_uid_is_refused() {
    let pod = edited(|v| {
        v["metadata"].as_object_mut().unwrap().remove("uid");
    });
    let e = PodEndpoint::from_pod(&pod).unwrap_err();
    assert_eq!(e.field, "metadata.uid");
}
