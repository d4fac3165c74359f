//! Label syntax, as in Kubernetes: `[prefix/]name=value`, where prefix is a
//! DNS subdomain (≤ 253), name and value are ≤ 63 characters of
//! `[A-Za-z0-9._-]` starting and ending alphanumeric (value may be empty).
//!
//! Labels are identity, so on top of the syntax an endpoint's own labels may
//! not use the keys the agent derives itself ([`reserved_key_reason`]), and
//! a label set holds at most [`MAX_LABELS`] entries. Errors are one line,
//! name the field and quote at most a short excerpt of the label.

use std::collections::BTreeMap;

use crate::limits::excerpt;
pub use crate::limits::MAX_LABELS;

/// The label the agent sets from an endpoint's namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of the labels the agent copies from the endpoint's namespace.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: label {label}: {reason}")]
pub struct LabelError {
    /// Where the labels came from (`labels`, `--labels`, `args.cni.labels`, …).
    pub field: String,
    /// Excerpt of the offending `key=value` (see [`crate::limits::excerpt`]).
    pub label: String,
    pub reason: String,
}

impl LabelError {
    fn new(label: &str, reason: impl Into<String>) -> Self {
        Self {
            field: "labels".to_string(),
            label: excerpt(label),
            reason: reason.into(),
        }
    }

    /// The same error, attributed to `field`.
    pub fn in_field(mut self, field: &str) -> Self {
        self.field = field.to_string();
        self
    }
}

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
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

/// Validates a label key.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if !valid_dns_subdomain(p) {
            return Err(format!(
                "key prefix {} is not a DNS subdomain (at most 253 characters)",
                excerpt(p)
            ));
        }
    }
    if !valid_segment(name) {
        return Err(format!(
            "key name {} must be 1-63 characters of [A-Za-z0-9._-], starting and ending alphanumeric",
            excerpt(name)
        ));
    }
    Ok(())
}

/// Validates a label value (may be empty).
pub fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() || valid_segment(value) {
        Ok(())
    } else {
        Err(format!(
            "value {} must be at most 63 characters of [A-Za-z0-9._-], starting and ending alphanumeric",
            excerpt(value)
        ))
    }
}

/// Why a key may not be set by a container, a CNI caller or an API caller,
/// or `None` when it may. Reserved: the namespace label and the namespace
/// labels prefix (the agent derives both from the endpoint's namespace, and
/// policies trust them to mean that), and any `source:` prefix (`k8s:`,
/// `any:`, `reserved:`, `cidr:` …), which only the agent gives labels.
/// Keys Kubernetes pods get from the agent (`io.cilium.k8s.policy.serviceaccount`,
/// `io.cilium.k8s.policy.cluster`): policies select service accounts by them,
/// so no endpoint may claim one itself.
pub const K8S_POLICY_LABELS_PREFIX: &str = "io.cilium.k8s.policy.";

pub fn reserved_key_reason(key: &str) -> Option<String> {
    if key == NAMESPACE_LABEL {
        return Some(format!(
            "key {NAMESPACE_LABEL} is reserved: the agent sets it from the endpoint's namespace"
        ));
    }
    if key.starts_with(NAMESPACE_LABELS_PREFIX) {
        return Some(format!(
            "keys starting with {NAMESPACE_LABELS_PREFIX} are reserved: the agent copies them from the namespace's labels"
        ));
    }
    if key.starts_with(K8S_POLICY_LABELS_PREFIX) {
        return Some(format!(
            "keys starting with {K8S_POLICY_LABELS_PREFIX} are reserved: the agent sets them from the Kubernetes pod (service account, cluster)"
        ));
    }
    if let Some((source, _)) = key.split_once(':') {
        return Some(format!(
            "label source prefix {}: is reserved: only the agent gives labels a source",
            excerpt(source)
        ));
    }
    None
}

/// Parses one `key=value` label (syntax only).
pub fn parse_label(label: &str) -> Result<(String, String), LabelError> {
    let err = |reason: String| LabelError::new(label, reason);
    let (key, value) = label
        .split_once('=')
        .ok_or_else(|| err("expected key=value".into()))?;
    validate_key(key).map_err(err)?;
    validate_value(value).map_err(err)?;
    Ok((key.to_string(), value.to_string()))
}

fn too_many(count: usize, first_extra: &str) -> LabelError {
    LabelError::new(
        first_extra,
        format!("{count} labels, more than the limit of {MAX_LABELS} (MAX_LABELS)"),
    )
}

