//! The key/value store the agent keeps its state in: a small trait,
//! [`KvStore`], shaped after etcd's v3 model so that an etcd backend can
//! implement it as is, and two backends: [`RedbStore`], an embedded redb
//! file (single node, zero setup), and [`EtcdStore`], an etcd v3 cluster
//! (revisions, watches and leases are etcd's own).
//!
//! The model, and the invariants every backend keeps:
//! * One global **revision** counts the store's changes. Every transaction
//!   that writes something takes the next revision; all its puts and deletes
//!   carry it as their `mod_revision` (etcd's semantics: a key that does not
//!   exist has `mod_revision` 0).
//! * A **transaction** ([`KvStore::txn`]) checks all its [`Compare`]s and,
//!   if every one holds, applies all its [`Op`]s at one revision; if one
//!   fails, nothing is applied. It is atomic and durable: after a crash the
//!   store holds either the whole transaction or none of it. Compare-and-swap
//!   is a transaction comparing a key's `mod_revision`.
//! * A **watch** ([`KvStore::watch`]) of a prefix from a revision first
//!   replays every event at or after that revision still in the history,
//!   then follows live ones, in revision order, without gap or duplicate.
//!   A revision older than the kept history is an error
//!   ([`KvError::Compacted`]), as in etcd.
//! * A **lease** has a time to live; keys put with it are deleted (with
//!   delete events) when it expires or is revoked; a keep-alive restarts its
//!   time to live.

use std::sync::mpsc;
use std::time::Duration;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod etcd_store;
mod redb_store;

pub use etcd_store::{EtcdStore, REQUEST_TIMEOUT};
pub use redb_store::{History, RedbStore, LEASE_TICK};

/// A store revision (etcd's `int64` revision; 0 is "before anything").
pub type Revision = i64;

/// A lease id (never 0: 0 means "no lease", as in etcd).
pub type LeaseId = i64;

/// A key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the put that created the key (since its last delete).
    pub create_revision: Revision,
    /// Revision of the last change of the key.
    pub mod_revision: Revision,
    /// Number of puts since the key was created (1 after the first).
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: LeaseId,
}

/// The keys under a prefix, read at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The store's revision the keys were read at.
    pub revision: Revision,
    /// In key order.
    pub kvs: Vec<KeyValue>,
}

/// A condition a transaction checks before it applies anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` is exactly this (0: the key does not exist).
    ModRevision { key: String, revision: Revision },
    /// The key exists.
    Exists { key: String },
}

impl Compare {
    /// The key was last changed at `revision` (0: it does not exist).
    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Self {
        Compare::ModRevision {
            key: key.into(),
            revision,
        }
    }

    /// The key does not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Self::mod_revision(key, 0)
    }

    /// The key exists.
    pub fn exists(key: impl Into<String>) -> Self {
        Compare::Exists { key: key.into() }
    }
}

/// A change a transaction applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates or replaces the key; attaches it to `lease` (0: none).
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    /// Deletes the key if it exists.
    Delete { key: String },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    pub fn put_with_lease(
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Every compare held and the ops were applied.
    pub succeeded: bool,
    /// The store's revision after the transaction (the transaction's own
    /// when it wrote something).
    pub revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of one key, as a watch reports it. For a delete, `kv` holds
/// the key, an empty value and the deleting revision as `mod_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// The events of one watch, in revision order. Dropping it cancels the
/// watch.
#[derive(Debug)]
pub struct Watch {
    events: mpsc::Receiver<WatchEvent>,
    /// Dropped with the watch: tells a backend's feeding task to stop.
    _cancel: Option<Box<dyn std::any::Any + Send>>,
}

impl Watch {
    pub(crate) fn new(events: mpsc::Receiver<WatchEvent>) -> Self {
        Self {
            events,
            _cancel: None,
        }
    }

    /// A watch whose feeder stops when `cancel` is dropped (with the watch).
    pub(crate) fn with_cancel(
        events: mpsc::Receiver<WatchEvent>,
        cancel: Box<dyn std::any::Any + Send>,
    ) -> Self {
        Self {
            events,
            _cancel: Some(cancel),
        }
    }

    /// The next event, waiting at most `timeout`; `None` on timeout or when
    /// the store is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<WatchEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// The events already delivered, without waiting.
    pub fn try_iter(&self) -> impl Iterator<Item = WatchEvent> + '_ {
        self.events.try_iter()
    }

    /// The next event, waiting at most `timeout` (zero: only what is
    /// already delivered). Unlike [`Self::recv_timeout`] it tells an idle
    /// watch (`Ok(None)`) from one that ended ([`WatchClosed`]): the stream
    /// to etcd broke, etcd cancelled the watch (e.g. compacted), or the
    /// store is gone. A closed watch never delivers again; its owner lists
    /// and watches anew.
    pub fn wait(&self, timeout: Duration) -> Result<Option<WatchEvent>, WatchClosed> {
        let got = if timeout.is_zero() {
            self.events.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => None,
                mpsc::TryRecvError::Disconnected => Some(WatchClosed),
            })
        } else {
            self.events.recv_timeout(timeout).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => None,
                mpsc::RecvTimeoutError::Disconnected => Some(WatchClosed),
            })
        };
        match got {
            Ok(ev) => Ok(Some(ev)),
            Err(None) => Ok(None),
            Err(Some(closed)) => Err(closed),
        }
    }
}

