//! The node's own addresses in the ipcache, as `host` (reserved identity 1).
//!
//! Packets the node's stack hands to an endpoint (`cil_to_container`) get
//! their source identity from the ipcache by source address. A process on
//! the node can send with any source address (IP_TRANSPARENT, raw sockets,
//! or an endpoint's address added to a node interface), so:
//!
//! * every address of the node's network namespace (all interfaces, both
//!   families, the router addresses included) is a `host` entry, /32 or
//!   /128; it takes precedence over a CIDR identity of the same prefix;
//! * local endpoints' addresses are **not** ipcache entries. Traffic between
//!   local endpoints never needs them (the sender's program knows its own
//!   identity and finds the receiver in `cilia_endpoints`); their only
//!   reader was the to-container lookup, where they let a node process
//!   that borrows an endpoint's address pass as that endpoint. Without
//!   them such a packet is `world` (or `host`, if the node holds the
//!   address).
//!
//! The node's addresses are re-read every [`NODE_ADDRESS_RESYNC`] (and at
//! start): an address added on the node is `world` — never an endpoint —
//! until the next resync makes it `host`.

use std::collections::BTreeSet;
use std::net::IpAddr;

use cilia_abi::{IpcacheKey, CILIA_ID_HOST};
use tracing::{info, warn};

use crate::endpoint::EndpointError;
use crate::policy::repository::PolicyState;

/// How often the node's addresses are re-read.
pub const NODE_ADDRESS_RESYNC: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) fn host_key(ip: IpAddr) -> IpcacheKey {
    IpcacheKey::new(ip, if ip.is_ipv4() { 32 } else { 128 })
}

impl PolicyState {
    /// The router addresses of the configured ranges.
    fn router_addresses(&self) -> Vec<IpAddr> {
        let mut out = vec![self.pools.v6.router()];
        out.extend(self.pools.v4.as_ref().map(|p| p.router()));
        out
    }

    /// Makes the ipcache's `host` entries the node's current addresses;
    /// returns how many entries changed.
    pub fn sync_node_addresses(&mut self) -> Result<usize, EndpointError> {
        let mut now: BTreeSet<IpAddr> = self.netdev.node_addresses()?.into_iter().collect();
        now.extend(self.router_addresses());
        let mut changed = 0;
        for ip in now.difference(&self.node_addrs) {
            self.dp().upsert_ipcache(host_key(*ip), CILIA_ID_HOST)?;
            changed += 1;
        }
        let gone: Vec<IpAddr> = self.node_addrs.difference(&now).copied().collect();
        for ip in gone {
            let key = host_key(ip);
            // A CIDR identity of the same prefix comes back into force.
            let cidr = self
                .cidr_ids
                .iter()
                .find(|(p, _)| IpcacheKey::new(p.network(), p.prefix_len()) == key)
                .map(|(_, id)| *id);
            match cidr {
                Some(id) => self.dp().upsert_ipcache(key, id)?,
                None => self.dp().remove_ipcache(key)?,
            }
            changed += 1;
        }
        if changed > 0 {
            info!(
                addresses = now.len(),
                changed, "node addresses synced to the ipcache as host"
            );
        }
        self.node_addrs = now;
        Ok(changed)
    }

    /// Whether `key` is a node address's `host` entry.
    pub(crate) fn is_node_key(&self, key: &IpcacheKey) -> bool {
        self.node_addrs.iter().any(|ip| host_key(*ip) == *key)
    }

    /// At start: drops what an earlier agent (or version) left in the
    /// ipcache that this one does not own any more: `host` entries of
    /// addresses the node no longer has, and entries for local endpoint
    /// addresses (no longer published, see the module doc).
    pub(crate) fn withdraw_stale_ipcache_entries(&mut self) -> Result<(), EndpointError> {
        let mut node: BTreeSet<IpAddr> = self.netdev.node_addresses()?.into_iter().collect();
        node.extend(self.router_addresses());
        let node_keys: BTreeSet<IpcacheKey> = node.into_iter().map(host_key).collect();
        let endpoint_keys: BTreeSet<IpcacheKey> = self
            .store
            .endpoints()?
            .iter()
            .flat_map(|r| r.ips())
            .map(host_key)
            .collect();
        let entries = self.dp().list_ipcache()?;
        for (key, value) in entries {
            let stale = value.identity == CILIA_ID_HOST || endpoint_keys.contains(&key);
            if stale && !node_keys.contains(&key) {
                if let Err(e) = self.dp().remove_ipcache(key) {
                    warn!(error = %e, "cannot withdraw a stale ipcache entry");
                }
            }
        }
        self.node_addrs.clear();
        Ok(())
    }
}
