//! The cluster control plane of the agent: this node's membership, its
//! share of the cluster-wide state, and the other nodes' state, over a
//! [`KvStore`] (etcd in production; any backend in tests).
//!
//! Why it looks the way it does:
//! * The agent must start and serve with its local state while the kvstore
//!   is down. So everything runs on the client's own thread, which connects
//!   with a backoff (1 s doubling to 10 s) and never blocks the caller; the
//!   calls that need the cluster ([`ClusterClient::allocate_identity`],
//!   the policy calls) fail with a clear error while it is away.
//! * The trait is blocking (the etcd backend blocks on its own runtime), so
//!   nothing here is async: the client is called from blocking code and
//!   reports on a std channel.
//! * What this node owns in the kvstore (its node record, the refs on the
//!   identities its endpoints use, the ipcache entries of its endpoints) is
//!   held under one lease and is also kept here as *desired state*: after a
//!   lost lease or a reconnect, all of it is put again under the (new)
//!   lease. A plain shutdown leaves the lease to expire on its own, so an
//!   agent that restarts within the lease's time to live never makes its
//!   endpoints vanish from the other nodes.
//! * What other nodes own reaches the agent as [`ClusterEvent`]s, from a
//!   listing and a watch from the listing's revision (no gap). After a
//!   reconnect or a broken watch the client lists again and emits only the
//!   difference to what it emitted before, then [`ClusterEvent::Synced`].
//!
//! Key layout: [`keys`]. Identity allocation and GC: [`identity`].

mod identity;
pub mod keys;
mod session;
mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cilia_kvstore::{KvError, KvStore, LeaseId, Op};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::store::{IdentityAllocator, StoredPolicy};
use identity::ClaimError;

/// A node as it registers itself under `cilia/nodes/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub name: String,
    /// Underlay addresses; the first is the tunnel endpoint.
    pub node_ips: Vec<IpAddr>,
    pub ipv6_range: Ipv6Net,
    pub ipv4_range: Option<Ipv4Net>,
    /// Addresses of the node's health endpoint.
    pub health_ips: Vec<IpAddr>,
    /// The read-only peer API (`None`: off).
    pub peer_api: Option<SocketAddr>,
    /// `vxlan` or `disabled`.
    pub tunnel: String,
    /// Differs at each start of the agent.
    pub boot_id: String,
    /// Unix time in ms of the record's last put (it is put again every
    /// heartbeat).
    pub heartbeat_ms: u64,
}

impl ClusterNode {
    /// The address tunnel packets to this node's pods go to.
    pub fn tunnel_endpoint(&self) -> Option<IpAddr> {
        self.node_ips.first().copied()
    }
}

/// An endpoint address of another node (from `cilia/ipcache/<ip>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteIp {
    pub ip: IpAddr,
    pub identity: u32,
    pub node: String,
    pub tunnel_endpoint: IpAddr,
    pub encap_key: u32,
}

/// The value of an ipcache key (the address is the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IpcacheValue {
    identity: u32,
    node: String,
    tunnel_endpoint: IpAddr,
    encap_key: u32,
}

/// What the agent applies to its datapath and policy repository. Nodes and
/// ipcache entries are other nodes' only; policies are all, this node's
/// own puts included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// The kvstore answers (again); a resync follows, ended by `Synced`.
    Connected,
    /// The kvstore stopped answering; the agent keeps what it has.
    Disconnected {
        reason: String,
    },
    NodeUpsert(ClusterNode),
    NodeDelete(String),
    IpcacheUpsert(RemoteIp),
    IpcacheDelete(IpAddr),
    PolicyUpsert(StoredPolicy),
    /// By [`StoredPolicy::key`].
    PolicyDelete(String),
    /// A cluster-wide identity and its labels (every identity, this node's
    /// included: policies select peers by label on every node).
    IdentityUpsert(u32, BTreeMap<String, String>),
    /// An identity the cluster collected.
    IdentityDelete(u32),
    /// Everything the kvstore held at one revision has been emitted: what
    /// the agent holds from the cluster and did not hear of again is gone.
    Synced,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_name: String,
    pub node_ips: Vec<IpAddr>,
    pub ipv6_range: Ipv6Net,
    pub ipv4_range: Option<Ipv4Net>,
    pub health_ips: Vec<IpAddr>,
    pub peer_api: Option<SocketAddr>,
    /// `vxlan` or `disabled`.
    pub tunnel: String,
    /// Time to live of the node lease (whole seconds, at least 1).
    pub lease_ttl: Duration,
    /// Names the kvstore in errors, e.g. `etcd http://198.51.100.254:2379`.
    pub kvstore: String,
    /// How often the node record is put again with a fresh `heartbeat_ms`.
    pub heartbeat: Duration,
    /// How often this node looks for unused identities.
    pub identity_gc_interval: Duration,
    /// How long an identity stays unused before it is deleted.
    pub identity_gc_grace: Duration,
}

