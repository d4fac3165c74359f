//! Attacks on the policy, as crafted packets through the real endpoint
//! programs (`BPF_PROG_TEST_RUN`): each case sends the attack and shows it
//! dropped with its named reason, next to the legitimate packet that still
//! passes. Together they are the datapath half of docs/SECURITY.md.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cilia_abi::*;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TestProgram, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

mod common;
use common::fixture::*;
use common::*;

const NH_DEST: u8 = 60;
const NH_FRAG: u8 = 44;
const NH_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_MOBILITY: u8 = 135;
const IPPROTO_ICMP: u8 = 1;

fn world6() -> Ipv6Addr {
    "2001:db8::7".parse().unwrap()
}

/// B admits A on UDP/53 only.
fn b_admits_dns_from_a(fx: &mut Fixture) {
    b_admits_from_a(fx, 17, 53);
}

/// An IPv6 packet endpoint A sends toward `dst`.
fn from_a6(dst: Ipv6Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(a6(), dst, proto, 64, l4),
    )
}

/// An IPv6 packet endpoint B sends toward `dst`.
fn from_b6(dst: Ipv6Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    eth(
        B_NODE_MAC,
        B_MAC,
        ETH_P_IPV6,
        &ipv6(b6(), dst, proto, 64, l4),
    )
}

/// An extension header of 8 bytes (Hop-by-Hop, Destination Options,
/// Routing with `segments_left`) followed by `next`.
fn ext8(next: u8, segments_left: u8) -> Vec<u8> {
    vec![next, 0, 0, segments_left, 1, 2, 0, 0]
}

