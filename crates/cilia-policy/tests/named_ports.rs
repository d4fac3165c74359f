//! Named ports: a policy port given by name resolves per endpoint, against
//! the subject's port names at ingress and each peer identity's at egress.

use cilia_policy::{
    evaluate, parse_policies, resolve, resolve_with_ports, Direction, IdentityCache, Labels,
    NamedPorts, Policy, PolicyRepository, Verdict, NAMESPACE_LABEL,
};

use Direction::{Egress, Ingress};
use Verdict::{Allow, Deny};

const TCP: u8 = 6;
const UDP: u8 = 17;
/// Peers: web declares http=TCP/8080; api declares http=TCP/80 and
/// (another endpoint of the same identity) http=TCP/81; db declares nothing.
const WEB: u32 = 100;
const API: u32 = 101;
const DB: u32 = 102;

fn labels(app: &str) -> Labels {
    Labels::from_pairs([(NAMESPACE_LABEL, "default"), ("app", app)])
}

fn ports(decls: &[(&str, u8, u16)]) -> NamedPorts {
    let mut p = NamedPorts::new();
    for (name, proto, port) in decls {
        p.insert(*name, *proto, *port);
    }
    p
}

fn cache() -> IdentityCache {
    let mut c = IdentityCache::new();
    c.insert_labels(WEB, labels("web"));
    c.insert_labels(API, labels("api"));
    c.insert_labels(DB, labels("db"));
    c.set_named_ports(WEB, ports(&[("http", TCP, 8080)]));
    c.set_named_ports(API, ports(&[("http", TCP, 80), ("http", TCP, 81)]));
    c
}

fn cnp(spec: &str) -> Vec<Policy> {
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p, namespace: default}}\nspec:\n{spec}"
    );
    parse_policies("t.yaml", &yaml).expect("parse")
}

fn np(spec: &str) -> Vec<Policy> {
    let yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n, namespace: default}}\nspec:\n{spec}"
    );
    parse_policies("t.yaml", &yaml).expect("parse")
}

/// Checks (direction, peer, proto, port) → verdict for a subject.
fn check(
    policies: &[Policy],
    subject: &str,
    subject_ports: &NamedPorts,
    cases: &[(Direction, u32, u8, u16, Verdict)],
) {
    let resolved = resolve_with_ports(policies, &labels(subject), subject_ports, &cache());
    for &(dir, peer, proto, port, want) in cases {
        let got = evaluate(&resolved, dir, peer, proto, port).verdict;
        assert_eq!(
            got, want,
            "{subject} {dir:?} peer {peer} proto {proto} port {port}: {:#?}",
            resolved.entries
        );
    }
}

#[test]
fn ingress_named_port_opens_the_number_the_subject_declares() {
    let p = cnp("  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: http, protocol: TCP}]}]\n");
    check(
        &p,
        "db",
        &ports(&[("http", TCP, 9090)]),
        &[
            (Ingress, WEB, TCP, 9090, Allow),
            (Ingress, WEB, TCP, 8080, Deny),
            (Ingress, WEB, TCP, 80, Deny),
            (Ingress, API, TCP, 9090, Deny),
        ],
    );
}

#[test]
fn ingress_named_port_opens_nothing_on_a_subject_without_the_name() {
    let p = cnp("  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: http}]}]\n");
    let resolved = resolve_with_ports(&p, &labels("db"), &ports(&[("dns", UDP, 53)]), &cache());
    assert!(resolved.ingress_enforced);
    assert!(resolved.entries.is_empty(), "{:#?}", resolved.entries);
    // Without port names at all: the same.
    assert_eq!(
        resolve(&p, &labels("db"), &cache()).entries,
        resolved.entries
    );
}

#[test]
fn named_port_with_a_protocol_matches_only_a_declaration_of_that_protocol() {
    let p = np(
        "  podSelector: {}\n  ingress:\n  - ports: [{port: dns, protocol: UDP}, {port: http}]\n",
    );
    check(
        &p,
        "db",
        // NetworkPolicy's protocol defaults to TCP: http=UDP/80 is not it.
        &ports(&[("dns", UDP, 53), ("http", UDP, 80)]),
        &[
            (Ingress, WEB, UDP, 53, Allow),
            (Ingress, WEB, TCP, 53, Deny),
            (Ingress, WEB, UDP, 80, Deny),
            (Ingress, WEB, TCP, 80, Deny),
        ],
    );
}

#[test]
fn cilium_named_port_without_protocol_matches_any_declared_protocol() {
    let p = cnp("  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: dns}]}]\n");
    check(
        &p,
        "db",
        &ports(&[("dns", UDP, 53)]),
        &[
            (Ingress, WEB, UDP, 53, Allow),
            (Ingress, WEB, TCP, 53, Deny),
        ],
    );
}

