//! Request and response bodies of the agent's REST API (JSON).
//!
//! A type marked `#[skip_serializing_none]` leaves its `None` fields out of
//! the JSON (a field marked `#[serialize_always]` is written as `null`);
//! everywhere, an absent `Option` field reads as `None`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;
use utoipa::ToSchema;

/// Error body of every non-2xx response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Stable machine-readable code, e.g. `invalid-labels`, `ipam-exhausted`.
    pub code: String,
    /// One line for a human, naming the object and the reason.
    pub message: String,
}

/// A kernel capability found (or not) by the agent's probe.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KernelFeature {
    pub name: String,
    pub present: bool,
    pub required: bool,
    pub detail: String,
}

/// Usage of one IPAM pool.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolStatus {
    /// The configured range, e.g. `fd00:c1::/112`.
    pub range: String,
    /// The node's router (gateway) address in that range.
    pub router: String,
    pub used: u64,
    /// Allocatable addresses (network, router and broadcast excluded).
    pub capacity: u64,
}

/// IPAM usage per family; IPv4 is absent when not configured.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IpamStatus {
    pub ipv6: PoolStatus,
    pub ipv4: Option<PoolStatus>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Status {
    pub version: String,
    /// `ok` when every endpoint is ready, `degraded` otherwise.
    pub health: String,
    pub kernel: String,
    pub features: Vec<KernelFeature>,
    pub endpoints: usize,
    pub endpoints_not_ready: usize,
    /// Endpoints on the generic program: their specialized programs are
    /// being verified (fast attach), or were refused (see the
    /// `endpoint-programs` subsystem).
    #[serde(default)]
    pub endpoints_generic: usize,
    pub ipam: IpamStatus,
    pub state_dir: String,
    pub bpf_root: String,
    pub policy_revision: u64,
    pub policies: usize,
    /// Stored policies that no longer parse.
    #[serde(default)]
    pub policy_errors: Vec<String>,
    /// Health of each subsystem.
    #[serde(default)]
    pub subsystems: Vec<SubsystemStatus>,
    /// Fill level of the BPF maps.
    #[serde(default)]
    pub maps: Vec<MapPressure>,
}

/// One subsystem's health, for `cilia status --verbose`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SubsystemStatus {
    pub name: String,
    /// `ok`, `degraded` or `off`.
    pub status: String,
    pub detail: String,
    /// The latest problems, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Entries of one BPF map against its capacity.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MapPressure {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

/// `POST /v1/endpoints`.
// Only `netns` is required: serde reads an absent `Option` field as `None`
// (no `#[serde(default)]` needed), and utoipa marks it not required.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointCreate {
    /// Network namespace: a name under /run/netns or an absolute path.
    pub netns: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Interface name inside the namespace (default `eth0`).
    pub ifname: Option<String>,
    /// Runtime's container id, kept for CNI CHECK/GC.
    pub container_id: Option<String>,
    /// The CNI network (its config's `name`) the container is attached
    /// through: CNI DEL, CHECK and GC act only on their network's endpoints.
    pub network: Option<String>,
    /// Namespace (default `default`); becomes the label
    /// `io.kubernetes.pod.namespace`.
    pub namespace: Option<String>,
    /// Where the agent should learn the labels from when `labels` is empty
    /// (`podman`: `podman container inspect <container_id>`). Until it has
    /// them, the endpoint carries the reserved `init` identity.
    pub label_source: Option<String>,
    /// Port names the endpoint declares, for policies that name ports
    /// (`toPorts[].ports[].port: http`). Fixed for the endpoint's life.
    #[serde(default)]
    pub named_ports: Vec<NamedPort>,
    /// The Kubernetes pod this endpoint is (`K8S_POD_NAMESPACE` and
    /// `K8S_POD_NAME` of a CNI ADD). An agent watching Kubernetes takes the
    /// endpoint's labels, namespace, service account and named ports from
    /// that pod (the `init` identity until it knows the pod); an agent
    /// without Kubernetes keeps it as a note only.
    pub k8s_pod: Option<K8sPodRef>,
}

/// A pod by namespace and name, as kubelet names it in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct K8sPodRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for K8sPodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A port name an endpoint declares: `http=TCP/8080` on the command line and
/// in `args.cni.namedPorts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedPort {
    /// An IANA service name: 1-15 characters of a-z, 0-9 and '-', at least
    /// one letter, no leading, trailing or double '-'.
    pub name: String,
    /// `TCP`, `UDP` or `SCTP` (any case).
    pub protocol: String,
    /// 1-65535.
    pub port: u16,
}

