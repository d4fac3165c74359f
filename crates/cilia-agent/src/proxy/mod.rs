//! The L7 proxy subsystem: the agent's side of `cilia-proxy`.
//!
//! Why a separate process: an agent restart (upgrade, crash) must not cut L7
//! connections, so the proxy is started *detached* (its own process group,
//! never killed by the agent) and a new agent reconnects to the one already
//! running through its control socket. The agent owns only what the proxy
//! must know — a [`ProxyPolicy`] snapshot, rebuilt from the published policy
//! summary and the store — and pushes it whenever it changes.
//!
//! The proxy is started only when some endpoint's policy has an L7 entry: a
//! node without HTTP rules runs no proxy. When it dies the agent starts it
//! again (with a bounded backoff) and says so in `cilia status`; meanwhile
//! the datapath drops redirected flows with "L7 proxy unavailable" (fail
//! closed, never around the proxy).

pub mod routing;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use cilia_proxy::control::{
    FromProxy, L7Entry, PrefixIdentity, ProxyEndpoint, ProxyPolicy, PROTOCOL_VERSION,
};
use cilia_proxy::control_client::{self, ControlClientError, ControlReader, ControlWriter, Hello};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::{EndpointRecord, Store};

/// How long a freshly started proxy may take to open its control socket,
/// and to say hello on a new connection.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// Restart backoff: doubled per failure, up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where and how the agent runs the proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The `cilia-proxy` executable.
    pub binary: PathBuf,
    /// Its control socket.
    pub control_socket: PathBuf,
    /// Port of its transparent listeners (the policy maps' proxy port).
    pub port: u16,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl ProxyConfig {
    /// The defaults of an agent serving `api_socket` from `state_dir`: the
    /// binary beside the agent's own, the control socket beside the API
    /// socket (`cilia.sock` -> `cilia-proxy.sock`), the log in the state dir.
    pub fn for_agent(
        api_socket: &Path,
        state_dir: &Path,
        port: u16,
        binary: Option<PathBuf>,
    ) -> Self {
        let binary = binary.unwrap_or_else(|| {
            std::env::current_exe()
                .map(|exe| exe.with_file_name("cilia-proxy"))
                .unwrap_or_else(|_| PathBuf::from("cilia-proxy"))
        });
        let stem = api_socket
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("cilia");
        Self {
            binary,
            control_socket: api_socket.with_file_name(format!("{stem}-proxy.sock")),
            port,
            log: state_dir.join("proxy.log"),
        }
    }
}

/// What `cilia status` says about the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyStatus {
    /// No endpoint's policy has an L7 entry, and no proxy runs.
    NotNeeded,
    /// Started, not answering yet.
    Starting,
    /// Connected; `applied` is the policy revision it enforces.
    Running {
        pid: u32,
        applied: Option<u64>,
        rejected: Option<String>,
    },
    /// Needed but not running; being restarted.
    Down { reason: String },
}

impl ProxyStatus {
    /// (healthy, one-line detail) for the status report.
    pub fn describe(&self, config_port: u16) -> (bool, String) {
        match self {
            ProxyStatus::NotNeeded => (true, "not running: no L7 policy".into()),
            ProxyStatus::Starting => (false, "starting".into()),
            ProxyStatus::Running {
                pid,
                applied,
                rejected,
            } => {
                let applied = applied.map_or("none yet".into(), |r| r.to_string());
                match rejected {
                    None => (
                        true,
                        format!("pid {pid}, port {config_port}, policy revision {applied}"),
                    ),
                    Some(reason) => (
                        false,
                        format!(
                            "pid {pid}, port {config_port}, policy revision {applied}; the last push was rejected: {reason}"
                        ),
                    ),
                }
            }
            ProxyStatus::Down { reason } => (false, format!("down, restarting: {reason}")),
        }
    }
}

/// The L7 part of the policy subsystem's published state: per endpoint its
/// L7 entries (ingress, egress), and the identities of prefixes that are not
/// endpoints (the node's addresses as `host`, the CIDR identities).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L7Summary {
    /// Bumped on every publication (endpoint changes included).
    pub generation: u64,
    pub endpoints: BTreeMap<u16, (Vec<L7Entry>, Vec<L7Entry>)>,
    pub prefixes: Vec<PrefixIdentity>,
}

impl L7Summary {
    /// Whether any endpoint's policy redirects to the proxy.
    pub fn needed(&self) -> bool {
        self.endpoints
            .values()
            .any(|(i, e)| !i.is_empty() || !e.is_empty())
    }
}

/// The proxy's policy: every endpoint (its addresses name the clients and
/// servers the proxy sees), with its L7 entries.
pub fn proxy_policy(records: &[EndpointRecord], l7: &L7Summary, revision: u64) -> ProxyPolicy {
    let endpoints = records
        .iter()
        .map(|r| {
            let mut addrs = vec![IpAddr::V6(r.ipv6)];
            addrs.extend(r.ipv4.map(IpAddr::V4));
            let (ingress, egress) = l7.endpoints.get(&r.id).cloned().unwrap_or_default();
            ProxyEndpoint {
                id: r.id,
                identity: r.identity,
                addrs,
                ingress,
                egress,
            }
        })
        .collect();
    ProxyPolicy {
        version: PROTOCOL_VERSION,
        revision,
        endpoints,
        prefixes: l7.prefixes.clone(),
    }
}

