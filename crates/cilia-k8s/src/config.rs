//! How the agent reaches the API server, and which node it is.
//!
//! Kubernetes is off unless configured: `--k8s-kubeconfig PATH`, or the
//! in-cluster service account (`KUBERNETES_SERVICE_HOST`/`_PORT` and the
//! token and CA under `/var/run/secrets/kubernetes.io/serviceaccount`) when
//! asked for. Nothing is guessed: a kubeconfig that does not load, or an
//! in-cluster setup that is incomplete, is an error naming what is missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::K8sError;

/// Where the client configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (the agent runs as a DaemonSet pod).
    InCluster,
}

/// The Kubernetes settings of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sConfig {
    /// Where the client configuration comes from.
    pub source: Source,
    /// This node's name: pods are watched with `spec.nodeName=<node>`.
    pub node_name: String,
    /// The cluster name in `io.cilium.k8s.policy.cluster`.
    pub cluster_name: String,
    /// How long start-up waits for the initial lists.
    pub sync_timeout: Duration,
}

/// The default of [`K8sConfig::sync_timeout`].
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The node name: the flag, else `K8S_NODE_NAME` (set from the downward
/// API in a DaemonSet), else the lowercased host name.
pub fn node_name(flag: Option<&str>, env_k8s_node_name: Option<&str>, hostname: &str) -> String {
    flag.or(env_k8s_node_name)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| hostname.trim().to_lowercase())
}

impl K8sConfig {
    /// The kube-rs client configuration.
    pub async fn client_config(&self) -> Result<kube::Config, K8sError> {
        match &self.source {
            Source::Kubeconfig(path) => kubeconfig(path).await,
            Source::InCluster => kube::Config::incluster().map_err(|e| {
                K8sError::InCluster(format!(
                    "{e} (the agent must run in a pod with a service account, or be given \
                     --k8s-kubeconfig)"
                ))
            }),
        }
    }

    /// A client for the API server (no request is made yet).
    pub async fn client(&self) -> Result<kube::Client, K8sError> {
        let config = self.client_config().await?;
        kube::Client::try_from(config).map_err(|e| K8sError::Client(e.to_string()))
    }
}

/// Loads a kubeconfig file's current context.
pub async fn kubeconfig(path: &Path) -> Result<kube::Config, K8sError> {
    let err = |reason: String| K8sError::Kubeconfig {
        path: path.display().to_string(),
        reason,
    };
    let file = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))
}
