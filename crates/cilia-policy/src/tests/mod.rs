//! Property tests that need the internal model.
//!
//! 1. For random policies and packets, evaluating the resolved LPM map (`evaluate`, the
//!    datapath spec) gives the same verdict as a brute-force evaluation directly over the
//!    parsed model. This checks the longest-prefix / deny-precedence encoding, the port
//!    range → prefix split and the ANY expansion.
//! 2. `parse_policies` never panics, on arbitrary strings and on mutated valid YAML.

use std::collections::BTreeMap;

use ipnet::IpNet;
use proptest::prelude::*;

use crate::model::{Entity, Peer, PeerRule, PortRange};
use crate::named::NamedPorts;
use crate::{
    evaluate, parse_policies, reserved, resolve, Direction, IdentityCache, IdentityId, Labels,
    Policy, Verdict, LOCAL_CIDR_IDENTITY_BASE, NAMESPACE_LABEL,
};

const PREFIXES: [&str; 6] = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "192.168.0.0/16",
    "2001:db8::/32",
];
const UNKNOWN: IdentityId = 4242;

fn endpoint(ns: &str, app: Option<&str>) -> Labels {
    let mut l = BTreeMap::new();
    l.insert(NAMESPACE_LABEL.to_string(), ns.to_string());
    if let Some(a) = app {
        l.insert("app".to_string(), a.to_string());
    }
    Labels(l)
}

fn cache() -> IdentityCache {
    let mut c = IdentityCache::new();
    let eps = [
        (100, "default", Some("a")),
        (101, "default", Some("b")),
        (102, "default", None),
        (103, "other", Some("a")),
        (104, "other", Some("c")),
    ];
    for (id, ns, app) in eps {
        c.insert_labels(id, endpoint(ns, app));
    }
    for id in 1..=6 {
        c.insert_labels(id, Labels::from_pairs([(format!("reserved:{id}"), "")]));
    }
    for (i, p) in PREFIXES.iter().enumerate() {
        let net: IpNet = p.parse().expect("prefix");
        c.insert_cidr(LOCAL_CIDR_IDENTITY_BASE + i as u32, net);
    }
    for id in [100, 101, 104] {
        c.set_named_ports(id, identity_ports(id, 0));
    }
    c
}

/// Port names of the test identities (the union over their endpoints):
/// `variant` picks one of a few sets, so changes can move between them.
fn identity_ports(id: IdentityId, variant: u8) -> NamedPorts {
    let mut p = NamedPorts::new();
    match (id, variant) {
        (100, 0) | (_, 1) => {
            p.insert("http", 6, 80);
            p.insert("dns", 17, 53);
        }
        (101, 0) | (_, 2) => {
            // Two endpoints of one identity, two numbers for one name.
            p.insert("http", 6, 8080);
            p.insert("http", 6, 8000);
        }
        (104, 0) | (_, 3) => p.insert("dns", 132, 53),
        _ => {}
    }
    p
}

/// Port names each test subject declares (one number per name).
fn subject_ports(subject: &Labels) -> NamedPorts {
    let mut p = NamedPorts::new();
    match (subject.get(NAMESPACE_LABEL), subject.get("app")) {
        (Some("default"), Some("a")) => {
            p.insert("http", 6, 80);
            p.insert("dns", 17, 53);
        }
        (Some("default"), Some("b")) => p.insert("http", 6, 8080),
        (Some("other"), Some("a")) => p.insert("http", 17, 8000),
        _ => {}
    }
    p
}

/// Whether a named port of a rule covers the packet, given the port names
/// it resolves against.
fn ref_named(pr: &PeerRule, ports: Option<&NamedPorts>, proto: u8, port: u16) -> bool {
    let Some(ports) = ports else { return false };
    pr.named.iter().any(|n| {
        ports
            .get(&n.name)
            .any(|(p, num)| (n.proto == 0 || n.proto == p) && p == proto && num == port)
    })
}

/// The port names a packet's named ports resolve against: the subject's
/// at ingress, the peer identity's at egress.
fn named_basis<'a>(
    dir: Direction,
    subject: &Labels,
    c: &'a IdentityCache,
    id: IdentityId,
) -> Option<std::borrow::Cow<'a, NamedPorts>> {
    match dir {
        Direction::Ingress => Some(std::borrow::Cow::Owned(subject_ports(subject))),
        Direction::Egress => c.named_ports(id).map(std::borrow::Cow::Borrowed),
    }
}

fn all_peers(c: &IdentityCache) -> Vec<IdentityId> {
    let mut v: Vec<IdentityId> = c.label_identities().map(|(id, _)| id).collect();
    v.extend(c.cidr_identities().map(|(id, _)| id));
    v.push(UNKNOWN);
    v
}

// ------------------------------------------------------------------ reference evaluator

fn ref_peer(peer: &Peer, id: IdentityId, c: &IdentityCache) -> bool {
    let is_cidr = c.cidr(id).is_some();
    match peer {
        Peer::Any => true,
        Peer::Selector(sel) => !is_cidr && c.labels(id).is_some_and(|l| sel.matches(l)),
        Peer::Cidr { cidr, except } => match c.cidr(id) {
            Some(net) => cidr.contains(net) && !except.iter().any(|e| e.contains(net)),
            None => id == reserved::WORLD && cidr.prefix_len() == 0,
        },
        Peer::Entity(Entity::World) => id == reserved::WORLD || is_cidr,
        Peer::Entity(Entity::Cluster) => {
            id != reserved::WORLD && !is_cidr && (c.labels(id).is_some() || (1..=6).contains(&id))
        }
        Peer::Entity(Entity::Host) => id == reserved::HOST,
        Peer::Entity(Entity::RemoteNode) => id == reserved::REMOTE_NODE,
        Peer::Entity(Entity::Init) => id == reserved::INIT,
        Peer::Entity(Entity::Health) => id == reserved::HEALTH,
        Peer::Entity(Entity::Unmanaged) => id == reserved::UNMANAGED,
    }
}

fn ref_port(r: &PortRange, proto: u8, port: u16) -> bool {
    let in_range = r.first <= port && port <= r.last;
    match r.proto {
        0 if r.all_ports() => true,
        0 => [6, 17, 132].contains(&proto) && in_range,
        p => p == proto && in_range,
    }
}

