//! L7 HTTP rules (`toPorts[].rules.http`): parsing, which entries go to the
//! proxy with which HTTP rules (the union of every allow rule covering the
//! packet, upstream's semantics), and `trace_http`.

#[allow(unused_macros)] // verdict_tests! is for the verdict-table files
mod common;
use std::collections::BTreeMap;

use cilia_policy::l7::{HttpRuleSpec, L7Policy, SimpleRequest};
use cilia_policy::{
    evaluate, parse_policies, resolve, trace_http, IdentityCache, Labels, MergedPolicy,
    PolicyRepository, ResolvedPolicy, Verdict,
};
use common::*;

const STARWARS_L7: &str = include_str!("../../../examples/starwars/cnp-l7.yaml");

fn ingress(rules: &str) -> String {
    cnp(
        "default",
        &format!("endpointSelector: {{matchLabels: {{app: db}}}}\ningress:\n{rules}"),
    )
}

/// The L7 side of a packet to DB from `peer` on TCP `port`: `None` when not
/// redirected, else the HTTP rules' methods (`*` for allow-all).
fn l7_of(rp: &ResolvedPolicy, peer: u32, port: u16) -> Option<Vec<String>> {
    let ev = evaluate(rp, Ingress, peer, TCP, port);
    if !ev.proxy {
        return None;
    }
    let entry = ev.allowing_entry().expect("a proxied packet is allowed");
    Some(match &rp.l7[&entry.key()].policy {
        L7Policy::AllowAll => vec!["*".to_string()],
        L7Policy::Http(rules) => rules
            .iter()
            .map(|r| r.method.clone().unwrap_or_default())
            .collect(),
    })
}

fn get(method: &str) -> String {
    format!("toPorts: [{{ports: [{{port: '80', protocol: TCP}}], rules: {{http: [{{method: {method}}}]}}}}]")
}

fn parse_err(rules: &str) -> String {
    parse_policies("l7.yaml", &ingress(rules))
        .expect_err("invalid")
        .to_string()
}

// ---------------------------------------------------------------- parsing

#[test]
fn starwars_l7_policy_parses_and_proxies_only_the_empire_on_port_80() {
    let policies = parse_policies("cnp-l7.yaml", STARWARS_L7).expect("parse");
    let mut cache = IdentityCache::new();
    let pod = |class: &str, org: &str| {
        Labels::from_pairs([
            ("io.kubernetes.pod.namespace", "default"),
            ("class", class),
            ("org", org),
        ])
    };
    cache.insert_labels(200, pod("deathstar", "empire"));
    cache.insert_labels(201, pod("tiefighter", "empire"));
    cache.insert_labels(202, pod("xwing", "alliance"));
    let rp = resolve(&policies, &pod("deathstar", "empire"), &cache);
    let tie = evaluate(&rp, Ingress, 201, TCP, 80);
    assert_eq!((tie.verdict, tie.proxy), (Verdict::Allow, true));
    let xwing = evaluate(&rp, Ingress, 202, TCP, 80);
    assert_eq!((xwing.verdict, xwing.proxy), (Verdict::Deny, false));
    assert_eq!(evaluate(&rp, Ingress, 201, TCP, 81).verdict, Verdict::Deny);
    let entry = tie.allowing_entry().expect("allowed");
    let l7 = &rp.l7[&entry.key()];
    assert_eq!(
        l7.policy,
        L7Policy::Http(vec![HttpRuleSpec {
            method: Some("POST".into()),
            path: Some("/v1/request-landing".into()),
            ..Default::default()
        }])
    );
    assert_eq!(
        l7.rule_names(),
        ["CiliumNetworkPolicy default/rule1 ingress[0]"]
    );
    let land = SimpleRequest {
        method: "POST".into(),
        path: "/v1/request-landing".into(),
        ..Default::default()
    };
    let t = trace_http(&rp, Ingress, 201, TCP, 80, Some(&land));
    assert_eq!((t.redirected, t.allowed), (true, Some(true)));
    assert_eq!(
        t.matched.expect("matched").to_string(),
        "CiliumNetworkPolicy default/rule1 ingress[0] toPorts[0].rules.http[0]"
    );
    let exhaust = SimpleRequest {
        method: "PUT".into(),
        path: "/v1/exhaust-port".into(),
        ..Default::default()
    };
    let t = trace_http(&rp, Ingress, 201, TCP, 80, Some(&exhaust));
    assert_eq!((t.redirected, t.allowed), (true, Some(false)));
    assert!(t.reason.contains("403 Access denied"), "{}", t.reason);
    let t = trace_http(&rp, Ingress, 201, TCP, 80, None);
    assert!(t.reason.contains("decide per request"), "{}", t.reason);
}

