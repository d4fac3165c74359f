//! Shared fixtures: a small cluster of identities and helpers to resolve/evaluate.
#![allow(dead_code)]

use std::collections::BTreeMap;

use cilia_policy::{
    cidr_prefixes, evaluate, parse_policies, reserved, resolve, Direction, IdentityCache,
    IdentityId, IpNet, Labels, Policy, ResolvedPolicy, Verdict, LOCAL_CIDR_IDENTITY_BASE,
    NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX,
};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;

#[allow(unused_imports)]
pub use Direction::{Egress, Ingress};
#[allow(unused_imports)]
pub use Verdict::{Allow, Deny};

/// default/web (namespace default has label team=a)
pub const WEB: IdentityId = 100;
/// default/db
pub const DB: IdentityId = 101;
/// other/web (namespace other has label team=b)
pub const OTHER_WEB: IdentityId = 102;
/// other/client
pub const OTHER_CLIENT: IdentityId = 103;
/// kube-system/dns (namespace without team label)
pub const DNS: IdentityId = 104;
/// default pod without `app`, with tier=frontend
pub const FRONTEND: IdentityId = 105;
/// An identity the cache does not know (e.g. from a remote cluster not synced yet).
pub const UNKNOWN: IdentityId = 4242;

fn ns_labels(ns: &str) -> Vec<(String, String)> {
    let mut v = vec![(NAMESPACE_LABEL.to_string(), ns.to_string())];
    let team = match ns {
        "default" => Some("a"),
        "other" => Some("b"),
        _ => None,
    };
    if let Some(t) = team {
        v.push((format!("{NAMESPACE_LABELS_PREFIX}team"), t.to_string()));
    }
    v.push((
        format!("{NAMESPACE_LABELS_PREFIX}kubernetes.io/metadata.name"),
        ns.to_string(),
    ));
    v
}

pub fn pod(ns: &str, labels: &[(&str, &str)]) -> Labels {
    let mut l: BTreeMap<String, String> = ns_labels(ns).into_iter().collect();
    for (k, v) in labels {
        l.insert(k.to_string(), v.to_string());
    }
    Labels(l)
}

pub fn endpoints() -> Vec<(IdentityId, Labels)> {
    vec![
        (WEB, pod("default", &[("app", "web")])),
        (DB, pod("default", &[("app", "db")])),
        (OTHER_WEB, pod("other", &[("app", "web")])),
        (OTHER_CLIENT, pod("other", &[("app", "client")])),
        (DNS, pod("kube-system", &[("app", "dns")])),
        (FRONTEND, pod("default", &[("tier", "frontend")])),
    ]
}

pub fn subject(id: IdentityId) -> Labels {
    endpoints()
        .into_iter()
        .find(|(i, _)| *i == id)
        .map(|(_, l)| l)
        .expect("known endpoint")
}

/// A cluster: the endpoints above, reserved identities, and one CIDR identity per
/// prefix the policies need (plus a few extra prefixes).
pub struct World {
    pub policies: Vec<Policy>,
    pub cache: IdentityCache,
    pub cidr_ids: BTreeMap<IpNet, IdentityId>,
}

impl World {
    pub fn new(yaml: &str) -> World {
        let policies = parse_policies("test.yaml", yaml).expect("policies parse");
        let mut cache = IdentityCache::new();
        for (id, l) in endpoints() {
            cache.insert_labels(id, l);
        }
        for &(id, name) in reserved::NAMED {
            cache.insert_labels(id, reserved::labels(name));
        }
        let mut prefixes = cidr_prefixes(&policies);
        for extra in ["172.16.0.0/12", "10.9.9.9/32"] {
            prefixes.insert(extra.parse().expect("prefix"));
        }
        let mut cidr_ids = BTreeMap::new();
        for (n, p) in prefixes.into_iter().enumerate() {
            let id = LOCAL_CIDR_IDENTITY_BASE + n as u32;
            cache.insert_cidr(id, p);
            cidr_ids.insert(p, id);
        }
        World {
            policies,
            cache,
            cidr_ids,
        }
    }

    pub fn cidr(&self, prefix: &str) -> IdentityId {
        let p: IpNet = prefix.parse().expect("prefix");
        *self.cidr_ids.get(&p).expect("allocated CIDR identity")
    }

    pub fn resolve(&self, subject_id: IdentityId) -> ResolvedPolicy {
        resolve(&self.policies, &subject(subject_id), &self.cache)
    }
}

/// Resolves `yaml` for `subject_id` and checks each `(direction, peer, proto, port, verdict)`.
#[track_caller]
pub fn check(
    yaml: &str,
    subject_id: IdentityId,
    table: &[(Direction, IdentityId, u8, u16, Verdict)],
) {
    let w = World::new(yaml);
    check_world(&w, subject_id, table);
}

#[track_caller]
pub fn check_world(
    w: &World,
    subject_id: IdentityId,
    table: &[(Direction, IdentityId, u8, u16, Verdict)],
) {
    let rp = w.resolve(subject_id);
    for (i, &(dir, peer, proto, port, want)) in table.iter().enumerate() {
        let got = evaluate(&rp, dir, peer, proto, port).verdict;
        assert_eq!(
            got, want,
            "row {i}: {dir:?} peer={peer} proto={proto} port={port}\nentries: {:#?}",
            rp.entries
        );
    }
}

pub fn cnp(ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\n  namespace: {ns}\nspec:\n{}",
        indent(spec)
    )
}

pub fn ccnp(spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: cp\nspec:\n{}",
        indent(spec)
    )
}

pub fn np(ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: np\n  namespace: {ns}\nspec:\n{}",
        indent(spec)
    )
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

/// One `#[test]` per case of a verdict table: resolve the policy YAML for the subject
/// and check each `(direction, peer, proto, port, verdict)` row, as [`check`] does.
/// Each case keeps its own test name, so a failure names the behaviour that broke.
///
/// ```ignore
/// verdict_tests! {
///     /// Why the case matters (optional).
///     name_that_reads_like_a_spec: yaml_expr, SUBJECT => [(Ingress, DB, TCP, 80, Allow)];
///     // `|w|` names the World, for rows that need a CIDR identity.
///     other_name: yaml_expr, SUBJECT, |w| => [(Egress, w.cidr("10.0.0.0/8"), TCP, 1, Allow)];
/// }
/// ```
macro_rules! verdict_tests {
    ($(
        $(#[$meta:meta])*
        $name:ident: $yaml:expr, $subject:expr $(, |$w:ident|)? => $rows:expr;
    )*) => {$(
        $(#[$meta])*
        #[test]
        fn $name() {
            verdict_tests!(@run [$($w)?] $yaml, $subject, $rows);
        }
    )*};
    (@run [] $yaml:expr, $subject:expr, $rows:expr) => {
        check(&$yaml, $subject, &$rows)
    };
    (@run [$w:ident] $yaml:expr, $subject:expr, $rows:expr) => {{
        let $w = World::new(&$yaml);
        check_world(&$w, $subject, &$rows);
    }};
}
#[allow(unused_imports)]
pub(crate) use verdict_tests;