fn ref_rule(
    pr: &PeerRule,
    (dir, subject): (Direction, &Labels),
    id: IdentityId,
    proto: u8,
    port: u16,
    c: &IdentityCache,
) -> bool {
    let named = named_basis(dir, subject, c, id);
    pr.peers.iter().any(|p| ref_peer(p, id, c))
        && (pr.ports.iter().any(|r| ref_port(r, proto, port))
            || ref_named(pr, named.as_deref(), proto, port))
}

fn reference(
    policies: &[Policy],
    subject: &Labels,
    c: &IdentityCache,
    dir: Direction,
    id: IdentityId,
    proto: u8,
    port: u16,
) -> Verdict {
    let (mut enforced, mut allowed, mut denied) = (false, false, false);
    for rule in policies.iter().flat_map(|p| &p.rules) {
        if !rule.subject.matches(subject) {
            continue;
        }
        let (allow, deny, enf) = match dir {
            Direction::Ingress => (&rule.ingress, &rule.ingress_deny, rule.enforce_ingress),
            Direction::Egress => (&rule.egress, &rule.egress_deny, rule.enforce_egress),
        };
        enforced |= enf;
        allowed |= allow
            .iter()
            .any(|pr| ref_rule(pr, (dir, subject), id, proto, port, c));
        denied |= deny
            .iter()
            .any(|pr| ref_rule(pr, (dir, subject), id, proto, port, c));
    }
    if denied || (!allowed && enforced) {
        Verdict::Deny
    } else {
        Verdict::Allow
    }
}

/// The L7 side of the reference: `None` when not redirected, else whether every
/// request passes (an L4-only allow covers the packet too) and the HTTP rules.
fn reference_l7(
    policies: &[Policy],
    subject: &Labels,
    c: &IdentityCache,
    dir: Direction,
    id: IdentityId,
    proto: u8,
    port: u16,
) -> Option<(bool, std::collections::BTreeSet<crate::l7::HttpRuleSpec>)> {
    if reference(policies, subject, c, dir, id, proto, port) == Verdict::Deny {
        return None;
    }
    let (mut l4, mut http, mut any_http) = (false, std::collections::BTreeSet::new(), false);
    for rule in policies.iter().flat_map(|p| &p.rules) {
        if !rule.subject.matches(subject) {
            continue;
        }
        let allow = match dir {
            Direction::Ingress => &rule.ingress,
            Direction::Egress => &rule.egress,
        };
        for pr in allow {
            if !pr.peers.iter().any(|p| ref_peer(p, id, c)) {
                continue;
            }
            let l7s = pr
                .ports
                .iter()
                .enumerate()
                .filter(|(_, r)| ref_port(r, proto, port))
                .map(|(i, _)| pr.l7_of(i));
            let named = named_basis(dir, subject, c, id);
            let named_l7s = pr
                .named
                .iter()
                .filter(|n| {
                    let one = PeerRule::new(Vec::new(), Vec::new(), vec![(*n).clone()], Vec::new());
                    ref_named(&one, named.as_deref(), proto, port)
                })
                .map(|n| n.l7.as_ref());
            for l7 in l7s.chain(named_l7s) {
                match l7 {
                    None => l4 = true,
                    Some(l7) => {
                        any_http = true;
                        http.extend(l7.http.iter().cloned());
                    }
                }
            }
        }
    }
    if !any_http {
        return None;
    }
    Some((l4, if l4 { Default::default() } else { http }))
}

/// What the resolved map says about the L7 side of a packet, in the form of [`reference_l7`].
fn map_l7(
    resolved: &crate::ResolvedPolicy,
    dir: Direction,
    id: IdentityId,
    proto: u8,
    port: u16,
) -> Option<(bool, std::collections::BTreeSet<crate::l7::HttpRuleSpec>)> {
    let ev = evaluate(resolved, dir, id, proto, port);
    if !ev.proxy {
        return None;
    }
    let entry = ev.allowing_entry()?;
    let l7 = resolved.l7.get(&entry.key())?;
    Some(match &l7.policy {
        crate::l7::L7Policy::AllowAll => (true, Default::default()),
        crate::l7::L7Policy::Http(rules) => (false, rules.iter().cloned().collect()),
    })
}

// ------------------------------------------------------------------ random policies

/// Peer fields of a random Cilium rule, at most one of each kind.
fn peers_yaml(dir: &'static str) -> impl Strategy<Value = Vec<String>> {
    let (ep, ent, cidr, set) = if dir == "from" {
        ("fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet")
    } else {
        ("toEndpoints", "toEntities", "toCIDR", "toCIDRSet")
    };
    let endpoints = prop_oneof![
        prop::sample::select(vec!["a", "b", "c"])
            .prop_map(move |a| format!("{ep}: [{{matchLabels: {{app: {a}}}}}]")),
        Just(format!("{ep}: [{{}}]")),
        Just(format!(
            "{ep}: [{{matchExpressions: [{{key: app, operator: NotIn, values: [a]}}, {{key: io.kubernetes.pod.namespace, operator: Exists}}]}}]"
        )),
    ];
    let entities =
        prop::sample::subsequence(vec!["world", "cluster", "host", "all", "remote-node"], 1..3)
            .prop_map(move |e| format!("{ent}: [{}]", e.join(", ")));
    let cidrs = prop::sample::subsequence(PREFIXES.to_vec(), 1..3)
        .prop_map(move |p| format!("{cidr}: ['{}']", p.join("', '")));
    let sets = prop::sample::select(vec![
        "{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}",
        "{cidr: 0.0.0.0/0, except: [10.1.2.0/24]}",
    ])
    .prop_map(move |s| format!("{set}: [{s}]"));
    (
        prop::option::weighted(0.4, endpoints),
        prop::option::weighted(0.3, entities),
        prop::option::weighted(0.3, cidrs),
        prop::option::weighted(0.2, sets),
    )
        .prop_map(|(a, b, c, d)| [a, b, c, d].into_iter().flatten().collect())
}

fn port_yaml() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            "0", "53", "80", "443", "8000", "8080", "65535", "http", "dns",
        ]),
        prop::sample::select(vec![None, Some(0u32), Some(1), Some(100), Some(999)]),
        prop::sample::select(vec![
            None,
            Some("TCP"),
            Some("UDP"),
            Some("SCTP"),
            Some("ANY"),
        ]),
    )
        .prop_map(|(port, end, proto)| {
            let mut s = format!("{{port: '{port}'");
            if let (Some(e), Ok(port)) = (end, port.parse::<u32>()) {
                if port != 0 && e != 0 {
                    s.push_str(&format!(", endPort: {}", (port + e).min(65535)));
                }
            }
            if let Some(p) = proto {
                s.push_str(&format!(", protocol: {p}"));
            }
            s.push('}');
            s
        })
}

