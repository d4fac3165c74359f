//! The datapath clock (`cil_now()` in bpf/lib/maps.h, calibrated by
//! `cilia_datapath::clock`): the deadlines the programs write read
//! CLOCK_MONOTONIC_COARSE, which the agent's GC compares them with, both
//! through the calibration and without one.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use aya::maps::{Array, MapData};
use cilia_abi::*;
use cilia_datapath::clock;
use cilia_datapath::endpoint::datapath_clock_ns;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::TC_ACT_SHOT;

mod common;
use common::fixture::*;
use common::*;

const NS: u64 = 1_000_000_000;

/// CONFIG_HZ of the running kernel, when it publishes its configuration.
fn config_hz() -> Option<u64> {
    let out = std::process::Command::new("gzip")
        .args(["-dc", "/proc/config.gz"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

fn pinned_clock(fx: &Fixture) -> Array<MapData, ClockConfig> {
    let data = MapData::from_pin(fx.path().join("maps/cilia_clock")).unwrap();
    Array::try_from(aya::maps::Map::Array(data)).unwrap()
}

/// A new UDP flow A -> B:`dport` gets the 60 s of CILIA_CT_OTHER_TIMEOUT
/// from the moment its packet ran, on the coarse clock, to within `slack`.
fn deadline_reads_the_coarse_clock(fx: &Fixture, dport: u16, slack: u64) -> i64 {
    let packet = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(a6(), b6(), IPPROTO_UDP, 64, &udp(40000, dport, &[0; 8])),
    );
    let before = datapath_clock_ns();
    assert_ne!(fx.a().run(&packet).unwrap().verdict, TC_ACT_SHOT);
    let after = datapath_clock_ns();
    let expires = fx
        .dp
        .list_ct()
        .unwrap()
        .into_iter()
        .find_map(|(k, v)| {
            CtEntry::decode(&k, &v)
                .is_some_and(|e| e.destination.port() == dport)
                .then_some(v.expires)
        })
        .expect("the flow's conntrack entry");
    let lifetime = u64::from(CILIA_CT_OTHER_TIMEOUT) * NS;
    // How far the deadline is outside [before, after] + lifetime.
    let (low, high) = (before + lifetime, after + lifetime);
    let off = if expires < low {
        -((low - expires) as i64)
    } else {
        expires.saturating_sub(high) as i64
    };
    assert!(
        off.unsigned_abs() <= slack,
        "deadline {off} ns off the coarse clock (slack {slack} ns)"
    );
    off
}

#[test]
fn the_calibration_is_the_kernels_tick_and_the_programs_deadlines_read_the_coarse_clock() {
    privileged!("clock_calibrated");
    let calibration = clock::calibration().expect("the datapath clock calibrates on this kernel");
    if let Some(hz) = config_hz() {
        assert_eq!(clock::hz(&calibration), hz, "CONFIG_HZ of /proc/config.gz");
    }
    let fx = Fixture::new();
    assert_eq!(
        pinned_clock(&fx).get(&0, 0).unwrap(),
        calibration,
        "the datapath gives its programs the calibration"
    );
    // Within two ticks: each clock is at most a tick behind the time.
    deadline_reads_the_coarse_clock(&fx, 53, 2 * calibration.tick_ns);
}

#[test]
fn without_a_calibration_the_programs_read_the_coarse_clock_and_with_one_they_follow_it() {
    privileged!("clock_uncalibrated");
    let fx = Fixture::new();
    let calibration = clock::calibration().unwrap();
    let mut map = pinned_clock(&fx);
    map.set(0, ClockConfig::default(), 0).unwrap();
    deadline_reads_the_coarse_clock(&fx, 54, 2 * calibration.tick_ns);
    // The programs do read the calibration: a base one second later puts
    // the deadline one second later.
    let later = ClockConfig {
        base_ns: calibration.base_ns.wrapping_add(NS),
        ..calibration
    };
    map.set(0, later, 0).unwrap();
    let off = deadline_reads_the_coarse_clock(&fx, 55, 3 * NS);
    assert!(
        (off - NS as i64).unsigned_abs() <= 2 * calibration.tick_ns,
        "deadline {off} ns off, not the base's second"
    );
}
