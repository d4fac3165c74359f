//! Multi-document YAML streams: every separator form yields exactly the
//! policies written, empty documents are counted and skipped, and aliases
//! cannot expand a small input without bound.

use std::time::{Duration, Instant};

use cilia_policy::{parse_policies, parse_stream};

fn cnp(name: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector: {{}}\n  ingress:\n  - fromEntities: [host]\n"
    )
}

fn names(yaml: &str) -> Vec<String> {
    parse_policies("p.yaml", yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
        .iter()
        .map(|p| p.name.clone())
        .collect()
}

const DENY_ON_SEPARATOR_LINE: &str = "--- {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: deny-world}, spec: {endpointSelector: {}, ingressDeny: [{fromEntities: [world]}]}}\n";

#[test]
fn a_document_on_its_separator_line_is_read() {
    let yaml = format!("{}{DENY_ON_SEPARATOR_LINE}", cnp("allow"));
    assert_eq!(names(&yaml), ["allow", "deny-world"]);
}

#[test]
fn every_separator_form_yields_exactly_the_policies_written() {
    let (a, b, c) = (cnp("a"), cnp("b"), cnp("c"));
    let cases: Vec<(&str, String)> = vec![
        ("plain separators", format!("{a}---\n{b}---\n{c}")),
        ("leading ---", format!("---\n{a}---\n{b}---\n{c}")),
        ("... end markers", format!("{a}...\n---\n{b}...\n---\n{c}...\n")),
        (
            "comments between documents",
            format!("# first\n{a}# after a\n---\n# before b\n{b}---   # trailing\n{c}# end\n"),
        ),
        (
            "content on the separator line",
            format!("--- {{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {{name: a}}, spec: {{endpointSelector: {{}}}}}}\n--- \n{b}--- {{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {{name: c}}, spec: {{endpointSelector: {{}}}}}}\n"),
        ),
        (
            "CRLF line ends",
            format!("---\n{a}---\n{b}---\n{c}").replace('\n', "\r\n"),
        ),
    ];
    for (what, yaml) in cases {
        assert_eq!(names(&yaml), ["a", "b", "c"], "{what}:\n{yaml}");
    }
}

#[test]
fn empty_documents_are_counted_and_skipped() {
    let yaml = format!("---\n# only a comment\n---\n{}---\n---\n", cnp("a"));
    let stream = parse_stream("p.yaml", &yaml).unwrap();
    assert_eq!(stream.documents, 4);
    assert_eq!(stream.empty, [1, 3, 4]);
    assert_eq!(stream.policies.len(), 1);
    assert_eq!(stream.policies[0].index, 2);
}

#[test]
fn a_document_that_is_not_a_policy_object_is_an_error_naming_it() {
    for doc in ["- a\n- b\n", "just text\n", "42\n"] {
        let yaml = format!("{}---\n{doc}", cnp("a"));
        let e = parse_policies("p.yaml", &yaml).unwrap_err().to_string();
        assert!(
            e.starts_with("p.yaml: document 2: ") && e.contains("not a policy object"),
            "{e}"
        );
    }
}

#[test]
fn the_normalised_document_parses_back_to_the_same_policy() {
    let yaml = format!(
        "# comment\n{}{DENY_ON_SEPARATOR_LINE}---\r\napiVersion: networking.k8s.io/v1\r\nkind: NetworkPolicy\r\nmetadata: {{name: np}}\r\nspec:\r\n  podSelector: {{}}\r\n  ingress:\r\n  - ports: [{{port: 80}}, {{port: 443, endPort: 445}}]\r\n",
        cnp("a")
    );
    let stream = parse_stream("p.yaml", &yaml).unwrap();
    assert_eq!(stream.policies.len(), 3);
    for doc in &stream.policies {
        let back = parse_policies("stored", &doc.yaml).unwrap();
        assert_eq!(back, std::slice::from_ref(&doc.policy), "{}", doc.yaml);
    }
}

#[test]
fn a_small_alias_is_expanded() {
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n  endpointSelector: &web {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [*web]\n";
    assert_eq!(names(yaml), ["a"]);
}

#[test]
fn a_billion_laughs_document_is_refused_quickly() {
    let mut yaml = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: lol}\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for i in 1..10 {
        let p = i - 1;
        yaml.push_str(&format!(
            "l{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n"
        ));
    }
    yaml.push_str("spec: {endpointSelector: {}, ingress: [{fromEndpoints: [*l9]}]}\n");
    let doc = format!("{}---\n{yaml}", cnp("fine"));
    let start = Instant::now();
    let e = parse_policies("lol.yaml", &doc).unwrap_err().to_string();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    assert!(e.starts_with("lol.yaml: document 2: "), "{e}");
    assert!(e.contains("aliases") && e.contains("refused"), "{e}");
}

#[test]
fn alias_free_input_never_reaches_the_expansion_bound() {
    // The densest alias-free shapes: implicit null values and keys.
    let keys: Vec<String> = (0..2000).map(|i| format!("k{i}")).collect();
    let dense = [
        format!("{{{}}}\n", keys.join(",")),
        format!("[{}]\n", vec!["[]"; 2000].join(",")),
        format!("[{}]\n", vec!["{a}"; 2000].join(",")),
        "- ?\n".repeat(2000),
    ];
    for yaml in dense {
        let e = parse_policies("d.yaml", &yaml).unwrap_err().to_string();
        // Valid YAML that reaches the policy checks, not the bound.
        assert!(
            e.contains("apiVersion: missing") || e.contains("not a policy object"),
            "{e}"
        );
    }
}
