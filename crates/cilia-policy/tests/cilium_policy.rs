//! CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy semantics: entities, CIDRs,
//! ports, deny precedence, empty-rule forms and default-deny enablement.

mod common;
use cilia_policy::{port_range_prefixes, trace, MapEntry, Verdict};
use common::*;

// ---------------------------------------------------------------- entities

verdict_tests! {
    entity_world_is_reserved_world_plus_cidr_identities:
        cnp("default", "endpointSelector: {}\negress:\n- toEntities: [world]"),
        WEB, |w| => [(Egress, 2, TCP, 443, Allow),
                     (Egress, w.cidr("172.16.0.0/12"), UDP, 53, Allow),
                     (Egress, DB, TCP, 443, Deny), (Egress, 1, TCP, 443, Deny),
                     (Egress, 6, TCP, 443, Deny)];

    entity_cluster_is_everything_but_world:
        cnp("default", "endpointSelector: {}\negress:\n- toEntities: [cluster]"),
        WEB, |w| => [(Egress, DB, TCP, 443, Allow), (Egress, DNS, UDP, 53, Allow),
                     (Egress, 1, TCP, 443, Allow), (Egress, 6, TCP, 443, Allow),
                     (Egress, 4, TCP, 443, Allow), (Egress, 5, TCP, 443, Allow),
                     (Egress, 3, TCP, 443, Allow), (Egress, 2, TCP, 443, Deny),
                     (Egress, w.cidr("172.16.0.0/12"), TCP, 443, Deny)];
}

#[test]
fn entity_all_is_the_any_identity_entry() {
    let yaml = cnp(
        "default",
        "endpointSelector: {}\negress:\n- toEntities: [all]",
    );
    let w = World::new(&yaml);
    let rp = w.resolve(WEB);
    assert_eq!(rp.entries.len(), 1);
    assert_eq!(rp.entries[0].identity, 0);
    check_world(
        &w,
        WEB,
        &[
            (Egress, 2, TCP, 1, Allow),
            (Egress, UNKNOWN, ICMP, 0, Allow),
            (Egress, DB, UDP, 9, Allow),
        ],
    );
}

#[test]
fn single_reserved_entities() {
    let cases: &[(&str, u32)] = &[
        ("host", 1),
        ("remote-node", 6),
        ("health", 4),
        ("init", 5),
        ("unmanaged", 3),
    ];
    for (entity, id) in cases {
        let yaml = cnp(
            "default",
            &format!("endpointSelector: {{}}\ningress:\n- fromEntities: [{entity}]"),
        );
        let rp = World::new(&yaml).resolve(WEB);
        let ids: Vec<u32> = rp.entries.iter().map(|e| e.identity).collect();
        assert_eq!(ids, vec![*id], "{entity}");
    }
}

// ---------------------------------------------------------------- CIDRs

verdict_tests! {
    to_cidr_selects_cidr_identities_inside_and_not_endpoints:
        cnp("default", "endpointSelector: {}\negress:\n- toCIDR: [10.0.0.0/8, 2001:db8::/32]"),
        WEB, |w| => [(Egress, w.cidr("10.0.0.0/8"), TCP, 1, Allow),
                     (Egress, w.cidr("10.9.9.9/32"), TCP, 1, Allow),
                     (Egress, w.cidr("2001:db8::/32"), TCP, 1, Allow),
                     (Egress, w.cidr("172.16.0.0/12"), TCP, 1, Deny), (Egress, 2, TCP, 1, Deny),
                     (Egress, DB, TCP, 1, Deny)];

    to_cidr_accepts_a_bare_address_as_host_prefix:
        cnp("default", "endpointSelector: {}\negress:\n- toCIDR: [10.9.9.9]"),
        WEB, |w| => [(Egress, w.cidr("10.9.9.9/32"), TCP, 1, Allow)];

    cidr_set_except_is_not_allowed:
        cnp("default", "endpointSelector: {}\negress:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]"),
        WEB, |w| => [(Egress, w.cidr("10.0.0.0/8"), TCP, 1, Allow),
                     (Egress, w.cidr("10.1.0.0/16"), TCP, 1, Deny),
                     (Egress, w.cidr("10.9.9.9/32"), TCP, 1, Allow)];
}