/// Keeps `tx` at the proxy policy of the current endpoints and L7 summary;
/// the revision moves only when the content does. `None` as long as no L7
/// entry ever existed.
pub async fn publish_policy(
    store: Arc<Store>,
    mut l7: watch::Receiver<Arc<L7Summary>>,
    tx: watch::Sender<Option<Arc<ProxyPolicy>>>,
    covered: watch::Sender<Covered>,
) {
    let mut revision = 0u64;
    loop {
        let summary = l7.borrow_and_update().clone();
        let generation = summary.generation;
        // A node that never had an HTTP rule pays nothing per change.
        if tx.borrow().is_none() && !summary.needed() {
            if l7.changed().await.is_err() {
                return;
            }
            continue;
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.endpoints()).await {
            Ok(Ok(records)) => {
                tx.send_if_modified(|current| {
                    let candidate = proxy_policy(&records, &summary, revision + 1);
                    let same = current.as_ref().is_some_and(|c| {
                        c.endpoints == candidate.endpoints && c.prefixes == candidate.prefixes
                    });
                    if !same {
                        revision += 1;
                        *current = Some(Arc::new(candidate));
                    }
                    !same
                });
                covered.send_replace(Covered {
                    generation,
                    revision,
                });
            }
            Ok(Err(e)) => warn!(error = %e, "reading endpoints for the L7 proxy's policy failed"),
            Err(e) => warn!(error = %e, "building the L7 proxy's policy failed"),
        }
        if l7.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the proxy while it is needed: starts it (or finds the one already
/// running), pushes every policy snapshot, hands its flows to the monitor,
/// and restarts it when it goes away.
pub async fn supervise(
    config: ProxyConfig,
    mut policy: watch::Receiver<Option<Arc<ProxyPolicy>>>,
    status: watch::Sender<ProxyStatus>,
    monitor: Arc<crate::monitor::Monitor>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut routing_installed = false;
    loop {
        let connection = match control_client::connect(&config.control_socket).await {
            Ok(connection) => connection,
            Err(ControlClientError::BadHello(hello)) => {
                let reason = format!(
                    "the running proxy on {} does not speak control protocol {PROTOCOL_VERSION} ({hello}); stop it and it is restarted",
                    config.control_socket.display()
                );
                warn!("{reason}");
                status.send_replace(ProxyStatus::Down { reason });
                tokio::time::sleep(BACKOFF_MAX).await;
                continue;
            }
            Err(_) => {
                if !policy.borrow().as_ref().is_some_and(|p| needs_proxy(p)) {
                    status.send_replace(ProxyStatus::NotNeeded);
                    if policy.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                if !routing_installed {
                    let installed = tokio::task::spawn_blocking(routing::install_proxy_routing)
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    if let Err(e) = installed {
                        let reason = format!("installing the proxy's policy routing: {e}");
                        warn!("{reason}");
                        status.send_replace(ProxyStatus::Down { reason });
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                    routing_installed = true;
                }
                status.send_replace(ProxyStatus::Starting);
                match start(&config).await {
                    Ok(connection) => connection,
                    Err(reason) => {
                        warn!("{reason}");
                        status.send_replace(ProxyStatus::Down { reason });
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
        };
        backoff = BACKOFF_MIN;
        match session(connection, &mut policy, &status, &monitor).await {
            Ok(()) => return, // the agent is stopping
            Err(reason) => {
                warn!(reason = %reason, "lost the L7 proxy; restarting it");
                status.send_replace(ProxyStatus::Down { reason });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// How far the proxy policy has caught up with the policy subsystem: the
/// proxy policy `revision` holds every L7 summary up to `generation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Covered {
    pub generation: u64,
    pub revision: u64,
}

/// Waits (at most `limit`) until the proxy runs and enforces a policy that
/// holds the L7 summary `generation` (the one an import just published).
/// On a timeout, says what the proxy is doing instead.
pub async fn wait_enforcing(
    mut covered: watch::Receiver<Covered>,
    mut status: watch::Receiver<ProxyStatus>,
    generation: u64,
    limit: Duration,
) -> Result<(), String> {
    let waited = tokio::time::timeout(limit, async {
        let revision = covered
            .wait_for(|c| c.generation >= generation)
            .await
            .map(|c| c.revision)
            .map_err(|_| "the agent is stopping".to_string())?;
        status
            .wait_for(
                |s| matches!(s, ProxyStatus::Running { applied: Some(a), .. } if *a >= revision),
            )
            .await
            .map(|_| ())
            .map_err(|_| "the agent is stopping".to_string())
    })
    .await;
    match waited {
        Ok(done) => done,
        Err(_) => {
            let (_, detail) = status.borrow().describe(0);
            Err(format!(
                "the L7 proxy does not enforce this policy yet after {} s ({detail}); HTTP flows it must see are dropped until it does — see `cilia status`",
                limit.as_secs()
            ))
        }
    }
}

fn needs_proxy(policy: &ProxyPolicy) -> bool {
    policy
        .endpoints
        .iter()
        .any(|e| !e.ingress.is_empty() || !e.egress.is_empty())
}

type Connection = (Hello, ControlReader, ControlWriter);

/// Starts a detached proxy and connects to it.
async fn start(config: &ProxyConfig) -> Result<Connection, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.log)
        .map_err(|e| format!("opening the proxy log {}: {e}", config.log.display()))?;
    let err_log = log
        .try_clone()
        .map_err(|e| format!("opening the proxy log {}: {e}", config.log.display()))?;
    let mut cmd = tokio::process::Command::new(&config.binary);
    cmd.arg("--control-socket")
        .arg(&config.control_socket)
        .arg("--port")
        .arg(config.port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err_log))
        // Its own process group: a Ctrl-C or a signal to the agent's group
        // never reaches it, and it outlives the agent.
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", config.binary.display()))?;
    let pid = child.id().unwrap_or(0);
    info!(pid, binary = %config.binary.display(), port = config.port, "started cilia-proxy");
    let (exited_tx, mut exited) = tokio::sync::oneshot::channel();
    // Reap it when it exits (after an agent restart, init does).
    tokio::spawn(async move {
        let status = child.wait().await;
        match &status {
            Ok(status) => warn!(pid, %status, "cilia-proxy exited"),
            Err(e) => warn!(pid, error = %e, "waiting for cilia-proxy failed"),
        }
        let _ = exited_tx.send(status.map(|s| s.to_string()).unwrap_or_default());
    });
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(status) = exited.try_recv() {
            return Err(format!(
                "cilia-proxy (pid {pid}) exited at start ({status}); see {}",
                config.log.display()
            ));
        }
        match control_client::connect(&config.control_socket).await {
            Ok(connection) => return Ok(connection),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "cilia-proxy (pid {pid}) did not answer on {} within {} s ({e}); see {}",
                    config.control_socket.display(),
                    START_TIMEOUT.as_secs(),
                    config.log.display()
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One control connection. `Ok` when the agent stops, `Err(reason)` when
/// the proxy went away.
async fn session(
    (hello, mut reader, mut writer): Connection,
    policy: &mut watch::Receiver<Option<Arc<ProxyPolicy>>>,
    status: &watch::Sender<ProxyStatus>,
    monitor: &crate::monitor::Monitor,
) -> Result<(), String> {
    info!(pid = hello.pid, revision = ?hello.revision, "connected to cilia-proxy");
    // Its revision numbers are those of whichever agent pushed last (maybe
    // one before a restart): it enforces one of ours only once it applies it.
    let mut running = (hello.pid, None::<u64>, None::<String>);
    let report = |s: &(u32, Option<u64>, Option<String>)| {
        status.send_replace(ProxyStatus::Running {
            pid: s.0,
            applied: s.1,
            rejected: s.2.clone(),
        });
    };
    report(&running);
    // A proxy that outlived an agent holds that agent's policy: push ours.
    let mut pushed: Option<u64> = None;
    loop {
        let current = policy.borrow_and_update().clone();
        if let Some(p) = current {
            if pushed != Some(p.revision) {
                writer
                    .send_policy(&p)
                    .await
                    .map_err(|e| format!("pushing the policy: {e}"))?;
                pushed = Some(p.revision);
            }
        }
        tokio::select! {
            message = reader.recv() => match message {
                Ok(FromProxy::Flow(flow)) => monitor.record_l7(&flow).await,
                Ok(FromProxy::Applied { revision }) => {
                    running.1 = Some(revision);
                    running.2 = None;
                    report(&running);
                }
                Ok(FromProxy::Rejected { revision, reason }) => {
                    warn!(revision, reason = %reason, "the proxy rejected a policy; it keeps the previous one");
                    running.2 = Some(reason);
                    report(&running);
                }
                Ok(FromProxy::Hello { .. }) => {}
                Err(ControlClientError::Invalid(e)) => {
                    warn!(error = %e, "unreadable message from the proxy");
                }
                Err(e) => return Err(e.to_string()),
            },
            changed = policy.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_socket_sits_beside_the_api_socket() {
        let c = ProxyConfig::for_agent(
            Path::new("/var/run/cilia/cilia.sock"),
            Path::new("/var/lib/cilia"),
            15080,
            None,
        );
        assert_eq!(
            c.control_socket,
            Path::new("/var/run/cilia/cilia-proxy.sock")
        );
        assert_eq!(c.log, Path::new("/var/lib/cilia/proxy.log"));
        assert!(c.binary.ends_with("cilia-proxy"));
    }

    #[test]
    fn an_unneeded_proxy_is_healthy_and_a_rejected_push_is_not() {
        assert!(ProxyStatus::NotNeeded.describe(15080).0);
        let rejected = ProxyStatus::Running {
            pid: 7,
            applied: Some(3),
            rejected: Some("endpoint 4 ingress[0]: http[0].path: bad".into()),
        };
        let (ok, detail) = rejected.describe(15080);
        assert!(!ok);
        assert!(detail.contains("rejected"), "{detail}");
    }
}
