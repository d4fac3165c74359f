//! Datapath fixtures: crafted packets through the real endpoint program with
//! `BPF_PROG_TEST_RUN`. Each case is packet in -> verdict and packet out;
//! together they are the specification of the from-container program.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cilia_abi::{addr_filter_bit, EndpointConfig, EndpointInfo, CILIA_DROP_SPOOFED_SOURCE};
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TestProgram, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use cilia_datapath::BpfDatapath;
use cilia_testnet::BpfRoot;

mod common;
use common::*;

struct Fixture {
    _root: BpfRoot,
    dp: BpfDatapath,
}

impl Fixture {
    fn new() -> Self {
        let root = BpfRoot::new();
        let dp = BpfDatapath::open(root.path()).expect("open datapath");
        let b = EndpointInfo {
            ifindex: 4242,
            identity: 0,
            endpoint_id: 2,
            flags: 0,
            mac: B_MAC,
            node_mac: B_NODE_MAC,
        };
        dp.upsert_endpoint(IpAddr::V6(b6()), b).unwrap();
        dp.upsert_endpoint(IpAddr::V4(b4()), b).unwrap();
        dp.set_policy(b.endpoint_id, &Default::default()).unwrap(); // empty: nothing selects it
        let a = EndpointInfo {
            ifindex: 4141,
            endpoint_id: 1,
            mac: A_MAC,
            node_mac: A_NODE_MAC,
            ..b
        };
        dp.upsert_endpoint(IpAddr::V6(a6()), a).unwrap();
        dp.upsert_endpoint(IpAddr::V4(a4()), a).unwrap();
        dp.set_policy(a.endpoint_id, &Default::default()).unwrap(); // empty: nothing selects it
        Self { _root: root, dp }
    }

    fn program(
        &self,
        mac: Mac,
        node_mac: Mac,
        v6: Ipv6Addr,
        v4: Option<Ipv4Addr>,
        id: u16,
    ) -> TestProgram {
        let cfg = EndpointConfig {
            ipv6: v6.octets(),
            ipv4: v4.map(|a| a.octets()).unwrap_or_default(),
            mac,
            node_mac,
            ifindex: 4141,
            identity: 0,
            endpoint_id: id,
            enable_ipv4: u8::from(v4.is_some()),
            monitor: 1,
        };
        self.dp
            .test_program(&cfg)
            .expect("load specialized endpoint program")
    }

    fn endpoint_a(&self) -> TestProgram {
        self.program(A_MAC, A_NODE_MAC, a6(), Some(a4()), 1)
    }
}

fn udp6(src: Ipv6Addr, dst: Ipv6Addr, hop: u8) -> Vec<u8> {
    eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(src, dst, IPPROTO_UDP, hop, &udp(1000, 53, b"hello")),
    )
}

fn udp4(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IP,
        &ipv4(src, dst, IPPROTO_UDP, ttl, &udp(1000, 53, b"hello")),
    )
}

#[test]
fn ipv6_to_local_endpoint_is_redirected_with_target_macs_and_hop_limit_decremented() {
    privileged!("ipv6_to_local_endpoint");
    let fx = Fixture::new();
    let out = fx.endpoint_a().run(&udp6(a6(), b6(), 64)).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(&out.packet[0..6], &B_MAC);
    assert_eq!(&out.packet[6..12], &B_NODE_MAC);
    assert_eq!(out.packet[14 + 7], 63, "hop limit");
}

#[test]
fn ipv4_to_local_endpoint_is_redirected_with_ttl_and_checksum_updated() {
    privileged!("ipv4_to_local_endpoint");
    let fx = Fixture::new();
    let out = fx.endpoint_a().run(&udp4(a4(), b4(), 64)).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(&out.packet[0..6], &B_MAC);
    assert_eq!(out.packet[14 + 8], 63, "ttl");
    assert_eq!(
        checksum(&out.packet[14..34]),
        0,
        "IPv4 header checksum stays valid"
    );
}