/// A `toPorts` entry with HTTP rules: one or two TCP ports, one or two rules.
fn l7_port_rule_yaml() -> impl Strategy<Value = String> {
    (
        prop::sample::subsequence(vec!["80", "443", "8080", "http"], 1..3),
        prop::sample::subsequence(
            vec![
                "{method: GET}",
                "{method: POST, path: /v1/.*}",
                "{path: /health}",
                "{}",
            ],
            1..3,
        ),
    )
        .prop_map(|(ports, http)| {
            let ports: Vec<String> = ports
                .iter()
                .map(|p| format!("{{port: '{p}', protocol: TCP}}"))
                .collect();
            format!(
                "{{ports: [{}], rules: {{http: [{}]}}}}",
                ports.join(", "),
                http.join(", ")
            )
        })
}

fn rule_yaml(dir: &'static str, allow: bool) -> impl Strategy<Value = String> {
    (
        peers_yaml(dir),
        prop::option::of(prop::collection::vec(port_yaml(), 1..3)),
        prop::option::weighted(0.3, l7_port_rule_yaml()),
    )
        .prop_map(move |(peers, ports, l7)| {
            // Deny sections have no L7 rules.
            let l7 = l7.filter(|_| allow);
            let mut fields = peers;
            let mut entries: Vec<String> = Vec::new();
            if let Some(ports) = ports {
                entries.push(format!("{{ports: [{}]}}", ports.join(", ")));
            }
            entries.extend(l7);
            if !entries.is_empty() {
                fields.push(format!("toPorts: [{}]", entries.join(", ")));
            }
            format!("{{{}}}", fields.join(", "))
        })
}

fn section(name: &'static str, dir: &'static str) -> impl Strategy<Value = Option<String>> {
    let allow = !name.ends_with("Deny");
    prop::option::of(
        prop::collection::vec(rule_yaml(dir, allow), 0..3)
            .prop_map(move |rules| format!("  {name}: [{}]\n", rules.join(", "))),
    )
}

fn cilium_policy_yaml() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        prop::sample::select(vec!["{}", "{matchLabels: {app: a}}", "{matchLabels: {app: b}}"]),
        section("ingress", "from"),
        section("ingressDeny", "from"),
        section("egress", "to"),
        section("egressDeny", "to"),
        prop::sample::select(vec![
            "",
            "  enableDefaultDeny: {ingress: false}\n",
            "  enableDefaultDeny: {egress: false, ingress: true}\n",
        ]),
    )
        .prop_map(|(clusterwide, sel, i, id, e, ed, dd)| {
            let head = if clusterwide {
                "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\n"
            } else {
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: default}\n"
            };
            format!(
                "{head}spec:\n  endpointSelector: {sel}\n{}{}{}{}{dd}",
                i.unwrap_or_default(),
                id.unwrap_or_default(),
                e.unwrap_or_default(),
                ed.unwrap_or_default()
            )
        })
}

fn np_peer_yaml() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{podSelector: {matchLabels: {app: b}}}".to_string()),
        Just("{namespaceSelector: {}}".to_string()),
        Just("{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}".to_string()),
        Just("{ipBlock: {cidr: 0.0.0.0/0}}".to_string()),
    ]
}

fn np_port_yaml() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            None,
            Some("53"),
            Some("80"),
            Some("8000"),
            Some("http"),
            Some("dns"),
        ]),
        prop::sample::select(vec![None, Some(7u32), Some(999)]),
        prop::sample::select(vec![None, Some("UDP"), Some("SCTP")]),
    )
        .prop_map(|(port, end, proto)| {
            let mut parts = Vec::new();
            if let Some(p) = port {
                parts.push(format!("port: {p}"));
                if let (Some(e), Ok(p)) = (end, p.parse::<u32>()) {
                    parts.push(format!("endPort: {}", p + e));
                }
            }
            if let Some(p) = proto {
                parts.push(format!("protocol: {p}"));
            }
            format!("{{{}}}", parts.join(", "))
        })
}

fn network_policy_yaml() -> impl Strategy<Value = String> {
    let rule = || {
        (
            prop::collection::vec(np_peer_yaml(), 0..3),
            prop::collection::vec(np_port_yaml(), 0..3),
        )
    };
    (
        prop::option::of(prop::collection::vec(rule(), 0..3)),
        prop::option::of(prop::collection::vec(rule(), 0..3)),
        prop::sample::select(vec!["", "  policyTypes: [Ingress, Egress]\n", "  policyTypes: [Egress]\n"]),
    )
        .prop_map(|(ing, eg, types)| {
            let render = |name: &str, key: &str, rules: Option<Vec<(Vec<String>, Vec<String>)>>| {
                rules.map_or(String::new(), |rules| {
                    let items: Vec<String> = rules
                        .into_iter()
                        .map(|(peers, ports)| {
                            format!("{{{key}: [{}], ports: [{}]}}", peers.join(", "), ports.join(", "))
                        })
                        .collect();
                    format!("  {name}: [{}]\n", items.join(", "))
                })
            };
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n}}\nspec:\n  podSelector: {{}}\n{}{}{types}",
                render("ingress", "from", ing),
                render("egress", "to", eg),
            )
        })
}

fn policies_yaml() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![3 => cilium_policy_yaml(), 1 => network_policy_yaml()],
        1..4,
    )
    .prop_map(|docs| docs.join("---\n"))
}

