//! Datapath-equivalent evaluation of a resolved policy, and verdict explanation.

use crate::l7::{CompiledL7, HttpOrigin, RequestView, ResolvedL7};
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
    /// Whether the packet goes to the L7 proxy: allowed, and the entry that
    /// allowed it — the peer's own hit when it allows, else the wildcard hit —
    /// has `proxy` set. A denied packet is never redirected.
    pub proxy: bool,
}

impl Evaluation {
    /// The entry whose `proxy` flag (and L7 policy) decides an allowed packet:
    /// the peer's own hit when it allows, else the wildcard hit when it allows.
    pub fn allowing_entry(&self) -> Option<MapEntry> {
        if self.verdict != Verdict::Allow {
            return None;
        }
        [self.identity_hit, self.wildcard_hit]
            .into_iter()
            .flatten()
            .find(|e| e.verdict == Verdict::Allow)
    }
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
/// either hit is an Allow entry, else Deny if the direction is enforced, else Allow. An
/// allowed packet goes to the L7 proxy when the peer's own hit allows it with `proxy`
/// set, or, without an allowing own hit, when the wildcard hit does.
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
    let mut ev = Evaluation {
        verdict,
        identity_hit,
        wildcard_hit,
        proxy: false,
    };
    ev.proxy = ev.allowing_entry().is_some_and(|e| e.proxy);
    ev
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

/// The L7 side of a verdict: whether the flow goes to the proxy and, for a
/// given request, what the HTTP rules decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTrace {
    /// Whether the flow is redirected to the L7 proxy.
    pub redirected: bool,
    /// The L7 policy of the entry that redirects it.
    pub l7: Option<ResolvedL7>,
    /// With a request on a redirected flow: whether the proxy lets it through.
    pub allowed: Option<bool>,
    /// The HTTP rule that allowed the request (none for allow-all, or when denied).
    pub matched: Option<HttpOrigin>,
    /// Human-readable explanation.
    pub reason: String,
}

/// The HTTP status and body the proxy answers a denied request with.
pub const HTTP_DENIED: &str = "403 Access denied";

/// Explains the L7 side of a flow: whether [`evaluate`] redirects it to the
/// proxy, and with `request`, whether the proxy lets the request through and
/// by which HTTP rule — decided by the proxy's own matcher ([`CompiledL7`]).
pub fn trace_http(
    resolved: &ResolvedPolicy,
    direction: Direction,
    peer: IdentityId,
    proto: u8,
    dport: u16,
    request: Option<&dyn RequestView>,
) -> HttpTrace {
    let ev = evaluate(resolved, direction, peer, proto, dport);
    let l7 = ev
        .allowing_entry()
        .filter(|e| e.proxy)
        .and_then(|e| resolved.l7.get(&e.key()))
        .cloned();
    let Some(l7) = l7 else {
        return HttpTrace {
            redirected: false,
            l7: None,
            allowed: None,
            matched: None,
            reason: match ev.verdict {
                Verdict::Deny => "not redirected to the L7 proxy: the flow is denied".into(),
                Verdict::Allow => "not redirected to the L7 proxy: no HTTP rule covers it".into(),
            },
        };
    };
    let Some(request) = request else {
        let reason = match &l7.policy {
            crate::l7::L7Policy::AllowAll => "redirected to the L7 proxy; every request is \
                 allowed (an L4-only rule covers the port too)"
                .to_string(),
            crate::l7::L7Policy::Http(rules) => format!(
                "redirected to the L7 proxy; {} HTTP rule(s) decide per request",
                rules.len()
            ),
        };
        return HttpTrace {
            redirected: true,
            l7: Some(l7),
            allowed: None,
            matched: None,
            reason,
        };
    };
    let (allowed, matched, reason) = match CompiledL7::compile(&l7.policy) {
        // Parsing compiled every rule already; a failure here would be a bug,
        // and the proxy would refuse the policy: report it, deny.
        Err(e) => (
            false,
            None,
            format!("denied: the HTTP rules do not compile ({e})"),
        ),
        Ok(compiled) => match compiled.decide(request) {
            None => (
                false,
                None,
                format!("denied ({HTTP_DENIED}): no HTTP rule matches the request"),
            ),
            Some(_) if matches!(compiled, CompiledL7::AllowAll) => (
                true,
                None,
                "allowed: an L4-only rule covers the port, every request passes".to_string(),
            ),
            Some(i) => {
                let origin = l7.origins.get(i).cloned();
                let by = origin
                    .as_ref()
                    .map_or_else(|| format!("http rule {i}"), ToString::to_string);
                (true, origin, format!("allowed by {by}"))
            }
        },
    };
    HttpTrace {
        redirected: true,
        l7: Some(l7),
        allowed: Some(allowed),
        matched,
        reason,
    }
}