fn frag_hdr(next: u8, offset_units: u16, more: bool, id: u32) -> Vec<u8> {
    let fo = (offset_units << 3) | u16::from(more);
    let mut h = vec![next, 0];
    h.extend_from_slice(&fo.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// A -> B IPv6 with the given extension headers (first next header `first`)
/// in front of `l4`.
fn a_to_b_v6(first: u8, headers: &[Vec<u8>], l4: &[u8]) -> Vec<u8> {
    let mut payload: Vec<u8> = headers.concat();
    payload.extend_from_slice(l4);
    from_a6(b6(), first, &payload)
}

fn ipv4_frag(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    offset_units: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = ipv4(src, dst, IPPROTO_UDP, 64, payload);
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let fo = offset_units | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&fo.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    eth(A_NODE_MAC, A_MAC, ETH_P_IP, &p)
}

fn verdict(prog: &TestProgram, packet: &[u8]) -> u32 {
    prog.run(packet).unwrap().verdict
}

// ---- 1. ICMP errors ----

/// An ICMPv6 destination unreachable message quoting `quoted`.
fn icmp6_unreachable(quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![1, 4, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    icmp
}

/// ICMPv6 destination unreachable from A to `dst`, quoting `quoted`.
fn icmp6_error_from_a(dst: Ipv6Addr, quoted: &[u8]) -> Vec<u8> {
    from_a6(dst, IPPROTO_ICMPV6, &icmp6_unreachable(quoted))
}

#[test]
fn icmp_error_quoting_the_senders_own_flow_does_not_reach_a_peer_that_denies_it() {
    privileged!("icmp_error_own_flow");
    let mut fx = Fixture::new();
    set(&mut fx.dp, B_ID, &[enforce(CILIA_DIR_INGRESS)]);
    let a = fx.a();
    // A has a live flow of its own, to the world.
    let to_world = from_a6(world6(), IPPROTO_TCP, &tcp(40000, 443, 0x02));
    assert_eq!(verdict(&a, &to_world), TC_ACT_OK);
    // The attack: an "error" to B quoting that flow, to carry data past B's policy.
    let attack = icmp6_error_from_a(b6(), &to_world[14..14 + 48]);
    assert_eq!(verdict(&a, &attack), TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_POLICY), 1);
}

#[test]
fn icmp_error_about_a_reply_the_peer_sent_is_related() {
    privileged!("icmp_error_about_reply");
    let mut fx = Fixture::new();
    // B admits A on TCP/80; A admits nothing new.
    b_admits_http_from_a(&mut fx);
    set(&mut fx.dp, A_ID, &[enforce(CILIA_DIR_INGRESS)]);
    let (a, b) = (fx.a(), fx.b());
    assert_eq!(verdict(&a, &a_to_b(80)), TC_ACT_REDIRECT);
    let reply = b_to_a(80);
    // Before B answered, an error about an answer B never sent is unrelated.
    let error = icmp6_error_from_a(b6(), &reply[14..14 + 48]);
    assert_eq!(verdict(&a, &error), TC_ACT_SHOT, "B admits no ICMP from A");
    assert_eq!(verdict(&b, &reply), TC_ACT_REDIRECT);
    assert_eq!(verdict(&a, &error), TC_ACT_REDIRECT);
}

#[test]
fn icmp_error_quoting_a_flow_between_other_addresses_is_not_related() {
    privileged!("icmp_error_third_party_quote");
    let mut fx = Fixture::new();
    // A admits nothing; B has a flow to the world.
    set(&mut fx.dp, A_ID, &[enforce(CILIA_DIR_INGRESS)]);
    let b = fx.b();
    let b_to_world = from_b6(world6(), IPPROTO_UDP, &udp(5000, 53, b"q"));
    assert_eq!(verdict(&b, &b_to_world), TC_ACT_OK);
    // B quotes its own world flow in an error to A: not a packet A sent B.
    let attack = from_b6(
        a6(),
        IPPROTO_ICMPV6,
        &icmp6_unreachable(&b_to_world[14..14 + 48]),
    );
    assert_eq!(verdict(&b, &attack), TC_ACT_SHOT);
}

#[test]
fn icmpv4_error_quoting_the_senders_own_flow_is_dropped() {
    privileged!("icmpv4_error_own_flow");
    let mut fx = Fixture::new();
    a_sends_only_dns_to_world(&mut fx);
    let a = fx.a();
    let resolver: Ipv4Addr = "203.0.113.9".parse().unwrap();
    let victim: Ipv4Addr = "203.0.113.10".parse().unwrap();
    let to_resolver = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IP,
        &ipv4(a4(), resolver, IPPROTO_UDP, 64, &udp(5000, 53, b"q")),
    );
    assert_eq!(verdict(&a, &to_resolver), TC_ACT_OK);
    let error_to = |dst: Ipv4Addr, quoted: &[u8]| {
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(quoted);
        eth(
            A_NODE_MAC,
            A_MAC,
            ETH_P_IP,
            &ipv4(a4(), dst, IPPROTO_ICMP, 64, &icmp),
        )
    };
    // Quoting its own DNS query to reach another host: dropped.
    assert_eq!(
        verdict(&a, &error_to(victim, &to_resolver[14..14 + 28])),
        TC_ACT_SHOT
    );
    // Port unreachable about the resolver's answer, to the resolver: related
    // once the answer was seen (it arrives through the stack).
    let answer = ipv4(resolver, a4(), IPPROTO_UDP, 64, &udp(53, 5000, b"a"));
    let error = error_to(resolver, &answer[..28]);
    assert_eq!(verdict(&a, &error), TC_ACT_SHOT, "no answer seen yet");
    let to_a = fx.a_to_container();
    assert_eq!(
        verdict(&to_a, &eth(A_MAC, A_NODE_MAC, ETH_P_IP, &answer)),
        TC_ACT_OK
    );
    assert_eq!(verdict(&a, &error), TC_ACT_OK);
}

// ---- 2. IPv6 extension headers ----

#[test]
fn tcp_behind_extension_headers_meets_the_l4_deny() {
    privileged!("ext_headers_l4_deny");
    let mut fx = Fixture::new();
    b_denies_ssh_from_a(&mut fx);
    let a = fx.a();
    let syn22 = tcp(40000, 22, 0x02);
    let syn80 = tcp(40001, 80, 0x02);
    for (first, headers) in [
        (NH_DEST, vec![ext8(IPPROTO_TCP, 0)]),
        (NH_HOP, vec![ext8(NH_DEST, 0), ext8(IPPROTO_TCP, 0)]),
        (NH_FRAG, vec![frag_hdr(IPPROTO_TCP, 0, false, 7)]),
        (NH_ROUTING, vec![ext8(IPPROTO_TCP, 0)]),
    ] {
        assert_eq!(
            verdict(&a, &a_to_b_v6(first, &headers, &syn22)),
            TC_ACT_SHOT,
            "SYN to 22 behind next header {first}"
        );
        assert_eq!(
            verdict(&a, &a_to_b_v6(first, &headers, &syn80)),
            TC_ACT_REDIRECT,
            "SYN to 80 behind next header {first}"
        );
    }
    assert_eq!(drops(&fx.dp, CILIA_DROP_POLICY), 4);
}

#[test]
fn unknown_too_long_or_routed_extension_chains_are_dropped_by_name() {
    privileged!("ext_headers_refused");
    let fx = Fixture::new();
    let a = fx.a();
    let syn = tcp(40000, 80, 0x02);
    let too_long: Vec<Vec<u8>> = (0..9)
        .map(|i| ext8(if i == 8 { IPPROTO_TCP } else { NH_DEST }, 0))
        .collect();
    let cases = [
        ("nine headers", NH_DEST, too_long),
        ("mobility header", NH_MOBILITY, vec![ext8(IPPROTO_TCP, 0)]),
        (
            "routing with segments left",
            NH_ROUTING,
            vec![ext8(IPPROTO_TCP, 1)],
        ),
        (
            "hop-by-hop not first",
            NH_DEST,
            vec![ext8(NH_HOP, 0), ext8(IPPROTO_TCP, 0)],
        ),
        (
            "two fragment headers",
            NH_FRAG,
            vec![
                frag_hdr(NH_FRAG, 0, true, 1),
                frag_hdr(IPPROTO_TCP, 0, true, 2),
            ],
        ),
    ];
    let n = cases.len() as u64;
    for (what, first, headers) in cases {
        assert_eq!(
            verdict(&a, &a_to_b_v6(first, &headers, &syn)),
            TC_ACT_SHOT,
            "{what}"
        );
    }
    assert_eq!(drops(&fx.dp, CILIA_DROP_EXT_HDR), n);
    // Eight headers are fine.
    let eight: Vec<Vec<u8>> = (0..8)
        .map(|i| ext8(if i == 7 { IPPROTO_TCP } else { NH_DEST }, 0))
        .collect();
    assert_eq!(
        verdict(&a, &a_to_b_v6(NH_DEST, &eight, &syn)),
        TC_ACT_REDIRECT
    );
}

// ---- 3. Fragments ----

/// The first and a later fragment of a UDP datagram from A to B's `port`.
fn fragments_v6(port: u16, id: u32) -> (Vec<u8>, Vec<u8>) {
    let first = a_to_b_v6(
        NH_FRAG,
        &[frag_hdr(IPPROTO_UDP, 0, true, id)],
        &udp(5000, port, &[7; 64]),
    );
    let later = a_to_b_v6(NH_FRAG, &[frag_hdr(IPPROTO_UDP, 9, false, id)], &[8; 64]);
    (first, later)
}

#[test]
fn later_fragments_follow_only_an_allowed_first_fragment_ipv6() {
    privileged!("fragments_v6");
    let mut fx = Fixture::new();
    b_admits_dns_from_a(&mut fx);
    let a = fx.a();
    let (first, later) = fragments_v6(53, 42);
    assert_eq!(verdict(&a, &first), TC_ACT_REDIRECT);
    assert_eq!(verdict(&a, &later), TC_ACT_REDIRECT);
    // Denied: the first fragment meets policy, the later one finds no flow.
    let (first, later) = fragments_v6(54, 43);
    assert_eq!(verdict(&a, &first), TC_ACT_SHOT);
    assert_eq!(verdict(&a, &later), TC_ACT_SHOT);
    // Unknown: a later fragment whose first fragment never came.
    let (_, orphan) = fragments_v6(53, 99);
    assert_eq!(verdict(&a, &orphan), TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_POLICY), 1);
    assert_eq!(drops(&fx.dp, CILIA_DROP_FRAG_NO_FLOW), 2);
}

