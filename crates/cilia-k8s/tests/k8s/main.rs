//! Tests of cilia-k8s against JSON fixtures in the API server's wire format
//! (`tests/fixtures/`, see its README for how they were written and how to
//! re-record them). One test binary: the crate links kube-rs, and each
//! binary costs a link.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod client;
mod config;
mod crds;
mod fixtures;
mod install;
mod namespaces;
mod pods;
mod policies;
mod status;
mod watch;
