//! Datapath-equivalent evaluation of a resolved policy, and verdict explanation.

use crate::{Direction, IdentityId, MapEntry, ResolvedPolicy, RuleRef, Verdict};

/// Result of [`evaluate`]: the verdict and the entries the two lookups returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// Final verdict.
    pub verdict: Verdict,
    /// Longest match for the real peer identity.
    pub identity_hit: Option<MapEntry>,
    /// Longest match for identity 0 ("any identity").
    pub wildcard_hit: Option<MapEntry>,
}

/// Longest-prefix match among entries for one exact (direction, identity).
fn lookup(
    entries: &[MapEntry],
    direction: Direction,
    identity: IdentityId,
    proto: u8,
    port: u16,
) -> Option<MapEntry> {
    entries
        .iter()
        .filter(|e| e.matches(direction, identity, proto, port))
        .max_by_key(|e| e.prefix_len())
        .copied()
}

/// Evaluates a packet exactly as the datapath does (this is the datapath's spec):
/// two LPM lookups — one with the peer identity, one with identity 0 — each returning the
/// longest matching entry; the verdict is Deny if either hit is a Deny entry, else Allow if
/// either hit is an Allow entry, else Deny if the direction is enforced, else Allow.
pub fn evaluate(
    resolved: &ResolvedPolicy,
    direction: Direction,
    peer: IdentityId,
    proto: u8,
    dport: u16,
) -> Evaluation {
    let identity_hit = if peer == 0 {
        None
    } else {
        lookup(&resolved.entries, direction, peer, proto, dport)
    };
    let wildcard_hit = lookup(&resolved.entries, direction, 0, proto, dport);
    let hits = [identity_hit, wildcard_hit];
    let has = |v: Verdict| hits.iter().flatten().any(|e| e.verdict == v);
    let verdict = if has(Verdict::Deny) {
        Verdict::Deny
    } else if has(Verdict::Allow) {
        Verdict::Allow
    } else if resolved.enforced(direction) {
        Verdict::Deny
    } else {
        Verdict::Allow
    };
    Evaluation {
        verdict,
        identity_hit,
        wildcard_hit,
    }
}

/// Explanation of a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceResult {
    /// The verdict (same as [`evaluate`]).
    pub verdict: Verdict,
    /// Rules of the map entries that decided the verdict (empty for default verdicts).
    pub deciding_rules: Vec<RuleRef>,
    /// Human-readable reason.
    pub reason: String,
}

/// Explains the verdict for a packet, computed with [`evaluate`] from the resolved state.
pub fn trace(
    resolved: &ResolvedPolicy,
    direction: Direction,
    peer: IdentityId,
    proto: u8,
    dport: u16,
) -> TraceResult {
    let ev = evaluate(resolved, direction, peer, proto, dport);
    let dir = match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let mut deciding_rules: Vec<RuleRef> = Vec::new();
    for hit in [ev.identity_hit, ev.wildcard_hit].into_iter().flatten() {
        if hit.verdict != ev.verdict {
            continue;
        }
        if let Some(r) = resolved.rules.get(hit.rule as usize) {
            if !deciding_rules.contains(r) {
                deciding_rules.push(r.clone());
            }
        }
    }
    let reason = if deciding_rules.is_empty() {
        match ev.verdict {
            Verdict::Deny => format!(
                "default deny: the endpoint is selected by a policy for {dir} and no rule matched"
            ),
            Verdict::Allow => {
                format!("default allow: no policy puts the endpoint into default deny for {dir}")
            }
        }
    } else {
        let verb = match ev.verdict {
            Verdict::Allow => "allowed",
            Verdict::Deny => "denied",
        };
        let names: Vec<String> = deciding_rules.iter().map(ToString::to_string).collect();
        format!("{verb} by {}", names.join(", "))
    };
    TraceResult {
        verdict: ev.verdict,
        deciding_rules,
        reason,
    }
}
