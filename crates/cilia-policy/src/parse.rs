//! YAML -> internal model.
//!
//! Two stages: a strict serde pass over "raw" structs that mirror the upstream schemas
//! (`deny_unknown_fields`; fields that are valid upstream but not supported here are typed
//! [`Unsupported`], whose deserializer always fails), with the field path tracked by
//! `serde_path_to_error`; then a semantic conversion to [`crate::model`] that builds its
//! own paths for value errors (ports, CIDRs, selectors, entities).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use ipnet::IpNet;
use serde::de::{
    DeserializeSeed, EnumAccess, Error as _, IgnoredAny, MapAccess, SeqAccess, VariantAccess,
    Visitor,
};
use serde::{Deserialize, Deserializer};
use serde_norway::value::{Tag, TaggedValue};
use serde_norway::{Mapping, Value};

use crate::error::PolicyError;
use crate::l7::{HeaderMatchSpec, HttpRule, HttpRuleSpec};
use crate::labels::{
    excerpt, selector_key, selector_value, Requirement, Selector, RESERVED_SOURCE,
};
use crate::model::{
    Entity, NamedPortRule, Peer, PeerRule, PortL7, PortRange, Rule, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP,
};
use crate::{Direction, Policy, PolicyKind, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};

const UNSUPPORTED_MARK: &str = "\u{0}cilia-policy-unsupported";

/// A field that upstream accepts but this crate does not implement yet.
struct Unsupported;

impl<'de> Deserialize<'de> for Unsupported {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(D::Error::custom(UNSUPPORTED_MARK))
    }
}

// ---------------------------------------------------------------------------
// Raw schema (only what deserialization needs; unsupported fields typed Unsupported).
// Unsupported fields are never read: their mere presence fails deserialization.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct RawMeta {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    uid: Option<IgnoredAny>,
    resource_version: Option<IgnoredAny>,
    generation: Option<IgnoredAny>,
    creation_timestamp: Option<IgnoredAny>,
    deletion_timestamp: Option<IgnoredAny>,
    deletion_grace_period_seconds: Option<IgnoredAny>,
    generate_name: Option<IgnoredAny>,
    managed_fields: Option<IgnoredAny>,
    finalizers: Option<IgnoredAny>,
    owner_references: Option<IgnoredAny>,
    self_link: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    match_labels: Option<BTreeMap<String, String>>,
    match_expressions: Option<Vec<RawExpression>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpression {
    key: String,
    operator: String,
    values: Option<Vec<String>>,
}

