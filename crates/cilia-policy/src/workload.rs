//! The policy-scale workload the benchmarks share (`cargo bench -p
//! cilia-policy --bench import`, the agent's import benchmark, and
//! `bench/policy-scale.sh`'s rule shape): it lives here so that every
//! benchmark measures the same policies.

/// Import `k` of a series of `chunk` rules each: never-matching `fromCIDR`
/// /32s and /128s (documentation prefixes) on TCP/8080 selecting
/// `app=server`; with `last`, the last rule is `fromEndpoints: app=client`.
pub fn scale_policy(k: usize, chunk: usize, last: bool) -> String {
    let cidr = |i: usize| {
        if i < 512 {
            format!("{}.{}/32", ["198.51.100", "203.0.113"][i / 256], i % 256)
        } else {
            format!("2001:db8:{:x}:{:x}::1/128", (i >> 16) & 0xffff, i & 0xffff)
        }
    };
    let ports = "    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n";
    let mut yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: policy-scale-{k}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: server\n  ingress:\n"
    );
    let rules = if last { chunk - 1 } else { chunk };
    for i in k * chunk..k * chunk + rules {
        yaml.push_str(&format!("  - fromCIDR:\n    - \"{}\"\n{ports}", cidr(i)));
    }
    if last {
        yaml.push_str("  - fromEndpoints:\n    - matchLabels:\n        app: client\n");
        yaml.push_str(ports);
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_policy_parses_with_its_rules() {
        let yaml = scale_policy(1, 100, true);
        assert_eq!(yaml.matches("fromCIDR").count(), 99);
        assert_eq!(yaml.matches("fromEndpoints").count(), 1);
        let policies = crate::parse_policies("scale.yaml", &yaml).unwrap();
        assert_eq!(policies.len(), 1);
        assert_eq!(policies[0].name, "policy-scale-1");
    }
}
