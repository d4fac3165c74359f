//! Fixtures of the multi-node datapath: crafted packets through the real
//! programs with `BPF_PROG_TEST_RUN`. From-container toward a remote
//! prefix in each tunnel mode, and the node programs (`bpf/overlay.c`) on
//! what they must refuse or leave to the node's stack.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cilia_abi::*;
use cilia_datapath::object::{PROG_FROM_NETDEV, PROG_FROM_OVERLAY, PROG_TO_OVERLAY};
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

mod common;
use common::fixture::*;
use common::*;

const REMOTE_IDENTITY: u32 = 3000;

fn remote6() -> Ipv6Addr {
    "fd00:c1a:2::7".parse().unwrap()
}
fn remote4() -> Ipv4Addr {
    "10.200.2.7".parse().unwrap()
}
fn remote_node() -> IpAddr {
    "198.51.100.2".parse().unwrap()
}

/// The fixture's endpoints, plus a remote pod (both families) on the node
/// at 198.51.100.2, and the node config in `mode`.
fn fixture(mode: TunnelMode) -> Fixture {
    let fx = Fixture::new();
    for (ip, len) in [(IpAddr::V6(remote6()), 128), (IpAddr::V4(remote4()), 32)] {
        let row = IpcacheEntry {
            prefix: ipnet::IpNet::new(ip, len).unwrap(),
            identity: REMOTE_IDENTITY,
            tunnel: Some(remote_node()),
        };
        fx.dp.upsert_ipcache_value(row.key(), row.value()).unwrap();
    }
    fx.dp
        .set_node_config(&NodeConfig {
            tunnel_mode: mode,
            tunnel_ifindex: 4300,
            underlay_ifindex: 4301,
            tunnel_port: if mode == TunnelMode::Vxlan { 8472 } else { 0 },
        })
        .unwrap();
    fx
}

fn a_to_remote6(hop: u8) -> Vec<u8> {
    eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(a6(), remote6(), IPPROTO_TCP, hop, &tcp(40000, 80, 0x02)),
    )
}

fn a_to_remote4() -> Vec<u8> {
    eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IP,
        &ipv4(a4(), remote4(), IPPROTO_TCP, 64, &tcp(40000, 80, 0x02)),
    )
}

/// A packet from the remote pod to endpoint B, as it arrives on a node
/// device (MACs of the wire, not the endpoint's).
fn remote_to_b() -> Vec<u8> {
    eth(
        [0x0a, 0, 0, 0, 0, 0xee],
        [0x0a, 0, 0, 0, 0, 0xef],
        ETH_P_IPV6,
        &ipv6(remote6(), b6(), IPPROTO_TCP, 64, &tcp(40000, 80, 0x02)),
    )
}

#[test]
fn remote_destination_goes_to_the_stack_when_the_tunnel_is_off() {
    privileged!("remote_destination_goes_to_the_stack_when_the_tunnel_is_off");
    let fx = fixture(TunnelMode::Off);
    let r = fx.a().run(&a_to_remote6(64)).unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.packet, a_to_remote6(64), "untouched");
    assert_eq!(counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_STACK), 1);
    assert_eq!(counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_TUNNEL), 0);
}

#[test]
fn remote_destination_is_redirected_into_the_overlay_in_vxlan_mode() {
    privileged!("remote_destination_is_redirected_into_the_overlay_in_vxlan_mode");
    let fx = fixture(TunnelMode::Vxlan);
    for packet in [a_to_remote6(64), a_to_remote4()] {
        let r = fx.a().run(&packet).unwrap();
        assert_eq!(r.verdict, TC_ACT_REDIRECT);
        assert_eq!(r.packet, packet, "the inner packet travels as sent");
    }
    assert_eq!(counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_TUNNEL), 2);
}

#[test]
fn remote_destination_is_routed_one_hop_less_in_native_mode() {
    privileged!("remote_destination_is_routed_one_hop_less_in_native_mode");
    let fx = fixture(TunnelMode::Native);
    let r = fx.a().run(&a_to_remote6(64)).unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(r.packet[14 + 7], 63, "hop limit");
    assert_eq!(counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_NATIVE), 1);
    let r = fx.a().run(&a_to_remote6(1)).unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_TTL_EXCEEDED), 1);
}

