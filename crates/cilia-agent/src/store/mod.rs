//! Agent state, kept in the key/value store ([`cilia_kvstore`]) in one
//! embedded redb file (`<state-dir>/state.redb`).
//!
//! Key layout (values are JSON unless said otherwise; numbers in keys are
//! zero-padded so that key order is numeric order):
//!
//! | key | value |
//! |---|---|
//! | `cilia/endpoints/<id:05>` | [`EndpointRecord`] |
//! | `cilia/ipam/allocated/<address>` | owning endpoint id |
//! | `cilia/ipam/high-water/<range>` | the highest address the pool ever handed out |
//! | `cilia/ipam/released/<address>` | release sequence number, once the pool wrapped (quarantine, see `ipam`) |
//! | `cilia/endpoint-ids/high-water` | the highest endpoint id ever handed out |
//! | `cilia/endpoint-ids/released/<id:05>` | release sequence number, once the ids wrapped |
//! | `cilia/identities/<id:010>` | labels of an endpoint identity |
//! | `cilia/namespaces/<name>` | the namespace's labels |
//! | `cilia/policies/<kind>/<namespace>/<name>` | [`StoredPolicy`] |
//! | `cilia/cidr-identities/<prefix>` | its local CIDR identity |
//! | `cilia/services/<id:05>` | [`cilia_lb::Service`] (see `services`) |
//! | `cilia/lb-backends/<address:port>` | the address's backend id |
//! | `cilia/meta/lb-backend-next` | where the next backend id search starts |
//! | `cilia/prefilter/<cidr>` | the XDP prefilter CIDR's counter slot (see `prefilter`) |
//! | `cilia/meta/policy-revision`, `cilia/meta/release-seq` | counters |
//! | `cilia/meta/layout` | `1`, this layout's version |
//! | `cilia/meta/last-change` | empty; its `mod_revision` is the last change's |
//!
//! Invariants:
//! * Every change is one kvstore transaction (durable commit), so a crash at
//!   any instant leaves either the old or the new state, never a torn
//!   record. Endpoint records and their IP allocations change in the same
//!   transaction, so no address can be allocated without its owner, or twice.
//! * A change reads, decides, then commits only if nothing changed since it
//!   read: its transaction compares the `mod_revision` of
//!   `cilia/meta/last-change` and rewrites it (writers are serialized, as the
//!   redb tables were). A lost race is an error, never a silent overwrite.
//! * A `state.redb` of the previous layout (one redb table per kind) is
//!   migrated on open, in one transaction, before anything reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use cilia_api::EndpointState;
use cilia_kvstore::{Compare, KvError, KvStore, Op, RedbStore, Revision};
use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ipam::{IpamError, Pool};

mod services;
pub use services::{ServiceChange, ServicesChange, StoredServices};

/// redb's page cache for the state file. Its default (1 GiB) keeps every
/// page ever read or written resident, so the agent's memory grew with the
/// file: each endpoint, and each revision of the watch history (up to
/// 10,000), stayed in the heap. The agent's reads are a few small records
/// per request; a miss costs a `pread` served by the kernel's page cache.
const CACHE_BYTES: usize = 2 << 20;

/// The kvstore's watch history for the agent's own state. Nothing watches
/// it (the cluster's state is another store, `cluster`), so only the last
/// revision's events are kept: the default (10,000 revisions, 64 MiB) kept
/// events nobody reads, 24.6 MB of `state.redb` after 5,000 endpoint
/// create/delete cycles, and every commit pruned the oldest of them.
const HISTORY: cilia_kvstore::History = cilia_kvstore::History {
    revisions: 1,
    bytes: 0,
};

const ENDPOINTS: &str = "cilia/endpoints/";
const IPAM: &str = "cilia/ipam/allocated/";
const RELEASED_IPS: &str = "cilia/ipam/released/";
const RELEASED_IDS: &str = "cilia/endpoint-ids/released/";
/// The highest endpoint id ever handed out: the next fresh one is above it,
/// found without listing the released ids. Until it reaches the last id,
/// releases are not recorded (see [`release_needs_record`]).
const HIGH_ID: &str = "cilia/endpoint-ids/high-water";
/// Per pool (`<prefix>`: its range), the highest address ever handed out:
/// the same for addresses. An IPv6 /64 never wraps, so without this rule it
/// would keep one record per delete ever made.
const HIGH_IP: &str = "cilia/ipam/high-water/";
const IDENTITIES: &str = "cilia/identities/";
const NAMESPACES: &str = "cilia/namespaces/";
const POLICIES: &str = "cilia/policies/";
const CIDR_IDENTITIES: &str = "cilia/cidr-identities/";
const POLICY_REVISION: &str = "cilia/meta/policy-revision";
const RELEASE_SEQ: &str = "cilia/meta/release-seq";
const LAYOUT: &str = "cilia/meta/layout";
const LAST_CHANGE: &str = "cilia/meta/last-change";
/// The version of the key layout this code reads and writes.
const LAYOUT_VERSION: &str = "1";

fn endpoint_key(id: u16) -> String {
    format!("{ENDPOINTS}{id:05}")
}

fn released_id_key(id: u16) -> String {
    format!("{RELEASED_IDS}{id:05}")
}

fn identity_key(id: u32) -> String {
    format!("{IDENTITIES}{id:010}")
}

fn policy_key(key: &str) -> String {
    format!("{POLICIES}{key}")
}

/// First identity given to endpoints (below: reserved).
pub const FIRST_ENDPOINT_IDENTITY: u32 = 256;
/// Last identity given to endpoints.
pub const LAST_ENDPOINT_IDENTITY: u32 = 65535;
/// The reserved identity of endpoints whose labels are not known yet.
pub const INIT_IDENTITY: u32 = 5;
/// First local CIDR identity.
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;
/// The label of the node's health endpoint (cluster mode): its identity is
/// the reserved `health`. Only the agent gives it (the API refuses
/// `reserved:` labels).
pub const HEALTH_LABEL: &str = "reserved:health";
/// The namespace of the health endpoint.
pub const HEALTH_NAMESPACE: &str = "cilia-health";
/// The reserved identity `health`.
pub const HEALTH_IDENTITY: u32 = 4;
/// The namespace of endpoints created without one.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Label carrying an endpoint's namespace (as in Kubernetes/Cilium).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of labels carrying the namespace's own labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// A policy as imported: its source text, re-parsed at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// The YAML document it came from.
    pub yaml: String,
    /// Where it came from: `None` for `cilia policy import` (local),
    /// `kubernetes` for an object of the API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl StoredPolicy {
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.kind,
            self.namespace.as_deref().unwrap_or(""),
            self.name
        )
    }
}

/// The labels that determine an endpoint's identity: its own, its
/// namespace, and its namespace's labels.
pub fn security_labels(
    labels: &BTreeMap<String, String>,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = labels.clone();
    out.insert(NAMESPACE_LABEL.into(), namespace.into());
    for (k, v) in namespace_labels {
        out.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
    }
    out
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.into()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("state database: {0}")]
    Db(String),
    #[error("state database: {0}")]
    Kv(#[from] KvError),
    #[error("state database: changed by another writer during this change; nothing was applied")]
    Conflict,
    #[error("state database holds a corrupt endpoint record {id}: {reason}")]
    Corrupt { id: u16, reason: String },
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("all 65535 endpoint ids are in use")]
    IdsExhausted,
    #[error(
        "all endpoint identities ({FIRST_ENDPOINT_IDENTITY}-{LAST_ENDPOINT_IDENTITY}) are in use"
    )]
    IdentitiesExhausted,
    /// The identity allocator (the cluster's) refused or failed.
    #[error("{0}")]
    Identity(String),
    /// Services would use more distinct backend addresses than the
    /// datapath's backends map holds.
    #[error("services would use {wanted} distinct backends; the backends map holds {max}")]
    LbBackendsFull { wanted: usize, max: usize },
}

/// Where identities of label sets new to this node come from when the node
/// is part of a cluster (the cluster client): without one, the store picks
/// the lowest free id itself. `release` is called once a committed change
/// no longer uses an id it had (and for ids allocated by a change that did
/// not commit).
pub trait IdentityAllocator: Send + Sync {
    fn allocate(&self, labels: &BTreeMap<String, String>) -> Result<u32, String>;
    fn release(&self, id: u32);
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What the agent persists about an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: u16,
    /// Absolute path of the network namespace.
    pub netns: String,
    pub ifname: String,
    pub host_ifname: String,
    pub ipv6: Ipv6Addr,
    pub ipv4: Option<Ipv4Addr>,
    pub labels: BTreeMap<String, String>,
    pub mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub state: EndpointState,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Security identity (derived from the security labels).
    #[serde(default)]
    pub identity: u32,
    /// Labels still to be learned from `label_source`; identity is `init`.
    #[serde(default)]
    pub label_source: Option<String>,
    /// Policy audit mode: would-be drops pass and are reported as AUDIT.
    #[serde(default)]
    pub policy_audit: bool,
    /// The CNI network the endpoint was attached through (`None`: made by
    /// the CLI or the API, or recorded before networks were kept).
    #[serde(default)]
    pub network: Option<String>,
    /// Port names the endpoint declares (checked, protocols upper case,
    /// sorted, each once); fixed for its life.
    #[serde(default)]
    pub named_ports: Vec<cilia_api::NamedPort>,
    /// The Kubernetes pod this endpoint is (CNI ADD's `K8S_POD_*`); with
    /// `label_source` `kubernetes`, its labels come from that pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod: Option<cilia_api::K8sPodRef>,
}