// --- NetworkPolicy

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct NpDoc {
    api_version: String,
    kind: String,
    metadata: RawMeta,
    spec: NpSpec,
    status: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NpSpec {
    pod_selector: Option<RawSelector>,
    policy_types: Option<Vec<String>>,
    ingress: Option<Vec<NpIngressRule>>,
    egress: Option<Vec<NpEgressRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NpIngressRule {
    from: Option<Vec<NpPeer>>,
    ports: Option<Vec<NpPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NpEgressRule {
    to: Option<Vec<NpPeer>>,
    ports: Option<Vec<NpPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NpPeer {
    pod_selector: Option<RawSelector>,
    namespace_selector: Option<RawSelector>,
    ip_block: Option<NpIpBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NpIpBlock {
    cidr: String,
    except: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NpPort {
    protocol: Option<String>,
    port: Option<Value>,
    end_port: Option<i64>,
}

// --- Cilium

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct CnpDoc {
    api_version: String,
    kind: String,
    metadata: RawMeta,
    spec: Option<CRule>,
    specs: Option<Vec<CRule>>,
    status: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct CRule {
    endpoint_selector: Option<RawSelector>,
    node_selector: Option<Unsupported>,
    ingress: Option<Vec<CIngress>>,
    ingress_deny: Option<Vec<CIngress>>,
    egress: Option<Vec<CEgress>>,
    egress_deny: Option<Vec<CEgress>>,
    labels: Option<IgnoredAny>,
    description: Option<String>,
    enable_default_deny: Option<CDefaultDeny>,
    log: Option<Unsupported>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CDefaultDeny {
    ingress: Option<bool>,
    egress: Option<bool>,
}

/// A Cilium ingress or egress rule: the same peers under `from…` or `to…` keys
/// (egress has a few more unsupported fields). One macro writes both shapes so they
/// cannot drift apart; serde sees each key spelled out, so unknown-field errors and
/// error paths stay those of the upstream schema.
macro_rules! cilium_direction_rule {
    (
        $name:ident,
        $endpoints:literal,
        $cidr:literal,
        $cidr_set:literal,
        $entities:literal,
        unsupported: [$($field:ident = $key:literal),* $(,)?]
    ) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct $name {
            #[serde(rename = $endpoints)]
            endpoints: Option<Vec<RawSelector>>,
            #[serde(rename = $cidr)]
            cidr: Option<Vec<String>>,
            #[serde(rename = $cidr_set)]
            cidr_set: Option<Vec<CCidrRule>>,
            #[serde(rename = $entities)]
            entities: Option<Vec<String>>,
            #[serde(rename = "toPorts")]
            to_ports: Option<Vec<CPortRule>>,
            $(
                #[serde(rename = $key)]
                $field: Option<Unsupported>,
            )*
        }

        impl $name {
            /// The rule's peers (each with its key, for error paths) and ports.
            fn into_parts(self) -> (CiliumPeers, Vec<CPortRule>) {
                let peers = CiliumPeers {
                    endpoints: (self.endpoints.unwrap_or_default(), $endpoints),
                    cidrs: (self.cidr.unwrap_or_default(), $cidr),
                    cidr_sets: (self.cidr_set.unwrap_or_default(), $cidr_set),
                    entities: (self.entities.unwrap_or_default(), $entities),
                };
                (peers, self.to_ports.unwrap_or_default())
            }
        }
    };
}

cilium_direction_rule!(
    CIngress,
    "fromEndpoints",
    "fromCIDR",
    "fromCIDRSet",
    "fromEntities",
    unsupported: [
        from_requires = "fromRequires",
        from_groups = "fromGroups",
        from_nodes = "fromNodes",
        icmps = "icmps",
        authentication = "authentication",
    ]
);

cilium_direction_rule!(
    CEgress,
    "toEndpoints",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
    unsupported: [
        to_requires = "toRequires",
        to_services = "toServices",
        to_fqdns = "toFQDNs",
        to_groups = "toGroups",
        to_nodes = "toNodes",
        icmps = "icmps",
        authentication = "authentication",
    ]
);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct CCidrRule {
    cidr: Option<String>,
    except: Option<Vec<String>>,
    cidr_group_ref: Option<Unsupported>,
    cidr_group_selector: Option<Unsupported>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct CPortRule {
    ports: Option<Vec<CPort>>,
    rules: Option<CL7Rules>,
    #[serde(rename = "terminatingTLS")]
    terminating_tls: Option<Unsupported>,
    #[serde(rename = "originatingTLS")]
    originating_tls: Option<Unsupported>,
    server_names: Option<Unsupported>,
    listener: Option<Unsupported>,
}

/// `toPorts[].rules`: only `http` is implemented; the other kinds are refused by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CL7Rules {
    http: Option<Vec<CHttpRule>>,
    kafka: Option<Unsupported>,
    dns: Option<Unsupported>,
    l7proto: Option<Unsupported>,
    l7: Option<Unsupported>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CHttpRule {
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    headers: Option<Vec<String>>,
    header_matches: Option<Vec<CHeaderMatch>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CHeaderMatch {
    name: String,
    value: Option<String>,
    mismatch: Option<Unsupported>,
    secret: Option<Unsupported>,
}

impl CHttpRule {
    fn spec(&self) -> HttpRuleSpec {
        HttpRuleSpec {
            method: self.method.clone(),
            path: self.path.clone(),
            host: self.host.clone(),
            headers: self.headers.clone().unwrap_or_default(),
            header_matches: self
                .header_matches
                .iter()
                .flatten()
                .map(|m| HeaderMatchSpec {
                    name: m.name.clone(),
                    value: m.value.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CPort {
    port: Option<Value>,
    end_port: Option<i64>,
    protocol: Option<String>,
}

// ---------------------------------------------------------------------------

/// Error context of one document.
struct Doc<'a> {
    file: &'a str,
    index: usize,
    name: Option<String>,
}

impl Doc<'_> {
    fn err(&self, path: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            file: self.file.to_string(),
            document: self.index,
            policy: self.name.clone(),
            path: path.into(),
            message: message.into(),
        }
    }
}

const API_NETWORKING: &str = "networking.k8s.io/v1";
const API_CILIUM: &str = "cilium.io/v2";

/// One policy document of a YAML stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDocument {
    /// 1-based index of the document in the stream.
    pub index: usize,
    /// The policy it defines.
    pub policy: Policy,
    /// The document as normalised YAML (comments dropped, anchors expanded):
    /// what to store, since it parses back to the same policy on its own.
    pub yaml: String,
}

/// What a YAML stream held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyStream {
    /// Documents read, empty ones included.
    pub documents: usize,
    /// 1-based indexes of the empty documents (skipped).
    pub empty: Vec<usize>,
    /// The policies, in stream order.
    pub policies: Vec<PolicyDocument>,
}

/// Parses all YAML documents of `yaml` (`---` separated). Empty documents are skipped.
/// `source` names the input (for example a file name) in errors.
/// The text and the policies in it must stay within [`crate::limits`].
pub fn parse_policies(source: &str, yaml: &str) -> Result<Vec<Policy>, PolicyError> {
    Ok(parse_stream(source, yaml)?
        .policies
        .into_iter()
        .map(|d| d.policy)
        .collect())
}

/// Parses a multi-document YAML stream with the YAML library's own document
/// iteration, so every document separator form works: content on the `---`
/// line, `...` end markers, comments between documents, a leading `---`,
/// CRLF line ends. All documents must be valid (the first error is
/// returned); empty documents are counted and listed, not errors.
///
/// Anchors and aliases are YAML features a policy never needs, and aliases
/// can make a small text expand exponentially ("billion laughs"). Without
/// aliases a document cannot hold more than [`NODES_PER_BYTE`] nodes per byte
/// of its text, so the whole stream may expand to at most that many nodes
/// per byte of input: alias use within the bound is accepted, a stream
/// beyond it is refused, naming the document, before its expansion costs
/// more than that bound in time or memory.
pub fn parse_stream(source: &str, yaml: &str) -> Result<PolicyStream, PolicyError> {
    crate::limits::check_text(yaml).map_err(|m| {
        Doc {
            file: source,
            index: 1,
            name: None,
        }
        .err("", m)
    })?;
    let mut limits = crate::limits::Budget::default();
    let budget = Cell::new(yaml.len().saturating_mul(NODES_PER_BYTE).saturating_add(64));
    let mut out = PolicyStream::default();
    let mut subjects = HashSet::new();
    for (i, document) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let mut doc = Doc {
            file: source,
            index: i + 1,
            name: None,
        };
        out.documents = doc.index;
        let value = match (NodeSeed { budget: &budget }).deserialize(document) {
            Ok(v) => v,
            Err(e) if e.to_string().contains(EXPANSION_MARK) => {
                return Err(doc.err(
                    "",
                    format!(
                        "YAML aliases expand the input beyond {NODES_PER_BYTE} nodes per byte \
                         of its text (a \"billion laughs\" document?): refused; write repeated \
                         parts out instead of using anchors (&name) and aliases (*name)"
                    ),
                ))
            }
            // The iterator keeps yielding the same failure: stop at the first one.
            Err(e) => return Err(doc.err("", format!("invalid YAML: {e}"))),
        };
        if value.is_null() {
            out.empty.push(doc.index);
            continue;
        }
        let yaml = serde_norway::to_string(&value)
            .map_err(|e| doc.err("", format!("cannot write the document back as YAML: {e}")))?;
        let mut policy = parse_document(&mut doc, value)?;
        share_subjects(&mut policy, &mut subjects);
        limits
            .add(&policy)
            .map_err(|e| doc.err("", e.to_string()))?;
        out.policies.push(PolicyDocument {
            index: doc.index,
            policy,
            yaml,
        });
    }
    Ok(out)
}

/// Makes the rules' equal subject selectors one shared allocation (the
/// first one seen in `subjects`): a policy's specs usually all select the
/// same endpoints, and resolution then matches that selector once per
/// endpoint instead of once per rule (a tenth of resolving 1,000 specs).
fn share_subjects(policy: &mut Policy, subjects: &mut HashSet<Arc<Selector>>) {
    for rule in &mut policy.rules {
        match subjects.get(&rule.subject) {
            Some(shared) => rule.subject = shared.clone(),
            None => {
                subjects.insert(rule.subject.clone());
            }
        }
    }
}

/// One non-empty document's policy.
fn parse_document(doc: &mut Doc<'_>, value: Value) -> Result<Policy, PolicyError> {
    let Value::Mapping(map) = &value else {
        return Err(doc.err(
            "",
            "document is not a policy object (a mapping with apiVersion, kind, metadata, spec)",
        ));
    };
    doc.name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let api_version = match map.get("apiVersion") {
        None => return Err(doc.err("apiVersion", "missing")),
        Some(v) => v
            .as_str()
            .ok_or_else(|| doc.err("apiVersion", "must be a string"))?
            .to_string(),
    };
    let kind_str = match map.get("kind") {
        None => return Err(doc.err("kind", "missing")),
        Some(v) => v
            .as_str()
            .ok_or_else(|| doc.err("kind", "must be a string"))?
            .to_string(),
    };
    let (kind, expected_api) = match kind_str.as_str() {
        "NetworkPolicy" => (PolicyKind::NetworkPolicy, API_NETWORKING),
        "CiliumNetworkPolicy" => (PolicyKind::CiliumNetworkPolicy, API_CILIUM),
        "CiliumClusterwideNetworkPolicy" => {
            (PolicyKind::CiliumClusterwideNetworkPolicy, API_CILIUM)
        }
        other => {
            return Err(doc.err(
                "kind",
                format!(
                    "{} is not supported (expected NetworkPolicy, CiliumNetworkPolicy \
                     or CiliumClusterwideNetworkPolicy)",
                    excerpt(other)
                ),
            ))
        }
    };
    if api_version != expected_api {
        return Err(doc.err(
            "apiVersion",
            format!(
                "{} is not valid for kind {kind_str} (expected {expected_api})",
                excerpt(&api_version)
            ),
        ));
    }
    match kind {
        PolicyKind::NetworkPolicy => {
            let raw: NpDoc = typed(doc, value)?;
            convert_np(doc, raw)
        }
        _ => {
            let raw: CnpDoc = typed(doc, value)?;
            convert_cnp(doc, kind, raw)
        }
    }
}

/// Upper bound of YAML nodes per byte of alias-free text: every node takes
/// at least one byte except an implicit null, and each of those pairs with
/// a key or a `?` that took a byte (`{a,b}`: five bytes, five nodes).
/// Twice that leaves room for ordinary alias use.
pub const NODES_PER_BYTE: usize = 4;

const EXPANSION_MARK: &str = "\u{0}cilia-policy-expansion";

/// Builds a [`Value`] like `Value::deserialize`, counting every node
/// (aliases are expanded by the YAML library as they are visited) against
/// a budget shared by the whole stream, and failing once it is spent.
#[derive(Clone, Copy)]
struct NodeSeed<'b> {
    budget: &'b Cell<usize>,
}

impl NodeSeed<'_> {
    fn take<E: serde::de::Error>(&self) -> Result<(), E> {
        match self.budget.get().checked_sub(1) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(E::custom(EXPANSION_MARK)),
        }
    }
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: serde::de::Error>(self, i: i64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Sequence(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut out = Mapping::new();
        while let Some(key) = map.next_key_seed(self)? {
            if out.contains_key(&key) {
                return Err(A::Error::custom(format!(
                    "duplicate key {}",
                    value_summary(&key)
                )));
            }
            let value = map.next_value_seed(self)?;
            out.insert(key, value);
        }
        Ok(Value::Mapping(out))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        self.take()?;
        let (tag, contents) = data.variant::<String>()?;
        let value = contents.newtype_variant_seed(self)?;
        Ok(Value::Tagged(Box::new(TaggedValue {
            tag: Tag::new(tag),
            value,
        })))
    }
}

/// Strict serde pass with path tracking.
fn typed<T: for<'de> Deserialize<'de>>(doc: &Doc<'_>, value: Value) -> Result<T, PolicyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = e.path().to_string();
        if path == "." {
            path.clear();
        }
        // serde quotes an unknown field or a mistyped value whole: keep it short.
        let message = crate::labels::shorten(&e.into_inner().to_string());
        if message.contains(UNSUPPORTED_MARK) {
            let field = path.rsplit('.').next().unwrap_or("").to_string();
            doc.err(path, format!("`{field}` is not supported yet"))
        } else {
            doc.err(path, message)
        }
    })
}

fn meta_name(doc: &Doc<'_>, meta: &RawMeta) -> Result<String, PolicyError> {
    match &meta.name {
        Some(n) if !n.is_empty() => Ok(n.clone()),
        _ => Err(doc.err("metadata.name", "missing")),
    }
}

// ---------------------------------------------------------------------------
// Selectors

/// Converts a label selector, normalizing keys and validating operators.
fn selector(doc: &Doc<'_>, path: &str, raw: &RawSelector) -> Result<Selector, PolicyError> {
    let mut sel = Selector::default();
    for (k, v) in raw.match_labels.iter().flatten() {
        let p = format!("{path}.matchLabels");
        let key = selector_key(k).map_err(|m| doc.err(&p, m))?;
        selector_value(v).map_err(|m| doc.err(&p, format!("key {}: {m}", excerpt(k))))?;
        sel.push(Requirement::In(key, BTreeSet::from([v.clone()])));
    }
    for (i, expr) in raw.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if expr.key.is_empty() {
            return Err(doc.err(format!("{p}.key"), "must not be empty"));
        }
        let key = selector_key(&expr.key).map_err(|m| doc.err(format!("{p}.key"), m))?;
        for (j, v) in expr.values.iter().flatten().enumerate() {
            selector_value(v).map_err(|m| doc.err(format!("{p}.values[{j}]"), m))?;
        }
        let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
        let req = match expr.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    return Err(doc.err(
                        format!("{p}.values"),
                        format!("must be non-empty for operator {}", expr.operator),
                    ));
                }
                if expr.operator == "In" {
                    Requirement::In(key, values)
                } else {
                    Requirement::NotIn(key, values)
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    return Err(doc.err(
                        format!("{p}.values"),
                        format!("must be empty for operator {}", expr.operator),
                    ));
                }
                if expr.operator == "Exists" {
                    Requirement::Exists(key)
                } else {
                    Requirement::DoesNotExist(key)
                }
            }
            other => {
                return Err(doc.err(
                    format!("{p}.operator"),
                    format!(
                        "{} is not a valid operator (In, NotIn, Exists, DoesNotExist)",
                        excerpt(other)
                    ),
                ))
            }
        };
        sel.push(req);
    }
    Ok(sel)
}

