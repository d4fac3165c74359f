//! A pod of this node, as the endpoint it becomes: who it is (namespace,
//! name, uid), the labels that make its identity, and the port names its
//! containers declare.
//!
//! A CNI ADD names the pod (`K8S_POD_NAMESPACE`, `K8S_POD_NAME` in
//! `CNI_ARGS`); the labels come from here, never from the runtime, so the
//! endpoint runs with the `init` identity until the pod is known, and a
//! label change on the pod moves the endpoint to its new identity. A pod this
//! module refuses (a reserved label, an invalid port name) keeps `init`: the
//! error says which pod, which label or port, and why.

use std::collections::BTreeMap;

use cilia_api::NamedPort;
use k8s_openapi::api::core::v1::{Container, Pod};

use crate::labels::{self, CLUSTER, POD_NAMESPACE, SERVICE_ACCOUNT};

/// The service account of a pod that names none (the API server's default).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Why a pod cannot be turned into endpoint labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod {pod}: {field}: {reason}")]
pub struct PodError {
    /// `namespace/name` (or what of it is known).
    pub pod: String,
    /// The field at fault: `metadata.labels["io.kubernetes.pod.namespace"]`,
    /// `spec.containers[0].ports[1].name`, …
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// What the agent needs of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEndpoint {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`: tells a pod from a later one of the same name.
    pub uid: String,
    /// `metadata.resourceVersion` of the object this was made from.
    pub resource_version: Option<String>,
    /// `spec.nodeName`: the node it is scheduled on, once it is.
    pub node_name: Option<String>,
    /// `spec.hostNetwork`: such a pod shares the node's namespace and is no endpoint.
    pub host_network: bool,
    /// `spec.serviceAccountName` (default `default`).
    pub service_account: String,
    /// The pod's own identity-relevant labels (bare keys, source `k8s`).
    pub labels: BTreeMap<String, String>,
    /// Keys of the pod's labels left out of the identity (see
    /// [`labels::is_identity_irrelevant`]), for `endpoint get` to show.
    pub ignored_labels: Vec<String>,
    /// Port names of the containers (`ports[].name`), checked and sorted.
    pub named_ports: Vec<NamedPort>,
}

