//! The agent's REST API as plain types, plus a client for its unix socket.
//! Shared by the agent (server side), the `cilia` CLI and the CNI plugin,
//! so the three can never disagree on a field name.

pub mod client;
pub mod flows;
pub mod labels;
pub mod limits;
pub mod model;

pub use client::{Client, ClientError};
pub use model::*;

/// Default path of the agent's API socket.
pub const DEFAULT_SOCKET: &str = "/var/run/cilia/cilia.sock";
