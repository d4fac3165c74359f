//! `cilia-proxy`: the L7 HTTP proxy, its own process so that an agent restart
//! never cuts an L7 connection. The datapath hands it the connections whose
//! policy entry names a proxy port (transparently: the accepted socket's local
//! address is the original destination); it enforces the HTTP rules the agent
//! pushed per request, answers denied requests `403 Access denied`, forwards
//! allowed ones from the client's own address, and reports every request.
//!
//! [`control`] is the agent↔proxy protocol and [`control_client`] the
//! agent's end of it; [`run`] runs the proxy.
//!
//! Invariants:
//! - fail closed: the transparent listeners open only once a policy is in
//!   force (until then the datapath finds no socket and drops the flow), and
//!   a request that no entry allows is denied;
//! - the policy in force survives the agent's disconnection, and a refused
//!   policy leaves it in force;
//! - every socket the proxy owns carries `SO_MARK = CILIA_MARK_FROM_PROXY`.

#![warn(missing_docs)]

mod connection;
pub mod control;
pub mod control_client;
mod control_socket;
pub mod policy;
mod sockets;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

pub use connection::MAX_FLOW_PATH;
pub use control_socket::{FLOW_QUEUE, MAX_CONTROL_MESSAGE};
pub use sockets::MARK;

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The control socket (created mode 0600; a stale file is replaced).
    pub control_socket: PathBuf,
    /// Port of the transparent listeners.
    pub port: u16,
    /// Bound on establishing an upstream connection.
    pub connect_timeout: Duration,
    /// On shutdown, how long requests in flight may take to finish.
    pub drain_timeout: Duration,
    /// Flow records queued for each control client; a client further behind
    /// loses the oldest ones (counted and logged).
    pub flow_queue: usize,
    /// Connections one client address may hold open at once; more are
    /// closed at accept (one client must not exhaust the proxy for all).
    pub max_connections_per_client: usize,
}

impl Config {
    /// The defaults for a control socket path.
    pub fn new(control_socket: impl Into<PathBuf>) -> Self {
        Self {
            control_socket: control_socket.into(),
            port: control::DEFAULT_PROXY_PORT,
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            flow_queue: FLOW_QUEUE,
            max_connections_per_client: MAX_CONNECTIONS_PER_CLIENT,
        }
    }
}

/// Why the proxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}")]
    ControlSocket {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A transparent listener could not be opened (IP_TRANSPARENT and
    /// SO_MARK need CAP_NET_ADMIN).
    #[error("listener {addr}: {source}")]
    Listen {
        /// Its address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for signals failed.
    #[error("signals: {0}")]
    Signals(std::io::Error),
}

/// Runs the proxy until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), ProxyError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ProxyError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ProxyError::Signals)?;
    run_until(config, async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    })
    .await
}

