//! ns/packet of the endpoint program under `BPF_PROG_TEST_RUN`, next to the
//! empty tc program measured in the same run (the baseline): one table per
//! path (established flows of IPv6 and IPv4, TCP and UDP, to a local
//! endpoint and to the host stack; a new flow through policy; a policy
//! drop), and the cost of monitoring against the program specialized
//! without events. Needs root. `cargo bench -p cilia-datapath --bench
//! testrun`; prints one line per case and the ratio to the baseline.
//! `CILIA_BENCH_ROUNDS`, `CILIA_BENCH_RUNS` and `CILIA_BENCH_STAT=min` (the
//! fastest round, for a shared machine) change how it samples;
//! `CILIA_BENCH_ONLY=<text>` runs only the cases whose name contains it
//! (the empty program's baseline always runs).

#![allow(clippy::unwrap_used)] // benchmark code: a panic is the failure report

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cilia_abi::{
    Direction, EndpointConfig, EndpointInfo, EndpointPolicy, Enforcement, LbAlgorithm, LbBackend,
    LbBackendState, LbFrontend, LbService, PolicyEntry, Verdict, CILIA_MONITOR_DROPS,
    CILIA_MONITOR_OFF, CILIA_MONITOR_TRACE,
};
use cilia_datapath::object;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TestProgram, TC_ACT_SHOT};
use cilia_datapath::BpfDatapath;
use cilia_datapath::Datapath;
use cilia_testnet::BpfRoot;

const RUNS: usize = 100_000;
const ROUNDS: usize = 5;

/// A positive count from the environment, else `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(default)
}

/// Rounds per case: `CILIA_BENCH_ROUNDS`, default [`ROUNDS`].
fn rounds() -> usize {
    env_count("CILIA_BENCH_ROUNDS", ROUNDS)
}

/// Runs per round of the established-flow cases: `CILIA_BENCH_RUNS`,
/// default [`RUNS`] (shorter rounds with `CILIA_BENCH_STAT=min` dodge more
/// of other work's interference).
fn runs() -> usize {
    env_count("CILIA_BENCH_RUNS", RUNS)
}

/// Whether the case `name` runs: all of them, or with `CILIA_BENCH_ONLY`
/// those whose name contains it (to profile one path, e.g. under `perf`).
fn selected(name: &str) -> bool {
    std::env::var("CILIA_BENCH_ONLY").map_or(true, |only| name.contains(&only))
}

/// The statistic over rounds: the median by default; `CILIA_BENCH_STAT=min`
/// takes the fastest round instead, which on a machine other work shares
/// estimates the uncontended cost (interference only ever adds time).
fn pick(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    if std::env::var("CILIA_BENCH_STAT").as_deref() == Ok("min") {
        samples[0]
    } else {
        samples[samples.len() / 2]
    }
}
/// Runs per round of the new-flow cases: each run is a flow of its own (a
/// source port of its own), and the endpoint's conntrack is emptied between
/// rounds, so this stays under its conntrack budget.
const NEW_FLOW_RUNS: usize = 20_000;
/// The peer endpoint's identity (what the policy cases allow or not).
const PEER_IDENTITY: u32 = 1000;

/// A TCP header (20 bytes, no options) with `flags`; checksum left 0 (the
/// program does not verify it).
fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // seq
    h.extend_from_slice(&1u32.to_be_bytes()); // ack
    h.push(5 << 4); // data offset
    h.push(flags);
    h.extend_from_slice(&65535u16.to_be_bytes()); // window
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    h.extend_from_slice(payload);
    h
}

/// Median (see [`pick`]) over rounds of the mean in-kernel ns of one run, each run a new
/// flow (`packet(i)` differs per run); `reset` empties conntrack between
/// rounds.
fn measure_new(
    prog: &TestProgram,
    packet: impl Fn(usize) -> Vec<u8>,
    reset: impl Fn(),
    dropped: bool,
) -> f64 {
    let packets: Vec<Vec<u8>> = (0..NEW_FLOW_RUNS).map(&packet).collect();
    let first = prog.run(&packets[0]).expect("test_run");
    assert_eq!(
        first.verdict == TC_ACT_SHOT,
        dropped,
        "a new-flow case took the other path"
    );
    let samples: Vec<f64> = (0..rounds())
        .map(|_| {
            reset();
            let total: u128 = packets
                .iter()
                .map(|p| prog.time_per_run(p, 1).expect("test_run").as_nanos())
                .sum();
            total as f64 / NEW_FLOW_RUNS as f64
        })
        .collect();
    reset();
    pick(samples)
}