impl std::fmt::Display for NamedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}/{}", self.name, self.protocol, self.port)
    }
}

impl std::str::FromStr for NamedPort {
    type Err = crate::limits::InputError;

    /// Reads `NAME=PROTO/PORT`; the agent checks the name and protocol.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| crate::limits::InputError::new("named port", s, reason);
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| err("is not NAME=PROTO/PORT (like http=TCP/8080)"))?;
        let (protocol, port) = rest
            .split_once('/')
            .ok_or_else(|| err("is not NAME=PROTO/PORT (like http=TCP/8080)"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err("the port is not between 1 and 65535"))?;
        Ok(NamedPort {
            name: name.to_string(),
            protocol: protocol.to_string(),
            port,
        })
    }
}

/// `PUT /v1/endpoints/{id}/labels`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointLabels {
    pub labels: BTreeMap<String, String>,
}

/// Lifecycle state of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointState {
    /// Being created; an agent that restarts in this state rolls it back.
    Creating,
    /// Connected: program attached, addresses published.
    Ready,
    /// Known but not connected (e.g. its interface vanished).
    NotReady,
    /// Disconnected by a delete (addresses withdrawn, no traffic delivered
    /// to it) whose devices, programs and policy map are being removed;
    /// its id and addresses are freed when that is done. An agent that
    /// restarts in this state finishes the delete.
    Deleting,
}

/// An endpoint as the agent knows it.
#[skip_serializing_none]
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Endpoint {
    pub id: u16,
    pub netns: String,
    pub ifname: String,
    pub host_ifname: String,
    pub ipv6: String,
    // Written as `null` when absent, as it always was: clients may index it.
    #[serialize_always]
    pub ipv4: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub namespace: String,
    /// Security identity.
    pub identity: u32,
    pub mac: String,
    pub host_mac: String,
    pub state: EndpointState,
    /// Why the endpoint is not ready, when it is not.
    pub reason: Option<String>,
    pub container_id: Option<String>,
    /// The CNI network the endpoint was attached through (absent for
    /// endpoints made with the CLI or the API, and for CNI endpoints
    /// recorded before the agent kept networks).
    pub network: Option<String>,
    /// The labels are still being learned (identity `init` meanwhile).
    #[serde(default)]
    pub labels_pending: bool,
    /// Policy audit mode: would-be drops pass and are reported as AUDIT.
    #[serde(default)]
    pub policy_audit: bool,
    /// Port names the endpoint declares.
    #[serde(default)]
    pub named_ports: Vec<NamedPort>,
    /// The node the endpoint lives on (the agent's node name).
    pub node: Option<String>,
    /// The Kubernetes pod it is (CNI ADD's `K8S_POD_*`).
    pub k8s_pod: Option<K8sPodRef>,
    /// The routes' next hops inside the endpoint (the node's router
    /// addresses). In the create's answer only, so that the CNI plugin
    /// needs no second call for them.
    #[serde(default)]
    pub gateways: Option<EndpointGateways>,
}

/// The router addresses an endpoint's default routes point at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointGateways {
    pub ipv6: String,
    /// Absent when the endpoint has no IPv4 address.
    pub ipv4: Option<String>,
}

/// `PUT /v1/endpoints/{id}/config`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointSettings {
    pub policy_audit: bool,
}

/// One entry of the kernel's endpoints map, read back.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BpfEndpoint {
    pub address: String,
    pub endpoint_id: u16,
    pub ifindex: u32,
    pub identity: u32,
    pub mac: String,
    pub node_mac: String,
}

/// One packet counter of the datapath, summed over CPUs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BpfMetric {
    /// `forward` or `drop`.
    pub kind: String,
    pub reason: String,
    /// `egress` (from the endpoint) or `ingress`.
    pub direction: String,
    pub packets: u64,
    pub bytes: u64,
}

/// A security identity and the labels it stands for.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Identity {
    pub id: u32,
    /// `reserved`, `endpoint` or `cidr`.
    pub kind: String,
    pub labels: BTreeMap<String, String>,
    /// Endpoints carrying it (endpoint identities).
    #[serde(default)]
    pub endpoints: Vec<u16>,
}

