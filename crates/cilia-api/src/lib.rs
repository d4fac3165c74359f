//! The agent's REST API as plain types, plus a typed client for its unix
//! socket. Shared by the agent (server side), the `cilia` CLI and the CNI
//! plugin, so the three can never disagree on a field name or a route.

pub mod client;
pub mod cluster;
pub mod flows;
pub mod labels;
pub mod limits;
pub mod model;
pub mod query;
pub mod services;

pub use client::{ApiClient, ClientError, StreamLine};
pub use cluster::*;
pub use model::*;
pub use query::{EndpointQuery, FlowsQuery, PolicyDelete};
pub use services::*;

/// Default path of the agent's API socket.
pub const DEFAULT_SOCKET: &str = "/var/run/cilia/cilia.sock";
