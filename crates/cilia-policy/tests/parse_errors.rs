//! Parsing: accepted inputs, and one-line errors naming source, document, policy, path, reason.

use cilia_policy::{parse_policies, PolicyKind};

const CNP_HEAD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: rule1, namespace: default}\n";
const NP_HEAD: &str =
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np1}\n";

fn err(yaml: &str) -> String {
    match parse_policies("policies.yaml", yaml) {
        Ok(p) => panic!(
            "expected an error, parsed {} policies from:\n{yaml}",
            p.len()
        ),
        Err(e) => e.to_string(),
    }
}

fn cnp_err(spec: &str) -> String {
    err(&format!("{CNP_HEAD}spec:\n{spec}"))
}

#[test]
fn error_names_source_document_policy_path_and_reason() {
    let yaml = format!(
        "{NP_HEAD}spec: {{podSelector: {{}}}}\n---\n{CNP_HEAD}spec:\n  endpointSelector: {{}}\n  ingress:\n  - toPorts:\n    - ports:\n      - port: eighty!\n"
    );
    assert_eq!(
        err(&yaml),
        "policies.yaml: document 2 (rule1): spec.ingress[0].toPorts[0].ports[0].port: \"eighty!\" is not a port number or a port name"
    );
}

#[test]
fn cilium_value_errors() {
    let cases: &[(&str, &str)] = &[
        (
            "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: 70000}]}]",
            "spec.egress[0].toPorts[0].ports[0].port: 70000 is out of range (0-65535)",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: '65536'}]}]",
            "spec.egress[0].toPorts[0].ports[0].port: \"65536\" is out of range (0-65535)",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: '80', endPort: 79}]}]",
            "spec.egress[0].toPorts[0].ports[0].endPort: 79 is less than port 80",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: '80', endPort: 70000}]}]",
            "spec.egress[0].toPorts[0].ports[0].endPort: 70000 is out of range (0-65535)",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{endPort: 90}]}]",
            "spec.egress[0].toPorts[0].ports[0].endPort: endPort requires a non-zero port",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: '80', protocol: TCPX}]}]",
            "spec.egress[0].toPorts[0].ports[0].protocol: \"TCPX\" is not a valid protocol (TCP, UDP, SCTP, ANY)",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toCIDR: [10.0.0.0/8, 10.0.0.0/33]",
            "spec.egress[0].toCIDR[1]: \"10.0.0.0/33\" is not a valid CIDR",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]",
            "spec.ingress[0].fromCIDRSet[0].except[0]: \"11.0.0.0/16\" is not inside 10.0.0.0/8",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - fromCIDRSet: [{except: [10.0.0.0/16]}]",
            "spec.ingress[0].fromCIDRSet[0].cidr: missing",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - fromEntities: [galaxy]",
            "spec.ingress[0].fromEntities[0]: \"galaxy\" is not an entity (world, cluster, host, remote-node, init, health, unmanaged, all)",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - fromEntities: [kube-apiserver]",
            "spec.ingress[0].fromEntities[0]: entity \"kube-apiserver\" is not supported yet",
        ),
        (
            "  endpointSelector: {matchExpressions: [{key: app, operator: Within, values: [a]}]}",
            "spec.endpointSelector.matchExpressions[0].operator: \"Within\" is not a valid operator (In, NotIn, Exists, DoesNotExist)",
        ),
        (
            "  endpointSelector: {matchExpressions: [{key: app, operator: In}]}",
            "spec.endpointSelector.matchExpressions[0].values: must be non-empty for operator In",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toEndpoints: [{matchExpressions: [{key: app, operator: Exists, values: [x]}]}]",
            "spec.egress[0].toEndpoints[0].matchExpressions[0].values: must be empty for operator Exists",
        ),
        ("  ingress: []", "spec.endpointSelector: missing"),
        (
            "  endpointSelector: {}\n  egress:\n  - toEndpoints: [{matchLabels: {app: [a]}}]",
            "spec.egress[0].toEndpoints[0].matchLabels.app: invalid type: sequence, expected a string",
        ),
        (
            "  endpointSelector: {}\n  enableDefaultDeny: {ingress: maybe}",
            "spec.enableDefaultDeny.ingress: invalid type: string \"maybe\", expected a boolean",
        ),
    ];
    for (spec, want) in cases {
        assert_eq!(
            cnp_err(spec),
            format!("policies.yaml: document 1 (rule1): {want}"),
            "{spec}"
        );
    }
}