#[test]
fn later_fragments_follow_only_an_allowed_first_fragment_ipv4() {
    privileged!("fragments_v4");
    let mut fx = Fixture::new();
    a_sends_only_dns_to_world(&mut fx);
    let a = fx.a();
    let world: Ipv4Addr = "203.0.113.9".parse().unwrap();
    let first_ok = ipv4_frag(a4(), world, 100, 0, true, &udp(5000, 53, &[1; 64]));
    let later_ok = ipv4_frag(a4(), world, 100, 9, false, &[2; 64]);
    let first_denied = ipv4_frag(a4(), world, 101, 0, true, &udp(5000, 54, &[1; 64]));
    let later_denied = ipv4_frag(a4(), world, 101, 9, false, &[2; 64]);
    assert_eq!(verdict(&a, &first_ok), TC_ACT_OK);
    assert_eq!(verdict(&a, &later_ok), TC_ACT_OK);
    assert_eq!(verdict(&a, &first_denied), TC_ACT_SHOT);
    assert_eq!(verdict(&a, &later_denied), TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_FRAG_NO_FLOW), 1);
}

// ---- 4. Neighbour discovery ----

fn nd_packet(
    src_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    icmp_type: u8,
    target: Ipv6Addr,
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    let csum = icmpv6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    eth(
        A_NODE_MAC,
        src_mac,
        ETH_P_IPV6,
        &ipv6(src, dst, IPPROTO_ICMPV6, hop_limit, &icmp),
    )
}