fn in_namespace(sel: &mut Selector, ns: &str) {
    sel.push(Requirement::In(
        NAMESPACE_LABEL.to_string(),
        BTreeSet::from([ns.to_string()]),
    ));
}

// ---------------------------------------------------------------------------
// CIDRs and ports

fn cidr(doc: &Doc<'_>, path: &str, s: &str) -> Result<IpNet, PolicyError> {
    let s = s.trim();
    let net = if s.contains('/') {
        s.parse::<IpNet>().ok()
    } else {
        // A bare address is a host prefix (upstream accepts it for fromCIDR/toCIDR).
        s.parse::<std::net::IpAddr>().ok().map(IpNet::from)
    };
    net.map(|n| n.trunc())
        .ok_or_else(|| doc.err(path, format!("{} is not a valid CIDR", excerpt(s))))
}

fn cidr_with_except(
    doc: &Doc<'_>,
    path: &str,
    cidr_str: &str,
    excepts: &[String],
) -> Result<Peer, PolicyError> {
    let net = cidr(doc, &format!("{path}.cidr"), cidr_str)?;
    let mut except = Vec::new();
    for (i, e) in excepts.iter().enumerate() {
        let p = format!("{path}.except[{i}]");
        let ex = cidr(doc, &p, e)?;
        if !net.contains(&ex) {
            return Err(doc.err(p, format!("{} is not inside {net}", excerpt(e))));
        }
        except.push(ex);
    }
    Ok(Peer::Cidr { cidr: net, except })
}

