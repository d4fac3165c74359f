//! Kubernetes NetworkPolicy semantics.

mod common;
use common::*;

verdict_tests! {
    pod_selector_peer_selects_pods_in_policy_namespace_only:
        np("default", "podSelector: {matchLabels: {app: db}}\ningress:\n- from:\n  - podSelector: {matchLabels: {app: web}}"),
        DB => [(Ingress, WEB, TCP, 5432, Allow), (Ingress, OTHER_WEB, TCP, 5432, Deny)];

    namespace_selector_alone_selects_all_pods_in_matching_namespaces:
        np("default", "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: b}}"),
        DB => [
            (Ingress, OTHER_WEB, TCP, 80, Allow),
            (Ingress, OTHER_CLIENT, TCP, 80, Allow),
            (Ingress, WEB, TCP, 80, Deny), // own namespace has team=a
            (Ingress, DNS, TCP, 80, Deny),
        ];

    empty_namespace_selector_selects_all_pods_but_nothing_outside_the_cluster:
        np("default", "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {}"),
        DB, |w| => [(Ingress, DNS, TCP, 80, Allow), (Ingress, OTHER_WEB, TCP, 80, Allow),
                    (Ingress, 1, TCP, 80, Deny), (Ingress, 2, TCP, 80, Deny),
                    (Ingress, w.cidr("172.16.0.0/12"), TCP, 80, Deny)];

    pod_and_namespace_selector_in_one_peer_is_an_intersection:
        np("default", "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: b}}\n    podSelector: {matchLabels: {app: client}}"),
        DB => [(Ingress, OTHER_CLIENT, TCP, 80, Allow), (Ingress, OTHER_WEB, TCP, 80, Deny),
               (Ingress, WEB, TCP, 80, Deny)];

    pod_and_namespace_selector_in_two_peers_is_a_union:
        np("default", "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: b}}\n  - podSelector: {matchLabels: {app: web}}"),
        DB => [(Ingress, OTHER_CLIENT, TCP, 80, Allow), (Ingress, OTHER_WEB, TCP, 80, Allow),
               (Ingress, WEB, TCP, 80, Allow), (Ingress, FRONTEND, TCP, 80, Deny)];

    namespace_selector_match_expressions_use_namespace_labels:
        np("default", "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions: [{key: team, operator: DoesNotExist}]"),
        DB => [(Ingress, DNS, TCP, 80, Allow), (Ingress, OTHER_WEB, TCP, 80, Deny),
               (Ingress, 1, TCP, 80, Deny)];

    ip_block_with_except:
        np("default", "podSelector: {}\negress:\n- to:\n  - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}"),
        WEB, |w| => [
            (Egress, w.cidr("10.0.0.0/8"), TCP, 443, Allow),
            (Egress, w.cidr("10.9.9.9/32"), TCP, 443, Allow), // a more specific prefix inside
            (Egress, w.cidr("10.1.0.0/16"), TCP, 443, Deny),  // the except range
            (Egress, w.cidr("172.16.0.0/12"), TCP, 443, Deny),
            (Egress, 2, TCP, 443, Deny),
            (Egress, DB, TCP, 443, Deny), // ipBlock does not select endpoints
        ];

    ip_block_zero_prefix_also_selects_world:
        np("default", "podSelector: {}\negress:\n- to:\n  - ipBlock: {cidr: 0.0.0.0/0}"),
        WEB => [(Egress, 2, TCP, 1, Allow), (Egress, DB, TCP, 1, Deny)];

    empty_ingress_list_also_denies_all_ingress:
        np("default", "podSelector: {}\ningress: []"),
        WEB => [(Ingress, DB, TCP, 80, Deny)];

    explicit_policy_types_egress_without_rules_denies_all_egress:
        np("default", "podSelector: {}\npolicyTypes: [Ingress, Egress]\ningress: [{}]"),
        WEB => [(Ingress, OTHER_WEB, TCP, 80, Allow), (Egress, DB, TCP, 80, Deny),
                (Egress, 2, UDP, 53, Deny)];

    port_protocol_defaults_to_tcp:
        np("default", "podSelector: {}\ningress:\n- ports: [{port: 80}]"),
        WEB => [(Ingress, DB, TCP, 80, Allow), (Ingress, DB, UDP, 80, Deny),
                (Ingress, DB, TCP, 81, Deny), (Ingress, 2, TCP, 80, Allow)];

    port_without_number_covers_all_ports_of_the_protocol:
        np("default", "podSelector: {}\ningress:\n- ports: [{protocol: UDP}]"),
        WEB => [(Ingress, DB, UDP, 1, Allow), (Ingress, DB, UDP, 65535, Allow),
                (Ingress, DB, TCP, 80, Deny)];

    end_port_range:
        np("default", "podSelector: {}\ningress:\n- ports: [{protocol: SCTP, port: 32000, endPort: 32768}]"),
        WEB => [(Ingress, DB, SCTP, 31999, Deny), (Ingress, DB, SCTP, 32000, Allow),
                (Ingress, DB, SCTP, 32767, Allow), (Ingress, DB, SCTP, 32768, Allow),
                (Ingress, DB, SCTP, 32769, Deny), (Ingress, DB, TCP, 32000, Deny)];
}