impl EndpointRecord {
    /// Whether this endpoint is an attachment of CNI network `network`, as
    /// CNI DEL and CHECK look it up. A runtime's endpoint recorded before
    /// the agent kept networks (container id, no network) matches every
    /// network, so DEL still removes it after an upgrade; CNI GC, which must
    /// never touch another network's attachments, leaves such records alone.
    pub fn attached_to(&self, network: &str) -> bool {
        match &self.network {
            Some(n) => n == network,
            None => self.container_id.is_some(),
        }
    }

    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips = vec![IpAddr::V6(self.ipv6)];
        ips.extend(self.ipv4.map(IpAddr::V4));
        ips
    }
}

/// The writes of one change, keyed so that a key is written at most once.
struct Change {
    /// `mod_revision` of [`LAST_CHANGE`] when the change began.
    base: Revision,
    writes: BTreeMap<String, Option<Vec<u8>>>,
    allocator: Option<Arc<dyn IdentityAllocator>>,
    /// Ids the allocator gave this change (released if it does not commit).
    allocated: Vec<u32>,
    /// Ids this change stops using (released once it commits).
    released: Vec<u32>,
}

impl Change {
    fn new(base: Revision, allocator: Option<Arc<dyn IdentityAllocator>>) -> Self {
        Self {
            base,
            writes: BTreeMap::new(),
            allocator,
            allocated: Vec::new(),
            released: Vec::new(),
        }
    }

    fn put(&mut self, key: String, value: &impl Serialize) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Db(format!("{key}: {e}")))?;
        self.writes.insert(key, Some(bytes));
        Ok(())
    }

    fn delete(&mut self, key: String) {
        self.writes.insert(key, None);
    }
}

pub struct Store {
    kv: Box<dyn KvStore>,
    /// Serializes this process's changes, so that the compare on
    /// [`LAST_CHANGE`] only ever fails against another process.
    writer: Mutex<()>,
    /// Set once when the node joins a cluster; a lock because it is set
    /// after the store is shared (read at every change, written once).
    allocator: RwLock<Option<Arc<dyn IdentityAllocator>>>,
    /// The stored services, decoded, as of a revision of the services
    /// (see `services.rs`): a service change costs O(its backends + log n)
    /// rather than decoding every service. A lock because service changes
    /// update it after their commit; readers only `try_lock` it.
    services_cache: Mutex<Option<services::ServicesCache>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Db(format!("{key}: {e}")))
}

/// Whether the release of `ip` is recorded. The order of releases matters
/// only once a pool holding the address has wrapped (its mark at its last
/// address): before, nothing released is handed out again. Without a mark
/// (a store of before the marks) nothing tells, so it is recorded.
fn release_needs_record(marks: &[(ipnet::IpNet, IpAddr)], ip: IpAddr) -> bool {
    let mut holding = marks
        .iter()
        .filter(|(range, _)| range.contains(&ip))
        .peekable();
    if holding.peek().is_none() {
        return true;
    }
    holding.any(|(range, mark)| Pool::new(*range).map_or(true, |p| !p.fresh_left_above(*mark)))
}

/// [`release_needs_record`] for endpoint ids, given their mark.
fn id_release_needs_record(mark: Option<u16>) -> bool {
    mark.is_none_or(|m| m == u16::MAX)
}

/// The lowest id above the high-water `mark` not in use, if the mark is
/// recorded and such an id is left.
fn fresh_id(mark: Option<u16>, used: &BTreeSet<u16>) -> Option<u16> {
    let mut id = mark?.checked_add(1);
    while let Some(candidate) = id.filter(|i| used.contains(i)) {
        id = candidate.checked_add(1);
    }
    id
}

/// A mark for `pool` when its own is missing because its range changed:
/// from the marks of the ranges it overlaps. Everything of the pool up to
/// such a mark may have been handed out (and released without a record); a
/// mark past the pool's end means all of it may have.
fn inherited_mark(pool: &Pool, marks: &[(ipnet::IpNet, IpAddr)]) -> Option<IpAddr> {
    let range = pool.range();
    let last = crate::ipam::address_order(pool.last());
    marks
        .iter()
        .filter(|(r, _)| r.contains(&range.network()) || range.contains(&r.network()))
        .filter_map(|(_, mark)| {
            if range.contains(mark) {
                Some(*mark)
            } else if crate::ipam::address_order(*mark) > last {
                Some(pool.last())
            } else {
                None
            }
        })
        .max_by_key(|a| crate::ipam::address_order(*a))
}