#[test]
fn reply_from_the_peer_is_redirected_back() {
    privileged!("reply_from_the_peer");
    let fx = Fixture::new();
    let b = fx.program(B_MAC, B_NODE_MAC, b6(), Some(b4()), 2);
    let pkt = eth(
        B_NODE_MAC,
        B_MAC,
        ETH_P_IPV6,
        &ipv6(b6(), a6(), IPPROTO_UDP, 64, &udp(53, 1000, b"re")),
    );
    let out = b.run(&pkt).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(&out.packet[0..6], &A_MAC);
}

#[test]
fn traffic_to_a_non_endpoint_goes_to_the_stack_unchanged() {
    privileged!("traffic_to_a_non_endpoint");
    let fx = Fixture::new();
    let prog = fx.endpoint_a();
    for pkt in [udp6(a6(), gw6(), 64), udp4(a4(), gw4(), 64)] {
        let out = prog.run(&pkt).unwrap();
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.packet, pkt);
    }
}

/// The endpoints' address filter (`CILIA_ADDR_FILTER_WORDS` in abi.h): the
/// bit of every local endpoint address, the datapath computing the same bit
/// (it delivers to every one of them), a bit kept until the last address on
/// it goes (an address written twice counts once), and rebuilt from the
/// endpoints map when the maps are opened again.
#[test]
fn the_endpoint_filter_has_the_bit_of_every_endpoint_address_and_the_datapath_agrees() {
    privileged!("endpoint_filter");
    let fx = Fixture::new();
    let a = fx.endpoint_a();
    let b = fx.dp.list_endpoints().unwrap()[0].1;
    let b = EndpointInfo {
        endpoint_id: 2,
        mac: B_MAC,
        node_mac: B_NODE_MAC,
        ifindex: 4242,
        ..b
    };
    // 200 more addresses of each family for endpoint B, spread over
    // their prefixes, each written twice.
    let extra = spread_addrs(200, [0xfd00, 0xc1], 0x0ac8_0000, 0xffff, 0x100);
    for _ in 0..2 {
        for ip in &extra {
            fx.dp.upsert_endpoint(*ip, b).unwrap();
        }
    }
    let bits = || {
        let mut bits: Vec<u32> = fx
            .dp
            .list_endpoints()
            .unwrap()
            .iter()
            .map(|(key, _)| addr_filter_bit(key.ip().unwrap()))
            .collect();
        bits.sort_unstable();
        bits.dedup();
        bits
    };
    assert!(bits().len() >= 400, "{} bits", bits().len());
    assert_eq!(fx.dp.endpoint_filter_bits().unwrap(), bits());
    let delivered = |prog: &TestProgram, ip: IpAddr| {
        let pkt = match ip {
            IpAddr::V6(d) => udp6(a6(), d, 64),
            IpAddr::V4(d) => udp4(a4(), d, 64),
        };
        let out = prog.run(&pkt).unwrap();
        out.verdict == TC_ACT_REDIRECT && out.packet[0..6] == B_MAC
    };
    for ip in &extra {
        assert!(delivered(&a, *ip), "{ip}");
    }

    // Half of them withdrawn: their bits go with the last address on them.
    let (gone, kept) = extra.split_at(extra.len() / 2);
    for ip in gone {
        fx.dp.remove_endpoint(*ip).unwrap();
    }
    assert_eq!(fx.dp.endpoint_filter_bits().unwrap(), bits());
    for ip in gone {
        assert!(!delivered(&a, *ip), "{ip} was withdrawn");
    }

    // Opened again on filter words all zero: rebuilt from the endpoints.
    zero_filter(fx._root.path(), "cilia_endpoint_filter");
    let again = BpfDatapath::open(fx._root.path()).unwrap();
    assert_eq!(again.endpoint_filter_bits().unwrap(), bits());
    for ip in kept.iter().chain([&IpAddr::V6(b6()), &IpAddr::V4(b4())]) {
        assert!(delivered(&a, *ip), "{ip} after the rebuild");
    }
}

