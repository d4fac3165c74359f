//! L7 redirect fixtures: what the endpoint programs do with flows whose
//! policy entry names a proxy port, and with packets the proxy sends (see
//! "L7 redirect" in docs/ARCHITECTURE.md). Verdicts under
//! `BPF_PROG_TEST_RUN`, run inside a fresh network namespace so that the
//! programs' socket lookups see no listener. (A test run is not at tc
//! ingress, where `bpf_sk_assign` works: the assignment to a proxy listener
//! is shown with real traffic, in tests/l7_redirect.rs.)

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use cilia_abi::*;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{RunResult, TestProgram, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use cilia_testnet::Netns;

mod common;
use common::fixture::*;
use common::*;

/// A proxy port nobody listens on in the test's namespace.
const PROXY_PORT: u16 = 15080;

/// Runs `packet` through `prog` inside `ns` (the namespace its socket
/// lookups search), with `skb->mark` = `mark`.
fn run_in(ns: &Netns, prog: &TestProgram, packet: &[u8], mark: u32) -> RunResult {
    ns.run(|| prog.run_with_mark(packet, mark)).unwrap()
}

/// B admits `identity` on TCP/80 through the proxy, and on TCP/81 directly.
fn b_admits_http_through_proxy(fx: &mut Fixture, identity: u32) {
    let (k, mut v) = rule(CILIA_DIR_INGRESS, identity, 6, 80, 16, CILIA_VERDICT_ALLOW);
    v.proxy_port = PROXY_PORT.to_be();
    set(
        &mut fx.dp,
        B_ID,
        &[
            enforce(CILIA_DIR_INGRESS),
            (k, v),
            rule(CILIA_DIR_INGRESS, identity, 6, 81, 16, CILIA_VERDICT_ALLOW),
            {
                let (k, mut v) = rule(CILIA_DIR_INGRESS, identity, 17, 80, 16, CILIA_VERDICT_ALLOW);
                v.proxy_port = PROXY_PORT.to_be();
                (k, v)
            },
        ],
    );
}

/// A packet the node's stack hands to B: `src`:40000 -> B:`dport`.
fn stack_to_b(src: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    eth(
        B_MAC,
        B_NODE_MAC,
        ETH_P_IPV6,
        &ipv6(src, b6(), IPPROTO_TCP, 64, &tcp(40000, dport, flags)),
    )
}

fn world6() -> Ipv6Addr {
    "2001:db8::7".parse().unwrap()
}

fn ct_flags_of(fx: &Fixture, src: Ipv6Addr, dport: u16) -> Option<CtEntry> {
    fx.dp.list_ct().unwrap().iter().find_map(|(k, v)| {
        let e = CtEntry::decode(k, v)?;
        (e.source.ip() == IpAddr::V6(src) && e.destination.port() == dport).then_some(e)
    })
}

#[test]
fn a_proxied_flow_without_a_proxy_listener_is_dropped_as_proxy_unavailable() {
    privileged!("proxied_flow_without_listener");
    let mut fx = Fixture::new();
    b_admits_http_through_proxy(&mut fx, A_IDENTITY);
    let ns = Netns::new("cpxu").unwrap();
    let out = run_in(&ns, &fx.a(), &a_to_b(80), 0);
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_PROXY_UNAVAILABLE), 1);
    let ct = ct_flags_of(&fx, a6(), 80).expect("the redirected flow is tracked");
    assert!(ct.to_proxy && !ct.from_proxy, "{ct:?}");
    assert_eq!(ct.proxy_port, PROXY_PORT);
    // Later packets of the flow meet the same fate.
    let out = run_in(&ns, &fx.a(), &a_to_b(80), 0);
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_PROXY_UNAVAILABLE), 2);
}

#[test]
fn a_flow_the_policy_does_not_proxy_is_redirected_to_the_peer_directly() {
    privileged!("unproxied_flow_direct");
    let mut fx = Fixture::new();
    b_admits_http_through_proxy(&mut fx, A_IDENTITY);
    let ns = Netns::new("cpxd").unwrap();
    let out = run_in(&ns, &fx.a(), &a_to_b(81), 0);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.mark, 0);
    let ct = ct_flags_of(&fx, a6(), 81).unwrap();
    assert!(!ct.to_proxy && !ct.from_proxy && ct.proxy_port == 0);
}