#[test]
fn egress_named_port_resolves_against_each_peer_identity() {
    let p = cnp("  endpointSelector: {matchLabels: {app: db}}\n  egress:\n  - toEndpoints: [{}]\n    toPorts: [{ports: [{port: http, protocol: TCP}]}]\n");
    check(
        &p,
        "db",
        &NamedPorts::new(),
        &[
            (Egress, WEB, TCP, 8080, Allow),
            (Egress, WEB, TCP, 80, Deny),
            // Two endpoints of one identity, two numbers: both.
            (Egress, API, TCP, 80, Allow),
            (Egress, API, TCP, 81, Allow),
            (Egress, API, TCP, 8080, Deny),
            // No name, no entry.
            (Egress, DB, TCP, 80, Deny),
            (Egress, DB, TCP, 8080, Deny),
        ],
    );
}

#[test]
fn egress_named_port_to_every_peer_reaches_only_identities_declaring_it() {
    let p = np("  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: http}]\n");
    check(
        &p,
        "db",
        &NamedPorts::new(),
        &[
            (Egress, WEB, TCP, 8080, Allow),
            (Egress, API, TCP, 81, Allow),
            (Egress, API, TCP, 8080, Deny),
            // world has no port names
            (Egress, 2, TCP, 8080, Deny),
            (Egress, 2, TCP, 80, Deny),
        ],
    );
}

#[test]
fn deny_with_a_named_port_denies_the_resolved_number_only() {
    let p = cnp("  endpointSelector: {}\n  egress:\n  - toEndpoints: [{}]\n  egressDeny:\n  - toEndpoints: [{}]\n    toPorts: [{ports: [{port: http}]}]\n");
    check(
        &p,
        "db",
        &NamedPorts::new(),
        &[
            (Egress, WEB, TCP, 8080, Deny),
            (Egress, WEB, TCP, 80, Allow),
            (Egress, API, TCP, 80, Deny),
            (Egress, API, TCP, 8080, Allow),
            (Egress, DB, TCP, 8080, Allow),
        ],
    );
}

#[test]
fn http_rules_on_a_named_port_proxy_the_resolved_number() {
    let p = cnp("  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: http, protocol: TCP}], rules: {http: [{method: GET}]}}]\n");
    let resolved = resolve_with_ports(&p, &labels("db"), &ports(&[("http", TCP, 8080)]), &cache());
    let ev = evaluate(&resolved, Ingress, WEB, TCP, 8080);
    assert_eq!(ev.verdict, Allow);
    assert!(ev.proxy, "{:#?}", resolved.entries);
    assert_eq!(resolved.l7.len(), 1);
    assert_eq!(evaluate(&resolved, Ingress, WEB, TCP, 80).verdict, Deny);
}

#[test]
fn a_peer_declaring_a_name_later_changes_the_egress_subjects_resolution() {
    let p = cnp("  endpointSelector: {matchLabels: {app: db}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: http}]}]\n");
    let policy = std::sync::Arc::new(p.into_iter().next().expect("one policy"));
    let mut repo = PolicyRepository::new();
    let mut c = cache();
    c.set_named_ports(WEB, NamedPorts::new());
    repo.set_identities(c);
    repo.set_policies([("p", &policy)]);
    let (before, basis) = repo.resolve(&labels("db"));
    assert_eq!(evaluate(&before, Egress, WEB, TCP, 8080).verdict, Deny);
    repo.change_named_ports([(WEB, ports(&[("http", TCP, 8080)]))]);
    let (after, new_basis) = repo.resolve(&labels("db"));
    assert_ne!(
        basis, new_basis,
        "the basis must change so the agent regenerates"
    );
    assert_eq!(evaluate(&after, Egress, WEB, TCP, 8080).verdict, Allow);
}

#[test]
fn the_subjects_port_names_are_part_of_its_basis() {
    let p = cnp("  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: http}]}]\n");
    let policy = std::sync::Arc::new(p.into_iter().next().expect("one policy"));
    let mut repo = PolicyRepository::new();
    repo.set_identities(cache());
    repo.set_policies([("p", &policy)]);
    let a = repo.basis_with_ports(&labels("db"), &ports(&[("http", TCP, 80)]));
    let b = repo.basis_with_ports(&labels("db"), &ports(&[("http", TCP, 8080)]));
    let c = repo.basis_with_ports(&labels("db"), &ports(&[("http", TCP, 80), ("x", UDP, 1)]));
    assert_ne!(a, b);
    // A name no rule uses shares the contribution.
    assert_eq!(a, c);
}
