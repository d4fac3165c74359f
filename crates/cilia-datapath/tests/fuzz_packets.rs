//! Fuzzing the endpoint program: mutated packets through the real
//! from-container program (`BPF_PROG_TEST_RUN`), each checked against
//! invariants that no input may break:
//!
//! - the verdict is one of pass, drop or redirect;
//! - nothing leaves the endpoint with a source address that is not its own
//!   (neighbour discovery aside, which has its own rules);
//! - B's L4 deny (TCP/22 from A) holds for every packet that a reference
//!   parser written here, independently of the C, reads as TCP to port 22.
//!
//! Bounded in time and count by `CILIA_FUZZ_*` (see `cilia_testnet::fuzz`). The
//! corpus in `fuzz/packets/` (hex, one packet per file) seeds it; a failing
//! input is written there as `crash-*.hex` before the test fails.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::IpAddr;
use std::path::PathBuf;

use cilia_abi::*;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use cilia_testnet::fuzz::{mutate_bytes, Budget, Rng};

mod common;
use common::fixture::*;
use common::*;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/packets")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The seeds: the packet shapes the parser has to get right.
fn seeds() -> Vec<Vec<u8>> {
    let v6 = |nh: u8, payload: &[u8]| {
        eth(
            A_NODE_MAC,
            A_MAC,
            ETH_P_IPV6,
            &ipv6(a6(), b6(), nh, 64, payload),
        )
    };
    let syn22 = tcp(40000, 22, 0x02);
    let mut dest_then_tcp = vec![6, 0, 1, 4, 0, 0, 0, 0];
    dest_then_tcp.extend_from_slice(&syn22);
    let mut frag_then_tcp = vec![6, 0, 0, 1, 0, 0, 0, 9];
    frag_then_tcp.extend_from_slice(&syn22);
    let mut icmp_err = vec![1, 4, 0, 0, 0, 0, 0, 0];
    icmp_err.extend_from_slice(&a_to_b(80)[14..14 + 48]);
    let mut seeds = vec![
        a_to_b(22),
        a_to_b(80),
        v6(60, &dest_then_tcp),
        v6(44, &frag_then_tcp),
        v6(IPPROTO_UDP, &udp(1000, 53, b"q")),
        v6(58, &icmp_err),
        neighbour_solicitation(A_MAC, a6(), gw6()),
        eth(
            A_NODE_MAC,
            A_MAC,
            ETH_P_IP,
            &ipv4(a4(), b4(), 6, 64, &syn22),
        ),
        eth(
            A_NODE_MAC,
            A_MAC,
            ETH_P_IP,
            &ipv4(a4(), b4(), IPPROTO_UDP, 64, &udp(1, 53, b"q")),
        ),
        arp_request(A_MAC, a4(), gw4()),
    ];
    if let Ok(dir) = std::fs::read_dir(corpus_dir()) {
        for entry in dir.flatten() {
            if let Some(p) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| unhex(&t))
            {
                seeds.push(p);
            }
        }
    }
    seeds
}

/// Generic byte mutations, plus the spots where the parse decides:
/// the IPv6 next header, the first extension header, the IPv4 fragment
/// field.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        &[0],
        &[0xff],
        &[6],
        &[17],
        &[44],
        &[58],
        &[60],
        &[43],
        &[135],
    ];
    let seed = rng.pick(seeds).clone();
    let mut p = mutate_bytes(rng, &seed, TOKENS);
    if p.len() < 14 {
        p.resize(14, 0);
    }
    if p.len() > 22 && rng.below(3) == 0 {
        let i = (*rng.pick(&[20usize, 54, 62, 21])).min(p.len() - 1);
        p[i] = rng.next_u64() as u8;
    }
    p
}

/// The reference reading of a packet: (source, L4 protocol, destination
/// port if the packet carries its L4 header, destination address), walking
/// IPv6 extension headers as the kernel would; None for non-IP.
struct Reading {
    src: Vec<u8>,
    dst: Vec<u8>,
    proto: u8,
    dport: Option<u16>,
    nd: bool,
}

fn read(p: &[u8]) -> Option<Reading> {
    let ethertype = u16::from_be_bytes([*p.get(12)?, *p.get(13)?]);
    match ethertype {
        ETH_P_IPV6 => {
            let ip = p.get(14..54)?;
            let (src, dst) = (ip[8..24].to_vec(), ip[24..40].to_vec());
            let mut nh = ip[6];
            let mut off = 54usize;
            let mut first = true;
            loop {
                match nh {
                    0 | 43 | 60 => {
                        let h = p.get(off..off + 2)?;
                        nh = h[0];
                        off += (usize::from(h[1]) + 1) * 8;
                    }
                    51 => {
                        let h = p.get(off..off + 2)?;
                        nh = h[0];
                        off += (usize::from(h[1]) + 2) * 4;
                    }
                    44 => {
                        let h = p.get(off..off + 8)?;
                        nh = h[0];
                        first = u16::from_be_bytes([h[2], h[3]]) & 0xfff8 == 0;
                        off += 8;
                        if !first {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            let dport = (first && nh == 6)
                .then(|| {
                    p.get(off + 2..off + 4)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]))
                })
                .flatten();
            let nd = nh == 58 && p.get(off).is_some_and(|t| (133..=137).contains(t));
            Some(Reading {
                src,
                dst,
                proto: nh,
                dport,
                nd,
            })
        }
        ETH_P_IP => {
            let ip = p.get(14..34)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            let off = 14 + ihl;
            let dport = (frag == 0 && ip[9] == 6 && ihl >= 20)
                .then(|| {
                    p.get(off + 2..off + 4)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]))
                })
                .flatten();
            Some(Reading {
                src: ip[12..16].to_vec(),
                dst: ip[16..20].to_vec(),
                proto: ip[9],
                dport,
                nd: false,
            })
        }
        _ => None,
    }
}

