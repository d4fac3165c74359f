//! What the other nodes of the cluster mean for this node's datapath: the
//! ipcache entries of their pods and pod ranges (with the tunnel endpoint
//! that reaches them), the underlay addresses the overlay accepts tunnel
//! packets from, and the routes the node's own stack uses.
//!
//! Pure bookkeeping: [`Mesh`] is what the cluster watch has reported, and
//! its methods compute the desired state; the agent writes only the
//! difference to the datapath and to netlink (see `crate::cluster_link`).
//! Kept apart so the rules below are unit-tested without root or etcd:
//!
//! * a remote pod address is a /32 or /128 with the pod's identity and its
//!   node as the tunnel endpoint — the overlay never needs the source's
//!   entry (the VNI carries it); native routing and the sender's egress
//!   policy do;
//! * a remote node's pod ranges are `world` with the tunnel: a pod the
//!   watch has not reported yet is still reachable, but no policy that
//!   names identities lets it in before its identity is known (fail
//!   closed);
//! * a remote node's underlay addresses are `remote-node`, and are the only
//!   sources tunnel packets are accepted from;
//! * native routing picks the next hop of the packet's family among the
//!   node's addresses (an IPv6 pod range needs an IPv6 next hop).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use cilia_abi::{CILIA_ID_REMOTE_NODE, CILIA_ID_WORLD};
use ipnet::IpNet;

use crate::nodenet::RouteVia;
use crate::{NativeRoutes, TunnelMode};

/// Another node, as its record in the kvstore says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    /// Its underlay addresses (the first is its tunnel endpoint).
    pub node_ips: Vec<IpAddr>,
    /// Its pod ranges.
    pub ranges: Vec<IpNet>,
}

impl RemoteNode {
    fn tunnel_endpoint(&self) -> Option<IpAddr> {
        self.node_ips.first().copied()
    }

    /// The next hop toward `prefix` in native mode: its address of the
    /// prefix's family, else the tunnel endpoint.
    fn next_hop(&self, prefix: &IpNet) -> Option<IpAddr> {
        self.node_ips
            .iter()
            .find(|ip| ip.is_ipv4() == prefix.addr().is_ipv4())
            .copied()
            .or_else(|| self.tunnel_endpoint())
    }
}

/// A remote pod address, as the kvstore's ipcache says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemotePod {
    pub identity: u32,
    /// The node's tunnel endpoint, as published with the entry.
    pub tunnel_endpoint: IpAddr,
}

/// One desired ipcache entry: identity and where it lives (`None`: not
/// behind a tunnel, e.g. a node's own address).
pub type RemoteEntry = (u32, Option<IpAddr>);

/// The cluster as this node knows it.
#[derive(Debug, Clone)]
pub struct Mesh {
    pub mode: TunnelMode,
    pub native_routes: NativeRoutes,
    /// The node's own name (its records are never "remote").
    pub local: String,
    pub nodes: BTreeMap<String, RemoteNode>,
    /// Remote pod addresses, with the node that published them.
    pub pods: BTreeMap<IpAddr, (String, RemotePod)>,
}

impl Mesh {
    pub fn new(mode: TunnelMode, native_routes: NativeRoutes, local: String) -> Self {
        Self {
            mode,
            native_routes,
            local,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
        }
    }

    /// Records a node; its own name is ignored. Returns whether anything changed.
    pub fn upsert_node(&mut self, node: RemoteNode) -> bool {
        if node.name == self.local {
            return false;
        }
        let changed = self.nodes.get(&node.name) != Some(&node);
        self.nodes.insert(node.name.clone(), node);
        changed
    }

    /// Forgets a node and every pod it published.
    pub fn remove_node(&mut self, name: &str) -> bool {
        let before = self.pods.len();
        self.pods.retain(|_, (n, _)| n != name);
        self.nodes.remove(name).is_some() || self.pods.len() != before
    }

    pub fn upsert_pod(&mut self, ip: IpAddr, node: String, pod: RemotePod) -> bool {
        if node == self.local {
            return false;
        }
        let changed = self.pods.get(&ip) != Some(&(node.clone(), pod));
        self.pods.insert(ip, (node, pod));
        changed
    }

    pub fn remove_pod(&mut self, ip: IpAddr) -> bool {
        self.pods.remove(&ip).is_some()
    }

    /// Where a prefix of `node` is reached: the tunnel endpoint in overlay
    /// mode, the next hop of its family in native mode.
    fn reach(&self, node: &RemoteNode, prefix: &IpNet) -> Option<IpAddr> {
        match self.mode {
            TunnelMode::Vxlan => node.tunnel_endpoint(),
            TunnelMode::Disabled => node.next_hop(prefix),
        }
    }