/// A `port` value: a number, or (a string that is) a port name.
enum PortValue {
    Number(u16),
    Name(String),
}

/// Reads a `port`: a number, a string holding one (`allow_string`: Cilium's
/// ports are strings), or a port name (an IANA service name).
fn port_value(
    doc: &Doc<'_>,
    path: &str,
    v: &Value,
    allow_string: bool,
) -> Result<PortValue, PolicyError> {
    let out_of_range = |shown: String| doc.err(path, format!("{shown} is out of range (0-65535)"));
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(p) => u16::try_from(p)
                .map(PortValue::Number)
                .map_err(|_| out_of_range(p.to_string())),
            None => Err(out_of_range(n.to_string())),
        },
        Value::String(s) if crate::named::is_port_name(s) => Ok(PortValue::Name(s.clone())),
        Value::String(s) if allow_string => match s.trim().parse::<u64>() {
            Ok(p) => u16::try_from(p)
                .map(PortValue::Number)
                .map_err(|_| out_of_range(excerpt(s))),
            Err(_) => Err(doc.err(
                path,
                format!("{} is not a port number or a port name", excerpt(s)),
            )),
        },
        other => Err(doc.err(
            path,
            format!(
                "{} is not a port number or a port name",
                value_summary(other)
            ),
        )),
    }
}

