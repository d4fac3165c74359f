//! Policy and conntrack fixtures: verdicts of the real endpoint programs
//! under `BPF_PROG_TEST_RUN`, with policy maps installed the way the agent
//! installs them.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, Ipv6Addr};

use cilia_abi::*;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

mod common;
use common::fixture::*;
use common::*;

#[test]
fn ingress_allow_of_one_port_admits_it_and_drops_the_others() {
    privileged!("ingress_allow_of_one_port");
    let mut fx = Fixture::new();
    b_admits_http_from_a(&mut fx);
    let a = fx.a();
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(a.run(&a_to_b(81)).unwrap().verdict, TC_ACT_SHOT);
}

#[test]
fn reply_of_an_allowed_flow_passes_although_the_reverse_direction_is_denied() {
    privileged!("reply_of_an_allowed_flow");
    let mut fx = Fixture::new();
    b_admits_http_from_a(&mut fx);
    // A denies all ingress: a new flow B -> A would be dropped ...
    set(&mut fx.dp, A_ID, &[enforce(CILIA_DIR_INGRESS)]);
    let b = fx.b();
    assert_eq!(b.run(&b_to_a(81)).unwrap().verdict, TC_ACT_SHOT);
    // ... but the reply of A -> B:80 follows the conntrack entry.
    assert_eq!(fx.a().run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(b.run(&b_to_a(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert!(fx
        .dp
        .list_ct()
        .unwrap()
        .iter()
        .any(|(_, v)| v.flags & CILIA_CT_SEEN_REPLY != 0));
}

#[test]
fn deny_wins_over_allow_on_the_same_port() {
    privileged!("deny_wins");
    let mut fx = Fixture::new();
    set(
        &mut fx.dp,
        B_ID,
        &[
            enforce(CILIA_DIR_INGRESS),
            rule(CILIA_DIR_INGRESS, 0, 0, 0, 0, CILIA_VERDICT_ALLOW),
            rule(CILIA_DIR_INGRESS, A_IDENTITY, 6, 80, 16, CILIA_VERDICT_DENY),
        ],
    );
    let a = fx.a();
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(a.run(&a_to_b(443)).unwrap().verdict, TC_ACT_REDIRECT);
}

#[test]
fn port_prefix_entries_cover_a_port_range() {
    privileged!("port_prefix");
    let mut fx = Fixture::new();
    // 8000-8063 as one /10 prefix of the port.
    set(
        &mut fx.dp,
        B_ID,
        &[
            enforce(CILIA_DIR_INGRESS),
            rule(
                CILIA_DIR_INGRESS,
                A_IDENTITY,
                6,
                8000,
                10,
                CILIA_VERDICT_ALLOW,
            ),
        ],
    );
    let a = fx.a();
    for (port, verdict) in [
        (8000, TC_ACT_REDIRECT),
        (8063, TC_ACT_REDIRECT),
        (8064, TC_ACT_SHOT),
        (7999, TC_ACT_SHOT),
    ] {
        assert_eq!(
            a.run(&a_to_b(port)).unwrap().verdict,
            verdict,
            "port {port}"
        );
    }
}

#[test]
fn revoking_a_policy_stops_an_established_flow() {
    privileged!("revoking_a_policy");
    let mut fx = Fixture::new();
    b_admits_http_from_a(&mut fx);
    let a = fx.a();
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    set(&mut fx.dp, B_ID, &[enforce(CILIA_DIR_INGRESS)]);
    // Same revision: the established flow still passes (policy not re-read).
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    fx.dp.bump_policy_revision().unwrap();
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_SHOT);
}

#[test]
fn egress_policy_to_world_uses_the_ipcache() {
    privileged!("egress_policy_to_world");
    let mut fx = Fixture::new();
    let cidr_identity = LOCAL_CIDR;
    fx.dp
        .upsert_ipcache(
            IpcacheKey::new(IpAddr::V4("192.0.2.0".parse().unwrap()), 24),
            cidr_identity,
        )
        .unwrap();
    set(
        &mut fx.dp,
        A_ID,
        &[
            enforce(CILIA_DIR_EGRESS),
            rule(
                CILIA_DIR_EGRESS,
                cidr_identity,
                17,
                53,
                16,
                CILIA_VERDICT_ALLOW,
            ),
        ],
    );
    let a = fx.a();
    let dns = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IP,
        &ipv4(a4(), world4(), IPPROTO_UDP, 64, &udp(5000, 53, b"q")),
    );
    assert_eq!(
        a.run(&dns).unwrap().verdict,
        TC_ACT_OK,
        "allowed, to the stack"
    );
    let other = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IP,
        &ipv4(
            a4(),
            "198.51.100.1".parse().unwrap(),
            IPPROTO_UDP,
            64,
            &udp(5000, 53, b"q"),
        ),
    );
    assert_eq!(
        a.run(&other).unwrap().verdict,
        TC_ACT_SHOT,
        "world outside the CIDR"
    );
    let metrics = fx.dp.metrics().unwrap();
    assert!(metrics.iter().any(|(k, v)| k.kind == CILIA_METRIC_DROP
        && k.reason == CILIA_DROP_POLICY
        && k.dir == CILIA_DIR_EGRESS
        && v.packets == 1));
}

const LOCAL_CIDR: u32 = 1 << 24;

#[test]
fn to_container_program_applies_ingress_policy_to_host_traffic() {
    privileged!("to_container_ingress");
    let mut fx = Fixture::new();
    fx.dp
        .upsert_ipcache(
            IpcacheKey::new(IpAddr::V6("fd00:c1::1".parse().unwrap()), 128),
            CILIA_ID_HOST,
        )
        .unwrap();
    set(
        &mut fx.dp,
        B_ID,
        &[
            enforce(CILIA_DIR_INGRESS),
            rule(
                CILIA_DIR_INGRESS,
                CILIA_ID_HOST,
                6,
                22,
                16,
                CILIA_VERDICT_ALLOW,
            ),
        ],
    );
    let to_b = fx.b_to_container();
    let host = |port| {
        eth(
            B_MAC,
            B_NODE_MAC,
            ETH_P_IPV6,
            &ipv6(
                "fd00:c1::1".parse().unwrap(),
                b6(),
                IPPROTO_TCP,
                64,
                &tcp(50000, port, 0x02),
            ),
        )
    };
    assert_eq!(to_b.run(&host(22)).unwrap().verdict, TC_ACT_OK);
    assert_eq!(to_b.run(&host(23)).unwrap().verdict, TC_ACT_SHOT);
}

#[test]
fn policy_updates_are_incremental_and_swap_maps() {
    privileged!("policy_updates");
    let fx = Fixture::new();
    let base = [enforce(CILIA_DIR_INGRESS), allow_tcp_from_a(80)];
    let first = fx
        .dp
        .set_policy(B_ID, &base.iter().copied().collect())
        .unwrap();
    assert_eq!((first.added, first.removed), (2, 0));
    let mut more = base.to_vec();
    more.push(allow_tcp_from_a(443));
    let second = fx
        .dp
        .set_policy(B_ID, &more.iter().copied().collect())
        .unwrap();
    assert_eq!(second.added, 3, "fresh standby map");
    let third = fx
        .dp
        .set_policy(B_ID, &more.iter().copied().collect())
        .unwrap();
    assert_eq!(
        (third.added, third.removed),
        (1, 0),
        "only the difference to the standby map"
    );
    assert_eq!(fx.dp.get_policy(B_ID).unwrap().unwrap().len(), 3);
    fx.dp.remove_policy(B_ID).unwrap();
    assert!(fx.dp.get_policy(B_ID).unwrap().is_none());
}

/// An update for an endpoint without a policy map (and no spare: one whose
/// map was just removed by its delete, or that never had one) writes the
/// update as its whole policy. It once waited forever on the outer map's
/// lock, which it still held from its own lookup: an agent thread stuck with
/// the endpoints' and the policy's locks, every later delete with it.
#[test]
fn an_update_of_an_endpoint_without_a_policy_map_writes_it_whole() {
    privileged!("update_without_a_policy_map");
    let fx = std::sync::Arc::new(Fixture::new());
    fx.dp.remove_policy(B_ID).unwrap();
    assert!(fx.dp.get_policy(B_ID).unwrap().is_none());
    let (done, finished) = std::sync::mpsc::channel();
    let worker = {
        let fx = fx.clone();
        std::thread::spawn(move || {
            let upserts = [enforce(CILIA_DIR_INGRESS), allow_tcp_from_a(80)]
                .into_iter()
                .collect();
            let update = fx.dp.update_policy(B_ID, &Default::default(), &upserts);
            let _ = done.send(update.map(|u| (u.added, u.removed)));
        })
    };
    let update = finished
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the update returns (it waited on a lock it held)");
    assert_eq!(update.unwrap(), (2, 0));
    worker.join().unwrap();
    assert_eq!(fx.dp.get_policy(B_ID).unwrap().unwrap().len(), 2);
}

/// ICMPv6 destination unreachable from B to A quoting `quoted` (an IPv6
/// packet A sent).
fn icmp6_unreachable_b_to_a(quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![1, 4, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    eth(
        B_NODE_MAC,
        B_MAC,
        ETH_P_IPV6,
        &ipv6(b6(), a6(), IPPROTO_ICMPV6, 64, &icmp),
    )
}

#[test]
fn icmp_errors_about_a_tracked_flow_follow_its_conntrack_entry() {
    privileged!("icmp_errors_related");
    let mut fx = Fixture::new();
    // A accepts nothing new; B allows A on TCP/80.
    set(&mut fx.dp, A_ID, &[enforce(CILIA_DIR_INGRESS)]);
    b_admits_http_from_a(&mut fx);
    let syn = a_to_b(80);
    assert_eq!(fx.a().run(&syn).unwrap().verdict, TC_ACT_REDIRECT);
    let b = fx.b();
    // The error quotes A's SYN (IPv6 header + TCP ports): related, passes.
    assert_eq!(
        b.run(&icmp6_unreachable_b_to_a(&syn[14..14 + 48]))
            .unwrap()
            .verdict,
        TC_ACT_REDIRECT
    );
    // An error about a flow nobody opened is a new flow: A's ingress denies it.
    let stranger = a_to_b(9999);
    assert_eq!(
        b.run(&icmp6_unreachable_b_to_a(&stranger[14..14 + 48]))
            .unwrap()
            .verdict,
        TC_ACT_SHOT
    );
}

#[test]
fn a_revoked_flow_cannot_be_revived_from_the_server_side() {
    privileged!("revoked_flow_stays_revoked");
    let mut fx = Fixture::new();
    b_admits_http_from_a(&mut fx);
    let (a, b) = (fx.a(), fx.b());
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(
        b.run(&b_to_a(80)).unwrap().verdict,
        TC_ACT_REDIRECT,
        "reply"
    );
    // Revoke: B now accepts nothing.
    set(&mut fx.dp, B_ID, &[enforce(CILIA_DIR_INGRESS)]);
    fx.dp.bump_policy_revision().unwrap();
    assert_eq!(
        a.run(&a_to_b(80)).unwrap().verdict,
        TC_ACT_SHOT,
        "client's next packet"
    );
    // The server retransmits: it must not open a reverse flow of which the
    // client's packets would be replies.
    assert_eq!(
        b.run(&b_to_a(80)).unwrap().verdict,
        TC_ACT_SHOT,
        "server retransmit"
    );
    assert_eq!(
        a.run(&a_to_b(80)).unwrap().verdict,
        TC_ACT_SHOT,
        "client retransmit"
    );
    assert!(fx
        .dp
        .list_ct()
        .unwrap()
        .iter()
        .any(|(_, v)| v.flags & CILIA_CT_DENIED != 0));
    // Allowed again by a later policy: the same flow resumes.
    b_admits_http_from_a(&mut fx);
    fx.dp.bump_policy_revision().unwrap();
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
}

#[test]
fn events_are_emitted_only_when_the_monitor_listens() {
    privileged!("events_gated_by_monitor_level");
    let mut fx = Fixture::new();
    let mut rb = fx.dp.take_events().unwrap();
    b_admits_http_from_a(&mut fx);
    let a = fx.a();
    assert_eq!(a.run(&a_to_b(81)).unwrap().verdict, TC_ACT_SHOT);
    assert!(
        drain_events(&mut rb).is_empty(),
        "monitor off: counters only"
    );

    fx.dp.set_monitor_level(CILIA_MONITOR_DROPS).unwrap();
    assert_eq!(a.run(&a_to_b(81)).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    let events = drain_events(&mut rb);
    let drop = events
        .iter()
        .find(|e| e.type_ == CILIA_EVENT_DROP)
        .expect("drop event");
    assert_eq!(drop.reason, CILIA_DROP_POLICY);
    assert_eq!(drop.dir, CILIA_DIR_INGRESS);
    assert_eq!(
        (drop.src_identity, drop.dst_identity),
        (A_IDENTITY, B_IDENTITY)
    );
    assert_eq!(u16::from_be(drop.dport), 81);
    assert_eq!(drop.rule, 0, "default deny: no rule matched");
    assert_eq!(drop.peer_endpoint, B_ID);
    let verdict = events
        .iter()
        .find(|e| e.type_ == CILIA_EVENT_POLICY_VERDICT)
        .expect("policy verdict of the allowed flow");
    assert_eq!(verdict.verdict, CILIA_VERDICT_ALLOW);
    assert_eq!(verdict.rule, 7, "the allowing entry's rule cookie");
    assert!(
        !events.iter().any(|e| e.type_ == CILIA_EVENT_TRACE),
        "no traces at drops level"
    );

    fx.dp.set_monitor_level(CILIA_MONITOR_TRACE).unwrap();
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    let events = drain_events(&mut rb);
    assert!(events
        .iter()
        .any(|e| e.type_ == CILIA_EVENT_TRACE && e.reason == CILIA_FWD_ENDPOINT));
}

#[test]
fn debug_events_report_the_conntrack_state_of_every_packet() {
    privileged!("debug_events_conntrack_state");
    let mut fx = Fixture::new();
    let mut rb = fx.dp.take_events().unwrap();
    fx.dp.set_monitor_level(CILIA_MONITOR_DEBUG).unwrap();
    let (a, b) = (fx.a(), fx.b());
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(b.run(&b_to_a(80)).unwrap().verdict, TC_ACT_REDIRECT);
    let states: Vec<u8> = drain_events(&mut rb)
        .iter()
        .filter(|e| e.type_ == CILIA_EVENT_DEBUG)
        .map(|e| e.reason)
        .collect();
    assert_eq!(
        states,
        [
            CILIA_CT_STATE_NEW,
            CILIA_CT_STATE_ESTABLISHED,
            CILIA_CT_STATE_REPLY
        ]
    );
}

#[test]
fn an_endpoint_without_a_policy_map_is_closed_both_ways_until_it_has_one() {
    privileged!("no_policy_map_fails_closed");
    let mut fx = Fixture::new();
    // B's map is gone (torn state, or removed by hand): nothing may tell
    // "nothing selects B" from "B's policy is lost", so B is closed.
    fx.dp.remove_policy(B_ID).unwrap();
    let (a, b) = (fx.a(), fx.b());
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_SHOT, "ingress");
    assert_eq!(b.run(&b_to_a(80)).unwrap().verdict, TC_ACT_SHOT, "egress");
    assert_eq!(drops(&fx.dp, CILIA_DROP_NO_POLICY), 2);
    assert_eq!(drops(&fx.dp, CILIA_DROP_POLICY), 0);
    // Nothing was revoked: with its (empty) map back the same flow passes.
    set(&mut fx.dp, B_ID, &[]);
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(b.run(&b_to_a(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_NO_POLICY), 2);
}

#[test]
fn a_spare_policy_map_is_filled_in_place_by_the_first_write_and_never_replaces_a_map() {
    privileged!("spare_policy_maps");
    let mut fx = Fixture::new();
    const NEXT: u16 = 7;
    // A spare is an empty map in `cilia_policy`, made only where none is.
    assert!(fx.dp.spare_policy(NEXT).unwrap());
    assert!(!fx.dp.spare_policy(NEXT).unwrap(), "already there");
    assert_eq!(fx.dp.get_policy(NEXT).unwrap(), Some(Default::default()));
    assert!(fx.dp.policy_ids().unwrap().contains(&NEXT));
    assert!(
        !fx.dp.spare_policy(B_ID).unwrap(),
        "an endpoint's map stays"
    );
    // B's policy is untouched by the attempt.
    b_admits_http_from_a(&mut fx);
    assert!(!fx.dp.spare_policy(B_ID).unwrap());
    let a = fx.a();
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(a.run(&a_to_b(81)).unwrap().verdict, TC_ACT_SHOT);
    // The first write fills the spare: the pinned map `ep7_a` is the one
    // `cilia_policy` holds, and it has the entries.
    let dir = fx.path().join("policy");
    let pin = |slot| dir.join(format!("ep{NEXT}_{slot}"));
    let entries = [enforce(CILIA_DIR_INGRESS)];
    set(&mut fx.dp, NEXT, &entries);
    assert!(pin('a').exists());
    assert!(!pin('b').exists(), "written in place, no second map");
    assert_eq!(fx.dp.get_policy(NEXT).unwrap().unwrap().len(), 1);
    // The next write switches maps as always.
    set(&mut fx.dp, NEXT, &[]);
    assert!(pin('b').exists());
    assert_eq!(fx.dp.get_policy(NEXT).unwrap(), Some(Default::default()));
    fx.dp.remove_policy(NEXT).unwrap();
    assert!(!fx.dp.policy_ids().unwrap().contains(&NEXT));
}

#[test]
fn audit_passes_what_enforcement_would_drop_also_where_an_entry_hides_the_marker() {
    privileged!("audit_marker");
    let mut fx = Fixture::new();
    let a = fx.a();
    let any_deny = |port| rule(CILIA_DIR_INGRESS, 0, 6, port, 16, CILIA_VERDICT_DENY);
    let any_allow = rule(CILIA_DIR_INGRESS, 0, 0, 0, 0, CILIA_VERDICT_ALLOW);
    let peer_deny = |port| {
        rule(
            CILIA_DIR_INGRESS,
            A_IDENTITY,
            6,
            port,
            16,
            CILIA_VERDICT_DENY,
        )
    };
    for audit in [true, false] {
        let m = marker(Enforcement {
            ingress: true,
            egress: false,
            audit,
        });
        // Each case its own port: a passed flow leaves a conntrack entry.
        let base = if audit { 80 } else { 90 };
        let cases = [
            // No entry matches: the "any" lookup returned the marker.
            ("no entry", vec![m], base),
            // An any-identity deny on the port hides the marker.
            ("any-identity deny", vec![m, any_deny(base + 1)], base + 1),
            // The peer's deny; an any-identity allow hides the marker.
            (
                "peer deny beside an any-identity allow",
                vec![m, any_allow, peer_deny(base + 2)],
                base + 2,
            ),
        ];
        for (what, entries, port) in cases {
            set(&mut fx.dp, B_ID, &entries);
            let drops_before = drops(&fx.dp, CILIA_DROP_POLICY);
            let want = if audit { TC_ACT_REDIRECT } else { TC_ACT_SHOT };
            assert_eq!(
                a.run(&a_to_b(port)).unwrap().verdict,
                want,
                "{what}, audit {audit}"
            );
            let dropped = drops(&fx.dp, CILIA_DROP_POLICY) - drops_before;
            assert_eq!(dropped, u64::from(!audit), "{what}, audit {audit}");
        }
    }
}

#[test]
fn the_marker_enforces_each_direction_by_its_own_flags() {
    privileged!("marker_directions");
    let mut fx = Fixture::new();
    let (a, b) = (fx.a(), fx.b());
    // B enforces egress only: A -> B passes B's ingress, B's new flow to
    // A meets B's egress and is dropped.
    set(&mut fx.dp, B_ID, &[enforce(CILIA_DIR_EGRESS)]);
    assert_eq!(a.run(&a_to_b(82)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(b.run(&b_to_a(83)).unwrap().verdict, TC_ACT_SHOT);
    // Ingress only: the other way round.
    set(&mut fx.dp, B_ID, &[enforce(CILIA_DIR_INGRESS)]);
    assert_eq!(a.run(&a_to_b(84)).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(b.run(&b_to_a(85)).unwrap().verdict, TC_ACT_REDIRECT);
    // Both, and no marker at all (nothing enforced).
    set(&mut fx.dp, B_ID, &[enforce_both()]);
    assert_eq!(a.run(&a_to_b(86)).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(b.run(&b_to_a(87)).unwrap().verdict, TC_ACT_SHOT);
    set(&mut fx.dp, B_ID, &[]);
    assert_eq!(a.run(&a_to_b(88)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(b.run(&b_to_a(89)).unwrap().verdict, TC_ACT_REDIRECT);
}

/// A source the ipcache gives identity 0 looks its own identity up as the
/// "any" key, and so meets the marker there: it is no allow.
#[test]
fn a_peer_of_identity_zero_is_not_allowed_by_the_marker() {
    privileged!("marker_identity_zero");
    let mut fx = Fixture::new();
    let source: Ipv6Addr = "fd00:c1::7".parse().unwrap();
    fx.dp
        .upsert_ipcache(IpcacheKey::new(IpAddr::V6(source), 128), 0)
        .unwrap();
    set(&mut fx.dp, B_ID, &[enforce(CILIA_DIR_INGRESS)]);
    let to_b = fx.b_to_container();
    let from = |port| {
        eth(
            B_MAC,
            B_NODE_MAC,
            ETH_P_IPV6,
            &ipv6(source, b6(), IPPROTO_TCP, 64, &tcp(50000, port, 0x02)),
        )
    };
    assert_eq!(to_b.run(&from(22)).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_POLICY), 1);
    // Not enforced, it passes.
    set(&mut fx.dp, B_ID, &[]);
    assert_eq!(to_b.run(&from(23)).unwrap().verdict, TC_ACT_OK);
}
