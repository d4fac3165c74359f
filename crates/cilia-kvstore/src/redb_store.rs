//! The embedded backend: one redb file (single node, zero setup).
//!
//! * Keys and their records live in table `kv`; the revision and the start
//!   of the kept history in `kv_meta`; the events of the last
//!   revisions in `kv_log`, keyed by (revision, index), so a watch can
//!   replay them: at most [`History::revisions`] revisions and about
//!   [`History::bytes`] bytes (the oldest go first; the last transaction's
//!   are always kept). Each transaction is one redb write
//!   transaction with durable commit: keys, log and revision change
//!   together or not at all.
//! * Writers (transactions, lease changes, watch registration) are
//!   serialized by one mutex, so a watch registered at revision R gets every
//!   event after R exactly once: its replay and the live events are taken
//!   under the same lock that commits hold. Readers take redb snapshots and
//!   never wait for writers.
//! * Leases are kept in memory: on one node a lease outlives nothing but the
//!   process that granted it. Opening the store deletes the keys that
//!   previous processes attached to leases, as if their leases had expired
//!   (with delete events at the opening's revision). Expiry is checked by a
//!   thread started with the first lease, every [`LEASE_TICK`], and ended
//!   when the store is dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition};

use crate::{
    check_ops, check_ttl, excerpt, Compare, EventKind, KeyValue, KvError, KvStore, LeaseId,
    Listing, Op, Revision, TxnResult, Watch, WatchEvent,
};

/// Key -> encoded record (revisions, lease, value).
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// (revision, index in its transaction) -> encoded event.
const LOG: TableDefinition<(i64, u32), &[u8]> = TableDefinition::new("kv_log");
/// `revision`, `compacted` (the last revision no longer in the log).
const META: TableDefinition<&str, i64> = TableDefinition::new("kv_meta");

/// How much of the past a store keeps for watches to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// At most this many revisions.
    pub revisions: i64,
    /// At most about this many bytes of events (a large value put many
    /// times must not grow the file without bound).
    pub bytes: i64,
}

impl Default for History {
    fn default() -> Self {
        Self {
            revisions: 10_000,
            bytes: 64 << 20,
        }
    }
}
/// How often leases are checked for expiry.
pub const LEASE_TICK: Duration = Duration::from_millis(100);

/// Byte length of a record's header: create, mod revision, version, lease.
const HEADER: usize = 32;

fn backend(e: impl std::fmt::Display) -> KvError {
    KvError::Backend(e.to_string())
}

fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + kv.value.len());
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&kv.value);
    out
}

fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyValue, KvError> {
    if bytes.len() < HEADER {
        return Err(KvError::Corrupt {
            key: excerpt(key),
            reason: format!("record of {} bytes, shorter than its header", bytes.len()),
        });
    }
    let n = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        i64::from_le_bytes(b)
    };
    Ok(KeyValue {
        key: key.to_string(),
        value: bytes[HEADER..].to_vec(),
        create_revision: n(0),
        mod_revision: n(1),
        version: n(2),
        lease: n(3),
    })
}

/// An event in the log: kind, key length, key, record.
fn encode_event(ev: &WatchEvent) -> Vec<u8> {
    let key = ev.kv.key.as_bytes();
    let mut out = Vec::with_capacity(5 + key.len() + HEADER + ev.kv.value.len());
    out.push(match ev.kind {
        EventKind::Put => 0,
        EventKind::Delete => 1,
    });
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&encode_record(&ev.kv));
    out
}

fn decode_event(rev: Revision, bytes: &[u8]) -> Result<WatchEvent, KvError> {
    let corrupt = |reason: &str| KvError::Corrupt {
        key: format!("<event log at revision {rev}>"),
        reason: reason.to_string(),
    };
    let kind = match bytes.first() {
        Some(0) => EventKind::Put,
        Some(1) => EventKind::Delete,
        _ => return Err(corrupt("unknown event kind")),
    };
    let len_bytes: [u8; 4] = bytes
        .get(1..5)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("truncated"))?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let key = bytes
        .get(5..5 + len)
        .and_then(|k| std::str::from_utf8(k).ok())
        .ok_or_else(|| corrupt("key truncated or not UTF-8"))?;
    let kv = decode_record(key, &bytes[5 + len..])?;
    Ok(WatchEvent { kind, kv })
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    /// Events before this revision are not wanted.
    from: Revision,
    events: mpsc::Sender<WatchEvent>,
}

