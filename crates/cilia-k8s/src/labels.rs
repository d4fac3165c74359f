//! The labels Kubernetes objects give an endpoint, named as Cilium documents
//! them, so that policies written for Cilium select the same pods here.
//!
//! Keys are kept bare (`app`, not `k8s:app`), as everywhere in cilia: the
//! policy engine strips a selector's `k8s:`/`any:` source before matching.
//! Every label this module produces has the Kubernetes source ([`SOURCE`]);
//! [`with_source`] renders them the way Cilium shows them.
//!
//! Labels are identity, so a pod may not claim a key the agent derives
//! itself (its namespace, its namespace's labels, its service account, the
//! cluster): such a pod is refused, not silently relabelled. Labels that
//! Cilium documents as irrelevant for identity (hashes, per-pod indexes,
//! `kubernetes.io` keys) are left out of the identity, so that the pods of one
//! workload share one identity.

use std::collections::BTreeMap;

/// The source of every label taken from Kubernetes (`k8s:app=web`).
pub const SOURCE: &str = "k8s";
/// The pod's namespace.
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Prefix of the pod's namespace's labels, followed by the namespace label's key.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The pod's service account (`spec.serviceAccountName`).
pub const SERVICE_ACCOUNT: &str = "io.cilium.k8s.policy.serviceaccount";
/// The name of the cluster the pod runs in.
pub const CLUSTER: &str = "io.cilium.k8s.policy.cluster";
/// Prefix of the keys the agent derives for policy (service account, cluster).
pub const POLICY_PREFIX: &str = "io.cilium.k8s.policy.";
/// The cluster name when none is configured (Cilium's default too).
pub const DEFAULT_CLUSTER: &str = "default";

/// Why a key may not be a pod's own label, or `None` when it may: the keys
/// above, which the agent sets from the pod's namespace, service account and
/// cluster, and which policies trust to mean exactly that; and everything
/// the agent's own rules reserve for endpoints (`cilia_api::labels`).
pub fn reserved_key_reason(key: &str) -> Option<String> {
    if key.starts_with(POLICY_PREFIX) {
        return Some(format!(
            "keys starting with {POLICY_PREFIX} are reserved: the agent sets them from the \
             pod's service account and cluster"
        ));
    }
    cilia_api::labels::reserved_key_reason(key)
}

/// Label keys (prefixes) that do not make an identity, as Cilium's
/// "identity-relevant labels" documentation lists its defaults: a match is a
/// key starting with one of [`IRRELEVANT_PREFIXES`], or containing
/// `beta.kubernetes.io`.
pub const IRRELEVANT_PREFIXES: &[&str] = &[
    "io.kubernetes",
    "kubernetes.io",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
    "batch.kubernetes.io/controller-uid",
    "k8s.io",
    "pod-template-generation",
    "pod-template-hash",
    "controller-revision-hash",
    "controller-uid",
    "annotation",
    "etcd_node",
];

/// Whether a pod label is left out of the identity (see [`IRRELEVANT_PREFIXES`]).
pub fn is_identity_irrelevant(key: &str) -> bool {
    IRRELEVANT_PREFIXES.iter().any(|p| key.starts_with(p)) || key.contains("beta.kubernetes.io")
}

/// `k8s:key=value` for each label, as Cilium lists an endpoint's labels.
pub fn with_source(labels: &BTreeMap<String, String>) -> Vec<String> {
    labels
        .iter()
        .map(|(k, v)| format!("{SOURCE}:{k}={v}"))
        .collect()
}

/// The labels of a namespace as they appear on its pods:
/// `io.cilium.k8s.namespace.labels.<key>`.
pub fn namespace_labels_on_pod(
    namespace_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    namespace_labels
        .iter()
        .map(|(k, v)| (format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_and_sources_are_reserved() {
        for key in [
            "io.kubernetes.pod.namespace",
            "io.cilium.k8s.namespace.labels.team",
            "io.cilium.k8s.policy.serviceaccount",
            "io.cilium.k8s.policy.cluster",
            "io.cilium.k8s.policy.anything",
            "reserved:host",
        ] {
            assert!(reserved_key_reason(key).is_some(), "{key}");
        }
        for key in ["app", "app.kubernetes.io/name", "io.cilium.k8s.other"] {
            assert!(reserved_key_reason(key).is_none(), "{key}");
        }
    }

    #[test]
    fn documented_identity_irrelevant_labels_are_recognised() {
        for key in [
            "pod-template-hash",
            "controller-revision-hash",
            "statefulset.kubernetes.io/pod-name",
            "apps.kubernetes.io/pod-index",
            "batch.kubernetes.io/controller-uid",
            "batch.kubernetes.io/job-completion-index",
            "controller-uid",
            "kubernetes.io/hostname",
            "failure-domain.beta.kubernetes.io/zone",
            "k8s.io/foo",
            "io.kubernetes.container.name",
        ] {
            assert!(is_identity_irrelevant(key), "{key}");
        }
        for key in [
            "app",
            "app.kubernetes.io/name",
            "org",
            "job-name",
            "batch.kubernetes.io/job-name",
        ] {
            assert!(!is_identity_irrelevant(key), "{key}");
        }
    }

    #[test]
    fn labels_render_with_the_k8s_source() {
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        assert_eq!(with_source(&labels), vec!["k8s:app=web"]);
    }
}
