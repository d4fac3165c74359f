//! ns/packet of the endpoint program under `BPF_PROG_TEST_RUN`, next to the
//! empty tc program measured in the same run (the baseline), and the cost of
//! monitoring against the program specialized without events. Needs root.
//! `cargo bench -p cilia-datapath --bench testrun`; prints one line per case
//! and the ratio to the baseline.

#![allow(clippy::unwrap_used)] // benchmark code: a panic is the failure report

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cilia_abi::{
    EndpointConfig, EndpointInfo, CILIA_MONITOR_DROPS, CILIA_MONITOR_OFF, CILIA_MONITOR_TRACE,
};
use cilia_datapath::packet::*;
use cilia_datapath::testrun::TestProgram;
use cilia_datapath::BpfDatapath;
use cilia_testnet::BpfRoot;

const RUNS: usize = 100_000;
const ROUNDS: usize = 5;

/// Median over rounds of the mean in-kernel ns of one run.
///
/// Each run is its own BPF_PROG_TEST_RUN with repeat 1: with repeat > 1 the
/// kernel runs the program again on the packet it already rewrote, so a
/// forwarding program would decrement the hop limit to expiry and then
/// measure its drop path. A single run's time includes the kernel's timer
/// overhead (the same for every case, baseline included).
fn measure(prog: &TestProgram, pkt: &[u8]) -> f64 {
    let mut samples: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let total: u128 = (0..RUNS)
                .map(|_| prog.time_per_run(pkt, 1).expect("test_run").as_nanos())
                .sum();
            total as f64 / RUNS as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[ROUNDS / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("testrun bench needs root (BPF_PROG_TEST_RUN)");
        std::process::exit(1);
    }
    let (a6, b6): (Ipv6Addr, Ipv6Addr) =
        ("fd00:c1::a".parse().unwrap(), "fd00:c1::b".parse().unwrap());
    let (a4, b4): (Ipv4Addr, Ipv4Addr) = (
        "10.200.0.10".parse().unwrap(),
        "10.200.0.11".parse().unwrap(),
    );
    let (mac, node_mac) = ([0x0a, 0, 0, 0, 0, 1], [0x0a, 0, 0, 0, 0, 2]);
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).expect("open datapath");
    let peer = EndpointInfo {
        ifindex: 4242,
        endpoint_id: 2,
        mac,
        node_mac,
        ..Default::default()
    };
    dp.upsert_endpoint(IpAddr::V6(b6), peer).unwrap();
    dp.upsert_endpoint(IpAddr::V4(b4), peer).unwrap();
    let config = |monitor: u8| EndpointConfig {
        ipv6: a6.octets(),
        ipv4: a4.octets(),
        mac,
        node_mac,
        ifindex: 4141,
        endpoint_id: 1,
        enable_ipv4: 1,
        monitor,
        ..Default::default()
    };
    let endpoint = dp.test_program(&config(1)).expect("load endpoint program");
    let no_monitor = dp
        .test_program(&config(0))
        .expect("load endpoint program without events");
    let empty = TestProgram::empty().expect("load empty program");

    let payload = [0u8; 64];
    let v6 = eth(
        node_mac,
        mac,
        ETH_P_IPV6,
        &ipv6(a6, b6, IPPROTO_UDP, 64, &udp(1000, 53, &payload)),
    );
    let v4 = eth(
        node_mac,
        mac,
        ETH_P_IP,
        &ipv4(a4, b4, IPPROTO_UDP, 64, &udp(1000, 53, &payload)),
    );
    let stack = eth(
        node_mac,
        mac,
        ETH_P_IPV6,
        &ipv6(
            a6,
            "fd00:c1::1".parse().unwrap(),
            IPPROTO_UDP,
            64,
            &udp(1000, 53, &payload),
        ),
    );

    let baseline = measure(&empty, &v6);
    println!("case\tns/packet\tratio-to-empty");
    println!("empty program (baseline)\t{baseline:.1}\t1.00");
    for (name, pkt) in [
        ("endpoint: IPv6 to local endpoint (redirect_peer)", &v6),
        ("endpoint: IPv4 to local endpoint (redirect_peer)", &v4),
        ("endpoint: IPv6 to host stack", &stack),
    ] {
        let ns = measure(&endpoint, pkt);
        println!("{name}\t{ns:.1}\t{:.2}", ns / baseline);
    }

    // Monitoring cost: the same forwarded IPv6 packet (an established flow)
    // through the program specialized without event code (the "no-monitor
    // build"), and with it at each monitor level. Nobody reads the ring
    // buffer here, so at the trace level it fills and the cost includes
    // counting lost events, as under a flood.
    println!();
    println!("monitoring\tns/packet\tratio-to-no-monitor");
    let base = measure(&no_monitor, &v6);
    println!("no-monitor build (events pruned)\t{base:.1}\t1.00");
    for (name, level) in [
        ("monitor off (counters only)", CILIA_MONITOR_OFF),
        ("monitor on: drops + policy verdicts", CILIA_MONITOR_DROPS),
        ("monitor on: + traces of every packet", CILIA_MONITOR_TRACE),
    ] {
        dp.set_monitor_level(level).unwrap();
        let ns = measure(&endpoint, &v6);
        println!("{name}\t{ns:.1}\t{:.3}", ns / base);
    }
    dp.set_monitor_level(CILIA_MONITOR_OFF).unwrap();
}
