//! Endpoint lifecycle: create, delete, restore after a restart.
//!
//! Invariants:
//! * A record is written (state `creating`, addresses allocated) before any
//!   device exists, so an agent that dies mid-create finds the record on
//!   restart and rolls it back: nothing half-made survives.
//! * A failed create undoes everything it did and changes no state.
//! * Delete removes the link pin, the devices, the map entries, and last
//!   the record: a crash during delete leaves a record to finish on restart.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cilia_abi::{EndpointConfig, EndpointInfo};
use cilia_api::{EndpointCreate, EndpointState};
use cilia_datapath::DatapathError;
use tracing::{info, warn};

use crate::datapath::Datapath;
use crate::ipam::Pool;
use crate::netdev::{self, Netdev, NetdevError, VethSpec};
use crate::store::{EndpointRecord, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Labels(#[from] cilia_api::labels::LabelError),
    #[error("ifname {0:?}: must be 1-15 characters, no '/', ':' or whitespace")]
    Ifname(String),
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("endpoint {0} not found")]
    NotFound(u16),
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Node-wide addressing the endpoints share.
#[derive(Debug, Clone)]
pub struct Pools {
    pub v6: Pool,
    pub v4: Option<Pool>,
}

pub struct EndpointManager {
    store: Store,
    datapath: Box<dyn Datapath>,
    netdev: Box<dyn Netdev>,
    pools: Pools,
}

fn config_of(rec: &EndpointRecord, ifindex: u32) -> EndpointConfig {
    EndpointConfig {
        ipv6: rec.ipv6.octets(),
        ipv4: rec.ipv4.map(|a| a.octets()).unwrap_or_default(),
        mac: rec.mac,
        node_mac: rec.host_mac,
        ifindex,
        identity: 0,
        endpoint_id: rec.id,
        enable_ipv4: u8::from(rec.ipv4.is_some()),
        pad: 0,
    }
}

fn info_of(rec: &EndpointRecord, ifindex: u32) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        identity: 0,
        endpoint_id: rec.id,
        flags: 0,
        mac: rec.mac,
        node_mac: rec.host_mac,
    }
}