#[test]
fn unknown_fields_are_errors_naming_the_field() {
    let cases: &[(&str, &str)] = &[
        (
            "  endpointSelector: {}\n  ingres: []",
            "spec.ingres: unknown field `ingres`",
        ),
        (
            "  endpointSelector: {}\n  ingress:\n  - fromEndpoint: []",
            "spec.ingress[0].fromEndpoint: unknown field `fromEndpoint`",
        ),
        (
            "  endpointSelector: {matchLabel: {a: b}}",
            "spec.endpointSelector.matchLabel: unknown field `matchLabel`",
        ),
        (
            "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{prot: '80'}]}]",
            "spec.egress[0].toPorts[0].ports[0].prot: unknown field `prot`",
        ),
    ];
    for (spec, want) in cases {
        let got = cnp_err(spec);
        assert!(
            got.starts_with(&format!("policies.yaml: document 1 (rule1): {want}")),
            "{spec}\n got: {got}"
        );
    }
    let got = err(&format!(
        "{NP_HEAD}spec:\n  podSelector: {{}}\n  ingress:\n  - form: []\n"
    ));
    assert!(
        got.starts_with(
            "policies.yaml: document 1 (np1): spec.ingress[0].form: unknown field `form`"
        ),
        "{got}"
    );
    let got = err(&format!("{NP_HEAD}spec:\n  podSelector: {{}}\nextra: 1\n"));
    assert!(
        got.starts_with("policies.yaml: document 1 (np1): extra: unknown field `extra`"),
        "{got}"
    );
}

#[test]
fn unsupported_fields_are_rejected_not_ignored() {
    let cases: &[(&str, &str)] = &[
        ("egress:\n  - toFQDNs: [{matchName: example.com}]", "spec.egress[0].toFQDNs"),
        ("egress:\n  - toServices: [{k8sService: {serviceName: x}}]", "spec.egress[0].toServices"),
        ("egress:\n  - toGroups: [{aws: {}}]", "spec.egress[0].toGroups"),
        ("egress:\n  - toRequires: [{}]", "spec.egress[0].toRequires"),
        ("ingress:\n  - fromRequires: [{}]", "spec.ingress[0].fromRequires"),
        ("ingress:\n  - icmps: [{fields: [{type: 8}]}]", "spec.ingress[0].icmps"),
        ("egressDeny:\n  - icmps: [{fields: [{type: 8}]}]", "spec.egressDeny[0].icmps"),
        ("ingress:\n  - authentication: {mode: required}", "spec.ingress[0].authentication"),
        ("ingress:\n  - toPorts: [{ports: [{port: '9092', protocol: TCP}], rules: {kafka: [{topic: t}]}}]", "spec.ingress[0].toPorts[0].rules.kafka"),
        ("egress:\n  - toPorts: [{ports: [{port: '53', protocol: UDP}], rules: {dns: [{matchPattern: '*'}]}}]", "spec.egress[0].toPorts[0].rules.dns"),
        ("ingress:\n  - toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {l7proto: x}}]", "spec.ingress[0].toPorts[0].rules.l7proto"),
        ("ingress:\n  - toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {l7proto: x, l7: [{}]}}]", "spec.ingress[0].toPorts[0].rules.l7proto"),
        ("ingress:\n  - toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{headerMatches: [{name: X, mismatch: LOG}]}]}}]", "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch"),
        ("ingress:\n  - toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{headerMatches: [{name: X, secret: {name: s}}]}]}}]", "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].secret"),
        ("ingress:\n  - toPorts: [{ports: [{port: '443'}], terminatingTLS: {secret: {name: s}}}]", "spec.ingress[0].toPorts[0].terminatingTLS"),
        ("egress:\n  - toPorts: [{ports: [{port: '443'}], originatingTLS: {secret: {name: s}}}]", "spec.egress[0].toPorts[0].originatingTLS"),
        ("egress:\n  - toPorts: [{ports: [{port: '443'}], listener: {name: l}}]", "spec.egress[0].toPorts[0].listener"),
        ("egress:\n  - toPorts: [{ports: [{port: '443'}], serverNames: [a.b]}]", "spec.egress[0].toPorts[0].serverNames"),
        ("nodeSelector: {}", "spec.nodeSelector"),
    ];
    for (spec, path) in cases {
        let field = path.rsplit('.').next().unwrap_or_default();
        let got = cnp_err(&format!("  endpointSelector: {{}}\n  {spec}"));
        assert_eq!(
            got,
            format!("policies.yaml: document 1 (rule1): {path}: `{field}` is not supported yet"),
            "{spec}"
        );
    }
}

