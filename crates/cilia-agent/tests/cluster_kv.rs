//! The cluster control plane (`cilia_agent::cluster`) against a kvstore:
//! two clients play nodes "a" and "b" of one cluster. Each behaviour is a
//! scenario written once and run on a shared embedded store (`redb_*`) and
//! on a real etcd (`etcd_*`: an `etcd` on 127.0.0.1 with free ports and a
//! temporary data dir, killed at the end; without an `etcd` binary these
//! are skipped with a printed reason, except under `CI=true`, where they
//! fail). Every wait is bounded.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cilia_agent::cluster::{keys, ClusterClient, ClusterConfig, ClusterEvent};
use cilia_agent::ipam::Pool;
use cilia_agent::store::{EndpointRecord, Store, StoredPolicy};
use cilia_kvstore::{EtcdStore, KvError, KvStore, RedbStore};
use cilia_testnet::Etcd;

/// The longest a test waits for something that must happen.
const WAIT: Duration = Duration::from_secs(20);

type Connect = Arc<dyn Fn() -> Result<Box<dyn KvStore>, KvError> + Send + Sync>;

fn config(name: &str, n: u8) -> ClusterConfig {
    let mut c = ClusterConfig::new(
        name,
        vec![format!("198.51.100.{n}").parse().unwrap()],
        format!("fd00:c1a:{n}::/112").parse().unwrap(),
    );
    c.ipv4_range = Some(format!("10.200.{n}.0/24").parse().unwrap());
    c.lease_ttl = Duration::from_secs(2);
    c.heartbeat = Duration::from_millis(500);
    c.identity_gc_interval = Duration::from_millis(200);
    c.identity_gc_grace = Duration::from_millis(500);
    c.kvstore = "test".into();
    c
}

/// A started client that is shut down when the test ends (also on panic).
struct Node {
    client: ClusterClient,
    events: Receiver<ClusterEvent>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.client.shutdown();
    }
}

fn start(config: ClusterConfig, connect: &Connect) -> Node {
    let connect = connect.clone();
    let (client, events) = ClusterClient::start(config, move || connect());
    Node { client, events }
}

impl Node {
    /// Events until one matches `pred` (which is returned).
    fn wait_for(&self, what: &str, mut pred: impl FnMut(&ClusterEvent) -> bool) -> ClusterEvent {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) => continue,
                Err(_) => panic!("{what}: not seen within {WAIT:?}"),
            }
        }
    }

    fn synced(&self) {
        self.wait_for("Synced", |e| *e == ClusterEvent::Synced);
    }
}