fn link_local() -> Ipv6Addr {
    "fe80::8:aff:fe00:a1".parse().unwrap()
}
fn all_nodes() -> Ipv6Addr {
    "ff02::1".parse().unwrap()
}
fn all_routers() -> Ipv6Addr {
    "ff02::2".parse().unwrap()
}

#[test]
fn neighbour_discovery_from_the_endpoint_is_checked() {
    privileged!("nd_from_container");
    let fx = Fixture::new();
    let a = fx.a();
    let host_ll: Ipv6Addr = "fe80::1".parse().unwrap();
    let cases = [
        // (what, src, dst, hop limit, type, target, verdict)
        (
            "NA for its own address",
            a6(),
            host_ll,
            255,
            136,
            a6(),
            TC_ACT_OK,
        ),
        (
            "NA to all nodes",
            link_local(),
            all_nodes(),
            255,
            136,
            a6(),
            TC_ACT_OK,
        ),
        (
            "RS to all routers",
            link_local(),
            all_routers(),
            255,
            133,
            Ipv6Addr::UNSPECIFIED,
            TC_ACT_OK,
        ),
        (
            "NA forwarded (hop limit 64)",
            a6(),
            host_ll,
            64,
            136,
            a6(),
            TC_ACT_SHOT,
        ),
        (
            "NA for another endpoint",
            a6(),
            host_ll,
            255,
            136,
            b6(),
            TC_ACT_SHOT,
        ),
        (
            "NA from a spoofed source",
            b6(),
            host_ll,
            255,
            136,
            b6(),
            TC_ACT_SHOT,
        ),
        (
            "NA to a global address",
            a6(),
            b6(),
            255,
            136,
            a6(),
            TC_ACT_SHOT,
        ),
        (
            "NS with hop limit 64",
            a6(),
            solicited_node(gw6()),
            64,
            135,
            gw6(),
            TC_ACT_SHOT,
        ),
        (
            "NS to another node's address",
            a6(),
            b6(),
            255,
            135,
            gw6(),
            TC_ACT_SHOT,
        ),
        (
            "router advertisement",
            link_local(),
            all_nodes(),
            255,
            134,
            a6(),
            TC_ACT_SHOT,
        ),
        (
            "redirect",
            link_local(),
            host_ll,
            255,
            137,
            a6(),
            TC_ACT_SHOT,
        ),
        (
            "RS to a unicast address",
            link_local(),
            b6(),
            255,
            133,
            Ipv6Addr::UNSPECIFIED,
            TC_ACT_SHOT,
        ),
    ];
    for (what, src, dst, hop, ty, target, want) in cases {
        let v = verdict(&a, &nd_packet(A_MAC, src, dst, hop, ty, target));
        assert_eq!(v, want, "{what}");
    }
    // The gateway solicitation a container really sends is still answered.
    let ns = nd_packet(A_MAC, a6(), solicited_node(gw6()), 255, 135, gw6());
    assert_eq!(verdict(&a, &ns), TC_ACT_REDIRECT);
    assert!(drops(&fx.dp, CILIA_DROP_ND_INVALID) >= 4);
}