/// The number at the end of `key` (after `prefix`).
fn key_number<T: std::str::FromStr>(prefix: &str, key: &str) -> Result<T, StoreError> {
    key.strip_prefix(prefix)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Db(format!("{key}: the key does not end in a number")))
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, HISTORY)
    }

    /// [`Self::open`] keeping `history` (a measurement compares the
    /// kvstore's default).
    fn open_with(path: &Path, history: cilia_kvstore::History) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| open_err(e.to_string()))?;
        let legacy = legacy::read(&db)?;
        let kv = RedbStore::from_database(db, history).map_err(|e| open_err(e.to_string()))?;
        match kv.get(LAYOUT)? {
            None => {
                let mut ops = legacy.clone().unwrap_or_default();
                ops.push(Op::put(LAYOUT, LAYOUT_VERSION));
                kv.txn(&[Compare::absent(LAYOUT)], &ops)?;
                if legacy.is_some() {
                    tracing::info!(path = %path.display(), "state migrated to the kvstore layout");
                }
            }
            Some(layout) if layout.value == LAYOUT_VERSION.as_bytes() => {}
            Some(layout) => {
                return Err(open_err(format!(
                    "written in key layout {:?}, this agent knows layout {LAYOUT_VERSION}: \
                     run the agent version that wrote it, or move the file away to start empty",
                    String::from_utf8_lossy(&layout.value)
                )))
            }
        }
        if legacy.is_some() {
            // Imported (now or by an open cut short before this step).
            legacy::drop_tables(kv.database())?;
        }
        let store = Self {
            kv: Box::new(kv),
            writer: Mutex::new(()),
            allocator: RwLock::new(None),
            services_cache: Mutex::new(None),
        };
        let dropped = store.drop_needless_release_records()?;
        if dropped > 0 {
            tracing::info!(
                path = %path.display(),
                dropped,
                "release records of pools that have not wrapped dropped"
            );
        }
        Ok(store)
    }

    /// Drops the release records [`release_needs_record`] does not ask for:
    /// agents before that rule wrote one per delete, and they were never read
    /// while their pool had fresh addresses left. Returns how many.
    fn drop_needless_release_records(&self) -> Result<usize, StoreError> {
        let mut keys = Vec::new();
        if !id_release_needs_record(self.get_decoded::<u16>(HIGH_ID)?) {
            keys.extend(self.list(RELEASED_IDS)?.into_iter().map(|(key, _)| key));
        }
        let marks = self.address_marks()?;
        for (key, _) in self.list(RELEASED_IPS)? {
            let ip: IpAddr = key_number(RELEASED_IPS, &key)?;
            if !release_needs_record(&marks, ip) {
                keys.push(key);
            }
        }
        // In bounded transactions: a node that churned endpoints for months
        // has a record per delete it ever made.
        for chunk in keys.chunks(10_000) {
            self.change(|c| {
                for key in chunk {
                    c.delete(key.clone());
                }
                Ok(())
            })?;
        }
        Ok(keys.len())
    }

    /// The address pools' high-water marks: (range, mark).
    fn address_marks(&self) -> Result<Vec<(ipnet::IpNet, IpAddr)>, StoreError> {
        let mut out = Vec::new();
        for (key, value) in self.list(HIGH_IP)? {
            let range = key
                .strip_prefix(HIGH_IP)
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| {
                    StoreError::Db(format!("{key}: the key does not end in an address range"))
                })?;
            out.push((range, decode(&key, &value)?));
        }
        Ok(out)
    }

    /// The kvstore's revision: one more per committed change.
    #[cfg(test)]
    pub(crate) fn kv_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.kv.revision()?)
    }

    /// Makes identities of label sets new to this node come from
    /// `allocator` (the cluster's) from now on.
    pub fn set_identity_allocator(&self, allocator: Arc<dyn IdentityAllocator>) {
        *self.allocator.write().unwrap_or_else(|e| e.into_inner()) = Some(allocator);
    }

    /// The keys under `prefix`: (key, value).
    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .kv
            .list_prefix(prefix)?
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect())
    }

    fn counter(&self, key: &str) -> Result<u64, StoreError> {
        match self.kv.get(key)? {
            Some(kv) => decode(key, &kv.value),
            None => Ok(0),
        }
    }

    fn read_endpoints(&self) -> Result<BTreeMap<u16, EndpointRecord>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.list(ENDPOINTS)? {
            let id = key_number(ENDPOINTS, &key)?;
            let rec = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                id,
                reason: e.to_string(),
            })?;
            out.insert(id, rec);
        }
        Ok(out)
    }

    /// Address keys under `prefix` with their values.
    fn read_addresses<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<IpAddr, T>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.list(prefix)? {
            out.insert(key_number(prefix, &key)?, decode(&key, &value)?);
        }
        Ok(out)
    }

    /// Identity -> JSON of its labels (compared as bytes: a `BTreeMap`
    /// serializes in one way).
    fn read_identities(&self) -> Result<BTreeMap<u32, Vec<u8>>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.list(IDENTITIES)? {
            out.insert(key_number(IDENTITIES, &key)?, value);
        }
        Ok(out)
    }

    fn namespace_labels(&self, namespace: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let key = format!("{NAMESPACES}{namespace}");
        match self.kv.get(&key)? {
            Some(kv) => decode(&key, &kv.value),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Runs `f` as one change: what it reads is what the transaction
    /// commits against (see the module doc).
    fn change<T>(
        &self,
        f: impl FnOnce(&mut Change) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.change_at(f).map(|(out, _)| out)
    }

    /// [`Self::change`], also returning the revision it committed at (the
    /// `mod_revision` of every key it wrote).
    fn change_at<T>(
        &self,
        f: impl FnOnce(&mut Change) -> Result<T, StoreError>,
    ) -> Result<(T, Revision), StoreError> {
        // The lock guards no data, only the order of changes: a poisoned
        // one is as good as a clean one.
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let base = self.kv.get(LAST_CHANGE)?.map_or(0, |kv| kv.mod_revision);
        let allocator = self
            .allocator
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut change = Change::new(base, allocator);
        let result = self.commit(f, &mut change);
        if let Some(a) = &change.allocator {
            let done = if result.is_ok() {
                &change.released
            } else {
                &change.allocated
            };
            for id in done {
                a.release(*id);
            }
        }
        result
    }

    /// The body of [`Self::change`]: runs `f`, commits its writes.
    fn commit<T>(
        &self,
        f: impl FnOnce(&mut Change) -> Result<T, StoreError>,
        change: &mut Change,
    ) -> Result<(T, Revision), StoreError> {
        let out = f(change)?;
        let mut ops: Vec<Op> = std::mem::take(&mut change.writes)
            .into_iter()
            .map(|(key, value)| match value {
                Some(v) => Op::put(key, v),
                None => Op::delete(key),
            })
            .collect();
        ops.push(Op::put(LAST_CHANGE, Vec::new()));
        let done = self
            .kv
            .txn(&[Compare::mod_revision(LAST_CHANGE, change.base)], &ops)?;
        if !done.succeeded {
            return Err(StoreError::Conflict);
        }
        Ok((out, done.revision))
    }

    pub fn endpoints(&self) -> Result<Vec<EndpointRecord>, StoreError> {
        Ok(self.read_endpoints()?.into_values().collect())
    }

    /// Allocated addresses.
    pub fn allocated(&self) -> Result<BTreeSet<IpAddr>, StoreError> {
        Ok(self.read_addresses::<u16>(IPAM)?.into_keys().collect())
    }

    /// Endpoint ids in use, and the released ones with their release
    /// sequence number. Ids from the keys: no record needs decoding.
    #[allow(clippy::type_complexity)]
    fn endpoint_ids(&self) -> Result<(BTreeSet<u16>, BTreeMap<u16, u64>), StoreError> {
        let used = self
            .list(ENDPOINTS)?
            .iter()
            .map(|(key, _)| key_number(ENDPOINTS, key))
            .collect::<Result<BTreeSet<u16>, _>>()?;
        let mut released = BTreeMap::new();
        for (key, value) in self.list(RELEASED_IDS)? {
            released.insert(
                key_number::<u16>(RELEASED_IDS, &key)?,
                decode::<u64>(&key, &value)?,
            );
        }
        Ok((used, released))
    }

    /// Endpoint ids in use (from the keys).
    fn used_endpoint_ids(&self) -> Result<BTreeSet<u16>, StoreError> {
        self.list(ENDPOINTS)?
            .iter()
            .map(|(key, _)| key_number(ENDPOINTS, key))
            .collect()
    }

    fn get_decoded<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.kv.get(key)? {
            Some(kv) => Ok(Some(decode(key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// The ids the next `k` creates would get if nothing else changed
    /// (ids are handed out in increasing order, see `next_endpoint_id`).
    pub fn next_endpoint_ids(&self, k: usize) -> Result<Vec<u16>, StoreError> {
        // Fresh ids above the high-water mark, without listing the
        // released ones, while there are k of them.
        let used = self.used_endpoint_ids()?;
        let mark = self.get_decoded::<u16>(HIGH_ID)?;
        if let Some(first) = fresh_id(mark, &used) {
            let ids: Vec<u16> = (first..=u16::MAX)
                .filter(|i| !used.contains(i))
                .take(k)
                .collect();
            if ids.len() == k {
                return Ok(ids);
            }
        }
        let (mut used_ids, mut quarantined_ids) = self.endpoint_ids()?;
        let mut ids = Vec::with_capacity(k);
        while ids.len() < k {
            let Some(id) = crate::ipam::next_endpoint_id(&used_ids, &quarantined_ids, mark) else {
                break;
            };
            quarantined_ids.remove(&id);
            used_ids.insert(id);
            ids.push(id);
        }
        Ok(ids)
    }

    /// Allocates an id and addresses and records the endpoint in state
    /// `creating`, in one transaction. `make` builds the record from them.
    pub fn create_endpoint(
        &self,
        pool6: &Pool,
        pool4: Option<&Pool>,
        make: impl FnOnce(u16, Ipv6Addr, Option<Ipv4Addr>) -> EndpointRecord,
    ) -> Result<EndpointRecord, StoreError> {
        self.change(|c| {
            // Fresh ids and addresses come from the high-water marks; the
            // release records (kept only once a pool wrapped) are listed
            // only when a mark is missing (a store of before the marks, a
            // new range) or no fresh one is left.
            let used: BTreeSet<IpAddr> = self.read_addresses::<u16>(IPAM)?.into_keys().collect();
            let used_ids = self.used_endpoint_ids()?;
            let mut released_ips: Option<BTreeMap<IpAddr, u64>> = None;
            let id_mark = self.get_decoded::<u16>(HIGH_ID)?;
            let (id, seen_high) = match fresh_id(id_mark, &used_ids) {
                Some(id) => (id, id),
                None => {
                    let (_, quarantined_ids) = self.endpoint_ids()?;
                    let id = crate::ipam::next_endpoint_id(&used_ids, &quarantined_ids, id_mark)
                        .ok_or(StoreError::IdsExhausted)?;
                    if quarantined_ids.contains_key(&id) {
                        c.delete(released_id_key(id));
                    }
                    // Every id handed out so far is in use or released.
                    let seen = used_ids.iter().chain(quarantined_ids.keys()).copied();
                    (id, seen.max().unwrap_or(id).max(id))
                }
            };
            c.put(HIGH_ID.into(), &id_mark.unwrap_or(0).max(seen_high))?;
            let mut pick = |pool: &Pool| -> Result<IpAddr, StoreError> {
                let high_key = format!("{HIGH_IP}{}", pool.range());
                let high = match self.get_decoded::<IpAddr>(&high_key)? {
                    Some(high) => Some(high),
                    None => inherited_mark(pool, &self.address_marks()?),
                };
                let fresh = high.and_then(|h| pool.next_fresh_above(h, &used));
                let (ip, new_high) = match fresh {
                    Some(ip) => (ip, ip),
                    None => {
                        if released_ips.is_none() {
                            released_ips = Some(self.read_addresses(RELEASED_IPS)?);
                        }
                        let released = released_ips.as_ref().expect("just read");
                        let ip = pool.next_quarantined(&used, released)?;
                        if released.contains_key(&ip) {
                            c.delete(format!("{RELEASED_IPS}{ip}"));
                        }
                        // Without a mark (or of another range): the highest
                        // address of this pool handed out so far.
                        let seen_high = used
                            .iter()
                            .chain(released.keys())
                            .chain(high.iter())
                            .chain([&ip])
                            .filter(|a| pool.range().contains(*a))
                            .copied()
                            .max_by_key(|a| crate::ipam::address_order(*a))
                            .unwrap_or(ip);
                        (ip, seen_high)
                    }
                };
                c.put(high_key, &new_high)?;
                Ok(ip)
            };
            let v6 = match pick(pool6)? {
                IpAddr::V6(v6) => v6,
                IpAddr::V4(_) => unreachable!("an IPv6 pool yields IPv6 addresses"),
            };
            let v4 = match pool4.map(&mut pick).transpose()? {
                Some(IpAddr::V4(v4)) => Some(v4),
                Some(IpAddr::V6(_)) => unreachable!("an IPv4 pool yields IPv4 addresses"),
                None => None,
            };
            let mut rec = make(id, v6, v4);
            for ip in rec.ips() {
                c.put(format!("{IPAM}{ip}"), &id)?;
            }
            let ns_labels = self.namespace_labels(&rec.namespace)?;
            rec.identity = if rec.label_source.is_some() {
                INIT_IDENTITY
            } else if rec.labels.contains_key(HEALTH_LABEL) {
                HEALTH_IDENTITY
            } else {
                let mut identities = self.read_identities()?;
                identity_for(
                    c,
                    &mut identities,
                    &security_labels(&rec.labels, &rec.namespace, &ns_labels),
                )?
            };
            c.put(endpoint_key(id), &rec)?;
            Ok(rec)
        })
    }

    /// Replaces an endpoint's record (its addresses do not change).
    pub fn update_endpoint(&self, rec: &EndpointRecord) -> Result<(), StoreError> {
        self.change(|c| c.put(endpoint_key(rec.id), rec))
    }

    /// Removes an endpoint and frees its addresses and id into quarantine,
    /// in one transaction.
    pub fn delete_endpoint(&self, rec: &EndpointRecord) -> Result<(), StoreError> {
        self.change(|c| {
            let seq = self.counter(RELEASE_SEQ)? + 1;
            c.put(RELEASE_SEQ.into(), &seq)?;
            let mut endpoints = self.read_endpoints()?;
            if endpoints.remove(&rec.id).is_some() {
                c.delete(endpoint_key(rec.id));
                if id_release_needs_record(self.get_decoded::<u16>(HIGH_ID)?) {
                    c.put(released_id_key(rec.id), &seq)?;
                }
            }
            let marks = self.address_marks()?;
            for ip in rec.ips() {
                let key = format!("{IPAM}{ip}");
                if self.kv.get(&key)?.is_some() {
                    c.delete(key);
                    if release_needs_record(&marks, ip) {
                        c.put(format!("{RELEASED_IPS}{ip}"), &seq)?;
                    }
                }
            }
            let mut identities = self.read_identities()?;
            release_unused_identities(c, &endpoints, &mut identities);
            Ok(())
        })
    }

    /// Sets an endpoint's labels (learned or changed) and moves it to the
    /// identity of its new security labels, in one transaction.
    pub fn set_endpoint_labels(
        &self,
        id: u16,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<EndpointRecord>, StoreError> {
        self.change(|c| {
            let mut endpoints = self.read_endpoints()?;
            let Some(rec) = endpoints.get_mut(&id) else {
                return Ok(None);
            };
            let ns_labels = self.namespace_labels(&rec.namespace)?;
            let mut identities = self.read_identities()?;
            rec.labels = labels.clone();
            rec.label_source = None;
            rec.identity = identity_for(
                c,
                &mut identities,
                &security_labels(labels, &rec.namespace, &ns_labels),
            )?;
            let rec = rec.clone();
            c.put(endpoint_key(id), &rec)?;
            release_unused_identities(c, &endpoints, &mut identities);
            Ok(Some(rec))
        })
    }

    /// Sets an endpoint's policy audit mode.
    pub fn set_endpoint_audit(
        &self,
        id: u16,
        audit: bool,
    ) -> Result<Option<EndpointRecord>, StoreError> {
        self.change(|c| {
            let key = endpoint_key(id);
            let Some(kv) = self.kv.get(&key)? else {
                return Ok(None);
            };
            let mut rec: EndpointRecord =
                serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
                    id,
                    reason: e.to_string(),
                })?;
            rec.policy_audit = audit;
            c.put(key, &rec)?;
            Ok(Some(rec))
        })
    }

    /// Endpoint identities and their labels.
    pub fn identities(&self) -> Result<BTreeMap<u32, BTreeMap<String, String>>, StoreError> {
        let mut out = BTreeMap::new();
        for (id, json) in self.read_identities()? {
            out.insert(id, decode(&identity_key(id), &json)?);
        }
        Ok(out)
    }

    pub fn namespaces(&self) -> Result<BTreeMap<String, BTreeMap<String, String>>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.list(NAMESPACES)? {
            let labels = decode(&key, &value)?;
            out.insert(key[NAMESPACES.len()..].to_string(), labels);
        }
        Ok(out)
    }

    /// Sets a namespace's labels and moves its endpoints to the identities
    /// their new security labels map to, in one transaction. Returns the
    /// endpoints whose identity changed.
    pub fn set_namespace(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<EndpointRecord>, StoreError> {
        self.change(|c| {
            c.put(format!("{NAMESPACES}{namespace}"), labels)?;
            let mut endpoints = self.read_endpoints()?;
            let mut identities = self.read_identities()?;
            let mut changed = Vec::new();
            for rec in endpoints
                .values_mut()
                .filter(|r| r.namespace == namespace && r.label_source.is_none())
            {
                let identity = identity_for(
                    c,
                    &mut identities,
                    &security_labels(&rec.labels, namespace, labels),
                )?;
                if identity != rec.identity {
                    rec.identity = identity;
                    c.put(endpoint_key(rec.id), rec)?;
                    changed.push(rec.clone());
                }
            }
            release_unused_identities(c, &endpoints, &mut identities);
            Ok(changed)
        })
    }

    pub fn policies(&self) -> Result<Vec<StoredPolicy>, StoreError> {
        self.list(POLICIES)?
            .into_iter()
            .map(|(key, value)| decode(&key, &value))
            .collect()
    }

    /// The stored policies with the given keys (those that exist).
    pub fn policies_with_keys(&self, keys: &[String]) -> Result<Vec<StoredPolicy>, StoreError> {
        let mut out = Vec::new();
        for key in keys {
            let key = policy_key(key);
            if let Some(kv) = self.kv.get(&key)? {
                out.push(decode(&key, &kv.value)?);
            }
        }
        Ok(out)
    }

    /// Adds or replaces policies (by kind, namespace and name) and bumps the
    /// policy revision, all or nothing. Returns the new revision.
    pub fn put_policies(&self, policies: &[StoredPolicy]) -> Result<u64, StoreError> {
        self.replace_policies(policies, &[])
    }

    /// Deletes the policies with the given keys (all when `None`); returns
    /// the new revision.
    pub fn delete_policies(&self, keys: Option<&[String]>) -> Result<u64, StoreError> {
        match keys {
            Some(keys) => self.replace_policies(&[], keys),
            None => self.change_policies(|c| {
                for (key, _) in self.list(POLICIES)? {
                    c.delete(key);
                }
                Ok(())
            }),
        }
    }

    /// Adds or replaces `put` and deletes `delete` (by key) in one
    /// transaction, bumping the revision; returns the new revision.
    pub fn replace_policies(
        &self,
        put: &[StoredPolicy],
        delete: &[String],
    ) -> Result<u64, StoreError> {
        self.change_policies(|c| {
            for key in delete {
                c.delete(policy_key(key));
            }
            for p in put {
                c.put(policy_key(&p.key()), p)?;
            }
            Ok(())
        })
    }

    fn change_policies(
        &self,
        f: impl FnOnce(&mut Change) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        self.change(|c| {
            f(c)?;
            let rev = self.counter(POLICY_REVISION)? + 1;
            c.put(POLICY_REVISION.into(), &rev)?;
            Ok(rev)
        })
    }

    pub fn policy_revision(&self) -> Result<u64, StoreError> {
        self.counter(POLICY_REVISION)
    }

    /// Gives every prefix in `prefixes` a local CIDR identity (keeping the
    /// ones it had) and forgets prefixes no longer needed.
    pub fn sync_cidr_identities(
        &self,
        prefixes: &BTreeSet<ipnet::IpNet>,
    ) -> Result<BTreeMap<ipnet::IpNet, u32>, StoreError> {
        self.change(|c| self.cidr_identities(c, prefixes))
    }

    /// The identities [`Self::sync_cidr_identities`] would give, without
    /// storing anything.
    pub fn plan_cidr_identities(
        &self,
        prefixes: &BTreeSet<ipnet::IpNet>,
    ) -> Result<BTreeMap<ipnet::IpNet, u32>, StoreError> {
        let mut scratch = Change::new(0, None);
        self.cidr_identities(&mut scratch, prefixes)
    }

    /// Writes a change of CIDR identities made on top of what the store
    /// holds (see [`CidrAllocator::plan`]): only the prefixes that come or
    /// go are written, so the cost follows the change, not the number of
    /// CIDR identities.
    pub fn change_cidr_identities(&self, change: &CidrChange) -> Result<(), StoreError> {
        if change.is_empty() {
            return Ok(());
        }
        self.change(|c| {
            for (gone, _) in &change.gone {
                c.delete(format!("{CIDR_IDENTITIES}{gone}"));
            }
            for (prefix, id) in &change.added {
                c.put(format!("{CIDR_IDENTITIES}{prefix}"), id)?;
            }
            Ok(())
        })
    }

    /// Every stored CIDR identity, as it is stored.
    #[cfg(test)]
    pub fn stored_cidr_identities(&self) -> Result<BTreeMap<ipnet::IpNet, u32>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.list(CIDR_IDENTITIES)? {
            let prefix = key[CIDR_IDENTITIES.len()..]
                .parse()
                .map_err(|e| StoreError::Db(format!("{key}: {e}")))?;
            out.insert(prefix, decode::<u32>(&key, &value)?);
        }
        Ok(out)
    }

    /// How many CIDR identities are allocated.
    pub fn cidr_identity_count(&self) -> Result<usize, StoreError> {
        Ok(self.list(CIDR_IDENTITIES)?.len())
    }

    /// The CIDR identities of `prefixes` (existing ones kept, new ones
    /// given the lowest free ids), writing the changes into `c`.
    fn cidr_identities(
        &self,
        c: &mut Change,
        prefixes: &BTreeSet<ipnet::IpNet>,
    ) -> Result<BTreeMap<ipnet::IpNet, u32>, StoreError> {
        let mut existing = BTreeMap::new();
        for (key, value) in self.list(CIDR_IDENTITIES)? {
            existing.insert(
                key[CIDR_IDENTITIES.len()..].to_string(),
                decode::<u32>(&key, &value)?,
            );
        }
        let wanted: BTreeSet<String> = prefixes.iter().map(|p| p.to_string()).collect();
        for key in existing.keys().filter(|k| !wanted.contains(*k)) {
            c.delete(format!("{CIDR_IDENTITIES}{key}"));
        }
        let mut used: BTreeSet<u32> = existing
            .iter()
            .filter(|(k, _)| wanted.contains(*k))
            .map(|(_, v)| *v)
            .collect();
        // The search for a free id resumes where the last one ended (ids
        // only get used here), so n new prefixes on top of m cost O(n + m),
        // not O(n · m).
        let mut out = BTreeMap::new();
        let mut next_free = FIRST_CIDR_IDENTITY;
        for prefix in prefixes {
            let key = prefix.to_string();
            let id = match existing.get(&key) {
                Some(id) => *id,
                None => {
                    let mut id = next_free;
                    while used.contains(&id) {
                        id += 1;
                    }
                    next_free = id + 1;
                    used.insert(id);
                    c.put(format!("{CIDR_IDENTITIES}{key}"), &id)?;
                    id
                }
            };
            out.insert(*prefix, id);
        }
        Ok(out)
    }
}

/// A change of CIDR identities: the prefixes that go (with the ids they
/// had) and those that come (with the ids they get).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrChange {
    pub gone: Vec<(ipnet::IpNet, u32)>,
    pub added: Vec<(ipnet::IpNet, u32)>,
}

impl CidrChange {
    pub fn is_empty(&self) -> bool {
        self.gone.is_empty() && self.added.is_empty()
    }

    /// The change from `old` to `new`, by a walk of both (for the full
    /// path at start-up; a prefix whose id differs goes and comes).
    pub fn between(old: &BTreeMap<ipnet::IpNet, u32>, new: &BTreeMap<ipnet::IpNet, u32>) -> Self {
        let mut change = Self::default();
        for (prefix, id) in old {
            if new.get(prefix) != Some(id) {
                change.gone.push((*prefix, *id));
            }
        }
        for (prefix, id) in new {
            if old.get(prefix) != Some(id) {
                change.added.push((*prefix, *id));
            }
        }
        change
    }

    /// Applies the change to a map of CIDR identities.
    pub fn apply_to(&self, ids: &mut BTreeMap<ipnet::IpNet, u32>) {
        for (prefix, _) in &self.gone {
            ids.remove(prefix);
        }
        for (prefix, id) in &self.added {
            ids.insert(*prefix, *id);
        }
    }
}

/// Which CIDR identity ids are free, mirroring the store's CIDR
/// identities: the unused ids below a high-water mark (one past the largest
/// used id). A new prefix gets the smallest free one, as
/// [`Store::sync_cidr_identities`] gives it, in O(log n).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrAllocator {
    free: BTreeSet<u32>,
    high: u32,
}

impl Default for CidrAllocator {
    fn default() -> Self {
        Self {
            free: BTreeSet::new(),
            high: FIRST_CIDR_IDENTITY,
        }
    }
}

impl CidrAllocator {
    /// The allocator of a set of used ids (O(n log n), at start-up).
    pub fn of_used<'a>(used: impl IntoIterator<Item = &'a u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().copied().collect();
        let high = used.last().map_or(FIRST_CIDR_IDENTITY, |max| {
            (max + 1).max(FIRST_CIDR_IDENTITY)
        });
        let free = (FIRST_CIDR_IDENTITY..high)
            .filter(|id| !used.contains(id))
            .collect();
        Self { free, high }
    }

    /// The change that takes `gone` (prefixes and their ids) away and
    /// gives each of `new` (in prefix order) the smallest id nobody else
    /// uses, once `gone`'s ids are free; nothing is changed until
    /// [`Self::apply`]. O((gone + new) · log n).
    pub fn plan(&self, gone: Vec<(ipnet::IpNet, u32)>, new: &BTreeSet<ipnet::IpNet>) -> CidrChange {
        let mut released: Vec<u32> = gone.iter().map(|(_, id)| *id).collect();
        released.sort_unstable();
        let mut released = released.into_iter().peekable();
        let mut free = self.free.iter().copied().peekable();
        let mut high = self.high;
        let mut added = Vec::with_capacity(new.len());
        for prefix in new {
            let id = match (free.peek().copied(), released.peek().copied()) {
                (Some(f), Some(r)) if f < r => {
                    free.next();
                    f
                }
                (_, Some(r)) => {
                    released.next();
                    r
                }
                (Some(f), None) => {
                    free.next();
                    f
                }
                (None, None) => {
                    high += 1;
                    high - 1
                }
            };
            added.push((*prefix, id));
        }
        CidrChange { gone, added }
    }

    /// Applies a planned change (the one [`Self::plan`] gave).
    pub fn apply(&mut self, change: &CidrChange) {
        for (_, id) in &change.gone {
            self.release(*id);
        }
        for (_, id) in &change.added {
            self.take(*id);
        }
    }

    fn release(&mut self, id: u32) {
        if id < FIRST_CIDR_IDENTITY || id >= self.high {
            return;
        }
        if id + 1 == self.high {
            self.high = id;
            while self.free.last() == Some(&(self.high - 1)) {
                self.free.pop_last();
                self.high -= 1;
            }
        } else {
            self.free.insert(id);
        }
    }

    fn take(&mut self, id: u32) {
        if id < FIRST_CIDR_IDENTITY {
            return;
        }
        if id >= self.high {
            self.free.extend(self.high..id);
            self.high = id + 1;
        } else {
            self.free.remove(&id);
        }
    }
}