/// A named port's rule; `endPort` cannot go with a name.
fn named_port_rule(
    doc: &Doc<'_>,
    path: &str,
    name: String,
    proto: u8,
    end_port: Option<i64>,
) -> Result<NamedPortRule, PolicyError> {
    if end_port.is_some_and(|e| e != 0) {
        return Err(doc.err(
            format!("{path}.endPort"),
            format!(
                "endPort cannot be used with the named port {}",
                excerpt(&name)
            ),
        ));
    }
    Ok(NamedPortRule {
        name: Arc::from(name),
        proto,
        l7: None,
    })
}

fn value_summary(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => excerpt(s),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(_) => "a tagged value".to_string(),
    }
}

/// Validates `port`/`endPort` and returns the inclusive range (port 0 = all ports).
fn port_range(
    doc: &Doc<'_>,
    path: &str,
    proto: u8,
    port: u16,
    end_port: Option<i64>,
) -> Result<PortRange, PolicyError> {
    let last = match end_port {
        None | Some(0) => {
            if port == 0 {
                u16::MAX
            } else {
                port
            }
        }
        Some(e) => {
            let p = format!("{path}.endPort");
            let e = u16::try_from(e)
                .map_err(|_| doc.err(&p, format!("{e} is out of range (0-65535)")))?;
            if port == 0 {
                return Err(doc.err(p, "endPort requires a non-zero port"));
            }
            if e < port {
                return Err(doc.err(p, format!("{e} is less than port {port}")));
            }
            e
        }
    };
    Ok(PortRange {
        proto,
        first: if last == u16::MAX && port == 0 {
            0
        } else {
            port
        },
        last,
    })
}

// ---------------------------------------------------------------------------
// NetworkPolicy

fn convert_np(doc: &Doc<'_>, raw: NpDoc) -> Result<Policy, PolicyError> {
    let name = meta_name(doc, &raw.metadata)?;
    let ns = raw
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let spec = raw.spec;
    let Some(pod_selector) = &spec.pod_selector else {
        return Err(doc.err("spec.podSelector", "missing (use {} to select all pods)"));
    };
    let mut subject = selector(doc, "spec.podSelector", pod_selector)?;
    in_namespace(&mut subject, &ns);

    let ingress = spec.ingress.unwrap_or_default();
    let egress = spec.egress.unwrap_or_default();
    // policyTypes default (k8s API docs): Ingress always; Egress if the policy has egress rules.
    let (mut types_ingress, mut types_egress) = (true, !egress.is_empty());
    if let Some(types) = &spec.policy_types {
        types_ingress = false;
        types_egress = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => types_ingress = true,
                "Egress" => types_egress = true,
                other => {
                    return Err(doc.err(
                        format!("spec.policyTypes[{i}]"),
                        format!("{} is not a policy type (Ingress, Egress)", excerpt(other)),
                    ))
                }
            }
        }
    }

    let mut rule = Rule {
        subject: Arc::new(subject.canonical()),
        spec: 0,
        ingress: Vec::new(),
        ingress_deny: Vec::new(),
        egress: Vec::new(),
        egress_deny: Vec::new(),
        enforce_ingress: types_ingress,
        enforce_egress: types_egress,
    };
    // Rules of a direction not listed in policyTypes are validated but do not apply.
    for (i, r) in ingress.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        let pr = np_rule(
            doc,
            &path,
            "from",
            &ns,
            r.from.as_deref(),
            r.ports.as_deref(),
        )?;
        if types_ingress {
            rule.ingress.push(pr);
        }
    }
    for (i, r) in egress.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        let pr = np_rule(doc, &path, "to", &ns, r.to.as_deref(), r.ports.as_deref())?;
        if types_egress {
            rule.egress.push(pr);
        }
    }
    Ok(Policy {
        name,
        namespace: Some(ns),
        kind: PolicyKind::NetworkPolicy,
        rules: vec![rule],
    })
}