#[test]
fn neighbour_discovery_toward_the_endpoint_is_checked() {
    privileged!("nd_to_container");
    let fx = Fixture::new();
    let to_a = fx.a_to_container();
    let host_ll: Ipv6Addr = "fe80::1".parse().unwrap();
    let cases = [
        (
            "NS from the host",
            host_ll,
            solicited_node(a6()),
            255,
            135,
            a6(),
            TC_ACT_OK,
        ),
        ("unicast NS (NUD)", host_ll, a6(), 255, 135, a6(), TC_ACT_OK),
        (
            "NA from the host",
            host_ll,
            link_local(),
            255,
            136,
            host_ll,
            TC_ACT_OK,
        ),
        (
            "NS with hop limit 64",
            host_ll,
            a6(),
            64,
            135,
            a6(),
            TC_ACT_SHOT,
        ),
        (
            "the from-container program's own NA answer, coming back",
            gw6(),
            a6(),
            255,
            136,
            gw6(),
            TC_ACT_OK,
        ),
        (
            "NS from a multicast source",
            all_nodes(),
            a6(),
            255,
            135,
            a6(),
            TC_ACT_SHOT,
        ),
        (
            "NS to another node's address",
            host_ll,
            b6(),
            255,
            135,
            b6(),
            TC_ACT_SHOT,
        ),
        (
            "router advertisement",
            host_ll,
            all_nodes(),
            255,
            134,
            a6(),
            TC_ACT_SHOT,
        ),
        ("redirect", host_ll, a6(), 255, 137, a6(), TC_ACT_SHOT),
    ];
    for (what, src, dst, hop, ty, target, want) in cases {
        let v = verdict(&to_a, &nd_packet(A_NODE_MAC, src, dst, hop, ty, target));
        assert_eq!(v, want, "{what}");
    }
}

/// An MLDv2 report as a host's kernel sends it: behind a hop-by-hop header
/// with the router alert option, one record for `group`.
fn mld_report(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    icmp_type: u8,
    group: Ipv6Addr,
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, 0, 0, 0, 0, 0, 0, 1];
    icmp.extend_from_slice(&[4, 0, 0, 0]); // CHANGE_TO_EXCLUDE, no sources
    icmp.extend_from_slice(&group.octets());
    let csum = icmpv6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    // Next header ICMPv6, length 0 (8 bytes), router alert (MLD), PadN.
    let mut l3 = vec![58, 0, 5, 2, 0, 0, 1, 0];
    l3.extend_from_slice(&icmp);
    eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(src, dst, NH_HOP, hop_limit, &l3),
    )
}

/// What a container's kernel sends when its interface comes up (the DAD
/// probe of its link-local address, MLD reports for its solicited-node
/// groups, first from `::`, later from its link-local address), and the
/// host side's router solicitation toward it, is absorbed:
/// not passed, not a drop. Anything that only looks like it still meets
/// the guard and is dropped by name.
#[test]
fn link_chatter_of_a_new_endpoint_is_absorbed_not_reported_as_drops() {
    privileged!("link_chatter_absorbed");
    let fx = Fixture::new();
    let a = fx.a();
    let ll = link_local();
    let mld_group: Ipv6Addr = "ff02::16".parse().unwrap();
    let chatter = [
        (
            "DAD probe",
            nd_packet(
                A_MAC,
                Ipv6Addr::UNSPECIFIED,
                solicited_node(ll),
                255,
                135,
                ll,
            ),
        ),
        (
            "MLDv2 report from ::",
            mld_report(Ipv6Addr::UNSPECIFIED, mld_group, 1, 143, solicited_node(ll)),
        ),
        (
            "MLDv2 report from link-local",
            mld_report(ll, mld_group, 1, 143, solicited_node(a6())),
        ),
        (
            "MLDv1 report",
            mld_report(ll, solicited_node(ll), 1, 131, solicited_node(ll)),
        ),
        (
            "MLDv1 done",
            mld_report(ll, all_routers(), 1, 132, solicited_node(ll)),
        ),
    ];
    for (what, packet) in &chatter {
        assert_eq!(verdict(&a, packet), TC_ACT_SHOT, "{what}");
    }
    // The host side's own router solicitation when the veth comes up.
    let to_a = fx.a_to_container();
    let host_ll: Ipv6Addr = "fe80::1".parse().unwrap();
    let rs = nd_packet(
        A_NODE_MAC,
        host_ll,
        all_routers(),
        255,
        133,
        Ipv6Addr::UNSPECIFIED,
    );
    assert_eq!(verdict(&to_a, &rs), TC_ACT_SHOT, "the node's RS");
    assert_eq!(
        counted_any(&fx.dp, CILIA_METRIC_DROP, None),
        0,
        "link chatter counted as drops"
    );
    let absorbed = chatter.len() as u64 + 1;
    assert_eq!(
        counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_ABSORBED),
        absorbed
    );
    let forwarded_rs = nd_packet(
        A_NODE_MAC,
        host_ll,
        all_routers(),
        64,
        133,
        Ipv6Addr::UNSPECIFIED,
    );
    assert_eq!(verdict(&to_a, &forwarded_rs), TC_ACT_SHOT);
    assert_eq!(
        drops(&fx.dp, CILIA_DROP_UNSUPPORTED_ND),
        1,
        "an RS not from the link"
    );

    let look_alikes = [
        (
            "MLD report with hop limit 2",
            mld_report(ll, mld_group, 2, 143, solicited_node(ll)),
            CILIA_DROP_SPOOFED_SOURCE,
        ),
        (
            "MLD report from a global address",
            mld_report(a6(), mld_group, 1, 143, solicited_node(ll)),
            CILIA_DROP_MULTICAST,
        ),
        (
            "MLD report from another's address",
            mld_report(b6(), mld_group, 1, 143, solicited_node(ll)),
            CILIA_DROP_SPOOFED_SOURCE,
        ),
        (
            "MLD report to a site-scope group",
            mld_report(ll, "ff05::16".parse().unwrap(), 1, 143, solicited_node(ll)),
            CILIA_DROP_SPOOFED_SOURCE,
        ),
        (
            "MLD query",
            mld_report(ll, all_nodes(), 1, 130, Ipv6Addr::UNSPECIFIED),
            CILIA_DROP_SPOOFED_SOURCE,
        ),
    ];
    for (what, packet, reason) in &look_alikes {
        let before = drops(&fx.dp, *reason);
        assert_eq!(verdict(&a, packet), TC_ACT_SHOT, "{what}");
        assert_eq!(
            drops(&fx.dp, *reason),
            before + 1,
            "{what}: dropped by name"
        );
    }
    assert_eq!(
        counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_ABSORBED),
        absorbed
    );
}