impl ClusterConfig {
    /// A configuration with the defaults: tunnel `vxlan`, lease 15 s,
    /// heartbeat 5 s, identity GC every 60 s with a grace of 5 minutes.
    pub fn new(node_name: impl Into<String>, node_ips: Vec<IpAddr>, ipv6_range: Ipv6Net) -> Self {
        Self {
            node_name: node_name.into(),
            node_ips,
            ipv6_range,
            ipv4_range: None,
            health_ips: Vec::new(),
            peer_api: None,
            tunnel: "vxlan".into(),
            lease_ttl: Duration::from_secs(15),
            kvstore: "etcd".into(),
            heartbeat: Duration::from_secs(5),
            identity_gc_interval: Duration::from_secs(60),
            identity_gc_grace: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub connected: bool,
    pub last_error: Option<String>,
    /// Unix ms of the last change of `connected` (the start, before any).
    pub since_ms: u64,
    /// Nodes known, this one included.
    pub nodes: usize,
    /// The node lease while connected.
    pub lease: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("kvstore {kvstore} unreachable: {what}: {reason}")]
    Unreachable {
        kvstore: String,
        what: String,
        reason: String,
    },
    #[error("{what}: {source}")]
    Kv {
        what: String,
        #[source]
        source: KvError,
    },
    #[error("{what}: {reason}")]
    Identity { what: String, reason: String },
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The connection the background thread has established, for the calls.
#[derive(Clone)]
struct Conn {
    kv: Arc<dyn KvStore>,
    lease: LeaseId,
}

#[derive(Debug, Default)]
struct Health {
    connected: bool,
    last_error: Option<String>,
    since_ms: u64,
}

/// What this node wants in the kvstore, kept to put it again after a lost
/// lease or a reconnect.
#[derive(Debug, Default)]
struct Owned {
    /// Identities this node holds a ref on: id -> labels JSON.
    refs: BTreeMap<u32, Vec<u8>>,
    /// Refs to drop once the kvstore answers.
    releases: BTreeSet<u32>,
}

#[derive(Debug, Default)]
struct Ipcache {
    /// This node's endpoint addresses and their identities.
    desired: BTreeMap<IpAddr, u32>,
    /// What is in the kvstore under the current lease (`None`: unknown,
    /// read it back first).
    published: Option<BTreeMap<IpAddr, u32>>,
}

struct Inner {
    config: ClusterConfig,
    boot_id: String,
    events: mpsc::Sender<ClusterEvent>,
    conn: Mutex<Option<Conn>>,
    health: Mutex<Health>,
    view: Mutex<view::View>,
    owned: Mutex<Owned>,
    /// Held across the kvstore calls of a reconcile, so that the caller's
    /// and the background thread's reconciles never interleave.
    ipcache: Mutex<Ipcache>,
    stop: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Locks a mutex; the data behind a poisoned one is still whole (every
/// update here is a single assignment or insert). The client never holds
/// two of its mutexes at once, except `ipcache` (held across the kvstore
/// calls of a reconcile) with `conn` briefly inside it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's handle on the cluster (cheap to clone; all clones are one
/// client). Call [`Self::shutdown`] (or [`Self::leave`]) to stop it.
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient")
            .field("node", &self.inner.config.node_name)
            .finish()
    }
}

impl ClusterClient {
    /// Starts the client's thread, which connects with `connect` (retried
    /// with backoff), registers the node and follows the cluster. Returns at
    /// once; the events come on the receiver (a std channel: read it from a
    /// blocking thread).
    pub fn start(
        config: ClusterConfig,
        connect: impl Fn() -> Result<Box<dyn KvStore>, KvError> + Send + 'static,
    ) -> (ClusterClient, mpsc::Receiver<ClusterEvent>) {
        let (tx, rx) = mpsc::channel();
        let boot_id = format!(
            "{:x}-{:x}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            std::process::id()
        );
        let inner = Arc::new(Inner {
            config,
            boot_id,
            events: tx,
            conn: Mutex::new(None),
            health: Mutex::new(Health {
                since_ms: unix_ms(),
                ..Health::default()
            }),
            view: Mutex::new(view::View::default()),
            owned: Mutex::new(Owned::default()),
            ipcache: Mutex::new(Ipcache::default()),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let thread_inner = inner.clone();
        let handle = std::thread::Builder::new()
            .name("cilia-cluster".into())
            .spawn(move || session::run(thread_inner, Box::new(connect)));
        match handle {
            Ok(h) => *lock(&inner.thread) = Some(h),
            Err(e) => lock(&inner.health).last_error = Some(format!("cannot start: {e}")),
        }
        (ClusterClient { inner }, rx)
    }

    fn conn(&self, what: impl FnOnce() -> String) -> Result<Conn, ClusterError> {
        // One lock at a time (never `conn` and `health` together).
        let conn = lock(&self.inner.conn).clone();
        match conn {
            Some(c) => Ok(c),
            None => Err(ClusterError::Unreachable {
                kvstore: self.inner.config.kvstore.clone(),
                what: what(),
                reason: lock(&self.inner.health)
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not connected yet".into()),
            }),
        }
    }

    fn kv_error(&self, what: String, e: KvError) -> ClusterError {
        match e {
            KvError::Unreachable { reason, .. } => ClusterError::Unreachable {
                kvstore: self.inner.config.kvstore.clone(),
                what,
                reason,
            },
            source => ClusterError::Kv { what, source },
        }
    }

    /// The cluster-wide identity of `labels` (allocated if new); this node
    /// holds a ref on it until [`Self::release_identity`].
    pub fn allocate_identity(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<u32, ClusterError> {
        let json = keys::labels_json(labels);
        let what = || {
            format!(
                "cannot allocate a cluster-wide identity for labels {}",
                String::from_utf8_lossy(&json)
            )
        };
        let mut last = None;
        // A lease replaced under us (lost and granted anew) is retried
        // once with the new one.
        for _ in 0..2 {
            let conn = self.conn(what)?;
            match identity::allocate(&*conn.kv, conn.lease, &self.inner.config.node_name, &json) {
                Ok(id) => {
                    let mut owned = lock(&self.inner.owned);
                    owned.refs.insert(id, json.clone());
                    owned.releases.remove(&id);
                    return Ok(id);
                }
                Err(ClaimError::Kv(KvError::LeaseNotFound { .. })) => {
                    std::thread::sleep(Duration::from_millis(200));
                    last = Some("the node lease was lost".to_string());
                }
                Err(ClaimError::Kv(e)) => return Err(self.kv_error(what(), e)),
                Err(e) => {
                    return Err(ClusterError::Identity {
                        what: what(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        Err(ClusterError::Identity {
            what: what(),
            reason: last.unwrap_or_default(),
        })
    }

    /// Drops this node's ref on `id` (now if the kvstore answers, else once
    /// it does).
    pub fn release_identity(&self, id: u32) {
        lock(&self.inner.owned).refs.remove(&id);
        let conn = lock(&self.inner.conn).clone();
        let done = conn
            .is_some_and(|c| identity::release(&*c.kv, &self.inner.config.node_name, id).is_ok());
        if !done {
            lock(&self.inner.owned).releases.insert(id);
        }
    }

    /// Makes the cluster agree with this node's existing local identities
    /// (at join): adds this node's refs, claims ids the cluster does not
    /// know. Returns the identities the cluster maps elsewhere, with why.
    /// While the kvstore is away they are remembered and adopted at connect
    /// (conflicts found then are logged and shown in `status().last_error`).
    pub fn reconcile_identities(
        &self,
        local: &BTreeMap<u32, BTreeMap<String, String>>,
    ) -> Vec<(u32, String)> {
        let conn = lock(&self.inner.conn).clone();
        let mut conflicts = Vec::new();
        for (id, labels) in local {
            let json = keys::labels_json(labels);
            lock(&self.inner.owned).refs.insert(*id, json.clone());
            let Some(conn) = &conn else { continue };
            match identity::adopt(
                &*conn.kv,
                conn.lease,
                &self.inner.config.node_name,
                *id,
                &json,
            ) {
                Ok(()) => {}
                Err(ClaimError::Conflict(reason)) => {
                    lock(&self.inner.owned).refs.remove(id);
                    conflicts.push((*id, reason));
                }
                // Retried with everything this node owns at the next resync.
                Err(e) => {
                    tracing::warn!(identity = id, error = %e, "cluster identity not adopted yet")
                }
            }
        }
        conflicts
    }

    /// Sets this node's endpoint addresses (with their identities); the
    /// client makes `cilia/ipcache/` agree now and after every resync.
    pub fn set_local_ips(&self, desired: Vec<(IpAddr, u32)>) {
        let mut ipcache = lock(&self.inner.ipcache);
        ipcache.desired = desired.into_iter().collect();
        let conn = lock(&self.inner.conn).clone();
        if let Some(conn) = conn {
            if let Err(e) = self.inner.reconcile_ipcache(&conn, &mut ipcache, false) {
                // The background thread tries again.
                tracing::debug!(error = %e, "ipcache not published yet");
            }
        }
    }

    /// Adds or replaces policies cluster-wide, in one transaction.
    pub fn put_policies(&self, policies: &[StoredPolicy]) -> Result<(), ClusterError> {
        let what = || format!("cannot store {} policies cluster-wide", policies.len());
        let conn = self.conn(what)?;
        let mut ops = Vec::with_capacity(policies.len());
        for p in policies {
            let json = serde_json::to_vec(p).map_err(|e| ClusterError::Identity {
                what: what(),
                reason: e.to_string(),
            })?;
            ops.push(Op::put(keys::policy(&p.key()), json));
        }
        conn.kv
            .txn(&[], &ops)
            .map(|_| ())
            .map_err(|e| self.kv_error(what(), e))
    }

    /// Deletes policies (by [`StoredPolicy::key`]) cluster-wide, in one
    /// transaction.
    pub fn delete_policies(&self, keys: &[String]) -> Result<(), ClusterError> {
        let what = || format!("cannot delete {} policies cluster-wide", keys.len());
        let conn = self.conn(what)?;
        let ops: Vec<Op> = keys
            .iter()
            .map(|k| Op::delete(self::keys::policy(k)))
            .collect();
        conn.kv
            .txn(&[], &ops)
            .map(|_| ())
            .map_err(|e| self.kv_error(what(), e))
    }

    /// The cluster's policies, read from the kvstore now.
    pub fn policies(&self) -> Result<Vec<StoredPolicy>, ClusterError> {
        let what = || "cannot read the cluster's policies".to_string();
        let conn = self.conn(what)?;
        let listing = conn
            .kv
            .list_prefix(keys::POLICIES)
            .map_err(|e| self.kv_error(what(), e))?;
        listing
            .kvs
            .iter()
            .map(|kv| {
                serde_json::from_slice(&kv.value).map_err(|e| ClusterError::Kv {
                    what: what(),
                    source: KvError::Corrupt {
                        key: kv.key.clone(),
                        reason: e.to_string(),
                    },
                })
            })
            .collect()
    }

    /// Every node known (this one included), as last seen.
    pub fn nodes(&self) -> Vec<ClusterNode> {
        lock(&self.inner.view).nodes.values().cloned().collect()
    }

    pub fn status(&self) -> ClusterStatus {
        let (connected, last_error, since_ms) = {
            let health = lock(&self.inner.health);
            (health.connected, health.last_error.clone(), health.since_ms)
        };
        let nodes = lock(&self.inner.view).nodes.len();
        let lease = lock(&self.inner.conn).as_ref().map(|c| c.lease);
        ClusterStatus {
            connected,
            last_error,
            since_ms,
            nodes,
            lease,
        }
    }

    /// Stops the client's thread. The lease is left to expire: an agent
    /// that restarts in time keeps its entries (see [`Self::leave`]).
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::Release);
        let handle = lock(&self.inner.thread).take();
        if let Some(h) = handle {
            h.thread().unpark();
            // A panicked thread has nothing left to stop.
            let _ = h.join();
        }
    }

    /// Leaves the cluster: stops the client and revokes the node lease, so
    /// the node record, its refs and its ipcache entries go now.
    pub fn leave(&self) -> Result<(), ClusterError> {
        self.shutdown();
        let Some(conn) = lock(&self.inner.conn).take() else {
            return Ok(());
        };
        match conn.kv.lease_revoke(conn.lease) {
            Ok(()) | Err(KvError::NoLease(_)) => Ok(()),
            Err(e) => Err(self.kv_error("cannot revoke the node lease".into(), e)),
        }
    }
}

impl IdentityAllocator for ClusterClient {
    fn allocate(&self, labels: &BTreeMap<String, String>) -> Result<u32, String> {
        self.allocate_identity(labels).map_err(|e| e.to_string())
    }

    fn release(&self, id: u32) {
        self.release_identity(id)
    }
}

impl Inner {
    fn emit(&self, ev: ClusterEvent) {
        // Nobody listening is the agent's choice, not an error.
        let _ = self.events.send(ev);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Sleeps up to `d`, less when stopped.
    fn sleep(&self, d: Duration) {
        let deadline = std::time::Instant::now() + d;
        while !self.stopping() {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::park_timeout(deadline - now);
        }
    }

    fn own_record(&self) -> ClusterNode {
        let c = &self.config;
        ClusterNode {
            name: c.node_name.clone(),
            node_ips: c.node_ips.clone(),
            ipv6_range: c.ipv6_range,
            ipv4_range: c.ipv4_range,
            health_ips: c.health_ips.clone(),
            peer_api: c.peer_api,
            tunnel: c.tunnel.clone(),
            boot_id: self.boot_id.clone(),
            heartbeat_ms: unix_ms(),
        }
    }

    fn tunnel_endpoint(&self) -> IpAddr {
        self.config
            .node_ips
            .first()
            .copied()
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
    }

    /// Makes this node's ipcache entries in the kvstore what `ipcache`
    /// desires. `all`: put every entry again (a new lease) and read back
    /// what the kvstore holds of this node's first.
    fn reconcile_ipcache(
        &self,
        conn: &Conn,
        ipcache: &mut Ipcache,
        all: bool,
    ) -> Result<(), KvError> {
        let node = &self.config.node_name;
        let current = match (&ipcache.published, all) {
            (Some(p), false) => p.clone(),
            _ => {
                let mut current = BTreeMap::new();
                for kv in conn.kv.list_prefix(keys::IPCACHE)?.kvs {
                    let Ok(v) = serde_json::from_slice::<IpcacheValue>(&kv.value) else {
                        continue;
                    };
                    let Some(ip) = kv.key[keys::IPCACHE.len()..].parse::<IpAddr>().ok() else {
                        continue;
                    };
                    if v.node == *node {
                        // Stale (another boot's lease or endpoint): put again.
                        current.insert(ip, if all { u32::MAX } else { v.identity });
                    }
                }
                current
            }
        };
        let mut ops = Vec::new();
        for (ip, identity) in &ipcache.desired {
            if current.get(ip) != Some(identity) {
                let value = IpcacheValue {
                    identity: *identity,
                    node: node.clone(),
                    tunnel_endpoint: self.tunnel_endpoint(),
                    encap_key: 0,
                };
                let json = serde_json::to_vec(&value).unwrap_or_default();
                ops.push(Op::put_with_lease(keys::ipcache(*ip), json, conn.lease));
            }
        }
        for ip in current.keys() {
            if !ipcache.desired.contains_key(ip) {
                ops.push(Op::delete(keys::ipcache(*ip)));
            }
        }
        ipcache.published = None;
        // etcd refuses transactions of more than 128 ops by default.
        for chunk in ops.chunks(100) {
            conn.kv.txn(&[], chunk)?;
        }
        ipcache.published = Some(ipcache.desired.clone());
        Ok(())
    }
}