/// The endpoints' filter may only err toward "maybe local" (a bit set with
/// no address behind it). A bit wrongly clear (a bug, a write lost) makes a
/// packet to a local endpoint look like one to the world: it goes to the
/// node's stack instead of being redirected, and arrives at the
/// destination's to-container program, which drops a local endpoint's packet
/// that comes that way. It fails closed: dropped by name, never delivered
/// around the checks of the redirect.
#[test]
fn a_wrongly_clear_endpoint_filter_bit_fails_closed() {
    privileged!("endpoint_filter_clear");
    let fx = Fixture::new();
    zero_filter(fx._root.path(), "cilia_endpoint_filter");
    let a = fx.endpoint_a();
    let b_in = fx
        .dp
        .test_program_to_container(&EndpointConfig {
            ipv6: b6().octets(),
            ipv4: b4().octets(),
            mac: B_MAC,
            node_mac: B_NODE_MAC,
            ifindex: 4242,
            identity: 0,
            endpoint_id: 2,
            enable_ipv4: 1,
            monitor: 1,
        })
        .expect("load B's to-container program");
    for pkt in [udp6(a6(), b6(), 64), udp4(a4(), b4(), 64)] {
        let out = a.run(&pkt).unwrap();
        assert_eq!(out.verdict, TC_ACT_OK, "not redirected: to the stack");
        // Routed by the stack onto B's veth: B's MACs.
        let mut arriving = out.packet.clone();
        arriving[0..6].copy_from_slice(&B_MAC);
        arriving[6..12].copy_from_slice(&B_NODE_MAC);
        assert_eq!(b_in.run(&arriving).unwrap().verdict, TC_ACT_SHOT);
    }
    assert_eq!(
        drops(&fx.dp, CILIA_DROP_SPOOFED_SOURCE),
        2,
        "counted as spoofed"
    );
}

#[test]
fn spoofed_source_addresses_are_dropped_and_counted() {
    privileged!("spoofed_source_addresses");
    let fx = Fixture::new();
    let prog = fx.endpoint_a();
    let forged6: Ipv6Addr = "fd00:c1::99".parse().unwrap();
    assert_eq!(
        prog.run(&udp6(forged6, b6(), 64)).unwrap().verdict,
        TC_ACT_SHOT
    );
    assert_eq!(
        prog.run(&udp4("10.200.0.99".parse().unwrap(), b4(), 64))
            .unwrap()
            .verdict,
        TC_ACT_SHOT
    );
    assert_eq!(
        drops(&fx.dp, CILIA_DROP_SPOOFED_SOURCE),
        2,
        "spoofed drops are counted"
    );
}

