//! The agent's side of the datapath interface ([`cilia_datapath::Datapath`],
//! implemented by `BpfDatapath` and, for tests, by
//! `cilia_datapath::fake::FakeDatapath`): the policy engine's resolution
//! turned into the datapath's rows. Encoding the rows into map keys and
//! values is `cilia_abi::rows`' alone.

/// The domain-level policy of a resolved policy: what
/// [`crate::policy::map_entries`] builds as raw map entries, for
/// [`cilia_datapath::Datapath::set_endpoint_policy`]. `cookies` numbers
/// its rules.
pub fn endpoint_policy(
    resolved: &cilia_policy::ResolvedPolicy,
    cookies: &mut crate::policy::RuleCookies,
    audit: bool,
    proxy_port: u16,
) -> cilia_abi::EndpointPolicy {
    let rule_cookies: Vec<u32> = resolved
        .rules
        .iter()
        .map(|r| cookies.cookie_of(r))
        .collect();
    cilia_abi::EndpointPolicy {
        enforcement: enforcement(resolved.ingress_enforced, resolved.egress_enforced, audit),
        entries: resolved
            .entries
            .iter()
            .map(|e| {
                let cookie = rule_cookies.get(e.rule as usize).copied().unwrap_or(0);
                policy_entry(e, cookie, proxy_port)
            })
            .collect(),
    }
}

/// The datapath row of one resolved entry, naming its rule by `cookie`; a
/// proxied entry names the L7 proxy's `proxy_port`.
pub fn policy_entry(
    e: &cilia_policy::MapEntry,
    cookie: u32,
    proxy_port: u16,
) -> cilia_abi::PolicyEntry {
    cilia_abi::PolicyEntry {
        direction: match e.direction {
            cilia_policy::Direction::Ingress => cilia_abi::Direction::Ingress,
            cilia_policy::Direction::Egress => cilia_abi::Direction::Egress,
        },
        identity: e.identity,
        proto: e.proto,
        port: e.port,
        port_prefix_len: e.port_prefix_len,
        verdict: match e.verdict {
            cilia_policy::Verdict::Allow => cilia_abi::Verdict::Allow,
            cilia_policy::Verdict::Deny => cilia_abi::Verdict::Deny,
        },
        rule: cookie,
        proxy_port: if e.proxy && e.verdict == cilia_policy::Verdict::Allow {
            proxy_port
        } else {
            0
        },
    }
}

/// The L7 entries of a merged policy, (ingress, egress), for the proxy:
/// the keys of its proxied map entries, each with what passes and the rules
/// behind it (named as in traces and flows).
pub fn l7_entries(
    merged: &cilia_policy::MergedPolicy,
) -> (
    Vec<cilia_proxy::control::L7Entry>,
    Vec<cilia_proxy::control::L7Entry>,
) {
    let (mut ingress, mut egress) = (Vec::new(), Vec::new());
    for ((direction, identity, proto, port, port_prefix_len), l7) in merged.l7_entries() {
        let entry = cilia_proxy::control::L7Entry {
            identity,
            proto,
            port,
            port_prefix_len,
            policy: l7.policy.clone(),
            rules: l7.rule_names(),
        };
        match direction {
            cilia_policy::Direction::Ingress => ingress.push(entry),
            cilia_policy::Direction::Egress => egress.push(entry),
        }
    }
    (ingress, egress)
}

/// An endpoint's enforcement; audit only means something in an enforced
/// direction, so it is off where none is.
pub fn enforcement(ingress: bool, egress: bool, audit: bool) -> cilia_abi::Enforcement {
    cilia_abi::Enforcement {
        ingress,
        egress,
        audit: audit && (ingress || egress),
    }
}

#[cfg(test)]
mod tests {
    use cilia_policy::{Direction, MapEntry, PolicyKind, ResolvedPolicy, RuleRef, Verdict};

    use super::*;
    use crate::policy::RuleCookies;

    fn rule(index: usize, deny: bool) -> RuleRef {
        RuleRef {
            policy: "prod/web".into(),
            kind: PolicyKind::CiliumNetworkPolicy,
            direction: Direction::Ingress,
            index,
            deny,
            spec: 0,
        }
    }

    fn entry(
        direction: Direction,
        identity: u32,
        proto: u8,
        port: u16,
        port_prefix_len: u8,
        verdict: Verdict,
        rule: u32,
    ) -> MapEntry {
        MapEntry {
            direction,
            identity,
            proto,
            port,
            port_prefix_len,
            verdict,
            rule,
            proxy: false,
        }
    }

    /// Every match kind, a port range, and an allow and a deny on one key.
    fn resolution() -> ResolvedPolicy {
        use Direction::*;
        use Verdict::*;
        ResolvedPolicy {
            ingress_enforced: true,
            egress_enforced: true,
            entries: vec![
                entry(Ingress, 300, 0, 0, 0, Allow, 0),
                entry(Ingress, 301, 17, 0, 0, Allow, 0),
                entry(Ingress, 302, 6, 80, 16, Allow, 0),
                entry(Ingress, 302, 6, 80, 16, Deny, 1),
                entry(Egress, 2, 6, 1024, 6, Allow, 0),
                entry(Egress, 2, 6, 8080, 16, Allow, 1),
            ],
            rules: vec![rule(0, false), rule(0, true)],
            l7: Default::default(),
        }
    }

    #[test]
    fn a_resolution_becomes_the_endpoints_policy_with_its_rule_cookies() {
        for audit in [false, true] {
            let mut cookies = RuleCookies::default();
            let policy = endpoint_policy(&resolution(), &mut cookies, audit, 15080);
            assert_eq!(policy.enforcement.audit, audit);
            assert_eq!(policy.entries.len(), resolution().entries.len());
            let named: Vec<Option<String>> = policy
                .entries
                .iter()
                .map(|e| cookies.name(e.rule))
                .collect();
            assert!(named.iter().all(Option::is_some), "{named:?}");
            let encoded = policy.encode();
            assert_eq!(
                cilia_abi::EndpointPolicy::decode(&encoded).encode(),
                encoded,
                "decoding the map loses nothing"
            );
        }
    }
}
