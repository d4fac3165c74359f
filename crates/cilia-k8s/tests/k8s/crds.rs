//! The shipped CRD manifests name what the client watches.

use cilia_k8s::policy::api_resource;
use cilia_policy::PolicyKind;
use serde_norway::Value;

fn crd(file: &str) -> Value {
    let path = format!(
        "{}/../../install/kubernetes/crds/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn check(file: &str, kind: PolicyKind, scope: &str, short: &[&str]) {
    let d = crd(file);
    let r = api_resource(kind);
    assert_eq!(d["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(d["kind"], "CustomResourceDefinition");
    assert_eq!(
        d["metadata"]["name"].as_str().unwrap(),
        format!("{}.{}", r.plural, r.group)
    );
    let spec = &d["spec"];
    assert_eq!(spec["group"].as_str().unwrap(), r.group);
    assert_eq!(spec["scope"].as_str().unwrap(), scope);
    let names = &spec["names"];
    assert_eq!(names["kind"].as_str().unwrap(), r.kind);
    assert_eq!(names["plural"].as_str().unwrap(), r.plural);
    assert_eq!(
        names["listKind"].as_str().unwrap(),
        format!("{}List", r.kind)
    );
    let shorts: Vec<&str> = names["shortNames"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(shorts, short);
    let versions = spec["versions"].as_sequence().unwrap();
    assert_eq!(versions.len(), 1);
    let v = &versions[0];
    assert_eq!(v["name"].as_str().unwrap(), r.version);
    assert_eq!(v["served"], true);
    assert_eq!(v["storage"], true);
    assert!(v["subresources"]["status"].is_mapping());
    let props = &v["schema"]["openAPIV3Schema"]["properties"];
    assert_eq!(props["spec"]["x-kubernetes-preserve-unknown-fields"], true);
    assert_eq!(
        props["specs"]["items"]["x-kubernetes-preserve-unknown-fields"],
        true
    );
    let cond = &props["status"]["properties"]["conditions"]["items"]["properties"];
    for field in ["type", "status", "reason", "message", "lastTransitionTime"] {
        assert!(
            cond[field].is_mapping(),
            "{file}: status.conditions[].{field}"
        );
    }
}

#[test]
fn the_cnp_crd_matches_the_watched_resource() {
    check(
        "ciliumnetworkpolicies.yaml",
        PolicyKind::CiliumNetworkPolicy,
        "Namespaced",
        &["cnp", "ciliumnp"],
    );
}

#[test]
fn the_ccnp_crd_matches_the_watched_resource() {
    check(
        "ciliumclusterwidenetworkpolicies.yaml",
        PolicyKind::CiliumClusterwideNetworkPolicy,
        "Cluster",
        &["ccnp"],
    );
}
