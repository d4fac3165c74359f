//! The cluster's key layout in the kvstore (all under `cilia/`), in one
//! place; see the table in `docs/ARCHITECTURE.md` ("Cluster control plane").
//! Numbers in keys are zero-padded so key order is numeric order.

use std::collections::BTreeMap;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

/// `<name>` -> [`super::ClusterNode`] JSON, with the node's lease.
pub const NODES: &str = "cilia/nodes/";
/// `<ip>` -> `{identity, node, tunnel_endpoint, encap_key}`, with the owning node's lease.
pub const IPCACHE: &str = "cilia/ipcache/";
/// `<kind>/<namespace>/<name>` -> `StoredPolicy` JSON, no lease.
pub const POLICIES: &str = "cilia/policies/";
/// `<id:010>` -> canonical labels JSON, no lease.
pub const IDENTITY_IDS: &str = "cilia/identities/id/";
/// `<sha256 hex of the labels JSON>` -> the id in decimal, no lease.
pub const IDENTITY_LABELS: &str = "cilia/identities/labels/";
/// `<id:010>/<node>` -> empty, with the node's lease: who uses an identity.
pub const IDENTITY_REFS: &str = "cilia/identities/refs/";

pub fn node(name: &str) -> String {
    format!("{NODES}{name}")
}

pub fn ipcache(ip: IpAddr) -> String {
    format!("{IPCACHE}{ip}")
}

pub fn policy(key: &str) -> String {
    format!("{POLICIES}{key}")
}

pub fn identity_id(id: u32) -> String {
    format!("{IDENTITY_IDS}{id:010}")
}

pub fn identity_labels(labels_json: &[u8]) -> String {
    let digest = Sha256::digest(labels_json);
    let mut out = String::with_capacity(IDENTITY_LABELS.len() + 64);
    out.push_str(IDENTITY_LABELS);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

pub fn identity_ref(id: u32, node: &str) -> String {
    format!("{IDENTITY_REFS}{id:010}/{node}")
}

/// The canonical JSON of a label set (a `BTreeMap` serializes one way).
pub fn labels_json(labels: &BTreeMap<String, String>) -> Vec<u8> {
    // A map of strings always serializes.
    serde_json::to_vec(labels).unwrap_or_default()
}

/// The id of an `identities/id/` key.
pub fn id_of_id_key(key: &str) -> Option<u32> {
    key.strip_prefix(IDENTITY_IDS)?.parse().ok()
}

/// The id of an `identities/refs/<id>/<node>` key.
pub fn id_of_ref_key(key: &str) -> Option<u32> {
    key.strip_prefix(IDENTITY_REFS)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_labels_key_is_the_sha256_of_the_canonical_json() {
        // sha256("{}") is well known.
        assert_eq!(
            identity_labels(&labels_json(&BTreeMap::new())),
            "cilia/identities/labels/44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn ids_are_read_back_from_their_keys() {
        assert_eq!(id_of_id_key(&identity_id(256)), Some(256));
        assert_eq!(id_of_ref_key(&identity_ref(65535, "node-1")), Some(65535));
        assert_eq!(identity_id(300), "cilia/identities/id/0000000300");
    }
}
