//! Policy objects into the documents `cilia policy import` reads.

use std::collections::BTreeMap;

use cilia_k8s::pod::PodEndpoint;
use cilia_k8s::policy::{api_resource, translate};
use cilia_policy::{Direction, IdentityCache, Labels, PolicyKind, Verdict};
use kube::core::DynamicObject;

use crate::fixtures::{dynamic, object, value};

fn example(name: &str) -> cilia_policy::Policy {
    let path = format!(
        "{}/../../examples/starwars/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let yaml = std::fs::read_to_string(&path).unwrap();
    let mut policies = cilia_policy::parse_policies(name, &yaml).unwrap();
    assert_eq!(policies.len(), 1);
    policies.remove(0)
}

fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> DynamicObject {
    let mut v = value(name);
    edit(&mut v);
    serde_json::from_value(v).unwrap()
}

#[test]
fn the_star_wars_cnp_from_the_api_is_the_policy_import_reads_from_the_example() {
    let p = translate(PolicyKind::CiliumNetworkPolicy, &dynamic("cnp-rule1.json")).unwrap();
    assert_eq!(p.policy, example("cnp-l3-l4.yaml"));
    assert_eq!(p.policy.qualified_name(), "default/rule1");
}

#[test]
fn the_networkpolicy_from_the_api_is_the_policy_import_reads_from_the_example() {
    let p = translate(
        PolicyKind::NetworkPolicy,
        &dynamic("networkpolicy-rule1-np.json"),
    )
    .unwrap();
    assert_eq!(p.policy, example("networkpolicy-l3-l4.yaml"));
}

#[test]
fn the_source_keeps_the_objects_identity() {
    let p = translate(PolicyKind::CiliumNetworkPolicy, &dynamic("cnp-rule1.json")).unwrap();
    let s = &p.source;
    assert_eq!(s.origin, "kubernetes");
    assert_eq!(s.kind, "CiliumNetworkPolicy");
    assert_eq!(s.namespace.as_deref(), Some("default"));
    assert_eq!(s.name, "rule1");
    assert_eq!(s.uid, "8c3d4e5f-6a7b-4c8d-9e0f-1a2b3c4d5e06");
    assert_eq!(s.resource_version, "1501");
    assert_eq!(s.generation, Some(1));
    assert_eq!(s.describe(), "CiliumNetworkPolicy default/rule1");
}

#[test]
fn a_clusterwide_policy_has_no_namespace() {
    let p = translate(
        PolicyKind::CiliumClusterwideNetworkPolicy,
        &dynamic("ccnp-host-ingress.json"),
    )
    .unwrap();
    assert_eq!(p.policy.kind, PolicyKind::CiliumClusterwideNetworkPolicy);
    assert_eq!(p.policy.namespace, None);
    assert_eq!(p.source.namespace, None);
    assert_eq!(p.policy.qualified_name(), "allow-host-and-deny-world");
}

#[test]
fn the_stored_document_leaves_out_server_fields_and_status() {
    let p = translate(PolicyKind::CiliumNetworkPolicy, &dynamic("cnp-rule1.json")).unwrap();
    for absent in [
        "uid",
        "resourceVersion",
        "managedFields",
        "status",
        "last-applied",
        "Valid",
    ] {
        assert!(!p.yaml.contains(absent), "{absent} in:\n{}", p.yaml);
    }
    // It parses back on its own to the same policy, as an imported one does.
    let again = cilia_policy::parse_policies("stored", &p.yaml).unwrap();
    assert_eq!(again, vec![p.policy]);
}

#[test]
fn a_status_only_update_gives_the_same_document() {
    let before = translate(PolicyKind::CiliumNetworkPolicy, &dynamic("cnp-rule1.json")).unwrap();
    let obj = edited("cnp-rule1.json", |v| {
        v["metadata"]["resourceVersion"] = "1999".into();
        v["status"]["conditions"][0]["status"] = "False".into();
    });
    let after = translate(PolicyKind::CiliumNetworkPolicy, &obj).unwrap();
    assert_eq!(after.yaml, before.yaml);
    assert_eq!(after.source.resource_version, "1999");
}

#[test]
fn an_unsupported_field_is_refused_naming_it() {
    let e = translate(
        PolicyKind::CiliumNetworkPolicy,
        &dynamic("cnp-unsupported.json"),
    )
    .unwrap_err();
    assert_eq!(e.field, "spec.egress[0].toFQDNs");
    assert!(e.reason.contains("not supported"), "{e}");
    assert_eq!(e.object.name, "to-fqdn");
    assert_eq!(e.object.generation, Some(3));
    let line = e.to_string();
    assert!(
        line.starts_with(
            "CiliumNetworkPolicy default/to-fqdn (kubernetes): spec.egress[0].toFQDNs: "
        ),
        "{line}"
    );
}

#[test]
fn an_unknown_top_level_field_is_refused_not_ignored() {
    let obj = edited("cnp-rule1.json", |v| v["rules"] = serde_json::json!([]));
    let e = translate(PolicyKind::CiliumNetworkPolicy, &obj).unwrap_err();
    assert!(e.detail().contains("rules"), "{e}");
}

#[test]
fn list_items_without_kind_are_read_as_the_watched_kind() {
    // Items of a list of built-in kinds carry no apiVersion/kind.
    let obj = edited("networkpolicy-rule1-np.json", |v| {
        let m = v.as_object_mut().unwrap();
        m.remove("apiVersion");
        m.remove("kind");
    });
    let p = translate(PolicyKind::NetworkPolicy, &obj).unwrap();
    assert_eq!(p.policy.kind, PolicyKind::NetworkPolicy);
}

#[test]
fn a_namespaced_policy_without_namespace_is_refused() {
    let obj = edited("cnp-rule1.json", |v| {
        v["metadata"].as_object_mut().unwrap().remove("namespace");
    });
    let e = translate(PolicyKind::CiliumNetworkPolicy, &obj).unwrap_err();
    assert_eq!(e.field, "metadata.namespace");
}

#[test]
fn the_cnp_from_the_api_admits_the_empire_to_the_deathstar_pod_from_the_api() {
    let p = translate(PolicyKind::CiliumNetworkPolicy, &dynamic("cnp-rule1.json")).unwrap();
    let ns = BTreeMap::from([("team".to_string(), "empire".to_string())]);
    let deathstar = PodEndpoint::from_pod(&object("pod-deathstar.json")).unwrap();
    let subject = Labels(deathstar.identity_labels("default", &ns));
    let peer = |org: &str| {
        let mut l = BTreeMap::from([("org".to_string(), org.to_string())]);
        l.insert("io.kubernetes.pod.namespace".into(), "default".into());
        Labels(l)
    };
    let mut ids = IdentityCache::new();
    ids.insert_labels(1000, peer("empire"));
    ids.insert_labels(1001, peer("alliance"));
    let resolved = cilia_policy::resolve(&[p.policy], &subject, &ids);
    assert!(resolved.ingress_enforced);
    let verdict = |id| cilia_policy::evaluate(&resolved, Direction::Ingress, id, 6, 80).verdict;
    assert_eq!(verdict(1000), Verdict::Allow);
    assert_eq!(verdict(1001), Verdict::Deny);
}

#[test]
fn each_kind_is_watched_at_its_group_version_and_plural() {
    let r = api_resource(PolicyKind::NetworkPolicy);
    assert_eq!(
        (r.api_version.as_str(), r.plural.as_str()),
        ("networking.k8s.io/v1", "networkpolicies")
    );
    let r = api_resource(PolicyKind::CiliumNetworkPolicy);
    assert_eq!(
        (r.api_version.as_str(), r.kind.as_str(), r.plural.as_str()),
        (
            "cilium.io/v2",
            "CiliumNetworkPolicy",
            "ciliumnetworkpolicies"
        )
    );
    let r = api_resource(PolicyKind::CiliumClusterwideNetworkPolicy);
    assert_eq!(
        (r.api_version.as_str(), r.plural.as_str()),
        ("cilium.io/v2", "ciliumclusterwidenetworkpolicies")
    );
}