#[test]
fn a_direct_flow_that_a_new_policy_sends_to_the_proxy_is_revoked() {
    privileged!("direct_flow_revoked_by_l7");
    let mut fx = Fixture::new();
    b_admits_from_a(&mut fx, 6, 80);
    let ns = Netns::new("cpxr").unwrap();
    assert_eq!(
        run_in(&ns, &fx.a(), &a_to_b(80), 0).verdict,
        TC_ACT_REDIRECT
    );
    // HTTP rules arrive for the same port: the open connection was never
    // checked by the proxy, so it may not go on around it.
    b_admits_http_through_proxy(&mut fx, A_IDENTITY);
    fx.dp.bump_policy_revision().unwrap();
    assert_eq!(run_in(&ns, &fx.a(), &a_to_b(80), 0).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_POLICY), 1);
    let ct = ct_flags_of(&fx, a6(), 80).unwrap();
    assert!(
        !ct.to_proxy,
        "the flow keeps its direct setup, revoked: {ct:?}"
    );
}

#[test]
fn a_proxied_entry_on_a_non_tcp_flow_drops_it_as_no_redirect_path() {
    privileged!("proxied_udp_dropped");
    let mut fx = Fixture::new();
    b_admits_http_through_proxy(&mut fx, A_IDENTITY);
    let udp80 = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(a6(), b6(), IPPROTO_UDP, 64, &udp(40000, 80, b"x")),
    );
    let ns = Netns::new("cpxn").unwrap();
    assert_eq!(run_in(&ns, &fx.a(), &udp80, 0).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_PROXY_PATH), 1);
    assert!(fx.dp.list_ct().unwrap().is_empty(), "no flow is created");
}

#[test]
fn a_from_proxy_packet_with_a_local_source_passes_to_container_with_its_identity() {
    privileged!("from_proxy_local_source");
    let mut fx = Fixture::new();
    b_admits_http_through_proxy(&mut fx, A_IDENTITY);
    let ns = Netns::new("cpxf").unwrap();
    let syn = stack_to_b(a6(), 80, 0x02);
    let out = run_in(&ns, &fx.b_to_container(), &syn, CILIA_MARK_FROM_PROXY);
    assert_eq!(out.verdict, TC_ACT_OK);
    let ct = ct_flags_of(&fx, a6(), 80).expect("the proxy's flow is tracked");
    assert!(ct.from_proxy && !ct.to_proxy, "{ct:?}");
    assert_eq!(ct.src_identity, A_IDENTITY, "the client's identity");
    // Other bits of the mark do not matter; only the proxy's byte does.
    let out = run_in(
        &ns,
        &fx.b_to_container(),
        &stack_to_b(a6(), 80, 0x10),
        CILIA_MARK_FROM_PROXY | 0x7,
    );
    assert_eq!(out.verdict, TC_ACT_OK);
}

#[test]
fn a_packet_with_a_local_source_but_without_the_proxy_mark_is_dropped_as_spoofed() {
    privileged!("local_source_without_mark");
    let mut fx = Fixture::new();
    b_admits_http_through_proxy(&mut fx, A_IDENTITY);
    let ns = Netns::new("cpxs").unwrap();
    let syn = stack_to_b(a6(), 80, 0x02);
    for mark in [0, CILIA_MARK_TO_PROXY] {
        let out = run_in(&ns, &fx.b_to_container(), &syn, mark);
        assert_eq!(out.verdict, TC_ACT_SHOT, "mark {mark:#x}");
    }
    assert_eq!(drops(&fx.dp, CILIA_DROP_SPOOFED_SOURCE), 2);
}

