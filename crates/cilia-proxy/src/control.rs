//! The control protocol between the agent and the proxy.
//!
//! The proxy listens on a unix stream socket (`--control-socket`, mode 0600);
//! the agent connects, and both sides write newline-delimited JSON, one message
//! per line. On connect the proxy says [`FromProxy::Hello`]; the agent then
//! sends the whole L7 policy ([`ToProxy::Policy`]) and again after every change;
//! the proxy answers each with [`FromProxy::Applied`] (or [`FromProxy::Rejected`],
//! keeping its previous policy) and streams a [`FromProxy::Flow`] for every
//! request. The proxy keeps its last policy when the agent goes away, so L7
//! connections outlive an agent restart; a new agent connects and pushes again.

use std::net::{IpAddr, SocketAddr};

use cilia_policy::l7::L7Policy;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Version of this protocol; the proxy refuses a different one in `Policy`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default port of the proxy's transparent listeners (one IPv4, one IPv6).
pub const DEFAULT_PROXY_PORT: u16 = 15080;

/// Messages from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToProxy {
    /// Replaces the proxy's whole L7 policy.
    Policy(ProxyPolicy),
}

/// Everything the proxy needs to decide a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyPolicy {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The agent's policy revision this snapshot was built at.
    pub revision: u64,
    /// Local endpoints: their addresses, identity and L7 entries.
    pub endpoints: Vec<ProxyEndpoint>,
    /// Identities of addresses that are not local endpoints (the node's own
    /// addresses as `host`, CIDR identities); longest prefix wins; an address
    /// matching none is `world` (2).
    pub prefixes: Vec<PrefixIdentity>,
}

/// One local endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyEndpoint {
    /// Endpoint id.
    pub id: u16,
    /// Its security identity.
    pub identity: u32,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
    /// L7 entries of its ingress policy (requests to it).
    pub ingress: Vec<L7Entry>,
    /// L7 entries of its egress policy (requests it sends).
    pub egress: Vec<L7Entry>,
}

/// The L7 part of one policy map entry whose value names the proxy: the same
/// key as the map's (peer identity, protocol, destination port prefix), looked
/// up the same way: the entry of the peer's identity with the longest port
/// prefix, else that of identity 0 (any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7Entry {
    /// Peer identity; 0 = any.
    pub identity: u32,
    /// IP protocol (6 = TCP).
    pub proto: u8,
    /// Destination port (prefix).
    pub port: u16,
    /// Significant leading bits of `port` (16 = exactly `port`).
    pub port_prefix_len: u8,
    /// What passes.
    pub policy: L7Policy,
    /// The policy rules behind the entry, as `cilia policy trace` names them.
    pub rules: Vec<String>,
}

/// A prefix and its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixIdentity {
    /// The prefix.
    pub prefix: IpNet,
    /// Its identity.
    pub identity: u32,
}

/// Messages from the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum FromProxy {
    /// First message on every control connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the proxy.
        version: u32,
        /// The proxy's process id.
        pid: u32,
        /// Revision of the policy it enforces now (`None`: none yet; it then
        /// refuses every redirected connection).
        revision: Option<u64>,
    },
    /// A policy is in force.
    Applied {
        /// Its revision.
        revision: u64,
    },
    /// A policy was refused; the previous one stays in force.
    Rejected {
        /// Its revision.
        revision: u64,
        /// Why, naming the endpoint, entry and field.
        reason: String,
    },
    /// One HTTP request and its outcome.
    Flow(L7Flow),
}

/// Outcome of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum L7Verdict {
    /// Allowed and forwarded; `status` is the upstream's.
    Forwarded,
    /// Refused by policy: answered `403 Access denied`.
    Denied,
    /// Allowed, but the upstream failed: `status` 503 when it could not be
    /// reached, 502 when it failed before its response head.
    Error,
}

/// Direction of the policy that redirected the request, relative to `endpoint_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum L7Direction {
    /// The endpoint's ingress policy (it is the server).
    Ingress,
    /// The endpoint's egress policy (it is the client).
    Egress,
}

/// One HTTP request seen by the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7Flow {
    /// Wall-clock time the request arrived, nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
    /// The endpoint whose policy decided.
    pub endpoint_id: u16,
    /// Which of its policies.
    pub direction: L7Direction,
    /// Client address.
    pub src: SocketAddr,
    /// Original destination.
    pub dst: SocketAddr,
    /// Client identity.
    pub src_identity: u32,
    /// Destination identity.
    pub dst_identity: u32,
    /// Request method.
    pub method: String,
    /// Request target (path and query), at most 256 bytes kept.
    pub path: String,
    /// `Host` header, if any.
    pub host: Option<String>,
    /// Status answered to the client.
    pub status: u16,
    /// From the request's head arriving to the response's head leaving, in µs.
    pub latency_us: u64,
    /// Outcome.
    pub verdict: L7Verdict,
    /// The policy rules of the deciding entry (empty when none applied).
    pub rules: Vec<String>,
}
