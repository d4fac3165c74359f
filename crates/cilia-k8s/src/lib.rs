//! `cilia-k8s`: the Kubernetes side of cilia, up to the edge of the agent.
//!
//! The agent's model (endpoints with labels, namespaces with labels, policy
//! documents) does not change when the source is Kubernetes: this crate turns
//! what the API server says into that model and keeps the bookkeeping of
//! watching it. It never touches the datapath, the state store or the agent's
//! API; the agent (`cilia-agent/src/k8s.rs`, see `docs/KUBERNETES.md`)
//! consumes its outputs the way it consumes `cilia policy import` and
//! podman's labels.
//!
//! * [`config`]: a kubeconfig file or the in-cluster service account, the
//!   node name, and the client built from them.
//! * [`pod`], [`namespace`], [`labels`]: pods into endpoint labels (Cilium's
//!   well-known label names, the `k8s` source, reserved keys refused, the
//!   identity-irrelevant labels left out) and named ports; namespaces into
//!   `io.cilium.k8s.namespace.labels.*`.
//! * [`policy`]: `NetworkPolicy`, `CiliumNetworkPolicy` and
//!   `CiliumClusterwideNetworkPolicy` objects, as the API sends them, into the
//!   documents `cilia-policy` parses — the same parser as `cilia policy
//!   import`, never a second one — with the object's identity as the source.
//! * [`status`]: what a refused policy writes back: a `Valid` condition on the
//!   CRDs' status, an Event for a `NetworkPolicy`.
//! * [`watch`]: the list/watch state machine, free of the network: initial
//!   lists, events, bookmarks, expired resource versions and relists that
//!   diff against the cache; sync state and last error per kind.
//! * [`client`]: the only module that talks to an API server: it feeds
//!   [`watch`] from kube-rs list/watch calls, with backoff.
//!
//! * [`access`]: every resource and verb the agent uses on the API server,
//!   which the shipped ClusterRole must grant exactly.
//!
//! Invariants: a translation either yields the whole result or an error that
//! names the object, the field and the reason (no silent drop of a
//! security-relevant label or rule); the watch cache holds exactly the
//! objects of the last list plus the events after it, keyed by uid, and every
//! object that leaves it is reported as deleted.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod client;
pub mod config;
mod error;
pub mod labels;
pub mod namespace;
pub mod pod;
pub mod policy;
pub mod status;
pub mod watch;

pub use error::K8sError;