// ---- 5. Source identity of traffic from the stack ----

#[test]
fn packet_from_the_stack_with_a_local_endpoints_source_is_dropped() {
    privileged!("host_spoofs_endpoint_source");
    let mut fx = Fixture::new();
    // A admits B on TCP/80, nobody else.
    set(
        &mut fx.dp,
        A_ID,
        &[
            enforce(CILIA_DIR_INGRESS),
            rule(
                CILIA_DIR_INGRESS,
                B_IDENTITY,
                6,
                80,
                16,
                CILIA_VERDICT_ALLOW,
            ),
        ],
    );
    let to_a = fx.a_to_container();
    // A local user binds B's address and connects to A through the stack.
    let forged = eth(
        A_MAC,
        A_NODE_MAC,
        ETH_P_IPV6,
        &ipv6(b6(), a6(), IPPROTO_TCP, 64, &tcp(40000, 80, 0x02)),
    );
    assert_eq!(verdict(&to_a, &forged), TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_SPOOFED_SOURCE), 1);
    // B itself reaches A by redirect, through B's own program.
    let real = from_b6(a6(), IPPROTO_TCP, &tcp(40000, 80, 0x02));
    assert_eq!(verdict(&fx.b(), &real), TC_ACT_REDIRECT);
}

// ---- 6. Conntrack hygiene ----

#[test]
fn responder_cannot_keep_a_revoked_flow_alive_by_replying() {
    privileged!("reply_recheck_after_revision");
    let mut fx = Fixture::new();
    b_admits_http_from_a(&mut fx);
    let (a, b) = (fx.a(), fx.b());
    assert_eq!(verdict(&a, &a_to_b(80)), TC_ACT_REDIRECT);
    assert_eq!(verdict(&b, &b_to_a(80)), TC_ACT_REDIRECT);
    // The policy that let A in is withdrawn.
    set(&mut fx.dp, B_ID, &[enforce(CILIA_DIR_INGRESS)]);
    fx.dp.bump_policy_revision().unwrap();
    // B answers first: its reply meets the withdrawn policy and is dropped.
    assert_eq!(verdict(&b, &b_to_a(80)), TC_ACT_SHOT);
    assert_eq!(verdict(&a, &a_to_b(80)), TC_ACT_SHOT);
    assert_eq!(verdict(&b, &b_to_a(80)), TC_ACT_SHOT);
    // Allowed again: the replies flow again.
    b_admits_http_from_a(&mut fx);
    fx.dp.bump_policy_revision().unwrap();
    assert_eq!(verdict(&b, &b_to_a(80)), TC_ACT_REDIRECT);
}