#[test]
fn network_policy_errors() {
    let cases: &[(&str, &str)] = &[
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: HTTP}]", "spec.ingress[0].ports[0].port: \"HTTP\" is not a port number or a port name"),
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: '80'}]", "spec.ingress[0].ports[0].port: \"80\" is not a port number or a port name"),
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: http, endPort: 90}]", "spec.ingress[0].ports[0].endPort: endPort cannot be used with the named port \"http\""),
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: 80, protocol: ICMP}]", "spec.ingress[0].ports[0].protocol: \"ICMP\" is not a valid protocol (TCP, UDP, SCTP)"),
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: 0}]", "spec.ingress[0].ports[0].port: must be between 1 and 65535"),
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: 99999}]", "spec.ingress[0].ports[0].port: 99999 is out of range (0-65535)"),
        ("  podSelector: {}\n  egress:\n  - ports: [{endPort: 90}]", "spec.egress[0].ports[0].endPort: endPort requires a non-zero port"),
        ("  podSelector: {}\n  egress:\n  - ports: [{port: 90, endPort: 80}]", "spec.egress[0].ports[0].endPort: 80 is less than port 90"),
        ("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/99]}}]", "spec.egress[0].to[0].ipBlock.except[0]: \"10.0.0.0/99\" is not a valid CIDR"),
        ("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]", "spec.egress[0].to[0].ipBlock: ipBlock cannot be combined with podSelector or namespaceSelector"),
        ("  podSelector: {}\n  egress:\n  - to: [{}]", "spec.egress[0].to[0]: must specify podSelector, namespaceSelector or ipBlock"),
        ("  podSelector: {}\n  policyTypes: [Ingress, Sideways]", "spec.policyTypes[1]: \"Sideways\" is not a policy type (Ingress, Egress)"),
        ("  ingress: []", "spec.podSelector: missing (use {} to select all pods)"),
    ];
    for (spec, want) in cases {
        assert_eq!(
            err(&format!("{NP_HEAD}spec:\n{spec}\n")),
            format!("policies.yaml: document 1 (np1): {want}"),
            "{spec}"
        );
    }
}

#[test]
fn document_level_errors() {
    let cases: &[(&str, &str)] = &[
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", "policies.yaml: document 1 (x): kind: \"Pod\" is not supported (expected NetworkPolicy, CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy)"),
        ("apiVersion: cilium.io/v2\nkind: NetworkPolicy\nmetadata: {name: x}\nspec: {}\n", "policies.yaml: document 1 (x): apiVersion: \"cilium.io/v2\" is not valid for kind NetworkPolicy (expected networking.k8s.io/v1)"),
        ("apiVersion: networking.k8s.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n", "policies.yaml: document 1 (x): apiVersion: \"networking.k8s.io/v1\" is not valid for kind CiliumNetworkPolicy (expected cilium.io/v2)"),
        ("kind: NetworkPolicy\n", "policies.yaml: document 1: apiVersion: missing"),
        ("apiVersion: cilium.io/v2\nmetadata: {name: x}\n", "policies.yaml: document 1 (x): kind: missing"),
        ("- a\n- b\n", "policies.yaml: document 1: document is not a policy object (a mapping with apiVersion, kind, metadata, spec)"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {namespace: a}\nspec: {endpointSelector: {}}\n", "policies.yaml: document 1: metadata.name: missing"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n", "policies.yaml: document 1 (x): spec: missing (a policy needs spec or specs)"),
        ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: x, namespace: a}\nspec: {endpointSelector: {}}\n", "policies.yaml: document 1 (x): metadata.namespace: a CiliumClusterwideNetworkPolicy is not namespaced"),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(yaml), *want, "{yaml}");
    }
}

#[test]
fn yaml_syntax_error_is_reported() {
    let got = err("apiVersion: [\n");
    assert!(
        got.starts_with("policies.yaml: document 1: invalid YAML: "),
        "{got}"
    );
    assert!(!got.contains('\n'), "one line: {got}");
}

#[test]
fn multi_document_stream_skips_empty_documents() {
    let yaml = format!(
        "---\n# comment only\n---\n{NP_HEAD}spec: {{podSelector: {{}}}}\n---\n{CNP_HEAD}specs:\n- endpointSelector: {{}}\n---\napiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: cw\n  labels: {{a: b}}\n  annotations: {{x: y}}\n  resourceVersion: '12'\nspec:\n  description: hello\n  endpointSelector: {{}}\n---\n"
    );
    let p = parse_policies("x", &yaml).expect("parse");
    let got: Vec<(String, Option<String>, PolicyKind)> = p
        .iter()
        .map(|p| (p.name.clone(), p.namespace.clone(), p.kind))
        .collect();
    assert_eq!(
        got,
        [
            (
                "np1".to_string(),
                Some("default".to_string()),
                PolicyKind::NetworkPolicy
            ),
            (
                "rule1".to_string(),
                Some("default".to_string()),
                PolicyKind::CiliumNetworkPolicy
            ),
            (
                "cw".to_string(),
                None,
                PolicyKind::CiliumClusterwideNetworkPolicy
            ),
        ]
    );
    assert_eq!(p[2].qualified_name(), "cw");
    assert_eq!(p[1].qualified_name(), "default/rule1");
}

