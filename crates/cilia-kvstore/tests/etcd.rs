//! `EtcdStore` against a real etcd: each test starts its own `etcd` on
//! 127.0.0.1 (free ports, a temporary data dir) and kills it at the end.
//! Without an `etcd` binary a test is skipped with a printed reason, except
//! under `CI=true`, where it fails (run scripts/setup.sh).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cilia_kvstore::{
    Compare, EtcdStore, EventKind, KvError, KvStore, Listing, Op, Revision, TxnResult,
};

const WAIT: Duration = Duration::from_secs(5);
/// The longest etcd may take to answer after it is started.
const START: Duration = Duration::from_secs(10);

/// A running etcd on loopback; killed and its data dir removed on drop
/// (also when the test panics).
struct Etcd {
    child: Child,
    endpoint: String,
    // Dropped after `drop` below has killed etcd.
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcd_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Starts etcd and waits until it answers; `None` (test skipped) when
    /// there is no etcd binary outside CI.
    fn start(test: &str) -> Option<(Etcd, EtcdStore)> {
        let Some(bin) = etcd_binary() else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: no `etcd` binary in PATH and CI=true forbids skipping: run scripts/setup.sh");
            }
            eprintln!("SKIPPED {test}: no `etcd` binary in PATH (run scripts/setup.sh)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new(bin)
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let etcd = Etcd {
            child,
            endpoint: client_url,
            _dir: dir,
        };
        let deadline = Instant::now() + START;
        loop {
            match EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)) {
                Ok(s) => return Some((etcd, s)),
                Err(e) if Instant::now() > deadline => {
                    let log = std::fs::read_to_string(etcd._dir.path().join("etcd.log"))
                        .unwrap_or_default();
                    let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                    panic!("{test}: etcd not healthy within {START:?}: {e}\n{tail}");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

fn keys(l: &Listing) -> Vec<&str> {
    l.kvs.iter().map(|kv| kv.key.as_str()).collect()
}

macro_rules! etcd {
    ($test:literal) => {
        match Etcd::start($test) {
            Some(x) => x,
            None => return,
        }
    };
}

#[test]
fn a_put_is_read_back_with_its_revisions() {
    let (_e, s) = etcd!("a_put_is_read_back_with_its_revisions");
    let r0 = s.revision().unwrap();
    let r1 = s.put("a", b"1").unwrap();
    let r2 = s.put("a", b"2").unwrap();
    assert_eq!((r1, r2), (r0 + 1, r0 + 2));
    let kv = s.get("a").unwrap().unwrap();
    assert_eq!(kv.value, b"2");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r2, 2)
    );
    assert_eq!(s.get("b").unwrap(), None);
    assert_eq!(s.revision().unwrap(), r2);
}

#[test]
fn list_prefix_returns_only_keys_under_the_prefix_in_key_order() {
    let (_e, s) = etcd!("list_prefix_returns_only_keys_under_the_prefix_in_key_order");
    for k in ["p/b", "p/a", "q/a", "p", "pa"] {
        s.put(k, b"x").unwrap();
    }
    let l = s.list_prefix("p/").unwrap();
    assert_eq!(keys(&l), ["p/a", "p/b"]);
    assert_eq!(l.revision, s.revision().unwrap());
    assert_eq!(
        keys(&s.list_prefix("").unwrap()),
        ["p", "p/a", "p/b", "pa", "q/a"]
    );
}

#[test]
fn a_deleted_key_is_gone_and_deleting_an_absent_key_takes_no_revision() {
    let (_e, s) = etcd!("a_deleted_key_is_gone_and_deleting_an_absent_key_takes_no_revision");
    let r1 = s.put("a", b"1").unwrap();
    assert_eq!(s.delete("a").unwrap(), r1 + 1);
    assert_eq!(s.get("a").unwrap(), None);
    assert_eq!(s.delete("a").unwrap(), r1 + 1);
    s.put("a", b"1").unwrap();
    let kv = s.get("a").unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (r1 + 2, 1));
}

#[test]
fn a_transaction_applies_all_its_ops_at_one_revision() {
    let (_e, s) = etcd!("a_transaction_applies_all_its_ops_at_one_revision");
    let r1 = s.put("gone", b"x").unwrap();
    let r = s
        .txn(
            &[],
            &[Op::put("a", "1"), Op::put("b", "2"), Op::delete("gone")],
        )
        .unwrap();
    assert_eq!(
        r,
        TxnResult {
            succeeded: true,
            revision: r1 + 1
        }
    );
    let l = s.list_prefix("").unwrap();
    assert_eq!(keys(&l), ["a", "b"]);
    assert!(l.kvs.iter().all(|kv| kv.mod_revision == r1 + 1));
}