/// `PUT /v1/namespaces/{name}`, and an entry of `GET /v1/namespaces`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    #[serde(default)]
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// One ipcache entry read back from the kernel.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BpfIpcacheEntry {
    pub prefix: String,
    pub identity: u32,
    /// The underlay address of the node the prefix lives on (another
    /// node's pods and pod ranges); absent for local and outside prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
}

/// One conntrack entry read back from the kernel.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BpfCtEntry {
    pub proto: String,
    pub source: String,
    pub destination: String,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub packets: u64,
    pub bytes: u64,
    /// Seconds until expiry.
    pub expires_in: u64,
    pub seen_reply: bool,
    /// Revoked by a policy change: its packets are dropped.
    #[serde(default)]
    pub denied: bool,
    /// A TCP flow that ended (a RST, or a FIN each way): the entry lives
    /// the close timeout from its last packet.
    #[serde(default)]
    pub closing: bool,
    pub policy_revision: u32,
    /// How the flow goes through the L7 proxy: `to-proxy` (a client's
    /// connection, redirected), `from-proxy` (the proxy's connection on the
    /// client's behalf); absent for a direct flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

/// One entry of an endpoint's policy map read back from the kernel.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BpfPolicyEntry {
    pub direction: String,
    /// 0 = any identity.
    pub identity: u32,
    /// `ANY`, `TCP`, `UDP`, `SCTP`, `ICMP`, … .
    pub protocol: String,
    /// `*`, a port, or `first-last`.
    pub port: String,
    pub verdict: String,
    /// The rule this entry comes from (`kind/namespace/name` and section).
    pub rule: String,
    /// The L7 proxy's port, when matching flows are redirected to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_port: Option<u16>,
}

/// An endpoint's policy map with its enforcement state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BpfPolicy {
    pub endpoint: u16,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub entries: Vec<BpfPolicyEntry>,
}

/// `POST /v1/policy`: policies to import (all or nothing).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyImport {
    /// Where the YAML came from (a file name), used in error messages.
    pub source: String,
    /// One or more YAML documents.
    pub yaml: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct PolicyChange {
    /// Policy revision after the change.
    pub revision: u64,
    /// The policies imported or deleted (`Kind namespace/name`).
    pub policies: Vec<String>,
    /// Import: YAML documents read, empty ones included.
    pub documents: Option<usize>,
    /// Import: policies that did not exist before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<String>,
    /// Import: policies of the same kind, namespace and name, replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<String>,
    /// Import: notes, e.g. `document 2 is empty: skipped`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A stored policy document.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyDocument {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub yaml: String,
    /// `local` (`cilia policy import`) or `kubernetes` (an object the
    /// agent watches).
    #[serde(default = "local_source")]
    pub source: String,
}

fn local_source() -> String {
    "local".into()
}

/// `GET /v1/policy`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyList {
    pub revision: u64,
    pub policies: Vec<PolicyDocument>,
    /// Stored documents that no longer parse (skipped).
    #[serde(default)]
    pub errors: Vec<String>,
}

/// `POST /v1/policy/trace`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    /// Endpoint id, IP address, or labels `k=v[,k=v…]`.
    pub src: String,
    /// Endpoint id, IP address, or labels.
    pub dst: String,
    /// `PORT/PROTO`, e.g. `80/TCP`, `53/UDP`, `ICMP`.
    pub dport: String,
    /// Also run the source endpoint's real program on a synthesized packet.
    #[serde(default)]
    pub datapath: bool,
    /// An HTTP request to run through the L7 (HTTP) rules of a proxied flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<TraceHttpRequest>,
}

/// The HTTP request of a trace: what the L7 proxy would see.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TraceHttpRequest {
    /// Method, e.g. `POST`.
    pub method: String,
    /// Path and query, e.g. `/v1/request-landing`.
    pub path: String,
    /// `Host` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Headers as `Name: value`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// The L7 side of one direction of a trace.
#[skip_serializing_none]
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TraceL7 {
    /// Whether the flow is redirected to the L7 proxy.
    pub redirected: bool,
    /// With a request: `ALLOWED` or `DENIED` (answered `403 Access denied`).
    pub verdict: Option<String>,
    /// The HTTP rule that allowed the request: `<rule> toPorts[i].rules.http[j]`.
    pub matched: Option<String>,
    pub reason: String,
    /// The allow rules behind the proxied entry.
    #[serde(default)]
    pub rules: Vec<String>,
}