/// A watch ended: no further event will come (see [`Watch::wait`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("kvstore watch closed")]
pub struct WatchClosed;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("kvstore {path}: cannot open: {reason}")]
    Open { path: String, reason: String },
    #[error("kvstore: {0}")]
    Backend(String),
    #[error("kvstore etcd {endpoints}: unreachable: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("kvstore key {key:?}: corrupt record: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("kvstore key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("kvstore key {key:?}: lease {lease} does not exist (expired or revoked)")]
    LeaseNotFound { key: String, lease: LeaseId },
    #[error("kvstore lease {0}: does not exist (expired or revoked)")]
    NoLease(LeaseId),
    #[error("kvstore lease: time to live {0:?} is not a positive number of seconds")]
    InvalidTtl(Duration),
    #[error(
        "kvstore watch of {prefix:?} from revision {requested}: history before revision {first} is compacted"
    )]
    Compacted {
        prefix: String,
        requested: Revision,
        first: Revision,
    },
}

/// At most 64 characters of a key, for error messages.
pub(crate) fn excerpt(key: &str) -> String {
    match key.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &key[..i]),
        None => key.to_string(),
    }
}

/// The checks of a transaction's ops every backend makes before it touches
/// its storage: no empty key, no key twice in one transaction.
pub(crate) fn check_ops(ops: &[Op]) -> Result<(), KvError> {
    let mut seen = std::collections::BTreeSet::new();
    for op in ops {
        if op.key().is_empty() {
            return Err(KvError::InvalidKey {
                key: String::new(),
                reason: "is empty",
            });
        }
        if !seen.insert(op.key()) {
            return Err(KvError::InvalidKey {
                key: excerpt(op.key()),
                reason: "appears twice in one transaction",
            });
        }
    }
    Ok(())
}

/// The check of a lease's time to live every backend makes: at least a
/// second (etcd's leases count whole seconds).
pub(crate) fn check_ttl(ttl: Duration) -> Result<(), KvError> {
    if ttl < Duration::from_secs(1) {
        return Err(KvError::InvalidTtl(ttl));
    }
    Ok(())
}

/// A key/value store with revisions, watches, leases and transactions.
///
/// Synchronous: the agent calls its state from blocking code. Every method
/// takes `&self`; implementations are shared between threads.
pub trait KvStore: Send + Sync {
    /// The key, if it exists.
    fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError>;

    /// Every key starting with `prefix`, in key order, read at one revision.
    fn list_prefix(&self, prefix: &str) -> Result<Listing, KvError>;

    /// Applies `ops` at one new revision if every compare holds, else
    /// nothing. A transaction without ops takes no revision.
    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<TxnResult, KvError>;

    /// Events of keys starting with `prefix`, from `from_revision` on (0:
    /// only changes after now).
    fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Watch, KvError>;

    /// A new lease that expires `ttl` from now unless kept alive.
    fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError>;

    /// Restarts the lease's time to live; returns it.
    fn lease_keepalive(&self, lease: LeaseId) -> Result<Duration, KvError>;

    /// Ends the lease now and deletes its keys.
    fn lease_revoke(&self, lease: LeaseId) -> Result<(), KvError>;

    /// The store's current revision.
    fn revision(&self) -> Result<Revision, KvError>;

    /// Puts one key (a transaction of one op).
    fn put(&self, key: &str, value: &[u8]) -> Result<Revision, KvError> {
        Ok(self.txn(&[], &[Op::put(key, value)])?.revision)
    }

    /// Deletes one key (a transaction of one op).
    fn delete(&self, key: &str) -> Result<Revision, KvError> {
        Ok(self.txn(&[], &[Op::delete(key)])?.revision)
    }
}

/// A shared store is a store: several users (e.g. agents of a test that
/// play nodes of one cluster) can hold one backend.
impl<T: KvStore + ?Sized> KvStore for std::sync::Arc<T> {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        (**self).get(key)
    }
    fn list_prefix(&self, prefix: &str) -> Result<Listing, KvError> {
        (**self).list_prefix(prefix)
    }
    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<TxnResult, KvError> {
        (**self).txn(compares, ops)
    }
    fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Watch, KvError> {
        (**self).watch(prefix, from_revision)
    }
    fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        (**self).lease_grant(ttl)
    }
    fn lease_keepalive(&self, lease: LeaseId) -> Result<Duration, KvError> {
        (**self).lease_keepalive(lease)
    }
    fn lease_revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        (**self).lease_revoke(lease)
    }
    fn revision(&self) -> Result<Revision, KvError> {
        (**self).revision()
    }
}
