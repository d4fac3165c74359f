use super::*;
use crate::conformance;

fn store() -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("kv.redb")).unwrap();
    (dir, s)
}

#[test]
fn a_put_is_read_back_with_its_revisions() {
    let (_d, s) = store();
    conformance::a_put_is_read_back_with_its_revisions(&s);
}

#[test]
fn list_prefix_returns_only_keys_under_the_prefix_in_key_order() {
    let (_d, s) = store();
    conformance::list_prefix_returns_only_keys_under_the_prefix_in_key_order(&s);
}

#[test]
fn a_deleted_key_is_gone_and_deleting_an_absent_key_takes_no_revision() {
    let (_d, s) = store();
    conformance::a_deleted_key_is_gone_and_deleting_an_absent_key_takes_no_revision(&s);
}

#[test]
fn a_transaction_applies_all_its_ops_at_one_revision() {
    let (_d, s) = store();
    conformance::a_transaction_applies_all_its_ops_at_one_revision(&s);
}

#[test]
fn compare_and_swap_on_mod_revision_fails_after_a_concurrent_change() {
    let (_d, s) = store();
    conformance::compare_and_swap_on_mod_revision_fails_after_a_concurrent_change(&s);
}

#[test]
fn create_if_absent_succeeds_once() {
    let (_d, s) = store();
    conformance::create_if_absent_succeeds_once(&s);
}

#[test]
fn a_key_twice_in_one_transaction_is_refused_by_name() {
    let (_d, s) = store();
    conformance::a_key_twice_in_one_transaction_is_refused_by_name(&s);
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
    conformance::a_watch_follows_live_changes_under_its_prefix(&s);
}

#[test]
fn a_watch_from_an_old_revision_replays_then_follows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.redb");
    conformance::a_watch_from_an_old_revision_replays_then_follows(&|| {
        Box::new(RedbStore::open(&path).unwrap())
    });
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
    // Keeping two revisions, the store compacts by itself.
    conformance::a_watch_from_a_compacted_revision_is_refused(&s, &|_| {});
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
    conformance::keys_of_an_expired_lease_are_deleted_with_events(&s);
}

#[test]
fn a_kept_alive_lease_does_not_expire() {
    let (_d, s) = store();
    conformance::a_kept_alive_lease_does_not_expire(&s);
}

#[test]
fn revoking_a_lease_deletes_its_keys_now() {
    let (_d, s) = store();
    conformance::revoking_a_lease_deletes_its_keys_now(&s);
}

#[test]
fn a_key_put_again_without_its_lease_leaves_the_lease() {
    let (_d, s) = store();
    conformance::a_key_put_again_without_its_lease_leaves_the_lease(&s);
}

#[test]
fn a_put_with_an_unknown_lease_is_refused_by_key() {
    let (_d, s) = store();
    conformance::a_put_with_an_unknown_lease_is_refused_by_key(&s);
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
    conformance::a_lease_shorter_than_a_second_is_refused(&s);
}

#[test]
fn a_corrupt_record_names_its_key() {
    let err = decode_record("cilia/x", b"short").unwrap_err();
    assert!(err.to_string().contains("cilia/x"), "{err}");
}

#[test]
fn a_watch_tells_idle_from_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("kv.redb")).unwrap();
    let w = store.watch("k", 0).unwrap();
    assert_eq!(w.wait(Duration::ZERO), Ok(None));
    assert_eq!(w.wait(Duration::from_millis(20)), Ok(None));
    store.put("k", b"1").unwrap();
    assert!(w.wait(Duration::ZERO).unwrap().is_some());
    drop(store);
    assert_eq!(w.wait(Duration::from_millis(20)), Err(crate::WatchClosed));
}
