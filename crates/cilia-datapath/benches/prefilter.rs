//! ns/packet of the XDP prefilter under `BPF_PROG_TEST_RUN`, next to the
//! empty XDP program (`probe_xdp`) measured in the same run: with 10 and
//! 10,000 CIDRs of each family, a listed source (dropped) and an unlisted
//! one (passed), IPv4 and IPv6. Each figure is the median over 5 rounds of
//! one call of 1,000,000 repeats (the program does not change the frame, so
//! repeats all run the same path). Needs root. `cargo bench -p
//! cilia-datapath --bench prefilter`; prints a markdown table.

#![allow(clippy::unwrap_used)] // benchmark code: a panic is the failure report

use std::net::{Ipv4Addr, Ipv6Addr};

use cilia_abi::PrefilterEntry;
use cilia_datapath::packet::{eth, ipv4, ipv6, udp, Mac};
use cilia_datapath::prefilter::{XdpTestProgram, XDP_DROP, XDP_PASS};
use cilia_datapath::BpfDatapath;
use cilia_testnet::BpfRoot;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;
const DST_MAC: Mac = [0x0a, 0, 0, 0, 0, 0xb1];
const SRC_MAC: Mac = [0x0a, 0, 0, 0, 0, 0xa1];

fn ns_per_packet(prog: &XdpTestProgram, frame: &[u8]) -> f64 {
    let mut samples: Vec<f64> = (0..ROUNDS)
        .map(|_| prog.time_per_run(frame, REPEAT).unwrap().as_nanos() as f64)
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[ROUNDS / 2]
}

/// `n` CIDRs of each family: IPv4 /32s spread over 10.0.0.0/8 and IPv6 /64s
/// under 2001:db8::/32 (documentation space), plus the two listed
/// sources' CIDRs (203.0.113.0/24, 2001:db8:bad::/48).
fn cidrs(n: u32) -> Vec<PrefilterEntry> {
    let mut out = Vec::new();
    for i in 0..n.saturating_sub(1) {
        let v4 = Ipv4Addr::from(0x0a00_0000u32 + i * 97);
        let v6 = Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x100 + (i >> 16) as u16,
            i as u16,
            0,
            0,
            0,
            0,
        );
        out.push(PrefilterEntry {
            cidr: format!("{v4}/32").parse().unwrap(),
            counter: 2 * i,
        });
        out.push(PrefilterEntry {
            cidr: format!("{v6}/64").parse().unwrap(),
            counter: 2 * i + 1,
        });
    }
    out.push(PrefilterEntry {
        cidr: "203.0.113.0/24".parse().unwrap(),
        counter: 2 * n,
    });
    out.push(PrefilterEntry {
        cidr: "2001:db8:bad::/48".parse().unwrap(),
        counter: 2 * n + 1,
    });
    out
}

fn frame4(src: Ipv4Addr) -> Vec<u8> {
    let dst = Ipv4Addr::new(192, 0, 2, 1);
    eth(
        DST_MAC,
        SRC_MAC,
        0x0800,
        &ipv4(src, dst, 17, 64, &udp(40000, 53, &[0u8; 64])),
    )
}

fn frame6(src: Ipv6Addr) -> Vec<u8> {
    let dst: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    eth(
        DST_MAC,
        SRC_MAC,
        0x86dd,
        &ipv6(src, dst, 17, 64, &udp(40000, 53, &[0u8; 64])),
    )
}

fn main() {
    if !cilia_testnet::require_privileges("bench prefilter") {
        return;
    }
    let empty = XdpTestProgram::empty().unwrap();
    let cases = [
        (
            "IPv4 listed (drop)",
            frame4(Ipv4Addr::new(203, 0, 113, 9)),
            XDP_DROP,
        ),
        (
            "IPv4 unlisted (pass)",
            frame4(Ipv4Addr::new(198, 51, 100, 9)),
            XDP_PASS,
        ),
        (
            "IPv6 listed (drop)",
            frame6("2001:db8:bad::9".parse().unwrap()),
            XDP_DROP,
        ),
        (
            "IPv6 unlisted (pass)",
            frame6("2001:db8:900::9".parse().unwrap()),
            XDP_PASS,
        ),
    ];
    let base = ns_per_packet(&empty, &cases[0].1);
    println!("| case | ns/packet | ratio to empty XDP |");
    println!("|---|---|---|");
    println!("| empty XDP program (baseline) | {base:.1} | 1.00 |");
    for n in [10u32, 10_000] {
        let root = BpfRoot::new();
        let dp = BpfDatapath::open(root.path()).unwrap();
        dp.upsert_prefilter(&cidrs(n)).unwrap();
        let prog = dp.test_prefilter_program().unwrap();
        for (what, frame, verdict) in &cases {
            assert_eq!(prog.run(frame).unwrap(), *verdict, "{what}");
            let ns = ns_per_packet(&prog, frame);
            println!(
                "| {n} CIDRs per family, {what} | {ns:.1} | {:.2} |",
                ns / base
            );
        }
    }
}
