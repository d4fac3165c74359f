//! Client configuration and the node name.

use cilia_k8s::config::{kubeconfig, node_name, K8sConfig, Source};
use cilia_k8s::K8sError;

use crate::fixtures::path;

#[test]
fn node_name_is_the_flag_then_k8s_node_name_then_the_lowercased_host_name() {
    assert_eq!(node_name(Some("n1"), Some("n2"), "Host"), "n1");
    assert_eq!(node_name(None, Some("n2"), "Host"), "n2");
    assert_eq!(node_name(None, None, "Worker-7\n"), "worker-7");
    assert_eq!(node_name(Some(""), Some(" "), "h"), "h");
}

#[tokio::test]
async fn a_kubeconfig_file_gives_its_current_context() {
    let config = kubeconfig(&path("kubeconfig.yaml")).await.unwrap();
    assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:6443/");
    assert_eq!(config.default_namespace, "default");
    assert!(config.accept_invalid_certs);
}

#[tokio::test]
async fn a_missing_kubeconfig_is_an_error_naming_the_file() {
    let e = kubeconfig(std::path::Path::new("/nonexistent/kubeconfig"))
        .await
        .unwrap_err();
    assert!(matches!(e, K8sError::Kubeconfig { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("kubeconfig /nonexistent/kubeconfig: "),
        "{e}"
    );
}

#[tokio::test]
async fn in_cluster_configuration_outside_a_pod_says_what_to_do() {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        // Inside a pod the in-cluster configuration is there: nothing to refuse.
        return;
    }
    let c = K8sConfig {
        source: Source::InCluster,
        node_name: "n".into(),
        cluster_name: "default".into(),
        sync_timeout: cilia_k8s::config::DEFAULT_SYNC_TIMEOUT,
    };
    let e = c.client_config().await.unwrap_err().to_string();
    assert!(e.contains("--k8s-kubeconfig"), "{e}");
}
