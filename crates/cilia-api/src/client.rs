//! The agent's REST API as calls: [`ApiClient`] has one method per route,
//! taking and returning the model types. Route paths are written only in
//! this file (and query strings only in [`crate::query`]), so the CLI, the
//! CNI plugin and the tests cannot ask for a path the agent does not serve.
//!
//! Transport: HTTP/1.1 over the agent's unix socket, one connection per call
//! (the CLI and the CNI plugin make one or two calls per process); or over
//! TCP to another node's read-only peer API ([`ApiClient::peer`]), which
//! serves the read routes only (flows, status, healthz).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{TcpStream, UnixStream};

use crate::cluster::*;
use crate::flows::FlowFilter;
use crate::model::*;
use crate::query::{self, EndpointQuery, FlowsQuery, PolicyDelete};
use crate::services::*;

type Result<T, E = ClientError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the cilia agent at {socket}: {error}; is cilia-agent running? (set --socket or CILIA_SOCKET)")]
    Connect {
        socket: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot reach the peer API at {addr}: {error}")]
    ConnectPeer { addr: String, error: std::io::Error },
    #[error("talking to the agent: {0}")]
    Http(#[from] hyper::Error),
    /// The agent refused: its [`ApiError`] message, as it wrote it.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the agent ({status}): {body}")]
    Decode { status: u16, body: String },
    #[error("building the request to {path}: {reason}")]
    Request { path: String, reason: String },
}

/// One line of an NDJSON stream (`/v1/flows`, `/v1/monitor`) as the agent
/// sent it; [`StreamLine::item`] decodes it.
#[derive(Debug, Clone, Copy)]
pub struct StreamLine<'a>(&'a str);

impl<'a> StreamLine<'a> {
    /// The line's JSON text, without the newline.
    pub fn text(&self) -> &'a str {
        self.0
    }

    pub fn item(&self) -> Result<StreamItem, serde_json::Error> {
        serde_json::from_str(self.0)
    }
}

/// Where an [`ApiClient`] connects.
#[derive(Debug, Clone)]
enum Target {
    /// The local agent's API socket.
    Unix(PathBuf),
    /// Another node's peer API, `host:port`.
    Tcp(String),
}

/// A client of one agent: its unix socket, or a node's peer API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    target: Target,
}