/// The identity of a label set: the existing one, or the lowest free id
/// (recorded in `identities` and `c`).
fn identity_for(
    c: &mut Change,
    identities: &mut BTreeMap<u32, Vec<u8>>,
    labels: &BTreeMap<String, String>,
) -> Result<u32, StoreError> {
    let json = serde_json::to_vec(labels).map_err(|e| StoreError::Db(e.to_string()))?;
    if let Some(id) = identities
        .iter()
        .find_map(|(id, bytes)| (*bytes == json).then_some(*id))
    {
        return Ok(id);
    }
    if let Some(allocator) = c.allocator.clone() {
        let id = allocator.allocate(labels).map_err(StoreError::Identity)?;
        if let Some(other) = identities.get(&id) {
            // Not released: this node's ref on `id` is its local holder's.
            return Err(StoreError::Identity(format!(
                "the cluster gives labels {} identity {id}, which this node has for labels {}",
                String::from_utf8_lossy(&json),
                String::from_utf8_lossy(other)
            )));
        }
        c.allocated.push(id);
        c.writes.insert(identity_key(id), Some(json.clone()));
        identities.insert(id, json);
        return Ok(id);
    }
    let mut expected = FIRST_ENDPOINT_IDENTITY;
    let mut free = None;
    for (id, _) in identities.iter() {
        if free.is_none() && *id != expected {
            free = Some(expected);
        }
        expected = id + 1;
    }
    let id = free.unwrap_or(expected);
    if id > LAST_ENDPOINT_IDENTITY {
        return Err(StoreError::IdentitiesExhausted);
    }
    c.writes.insert(identity_key(id), Some(json.clone()));
    identities.insert(id, json);
    Ok(id)
}

