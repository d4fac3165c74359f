//! Policy objects, as the API server sends them, into the documents
//! `cilia-policy` parses — the parser `cilia policy import` uses, so a
//! policy means the same whether it came from a file or from Kubernetes.
//!
//! The three kinds are read as untyped objects ([`DynamicObject`]): the spec
//! reaches the parser exactly as stored, so a field cilia does not support is
//! refused by name instead of being dropped by a typed client's schema. The
//! document handed to the parser holds the kind the object was watched as,
//! its name, namespace and labels, and every top-level field but `status`
//! (which the agent writes, see [`crate::status`]). The object's uid,
//! resourceVersion and generation are kept beside the policy as its
//! [`PolicySource`]; they are not in the document, so a status-only update
//! (new resourceVersion, same spec) gives the same document.

use cilia_policy::{Policy, PolicyKind};
use kube::core::{ApiResource, DynamicObject};
use serde_json::{Map, Value};

/// The label `cilia policy get` shows for policies from the API server.
pub const ORIGIN: &str = "kubernetes";

/// What the agent watches for each policy kind: group, version, kind, plural.
pub fn api_resource(kind: PolicyKind) -> ApiResource {
    let (group, kind_name, plural) = match kind {
        PolicyKind::NetworkPolicy => ("networking.k8s.io", "NetworkPolicy", "networkpolicies"),
        PolicyKind::CiliumNetworkPolicy => {
            ("cilium.io", "CiliumNetworkPolicy", "ciliumnetworkpolicies")
        }
        PolicyKind::CiliumClusterwideNetworkPolicy => (
            "cilium.io",
            "CiliumClusterwideNetworkPolicy",
            "ciliumclusterwidenetworkpolicies",
        ),
    };
    let version = if group == "cilium.io" { "v2" } else { "v1" };
    ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: format!("{group}/{version}"),
        kind: kind_name.to_string(),
        plural: plural.to_string(),
    }
}

/// Where a policy came from: the object it was read from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicySource {
    /// Always [`ORIGIN`] here; `local` for `cilia policy import`.
    pub origin: &'static str,
    /// The kind, as users write it.
    pub kind: String,
    /// `metadata.namespace`; absent for clusterwide policies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.resourceVersion` of the object translated.
    pub resource_version: String,
    /// `metadata.generation` (changes with the spec only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

impl PolicySource {
    /// `Kind ns/name` (or `Kind name`), as errors and status lines name it.
    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// A policy read from the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPolicy {
    /// The object it came from.
    pub source: PolicySource,
    /// The parsed policy.
    pub policy: Policy,
    /// The document, as normalised YAML (what the agent stores and `policy
    /// get -o yaml` shows).
    pub yaml: String,
}

/// A policy object the engine refuses: the object keeps no rule in the
/// agent, and the reason goes onto the object ([`crate::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} ({}): {}", .object.describe(), .object.origin, self.detail())]
pub struct PolicyRefusal {
    /// The object refused (boxed: the error stays small to pass around).
    pub object: Box<PolicySource>,
    /// The field at fault (`spec.ingress[0].toPorts[0].ports[0].port`);
    /// empty when the object as a whole is wrong.
    pub field: String,
    /// Why.
    pub reason: String,
}

impl PolicyRefusal {
    /// `field: reason`, or the reason alone: the message put on the object.
    pub fn detail(&self) -> String {
        if self.field.is_empty() {
            self.reason.clone()
        } else {
            format!("{}: {}", self.field, self.reason)
        }
    }
}

fn kind_name(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::NetworkPolicy => "NetworkPolicy",
        PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
        PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
    }
}

/// The source of an object watched as `kind`.
pub fn source_of(kind: PolicyKind, obj: &DynamicObject) -> PolicySource {
    let meta = &obj.metadata;
    PolicySource {
        origin: ORIGIN,
        kind: kind_name(kind).to_string(),
        namespace: match kind {
            PolicyKind::CiliumClusterwideNetworkPolicy => None,
            _ => meta.namespace.clone(),
        },
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        generation: meta.generation,
    }
}

/// The document the parser reads for an object watched as `kind`.
pub fn document(kind: PolicyKind, obj: &DynamicObject) -> Value {
    let res = api_resource(kind);
    let meta = &obj.metadata;
    let mut metadata = Map::new();
    if let Some(name) = &meta.name {
        metadata.insert("name".into(), Value::String(name.clone()));
    }
    if let (Some(ns), false) = (
        &meta.namespace,
        kind == PolicyKind::CiliumClusterwideNetworkPolicy,
    ) {
        metadata.insert("namespace".into(), Value::String(ns.clone()));
    }
    if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        metadata.insert("labels".into(), Value::Object(labels));
    }
    let mut doc = Map::new();
    doc.insert("apiVersion".into(), Value::String(res.api_version));
    doc.insert("kind".into(), Value::String(res.kind));
    doc.insert("metadata".into(), Value::Object(metadata));
    if let Value::Object(fields) = &obj.data {
        for (k, v) in fields {
            // `apiVersion`/`kind` are the watched kind's (above); `metadata`
            // is rebuilt; `status` is the agent's own output.
            if !matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status") {
                doc.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(doc)
}

/// Translates one policy object watched as `kind` (the object's own
/// `apiVersion`/`kind`, absent from list items, are not trusted).
pub fn translate(kind: PolicyKind, obj: &DynamicObject) -> Result<K8sPolicy, PolicyRefusal> {
    let source = source_of(kind, obj);
    let refuse = |field: String, reason: String| PolicyRefusal {
        object: Box::new(source.clone()),
        field,
        reason,
    };
    if source.name.is_empty() || source.uid.is_empty() {
        return Err(refuse(
            "metadata".into(),
            "an object from the API server needs metadata.name and metadata.uid".into(),
        ));
    }
    if kind != PolicyKind::CiliumClusterwideNetworkPolicy && source.namespace.is_none() {
        return Err(refuse("metadata.namespace".into(), "missing".into()));
    }
    // JSON text is YAML: the one parser reads it as it reads a file.
    let text = serde_json::to_string(&document(kind, obj)).map_err(|e| {
        refuse(
            String::new(),
            format!("cannot write the object as text: {e}"),
        )
    })?;
    let stream = cilia_policy::parse_stream(&source.describe(), &text)
        .map_err(|e| refuse(e.path, e.message))?;
    let mut docs = stream.policies.into_iter();
    match (docs.next(), docs.next()) {
        (Some(doc), None) => Ok(K8sPolicy {
            source,
            policy: doc.policy,
            yaml: doc.yaml,
        }),
        _ => Err(refuse(
            String::new(),
            "not exactly one policy document".into(),
        )),
    }
}