impl ApiClient {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            target: Target::Unix(socket.as_ref().to_path_buf()),
        }
    }

    /// A client of a node's read-only peer API at `addr` (`host:port`,
    /// `[v6]:port`): only [`Self::status`], [`Self::healthz`] and
    /// [`Self::flows`] are served there.
    pub fn peer(addr: impl Into<String>) -> Self {
        Self {
            target: Target::Tcp(addr.into()),
        }
    }

    // Agent.

    /// `GET /v1/status`: health, kernel features, IPAM, maps, subsystems.
    pub async fn status(&self) -> Result<Status> {
        self.get("/v1/status").await
    }

    /// `GET /v1/healthz`: whether the agent serves its API.
    pub async fn healthz(&self) -> Result<()> {
        self.call_empty(Method::GET, "/v1/healthz").await
    }

    /// `GET /openapi.json`: the OpenAPI document of this API.
    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.get("/openapi.json").await
    }

    // Endpoints.

    /// `GET /v1/endpoints`: the endpoints `query` selects (all for the default).
    pub async fn endpoints(&self, query: &EndpointQuery<'_>) -> Result<Vec<Endpoint>> {
        self.get(&format!("/v1/endpoints{}", query.query())).await
    }

    /// `GET /v1/endpoints/{id}`.
    pub async fn endpoint(&self, id: u16) -> Result<Endpoint> {
        self.get(&format!("/v1/endpoints/{id}")).await
    }

    /// `POST /v1/endpoints`: connects a network namespace.
    pub async fn create_endpoint(&self, req: &EndpointCreate) -> Result<Endpoint> {
        self.post("/v1/endpoints", req).await
    }

    /// `DELETE /v1/endpoints/{id}`.
    pub async fn delete_endpoint(&self, id: u16) -> Result<()> {
        self.call_empty(Method::DELETE, &format!("/v1/endpoints/{id}"))
            .await
    }

    /// `DELETE /v1/endpoints?container_id=…`: the endpoints of one container
    /// that `query` selects; answers how many were deleted (0 is no error).
    pub async fn delete_endpoints(&self, query: &EndpointQuery<'_>) -> Result<usize> {
        self.delete(&format!("/v1/endpoints{}", query.query()))
            .await
    }

    /// `DELETE /v1/endpoints?…&background=true`: as
    /// [`Client::delete_endpoints`], but answered once the endpoints are
    /// disconnected (state `deleting`); the agent removes their programs
    /// and devices right after. An agent older than this parameter ignores
    /// it and answers once they are gone.
    pub async fn disconnect_endpoints(&self, query: &EndpointQuery<'_>) -> Result<usize> {
        let q = query.query();
        let sep = if q.is_empty() { '?' } else { '&' };
        self.delete(&format!("/v1/endpoints{q}{sep}background=true"))
            .await
    }

    /// `PUT /v1/endpoints/{id}/labels`: replaces an endpoint's labels.
    pub async fn set_endpoint_labels(&self, id: u16, req: &EndpointLabels) -> Result<Endpoint> {
        self.put(&format!("/v1/endpoints/{id}/labels"), req).await
    }

    /// `PUT /v1/endpoints/{id}/config`: changes an endpoint's settings.
    pub async fn set_endpoint_config(&self, id: u16, req: &EndpointSettings) -> Result<Endpoint> {
        self.put(&format!("/v1/endpoints/{id}/config"), req).await
    }

    // Policy.

    /// `GET /v1/policy`: the imported policies and the revision.
    pub async fn policies(&self) -> Result<PolicyList> {
        self.get("/v1/policy").await
    }

    /// `POST /v1/policy`: imports policy YAML, all documents or none.
    pub async fn import_policy(&self, req: &PolicyImport) -> Result<PolicyChange> {
        self.post("/v1/policy", req).await
    }

    /// `DELETE /v1/policy`: removes the policies `which` names.
    pub async fn delete_policy(&self, which: &PolicyDelete) -> Result<PolicyChange> {
        self.delete(&format!("/v1/policy{}", which.query())).await
    }

    /// `POST /v1/policy/trace`: the verdict for a connection, explained.
    pub async fn trace(&self, req: &TraceRequest) -> Result<TraceResponse> {
        self.post("/v1/policy/trace", req).await
    }

    // Identities and namespaces.

    /// `GET /v1/identities`.
    pub async fn identities(&self) -> Result<Vec<Identity>> {
        self.get("/v1/identities").await
    }

    /// `GET /v1/identities/{id}`.
    pub async fn identity(&self, id: u32) -> Result<Identity> {
        self.get(&format!("/v1/identities/{id}")).await
    }

    /// `GET /v1/namespaces`.
    pub async fn namespaces(&self) -> Result<Vec<Namespace>> {
        self.get("/v1/namespaces").await
    }

    /// `PUT /v1/namespaces/{name}`: replaces the labels of `ns.name`.
    pub async fn set_namespace(&self, ns: &Namespace) -> Result<Namespace> {
        let path = format!("/v1/namespaces/{}", query::encode(&ns.name));
        self.put(&path, ns).await
    }

    // The kernel's maps, read back.

    /// `GET /v1/bpf/endpoints`.
    pub async fn bpf_endpoints(&self) -> Result<Vec<BpfEndpoint>> {
        self.get("/v1/bpf/endpoints").await
    }

    /// `GET /v1/bpf/metrics`.
    pub async fn bpf_metrics(&self) -> Result<Vec<BpfMetric>> {
        self.get("/v1/bpf/metrics").await
    }

    /// `GET /v1/bpf/ipcache`.
    pub async fn bpf_ipcache(&self) -> Result<Vec<BpfIpcacheEntry>> {
        self.get("/v1/bpf/ipcache").await
    }

    /// `GET /v1/bpf/ct`.
    pub async fn bpf_ct(&self) -> Result<Vec<BpfCtEntry>> {
        self.get("/v1/bpf/ct").await
    }

    /// `GET /v1/bpf/policy/{id}`: an endpoint's policy map.
    pub async fn bpf_policy(&self, endpoint: u16) -> Result<BpfPolicy> {
        self.get(&format!("/v1/bpf/policy/{endpoint}")).await
    }

    // Services.

    /// `GET /v1/services`.
    pub async fn services(&self) -> Result<Vec<Service>> {
        self.get("/v1/services").await
    }

    /// `GET /v1/services/{id}`.
    pub async fn service(&self, id: u16) -> Result<Service> {
        self.get(&format!("/v1/services/{id}")).await
    }

    /// `POST /v1/services`: create or replace a service (by id, else by
    /// frontend).
    pub async fn update_service(&self, spec: &ServiceSpec) -> Result<Service> {
        self.post("/v1/services", spec).await
    }

    /// `POST /v1/services/import`: create or replace many services in one
    /// call (all checked first: any refusal applies nothing).
    pub async fn import_services(&self, import: &ServiceImport) -> Result<ServiceImportResult> {
        self.post("/v1/services/import", import).await
    }

    /// `DELETE /v1/services/{id}`.
    pub async fn delete_service(&self, id: u16) -> Result<()> {
        self.call_empty(Method::DELETE, &format!("/v1/services/{id}"))
            .await
    }

    /// `GET /v1/bpf/lb`: the load balancer's maps as the kernel holds them.
    pub async fn bpf_lb(&self) -> Result<BpfLb> {
        self.get("/v1/bpf/lb").await
    }

    // The datapath.

    /// `POST /v1/datapath/reload`: re-specialize every endpoint's programs
    /// and swap them in through their links.
    pub async fn datapath_reload(&self, req: &DatapathReload) -> Result<DatapathReloadResult> {
        self.post("/v1/datapath/reload", req).await
    }

    // The cluster.

    /// `GET /v1/nodes`: the nodes this agent knows, with their health.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        self.get("/v1/nodes").await
    }

    /// `GET /v1/cluster/flows`: every node's recent flows matching
    /// `query.filter` (the last `query.last` of each node, then of all),
    /// merged by time; `query.follow` is not served there.
    pub async fn cluster_flows(&self, query: &FlowsQuery) -> Result<ClusterFlows> {
        self.get(&format!("/v1/cluster/flows{}", query.query()))
            .await
    }

    /// `GET /v1/cluster/status`: every node's status, or why it is missing.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        self.get("/v1/cluster/status").await
    }

    // Event streams.

    /// `GET /v1/flows`: recent flows, then (with `follow`) new ones; calls
    /// `on_line` for every line as it arrives, until the agent ends the
    /// stream or `on_line` returns false.
    pub async fn flows(
        &self,
        query: &FlowsQuery,
        on_line: impl FnMut(StreamLine<'_>) -> bool,
    ) -> Result<()> {
        self.stream_lines(&format!("/v1/flows{}", query.query()), on_line)
            .await
    }

    /// `GET /v1/monitor`: live events while connected, as [`Self::flows`].
    pub async fn monitor(
        &self,
        filter: &FlowFilter,
        on_line: impl FnMut(StreamLine<'_>) -> bool,
    ) -> Result<()> {
        let path = format!("/v1/monitor{}", query::monitor_query(filter));
        self.stream_lines(&path, on_line).await
    }

    // The XDP prefilter.

    /// `GET /v1/prefilter`: devices, CIDRs and their drops.
    pub async fn prefilter(&self) -> Result<Prefilter> {
        self.get("/v1/prefilter").await
    }

    /// `POST /v1/prefilter`: adds CIDRs (those already in stay as they
    /// are); all or nothing.
    pub async fn add_prefilter(&self, req: &PrefilterCidrs) -> Result<Prefilter> {
        self.post("/v1/prefilter", req).await
    }

    /// `DELETE /v1/prefilter` with the CIDRs in the body; all or nothing.
    pub async fn delete_prefilter(&self, req: &PrefilterCidrs) -> Result<Prefilter> {
        self.send(Method::DELETE, "/v1/prefilter", req).await
    }

    // Transport.

    /// Opens a connection and sends one request; the response body is
    /// left to the caller (read whole, or streamed).
    async fn send_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut sender = match &self.target {
            Target::Unix(socket) => {
                let stream =
                    UnixStream::connect(socket)
                        .await
                        .map_err(|error| ClientError::Connect {
                            socket: socket.clone(),
                            error,
                        })?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                sender
            }
            Target::Tcp(addr) => {
                let stream = TcpStream::connect(addr.as_str()).await.map_err(|error| {
                    ClientError::ConnectPeer {
                        addr: addr.clone(),
                        error,
                    }
                })?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                sender
            }
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "cilia")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Request {
                path: path.to_string(),
                reason: e.to_string(),
            })?;
        Ok(sender.send_request(req).await?)
    }

    /// One request with a whole (JSON) answer, checked for an API error.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes)> {
        let resp = self.send_request(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        Ok((status, bytes))
    }

    /// One request whose JSON answer decodes to `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let (status, bytes) = self.exchange(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|_| ClientError::Decode {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// One request whose answer carries nothing but its status.
    async fn call_empty(&self, method: Method, path: &str) -> Result<()> {
        self.exchange(method, path, None).await.map(|_| ())
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None).await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::DELETE, path, None).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(Method::POST, path, body).await
    }

    async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(Method::PUT, path, body).await
    }

    /// Sends `body` as JSON with `method` and decodes the JSON answer.
    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Request {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        self.call(method, path, Some(body)).await
    }

    /// GETs a newline-delimited stream, calling `on_line` for every line as
    /// it arrives, until the agent ends it or `on_line` returns false.
    async fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(StreamLine<'_>) -> bool,
    ) -> Result<()> {
        let resp = self.send_request(Method::GET, path, None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            return Err(api_error(status, &bytes));
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                if !on_line(StreamLine(&text)) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The error of a non-2xx answer: the agent's [`ApiError`], or the body as
/// text when it is not one.
fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ApiError>(bytes) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.code,
            message: e.message,
        },
        Err(_) => ClientError::Decode {
            status: status.as_u16(),
            body: String::from_utf8_lossy(bytes).into_owned(),
        },
    }
}