/// One direction's decision in a trace.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TraceStep {
    /// `egress` of the source or `ingress` of the destination.
    pub direction: String,
    pub subject: String,
    /// `ALLOWED` or `DENIED`.
    pub verdict: String,
    pub reason: String,
    /// The rules that decided it.
    pub rules: Vec<String>,
    /// The L7 (HTTP) side, when the flow is allowed on TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<TraceL7>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TraceResponse {
    pub src: String,
    pub src_identity: u32,
    pub dst: String,
    pub dst_identity: u32,
    /// `ALLOWED` or `DENIED`.
    pub verdict: String,
    pub steps: Vec<TraceStep>,
    /// The kernel's verdict (`ALLOWED`/`DENIED`) with `datapath`.
    pub datapath: Option<String>,
    /// With `http` on an allowed flow: the request's verdict at L7
    /// (`ALLOWED`, or `DENIED` when a proxy answers `403 Access denied`).
    pub http_verdict: Option<String>,
}

/// Parses `PORT/PROTO` (`80/TCP`, `53/udp`, `132/SCTP`; a bare port means
/// TCP) or `ICMP`/`ICMPv6` into (port, IP protocol number).
pub fn parse_port_proto(spec: &str) -> Result<(u16, u8), String> {
    let upper = spec.trim().to_ascii_uppercase();
    match upper.as_str() {
        "ICMP" => return Ok((0, 1)),
        "ICMPV6" => return Ok((0, 58)),
        _ => {}
    }
    let (port, proto) = upper.split_once('/').unwrap_or((upper.as_str(), "TCP"));
    let proto = match proto {
        "TCP" => 6,
        "UDP" => 17,
        "SCTP" => 132,
        other => {
            return Err(format!(
                "{spec:?}: unknown protocol {other:?} (TCP, UDP, SCTP, ICMP)"
            ))
        }
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{spec:?}: {port:?} is not a port number"))?;
    Ok((port, proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_create_needs_only_netns() {
        let body: EndpointCreate = serde_json::from_str(r#"{"netns": "n1"}"#).unwrap();
        assert_eq!(body.netns, "n1");
        assert!(body.labels.is_empty());
        assert_eq!(
            (
                body.ifname,
                body.container_id,
                body.network,
                body.namespace,
                body.label_source
            ),
            (None, None, None, None, None)
        );
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            id: 7,
            netns: "n1".into(),
            ifname: "eth0".into(),
            host_ifname: "lxc7".into(),
            ipv6: "fd00::7".into(),
            ipv4: None,
            labels: BTreeMap::new(),
            namespace: "default".into(),
            identity: 256,
            mac: "02:00:00:00:00:07".into(),
            host_mac: "02:00:00:00:00:08".into(),
            state: EndpointState::Ready,
            reason: None,
            container_id: None,
            network: None,
            labels_pending: false,
            policy_audit: false,
            named_ports: Vec::new(),
            node: None,
            k8s_pod: None,
            gateways: None,
        }
    }

    #[test]
    fn endpoint_json_leaves_out_absent_fields_but_writes_ipv4_null() {
        let json = serde_json::to_value(endpoint()).unwrap();
        let obj = json.as_object().unwrap();
        assert_eq!(obj["ipv4"], serde_json::Value::Null);
        for absent in ["reason", "container_id", "network", "node"] {
            assert!(!obj.contains_key(absent), "{absent} in {json}");
        }
        let back: Endpoint = serde_json::from_value(json).unwrap();
        assert_eq!((back.ipv4, back.reason), (None, None));
    }

    #[test]
    fn flow_json_leaves_out_absent_fields() {
        let json = serde_json::to_value(Flow::default()).unwrap();
        for absent in [
            "drop_reason",
            "policy",
            "trace",
            "data",
            "l7",
            "service",
            "node",
        ] {
            assert!(json.get(absent).is_none(), "{absent} in {json}");
        }
        assert_eq!(json["source"], serde_json::json!({"identity": 0}));
    }

    #[test]
    fn flow_json_of_an_older_agent_reads_without_l7() {
        let json = serde_json::json!({
            "time": "t", "time_ns": 1, "event": "drop", "verdict": "DROPPED",
            "direction": "ingress", "observed_at": 1, "source": {"identity": 2},
            "destination": {"identity": 3}, "protocol": "TCP", "length": 60
        });
        let flow: Flow = serde_json::from_value(json).unwrap();
        assert_eq!((flow.event.as_str(), flow.l7), ("drop", None));
    }

    #[test]
    fn l7_flow_json_carries_the_request() {
        let flow = Flow {
            event: "l7".into(),
            l7: Some(FlowL7 {
                protocol: "http".into(),
                method: "PUT".into(),
                path: "/v1/exhaust-port".into(),
                host: None,
                status: 403,
                latency_us: 412,
                verdict: "denied".into(),
            }),
            ..Default::default()
        };
        let json = serde_json::to_value(&flow).unwrap();
        assert_eq!(
            json["l7"],
            serde_json::json!({"protocol": "http", "method": "PUT",
                "path": "/v1/exhaust-port", "status": 403, "latency_us": 412,
                "verdict": "denied"})
        );
        assert_eq!(serde_json::from_value::<Flow>(json).unwrap(), flow);
    }

    #[test]
    fn port_specs_parse() {
        assert_eq!(parse_port_proto("80/TCP"), Ok((80, 6)));
        assert_eq!(parse_port_proto("53/udp"), Ok((53, 17)));
        assert_eq!(parse_port_proto("8080"), Ok((8080, 6)));
        assert_eq!(parse_port_proto("icmp"), Ok((0, 1)));
        assert!(parse_port_proto("80/QUIC").is_err());
        assert!(parse_port_proto("eighty/TCP").is_err());
    }
}

/// One side of a flow, enriched by the agent.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FlowPeer {
    /// Local endpoint id, when the address is one.
    pub endpoint: Option<u16>,
    pub ip: Option<String>,
    pub port: Option<u16>,
    pub identity: u32,
    /// Shared, not copied: the agent's name snapshot holds one map per
    /// endpoint, and each flow of the ring (4096 by default) points at it,
    /// where a copy per flow cost a B-tree node and every string again.
    #[serde(default, skip_serializing_if = "no_labels")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub labels: Arc<BTreeMap<String, String>>,
    pub namespace: Option<String>,
}

fn no_labels(labels: &Arc<BTreeMap<String, String>>) -> bool {
    labels.is_empty()
}

/// A datapath event, decoded and enriched: what `cilia monitor` streams and
/// `cilia observe` lists.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Flow {
    /// RFC 3339 time.
    pub time: String,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// `drop`, `trace`, `policy-verdict`, `debug`, `l7` (an HTTP request
    /// the L7 proxy handled) or `service` (a new flow to a service given a
    /// backend).
    pub event: String,
    /// `FORWARDED`, `DROPPED`, `AUDIT` or (`l7` only) `ERROR`.
    pub verdict: String,
    /// Why it was dropped, e.g. `Policy denied`.
    pub drop_reason: Option<String>,
    /// `ingress` or `egress` (of the endpoint whose policy decided).
    pub direction: String,
    /// Endpoint whose program saw the packet.
    pub observed_at: u16,
    pub source: FlowPeer,
    pub destination: FlowPeer,
    /// `TCP`, `UDP`, `ICMPv6`, …; empty when the packet was not parsed.
    pub protocol: String,
    pub length: u32,
    /// The policy rule that decided, or `default deny` / `default allow`.
    pub policy: Option<String>,
    /// Where a forwarded packet went (`to-endpoint`, `to-stack`); for debug
    /// events, the packet's conntrack state (`new`, `established`, `reply`,
    /// `related`, `revoked`).
    pub trace: Option<String>,
    /// The packet's first bytes, hex.
    pub data: Option<String>,
    /// For `l7` events: the HTTP request and its outcome.
    pub l7: Option<FlowL7>,
    /// For `service` events: the service the client addressed and the
    /// backend the load balancer chose for the flow.
    #[serde(default)]
    pub service: Option<crate::services::FlowService>,
    /// A summary flow: it stands for this many events of its kind (itself
    /// among them) that the agent did not send one by one, because more
    /// than a few of that kind came within a second. Absent on other flows.
    #[serde(default)]
    pub aggregated: Option<u64>,
    /// The node whose agent saw the flow: set in cluster-wide answers
    /// (`/v1/cluster/flows`), absent in a single agent's.
    #[serde(default)]
    pub node: Option<String>,
}

/// The application-layer part of an `l7` flow: one HTTP request and the
/// response its client got, as the L7 proxy saw them. The flow around it
/// says who spoke to whom, the verdict (`FORWARDED`, `DROPPED` when the L7
/// policy denied it, `ERROR` when the upstream failed) and the deciding rules.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FlowL7 {
    /// `http`.
    pub protocol: String,
    /// Request method, e.g. `GET`.
    pub method: String,
    /// The request target as sent: path and query (at most 256 bytes kept).
    pub path: String,
    /// The `Host` header, if any.
    pub host: Option<String>,
    /// Status answered to the client (403 when the L7 policy denied).
    pub status: u16,
    /// From the request's head arriving to the response's head leaving, µs.
    pub latency_us: u64,
    /// The proxy's outcome: `forwarded`, `denied` or `error`.
    pub verdict: String,
}