const PORTS: [u16; 16] = [
    0, 1, 52, 53, 54, 79, 80, 81, 443, 1079, 7999, 8000, 8999, 9000, 65534, 65535,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn map_evaluation_equals_reference(yaml in policies_yaml(), extra_port in any::<u16>()) {
        let policies = parse_policies("prop.yaml", &yaml)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        let c = cache();
        for subject_id in [100u32, 101, 103] {
            let subject = c.labels(subject_id).cloned().unwrap_or_default();
            let resolved = crate::resolve_with_ports(&policies, &subject, &subject_ports(&subject), &c);
            for dir in [Direction::Ingress, Direction::Egress] {
                for peer in all_peers(&c) {
                    for proto in [1u8, 6, 17, 132] {
                        for port in PORTS.iter().copied().chain([extra_port, extra_port.wrapping_add(1)]) {
                            let want = reference(&policies, &subject, &c, dir, peer, proto, port);
                            let got = evaluate(&resolved, dir, peer, proto, port).verdict;
                            prop_assert_eq!(
                                got, want,
                                "subject {} {:?} peer {} proto {} port {}\n{}\n{:#?}",
                                subject_id, dir, peer, proto, port, yaml, resolved.entries
                            );
                            let want = reference_l7(&policies, &subject, &c, dir, peer, proto, port);
                            let got = map_l7(&resolved, dir, peer, proto, port);
                            prop_assert_eq!(
                                got, want,
                                "L7: subject {} {:?} peer {} proto {} port {}\n{}\n{:#?}\n{:#?}",
                                subject_id, dir, peer, proto, port, yaml, resolved.entries, resolved.l7
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn parse_never_panics_on_arbitrary_strings(s in any::<String>()) {
        let _ = parse_policies("fuzz.yaml", &s);
    }

    #[test]
    fn parse_never_panics_on_yamlish_strings(s in "[-a-zA-Z0-9:{}\\[\\],'\" \n#&*!|>.%@/]{0,200}") {
        let _ = parse_policies("fuzz.yaml", &s);
    }

    #[test]
    fn parse_never_panics_on_mutated_valid_yaml(
        yaml in policies_yaml(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, prop::sample::select(vec![
            "", "-", ":", " ", "\n", "[", "]", "{", "}", "'", "\"", "*a", "&a ", "!!int ", "---\n",
            "99999999999999999999", "-1", "null", "~", "\t", "ingress", "port", "é",
        ])), 1..6),
    ) {
        let mut s = yaml;
        for (idx, op, text) in edits {
            let mut at = idx.index(s.len() + 1);
            while !s.is_char_boundary(at) { at -= 1; }
            match op {
                0 => s.insert_str(at, text),
                1 => {
                    let mut end = (at + 3).min(s.len());
                    while !s.is_char_boundary(end) { end += 1; }
                    s.replace_range(at..end, "");
                }
                2 => {
                    let mut end = (at + 1).min(s.len());
                    while !s.is_char_boundary(end) { end += 1; }
                    s.replace_range(at..end, text);
                }
                _ => {
                    // duplicate the line containing `at`
                    let start = s[..at].rfind('\n').map_or(0, |i| i + 1);
                    let end = s[at..].find('\n').map_or(s.len(), |i| at + i);
                    let line = format!("{}\n", &s[start..end]);
                    s.insert_str(start, &line);
                }
            }
        }
        let _ = parse_policies("fuzz.yaml", &s);
    }
}

#[test]
fn reference_and_map_agree_on_a_hand_written_mixed_policy() {
    // A fixed regression case covering wildcard/specific allow/deny overlaps.
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: '80', endPort: 90}]}]\n  - fromEntities: [world]\n  ingressDeny:\n  - fromCIDRSet: [{cidr: 0.0.0.0/0, except: [10.1.0.0/16]}]\n    toPorts: [{ports: [{port: '85', protocol: TCP}]}]\n";
    let policies = parse_policies("t", yaml).expect("parse");
    let c = cache();
    let subject = endpoint("default", Some("a"));
    let resolved = resolve(&policies, &subject, &c);
    for peer in all_peers(&c) {
        for proto in [1u8, 6, 17] {
            for port in 78..=92 {
                assert_eq!(
                    evaluate(&resolved, Direction::Ingress, peer, proto, port).verdict,
                    reference(
                        &policies,
                        &subject,
                        &c,
                        Direction::Ingress,
                        peer,
                        proto,
                        port
                    ),
                    "peer {peer} proto {proto} port {port}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------ incremental == from scratch

/// One change to a node's policies or identities.
#[derive(Debug, Clone)]
enum Change {
    /// Imports (creates or replaces) the policy in a slot.
    Import(usize, String),
    Delete(usize),
    /// Gives endpoint identity `100 + n` the labels (namespace, app), or removes it.
    Endpoint(u32, Option<(&'static str, Option<&'static str>)>),
    /// Adds or removes the CIDR identity of one of [`PREFIXES`] (and a few more).
    Cidr(usize, bool),
    /// Gives endpoint identity `100 + n` the port names of a variant of [`identity_ports`].
    NamedPorts(u32, u8),
}

const MORE_PREFIXES: [&str; 6] = [
    "10.1.2.3/32",
    "10.9.0.0/16",
    "192.168.1.0/24",
    "2001:db8:1::/48",
    "2001:db8::1/128",
    "172.16.0.0/12",
];

fn change() -> impl Strategy<Value = Change> {
    let labels = prop::option::of((
        prop::sample::select(vec!["default", "other"]),
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
    ));
    prop_oneof![
        4 => (0usize..4, prop_oneof![3 => cilium_policy_yaml(), 1 => network_policy_yaml()])
            .prop_map(|(slot, yaml)| Change::Import(slot, yaml)),
        1 => (0usize..4).prop_map(Change::Delete),
        2 => (0u32..4, labels).prop_map(|(n, l)| Change::Endpoint(n, l)),
        2 => (0usize..PREFIXES.len() + MORE_PREFIXES.len(), any::<bool>())
            .prop_map(|(i, on)| Change::Cidr(i, on)),
        2 => (0u32..5, 0u8..5).prop_map(|(n, v)| Change::NamedPorts(n, v)),
    ]
}

/// Applies one change to a node's policies (by key) and identities.
fn apply_change(
    change: &Change,
    policies: &mut BTreeMap<String, std::sync::Arc<Policy>>,
    c: &mut IdentityCache,
) -> Result<(), TestCaseError> {
    let all_prefixes: Vec<&str> = PREFIXES.iter().chain(&MORE_PREFIXES).copied().collect();
    match change {
        Change::Import(slot, yaml) => {
            let mut parsed = parse_policies("prop.yaml", yaml)
                .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
            let mut p = parsed.remove(0);
            p.name = format!("p{slot}");
            policies.insert(format!("k{slot}"), std::sync::Arc::new(p));
        }
        Change::Delete(slot) => {
            policies.remove(&format!("k{slot}"));
        }
        Change::Endpoint(n, labels) => {
            let mut next = IdentityCache::new();
            for (id, l) in c.label_identities() {
                if id != 100 + n {
                    next.insert_labels(id, l.clone());
                }
            }
            for (id, net) in c.cidr_identities() {
                next.insert_cidr(id, *net);
            }
            for (id, ports) in c.named_ports_map() {
                next.set_named_ports(*id, ports.clone());
            }
            if let Some((ns, app)) = labels {
                next.insert_labels(100 + n, endpoint(ns, *app));
            }
            *c = next;
        }
        Change::Cidr(i, on) => {
            let id = LOCAL_CIDR_IDENTITY_BASE + *i as u32;
            let mut next = IdentityCache::new();
            for (lid, l) in c.label_identities() {
                next.insert_labels(lid, l.clone());
            }
            for (cid, net) in c.cidr_identities() {
                if cid != id {
                    next.insert_cidr(cid, *net);
                }
            }
            if *on {
                next.insert_cidr(id, all_prefixes[*i].parse().expect("prefix"));
            }
            for (id, ports) in c.named_ports_map() {
                next.set_named_ports(*id, ports.clone());
            }
            *c = next;
        }
        Change::NamedPorts(n, variant) => {
            c.set_named_ports(100 + n, identity_ports(100 + n, *variant));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// After any sequence of imports, deletes and identity changes, the
    /// incremental repository resolves every subject exactly as a resolution
    /// from scratch does: same enforcement, rules and map entries; whether it
    /// is given each new identity cache or told only the identities that changed.
    #[test]
    fn incremental_resolution_equals_resolution_from_scratch(
        changes in prop::collection::vec(change(), 1..12),
    ) {
        use std::sync::Arc;
        let mut repo = crate::PolicyRepository::new();
        let mut told = crate::PolicyRepository::new();
        told.set_identities(cache());
        let mut policies: BTreeMap<String, Arc<Policy>> = BTreeMap::new();
        let mut c = cache();
        let subjects = [
            endpoint("default", Some("a")),
            endpoint("default", Some("b")),
            endpoint("default", None),
            endpoint("other", Some("a")),
        ];
        for (step, change) in changes.iter().enumerate() {
            apply_change(change, &mut policies, &mut c)?;
            repo.set_policies(policies.iter().map(|(k, p)| (k.as_str(), p)));
            repo.set_identities(c.clone());
            told.set_policies(policies.iter().map(|(k, p)| (k.as_str(), p)));
            match change {
                Change::Endpoint(n, labels) => told.change_identities(
                    [(100 + n, labels.map(|(ns, app)| endpoint(ns, app)))],
                    [],
                ),
                Change::Cidr(i, _) => {
                    let id = LOCAL_CIDR_IDENTITY_BASE + *i as u32;
                    told.change_identities([], [(id, c.cidr(id).copied())]);
                }
                Change::NamedPorts(n, _) => told.change_named_ports([(
                    100 + n,
                    c.named_ports(100 + n).cloned().unwrap_or_default(),
                )]),
                _ => {}
            }
            let in_order: Vec<Policy> = policies.values().map(|p| (**p).clone()).collect();
            for subject in &subjects {
                let ports = subject_ports(subject);
                let want = crate::resolve_with_ports(&in_order, subject, &ports, &c);
                let (got, _) = repo.resolve_with_ports(subject, &ports);
                prop_assert_eq!(&got, &want, "step {} ({:?}), subject {:?}", step, change, subject);
                let (got, _) = told.resolve_with_ports(subject, &ports);
                prop_assert_eq!(&got, &want, "told the changes: step {} ({:?}), subject {:?}", step, change, subject);
            }
        }
    }
}

/// A policy map by key: verdict, deciding rule and proxy flag.
type Map = BTreeMap<(Direction, u32, u8, u16, u8), (crate::Verdict, crate::RuleRef, bool)>;

/// A map as programmed from deltas, with the ingress and egress enforcement.
type Programmed = (Map, bool, bool);

fn key(e: &crate::MapEntry) -> (Direction, u32, u8, u16, u8) {
    (e.direction, e.identity, e.proto, e.port, e.port_prefix_len)
}

/// Programs a delta as the agent would: removals, then writes.
fn apply_delta(
    (map, ingress, egress): &mut Programmed,
    delta: &crate::PolicyDelta,
) -> Result<(), TestCaseError> {
    for e in &delta.removed {
        prop_assert!(
            map.remove(&key(&e.entry)).is_some(),
            "removed an absent entry"
        );
    }
    for e in &delta.upserted {
        map.insert(
            key(&e.entry),
            (e.entry.verdict, e.rule_ref.clone(), e.entry.proxy),
        );
    }
    *ingress = delta.ingress_enforced.unwrap_or(*ingress);
    *egress = delta.egress_enforced.unwrap_or(*egress);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// After any sequence of imports, deletes and identity changes, a merged
    /// policy moved change by change (its first move builds it at once) equals
    /// the full merge of the new basis, as does one built at once, and the
    /// deltas it returned, applied in turn to an empty map, give
    /// exactly that merge's entries (by key: verdict and deciding rule). A
    /// move reverted (a plan given up) restores the merge and the map exactly.
    #[test]
    fn incremental_merge_equals_full_merge_after_any_changes(
        changes in prop::collection::vec(change(), 1..12),
    ) {
        use crate::MergedPolicy;
        let mut repo = crate::PolicyRepository::new();
        let mut policies: BTreeMap<String, std::sync::Arc<Policy>> = BTreeMap::new();
        let mut c = cache();
        let subjects = [
            endpoint("default", Some("a")),
            endpoint("default", Some("b")),
            endpoint("default", None),
            endpoint("other", Some("a")),
        ];
        let mut merged: Vec<MergedPolicy> = subjects.iter().map(|_| MergedPolicy::new()).collect();
        let mut maps: Vec<Programmed> = subjects.iter().map(|_| Default::default()).collect();
        for (step, change) in changes.iter().enumerate() {
            apply_change(change, &mut policies, &mut c)?;
            repo.set_policies(policies.iter().map(|(k, p)| (k.as_str(), p)));
            repo.set_identities(c.clone());
            for (i, subject) in subjects.iter().enumerate() {
                let basis = repo.basis_with_ports(subject, &subject_ports(subject));
                let (was, was_map) = (merged[i].resolved(), maps[i].clone());
                let delta = repo.update_merged(&mut merged[i], &basis);
                let mut reverted = was_map.clone();
                apply_delta(&mut reverted, &delta)?;
                apply_delta(&mut reverted, &merged[i].revert_update())?;
                prop_assert_eq!(&merged[i].resolved(), &was, "reverted: step {} ({:?})", step, change);
                prop_assert_eq!(&reverted, &was_map, "reverted: step {} ({:?})", step, change);
                let delta = repo.update_merged(&mut merged[i], &basis);
                let want = repo.merge(&basis);
                prop_assert_eq!(&merged[i].resolved(), &want, "step {} ({:?}), subject {:?}", step, change, subject);
                prop_assert_eq!(merged[i].entry_count(), want.entries.len());
                // Built at once, as for a first programming: the same.
                let fresh = repo.merged(&basis);
                prop_assert_eq!(&fresh.resolved(), &want, "built at once: step {} ({:?})", step, change);
                prop_assert_eq!(fresh.entry_count(), want.entries.len());
                apply_delta(&mut maps[i], &delta)?;
                let (map, ingress, egress) = &maps[i];
                let want_map: Map = want
                    .entries
                    .iter()
                    .map(|e| (key(e), (e.verdict, want.rules[e.rule as usize].clone(), e.proxy)))
                    .collect();
                prop_assert_eq!(map, &want_map, "step {} ({:?}), subject {:?}", step, change, subject);
                let l7: BTreeMap<_, _> = merged[i].l7_entries().map(|(k, l7)| (k, l7.clone())).collect();
                prop_assert_eq!(&l7, &want.l7, "L7: step {} ({:?}), subject {:?}", step, change, subject);
                prop_assert_eq!((*ingress, *egress), (want.ingress_enforced, want.egress_enforced));
            }
        }
    }
}

/// Moves `merged` to `subject`'s current basis.
fn move_to_basis(
    repo: &mut crate::PolicyRepository,
    merged: &mut crate::MergedPolicy,
    subject: &Labels,
) -> crate::PolicyDelta {
    let basis = repo.basis(subject);
    repo.update_merged(merged, &basis)
}

/// A Cilium policy selecting every endpoint, with the given sections.
fn select_all(name: &str, sections: &str) -> std::sync::Arc<Policy> {
    let yaml = format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  endpointSelector: {{}}\n{sections}");
    std::sync::Arc::new(parse_policies("t.yaml", &yaml).expect("parse").remove(0))
}

/// A policy allowing TCP `port` from `app=b` to every endpoint.
fn allow_tcp_from_b(name: &str, port: u16) -> std::sync::Arc<Policy> {
    select_all(
        name,
        &format!("  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: b}}}}]\n    toPorts: [{{ports: [{{port: '{port}', protocol: TCP}}]}}]\n"),
    )
}

/// A repository over [`cache`], and an empty merged policy of `default/a`.
fn merge_fixture() -> (crate::PolicyRepository, crate::MergedPolicy, Labels) {
    let mut repo = crate::PolicyRepository::new();
    repo.set_identities(cache());
    (
        repo,
        crate::MergedPolicy::new(),
        endpoint("default", Some("a")),
    )
}

#[test]
fn merging_a_new_policy_upserts_only_its_entries() {
    let (a, b) = (allow_tcp_from_b("a", 80), allow_tcp_from_b("b", 443));
    let (mut repo, mut merged, subject) = merge_fixture();
    // `b` sorts before `a`'s key: every rule index of `a` shifts, no entry of it moves.
    repo.set_policies([("k2", &a)]);
    let first = move_to_basis(&mut repo, &mut merged, &subject);
    repo.set_policies([("k1", &b), ("k2", &a)]);
    let second = move_to_basis(&mut repo, &mut merged, &subject);
    assert!(second.removed.is_empty());
    assert_eq!(second.upserted.len(), first.upserted.len());
    assert!(second.upserted.iter().all(|e| e.entry.port == 443));
    assert_eq!(second.ingress_enforced, None);
}

#[test]
fn a_deny_arriving_above_allows_removes_the_allows_it_covers() {
    let allow = allow_tcp_from_b("allow", 80);
    let deny = select_all(
        "deny",
        "  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: b}}]\n",
    );
    let (mut repo, mut merged, subject) = merge_fixture();
    repo.set_policies([("k1", &allow)]);
    let before = move_to_basis(&mut repo, &mut merged, &subject);
    assert!(!before.upserted.is_empty());
    repo.set_policies([("k1", &allow), ("k2", &deny)]);
    let delta = move_to_basis(&mut repo, &mut merged, &subject);
    assert_eq!(delta.removed, before.upserted);
    assert!(delta
        .upserted
        .iter()
        .all(|e| e.entry.verdict == crate::Verdict::Deny && e.entry.proto == 0));
    // And back: the deny leaves, the allows return.
    repo.set_policies([("k1", &allow)]);
    let after = move_to_basis(&mut repo, &mut merged, &subject);
    assert_eq!(after.upserted.len(), before.upserted.len());
    assert_eq!(after.removed.len(), delta.upserted.len());
}

#[test]
fn an_unchanged_policy_keeps_its_contribution_and_basis() {
    use std::sync::Arc;
    let a = Arc::new(
        parse_policies("a", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: b}}]\n")
            .expect("parse")
            .remove(0),
    );
    let b = Arc::new(
        parse_policies("b", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  ingress:\n  - fromCIDR: [10.1.2.0/24]\n")
            .expect("parse")
            .remove(0),
    );
    let mut repo = crate::PolicyRepository::new();
    repo.set_identities(cache());
    repo.set_policies([("a", &a)]);
    let subject = endpoint("default", Some("a"));
    let before = repo.basis(&subject);
    // A policy that does not select the subject, and a CIDR identity no peer
    // of `a` can see, leave the subject's basis alone.
    repo.set_policies([("a", &a), ("b", &b)]);
    let mut c = cache();
    c.insert_cidr(
        LOCAL_CIDR_IDENTITY_BASE + 100,
        "10.1.2.3/32".parse().expect("prefix"),
    );
    repo.set_identities(c.clone());
    assert_eq!(repo.basis(&subject), before);
    // A new identity its selector matches changes it.
    c.insert_labels(200, endpoint("default", Some("b")));
    repo.set_identities(c);
    assert_ne!(repo.basis(&subject), before);
}

// ------------------------------------------- claim log, packed keys, per-group normalize

fn any_key() -> impl Strategy<Value = crate::resolve::Key> {
    (
        prop::bool::ANY,
        prop::sample::select(vec![0u32, 1, 2, 1000, u32::MAX]),
        prop::sample::select(vec![0u8, 6, 17]),
        any::<u16>(),
        0u8..=16,
    )
        .prop_map(|(egress, id, proto, port, len)| {
            let direction = if egress {
                Direction::Egress
            } else {
                Direction::Ingress
            };
            let port = port & crate::ports::prefix_mask(len);
            (direction, id, proto, port, len)
        })
}

proptest! {
    #[test]
    fn claim_log_keeps_the_same_candidates_as_the_ordered_map(
        claims in prop::collection::vec((
            any_key(),
            prop::collection::vec(
                prop::sample::select(vec![0u32, 1, 2, 1000, 3000, 1 << 24 | 7, u32::MAX]),
                0..4,
            ),
            prop::bool::ANY,
            prop::bool::ANY,
        // Past 128 claims the log is radix-sorted (below, compared).
        ), 0..200),
        // Whether single claims come between the rules claiming identity
        // runs (without them, only the runs tell the log which key bits differ).
        singles in prop::bool::ANY,
    ) {
        use crate::resolve::{CandidateMap, Candidates, ClaimLog, Key};
        let mut log = ClaimLog::default();
        let mut map: BTreeMap<Key, Candidates> = BTreeMap::new();
        // Rules claim in increasing index order, as the resolver visits them;
        // a rule with identities claims its port key for all of them at once
        // (the log's own `claim_all`, the map's default one claim per identity).
        for (rule, ((direction, id, proto, port, len), ids, deny, l4)) in
            claims.into_iter().enumerate()
        {
            let rule = rule as u32;
            if ids.is_empty() && singles {
                log.claim((direction, id, proto, port, len), deny, l4, rule);
                map.claim((direction, id, proto, port, len), deny, l4, rule);
            } else {
                log.claim_all(direction, &ids, (proto, port, len), deny, l4, rule);
                map.claim_all(direction, &ids, (proto, port, len), deny, l4, rule);
            }
        }
        let sorted = log.sorted();
        let (at_least, at_most) = sorted.size_hint();
        prop_assert!(at_least <= map.len() && at_most.is_some_and(|n| n >= map.len()));
        let from_log: Vec<(Key, Candidates)> = sorted.collect();
        let from_map: Vec<(Key, Candidates)> = map.into_iter().collect();
        prop_assert_eq!(from_log, from_map);
    }

    #[test]
    fn is_ancestor_agrees_with_ancestors(anc in any_key(), key in any_key()) {
        let listed = crate::resolve::ancestors(key).contains(&anc);
        prop_assert_eq!(crate::resolve::is_ancestor(anc, key), listed);
    }
}

/// A CIDR subject world for the deny/allow overlap tests: endpoint `foo` in
/// `default`, one CIDR identity per prefix of the policies.
fn cidr_world(yaml: &str) -> (Vec<Policy>, Labels, IdentityCache) {
    let policies = parse_policies("overlap.yaml", yaml).expect("policies parse");
    let subject = Labels::from_pairs([("foo", ""), (NAMESPACE_LABEL, "default")]);
    let mut c = IdentityCache::new();
    c.insert_labels(303, subject.clone());
    c.insert_labels(
        reserved::WORLD,
        Labels::from_pairs([("reserved:world", "")]),
    );
    for (n, prefix) in crate::cidr_prefixes(&policies).into_iter().enumerate() {
        c.insert_cidr(LOCAL_CIDR_IDENTITY_BASE + n as u32, prefix);
    }
    (policies, subject, c)
}

/// Every egress (peer, proto, port) in `ports` evaluates on the map as the
/// reference says; returns the number of denied packets (so a test can check
/// that deny rules took part).
fn assert_egress_matches_reference(
    policies: &[Policy],
    subject: &Labels,
    c: &IdentityCache,
    ports: impl Iterator<Item = u16> + Clone,
) -> usize {
    let resolved = resolve(policies, subject, c);
    let mut denied = 0;
    for peer in all_peers(c) {
        for proto in [6u8, 17] {
            for port in ports.clone() {
                let want = reference(policies, subject, c, Direction::Egress, peer, proto, port);
                let got = evaluate(&resolved, Direction::Egress, peer, proto, port).verdict;
                assert_eq!(got, want, "peer {peer} proto {proto} port {port}");
                denied += usize::from(got == Verdict::Deny);
            }
        }
    }
    denied
}

#[test]
fn deny_cidr_ports_inside_allow_cidr_ports_win_for_every_packet() {
    // The shape of Cilium's CIDR deny benchmark, scaled down: allow and deny
    // CIDRs of /8 to /32 nested in one another, each with its own TCP port.
    let mut yaml = String::new();
    let nets = [
        ("10.0.0.0/8", "10.1.0.0/16"),
        ("10.1.0.0/16", "10.1.2.0/24"),
        ("10.1.2.0/24", "10.1.2.16/28"),
        ("10.1.2.16/28", "10.1.2.17/32"),
        ("192.0.2.0/24", "10.0.0.0/8"),
        ("10.1.2.17/32", "10.0.0.0/8"),
    ];
    for (i, (allow, deny)) in nets.iter().enumerate() {
        let (a, d) = (80 + i % 3, 81 + i % 2);
        yaml.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: cidr-{i}, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{foo: ''}}}}\n  egress:\n  - toCIDR: ['{allow}']\n    toPorts: [{{ports: [{{port: '{a}', protocol: TCP}}]}}]\n  egressDeny:\n  - toCIDR: ['{deny}']\n    toPorts: [{{ports: [{{port: '{d}', protocol: TCP}}]}}]\n"
        ));
    }
    let (policies, subject, c) = cidr_world(&yaml);
    let denied = assert_egress_matches_reference(&policies, &subject, &c, 78..86);
    assert!(denied > 0);
}

#[test]
fn deny_port_ranges_over_many_allow_ranges_of_one_identity_match_the_reference() {
    // More shorter port prefixes in one (direction, identity) group than the
    // normalizer scans linearly: its map-lookup path decides.
    let mut ranges = String::new();
    for i in 0..20u32 {
        let first = 1000 + i * 37;
        ranges.push_str(&format!(
            "{{port: '{first}', endPort: {}, protocol: TCP}}, ",
            first + 30
        ));
    }
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: ranges, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{foo: ''}}}}\n  egress:\n  - toCIDR: ['10.0.0.0/8']\n    toPorts: [{{ports: [{ranges}]}}]\n  egressDeny:\n  - toCIDR: ['10.1.0.0/16']\n    toPorts: [{{ports: [{{port: '1100', endPort: 1300, protocol: TCP}}, {{port: '1500', protocol: TCP}}]}}]\n  - toCIDR: ['10.0.0.0/8']\n    toPorts: [{{ports: [{{port: '1024', endPort: 1031, protocol: TCP}}]}}]\n"
    );
    let (policies, subject, c) = cidr_world(&yaml);
    let resolved = resolve(&policies, &subject, &c);
    let widest = resolved
        .entries
        .iter()
        .filter(|e| e.identity == LOCAL_CIDR_IDENTITY_BASE && e.port_prefix_len < 16)
        .count();
    assert!(widest > 32, "only {widest} port prefixes in the group");
    let denied = assert_egress_matches_reference(&policies, &subject, &c, 990..1760);
    assert!(denied > 0);
}

