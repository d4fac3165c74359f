//! `Datapath::lb_stats` on the kernel: the per-CPU service counters summed
//! over CPUs, for the services of the rev-NAT map only.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use cilia_abi::{LbRevNatValue, LbStats};
use cilia_datapath::Datapath;

mod common;
use common::fixture::*;
use common::*;

fn pinned(fx: &Fixture, name: &str) -> Map {
    let path = fx.dp.root().join("maps").join(name);
    Map::from_map_data(MapData::from_pin(&path).unwrap()).unwrap()
}

#[test]
fn lb_stats_sums_cpus_for_the_services_of_the_revnat_map() {
    privileged!("lb_stats_sums_cpus");
    let fx = Fixture::new();
    // Loading a program pins every map of the object.
    let _ = fx.a();
    let dp: &dyn Datapath = &fx.dp;
    assert!(dp.lb_stats().unwrap().is_empty(), "no service yet");

    let mut revnat: HashMap<MapData, u16, LbRevNatValue> =
        HashMap::try_from(pinned(&fx, "cilia_lb_revnat")).unwrap();
    revnat.insert(7, LbRevNatValue::default(), 0).unwrap();
    let mut stats: PerCpuArray<MapData, LbStats> =
        PerCpuArray::try_from(pinned(&fx, "cilia_lb_stats")).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let per_cpu = |flows: u64| {
        PerCpuValues::try_from(
            (0..cpus as u64)
                .map(|cpu| LbStats {
                    flows: flows + cpu,
                    packets: 10,
                    bytes: 1000,
                })
                .collect::<Vec<_>>(),
        )
        .unwrap()
    };
    stats.set(7, per_cpu(1), 0).unwrap();
    // Counters of an id without a rev-NAT entry are not read.
    stats.set(8, per_cpu(5), 0).unwrap();

    let n = cpus as u64;
    assert_eq!(
        dp.lb_stats().unwrap(),
        vec![(
            7,
            LbStats {
                flows: n + n * (n - 1) / 2,
                packets: 10 * n,
                bytes: 1000 * n,
            }
        )]
    );
}