/// A line of a monitor or observe stream: a flow, or a note that events
/// were lost (the reader fell behind).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StreamItem {
    Flow(Box<Flow>),
    Lost { lost: u64 },
}

/// `POST /v1/datapath/reload`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatapathReload {
    /// Swap every endpoint's programs, also those that already are this
    /// build's with the endpoint's configuration.
    #[serde(default)]
    pub force: bool,
}

/// What a datapath reload did to one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadOutcome {
    /// New programs swapped into its links.
    Reloaded,
    /// Its programs already were this build's, with its configuration.
    Unchanged,
    /// Left on its old programs (see `reason`).
    Failed,
    /// Not ready (no device or programs to swap).
    Skipped,
}

/// One of an endpoint's pinned links after a reload.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LinkReload {
    /// `cil_from_container` or `cil_to_container`.
    pub program: String,
    /// The same before and after: the program is swapped inside the link.
    pub link_id: u32,
    pub old_program_id: u32,
    /// Equal to `old_program_id` when nothing was swapped.
    pub new_program_id: u32,
}

/// One endpoint's result of a datapath reload.
#[skip_serializing_none]
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointReload {
    pub endpoint_id: u16,
    pub outcome: ReloadOutcome,
    /// Why it failed or was skipped (for a verifier rejection, the end of
    /// the verifier's log).
    pub reason: Option<String>,
    #[serde(default)]
    pub links: Vec<LinkReload>,
}