fn np_rule(
    doc: &Doc<'_>,
    path: &str,
    peers_field: &str,
    ns: &str,
    peers: Option<&[NpPeer]>,
    ports: Option<&[NpPort]>,
) -> Result<PeerRule, PolicyError> {
    let peers = peers.unwrap_or_default();
    let mut out_peers = Vec::new();
    if peers.is_empty() {
        // Absent or empty from/to: every peer, including those outside the cluster.
        out_peers.push(Peer::Any);
    }
    for (i, peer) in peers.iter().enumerate() {
        let p = format!("{path}.{peers_field}[{i}]");
        match (&peer.pod_selector, &peer.namespace_selector, &peer.ip_block) {
            (None, None, None) => {
                return Err(doc.err(p, "must specify podSelector, namespaceSelector or ipBlock"))
            }
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(doc.err(
                    format!("{p}.ipBlock"),
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                ))
            }
            (None, None, Some(block)) => {
                out_peers.push(cidr_with_except(
                    doc,
                    &format!("{p}.ipBlock"),
                    &block.cidr,
                    block.except.as_deref().unwrap_or_default(),
                )?);
            }
            (pods, namespaces, None) => {
                let mut sel = match pods {
                    Some(s) => selector(doc, &format!("{p}.podSelector"), s)?,
                    None => Selector::default(),
                };
                match namespaces {
                    None => in_namespace(&mut sel, ns),
                    Some(nsel) => {
                        let nsel = selector(doc, &format!("{p}.namespaceSelector"), nsel)?;
                        // Only pods (endpoints with a namespace) are selected.
                        sel.push(Requirement::Exists(NAMESPACE_LABEL.to_string()));
                        for r in &nsel.requirements {
                            sel.push(r.with_key(format!("{NAMESPACE_LABELS_PREFIX}{}", r.key())));
                        }
                    }
                }
                out_peers.push(Peer::Selector(sel.canonical()));
            }
        }
    }

    let ports = ports.unwrap_or_default();
    let mut out_ports = Vec::new();
    let mut out_named = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let p = format!("{path}.ports[{i}]");
        let proto = match port.protocol.as_deref() {
            None | Some("TCP") => PROTO_TCP,
            Some("UDP") => PROTO_UDP,
            Some("SCTP") => PROTO_SCTP,
            Some(other) => {
                return Err(doc.err(
                    format!("{p}.protocol"),
                    format!(
                        "{} is not a valid protocol (TCP, UDP, SCTP)",
                        excerpt(other)
                    ),
                ))
            }
        };
        let number = match &port.port {
            None => 0,
            Some(v) => match port_value(doc, &format!("{p}.port"), v, false)? {
                PortValue::Number(0) => {
                    return Err(doc.err(format!("{p}.port"), "must be between 1 and 65535"));
                }
                PortValue::Number(n) => n,
                PortValue::Name(name) => {
                    out_named.push(named_port_rule(doc, &p, name, proto, port.end_port)?);
                    continue;
                }
            },
        };
        out_ports.push(port_range(doc, &p, proto, number, port.end_port)?);
    }
    if out_ports.is_empty() && out_named.is_empty() {
        out_ports.push(PortRange::ALL);
    }
    Ok(PeerRule::new(out_peers, out_ports, out_named, Vec::new()))
}

// ---------------------------------------------------------------------------
// CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy

fn convert_cnp(doc: &Doc<'_>, kind: PolicyKind, raw: CnpDoc) -> Result<Policy, PolicyError> {
    let name = meta_name(doc, &raw.metadata)?;
    let ns = match kind {
        PolicyKind::CiliumClusterwideNetworkPolicy => {
            if raw
                .metadata
                .namespace
                .as_deref()
                .is_some_and(|n| !n.is_empty())
            {
                return Err(doc.err(
                    "metadata.namespace",
                    "a CiliumClusterwideNetworkPolicy is not namespaced",
                ));
            }
            None
        }
        _ => Some(
            raw.metadata
                .namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_string()),
        ),
    };
    let mut specs: Vec<(String, usize, CRule)> = Vec::new();
    if let Some(spec) = raw.spec {
        specs.push(("spec".to_string(), 0, spec));
    }
    for (i, spec) in raw.specs.into_iter().flatten().enumerate() {
        specs.push((format!("specs[{i}]"), i, spec));
    }
    if specs.is_empty() {
        return Err(doc.err("spec", "missing (a policy needs spec or specs)"));
    }
    let mut rules = Vec::new();
    for (path, index, spec) in specs {
        rules.push(cilium_rule(doc, &path, index, ns.as_deref(), spec)?);
    }
    Ok(Policy {
        name,
        namespace: ns,
        kind,
        rules,
    })
}

fn cilium_rule(
    doc: &Doc<'_>,
    path: &str,
    spec_index: usize,
    ns: Option<&str>,
    raw: CRule,
) -> Result<Rule, PolicyError> {
    let Some(es) = &raw.endpoint_selector else {
        return Err(doc.err(format!("{path}.endpointSelector"), "missing"));
    };
    let mut subject = selector(doc, &format!("{path}.endpointSelector"), es)?;
    if let Some(ns) = ns {
        in_namespace(&mut subject, ns);
    }

    let mut rule = Rule {
        subject: Arc::new(subject.canonical()),
        spec: spec_index,
        ingress: Vec::new(),
        ingress_deny: Vec::new(),
        egress: Vec::new(),
        egress_deny: Vec::new(),
        enforce_ingress: false,
        enforce_egress: false,
    };
    let ingress = |rules: Option<Vec<CIngress>>| -> Vec<(CiliumPeers, Vec<CPortRule>)> {
        rules
            .into_iter()
            .flatten()
            .map(CIngress::into_parts)
            .collect()
    };
    let egress = |rules: Option<Vec<CEgress>>| -> Vec<(CiliumPeers, Vec<CPortRule>)> {
        rules
            .into_iter()
            .flatten()
            .map(CEgress::into_parts)
            .collect()
    };
    for (section, direction, deny, rules) in [
        ("ingress", Direction::Ingress, false, ingress(raw.ingress)),
        (
            "ingressDeny",
            Direction::Ingress,
            true,
            ingress(raw.ingress_deny),
        ),
        ("egress", Direction::Egress, false, egress(raw.egress)),
        (
            "egressDeny",
            Direction::Egress,
            true,
            egress(raw.egress_deny),
        ),
    ] {
        let out = match (direction, deny) {
            (Direction::Ingress, false) => &mut rule.ingress,
            (Direction::Ingress, true) => &mut rule.ingress_deny,
            (Direction::Egress, false) => &mut rule.egress,
            (Direction::Egress, true) => &mut rule.egress_deny,
        };
        for (i, (peers, ports)) in rules.into_iter().enumerate() {
            let p = format!("{path}.{section}[{i}]");
            out.push(cilium_peer_rule(doc, &p, ns, peers, ports, deny)?);
        }
    }

    // Default deny: Cilium API reference for `enableDefaultDeny` — "If not specified, the
    // default is true for each traffic direction that has rules, and false otherwise. For
    // example, if a policy only has Ingress or IngressDeny rules, then the default for
    // ingress is true and egress is false." Deny rules therefore count as rules, and the
    // deny-policy docs agree: "Similarly to 'allow' policies, Pods will enter default-deny
    // mode as soon a single policy selects it." An explicit value wins over the default.
    let has_ingress = !rule.ingress.is_empty() || !rule.ingress_deny.is_empty();
    let has_egress = !rule.egress.is_empty() || !rule.egress_deny.is_empty();
    let dd = raw.enable_default_deny.as_ref();
    rule.enforce_ingress = dd.and_then(|d| d.ingress).unwrap_or(has_ingress);
    rule.enforce_egress = dd.and_then(|d| d.egress).unwrap_or(has_egress);
    Ok(rule)
}

