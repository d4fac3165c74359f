use super::*;

const WAIT: Duration = Duration::from_secs(5);

fn store() -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("kv.redb")).unwrap();
    (dir, s)
}

fn keys(l: &Listing) -> Vec<&str> {
    l.kvs.iter().map(|kv| kv.key.as_str()).collect()
}

#[test]
fn a_put_is_read_back_with_its_revisions() {
    let (_d, s) = store();
    assert_eq!(s.revision().unwrap(), 0);
    let r1 = s.put("a", b"1").unwrap();
    let r2 = s.put("a", b"2").unwrap();
    assert_eq!((r1, r2), (1, 2));
    let kv = s.get("a").unwrap().unwrap();
    assert_eq!(kv.value, b"2");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
    assert_eq!(s.get("b").unwrap(), None);
}

#[test]
fn list_prefix_returns_only_keys_under_the_prefix_in_key_order() {
    let (_d, s) = store();
    for k in ["p/b", "p/a", "q/a", "p", "pa"] {
        s.put(k, b"x").unwrap();
    }
    let l = s.list_prefix("p/").unwrap();
    assert_eq!(keys(&l), ["p/a", "p/b"]);
    assert_eq!(l.revision, 5);
}

#[test]
fn a_deleted_key_is_gone_and_deleting_an_absent_key_takes_no_revision() {
    let (_d, s) = store();
    s.put("a", b"1").unwrap();
    assert_eq!(s.delete("a").unwrap(), 2);
    assert_eq!(s.get("a").unwrap(), None);
    assert_eq!(s.delete("a").unwrap(), 2);
    // Put again: a new life, version restarts.
    s.put("a", b"1").unwrap();
    let kv = s.get("a").unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (3, 1));
}

#[test]
fn a_transaction_applies_all_its_ops_at_one_revision() {
    let (_d, s) = store();
    s.put("gone", b"x").unwrap();
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
            revision: 2
        }
    );
    let l = s.list_prefix("").unwrap();
    assert_eq!(keys(&l), ["a", "b"]);
    assert!(l.kvs.iter().all(|kv| kv.mod_revision == 2));
}

#[test]
fn compare_and_swap_on_mod_revision_fails_after_a_concurrent_change() {
    let (_d, s) = store();
    let seen = s.put("k", b"1").unwrap();
    s.put("k", b"2").unwrap(); // someone else
    let r = s
        .txn(
            &[Compare::mod_revision("k", seen)],
            &[Op::put("k", "3"), Op::put("other", "x")],
        )
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, 2);
    assert_eq!(s.get("k").unwrap().unwrap().value, b"2");
    assert_eq!(
        s.get("other").unwrap(),
        None,
        "nothing of a failed txn applies"
    );
    let r = s
        .txn(&[Compare::mod_revision("k", 2)], &[Op::put("k", "3")])
        .unwrap();
    assert!(r.succeeded);
}

#[test]
fn create_if_absent_succeeds_once() {
    let (_d, s) = store();
    let create = |v: &str| {
        s.txn(&[Compare::absent("k")], &[Op::put("k", v)])
            .unwrap()
            .succeeded
    };
    assert!(create("first"));
    assert!(!create("second"));
    assert_eq!(s.get("k").unwrap().unwrap().value, b"first");
    assert!(s.txn(&[Compare::exists("k")], &[]).unwrap().succeeded);
}

#[test]
fn a_key_twice_in_one_transaction_is_refused_by_name() {
    let (_d, s) = store();
    let err = s
        .txn(&[], &[Op::put("dup", "1"), Op::delete("dup")])
        .unwrap_err();
    assert!(err.to_string().contains("\"dup\""), "{err}");
    assert_eq!(s.revision().unwrap(), 0);
}

#[test]
fn state_and_revision_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.redb");
    {
        let s = RedbStore::open(&path).unwrap();
        s.put("a", b"1").unwrap();
        s.put("b", b"2").unwrap();
    }
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.revision().unwrap(), 2);
    assert_eq!(s.get("b").unwrap().unwrap().mod_revision, 2);
    assert_eq!(s.put("c", b"3").unwrap(), 3);
}

#[test]
fn a_second_open_of_the_same_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.redb");
    let _first = RedbStore::open(&path).unwrap();
    assert!(RedbStore::open(&path).is_err());
}

#[test]
fn a_watch_follows_live_changes_under_its_prefix() {
    let (_d, s) = store();
    let w = s.watch("p/", 0).unwrap();
    s.put("p/a", b"1").unwrap();
    s.put("q/a", b"1").unwrap();
    s.delete("p/a").unwrap();
    let a = w.recv_timeout(WAIT).unwrap();
    assert_eq!(
        (a.kind, a.kv.key.as_str(), a.kv.mod_revision),
        (EventKind::Put, "p/a", 1)
    );
    let b = w.recv_timeout(WAIT).unwrap();
    assert_eq!(
        (b.kind, b.kv.key.as_str(), b.kv.mod_revision),
        (EventKind::Delete, "p/a", 3)
    );
    assert_eq!(w.try_iter().count(), 0);
}