#[test]
fn policy_namespace_defaults_to_default() {
    let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n";
    let w = World::new(yaml);
    assert_eq!(w.policies[0].namespace.as_deref(), Some("default"));
    assert!(w.resolve(WEB).ingress_enforced);
    assert!(!w.resolve(OTHER_WEB).ingress_enforced);
}

#[test]
fn absent_ingress_denies_all_ingress_and_leaves_egress_alone() {
    let w = World::new(&np("default", "podSelector: {}"));
    let rp = w.resolve(WEB);
    assert!(rp.ingress_enforced);
    assert!(!rp.egress_enforced);
    assert!(rp.entries.is_empty());
    check_world(
        &w,
        WEB,
        &[(Ingress, DB, TCP, 80, Deny), (Egress, DB, TCP, 80, Allow)],
    );
}

#[test]
fn empty_rule_allows_everything_including_outside_the_cluster() {
    let yaml = np("default", "podSelector: {}\ningress:\n- {}");
    let w = World::new(&yaml);
    check_world(
        &w,
        WEB,
        &[
            (Ingress, DB, TCP, 80, Allow),
            (Ingress, OTHER_WEB, UDP, 53, Allow),
            (Ingress, 2, ICMP, 0, Allow),
            (Ingress, 1, TCP, 80, Allow),
            (Ingress, w.cidr("172.16.0.0/12"), TCP, 80, Allow),
            (Ingress, UNKNOWN, TCP, 80, Allow),
        ],
    );
    // Implemented as a single "any identity, any protocol" entry.
    let rp = w.resolve(WEB);
    assert_eq!(rp.entries.len(), 1);
    assert_eq!((rp.entries[0].identity, rp.entries[0].proto), (0, 0));
}

#[test]
fn policy_types_default() {
    let cases: &[(&str, bool, bool)] = &[
        ("podSelector: {}", true, false),
        ("podSelector: {}\ningress: [{}]", true, false),
        ("podSelector: {}\negress: [{}]", true, true),
        // An empty egress list is not "egress rules present".
        ("podSelector: {}\negress: []", true, false),
    ];
    for (spec, ing, eg) in cases {
        let rp = World::new(&np("default", spec)).resolve(WEB);
        assert_eq!(
            (rp.ingress_enforced, rp.egress_enforced),
            (*ing, *eg),
            "{spec}"
        );
    }
}

#[test]
fn explicit_policy_types_egress_only_ignores_ingress_rules() {
    let yaml = np(
        "default",
        "podSelector: {}\npolicyTypes: [Egress]\ningress:\n- from: [{podSelector: {}}]\negress:\n- to: [{podSelector: {matchLabels: {app: db}}}]",
    );
    let w = World::new(&yaml);
    let rp = w.resolve(WEB);
    assert!(!rp.ingress_enforced && rp.egress_enforced);
    assert!(rp.entries.iter().all(|e| e.direction == Egress));
    check_world(
        &w,
        WEB,
        &[
            (Ingress, OTHER_WEB, TCP, 80, Allow),
            (Egress, DB, TCP, 80, Allow),
            (Egress, OTHER_WEB, TCP, 80, Deny),
        ],
    );
}