fn labels(app: &str) -> BTreeMap<String, String> {
    [("app".to_string(), app.to_string())].into()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn policy(name: &str) -> StoredPolicy {
    StoredPolicy {
        kind: "CiliumNetworkPolicy".into(),
        namespace: Some("default".into()),
        name: name.into(),
        yaml: format!("metadata: {{name: {name}}}"),
        origin: None,
    }
}

/// Until `f` holds, at most [`WAIT`].
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- scenarios ----

fn nodes_see_each_other_and_each_others_ipcache(connect: &Connect) {
    let a = start(config("a", 1), connect);
    let b = start(config("b", 2), connect);
    a.wait_for("a connects", |e| *e == ClusterEvent::Connected);
    b.wait_for(
        "b sees a",
        |e| matches!(e, ClusterEvent::NodeUpsert(n) if n.name == "a"),
    );
    a.wait_for(
        "a sees b",
        |e| matches!(e, ClusterEvent::NodeUpsert(n) if n.name == "b"),
    );
    a.client
        .set_local_ips(vec![(ip("fd00:c1a:1::5"), 300), (ip("10.200.1.5"), 300)]);
    let mut seen = BTreeMap::new();
    while seen.len() < 2 {
        if let ClusterEvent::IpcacheUpsert(r) = b.wait_for("b sees a's endpoints", |e| {
            matches!(e, ClusterEvent::IpcacheUpsert(_))
        }) {
            seen.insert(r.ip, r);
        }
    }
    let r = &seen[&ip("fd00:c1a:1::5")];
    assert_eq!(
        (r.identity, r.node.as_str(), r.tunnel_endpoint),
        (300, "a", ip("198.51.100.1"))
    );
    assert!(seen.contains_key(&ip("10.200.1.5")));
    // Gone from the desired set: deleted.
    a.client.set_local_ips(vec![(ip("fd00:c1a:1::5"), 300)]);
    b.wait_for("b sees the v4 endpoint go", |e| {
        *e == ClusterEvent::IpcacheDelete(ip("10.200.1.5"))
    });
    eventually("both know both nodes", || {
        a.client.nodes().len() == 2 && b.client.nodes().len() == 2
    });
    let na = b
        .client
        .nodes()
        .into_iter()
        .find(|n| n.name == "a")
        .unwrap();
    assert_eq!(na.tunnel_endpoint(), Some(ip("198.51.100.1")));
    assert_eq!(na.ipv6_range, "fd00:c1a:1::/112".parse().unwrap());
    // A node never hears of its own entries.
    while let Ok(ev) = a.events.try_recv() {
        assert!(
            !matches!(&ev, ClusterEvent::IpcacheUpsert(r) if r.node == "a"),
            "{ev:?}"
        );
        assert!(
            !matches!(&ev, ClusterEvent::NodeUpsert(n) if n.name == "a"),
            "{ev:?}"
        );
    }
    let status = a.client.status();
    assert!(status.connected && status.lease.is_some(), "{status:?}");
    assert_eq!(status.nodes, 2);
}

fn the_same_labels_get_the_same_identity_even_when_allocated_at_once(connect: &Connect) {
    let a = start(config("a", 1), connect);
    let b = start(config("b", 2), connect);
    a.synced();
    b.synced();
    let id = a.client.allocate_identity(&labels("web")).unwrap();
    assert!((256..=65535).contains(&id));
    assert_eq!(b.client.allocate_identity(&labels("web")).unwrap(), id);
    let other = b.client.allocate_identity(&labels("db")).unwrap();
    assert_ne!(other, id);
    for round in 0..20 {
        let l = labels(&format!("race-{round}"));
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = [a.client.clone(), b.client.clone()]
            .into_iter()
            .map(|c| {
                let (l, barrier) = (l.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    c.allocate_identity(&l).unwrap()
                })
            })
            .collect();
        let ids: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(ids[0], ids[1], "round {round}");
    }
}

fn an_identity_is_collected_once_no_node_uses_it(connect: &Connect, kv: &dyn KvStore) {
    let a = start(config("a", 1), connect);
    let b = start(config("b", 2), connect);
    a.synced();
    b.synced();
    let id = a.client.allocate_identity(&labels("gc")).unwrap();
    assert_eq!(b.client.allocate_identity(&labels("gc")).unwrap(), id);
    a.client.release_identity(id);
    // b still uses it: longer than the grace period, it stays.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(kv.get(&keys::identity_id(id)).unwrap().is_some());
    b.client.release_identity(id);
    eventually("the unused identity is deleted", || {
        kv.get(&keys::identity_id(id)).unwrap().is_none()
    });
    assert!(kv
        .list_prefix(keys::IDENTITY_LABELS)
        .unwrap()
        .kvs
        .is_empty());
    // The labels come back as a new allocation.
    assert!(a.client.allocate_identity(&labels("gc")).is_ok());
}

fn a_node_whose_lease_expires_disappears_with_its_endpoints(connect: &Connect) {
    let a = start(config("a", 1), connect);
    let b = start(config("b", 2), connect);
    a.synced();
    a.client.set_local_ips(vec![(ip("fd00:c1a:1::7"), 300)]);
    b.wait_for(
        "b sees a's endpoint",
        |e| matches!(e, ClusterEvent::IpcacheUpsert(r) if r.node == "a"),
    );
    // A plain shutdown leaves the lease to expire (no revoke).
    a.client.shutdown();
    b.wait_for("a's endpoint goes", |e| {
        *e == ClusterEvent::IpcacheDelete(ip("fd00:c1a:1::7"))
    });
    b.wait_for("a goes", |e| *e == ClusterEvent::NodeDelete("a".into()));
    eventually("b knows only itself", || b.client.nodes().len() == 1);
}