struct CiliumPeers {
    endpoints: (Vec<RawSelector>, &'static str),
    cidrs: (Vec<String>, &'static str),
    cidr_sets: (Vec<CCidrRule>, &'static str),
    entities: (Vec<String>, &'static str),
}

fn cilium_peer_rule(
    doc: &Doc<'_>,
    path: &str,
    ns: Option<&str>,
    peers: CiliumPeers,
    to_ports: Vec<CPortRule>,
    deny: bool,
) -> Result<PeerRule, PolicyError> {
    let mut out_peers = Vec::new();
    let (endpoints, field) = &peers.endpoints;
    for (i, raw) in endpoints.iter().enumerate() {
        let p = format!("{path}.{field}[{i}]");
        let mut sel = selector(doc, &p, raw)?;
        match ns {
            // Selectors of reserved identities (`reserved:host` …) stay as they
            // are: those identities have no namespace.
            _ if sel.constrains_prefix(RESERVED_SOURCE) => {}
            // CNP: restricted to the policy namespace unless the selector itself
            // says something about the namespace, by its name or by its labels
            // (as current Cilium does: a namespace-labels selector of a
            // namespaced policy reaches pods of every namespace with those labels).
            Some(ns)
                if !sel.constrains(NAMESPACE_LABEL)
                    && !sel.constrains_prefix(NAMESPACE_LABELS_PREFIX) =>
            {
                in_namespace(&mut sel, ns)
            }
            Some(_) => {}
            // CCNP: an empty selector selects every pod of the cluster (upstream adds a
            // namespace-label `Exists` requirement to wildcard selectors of clusterwide
            // policies), non-empty selectors are used as they are.
            None if sel.requirements.is_empty() => {
                sel.push(Requirement::Exists(NAMESPACE_LABEL.to_string()))
            }
            None => {}
        }
        out_peers.push(Peer::Selector(sel.canonical()));
    }
    let (cidrs, field) = &peers.cidrs;
    for (i, c) in cidrs.iter().enumerate() {
        let net = cidr(doc, &format!("{path}.{field}[{i}]"), c)?;
        out_peers.push(Peer::Cidr {
            cidr: net,
            except: Vec::new(),
        });
    }
    let (sets, field) = &peers.cidr_sets;
    for (i, set) in sets.iter().enumerate() {
        let p = format!("{path}.{field}[{i}]");
        let Some(c) = &set.cidr else {
            return Err(doc.err(format!("{p}.cidr"), "missing"));
        };
        out_peers.push(cidr_with_except(
            doc,
            &p,
            c,
            set.except.as_deref().unwrap_or_default(),
        )?);
    }
    let (entities, field) = &peers.entities;
    for (i, e) in entities.iter().enumerate() {
        let p = format!("{path}.{field}[{i}]");
        let peer = match e.as_str() {
            "all" => Peer::Any,
            "world" => Peer::Entity(Entity::World),
            "cluster" => Peer::Entity(Entity::Cluster),
            "host" => Peer::Entity(Entity::Host),
            "remote-node" => Peer::Entity(Entity::RemoteNode),
            "init" => Peer::Entity(Entity::Init),
            "health" => Peer::Entity(Entity::Health),
            "unmanaged" => Peer::Entity(Entity::Unmanaged),
            "kube-apiserver" | "ingress" | "world-ipv4" | "world-ipv6" => {
                return Err(doc.err(p, format!("entity {} is not supported yet", excerpt(e))))
            }
            other => {
                return Err(doc.err(
                    p,
                    format!(
                        "{} is not an entity (world, cluster, host, remote-node, init, \
                         health, unmanaged, all)",
                        excerpt(other)
                    ),
                ))
            }
        };
        out_peers.push(peer);
    }
    let has_l3 =
        !endpoints.is_empty() || !cidrs.is_empty() || !sets.is_empty() || !entities.is_empty();

    let mut out_ports = Vec::new();
    let mut out_named: Vec<NamedPortRule> = Vec::new();
    let mut out_l7 = Vec::new();
    for (i, pr) in to_ports.into_iter().enumerate() {
        let http = port_l7(doc, &format!("{path}.toPorts[{i}]"), i, &pr, deny)?;
        let first_port = out_ports.len();
        let first_named = out_named.len();
        for (j, port) in pr.ports.iter().flatten().enumerate() {
            let p = format!("{path}.toPorts[{i}].ports[{j}]");
            let proto = match port.protocol.as_deref() {
                None | Some("ANY") => 0,
                Some("TCP") => PROTO_TCP,
                Some("UDP") => PROTO_UDP,
                Some("SCTP") => PROTO_SCTP,
                Some("ICMP") | Some("ICMPv6") | Some("ICMPV6") => {
                    return Err(doc.err(
                        format!("{p}.protocol"),
                        "ICMP is not port-based; ICMP rules (icmps) are not supported yet",
                    ))
                }
                Some(other) => {
                    return Err(doc.err(
                        format!("{p}.protocol"),
                        format!(
                            "{} is not a valid protocol (TCP, UDP, SCTP, ANY)",
                            excerpt(other)
                        ),
                    ))
                }
            };
            let number = match &port.port {
                None => 0,
                Some(v) => match port_value(doc, &format!("{p}.port"), v, true)? {
                    PortValue::Number(n) => n,
                    PortValue::Name(name) => {
                        out_named.push(named_port_rule(doc, &p, name, proto, port.end_port)?);
                        continue;
                    }
                },
            };
            out_ports.push(port_range(doc, &p, proto, number, port.end_port)?);
        }
        if pr.ports.as_ref().is_none_or(Vec::is_empty) {
            // A port rule without ports covers all ports.
            out_ports.push(PortRange::ALL);
        }
        if let Some(http) = http {
            let http = std::sync::Arc::new(http);
            out_l7.extend((first_port..out_ports.len()).map(|at| (at, http.clone())));
            for named in &mut out_named[first_named..] {
                named.l7 = Some(http.clone());
            }
        }
    }
    let has_ports = !out_ports.is_empty() || !out_named.is_empty();
    if !has_l3 && has_ports {
        // L4-only rule: applies to every peer.
        out_peers.push(Peer::Any);
    }
    if out_ports.is_empty() && out_named.is_empty() {
        out_ports.push(PortRange::ALL);
    }
    Ok(PeerRule::new(out_peers, out_ports, out_named, out_l7))
}

/// The HTTP rules of one `toPorts` entry (`path`), checked and compiled:
/// `None` when it has none. `rules: {}` and `rules: {http: []}` restrict
/// nothing (upstream: "If no rules are specified, then all traffic is
/// permitted"), so they are L4-only. L7 rules need the ports they apply to
/// spelled out: TCP, one port each (no range, no port 0), and an allow section.
fn port_l7(
    doc: &Doc<'_>,
    path: &str,
    to_ports: usize,
    pr: &CPortRule,
    deny: bool,
) -> Result<Option<PortL7>, PolicyError> {
    let Some(rules) = &pr.rules else {
        return Ok(None);
    };
    let rules_path = format!("{path}.rules");
    if deny {
        return Err(doc.err(
            rules_path,
            "L7 rules are not allowed in a deny section (ingressDeny, egressDeny): \
             a deny applies to whole connections",
        ));
    }
    let http = rules.http.as_deref().unwrap_or_default();
    if http.is_empty() {
        return Ok(None);
    }
    let ports = pr.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(doc.err(
            format!("{path}.ports"),
            "L7 rules need explicit ports (with protocol TCP) to apply to",
        ));
    }
    for (j, port) in ports.iter().enumerate() {
        let p = format!("{path}.ports[{j}]");
        match port.protocol.as_deref() {
            Some("TCP") => {}
            None => {
                return Err(doc.err(
                    format!("{p}.protocol"),
                    "missing: L7 (HTTP) rules need protocol TCP",
                ))
            }
            Some(other) => {
                return Err(doc.err(
                    format!("{p}.protocol"),
                    format!(
                        "{} cannot carry L7 (HTTP) rules: they need protocol TCP",
                        excerpt(other)
                    ),
                ))
            }
        }
        let number = match &port.port {
            None => 0,
            // A named port is one port per endpoint: its HTTP rules go on
            // the number it resolves to.
            Some(v) => match port_value(doc, &format!("{p}.port"), v, true)? {
                PortValue::Number(n) => n,
                PortValue::Name(_) => continue,
            },
        };
        if number == 0 {
            return Err(doc.err(
                format!("{p}.port"),
                "L7 (HTTP) rules need a specific port (1-65535), not port 0 (all ports)",
            ));
        }
        if port
            .end_port
            .is_some_and(|e| e != 0 && e != i64::from(number))
        {
            return Err(doc.err(
                format!("{p}.endPort"),
                "L7 (HTTP) rules apply to single ports, not port ranges",
            ));
        }
    }
    let mut specs = Vec::with_capacity(http.len());
    for (k, rule) in http.iter().enumerate() {
        let spec = rule.spec();
        HttpRule::compile(&spec).map_err(|e| {
            doc.err(
                format!("{rules_path}.http[{k}].{}", e.field),
                e.reason.clone(),
            )
        })?;
        specs.push(spec);
    }
    Ok(Some(PortL7 {
        to_ports,
        http: specs,
    }))
}
