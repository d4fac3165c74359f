//! The cilia CNI plugin (CNI spec 1.1; configs of version 0.4.0, 1.0.0 and
//! 1.1.0 accepted): parses the runtime's environment and network config,
//! asks the cilia agent for an endpoint, and prints the result or the CNI
//! error for the config's version.
//!
//! Everything but process I/O lives here; the agent is behind the small
//! [`Agent`] trait so the command logic is unit-tested with a fake.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cilia_api::{ApiClient, ClientError, Endpoint, EndpointCreate, EndpointState, Status};
use serde::Deserialize;
use serde_json::{json, Value};

/// Which endpoints an agent call is about: (container id, interface,
/// network), as the CNI spec keys an attachment.
pub use cilia_api::EndpointQuery;

/// The spec version this plugin implements (VERSION's `cniVersion`).
pub const SPEC_VERSION: &str = "1.1.0";
/// Config versions accepted.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// Default agent socket.
pub const DEFAULT_SOCKET: &str = cilia_api::DEFAULT_SOCKET;

/// Well-known CNI error codes (spec "Error" section), plus this plugin's
/// own codes from 100.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The agent refused or failed for another reason.
    pub const AGENT_ERROR: u32 = 100;
    /// No free address (or endpoint id) left in the agent's pools.
    pub const IPAM_EXHAUSTED: u32 = 101;
    /// The interface name is already used in the container's netns.
    pub const IFNAME_TAKEN: u32 = 102;
    /// CHECK: the endpoint exists but is not ready.
    pub const NOT_READY: u32 = 103;
    /// CHECK: the endpoint's addresses differ from prevResult.
    pub const ADDRESS_MISMATCH: u32 = 104;
}

/// A CNI error, printed as `{"cniVersion","code","msg","details"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// An error of one agent call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The agent could not be reached, or did not answer in time.
    #[error("{0}")]
    Unreachable(String),
    /// The agent answered with an API error.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The agent answered something unexpected.
    #[error("{0}")]
    Protocol(String),
}

impl From<ClientError> for AgentError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api {
                status,
                code,
                message,
            } => AgentError::Api {
                status,
                code,
                message,
            },
            // A connection dropped mid-request means the agent went away.
            ClientError::Connect { .. }
            | ClientError::ConnectPeer { .. }
            | ClientError::Http(_) => AgentError::Unreachable(e.to_string()),
            ClientError::Decode { .. } | ClientError::Request { .. } => {
                AgentError::Protocol(e.to_string())
            }
        }
    }
}

impl AgentError {
    /// The CNI error for this agent error, for `what` (e.g. "creating the endpoint").
    pub fn to_cni(&self, what: &str) -> CniError {
        match self {
            AgentError::Unreachable(e) => CniError::new(
                code::TRY_AGAIN_LATER,
                format!("cilia agent unavailable while {what}, try again later"),
            )
            .with_details(e.clone()),
            AgentError::Api {
                status,
                code: api_code,
                message,
            } => {
                let c = match api_code.as_str() {
                    "ipam-exhausted" | "ids-exhausted" => code::IPAM_EXHAUSTED,
                    "ifname-taken" => code::IFNAME_TAKEN,
                    "invalid-netns" | "invalid-ifname" => code::INVALID_ENV,
                    "invalid-labels" | "invalid-namespace" | "invalid-request" => {
                        code::INVALID_CONFIG
                    }
                    _ => code::AGENT_ERROR,
                };
                CniError::new(c, message.clone())
                    .with_details(format!("cilia agent: {api_code} (HTTP {status})"))
            }
            AgentError::Protocol(e) => {
                CniError::new(code::AGENT_ERROR, format!("cilia agent while {what}: {e}"))
            }
        }
    }
}

/// The agent calls the plugin makes.
pub trait Agent {
    fn status(&self) -> Result<Status, AgentError>;
    fn create_endpoint(&self, req: &EndpointCreate) -> Result<Endpoint, AgentError>;
    /// Endpoints, all or only those `filter` selects.
    fn list_endpoints(&self, filter: &EndpointQuery<'_>) -> Result<Vec<Endpoint>, AgentError>;
    /// Deletes the endpoints of `filter.container_id` that `filter`
    /// selects; 0 is fine. Returns once they are disconnected: the agent
    /// removes their devices and programs right after.
    fn delete_endpoints(&self, filter: &EndpointQuery<'_>) -> Result<usize, AgentError>;
}

/// The real agent, over its unix socket.
pub struct SocketAgent {
    client: ApiClient,
    rt: tokio::runtime::Runtime,
    timeout: Duration,
    retry_for: Duration,
}

impl SocketAgent {
    /// Endpoint creation is serialized in the agent; a burst of ADDs queues.
    pub const TIMEOUT: Duration = Duration::from_secs(120);

    pub fn new(socket: &Path) -> Result<Self, AgentError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| AgentError::Unreachable(format!("starting the I/O runtime: {e}")))?;
        Ok(Self {
            client: ApiClient::new(socket),
            rt,
            timeout: Self::TIMEOUT,
            retry_for: Duration::ZERO,
        })
    }

    /// Keeps retrying while the agent is unreachable, up to `retry_for`
    /// (every call is idempotent: a repeated create replaces the endpoint of
    /// the same container and interface), so an agent restart does not fail
    /// the containers being started meanwhile.
    pub fn with_retry(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    fn call<T, F>(&self, make: impl Fn() -> F) -> Result<T, AgentError>
    where
        F: std::future::Future<Output = Result<T, ClientError>>,
    {
        let deadline = std::time::Instant::now() + self.retry_for;
        loop {
            let result = self
                .rt
                .block_on(async { tokio::time::timeout(self.timeout, make()).await })
                .map_err(|_| {
                    AgentError::Unreachable(format!(
                        "the agent did not answer within {} s",
                        self.timeout.as_secs()
                    ))
                })
                .and_then(|r| r.map_err(AgentError::from));
            match result {
                Err(AgentError::Unreachable(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }
}

impl Agent for SocketAgent {
    fn status(&self) -> Result<Status, AgentError> {
        self.call(|| self.client.status())
    }

    fn create_endpoint(&self, req: &EndpointCreate) -> Result<Endpoint, AgentError> {
        self.call(|| self.client.create_endpoint(req))
    }

    fn list_endpoints(&self, filter: &EndpointQuery<'_>) -> Result<Vec<Endpoint>, AgentError> {
        self.call(|| self.client.endpoints(filter))
    }

    fn delete_endpoints(&self, filter: &EndpointQuery<'_>) -> Result<usize, AgentError> {
        if filter.container_id.is_none() {
            return Err(AgentError::Protocol(
                "deleting endpoints needs a container id".into(),
            ));
        }
        // The runtime waits for DEL: the kernel's part of the delete
        // (grace periods) is the agent's to finish after answering.
        self.call(|| self.client.disconnect_endpoints(filter))
    }
}

/// The CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
                    ),
                ))
            }
        })
    }
}

