//! The policy subsystem. Its state and operations (import, delete,
//! regeneration, trace) are [`repository::PolicyState`]'s; this module is
//! the pure side it calls: imported YAML into stored documents and parsed
//! policies, rule cookies, map capacity checks.

pub mod cidr;
pub mod repository;

use std::collections::{BTreeMap, BTreeSet};

use cilia_abi::CILIA_POLICY_MAX;
use cilia_policy::{Policy, PolicyError, PolicyKind, ResolvedPolicy, RuleRef};

use crate::store::StoredPolicy;

/// An endpoint's port name declarations, checked (an IANA service name,
/// TCP/UDP/SCTP, 1-65535; a name twice only with the same value) and as
/// the record keeps them: protocols upper case, sorted, each once.
pub fn checked_named_ports(
    decls: &[cilia_api::NamedPort],
) -> Result<Vec<cilia_api::NamedPort>, cilia_policy::named::NamedPortError> {
    use cilia_policy::named;
    let checked = decls
        .iter()
        .map(|d| named::named_port(&d.name, &d.protocol, u32::from(d.port)))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = named::endpoint_named_ports(&checked)?;
    Ok(ports
        .iter()
        .map(|(name, proto, port)| cilia_api::NamedPort {
            name: name.to_string(),
            protocol: named::protocol_name(proto),
            port,
        })
        .collect())
}

/// The port names of an endpoint record (checked when it was created).
pub fn named_ports_of(decls: &[cilia_api::NamedPort]) -> cilia_policy::NamedPorts {
    let mut out = cilia_policy::NamedPorts::new();
    for d in decls {
        if let Some(proto) = cilia_policy::named::protocol_number(&d.protocol) {
            out.insert(d.name.clone(), proto, d.port);
        }
    }
    out
}

/// Kind names as users write them.
pub fn kind_name(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::NetworkPolicy => "NetworkPolicy",
        PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
        PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
    }
}

/// Why an import was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Parse(#[from] PolicyError),
    #[error("{file}: no policy documents found")]
    Empty { file: String },
    #[error("{file}: {kind} {name} is defined twice")]
    Duplicate {
        file: String,
        kind: &'static str,
        name: String,
    },
    #[error("{file}: {source}")]
    Limit {
        file: String,
        source: cilia_policy::LimitError,
    },
    #[error("endpoint {endpoint}: the policies need {entries} policy map entries, more than the map's {max}")]
    TooLarge {
        endpoint: u16,
        entries: usize,
        max: usize,
    },
    #[error("ipcache: the policies' CIDRs and the node's addresses need {needed} entries, more than the map's {max}")]
    IpcacheFull { needed: usize, max: usize },
}

/// A parsed import: each policy with the document to store for it.
#[derive(Debug)]
pub struct ParsedImport {
    /// Documents read, empty ones included.
    pub documents: usize,
    /// 1-based indexes of empty documents (skipped).
    pub empty: Vec<usize>,
    pub policies: Vec<(StoredPolicy, Policy)>,
}

/// Parses an import: every document must be valid (all or nothing).
/// Documents come from the YAML library's own document stream, never from
/// splitting text, so a document starting on its `---` line is not lost;
/// each is stored in its normalised form, which parses back on its own.
pub fn parse_import(source: &str, yaml: &str) -> Result<ParsedImport, ImportError> {
    let stream = cilia_policy::parse_stream(source, yaml)?;
    let mut out: Vec<(StoredPolicy, Policy)> = Vec::new();
    for doc in stream.policies {
        let policy = doc.policy;
        let stored = StoredPolicy {
            kind: kind_name(policy.kind).into(),
            namespace: policy.namespace.clone(),
            name: policy.name.clone(),
            yaml: doc.yaml,
            origin: None,
        };
        if out.iter().any(|(s, _)| s.key() == stored.key()) {
            return Err(ImportError::Duplicate {
                file: source.into(),
                kind: kind_name(policy.kind),
                name: policy.qualified_name(),
            });
        }
        out.push((stored, policy));
    }
    if out.is_empty() {
        return Err(ImportError::Empty {
            file: source.into(),
        });
    }
    Ok(ParsedImport {
        documents: stream.documents,
        empty: stream.empty,
        policies: out,
    })
}

