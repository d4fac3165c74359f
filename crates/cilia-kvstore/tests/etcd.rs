//! `EtcdStore` against a real etcd: each test starts its own `etcd` on
//! 127.0.0.1 (free ports, a temporary data dir) and kills it at the end.
//! Without an `etcd` binary a test is skipped with a printed reason, except
//! under `CI=true`, where it fails (run scripts/setup.sh).
//!
//! The behaviours both backends share are the checks of
//! `cilia_kvstore::conformance`, called here with an `EtcdStore`; the tests
//! written out here are etcd's own.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use cilia_kvstore::{conformance, EtcdStore, KvError, KvStore};
use cilia_testnet::etcd::{free_port, Etcd};

const WAIT: Duration = Duration::from_secs(5);

/// A healthy etcd on loopback (killed and its data dir removed on drop,
/// also when the test panics) and a store connected to it; returns from
/// the test when there is no etcd binary outside CI.
macro_rules! etcd {
    ($test:literal) => {{
        if !cilia_testnet::require_etcd($test) {
            return;
        }
        let etcd = Etcd::start_on_loopback().unwrap_or_else(|e| panic!("{}: {e}", $test));
        let store = EtcdStore::connect(&[etcd.endpoint()]).unwrap();
        (etcd, store)
    }};
}

#[test]
fn a_put_is_read_back_with_its_revisions() {
    let (_e, s) = etcd!("a_put_is_read_back_with_its_revisions");
    conformance::a_put_is_read_back_with_its_revisions(&s);
}

#[test]
fn list_prefix_returns_only_keys_under_the_prefix_in_key_order() {
    let (_e, s) = etcd!("list_prefix_returns_only_keys_under_the_prefix_in_key_order");
    conformance::list_prefix_returns_only_keys_under_the_prefix_in_key_order(&s);
}

#[test]
fn a_deleted_key_is_gone_and_deleting_an_absent_key_takes_no_revision() {
    let (_e, s) = etcd!("a_deleted_key_is_gone_and_deleting_an_absent_key_takes_no_revision");
    conformance::a_deleted_key_is_gone_and_deleting_an_absent_key_takes_no_revision(&s);
}

#[test]
fn a_transaction_applies_all_its_ops_at_one_revision() {
    let (_e, s) = etcd!("a_transaction_applies_all_its_ops_at_one_revision");
    conformance::a_transaction_applies_all_its_ops_at_one_revision(&s);
}

#[test]
fn compare_and_swap_on_mod_revision_fails_after_a_concurrent_change() {
    let (_e, s) = etcd!("compare_and_swap_on_mod_revision_fails_after_a_concurrent_change");
    conformance::compare_and_swap_on_mod_revision_fails_after_a_concurrent_change(&s);
}

#[test]
fn create_if_absent_succeeds_once() {
    let (_e, s) = etcd!("create_if_absent_succeeds_once");
    conformance::create_if_absent_succeeds_once(&s);
}

#[test]
fn a_key_twice_in_one_transaction_is_refused_by_name() {
    let (_e, s) = etcd!("a_key_twice_in_one_transaction_is_refused_by_name");
    conformance::a_key_twice_in_one_transaction_is_refused_by_name(&s);
}

#[test]
fn a_watch_follows_live_changes_under_its_prefix() {
    let (_e, s) = etcd!("a_watch_follows_live_changes_under_its_prefix");
    conformance::a_watch_follows_live_changes_under_its_prefix(&s);
}

#[test]
fn a_watch_from_an_old_revision_replays_then_follows() {
    let (e, _s) = etcd!("a_watch_from_an_old_revision_replays_then_follows");
    conformance::a_watch_from_an_old_revision_replays_then_follows(&|| {
        Box::new(EtcdStore::connect(&[e.endpoint()]).unwrap())
    });
}

#[test]
fn a_watch_from_a_compacted_revision_is_refused() {
    let (_e, s) = etcd!("a_watch_from_a_compacted_revision_is_refused");
    conformance::a_watch_from_a_compacted_revision_is_refused(&s, &|rev| s.compact(rev).unwrap());
}

#[test]
fn keys_of_an_expired_lease_are_deleted_with_events() {
    let (_e, s) = etcd!("keys_of_an_expired_lease_are_deleted_with_events");
    conformance::keys_of_an_expired_lease_are_deleted_with_events(&s);
}

#[test]
fn a_kept_alive_lease_does_not_expire() {
    let (_e, s) = etcd!("a_kept_alive_lease_does_not_expire");
    conformance::a_kept_alive_lease_does_not_expire(&s);
}

#[test]
fn revoking_a_lease_deletes_its_keys_now() {
    let (_e, s) = etcd!("revoking_a_lease_deletes_its_keys_now");
    conformance::revoking_a_lease_deletes_its_keys_now(&s);
}

#[test]
fn a_key_put_again_without_its_lease_leaves_the_lease() {
    let (_e, s) = etcd!("a_key_put_again_without_its_lease_leaves_the_lease");
    conformance::a_key_put_again_without_its_lease_leaves_the_lease(&s);
}

#[test]
fn a_put_with_an_unknown_lease_is_refused_by_key() {
    let (_e, s) = etcd!("a_put_with_an_unknown_lease_is_refused_by_key");
    conformance::a_put_with_an_unknown_lease_is_refused_by_key(&s);
}

#[test]
fn a_lease_shorter_than_a_second_is_refused() {
    let (_e, s) = etcd!("a_lease_shorter_than_a_second_is_refused");
    conformance::a_lease_shorter_than_a_second_is_refused(&s);
}

#[test]
fn an_unreachable_etcd_is_an_error_naming_the_endpoint() {
    // A port nothing listens on (bound, then released).
    let endpoint = format!("http://127.0.0.1:{}", free_port().unwrap());
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
