//! Label syntax, as in Kubernetes: `[prefix/]name=value`, where prefix is a
//! DNS subdomain (≤ 253), name and value are ≤ 63 characters of
//! `[A-Za-z0-9._-]` starting and ending alphanumeric (value may be empty).

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label {label:?}: {reason}")]
pub struct LabelError {
    pub label: String,
    pub reason: String,
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
            return Err(format!("key prefix {p:?} is not a DNS subdomain"));
        }
    }
    if !valid_segment(name) {
        return Err(format!(
            "key name {name:?} must be 1-63 characters of [A-Za-z0-9._-], starting and ending alphanumeric"
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
            "value {value:?} must be at most 63 characters of [A-Za-z0-9._-], starting and ending alphanumeric"
        ))
    }
}

/// Parses one `key=value` label.
pub fn parse_label(label: &str) -> Result<(String, String), LabelError> {
    let err = |reason: String| LabelError {
        label: label.to_string(),
        reason,
    };
    let (key, value) = label
        .split_once('=')
        .ok_or_else(|| err("expected key=value".into()))?;
    validate_key(key).map_err(err)?;
    validate_value(value).map_err(err)?;
    Ok((key.to_string(), value.to_string()))
}

/// Parses `k=v[,k=v…]` (as given to `--labels`); repeated keys are an error.
pub fn parse_labels(spec: &str) -> Result<BTreeMap<String, String>, LabelError> {
    let mut out = BTreeMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = parse_label(item)?;
        if out.insert(k.clone(), v).is_some() {
            return Err(LabelError {
                label: item.to_string(),
                reason: format!("key {k:?} given twice"),
            });
        }
    }
    Ok(out)
}

/// Validates every entry of a label map.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    for (k, v) in labels {
        let err = |reason: String| LabelError {
            label: format!("{k}={v}"),
            reason,
        };
        validate_key(k).map_err(err)?;
        validate_value(v).map_err(err)?;
    }
    Ok(())
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
}