#[test]
fn cidr_prefixes_lists_cidrs_and_excepts() {
    let yaml = format!(
        "{}---\n{}",
        cnp("default", "endpointSelector: {}\negress:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]\n- toCIDR: [192.168.1.7/24]"),
        np("default", "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 'fd00::/8', except: ['fd00:1::/32']}}]")
    );
    let policies = cilia_policy::parse_policies("t", &yaml).expect("parse");
    let got: Vec<String> = cilia_policy::cidr_prefixes(&policies)
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(
        got,
        [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.168.1.0/24",
            "fd00::/8",
            "fd00:1::/32"
        ]
    );
}

// ---------------------------------------------------------------- ports

#[test]
fn port_range_to_prefixes() {
    type Case = (u16, u16, &'static [(u16, u8)]);
    let cases: &[Case] = &[
        (80, 80, &[(80, 16)]),
        (0, 65535, &[(0, 0)]),
        (
            1,
            65535,
            &[
                (1, 16),
                (2, 15),
                (4, 14),
                (8, 13),
                (16, 12),
                (32, 11),
                (64, 10),
                (128, 9),
                (256, 8),
                (512, 7),
                (1024, 6),
                (2048, 5),
                (4096, 4),
                (8192, 3),
                (16384, 2),
                (32768, 1),
            ],
        ),
        (
            8000,
            8999,
            &[
                (8000, 10),
                (8064, 9),
                (8192, 7),
                (8704, 8),
                (8960, 11),
                (8992, 13),
            ],
        ),
        (1024, 2047, &[(1024, 6)]),
        (65535, 65535, &[(65535, 16)]),
    ];
    for (first, last, want) in cases {
        assert_eq!(port_range_prefixes(*first, *last), *want, "{first}-{last}");
    }
}

#[test]
fn end_port_8000_8999_matches_exactly_the_range() {
    let yaml = cnp(
        "default",
        "endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '8000', endPort: 8999, protocol: TCP}]}]",
    );
    let w = World::new(&yaml);
    assert_eq!(w.resolve(WEB).entries.len(), 6);
    for (port, want) in [
        (7999, Deny),
        (8000, Allow),
        (8500, Allow),
        (8999, Allow),
        (9000, Deny),
    ] {
        check_world(&w, WEB, &[(Ingress, DB, TCP, port, want)]);
    }
}

#[test]
fn protocol_any_with_port_expands_to_tcp_udp_sctp() {
    // protocol defaults to ANY in Cilium policies; port given as an integer here.
    let yaml = cnp(
        "default",
        "endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: 53}]}]",
    );
    let w = World::new(&yaml);
    let mut protos: Vec<u8> = w.resolve(WEB).entries.iter().map(|e| e.proto).collect();
    protos.sort();
    assert_eq!(protos, [TCP, UDP, SCTP]);
    check_world(
        &w,
        WEB,
        &[
            (Ingress, DB, TCP, 53, Allow),
            (Ingress, DB, UDP, 53, Allow),
            (Ingress, DB, SCTP, 53, Allow),
            (Ingress, DB, ICMP, 53, Deny),
            (Ingress, DB, UDP, 54, Deny),
        ],
    );
}

verdict_tests! {
    port_zero_means_all_ports:
        cnp("default", "endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '0', protocol: UDP}]}]"),
        WEB => [(Ingress, DB, UDP, 1, Allow), (Ingress, DB, UDP, 65535, Allow),
                (Ingress, DB, TCP, 1, Deny)];

    port_zero_with_protocol_any_means_all_ports_of_all_protocols:
        cnp("default", "endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '0', protocol: ANY}]}]"),
        WEB => [(Ingress, DB, ICMP, 0, Allow), (Ingress, DB, TCP, 7, Allow)];
}

#[test]
fn l4_only_rule_applies_to_every_peer() {
    let yaml = cnp(
        "default",
        "endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '80', protocol: TCP}]}]",
    );
    let w = World::new(&yaml);
    assert!(w.resolve(WEB).entries.iter().all(|e| e.identity == 0));
    check_world(
        &w,
        WEB,
        &[
            (Ingress, 2, TCP, 80, Allow),
            (Ingress, UNKNOWN, TCP, 80, Allow),
            (Ingress, DB, TCP, 81, Deny),
        ],
    );
}

verdict_tests! {
    l3_and_l4_in_one_rule_is_an_intersection:
        cnp("default", "endpointSelector: {}\ningress:\n- fromEndpoints: [{matchLabels: {app: db}}]\n  toPorts: [{ports: [{port: '80', protocol: TCP}]}]"),
        WEB => [(Ingress, DB, TCP, 80, Allow), (Ingress, DB, TCP, 81, Deny),
                (Ingress, FRONTEND, TCP, 80, Deny)];
}

#[test]
fn map_entries_are_canonical() {
    let yaml = cnp(
        "default",
        "endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '1', endPort: 65535}, {port: '0'}]}]\n  fromEntities: [world, host]\negress:\n- toPorts: [{ports: [{port: '100', endPort: 300, protocol: UDP}]}]",
    );
    let rp = World::new(&yaml).resolve(WEB);
    for e in &rp.entries {
        if e.proto == 0 {
            assert_eq!((e.port, e.port_prefix_len), (0, 0), "{e:?}");
        }
        assert!(e.port_prefix_len <= 16);
        let mask = if e.port_prefix_len == 0 {
            0
        } else {
            u16::MAX << (16 - e.port_prefix_len)
        };
        assert_eq!(e.port & !mask, 0, "{e:?}");
        assert!((e.rule as usize) < rp.rules.len());
    }
}

// ---------------------------------------------------------------- deny precedence

#[test]
fn deny_l3_wins_over_allow_l4() {
    let yaml = cnp(
        "default",
        "endpointSelector: {}\ningress:\n- fromEndpoints: [{matchLabels: {app: db}}]\n  toPorts: [{ports: [{port: '80', protocol: TCP}]}]\ningressDeny:\n- fromEndpoints: [{matchLabels: {app: db}}]",
    );
    let w = World::new(&yaml);
    let rp = w.resolve(WEB);
    // The allow for db/80 would be the longest match: it must not be in the map.
    assert!(
        rp.entries
            .iter()
            .all(|e: &MapEntry| e.verdict == Verdict::Deny),
        "{rp:#?}"
    );
    check_world(
        &w,
        WEB,
        &[(Ingress, DB, TCP, 80, Deny), (Ingress, DB, UDP, 9, Deny)],
    );
    let t = trace(&rp, Ingress, DB, TCP, 80);
    assert_eq!(t.verdict, Deny);
    assert_eq!(t.deciding_rules.len(), 1);
    assert!(t.deciding_rules[0].deny);
}

verdict_tests! {
    deny_port_wins_over_allow_all_ports:
        cnp("default", "endpointSelector: {}\ningress:\n- fromEndpoints: [{matchLabels: {app: db}}]\ningressDeny:\n- fromEndpoints: [{matchLabels: {app: db}}]\n  toPorts: [{ports: [{port: '22', protocol: TCP}]}]"),
        WEB => [(Ingress, DB, TCP, 22, Deny), (Ingress, DB, TCP, 23, Allow),
                (Ingress, DB, UDP, 22, Allow)];

    deny_range_wins_over_allow_inside_it:
        cnp("default", "endpointSelector: {}\negress:\n- toEntities: [world]\n  toPorts: [{ports: [{port: '8080', protocol: TCP}]}]\negressDeny:\n- toEntities: [world]\n  toPorts: [{ports: [{port: '8000', endPort: 8999, protocol: TCP}]}]"),
        WEB => [(Egress, 2, TCP, 8080, Deny), (Egress, 2, TCP, 9000, Deny),
                (Egress, 2, TCP, 7999, Deny)];

    // An L4-only deny (any peer) against an identity-specific allow of all ports.
    wildcard_deny_wins_over_specific_allow:
        cnp("default", "endpointSelector: {}\ningress:\n- fromEndpoints: [{matchLabels: {app: db}}]\ningressDeny:\n- toPorts: [{ports: [{port: '5432'}]}]"),
        WEB => [(Ingress, DB, TCP, 5432, Deny), (Ingress, DB, UDP, 5432, Deny),
                (Ingress, DB, TCP, 5433, Allow), (Ingress, FRONTEND, TCP, 5432, Deny)];

    specific_deny_wins_over_wildcard_allow:
        cnp("default", "endpointSelector: {}\ningress:\n- fromEntities: [all]\ningressDeny:\n- fromEntities: [world]"),
        WEB, |w| => [(Ingress, 2, TCP, 80, Deny), (Ingress, w.cidr("172.16.0.0/12"), TCP, 80, Deny),
                     (Ingress, DB, TCP, 80, Allow), (Ingress, UNKNOWN, TCP, 80, Allow)];

    deny_in_one_policy_wins_over_allow_in_another:
        format!(
            "{}---\n{}",
            np("default", "podSelector: {}\ningress: [{}]"),
            ccnp("endpointSelector: {}\ningressDeny:\n- fromEntities: [world]\n  toPorts: [{ports: [{port: '22', protocol: TCP}]}]"),
        ),
        WEB => [(Ingress, 2, TCP, 22, Deny), (Ingress, 2, TCP, 80, Allow),
                (Ingress, DB, TCP, 22, Allow)];

    deny_except_range_is_not_denied:
        cnp("default", "endpointSelector: {}\negress:\n- toEntities: [all]\negressDeny:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]"),
        WEB, |w| => [(Egress, w.cidr("10.0.0.0/8"), TCP, 1, Deny),
                     (Egress, w.cidr("10.1.0.0/16"), TCP, 1, Allow)];
}

// ---------------------------------------------------------------- empty forms & enforcement

#[test]
fn empty_rule_in_cilium_policy_enforces_but_allows_nothing() {
    let w = World::new(&cnp("default", "endpointSelector: {}\ningress: [{}]"));
    let rp = w.resolve(WEB);
    assert!(rp.ingress_enforced && !rp.egress_enforced);
    assert!(rp.entries.is_empty());
    check_world(
        &w,
        WEB,
        &[(Ingress, DB, TCP, 80, Deny), (Ingress, 2, TCP, 80, Deny)],
    );
}

#[test]
fn empty_rule_list_in_cilium_policy_does_not_enforce() {
    let rp = World::new(&cnp(
        "default",
        "endpointSelector: {}\ningress: []\negress: []",
    ))
    .resolve(WEB);
    assert!(!rp.ingress_enforced && !rp.egress_enforced);
}

verdict_tests! {
    explicitly_empty_peer_lists_select_nothing:
        cnp("default", "endpointSelector: {}\ningress:\n- fromEndpoints: []\n  fromEntities: []"),
        WEB => [(Ingress, DB, TCP, 80, Deny)];
}

#[test]
fn deny_only_policy_enables_default_deny() {
    // Cilium docs (enableDefaultDeny): "if a policy only has Ingress or IngressDeny rules,
    // then the default for ingress is true and egress is false".
    let yaml = cnp(
        "default",
        "endpointSelector: {}\ningressDeny:\n- fromEntities: [world]",
    );
    let w = World::new(&yaml);
    let rp = w.resolve(WEB);
    assert!(rp.ingress_enforced && !rp.egress_enforced);
    check_world(
        &w,
        WEB,
        &[
            (Ingress, 2, TCP, 80, Deny),
            (Ingress, DB, TCP, 80, Deny),
            (Egress, DB, TCP, 80, Allow),
        ],
    );
}

#[test]
fn enable_default_deny_false_keeps_default_allow() {
    let yaml = cnp(
        "default",
        "endpointSelector: {}\nenableDefaultDeny: {ingress: false}\ningress:\n- fromEndpoints: [{matchLabels: {app: db}}]\ningressDeny:\n- fromEntities: [world]",
    );
    let w = World::new(&yaml);
    let rp = w.resolve(WEB);
    assert!(!rp.ingress_enforced);
    check_world(
        &w,
        WEB,
        &[
            (Ingress, DB, TCP, 80, Allow),
            (Ingress, OTHER_WEB, TCP, 80, Allow),
            (Ingress, 2, TCP, 80, Deny),
        ],
    );
}

#[test]
fn enable_default_deny_false_does_not_undo_another_policy() {
    let yaml = format!(
        "{}---\n{}",
        cnp("default", "endpointSelector: {}\nenableDefaultDeny: {ingress: false, egress: false}\ningress:\n- fromEntities: [host]"),
        np("default", "podSelector: {}\ningress: []"),
    );
    let w = World::new(&yaml);
    assert!(w.resolve(WEB).ingress_enforced);
    check_world(
        &w,
        WEB,
        &[(Ingress, 1, TCP, 80, Allow), (Ingress, DB, TCP, 80, Deny)],
    );
}

#[test]
fn enable_default_deny_true_applies_even_without_rules() {
    // "If not specified, the default is true for each traffic direction that has rules":
    // an explicit value is taken as given.
    let rp = World::new(&cnp(
        "default",
        "endpointSelector: {}\nenableDefaultDeny: {egress: true}\ningress:\n- fromEntities: [host]",
    ))
    .resolve(WEB);
    assert!(rp.ingress_enforced && rp.egress_enforced);
}

#[test]
fn specs_list_applies_each_spec() {
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: multi, namespace: default}\nspecs:\n- endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEntities: [host]\n- endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toEntities: [world]\n";
    let w = World::new(yaml);
    let rp = w.resolve(WEB);
    assert!(rp.ingress_enforced && rp.egress_enforced);
    check_world(
        &w,
        WEB,
        &[
            (Ingress, 1, TCP, 80, Allow),
            (Egress, 2, TCP, 80, Allow),
            (Egress, DB, TCP, 80, Deny),
        ],
    );
    let t = trace(&rp, Egress, 2, TCP, 80);
    assert_eq!(t.deciding_rules[0].spec, 1);
    assert_eq!(&*t.deciding_rules[0].policy, "default/multi");
}

