//! Endpoint selection: matchLabels, matchExpressions operators, key prefixes, namespaces.

mod common;
use common::*;

/// A CNP selecting `sel` as endpointSelector, allowing nothing at ingress (`[{}]`):
/// the subject is in default deny iff the selector selects it.
fn enforced_for(sel: &str, subject_id: u32) -> bool {
    let yaml = cnp(
        "default",
        &format!("endpointSelector: {sel}\ningress: [{{}}]"),
    );
    World::new(&yaml).resolve(subject_id).ingress_enforced
}

#[test]
fn endpoint_selector_operators() {
    let cases: &[(&str, &str, u32, bool)] = &[
        ("matchLabels match", "{matchLabels: {app: web}}", WEB, true),
        (
            "matchLabels mismatch",
            "{matchLabels: {app: web}}",
            DB,
            false,
        ),
        (
            "matchLabels key absent",
            "{matchLabels: {app: web}}",
            FRONTEND,
            false,
        ),
        (
            "In match",
            "{matchExpressions: [{key: app, operator: In, values: [db, web]}]}",
            WEB,
            true,
        ),
        (
            "In mismatch",
            "{matchExpressions: [{key: app, operator: In, values: [db]}]}",
            WEB,
            false,
        ),
        (
            "In key absent",
            "{matchExpressions: [{key: app, operator: In, values: [db]}]}",
            FRONTEND,
            false,
        ),
        (
            "NotIn mismatch",
            "{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}",
            WEB,
            false,
        ),
        (
            "NotIn other value",
            "{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}",
            DB,
            true,
        ),
        (
            "NotIn key absent matches",
            "{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}",
            FRONTEND,
            true,
        ),
        (
            "Exists present",
            "{matchExpressions: [{key: app, operator: Exists}]}",
            WEB,
            true,
        ),
        (
            "Exists absent",
            "{matchExpressions: [{key: app, operator: Exists}]}",
            FRONTEND,
            false,
        ),
        (
            "DoesNotExist absent matches",
            "{matchExpressions: [{key: app, operator: DoesNotExist}]}",
            FRONTEND,
            true,
        ),
        (
            "DoesNotExist present",
            "{matchExpressions: [{key: app, operator: DoesNotExist}]}",
            WEB,
            false,
        ),
        (
            "labels AND expressions",
            "{matchLabels: {app: web}, matchExpressions: [{key: tier, operator: Exists}]}",
            WEB,
            false,
        ),
        (
            "k8s: prefix stripped",
            "{matchLabels: {'k8s:app': web}}",
            WEB,
            true,
        ),
        (
            "any: prefix stripped",
            "{matchLabels: {'any:app': web}}",
            WEB,
            true,
        ),
        ("empty selects all in namespace", "{}", DB, true),
        (
            "empty does not select other namespace",
            "{}",
            OTHER_WEB,
            false,
        ),
    ];
    for (name, sel, subject_id, want) in cases {
        assert_eq!(enforced_for(sel, *subject_id), *want, "{name}: {sel}");
    }
}

#[test]
fn cnp_endpoint_selector_is_restricted_to_policy_namespace_even_with_namespace_label() {
    // The subject selector always gets the policy namespace added.
    let yaml = cnp(
        "default",
        "endpointSelector: {matchLabels: {'k8s:io.kubernetes.pod.namespace': other}}\ningress: [{}]",
    );
    assert!(!World::new(&yaml).resolve(OTHER_WEB).ingress_enforced);
}

verdict_tests! {
    cnp_from_endpoints_is_restricted_to_policy_namespace:
        cnp("default", "endpointSelector: {}\ningress:\n- fromEndpoints: [{matchLabels: {app: web}}]"),
        DB => [(Ingress, WEB, TCP, 80, Allow), (Ingress, OTHER_WEB, TCP, 80, Deny)];
}

#[test]
fn cnp_from_endpoints_namespace_label_lifts_restriction() {
    for key in [
        "io.kubernetes.pod.namespace",
        "k8s:io.kubernetes.pod.namespace",
    ] {
        let yaml = cnp(
            "default",
            &format!(
                "endpointSelector: {{}}\ningress:\n- fromEndpoints: [{{matchLabels: {{app: web, '{key}': other}}}}]"
            ),
        );
        check(
            &yaml,
            DB,
            &[
                (Ingress, WEB, TCP, 80, Deny),
                (Ingress, OTHER_WEB, TCP, 80, Allow),
            ],
        );
    }
    // Also through matchExpressions: every namespace but kube-system.
    let yaml = cnp(
        "default",
        "endpointSelector: {}\ningress:\n- fromEndpoints:\n  - matchExpressions: [{key: io.kubernetes.pod.namespace, operator: NotIn, values: [kube-system]}]",
    );
    check(
        &yaml,
        DB,
        &[
            (Ingress, WEB, TCP, 80, Allow),
            (Ingress, OTHER_CLIENT, TCP, 80, Allow),
            (Ingress, DNS, TCP, 80, Deny),
            (Ingress, 1, TCP, 80, Allow), // host has no namespace label: NotIn matches
        ],
    );
}

verdict_tests! {
    cnp_empty_from_endpoints_selects_all_pods_of_policy_namespace_only:
        cnp("default", "endpointSelector: {}\ningress:\n- fromEndpoints: [{}]"),
        DB => [(Ingress, WEB, TCP, 80, Allow), (Ingress, FRONTEND, UDP, 53, Allow),
               (Ingress, OTHER_WEB, TCP, 80, Deny), (Ingress, 1, TCP, 80, Deny),
               (Ingress, 2, TCP, 80, Deny)];
}