/// Parses `k=v[,k=v…]` (as given to `--labels`); repeated keys and more
/// than [`MAX_LABELS`] labels are an error.
pub fn parse_labels(spec: &str) -> Result<BTreeMap<String, String>, LabelError> {
    let items: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items.len() > MAX_LABELS {
        return Err(too_many(items.len(), items[MAX_LABELS]));
    }
    let mut out = BTreeMap::new();
    for item in items {
        let (k, v) = parse_label(item)?;
        if out.contains_key(&k) {
            let reason = format!("key {} given twice", excerpt(&k));
            return Err(LabelError::new(item, reason));
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// Validates every entry of a label map (syntax and count).
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        let extra = labels
            .iter()
            .nth(MAX_LABELS)
            .map(|(k, v)| format!("{k}={v}"))
            .unwrap_or_default();
        return Err(too_many(labels.len(), &extra));
    }
    for (k, v) in labels {
        let err = |reason: String| LabelError::new(&format!("{k}={v}"), reason);
        validate_key(k).map_err(err)?;
        validate_value(v).map_err(err)?;
    }
    Ok(())
}

/// Validates an endpoint's own labels: syntax, count, and no reserved key.
pub fn validate_endpoint_labels(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    // Reserved keys first: `k8s:app` should say "reserved source", not "bad character".
    for (k, v) in labels {
        if let Some(reason) = reserved_key_reason(k) {
            return Err(LabelError::new(&format!("{k}={v}"), reason));
        }
    }
    validate_labels(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_list_of_labels() {
        let l = parse_labels("app=web, tier=front,example.com/team=net").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l["example.com/team"], "net");
    }

    #[test]
    fn empty_value_is_allowed() {
        assert_eq!(parse_labels("flag=").unwrap()["flag"], "");
    }

    #[test]
    fn malformed_labels_are_rejected_with_the_label_named() {
        for bad in [
            "app",
            "=web",
            "app=-web",
            "app=a b",
            "bad_prefix!/x=y",
            &format!("k={}", "a".repeat(64)),
        ] {
            let e = parse_labels(bad).unwrap_err();
            assert!(e.to_string().contains("label"), "{bad}: {e}");
        }
    }

    #[test]
    fn repeated_key_is_rejected() {
        assert!(parse_labels("a=1,a=2")
            .unwrap_err()
            .reason
            .contains("twice"));
    }

    #[test]
    fn a_64kb_value_gives_one_short_error_line() {
        let huge = format!("app={}", "a".repeat(65536));
        let e = parse_labels(&huge).unwrap_err().to_string();
        assert!(e.len() < 400, "{} bytes: {e}", e.len());
        assert!(!e.contains('\n'));
        assert!(e.starts_with("labels: label \"app=aaaa"), "{e}");
    }

    #[test]
    fn more_than_max_labels_are_refused_naming_the_limit() {
        let spec: Vec<String> = (0..10_000).map(|i| format!("k{i}=v")).collect();
        let e = parse_labels(&spec.join(",")).unwrap_err().to_string();
        assert!(e.contains("10000 labels, more than the limit of 64"), "{e}");
        let map: BTreeMap<String, String> =
            (0..10_000).map(|i| (format!("k{i}"), "v".into())).collect();
        let e = validate_endpoint_labels(&map).unwrap_err().to_string();
        assert!(e.contains("more than the limit of 64"), "{e}");
    }

    #[test]
    fn exactly_max_labels_are_accepted() {
        let map: BTreeMap<String, String> = (0..MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert!(validate_endpoint_labels(&map).is_ok());
    }

    #[test]
    fn reserved_keys_are_refused_naming_the_label() {
        for key in [
            "io.kubernetes.pod.namespace",
            "io.cilium.k8s.namespace.labels.team",
            "io.cilium.k8s.policy.serviceaccount",
            "io.cilium.k8s.policy.cluster",
            "reserved:host",
            "k8s:app",
            "any:app",
            "cidr:10.0.0.0/8",
        ] {
            let map = BTreeMap::from([(key.to_string(), "x".to_string())]);
            let e = validate_endpoint_labels(&map).unwrap_err();
            assert!(e.reason.contains("reserved"), "{key}: {e}");
            assert!(
                e.to_string().contains(key.split(':').next().unwrap()),
                "{e}"
            );
        }
    }

    #[test]
    fn ordinary_keys_that_resemble_reserved_ones_are_allowed() {
        let map = BTreeMap::from([
            ("io.kubernetes.pod.name".to_string(), "x".to_string()),
            ("example.com/namespace".to_string(), "x".to_string()),
            ("app".to_string(), "web".to_string()),
        ]);
        assert!(validate_endpoint_labels(&map).is_ok());
    }

    #[test]
    fn error_names_the_field_it_is_attributed_to() {
        let e = parse_labels("a=b c").unwrap_err().in_field("--labels");
        assert!(
            e.to_string().starts_with("--labels: label \"a=b c\": "),
            "{e}"
        );
    }
}