fn a_node_that_leaves_is_gone_at_once(connect: &Connect) {
    let a = start(config("a", 1), connect);
    let b = start(config("b", 2), connect);
    a.synced();
    b.wait_for(
        "b sees a",
        |e| matches!(e, ClusterEvent::NodeUpsert(n) if n.name == "a"),
    );
    let t = Instant::now();
    a.client.leave().unwrap();
    b.wait_for("a goes", |e| *e == ClusterEvent::NodeDelete("a".into()));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

fn a_lost_lease_is_replaced_and_everything_put_again(connect: &Connect, kv: &dyn KvStore) {
    let a = start(config("a", 1), connect);
    let b = start(config("b", 2), connect);
    a.synced();
    let id = a.client.allocate_identity(&labels("resync")).unwrap();
    a.client.set_local_ips(vec![(ip("fd00:c1a:1::9"), id)]);
    b.wait_for(
        "b sees a's endpoint",
        |e| matches!(e, ClusterEvent::IpcacheUpsert(r) if r.node == "a"),
    );
    let lease = a.client.status().lease.unwrap();
    kv.lease_revoke(lease).unwrap();
    b.wait_for("a's endpoint goes with its lease", |e| {
        matches!(e, ClusterEvent::IpcacheDelete(_))
    });
    b.wait_for(
        "a's endpoint comes back",
        |e| matches!(e, ClusterEvent::IpcacheUpsert(r) if r.node == "a" && r.identity == id),
    );
    eventually("a holds a new lease and its ref again", || {
        a.client.status().lease.is_some_and(|l| l != lease)
            && kv.get(&keys::identity_ref(id, "a")).unwrap().is_some()
    });
    eventually("b knows a again", || {
        b.client.nodes().iter().any(|n| n.name == "a")
    });
}

fn policies_put_by_one_node_reach_the_other(connect: &Connect) {
    let a = start(config("a", 1), connect);
    let b = start(config("b", 2), connect);
    a.synced();
    b.synced();
    a.client
        .put_policies(&[policy("p1"), policy("p2")])
        .unwrap();
    b.wait_for("b gets p1", |e| {
        *e == ClusterEvent::PolicyUpsert(policy("p1"))
    });
    b.wait_for("b gets p2", |e| {
        *e == ClusterEvent::PolicyUpsert(policy("p2"))
    });
    a.wait_for("a gets its own p1 too", |e| {
        *e == ClusterEvent::PolicyUpsert(policy("p1"))
    });
    a.client.delete_policies(&[policy("p1").key()]).unwrap();
    b.wait_for("b loses p1", |e| {
        *e == ClusterEvent::PolicyDelete(policy("p1").key())
    });
    assert_eq!(b.client.policies().unwrap(), vec![policy("p2")]);
}

fn existing_local_identities_join_or_conflict(connect: &Connect) {
    let a = start(config("a", 1), connect);
    let b = start(config("b", 2), connect);
    a.synced();
    b.synced();
    let local_a: BTreeMap<u32, _> = [(1000, labels("legacy"))].into();
    assert!(a.client.reconcile_identities(&local_a).is_empty());
    assert_eq!(b.client.allocate_identity(&labels("legacy")).unwrap(), 1000);
    let local_b: BTreeMap<u32, _> = [(1000, labels("other")), (1001, labels("legacy"))].into();
    let conflicts = b.client.reconcile_identities(&local_b);
    assert_eq!(
        conflicts.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![1000, 1001],
        "{conflicts:?}"
    );
}

// ---- embedded store ----

fn shared_redb() -> (tempfile::TempDir, Arc<RedbStore>, Connect) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(&dir.path().join("cluster.redb")).unwrap());
    let shared = store.clone();
    let connect: Connect = Arc::new(move || Ok(Box::new(shared.clone()) as Box<dyn KvStore>));
    (dir, store, connect)
}

#[test]
fn redb_nodes_see_each_other_and_each_others_ipcache() {
    let (_d, _s, connect) = shared_redb();
    nodes_see_each_other_and_each_others_ipcache(&connect);
}

#[test]
fn redb_the_same_labels_get_the_same_identity_even_when_allocated_at_once() {
    let (_d, _s, connect) = shared_redb();
    the_same_labels_get_the_same_identity_even_when_allocated_at_once(&connect);
}

#[test]
fn redb_an_identity_is_collected_once_no_node_uses_it() {
    let (_d, s, connect) = shared_redb();
    an_identity_is_collected_once_no_node_uses_it(&connect, &*s);
}

#[test]
fn redb_a_node_whose_lease_expires_disappears_with_its_endpoints() {
    let (_d, _s, connect) = shared_redb();
    a_node_whose_lease_expires_disappears_with_its_endpoints(&connect);
}

#[test]
fn redb_a_node_that_leaves_is_gone_at_once() {
    let (_d, _s, connect) = shared_redb();
    a_node_that_leaves_is_gone_at_once(&connect);
}