#[test]
fn compare_and_swap_on_mod_revision_fails_after_a_concurrent_change() {
    let (_e, s) = etcd!("compare_and_swap_on_mod_revision_fails_after_a_concurrent_change");
    let seen = s.put("k", b"1").unwrap();
    let now = s.put("k", b"2").unwrap(); // someone else
    let r = s
        .txn(
            &[Compare::mod_revision("k", seen)],
            &[Op::put("k", "3"), Op::put("other", "x")],
        )
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, now);
    assert_eq!(s.get("k").unwrap().unwrap().value, b"2");
    assert_eq!(
        s.get("other").unwrap(),
        None,
        "nothing of a failed txn applies"
    );
    let r = s
        .txn(&[Compare::mod_revision("k", now)], &[Op::put("k", "3")])
        .unwrap();
    assert!(r.succeeded);
}

#[test]
fn create_if_absent_succeeds_once() {
    let (_e, s) = etcd!("create_if_absent_succeeds_once");
    let create = |v: &str| {
        s.txn(&[Compare::absent("k")], &[Op::put("k", v)])
            .unwrap()
            .succeeded
    };
    assert!(create("first"));
    assert!(!create("second"));
    assert_eq!(s.get("k").unwrap().unwrap().value, b"first");
    assert!(s.txn(&[Compare::exists("k")], &[]).unwrap().succeeded);
    assert!(!s.txn(&[Compare::exists("nope")], &[]).unwrap().succeeded);
}

#[test]
fn a_key_twice_in_one_transaction_is_refused_by_name() {
    let (_e, s) = etcd!("a_key_twice_in_one_transaction_is_refused_by_name");
    let before = s.revision().unwrap();
    let err = s
        .txn(&[], &[Op::put("dup", "1"), Op::delete("dup")])
        .unwrap_err();
    assert!(err.to_string().contains("\"dup\""), "{err}");
    assert_eq!(s.revision().unwrap(), before);
}

#[test]
fn a_watch_follows_live_changes_under_its_prefix() {
    let (_e, s) = etcd!("a_watch_follows_live_changes_under_its_prefix");
    let w = s.watch("p/", 0).unwrap();
    let r1 = s.put("p/a", b"1").unwrap();
    s.put("q/a", b"1").unwrap();
    let r3 = s.delete("p/a").unwrap();
    let a = w.recv_timeout(WAIT).unwrap();
    assert_eq!(
        (a.kind, a.kv.key.as_str(), a.kv.mod_revision),
        (EventKind::Put, "p/a", r1)
    );
    let b = w.recv_timeout(WAIT).unwrap();
    assert_eq!(
        (b.kind, b.kv.key.as_str(), b.kv.mod_revision),
        (EventKind::Delete, "p/a", r3)
    );
    assert_eq!(w.recv_timeout(Duration::from_millis(300)), None);
}

#[test]
fn a_watch_from_an_old_revision_replays_then_follows() {
    let (_e, s) = etcd!("a_watch_from_an_old_revision_replays_then_follows");
    s.put("p/a", b"1").unwrap();
    let r2 = s.put("p/b", b"2").unwrap();
    let r3 = s.put("p/a", b"3").unwrap();
    let w = s.watch("p/", r2).unwrap();
    let r4 = s.put("p/c", b"4").unwrap();
    let got: Vec<(String, Revision)> = (0..3)
        .map(|_| w.recv_timeout(WAIT).unwrap())
        .map(|e| (e.kv.key, e.kv.mod_revision))
        .collect();
    assert_eq!(
        got,
        [
            ("p/b".to_string(), r2),
            ("p/a".to_string(), r3),
            ("p/c".to_string(), r4)
        ]
    );
    assert_eq!(
        w.recv_timeout(Duration::from_millis(300)),
        None,
        "no duplicate"
    );
}

#[test]
fn a_watch_from_a_compacted_revision_is_refused() {
    let (_e, s) = etcd!("a_watch_from_a_compacted_revision_is_refused");
    let revs: Vec<Revision> = (0..5)
        .map(|i| s.put("k", format!("{i}").as_bytes()).unwrap())
        .collect();
    s.compact(revs[3]).unwrap();
    let err = s.watch("k", revs[1]).unwrap_err();
    assert!(
        matches!(err, KvError::Compacted { requested, first, .. } if requested == revs[1] && first == revs[3]),
        "{err}"
    );
    let w = s.watch("k", revs[3]).unwrap();
    for rev in &revs[3..] {
        assert_eq!(w.recv_timeout(WAIT).unwrap().kv.mod_revision, *rev);
    }
}