/// Parses stored policies (at start-up). A document that no longer parses is
/// reported, not fatal: the others still apply.
pub fn parse_stored(stored: &[StoredPolicy]) -> (Vec<Policy>, Vec<String>) {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for s in stored {
        match cilia_policy::parse_policies(&s.key(), &s.yaml) {
            Ok(p) => policies.extend(p),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (policies, errors)
}

/// A stored policy that no longer parses (found at start-up, e.g. after an
/// upgrade that tightened validation). Its selector is unknown, so it
/// closes every endpoint it could have selected: those of its namespace, or
/// every endpoint for a clusterwide policy (or one without a namespace).
/// Closed means enforced in both directions with nothing allowed — not
/// even what other policies allow, since the broken one may have held a
/// deny that overrode them. It never turns into allow-all; it stays closed
/// until the policy is re-imported in a valid form or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenPolicy {
    pub stored: StoredPolicy,
    pub error: String,
}

impl BrokenPolicy {
    /// The one namespace whose endpoints it may select; `None`: any.
    pub fn namespace_scope(&self) -> Option<&str> {
        let namespaced = self.stored.kind == kind_name(PolicyKind::NetworkPolicy)
            || self.stored.kind == kind_name(PolicyKind::CiliumNetworkPolicy);
        self.stored.namespace.as_deref().filter(|_| namespaced)
    }

    /// Whether it may select an endpoint of `namespace`.
    pub fn may_select(&self, namespace: &str) -> bool {
        self.namespace_scope().is_none_or(|ns| ns == namespace)
    }

    /// One line for `cilia status`: which policy, what closes, and why.
    pub fn describe(&self) -> String {
        let scope = match self.namespace_scope() {
            Some(ns) => format!("endpoints in namespace {ns}"),
            None => "all endpoints".to_string(),
        };
        format!(
            "{} {}{}: stored policy no longer parses; {scope} deny all traffic (both directions) until it is re-imported or deleted: {}",
            self.stored.kind,
            self.stored
                .namespace
                .as_deref()
                .map(|ns| format!("{ns}/"))
                .unwrap_or_default(),
            self.stored.name,
            self.error
        )
    }
}

/// The resolution of an endpoint closed by a broken policy: both directions
/// enforced, no entry allowing anything.
pub fn closed_resolution() -> ResolvedPolicy {
    ResolvedPolicy {
        ingress_enforced: true,
        egress_enforced: true,
        entries: Vec::new(),
        rules: Vec::new(),
        l7: Default::default(),
    }
}

/// The rule names behind the cookies, shared between the policy subsystem
/// (which adds them) and readers (the monitor, `bpf policy get`). Names are
/// only ever appended, so sharing costs a reader a short read lock per
/// lookup instead of a copy of every name per policy change.
#[derive(Debug, Clone, Default)]
pub struct RuleNames(std::sync::Arc<std::sync::RwLock<Vec<String>>>);

/// Two handles are equal when they share the list (or hold the same names).
impl PartialEq for RuleNames {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || {
            let a = self.0.read().unwrap_or_else(|p| p.into_inner());
            let b = other.0.read().unwrap_or_else(|p| p.into_inner());
            *a == *b
        }
    }
}

impl RuleNames {
    /// The name of the rule a cookie stands for (cookies count from 1).
    pub fn name(&self, cookie: u32) -> Option<String> {
        let names = self.0.read().unwrap_or_else(|p| p.into_inner());
        names.get((cookie as usize).checked_sub(1)?).cloned()
    }

    /// How many names there are: the largest cookie given.
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a name; returns its cookie.
    fn push(&self, name: String) -> u32 {
        let mut names = self.0.write().unwrap_or_else(|p| p.into_inner());
        names.push(name);
        names.len() as u32
    }
}

/// Stable rule cookies: every distinct rule gets a number once, for the
/// agent's lifetime, so an event carrying a cookie names the same rule
/// however many regenerations happen between the kernel writing it and the
/// monitor reading it.
#[derive(Debug, Default)]
pub struct RuleCookies {
    by_name: BTreeMap<String, u32>,
    names: RuleNames,
    /// Cookies by rule reference, so a regeneration of many rules does not
    /// format every rule's name again.
    by_rule: std::collections::HashMap<RuleRef, u32>,
}

impl RuleCookies {
    /// The cookie of a rule reference (its name's cookie).
    pub fn cookie_of(&mut self, rule: &RuleRef) -> u32 {
        if let Some(c) = self.by_rule.get(rule) {
            return *c;
        }
        let c = self.cookie(&rule.to_string());
        self.by_rule.insert(rule.clone(), c);
        c
    }

    /// The cookie of a rule (allocating one on first sight); never 0.
    pub fn cookie(&mut self, rule: &str) -> u32 {
        if let Some(c) = self.by_name.get(rule) {
            return *c;
        }
        let c = self.names.push(rule.to_string());
        self.by_name.insert(rule.to_string(), c);
        c
    }

    /// The rule a cookie stands for.
    pub fn name(&self, cookie: u32) -> Option<String> {
        self.names.name(cookie)
    }

    /// The names, shared: readers see names added later too.
    pub fn names(&self) -> RuleNames {
        self.names.clone()
    }
}

/// Capacities of the datapath maps a policy change fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries of one endpoint's policy map.
    pub policy_entries: usize,
    /// Entries of the ipcache.
    pub ipcache_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            policy_entries: CILIA_POLICY_MAX as usize,
            ipcache_entries: cilia_abi::CILIA_IPCACHE_MAX as usize,
        }
    }
}

