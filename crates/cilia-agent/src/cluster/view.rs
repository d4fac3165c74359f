//! What this node has told the agent about the cluster: the nodes (its own
//! included, for `nodes()`), and the other nodes' ipcache entries and all
//! policies as last emitted. Pure bookkeeping: a full listing or one watch
//! event goes in, the [`ClusterEvent`]s that bring the agent from what it
//! was told to what is now come out. After a reconnect a relist is diffed
//! here, so the agent sees deletes for what vanished while it was away and
//! never the same state twice.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{ClusterEvent, ClusterNode, RemoteIp};
use crate::store::StoredPolicy;

#[derive(Debug, Default)]
pub(crate) struct View {
    /// Every node, this one included.
    pub nodes: BTreeMap<String, ClusterNode>,
    /// Other nodes' entries, as emitted.
    pub ipcache: BTreeMap<IpAddr, RemoteIp>,
    /// By `StoredPolicy::key()`, as emitted.
    pub policies: BTreeMap<String, StoredPolicy>,
    /// Cluster identities and their labels, as emitted.
    pub identities: BTreeMap<u32, BTreeMap<String, String>>,
}

/// Whether two records of a node differ in more than their heartbeat (a
/// heartbeat alone is no news for the datapath).
fn node_changed(old: Option<&ClusterNode>, new: &ClusterNode) -> bool {
    match old {
        None => true,
        Some(old) => {
            let mut old = old.clone();
            old.heartbeat_ms = new.heartbeat_ms;
            old != *new
        }
    }
}