#[test]
fn remote_destination_meets_the_senders_egress_policy_first() {
    privileged!("remote_destination_meets_the_senders_egress_policy_first");
    let mut fx = fixture(TunnelMode::Vxlan);
    a_sends_only_dns_to_world(&mut fx);
    assert_eq!(fx.a().run(&a_to_remote6(64)).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_POLICY), 1);
    assert_eq!(counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_TUNNEL), 0);
}

/// UDP from endpoint A to `dst` on `dport`, IPv4.
fn a_udp_to(dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IP,
        &ipv4(a4(), dst, IPPROTO_UDP, 64, &udp(40000, dport, b"vxlan?")),
    )
}

#[test]
fn endpoint_udp_to_a_nodes_tunnel_port_is_dropped_other_ports_and_hosts_are_not() {
    privileged!("endpoint_udp_to_a_nodes_tunnel_port_is_dropped");
    let fx = fixture(TunnelMode::Vxlan);
    let IpAddr::V4(node) = remote_node() else {
        unreachable!()
    };
    fx.dp.publish_nodes(&[remote_node()]).unwrap();
    // A forged VXLAN frame toward a known node: never leaves.
    let r = fx.a().run(&a_udp_to(node, 8472)).unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_TUNNEL_PORT), 1);
    // Another port of the node, and the tunnel port of a host that is no
    // node, are ordinary traffic.
    assert_eq!(fx.a().run(&a_udp_to(node, 53)).unwrap().verdict, TC_ACT_OK);
    let world = Ipv4Addr::new(203, 0, 113, 9);
    assert_eq!(
        fx.a().run(&a_udp_to(world, 8472)).unwrap().verdict,
        TC_ACT_OK
    );
    assert_eq!(drops(&fx.dp, CILIA_DROP_TUNNEL_PORT), 1);
}

#[test]
fn endpoint_udp_to_a_nodes_tunnel_port_passes_when_there_is_no_overlay() {
    privileged!("endpoint_udp_to_a_nodes_tunnel_port_passes_when_there_is_no_overlay");
    let fx = fixture(TunnelMode::Native);
    let IpAddr::V4(node) = remote_node() else {
        unreachable!()
    };
    fx.dp.publish_nodes(&[remote_node()]).unwrap();
    assert_eq!(
        fx.a().run(&a_udp_to(node, 8472)).unwrap().verdict,
        TC_ACT_OK
    );
    assert_eq!(drops(&fx.dp, CILIA_DROP_TUNNEL_PORT), 0);
}

#[test]
fn a_prefix_without_a_tunnel_goes_to_the_stack_in_any_mode() {
    privileged!("a_prefix_without_a_tunnel_goes_to_the_stack_in_any_mode");
    let fx = fixture(TunnelMode::Vxlan);
    let world = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IP,
        &ipv4(a4(), world4(), IPPROTO_UDP, 64, &udp(4000, 53, b"q")),
    );
    assert_eq!(fx.a().run(&world).unwrap().verdict, TC_ACT_OK);
    assert_eq!(counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_STACK), 1);
}

#[test]
fn overlay_drops_a_frame_without_tunnel_metadata_as_from_an_unknown_node() {
    privileged!("overlay_drops_a_frame_without_tunnel_metadata_as_from_an_unknown_node");
    let fx = fixture(TunnelMode::Vxlan);
    fx.dp.publish_nodes(&[remote_node()]).unwrap();
    let prog = fx.dp.test_node_program(PROG_FROM_OVERLAY).unwrap();
    assert_eq!(prog.run(&remote_to_b()).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_UNKNOWN_NODE), 1);
}