#[test]
fn a_bad_regex_names_the_http_rule_field() {
    let got = parse_err(
        "- toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET}, {path: '/v1/('}]}}]",
    );
    assert!(
        got.contains("spec.ingress[0].toPorts[0].rules.http[1].path: invalid regular expression"),
        "{got}"
    );
}

#[test]
fn a_bad_header_name_names_the_header() {
    let got = parse_err(
        "- toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{headers: ['Bad Name: x']}]}}]",
    );
    assert!(got.contains("rules.http[0].headers[0]: "), "{got}");
    let got = parse_err(
        "- toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{headerMatches: [{name: 'a b'}]}]}}]",
    );
    assert!(
        got.contains("rules.http[0].headerMatches[0].name: "),
        "{got}"
    );
}

#[test]
fn l7_rules_need_explicit_single_tcp_ports() {
    let cases = [
        (
            "- toPorts: [{rules: {http: [{method: GET}]}}]",
            "toPorts[0].ports: L7 rules need explicit ports",
        ),
        (
            "- toPorts: [{ports: [{port: '53', protocol: UDP}], rules: {http: [{}]}}]",
            "toPorts[0].ports[0].protocol: \"UDP\" cannot carry L7",
        ),
        (
            "- toPorts: [{ports: [{port: '80', protocol: SCTP}], rules: {http: [{}]}}]",
            "toPorts[0].ports[0].protocol: \"SCTP\" cannot carry L7",
        ),
        (
            "- toPorts: [{ports: [{port: '80', protocol: ANY}], rules: {http: [{}]}}]",
            "toPorts[0].ports[0].protocol: \"ANY\" cannot carry L7",
        ),
        (
            "- toPorts: [{ports: [{port: '80'}], rules: {http: [{}]}}]",
            "toPorts[0].ports[0].protocol: missing: L7 (HTTP) rules need protocol TCP",
        ),
        (
            "- toPorts: [{ports: [{port: '0', protocol: TCP}], rules: {http: [{}]}}]",
            "toPorts[0].ports[0].port: L7 (HTTP) rules need a specific port",
        ),
        (
            "- toPorts: [{ports: [{port: '80', endPort: 90, protocol: TCP}], rules: {http: [{}]}}]",
            "toPorts[0].ports[0].endPort: L7 (HTTP) rules apply to single ports",
        ),
    ];
    for (rules, want) in cases {
        let got = parse_err(rules);
        assert!(
            got.contains(&format!("spec.ingress[0].{want}")),
            "{rules}\n{got}"
        );
    }
}

#[test]
fn deny_sections_refuse_l7_rules() {
    let yaml = cnp(
        "default",
        "endpointSelector: {}\ningressDeny:\n- toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{}]}}]",
    );
    let got = parse_policies("l7.yaml", &yaml)
        .expect_err("deny")
        .to_string();
    assert!(
        got.contains(
            "spec.ingressDeny[0].toPorts[0].rules: L7 rules are not allowed in a deny section"
        ),
        "{got}"
    );
}

#[test]
fn an_empty_http_list_restricts_nothing_and_is_not_proxied() {
    let w = World::new(&ingress(
        "- toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: []}}]",
    ));
    let rp = w.resolve(DB);
    assert_eq!(evaluate(&rp, Ingress, WEB, TCP, 80).verdict, Verdict::Allow);
    assert_eq!(l7_of(&rp, WEB, 80), None);
    assert!(rp.l7.is_empty());
}

#[test]
fn egress_l7_rules_are_proxied_too() {
    let w = World::new(&cnp(
        "default",
        &format!("endpointSelector: {{matchLabels: {{app: web}}}}\negress:\n- toEndpoints: [{{matchLabels: {{app: db}}}}]\n  {}", get("GET")),
    ));
    let rp = w.resolve(WEB);
    let ev = evaluate(&rp, Egress, DB, TCP, 80);
    assert!(ev.proxy);
    assert!(!evaluate(&rp, Egress, DB, TCP, 81).proxy);
}

// ---------------------------------------------------------------- union semantics

/// (peer, port, expected L7 methods or None when not redirected)
type L7Row = (u32, u16, Option<&'static [&'static str]>);