fn a_to_b_from(sport: u16) -> Vec<u8> {
    from_a6(b6(), IPPROTO_TCP, &tcp(sport, 80, 0x02))
}

#[test]
fn an_endpoint_churning_flows_is_stopped_at_its_budget_and_others_keep_theirs() {
    privileged!("ct_budget");
    let fx = Fixture::new();
    fx.dp.set_ct_budget(16).unwrap();
    let (a, b) = (fx.a(), fx.b());
    for sport in 0..16 {
        assert_eq!(verdict(&a, &a_to_b_from(30000 + sport)), TC_ACT_REDIRECT);
    }
    assert_eq!(fx.dp.ct_count(A_ID).unwrap(), 16);
    // The 17th new flow of A fails closed, by name; A's open flows go on.
    assert_eq!(verdict(&a, &a_to_b_from(31000)), TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_CT_BUDGET), 1);
    assert_eq!(verdict(&a, &a_to_b_from(30000)), TC_ACT_REDIRECT);
    // B's new flows are untouched by A's churn.
    let b_new = from_b6(a6(), IPPROTO_UDP, &udp(7000, 53, b"q"));
    assert_eq!(verdict(&b, &b_new), TC_ACT_REDIRECT);
    assert_eq!(fx.dp.ct_count(B_ID).unwrap(), 1);
    // Deleting A (or a new identity) purges its entries and its budget.
    let purged = fx
        .dp
        .purge_ct(A_ID, &[IpAddr::V6(a6()), IpAddr::V4(a4())])
        .unwrap();
    assert_eq!(purged, 17, "A's 16 flows and B's flow to A");
    assert_eq!(fx.dp.ct_count(A_ID).unwrap(), 0);
    assert_eq!(verdict(&a, &a_to_b_from(31000)), TC_ACT_REDIRECT);
}

#[test]
fn a_full_conntrack_table_fails_closed_with_a_named_drop() {
    privileged!("ct_full");
    let fx = Fixture::new();
    // Fill the table with entries of some other endpoint.
    for i in 0..CILIA_CT_MAX {
        let mut key = CtKey {
            proto: 17,
            family: CILIA_FAMILY_IPV6,
            ..Default::default()
        };
        key.saddr[..4].copy_from_slice(&i.to_be_bytes());
        let value = CtValue {
            expires: u64::MAX,
            owner: 999,
            ..Default::default()
        };
        fx.dp.insert_ct(key, value).unwrap();
    }
    let a = fx.a();
    assert_eq!(verdict(&a, &a_to_b(80)), TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_CT_FULL), 1);
    assert_eq!(
        fx.dp.ct_count(A_ID).unwrap(),
        0,
        "a refused flow is not charged"
    );
}

// ---- 11. Debug events ----

#[test]
fn no_debug_event_without_a_debug_listener() {
    privileged!("debug_events_gated");
    let mut fx = Fixture::new();
    let mut rb = fx.dp.take_events().unwrap();
    set(&mut fx.dp, B_ID, &[enforce(CILIA_DIR_INGRESS)]);
    let a = fx.a();
    for level in [CILIA_MONITOR_DROPS, CILIA_MONITOR_TRACE] {
        fx.dp.set_monitor_level(level).unwrap();
        assert_eq!(verdict(&a, &a_to_b(80)), TC_ACT_SHOT);
        let events = drain_events(&mut rb);
        assert!(
            !events.iter().any(|e| e.type_ == CILIA_EVENT_DEBUG),
            "level {level}: no debug events"
        );
        let types: Vec<u8> = events.iter().map(|e| e.type_).collect();
        assert_eq!(types, [CILIA_EVENT_DROP], "level {level}: the drop, only");
    }
    fx.dp.set_monitor_level(CILIA_MONITOR_DEBUG).unwrap();
    assert_eq!(verdict(&a, &a_to_b(80)), TC_ACT_SHOT);
    let events = drain_events(&mut rb);
    let debug = events
        .iter()
        .find(|e| e.type_ == CILIA_EVENT_DEBUG)
        .expect("a debug event at debug level");
    assert_eq!(debug.verdict, CILIA_VERDICT_DENY, "it carries the decision");
}
