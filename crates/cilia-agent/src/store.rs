//! Agent state on disk: one redb database (`<state-dir>/state.redb`).
//! Every change is one ACID transaction with durable commit, so a crash at
//! any instant leaves either the old or the new state, never a torn record.
//! Endpoint records and their IP allocations change in the same
//! transaction, so no address can be allocated without its owner, or twice.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use cilia_api::EndpointState;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::ipam::{IpamError, Pool};

/// Endpoint id -> JSON of [`EndpointRecord`].
const ENDPOINTS: TableDefinition<u16, &[u8]> = TableDefinition::new("endpoints");
/// Allocated address -> owning endpoint id.
const IPAM: TableDefinition<&str, u16> = TableDefinition::new("ipam");
/// Security identity -> JSON of its labels (endpoint identities only).
const IDENTITIES: TableDefinition<u32, &[u8]> = TableDefinition::new("identities");
/// Namespace name -> JSON of its labels.
const NAMESPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("namespaces");
/// Policy key (`kind/namespace/name`) -> JSON of [`StoredPolicy`].
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
/// CIDR prefix -> its local CIDR identity.
const CIDR_IDENTITIES: TableDefinition<&str, u32> = TableDefinition::new("cidr_identities");
/// Counters (policy revision, release sequence).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Released address -> release sequence number (quarantine, see `ipam`).
const RELEASED_IPS: TableDefinition<&str, u64> = TableDefinition::new("released_ips");
/// Released endpoint id -> release sequence number.
const RELEASED_IDS: TableDefinition<u16, u64> = TableDefinition::new("released_ids");

/// First identity given to endpoints (below: reserved).
pub const FIRST_ENDPOINT_IDENTITY: u32 = 256;
/// Last identity given to endpoints.
pub const LAST_ENDPOINT_IDENTITY: u32 = 65535;
/// The reserved identity of endpoints whose labels are not known yet.
pub const INIT_IDENTITY: u32 = 5;
/// First local CIDR identity.
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;
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

/// What a new endpoint needs before it gets an id and addresses.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub netns: String,
    pub ifname: String,
    pub labels: BTreeMap<String, String>,
    pub container_id: Option<String>,
}

pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn encode(rec: &EndpointRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(rec).map_err(|e| StoreError::Db(e.to_string()))
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let txn = db.begin_write()?;
        txn.open_table(ENDPOINTS)?;
        txn.open_table(IPAM)?;
        txn.open_table(IDENTITIES)?;
        txn.open_table(NAMESPACES)?;
        txn.open_table(POLICIES)?;
        txn.open_table(CIDR_IDENTITIES)?;
        txn.open_table(META)?;
        txn.open_table(RELEASED_IPS)?;
        txn.open_table(RELEASED_IDS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    pub fn endpoints(&self) -> Result<Vec<EndpointRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENDPOINTS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (id, bytes) = item?;
            let rec = serde_json::from_slice(bytes.value()).map_err(|e| StoreError::Corrupt {
                id: id.value(),
                reason: e.to_string(),
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Allocated addresses.
    pub fn allocated(&self) -> Result<BTreeSet<IpAddr>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IPAM)?;
        let mut out = BTreeSet::new();
        for item in table.iter()? {
            let (ip, _) = item?;
            if let Ok(ip) = ip.value().parse() {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    /// Allocates an id and addresses and records the endpoint in state
    /// `creating`, in one transaction. `make` builds the record from them.
    pub fn create_endpoint(
        &self,
        pool6: &Pool,
        pool4: Option<&Pool>,
        make: impl FnOnce(u16, Ipv6Addr, Option<Ipv4Addr>) -> EndpointRecord,
    ) -> Result<EndpointRecord, StoreError> {
        let txn = self.db.begin_write()?;
        let rec = {
            let mut endpoints = txn.open_table(ENDPOINTS)?;
            let mut ipam = txn.open_table(IPAM)?;
            let mut used = BTreeSet::new();
            for item in ipam.iter()? {
                let (ip, _) = item?;
                if let Ok(ip) = ip.value().parse::<IpAddr>() {
                    used.insert(ip);
                }
            }
            let mut released_ips = txn.open_table(RELEASED_IPS)?;
            let mut released_ids = txn.open_table(RELEASED_IDS)?;
            let mut quarantined = BTreeMap::new();
            for item in released_ips.iter()? {
                let (ip, seq) = item?;
                if let Ok(ip) = ip.value().parse::<IpAddr>() {
                    quarantined.insert(ip, seq.value());
                }
            }
            let mut used_ids = BTreeSet::new();
            for item in endpoints.iter()? {
                used_ids.insert(item?.0.value());
            }
            let mut quarantined_ids = BTreeMap::new();
            for item in released_ids.iter()? {
                let (id, seq) = item?;
                quarantined_ids.insert(id.value(), seq.value());
            }
            let id = crate::ipam::next_endpoint_id(&used_ids, &quarantined_ids)
                .ok_or(StoreError::IdsExhausted)?;
            let v6 = match pool6.next_quarantined(&used, &quarantined)? {
                IpAddr::V6(v6) => v6,
                IpAddr::V4(_) => unreachable!("an IPv6 pool yields IPv6 addresses"),
            };
            let v4 = match pool4
                .map(|p| p.next_quarantined(&used, &quarantined))
                .transpose()?
            {
                Some(IpAddr::V4(v4)) => Some(v4),
                Some(IpAddr::V6(_)) => unreachable!("an IPv4 pool yields IPv4 addresses"),
                None => None,
            };
            released_ids.remove(id)?;
            for ip in [Some(IpAddr::V6(v6)), v4.map(IpAddr::V4)]
                .into_iter()
                .flatten()
            {
                released_ips.remove(ip.to_string().as_str())?;
            }
            let mut rec = make(id, v6, v4);
            let ns_labels = namespace_labels(&txn, &rec.namespace)?;
            rec.identity = if rec.label_source.is_some() {
                INIT_IDENTITY
            } else {
                identity_for(
                    &txn,
                    &security_labels(&rec.labels, &rec.namespace, &ns_labels),
                )?
            };
            for ip in rec.ips() {
                ipam.insert(ip.to_string().as_str(), id)?;
            }
            endpoints.insert(id, encode(&rec)?.as_slice())?;
            rec
        };
        txn.commit()?;
        Ok(rec)
    }

    /// Replaces an endpoint's record (its addresses do not change).
    pub fn update_endpoint(&self, rec: &EndpointRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(ENDPOINTS)?
            .insert(rec.id, encode(rec)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Removes an endpoint and frees its addresses and id into quarantine,
    /// in one transaction.
    pub fn delete_endpoint(&self, rec: &EndpointRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut endpoints = txn.open_table(ENDPOINTS)?;
            let mut ipam = txn.open_table(IPAM)?;
            let mut meta = txn.open_table(META)?;
            let seq = meta.get("release_seq")?.map(|v| v.value()).unwrap_or(0) + 1;
            meta.insert("release_seq", seq)?;
            if endpoints.remove(rec.id)?.is_some() {
                txn.open_table(RELEASED_IDS)?.insert(rec.id, seq)?;
            }
            let mut released = txn.open_table(RELEASED_IPS)?;
            for ip in rec.ips() {
                if ipam.remove(ip.to_string().as_str())?.is_some() {
                    released.insert(ip.to_string().as_str(), seq)?;
                }
            }
        }
        release_unused_identities(&txn)?;
        txn.commit()?;
        Ok(())
    }

    /// Sets an endpoint's labels (learned or changed) and moves it to the
    /// identity of its new security labels, in one transaction.
    pub fn set_endpoint_labels(
        &self,
        id: u16,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<EndpointRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let rec = {
            let Some(mut rec) = read_endpoints(&txn)?.into_iter().find(|r| r.id == id) else {
                return Ok(None);
            };
            let ns_labels = namespace_labels(&txn, &rec.namespace)?;
            rec.labels = labels.clone();
            rec.label_source = None;
            rec.identity =
                identity_for(&txn, &security_labels(labels, &rec.namespace, &ns_labels))?;
            txn.open_table(ENDPOINTS)?
                .insert(rec.id, encode(&rec)?.as_slice())?;
            rec
        };
        release_unused_identities(&txn)?;
        txn.commit()?;
        Ok(Some(rec))
    }

    /// Sets an endpoint's policy audit mode.
    pub fn set_endpoint_audit(
        &self,
        id: u16,
        audit: bool,
    ) -> Result<Option<EndpointRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let rec = {
            let Some(mut rec) = read_endpoints(&txn)?.into_iter().find(|r| r.id == id) else {
                return Ok(None);
            };
            rec.policy_audit = audit;
            txn.open_table(ENDPOINTS)?
                .insert(rec.id, encode(&rec)?.as_slice())?;
            rec
        };
        txn.commit()?;
        Ok(Some(rec))
    }

    /// Endpoint identities and their labels.
    pub fn identities(&self) -> Result<BTreeMap<u32, BTreeMap<String, String>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IDENTITIES)?;
        let mut out = BTreeMap::new();
        for item in table.iter()? {
            let (id, bytes) = item?;
            let labels = serde_json::from_slice(bytes.value())
                .map_err(|e| StoreError::Db(format!("identity {}: {e}", id.value())))?;
            out.insert(id.value(), labels);
        }
        Ok(out)
    }

    pub fn namespaces(&self) -> Result<BTreeMap<String, BTreeMap<String, String>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(NAMESPACES)?;
        let mut out = BTreeMap::new();
        for item in table.iter()? {
            let (name, bytes) = item?;
            let labels = serde_json::from_slice(bytes.value())
                .map_err(|e| StoreError::Db(format!("namespace {}: {e}", name.value())))?;
            out.insert(name.value().to_string(), labels);
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
        let txn = self.db.begin_write()?;
        let mut changed = Vec::new();
        {
            let json = serde_json::to_vec(labels).map_err(|e| StoreError::Db(e.to_string()))?;
            txn.open_table(NAMESPACES)?
                .insert(namespace, json.as_slice())?;
            let records = read_endpoints(&txn)?;
            for mut rec in records
                .into_iter()
                .filter(|r| r.namespace == namespace && r.label_source.is_none())
            {
                let identity =
                    identity_for(&txn, &security_labels(&rec.labels, namespace, labels))?;
                if identity != rec.identity {
                    rec.identity = identity;
                    txn.open_table(ENDPOINTS)?
                        .insert(rec.id, encode(&rec)?.as_slice())?;
                    changed.push(rec);
                }
            }
        }
        release_unused_identities(&txn)?;
        txn.commit()?;
        Ok(changed)
    }

    pub fn policies(&self) -> Result<Vec<StoredPolicy>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(POLICIES)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (key, bytes) = item?;
            out.push(
                serde_json::from_slice(bytes.value())
                    .map_err(|e| StoreError::Db(format!("policy {}: {e}", key.value())))?,
            );
        }
        Ok(out)
    }

    /// The stored policies with the given keys (those that exist).
    pub fn policies_with_keys(&self, keys: &[String]) -> Result<Vec<StoredPolicy>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(POLICIES)?;
        let mut out = Vec::new();
        for key in keys {
            if let Some(bytes) = table.get(key.as_str())? {
                out.push(
                    serde_json::from_slice(bytes.value())
                        .map_err(|e| StoreError::Db(format!("policy {key}: {e}")))?,
                );
            }
        }
        Ok(out)
    }

    /// Adds or replaces policies (by kind, namespace and name) and bumps the
    /// policy revision, all or nothing. Returns the new revision.
    pub fn put_policies(&self, policies: &[StoredPolicy]) -> Result<u64, StoreError> {
        self.change_policies(|table| {
            for p in policies {
                let json = serde_json::to_vec(p).map_err(|e| StoreError::Db(e.to_string()))?;
                table.insert(p.key().as_str(), json.as_slice())?;
            }
            Ok(())
        })
    }

    /// Deletes the policies with the given keys (all when `None`); returns
    /// the new revision.
    pub fn delete_policies(&self, keys: Option<&[String]>) -> Result<u64, StoreError> {
        self.change_policies(|table| {
            let all: Vec<String> = table
                .iter()?
                .map(|item| item.map(|(k, _)| k.value().to_string()))
                .collect::<Result<_, _>>()?;
            for key in all {
                if keys.is_none_or(|keys| keys.contains(&key)) {
                    table.remove(key.as_str())?;
                }
            }
            Ok(())
        })
    }

    /// Adds or replaces `put` and deletes `delete` (by key) in one
    /// transaction, bumping the revision; returns the new revision.
    pub fn replace_policies(
        &self,
        put: &[StoredPolicy],
        delete: &[String],
    ) -> Result<u64, StoreError> {
        self.change_policies(|table| {
            for key in delete {
                table.remove(key.as_str())?;
            }
            for p in put {
                let json = serde_json::to_vec(p).map_err(|e| StoreError::Db(e.to_string()))?;
                table.insert(p.key().as_str(), json.as_slice())?;
            }
            Ok(())
        })
    }

    fn change_policies(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let rev = {
            let mut table = txn.open_table(POLICIES)?;
            f(&mut table)?;
            let mut meta = txn.open_table(META)?;
            let rev = meta.get("policy_revision")?.map(|v| v.value()).unwrap_or(0) + 1;
            meta.insert("policy_revision", rev)?;
            rev
        };
        txn.commit()?;
        Ok(rev)
    }

    pub fn policy_revision(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("policy_revision")?.map(|v| v.value()).unwrap_or(0))
    }

    /// Gives every prefix in `prefixes` a local CIDR identity (keeping the
    /// ones it had) and forgets prefixes no longer needed.
    pub fn sync_cidr_identities(
        &self,
        prefixes: &BTreeSet<ipnet::IpNet>,
    ) -> Result<BTreeMap<ipnet::IpNet, u32>, StoreError> {
        self.cidr_identities(prefixes, true)
    }

    /// The identities [`Self::sync_cidr_identities`] would give, without
    /// storing anything (its transaction is aborted).
    pub fn plan_cidr_identities(
        &self,
        prefixes: &BTreeSet<ipnet::IpNet>,
    ) -> Result<BTreeMap<ipnet::IpNet, u32>, StoreError> {
        self.cidr_identities(prefixes, false)
    }

    /// Like [`Self::sync_cidr_identities`] (`commit`) or
    /// [`Self::plan_cidr_identities`], given that the store holds exactly
    /// `current` (what the last sync returned): only the prefixes that come
    /// or go are read or written, so the cost follows the change, not the
    /// number of CIDR identities.
    pub fn change_cidr_identities(
        &self,
        current: &BTreeMap<ipnet::IpNet, u32>,
        prefixes: &BTreeSet<ipnet::IpNet>,
        commit: bool,
    ) -> Result<BTreeMap<ipnet::IpNet, u32>, StoreError> {
        let mut out = current.clone();
        out.retain(|p, _| prefixes.contains(p));
        let mut added = Vec::new();
        let new: Vec<ipnet::IpNet> = prefixes
            .iter()
            .filter(|p| !current.contains_key(*p))
            .copied()
            .collect();
        if !new.is_empty() {
            // As in `cidr_identities`: each new prefix, in order, gets the
            // smallest id nobody uses; the used ids sorted once, walked once.
            let mut used: Vec<u32> = out.values().copied().collect();
            used.sort_unstable();
            let mut used = used.into_iter().peekable();
            let mut id = FIRST_CIDR_IDENTITY;
            for prefix in new {
                while let Some(&u) = used.peek() {
                    if u < id {
                        used.next();
                    } else if u == id {
                        used.next();
                        id += 1;
                    } else {
                        break;
                    }
                }
                added.push((prefix, id));
                out.insert(prefix, id);
                id += 1;
            }
        }
        if !commit {
            // Nothing to read: `current` is what the store holds.
            return Ok(out);
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(CIDR_IDENTITIES)?;
            for gone in current.keys().filter(|p| !prefixes.contains(*p)) {
                table.remove(gone.to_string().as_str())?;
            }
            for (prefix, id) in &added {
                table.insert(prefix.to_string().as_str(), *id)?;
            }
        }
        txn.commit()?;
        Ok(out)
    }

    fn cidr_identities(
        &self,
        prefixes: &BTreeSet<ipnet::IpNet>,
        commit: bool,
    ) -> Result<BTreeMap<ipnet::IpNet, u32>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut out = BTreeMap::new();
        {
            let mut table = txn.open_table(CIDR_IDENTITIES)?;
            let mut existing = BTreeMap::new();
            for item in table.iter()? {
                let (k, v) = item?;
                existing.insert(k.value().to_string(), v.value());
            }
            let wanted: BTreeSet<String> = prefixes.iter().map(|p| p.to_string()).collect();
            for key in existing.keys().filter(|k| !wanted.contains(*k)) {
                table.remove(key.as_str())?;
            }
            let mut used: BTreeSet<u32> = existing
                .iter()
                .filter(|(k, _)| wanted.contains(*k))
                .map(|(_, v)| *v)
                .collect();
            // The search for a free id resumes where the last one ended
            // (ids only get used here), so n new prefixes on top of m cost
            // O(n + m), not O(n · m).
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
                        table.insert(key.as_str(), id)?;
                        id
                    }
                };
                out.insert(*prefix, id);
            }
        }
        if commit {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(out)
    }
}