/// Removes identities no endpoint carries any more.
fn release_unused_identities(
    c: &mut Change,
    endpoints: &BTreeMap<u16, EndpointRecord>,
    identities: &mut BTreeMap<u32, Vec<u8>>,
) {
    let used: BTreeSet<u32> = endpoints.values().map(|r| r.identity).collect();
    identities.retain(|id, _| {
        let keep = used.contains(id);
        if !keep {
            c.delete(identity_key(*id));
            c.released.push(*id);
        }
        keep
    });
}

/// The layout before the kvstore: one redb table per kind, in the same file.
mod prefilter;

mod legacy {
    use super::*;

    pub(super) const ENDPOINTS_T: TableDefinition<u16, &[u8]> = TableDefinition::new("endpoints");
    pub(super) const IPAM_T: TableDefinition<&str, u16> = TableDefinition::new("ipam");
    pub(super) const IDENTITIES_T: TableDefinition<u32, &[u8]> = TableDefinition::new("identities");
    pub(super) const NAMESPACES_T: TableDefinition<&str, &[u8]> =
        TableDefinition::new("namespaces");
    pub(super) const POLICIES_T: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
    pub(super) const CIDR_IDENTITIES_T: TableDefinition<&str, u32> =
        TableDefinition::new("cidr_identities");
    pub(super) const META_T: TableDefinition<&str, u64> = TableDefinition::new("meta");
    pub(super) const RELEASED_IPS_T: TableDefinition<&str, u64> =
        TableDefinition::new("released_ips");
    pub(super) const RELEASED_IDS_T: TableDefinition<u16, u64> =
        TableDefinition::new("released_ids");
    const NAMES: [&str; 9] = [
        "endpoints",
        "ipam",
        "identities",
        "namespaces",
        "policies",
        "cidr_identities",
        "meta",
        "released_ips",
        "released_ids",
    ];

