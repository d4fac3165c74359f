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
}

impl EndpointRecord {
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
            // Lowest free id: ids are kept sorted by the table.
            let mut expected = 1u16;
            for item in endpoints.iter()? {
                let (k, _) = item?;
                if k.value() != expected {
                    break;
                }
                expected = expected.checked_add(1).ok_or(StoreError::IdsExhausted)?;
            }
            let id = expected;
            let v6 = match pool6.next_free(&used)? {
                IpAddr::V6(v6) => v6,
                IpAddr::V4(_) => unreachable!("an IPv6 pool yields IPv6 addresses"),
            };
            let v4 = match pool4.map(|p| p.next_free(&used)).transpose()? {
                Some(IpAddr::V4(v4)) => Some(v4),
                Some(IpAddr::V6(_)) => unreachable!("an IPv4 pool yields IPv4 addresses"),
                None => None,
            };
            let rec = make(id, v6, v4);
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

    /// Removes an endpoint and frees its addresses, in one transaction.
    pub fn delete_endpoint(&self, rec: &EndpointRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut endpoints = txn.open_table(ENDPOINTS)?;
            let mut ipam = txn.open_table(IPAM)?;
            endpoints.remove(rec.id)?;
            for ip in rec.ips() {
                ipam.remove(ip.to_string().as_str())?;
            }
        }
        txn.commit()?;
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
        assert_eq!(c.id, 1, "lowest free id is reused");
        assert_eq!(c.ipv6, a.ipv6, "freed address is reused");
    }

    #[test]
    fn a_second_open_of_the_same_database_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _first = Store::open(&path).unwrap();
        assert!(Store::open(&path).is_err());
    }
}