/// Runs the proxy until `shutdown` completes: then it stops accepting, lets
/// requests in flight finish for at most `drain_timeout`, and returns.
pub async fn run_until(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let control_listener = control_socket::bind(&config.control_socket).map_err(|source| {
        ProxyError::ControlSocket {
            path: config.control_socket.clone(),
            source,
        }
    })?;
    info!(socket = %config.control_socket.display(), "control socket ready");
    match sockets::raise_fd_limit() {
        Ok(n) => info!(open_files = n, "open-file limit"),
        Err(e) => warn!("raising the open-file limit: {e}"),
    }
    let (policy_tx, mut policy_rx) = watch::channel(None);
    let (flows, _) = broadcast::channel(config.flow_queue.max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (listening_tx, listening) = watch::channel(false);
    let control = Arc::new(control_socket::Control {
        policy: policy_tx,
        flows: flows.clone(),
        listening,
    });
    let control_task = tokio::spawn(control_socket::serve(
        control_listener,
        control,
        stop_rx.clone(),
    ));
    let result = serve_traffic(
        &config,
        &mut policy_rx,
        flows,
        &stop_tx,
        &listening_tx,
        shutdown,
    )
    .await;
    let _ = stop_tx.send(true);
    let _ = control_task.await;
    let _ = std::fs::remove_file(&config.control_socket);
    result
}

async fn serve_traffic(
    config: &Config,
    policy_rx: &mut watch::Receiver<Option<Arc<policy::CompiledPolicy>>>,
    flows: broadcast::Sender<control::L7Flow>,
    stop: &watch::Sender<bool>,
    listening: &watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    tokio::pin!(shutdown);
    // Fail closed: no listener, so the datapath finds no socket for a
    // redirected flow and drops it, until a policy is in force.
    tokio::select! {
        _ = &mut shutdown => return Ok(()),
        ok = async { policy_rx.wait_for(Option::is_some).await.is_ok() } => if !ok { return Ok(()) },
    }
    let listen = |addr: SocketAddr| {
        sockets::transparent_listener(addr).map_err(|source| ProxyError::Listen { addr, source })
    };
    let v4 = listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.port)))?;
    let v6 = match listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, config.port))) {
        Ok(l) => Some(l),
        Err(ProxyError::Listen { source, .. })
            if source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            warn!("IPv6 is disabled on this node: IPv4 listener only");
            None
        }
        Err(e) => return Err(e),
    };
    info!(port = config.port, "transparent listeners open");
    listening.send_replace(true);
    let shared = Arc::new(connection::Shared {
        policy: policy_rx.clone(),
        flows,
        connect_timeout: config.connect_timeout,
    });
    let mut connections = JoinSet::new();
    let clients = Arc::new(ClientCounts::default());
    let (mut refused, mut refused_logged) = (0u64, None::<std::time::Instant>);
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = v4.accept() => a,
            a = accept_opt(v6.as_ref()) => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(slot) =
                    clients.take(peer.ip().to_canonical(), config.max_connections_per_client)
                else {
                    refused += 1;
                    if refused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        refused_logged = Some(std::time::Instant::now());
                        warn!(client = %peer.ip(), refused_total = refused,
                            max = config.max_connections_per_client,
                            "a client holds too many connections: new ones are closed");
                    }
                    continue;
                };
                let serve = connection::serve(stream, shared.clone(), stop.subscribe());
                connections.spawn(async move {
                    serve.await;
                    drop(slot);
                });
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop((v4, v6));
    while connections.try_join_next().is_some() {}
    info!(
        in_flight = connections.len(),
        "listeners closed; finishing requests in flight"
    );
    // Each connection finishes its request in flight, then closes.
    let _ = stop.send(true);
    drain(connections, config.drain_timeout).await;
    Ok(())
}

/// Default of [`Config::max_connections_per_client`].
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 4096;

/// Open connections per client address.
#[derive(Debug, Default)]
struct ClientCounts(std::sync::Mutex<HashMap<IpAddr, usize>>);

/// One open connection of a client: its slot is free again when dropped.
#[derive(Debug)]
struct ClientSlot {
    counts: Arc<ClientCounts>,
    ip: IpAddr,
}

impl ClientCounts {
    /// A slot for `ip`, or `None` when it holds `max` already.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

async fn accept_opt(
    l: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn drain(mut connections: JoinSet<()>, timeout: Duration) {
    let all_done = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(timeout, all_done).await.is_err() {
        warn!(
            left = connections.len(),
            "connections still open after {timeout:?}: closing them"
        );
        connections.shutdown().await;
    }
}

#[cfg(test)]
mod client_tests {
    use super::*;

    #[test]
    fn a_client_gets_at_most_its_share_of_connections_and_slots_come_back() {
        let counts = Arc::new(ClientCounts::default());
        let a: IpAddr = "fd00::3".parse().expect("ip");
        let b: IpAddr = "10.0.0.3".parse().expect("ip");
        let first = counts.take(a, 2).expect("first");
        let second = counts.take(a, 2).expect("second");
        assert!(counts.take(a, 2).is_none(), "a third is refused");
        assert!(
            counts.take(b, 2).is_some(),
            "another client is not affected"
        );
        drop(first);
        assert!(
            counts.take(a, 2).is_some(),
            "a closed connection frees its slot"
        );
        drop(second);
    }
}