proptest! {
    #[test]
    fn selection_by_label_key_index_equals_a_scan_after_any_changes(
        changes in prop::collection::vec(
            (0u32..6, prop::option::of(prop::sample::subsequence(vec!["app", "bar", "tier"], 0..3))),
            0..24,
        ),
    ) {
        let mut c = IdentityCache::new();
        for (id, keys) in changes {
            match keys {
                Some(keys) => c.insert_labels(
                    100 + id,
                    Labels::from_pairs(
                        keys.into_iter()
                            .map(|k| (k.to_string(), "x".to_string()))
                            .chain([(NAMESPACE_LABEL.to_string(), "default".to_string())]),
                    ),
                ),
                None => {
                    c.remove_labels(100 + id);
                }
            }
        }
        let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: sel, namespace: default}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: x}}, {matchExpressions: [{key: bar, operator: Exists}, {key: tier, operator: DoesNotExist}]}, {matchExpressions: [{key: app, operator: NotIn, values: [y]}]}]\n";
        let policies = parse_policies("sel.yaml", yaml).expect("policy parses");
        for peer in &policies[0].rules[0].ingress[0].peers {
            let Peer::Selector(sel) = peer else { continue };
            let indexed: Vec<IdentityId> = c.select(sel).collect();
            let scanned: Vec<IdentityId> = c
                .label_identities()
                .filter(|(_, l)| sel.matches(l))
                .map(|(id, _)| id)
                .collect();
            prop_assert_eq!(indexed, scanned);
        }
    }
}