impl View {
    /// Replaces everything with a full listing; the events of the difference.
    pub fn replace(
        &mut self,
        own: &str,
        nodes: BTreeMap<String, ClusterNode>,
        ipcache: BTreeMap<IpAddr, RemoteIp>,
        policies: BTreeMap<String, StoredPolicy>,
        identities: BTreeMap<u32, BTreeMap<String, String>>,
    ) -> Vec<ClusterEvent> {
        let mut out = Vec::new();
        let gone: Vec<u32> = self
            .identities
            .keys()
            .filter(|id| !identities.contains_key(*id))
            .copied()
            .collect();
        for id in gone {
            out.extend(self.identity_delete(id));
        }
        // Identities before the entries that carry them.
        for (id, labels) in identities {
            out.extend(self.identity_put(id, labels));
        }
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !nodes.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            out.extend(self.node_delete(own, &name));
        }
        for node in nodes.into_values() {
            out.extend(self.node_put(own, node));
        }
        let gone: Vec<IpAddr> = self
            .ipcache
            .keys()
            .filter(|ip| ipcache.get(ip).is_none_or(|r| r.node == own))
            .copied()
            .collect();
        for ip in gone {
            out.extend(self.ip_delete(ip));
        }
        for r in ipcache.into_values() {
            out.extend(self.ip_put(own, r));
        }
        let gone: Vec<String> = self
            .policies
            .keys()
            .filter(|k| !policies.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            out.extend(self.policy_delete(&key));
        }
        for p in policies.into_values() {
            out.extend(self.policy_put(p));
        }
        out
    }

    pub fn node_put(&mut self, own: &str, node: ClusterNode) -> Option<ClusterEvent> {
        let changed = node_changed(self.nodes.get(&node.name), &node);
        self.nodes.insert(node.name.clone(), node.clone());
        (changed && node.name != own).then_some(ClusterEvent::NodeUpsert(node))
    }

    pub fn node_delete(&mut self, own: &str, name: &str) -> Option<ClusterEvent> {
        self.nodes.remove(name)?;
        (name != own).then(|| ClusterEvent::NodeDelete(name.to_string()))
    }

    /// An entry of this node is not news, but one that was another node's
    /// (the address moved here) is taken back.
    pub fn ip_put(&mut self, own: &str, r: RemoteIp) -> Option<ClusterEvent> {
        if r.node == own {
            return self.ip_delete(r.ip);
        }
        if self.ipcache.get(&r.ip) == Some(&r) {
            return None;
        }
        self.ipcache.insert(r.ip, r.clone());
        Some(ClusterEvent::IpcacheUpsert(r))
    }

    pub fn ip_delete(&mut self, ip: IpAddr) -> Option<ClusterEvent> {
        self.ipcache.remove(&ip)?;
        Some(ClusterEvent::IpcacheDelete(ip))
    }

    pub fn policy_put(&mut self, p: StoredPolicy) -> Option<ClusterEvent> {
        let key = p.key();
        if self.policies.get(&key) == Some(&p) {
            return None;
        }
        self.policies.insert(key, p.clone());
        Some(ClusterEvent::PolicyUpsert(p))
    }

    pub fn identity_put(
        &mut self,
        id: u32,
        labels: BTreeMap<String, String>,
    ) -> Option<ClusterEvent> {
        if self.identities.get(&id) == Some(&labels) {
            return None; // an allocation touching the key: no news
        }
        self.identities.insert(id, labels.clone());
        Some(ClusterEvent::IdentityUpsert(id, labels))
    }

    pub fn identity_delete(&mut self, id: u32) -> Option<ClusterEvent> {
        self.identities.remove(&id)?;
        Some(ClusterEvent::IdentityDelete(id))
    }

    pub fn policy_delete(&mut self, key: &str) -> Option<ClusterEvent> {
        self.policies.remove(key)?;
        Some(ClusterEvent::PolicyDelete(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, heartbeat_ms: u64) -> ClusterNode {
        ClusterNode {
            name: name.into(),
            node_ips: vec!["198.51.100.1".parse().unwrap()],
            ipv6_range: "fd00:c1a:1::/112".parse().unwrap(),
            ipv4_range: None,
            health_ips: vec![],
            peer_api: None,
            tunnel: "vxlan".into(),
            boot_id: "b".into(),
            heartbeat_ms,
        }
    }

    fn remote(ip: &str, node: &str) -> RemoteIp {
        RemoteIp {
            ip: ip.parse().unwrap(),
            identity: 300,
            node: node.into(),
            tunnel_endpoint: "198.51.100.2".parse().unwrap(),
            encap_key: 0,
        }
    }

    #[test]
    fn a_heartbeat_alone_is_no_event_and_the_own_node_is_cached_but_not_emitted() {
        let mut v = View::default();
        assert!(v.node_put("a", node("a", 1)).is_none());
        assert!(v.node_put("a", node("b", 1)).is_some());
        assert!(v.node_put("a", node("b", 2)).is_none());
        let mut moved = node("b", 3);
        moved.node_ips = vec!["198.51.100.9".parse().unwrap()];
        assert!(matches!(
            v.node_put("a", moved),
            Some(ClusterEvent::NodeUpsert(_))
        ));
        assert_eq!(v.nodes.len(), 2);
    }

    #[test]
    fn a_relist_emits_deletes_for_what_vanished_and_upserts_for_what_changed() {
        let mut v = View::default();
        v.replace(
            "a",
            [
                ("b".to_string(), node("b", 1)),
                ("c".to_string(), node("c", 1)),
            ]
            .into(),
            [(remote("fd00::1", "b").ip, remote("fd00::1", "b"))].into(),
            BTreeMap::new(),
            BTreeMap::new(),
        );
        let events = v.replace(
            "a",
            [("b".to_string(), node("b", 5))].into(),
            [
                (remote("fd00::1", "a").ip, remote("fd00::1", "a")),
                (remote("fd00::2", "b").ip, remote("fd00::2", "b")),
            ]
            .into(),
            BTreeMap::new(),
            BTreeMap::new(),
        );
        assert_eq!(
            events,
            vec![
                ClusterEvent::NodeDelete("c".into()),
                ClusterEvent::IpcacheDelete("fd00::1".parse().unwrap()),
                ClusterEvent::IpcacheUpsert(remote("fd00::2", "b")),
            ]
        );
    }
}
