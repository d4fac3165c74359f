//! Node health: is every other node reachable over the datapath, and how
//! fast? Each node has a health endpoint (identity `health`) in a network
//! namespace of its own ([`netns`]); in it, a [`Responder`] answers TCP
//! connections on the health port, and a [`Prober`] sends ICMP/ICMPv6
//! echoes and TCP connects to every other node's health addresses. Probes
//! leave from the endpoint, so they cross the same programs, tunnels and
//! policy as pod traffic: a reachable health endpoint means the path works.
//!
//! Both run on plain threads that entered the namespace (setns moves only
//! the calling thread); the rest of the agent never leaves the node's
//! namespace. Every wait is bounded (probe timeout, accept timeout), and a
//! stop flag ends both threads within one of those.

pub mod icmp;
pub mod netns;
mod prober;
mod responder;

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

pub use netns::{create_health_netns, delete_health_netns, netns_path};
pub use prober::{ProbeConfig, Prober};
pub use responder::Responder;

/// Default TCP port of the health responder (`--health-port`).
pub const DEFAULT_HEALTH_PORT: u16 = 4240;

/// Name of the health endpoint's network namespace.
pub const HEALTH_NETNS: &str = "cilia-health";

/// A node to probe: its name and its health endpoint's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTarget {
    pub node: String,
    pub addresses: Vec<IpAddr>,
}

/// The latest probe results, by node name.
pub type HealthReport = BTreeMap<String, cilia_api::NodeHealth>;

/// A thread in a network namespace, stopped (and joined) on drop.
struct NsThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NsThread {
    /// Starts a thread named `name` in the namespace at `netns`: it runs
    /// `setup` there (its error is this call's), then `body` until the
    /// stop flag it is given is set.
    fn spawn<S: 'static>(
        name: &str,
        netns: &Path,
        setup: impl FnOnce() -> io::Result<S> + Send + 'static,
        body: impl FnOnce(S, &AtomicBool) + Send + 'static,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let netns = netns.to_path_buf();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let state = netns::enter(&netns).and_then(|()| setup());
                match state {
                    Ok(state) => {
                        let _ = ready_tx.send(Ok(()));
                        body(state, &flag);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        let started = ready
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the thread ended before it started")));
        let mut this = Self {
            stop,
            thread: Some(thread),
        };
        started.inspect_err(|_| this.join())?;
        Ok(this)
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NsThread {
    fn drop(&mut self) {
        self.join();
    }
}

/// Sleeps `total` in short steps, returning early (true) once `stop` is set.
fn sleep_unless_stopped(total: Duration, stop: &AtomicBool) -> bool {
    const STEP: Duration = Duration::from_millis(50);
    let deadline = std::time::Instant::now() + total;
    loop {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(STEP));
    }
}