#[test]
fn expiring_hop_limit_and_ttl_are_dropped() {
    privileged!("expiring_hop_limit");
    let fx = Fixture::new();
    let prog = fx.endpoint_a();
    assert_eq!(prog.run(&udp6(a6(), b6(), 1)).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(prog.run(&udp4(a4(), b4(), 1)).unwrap().verdict, TC_ACT_SHOT);
}

#[test]
fn neighbour_solicitation_for_the_gateway_is_answered_with_the_node_mac() {
    privileged!("neighbour_solicitation");
    let fx = Fixture::new();
    let ns = neighbour_solicitation(A_MAC, a6(), gw6());
    let out = fx.endpoint_a().run(&ns).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back to the container");
    let p = &out.packet;
    assert_eq!(p.len(), 14 + 40 + 32);
    assert_eq!(&p[0..6], &A_MAC);
    assert_eq!(&p[6..12], &A_NODE_MAC);
    assert_eq!(&p[14 + 8..14 + 24], &gw6().octets(), "source is the target");
    assert_eq!(
        &p[14 + 24..14 + 40],
        &a6().octets(),
        "destination is the solicitor"
    );
    let icmp = &p[54..86];
    assert_eq!(icmp[0], 136, "neighbour advertisement");
    assert_eq!(icmp[4] & 0xe0, 0xe0, "router, solicited, override");
    assert_eq!(&icmp[8..24], &gw6().octets());
    assert_eq!(&icmp[24..26], &[2, 1], "target link-layer address option");
    assert_eq!(&icmp[26..32], &A_NODE_MAC);
    assert_eq!(icmpv6_checksum(gw6(), a6(), icmp), 0, "checksum is valid");
}

#[test]
fn neighbour_solicitation_for_its_own_address_goes_to_the_stack() {
    privileged!("neighbour_solicitation_own");
    let fx = Fixture::new();
    let ns = neighbour_solicitation(A_MAC, a6(), a6());
    assert_eq!(fx.endpoint_a().run(&ns).unwrap().verdict, TC_ACT_OK);
}

#[test]
fn arp_request_for_the_gateway_is_answered_with_the_node_mac() {
    privileged!("arp_request");
    let fx = Fixture::new();
    let out = fx
        .endpoint_a()
        .run(&arp_request(A_MAC, a4(), gw4()))
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let p = &out.packet;
    assert_eq!(&p[0..6], &A_MAC);
    assert_eq!(&p[6..12], &A_NODE_MAC);
    let arp = &p[14..42];
    assert_eq!(&arp[6..8], &[0, 2], "reply");
    assert_eq!(&arp[8..14], &A_NODE_MAC, "sender MAC is the node's");
    assert_eq!(&arp[14..18], &gw4().octets());
    assert_eq!(&arp[18..24], &A_MAC);
    assert_eq!(&arp[24..28], &a4().octets());
}

#[test]
fn ipv4_is_dropped_when_the_endpoint_has_no_ipv4() {
    privileged!("ipv4_disabled");
    let fx = Fixture::new();
    let v6only = fx.program(A_MAC, A_NODE_MAC, a6(), None, 1);
    assert_eq!(
        v6only.run(&udp4(a4(), b4(), 64)).unwrap().verdict,
        TC_ACT_SHOT
    );
    assert_eq!(
        v6only
            .run(&arp_request(A_MAC, a4(), gw4()))
            .unwrap()
            .verdict,
        TC_ACT_SHOT
    );
    assert_eq!(
        v6only.run(&udp6(a6(), b6(), 64)).unwrap().verdict,
        TC_ACT_REDIRECT
    );
}

#[test]
fn truncated_and_malformed_packets_never_pass_as_valid() {
    privileged!("truncated_packets");
    let fx = Fixture::new();
    let prog = fx.endpoint_a();
    let valid = [
        udp6(a6(), b6(), 64),
        udp4(a4(), b4(), 64),
        neighbour_solicitation(A_MAC, a6(), gw6()),
        arp_request(A_MAC, a4(), gw4()),
    ];
    let mut runs = 0;
    for pkt in &valid {
        for len in 14..pkt.len() {
            // BPF_PROG_TEST_RUN itself refuses IP packets whose L3 header is
            // truncated (EINVAL before the program runs); the rest must run.
            let Ok(out) = prog.run(&pkt[..len]) else {
                continue;
            };
            runs += 1;
            assert!(
                [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&out.verdict),
                "len {len}: verdict {}",
                out.verdict
            );
            // A truncated L3 header must be dropped, never forwarded.
            if len < 14 + 20 {
                assert_eq!(out.verdict, TC_ACT_SHOT, "len {len} of {pkt:02x?}");
            }
        }
    }
    assert!(
        runs > 60,
        "only {runs} truncated packets reached the program"
    );
    // Garbage: wrong IP version, unknown ethertype, bad ARP hardware type.
    let mut bad_version = udp6(a6(), b6(), 64);
    bad_version[14] = 0x40;
    assert_eq!(prog.run(&bad_version).unwrap().verdict, TC_ACT_SHOT);
    let unknown = eth(A_NODE_MAC, A_MAC, 0x88b5, &[0; 46]);
    assert_eq!(prog.run(&unknown).unwrap().verdict, TC_ACT_SHOT);
    let mut bad_arp = arp_request(A_MAC, a4(), gw4());
    bad_arp[15] = 6;
    assert_eq!(prog.run(&bad_arp).unwrap().verdict, TC_ACT_SHOT);
}

#[test]
fn the_empty_baseline_program_loads_and_passes() {
    privileged!("empty_baseline");
    let empty = TestProgram::empty().unwrap();
    assert_eq!(empty.run(&udp6(a6(), b6(), 64)).unwrap().verdict, TC_ACT_OK);
}

/// The bench's floors (bpf/floor.c) load, and deliver what they claim to:
/// the first packet of a flow creates its entry, the next is redirected
/// with the TTL and MACs rewritten. Else the bench would time another path.
#[test]
fn the_benchmark_floors_load_and_deliver_an_established_flow() {
    privileged!("benchmark_floors");
    use cilia_datapath::object::{PROG_FLOOR_CT16, PROG_FLOOR_CT40, PROG_FLOOR_PARSE};
    for name in [PROG_FLOOR_PARSE, PROG_FLOOR_CT40, PROG_FLOOR_CT16] {
        let floor = TestProgram::floor(name).unwrap();
        let pkt = udp4(a4(), b4(), 64);
        let first = floor.run(&pkt).unwrap();
        if name != PROG_FLOOR_PARSE {
            assert_eq!(first.verdict, TC_ACT_OK, "{name}: the first packet creates");
        }
        let out = floor.run(&pkt).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{name}");
        assert_eq!(out.packet[14 + 8], 63, "{name}: the TTL");
        assert_eq!(&out.packet[..6], &[0x0a, 0, 0, 0, 0, 1], "{name}: the MAC");
    }
}

/// The new-flow floors of `bpf/floor.c` do what the bench says they time:
/// every new flow of an allowed port is created and delivered, a flow of a
/// port nothing allows is dropped and leaves no entry, a repeated flow is
/// no longer new, and emptying the conntrack makes it new again.
#[test]
fn the_new_flow_floors_create_allowed_flows_and_drop_the_rest() {
    privileged!("new_flow_floors");
    use cilia_abi::{Direction, PolicyEntry, Verdict};
    use cilia_datapath::object::{PROG_FLOOR_NEW_CT, PROG_FLOOR_NEW_POLICY};
    let allow = PolicyEntry {
        direction: Direction::Egress,
        identity: 1000,
        proto: IPPROTO_UDP,
        port: 53,
        port_prefix_len: 16,
        verdict: Verdict::Allow,
        rule: 1,
        proxy_port: 0,
    };
    let flow = |sport: u16, dport: u16| {
        eth(
            A_NODE_MAC,
            A_MAC,
            ETH_P_IP,
            &ipv4(a4(), b4(), IPPROTO_UDP, 64, &udp(sport, dport, b"hello")),
        )
    };
    for name in [PROG_FLOOR_NEW_CT, PROG_FLOOR_NEW_POLICY] {
        let floor = TestProgram::new_flow_floor(name, b4(), &allow).unwrap();
        for sport in 1000..1010 {
            let out = floor.run(&flow(sport, 53)).unwrap();
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "{name}: new flow {sport}");
            assert_eq!(out.packet[14 + 8], 63, "{name}: the TTL");
        }
        let again = floor.run(&flow(1000, 53)).unwrap();
        assert_eq!(again.verdict, TC_ACT_OK, "{name}: an established flow");
        let denied = floor.run(&flow(2000, 54)).unwrap();
        let expected = if name == PROG_FLOOR_NEW_POLICY {
            TC_ACT_SHOT
        } else {
            TC_ACT_REDIRECT
        };
        assert_eq!(denied.verdict, expected, "{name}: a port nothing allows");
        let created = if name == PROG_FLOOR_NEW_POLICY {
            10
        } else {
            11
        };
        assert_eq!(floor.clear_conntrack().unwrap(), created, "{name}");
        assert_eq!(floor.clear_conntrack().unwrap(), 0, "{name}: emptied");
        let out = floor.run(&flow(1000, 53)).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{name}: new again");
    }
}
