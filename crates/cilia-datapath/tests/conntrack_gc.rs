//! The conntrack GC against the real maps: expired entries go, live ones
//! and every endpoint's budget count come out exact, across more entries
//! than one batch of the walk, and the budget-pressure signal the agent
//! collects early on.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use cilia_abi::*;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TestProgram, TC_ACT_REDIRECT};
use cilia_datapath::{datapath_clock_ns, BpfDatapath, CtGcReport, DatapathOptions};

mod common;
use common::fixture::*;
use common::*;

/// A new TCP flow from A to B (a SYN), one per source port.
fn a_opens(a: &TestProgram, sport: u16) {
    let syn = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(a6(), b6(), IPPROTO_TCP, 64, &tcp(sport, 80, 0x02)),
    );
    assert_eq!(
        a.run(&syn).unwrap().verdict,
        TC_ACT_REDIRECT,
        "sport {sport}"
    );
}

/// A key of its own for entry `i` (no packet makes such keys).
fn key(i: u32) -> CtKey {
    let mut key = CtKey {
        proto: 17,
        family: CILIA_FAMILY_IPV6,
        ..Default::default()
    };
    key.saddr[..4].copy_from_slice(&i.to_be_bytes());
    key
}

const OWNERS: u16 = 5;

#[test]
fn gc_removes_what_expired_and_recounts_every_endpoint() {
    privileged!("ct_gc_recount");
    let fx = Fixture::new();
    // A's flows, counted by the datapath, then taken from the table behind
    // its back: A holds no entry, but its count says 4.
    let a = fx.a();
    for sport in 0..4 {
        a_opens(&a, 30000 + sport);
    }
    assert_eq!(fx.dp.ct_count(A_ID).unwrap(), 4);
    let a_keys: Vec<CtKey> = fx
        .dp
        .list_ct()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(fx.dp.remove_cts(&a_keys).unwrap(), 4);
    // 10,000 entries (several batches of the walk) of five other owners,
    // every second one expired.
    const N: u32 = 10_000;
    for i in 0..N {
        let value = CtValue {
            expires: if i % 2 == 0 { 1 } else { u64::MAX },
            owner: 100 + (i % u32::from(OWNERS)) as u16,
            ..Default::default()
        };
        fx.dp.insert_ct(key(i), value).unwrap();
    }
    assert_eq!(fx.dp.gc_ct().unwrap().expired, N as usize / 2);
    let left = fx.dp.list_ct().unwrap();
    assert_eq!(left.len(), N as usize / 2);
    assert!(left.iter().all(|(_, v)| v.expires == u64::MAX));
    for owner in 100..100 + OWNERS {
        assert_eq!(fx.dp.ct_count(owner).unwrap(), N / 2 / u32::from(OWNERS));
    }
    assert_eq!(fx.dp.ct_live(), Some(u64::from(N / 2)));
    assert_eq!(
        fx.dp.ct_count(A_ID).unwrap(),
        0,
        "a count no entry stands for is reset"
    );
    // Nothing else to collect: a second run changes nothing.
    assert_eq!(fx.dp.gc_ct().unwrap().expired, 0);
    assert_eq!(fx.dp.list_ct().unwrap().len(), N as usize / 2);
}

#[test]
fn a_batch_delete_skips_entries_already_gone() {
    privileged!("ct_remove_batch");
    let fx = Fixture::new();
    const N: u32 = 6000;
    for i in 0..N {
        if i % 6 != 3 {
            fx.dp.insert_ct(key(i), CtValue::default()).unwrap();
        }
    }
    let all: Vec<CtKey> = (0..N).map(key).collect();
    assert_eq!(fx.dp.remove_cts(&all).unwrap(), 5000);
    assert!(fx.dp.list_ct().unwrap().is_empty());
    assert_eq!(fx.dp.remove_cts(&all).unwrap(), 0);
}

#[test]
fn budget_pressure_is_an_endpoint_past_three_quarters_with_more_than_the_last_gc_left() {
    privileged!("ct_pressure");
    let fx = Fixture::new();
    fx.dp.set_ct_budget(16).unwrap();
    let a = fx.a();
    for sport in 0..11 {
        a_opens(&a, 30000 + sport);
    }
    assert!(!fx.dp.ct_pressure().unwrap(), "11 of 16");
    // No GC has seen A yet: it is watched all the same.
    a_opens(&a, 30011);
    assert!(fx.dp.ct_pressure().unwrap(), "12 of 16, before any GC");
    // A GC that finds all 12 live leaves nothing a second one could free.
    assert_eq!(fx.dp.gc_ct().unwrap(), CtGcReport::default());
    assert_eq!(fx.dp.ct_count(A_ID).unwrap(), 12);
    assert!(!fx.dp.ct_pressure().unwrap(), "12 live: no early GC again");
    a_opens(&a, 30012);
    assert!(fx.dp.ct_pressure().unwrap(), "13, more than the GC left");
    // The default budget (0) counts as 32,768: 13 is far from it.
    fx.dp.set_ct_budget(0).unwrap();
    assert!(!fx.dp.ct_pressure().unwrap());
}