/// Equal subject selectors of one parse share an allocation (resolution
/// matches each distinct one once), and a rule whose selector differs is
/// still matched on its own, wherever it stands between shared ones.
#[test]
fn equal_subject_selectors_are_shared_and_each_distinct_one_still_decides() {
    let spec = |app: &str, port: u16| {
        format!(
            "- endpointSelector: {{matchLabels: {{app: {app}}}}}\n  egress:\n  - toEntities: [all]\n    toPorts: [{{ports: [{{port: '{port}', protocol: TCP}}]}}]\n"
        )
    };
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: a, namespace: prod}}\nspecs:\n{}{}{}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: b, namespace: prod}}\nspecs:\n{}",
        spec("web", 80),
        spec("db", 5432),
        spec("web", 443),
        spec("web", 8080),
    );
    let policies = parse_policies("shared.yaml", &yaml).expect("policies parse");
    let subjects: Vec<&std::sync::Arc<crate::labels::Selector>> = policies
        .iter()
        .flat_map(|p| &p.rules)
        .map(|r| &r.subject)
        .collect();
    assert!(std::sync::Arc::ptr_eq(subjects[0], subjects[2]));
    assert!(std::sync::Arc::ptr_eq(subjects[0], subjects[3]));
    assert!(!std::sync::Arc::ptr_eq(subjects[0], subjects[1]));

    let c = cache();
    let peer = 1000;
    // The allowed ports of an endpoint the policies select (None: not selected).
    let ports = |subject: &Labels| -> Option<Vec<u16>> {
        let resolved = resolve(&policies, subject, &c);
        resolved.egress_enforced.then(|| {
            [80, 443, 5432, 8080]
                .into_iter()
                .filter(|p| {
                    evaluate(&resolved, Direction::Egress, peer, 6, *p).verdict == Verdict::Allow
                })
                .collect()
        })
    };
    assert_eq!(
        ports(&endpoint("prod", Some("web"))),
        Some(vec![80, 443, 8080])
    );
    assert_eq!(ports(&endpoint("prod", Some("db"))), Some(vec![5432]));
    assert_eq!(ports(&endpoint("dev", Some("web"))), None);
}

