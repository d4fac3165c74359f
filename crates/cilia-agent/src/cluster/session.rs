//! The client's thread: connect (with backoff), hold the node lease, put
//! what this node owns, follow the cluster, and start over on any failure.
//! One thread does all of it, in one loop that never waits longer than
//! [`POLL`] between two looks at the watches, so every duty (keep-alive,
//! heartbeat, ipcache, releases, GC) has a bounded delay.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cilia_kvstore::{EventKind, KvError, KvStore, LeaseId, Op, Watch, WatchEvent};

use super::identity::{self, ClaimError};
use super::{keys, lock, unix_ms, ClusterEvent, ClusterNode, Conn, Inner, IpcacheValue, RemoteIp};
use crate::store::StoredPolicy;

pub(super) const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The longest the loop waits for a watch event before it looks at its
/// other duties.
const POLL: Duration = Duration::from_millis(50);

type Connect = Box<dyn Fn() -> Result<Box<dyn KvStore>, KvError> + Send>;

pub(super) fn run(inner: Arc<Inner>, connect: Connect) {
    let mut backoff = MIN_BACKOFF;
    let mut lease: Option<LeaseId> = None;
    let mut gc = identity::Gc::default();
    while !inner.stopping() {
        let kv: Arc<dyn KvStore> = match connect() {
            Ok(kv) => Arc::from(kv),
            Err(e) => {
                lock(&inner.health).last_error = Some(e.to_string());
                tracing::debug!(error = %e, "kvstore not reachable; retrying in {backoff:?}");
                inner.sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let mut session = Session {
            inner: &inner,
            kv,
            lease: 0,
            reached: false,
        };
        let result = session.run(&mut lease, &mut gc);
        if session.reached {
            backoff = MIN_BACKOFF;
        }
        match result {
            Ok(()) => break,
            Err(e) => {
                let reason = e.to_string();
                *lock(&inner.conn) = None;
                let was = {
                    let mut health = lock(&inner.health);
                    let was = health.connected;
                    health.connected = false;
                    health.last_error = Some(reason.clone());
                    if was {
                        health.since_ms = unix_ms();
                    }
                    was
                };
                if was {
                    tracing::warn!(error = %reason, "kvstore connection lost; the agent keeps its state");
                    inner.emit(ClusterEvent::Disconnected { reason });
                }
                inner.sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

struct Session<'a> {
    inner: &'a Inner,
    kv: Arc<dyn KvStore>,
    lease: LeaseId,
    /// Registered and announced `Connected`.
    reached: bool,
}

/// The prefix a session lists and watches: one watch of all of `cilia/`
/// (keys outside the nodes, ipcache and policies are skipped) delivers every
/// change in revision order, so a lease's expiry reaches the agent as the
/// node's ipcache deletes before its node delete, and a listing at one
/// revision is followed without gap or overlap.
const CLUSTER: &str = "cilia/";

impl Session<'_> {
    fn conn(&self) -> Conn {
        Conn {
            kv: self.kv.clone(),
            lease: self.lease,
        }
    }

    fn run(&mut self, lease: &mut Option<LeaseId>, gc: &mut identity::Gc) -> Result<(), KvError> {
        let config = &self.inner.config;
        // The lease of the previous session is kept if it still lives.
        self.lease = match *lease {
            Some(l) if self.kv.lease_keepalive(l).is_ok() => l,
            _ => self.kv.lease_grant(config.lease_ttl)?,
        };
        *lease = Some(self.lease);
        self.publish_all()?;
        *lock(&self.inner.conn) = Some(self.conn());
        {
            let mut health = lock(&self.inner.health);
            health.connected = true;
            health.since_ms = unix_ms();
        }
        self.reached = true;
        tracing::info!(node = %config.node_name, lease = self.lease, "joined the cluster");
        self.inner.emit(ClusterEvent::Connected);
        let mut watch = self.sync()?;

        let keepalive_every = (config.lease_ttl / 3).max(Duration::from_millis(300));
        let mut next_keepalive = Instant::now() + keepalive_every;
        let mut next_heartbeat = Instant::now() + config.heartbeat;
        let mut next_gc = Instant::now() + config.identity_gc_interval;
        loop {
            if self.inner.stopping() {
                return Ok(());
            }
            if !self.drain(&watch, POLL) {
                tracing::info!("cluster watch closed; listing again");
                watch = self.sync()?;
            }
            let now = Instant::now();
            if now >= next_keepalive {
                next_keepalive = now + keepalive_every;
                match self.kv.lease_keepalive(self.lease) {
                    Ok(_) => {}
                    Err(KvError::NoLease(_)) => {
                        self.renew_lease()?;
                        *lease = Some(self.lease);
                    }
                    Err(e) => return Err(e),
                }
            }
            if now >= next_heartbeat {
                next_heartbeat = now + config.heartbeat;
                match self.put_node() {
                    Ok(()) => {}
                    Err(KvError::LeaseNotFound { .. }) => {
                        self.renew_lease()?;
                        *lease = Some(self.lease);
                    }
                    Err(e) => return Err(e),
                }
            }
            {
                let mut ipcache = lock(&self.inner.ipcache);
                if ipcache.published.as_ref() != Some(&ipcache.desired) {
                    self.inner
                        .reconcile_ipcache(&self.conn(), &mut ipcache, false)?;
                }
            }
            self.releases()?;
            if now >= next_gc {
                next_gc = now + config.identity_gc_interval;
                gc.round(&*self.kv, config.identity_gc_grace, now)?;
            }
        }
    }

    /// A new lease (the old one expired or was revoked), and everything this
    /// node owns put again under it.
    fn renew_lease(&mut self) -> Result<(), KvError> {
        tracing::warn!(lease = self.lease, "node lease lost; registering again");
        self.lease = self.kv.lease_grant(self.inner.config.lease_ttl)?;
        self.publish_all()?;
        *lock(&self.inner.conn) = Some(self.conn());
        Ok(())
    }

    fn put_node(&self) -> Result<(), KvError> {
        let json = serde_json::to_vec(&self.inner.own_record()).unwrap_or_default();
        self.kv.txn(
            &[],
            &[Op::put_with_lease(
                keys::node(&self.inner.config.node_name),
                json,
                self.lease,
            )],
        )?;
        Ok(())
    }

    /// Puts everything this node owns under the current lease: its record,
    /// its identity refs, its ipcache entries; drops pending releases.
    fn publish_all(&self) -> Result<(), KvError> {
        self.put_node()?;
        let refs = lock(&self.inner.owned).refs.clone();
        for (id, json) in refs {
            match identity::adopt(
                &*self.kv,
                self.lease,
                &self.inner.config.node_name,
                id,
                &json,
            ) {
                Ok(()) => {}
                Err(ClaimError::Kv(e)) => return Err(e),
                Err(e) => {
                    let msg = format!("identity {id}: {e}");
                    tracing::error!(identity = id, error = %e, "the cluster disagrees with a local identity");
                    lock(&self.inner.health).last_error = Some(msg);
                }
            }
        }
        self.releases()?;
        let mut ipcache = lock(&self.inner.ipcache);
        self.inner
            .reconcile_ipcache(&self.conn(), &mut ipcache, true)
    }

    fn releases(&self) -> Result<(), KvError> {
        let pending: Vec<u32> = lock(&self.inner.owned).releases.iter().copied().collect();
        for id in pending {
            identity::release(&*self.kv, &self.inner.config.node_name, id)?;
            lock(&self.inner.owned).releases.remove(&id);
        }
        Ok(())
    }

    /// Lists nodes, ipcache and policies, emits the difference to what was
    /// emitted before and `Synced`, and watches from the listings on.
    fn sync(&self) -> Result<Watch, KvError> {
        let own = self.inner.config.node_name.as_str();
        // A listing whose revision is compacted before the watch starts
        // (etcd compacting right then) is listed again.
        let mut attempt = 0;
        let (listing, watch) = loop {
            let listing = self.kv.list_prefix(CLUSTER)?;
            match self.kv.watch(CLUSTER, listing.revision + 1) {
                Ok(w) => break (listing, w),
                Err(KvError::Compacted { .. }) if attempt < 3 => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        let under = |prefix: &'static str| {
            listing
                .kvs
                .iter()
                .filter(move |kv| kv.key.starts_with(prefix))
        };
        let nodes: BTreeMap<String, ClusterNode> = under(keys::NODES)
            .filter_map(|kv| decode_node(&kv.key, &kv.value))
            .map(|n| (n.name.clone(), n))
            .collect();
        let ipcache: BTreeMap<IpAddr, RemoteIp> = under(keys::IPCACHE)
            .filter_map(|kv| decode_ip(&kv.key, &kv.value))
            .map(|r| (r.ip, r))
            .collect();
        let policies: BTreeMap<String, StoredPolicy> = under(keys::POLICIES)
            .filter_map(|kv| decode_policy(&kv.key, &kv.value))
            .map(|p| (p.key(), p))
            .collect();
        let identities: BTreeMap<u32, BTreeMap<String, String>> = under(keys::IDENTITY_IDS)
            .filter_map(|kv| decode_identity(&kv.key, &kv.value))
            .collect();
        let events = lock(&self.inner.view).replace(own, nodes, ipcache, policies, identities);
        for ev in events {
            self.inner.emit(ev);
        }
        self.inner.emit(ClusterEvent::Synced);
        Ok(watch)
    }

    /// Applies the events delivered within `timeout`; `false` when the
    /// watch closed.
    fn drain(&self, watch: &Watch, timeout: Duration) -> bool {
        let mut wait = timeout;
        loop {
            match watch.wait(wait) {
                Ok(Some(ev)) => self.apply(ev),
                Ok(None) => return true,
                Err(_) => return false,
            }
            wait = Duration::ZERO;
        }
    }

    fn apply(&self, ev: WatchEvent) {
        let own = self.inner.config.node_name.as_str();
        let key = ev.kv.key.as_str();
        let mut view = lock(&self.inner.view);
        let out = if let Some(name) = key.strip_prefix(keys::NODES) {
            match ev.kind {
                EventKind::Put => {
                    decode_node(key, &ev.kv.value).and_then(|n| view.node_put(own, n))
                }
                EventKind::Delete => view.node_delete(own, name),
            }
        } else if let Some(ip) = key.strip_prefix(keys::IPCACHE) {
            match ev.kind {
                EventKind::Put => decode_ip(key, &ev.kv.value).and_then(|r| view.ip_put(own, r)),
                EventKind::Delete => ip.parse().ok().and_then(|ip| view.ip_delete(ip)),
            }
        } else if key.starts_with(keys::IDENTITY_IDS) {
            match ev.kind {
                EventKind::Put => decode_identity(key, &ev.kv.value)
                    .and_then(|(id, labels)| view.identity_put(id, labels)),
                EventKind::Delete => {
                    keys::id_of_id_key(key).and_then(|id| view.identity_delete(id))
                }
            }
        } else if let Some(pkey) = key.strip_prefix(keys::POLICIES) {
            match ev.kind {
                EventKind::Put => decode_policy(key, &ev.kv.value).and_then(|p| view.policy_put(p)),
                EventKind::Delete => view.policy_delete(pkey),
            }
        } else {
            None
        };
        drop(view);
        if let Some(ev) = out {
            self.inner.emit(ev);
        }
    }
}

fn decode_node(key: &str, value: &[u8]) -> Option<ClusterNode> {
    match serde_json::from_slice::<ClusterNode>(value) {
        Ok(n) if key.strip_prefix(keys::NODES) == Some(n.name.as_str()) => Some(n),
        Ok(n) => {
            tracing::warn!(key, name = %n.name, "node record under another node's key: ignored");
            None
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "corrupt node record: ignored");
            None
        }
    }
}

fn decode_ip(key: &str, value: &[u8]) -> Option<RemoteIp> {
    let ip = key.strip_prefix(keys::IPCACHE)?.parse().ok();
    match (ip, serde_json::from_slice::<IpcacheValue>(value)) {
        (Some(ip), Ok(v)) => Some(RemoteIp {
            ip,
            identity: v.identity,
            node: v.node,
            tunnel_endpoint: v.tunnel_endpoint,
            encap_key: v.encap_key,
        }),
        _ => {
            tracing::warn!(key, "corrupt ipcache entry: ignored");
            None
        }
    }
}

fn decode_identity(key: &str, value: &[u8]) -> Option<(u32, BTreeMap<String, String>)> {
    let id = keys::id_of_id_key(key)?;
    match serde_json::from_slice(value) {
        Ok(labels) => Some((id, labels)),
        Err(e) => {
            tracing::warn!(key, error = %e, "corrupt identity record: ignored");
            None
        }
    }
}

fn decode_policy(key: &str, value: &[u8]) -> Option<StoredPolicy> {
    match serde_json::from_slice::<StoredPolicy>(value) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(key, error = %e, "corrupt cluster policy: ignored");
            None
        }
    }
}