/// The runtime's environment variables.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Env {
    /// Reads the `CNI_*` variables through `get` (empty counts as unset).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
        }
    }

    pub fn from_process() -> Self {
        Self::from_vars(|n| std::env::var(n).ok())
    }

    fn required<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
        value.as_deref().ok_or_else(|| {
            CniError::new(code::INVALID_ENV, format!("{name} is required but not set"))
        })
    }

    /// CNI_CONTAINERID, validated as the spec says (alphanumeric plus `_.-`),
    /// at most `MAX_CONTAINER_ID_LEN` bytes.
    pub fn container_id(&self) -> Result<&str, CniError> {
        let id = Self::required(&self.container_id, "CNI_CONTAINERID")?;
        cilia_api::limits::check_container_id("CNI_CONTAINERID", id).map_err(invalid_env)?;
        Ok(id)
    }

    /// CNI_IFNAME: 1-15 bytes of `[A-Za-z0-9_.-]`, not `.` or `..`.
    pub fn ifname(&self) -> Result<&str, CniError> {
        let name = Self::required(&self.ifname, "CNI_IFNAME")?;
        cilia_api::limits::check_ifname("CNI_IFNAME", name).map_err(invalid_env)?;
        Ok(name)
    }

    pub fn netns(&self) -> Result<&str, CniError> {
        Self::required(&self.netns, "CNI_NETNS")
    }

    /// CNI_ARGS as key/value pairs.
    pub fn parsed_args(&self) -> Result<CniArgs, CniError> {
        CniArgs::parse(self.args.as_deref().unwrap_or(""))
    }
}

fn invalid_env(e: cilia_api::limits::InputError) -> CniError {
    CniError::new(code::INVALID_ENV, e.to_string())
}

/// `CNI_ARGS`: `K=V;K=V`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(pub BTreeMap<String, String>);

impl CniArgs {
    const KNOWN: [&'static str; 6] = [
        "IgnoreUnknown",
        Self::NAMED_PORTS,
        "K8S_POD_NAME",
        "K8S_POD_NAMESPACE",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
    ];

    pub fn parse(s: &str) -> Result<Self, CniError> {
        let mut out = BTreeMap::new();
        for item in s.split(';').filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_ARGS: {} is not KEY=VALUE",
                        cilia_api::limits::excerpt(item)
                    ),
                )
            })?;
            out.insert(k.to_string(), v.to_string());
        }
        Ok(Self(out))
    }

    /// Port names of this container: `CILIA_NAMED_PORTS=http=TCP/8080,dns=UDP/53`
    /// (podman passes its own environment's `CNI_ARGS` on to the plugin).
    pub const NAMED_PORTS: &'static str = "CILIA_NAMED_PORTS";

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The port names of [`Self::NAMED_PORTS`] (empty when absent).
    pub fn named_ports(&self) -> Result<Vec<cilia_api::NamedPort>, CniError> {
        let Some(list) = self.get(Self::NAMED_PORTS) else {
            return Ok(Vec::new());
        };
        let items: Vec<&str> = list.split(',').filter(|i| !i.is_empty()).collect();
        let max = cilia_api::limits::MAX_NAMED_PORTS;
        if items.len() > max {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_ARGS {}: {} given, at most {max}",
                    Self::NAMED_PORTS,
                    items.len()
                ),
            ));
        }
        items
            .into_iter()
            .map(|item| {
                item.parse().map_err(|e| {
                    CniError::new(
                        code::INVALID_ENV,
                        format!("CNI_ARGS {}: {e}", Self::NAMED_PORTS),
                    )
                })
            })
            .collect()
    }

    /// The pod kubelet names (`K8S_POD_NAMESPACE` and `K8S_POD_NAME`, both
    /// or none: podman sends `K8S_POD_NAME` alone, its container name, which
    /// names no Kubernetes pod).
    pub fn k8s_pod(&self) -> Result<Option<cilia_api::K8sPodRef>, CniError> {
        let (Some(namespace), Some(name)) =
            (self.get("K8S_POD_NAMESPACE"), self.get("K8S_POD_NAME"))
        else {
            return Ok(None);
        };
        cilia_api::limits::check_container_id("CNI_ARGS K8S_POD_NAMESPACE", namespace)
            .map_err(invalid_env)?;
        cilia_api::limits::check_container_id("CNI_ARGS K8S_POD_NAME", name)
            .map_err(invalid_env)?;
        Ok(Some(cilia_api::K8sPodRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }))
    }

    fn ignore_unknown(&self) -> bool {
        matches!(
            self.get("IgnoreUnknown")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("1" | "true")
        )
    }

    /// Refuses what ADD cannot honour: a requested address or MAC (the agent
    /// allocates both), a container name outside the container id character
    /// set, and unknown keys unless `IgnoreUnknown` is set.
    pub fn check_for_add(&self) -> Result<(), CniError> {
        for key in ["IP", "MAC"] {
            if let Some(v) = self.get(key) {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_ARGS {key}={}: cilia allocates addresses and MACs itself; requesting one (podman --ip/--mac-address) is not supported",
                        cilia_api::limits::excerpt(v)
                    ),
                ));
            }
        }
        if let Some(name) = self.get("K8S_POD_NAME") {
            cilia_api::limits::check_container_id("CNI_ARGS K8S_POD_NAME", name)
                .map_err(invalid_env)?;
        }
        if !self.ignore_unknown() {
            if let Some(k) = self.0.keys().find(|k| !Self::KNOWN.contains(&k.as_str())) {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_ARGS: unknown key {} (set IgnoreUnknown=1 to ignore it)",
                        cilia_api::limits::excerpt(k)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's network config, as a runtime passes it on stdin. Only
/// `cniVersion`, `name` and `type` are required: serde reads an absent
/// `Option` field as `None`, so those need no `#[serde(default)]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Agent socket.
    pub socket: Option<PathBuf>,
    /// Passed through to the result.
    pub dns: Option<Value>,
    /// Namespace when CNI_ARGS has no K8S_POD_NAMESPACE.
    pub namespace: Option<String>,
    /// `args.cni.labels`: list of `{key, value}` or a map.
    pub args: Option<Value>,
    pub prev_result: Option<Value>,
    /// How long to keep retrying while the agent is unreachable (default
    /// 10 s; 0 fails at once with code 11).
    pub retry_seconds: Option<u64>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    /// Decodes stdin: malformed JSON is code 6, an unknown version code 1,
    /// missing or mistyped fields code 7.
    pub fn parse(stdin: &[u8]) -> Result<Self, (Option<String>, CniError)> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            (
                None,
                CniError::new(
                    code::DECODE,
                    format!("network config on stdin is not valid JSON: {e}"),
                ),
            )
        })?;
        let Some(obj) = value.as_object() else {
            return Err((
                None,
                CniError::new(code::DECODE, "network config on stdin is not a JSON object"),
            ));
        };
        let version = match obj.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            Some(_) => {
                return Err((
                    None,
                    CniError::new(code::INVALID_CONFIG, "cniVersion must be a string"),
                ))
            }
            None => {
                return Err((
                    None,
                    CniError::new(code::INVALID_CONFIG, "network config has no cniVersion"),
                ))
            }
        };
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err((
                None,
                CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!(
                        "incompatible CNI version: config has cniVersion {}, cilia-cni supports {}",
                        cilia_api::limits::excerpt(&version),
                        SUPPORTED_VERSIONS.join(", ")
                    ),
                ),
            ));
        }
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            (
                Some(version.clone()),
                CniError::new(code::INVALID_CONFIG, format!("invalid network config: {e}")),
            )
        })?;
        let fail = |msg: String| {
            Err((
                Some(version.clone()),
                CniError::new(code::INVALID_CONFIG, msg),
            ))
        };
        if conf.name.is_empty() {
            return fail("network config has no name".into());
        }
        // The spec gives network names the container id character set.
        if let Err(e) = cilia_api::limits::check_container_id("network config name", &conf.name) {
            return fail(e.to_string());
        }
        if conf.plugin_type != "cilia-cni" {
            return fail(format!(
                "network config type is {}, expected \"cilia-cni\"",
                cilia_api::limits::excerpt(&conf.plugin_type)
            ));
        }
        if let Some(dns) = &conf.dns {
            if !dns.is_object() {
                return fail("dns must be an object (nameservers, domain, search, options)".into());
            }
        }
        Ok(conf)
    }

    pub fn retry(&self) -> Duration {
        Duration::from_secs(self.retry_seconds.unwrap_or(10))
    }

    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// Labels from `args.cni.labels`, or `None` when absent.
    pub fn labels(&self) -> Result<Option<BTreeMap<String, String>>, CniError> {
        let Some(labels) = self
            .args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("labels"))
        else {
            return Ok(None);
        };
        let bad =
            |why: &str| CniError::new(code::INVALID_CONFIG, format!("args.cni.labels: {why}"));
        let mut out = BTreeMap::new();
        match labels {
            Value::Object(map) => {
                for (k, v) in map {
                    let v = v.as_str().ok_or_else(|| {
                        bad(&format!(
                            "value of {} is not a string",
                            cilia_api::limits::excerpt(k)
                        ))
                    })?;
                    out.insert(k.clone(), v.to_string());
                }
            }
            Value::Array(items) => {
                for item in items {
                    let k = item.get("key").and_then(Value::as_str);
                    let v = item.get("value").and_then(Value::as_str);
                    let (Some(k), Some(v)) = (k, v) else {
                        return Err(bad("every entry needs string \"key\" and \"value\""));
                    };
                    out.insert(k.to_string(), v.to_string());
                }
            }
            _ => return Err(bad("expected a list of {key, value} or a map")),
        }
        cilia_api::labels::validate_endpoint_labels(&out).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                e.in_field("args.cni.labels").to_string(),
            )
        })?;
        Ok(Some(out))
    }

    /// Port names from `args.cni.namedPorts`: a list of `"NAME=PROTO/PORT"`
    /// strings or `{name, protocol, port}` objects (empty when absent). The
    /// agent checks them (names, protocols, a name twice).
    pub fn named_ports(&self) -> Result<Vec<cilia_api::NamedPort>, CniError> {
        let Some(ports) = self
            .args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("namedPorts"))
        else {
            return Ok(Vec::new());
        };
        let bad = |why: String| {
            CniError::new(code::INVALID_CONFIG, format!("args.cni.namedPorts: {why}"))
        };
        let Value::Array(items) = ports else {
            return Err(bad(
                "expected a list of \"NAME=PROTO/PORT\" or {name, protocol, port}".to_string(),
            ));
        };
        if items.len() > cilia_api::limits::MAX_NAMED_PORTS {
            return Err(bad(format!(
                "{} given, at most {}",
                items.len(),
                cilia_api::limits::MAX_NAMED_PORTS
            )));
        }
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.parse().map_err(|e| bad(format!("{e}"))),
                Value::Object(_) => serde_json::from_value(item.clone()).map_err(|e| {
                    bad(format!(
                        "every object needs \"name\", \"protocol\" and \"port\" (1-65535): {e}"
                    ))
                }),
                _ => Err(bad(
                    "every entry is \"NAME=PROTO/PORT\" or {name, protocol, port}".to_string(),
                )),
            })
            .collect()
    }

    /// Addresses of prevResult's `ips`.
    pub fn prev_result_ips(&self) -> Result<BTreeSet<IpAddr>, CniError> {
        let Some(prev) = &self.prev_result else {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "CHECK needs prevResult in the network config",
            ));
        };
        let mut out = BTreeSet::new();
        for ip in prev
            .get("ips")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let addr = ip.get("address").and_then(Value::as_str).ok_or_else(|| {
                CniError::new(code::INVALID_CONFIG, "prevResult.ips[]: no address")
            })?;
            let host = addr.split_once('/').map_or(addr, |(h, _)| h);
            let parsed: IpAddr = host.parse().map_err(|_| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("prevResult.ips[]: {addr:?} is not an address"),
                )
            })?;
            out.insert(parsed);
        }
        Ok(out)
    }
}

