//! The established-flow fast path (`bpf/lib/fast.h`): a flow's entry
//! caches its delivery, later packets take one conntrack lookup and are
//! delivered exactly as the full path would, and every change the full path
//! would see (policy, endpoints) takes the flow back to it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use cilia_abi::*;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

mod common;
use common::fixture::*;
use common::*;

/// The conntrack entry of the flow to port `dport` (one per test).
fn entry(fx: &Fixture, dport: u16) -> CtValue {
    fx.dp
        .list_ct()
        .unwrap()
        .into_iter()
        .find(|(k, v)| {
            CtEntry::decode(k, v).is_some_and(|e| e.destination.port() == dport && !e.service)
        })
        .map(|(_, v)| v)
        .expect("the flow's conntrack entry")
}

/// A -> B of an established connection (ACK): a SYN never takes the fast
/// path.
fn a_to_b_est(dport: u16) -> Vec<u8> {
    eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(a6(), b6(), IPPROTO_TCP, 64, &tcp(40000, dport, 0x10)),
    )
}

fn forwarded(fx: &Fixture, reason: u8) -> u64 {
    fx.dp
        .metrics()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.kind == CILIA_METRIC_FORWARD && k.reason == reason)
        .map(|(_, v)| v.packets)
        .sum()
}

#[test]
fn an_established_flow_is_cached_and_delivered_as_the_full_path_does() {
    privileged!("fast_path_delivers_the_same");
    cached_and_delivered_the_same(Fixture::new());
}

#[test]
fn the_generic_program_takes_the_fast_path_too() {
    privileged!("fast_path_generic");
    cached_and_delivered_the_same(Fixture::generic());
}

fn cached_and_delivered_the_same(mut fx: Fixture) {
    b_admits_http_from_a(&mut fx);
    let (a, b) = (fx.a(), fx.b());
    let first = a.run(&a_to_b_est(80)).unwrap();
    assert_eq!(first.verdict, TC_ACT_REDIRECT, "new, full path");
    // Between two local endpoints the first packet caches both ways: the
    // replies can only come back through B's program, to A.
    let ct = entry(&fx, 80);
    assert_eq!(
        ct.flags & CILIA_CT_FAST_MASK,
        CILIA_CT_FAST_MASK,
        "a new flow is cached both ways"
    );
    assert_eq!(ct.backend_id & 0xffff, u32::from(B_ID), "to B");
    assert_eq!(ct.backend_id >> 16, u32::from(A_ID), "replies to A");
    assert_eq!(ct.flags & CILIA_CT_SEEN_REPLY, 0, "no reply yet");
    let fast = a.run(&a_to_b_est(80)).unwrap();
    assert_eq!(fast.verdict, TC_ACT_REDIRECT);
    assert_eq!(fast.packet, first.packet, "same MACs and hop limit");
    let ct = entry(&fx, 80);
    assert_eq!(ct.packets, 2, "the fast path counts the flow's packets");
    // A SYN of the same tuple goes the full way, with the same outcome.
    let syn = a.run(&a_to_b(80)).unwrap();
    assert_eq!(syn.verdict, TC_ACT_REDIRECT);
    assert_eq!(entry(&fx, 80).packets, 3);
    assert_eq!(forwarded(&fx, CILIA_FWD_ENDPOINT), 3, "and the node's");

    // The first reply takes the fast path and does what the full path
    // would: marks the reply seen, so the flow lives as an established one.
    let before = entry(&fx, 80).expires;
    let fast = b.run(&b_to_a(80)).unwrap();
    assert_eq!(fast.verdict, TC_ACT_REDIRECT, "first reply, fast path");
    let ct = entry(&fx, 80);
    assert_ne!(ct.flags & CILIA_CT_SEEN_REPLY, 0, "the reply is seen");
    let longer = (u64::from(CILIA_CT_TCP_TIMEOUT) - u64::from(CILIA_CT_TCP_SYN_TIMEOUT)) / 2;
    assert!(
        ct.expires > before + longer * 1_000_000_000,
        "an established connection's lifetime"
    );
    // The full path's reply (monitor traces keep packets on it) is the same.
    fx.dp.set_monitor_level(CILIA_MONITOR_TRACE).unwrap();
    let full = b.run(&b_to_a(80)).unwrap();
    assert_eq!(full.verdict, TC_ACT_REDIRECT, "a reply, full path");
    assert_eq!(fast.packet, full.packet);
    assert_eq!(entry(&fx, 80).packets, 3, "replies are not forward packets");
    assert_eq!(forwarded(&fx, CILIA_FWD_ENDPOINT), 5);
}

