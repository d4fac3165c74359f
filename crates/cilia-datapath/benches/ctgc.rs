//! Time of one conntrack GC run (`BpfDatapath::gc_ct`: walk the table,
//! delete what expired, recount all 65,536 budget slots) with N entries of
//! which half have expired, next to the same run done with aya's per-entry
//! calls (a next-key and a lookup per entry, a delete per expired key, a
//! read per budget slot), the way the GC worked before it used the
//! kernel's batch commands, measured in the same run on the same table.
//! Median of 3 rounds; the expired half is put back before each run.
//! Needs root. `cargo bench -p cilia-datapath --bench ctgc`; prints a
//! markdown table.

#![allow(clippy::unwrap_used)] // benchmark code: a panic is the failure report

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, Map, MapData};
use cilia_abi::{CtKey, CtValue, CILIA_CT_MAX, CILIA_FAMILY_IPV6};
use cilia_datapath::{datapath_clock_ns, BpfDatapath};
use cilia_testnet::BpfRoot;

const ROUNDS: usize = 3;

fn key(i: u32) -> CtKey {
    let mut key = CtKey {
        proto: 17,
        family: CILIA_FAMILY_IPV6,
        ..Default::default()
    };
    key.saddr[..4].copy_from_slice(&i.to_be_bytes());
    key
}

/// Entry `i`: odd ones live, even ones expired, 50 owners.
fn value(i: u32) -> CtValue {
    CtValue {
        expires: if i.is_multiple_of(2) { 1 } else { u64::MAX },
        owner: 1 + (i % 50) as u16,
        ..Default::default()
    }
}

fn refill(dp: &BpfDatapath, n: u32) {
    for i in (0..n).step_by(2) {
        dp.insert_ct(key(i), value(i)).unwrap();
    }
}

/// The GC with one system call per entry and per slot.
fn per_entry_gc(ct: &mut HashMap<MapData, CtKey, CtValue>, counts: &mut Array<MapData, u32>) {
    let now = datapath_clock_ns();
    let mut owned = BTreeMap::<u16, u32>::new();
    let mut expired = Vec::new();
    for entry in ct.iter() {
        let (k, v) = entry.unwrap();
        if v.expires <= now {
            expired.push(k);
        } else {
            *owned.entry(v.owner).or_default() += 1;
        }
    }
    for k in expired {
        ct.remove(&k).unwrap();
    }
    for id in 0..=u16::MAX {
        let want = owned.get(&id).copied().unwrap_or(0);
        if counts.get(&u32::from(id), 0).unwrap() != want {
            counts.set(u32::from(id), want, 0).unwrap();
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if !cilia_testnet::require_privileges("ctgc bench") {
        return;
    }
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).unwrap();
    let pinned = |name: &str| {
        Map::from_map_data(MapData::from_pin(root.path().join("maps").join(name)).unwrap()).unwrap()
    };
    let mut ct: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(pinned("cilia_ct")).unwrap();
    let mut counts: Array<MapData, u32> = Array::try_from(pinned("cilia_ct_count")).unwrap();
    println!("| entries (half expired) | per-entry calls, ms | batch (`gc_ct`), ms | batch / per-entry |");
    println!("|---|---|---|---|");
    let mut filled = 0;
    for n in [0u32, 1_000, 32_768, 131_072, CILIA_CT_MAX - 1_000] {
        for i in filled..n {
            dp.insert_ct(key(i), value(i)).unwrap();
        }
        filled = n;
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            refill(&dp, n);
            let t = Instant::now();
            per_entry_gc(&mut ct, &mut counts);
            old.push(t.elapsed());
            refill(&dp, n);
            let t = Instant::now();
            let report = dp.gc_ct().unwrap();
            new.push(t.elapsed());
            assert_eq!(report.expired, n.div_ceil(2) as usize);
        }
        let (old, new) = (median(old), median(new));
        println!(
            "| {n} | {:.1} | {:.1} | {:.2} |",
            old.as_secs_f64() * 1e3,
            new.as_secs_f64() * 1e3,
            new.as_secs_f64() / old.as_secs_f64()
        );
    }
}