#[track_caller]
fn check_l7(yaml: &str, rows: &[L7Row]) {
    let w = World::new(yaml);
    let rp = w.resolve(DB);
    for (peer, port, want) in rows {
        let got = l7_of(&rp, *peer, *port);
        let want = want.map(|m| m.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            got, want,
            "peer {peer} port {port}\n{:#?}\n{:#?}",
            rp.entries, rp.l7
        );
    }
    // The incremental repository and merged policy agree with the full resolution.
    let policies: BTreeMap<String, std::sync::Arc<cilia_policy::Policy>> = w
        .policies
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("k{i}"), std::sync::Arc::new(p.clone())))
        .collect();
    let mut repo = PolicyRepository::new();
    repo.set_identities(w.cache.clone());
    repo.set_policies(policies.iter().map(|(k, p)| (k.as_str(), p)));
    let (got, basis) = repo.resolve(&subject(DB));
    assert_eq!(got, rp);
    let mut merged = MergedPolicy::new();
    repo.update_merged(&mut merged, &basis);
    assert_eq!(merged.resolved(), rp);
}

#[test]
fn http_rules_of_every_allow_rule_on_a_port_are_united() {
    let yaml = ingress(&format!(
        "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}\n- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}",
        get("GET"),
        get("POST")
    ));
    check_l7(
        &yaml,
        &[(WEB, 80, Some(&["GET", "POST"])), (FRONTEND, 80, None)],
    );
}

#[test]
fn an_l4_only_rule_on_the_same_port_makes_it_allow_all_but_still_proxied() {
    let yaml = ingress(&format!(
        "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}\n- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  toPorts: [{{ports: [{{port: '80', protocol: TCP}}]}}]",
        get("GET")
    ));
    check_l7(&yaml, &[(WEB, 80, Some(&["*"]))]);
}

#[test]
fn a_broader_port_range_of_the_same_peer_folds_into_the_proxied_port() {
    let yaml = ingress(&format!(
        "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}\n- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  toPorts: [{{ports: [{{port: '1', endPort: 1000, protocol: TCP}}]}}]",
        get("GET")
    ));
    check_l7(
        &yaml,
        &[(WEB, 80, Some(&["*"])), (WEB, 81, None), (WEB, 79, None)],
    );
}

#[test]
fn an_l3_only_rule_of_the_same_peer_makes_the_port_allow_all() {
    let yaml = ingress(&format!(
        "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}\n- fromEndpoints: [{{matchLabels: {{app: web}}}}]",
        get("GET")
    ));
    check_l7(&yaml, &[(WEB, 80, Some(&["*"])), (WEB, 443, None)]);
}

#[test]
fn an_identity_0_l7_rule_folds_into_a_peer_allowed_on_all_ports() {
    // web is allowed everything (its own entry) and everyone gets port 80 via
    // HTTP rules: web's packets to 80 must still be proxied, as allow-all.
    let yaml = ingress(&format!(
        "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n- {}",
        get("GET")
    ));
    check_l7(
        &yaml,
        &[
            (WEB, 80, Some(&["*"])),
            (WEB, 443, None),
            (FRONTEND, 80, Some(&["GET"])),
        ],
    );
}

#[test]
fn an_identity_0_l7_rule_unites_with_a_peers_own_l7_rule() {
    let yaml = ingress(&format!(
        "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}\n- {}",
        get("POST"),
        get("GET")
    ));
    check_l7(
        &yaml,
        &[
            (WEB, 80, Some(&["POST", "GET"])),
            (FRONTEND, 80, Some(&["GET"])),
        ],
    );
}

#[test]
fn an_identity_0_l4_rule_makes_a_peers_l7_port_allow_all() {
    let yaml = ingress(&format!(
        "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}\n- toPorts: [{{ports: [{{port: '80', protocol: TCP}}]}}]",
        get("POST")
    ));
    check_l7(&yaml, &[(WEB, 80, Some(&["*"])), (FRONTEND, 80, None)]);
}

#[test]
fn deny_wins_over_a_proxied_allow() {
    let yaml = ingress(&format!(
        "- {}\ningressDeny:\n- fromEndpoints: [{{matchLabels: {{app: web}}}}]",
        get("GET")
    ));
    let w = World::new(&yaml);
    let rp = w.resolve(DB);
    let ev = evaluate(&rp, Ingress, WEB, TCP, 80);
    assert_eq!((ev.verdict, ev.proxy), (Verdict::Deny, false));
    let t = trace_http(&rp, Ingress, WEB, TCP, 80, None);
    assert!(!t.redirected);
    check_l7(&yaml, &[(WEB, 80, None), (FRONTEND, 80, Some(&["GET"]))]);
}