/// Median (or, see [`pick`], minimum) over rounds of the mean in-kernel ns
/// of one run.
///
/// Each run is its own BPF_PROG_TEST_RUN with repeat 1: with repeat > 1 the
/// kernel runs the program again on the packet it already rewrote, so a
/// forwarding program would decrement the hop limit to expiry and then
/// measure its drop path. A single run's time includes the kernel's timer
/// overhead (the same for every case, baseline included).
fn measure(prog: &TestProgram, pkt: &[u8]) -> f64 {
    measure_rounds(prog, pkt, rounds())
}

/// [`measure`] over `rounds` rounds.
fn measure_rounds(prog: &TestProgram, pkt: &[u8], rounds: usize) -> f64 {
    // A case that measures the drop path by mistake measures nothing.
    let first = prog.run(pkt).expect("test_run");
    assert_ne!(
        first.verdict, TC_ACT_SHOT,
        "an established-flow case was dropped"
    );
    let samples: Vec<f64> = (0..rounds)
        .map(|_| {
            let runs = runs();
            let total: u128 = (0..runs)
                .map(|_| prog.time_per_run(pkt, 1).expect("test_run").as_nanos())
                .sum();
            total as f64 / runs as f64
        })
        .collect();
    pick(samples)
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
        identity: PEER_IDENTITY,
        mac,
        node_mac,
        ..Default::default()
    };
    dp.upsert_endpoint(IpAddr::V6(b6), peer).unwrap();
    dp.upsert_endpoint(IpAddr::V4(b4), peer).unwrap();
    // Every endpoint has a policy map (empty: nothing selects it); one
    // without fails closed.
    for id in [1, 2] {
        dp.set_policy(id, &Default::default()).unwrap();
    }
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

    let stack_v4 = eth(
        node_mac,
        mac,
        ETH_P_IP,
        &ipv4(
            a4,
            "10.200.0.1".parse().unwrap(),
            IPPROTO_UDP,
            64,
            &udp(1000, 53, &payload),
        ),
    );
    const ACK: u8 = 0x10;
    let tcp6 = |dst: Ipv6Addr| {
        eth(
            node_mac,
            mac,
            ETH_P_IPV6,
            &ipv6(a6, dst, IPPROTO_TCP, 64, &tcp(1000, 80, ACK, &payload)),
        )
    };
    let tcp4 = |dst: Ipv4Addr| {
        eth(
            node_mac,
            mac,
            ETH_P_IP,
            &ipv4(a4, dst, IPPROTO_TCP, 64, &tcp(1000, 80, ACK, &payload)),
        )
    };
    let host6: Ipv6Addr = "fd00:c1::1".parse().unwrap();
    let host4: Ipv4Addr = "10.200.0.1".parse().unwrap();

    // With CILIA_BENCH_ONLY (a profile of one case: bench/bpf-lines.sh
    // asks for rounds enough to outlast its sampling) the baseline keeps
    // the default rounds.
    let baseline = if std::env::var_os("CILIA_BENCH_ONLY").is_some() {
        measure_rounds(&empty, &v6, ROUNDS)
    } else {
        measure(&empty, &v6)
    };
    println!("established flow (no policy)\tns/packet\tratio-to-empty");
    println!("empty program (baseline)\t{baseline:.1}\t1.00");
    for (name, pkt) in [
        ("IPv6 UDP to local endpoint (redirect_peer)", &v6),
        ("IPv4 UDP to local endpoint (redirect_peer)", &v4),
        ("IPv6 TCP to local endpoint (redirect_peer)", &tcp6(b6)),
        ("IPv4 TCP to local endpoint (redirect_peer)", &tcp4(b4)),
        ("IPv6 UDP to host stack", &stack),
        ("IPv4 UDP to host stack", &stack_v4),
        ("IPv6 TCP to host stack", &tcp6(host6)),
        ("IPv4 TCP to host stack", &tcp4(host4)),
    ] {
        if !selected(name) {
            continue;
        }
        let ns = measure(&endpoint, pkt);
        println!("{name}\t{ns:.1}\t{:.2}", ns / baseline);
    }
    // A reply: the node's stack opens a flow to the endpoint (its
    // to-container program creates the entry), and the endpoint's answers
    // are what its from-container program then carries.
    let reply_name = "IPv6 UDP reply to the host stack (flow opened by the stack)";
    if selected(reply_name) {
        let to_container = dp
            .test_program_to_container(&config(1))
            .expect("load the endpoint's to-container program");
        let opening = eth(
            mac,
            node_mac,
            ETH_P_IPV6,
            &ipv6(host6, a6, IPPROTO_UDP, 64, &udp(2000, 7000, &payload)),
        );
        assert_ne!(
            to_container.run(&opening).expect("test_run").verdict,
            TC_ACT_SHOT,
            "the stack's flow to the endpoint was dropped"
        );
        let reply = eth(
            node_mac,
            mac,
            ETH_P_IPV6,
            &ipv6(a6, host6, IPPROTO_UDP, 64, &udp(7000, 2000, &payload)),
        );
        let ns = measure(&endpoint, &reply);
        println!("{reply_name}\t{ns:.1}\t{:.2}", ns / baseline);
    }
    // The floor under the fast path (bpf/floor.c): the least a program must
    // do to deliver the IPv4 UDP packet above, without and with one lookup,
    // beside cilia's program on the same packet.
    println!();
    println!("floor, IPv4 UDP to local endpoint\tns/packet\tratio-to-empty");
    for (name, prog) in [
        ("parse, deliver, no lookup", object::PROG_FLOOR_PARSE),
        (
            "+ one lookup, 40-byte key (cilia's)",
            object::PROG_FLOOR_CT40,
        ),
        ("+ one lookup, 16-byte IPv4 key", object::PROG_FLOOR_CT16),
    ] {
        if !selected(name) {
            continue;
        }
        let floor = TestProgram::floor(prog).expect("load floor program");
        let ns = measure(&floor, &v4);
        println!("{name}\t{ns:.1}\t{:.2}", ns / baseline);
    }
    if selected("cilia (the same packet)") {
        let ns = measure(&endpoint, &v4);
        println!("cilia (the same packet)\t{ns:.1}\t{:.2}", ns / baseline);
    }
    // The same to the node's stack: one lookup, the entry refreshed,
    // TC_ACT_OK (what cilia's fast path does for a flow that leaves the
    // endpoint for the stack), beside cilia on the same packet.
    println!();
    println!("floor, IPv4 UDP to the host stack\tns/packet\tratio-to-empty");
    let stack_floor = "one lookup, 40-byte key, to the stack";
    if selected(stack_floor) {
        let floor = TestProgram::floor(object::PROG_FLOOR_STACK40).expect("load floor program");
        let ns = measure(&floor, &stack_v4);
        println!("{stack_floor}\t{ns:.1}\t{:.2}", ns / baseline);
    }
    if selected("cilia (the same packet to the stack)") {
        let ns = measure(&endpoint, &stack_v4);
        println!(
            "cilia (the same packet to the stack)\t{ns:.1}\t{:.2}",
            ns / baseline
        );
    }
    // Services: the peer is the one backend of a frontend on TCP/80; an
    // established (pinned) flow pays the service lookup, the pin, the
    // backend lookup and the rewrite on top of the redirect.
    let (vip6, vip4): (Ipv6Addr, Ipv4Addr) = (
        "fd00:5e::10".parse().unwrap(),
        "10.96.0.10".parse().unwrap(),
    );
    for (id, vip, backend) in [
        (1, IpAddr::V6(vip6), IpAddr::V6(b6)),
        (2, IpAddr::V4(vip4), IpAddr::V4(b4)),
    ] {
        dp.upsert_lb_backends(&[LbBackend {
            id,
            addr: std::net::SocketAddr::new(backend, 80),
            state: LbBackendState::Active,
        }])
        .unwrap();
        dp.upsert_lb_service(&LbService {
            rev_nat: id as u16,
            frontend: LbFrontend {
                addr: vip,
                port: 80,
                proto: IPPROTO_TCP,
            },
            algorithm: LbAlgorithm::Random,
            affinity_timeout: None,
            slots: vec![id],
            maglev: None,
            flags: Default::default(),
        })
        .unwrap();
    }
    for (name, pkt) in [
        (
            "IPv6 TCP to a service frontend (pinned, DNAT, redirect_peer)",
            &tcp6(vip6),
        ),
        (
            "IPv4 TCP to a service frontend (pinned, DNAT, redirect_peer)",
            &tcp4(vip4),
        ),
    ] {
        if !selected(name) {
            continue;
        }
        let ns = measure(&endpoint, pkt);
        println!("{name}\t{ns:.1}\t{:.2}", ns / baseline);
    }

    // Through policy: egress enforced, UDP/53 to the peer's identity
    // allowed, nothing else.
    let allow_dns = PolicyEntry {
        direction: Direction::Egress,
        identity: PEER_IDENTITY,
        proto: IPPROTO_UDP,
        port: 53,
        port_prefix_len: 16,
        verdict: Verdict::Allow,
        rule: 1,
        proxy_port: 0,
    };
    dp.set_endpoint_policy(
        1,
        &EndpointPolicy {
            enforcement: Enforcement {
                ingress: false,
                egress: true,
                audit: false,
            },
            entries: vec![allow_dns],
        },
    )
    .unwrap();
    let reset = || {
        dp.purge_conntrack(1, &[IpAddr::V6(a6), IpAddr::V4(a4)])
            .unwrap();
    };
    let port = |i: usize| 1024 + (i % 60_000) as u16;
    println!();
    println!("through policy (egress enforced, one allow)\tns/packet\tratio-to-empty");
    if selected("IPv6 UDP established, allowed") {
        let established = measure(&endpoint, &v6);
        println!(
            "IPv6 UDP established, allowed\t{established:.1}\t{:.2}",
            established / baseline
        );
    }
    // New flows (a source port each): (name, IPv6?, destination port).
    for (name, v6_family, dport) in [
        (
            "IPv6 UDP new flow, allowed (conntrack miss, policy lookups, conntrack create)",
            true,
            53,
        ),
        ("IPv4 UDP new flow, allowed", false, 53),
        ("IPv6 UDP new flow, policy drop", true, 54),
        ("IPv4 UDP new flow, policy drop", false, 54),
    ] {
        if !selected(name) {
            continue;
        }
        let packet = |i: usize| {
            let l4 = udp(port(i), dport, &payload);
            if v6_family {
                eth(
                    node_mac,
                    mac,
                    ETH_P_IPV6,
                    &ipv6(a6, b6, IPPROTO_UDP, 64, &l4),
                )
            } else {
                eth(node_mac, mac, ETH_P_IP, &ipv4(a4, b4, IPPROTO_UDP, 64, &l4))
            }
        };
        let ns = measure_new(&endpoint, packet, reset, dport != 53);
        println!("{name}\t{ns:.1}\t{:.2}", ns / baseline);
    }
    // New flows as a busy node sees them: each to an address of its own
    // (198.18.0.0/15, the range RFC 2544 sets aside for benchmarks; crafted
    // packets, nothing leaves), so what the lookups of a destination touch
    // (the buckets of the endpoints and services hashes) is cold, as for
    // varied traffic, not the same hot line every time. Nothing allows the
    // world: each is a policy drop.
    let varied = "IPv4 UDP new flows to varied addresses, policy drop";
    if selected(varied) {
        let packet = |i: usize| {
            let dst = Ipv4Addr::from(0xc612_0000 + (i as u32).wrapping_mul(7919) % 131_072);
            let l4 = udp(port(i), 53, &payload);
            eth(
                node_mac,
                mac,
                ETH_P_IP,
                &ipv4(a4, dst, IPPROTO_UDP, 64, &l4),
            )
        };
        let ns = measure_new(&endpoint, packet, reset, true);
        println!("{varied}\t{ns:.1}\t{:.2}", ns / baseline);
    }
    // The floors under a new flow (bpf/floor.c), on the IPv4 packets above:
    // the conntrack miss, insert and delivery alone, then with the one
    // ipcache and one policy lookup a verdict needs at least; the policy
    // drop is the latter on a port nothing allows.
    println!();
    println!("floor, IPv4 UDP new flow\tns/packet\tratio-to-empty");
    let packet4 = |dport: u16| {
        move |i: usize| {
            let l4 = udp(port(i), dport, &payload);
            eth(node_mac, mac, ETH_P_IP, &ipv4(a4, b4, IPPROTO_UDP, 64, &l4))
        }
    };
    for (name, prog, dport) in [
        (
            "miss, insert, deliver (no identity, no policy)",
            object::PROG_FLOOR_NEW_CT,
            53,
        ),
        (
            "+ one ipcache and one policy lookup",
            object::PROG_FLOOR_NEW_POLICY,
            53,
        ),
        (
            "policy drop: miss, ipcache and policy lookup",
            object::PROG_FLOOR_NEW_POLICY,
            54,
        ),
    ] {
        if !selected(name) {
            continue;
        }
        let floor = TestProgram::new_flow_floor(prog, b4, &allow_dns).expect("load floor program");
        let reset_floor = || {
            floor
                .clear_conntrack()
                .expect("empty the floor's conntrack");
        };
        let ns = measure_new(&floor, packet4(dport), reset_floor, dport != 53);
        println!("{name}\t{ns:.1}\t{:.2}", ns / baseline);
    }
    dp.set_endpoint_policy(1, &EndpointPolicy::default())
        .unwrap();
    reset();

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
        if !selected(name) {
            continue;
        }
        dp.set_monitor_level(level).unwrap();
        let ns = measure(&endpoint, &v6);
        println!("{name}\t{ns:.1}\t{:.3}", ns / base);
    }
    dp.set_monitor_level(CILIA_MONITOR_OFF).unwrap();
}