#[test]
fn random_packets_never_break_the_endpoint_programs_invariants() {
    privileged!("fuzz_packets");
    let mut fx = Fixture::new();
    b_denies_ssh_from_a(&mut fx);
    // B's IPv4 address is local too, for the IPv4 half.
    fx.dp
        .upsert_endpoint(
            IpAddr::V4(b4()),
            EndpointInfo {
                ifindex: 4002,
                identity: B_IDENTITY,
                endpoint_id: B_ID,
                flags: 0,
                mac: B_MAC,
                node_mac: B_NODE_MAC,
            },
        )
        .unwrap();
    let a = fx.a();
    let mut budget = Budget::from_env("packets", 1_000_000);
    let mut rng = Rng::new(budget.seed);
    let seeds = seeds();
    let mut refused = 0u64;
    let (own6, own4) = (a6().octets().to_vec(), a4().octets().to_vec());
    let (b6o, b4o) = (b6().octets().to_vec(), b4().octets().to_vec());
    while budget.another() {
        let packet = mutate(&mut rng, &seeds);
        let Ok(out) = a.run(&packet) else {
            // BPF_PROG_TEST_RUN itself refuses some inputs (EINVAL): the
            // kernel would never hand such a frame to the program.
            refused += 1;
            continue;
        };
        let mut broken = None;
        if ![TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&out.verdict) {
            broken = Some(format!("verdict {}", out.verdict));
        } else if out.verdict != TC_ACT_SHOT {
            if let Some(r) = read(&packet) {
                let own = if r.src.len() == 16 { &own6 } else { &own4 };
                if !r.nd && &r.src != own {
                    broken = Some("passed with a source that is not the endpoint's".into());
                } else if r.proto == 6 && r.dport == Some(22) && (r.dst == b6o || r.dst == b4o) {
                    broken = Some("TCP/22 to B passed B's deny".into());
                }
            }
        }
        if let Some(what) = broken {
            let _ = std::fs::create_dir_all(corpus_dir());
            let path = corpus_dir().join(format!("crash-{}-{}.hex", budget.seed, budget.runs));
            let _ = std::fs::write(&path, hex(&packet));
            panic!("{what}: {} (saved as {})", hex(&packet), path.display());
        }
    }
    budget.report("packets");
    println!("fuzz packets: {refused} inputs refused by test_run itself");
    assert!(budget.runs - refused > 100, "the fuzzer ran");
}

/// The underlay's program (native routing) on the same mutated packets:
/// B's ingress policy admits only A, whose addresses are local and so
/// never accepted from the underlay, and the remote prefix has an
/// identity B does not admit: nothing may ever be delivered to B (A,
/// without a policy, admits anything).
#[test]
fn random_packets_from_the_underlay_never_reach_an_endpoint_past_its_policy() {
    privileged!("fuzz_netdev_packets");
    let mut fx = Fixture::new();
    b_denies_ssh_from_a(&mut fx);
    let remote = IpcacheEntry {
        prefix: "fd00:c1a:2::/112".parse().unwrap(),
        identity: 3000,
        tunnel: Some("2001:db8:100::2".parse().unwrap()),
    };
    fx.dp
        .upsert_ipcache_value(remote.key(), remote.value())
        .unwrap();
    // Native routing: the only mode in which the program delivers to
    // endpoints.
    fx.dp
        .set_node_config(&cilia_abi::NodeConfig {
            tunnel_mode: cilia_abi::TunnelMode::Native,
            tunnel_ifindex: 0,
            underlay_ifindex: 4301,
            tunnel_port: 0,
        })
        .unwrap();
    let prog = fx
        .dp
        .test_node_program(cilia_datapath::object::PROG_FROM_NETDEV)
        .unwrap();
    let mut budget = Budget::from_env("netdev packets", 1_000_000);
    let mut rng = Rng::new(budget.seed);
    let seeds = seeds();
    let mut refused = 0u64;
    let b6o = b6().octets().to_vec();
    while budget.another() {
        let packet = mutate(&mut rng, &seeds);
        let Ok(out) = prog.run(&packet) else {
            refused += 1;
            continue;
        };
        let to_b = read(&packet).is_some_and(|r| r.dst == b6o);
        let broken = match out.verdict {
            TC_ACT_OK | TC_ACT_SHOT => None,
            TC_ACT_REDIRECT if to_b => Some("delivered to B, which admits no such source"),
            TC_ACT_REDIRECT => None,
            _ => Some("unknown verdict"),
        };
        if let Some(what) = broken {
            let _ = std::fs::create_dir_all(corpus_dir());
            let path =
                corpus_dir().join(format!("crash-netdev-{}-{}.hex", budget.seed, budget.runs));
            let _ = std::fs::write(&path, hex(&packet));
            panic!("{what}: {} (saved as {})", hex(&packet), path.display());
        }
    }
    budget.report("netdev packets");
    assert!(budget.runs - refused > 100, "the fuzzer ran");
}
