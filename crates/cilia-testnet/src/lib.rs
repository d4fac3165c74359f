//! Test harness shared by datapath tests, integration tests and benchmarks:
//! network namespaces and bpffs roots that clean up after themselves,
//! privilege checks that never skip silently under CI, and packet builders
//! for `BPF_PROG_TEST_RUN` fixtures.
//!
//! Everything a test creates is named with the test process id, so parallel
//! test binaries never collide, and is removed on drop, even on panic.

pub mod agent;
pub mod cluster;
pub mod etcd;
pub mod fuzz;
pub mod netns;

pub use agent::{AgentOptions, TestAgent};
pub use cluster::{Cluster, Fabric, NodeOptions, Pod, Tunnel};
pub use etcd::Etcd;
pub use netns::{BpfRoot, Netns};

use std::path::PathBuf;

/// Returns from the test unless it may use BPF and network admin (see
/// [`require_privileges`]: under `CI=true` a missing privilege panics).
#[macro_export]
macro_rules! privileged {
    ($name:literal) => {
        if !$crate::require_privileges($name) {
            return;
        }
    };
}

/// Returns from the test unless it may use BPF and network admin and
/// Debian's `etcd` is installed (under `CI=true` either missing panics).
#[macro_export]
macro_rules! cluster_prerequisites {
    ($name:literal) => {
        if !$crate::require_privileges($name) || !$crate::require_etcd($name) {
            return;
        }
    };
}

/// Whether an `etcd` binary is in PATH. Without one: under `CI=true` this
/// panics; elsewhere it prints why the test is skipped and returns `false`.
pub fn require_etcd(test: &str) -> bool {
    if etcd::etcd_binary().is_some() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{test}: no `etcd` binary in PATH and CI=true forbids skipping: run scripts/setup.sh"
        );
    }
    eprintln!("SKIPPED {test}: no `etcd` binary in PATH (run scripts/setup.sh)");
    false
}

/// An endpoint's address of `family` (`"ipv6"` or `"ipv4"`) from its JSON.
pub fn ip_of(endpoint: &serde_json::Value, family: &str) -> std::net::IpAddr {
    endpoint[family]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("endpoint has no {family} address: {endpoint}"))
}

/// Whether privileged tests can run. Without root: under `CI=true` this
/// panics (a privileged test must never be skipped there); elsewhere it
/// prints why the test is skipped and returns `false`.
pub fn require_privileges(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (CAP_BPF, CAP_NET_ADMIN) and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root (CAP_BPF, CAP_NET_ADMIN)");
    false
}

/// Directory of the workspace's built binaries (`target/<profile>`), found
/// from the running test executable (`target/<profile>/deps/<test>`).
/// `CILIA_BIN_DIR` overrides it.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CILIA_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Path of a workspace binary, with a clear panic when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}