#[test]
fn redb_a_lost_lease_is_replaced_and_everything_put_again() {
    let (_d, s, connect) = shared_redb();
    a_lost_lease_is_replaced_and_everything_put_again(&connect, &*s);
}

#[test]
fn redb_policies_put_by_one_node_reach_the_other() {
    let (_d, _s, connect) = shared_redb();
    policies_put_by_one_node_reach_the_other(&connect);
}

#[test]
fn redb_existing_local_identities_join_or_conflict() {
    let (_d, _s, connect) = shared_redb();
    existing_local_identities_join_or_conflict(&connect);
}

#[test]
fn without_a_kvstore_the_client_waits_and_allocation_says_why() {
    let connect: Connect = Arc::new(|| {
        Err(KvError::Unreachable {
            endpoints: "http://192.0.2.1:2379".into(),
            reason: "connection refused".into(),
        })
    });
    let mut c = config("a", 1);
    c.kvstore = "etcd http://192.0.2.1:2379".into();
    let a = start(c, &connect);
    eventually("the connect error is in the status", || {
        a.client.status().last_error.is_some()
    });
    let status = a.client.status();
    assert!(!status.connected);
    let err = a.client.allocate_identity(&labels("web")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "kvstore etcd http://192.0.2.1:2379 unreachable: cannot allocate a cluster-wide identity for labels {\"app\":\"web\"}"
        ),
        "{msg}"
    );
    // The desired state is kept for later; nothing blocks.
    a.client.set_local_ips(vec![(ip("fd00:c1a:1::5"), 300)]);
    a.client.release_identity(300);
    assert!(a.client.put_policies(&[policy("p")]).is_err());
}

// ---- etcd ----

/// What the scenarios connect with, for `etcd`.
fn etcd_connect(etcd: &Etcd) -> Connect {
    let endpoints = [etcd.endpoint()];
    Arc::new(move || EtcdStore::connect(&endpoints).map(|s| Box::new(s) as Box<dyn KvStore>))
}

fn etcd_store(etcd: &Etcd) -> EtcdStore {
    EtcdStore::connect(&[etcd.endpoint()]).unwrap()
}

/// A healthy etcd on loopback, killed and its data dir removed on drop;
/// returns from the test when there is no etcd binary outside CI.
macro_rules! etcd {
    ($test:literal) => {{
        if !cilia_testnet::require_etcd($test) {
            return;
        }
        Etcd::start_on_loopback().unwrap_or_else(|e| panic!("{}: {e}", $test))
    }};
}

#[test]
fn etcd_nodes_see_each_other_and_each_others_ipcache() {
    let e = etcd!("etcd_nodes_see_each_other_and_each_others_ipcache");
    nodes_see_each_other_and_each_others_ipcache(&etcd_connect(&e));
}

#[test]
fn etcd_the_same_labels_get_the_same_identity_even_when_allocated_at_once() {
    let e = etcd!("etcd_the_same_labels_get_the_same_identity_even_when_allocated_at_once");
    the_same_labels_get_the_same_identity_even_when_allocated_at_once(&etcd_connect(&e));
}

#[test]
fn etcd_an_identity_is_collected_once_no_node_uses_it() {
    let e = etcd!("etcd_an_identity_is_collected_once_no_node_uses_it");
    an_identity_is_collected_once_no_node_uses_it(&etcd_connect(&e), &etcd_store(&e));
}

#[test]
fn etcd_a_node_whose_lease_expires_disappears_with_its_endpoints() {
    let e = etcd!("etcd_a_node_whose_lease_expires_disappears_with_its_endpoints");
    a_node_whose_lease_expires_disappears_with_its_endpoints(&etcd_connect(&e));
}

#[test]
fn etcd_a_lost_lease_is_replaced_and_everything_put_again() {
    let e = etcd!("etcd_a_lost_lease_is_replaced_and_everything_put_again");
    a_lost_lease_is_replaced_and_everything_put_again(&etcd_connect(&e), &etcd_store(&e));
}

#[test]
fn etcd_policies_put_by_one_node_reach_the_other() {
    let e = etcd!("etcd_policies_put_by_one_node_reach_the_other");
    policies_put_by_one_node_reach_the_other(&etcd_connect(&e));
}