/// Prefixes drawn so that many share a network address at different
/// lengths (10.0.0.0/8, /16, /24 …), the case the prefix index's run
/// boundary must get right, in both families.
fn nested_prefix() -> impl Strategy<Value = IpNet> {
    (prop::bool::ANY, 0u8..4, 0u8..=2, 0u8..=32).prop_map(|(v6, a, b, len)| {
        if v6 {
            let addr =
                std::net::Ipv6Addr::new(0x2001, 0xdb8, u16::from(a), u16::from(b), 0, 0, 0, 0);
            IpNet::V6(
                ipnet::Ipv6Net::new(addr, 32 + len * 2)
                    .expect("length")
                    .trunc(),
            )
        } else {
            let addr = std::net::Ipv4Addr::new(10, a, b, 0);
            IpNet::V4(ipnet::Ipv4Net::new(addr, len).expect("length").trunc())
        }
    })
}

proptest! {
    #[test]
    fn cidr_identities_within_equals_a_scan(
        prefixes in prop::collection::btree_set(nested_prefix(), 0..40),
        queries in prop::collection::vec(nested_prefix(), 1..10),
    ) {
        let mut c = IdentityCache::new();
        for (n, p) in prefixes.iter().enumerate() {
            c.insert_cidr(LOCAL_CIDR_IDENTITY_BASE + n as u32, *p);
        }
        for q in queries {
            let mut indexed = c.cidr_identities_within(&q).to_vec();
            indexed.sort_unstable();
            let scanned: Vec<IdentityId> = c
                .cidr_identities()
                .filter(|(_, p)| q.contains(*p))
                .map(|(id, _)| id)
                .collect();
            prop_assert_eq!(indexed, scanned, "within {}", q);
        }
    }
}
