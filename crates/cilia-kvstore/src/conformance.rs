//! The behaviours every [`KvStore`] backend shares, written once: each
//! check is a function taking a fresh, empty store (or a way to open one)
//! and panicking when the backend misbehaves. Revisions are compared
//! relative to the store's revision at the start (a fresh etcd is at 1, a
//! fresh redb file at 0).
//!
//! Each backend's test suite calls every check from a test of the same
//! name: redb's unit tests (`src/redb_store/tests.rs`) and etcd's
//! integration test (`tests/etcd.rs`). The module is compiled for the
//! crate's own unit tests (`cfg(test)`) and with the `conformance` feature,
//! which the crate's dev-dependency on itself turns on for its integration
//! tests; it is not part of the crate's API otherwise.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use crate::{Compare, EventKind, KvError, KvStore, Listing, Op, Revision, TxnResult};

/// How long a check waits for an event that must come.
const WAIT: Duration = Duration::from_secs(5);
/// How long a check waits to see that no further event comes.
const QUIET: Duration = Duration::from_millis(300);
/// How long a check waits for a lease of one second to expire (etcd's
/// shortest lease is about 2 s, 1.5 election timeouts).
const EXPIRY: Duration = Duration::from_secs(10);

fn keys(l: &Listing) -> Vec<&str> {
    l.kvs.iter().map(|kv| kv.key.as_str()).collect()
}

pub fn a_put_is_read_back_with_its_revisions(s: &dyn KvStore) {
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

pub fn list_prefix_returns_only_keys_under_the_prefix_in_key_order(s: &dyn KvStore) {
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

pub fn a_deleted_key_is_gone_and_deleting_an_absent_key_takes_no_revision(s: &dyn KvStore) {
    let r1 = s.put("a", b"1").unwrap();
    assert_eq!(s.delete("a").unwrap(), r1 + 1);
    assert_eq!(s.get("a").unwrap(), None);
    assert_eq!(s.delete("a").unwrap(), r1 + 1);
    // Put again: a new life, version restarts.
    s.put("a", b"1").unwrap();
    let kv = s.get("a").unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (r1 + 2, 1));
}

pub fn a_transaction_applies_all_its_ops_at_one_revision(s: &dyn KvStore) {
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

pub fn compare_and_swap_on_mod_revision_fails_after_a_concurrent_change(s: &dyn KvStore) {
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

pub fn create_if_absent_succeeds_once(s: &dyn KvStore) {
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

pub fn a_key_twice_in_one_transaction_is_refused_by_name(s: &dyn KvStore) {
    let before = s.revision().unwrap();
    let err = s
        .txn(&[], &[Op::put("dup", "1"), Op::delete("dup")])
        .unwrap_err();
    assert!(err.to_string().contains("\"dup\""), "{err}");
    assert_eq!(s.revision().unwrap(), before);
}

pub fn a_watch_follows_live_changes_under_its_prefix(s: &dyn KvStore) {
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
    assert_eq!(w.recv_timeout(QUIET), None);
}

/// `open` opens a handle of the same store each time it is called; the
/// check writes through one, drops it and watches through a second (for a
/// file the history survives a restart).
pub fn a_watch_from_an_old_revision_replays_then_follows(open: &dyn Fn() -> Box<dyn KvStore>) {
    let (r2, r3) = {
        let s = open();
        s.put("p/a", b"1").unwrap();
        let r2 = s.put("p/b", b"2").unwrap();
        let r3 = s.put("p/a", b"3").unwrap();
        (r2, r3)
    };
    let s = open();
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
    assert_eq!(w.recv_timeout(QUIET), None, "no duplicate");
}

/// `compact(r)` drops the history before revision `r` (a store configured
/// to keep only the last two revisions may do nothing: the check makes
/// five).
pub fn a_watch_from_a_compacted_revision_is_refused(s: &dyn KvStore, compact: &dyn Fn(Revision)) {
    let revs: Vec<Revision> = (0..5)
        .map(|i| s.put("k", format!("{i}").as_bytes()).unwrap())
        .collect();
    compact(revs[3]);
    let err = s.watch("k", revs[1]).unwrap_err();
    assert!(
        matches!(err, KvError::Compacted { requested, first, .. } if requested == revs[1] && first == revs[3]),
        "{err}"
    );
    let w = s.watch("k", revs[3]).unwrap();
    for rev in &revs[3..] {
        assert_eq!(w.recv_timeout(WAIT).unwrap().kv.mod_revision, *rev);
    }
    assert_eq!(w.recv_timeout(QUIET), None);
}

pub fn keys_of_an_expired_lease_are_deleted_with_events(s: &dyn KvStore) {
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
    let ev = w.recv_timeout(EXPIRY).expect("a delete event at expiry");
    assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Delete, "node/a"));
    assert_eq!(s.get("node/a").unwrap(), None);
    assert!(
        s.get("node/b").unwrap().is_some(),
        "keys without the lease stay"
    );
    assert!(matches!(s.lease_keepalive(lease), Err(KvError::NoLease(_))));
}

pub fn a_kept_alive_lease_does_not_expire(s: &dyn KvStore) {
    let lease = s.lease_grant(Duration::from_secs(1)).unwrap();
    s.txn(&[], &[Op::put_with_lease("k", "v", lease)]).unwrap();
    // Longer than etcd's shortest lease, too.
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        assert!(s.lease_keepalive(lease).unwrap() >= Duration::from_secs(1));
    }
    assert!(s.get("k").unwrap().is_some());
}

pub fn revoking_a_lease_deletes_its_keys_now(s: &dyn KvStore) {
    let lease = s.lease_grant(Duration::from_secs(60)).unwrap();
    s.txn(&[], &[Op::put_with_lease("k", "v", lease)]).unwrap();
    s.lease_revoke(lease).unwrap();
    assert_eq!(s.get("k").unwrap(), None);
    assert!(matches!(s.lease_revoke(lease), Err(KvError::NoLease(_))));
}

pub fn a_key_put_again_without_its_lease_leaves_the_lease(s: &dyn KvStore) {
    let lease = s.lease_grant(Duration::from_secs(60)).unwrap();
    s.txn(&[], &[Op::put_with_lease("k", "v", lease)]).unwrap();
    s.put("k", b"w").unwrap();
    s.lease_revoke(lease).unwrap();
    assert_eq!(s.get("k").unwrap().unwrap().value, b"w");
}

pub fn a_put_with_an_unknown_lease_is_refused_by_key(s: &dyn KvStore) {
    let err = s
        .txn(&[], &[Op::put_with_lease("k", "v", 12345)])
        .unwrap_err();
    assert!(
        matches!(&err, KvError::LeaseNotFound { key, lease: 12345 } if key == "k"),
        "{err}"
    );
    assert_eq!(s.get("k").unwrap(), None);
}

pub fn a_lease_shorter_than_a_second_is_refused(s: &dyn KvStore) {
    for ttl in [Duration::from_millis(10), Duration::from_millis(500)] {
        assert!(matches!(s.lease_grant(ttl), Err(KvError::InvalidTtl(_))));
    }
}
