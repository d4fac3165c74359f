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

use cilia_abi::{IpcacheEntry, CILIA_ID_HOST};
use ipnet::IpNet;
use tracing::{info, warn};

use crate::endpoint::EndpointError;
use crate::policy::repository::PolicyState;

/// How often the node's addresses are re-read.
pub const NODE_ADDRESS_RESYNC: std::time::Duration = std::time::Duration::from_secs(5);

/// The /32 or /128 of an address.
pub(crate) fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
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
        let mut publish: Vec<IpcacheEntry> = now
            .difference(&self.node_addrs)
            .map(|ip| IpcacheEntry {
                prefix: host_prefix(*ip),
                identity: CILIA_ID_HOST,
                tunnel: None,
            })
            .collect();
        let mut withdraw = Vec::new();
        for ip in self.node_addrs.difference(&now) {
            let prefix = host_prefix(*ip);
            // A CIDR identity of the same prefix comes back into force.
            match self.cidr_ids.iter().find(|(p, _)| p.trunc() == prefix) {
                Some((_, id)) => publish.push(IpcacheEntry {
                    prefix,
                    identity: *id,
                    tunnel: None,
                }),
                None => withdraw.push(prefix),
            }
        }
        let changed = publish.len() + withdraw.len();
        self.dp().publish_ipcache(&publish)?;
        self.dp().withdraw_ipcache(&withdraw)?;
        if changed > 0 {
            info!(
                addresses = now.len(),
                changed, "node addresses synced to the ipcache as host"
            );
        }
        self.node_addrs = now;
        Ok(changed)
    }

    /// Whether `prefix` is a node address's `host` entry.
    pub(crate) fn is_node_prefix(&self, prefix: &IpNet) -> bool {
        let prefix = prefix.trunc();
        self.node_addrs.iter().any(|ip| host_prefix(*ip) == prefix)
    }

    /// At start: drops what an earlier agent (or version) left in the
    /// ipcache that this one does not own any more: `host` entries of
    /// addresses the node no longer has, and entries for local endpoint
    /// addresses (no longer published, see the module doc).
    pub(crate) fn withdraw_stale_ipcache_entries(&mut self) -> Result<(), EndpointError> {
        let mut node: BTreeSet<IpAddr> = self.netdev.node_addresses()?.into_iter().collect();
        node.extend(self.router_addresses());
        let node_prefixes: BTreeSet<IpNet> = node.into_iter().map(host_prefix).collect();
        let endpoint_prefixes: BTreeSet<IpNet> = self
            .store
            .endpoints()?
            .iter()
            .flat_map(|r| r.ips())
            .map(host_prefix)
            .collect();
        let stale: Vec<IpNet> = self
            .dp()
            .ipcache()?
            .into_iter()
            .filter(|e| e.identity == CILIA_ID_HOST || endpoint_prefixes.contains(&e.prefix))
            .map(|e| e.prefix)
            .filter(|p| !node_prefixes.contains(p))
            .collect();
        if let Err(e) = self.dp().withdraw_ipcache(&stale) {
            warn!(error = %e, "cannot withdraw stale ipcache entries");
        }
        self.node_addrs.clear();
        Ok(())
    }
}
