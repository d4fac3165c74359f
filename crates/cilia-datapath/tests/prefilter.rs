//! The XDP prefilter: `BPF_PROG_TEST_RUN` fixtures (listed sources of both
//! families dropped, others passed, the longest prefix counting, what
//! cannot be parsed passed) and real traffic between a "world" namespace
//! and a node namespace whose device runs the prefilter: a listed source is
//! dropped while another's TCP and ICMP flow, and CIDR updates and
//! attach/detach under continuous traffic from the allowed source lose
//! nothing. Documentation addresses only (192.0.2.0/24, 198.51.100.0/24,
//! 203.0.113.0/24, 2001:db8::/32).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cilia_abi::{PrefilterCount, PrefilterEntry};
use cilia_datapath::packet::{eth, ipv4, ipv6, udp};
use cilia_datapath::prefilter::{PrefilterMode, XDP_DROP, XDP_PASS};
use cilia_datapath::BpfDatapath;
use cilia_testnet::cluster::{exchange, tcp_connect, EchoServer};
use cilia_testnet::{BpfRoot, Netns};

mod common;
use common::*;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

fn entry(cidr: &str, counter: u32) -> PrefilterEntry {
    PrefilterEntry {
        cidr: cidr.parse().unwrap(),
        counter,
    }
}

fn frame4(src: &str) -> Vec<u8> {
    let src: Ipv4Addr = src.parse().unwrap();
    let dst = Ipv4Addr::new(192, 0, 2, 1);
    eth(
        B_MAC,
        A_MAC,
        ETH_P_IP,
        &ipv4(src, dst, 17, 64, &udp(40000, 53, b"q")),
    )
}

fn frame6(src: &str) -> Vec<u8> {
    let src: Ipv6Addr = src.parse().unwrap();
    let dst: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    eth(
        B_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(src, dst, 17, 64, &udp(40000, 53, b"q")),
    )
}

/// `inner` (an Ethernet frame) with VLAN tags of `tpids` inserted after the MACs.
fn tagged(inner: &[u8], tpids: &[u16]) -> Vec<u8> {
    let mut out = inner[..12].to_vec();
    for (i, tpid) in tpids.iter().enumerate() {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    out.extend_from_slice(&inner[12..]);
    out
}

fn count_of(counts: &[PrefilterCount], cidr: &str) -> (u64, u64) {
    let cidr = cidr.parse().unwrap();
    counts
        .iter()
        .find(|c| c.entry.cidr == cidr)
        .map(|c| (c.packets, c.bytes))
        .unwrap_or_else(|| panic!("{cidr} is not listed: {counts:?}"))
}

#[test]
fn listed_sources_are_dropped_and_counted_by_their_longest_prefix() {
    privileged!("listed_sources_are_dropped_and_counted_by_their_longest_prefix");
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).unwrap();
    dp.upsert_prefilter(&[
        entry("203.0.113.0/24", 0),
        entry("203.0.113.128/25", 1),
        entry("2001:db8:bad::/48", 2),
        entry("2001:db8:bad:1::/64", 3),
    ])
    .unwrap();
    let prog = dp.test_prefilter_program().unwrap();

    let v4_short = frame4("203.0.113.5");
    let v6_short = frame6("2001:db8:bad:2::9");
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("IPv4 in the /24", v4_short.clone(), XDP_DROP),
        ("IPv4 in the /25", frame4("203.0.113.200"), XDP_DROP),
        ("IPv4 elsewhere", frame4("198.51.100.7"), XDP_PASS),
        ("IPv6 in the /48", v6_short.clone(), XDP_DROP),
        ("IPv6 in the /64", frame6("2001:db8:bad:1::9"), XDP_DROP),
        ("IPv6 elsewhere", frame6("2001:db8:900::9"), XDP_PASS),
        (
            "802.1Q-tagged IPv4",
            tagged(&v4_short, &[ETH_P_8021Q]),
            XDP_DROP,
        ),
        (
            "QinQ-tagged IPv6",
            tagged(&v6_short, &[ETH_P_8021AD, ETH_P_8021Q]),
            XDP_DROP,
        ),
        (
            "three tags (beyond what is parsed)",
            tagged(&v4_short, &[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q]),
            XDP_PASS,
        ),
        ("ARP", eth(B_MAC, A_MAC, ETH_P_ARP, &[0u8; 28]), XDP_PASS),
        (
            "truncated IPv4 header",
            v4_short[..14 + 10].to_vec(),
            XDP_PASS,
        ),
        (
            "truncated IPv6 header",
            v6_short[..14 + 30].to_vec(),
            XDP_PASS,
        ),
        ("bare Ethernet header", v4_short[..14].to_vec(), XDP_PASS),
    ];
    for (what, frame, want) in &cases {
        assert_eq!(prog.run(frame).unwrap(), *want, "{what}");
    }

    let counts = dp.prefilter().unwrap();
    // The /24 got the untagged and the 802.1Q frame; the /48 the untagged
    // and the QinQ one; the longer prefixes one frame each.
    let v4_len = v4_short.len() as u64;
    let v6_len = v6_short.len() as u64;
    assert_eq!(count_of(&counts, "203.0.113.0/24"), (2, 2 * v4_len + 4));
    assert_eq!(count_of(&counts, "203.0.113.128/25"), (1, v4_len));
    assert_eq!(count_of(&counts, "2001:db8:bad::/48"), (2, 2 * v6_len + 8));
    assert_eq!(count_of(&counts, "2001:db8:bad:1::/64"), (1, v6_len));

    // Removing the /25 hands its sources to the /24; removing everything
    // passes them. A CIDR written again with its slot keeps its counts.
    dp.remove_prefilter(&["203.0.113.128/25".parse().unwrap()])
        .unwrap();
    assert_eq!(prog.run(&frame4("203.0.113.200")).unwrap(), XDP_DROP);
    dp.upsert_prefilter(&[entry("203.0.113.0/24", 0)]).unwrap();
    assert_eq!(count_of(&dp.prefilter().unwrap(), "203.0.113.0/24").0, 3);
    dp.remove_prefilter(&[
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8:bad::/48".parse().unwrap(),
        "2001:db8:bad:1::/64".parse().unwrap(),
        "198.51.100.0/24".parse().unwrap(), // absent: not an error
    ])
    .unwrap();
    assert_eq!(prog.run(&frame4("203.0.113.200")).unwrap(), XDP_PASS);
    assert_eq!(prog.run(&v6_short).unwrap(), XDP_PASS);
    assert!(dp.prefilter().unwrap().is_empty());

    // A CIDR put into a used slot starts from zero.
    dp.upsert_prefilter(&[entry("198.51.100.0/24", 0)]).unwrap();
    assert_eq!(
        count_of(&dp.prefilter().unwrap(), "198.51.100.0/24"),
        (0, 0)
    );
}

