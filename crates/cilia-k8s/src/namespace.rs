//! A namespace's labels, which every pod of it carries as
//! `io.cilium.k8s.namespace.labels.<key>` and which `namespaceSelector`
//! (NetworkPolicy) and namespace-label selectors (Cilium) match. A change is
//! applied live to the namespace's endpoints by the agent, as `cilia
//! namespace set` does today.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;

/// Why a namespace's labels cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("namespace {namespace}: {field}: {reason}")]
pub struct NamespaceError {
    /// `metadata.name`.
    pub namespace: String,
    /// The field at fault.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// What the agent needs of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceLabels {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// The namespace's labels, bare keys (`kubernetes.io/metadata.name`
    /// included: the API server sets it on every namespace, and
    /// NetworkPolicies select namespaces by it).
    pub labels: BTreeMap<String, String>,
}

impl NamespaceLabels {
    /// Reads a namespace object.
    pub fn from_namespace(ns: &Namespace) -> Result<NamespaceLabels, NamespaceError> {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let err = |field: String, reason: String| NamespaceError {
            namespace: name.clone(),
            field,
            reason,
        };
        if name.is_empty() {
            return Err(err("metadata.name".into(), "missing".into()));
        }
        let uid = ns
            .metadata
            .uid
            .clone()
            .ok_or_else(|| err("metadata.uid".into(), "missing".into()))?;
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        for (k, v) in &labels {
            let field = format!("metadata.labels[{k:?}]");
            // The prefixed key must stay a valid label key: its name part
            // (after the last '/') is the namespace label's own name part.
            cilia_api::labels::validate_key(k).map_err(|r| err(field.clone(), r))?;
            cilia_api::labels::validate_value(v).map_err(|r| err(field.clone(), r))?;
        }
        if labels.len() > cilia_api::labels::MAX_LABELS {
            return Err(err(
                "metadata.labels".into(),
                format!(
                    "{} labels, more than the limit of {}",
                    labels.len(),
                    cilia_api::labels::MAX_LABELS
                ),
            ));
        }
        Ok(NamespaceLabels { name, uid, labels })
    }

    /// The labels as they appear on the namespace's pods.
    pub fn on_pods(&self) -> BTreeMap<String, String> {
        crate::labels::namespace_labels_on_pod(&self.labels)
    }
}