    /// The ipcache entries the other nodes make.
    pub fn ipcache(&self) -> BTreeMap<IpNet, RemoteEntry> {
        let mut out = BTreeMap::new();
        for node in self.nodes.values() {
            for range in &node.ranges {
                if let Some(via) = self.reach(node, range) {
                    out.insert(range.trunc(), (CILIA_ID_WORLD, Some(via)));
                }
            }
        }
        for (ip, (name, pod)) in &self.pods {
            let prefix = IpNet::from(*ip);
            // The node's current record decides the way; until it is
            // known, the endpoint the entry was published with.
            let via = match self.nodes.get(name) {
                Some(node) => self.reach(node, &prefix),
                None => Some(pod.tunnel_endpoint),
            };
            out.insert(prefix, (pod.identity, via));
        }
        // Node addresses last: an address is a node's before anything else.
        for node in self.nodes.values() {
            for ip in &node.node_ips {
                out.insert(IpNet::from(*ip), (CILIA_ID_REMOTE_NODE, None));
            }
        }
        out
    }

    /// The underlay addresses tunnel packets are accepted from.
    pub fn peers(&self) -> BTreeSet<IpAddr> {
        self.nodes
            .values()
            .flat_map(|n| n.node_ips.iter().copied())
            .collect()
    }

    /// The routes of the node's stack toward the other nodes' pod ranges.
    pub fn routes(
        &self,
        vxlan_ifindex: Option<u32>,
        underlay_ifindex: u32,
    ) -> BTreeMap<IpNet, RouteVia> {
        let mut out = BTreeMap::new();
        for node in self.nodes.values() {
            for range in &node.ranges {
                let via = match (self.mode, self.native_routes) {
                    (TunnelMode::Vxlan, _) => match vxlan_ifindex {
                        Some(i) => RouteVia::Device(i),
                        None => continue,
                    },
                    (TunnelMode::Disabled, NativeRoutes::External) => continue,
                    (TunnelMode::Disabled, NativeRoutes::Auto) => {
                        let Some(gateway) = node.next_hop(range) else {
                            continue;
                        };
                        RouteVia::Gateway {
                            ifindex: underlay_ifindex,
                            gateway,
                        }
                    }
                };
                out.insert(range.trunc(), via);
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(name: &str, ips: &[&str], ranges: &[&str]) -> RemoteNode {
        RemoteNode {
            name: name.into(),
            node_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ranges: ranges.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    fn mesh(mode: TunnelMode) -> Mesh {
        let mut m = Mesh::new(mode, NativeRoutes::Auto, "node1".into());
        m.upsert_node(node(
            "node2",
            &["198.51.100.2", "2001:db8:100::2"],
            &["fd00:c1a:2::/112", "10.200.2.0/24"],
        ));
        m.upsert_pod(
            "10.200.2.5".parse().unwrap(),
            "node2".into(),
            RemotePod {
                identity: 300,
                tunnel_endpoint: "198.51.100.2".parse().unwrap(),
            },
        );
        m.upsert_pod(
            "fd00:c1a:2::5".parse().unwrap(),
            "node2".into(),
            RemotePod {
                identity: 300,
                tunnel_endpoint: "198.51.100.2".parse().unwrap(),
            },
        );
        m
    }

    #[test]
    fn overlay_entries_point_at_the_tunnel_endpoint_for_both_families() {
        let m = mesh(TunnelMode::Vxlan);
        let c = m.ipcache();
        let v4: IpAddr = "198.51.100.2".parse().unwrap();
        assert_eq!(c[&"10.200.2.5/32".parse().unwrap()], (300, Some(v4)));
        assert_eq!(c[&"fd00:c1a:2::5/128".parse().unwrap()], (300, Some(v4)));
        assert_eq!(
            c[&"10.200.2.0/24".parse().unwrap()],
            (CILIA_ID_WORLD, Some(v4))
        );
        assert_eq!(
            c[&"198.51.100.2/32".parse().unwrap()],
            (CILIA_ID_REMOTE_NODE, None)
        );
        assert_eq!(m.peers().len(), 2);
    }

    #[test]
    fn native_entries_and_routes_use_the_next_hop_of_the_family() {
        let m = mesh(TunnelMode::Disabled);
        let c = m.ipcache();
        let v6: IpAddr = "2001:db8:100::2".parse().unwrap();
        assert_eq!(c[&"fd00:c1a:2::5/128".parse().unwrap()], (300, Some(v6)));
        let routes = m.routes(None, 7);
        assert_eq!(
            routes[&"fd00:c1a:2::/112".parse().unwrap()],
            RouteVia::Gateway {
                ifindex: 7,
                gateway: v6
            }
        );
        let mut ext = m.clone();
        ext.native_routes = NativeRoutes::External;
        assert!(ext.routes(None, 7).is_empty());
    }

    #[test]
    fn a_removed_node_takes_its_pods_and_the_own_node_is_never_remote() {
        let mut m = mesh(TunnelMode::Vxlan);
        assert!(!m.upsert_node(node("node1", &["198.51.100.1"], &["10.200.1.0/24"])));
        assert!(m.remove_node("node2"));
        assert!(m.ipcache().is_empty());
        assert!(m.peers().is_empty());
        assert!(m.routes(Some(3), 7).is_empty());
    }
}
