//! Loading the fixtures, as the client would decode them.

use std::path::PathBuf;

use kube::core::{DynamicObject, ObjectList, WatchEvent};
use serde::de::DeserializeOwned;

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn text(name: &str) -> String {
    std::fs::read_to_string(path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A JSON object, decoded into the type the client decodes it into.
pub fn object<T: DeserializeOwned>(name: &str) -> T {
    serde_json::from_str(&text(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A JSON object as an untyped value (for tests that edit it).
pub fn value(name: &str) -> serde_json::Value {
    object(name)
}

pub fn list<T: DeserializeOwned + Clone>(name: &str) -> ObjectList<T> {
    object(name)
}

/// A watch stream: one JSON event per line, as the server sends them.
pub fn events<T: DeserializeOwned>(name: &str) -> Vec<WatchEvent<T>> {
    text(name)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{name} line {}: {e}", i + 1))
        })
        .collect()
}

pub fn dynamic(name: &str) -> DynamicObject {
    object(name)
}

#[test]
fn every_fixture_decodes_as_the_client_decodes_it() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let _: Pod = object("pod-deathstar.json");
    let _: Pod = object("pod-reserved-label.json");
    let _: Namespace = object("namespace-default.json");
    for name in [
        "networkpolicy-rule1-np.json",
        "cnp-rule1.json",
        "cnp-unsupported.json",
        "ccnp-host-ingress.json",
    ] {
        let _ = dynamic(name);
    }
    assert_eq!(list::<Pod>("pods-list.json").items.len(), 3);
    assert_eq!(list::<Pod>("pods-relist.json").items.len(), 3);
    assert_eq!(events::<Pod>("watch-pods.jsonl").len(), 4);
    assert_eq!(events::<Pod>("watch-pods-expired.jsonl").len(), 2);
    assert_eq!(events::<DynamicObject>("watch-cnp.jsonl").len(), 5);
}
