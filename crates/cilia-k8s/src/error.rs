//! Errors of the crate's I/O edges (configuration and the API server). The
//! translations have their own error types, which name the object and field.

/// Why talking to the API server, or setting up to, failed.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// The file given with `--k8s-kubeconfig`.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No kubeconfig was given and the in-cluster configuration is missing.
    #[error("in-cluster Kubernetes configuration: {0}")]
    InCluster(String),
    /// The client could not be built from a valid configuration.
    #[error("Kubernetes client: {0}")]
    Client(String),
    /// A request to the API server failed.
    #[error("Kubernetes API {kind}: {reason}")]
    Api {
        /// The resource asked for (`pods`, `ciliumnetworkpolicies`, …).
        kind: String,
        /// The server's or the transport's error.
        reason: String,
    },
}