// ---------------------------------------------------------------- trace

#[test]
fn trace_reasons() {
    let yaml = format!(
        "{}---\n{}",
        cnp("default", "endpointSelector: {matchLabels: {app: web}}\ningress:\n- fromEndpoints: [{matchLabels: {app: db}}]\ningressDeny:\n- fromEntities: [world]"),
        ccnp("endpointSelector: {}\negress:\n- toEntities: [all]"),
    );
    let w = World::new(&yaml);
    let rp = w.resolve(WEB);

    let t = trace(&rp, Ingress, DB, TCP, 80);
    assert_eq!(t.verdict, Allow);
    assert_eq!(t.deciding_rules.len(), 1);
    let r = &t.deciding_rules[0];
    assert_eq!(
        (&*r.policy, r.kind, r.direction, r.index, r.deny),
        (
            "default/p",
            cilia_policy::PolicyKind::CiliumNetworkPolicy,
            Ingress,
            0,
            false
        )
    );
    assert_eq!(
        t.reason,
        "allowed by CiliumNetworkPolicy default/p ingress[0]"
    );

    let t = trace(&rp, Ingress, 2, TCP, 80);
    assert_eq!(t.verdict, Deny);
    assert_eq!(
        t.reason,
        "denied by CiliumNetworkPolicy default/p ingressDeny[0]"
    );

    let t = trace(&rp, Ingress, OTHER_WEB, TCP, 80);
    assert_eq!(t.verdict, Deny);
    assert!(t.deciding_rules.is_empty());
    assert!(t.reason.starts_with("default deny"), "{}", t.reason);

    let t = trace(&rp, Egress, UNKNOWN, UDP, 53);
    assert_eq!(t.verdict, Allow);
    assert_eq!(&*t.deciding_rules[0].policy, "cp");

    let rp_db = w.resolve(DB); // only the clusterwide egress policy selects db
    let t = trace(&rp_db, Ingress, 2, TCP, 80);
    assert_eq!(t.verdict, Allow);
    assert!(t.reason.starts_with("default allow"), "{}", t.reason);
}
