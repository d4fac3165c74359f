//! Namespaces into the labels their pods carry.

use cilia_k8s::namespace::NamespaceLabels;
use k8s_openapi::api::core::v1::Namespace;

use crate::fixtures::{object, value};

#[test]
fn namespace_labels_appear_on_pods_under_the_cilium_prefix() {
    let ns = NamespaceLabels::from_namespace(&object("namespace-default.json")).unwrap();
    assert_eq!(ns.name, "default");
    assert_eq!(ns.uid, "2f0c3a6b-8d9e-4f1a-b2c3-d4e5f6a7b803");
    let on_pods = ns.on_pods();
    assert_eq!(on_pods.len(), 2);
    assert_eq!(on_pods["io.cilium.k8s.namespace.labels.team"], "empire");
    assert_eq!(
        on_pods["io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"],
        "default"
    );
}

#[test]
fn a_namespace_without_labels_gives_none() {
    let mut v = value("namespace-default.json");
    v["metadata"].as_object_mut().unwrap().remove("labels");
    let ns: Namespace = serde_json::from_value(v).unwrap();
    assert!(NamespaceLabels::from_namespace(&ns)
        .unwrap()
        .on_pods()
        .is_empty());
}