impl EndpointManager {
    pub fn new(
        store: Store,
        datapath: Box<dyn Datapath>,
        netdev: Box<dyn Netdev>,
        pools: Pools,
    ) -> Self {
        Self {
            store,
            datapath,
            netdev,
            pools,
        }
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    pub fn datapath(&self) -> &dyn Datapath {
        self.datapath.as_ref()
    }

    pub fn list(&self) -> Result<Vec<EndpointRecord>, EndpointError> {
        Ok(self.store.endpoints()?)
    }

    pub fn get(&self, id: u16) -> Result<EndpointRecord, EndpointError> {
        self.list()?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or(EndpointError::NotFound(id))
    }

    pub fn allocated(&self) -> Result<std::collections::BTreeSet<IpAddr>, EndpointError> {
        Ok(self.store.allocated()?)
    }

    /// Sets up the node side shared by all endpoints (router addresses).
    pub fn ensure_router(&mut self) -> Result<(), EndpointError> {
        let r6 = match self.pools.v6.router() {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => unreachable!("IPv6 pool"),
        };
        let r4 = self.pools.v4.as_ref().and_then(|p| match p.router() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        Ok(self.netdev.ensure_router(r6, r4)?)
    }

    pub fn create(&mut self, req: EndpointCreate) -> Result<EndpointRecord, EndpointError> {
        cilia_api::labels::validate_labels(&req.labels)?;
        let ifname = req.ifname.clone().unwrap_or_else(|| "eth0".into());
        if !valid_ifname(&ifname) {
            return Err(EndpointError::Ifname(ifname));
        }
        let netns = netdev::resolve_netns(&req.netns)?;
        let labels: BTreeMap<String, String> = req.labels.clone();
        let rec =
            self.store
                .create_endpoint(&self.pools.v6, self.pools.v4.as_ref(), |id, v6, v4| {
                    EndpointRecord {
                        id,
                        netns: netns.display().to_string(),
                        ifname: ifname.clone(),
                        host_ifname: netdev::host_ifname(id),
                        ipv6: v6,
                        ipv4: v4,
                        labels,
                        mac: netdev::endpoint_mac(id, false),
                        host_mac: netdev::endpoint_mac(id, true),
                        state: EndpointState::Creating,
                        reason: None,
                        container_id: req.container_id.clone(),
                    }
                })?;
        match self.connect(&rec) {
            Ok(()) => {
                let mut ready = rec;
                ready.state = EndpointState::Ready;
                if let Err(e) = self.store.update_endpoint(&ready) {
                    self.rollback(&ready);
                    return Err(e.into());
                }
                info!(id = ready.id, ipv6 = %ready.ipv6, ipv4 = ?ready.ipv4, "endpoint created");
                Ok(ready)
            }
            Err(e) => {
                warn!(id = rec.id, error = %e, "endpoint creation failed; rolling back");
                self.rollback(&rec);
                Err(e)
            }
        }
    }

    /// Devices, program, map entries for a recorded endpoint.
    fn connect(&mut self, rec: &EndpointRecord) -> Result<(), EndpointError> {
        let router6 = match self.pools.v6.router() {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => unreachable!("IPv6 pool"),
        };
        let router4 = self.pools.v4.as_ref().and_then(|p| match p.router() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        let ifindex = self.netdev.create(&VethSpec {
            netns: rec.netns.clone().into(),
            host_ifname: rec.host_ifname.clone(),
            host_mac: rec.host_mac,
            ifname: rec.ifname.clone(),
            mac: rec.mac,
            ipv6: rec.ipv6,
            ipv4: rec.ipv4,
            router6,
            router4,
        })?;
        self.datapath
            .attach_endpoint(&config_of(rec, ifindex), &rec.host_ifname)?;
        for ip in rec.ips() {
            self.datapath.upsert_endpoint(ip, info_of(rec, ifindex))?;
        }
        Ok(())
    }

    /// Best-effort undo of everything `create` may have done.
    fn rollback(&mut self, rec: &EndpointRecord) {
        self.teardown(rec);
        if let Err(e) = self.store.delete_endpoint(rec) {
            warn!(id = rec.id, error = %e, "rollback could not remove the record");
        }
    }

    /// Removes the kernel side of an endpoint; logs what it cannot remove.
    fn teardown(&mut self, rec: &EndpointRecord) {
        for ip in rec.ips() {
            if let Err(e) = self.datapath.remove_endpoint(ip) {
                warn!(id = rec.id, %ip, error = %e, "cannot remove endpoint map entry");
            }
        }
        if let Err(e) = self.datapath.detach_endpoint(rec.id) {
            warn!(id = rec.id, error = %e, "cannot remove link pin");
        }
        if let Err(e) = self.netdev.delete(&rec.host_ifname) {
            warn!(id = rec.id, error = %e, "cannot delete veth");
        }
    }

    pub fn delete(&mut self, id: u16) -> Result<(), EndpointError> {
        let rec = self.get(id)?;
        for ip in rec.ips() {
            self.datapath.remove_endpoint(ip)?;
        }
        self.datapath.detach_endpoint(rec.id)?;
        self.netdev.delete(&rec.host_ifname)?;
        self.store.delete_endpoint(&rec)?;
        info!(id, "endpoint deleted");
        Ok(())
    }

    /// Reconciles recorded endpoints with the kernel after a (re)start:
    /// half-created ones are rolled back; ready ones keep running untouched
    /// (their pinned links never stopped), with map entries re-published and
    /// a missing attachment re-made; endpoints whose interface is gone are
    /// marked not ready with the reason.
    pub fn restore(&mut self) -> Result<(), EndpointError> {
        for mut rec in self.store.endpoints()? {
            if rec.state == EndpointState::Creating {
                warn!(
                    id = rec.id,
                    "rolling back endpoint left half-created by a previous agent"
                );
                self.rollback(&rec);
                continue;
            }
            let Some(ifindex) = self.netdev.ifindex(&rec.host_ifname) else {
                let reason = format!(
                    "interface {} no longer exists (namespace deleted?)",
                    rec.host_ifname
                );
                warn!(id = rec.id, %reason, "endpoint not ready");
                for ip in rec.ips() {
                    let _ = self.datapath.remove_endpoint(ip);
                }
                let _ = self.datapath.detach_endpoint(rec.id);
                rec.state = EndpointState::NotReady;
                rec.reason = Some(reason);
                self.store.update_endpoint(&rec)?;
                continue;
            };
            let result = (|| -> Result<(), EndpointError> {
                if !self.datapath.endpoint_attached(rec.id) {
                    self.datapath
                        .attach_endpoint(&config_of(&rec, ifindex), &rec.host_ifname)?;
                }
                for ip in rec.ips() {
                    self.datapath.upsert_endpoint(ip, info_of(&rec, ifindex))?;
                }
                Ok(())
            })();
            let (state, reason) = match result {
                Ok(()) => (EndpointState::Ready, None),
                Err(e) => (EndpointState::NotReady, Some(e.to_string())),
            };
            if rec.state != state || rec.reason != reason {
                rec.state = state;
                rec.reason = reason;
                self.store.update_endpoint(&rec)?;
            }
        }
        Ok(())
    }
}