#[test]
fn keys_of_an_expired_lease_are_deleted_with_events() {
    let (_e, s) = etcd!("keys_of_an_expired_lease_are_deleted_with_events");
    let lease = s.lease_grant(Duration::from_secs(1)).unwrap();
    s.txn(
        &[],
        &[
            Op::put_with_lease("node/a", "up", lease),
            Op::put("node/b", "x"),
        ],
    )
    .unwrap();
    assert_eq!(s.get("node/a").unwrap().unwrap().lease, lease);
    let w = s.watch("node/", 0).unwrap();
    // etcd's shortest lease is about 2 s here (1.5 election timeouts).
    let ev = w
        .recv_timeout(Duration::from_secs(10))
        .expect("a delete event at expiry");
    assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Delete, "node/a"));
    assert_eq!(s.get("node/a").unwrap(), None);
    assert!(
        s.get("node/b").unwrap().is_some(),
        "keys without the lease stay"
    );
    assert!(matches!(s.lease_keepalive(lease), Err(KvError::NoLease(_))));
}

#[test]
fn a_kept_alive_lease_does_not_expire() {
    let (_e, s) = etcd!("a_kept_alive_lease_does_not_expire");
    let lease = s.lease_grant(Duration::from_secs(1)).unwrap();
    s.txn(&[], &[Op::put_with_lease("k", "v", lease)]).unwrap();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        assert!(s.lease_keepalive(lease).unwrap() >= Duration::from_secs(1));
    }
    assert!(s.get("k").unwrap().is_some());
}

#[test]
fn revoking_a_lease_deletes_its_keys_now() {
    let (_e, s) = etcd!("revoking_a_lease_deletes_its_keys_now");
    let lease = s.lease_grant(Duration::from_secs(60)).unwrap();
    s.txn(&[], &[Op::put_with_lease("k", "v", lease)]).unwrap();
    s.lease_revoke(lease).unwrap();
    assert_eq!(s.get("k").unwrap(), None);
    assert!(matches!(s.lease_revoke(lease), Err(KvError::NoLease(_))));
}

#[test]
fn a_put_with_an_unknown_lease_is_refused_by_key() {
    let (_e, s) = etcd!("a_put_with_an_unknown_lease_is_refused_by_key");
    let err = s
        .txn(&[], &[Op::put_with_lease("k", "v", 12345)])
        .unwrap_err();
    assert!(
        matches!(&err, KvError::LeaseNotFound { key, lease: 12345 } if key == "k"),
        "{err}"
    );
}

#[test]
fn a_lease_shorter_than_a_second_is_refused() {
    let (_e, s) = etcd!("a_lease_shorter_than_a_second_is_refused");
    assert!(matches!(
        s.lease_grant(Duration::from_millis(500)),
        Err(KvError::InvalidTtl(_))
    ));
}

#[test]
fn an_unreachable_etcd_is_an_error_naming_the_endpoint() {
    // A port nothing listens on (bound, then released).
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let err = EtcdStore::connect(std::slice::from_ref(&endpoint)).unwrap_err();
    assert!(matches!(err, KvError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn a_watch_from_a_revision_still_to_come_waits_for_it() {
    let (_e, s) = etcd!("a_watch_from_a_revision_still_to_come_waits_for_it");
    let now = s.revision().unwrap();
    let w = s.watch("k", now + 2).unwrap();
    s.put("k", b"1").unwrap(); // now + 1: before the watch's start
    s.put("k", b"2").unwrap(); // now + 2
    assert_eq!(w.recv_timeout(WAIT).unwrap().kv.mod_revision, now + 2);
    assert_eq!(w.recv_timeout(Duration::from_millis(300)), None);
}

#[test]
fn the_store_works_from_a_tokio_blocking_pool() {
    let (_e, s) = etcd!("the_store_works_from_a_tokio_blocking_pool");
    let s = std::sync::Arc::new(s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let store = s.clone();
    let rev = rt
        .block_on(async move { tokio::task::spawn_blocking(move || store.put("k", b"v")).await })
        .unwrap()
        .unwrap();
    assert_eq!(s.get("k").unwrap().unwrap().mod_revision, rev);
}