#[test]
fn near_its_budget_an_endpoint_loses_its_idle_closed_connections_first() {
    privileged!("ct_gc_closed_early");
    let fx = Fixture::new();
    fx.dp.set_ct_budget(16).unwrap();
    let s = 1_000_000_000u64;
    let now = datapath_clock_ns();
    // (owner, closing, seconds since the last packet), as the datapath
    // would leave them: a closing entry expires 10 s after its last
    // packet, an open one hours later.
    let entries: &[(u16, bool, u64)] = &[
        // Endpoint 7: 12 entries, three quarters of 16.
        (7, true, 3),
        (7, true, 2),
        (7, true, 0), // closed just now: its last ACK may be on its way
        (7, false, 5),
        (7, false, 5),
        (7, false, 5),
        (7, false, 5),
        (7, false, 5),
        (7, false, 5),
        (7, false, 5),
        (7, false, 5),
        (7, false, 5),
        // Endpoint 8: 4 entries, far from its budget.
        (8, true, 3),
        (8, true, 3),
        (8, false, 5),
        (8, false, 5),
    ];
    for (i, (owner, closing, idle)) in entries.iter().enumerate() {
        let lifetime = if *closing { 10 * s } else { 21_600 * s };
        let value = CtValue {
            expires: now + lifetime - idle * s,
            owner: *owner,
            flags: if *closing { CILIA_CT_CLOSING } else { 0 },
            ..Default::default()
        };
        fx.dp.insert_ct(key(i as u32), value).unwrap();
    }
    let report = fx.dp.gc_ct().unwrap();
    assert_eq!(
        report,
        CtGcReport {
            expired: 0,
            closed_early: 2
        }
    );
    assert_eq!(fx.dp.ct_count(7).unwrap(), 10);
    assert_eq!(fx.dp.ct_count(8).unwrap(), 4);
    let left: Vec<u32> = fx
        .dp
        .list_ct()
        .unwrap()
        .into_iter()
        .map(|(k, _)| u32::from_be_bytes(k.saddr[..4].try_into().unwrap()))
        .collect();
    assert!(!left.contains(&0) && !left.contains(&1), "{left:?}");
    assert!(left.contains(&2), "the one closed just now stays");
    assert_eq!(left.len(), 14);
    // Under three quarters now: a second run leaves the rest alone.
    assert_eq!(fx.dp.gc_ct().unwrap(), CtGcReport::default());
}

#[test]
fn the_conntrack_table_takes_its_configured_size_and_a_new_size_recreates_it() {
    privileged!("ct_max");
    let root = cilia_testnet::BpfRoot::new();
    let small = DatapathOptions { ct_max: 4096 };
    let dp = BpfDatapath::open_with(root.path(), &small).unwrap();
    assert_eq!(dp.ct_capacity(), 4096);
    for i in 0..4096 {
        dp.insert_ct(key(i), CtValue::default()).unwrap();
    }
    assert!(
        dp.insert_ct(key(4096), CtValue::default()).is_err(),
        "full at 4096"
    );
    drop(dp);
    // The same size again: the table and its entries stay.
    let dp = BpfDatapath::open_with(root.path(), &small).unwrap();
    assert!(dp.recreated_maps().is_empty());
    assert_eq!(dp.list_ct().unwrap().len(), 4096);
    // A datapath reload's check takes the configured size as the right one.
    dp.check_pins().unwrap();
    drop(dp);
    // Another size: recreated empty, saying why.
    let dp = BpfDatapath::open(root.path()).unwrap();
    assert_eq!(dp.ct_capacity(), CILIA_CT_MAX);
    let ct = dp
        .recreated_maps()
        .iter()
        .find(|m| m.name == "cilia_ct")
        .expect("cilia_ct recreated");
    assert!(
        ct.reason.contains("max_entries 4096, expected 262144"),
        "{}",
        ct.reason
    );
    assert!(dp.list_ct().unwrap().is_empty());
    // Out of range: refused, naming the range.
    let Err(err) = BpfDatapath::open_with(root.path(), &DatapathOptions { ct_max: 10 }) else {
        panic!("a table of 10 entries is refused");
    };
    assert!(
        err.to_string().contains("out of range 1024..=16777216"),
        "{err}"
    );
}