impl PodEndpoint {
    /// Reads a pod object. Refuses a pod that claims a reserved label or
    /// declares an invalid or conflicting port name.
    pub fn from_pod(pod: &Pod) -> Result<PodEndpoint, PodError> {
        let meta = &pod.metadata;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        let err = |field: String, reason: String| PodError {
            pod: format!("{namespace}/{name}"),
            field,
            reason,
        };
        if namespace.is_empty() || name.is_empty() {
            return Err(err(
                "metadata".into(),
                "a pod needs metadata.namespace and metadata.name".into(),
            ));
        }
        let uid = meta
            .uid
            .clone()
            .ok_or_else(|| err("metadata.uid".into(), "missing".into()))?;

        let mut own = BTreeMap::new();
        let mut ignored = Vec::new();
        for (k, v) in meta.labels.iter().flatten() {
            let field = format!("metadata.labels[{k:?}]");
            if let Some(reason) = labels::reserved_key_reason(k) {
                return Err(err(field, reason));
            }
            cilia_api::labels::validate_key(k).map_err(|r| err(field.clone(), r))?;
            cilia_api::labels::validate_value(v).map_err(|r| err(field.clone(), r))?;
            if labels::is_identity_irrelevant(k) {
                ignored.push(k.clone());
            } else {
                own.insert(k.clone(), v.clone());
            }
        }
        // The agent's bound on an endpoint's label set, less the labels it
        // adds (service account, cluster).
        let room = cilia_api::labels::MAX_LABELS - 2;
        if own.len() > room {
            return Err(err(
                "metadata.labels".into(),
                format!(
                    "{} identity-relevant labels, more than the {room} an endpoint may carry",
                    own.len()
                ),
            ));
        }

        let spec = pod.spec.as_ref();
        let service_account = spec
            .and_then(|s| {
                s.service_account_name
                    .clone()
                    .or_else(|| s.service_account.clone())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string());
        let named_ports = match spec {
            Some(s) => named_ports(&s.containers, s.init_containers.as_deref().unwrap_or(&[]))
                .map_err(|(field, reason)| err(field, reason))?,
            None => Vec::new(),
        };
        Ok(PodEndpoint {
            namespace,
            name,
            uid,
            resource_version: meta.resource_version.clone(),
            node_name: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            service_account,
            labels: own,
            ignored_labels: ignored,
            named_ports,
        })
    }

    /// The endpoint's labels as the agent records them: the pod's own plus
    /// the service account and cluster labels (the namespace and its labels
    /// are added by the agent from the namespace, see [`Self::identity_labels`]).
    pub fn endpoint_labels(&self, cluster: &str) -> BTreeMap<String, String> {
        let mut out = self.labels.clone();
        out.insert(SERVICE_ACCOUNT.to_string(), self.service_account.clone());
        out.insert(CLUSTER.to_string(), cluster.to_string());
        out
    }

    /// Every label of the pod's identity: [`Self::endpoint_labels`], its
    /// namespace, and its namespace's labels.
    pub fn identity_labels(
        &self,
        cluster: &str,
        namespace_labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut out = self.endpoint_labels(cluster);
        out.insert(POD_NAMESPACE.to_string(), self.namespace.clone());
        out.extend(labels::namespace_labels_on_pod(namespace_labels));
        out
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The port names of the pod's containers and of its sidecar init containers
/// (`restartPolicy: Always`, which run beside them): a name twice is fine
/// with the same protocol and port. Errors carry the field path.
fn named_ports(
    containers: &[Container],
    init_containers: &[Container],
) -> Result<Vec<NamedPort>, (String, String)> {
    use cilia_policy::named;
    let sidecars = init_containers
        .iter()
        .enumerate()
        .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
        .map(|(i, c)| ("initContainers", i, c));
    let mut decls = Vec::new();
    for (list, i, c) in containers
        .iter()
        .enumerate()
        .map(|(i, c)| ("containers", i, c))
        .chain(sidecars)
    {
        for (j, p) in c.ports.iter().flatten().enumerate() {
            let Some(name) = &p.name else { continue };
            let field = format!("spec.{list}[{i}].ports[{j}]");
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            let port = u32::try_from(p.container_port).unwrap_or(0);
            let decl = named::named_port(name, protocol, port)
                .map_err(|e| (field.clone(), e.to_string()))?;
            decls.push((field, decl));
        }
    }
    if decls.len() > cilia_api::limits::MAX_NAMED_PORTS {
        return Err((
            "spec.containers".into(),
            format!(
                "{} named ports, more than the limit of {}",
                decls.len(),
                cilia_api::limits::MAX_NAMED_PORTS
            ),
        ));
    }
    // A name given twice must mean the same port (checked here to name both
    // fields; `endpoint_named_ports` below checks the same).
    let mut first: BTreeMap<&str, &(String, named::NamedPortDecl)> = BTreeMap::new();
    for d in &decls {
        match first.get(d.1.name.as_str()) {
            Some(prev) if (prev.1.proto, prev.1.port) != (d.1.proto, d.1.port) => {
                return Err((
                    d.0.clone(),
                    format!(
                        "port name {:?} is declared as {} here and as {} at {}",
                        d.1.name, d.1, prev.1, prev.0
                    ),
                ));
            }
            Some(_) => {}
            None => {
                first.insert(&d.1.name, d);
            }
        }
    }
    let ports = named::endpoint_named_ports(decls.iter().map(|(_, d)| d))
        .map_err(|e| ("spec.containers".to_string(), e.to_string()))?;
    Ok(ports
        .iter()
        .map(|(name, proto, port)| NamedPort {
            name: name.to_string(),
            protocol: named::protocol_name(proto),
            port,
        })
        .collect())
}