/// Answer of `POST /v1/datapath/reload`: per endpoint, and the counts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DatapathReloadResult {
    pub reloaded: usize,
    pub unchanged: usize,
    pub failed: usize,
    pub skipped: usize,
    pub endpoints: Vec<EndpointReload>,
}

#[cfg(test)]
mod named_port_tests {
    use super::NamedPort;

    #[test]
    fn a_named_port_reads_and_prints_as_name_protocol_and_port() {
        let p: NamedPort = "http=TCP/8080".parse().unwrap();
        assert_eq!(
            p,
            NamedPort {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 8080
            }
        );
        assert_eq!(p.to_string(), "http=TCP/8080");
    }

    #[test]
    fn a_named_port_without_protocol_or_a_valid_port_is_refused() {
        for (bad, why) in [
            ("http", "NAME=PROTO/PORT"),
            ("http=8080", "NAME=PROTO/PORT"),
            ("http=TCP/0", "between 1 and 65535"),
            ("http=TCP/65536", "between 1 and 65535"),
        ] {
            let e = bad.parse::<NamedPort>().unwrap_err().to_string();
            assert!(
                e.starts_with("named port: ") && e.contains(why),
                "{bad}: {e}"
            );
        }
    }
}

/// `POST /v1/prefilter` (add) and `DELETE /v1/prefilter` (remove): source
/// CIDRs of the XDP prefilter, `ADDRESS/LENGTH` with no host bits set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PrefilterCidrs {
    pub cidrs: Vec<String>,
}

/// `GET /v1/prefilter`: where the XDP prefilter runs and what it drops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Prefilter {
    /// The devices of `--prefilter-device`; empty: the prefilter is not
    /// attached anywhere (CIDRs are still kept).
    pub devices: Vec<PrefilterDevice>,
    /// The CIDRs, IPv4 first, with what each dropped since it was added.
    pub cidrs: Vec<PrefilterCidr>,
}

/// One device the prefilter is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PrefilterDevice {
    pub name: String,
    /// `native` (in the driver) or `generic` (after the socket buffer is
    /// built: the driver has no native XDP).
    pub mode: String,
    /// Why native mode was refused, when the attach fell back to generic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One prefilter CIDR and its drops (packets, bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PrefilterCidr {
    pub cidr: String,
    pub packets: u64,
    pub bytes: u64,
}
