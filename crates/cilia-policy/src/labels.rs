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

    /// Whether any requirement is about a key starting with `prefix`.
    pub(crate) fn constrains_prefix(&self, prefix: &str) -> bool {
        self.requirements
            .iter()
            .any(|r| r.key().starts_with(prefix))
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

/// Prefix of the keys of reserved identities (`reserved:host` …).
pub(crate) const RESERVED_SOURCE: &str = "reserved:";

/// How much of a bad value an error quotes (same bound as the agent's API).
const EXCERPT_CHARS: usize = 64;

/// The first [`EXCERPT_CHARS`] characters of `value`, quoted and escaped,
/// with `…` and the full length when cut: errors stay one short line.
pub(crate) fn excerpt(value: &str) -> String {
    match value.char_indices().nth(EXCERPT_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// Longest message kept from a foreign error (serde's), which may quote a
/// whole value.
const MAX_MESSAGE_CHARS: usize = 200;

/// `message` cut to [`MAX_MESSAGE_CHARS`] characters, on one line.
pub(crate) fn shorten(message: &str) -> String {
    let line = message.replace(['\n', '\r'], " ");
    match line.char_indices().nth(MAX_MESSAGE_CHARS) {
        None => line,
        Some((cut, _)) => format!("{}… ({} bytes)", &line[..cut], line.len()),
    }
}

// Kubernetes label syntax (the same rules as `cilia_api::labels`; this crate
// stays free of the API crate): a key is `[prefix/]name`, prefix a DNS
// subdomain of at most 253 characters, name and value at most 63 characters
// of [A-Za-z0-9._-] starting and ending alphanumeric; a value may be empty.

fn valid_segment(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn valid_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

/// Validates a selector key and returns it normalized (see [`normalize_key`]).
/// A key may carry one label source: `k8s:`, `any:` or `reserved:`.
pub(crate) fn selector_key(key: &str) -> Result<String, String> {
    let bare = match key.split_once(':') {
        None => key,
        Some(("k8s" | "any" | "reserved", rest)) => rest,
        Some((source, _)) => {
            return Err(format!(
                "key {}: label source {} is not supported (k8s, any, reserved)",
                excerpt(key),
                excerpt(source)
            ))
        }
    };
    let (prefix, name) = match bare.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, bare),
    };
    if prefix.is_some_and(|p| !valid_dns_subdomain(p)) || !valid_segment(name) {
        return Err(format!(
            "key {} is not a valid label key ([prefix/]name: prefix a DNS subdomain of at most \
             253 characters, name 1-63 characters of [A-Za-z0-9._-] starting and ending \
             alphanumeric)",
            excerpt(key)
        ));
    }
    Ok(normalize_key(key))
}

/// Validates a selector value.
pub(crate) fn selector_value(value: &str) -> Result<(), String> {
    if value.is_empty() || valid_segment(value) {
        Ok(())
    } else {
        Err(format!(
            "value {} is not a valid label value (at most 63 characters of [A-Za-z0-9._-], \
             starting and ending alphanumeric)",
            excerpt(value)
        ))
    }
}