#[test]
fn ccnp_selectors_are_not_namespace_restricted() {
    let yaml = ccnp(
        "endpointSelector: {matchLabels: {app: web}}\ningress:\n- fromEndpoints: [{matchLabels: {app: client}}]",
    );
    let w = World::new(&yaml);
    assert!(w.resolve(WEB).ingress_enforced);
    assert!(w.resolve(OTHER_WEB).ingress_enforced);
    assert!(!w.resolve(DB).ingress_enforced);
    check_world(
        &w,
        WEB,
        &[
            (Ingress, OTHER_CLIENT, TCP, 80, Allow),
            (Ingress, DB, TCP, 80, Deny),
        ],
    );
}

verdict_tests! {
    ccnp_empty_from_endpoints_selects_every_pod_but_not_reserved_identities:
        ccnp("endpointSelector: {}\ningress:\n- fromEndpoints: [{}]"),
        WEB => [(Ingress, DB, TCP, 80, Allow), (Ingress, OTHER_CLIENT, TCP, 80, Allow),
                (Ingress, DNS, TCP, 80, Allow), (Ingress, 1, TCP, 80, Deny),
                (Ingress, 2, TCP, 80, Deny), (Ingress, 6, TCP, 80, Deny)];
}

#[test]
fn ccnp_empty_endpoint_selector_selects_every_endpoint() {
    let w = World::new(&ccnp("endpointSelector: {}\negress: [{}]"));
    for id in [WEB, DB, OTHER_WEB, DNS, FRONTEND] {
        assert!(w.resolve(id).egress_enforced, "{id}");
    }
}

/// Truth table of a namespaced CNP (in `default`) whose peer selector matches on
/// namespace labels: like current Cilium, the selector is not limited to the
/// policy's namespace, with or without the `k8s:`/`any:` source, through
/// matchLabels or matchExpressions, at ingress (fromEndpoints) and egress
/// (toEndpoints). Namespace `default` has team=a, `other` team=b, `kube-system`
/// no team label.
#[test]
fn cnp_namespace_labels_selector_reaches_every_namespace_with_those_labels() {
    let selectors = [
        "{matchLabels: {'io.cilium.k8s.namespace.labels.team': b}}",
        "{matchLabels: {'k8s:io.cilium.k8s.namespace.labels.team': b}}",
        "{matchLabels: {'any:io.cilium.k8s.namespace.labels.team': b}}",
        "{matchExpressions: [{key: 'k8s:io.cilium.k8s.namespace.labels.team', operator: In, values: [b]}]}",
    ];
    for sel in selectors {
        for (section, peers, dir) in [
            ("ingress", "fromEndpoints", Ingress),
            ("egress", "toEndpoints", Egress),
        ] {
            let yaml = cnp(
                "default",
                &format!("endpointSelector: {{}}\n{section}:\n- {peers}: [{sel}]"),
            );
            check(
                &yaml,
                DB,
                &[
                    (dir, OTHER_WEB, TCP, 80, Allow),    // other: team=b
                    (dir, OTHER_CLIENT, TCP, 80, Allow), // other: team=b
                    (dir, WEB, TCP, 80, Deny),           // default (the policy's own): team=a
                    (dir, DNS, TCP, 80, Deny),           // kube-system: no team
                    (dir, 1, TCP, 80, Deny),             // host: no namespace
                ],
            );
        }
    }
}

verdict_tests! {
    // team In [a, b]: both default and other; app=web: only the web pods.
    cnp_namespace_labels_selector_with_pod_labels_selects_those_pods_in_any_matching_namespace:
        cnp("default", "endpointSelector: {}\ningress:\n- fromEndpoints:\n  - matchLabels: {app: web}\n    matchExpressions: [{key: io.cilium.k8s.namespace.labels.team, operator: In, values: [a, b]}]"),
        DB => [(Ingress, WEB, TCP, 80, Allow), (Ingress, OTHER_WEB, TCP, 80, Allow),
               (Ingress, OTHER_CLIENT, TCP, 80, Deny), (Ingress, DNS, TCP, 80, Deny)];

    cnp_namespace_labels_exists_selector_reaches_namespaces_having_the_label:
        cnp("default", "endpointSelector: {}\negress:\n- toEndpoints:\n  - matchExpressions: [{key: 'k8s:io.cilium.k8s.namespace.labels.team', operator: Exists}]"),
        DB => [(Egress, WEB, TCP, 80, Allow), (Egress, OTHER_CLIENT, TCP, 80, Allow),
               (Egress, DNS, TCP, 80, Deny)];

    // The counterpart row of the table above: no namespace key, own namespace only.
    cnp_pod_label_selector_without_namespace_keys_stays_in_the_policy_namespace:
        cnp("default", "endpointSelector: {}\negress:\n- toEndpoints: [{matchLabels: {'k8s:app': web}}]"),
        DB => [(Egress, WEB, TCP, 80, Allow), (Egress, OTHER_WEB, TCP, 80, Deny)];

    // Reserved identities have no namespace: the policy namespace is not added.
    cnp_reserved_selector_selects_the_reserved_identity:
        cnp("default", "endpointSelector: {}\ningress:\n- fromEndpoints: [{matchLabels: {'reserved:host': ''}}]"),
        DB => [(Ingress, 1, TCP, 80, Allow), (Ingress, WEB, TCP, 80, Deny),
               (Ingress, 2, TCP, 80, Deny)];
}