#[test]
fn a_proxied_ingress_entry_from_the_stack_without_the_mark_is_dropped_as_no_redirect_path() {
    privileged!("proxied_from_stack");
    let mut fx = Fixture::new();
    b_admits_http_through_proxy(&mut fx, CILIA_ID_WORLD);
    let ns = Netns::new("cpxp").unwrap();
    let prog = fx.b_to_container();
    let out = run_in(&ns, &prog, &stack_to_b(world6(), 80, 0x02), 0);
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_PROXY_PATH), 1);
    // The same flow on the port without a proxy passes.
    let out = run_in(&ns, &prog, &stack_to_b(world6(), 81, 0x02), 0);
    assert_eq!(out.verdict, TC_ACT_OK);
    // And the proxy itself (the egress-L7 case: from the node's address).
    let out = run_in(
        &ns,
        &prog,
        &stack_to_b(world6(), 80, 0x02),
        CILIA_MARK_FROM_PROXY,
    );
    assert_eq!(out.verdict, TC_ACT_OK);
}

#[test]
fn a_reply_to_the_proxys_connection_goes_to_the_stack_marked_for_the_proxy() {
    privileged!("reply_to_proxy");
    let mut fx = Fixture::new();
    b_admits_http_through_proxy(&mut fx, A_IDENTITY);
    let ns = Netns::new("cpxr").unwrap();
    let syn = stack_to_b(a6(), 80, 0x02);
    let out = run_in(&ns, &fx.b_to_container(), &syn, CILIA_MARK_FROM_PROXY);
    assert_eq!(out.verdict, TC_ACT_OK);
    // B answers A's address: the proxy holds it, not A.
    let out = run_in(&ns, &fx.b(), &b_to_a(80), 0);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.mark & CILIA_MARK_MASK, CILIA_MARK_TO_PROXY);
    let forwarded = fx
        .dp
        .metrics()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.kind == CILIA_METRIC_FORWARD && k.reason == CILIA_FWD_PROXY)
        .map(|(_, v)| v.packets)
        .sum::<u64>();
    assert_eq!(forwarded, 1);
}

#[test]
fn the_peer_of_a_redirected_flow_cannot_answer_it_directly() {
    privileged!("peer_answers_redirected_flow");
    let fx = Fixture::new();
    // A's flow to B:80 went to the proxy: B never saw it.
    let redirected = CtEntry {
        proto: 6,
        source: SocketAddr::new(IpAddr::V6(a6()), 40000),
        destination: SocketAddr::new(IpAddr::V6(b6()), 80),
        src_identity: A_IDENTITY,
        dst_identity: B_IDENTITY,
        packets: 1,
        bytes: 74,
        expires_ns: cilia_datapath::datapath_clock_ns() + 60_000_000_000,
        seen_reply: false,
        closing: false,
        denied: false,
        policy_revision: 0,
        owner: A_ID,
        to_proxy: true,
        from_proxy: false,
        proxy_port: PROXY_PORT,
        service: false,
        rev_nat: 0,
        backend_id: 0,
    };
    fx.dp
        .insert_ct(redirected.key(), redirected.value())
        .unwrap();
    let ns = Netns::new("cpxa").unwrap();
    let out = run_in(&ns, &fx.b(), &b_to_a(80), 0);
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_PROXY_PATH), 1);
}

#[test]
fn every_specialization_of_the_redirecting_programs_passes_the_verifier() {
    privileged!("redirect_specializations");
    let mut fx = Fixture::new();
    b_admits_http_through_proxy(&mut fx, A_IDENTITY);
    let ns = Netns::new("cpxv").unwrap();
    for v4 in [Some(a4()), None] {
        for monitor in [0, 1] {
            let cfg = EndpointConfig {
                monitor,
                ..config(A_ID, A_IDENTITY, A_MAC, A_NODE_MAC, a6(), v4)
            };
            let what = format!("ipv4 {v4:?}, monitor {monitor}");
            let from = fx.dp.test_program(&cfg).expect(&what);
            let to = fx.dp.test_program_to_container(&cfg).expect(&what);
            let out = run_in(&ns, &from, &a_to_b(80), 0);
            assert_eq!(out.verdict, TC_ACT_SHOT, "{what}: no proxy listener");
            let syn = eth(
                A_MAC,
                A_NODE_MAC,
                ETH_P_IPV6,
                &ipv6(b6(), a6(), IPPROTO_TCP, 64, &tcp(40000, 22, 0x02)),
            );
            let out = run_in(&ns, &to, &syn, CILIA_MARK_FROM_PROXY);
            assert_eq!(out.verdict, TC_ACT_OK, "{what}: the proxy speaks for B");
        }
    }
}