#[test]
fn maps_are_pinned_and_shared_by_a_second_handle() {
    privileged!("maps_are_pinned_and_shared_by_a_second_handle");
    let root = BpfRoot::new();
    let first = BpfDatapath::open(root.path()).unwrap();
    first
        .upsert_prefilter(&[entry("203.0.113.0/24", 7)])
        .unwrap();
    drop(first);
    let second = BpfDatapath::open(root.path()).unwrap();
    let listed = second.prefilter().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].entry, entry("203.0.113.0/24", 7));
    for name in [
        "cilia_prefilter_v4",
        "cilia_prefilter_v6",
        "cilia_prefilter_counters",
    ] {
        assert!(
            root.path().join("maps").join(name).exists(),
            "{name} pinned"
        );
    }
}

/// A world namespace and a node namespace joined by a veth pair (`eth0`
/// in the node). The world holds an allowed source (192.0.2.2,
/// 2001:db8:1::2) and a listed one (203.0.113.9, 2001:db8:bad::9) on the
/// same device; the node routes back to both.
struct Net {
    world: Netns,
    node: Netns,
}

fn net() -> Net {
    let world = Netns::new("cpfw").unwrap();
    let node = Netns::new("cpfn").unwrap();
    node.sh(&format!(
        "set -e
         ip link add eth0 type veth peer name eth0 netns {w}
         ip addr add 192.0.2.1/24 dev eth0
         ip addr add 2001:db8:1::1/64 dev eth0 nodad
         ip link set eth0 up
         ip route add 203.0.113.9/32 via 192.0.2.2
         ip -6 route add 2001:db8:bad::9/128 via 2001:db8:1::2",
        w = world.name()
    ))
    .unwrap();
    world
        .sh("set -e
             ip addr add 192.0.2.2/24 dev eth0
             ip addr add 203.0.113.9/32 dev eth0
             ip addr add 2001:db8:1::2/64 dev eth0 nodad
             ip addr add 2001:db8:bad::9/128 dev eth0 nodad
             ip link set eth0 up")
        .unwrap();
    Net { world, node }
}

/// `count` pings from `src` to `dst` inside `ns`, `interval` apart; how
/// many came back.
fn pings(ns: &Netns, src: IpAddr, dst: IpAddr, count: u32, interval: &str) -> u32 {
    let out = ns
        .command("ping")
        .args([
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            "1",
            "-I",
            &src.to_string(),
            &dst.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(',')
        .find(|part| part.contains("received"))
        .and_then(|part| part.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A TCP connection from `src` in `ns` to `to`, bounded by `within`.
fn connect_from(ns: &Netns, src: IpAddr, to: SocketAddr, within: Duration) -> Result<(), String> {
    ns.run(|| {
        let socket = match src {
            IpAddr::V4(_) => {
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            }
            IpAddr::V6(_) => {
                socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
            }
        }
        .map_err(|e| e.to_string())?;
        socket
            .bind(&SocketAddr::new(src, 0).into())
            .map_err(|e| format!("bind {src}: {e}"))?;
        socket
            .connect_timeout(&to.into(), within)
            .map_err(|e| format!("connect {src} -> {to}: {e}"))
    })
}

#[test]
fn listed_source_is_dropped_on_the_device_while_others_flow() {
    privileged!("listed_source_is_dropped_on_the_device_while_others_flow");
    let net = net();
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).unwrap();
    let link = net.node.run(|| dp.attach_prefilter("eth0")).unwrap();
    assert_eq!(link.mode, PrefilterMode::Native, "veth has native XDP");
    assert!(root.path().join("node/prefilter_native_eth0").exists());
    dp.upsert_prefilter(&[entry("203.0.113.0/24", 0), entry("2001:db8:bad::/48", 1)])
        .unwrap();

    let node4: IpAddr = "192.0.2.1".parse().unwrap();
    let node6: IpAddr = "2001:db8:1::1".parse().unwrap();
    let allowed4: IpAddr = "192.0.2.2".parse().unwrap();
    let allowed6: IpAddr = "2001:db8:1::2".parse().unwrap();
    let listed4: IpAddr = "203.0.113.9".parse().unwrap();
    let listed6: IpAddr = "2001:db8:bad::9".parse().unwrap();

    assert_eq!(pings(&net.world, allowed4, node4, 3, "0.2"), 3);
    assert_eq!(pings(&net.world, allowed6, node6, 3, "0.2"), 3);
    assert_eq!(pings(&net.world, listed4, node4, 3, "0.2"), 0);
    assert_eq!(pings(&net.world, listed6, node6, 3, "0.2"), 0);

    let srv4 = EchoServer::start(&net.node, node4, 0);
    let srv6 = EchoServer::start(&net.node, node6, 0);
    connect_from(&net.world, allowed4, srv4.addr, WAIT).unwrap();
    connect_from(&net.world, allowed6, srv6.addr, WAIT).unwrap();
    let short = Duration::from_millis(800);
    assert!(connect_from(&net.world, listed4, srv4.addr, short).is_err());
    assert!(connect_from(&net.world, listed6, srv6.addr, short).is_err());

    let counts = dp.prefilter().unwrap();
    assert!(count_of(&counts, "203.0.113.0/24").0 >= 4, "{counts:?}");
    assert!(count_of(&counts, "2001:db8:bad::/48").0 >= 4, "{counts:?}");

    // A datapath reload swaps the program inside the same link.
    let pin = root.path().join("node/prefilter_native_eth0");
    let before = cilia_datapath::inspect::link_target(&pin).unwrap();
    assert_eq!(dp.reload_node_programs().unwrap(), 1);
    let after = cilia_datapath::inspect::link_target(&pin).unwrap();
    assert_eq!(after.link_id, before.link_id);
    assert_ne!(after.program_id, before.program_id);
    assert_eq!(pings(&net.world, listed4, node4, 2, "0.2"), 0);

    // Attaching again keeps the link (and mode); detaching lets the
    // listed source through.
    let again = net.node.run(|| dp.attach_prefilter("eth0")).unwrap();
    assert_eq!(again.mode, PrefilterMode::Native);
    assert_eq!(dp.prefilter_links().unwrap().len(), 1);
    dp.detach_prefilter("eth0").unwrap();
    assert!(dp.prefilter_links().unwrap().is_empty());
    assert_eq!(pings(&net.world, listed4, node4, 2, "0.2"), 2);
}

#[test]
fn device_without_native_xdp_gets_generic_mode_and_says_why() {
    privileged!("device_without_native_xdp_gets_generic_mode_and_says_why");
    let ns = Netns::new("cpfl").unwrap();
    ns.sh("ip addr add 203.0.113.77/32 dev lo; ip addr add 198.51.100.77/32 dev lo")
        .unwrap();
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).unwrap();
    // The loopback device has no native XDP.
    let link = ns.run(|| dp.attach_prefilter("lo")).unwrap();
    assert_eq!(link.mode, PrefilterMode::Generic);
    assert!(link.native_error.is_some(), "{link:?}");
    assert!(root.path().join("node/prefilter_generic_lo").exists());
    let listed = dp.prefilter_links().unwrap();
    assert_eq!(listed[0].mode, PrefilterMode::Generic);

    dp.upsert_prefilter(&[entry("203.0.113.77/32", 5)]).unwrap();
    let ok: IpAddr = "198.51.100.77".parse().unwrap();
    let bad: IpAddr = "203.0.113.77".parse().unwrap();
    assert_eq!(pings(&ns, ok, ok, 2, "0.2"), 2);
    assert_eq!(pings(&ns, bad, ok, 2, "0.2"), 0);
    assert!(count_of(&dp.prefilter().unwrap(), "203.0.113.77/32").0 >= 2);
}

#[test]
fn updates_and_reattach_under_traffic_lose_nothing_of_the_allowed_source() {
    privileged!("updates_and_reattach_under_traffic_lose_nothing_of_the_allowed_source");
    let net = net();
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).unwrap();
    net.node.run(|| dp.attach_prefilter("eth0")).unwrap();
    dp.upsert_prefilter(&[entry("203.0.113.0/24", 0)]).unwrap();

    let node4: IpAddr = "192.0.2.1".parse().unwrap();
    let node6: IpAddr = "2001:db8:1::1".parse().unwrap();
    let srv = EchoServer::start(&net.node, node4, 0);
    let mut conn = tcp_connect(&net.world, srv.addr, WAIT).unwrap();

    // Pings from the allowed sources run throughout (bounded: 400 each,
    // 5 ms apart, about 2 s).
    let world4 = net.world.name().to_string();
    let ping_stream = |src: &'static str, dst: IpAddr| {
        let ns = world4.clone();
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns, "ping", "-n", "-q", "-c", "400", "-i", "0.005",
                ])
                .args(["-W", "1", "-I", src, &dst.to_string()])
                .output()
                .unwrap()
        })
    };
    let p4 = ping_stream("192.0.2.2", node4);
    let p6 = ping_stream("2001:db8:1::2", node6);

    // Meanwhile: CIDR churn (never covering the allowed sources), the
    // program re-attached into its link or detached and attached anew, TCP
    // echo exchanges between steps.
    let started = Instant::now();
    let mut exchanges = 0;
    for i in 0..200u32 {
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        let cidrs = [
            format!("198.51.100.{}/32", i % 250),
            format!("2001:db8:dead:{i:x}::/64"),
        ];
        let entries: Vec<PrefilterEntry> = cidrs
            .iter()
            .enumerate()
            .map(|(k, c)| entry(c, 10 + k as u32))
            .collect();
        dp.upsert_prefilter(&entries).unwrap();
        match i % 20 {
            // The program swapped into its pinned link.
            0 => drop(net.node.run(|| dp.attach_prefilter("eth0")).unwrap()),
            // Detached and attached anew (the device leaves XDP and comes back).
            10 => {
                dp.detach_prefilter("eth0").unwrap();
                net.node.run(|| dp.attach_prefilter("eth0")).unwrap();
            }
            _ => {}
        }
        exchange(&mut conn, format!("exchange {i}").as_bytes()).unwrap();
        exchanges += 1;
        let nets: Vec<ipnet::IpNet> = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        dp.remove_prefilter(&nets).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(exchanges >= 50, "only {exchanges} exchanges in 20 s");

    for (what, handle) in [("IPv4", p4), ("IPv6", p6)] {
        let out = handle.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            text.contains("400 received"),
            "{what} pings lost during updates: {text}"
        );
    }
    // The listed source is still dropped after the churn.
    assert_eq!(
        pings(&net.world, "203.0.113.9".parse().unwrap(), node4, 2, "0.2"),
        0
    );
}