fn read_endpoints(txn: &redb::WriteTransaction) -> Result<Vec<EndpointRecord>, StoreError> {
    let table = txn.open_table(ENDPOINTS)?;
    let mut out = Vec::new();
    for item in table.iter()? {
        let (id, bytes) = item?;
        out.push(
            serde_json::from_slice(bytes.value()).map_err(|e| StoreError::Corrupt {
                id: id.value(),
                reason: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

fn namespace_labels(
    txn: &redb::WriteTransaction,
    namespace: &str,
) -> Result<BTreeMap<String, String>, StoreError> {
    let table = txn.open_table(NAMESPACES)?;
    let labels = match table.get(namespace)? {
        Some(bytes) => serde_json::from_slice(bytes.value())
            .map_err(|e| StoreError::Db(format!("namespace {namespace}: {e}")))?,
        None => BTreeMap::new(),
    };
    Ok(labels)
}

/// The identity of a label set: the existing one, or the lowest free id.
fn identity_for(
    txn: &redb::WriteTransaction,
    labels: &BTreeMap<String, String>,
) -> Result<u32, StoreError> {
    let mut table = txn.open_table(IDENTITIES)?;
    let json = serde_json::to_vec(labels).map_err(|e| StoreError::Db(e.to_string()))?;
    let mut expected = FIRST_ENDPOINT_IDENTITY;
    let mut free = None;
    for item in table.iter()? {
        let (id, bytes) = item?;
        if bytes.value() == json.as_slice() {
            return Ok(id.value());
        }
        if free.is_none() && id.value() != expected {
            free = Some(expected);
        }
        expected = id.value() + 1;
    }
    let id = free.unwrap_or(expected);
    if id > LAST_ENDPOINT_IDENTITY {
        return Err(StoreError::IdentitiesExhausted);
    }
    table.insert(id, json.as_slice())?;
    Ok(id)
}

/// Removes identities no endpoint carries any more.
fn release_unused_identities(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let used: BTreeSet<u32> = read_endpoints(txn)?.iter().map(|r| r.identity).collect();
    let mut table = txn.open_table(IDENTITIES)?;
    let all: Vec<u32> = table
        .iter()?
        .map(|item| item.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()?;
    for id in all.into_iter().filter(|id| !used.contains(id)) {
        table.remove(id)?;
    }
    Ok(())
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
        for set in sets {
            let prefixes: BTreeSet<ipnet::IpNet> = set.into_iter().map(net).collect();
            let want = full.sync_cidr_identities(&prefixes).unwrap();
            let planned = changed
                .change_cidr_identities(&current, &prefixes, false)
                .unwrap();
            current = changed
                .change_cidr_identities(&current, &prefixes, true)
                .unwrap();
            assert_eq!((&planned, &current), (&want, &want));
            assert_eq!(changed.plan_cidr_identities(&prefixes).unwrap(), want);
        }
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
    fn a_second_open_of_the_same_database_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _first = Store::open(&path).unwrap();
        assert!(Store::open(&path).is_err());
    }
}