#[test]
fn a_deny_from_everyone_on_the_port_drops_proxied_peers() {
    let yaml = ingress(&format!(
        "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}\ningressDeny:\n- toPorts: [{{ports: [{{port: '80', protocol: TCP}}]}}]",
        get("GET")
    ));
    let w = World::new(&yaml);
    let ev = evaluate(&w.resolve(DB), Ingress, WEB, TCP, 80);
    assert_eq!((ev.verdict, ev.proxy), (Verdict::Deny, false));
}

#[test]
fn the_merged_policy_flags_a_proxy_change_as_an_upsert_and_l7_change() {
    let l4 = std::sync::Arc::new(
        parse_policies("a", &ingress("- fromEndpoints: [{matchLabels: {app: web}}]\n  toPorts: [{ports: [{port: '80', protocol: TCP}]}]"))
            .expect("parse")
            .remove(0),
    );
    let l7 = std::sync::Arc::new(
        parse_policies(
            "b",
            &ingress(&format!(
                "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}",
                get("GET")
            )),
        )
        .expect("parse")
        .remove(0),
    );
    let w = World::new(&ingress("- {}"));
    let mut repo = PolicyRepository::new();
    repo.set_identities(w.cache.clone());
    let mut merged = MergedPolicy::new();
    repo.set_policies([("a", &l4)]);
    let basis = repo.basis(&subject(DB));
    let first = repo.update_merged(&mut merged, &basis);
    assert!(!first.l7_changed);
    assert!(first.upserted.iter().all(|e| !e.entry.proxy));
    repo.set_policies([("a", &l4), ("b", &l7)]);
    let basis = repo.basis(&subject(DB));
    let second = repo.update_merged(&mut merged, &basis);
    assert!(second.l7_changed);
    assert!(second.removed.is_empty());
    assert_eq!(second.upserted.len(), 1, "{second:#?}");
    assert!(second.upserted[0].entry.proxy);
    let entries: Vec<_> = merged.l7_entries().collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.policy, L7Policy::AllowAll);
}

// ---------------------------------------------------------------- trace_http

#[test]
fn trace_of_an_allow_all_entry_passes_every_request_and_names_both_rules() {
    let yaml = ingress(&format!(
        "- fromEndpoints: [{{matchLabels: {{app: web}}}}]\n  {}\n- fromEndpoints: [{{matchLabels: {{app: web}}}}]",
        get("GET")
    ));
    let rp = World::new(&yaml).resolve(DB);
    let put = SimpleRequest {
        method: "PUT".into(),
        path: "/anything".into(),
        ..Default::default()
    };
    let t = trace_http(&rp, Ingress, WEB, TCP, 80, Some(&put));
    assert_eq!(
        (t.redirected, t.allowed, t.matched),
        (true, Some(true), None)
    );
    let l7 = t.l7.expect("redirected");
    assert_eq!(
        l7.rule_names(),
        [
            "CiliumNetworkPolicy default/p ingress[0]",
            "CiliumNetworkPolicy default/p ingress[1]"
        ]
    );
}

#[test]
fn trace_matches_headers_and_host_and_names_the_http_index() {
    let yaml = ingress(
        "- toPorts:\n  - ports: [{port: '8080', protocol: TCP}]\n    rules:\n      http:\n      - {method: GET}\n      - {host: 'api\\.example\\.com', headers: ['X-Env: prod'], headerMatches: [{name: X-Team}]}",
    );
    let rp = World::new(&yaml).resolve(DB);
    let mut req = SimpleRequest {
        method: "POST".into(),
        path: "/".into(),
        host: Some("api.example.com".into()),
        headers: vec![
            ("x-env".into(), "prod".into()),
            ("X-Team".into(), "a".into()),
        ],
    };
    let t = trace_http(&rp, Ingress, WEB, TCP, 8080, Some(&req));
    assert_eq!(t.allowed, Some(true));
    assert_eq!(
        t.matched.expect("matched").to_string(),
        "CiliumNetworkPolicy default/p ingress[0] toPorts[0].rules.http[1]"
    );
    req.headers.pop();
    let t = trace_http(&rp, Ingress, WEB, TCP, 8080, Some(&req));
    assert_eq!(t.allowed, Some(false));
}

#[test]
fn trace_of_a_flow_without_http_rules_is_not_redirected() {
    let rp = World::new(&ingress(
        "- toPorts: [{ports: [{port: '80', protocol: TCP}]}]",
    ))
    .resolve(DB);
    let t = trace_http(&rp, Ingress, WEB, TCP, 80, None);
    assert!(!t.redirected);
    assert!(t.reason.contains("no HTTP rule covers it"), "{}", t.reason);
}