/// The VERSION answer.
pub fn version_info() -> Value {
    json!({ "cniVersion": SPEC_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

/// The routers of the agent's pools (the endpoints' gateways).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateways {
    pub ipv6: IpAddr,
    pub ipv4: Option<IpAddr>,
}

impl Gateways {
    /// From the create's answer (agents that send them).
    pub fn from_endpoint(gateways: &cilia_api::EndpointGateways) -> Result<Self, CniError> {
        Ok(Self {
            ipv6: parse_router(&gateways.ipv6)?,
            ipv4: gateways.ipv4.as_deref().map(parse_router).transpose()?,
        })
    }

    pub fn from_status(status: &Status) -> Result<Self, CniError> {
        let parse = parse_router;
        Ok(Self {
            ipv6: parse(&status.ipam.ipv6.router)?,
            ipv4: status
                .ipam
                .ipv4
                .as_ref()
                .map(|p| parse(&p.router))
                .transpose()?,
        })
    }
}

fn parse_router(s: &str) -> Result<IpAddr, CniError> {
    s.parse::<IpAddr>().map_err(|_| {
        CniError::new(
            code::AGENT_ERROR,
            format!("cilia agent reported router address {s:?}, not an address"),
        )
    })
}

/// The ADD result for `cni_version` (0.4.0 adds `version` to every IP).
pub fn build_result(
    cni_version: &str,
    ep: &Endpoint,
    gateways: &Gateways,
    sandbox: &str,
    dns: Option<&Value>,
) -> Result<Value, CniError> {
    let legacy = cni_version == "0.4.0";
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    let mut add = |addr: &str, gw: IpAddr| -> Result<(), CniError> {
        let ip: IpAddr = addr.parse().map_err(|_| {
            CniError::new(
                code::AGENT_ERROR,
                format!("cilia agent returned address {addr:?}, not an address"),
            )
        })?;
        let (prefix, default, version) = match ip {
            IpAddr::V6(_) => (128, "::/0", "6"),
            IpAddr::V4(_) => (32, "0.0.0.0/0", "4"),
        };
        let mut entry = json!({
            "address": format!("{ip}/{prefix}"),
            "gateway": gw.to_string(),
            "interface": 0,
        });
        if legacy {
            entry["version"] = json!(version);
        }
        ips.push(entry);
        routes.push(json!({ "dst": default, "gw": gw.to_string() }));
        Ok(())
    };
    add(&ep.ipv6, gateways.ipv6)?;
    if let Some(v4) = &ep.ipv4 {
        let gw = gateways.ipv4.ok_or_else(|| {
            CniError::new(
                code::AGENT_ERROR,
                "cilia agent assigned an IPv4 address but reports no IPv4 pool",
            )
        })?;
        add(v4, gw)?;
    }
    let mut result = json!({
        "cniVersion": cni_version,
        "interfaces": [{ "name": ep.ifname, "mac": ep.mac, "sandbox": sandbox }],
        "ips": ips,
        "routes": routes,
    });
    if let Some(dns) = dns {
        result["dns"] = dns.clone();
    }
    Ok(result)
}

/// Runs one plugin invocation; returns what to print on stdout and whether
/// it succeeded (the process exit status).
pub fn execute<A: Agent>(
    env: &Env,
    stdin: &[u8],
    connect: impl FnOnce(&NetConf) -> Result<A, AgentError>,
) -> (String, bool) {
    let mut version = SPEC_VERSION.to_string();
    match dispatch(env, stdin, connect, &mut version) {
        Ok(Some(v)) => (format!("{v}\n"), true),
        Ok(None) => (String::new(), true),
        Err(e) => (format!("{}\n", e.to_json(&version)), false),
    }
}

fn dispatch<A: Agent>(
    env: &Env,
    stdin: &[u8],
    connect: impl FnOnce(&NetConf) -> Result<A, AgentError>,
    version: &mut String,
) -> Result<Option<Value>, CniError> {
    let command =
        Command::parse(env.command.as_deref().ok_or_else(|| {
            CniError::new(code::INVALID_ENV, "CNI_COMMAND is required but not set")
        })?)?;
    if command == Command::Version {
        return Ok(Some(version_info()));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err((v, e)) => {
            if let Some(v) = v {
                *version = v;
            }
            return Err(e);
        }
    };
    *version = conf.cni_version.clone();
    // Validate the environment before touching the agent.
    match command {
        Command::Add | Command::Check => {
            env.container_id()?;
            env.ifname()?;
            env.netns()?;
        }
        Command::Del => {
            env.container_id()?;
            env.ifname()?;
        }
        _ => {}
    }
    let agent = connect(&conf).map_err(|e| e.to_cni("connecting"))?;
    match command {
        Command::Add => cmd_add(env, &conf, &agent).map(Some),
        Command::Del => cmd_del(env, &conf, &agent).map(|()| None),
        Command::Check => cmd_check(env, &conf, &agent).map(|()| None),
        Command::Status => cmd_status(&agent).map(|()| None),
        Command::Gc => cmd_gc(&conf, &agent).map(|()| None),
        Command::Version => Ok(Some(version_info())),
    }
}

fn cmd_add(env: &Env, conf: &NetConf, agent: &impl Agent) -> Result<Value, CniError> {
    let args = env.parsed_args()?;
    args.check_for_add()?;
    let labels = conf.labels()?;
    // The network's names, then the container's: the agent refuses one
    // name with two values.
    let mut named_ports = conf.named_ports()?;
    named_ports.extend(args.named_ports()?);
    let netns = env.netns()?;
    let namespace = args
        .get("K8S_POD_NAMESPACE")
        .map(str::to_string)
        .or_else(|| conf.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let label_source = if labels.is_none() {
        Some("podman".to_string())
    } else {
        None
    };
    let req = EndpointCreate {
        netns: netns.to_string(),
        labels: labels.unwrap_or_default(),
        ifname: Some(env.ifname()?.to_string()),
        container_id: Some(env.container_id()?.to_string()),
        namespace: Some(namespace),
        label_source,
        network: Some(conf.name.clone()),
        named_ports,
        k8s_pod: args.k8s_pod()?,
    };
    let ep = agent
        .create_endpoint(&req)
        .map_err(|e| e.to_cni("creating the endpoint"))?;
    if ep.state != EndpointState::Ready {
        return Err(CniError::new(
            code::AGENT_ERROR,
            format!(
                "endpoint {} was created but is {:?}: {}",
                ep.id,
                ep.state,
                ep.reason.as_deref().unwrap_or("no reason given")
            ),
        ));
    }
    // The create's answer carries the gateways; an older agent's does not,
    // and its status has them.
    let gateways = match &ep.gateways {
        Some(g) => Gateways::from_endpoint(g)?,
        None => {
            Gateways::from_status(&agent.status().map_err(|e| e.to_cni("reading its status"))?)?
        }
    };
    build_result(&conf.cni_version, &ep, &gateways, netns, conf.dns.as_ref())
}

/// DEL removes the attachment of this network only: the same container
/// may be attached to other networks through other interfaces.
fn cmd_del(env: &Env, conf: &NetConf, agent: &impl Agent) -> Result<(), CniError> {
    agent
        .delete_endpoints(&EndpointQuery::attachment(
            env.container_id()?,
            env.ifname()?,
            &conf.name,
        ))
        .map_err(|e| e.to_cni("deleting the endpoint"))?;
    Ok(())
}

fn cmd_check(env: &Env, conf: &NetConf, agent: &impl Agent) -> Result<(), CniError> {
    let expected = conf.prev_result_ips()?;
    let (cid, ifname) = (env.container_id()?, env.ifname()?);
    let eps = agent
        .list_endpoints(&EndpointQuery::attachment(cid, ifname, &conf.name))
        .map_err(|e| e.to_cni("listing endpoints"))?;
    let Some(ep) = eps.first() else {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "container {cid} has no cilia endpoint on {ifname} in network {:?}",
                conf.name
            ),
        ));
    };
    if ep.state != EndpointState::Ready {
        return Err(CniError::new(
            code::NOT_READY,
            format!(
                "endpoint {} of container {cid} is not ready: {}",
                ep.id,
                ep.reason.as_deref().unwrap_or("no reason given")
            ),
        ));
    }
    let mut actual = BTreeSet::new();
    for a in std::iter::once(&ep.ipv6).chain(ep.ipv4.iter()) {
        if let Ok(ip) = a.parse::<IpAddr>() {
            actual.insert(ip);
        }
    }
    if actual != expected {
        let show = |s: &BTreeSet<IpAddr>| {
            s.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(CniError::new(
            code::ADDRESS_MISMATCH,
            format!(
                "endpoint {} of container {cid} has addresses [{}], prevResult has [{}]",
                ep.id,
                show(&actual),
                show(&expected)
            ),
        ));
    }
    Ok(())
}

fn cmd_status(agent: &impl Agent) -> Result<(), CniError> {
    let status = agent.status().map_err(|e| {
        CniError::new(code::NOT_AVAILABLE, "cilia agent is not reachable")
            .with_details(e.to_string())
    })?;
    let pools = std::iter::once(&status.ipam.ipv6).chain(status.ipam.ipv4.iter());
    for pool in pools {
        if pool.used >= pool.capacity {
            return Err(CniError::new(
                code::NOT_AVAILABLE,
                format!(
                    "IPAM pool {} is exhausted: all {} addresses are allocated",
                    pool.range, pool.capacity
                ),
            ));
        }
    }
    Ok(())
}

/// GC removes the stale attachments of this network only (CNI 1.1: the
/// valid list is per network). Endpoints of other networks, endpoints made
/// with the CLI or the API, and runtime endpoints recorded before the agent
/// kept networks are never collected.
fn cmd_gc(conf: &NetConf, agent: &impl Agent) -> Result<(), CniError> {
    let Some(valid) = &conf.valid_attachments else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments in the network config",
        ));
    };
    let valid: BTreeSet<(&str, &str)> = valid
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let network = conf.name.as_str();
    let eps = agent
        .list_endpoints(&EndpointQuery {
            network: Some(network),
            ..EndpointQuery::default()
        })
        .map_err(|e| e.to_cni("listing endpoints"))?;
    let mut failures = Vec::new();
    for ep in &eps {
        let Some(cid) = ep.container_id.as_deref() else {
            continue; // not made by a runtime: never ours to collect
        };
        if ep.network.as_deref() != Some(network) {
            continue; // another network's, or recorded without one
        }
        if valid.contains(&(cid, ep.ifname.as_str())) {
            continue;
        }
        if let Err(e) = agent.delete_endpoints(&EndpointQuery::attachment(cid, &ep.ifname, network))
        {
            failures.push(format!("{cid}/{}: {e}", ep.ifname));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::AGENT_ERROR,
            format!("GC could not delete {} endpoint(s)", failures.len()),
        )
        .with_details(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use cilia_api::{IpamStatus, PoolStatus};

    use super::*;

    /// An agent in memory: endpoints keyed by (container, ifname).
    #[derive(Default)]
    struct Fake {
        eps: RefCell<Vec<Endpoint>>,
        /// Every create request, as sent.
        created: RefCell<Vec<EndpointCreate>>,
        down: bool,
        full: bool,
        /// Answers creates without the gateways, as agents before them did.
        old_agent: bool,
        status_calls: std::cell::Cell<usize>,
    }

    fn pool(range: &str, router: &str, used: u64) -> PoolStatus {
        PoolStatus {
            range: range.into(),
            router: router.into(),
            used,
            capacity: 2,
        }
    }

    impl Agent for &Fake {
        fn status(&self) -> Result<Status, AgentError> {
            self.status_calls.set(self.status_calls.get() + 1);
            if self.down {
                return Err(AgentError::Unreachable("connection refused".into()));
            }
            let used = if self.full { 2 } else { 1 };
            Ok(Status {
                version: "t".into(),
                health: "ok".into(),
                kernel: "6".into(),
                features: vec![],
                endpoints: 0,
                endpoints_not_ready: 0,
                endpoints_generic: 0,
                ipam: IpamStatus {
                    ipv6: pool("fd00::/126", "fd00::1", used),
                    ipv4: Some(pool("10.0.0.0/30", "10.0.0.1", used)),
                },
                state_dir: String::new(),
                bpf_root: String::new(),
                policy_revision: 0,
                policies: 0,
                policy_errors: vec![],
                subsystems: vec![],
                maps: vec![],
            })
        }

        fn create_endpoint(&self, req: &EndpointCreate) -> Result<Endpoint, AgentError> {
            if self.down {
                return Err(AgentError::Unreachable("connection refused".into()));
            }
            self.created.borrow_mut().push(req.clone());
            if self.full {
                return Err(AgentError::Api {
                    status: 503,
                    code: "ipam-exhausted".into(),
                    message: "IPAM pool fd00::/126 is exhausted: all 2 addresses are allocated"
                        .into(),
                });
            }
            let n = self.eps.borrow().len() + 2;
            let ep = Endpoint {
                id: n as u16,
                netns: req.netns.clone(),
                ifname: req.ifname.clone().unwrap_or_else(|| "eth0".into()),
                host_ifname: format!("lxc{n}"),
                ipv6: format!("fd00::{n}"),
                ipv4: Some(format!("10.0.0.{n}")),
                labels: req.labels.clone(),
                namespace: req.namespace.clone().unwrap_or_default(),
                identity: 5,
                mac: "02:00:00:00:00:01".into(),
                host_mac: "02:00:00:00:00:02".into(),
                state: EndpointState::Ready,
                reason: None,
                container_id: req.container_id.clone(),
                network: req.network.clone(),
                labels_pending: req.label_source.is_some(),
                policy_audit: false,
                named_ports: req.named_ports.clone(),
                node: None,
                k8s_pod: req.k8s_pod.clone(),
                gateways: (!self.old_agent).then(|| cilia_api::EndpointGateways {
                    ipv6: "fd00::1".into(),
                    ipv4: Some("10.0.0.1".into()),
                }),
            };
            self.eps.borrow_mut().push(ep.clone());
            Ok(ep)
        }

        fn list_endpoints(&self, filter: &EndpointQuery<'_>) -> Result<Vec<Endpoint>, AgentError> {
            Ok(self
                .eps
                .borrow()
                .iter()
                .filter(|e| selects(filter, e))
                .cloned()
                .collect())
        }

        fn delete_endpoints(&self, filter: &EndpointQuery<'_>) -> Result<usize, AgentError> {
            if self.down {
                return Err(AgentError::Unreachable("connection refused".into()));
            }
            assert!(filter.container_id.is_some());
            let mut eps = self.eps.borrow_mut();
            let before = eps.len();
            eps.retain(|e| !selects(filter, e));
            Ok(before - eps.len())
        }
    }

    /// The agent's matching: a record without a network matches any
    /// network when it has a container id.
    fn selects(filter: &EndpointQuery<'_>, e: &Endpoint) -> bool {
        filter
            .container_id
            .is_none_or(|c| e.container_id.as_deref() == Some(c))
            && filter.ifname.is_none_or(|i| e.ifname == i)
            && filter.network.is_none_or(|n| match &e.network {
                Some(on) => on == n,
                None => e.container_id.is_some(),
            })
    }

    fn env(cmd: &str, cid: &str) -> Env {
        Env {
            command: Some(cmd.into()),
            container_id: Some(cid.into()),
            netns: Some("/run/netns/x".into()),
            ifname: Some("eth0".into()),
            args: Some("IgnoreUnknown=1;K8S_POD_NAME=p;K8S_POD_NAMESPACE=team".into()),
            path: Some("/opt/cni/bin".into()),
        }
    }

    fn conf(version: &str) -> String {
        format!(
            r#"{{"cniVersion":"{version}","name":"cilia","type":"cilia-cni","dns":{{"nameservers":["fd00::53"]}}}}"#
        )
    }

    fn run(fake: &Fake, env: &Env, stdin: &str) -> (Value, bool) {
        let (out, ok) = execute(env, stdin.as_bytes(), |_| Ok(fake));
        let v = if out.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out).unwrap()
        };
        (v, ok)
    }

    #[test]
    fn version_lists_supported_versions() {
        let fake = Fake::default();
        let (v, ok) = run(&fake, &env("VERSION", "c1"), "");
        assert!(ok);
        assert_eq!(
            v,
            json!({"cniVersion":"1.1.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]})
        );
    }

    #[test]
    fn unknown_version_is_code_1() {
        let fake = Fake::default();
        let (v, ok) = run(&fake, &env("ADD", "c1"), &conf("0.3.1"));
        assert!(!ok);
        assert_eq!(v["code"], 1);
        assert!(v["msg"].as_str().unwrap().contains("0.3.1"));
        assert!(fake.eps.borrow().is_empty());
    }

    #[test]
    fn malformed_stdin_is_code_6_and_bad_config_code_7() {
        let fake = Fake::default();
        assert_eq!(run(&fake, &env("ADD", "c1"), "{not json").0["code"], 6);
        let (v, _) = run(
            &fake,
            &env("ADD", "c1"),
            r#"{"cniVersion":"1.0.0","name":"x","type":"bridge"}"#,
        );
        assert_eq!(v["code"], 7);
        assert_eq!(v["cniVersion"], "1.0.0");
        let (v, _) = run(
            &fake,
            &env("ADD", "c1"),
            r#"{"cniVersion":"1.0.0","name":"x","type":"cilia-cni","socket":5}"#,
        );
        assert_eq!(v["code"], 7);
    }

    #[test]
    fn netconf_needs_only_version_name_and_type() {
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n1","type":"cilia-cni"}"#).unwrap();
        assert_eq!(
            (conf.name.as_str(), conf.plugin_type.as_str()),
            ("n1", "cilia-cni")
        );
        assert!(conf.socket.is_none() && conf.dns.is_none() && conf.namespace.is_none());
        assert!(conf.args.is_none() && conf.prev_result.is_none());
        assert!(conf.retry_seconds.is_none() && conf.valid_attachments.is_none());
    }

    #[test]
    fn missing_env_is_code_4() {
        let fake = Fake::default();
        let mut e = env("ADD", "c1");
        e.container_id = None;
        let (v, ok) = run(&fake, &e, &conf("1.0.0"));
        assert!(!ok);
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
        let mut e = env("ADD", "c1");
        e.command = None;
        assert_eq!(run(&fake, &e, &conf("1.0.0")).0["code"], 4);
        let e = env("ADD", "bad/id");
        assert_eq!(run(&fake, &e, &conf("1.0.0")).0["code"], 4);
        let mut e = env("ADD", "c1");
        e.args = Some("IP=10.0.0.9".into());
        assert_eq!(run(&fake, &e, &conf("1.0.0")).0["code"], 4);
        e.args = Some("Foo=1".into());
        assert_eq!(run(&fake, &e, &conf("1.0.0")).0["code"], 4);
    }

    #[test]
    fn add_takes_the_gateways_from_the_create_or_from_an_older_agents_status() {
        for old_agent in [false, true] {
            let fake = Fake {
                old_agent,
                ..Fake::default()
            };
            let (v, ok) = run(&fake, &env("ADD", "c1"), &conf("1.0.0"));
            assert!(ok, "{v}");
            assert_eq!(
                v["routes"],
                json!([{"dst":"::/0","gw":"fd00::1"},{"dst":"0.0.0.0/0","gw":"10.0.0.1"}])
            );
            assert_eq!(fake.status_calls.get(), usize::from(old_agent));
        }
    }

    #[test]
    fn add_result_shape_per_version() {
        let fake = Fake::default();
        let (v, ok) = run(&fake, &env("ADD", "c1"), &conf("1.0.0"));
        assert!(ok, "{v}");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["interfaces"][0]["name"], "eth0");
        assert_eq!(v["interfaces"][0]["sandbox"], "/run/netns/x");
        assert_eq!(v["interfaces"][0]["mac"], "02:00:00:00:00:01");
        assert_eq!(
            v["ips"][0],
            json!({"address":"fd00::2/128","gateway":"fd00::1","interface":0})
        );
        assert_eq!(v["ips"][1]["address"], "10.0.0.2/32");
        assert_eq!(
            v["routes"],
            json!([{"dst":"::/0","gw":"fd00::1"},{"dst":"0.0.0.0/0","gw":"10.0.0.1"}])
        );
        assert_eq!(v["dns"]["nameservers"][0], "fd00::53");
        let ep = fake.eps.borrow()[0].clone();
        assert_eq!(ep.namespace, "team");
        assert!(
            ep.labels_pending,
            "no labels in config: learned from podman"
        );

        let (v, ok) = run(&fake, &env("ADD", "c2"), &conf("0.4.0"));
        assert!(ok);
        assert_eq!(v["ips"][0]["version"], "6");
        assert_eq!(v["ips"][1]["version"], "4");
        let (v, _) = run(&fake, &env("ADD", "c3"), &conf("1.1.0"));
        assert!(v["ips"][0].get("version").is_none());
    }

    #[test]
    fn labels_from_args_in_both_forms() {
        let fake = Fake::default();
        let list = r#"{"cniVersion":"1.0.0","name":"n","type":"cilia-cni","namespace":"ns1",
            "args":{"cni":{"labels":[{"key":"app","value":"web"}]}}}"#;
        let mut e = env("ADD", "c1");
        e.args = None;
        assert!(run(&fake, &e, list).1);
        let map = r#"{"cniVersion":"1.0.0","name":"n","type":"cilia-cni",
            "args":{"cni":{"labels":{"app":"db"}}}}"#;
        assert!(run(&fake, &env("ADD", "c2"), map).1);
        let eps = fake.eps.borrow();
        assert_eq!(eps[0].labels["app"], "web");
        assert_eq!(eps[0].namespace, "ns1");
        assert!(!eps[0].labels_pending);
        assert_eq!(eps[1].labels["app"], "db");
        drop(eps);
        let bad = r#"{"cniVersion":"1.0.0","name":"n","type":"cilia-cni",
            "args":{"cni":{"labels":{"app":"a b"}}}}"#;
        assert_eq!(run(&fake, &env("ADD", "c3"), bad).0["code"], 7);
    }

    #[test]
    fn named_ports_from_args_as_strings_or_objects_reach_the_agent() {
        let fake = Fake::default();
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"cilia-cni",
            "args":{"cni":{"namedPorts":["http=TCP/8080",
                {"name":"dns","protocol":"UDP","port":53}]}}}"#;
        assert!(run(&fake, &env("ADD", "c1"), conf).1);
        let eps = fake.eps.borrow();
        let ports: Vec<String> = eps[0].named_ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["http=TCP/8080", "dns=UDP/53"]);
    }

    #[test]
    fn named_ports_from_cni_args_join_the_networks() {
        let fake = Fake::default();
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"cilia-cni",
            "args":{"cni":{"namedPorts":["metrics=TCP/9100"]}}}"#;
        let mut e = env("ADD", "c1");
        e.args = Some("IgnoreUnknown=1;CILIA_NAMED_PORTS=http=TCP/8080,dns=udp/53".into());
        let (v, ok) = run(&fake, &e, conf);
        assert!(ok, "{v}");
        let eps = fake.eps.borrow();
        let ports: Vec<String> = eps[0].named_ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["metrics=TCP/9100", "http=TCP/8080", "dns=udp/53"]);
    }

    fn pod_of(args: &str) -> Result<Option<cilia_api::K8sPodRef>, CniError> {
        CniArgs::parse(args).unwrap().k8s_pod()
    }

    #[test]
    fn kubelet_cni_args_name_the_pod_by_namespace_and_name() {
        let pod = pod_of(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=empire;K8S_POD_NAME=deathstar-1;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("empire", "deathstar-1")
        );
        assert_eq!(pod.to_string(), "empire/deathstar-1");
    }

    #[test]
    fn podmans_lone_k8s_pod_name_names_no_pod() {
        // podman sends its container name as K8S_POD_NAME, never a namespace.
        assert_eq!(pod_of("IgnoreUnknown=1;K8S_POD_NAME=web").unwrap(), None);
        assert_eq!(pod_of("K8S_POD_NAMESPACE=team").unwrap(), None);
        assert_eq!(pod_of("").unwrap(), None);
    }

    #[test]
    fn a_pod_namespace_outside_the_name_characters_is_an_invalid_environment() {
        for args in [
            "K8S_POD_NAMESPACE=../etc;K8S_POD_NAME=p",
            "K8S_POD_NAMESPACE=team;K8S_POD_NAME=a b",
            "K8S_POD_NAMESPACE=;K8S_POD_NAME=p",
        ] {
            let e = pod_of(args).expect_err(args);
            assert_eq!(e.code, code::INVALID_ENV, "{args}");
            assert!(e.msg.contains("CNI_ARGS K8S_POD_"), "{args}: {}", e.msg);
        }
    }

    #[test]
    fn add_passes_the_pod_to_the_agent() {
        let fake = Fake::default();
        let (v, ok) = run(&fake, &env("ADD", "c1"), &conf("1.0.0"));
        assert!(ok, "{v}");
        let seen = fake.created.borrow();
        let pod = seen[0].k8s_pod.clone().unwrap();
        assert_eq!(pod.to_string(), "team/p");
        assert_eq!(seen[0].namespace.as_deref(), Some("team"));
    }

    #[test]
    fn a_malformed_named_port_in_cni_args_is_an_invalid_environment() {
        let fake = Fake::default();
        let mut e = env("ADD", "c1");
        e.args = Some("CILIA_NAMED_PORTS=http=8080".into());
        let (v, ok) = run(&fake, &e, &conf("1.0.0"));
        assert!(!ok);
        assert_eq!(v["code"], 4, "{v}");
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.starts_with("CNI_ARGS CILIA_NAMED_PORTS: named port: "),
            "{msg}"
        );
    }

    #[test]
    fn malformed_named_ports_in_args_are_an_invalid_config() {
        let fake = Fake::default();
        for bad in [
            r#""http""#,
            r#"["http"]"#,
            r#"["http=TCP/0"]"#,
            r#"[{"name":"http"}]"#,
            "[7]",
        ] {
            let conf = format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"cilia-cni","args":{{"cni":{{"namedPorts":{bad}}}}}}}"#
            );
            let (v, ok) = run(&fake, &env("ADD", "c1"), &conf);
            assert!(!ok, "{bad}");
            assert_eq!(v["code"], 7, "{bad}: {v}");
            assert!(
                v["msg"]
                    .as_str()
                    .unwrap()
                    .starts_with("args.cni.namedPorts: "),
                "{bad}: {v}"
            );
        }
    }

    #[test]
    fn ifname_outside_the_safe_charset_is_refused_up_front_naming_the_variable() {
        let fake = Fake::default();
        let mut e = env("ADD", "c1");
        e.ifname = Some("eth0#x".into());
        let (v, ok) = run(&fake, &e, &conf("1.0.0"));
        assert!(!ok);
        assert_eq!(v["code"], 4);
        assert_eq!(
            v["msg"],
            "CNI_IFNAME: \"eth0#x\": may contain only [A-Za-z0-9_.-]"
        );
        assert!(fake.eps.borrow().is_empty(), "nothing reached the agent");
        e.ifname = Some("net1".into());
        assert!(run(&fake, &e, &conf("1.0.0")).1);
    }

    #[test]
    fn container_id_and_name_outside_the_cni_charset_or_too_long_are_refused() {
        let fake = Fake::default();
        for cid in ["-c1".to_string(), "c1;rm".into(), "c".repeat(257)] {
            let (v, ok) = run(&fake, &env("ADD", &cid), &conf("1.0.0"));
            assert!(!ok, "{cid}");
            assert_eq!(v["code"], 4);
            let msg = v["msg"].as_str().unwrap();
            assert!(
                msg.starts_with("CNI_CONTAINERID: ") && msg.len() < 200,
                "{msg}"
            );
        }
        let mut e = env("ADD", "c1");
        e.args = Some("IgnoreUnknown=1;K8S_POD_NAME=web/../x".into());
        let (v, _) = run(&fake, &e, &conf("1.0.0"));
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("K8S_POD_NAME"));
        assert!(fake.eps.borrow().is_empty());
    }

    #[test]
    fn network_name_outside_the_cni_charset_is_refused() {
        let fake = Fake::default();
        let bad = r#"{"cniVersion":"1.0.0","name":"my net/1","type":"cilia-cni"}"#;
        let (v, ok) = run(&fake, &env("ADD", "c1"), bad);
        assert!(!ok);
        assert_eq!(v["code"], 7);
        assert!(v["msg"]
            .as_str()
            .unwrap()
            .starts_with("network config name: \"my net/1\""));
        let good = r#"{"cniVersion":"1.0.0","name":"my-net_1.a","type":"cilia-cni"}"#;
        assert!(run(&fake, &env("ADD", "c1"), good).1);
    }

    #[test]
    fn reserved_or_excess_labels_in_args_are_refused_naming_the_label() {
        let fake = Fake::default();
        let with = |labels: &str| {
            format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"cilia-cni","args":{{"cni":{{"labels":{labels}}}}}}}"#
            )
        };
        let (v, _) = run(
            &fake,
            &env("ADD", "c1"),
            &with(r#"{"io.kubernetes.pod.namespace":"kube-system"}"#),
        );
        assert_eq!(v["code"], 7);
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.starts_with("args.cni.labels: label \"io.kubernetes.pod.namespace=kube-system\""),
            "{msg}"
        );
        assert!(msg.contains("reserved"), "{msg}");
        let many: Vec<String> = (0..10_000).map(|i| format!(r#""k{i}":"v""#)).collect();
        let (v, _) = run(
            &fake,
            &env("ADD", "c1"),
            &with(&format!("{{{}}}", many.join(","))),
        );
        assert_eq!(v["code"], 7);
        assert!(v["msg"].as_str().unwrap().contains("(MAX_LABELS)"));
        let huge = format!(r#"{{"app":"{}"}}"#, "a".repeat(65536));
        let (v, _) = run(&fake, &env("ADD", "c1"), &with(&huge));
        assert!(v["msg"].as_str().unwrap().len() < 300);
        assert!(fake.eps.borrow().is_empty());
    }

    #[test]
    fn ipam_exhausted_is_plugin_code_with_agent_message() {
        let fake = Fake {
            full: true,
            ..Default::default()
        };
        let (v, ok) = run(&fake, &env("ADD", "c1"), &conf("1.0.0"));
        assert!(!ok);
        assert_eq!(v["code"], code::IPAM_EXHAUSTED);
        assert!(v["msg"].as_str().unwrap().contains("exhausted"));
        let (v, ok) = run(&fake, &env("STATUS", "c1"), &conf("1.1.0"));
        assert!(!ok);
        assert_eq!(v["code"], 50);
    }

    #[test]
    fn del_is_idempotent_and_needs_no_netns() {
        let fake = Fake::default();
        assert!(run(&fake, &env("ADD", "c1"), &conf("1.0.0")).1);
        let mut e = env("DEL", "c1");
        e.netns = None;
        assert_eq!(run(&fake, &e, &conf("1.0.0")), (Value::Null, true));
        assert_eq!(run(&fake, &e, &conf("1.0.0")), (Value::Null, true));
        assert!(run(&fake, &env("DEL", "unknown"), &conf("0.4.0")).1);
        assert!(fake.eps.borrow().is_empty());
    }

    #[test]
    fn del_with_agent_down_is_try_again_later() {
        let fake = Fake {
            down: true,
            ..Default::default()
        };
        let (v, ok) = run(&fake, &env("DEL", "c1"), &conf("1.0.0"));
        assert!(!ok);
        assert_eq!(v["code"], 11);
        let (v, _) = run(&fake, &env("ADD", "c1"), &conf("1.0.0"));
        assert_eq!(v["code"], 11);
        assert_eq!(
            run(&fake, &env("STATUS", "c1"), &conf("1.1.0")).0["code"],
            50
        );
    }

    #[test]
    fn check_compares_with_prev_result() {
        let fake = Fake::default();
        let (result, _) = run(&fake, &env("ADD", "c1"), &conf("1.0.0"));
        let with_prev = |prev: &Value| {
            json!({"cniVersion":"1.0.0","name":"cilia","type":"cilia-cni","prevResult":prev})
                .to_string()
        };
        assert_eq!(
            run(&fake, &env("CHECK", "c1"), &with_prev(&result)),
            (Value::Null, true)
        );
        let mut other = result.clone();
        other["ips"][1]["address"] = json!("10.0.0.99/32");
        assert_eq!(
            run(&fake, &env("CHECK", "c1"), &with_prev(&other)).0["code"],
            code::ADDRESS_MISMATCH
        );
        assert_eq!(
            run(&fake, &env("CHECK", "nope"), &with_prev(&result)).0["code"],
            code::UNKNOWN_CONTAINER
        );
        fake.eps.borrow_mut()[0].state = EndpointState::NotReady;
        assert_eq!(
            run(&fake, &env("CHECK", "c1"), &with_prev(&result)).0["code"],
            code::NOT_READY
        );
        assert_eq!(run(&fake, &env("CHECK", "c1"), &conf("1.0.0")).0["code"], 7);
    }

    #[test]
    fn gc_removes_only_stale_runtime_endpoints() {
        let fake = Fake::default();
        for c in ["keep", "stale"] {
            assert!(run(&fake, &env("ADD", c), &conf("1.1.0")).1);
        }
        let mut manual = fake.eps.borrow()[0].clone();
        manual.container_id = None;
        fake.eps.borrow_mut().push(manual);
        let gc = gc_conf("cilia", json!([{"containerID":"keep","ifname":"eth0"}]));
        assert_eq!(run(&fake, &env("GC", "x"), &gc), (Value::Null, true));
        let left: Vec<_> = fake
            .eps
            .borrow()
            .iter()
            .map(|e| e.container_id.clone())
            .collect();
        assert_eq!(left, vec![Some("keep".to_string()), None]);
        assert_eq!(run(&fake, &env("GC", "x"), &conf("1.1.0")).0["code"], 7);
    }

    fn conf_named(network: &str) -> String {
        json!({"cniVersion":"1.1.0","name":network,"type":"cilia-cni"}).to_string()
    }

    fn gc_conf(network: &str, valid: Value) -> String {
        json!({"cniVersion":"1.1.0","name":network,"type":"cilia-cni",
            "cni.dev/valid-attachments":valid})
        .to_string()
    }

    fn containers(fake: &Fake) -> Vec<(Option<String>, Option<String>)> {
        fake.eps
            .borrow()
            .iter()
            .map(|e| (e.container_id.clone(), e.network.clone()))
            .collect()
    }

    #[test]
    fn add_records_the_network_name() {
        let fake = Fake::default();
        assert!(run(&fake, &env("ADD", "c1"), &conf_named("net-a")).1);
        assert_eq!(fake.eps.borrow()[0].network.as_deref(), Some("net-a"));
    }

    #[test]
    fn gc_with_an_empty_list_removes_only_its_own_networks_endpoints() {
        let fake = Fake::default();
        assert!(run(&fake, &env("ADD", "a1"), &conf_named("net-a")).1);
        assert!(run(&fake, &env("ADD", "b1"), &conf_named("net-b")).1);
        let mut legacy = fake.eps.borrow()[0].clone();
        legacy.container_id = Some("old".into());
        legacy.network = None;
        fake.eps.borrow_mut().push(legacy);
        assert_eq!(
            run(&fake, &env("GC", "x"), &gc_conf("net-b", json!([]))),
            (Value::Null, true)
        );
        assert_eq!(
            containers(&fake),
            vec![
                (Some("a1".into()), Some("net-a".into())),
                (Some("old".into()), None),
            ]
        );
    }

    #[test]
    fn del_and_check_act_on_the_attachment_of_their_network() {
        let fake = Fake::default();
        assert!(run(&fake, &env("ADD", "c1"), &conf_named("net-a")).1);
        // DEL through another network: the attachment is not that network's.
        assert!(run(&fake, &env("DEL", "c1"), &conf_named("net-b")).1);
        assert_eq!(fake.eps.borrow().len(), 1);
        let prev = |network: &str| {
            let ep = fake.eps.borrow()[0].clone();
            json!({"cniVersion":"1.1.0","name":network,"type":"cilia-cni",
                "prevResult":{"ips":[{"address":format!("{}/128", ep.ipv6)},
                                     {"address":format!("{}/32", ep.ipv4.unwrap())}]}})
            .to_string()
        };
        assert_eq!(
            run(&fake, &env("CHECK", "c1"), &prev("net-a")),
            (Value::Null, true)
        );
        let (v, ok) = run(&fake, &env("CHECK", "c1"), &prev("net-b"));
        assert!(!ok);
        assert_eq!(v["code"], code::UNKNOWN_CONTAINER);
        assert!(v["msg"].as_str().unwrap().contains("net-b"), "{v}");
        assert!(run(&fake, &env("DEL", "c1"), &conf_named("net-a")).1);
        assert!(fake.eps.borrow().is_empty());
    }

    #[test]
    fn del_still_removes_an_endpoint_recorded_without_a_network() {
        let fake = Fake::default();
        assert!(run(&fake, &env("ADD", "c1"), &conf_named("net-a")).1);
        fake.eps.borrow_mut()[0].network = None;
        assert!(run(&fake, &env("DEL", "c1"), &conf_named("cilia")).1);
        assert!(fake.eps.borrow().is_empty());
    }

    #[test]
    fn status_ok_with_free_addresses() {
        let fake = Fake::default();
        assert_eq!(
            run(&fake, &env("STATUS", "x"), &conf("1.1.0")),
            (Value::Null, true)
        );
    }
}