#[derive(Default)]
struct State {
    watchers: Vec<Watcher>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// The lease expiry thread, once a lease was granted.
    reaper: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    db: Database,
    history: History,
    /// Serializes every writer (see the module doc).
    state: Mutex<State>,
    /// Tells the lease expiry thread to end.
    closing: AtomicBool,
}

/// The embedded [`KvStore`]: a redb file. One process opens a file at a
/// time (a second open fails).
pub struct RedbStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbStore")
    }
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, KvError> {
        let db = Database::create(path).map_err(|e| KvError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_database(db, History::default())
    }

    /// The store in an open redb database (its tables are `kv`, `kv_log`
    /// and `kv_meta`; others are left alone), keeping `history` of events
    /// for watches.
    pub fn from_database(db: Database, history: History) -> Result<Self, KvError> {
        let w = db.begin_write().map_err(backend)?;
        w.open_table(KV).map_err(backend)?;
        w.open_table(LOG).map_err(backend)?;
        w.open_table(META).map_err(backend)?;
        w.commit().map_err(backend)?;
        let store = Self {
            inner: Arc::new(Inner {
                db,
                history: History {
                    revisions: history.revisions.max(1),
                    bytes: history.bytes.max(0),
                },
                state: Mutex::new(State {
                    next_lease: 1,
                    ..State::default()
                }),
                closing: AtomicBool::new(false),
            }),
        };
        store.inner.drop_orphaned_lease_keys()?;
        Ok(store)
    }

    /// The redb database, for its owner's tables outside the key space
    /// (e.g. dropping the tables of a layout it migrated from). Never write
    /// the store's own tables through it.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    fn start_reaper(&self, state: &mut State) {
        if state.reaper.is_some() {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("kvstore-leases".into())
            .spawn(move || loop {
                std::thread::park_timeout(LEASE_TICK);
                let Some(inner) = weak.upgrade() else { break };
                if inner.closing.load(Ordering::Acquire) {
                    break;
                }
                // A failed expiry is retried at the next tick.
                let _ = inner.expire_leases(Instant::now());
            });
        // Without the thread leases still expire: every lease call checks.
        state.reaper = spawned.ok();
    }
}