#[test]
fn a_watch_from_an_old_revision_replays_then_follows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.redb");
    {
        let s = RedbStore::open(&path).unwrap();
        s.put("p/a", b"1").unwrap(); // 1
        s.put("p/b", b"2").unwrap(); // 2
        s.put("p/a", b"3").unwrap(); // 3
    }
    // The history survives a restart.
    let s = RedbStore::open(&path).unwrap();
    let w = s.watch("p/", 2).unwrap();
    s.put("p/c", b"4").unwrap(); // 4
    let got: Vec<(String, Revision)> = (0..3)
        .map(|_| w.recv_timeout(WAIT).unwrap())
        .map(|e| (e.kv.key, e.kv.mod_revision))
        .collect();
    assert_eq!(
        got,
        [
            ("p/b".to_string(), 2),
            ("p/a".to_string(), 3),
            ("p/c".to_string(), 4)
        ]
    );
    assert_eq!(w.try_iter().count(), 0, "no duplicate");
}

#[test]
fn a_watch_from_a_compacted_revision_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("kv.redb")).unwrap();
    let history = History {
        revisions: 2,
        ..History::default()
    };
    let s = RedbStore::from_database(db, history).unwrap();
    for i in 0..5 {
        s.put("k", format!("{i}").as_bytes()).unwrap();
    }
    let err = s.watch("k", 2).unwrap_err();
    assert!(matches!(err, KvError::Compacted { first: 4, .. }), "{err}");
    let w = s.watch("k", 4).unwrap();
    assert_eq!(w.try_iter().count(), 2);
}

#[test]
fn the_history_is_bounded_in_bytes_but_keeps_the_last_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("kv.redb")).unwrap();
    let history = History {
        revisions: 1000,
        bytes: 150,
    };
    let s = RedbStore::from_database(db, history).unwrap();
    for _ in 0..3 {
        s.put("k", &[0u8; 60]).unwrap(); // ~100 bytes of event each
    }
    assert!(matches!(
        s.watch("k", 2).unwrap_err(),
        KvError::Compacted { first: 3, .. }
    ));
    assert_eq!(s.watch("k", 3).unwrap().try_iter().count(), 1);
    s.put("k", &[0u8; 500]).unwrap(); // alone bigger than the bound
    assert_eq!(s.watch("k", 4).unwrap().try_iter().count(), 1);
}

#[test]
fn a_dropped_watch_is_forgotten() {
    let (_d, s) = store();
    drop(s.watch("", 0).unwrap());
    s.put("a", b"1").unwrap();
    assert!(s.inner.lock().watchers.is_empty());
}

#[test]
fn keys_of_an_expired_lease_are_deleted_with_events() {
    let (_d, s) = store();
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
    let ev = w.recv_timeout(WAIT).expect("a delete event at expiry");
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
    let (_d, s) = store();
    let lease = s.lease_grant(Duration::from_secs(1)).unwrap();
    s.txn(&[], &[Op::put_with_lease("k", "v", lease)]).unwrap();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(s.lease_keepalive(lease).unwrap(), Duration::from_secs(1));
    }
    assert!(s.get("k").unwrap().is_some());
}

#[test]
fn revoking_a_lease_deletes_its_keys_now() {
    let (_d, s) = store();
    let lease = s.lease_grant(Duration::from_secs(60)).unwrap();
    s.txn(&[], &[Op::put_with_lease("k", "v", lease)]).unwrap();
    s.lease_revoke(lease).unwrap();
    assert_eq!(s.get("k").unwrap(), None);
    assert!(s.lease_revoke(lease).is_err());
}

#[test]
fn a_key_put_again_without_its_lease_leaves_the_lease() {
    let (_d, s) = store();
    let lease = s.lease_grant(Duration::from_secs(60)).unwrap();
    s.txn(&[], &[Op::put_with_lease("k", "v", lease)]).unwrap();
    s.put("k", b"w").unwrap();
    s.lease_revoke(lease).unwrap();
    assert_eq!(s.get("k").unwrap().unwrap().value, b"w");
}

#[test]
fn a_put_with_an_unknown_lease_is_refused_by_key() {
    let (_d, s) = store();
    let err = s.txn(&[], &[Op::put_with_lease("k", "v", 42)]).unwrap_err();
    assert!(err.to_string().contains("\"k\""), "{err}");
    assert_eq!(s.get("k").unwrap(), None);
}

#[test]
fn keys_of_leases_of_a_previous_process_are_deleted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.redb");
    {
        let s = RedbStore::open(&path).unwrap();
        let lease = s.lease_grant(Duration::from_secs(60)).unwrap();
        s.txn(
            &[],
            &[
                Op::put_with_lease("leased", "v", lease),
                Op::put("kept", "v"),
            ],
        )
        .unwrap();
    }
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.get("leased").unwrap(), None);
    assert!(s.get("kept").unwrap().is_some());
}

#[test]
fn a_store_with_leases_can_be_opened_again_right_after_it_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.redb");
    for _ in 0..5 {
        let s = RedbStore::open(&path).unwrap();
        s.lease_grant(Duration::from_secs(60)).unwrap();
    }
}

#[test]
fn a_lease_shorter_than_a_second_is_refused() {
    let (_d, s) = store();
    assert!(matches!(
        s.lease_grant(Duration::from_millis(10)),
        Err(KvError::InvalidTtl(_))
    ));
}

#[test]
fn a_corrupt_record_names_its_key() {
    let err = decode_record("cilia/x", b"short").unwrap_err();
    assert!(err.to_string().contains("cilia/x"), "{err}");
}