/// Checks a resolution fits into an endpoint's policy map of `max` entries.
pub fn check_size(endpoint: u16, entries: usize, max: usize) -> Result<(), ImportError> {
    if entries > max {
        return Err(ImportError::TooLarge {
            endpoint,
            entries,
            max,
        });
    }
    Ok(())
}

/// Names of the policies selecting anything, for listings.
pub fn names(policies: &[Policy]) -> BTreeSet<String> {
    policies.iter().map(|p| p.qualified_name()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: a
spec:
  endpointSelector: {}
  ingress:
  - {}
---
# a comment-only document is skipped
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: b
  namespace: prod
spec:
  podSelector: {}
";

    #[test]
    fn an_import_keeps_each_document_with_its_policy() {
        let import = parse_import("t.yaml", TWO).unwrap();
        assert_eq!((import.documents, import.empty.clone()), (3, vec![2]));
        let parsed = import.policies;
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0.key(), "CiliumNetworkPolicy/default/a");
        assert_eq!(parsed[1].0.key(), "NetworkPolicy/prod/b");
        assert!(parsed[1].0.yaml.contains("podSelector"));
        let (reparsed, errors) =
            parse_stored(&parsed.iter().map(|p| p.0.clone()).collect::<Vec<_>>());
        assert!(errors.is_empty());
        assert_eq!(reparsed.len(), 2);
    }

    #[test]
    fn a_policy_defined_twice_in_one_import_is_refused() {
        let doc = TWO.split("---").next().unwrap();
        let twice = format!("{doc}---\n{doc}");
        let err = parse_import("t.yaml", &twice).unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");
    }

    #[test]
    fn a_deny_document_on_its_separator_line_is_imported_and_stored() {
        let deny = "--- {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: deny}, spec: {endpointSelector: {}, ingressDeny: [{fromEntities: [world]}]}}\n";
        let import = parse_import("t.yaml", &format!("{TWO}{deny}")).unwrap();
        let keys: Vec<String> = import.policies.iter().map(|p| p.0.key()).collect();
        assert_eq!(
            keys,
            [
                "CiliumNetworkPolicy/default/a",
                "NetworkPolicy/prod/b",
                "CiliumNetworkPolicy/default/deny"
            ]
        );
        let stored: Vec<StoredPolicy> = import.policies.iter().map(|p| p.0.clone()).collect();
        let (reparsed, errors) = parse_stored(&stored);
        assert!(errors.is_empty(), "{errors:?}");
        let originals: Vec<Policy> = import.policies.into_iter().map(|p| p.1).collect();
        assert_eq!(reparsed, originals);
    }

    #[test]
    fn empty_input_is_refused() {
        assert!(matches!(
            parse_import("t.yaml", "# nothing\n"),
            Err(ImportError::Empty { .. })
        ));
    }

    fn broken(kind: &str, namespace: Option<&str>) -> BrokenPolicy {
        BrokenPolicy {
            stored: StoredPolicy {
                kind: kind.into(),
                namespace: namespace.map(String::from),
                name: "old".into(),
                yaml: "spec: {}".into(),
                origin: None,
            },
            error: "spec.bogus: unknown field".into(),
        }
    }

    #[test]
    fn a_broken_namespaced_policy_may_select_only_its_namespace() {
        let b = broken("CiliumNetworkPolicy", Some("prod"));
        assert!(b.may_select("prod"));
        assert!(!b.may_select("default"));
        assert!(
            b.describe().contains("endpoints in namespace prod"),
            "{}",
            b.describe()
        );
        assert!(b.describe().contains("CiliumNetworkPolicy prod/old"));
        assert!(b.describe().contains("spec.bogus: unknown field"));
    }

    #[test]
    fn a_broken_clusterwide_or_unknown_policy_may_select_every_endpoint() {
        for b in [
            broken("CiliumClusterwideNetworkPolicy", None),
            broken("CiliumNetworkPolicy", None),
            broken("SomethingNew", Some("prod")),
        ] {
            assert!(b.may_select("default") && b.may_select("prod"), "{b:?}");
            assert!(b.describe().contains("all endpoints"), "{}", b.describe());
        }
    }

    #[test]
    fn a_closed_endpoint_denies_both_directions_with_no_allow_entry() {
        let entries = crate::datapath::endpoint_policy(
            &closed_resolution(),
            &mut RuleCookies::default(),
            false,
            cilia_proxy::control::DEFAULT_PROXY_PORT,
        )
        .encode();
        assert_eq!(entries.len(), 1, "the enforcement marker only");
        assert_eq!(
            cilia_abi::Enforcement::of(&entries),
            cilia_abi::Enforcement {
                ingress: true,
                egress: true,
                audit: false
            }
        );
    }
}