#[test]
fn a_policy_change_takes_a_cached_flow_back_to_the_policy() {
    privileged!("fast_path_revoked");
    let mut fx = Fixture::new();
    b_admits_http_from_a(&mut fx);
    let (a, b) = (fx.a(), fx.b());
    for _ in 0..3 {
        assert_eq!(a.run(&a_to_b_est(80)).unwrap().verdict, TC_ACT_REDIRECT);
    }
    assert_eq!(b.run(&b_to_a(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_ne!(entry(&fx, 80).flags & CILIA_CT_FAST_MASK, 0);
    set(&mut fx.dp, B_ID, &[enforce(CILIA_DIR_INGRESS)]);
    fx.dp.bump_policy_revision().unwrap();
    assert_eq!(b.run(&b_to_a(80)).unwrap().verdict, TC_ACT_SHOT, "reply");
    assert_eq!(
        a.run(&a_to_b_est(80)).unwrap().verdict,
        TC_ACT_SHOT,
        "forward"
    );
    let ct = entry(&fx, 80);
    assert_ne!(ct.flags & CILIA_CT_DENIED, 0);
    assert_eq!(
        ct.flags & CILIA_CT_FAST_MASK,
        0,
        "a revoked entry keeps no cache"
    );
}

#[test]
fn a_withdrawn_endpoint_is_no_longer_a_cached_target() {
    privileged!("fast_path_withdrawn_endpoint");
    let fx = Fixture::new();
    let a = fx.a();
    for _ in 0..3 {
        assert_eq!(a.run(&a_to_b_est(80)).unwrap().verdict, TC_ACT_REDIRECT);
    }
    // Withdrawn (as a delete's disconnect does): B's address is only an
    // ipcache entry now, so the flow goes to the stack, never to B's veth.
    fx.dp.remove_endpoint(IpAddr::V6(b6())).unwrap();
    assert_eq!(a.run(&a_to_b_est(80)).unwrap().verdict, TC_ACT_OK);
    assert_eq!(a.run(&a_to_b_est(80)).unwrap().verdict, TC_ACT_OK);
}

#[test]
fn an_expiring_hop_limit_and_monitor_traces_go_the_full_way() {
    privileged!("fast_path_exceptions");
    let mut fx = Fixture::new();
    let mut rb = fx.dp.take_events().unwrap();
    let a = fx.a();
    for _ in 0..3 {
        assert_eq!(a.run(&a_to_b_est(80)).unwrap().verdict, TC_ACT_REDIRECT);
    }
    assert_ne!(entry(&fx, 80).flags & CILIA_CT_FAST_FWD, 0);
    let last_hop = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(a6(), b6(), IPPROTO_TCP, 1, &tcp(40000, 80, 0x10)),
    );
    assert_ne!(a.run(&last_hop).unwrap().verdict, TC_ACT_REDIRECT);
    assert!(fx.dp.metrics().unwrap().iter().any(|(k, v)| {
        k.kind == CILIA_METRIC_DROP && k.reason == CILIA_DROP_TTL_EXCEEDED && v.packets == 1
    }));
    // Tracing on: every packet is traced, cached flow or not.
    fx.dp.set_monitor_level(CILIA_MONITOR_TRACE).unwrap();
    for _ in 0..2 {
        assert_eq!(a.run(&a_to_b_est(80)).unwrap().verdict, TC_ACT_REDIRECT);
    }
    let traces = drain_events(&mut rb)
        .iter()
        .filter(|e| e.type_ == CILIA_EVENT_TRACE)
        .count();
    assert_eq!(traces, 2);
}

/// A flow to an address that was nobody's is cached to the stack; when a
/// local endpoint then gets that address, the flow meets that endpoint's
/// ingress policy (it was only ever checked against A's egress).
#[test]
fn a_flow_cached_to_the_stack_meets_a_new_endpoint_at_its_address() {
    privileged!("fast_path_new_endpoint_at_flow_address");
    let fx = Fixture::new();
    let a = fx.a();
    let to_world = |ttl| {
        eth(
            A_NODE_MAC,
            A_MAC,
            ETH_P_IP,
            &ipv4(a4(), world4(), IPPROTO_UDP, ttl, &udp(5000, 53, b"q")),
        )
    };
    for _ in 0..3 {
        assert_eq!(a.run(&to_world(64)).unwrap().verdict, TC_ACT_OK);
    }
    let ct = entry(&fx, 53);
    assert_ne!(ct.flags & CILIA_CT_FAST_FWD, 0);
    assert_eq!(ct.backend_id & 0xffff, 0, "cached to the stack");
    assert_eq!(forwarded(&fx, CILIA_FWD_STACK), 3);

    const C_ID: u16 = 3;
    fx.dp
        .set_policy(
            C_ID,
            &[enforce(CILIA_DIR_INGRESS)]
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
        )
        .unwrap();
    fx.dp
        .upsert_endpoint(
            IpAddr::V4(world4()),
            EndpointInfo {
                ifindex: 4003,
                identity: 1003,
                endpoint_id: C_ID,
                flags: 0,
                mac: [0x0a, 0, 0, 0, 0, 0xc1],
                node_mac: [0x0a, 0, 0, 0, 0, 0xc2],
            },
        )
        .unwrap();
    assert_eq!(
        a.run(&to_world(64)).unwrap().verdict,
        TC_ACT_SHOT,
        "C admits nothing"
    );
}

/// The fast path's "neither direction has an entry" flag lives in the
/// packet's control block (`ct_cb_absent`), where the full path reads it
/// to skip its own lookups. A packet can arrive with anything there, so
/// the flag must be the fast path's own word every time: a reply whose
/// control block already says "absent" is still looked up, found, and
/// passes where its endpoint's egress allows nothing.
#[test]
fn a_stale_absent_flag_in_the_control_block_is_not_believed() {
    privileged!("fast_path_stale_cb");
    let mut fx = Fixture::new();
    set(&mut fx.dp, B_ID, &[enforce_both(), allow_tcp_from_a(80)]);
    let (a, b) = (fx.a(), fx.b());
    const STALE: [u32; 5] = [1, 0, 0, 0, 0];
    assert_eq!(
        a.run_with_cb(&a_to_b(80), STALE).unwrap().verdict,
        TC_ACT_REDIRECT,
        "the SYN"
    );
    // The first reply would take the fast path (cached by the SYN): with
    // monitor traces on, the full path decides it, and the rest.
    fx.dp.set_monitor_level(CILIA_MONITOR_TRACE).unwrap();
    assert_eq!(
        b.run_with_cb(&b_to_a(80), STALE).unwrap().verdict,
        TC_ACT_REDIRECT,
        "a reply, by its entry"
    );
    assert_eq!(
        b.run_with_cb(&b_to_a(81), STALE).unwrap().verdict,
        TC_ACT_SHOT,
        "without an entry: B's egress allows nothing"
    );
    let est = a.run_with_cb(&a_to_b_est(80), STALE).unwrap();
    assert_eq!(est.verdict, TC_ACT_REDIRECT, "established, by its entry");
}

/// One conntrack entry per flow, not per direction: a flow and its replies
/// share one canonical key (`ct_key_canon`), the entry says which end began
/// it, and userspace computes the same key the datapath stored.
#[test]
fn a_flow_has_one_entry_for_both_directions_decoded_as_it_began() {
    privileged!("ct_one_key_both_directions");
    let fx = Fixture::new();
    let (a, b) = (fx.a(), fx.b());
    // (source MAC, destination MAC) of each endpoint's packets.
    let (from_a, from_b) = ((A_MAC, A_NODE_MAC), (B_MAC, B_NODE_MAC));
    let v6 = |src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags, mac| {
        l4::tcp_packet(
            SocketAddr::new(IpAddr::V6(src.0), src.1),
            SocketAddr::new(IpAddr::V6(dst.0), dst.1),
            flags,
            mac,
        )
    };
    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;
    // A opens to B:80 and B answers; B opens to A:8080 and A answers.
    let steps = [
        (&a, v6((a6(), 40000), (b6(), 80), SYN, from_a)),
        (&b, v6((b6(), 80), (a6(), 40000), SYN_ACK, from_b)),
        (&b, v6((b6(), 50000), (a6(), 8080), SYN, from_b)),
        (&a, v6((a6(), 8080), (b6(), 50000), SYN_ACK, from_a)),
    ];
    for (i, (prog, packet)) in steps.iter().enumerate() {
        assert_eq!(
            prog.run(packet).unwrap().verdict,
            TC_ACT_REDIRECT,
            "step {i}"
        );
    }
    // And an IPv4 flow of A's to the world, by the stack.
    let world = SocketAddr::new(IpAddr::V4(world4()), 53);
    let dns = l4::udp_packet(SocketAddr::new(IpAddr::V4(a4()), 5353), world, from_a);
    assert_eq!(a.run(&dns).unwrap().verdict, TC_ACT_OK);

    let ct = fx.dp.list_ct().unwrap();
    assert_eq!(ct.len(), 3, "one entry per flow: {ct:?}");
    let mut began = Vec::new();
    let mut swapped = 0;
    for (key, value) in &ct {
        let e = CtEntry::decode(key, value).unwrap();
        assert_eq!(e.key(), *key, "userspace computes the datapath's key");
        swapped += usize::from(value.flags & CILIA_CT_SWAPPED != 0);
        began.push((e.source, e.destination, e.seen_reply));
    }
    began.sort();
    let end = |ip: Ipv6Addr, port| SocketAddr::new(IpAddr::V6(ip), port);
    let mut want = vec![
        (end(a6(), 40000), end(b6(), 80), true),
        (end(b6(), 50000), end(a6(), 8080), true),
        (SocketAddr::new(IpAddr::V4(a4()), 5353), world, false),
    ];
    want.sort();
    assert_eq!(began, want, "each flow as its first packet went");
    assert!(
        (1..=2).contains(&swapped),
        "the two flows between A and B begin at opposite ends of one order: {swapped}"
    );
}

/// CLOCK_MONOTONIC_COARSE, the datapath's deadline clock, in nanoseconds.
fn coarse_now() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// A -> B:80 (`a` true) or B:80 -> A (false) with TCP `flags`.
fn segment(a: bool, flags: u8) -> Vec<u8> {
    if a {
        eth(
            A_NODE_MAC,
            A_MAC,
            ETH_P_IPV6,
            &ipv6(a6(), b6(), IPPROTO_TCP, 64, &tcp(40000, 80, flags)),
        )
    } else {
        eth(
            B_NODE_MAC,
            B_MAC,
            ETH_P_IPV6,
            &ipv6(b6(), a6(), IPPROTO_TCP, 64, &tcp(80, 40000, flags)),
        )
    }
}

/// Seconds the flow to port 80 has left.
fn lifetime(fx: &Fixture) -> u64 {
    entry(fx, 80).expires.saturating_sub(coarse_now()) / 1_000_000_000
}

const CLOSE_FLAGS: u16 = CILIA_CT_CLOSING | CILIA_CT_FIN_FWD | CILIA_CT_FIN_REPLY;

/// A connection that ended gives its endpoint's conntrack budget back
/// within the close timeout: after a FIN each way the entry is closing,
/// and the last ACK (which has no FIN and takes the fast path) does not
/// give it an established connection's hours. A half-closed connection
/// keeps its lifetime; a SYN on the same tuple starts it afresh.
#[test]
fn a_closed_connection_leaves_conntrack_within_the_close_timeout() {
    privileged!("ct_close_graceful");
    let mut fx = Fixture::new();
    b_admits_http_from_a(&mut fx);
    let (a, b) = (fx.a(), fx.b());
    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;
    const ACK: u8 = 0x10;
    const FIN_ACK: u8 = 0x11;
    let close = u64::from(CILIA_CT_TCP_CLOSE);
    for (from_a, flags) in [(true, SYN), (false, SYN_ACK), (true, ACK)] {
        let seg = segment(from_a, flags);
        let out = if from_a { a.run(&seg) } else { b.run(&seg) }.unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
    }
    assert!(lifetime(&fx) > close, "established");
    // A half-closes; B goes on sending: the connection stays established.
    assert_eq!(
        a.run(&segment(true, FIN_ACK)).unwrap().verdict,
        TC_ACT_REDIRECT
    );
    let ct = entry(&fx, 80);
    assert_eq!(
        ct.flags & CLOSE_FLAGS,
        CILIA_CT_FIN_FWD,
        "A's direction closed"
    );
    assert_eq!(
        b.run(&segment(false, ACK)).unwrap().verdict,
        TC_ACT_REDIRECT
    );
    assert!(lifetime(&fx) > close, "half-closed, still established");
    // B closes too: the flow is closing, and its last ACK keeps it so.
    assert_eq!(
        b.run(&segment(false, FIN_ACK)).unwrap().verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(entry(&fx, 80).flags & CLOSE_FLAGS, CLOSE_FLAGS);
    assert_eq!(a.run(&segment(true, ACK)).unwrap().verdict, TC_ACT_REDIRECT);
    let ct = entry(&fx, 80);
    assert_ne!(ct.flags & CILIA_CT_FAST_FWD, 0, "the last ACK may go fast");
    assert_eq!(ct.flags & CILIA_CT_CLOSING, CILIA_CT_CLOSING);
    assert!(lifetime(&fx) <= close, "closed: {} s left", lifetime(&fx));
    // The client opens again from the same port: a new connection.
    assert_eq!(a.run(&segment(true, SYN)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(entry(&fx, 80).flags & CLOSE_FLAGS, 0, "reopened");
    assert_eq!(
        b.run(&segment(false, SYN_ACK)).unwrap().verdict,
        TC_ACT_REDIRECT
    );
    assert!(lifetime(&fx) > close, "established again");
}

/// A RST from either side closes the flow at once.
#[test]
fn a_reset_connection_leaves_conntrack_within_the_close_timeout() {
    privileged!("ct_close_reset");
    let mut fx = Fixture::new();
    b_admits_http_from_a(&mut fx);
    let (a, b) = (fx.a(), fx.b());
    const RST_ACK: u8 = 0x14;
    let close = u64::from(CILIA_CT_TCP_CLOSE);
    assert_eq!(
        a.run(&segment(true, 0x02)).unwrap().verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        b.run(&segment(false, 0x12)).unwrap().verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        b.run(&segment(false, RST_ACK)).unwrap().verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(entry(&fx, 80).flags & CILIA_CT_CLOSING, CILIA_CT_CLOSING);
    // A straggler of A's (no RST) does not revive the connection's hours.
    assert_eq!(
        a.run(&segment(true, 0x10)).unwrap().verdict,
        TC_ACT_REDIRECT
    );
    assert!(lifetime(&fx) <= close, "closed: {} s left", lifetime(&fx));
}
