//! Bounds on the policy set: an import that would exceed them is refused,
//! naming the limit, quickly and before anything grows.

use std::time::{Duration, Instant};

use cilia_policy::limits::{MAX_CIDRS, MAX_HTTP_RULES, MAX_POLICY_BYTES, MAX_RULES};
use cilia_policy::{check_limits, parse_policies};

/// A CNP in `default` allowing egress to `n` distinct /32s.
fn cidr_policy(name: &str, n: usize) -> String {
    let mut yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  endpointSelector: {{}}\n  egress:\n  - toCIDR:\n"
    );
    for i in 0..n {
        let i = i as u32;
        yaml.push_str(&format!(
            "    - 10.{}.{}.{}/32\n",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
    }
    yaml
}

/// A limit is a cheap refusal: well within this on a loaded 2-CPU debug build.
const QUICK: Duration = Duration::from_secs(3);

#[test]
fn a_million_cidrs_are_refused_within_seconds_naming_the_limit() {
    let yaml = cidr_policy("huge", 1_000_000);
    let started = Instant::now();
    let e = parse_policies("huge.yaml", &yaml).unwrap_err().to_string();
    assert!(started.elapsed() < QUICK, "took {:?}", started.elapsed());
    assert!(e.contains("MAX_POLICY_BYTES"), "{e}");
    assert!(e.contains(&MAX_POLICY_BYTES.to_string()), "{e}");
    assert!(!e.contains('\n') && e.len() < 300, "{e}");
}

#[test]
fn one_cidr_over_the_limit_is_refused_naming_the_limit() {
    let yaml = cidr_policy("over", MAX_CIDRS + 1);
    assert!(
        yaml.len() < MAX_POLICY_BYTES,
        "the text bound is not what refuses"
    );
    let started = Instant::now();
    let e = parse_policies("over.yaml", &yaml).unwrap_err().to_string();
    assert!(started.elapsed() < QUICK, "took {:?}", started.elapsed());
    assert!(
        e.contains(&format!(
            "{} CIDR prefixes, more than the limit of {MAX_CIDRS} (MAX_CIDRS)",
            MAX_CIDRS + 1
        )),
        "{e}"
    );
}

#[test]
fn cidrs_up_to_the_limit_are_accepted() {
    let policies = parse_policies("max.yaml", &cidr_policy("max", MAX_CIDRS)).unwrap();
    assert!(check_limits(&policies).is_ok());
}

#[test]
fn the_limit_counts_the_whole_set_not_one_policy() {
    let half = MAX_CIDRS / 2 + 1;
    let a = parse_policies("a.yaml", &cidr_policy("a", half)).unwrap();
    let b = parse_policies("b.yaml", &cidr_policy("b", half)).unwrap();
    assert!(check_limits(&a).is_ok() && check_limits(&b).is_ok());
    let e = check_limits(a.iter().chain(&b)).unwrap_err();
    assert_eq!(e.name, "MAX_CIDRS");
    // The same across the documents of one import.
    let both = format!("{}---\n{}", cidr_policy("a", half), cidr_policy("b", half));
    let e = parse_policies("both.yaml", &both).unwrap_err().to_string();
    assert!(
        e.contains("document 2 (b)") && e.contains("MAX_CIDRS"),
        "{e}"
    );
}

#[test]
fn too_many_rules_are_refused_naming_the_limit() {
    let mut yaml = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: rules}\nspec:\n  endpointSelector: {}\n  ingress:\n",
    );
    for _ in 0..=MAX_RULES {
        yaml.push_str("  - {}\n");
    }
    let e = parse_policies("rules.yaml", &yaml).unwrap_err().to_string();
    assert!(e.contains("(MAX_RULES)"), "{e}");
}

#[test]
fn too_many_http_rules_are_refused_naming_the_limit() {
    let rules = vec!["{path: /x}"; MAX_HTTP_RULES + 1].join(", ");
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: l7}}\nspec:\n  endpointSelector: {{}}\n  ingress:\n  - toPorts: [{{ports: [{{port: '80', protocol: TCP}}], rules: {{http: [{rules}]}}}}]\n"
    );
    let e = parse_policies("l7.yaml", &yaml).unwrap_err().to_string();
    assert!(e.contains("MAX_HTTP_RULES"), "{e}");
    assert!(e.contains("HTTP rules"), "{e}");
}