#[test]
fn etcd_clients_come_back_after_an_etcd_restart() {
    let mut e = etcd!("etcd_clients_come_back_after_an_etcd_restart");
    let connect = etcd_connect(&e);
    let mut ca = config("a", 1);
    ca.lease_ttl = Duration::from_secs(10);
    let mut cb = config("b", 2);
    cb.lease_ttl = Duration::from_secs(10);
    let a = start(ca, &connect);
    let b = start(cb, &connect);
    a.synced();
    b.synced();
    eventually("b knows a", || {
        b.client.nodes().iter().any(|n| n.name == "a")
    });
    let id = a.client.allocate_identity(&labels("web")).unwrap();
    a.client.set_local_ips(vec![(ip("fd00:c1a:1::5"), id)]);
    b.wait_for(
        "b sees a's endpoint",
        |e| matches!(e, ClusterEvent::IpcacheUpsert(r) if r.node == "a"),
    );

    e.stop_kill9();
    for (name, n) in [("a", &a), ("b", &b)] {
        n.wait_for(&format!("{name} disconnected"), |e| {
            matches!(e, ClusterEvent::Disconnected { .. })
        });
        assert!(!n.client.status().connected);
    }
    let err = a.client.allocate_identity(&labels("db")).unwrap_err();
    assert!(
        err.to_string()
            .contains("unreachable: cannot allocate a cluster-wide identity"),
        "{err}"
    );

    e.start_again().unwrap();
    for (name, n) in [("a", &a), ("b", &b)] {
        n.wait_for(&format!("{name} connected"), |e| {
            *e == ClusterEvent::Connected
        });
        n.wait_for(&format!("{name} synced"), |e| *e == ClusterEvent::Synced);
    }
    eventually("both node records are back", || {
        let kv = etcd_store(&e);
        kv.get(&keys::node("a")).unwrap().is_some() && kv.get(&keys::node("b")).unwrap().is_some()
    });
    eventually("b knows a", || {
        b.client.nodes().iter().any(|n| n.name == "a")
    });
    assert_eq!(b.client.allocate_identity(&labels("web")).unwrap(), id);
    let db = a.client.allocate_identity(&labels("db")).unwrap();
    assert_ne!(db, id);
    assert!(etcd_store(&e)
        .get(&keys::ipcache(ip("fd00:c1a:1::5")))
        .unwrap()
        .is_some());
}

// ---- the local store with the cluster's allocator ----

fn endpoint(id: u16, v6: std::net::Ipv6Addr, v4: Option<std::net::Ipv4Addr>) -> EndpointRecord {
    EndpointRecord {
        id,
        netns: "/run/netns/x".into(),
        ifname: "eth0".into(),
        host_ifname: format!("lxc{id}"),
        ipv6: v6,
        ipv4: v4,
        labels: labels("web"),
        mac: [2, 0, 0, 0, 0, 1],
        host_mac: [2, 0, 0, 0, 0, 2],
        state: cilia_api::EndpointState::Creating,
        reason: None,
        container_id: None,
        namespace: "default".into(),
        identity: 0,
        label_source: None,
        policy_audit: false,
        network: None,
        named_ports: Vec::new(),
        k8s_pod: None,
    }
}

#[test]
fn endpoints_with_the_same_labels_on_two_nodes_share_the_cluster_identity() {
    let (dir, kv, connect) = shared_redb();
    let a = start(config("a", 1), &connect);
    let b = start(config("b", 2), &connect);
    a.synced();
    b.synced();
    let mut ids = Vec::new();
    let mut stores = Vec::new();
    for (n, node) in [(1u8, &a), (2, &b)] {
        let store = Store::open(&dir.path().join(format!("state-{n}.redb"))).unwrap();
        store.set_identity_allocator(Arc::new(node.client.clone()));
        let p6 = Pool::new(format!("fd00:c1a:{n}::/120").parse().unwrap()).unwrap();
        let rec = store.create_endpoint(&p6, None, endpoint).unwrap();
        ids.push(rec.identity);
        stores.push((store, rec));
    }
    assert_eq!(ids[0], ids[1]);
    assert!(ids[0] >= 256);
    let (store, rec) = &stores[0];
    store.delete_endpoint(rec).unwrap();
    assert!(kv.get(&keys::identity_ref(ids[0], "a")).unwrap().is_none());
    assert!(kv.get(&keys::identity_ref(ids[0], "b")).unwrap().is_some());
}

// ---- a connection that can be cut ----

