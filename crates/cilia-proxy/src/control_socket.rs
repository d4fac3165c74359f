//! The control socket: where the agent pushes policies and reads flow
//! records ([`crate::control`] is the protocol).
//!
//! Invariants: a policy is compiled completely before it replaces the one in
//! force (one atomic swap; requests already past their decision are not
//! affected, the next request of every connection sees the new one); a
//! refused policy leaves the old one in force; the policy stays in force when
//! the agent disconnects; a control client that reads slowly loses flow
//! records (counted and logged), never delays a request.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{info, warn};

use crate::control::{FromProxy, L7Flow, ToProxy, PROTOCOL_VERSION};
use crate::policy::CompiledPolicy;

/// Longest control message accepted, in bytes (a whole cluster's L7 policy
/// fits with room to spare; a runaway writer cannot exhaust memory).
pub const MAX_CONTROL_MESSAGE: usize = 64 << 20;
/// Default number of flow records waiting for each control client; beyond,
/// the oldest are dropped.
pub const FLOW_QUEUE: usize = 4096;
/// At most one "records dropped" warning per client per this interval.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// What control connections share.
pub(crate) struct Control {
    pub policy: watch::Sender<Option<Arc<CompiledPolicy>>>,
    pub flows: broadcast::Sender<L7Flow>,
    /// True once the transparent listeners are open: a policy counts as
    /// applied (the agent's "enforcing") only then, since the datapath
    /// drops a redirected flow that finds no listener.
    pub listening: watch::Receiver<bool>,
}

/// How long an applied policy's answer waits for the listeners to open
/// (they open right after the first policy; a failure ends the proxy).
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// Binds the control socket at `path`, mode 0600, replacing a stale file.
/// Refuses when another process answers on it.
pub(crate) fn bind(path: &Path) -> io::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process serves this socket",
        ));
    }
    // Bind under a temporary name, restrict it, then rename it into place:
    // the socket is never reachable with a wider mode, and a stale file is
    // replaced atomically.
    let tmp: PathBuf = {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{}.tmp", std::process::id()));
        name.into()
    };
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

/// Accepts control connections until `stop` turns true.
pub(crate) async fn serve(
    listener: UnixListener,
    control: Arc<Control>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    next_id += 1;
                    let control = control.clone();
                    let id = next_id;
                    tokio::spawn(async move { connection(id, stream, control).await });
                }
                Err(e) => {
                    warn!("control socket: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Compiles and swaps in a policy; the answer for the agent.
pub(crate) fn apply(control: &Control, msg: &ToProxy) -> FromProxy {
    let ToProxy::Policy(policy) = msg;
    match CompiledPolicy::compile(policy) {
        Ok(compiled) => {
            control.policy.send_replace(Some(Arc::new(compiled)));
            info!(
                revision = policy.revision,
                endpoints = policy.endpoints.len(),
                "policy applied"
            );
            FromProxy::Applied {
                revision: policy.revision,
            }
        }
        Err(e) => {
            warn!(revision = policy.revision, "policy rejected: {e}");
            FromProxy::Rejected {
                revision: policy.revision,
                reason: e.to_string(),
            }
        }
    }
}

/// Flow records sent with another one in a single write, at most.
const FLOW_BATCH: usize = 64;

/// Appends one message as a JSON line.
fn append_line(id: u64, buf: &mut Vec<u8>, msg: &FromProxy) {
    let start = buf.len();
    match serde_json::to_writer(&mut *buf, msg) {
        Ok(()) => buf.push(b'\n'),
        Err(e) => {
            buf.truncate(start);
            warn!(client = id, "control message not serializable: {e}");
        }
    }
}

async fn connection(id: u64, stream: UnixStream, control: Arc<Control>) {
    let (read, mut write) = stream.into_split();
    let (replies_tx, mut replies) = mpsc::channel::<FromProxy>(16);
    let mut flows = control.flows.subscribe();
    let hello = FromProxy::Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        revision: control.policy.borrow().as_ref().map(|p| p.revision()),
    };
    info!(client = id, "control client connected");

    let writer = async move {
        let mut dropped = 0u64;
        let mut last_log: Option<Instant> = None;
        let mut msg = Some(hello);
        let mut buf = Vec::new();
        loop {
            if let Some(m) = msg.take() {
                buf.clear();
                append_line(id, &mut buf, &m);
                // Under load, flow records queue up: send those already
                // waiting with this one, in one write (one wakeup of the
                // agent, not one per request).
                for _ in 0..FLOW_BATCH {
                    match flows.try_recv() {
                        Ok(flow) => append_line(id, &mut buf, &FromProxy::Flow(flow)),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => dropped += n,
                        Err(_) => break,
                    }
                }
                if write.write_all(&buf).await.is_err() {
                    return dropped;
                }
            }
            msg = tokio::select! {
                biased;
                r = replies.recv() => match r {
                    Some(m) => Some(m),
                    None => return dropped, // the reader ended: the client left
                },
                f = flows.recv() => match f {
                    Ok(flow) => Some(FromProxy::Flow(flow)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        dropped += n;
                        if last_log.is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL) {
                            last_log = Some(Instant::now());
                            warn!(client = id, dropped_total = dropped,
                                "control client reads too slowly: flow records dropped");
                        }
                        None
                    }
                    Err(broadcast::error::RecvError::Closed) => return dropped,
                },
            };
        }
    };

    let reader = async move {
        let mut read = BufReader::new(read);
        let mut line = Vec::new();
        for n in 1u64.. {
            line.clear();
            let limit = (MAX_CONTROL_MESSAGE + 1) as u64;
            match (&mut read).take(limit).read_until(b'\n', &mut line).await {
                Ok(0) => return,
                Ok(_) if line.last() != Some(&b'\n') => {
                    if line.len() > MAX_CONTROL_MESSAGE {
                        warn!(
                            client = id,
                            "control message {n}: longer than {MAX_CONTROL_MESSAGE} bytes; closing"
                        );
                    }
                    return; // too long, or cut by EOF
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(client = id, "control socket: read: {e}");
                    return;
                }
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply = match serde_json::from_slice::<ToProxy>(&line) {
                Ok(msg) => {
                    let reply = apply(&control, &msg);
                    if matches!(reply, FromProxy::Applied { .. }) {
                        let mut listening = control.listening.clone();
                        if tokio::time::timeout(LISTEN_WAIT, listening.wait_for(|l| *l))
                            .await
                            .is_err()
                        {
                            warn!(client = id, "the transparent listeners are not open yet");
                        }
                    }
                    reply
                }
                Err(e) => {
                    warn!(client = id, "control message {n}: {e}");
                    FromProxy::Rejected {
                        revision: 0,
                        reason: format!("message {n}: not a valid control message: {e}"),
                    }
                }
            };
            if replies_tx.send(reply).await.is_err() {
                return;
            }
        }
    };

    let (dropped, ()) = tokio::join!(writer, reader);
    info!(
        client = id,
        dropped_flows = dropped,
        "control client disconnected"
    );
}