    fn json(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value).map_err(|e| StoreError::Db(e.to_string()))
    }

    /// The puts that hold the legacy tables' content in the key layout;
    /// `None` when the file has no legacy table.
    pub(super) fn read(db: &Database) -> Result<Option<Vec<Op>>, StoreError> {
        let r = db.begin_read().map_err(|e| StoreError::Db(e.to_string()))?;
        let present: BTreeSet<String> = r
            .list_tables()?
            .map(|t| redb::TableHandle::name(&t).to_string())
            .filter(|n| NAMES.contains(&n.as_str()))
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        let has = |name: &str| present.contains(name);
        let mut ops = Vec::new();
        if has("endpoints") {
            for item in r.open_table(ENDPOINTS_T)?.iter()? {
                let (k, v) = item?;
                ops.push(Op::put(endpoint_key(k.value()), v.value()));
            }
        }
        if has("ipam") {
            for item in r.open_table(IPAM_T)?.iter()? {
                let (k, v) = item?;
                ops.push(Op::put(format!("{IPAM}{}", k.value()), json(&v.value())?));
            }
        }
        if has("identities") {
            for item in r.open_table(IDENTITIES_T)?.iter()? {
                let (k, v) = item?;
                ops.push(Op::put(identity_key(k.value()), v.value()));
            }
        }
        if has("namespaces") {
            for item in r.open_table(NAMESPACES_T)?.iter()? {
                let (k, v) = item?;
                ops.push(Op::put(format!("{NAMESPACES}{}", k.value()), v.value()));
            }
        }
        if has("policies") {
            for item in r.open_table(POLICIES_T)?.iter()? {
                let (k, v) = item?;
                ops.push(Op::put(policy_key(k.value()), v.value()));
            }
        }
        if has("cidr_identities") {
            for item in r.open_table(CIDR_IDENTITIES_T)?.iter()? {
                let (k, v) = item?;
                ops.push(Op::put(
                    format!("{CIDR_IDENTITIES}{}", k.value()),
                    json(&v.value())?,
                ));
            }
        }
        if has("meta") {
            let meta = r.open_table(META_T)?;
            for (old, new) in [
                ("policy_revision", POLICY_REVISION),
                ("release_seq", RELEASE_SEQ),
            ] {
                if let Some(v) = meta.get(old)? {
                    ops.push(Op::put(new, json(&v.value())?));
                }
            }
        }
        if has("released_ips") {
            for item in r.open_table(RELEASED_IPS_T)?.iter()? {
                let (k, v) = item?;
                ops.push(Op::put(
                    format!("{RELEASED_IPS}{}", k.value()),
                    json(&v.value())?,
                ));
            }
        }
        if has("released_ids") {
            for item in r.open_table(RELEASED_IDS_T)?.iter()? {
                let (k, v) = item?;
                ops.push(Op::put(released_id_key(k.value()), json(&v.value())?));
            }
        }
        Ok(Some(ops))
    }

    /// Drops the legacy tables (after their content was imported).
    pub(super) fn drop_tables(db: &Database) -> Result<(), StoreError> {
        let w = db.begin_write()?;
        w.delete_table(ENDPOINTS_T)?;
        w.delete_table(IPAM_T)?;
        w.delete_table(IDENTITIES_T)?;
        w.delete_table(NAMESPACES_T)?;
        w.delete_table(POLICIES_T)?;
        w.delete_table(CIDR_IDENTITIES_T)?;
        w.delete_table(META_T)?;
        w.delete_table(RELEASED_IPS_T)?;
        w.delete_table(RELEASED_IDS_T)?;
        w.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u16, v6: Ipv6Addr, v4: Option<Ipv4Addr>) -> EndpointRecord {
        EndpointRecord {
            id,
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            host_ifname: format!("lxc{id}"),
            ipv6: v6,
            ipv4: v4,
            labels: BTreeMap::new(),
            mac: [2, 0, 0, 0, 0, 1],
            host_mac: [2, 0, 0, 0, 0, 2],
            state: EndpointState::Creating,
            reason: None,
            container_id: None,
            namespace: DEFAULT_NAMESPACE.into(),
            identity: 0,
            label_source: None,
            policy_audit: false,
            network: None,
            named_ports: Vec::new(),
            k8s_pod: None,
        }
    }

    #[test]
    fn a_record_written_before_networks_were_kept_still_loads() {
        let old = r#"{"id":3,"netns":"/run/netns/x","ifname":"eth0","host_ifname":"lxc3",
            "ipv6":"fd00::3","ipv4":null,"labels":{},"mac":[2,0,0,0,0,1],
            "host_mac":[2,0,0,0,0,2],"state":"ready","container_id":"c1"}"#;
        let rec: EndpointRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.network, None);
        assert!(rec.attached_to("any"), "DEL of any network still finds it");
    }

    #[test]
    fn a_record_written_before_named_ports_loads_without_names() {
        let old = r#"{"id":3,"netns":"/run/netns/x","ifname":"eth0","host_ifname":"lxc3",
            "ipv6":"fd00::3","ipv4":null,"labels":{},"mac":[2,0,0,0,0,1],
            "host_mac":[2,0,0,0,0,2],"state":"ready","network":"n"}"#;
        let rec: EndpointRecord = serde_json::from_str(old).unwrap();
        assert!(rec.named_ports.is_empty());
    }

    #[test]
    fn the_network_of_an_endpoint_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let (p6, p4) = pools();
        let a = {
            let store = Store::open(&path).unwrap();
            store
                .create_endpoint(&p6, Some(&p4), |id, v6, v4| EndpointRecord {
                    container_id: Some("c1".into()),
                    network: Some("net-a".into()),
                    ..record(id, v6, v4)
                })
                .unwrap()
        };
        let store = Store::open(&path).unwrap();
        let back = store.endpoints().unwrap();
        assert_eq!(back, vec![a]);
        assert_eq!(back[0].network.as_deref(), Some("net-a"));
        assert!(back[0].attached_to("net-a"));
        assert!(!back[0].attached_to("net-b"));
    }

    #[test]
    fn an_endpoint_without_a_container_is_on_no_network() {
        let rec = record(1, "fd00::1".parse().unwrap(), None);
        assert!(!rec.attached_to("cilia"));
    }

    #[test]
    fn endpoints_with_the_same_labels_share_an_identity_until_the_last_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (p6, p4) = pools();
        let a = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        let b = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_eq!(a.identity, FIRST_ENDPOINT_IDENTITY);
        assert_eq!(a.identity, b.identity);
        store.delete_endpoint(&a).unwrap();
        assert_eq!(store.identities().unwrap().len(), 1);
        store.delete_endpoint(&b).unwrap();
        assert!(store.identities().unwrap().is_empty());
    }

    #[test]
    fn namespace_labels_move_its_endpoints_to_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (p6, p4) = pools();
        let a = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        let labels = BTreeMap::from([("team".to_string(), "blue".to_string())]);
        let changed = store.set_namespace(DEFAULT_NAMESPACE, &labels).unwrap();
        assert_eq!(changed.len(), 1);
        assert_ne!(changed[0].identity, a.identity);
        let ids = store.identities().unwrap();
        assert_eq!(ids.len(), 1, "the old identity is released");
        assert_eq!(
            ids[&changed[0].identity][&format!("{NAMESPACE_LABELS_PREFIX}team")],
            "blue"
        );
    }

    #[test]
    fn policy_changes_bump_the_revision_and_cidr_identities_are_stable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let p = StoredPolicy {
            kind: "CiliumNetworkPolicy".into(),
            namespace: Some("default".into()),
            name: "r".into(),
            yaml: "x".into(),
            origin: None,
        };
        assert_eq!(store.put_policies(std::slice::from_ref(&p)).unwrap(), 1);
        assert_eq!(store.policies().unwrap(), vec![p.clone()]);
        assert_eq!(store.delete_policies(Some(&[p.key()])).unwrap(), 2);
        assert!(store.policies().unwrap().is_empty());
        let a: ipnet::IpNet = "10.0.0.0/8".parse().unwrap();
        let b: ipnet::IpNet = "192.0.2.0/24".parse().unwrap();
        let first = store.sync_cidr_identities(&[a, b].into()).unwrap();
        let second = store.sync_cidr_identities(&[b].into()).unwrap();
        assert_eq!(first[&b], second[&b]);
        assert!(first[&a] >= FIRST_CIDR_IDENTITY);
    }

    #[test]
    fn changing_cidr_identities_gives_the_ids_a_full_sync_gives() {
        let dir = tempfile::tempdir().unwrap();
        let full = Store::open(&dir.path().join("full.redb")).unwrap();
        let changed = Store::open(&dir.path().join("changed.redb")).unwrap();
        let net = |i: u32| -> ipnet::IpNet { format!("10.0.{i}.0/24").parse().unwrap() };
        let sets: [Vec<u32>; 4] = [
            (0..10).collect(),
            vec![0, 2, 4, 6, 8],               // gaps
            vec![0, 1, 2, 3, 4, 6, 8, 11, 12], // fill the gaps, then more
            vec![12],
        ];
        let mut current = BTreeMap::new();
        let mut allocator = CidrAllocator::default();
        for set in sets {
            let prefixes: BTreeSet<ipnet::IpNet> = set.into_iter().map(net).collect();
            let want = full.sync_cidr_identities(&prefixes).unwrap();
            let gone = current
                .iter()
                .filter(|(p, _)| !prefixes.contains(*p))
                .map(|(p, id)| (*p, *id))
                .collect();
            let new = prefixes
                .iter()
                .filter(|p| !current.contains_key(*p))
                .copied()
                .collect();
            let change = allocator.plan(gone, &new);
            changed.change_cidr_identities(&change).unwrap();
            allocator.apply(&change);
            change.apply_to(&mut current);
            assert_eq!(current, want);
            assert_eq!(changed.plan_cidr_identities(&prefixes).unwrap(), want);
            assert_eq!(allocator, CidrAllocator::of_used(want.values()));
        }
    }

    /// An allocator handing out ids from 4000 on, recording releases.
    #[derive(Default)]
    struct FakeAllocator {
        given: Mutex<BTreeMap<Vec<u8>, u32>>,
        released: Mutex<Vec<u32>>,
        down: std::sync::atomic::AtomicBool,
    }

    impl IdentityAllocator for FakeAllocator {
        fn allocate(&self, labels: &BTreeMap<String, String>) -> Result<u32, String> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("kvstore etcd x unreachable: cannot allocate".into());
            }
            let mut given = self.given.lock().unwrap();
            let next = 4000 + given.len() as u32;
            Ok(*given
                .entry(serde_json::to_vec(labels).unwrap())
                .or_insert(next))
        }

        fn release(&self, id: u32) {
            self.released.lock().unwrap().push(id);
        }
    }

    #[test]
    fn with_an_allocator_new_label_sets_take_its_ids_and_unused_ones_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let alloc = Arc::new(FakeAllocator::default());
        store.set_identity_allocator(alloc.clone());
        let (p6, p4) = pools();
        let a = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        let b = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_eq!((a.identity, b.identity), (4000, 4000));
        // The second endpoint's label set was known locally: one allocation.
        assert_eq!(alloc.given.lock().unwrap().len(), 1);
        store.delete_endpoint(&a).unwrap();
        assert!(alloc.released.lock().unwrap().is_empty());
        store.delete_endpoint(&b).unwrap();
        assert_eq!(*alloc.released.lock().unwrap(), vec![4000]);
        assert!(store.identities().unwrap().is_empty());
    }

    #[test]
    fn an_unreachable_allocator_fails_the_change_and_applies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let alloc = Arc::new(FakeAllocator::default());
        alloc.down.store(true, std::sync::atomic::Ordering::SeqCst);
        store.set_identity_allocator(alloc.clone());
        let (p6, p4) = pools();
        let err = store.create_endpoint(&p6, Some(&p4), record).unwrap_err();
        assert!(err.to_string().contains("unreachable"), "{err}");
        assert!(store.endpoints().unwrap().is_empty());
        assert!(store.allocated().unwrap().is_empty());
    }

    fn pools() -> (Pool, Pool) {
        (
            Pool::new("fd00::/126".parse().unwrap()).unwrap(),
            Pool::new("10.0.0.0/29".parse().unwrap()).unwrap(),
        )
    }

    #[test]
    fn allocations_survive_reopening_and_are_freed_on_delete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let (p6, p4) = pools();
        let a = {
            let store = Store::open(&path).unwrap();
            store.create_endpoint(&p6, Some(&p4), record).unwrap()
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(store.endpoints().unwrap(), vec![a.clone()]);
        let b = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_eq!(b.id, 2);
        assert_ne!(a.ipv6, b.ipv6);
        assert_ne!(a.ipv4, b.ipv4);
        // fd00::/126 has two allocatable addresses: the third endpoint fails
        // and leaves nothing behind.
        let err = store.create_endpoint(&p6, Some(&p4), record).unwrap_err();
        assert!(err.to_string().contains("exhausted"), "{err}");
        assert_eq!(store.endpoints().unwrap().len(), 2);
        store.delete_endpoint(&a).unwrap();
        assert_eq!(store.allocated().unwrap().len(), 2);
        let c = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_eq!(c.id, 3, "a released id waits behind fresh ones");
        assert_eq!(c.ipv6, a.ipv6, "a full pool reuses the released address");
    }

    #[test]
    fn a_released_address_and_id_stay_quarantined_while_fresh_ones_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let p6 = Pool::new("fd00::/120".parse().unwrap()).unwrap();
        let p4 = Pool::new("10.0.0.0/24".parse().unwrap()).unwrap();
        let a = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        store.delete_endpoint(&a).unwrap();
        let b = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_ne!(b.id, a.id);
        assert_ne!(b.ipv6, a.ipv6);
        assert_ne!(b.ipv4, a.ipv4);
    }

    #[test]
    fn released_addresses_are_reused_least_recently_released_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        // Two addresses per family: both are taken, then released in the
        // order b, a; the next endpoint gets b's, even after a restart.
        let (p6, p4) = (
            Pool::new("fd00::/126".parse().unwrap()).unwrap(),
            Pool::new("10.0.0.0/29".parse().unwrap()).unwrap(),
        );
        let (a, b) = {
            let store = Store::open(&path).unwrap();
            let a = store.create_endpoint(&p6, Some(&p4), record).unwrap();
            let b = store.create_endpoint(&p6, Some(&p4), record).unwrap();
            store.delete_endpoint(&b).unwrap();
            store.delete_endpoint(&a).unwrap();
            (a, b)
        };
        let store = Store::open(&path).unwrap();
        let c = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_eq!(c.ipv6, b.ipv6);
        assert_ne!(c.ipv6, a.ipv6);
        let d = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_eq!(d.ipv6, a.ipv6);
    }

    #[test]
    fn fresh_ids_and_addresses_come_from_the_high_water_marks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let p6 = Pool::new("fd00::/120".parse().unwrap()).unwrap();
        let p4 = Pool::new("10.0.0.0/24".parse().unwrap()).unwrap();
        let mut last: Option<EndpointRecord> = None;
        for round in 0..20u16 {
            let rec = store.create_endpoint(&p6, Some(&p4), record).unwrap();
            assert_eq!(
                rec.id,
                round + 1,
                "ids never reused while fresh ones are left"
            );
            if let Some(prev) = &last {
                assert!(rec.ipv6 > prev.ipv6 && rec.ipv4 > prev.ipv4);
            }
            store.delete_endpoint(&rec).unwrap();
            last = Some(rec);
        }
        assert_eq!(store.get_decoded::<u16>(HIGH_ID).unwrap(), Some(20));
        assert_eq!(
            store
                .get_decoded::<IpAddr>(&format!("{HIGH_IP}{}", p6.range()))
                .unwrap(),
            Some(IpAddr::V6(last.as_ref().unwrap().ipv6))
        );
        assert_eq!(store.next_endpoint_ids(3).unwrap(), vec![21, 22, 23]);
    }

    /// A store written before the marks (or a pool whose range changed)
    /// continues above everything handed out, never with a released one.
    #[test]
    fn without_marks_the_next_ones_are_above_everything_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let p6 = Pool::new("fd00::/120".parse().unwrap()).unwrap();
        let p4 = Pool::new("10.0.0.0/24".parse().unwrap()).unwrap();
        let recs: Vec<_> = (0..12)
            .map(|_| store.create_endpoint(&p6, Some(&p4), record).unwrap())
            .collect();
        store
            .change(|c| {
                c.delete(HIGH_ID.into());
                c.delete(format!("{HIGH_IP}{}", p6.range()));
                c.delete(format!("{HIGH_IP}{}", p4.range()));
                Ok(())
            })
            .unwrap();
        // Without marks every release is recorded, as before the marks.
        for rec in &recs[..11] {
            store.delete_endpoint(rec).unwrap();
        }
        assert_eq!(store.list(RELEASED_IDS).unwrap().len(), 11);
        let next = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_eq!(next.id, 13);
        assert!(recs
            .iter()
            .all(|r| next.ipv6 > r.ipv6 && next.ipv4 > r.ipv4));
        assert_eq!(store.get_decoded::<u16>(HIGH_ID).unwrap(), Some(13));
        let after = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_eq!(after.id, 14);
        assert!(after.ipv6 > next.ipv6);
    }

    #[test]
    fn a_pool_that_has_not_wrapped_keeps_no_release_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let p6 = Pool::new("fd00::/64".parse().unwrap()).unwrap();
        let p4 = Pool::new("10.0.0.0/16".parse().unwrap()).unwrap();
        let mut last: Option<EndpointRecord> = None;
        for _ in 0..50 {
            let rec = store.create_endpoint(&p6, Some(&p4), record).unwrap();
            if let Some(prev) = &last {
                assert!(rec.id > prev.id && rec.ipv6 > prev.ipv6 && rec.ipv4 > prev.ipv4);
            }
            store.delete_endpoint(&rec).unwrap();
            last = Some(rec);
        }
        assert!(store.list(RELEASED_IPS).unwrap().is_empty());
        assert!(store.list(RELEASED_IDS).unwrap().is_empty());
    }

    /// Six addresses: ::2 is released before the pool wraps (no record),
    /// ::5 and then ::3 after it. They come back in that order.
    #[test]
    fn releases_before_a_wrap_come_back_first_then_recorded_ones_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let p6 = Pool::new("fd00::/125".parse().unwrap()).unwrap();
        let addr = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        {
            let store = Store::open(&path).unwrap();
            let e: Vec<_> = (0..3)
                .map(|_| store.create_endpoint(&p6, None, record).unwrap())
                .collect();
            store.delete_endpoint(&e[0]).unwrap();
            assert!(store.list(RELEASED_IPS).unwrap().is_empty());
            let f: Vec<_> = (0..3)
                .map(|_| store.create_endpoint(&p6, None, record).unwrap())
                .collect();
            assert_eq!(f[2].ipv6, addr("fd00::7"), "the mark is at the end");
            store.delete_endpoint(&f[0]).unwrap();
            store.delete_endpoint(&e[1]).unwrap();
            assert_eq!(store.list(RELEASED_IPS).unwrap().len(), 2);
        }
        let store = Store::open(&path).unwrap();
        let got: Vec<_> = (0..3)
            .map(|_| store.create_endpoint(&p6, None, record).unwrap().ipv6)
            .collect();
        assert_eq!(got, vec![addr("fd00::2"), addr("fd00::5"), addr("fd00::3")]);
        let err = store.create_endpoint(&p6, None, record).unwrap_err();
        assert!(err.to_string().contains("exhausted"), "{err}");
    }

    /// An agent before the rule recorded every release; the records of a
    /// pool that has not wrapped go on open, those of one that has stay.
    #[test]
    fn needless_release_records_of_older_agents_are_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let big = Pool::new("fd00::/64".parse().unwrap()).unwrap();
        let small = Pool::new("10.0.0.0/30".parse().unwrap()).unwrap(); // .2 only
        {
            let store = Store::open(&path).unwrap();
            for _ in 0..3 {
                let rec = store.create_endpoint(&big, Some(&small), record).unwrap();
                store.delete_endpoint(&rec).unwrap();
            }
            // More than one of the migration's transactions holds.
            store
                .change(|c| {
                    for i in 2..12_002u32 {
                        c.put(format!("{RELEASED_IPS}fd00::{i:x}"), &u64::from(i))?;
                    }
                    for i in 1..4u16 {
                        c.put(released_id_key(i), &u64::from(i))?;
                    }
                    Ok(())
                })
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let left: Vec<String> = store
            .list(RELEASED_IPS)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, vec![format!("{RELEASED_IPS}10.0.0.2")]);
        assert!(store.list(RELEASED_IDS).unwrap().is_empty());
        assert_eq!(store.drop_needless_release_records().unwrap(), 0);
    }

    /// A pool whose range changed (here grew) continues above what the old
    /// range handed out: those releases were not recorded.
    #[test]
    fn a_changed_range_continues_above_the_marks_of_the_ranges_it_overlaps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let old = Pool::new("fd00::/120".parse().unwrap()).unwrap();
        let mut handed = Vec::new();
        for _ in 0..5 {
            let rec = store.create_endpoint(&old, None, record).unwrap();
            store.delete_endpoint(&rec).unwrap();
            handed.push(rec.ipv6);
        }
        let grown = Pool::new("fd00::/112".parse().unwrap()).unwrap();
        let next = store.create_endpoint(&grown, None, record).unwrap();
        assert!(handed.iter().all(|a| next.ipv6 > *a), "{next:?}");
        let shrunk = Pool::new("fd00::/125".parse().unwrap()).unwrap(); // ::2..::7
        let got = store.create_endpoint(&shrunk, None, record);
        // Everything of it was handed out under the old range: only the
        // addresses released without a record are left, lowest first.
        assert_eq!(got.unwrap().ipv6, "fd00::2".parse::<Ipv6Addr>().unwrap());
    }

    /// Measures what 10,000 create/delete cycles leave in the store, on the
    /// default pools' shapes, with the agent's history and, as the baseline
    /// in the same run, the kvstore's default. Run by hand:
    /// `cargo test -p cilia-agent --release store_growth -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn store_growth_over_create_delete_cycles() {
        let runs = [
            ("kvstore default history", cilia_kvstore::History::default()),
            ("agent's history", HISTORY),
        ];
        for (name, history) in runs {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.redb");
            let store = Store::open_with(&path, history).unwrap();
            let p6 = Pool::new("fd00::/64".parse().unwrap()).unwrap();
            let p4 = Pool::new("10.0.0.0/16".parse().unwrap()).unwrap();
            println!("{name}:\ncycles  release-records  file-bytes  ms-per-1000");
            let mut t = std::time::Instant::now();
            for cycle in 1..=10_000u32 {
                let rec = store.create_endpoint(&p6, Some(&p4), record).unwrap();
                store.delete_endpoint(&rec).unwrap();
                if cycle % 1000 == 0 {
                    let ms = t.elapsed().as_millis();
                    let records = store.list(RELEASED_IPS).unwrap().len()
                        + store.list(RELEASED_IDS).unwrap().len();
                    let bytes = std::fs::metadata(&path).unwrap().len();
                    println!("{cycle:>6}  {records:>15}  {bytes:>10}  {ms:>11}");
                    t = std::time::Instant::now();
                }
            }
        }
    }

    /// Writes `path` in the table layout the agent used before the
    /// kvstore: endpoints 1 and 3 (2 was released), one identity, labels of
    /// namespace `default`, one policy, one CIDR identity, counters.
    fn write_table_layout(path: &Path) -> Vec<EndpointRecord> {
        let db = Database::create(path).unwrap();
        let w = db.begin_write().unwrap();
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        let mut recs = Vec::new();
        {
            let mut endpoints = w.open_table(legacy::ENDPOINTS_T).unwrap();
            let mut ipam = w.open_table(legacy::IPAM_T).unwrap();
            for (id, v6, v4) in [(1u16, "fd00::1", "10.0.0.1"), (3, "fd00::3", "10.0.0.3")] {
                let mut rec = record(id, v6.parse().unwrap(), Some(v4.parse().unwrap()));
                rec.labels = labels.clone();
                rec.identity = FIRST_ENDPOINT_IDENTITY;
                rec.state = EndpointState::Ready;
                endpoints
                    .insert(id, serde_json::to_vec(&rec).unwrap().as_slice())
                    .unwrap();
                for ip in rec.ips() {
                    ipam.insert(ip.to_string().as_str(), id).unwrap();
                }
                recs.push(rec);
            }
            let sec = security_labels(&labels, DEFAULT_NAMESPACE, &ns_labels());
            w.open_table(legacy::IDENTITIES_T)
                .unwrap()
                .insert(
                    FIRST_ENDPOINT_IDENTITY,
                    serde_json::to_vec(&sec).unwrap().as_slice(),
                )
                .unwrap();
            w.open_table(legacy::NAMESPACES_T)
                .unwrap()
                .insert(
                    DEFAULT_NAMESPACE,
                    serde_json::to_vec(&ns_labels()).unwrap().as_slice(),
                )
                .unwrap();
            let p = policy();
            w.open_table(legacy::POLICIES_T)
                .unwrap()
                .insert(p.key().as_str(), serde_json::to_vec(&p).unwrap().as_slice())
                .unwrap();
            w.open_table(legacy::CIDR_IDENTITIES_T)
                .unwrap()
                .insert("192.0.2.0/24", FIRST_CIDR_IDENTITY + 4)
                .unwrap();
            let mut meta = w.open_table(legacy::META_T).unwrap();
            meta.insert("policy_revision", 7).unwrap();
            meta.insert("release_seq", 1).unwrap();
            w.open_table(legacy::RELEASED_IPS_T)
                .unwrap()
                .insert("fd00::2", 1)
                .unwrap();
            w.open_table(legacy::RELEASED_IDS_T)
                .unwrap()
                .insert(2, 1)
                .unwrap();
        }
        w.commit().unwrap();
        recs
    }

    fn ns_labels() -> BTreeMap<String, String> {
        BTreeMap::from([("team".to_string(), "blue".to_string())])
    }

    fn policy() -> StoredPolicy {
        StoredPolicy {
            kind: "CiliumNetworkPolicy".into(),
            namespace: Some("default".into()),
            name: "r".into(),
            yaml: "x".into(),
            origin: None,
        }
    }

    fn tables(path: &Path) -> BTreeSet<String> {
        let db = Database::create(path).unwrap();
        let r = db.begin_read().unwrap();
        r.list_tables()
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect()
    }

    #[test]
    fn a_state_file_of_the_table_layout_is_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let p6 = Pool::new("fd00::/125".parse().unwrap()).unwrap();
        let p4 = Pool::new("10.0.0.0/29".parse().unwrap()).unwrap();
        let recs = write_table_layout(&path);
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.endpoints().unwrap(), recs);
            assert_eq!(
                store.allocated().unwrap(),
                recs.iter().flat_map(|r| r.ips()).collect()
            );
            let ids = store.identities().unwrap();
            assert_eq!(
                ids.keys().copied().collect::<Vec<_>>(),
                [FIRST_ENDPOINT_IDENTITY]
            );
            assert_eq!(store.namespaces().unwrap()[DEFAULT_NAMESPACE], ns_labels());
            assert_eq!(store.policies().unwrap(), vec![policy()]);
            assert_eq!(store.policy_revision().unwrap(), 7);
            let prefix: ipnet::IpNet = "192.0.2.0/24".parse().unwrap();
            assert_eq!(
                store.plan_cidr_identities(&[prefix].into()).unwrap()[&prefix],
                FIRST_CIDR_IDENTITY + 4
            );
        }
        assert!(
            !tables(&path).contains("endpoints"),
            "the old tables are dropped"
        );
        // Quarantine and counters carried over: the next endpoint gets a
        // fresh id above the released 2, and a delete continues the
        // release sequence (its address waits behind fd00::2).
        let store = Store::open(&path).unwrap();
        let e = store.create_endpoint(&p6, Some(&p4), record).unwrap();
        assert_eq!(e.id, 4);
        assert_ne!(e.ipv6, "fd00::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(store.put_policies(&[policy()]).unwrap(), 8);
    }

    #[test]
    fn a_migration_cut_short_before_the_old_tables_were_dropped_does_not_import_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let recs = write_table_layout(&path);
        drop(Store::open(&path).unwrap());
        // As if the agent died between the import and the drop: the old
        // tables are back, with content that must not be imported again.
        {
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(legacy::ENDPOINTS_T)
                .unwrap()
                .insert(9, b"{}".as_slice())
                .unwrap();
            w.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.endpoints().unwrap(), recs);
        drop(store);
        assert!(!tables(&path).contains("endpoints"));
    }

    #[test]
    fn a_state_file_of_an_unknown_layout_is_refused_saying_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        drop(Store::open(&path).unwrap());
        {
            let kv = RedbStore::open(&path).unwrap();
            kv.put(LAYOUT, b"2").unwrap();
        }
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.contains("layout \"2\""), "{err}");
        assert!(err.contains("move the file away"), "{err}");
    }

    #[test]
    fn a_change_that_lost_a_race_applies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let err = store
            .change(|c| {
                c.put(policy_key("x"), &policy())?;
                // Another writer commits between our read and our commit.
                store.kv.put(LAST_CHANGE, b"")?;
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict), "{err}");
        assert!(store.policies().unwrap().is_empty());
    }

    #[test]
    fn a_second_open_of_the_same_database_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _first = Store::open(&path).unwrap();
        assert!(Store::open(&path).is_err());
    }
}