/// A shared embedded store behind a switch: while `down`, every call and
/// every new connection fails as unreachable.
struct Switched {
    store: Arc<RedbStore>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Switched {
    fn check(&self) -> Result<(), KvError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(KvError::Unreachable {
                endpoints: "switched".into(),
                reason: "cut by the test".into(),
            });
        }
        Ok(())
    }
}

impl KvStore for Switched {
    fn get(&self, key: &str) -> Result<Option<cilia_kvstore::KeyValue>, KvError> {
        self.check()?;
        self.store.get(key)
    }
    fn list_prefix(&self, prefix: &str) -> Result<cilia_kvstore::Listing, KvError> {
        self.check()?;
        self.store.list_prefix(prefix)
    }
    fn txn(
        &self,
        compares: &[cilia_kvstore::Compare],
        ops: &[cilia_kvstore::Op],
    ) -> Result<cilia_kvstore::TxnResult, KvError> {
        self.check()?;
        self.store.txn(compares, ops)
    }
    fn watch(&self, prefix: &str, from: i64) -> Result<cilia_kvstore::Watch, KvError> {
        self.check()?;
        self.store.watch(prefix, from)
    }
    fn lease_grant(&self, ttl: Duration) -> Result<i64, KvError> {
        self.check()?;
        self.store.lease_grant(ttl)
    }
    fn lease_keepalive(&self, lease: i64) -> Result<Duration, KvError> {
        self.check()?;
        self.store.lease_keepalive(lease)
    }
    fn lease_revoke(&self, lease: i64) -> Result<(), KvError> {
        self.check()?;
        self.store.lease_revoke(lease)
    }
    fn revision(&self) -> Result<i64, KvError> {
        self.check()?;
        self.store.revision()
    }
}

#[test]
fn after_a_reconnect_only_the_difference_is_emitted_then_synced() {
    let (_d, kv, connect) = shared_redb();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (store, switch) = (kv.clone(), down.clone());
    let connect_b: Connect = Arc::new(move || {
        let s = Switched {
            store: store.clone(),
            down: switch.clone(),
        };
        s.check()?;
        Ok(Box::new(s) as Box<dyn KvStore>)
    });
    let mut cb = config("b", 2);
    // Long enough not to expire while cut (keep-alives fail meanwhile).
    cb.lease_ttl = Duration::from_secs(10);
    // a is never cut, but its entries must outlive a stalled keep-alive on
    // a loaded machine: the test is about b's view, not a's lease.
    let mut ca = config("a", 1);
    ca.lease_ttl = Duration::from_secs(10);
    let a = start(ca, &connect);
    a.synced();
    a.client
        .set_local_ips(vec![(ip("fd00:c1a:1::1"), 300), (ip("fd00:c1a:1::2"), 300)]);
    a.client
        .put_policies(&[policy("p1"), policy("p2")])
        .unwrap();
    let b = start(cb, &connect_b);
    b.wait_for("b has the policies", |e| {
        *e == ClusterEvent::PolicyUpsert(policy("p2"))
    });
    eventually("b has a's endpoints", || {
        kv.list_prefix(keys::IPCACHE).unwrap().kvs.len() == 2
    });
    b.synced();

    down.store(true, std::sync::atomic::Ordering::SeqCst);
    b.wait_for("b disconnected", |e| {
        matches!(e, ClusterEvent::Disconnected { .. })
    });
    // Changes b misses.
    a.client
        .set_local_ips(vec![(ip("fd00:c1a:1::2"), 300), (ip("fd00:c1a:1::3"), 301)]);
    a.client.delete_policies(&[policy("p1").key()]).unwrap();
    down.store(false, std::sync::atomic::Ordering::SeqCst);

    b.wait_for("b connected", |e| *e == ClusterEvent::Connected);
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let ev = b
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("Synced after the reconnect");
        if ev == ClusterEvent::Synced {
            break;
        }
        got.push(ev);
    }
    let upsert = |s: &str, identity| {
        ClusterEvent::IpcacheUpsert(cilia_agent::cluster::RemoteIp {
            ip: ip(s),
            identity,
            node: "a".into(),
            tunnel_endpoint: ip("198.51.100.1"),
            encap_key: 0,
        })
    };
    assert_eq!(
        got,
        vec![
            ClusterEvent::IpcacheDelete(ip("fd00:c1a:1::1")),
            upsert("fd00:c1a:1::3", 301),
            ClusterEvent::PolicyDelete(policy("p1").key()),
        ]
    );
}