impl Drop for RedbStore {
    /// Ends the lease expiry thread before the database closes, so the file
    /// can be opened again as soon as the store is dropped.
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::Release);
        let reaper = self.inner.lock().reaper.take();
        if let Some(reaper) = reaper {
            reaper.thread().unpark();
            // A panicked thread has nothing left to clean up.
            let _ = reaper.join();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state behind a poisoned lock is still consistent: the store
        // changes only in committed transactions.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_meta(&self, name: &str) -> Result<i64, KvError> {
        let r = self.db.begin_read().map_err(backend)?;
        let meta = r.open_table(META).map_err(backend)?;
        Ok(meta
            .get(name)
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    fn drop_orphaned_lease_keys(&self) -> Result<(), KvError> {
        let mut state = self.lock();
        let r = self.db.begin_read().map_err(backend)?;
        let kv = r.open_table(KV).map_err(backend)?;
        let mut ops = Vec::new();
        for item in kv.iter().map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            if decode_record(k.value(), v.value())?.lease != 0 {
                ops.push(Op::delete(k.value()));
            }
        }
        drop(kv);
        drop(r);
        self.apply(&mut state, &[], &ops)?;
        Ok(())
    }

    /// Deletes the keys of leases whose deadline is before `now`.
    fn expire_leases(&self, now: Instant) -> Result<(), KvError> {
        let mut state = self.lock();
        let due: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.end_lease(&mut state, id)?;
        }
        Ok(())
    }

    fn end_lease(&self, state: &mut State, id: LeaseId) -> Result<(), KvError> {
        let Some(lease) = state.leases.remove(&id) else {
            return Err(KvError::NoLease(id));
        };
        let ops: Vec<Op> = lease.keys.iter().map(Op::delete).collect();
        self.apply(state, &[], &ops)?;
        Ok(())
    }

    /// One transaction; the caller holds the state lock.
    fn apply(
        &self,
        state: &mut State,
        compares: &[Compare],
        ops: &[Op],
    ) -> Result<TxnResult, KvError> {
        check_ops(ops)?;
        for op in ops {
            if let Op::Put { key, lease, .. } = op {
                if *lease != 0 && !state.leases.contains_key(lease) {
                    return Err(KvError::LeaseNotFound {
                        key: excerpt(key),
                        lease: *lease,
                    });
                }
            }
        }
        let w = self.db.begin_write().map_err(backend)?;
        let mut events = Vec::new();
        // (key, lease it leaves, lease it joins)
        let mut lease_moves = Vec::new();
        let revision;
        {
            let mut kv = w.open_table(KV).map_err(backend)?;
            let mut meta = w.open_table(META).map_err(backend)?;
            let current = meta
                .get("revision")
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0);
            let mut old = BTreeMap::new();
            for key in compares
                .iter()
                .map(|c| match c {
                    Compare::ModRevision { key, .. } | Compare::Exists { key } => key.as_str(),
                })
                .chain(ops.iter().map(Op::key))
            {
                if !old.contains_key(key) {
                    let rec = match kv.get(key).map_err(backend)? {
                        Some(v) => Some(decode_record(key, v.value())?),
                        None => None,
                    };
                    old.insert(key.to_string(), rec);
                }
            }
            let holds = compares.iter().all(|c| match c {
                Compare::ModRevision { key, revision } => {
                    old[key].as_ref().map_or(0, |r| r.mod_revision) == *revision
                }
                Compare::Exists { key } => old[key].is_some(),
            });
            if !holds {
                return Ok(TxnResult {
                    succeeded: false,
                    revision: current,
                });
            }
            revision = current + 1;
            for op in ops {
                let prev = &old[op.key()];
                match op {
                    Op::Put { key, value, lease } => {
                        let rec = KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                            mod_revision: revision,
                            version: prev.as_ref().map_or(0, |p| p.version) + 1,
                            lease: *lease,
                        };
                        kv.insert(key.as_str(), encode_record(&rec).as_slice())
                            .map_err(backend)?;
                        lease_moves.push((
                            key.clone(),
                            prev.as_ref().map_or(0, |p| p.lease),
                            *lease,
                        ));
                        events.push(WatchEvent {
                            kind: EventKind::Put,
                            kv: rec,
                        });
                    }
                    Op::Delete { key } => {
                        let Some(prev) = prev else { continue };
                        kv.remove(key.as_str()).map_err(backend)?;
                        lease_moves.push((key.clone(), prev.lease, 0));
                        events.push(WatchEvent {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key: key.clone(),
                                value: Vec::new(),
                                create_revision: 0,
                                mod_revision: revision,
                                version: 0,
                                lease: 0,
                            },
                        });
                    }
                }
            }
            if events.is_empty() {
                // Nothing changed (deletes of absent keys): no revision.
                return Ok(TxnResult {
                    succeeded: true,
                    revision: current,
                });
            }
            let mut log = w.open_table(LOG).map_err(backend)?;
            let get = |meta: &redb::Table<&str, i64>, name: &str| -> Result<i64, KvError> {
                Ok(meta
                    .get(name)
                    .map_err(backend)?
                    .map(|v| v.value())
                    .unwrap_or(0))
            };
            let mut log_bytes = get(&meta, "log_bytes")?;
            for (i, ev) in events.iter().enumerate() {
                let bytes = encode_event(ev);
                log_bytes += bytes.len() as i64;
                log.insert((revision, i as u32), bytes.as_slice())
                    .map_err(backend)?;
            }
            meta.insert("revision", revision).map_err(backend)?;
            // Forget the oldest events while the log is too long or too big.
            let mut compacted = get(&meta, "compacted")?;
            let keep_from = revision - self.history.revisions + 1;
            loop {
                let Some((k, len)) = log
                    .first()
                    .map_err(backend)?
                    .map(|(k, v)| (k.value(), v.value().len()))
                else {
                    break;
                };
                if k.0 >= revision || (k.0 >= keep_from && log_bytes <= self.history.bytes) {
                    break;
                }
                log.remove(k).map_err(backend)?;
                log_bytes -= len as i64;
                compacted = compacted.max(k.0);
            }
            meta.insert("compacted", compacted).map_err(backend)?;
            meta.insert("log_bytes", log_bytes).map_err(backend)?;
        }
        w.commit().map_err(backend)?;
        for (key, left, joined) in lease_moves {
            if left != 0 {
                if let Some(l) = state.leases.get_mut(&left) {
                    l.keys.remove(&key);
                }
            }
            if joined != 0 {
                if let Some(l) = state.leases.get_mut(&joined) {
                    l.keys.insert(key);
                }
            }
        }
        state.watchers.retain(|w| {
            events
                .iter()
                .filter(|ev| ev.kv.mod_revision >= w.from && ev.kv.key.starts_with(&w.prefix))
                .all(|ev| w.events.send(ev.clone()).is_ok())
        });
        Ok(TxnResult {
            succeeded: true,
            revision,
        })
    }
}

