//! Bounds on the work a policy set may ask for.
//!
//! Resolution costs grow with the rules, peers and CIDRs of every policy
//! (each CIDR becomes an identity, an ipcache entry and policy map entries
//! on every endpoint it concerns), so an import is refused, naming the
//! limit, before anything is resolved or allocated. The text itself is
//! bounded first, so no limit ever needs a huge document parsed to be
//! checked. The bounds are far above what real clusters write (Cilium's
//! own scale tests use policies of a few hundred CIDRs).

use crate::model::{Peer, PeerRule};
use crate::Policy;

/// Largest policy text [`crate::parse_policies`] reads (one import).
pub const MAX_POLICY_BYTES: usize = 4 << 20;
/// Most rules (entries of `ingress`, `egress`, `ingressDeny`, `egressDeny`,
/// over every spec) in the whole policy set.
pub const MAX_RULES: usize = 100_000;
/// Most peers (endpoint selectors, CIDRs, entities) in the whole policy set.
pub const MAX_PEERS: usize = 200_000;
/// Most CIDR prefixes (CIDRs and their `except` prefixes) in the whole policy set:
/// one endpoint policy map's capacity (`CILIA_POLICY_MAX`), so a node can load the
/// 100,000 CIDR rules of the scale benchmark (`bench/policy-scale.sh`).
pub const MAX_CIDRS: usize = 131_072;
/// Most port ranges in the whole policy set.
pub const MAX_PORTS: usize = 200_000;
/// Most HTTP rules (`toPorts[].rules.http[]` entries) in the whole policy set:
/// each holds up to three regular expressions, every one compiled at import and
/// in the proxy, each within [`crate::l7::REGEX_SIZE_LIMIT`].
pub const MAX_HTTP_RULES: usize = 20_000;

/// A policy set over one of the bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the policy set would hold {count} {what}, more than the limit of {limit} ({name})")]
pub struct LimitError {
    /// What was counted (`rules`, `peers`, `CIDR prefixes`, `port ranges`, `HTTP rules`).
    pub what: &'static str,
    /// How many the set would hold.
    pub count: usize,
    /// The bound.
    pub limit: usize,
    /// The constant's name, for the docs' "Input limits" table.
    pub name: &'static str,
}

/// What a policy set asks for; add policies one by one with [`Budget::add`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    /// Rules counted so far.
    pub rules: usize,
    /// Peers counted so far.
    pub peers: usize,
    /// CIDR prefixes counted so far.
    pub cidrs: usize,
    /// Port ranges counted so far.
    pub ports: usize,
    /// HTTP rules counted so far.
    pub http_rules: usize,
}

impl Budget {
    /// Counts `policy` in, and fails as soon as a bound is passed.
    pub fn add(&mut self, policy: &Policy) -> Result<(), LimitError> {
        for rule in &policy.rules {
            for section in [
                &rule.ingress,
                &rule.ingress_deny,
                &rule.egress,
                &rule.egress_deny,
            ] {
                section.iter().for_each(|pr| self.count(pr));
            }
        }
        self.check()
    }

    fn count(&mut self, pr: &PeerRule) {
        self.rules += 1;
        self.peers += pr.peers.len();
        self.ports += pr.ports.len() + pr.named.len();
        // The HTTP rules of a `toPorts` entry are shared by its ports: count each list once.
        let mut lists: Vec<&std::sync::Arc<crate::model::PortL7>> = Vec::new();
        for (_, l7) in &pr.l7 {
            if !lists.iter().any(|seen| std::sync::Arc::ptr_eq(seen, l7)) {
                lists.push(l7);
            }
        }
        self.http_rules += lists.iter().map(|l| l.http.len()).sum::<usize>();
        for peer in &pr.peers {
            if let Peer::Cidr { except, .. } = peer {
                self.cidrs += 1 + except.len();
            }
        }
    }

    fn check(&self) -> Result<(), LimitError> {
        for (what, count, limit, name) in [
            // The most specific bound first: a CIDR list says "CIDR prefixes".
            ("CIDR prefixes", self.cidrs, MAX_CIDRS, "MAX_CIDRS"),
            ("rules", self.rules, MAX_RULES, "MAX_RULES"),
            ("peers", self.peers, MAX_PEERS, "MAX_PEERS"),
            ("port ranges", self.ports, MAX_PORTS, "MAX_PORTS"),
            (
                "HTTP rules",
                self.http_rules,
                MAX_HTTP_RULES,
                "MAX_HTTP_RULES",
            ),
        ] {
            if count > limit {
                return Err(LimitError {
                    what,
                    count,
                    limit,
                    name,
                });
            }
        }
        Ok(())
    }
}

/// Checks a whole policy set (for example the stored policies plus an import).
pub fn check_limits<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Result<(), LimitError> {
    let mut budget = Budget::default();
    policies.into_iter().try_for_each(|p| budget.add(p))
}

/// Refuses a policy text longer than [`MAX_POLICY_BYTES`], before parsing.
pub(crate) fn check_text(yaml: &str) -> Result<(), String> {
    if yaml.len() > MAX_POLICY_BYTES {
        return Err(format!(
            "the policy text is {} bytes, more than the limit of {MAX_POLICY_BYTES} (MAX_POLICY_BYTES)",
            yaml.len()
        ));
    }
    Ok(())
}
