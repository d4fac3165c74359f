//! Label selectors.

use std::collections::BTreeSet;

use crate::Labels;

/// One requirement of a selector. Keys are normalized (no `k8s:` / `any:` prefix).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Requirement {
    /// Key present with one of the values.
    In(String, BTreeSet<String>),
    /// Key absent, or present with none of the values.
    NotIn(String, BTreeSet<String>),
    /// Key present.
    Exists(String),
    /// Key absent.
    DoesNotExist(String),
}

impl Requirement {
    pub(crate) fn key(&self) -> &str {
        match self {
            Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }

    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(k, vs) => labels.0.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.0.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.0.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.0.contains_key(k),
        }
    }

    /// Same requirement on a different key.
    pub(crate) fn with_key(&self, key: String) -> Requirement {
        match self {
            Requirement::In(_, vs) => Requirement::In(key, vs.clone()),
            Requirement::NotIn(_, vs) => Requirement::NotIn(key, vs.clone()),
            Requirement::Exists(_) => Requirement::Exists(key),
            Requirement::DoesNotExist(_) => Requirement::DoesNotExist(key),
        }
    }
}

/// A conjunction of requirements; the empty selector matches every label set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Selector {
    pub(crate) requirements: Vec<Requirement>,
}

impl Selector {
    pub(crate) fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether any requirement is about `key`.
    pub(crate) fn constrains(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key() == key)
    }

    pub(crate) fn push(&mut self, r: Requirement) {
        if !self.requirements.contains(&r) {
            self.requirements.push(r);
        }
    }

    /// Canonical form (sorted, deduplicated) so equal selectors compare equal.
    pub(crate) fn canonical(mut self) -> Self {
        self.requirements.sort();
        self.requirements.dedup();
        self
    }
}

/// Strips a `k8s:` or `any:` label source prefix from a selector key.
pub(crate) fn normalize_key(key: &str) -> String {
    key.strip_prefix("k8s:")
        .or_else(|| key.strip_prefix("any:"))
        .unwrap_or(key)
        .to_string()
}