#[test]
fn to_overlay_drops_what_the_stack_routes_to_no_remote_prefix() {
    privileged!("to_overlay_drops_what_the_stack_routes_to_no_remote_prefix");
    let fx = fixture(TunnelMode::Vxlan);
    let prog = fx.dp.test_node_program(PROG_TO_OVERLAY).unwrap();
    let from_node = |dst: Ipv4Addr| {
        eth(
            [0; 6],
            [0; 6],
            ETH_P_IP,
            &ipv4(
                "198.51.100.1".parse().unwrap(),
                dst,
                IPPROTO_UDP,
                64,
                &udp(4000, 53, b"q"),
            ),
        )
    };
    assert_eq!(prog.run(&from_node(world4())).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_NO_ROUTE), 1);
    assert_eq!(prog.run(&from_node(remote4())).unwrap().verdict, TC_ACT_OK);
    assert_eq!(counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_TUNNEL), 1);
}

#[test]
fn to_overlay_drops_a_local_endpoint_address_the_proxy_did_not_send() {
    privileged!("to_overlay_drops_a_local_endpoint_address_the_proxy_did_not_send");
    let fx = fixture(TunnelMode::Vxlan);
    let prog = fx.dp.test_node_program(PROG_TO_OVERLAY).unwrap();
    let forged = eth(
        [0; 6],
        [0; 6],
        ETH_P_IP,
        &ipv4(a4(), remote4(), IPPROTO_UDP, 64, &udp(4000, 53, b"q")),
    );
    assert_eq!(prog.run(&forged).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_SPOOFED_SOURCE), 1);
    let proxied = prog.run_with_mark(&forged, CILIA_MARK_FROM_PROXY).unwrap();
    assert_eq!(proxied.verdict, TC_ACT_OK);
}

#[test]
fn netdev_leaves_the_nodes_own_traffic_to_the_stack() {
    privileged!("netdev_leaves_the_nodes_own_traffic_to_the_stack");
    let fx = fixture(TunnelMode::Native);
    let prog = fx.dp.test_node_program(PROG_FROM_NETDEV).unwrap();
    let to_node = eth(
        [0x0a, 0, 0, 0, 0, 0xee],
        [0x0a, 0, 0, 0, 0, 0xef],
        ETH_P_IP,
        &ipv4(
            "198.51.100.2".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
            IPPROTO_UDP,
            64,
            &udp(8472, 8472, b"x"),
        ),
    );
    let arp = arp_request(
        [0x0a, 0, 0, 0, 0, 0xef],
        "198.51.100.2".parse().unwrap(),
        "198.51.100.1".parse().unwrap(),
    );
    for packet in [to_node, arp] {
        let r = prog.run(&packet).unwrap();
        assert_eq!(r.verdict, TC_ACT_OK);
        assert_eq!(r.packet, packet, "untouched");
    }
    assert!(fx.dp.metrics().unwrap().is_empty(), "nothing counted");
}

#[test]
fn netdev_applies_the_destination_ingress_policy_with_the_ipcache_identity() {
    privileged!("netdev_applies_the_destination_ingress_policy_with_the_ipcache_identity");
    let mut fx = fixture(TunnelMode::Native);
    let prog = fx.dp.test_node_program(PROG_FROM_NETDEV).unwrap();
    // B admits A's identity only: the remote pod is refused.
    b_admits_http_from_a(&mut fx);
    assert_eq!(prog.run(&remote_to_b()).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_POLICY), 1);
    // B admits the remote pod's identity: delivered straight to B.
    set(
        &mut fx.dp,
        B_ID,
        &[
            enforce(CILIA_DIR_INGRESS),
            rule(
                CILIA_DIR_INGRESS,
                REMOTE_IDENTITY,
                6,
                80,
                16,
                CILIA_VERDICT_ALLOW,
            ),
        ],
    );
    fx.dp.bump_policy_revision().unwrap();
    let r = prog.run(&remote_to_b()).unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(&r.packet[..6], &B_MAC, "destination MAC is B's");
    let ct = fx.dp.list_ct().unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].1.owner, B_ID, "charged to the destination endpoint");
    assert_eq!(ct[0].1.src_identity, REMOTE_IDENTITY);
}