impl KvStore for RedbStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        let r = self.inner.db.begin_read().map_err(backend)?;
        let kv = r.open_table(KV).map_err(backend)?;
        match kv.get(key).map_err(backend)? {
            Some(v) => Ok(Some(decode_record(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn list_prefix(&self, prefix: &str) -> Result<Listing, KvError> {
        let r = self.inner.db.begin_read().map_err(backend)?;
        let meta = r.open_table(META).map_err(backend)?;
        let revision = meta
            .get("revision")
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(0);
        let kv = r.open_table(KV).map_err(backend)?;
        let mut kvs = Vec::new();
        for item in kv.range::<&str>(prefix..).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            kvs.push(decode_record(k.value(), v.value())?);
        }
        Ok(Listing { revision, kvs })
    }

    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<TxnResult, KvError> {
        let mut state = self.inner.lock();
        self.inner.apply(&mut state, compares, ops)
    }

    fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Watch, KvError> {
        let mut state = self.inner.lock();
        let (tx, rx) = mpsc::channel();
        let r = self.inner.db.begin_read().map_err(backend)?;
        let meta = r.open_table(META).map_err(backend)?;
        let get = |name: &str| -> Result<i64, KvError> {
            Ok(meta
                .get(name)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0))
        };
        let (current, compacted) = (get("revision")?, get("compacted")?);
        if from_revision > 0 && from_revision <= current {
            if from_revision <= compacted {
                return Err(KvError::Compacted {
                    prefix: excerpt(prefix),
                    requested: from_revision,
                    first: compacted + 1,
                });
            }
            let log = r.open_table(LOG).map_err(backend)?;
            for item in log.range((from_revision, 0)..).map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                let ev = decode_event(k.value().0, v.value())?;
                if ev.kv.key.starts_with(prefix) {
                    // The receiver is in hand: sending cannot fail.
                    let _ = tx.send(ev);
                }
            }
        }
        state.watchers.push(Watcher {
            prefix: prefix.to_string(),
            from: from_revision,
            events: tx,
        });
        Ok(Watch::new(rx))
    }

    fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        check_ttl(ttl)?;
        self.inner.expire_leases(Instant::now())?;
        let mut state = self.inner.lock();
        let id = state.next_lease;
        state.next_lease += 1;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        self.start_reaper(&mut state);
        Ok(id)
    }

    fn lease_keepalive(&self, lease: LeaseId) -> Result<Duration, KvError> {
        self.inner.expire_leases(Instant::now())?;
        let mut state = self.inner.lock();
        let l = state
            .leases
            .get_mut(&lease)
            .ok_or(KvError::NoLease(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    fn lease_revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        let mut state = self.inner.lock();
        self.inner.end_lease(&mut state, lease)
    }

    fn revision(&self) -> Result<Revision, KvError> {
        self.inner.read_meta("revision")
    }
}

#[cfg(test)]
mod tests;