#[test]
fn ports_accept_integers_and_numeric_strings() {
    let ok = |spec: &str| {
        parse_policies(
            "x",
            &format!("{CNP_HEAD}spec:\n  endpointSelector: {{}}\n{spec}\n"),
        )
    };
    assert!(ok("  ingress:\n  - toPorts: [{ports: [{port: 80}]}]").is_ok());
    assert!(ok("  ingress:\n  - toPorts: [{ports: [{port: '80', protocol: ANY}]}]").is_ok());
    assert!(ok("  ingress:\n  - toPorts: [{ports: [{port: '80', endPort: 80}]}]").is_ok());
}

#[test]
fn selector_keys_and_values_follow_kubernetes_label_rules_and_errors_name_the_field() {
    let long = "a".repeat(64);
    let cases: Vec<(String, &str)> = vec![
        (
            "{matchLabels: {'app name': web}}".into(),
            "spec.endpointSelector.matchLabels: key \"app name\" is not a valid label key",
        ),
        (
            format!("{{matchLabels: {{app: {long}}}}}"),
            "spec.endpointSelector.matchLabels: key \"app\": value \"aaaa",
        ),
        (
            "{matchLabels: {app: '-web'}}".into(),
            "spec.endpointSelector.matchLabels: key \"app\": value \"-web\" is not a valid label value",
        ),
        (
            "{matchLabels: {'bad_prefix!/x': y}}".into(),
            "spec.endpointSelector.matchLabels: key \"bad_prefix!/x\" is not a valid label key",
        ),
        (
            "{matchLabels: {'container:app': web}}".into(),
            "spec.endpointSelector.matchLabels: key \"container:app\": label source \"container\" is not supported",
        ),
        (
            "{matchExpressions: [{key: 'a b', operator: Exists}]}".into(),
            "spec.endpointSelector.matchExpressions[0].key: key \"a b\" is not a valid label key",
        ),
        (
            "{matchExpressions: [{key: app, operator: In, values: [ok, 'x y']}]}".into(),
            "spec.endpointSelector.matchExpressions[0].values[1]: value \"x y\" is not a valid label value",
        ),
    ];
    for (sel, want) in cases {
        let e = cnp_err(&format!("  endpointSelector: {sel}\n  ingress: [{{}}]"));
        assert!(e.contains(want), "{sel}\n got: {e}\nwant: {want}");
    }
}

#[test]
fn valid_selector_keys_with_sources_and_prefixes_parse() {
    let yaml = format!(
        "{CNP_HEAD}spec:\n  endpointSelector: {{matchLabels: {{'k8s:app': web, 'example.com/tier': front, 'any:x': ''}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{'reserved:host': ''}}}}]\n"
    );
    parse_policies("policies.yaml", &yaml).expect("valid selectors parse");
}

#[test]
fn a_64kb_selector_value_gives_a_short_one_line_error() {
    let huge = "v".repeat(65536);
    let e = cnp_err(&format!(
        "  endpointSelector: {{matchLabels: {{app: {huge}}}}}\n  ingress: [{{}}]"
    ));
    assert!(e.len() < 400, "{} bytes: {e}", e.len());
    assert!(!e.contains('\n'));
    assert!(e.contains("(65536 bytes)"), "{e}");
}

#[test]
fn every_error_is_one_short_line_whatever_the_size_of_the_bad_value() {
    let huge = "x".repeat(65536);
    let cases = [
        format!("  endpointSelector: {{}}\n  egress:\n  - toCIDR: ['{huge}']"),
        format!("  endpointSelector: {{}}\n  egress:\n  - toPorts: [{{ports: [{{port: '{huge}'}}]}}]"),
        format!("  endpointSelector: {{}}\n  egress:\n  - toPorts: [{{ports: [{{port: '80', protocol: {huge}}}]}}]"),
        format!("  endpointSelector: {{}}\n  egress:\n  - toEntities: ['{huge}']"),
        format!("  endpointSelector: {{matchExpressions: [{{key: app, operator: {huge}}}]}}\n  egress: [{{}}]"),
        format!("  endpointSelector: {{}}\n  {huge}: 1"),
        format!("  endpointSelector: {{}}\n  egress: '{huge}'"),
    ];
    for spec in cases {
        let e = cnp_err(&spec);
        assert!(
            e.len() < 400 && !e.contains('\n'),
            "{} bytes: {}",
            e.len(),
            &e[..200.min(e.len())]
        );
    }
    let name = format!("{}\nx", "n".repeat(1000));
    let e = err(&format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: \"{}\"}}\nspec: {{}}\n", name.replace('\n', "\\n")));
    assert!(e.len() < 400 && !e.contains('\n'), "{} bytes", e.len());
    let e = err(&format!("apiVersion: cilium.io/v2\nkind: {huge}\n"));
    assert!(e.len() < 400, "{} bytes", e.len());
}
