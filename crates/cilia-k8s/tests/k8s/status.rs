//! What a refused or accepted policy writes back.

use cilia_k8s::policy::translate;
use cilia_k8s::status::{crd_status_patch, refusal_event, Reported};
use cilia_policy::PolicyKind;
use k8s_openapi::api::core::v1::Event;

use crate::fixtures::{dynamic, value};

const NOW: &str = "2026-12-02T10:10:00Z";

#[test]
fn a_refused_cnp_gets_a_false_valid_condition_naming_field_and_reason() {
    let obj = dynamic("cnp-unsupported.json");
    let refusal = translate(PolicyKind::CiliumNetworkPolicy, &obj).unwrap_err();
    let patch = crd_status_patch(&obj, Err(&refusal), NOW).expect("a patch");
    let conditions = patch["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1);
    let c = &conditions[0];
    assert_eq!(c["type"], "Valid");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "PolicyRefused");
    assert_eq!(c["lastTransitionTime"], NOW);
    let message = c["message"].as_str().unwrap();
    assert!(message.starts_with("spec.egress[0].toFQDNs: "), "{message}");
    assert!(message.contains("not supported"), "{message}");
}

#[test]
fn a_condition_already_on_the_object_is_not_written_again() {
    // rule1's fixture already says Valid=True, "policy accepted".
    let obj = dynamic("cnp-rule1.json");
    assert!(translate(PolicyKind::CiliumNetworkPolicy, &obj).is_ok());
    assert_eq!(crd_status_patch(&obj, Ok(()), NOW), None);
}

#[test]
fn a_new_condition_keeps_the_other_conditions() {
    let mut v = value("cnp-rule1.json");
    v["status"]["conditions"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "Audited", "status": "True"}));
    v["spec"]["egress"] = serde_json::json!([{"toFQDNs": [{"matchName": "x.example"}]}]);
    let obj: kube::core::DynamicObject = serde_json::from_value(v).unwrap();
    let refusal = translate(PolicyKind::CiliumNetworkPolicy, &obj).unwrap_err();
    let patch = crd_status_patch(&obj, Err(&refusal), NOW).unwrap();
    let types: Vec<&str> = patch["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Audited", "Valid"]);
}

#[test]
fn a_refused_networkpolicy_is_reported_by_a_warning_event_on_it() {
    // The engine takes every v1 NetworkPolicy the API server admits; a
    // refusal comes from the policy-set limits or fields newer than the
    // engine. The Event is the same for any reason.
    let obj = dynamic("networkpolicy-rule1-np.json");
    let mut refusal = translate(
        PolicyKind::CiliumNetworkPolicy,
        &dynamic("cnp-unsupported.json"),
    )
    .unwrap_err();
    *refusal.object = cilia_k8s::policy::source_of(PolicyKind::NetworkPolicy, &obj);
    let body = refusal_event(&refusal, "node-1", NOW, "2026-12-02T10:10:00.000000Z");
    let event: Event = serde_json::from_value(body).expect("a core/v1 Event");
    let o = &event.involved_object;
    assert_eq!(o.kind.as_deref(), Some("NetworkPolicy"));
    assert_eq!(o.api_version.as_deref(), Some("networking.k8s.io/v1"));
    assert_eq!(o.name.as_deref(), Some("rule1-np"));
    assert_eq!(o.namespace.as_deref(), Some("default"));
    assert_eq!(
        o.uid.as_deref(),
        Some("6a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c04")
    );
    assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(event.metadata.generate_name.as_deref(), Some("rule1-np."));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reason.as_deref(), Some("PolicyRefused"));
    assert_eq!(event.reporting_component.as_deref(), Some("cilia-agent"));
    assert_eq!(event.reporting_instance.as_deref(), Some("node-1"));
    let message = event.message.unwrap();
    assert!(
        message.starts_with("not enforced by cilia on node node-1: spec.egress[0].toFQDNs: "),
        "{message}"
    );
}

#[test]
fn one_agent_reports_a_refusal_once_per_generation() {
    let refusal = translate(
        PolicyKind::CiliumNetworkPolicy,
        &dynamic("cnp-unsupported.json"),
    )
    .unwrap_err();
    let mut reported = Reported::default();
    assert!(reported.first_time(&refusal.object));
    assert!(!reported.first_time(&refusal.object));
    let mut next = refusal.object.clone();
    next.generation = Some(4);
    assert!(reported.first_time(&next));
    reported.forget(&next.uid);
    assert!(reported.first_time(&next));
}
