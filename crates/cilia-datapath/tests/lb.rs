//! The per-packet load balancer: crafted packets through the real endpoint
//! programs with `BPF_PROG_TEST_RUN` (DNAT to the backend with valid
//! checksums, rev-NAT of replies, pinned flows, backend states), and the
//! maps' side through `BpfDatapath` (generation flip, Maglev tables).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use cilia_abi::{
    addr_filter_bit, CtEntry, EndpointConfig, EndpointInfo, LbAlgorithm, LbBackend, LbBackendState,
    LbFrontend, LbService, CILIA_DROP_LB_FRAGMENT, CILIA_DROP_NO_BACKEND, CILIA_LB_LOOPBACK_IPV4,
    CILIA_LB_LOOPBACK_IPV6_HI, CILIA_LB_LOOPBACK_IPV6_LO,
};
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TestProgram, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use cilia_datapath::BpfDatapath;
use cilia_testnet::BpfRoot;

mod common;
use common::icmp::{icmp_error, read_icmp_error, IcmpError};
use common::l4::{l4_packet, parse, tcp_packet, udp_packet};
use common::*;

const C_MAC: Mac = [0x0a, 0, 0, 0, 0, 0xc1];
const C_NODE_MAC: Mac = [0x0a, 0, 0, 0, 0, 0xc2];

fn c6() -> Ipv6Addr {
    "fd00:c1::c".parse().unwrap()
}
fn c4() -> Ipv4Addr {
    "10.200.0.12".parse().unwrap()
}
fn vip6() -> Ipv6Addr {
    "fd00:5e::10".parse().unwrap()
}
fn vip4() -> Ipv4Addr {
    "10.96.0.10".parse().unwrap()
}

const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

/// Endpoints A (the client, id 1), B (id 2) and C (id 3), both families.
struct Fixture {
    _root: BpfRoot,
    dp: BpfDatapath,
}

impl Fixture {
    fn new() -> Self {
        let root = BpfRoot::new();
        let dp = BpfDatapath::open(root.path()).expect("open datapath");
        for (id, mac, node_mac, v6, v4) in [
            (1, A_MAC, A_NODE_MAC, a6(), a4()),
            (2, B_MAC, B_NODE_MAC, b6(), b4()),
            (3, C_MAC, C_NODE_MAC, c6(), c4()),
        ] {
            let info = EndpointInfo {
                ifindex: 4140 + u32::from(id),
                identity: 1000 + u32::from(id),
                endpoint_id: id,
                flags: 0,
                mac,
                node_mac,
            };
            dp.upsert_endpoint(IpAddr::V6(v6), info).unwrap();
            dp.upsert_endpoint(IpAddr::V4(v4), info).unwrap();
            dp.set_policy(info.endpoint_id, &Default::default())
                .unwrap(); // empty: nothing selects it
        }
        Self { _root: root, dp }
    }

    fn program(&self, id: u16) -> TestProgram {
        self.dp
            .test_program(&Self::config(id))
            .expect("load endpoint program")
    }

    /// Endpoint `id`'s program toward the container.
    fn to_container(&self, id: u16) -> TestProgram {
        self.dp
            .test_program_to_container(&Self::config(id))
            .expect("load endpoint program")
    }

    fn config(id: u16) -> EndpointConfig {
        let (mac, node_mac, v6, v4) = match id {
            1 => (A_MAC, A_NODE_MAC, a6(), a4()),
            2 => (B_MAC, B_NODE_MAC, b6(), b4()),
            _ => (C_MAC, C_NODE_MAC, c6(), c4()),
        };
        EndpointConfig {
            ipv6: v6.octets(),
            ipv4: v4.octets(),
            mac,
            node_mac,
            ifindex: 4140 + u32::from(id),
            identity: 1000 + u32::from(id),
            endpoint_id: id,
            enable_ipv4: 1,
            monitor: 1,
        }
    }

    /// Backends 10 (B) and 11 (C) of the family of `v6`, and a random
    /// service over `slots` on the VIP.
    fn service(&self, v6: bool, proto: u8, slots: Vec<u32>) -> LbService {
        let (b, c, vip) = if v6 {
            (IpAddr::V6(b6()), IpAddr::V6(c6()), IpAddr::V6(vip6()))
        } else {
            (IpAddr::V4(b4()), IpAddr::V4(c4()), IpAddr::V4(vip4()))
        };
        self.dp
            .upsert_lb_backends(&[backend(10, b), backend(11, c)])
            .unwrap();
        let svc = LbService {
            rev_nat: 7,
            frontend: LbFrontend {
                addr: vip,
                port: VIP_PORT,
                proto,
            },
            algorithm: LbAlgorithm::Random,
            affinity_timeout: None,
            slots,
            maglev: None,
            flags: Default::default(),
        };
        self.dp.upsert_lb_service(&svc).unwrap();
        svc
    }
}

fn backend(id: u32, ip: IpAddr) -> LbBackend {
    LbBackend {
        id,
        addr: SocketAddr::new(ip, BACKEND_PORT),
        state: LbBackendState::Active,
    }
}

fn client(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(a6()), port)
    } else {
        SocketAddr::new(IpAddr::V4(a4()), port)
    }
}

fn frontend(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(vip6()), VIP_PORT)
    } else {
        SocketAddr::new(IpAddr::V4(vip4()), VIP_PORT)
    }
}

fn backend_addr(v6: bool, b: bool) -> SocketAddr {
    let ip = match (v6, b) {
        (true, true) => IpAddr::V6(b6()),
        (true, false) => IpAddr::V6(c6()),
        (false, true) => IpAddr::V4(b4()),
        (false, false) => IpAddr::V4(c4()),
    };
    SocketAddr::new(ip, BACKEND_PORT)
}

const A_FROM: (Mac, Mac) = (A_MAC, A_NODE_MAC);
const B_FROM: (Mac, Mac) = (B_MAC, B_NODE_MAC);

#[test]
fn packet_to_frontend_is_translated_to_the_backend_with_valid_checksums() {
    privileged!("lb_dnat");
    let fx = Fixture::new();
    let a = fx.program(1);
    for v6 in [true, false] {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            fx.service(v6, proto, vec![10]);
            let pkt = l4_packet(client(v6, 40000), frontend(v6), proto, 0x02, A_FROM);
            let out = a.run(&pkt).unwrap();
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6 {v6} proto {proto}");
            assert_eq!(&out.packet[0..6], &B_MAC, "delivered to backend B");
            let (src, dst, ok) = parse(&out.packet);
            assert_eq!(src, client(v6, 40000), "source untouched");
            assert_eq!(dst, backend_addr(v6, true), "destination is the backend");
            assert!(ok, "checksums valid after DNAT (v6 {v6} proto {proto})");
        }
    }
}

#[test]
fn reply_of_the_backend_carries_the_frontend_as_source() {
    privileged!("lb_revnat");
    let fx = Fixture::new();
    let (a, b) = (fx.program(1), fx.program(2));
    for v6 in [true, false] {
        fx.service(v6, IPPROTO_TCP, vec![10]);
        let syn = tcp_packet(client(v6, 40001), frontend(v6), 0x02, A_FROM);
        assert_eq!(a.run(&syn).unwrap().verdict, TC_ACT_REDIRECT);
        let reply = tcp_packet(backend_addr(v6, true), client(v6, 40001), 0x12, B_FROM);
        let out = b.run(&reply).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.packet[0..6], &A_MAC, "delivered to the client");
        // Replies are not counted: translated client packets are.
        let (src, dst, ok) = parse(&out.packet);
        assert_eq!(src, frontend(v6), "the client sees the frontend");
        assert_eq!(dst, client(v6, 40001));
        assert!(ok, "checksums valid after rev-NAT (v6 {v6})");
    }
}

/// A client port that just spoke to the backend directly (its flow
/// closed, its entry still there for a few seconds) and now connects to
/// the frontend: the translated tuple is the same, and the new service
/// flow must win it, or the backend's SYN-ACK would reach the client from
/// the backend's address and the connect would time out.
#[test]
fn service_flow_reusing_the_tuple_of_a_closed_direct_flow_gets_its_rev_nat() {
    privileged!("lb_reuse");
    let fx = Fixture::new();
    let (a, b) = (fx.program(1), fx.program(2));
    for v6 in [true, false] {
        fx.service(v6, IPPROTO_TCP, vec![10]);
        let (cl, be) = (client(v6, 40011), backend_addr(v6, true));
        // The direct flow: SYN, SYN-ACK, then FIN and RST.
        for (pkt, prog, want) in [
            (tcp_packet(cl, be, 0x02, A_FROM), &a, be),
            (tcp_packet(be, cl, 0x12, B_FROM), &b, be),
            (tcp_packet(cl, be, 0x11, A_FROM), &a, be),
            (tcp_packet(be, cl, 0x04, B_FROM), &b, be),
        ] {
            let out = prog.run(&pkt).unwrap();
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "direct flow (v6 {v6})");
            let (src, dst, _) = parse(&out.packet);
            assert!(
                src == want || dst == want,
                "direct flow untranslated (v6 {v6})"
            );
        }
        // The same client port to the frontend: translated to the same tuple.
        let out = a.run(&tcp_packet(cl, frontend(v6), 0x02, A_FROM)).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(parse(&out.packet).1, be, "translated to the backend");
        let out = b.run(&tcp_packet(be, cl, 0x12, B_FROM)).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let (src, dst, ok) = parse(&out.packet);
        assert_eq!(
            src,
            frontend(v6),
            "the SYN-ACK comes from the frontend (v6 {v6})"
        );
        assert_eq!(dst, cl);
        assert!(ok, "checksums valid (v6 {v6})");
        // And the service flow goes on as one: the next client packet
        // meets its entry.
        let out = a.run(&tcp_packet(cl, frontend(v6), 0x10, A_FROM)).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(parse(&out.packet).1, be);
    }
}

/// The same over UDP, whose first packet to the frontend is not a SYN: the
/// established-flow fast path looks its tuple (client -> frontend) up and
/// finds nothing either way, then the load balancer rewrites the tuple to
/// one that has an entry (the direct flow's). Conntrack must look the new
/// tuple up, not trust the fast path's "nothing there" about the old one:
/// else the service flow would find no entry, fail to create its own (the
/// slot is taken) and be dropped.
#[test]
fn udp_service_flow_reusing_the_tuple_of_a_direct_flow_is_looked_up_after_translation() {
    privileged!("lb_reuse_udp");
    let fx = Fixture::new();
    let (a, b) = (fx.program(1), fx.program(2));
    for v6 in [true, false] {
        fx.service(v6, IPPROTO_UDP, vec![10]);
        let (cl, be) = (client(v6, 40021), backend_addr(v6, true));
        // The direct flow: a datagram and its answer, several times (the
        // later ones take the fast path).
        for _ in 0..3 {
            let out = a.run(&udp_packet(cl, be, A_FROM)).unwrap();
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "direct (v6 {v6})");
            assert_eq!(parse(&out.packet).1, be);
            let out = b.run(&udp_packet(be, cl, B_FROM)).unwrap();
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "direct answer (v6 {v6})");
            assert_eq!(parse(&out.packet).0, be, "untranslated");
        }
        // The same client port to the frontend.
        let out = a.run(&udp_packet(cl, frontend(v6), A_FROM)).unwrap();
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "the service flow takes over the tuple (v6 {v6})"
        );
        assert_eq!(parse(&out.packet).1, be, "translated to the backend");
        let out = b.run(&udp_packet(be, cl, B_FROM)).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            parse(&out.packet).0,
            frontend(v6),
            "the answer comes from the frontend (v6 {v6})"
        );
    }
}

#[test]
fn service_counts_flows_on_selection_and_every_translated_packet() {
    privileged!("lb_stats");
    let fx = Fixture::new();
    let a = fx.program(1);
    fx.service(false, IPPROTO_TCP, vec![10]);
    let syn = tcp_packet(client(false, 40010), frontend(false), 0x02, A_FROM);
    let ack = tcp_packet(client(false, 40010), frontend(false), 0x10, A_FROM);
    for pkt in [&syn, &ack, &ack] {
        assert_eq!(a.run(pkt).unwrap().verdict, TC_ACT_REDIRECT);
    }
    let s = fx.dp.lb_stats(7).unwrap();
    assert_eq!((s.flows, s.packets), (1, 3));
    assert_eq!(s.bytes, (syn.len() + 2 * ack.len()) as u64);
    let svc = &fx.dp.lb_services().unwrap()[0];
    fx.dp.remove_lb_service(&svc.frontend, 7).unwrap();
    assert_eq!(fx.dp.lb_stats(7).unwrap().packets, 0, "removal zeroes");
}

/// A flow of client A (port `port`, IPv6) to the frontend whose backend
/// [2001:db8::7]:8080 is reached through the node's stack. Returns A's
/// to-container program, the backend, and the packet as A's program sent
/// it on (to the backend).
fn flow_to_a_backend_behind_the_stack(
    fx: &Fixture,
    port: u16,
) -> (TestProgram, SocketAddr, Vec<u8>) {
    let a = fx.program(1);
    let world: SocketAddr = "[2001:db8::7]:8080".parse().unwrap();
    fx.dp
        .upsert_lb_backends(&[LbBackend {
            id: 20,
            addr: world,
            state: LbBackendState::Active,
        }])
        .unwrap();
    let mut svc = fx.service(true, IPPROTO_TCP, vec![]);
    svc.slots = vec![20];
    fx.dp.upsert_lb_service(&svc).unwrap();
    let syn = tcp_packet(client(true, port), frontend(true), 0x02, A_FROM);
    let out = a.run(&syn).unwrap();
    assert_eq!(
        out.verdict,
        cilia_datapath::testrun::TC_ACT_OK,
        "to the stack"
    );
    assert_eq!(parse(&out.packet).1, world);
    let to_a = fx
        .dp
        .test_program_to_container(&EndpointConfig {
            ipv6: a6().octets(),
            ipv4: a4().octets(),
            mac: A_MAC,
            node_mac: A_NODE_MAC,
            ifindex: 4141,
            identity: 1001,
            endpoint_id: 1,
            enable_ipv4: 1,
            monitor: 1,
        })
        .unwrap();
    (to_a, world, out.packet)
}

#[test]
fn reply_from_the_stack_to_the_client_gets_the_frontend_as_source() {
    privileged!("lb_revnat_to_container");
    let fx = Fixture::new();
    let (to_a, world, _) = flow_to_a_backend_behind_the_stack(&fx, 40011);
    let reply = tcp_packet(world, client(true, 40011), 0x12, (A_NODE_MAC, A_MAC));
    let out = to_a.run(&reply).unwrap();
    assert_eq!(out.verdict, cilia_datapath::testrun::TC_ACT_OK);
    let (src, dst, ok) = parse(&out.packet);
    assert_eq!(src, frontend(true));
    assert_eq!(dst, client(true, 40011));
    assert!(ok, "checksums valid");
}

#[test]
fn icmp_error_of_the_backend_quotes_the_frontend_and_comes_from_it() {
    privileged!("lb_icmp_error_of_backend");
    let fx = Fixture::new();
    let (a, b) = (fx.program(1), fx.program(2));
    for v6 in [true, false] {
        for (proto, kind) in [
            (IPPROTO_UDP, IcmpError::PortUnreachable),
            (IPPROTO_TCP, IcmpError::TooBig(1280)),
        ] {
            fx.service(v6, proto, vec![10]);
            let sent = l4_packet(client(v6, 40020), frontend(v6), proto, 0x02, A_FROM);
            let at_b = a.run(&sent).unwrap();
            assert_eq!(at_b.verdict, TC_ACT_REDIRECT);
            // B's stack answers the packet it got: to the backend.
            let err = icmp_error(
                backend_addr(v6, true).ip(),
                client(v6, 0).ip(),
                kind,
                &at_b.packet[14..],
                B_FROM,
            );
            let out = b.run(&err).unwrap();
            let what = format!("v6 {v6} {kind:?}");
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}");
            assert_eq!(&out.packet[0..6], &A_MAC, "{what}: delivered to the client");
            let seen = read_icmp_error(&out.packet);
            assert_eq!(seen.src, frontend(v6).ip(), "{what}: from the frontend");
            assert_eq!(seen.dst, client(v6, 0).ip(), "{what}");
            assert_eq!(seen.quoted_src, client(v6, 40020), "{what}");
            assert_eq!(
                seen.quoted_dst,
                frontend(v6),
                "{what}: quoting what the client sent"
            );
            assert!(seen.checksums_ok(), "{what}: {seen:?}");
        }
    }
}

#[test]
fn icmp_error_of_a_router_on_the_path_keeps_its_source_and_quotes_the_frontend() {
    privileged!("lb_icmp_error_of_router");
    let fx = Fixture::new();
    let (to_a, _, sent) = flow_to_a_backend_behind_the_stack(&fx, 40021);
    let router: IpAddr = "2001:db8::1".parse().unwrap();
    let err = icmp_error(
        router,
        IpAddr::V6(a6()),
        IcmpError::TimeExceeded,
        &sent[14..],
        (A_NODE_MAC, A_MAC),
    );
    let out = to_a.run(&err).unwrap();
    assert_eq!(out.verdict, cilia_datapath::testrun::TC_ACT_OK);
    let seen = read_icmp_error(&out.packet);
    assert_eq!(seen.src, router, "the router's own address stays");
    assert_eq!(seen.quoted_src, client(true, 40021));
    assert_eq!(seen.quoted_dst, frontend(true));
    assert!(seen.checksums_ok(), "{seen:?}");
}

#[test]
fn reply_of_a_backend_on_another_node_gets_the_frontend_as_source_at_the_node() {
    privileged!("lb_revnat_from_netdev");
    let fx = Fixture::new();
    let remote: SocketAddr = "[fd00:c1a:2::7]:8080".parse().unwrap();
    let row = cilia_abi::IpcacheEntry {
        prefix: ipnet::IpNet::new(remote.ip(), 128).unwrap(),
        identity: 3000,
        tunnel: Some("198.51.100.2".parse().unwrap()),
    };
    fx.dp.upsert_ipcache_value(row.key(), row.value()).unwrap();
    fx.dp
        .set_node_config(&cilia_abi::NodeConfig {
            tunnel_mode: cilia_abi::TunnelMode::Native,
            tunnel_ifindex: 4300,
            underlay_ifindex: 4301,
            tunnel_port: 0,
        })
        .unwrap();
    fx.dp
        .upsert_lb_backends(&[LbBackend {
            id: 30,
            addr: remote,
            state: LbBackendState::Active,
        }])
        .unwrap();
    let mut svc = fx.service(true, IPPROTO_TCP, vec![]);
    svc.slots = vec![30];
    fx.dp.upsert_lb_service(&svc).unwrap();

    let syn = tcp_packet(client(true, 40012), frontend(true), 0x02, A_FROM);
    let out = fx.program(1).run(&syn).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed to the backend's node");
    assert_eq!(parse(&out.packet).1, remote);

    let netdev = fx
        .dp
        .test_node_program(cilia_datapath::object::PROG_FROM_NETDEV)
        .unwrap();
    let wire = ([0x0a, 0, 0, 0, 0, 0xef], [0x0a, 0, 0, 0, 0, 0xee]);
    let reply = tcp_packet(remote, client(true, 40012), 0x12, wire);
    let out = netdev.run(&reply).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(&out.packet[0..6], &A_MAC, "delivered to the client");
    let (src, dst, ok) = parse(&out.packet);
    assert_eq!(src, frontend(true));
    assert_eq!(dst, client(true, 40012));
    assert!(ok, "checksums valid");
}

#[test]
fn backend_selection_emits_a_service_event_naming_frontend_and_backend() {
    privileged!("lb_service_event");
    let mut fx = Fixture::new();
    let mut rb = fx.dp.take_events().unwrap();
    fx.dp
        .set_monitor_level(cilia_abi::CILIA_MONITOR_DROPS)
        .unwrap();
    let a = fx.program(1);
    fx.service(false, IPPROTO_TCP, vec![10]);
    let syn = tcp_packet(client(false, 40013), frontend(false), 0x02, A_FROM);
    let ack = tcp_packet(client(false, 40013), frontend(false), 0x10, A_FROM);
    a.run(&syn).unwrap();
    a.run(&ack).unwrap();
    let events: Vec<_> = common::fixture::drain_events(&mut rb)
        .into_iter()
        .filter(|e| e.type_ == cilia_abi::CILIA_EVENT_SERVICE)
        .collect();
    assert_eq!(events.len(), 1, "one selection, one event");
    let e = &events[0];
    assert_eq!(e.rule, 7, "the rev-NAT id");
    assert_eq!(&e.saddr[..4], &vip4().octets(), "source: the frontend");
    assert_eq!(u16::from_be(e.sport), VIP_PORT);
    assert_eq!(&e.daddr[..4], &b4().octets(), "destination: the backend");
    assert_eq!(u16::from_be(e.dport), BACKEND_PORT);
    assert_eq!(
        (e.endpoint_id, e.src_identity, e.dst_identity),
        (1, 1001, 1002)
    );
}

#[test]
fn ipv4_udp_without_checksum_stays_without_after_dnat() {
    privileged!("lb_udp_no_checksum");
    let fx = Fixture::new();
    fx.service(false, IPPROTO_UDP, vec![10]);
    // The builder leaves the UDP checksum 0: "none" over IPv4.
    let pkt = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IP,
        &ipv4(a4(), vip4(), IPPROTO_UDP, 64, &udp(40014, VIP_PORT, b"x")),
    );
    let out = fx.program(1).run(&pkt).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(&out.packet[34 + 6..34 + 8], &[0, 0], "still no checksum");
    assert_eq!(
        checksum(&out.packet[14..34]),
        0,
        "IPv4 header checksum valid"
    );
    assert_eq!(parse(&out.packet).1, backend_addr(false, true));
}

#[test]
fn frontend_without_backend_drops_with_no_backend() {
    privileged!("lb_no_backend");
    let fx = Fixture::new();
    let a = fx.program(1);
    for v6 in [true, false] {
        fx.service(v6, IPPROTO_UDP, vec![]);
        let out = a
            .run(&udp_packet(client(v6, 40002), frontend(v6), A_FROM))
            .unwrap();
        assert_eq!(out.verdict, TC_ACT_SHOT);
    }
    assert_eq!(drops(&fx.dp, CILIA_DROP_NO_BACKEND), 2);
}

#[test]
fn terminating_backend_keeps_its_pinned_flow_but_gets_no_new_one() {
    privileged!("lb_terminating");
    let fx = Fixture::new();
    let a = fx.program(1);
    let mut svc = fx.service(true, IPPROTO_TCP, vec![10]);
    let syn = tcp_packet(client(true, 40003), frontend(true), 0x02, A_FROM);
    assert_eq!(
        parse(&a.run(&syn).unwrap().packet).1,
        backend_addr(true, true)
    );

    let mut terminating = backend(10, IpAddr::V6(b6()));
    terminating.state = LbBackendState::Terminating;
    fx.dp.upsert_lb_backends(&[terminating]).unwrap();
    svc.slots = vec![11];
    fx.dp.upsert_lb_service(&svc).unwrap();

    let ack = tcp_packet(client(true, 40003), frontend(true), 0x10, A_FROM);
    let out = a.run(&ack).unwrap();
    assert_eq!(
        parse(&out.packet).1,
        backend_addr(true, true),
        "pinned flow stays"
    );
    for port in 41000..41010 {
        let syn = tcp_packet(client(true, port), frontend(true), 0x02, A_FROM);
        let out = a.run(&syn).unwrap();
        assert_eq!(
            parse(&out.packet).1,
            backend_addr(true, false),
            "new flows: C only"
        );
    }
}

#[test]
fn flow_pinned_to_a_deleted_backend_is_selected_anew() {
    privileged!("lb_deleted_backend");
    let fx = Fixture::new();
    let a = fx.program(1);
    let mut svc = fx.service(false, IPPROTO_UDP, vec![10]);
    let pkt = udp_packet(client(false, 40004), frontend(false), A_FROM);
    assert_eq!(
        parse(&a.run(&pkt).unwrap().packet).1,
        backend_addr(false, true)
    );

    svc.slots = vec![11];
    fx.dp.upsert_lb_service(&svc).unwrap();
    fx.dp.remove_lb_backends(&[10]).unwrap();
    let out = a.run(&pkt).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        parse(&out.packet).1,
        backend_addr(false, false),
        "re-selected: C"
    );
    let ct = fx.dp.list_ct().unwrap();
    let pin = ct
        .iter()
        .find(|(k, v)| {
            cilia_abi::CtEntry::decode(k, v)
                .is_some_and(|e| e.service && e.destination.port() == VIP_PORT)
        })
        .expect("service entry");
    assert_eq!(pin.1.backend_id, 11, "the pin follows the new backend");
    assert_eq!(pin.1.rev_nat, 7);
}

/// A flow's packets of both directions share one conntrack key, so a
/// packet *from* a frontend address to a client's port is the reverse of
/// that client's pin. Pins have keys of their own (`CILIA_CT_KEY_SERVICE`):
/// such a packet (a forged source, from the node's stack) starts a flow of
/// its own, and the client's flow stays pinned to its backend.
#[test]
fn a_packet_from_a_frontend_to_a_pinned_client_port_leaves_the_pin_alone() {
    privileged!("lb_pin_reverse_tuple");
    let fx = Fixture::new();
    let (a, to_a) = (fx.program(1), fx.to_container(1));
    let mut svc = fx.service(true, IPPROTO_UDP, vec![10]);
    let out = udp_packet(client(true, 40005), frontend(true), A_FROM);
    assert_eq!(
        parse(&a.run(&out).unwrap().packet).1,
        backend_addr(true, true)
    );
    let forged = udp_packet(frontend(true), client(true, 40005), (A_NODE_MAC, A_MAC));
    assert_eq!(to_a.run(&forged).unwrap().verdict, TC_ACT_OK);
    let entries: Vec<CtEntry> = fx
        .dp
        .list_ct()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| CtEntry::decode(k, v))
        .collect();
    let pin = entries
        .iter()
        .find(|e| e.service)
        .expect("the client's pin");
    assert_eq!(
        (pin.source, pin.destination),
        (client(true, 40005), frontend(true))
    );
    assert_eq!(pin.backend_id, 10);
    assert!(
        entries.iter().any(|e| !e.service
            && e.source == frontend(true)
            && e.destination == client(true, 40005)),
        "the forged packet's flow is an entry of its own: {entries:?}"
    );
    // A new selection would now pick C: the pinned flow still goes to B.
    svc.slots = vec![11];
    fx.dp.upsert_lb_service(&svc).unwrap();
    assert_eq!(
        parse(&a.run(&out).unwrap().packet).1,
        backend_addr(true, true),
        "still pinned"
    );
}

/// The service loopback address of the family (CILIA_LB_LOOPBACK_*).
fn loopback(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(
            u128::from(CILIA_LB_LOOPBACK_IPV6_HI) << 64 | u128::from(CILIA_LB_LOOPBACK_IPV6_LO),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::from(CILIA_LB_LOOPBACK_IPV4))
    }
}

/// The frontend's only backend is client A itself (backend 12, port 8080).
fn hairpin_service(fx: &Fixture, v6: bool, proto: u8) {
    fx.dp
        .upsert_lb_backends(&[backend(12, client(v6, 0).ip())])
        .unwrap();
    let mut svc = fx.service(v6, proto, vec![]);
    svc.slots = vec![12];
    fx.dp.upsert_lb_service(&svc).unwrap();
}

#[test]
fn hairpin_flow_comes_back_from_the_service_loopback_and_its_reply_from_the_frontend() {
    privileged!("lb_hairpin");
    let fx = Fixture::new();
    let a = fx.program(1);
    for v6 in [true, false] {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            hairpin_service(&fx, v6, proto);
            let what = format!("v6 {v6} proto {proto}");
            let own = SocketAddr::new(client(v6, 0).ip(), BACKEND_PORT);
            let sent = l4_packet(client(v6, 40030), frontend(v6), proto, 0x02, A_FROM);
            let out = a.run(&sent).unwrap();
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}");
            assert_eq!(&out.packet[0..6], &A_MAC, "{what}: back into A");
            let (src, dst, ok) = parse(&out.packet);
            assert_eq!(
                src,
                SocketAddr::new(loopback(v6), 40030),
                "{what}: from the service loopback, the client's port kept"
            );
            assert_eq!(dst, own, "{what}: to the backend, A itself");
            assert!(ok, "{what}: checksums valid");

            let reply = l4_packet(own, src, proto, 0x12, A_FROM);
            let out = a.run(&reply).unwrap();
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}: reply");
            assert_eq!(&out.packet[0..6], &A_MAC, "{what}: reply into A");
            let (src, dst, ok) = parse(&out.packet);
            assert_eq!(src, frontend(v6), "{what}: the client sees the frontend");
            assert_eq!(dst, client(v6, 40030), "{what}");
            assert!(ok, "{what}: checksums valid");
        }
    }
}

#[test]
fn fragment_to_a_frontend_is_dropped() {
    privileged!("lb_fragment");
    let fx = Fixture::new();
    let a = fx.program(1);
    fx.service(false, IPPROTO_UDP, vec![10]);
    let mut pkt = udp_packet(client(false, 40005), frontend(false), A_FROM);
    // More fragments follow: the first fragment of a datagram.
    pkt[14 + 6] = 0x20;
    pkt[14 + 10] = 0;
    pkt[14 + 11] = 0;
    let sum = checksum(&pkt[14..34]);
    pkt[24..26].copy_from_slice(&sum.to_be_bytes());
    assert_eq!(a.run(&pkt).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_LB_FRAGMENT), 1);
}

#[test]
fn service_update_flips_generation_and_reads_back_whole() {
    privileged!("lb_generation_flip");
    let fx = Fixture::new();
    let mut svc = fx.service(true, IPPROTO_TCP, vec![10, 11]);
    assert_eq!(fx.dp.lb_services().unwrap(), vec![svc.clone()]);
    for slots in [vec![11], vec![11, 10, 11], vec![], vec![10]] {
        svc.slots = slots;
        fx.dp.upsert_lb_service(&svc).unwrap();
        assert_eq!(fx.dp.lb_services().unwrap(), vec![svc.clone()]);
    }
    fx.dp.remove_lb_service(&svc.frontend, svc.rev_nat).unwrap();
    assert!(fx.dp.lb_services().unwrap().is_empty());
    fx.dp.remove_lb_service(&svc.frontend, svc.rev_nat).unwrap();
}

/// The frontend filter (`CILIA_ADDR_FILTER_WORDS` in abi.h): the bit of
/// every frontend's address, the datapath computing the same bit (it finds
/// every frontend), kept while a frontend is on it, and rebuilt from the
/// services when the maps are opened again.
#[test]
fn the_frontend_filter_has_the_bit_of_every_frontend_and_the_datapath_agrees() {
    privileged!("lb_filter");
    let fx = Fixture::new();
    let a = fx.program(1);
    fx.dp
        .upsert_lb_backends(&[backend(10, IpAddr::V6(b6())), backend(20, IpAddr::V4(b4()))])
        .unwrap();
    // 200 frontend addresses of each family, spread over their prefixes;
    // the first has a second frontend on another port.
    let addrs = spread_addrs(200, [0xfd00, 0x5e], 0x0a60_0000, 0x000f_ffff, 0);
    let service = |rev_nat: u16, addr: IpAddr, port: u16| LbService {
        rev_nat,
        frontend: LbFrontend {
            addr,
            port,
            proto: IPPROTO_TCP,
        },
        algorithm: LbAlgorithm::Random,
        affinity_timeout: None,
        slots: vec![if addr.is_ipv6() { 10 } else { 20 }],
        maglev: None,
        flags: Default::default(),
    };
    let mut services: Vec<LbService> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| service(i as u16 + 1, *addr, VIP_PORT))
        .collect();
    services.push(service(1000, addrs[0], VIP_PORT + 1));
    for s in &services {
        fx.dp.upsert_lb_service(s).unwrap();
    }
    let bits = |services: &[LbService]| {
        let mut bits: Vec<u32> = services
            .iter()
            .map(|s| addr_filter_bit(s.frontend.addr))
            .collect();
        bits.sort_unstable();
        bits.dedup();
        bits
    };
    assert_eq!(fx.dp.lb_filter_bits().unwrap(), bits(&services));
    let translated = |s: &LbService, port: u16| {
        let v6 = s.frontend.addr.is_ipv6();
        let to = SocketAddr::new(s.frontend.addr, s.frontend.port);
        let out = a
            .run(&tcp_packet(client(v6, port), to, 0x02, A_FROM))
            .unwrap();
        out.verdict == TC_ACT_REDIRECT && parse(&out.packet).1 == backend_addr(v6, true)
    };
    for (i, s) in services.iter().enumerate() {
        assert!(translated(s, 20000 + i as u16), "{:?}", s.frontend);
    }

    // The first address keeps its bit while one of its frontends is left.
    let second = services.pop().unwrap();
    let first = services.remove(0);
    fx.dp
        .remove_lb_service(&first.frontend, first.rev_nat)
        .unwrap();
    assert_eq!(
        fx.dp.lb_filter_bits().unwrap(),
        bits(&[&services[..], std::slice::from_ref(&second)].concat())
    );
    assert!(
        translated(&second, 30000),
        "the other frontend on the address"
    );
    fx.dp
        .remove_lb_service(&second.frontend, second.rev_nat)
        .unwrap();
    assert_eq!(fx.dp.lb_filter_bits().unwrap(), bits(&services));
    assert!(
        !translated(&second, 30001),
        "no frontend left on the address"
    );

    // Opened again on filter words all zero: rebuilt from the services.
    zero_filter(fx._root.path(), "cilia_lb_filter");
    assert!(fx.dp.lb_filter_bits().unwrap().is_empty());
    let again = BpfDatapath::open(fx._root.path()).unwrap();
    assert_eq!(again.lb_filter_bits().unwrap(), bits(&services));
    for (i, s) in services.iter().enumerate() {
        assert!(translated(s, 40000 + i as u16), "{:?}", s.frontend);
    }
}

#[test]
fn service_naming_an_unknown_backend_or_other_family_is_refused() {
    privileged!("lb_refused");
    let fx = Fixture::new();
    let mut svc = fx.service(true, IPPROTO_TCP, vec![10]);
    svc.slots = vec![99];
    let err = fx.dp.upsert_lb_service(&svc).unwrap_err().to_string();
    assert!(err.contains("backend 99"), "{err}");
    fx.dp
        .upsert_lb_backends(&[backend(12, IpAddr::V4(b4()))])
        .unwrap();
    svc.slots = vec![12];
    let err = fx.dp.upsert_lb_service(&svc).unwrap_err().to_string();
    assert!(err.contains("family"), "{err}");
}

#[test]
fn maglev_table_of_the_configured_size_is_swapped_in_and_used() {
    privileged!("lb_maglev");
    let fx = Fixture::new();
    let a = fx.program(1);
    // Smaller than the map's template: BPF_F_INNER_MAP lets it differ.
    fx.dp.set_maglev_size(1021).unwrap();
    let mut svc = fx.service(true, IPPROTO_TCP, vec![10, 11]);
    svc.algorithm = LbAlgorithm::Maglev;
    svc.maglev = Some(vec![11; 1021]);
    fx.dp.upsert_lb_service(&svc).unwrap();
    assert_eq!(fx.dp.lb_services().unwrap(), vec![svc.clone()]);
    for port in 42000..42010 {
        let syn = tcp_packet(client(true, port), frontend(true), 0x02, A_FROM);
        assert_eq!(
            parse(&a.run(&syn).unwrap().packet).1,
            backend_addr(true, false)
        );
    }
    // A table of another size than the datapath's is refused.
    svc.maglev = Some(vec![11; 16381]);
    assert!(fx.dp.upsert_lb_service(&svc).is_err());
    // Back to random: the table goes.
    svc.algorithm = LbAlgorithm::Random;
    svc.maglev = None;
    fx.dp.upsert_lb_service(&svc).unwrap();
    assert_eq!(fx.dp.lb_services().unwrap(), vec![svc]);
}

// ---- real traffic: a client and three backend endpoints in namespaces ----

use std::net::UdpSocket;
use std::time::Duration;

use cilia_abi::{Direction, EndpointPolicy, Enforcement, PolicyEntry, Verdict};
use cilia_testnet::Netns;
use common::serve::{exchange, Echo, Serving};

const CLIENT_ID: u16 = 1;

/// The node with its router addresses, client endpoint 1 (A's addresses)
/// and backend endpoints 2..=4 (identities 2002..=2004), all attached.
struct Topology {
    _node: Netns,
    client: Netns,
    backends: Vec<(Netns, Ipv6Addr, Ipv4Addr)>,
    dp: BpfDatapath,
    // Dropped last: the links pinned in it keep the programs attached.
    _root: BpfRoot,
}

fn mac_text(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn topology(prefix: &str) -> Topology {
    let root = BpfRoot::new();
    let node = Netns::new(&format!("{prefix}n")).unwrap();
    node.sh(&format!(
        "set -e
         ip link add cilia_host type veth peer name cilia_net
         ip link set cilia_host up; ip link set cilia_net up
         ip addr add {gw6}/128 dev cilia_host nodad; ip addr add {gw4}/32 dev cilia_host",
        gw6 = gw6(),
        gw4 = gw4(),
    ))
    .unwrap();
    let dp = BpfDatapath::open(root.path()).unwrap();
    let client = Netns::new(&format!("{prefix}c")).unwrap();
    let mut backends = Vec::new();
    for id in 1u16..=4 {
        let ns = if id == CLIENT_ID {
            None
        } else {
            Some(Netns::new(&format!("{prefix}{id}")).unwrap())
        };
        let (v6, v4): (Ipv6Addr, Ipv4Addr) = if id == CLIENT_ID {
            (a6(), a4())
        } else {
            (
                format!("fd00:c1::{:x}", 0x20 + id).parse().unwrap(),
                Ipv4Addr::new(10, 200, 0, 20 + id as u8),
            )
        };
        let m: Mac = [0x0a, 0, 0, 0, id as u8, 1];
        let node_m: Mac = [0x0a, 0, 0, 0, id as u8, 2];
        let host_if = format!("lxc{prefix}{id}");
        let ns_ref = ns.as_ref().unwrap_or(&client);
        node.sh(&format!(
            "set -e
             ip link add {host_if} address {hm} type veth peer name eth0 address {em} netns {ns}
             ip link set {host_if} up
             ip route add {v6}/128 dev {host_if}; ip route add {v4}/32 dev {host_if}",
            hm = mac_text(node_m),
            em = mac_text(m),
            ns = ns_ref.name(),
        ))
        .unwrap();
        ns_ref
            .sh(&format!(
                "set -e
             ip addr add {v6}/128 dev eth0 nodad; ip addr add {v4}/32 dev eth0
             ip link set eth0 up; ip link set lo up
             ip -6 route add {gw6}/128 dev eth0; ip -6 route add default via {gw6} dev eth0
             ip route add {gw4}/32 dev eth0; ip route add default via {gw4} dev eth0",
                gw6 = gw6(),
                gw4 = gw4(),
            ))
            .unwrap();
        let ifindex = node.run(|| nix::net::if_::if_nametoindex(host_if.as_str()).unwrap());
        let identity = 2000 + u32::from(id);
        let config = EndpointConfig {
            ipv6: v6.octets(),
            ipv4: v4.octets(),
            mac: m,
            node_mac: node_m,
            ifindex,
            identity,
            endpoint_id: id,
            enable_ipv4: 1,
            monitor: 1,
        };
        node.run(|| dp.attach_endpoint(&config, &host_if)).unwrap();
        let info = EndpointInfo {
            ifindex,
            identity,
            endpoint_id: id,
            flags: 0,
            mac: m,
            node_mac: node_m,
        };
        dp.upsert_endpoint(IpAddr::V6(v6), info).unwrap();
        dp.upsert_endpoint(IpAddr::V4(v4), info).unwrap();
        dp.set_policy(info.endpoint_id, &Default::default())
            .unwrap(); // empty: nothing selects it
        if let Some(ns) = ns {
            backends.push((ns, v6, v4));
        }
    }
    Topology {
        _node: node,
        client,
        backends,
        dp,
        _root: root,
    }
}

impl Topology {
    /// Backends 100.. (IPv6) or 200.. (IPv4), one per backend endpoint,
    /// and service 9 (IPv6) or 10 (IPv4) on `vip`:80/`proto` over them.
    fn service(&self, vip: IpAddr, proto: u8, configure: impl FnOnce(&mut LbService)) {
        let backends: Vec<LbBackend> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, (_, v6, v4))| {
                let ip = if vip.is_ipv6() {
                    IpAddr::V6(*v6)
                } else {
                    IpAddr::V4(*v4)
                };
                backend(if vip.is_ipv6() { 100 } else { 200 } + i as u32, ip)
            })
            .collect();
        self.dp.upsert_lb_backends(&backends).unwrap();
        let mut svc = LbService {
            rev_nat: if vip.is_ipv6() { 9 } else { 10 },
            frontend: LbFrontend {
                addr: vip,
                port: VIP_PORT,
                proto,
            },
            algorithm: LbAlgorithm::Random,
            affinity_timeout: None,
            slots: backends.iter().map(|b| b.id).collect(),
            maglev: None,
            flags: Default::default(),
        };
        configure(&mut svc);
        self.dp.upsert_lb_service(&svc).unwrap();
    }
}

/// A UDP echo on [::]:8080 answering every datagram with `name`.
fn udp_echo(ns: &Netns, name: u8) -> Serving {
    Serving::start(
        ns,
        || {
            let s = UdpSocket::bind(SocketAddr::from(([0u16; 8], BACKEND_PORT))).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        },
        move |s| {
            let mut buf = [0u8; 64];
            while let Ok((_, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&[name], peer);
            }
        },
    )
}

/// A TCP echo on port 8080 in every backend, for the whole test (binding
/// the port again right after closing it would race with the kernel's
/// teardown of the last connections).
fn echoes(t: &Topology) -> Vec<Echo> {
    t.backends
        .iter()
        .map(|(ns, _, _)| Echo::start(ns, &[BACKEND_PORT]))
        .collect()
}

/// TCP connections to the VIP: each must be answered by its echo; the
/// backends' servers count who got which. Returns the per-backend counts
/// of these connections.
fn tcp_spread(t: &Topology, echoes: &[Echo], vip: IpAddr, conns: usize) -> Vec<usize> {
    let before: Vec<usize> = echoes.iter().map(|e| e.peers().len()).collect();
    for i in 0..conns {
        let (local, answer) = exchange(&t.client, SocketAddr::new(vip, VIP_PORT), b"ping", WAIT)
            .unwrap_or_else(|e| panic!("connection {i} to the VIP: {e}"));
        assert_eq!(answer, b"ping");
        assert_eq!(local.ip().to_canonical(), client(vip.is_ipv6(), 0).ip());
    }
    echoes
        .iter()
        .zip(before)
        .map(|(e, b)| e.peers().len() - b)
        .collect()
}

/// UDP datagrams to the VIP from fresh sockets, connected to the VIP (so
/// only an answer whose source is the VIP is received). Returns the
/// per-backend counts.
fn udp_spread(t: &Topology, vip: IpAddr, datagrams: usize) -> Vec<usize> {
    let _servers: Vec<Serving> = t
        .backends
        .iter()
        .enumerate()
        .map(|(i, (ns, _, _))| udp_echo(ns, i as u8))
        .collect();
    let mut counts = vec![0; t.backends.len()];
    for _ in 0..datagrams {
        let name = t.client.run(|| {
            let bind: SocketAddr = if vip.is_ipv6() {
                "[::]:0".parse().unwrap()
            } else {
                "0.0.0.0:0".parse().unwrap()
            };
            let s = UdpSocket::bind(bind).unwrap();
            s.connect(SocketAddr::new(vip, VIP_PORT)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.send(b"ping").unwrap();
            let mut buf = [0u8; 8];
            let n = s.recv(&mut buf).expect("an answer from the VIP");
            assert_eq!(n, 1);
            buf[0]
        });
        counts[usize::from(name)] += 1;
    }
    counts
}

fn vips() -> [IpAddr; 2] {
    [IpAddr::V6(vip6()), IpAddr::V4(vip4())]
}

#[test]
fn tcp_to_a_vip_spreads_over_three_backends_and_the_client_sees_the_vip() {
    privileged!("lb_tcp_traffic");
    let t = topology("lbt");
    let echoes = echoes(&t);
    for vip in vips() {
        t.service(vip, IPPROTO_TCP, |_| {});
        // A connection that completed proves the SYN-ACK came from the VIP.
        let counts = tcp_spread(&t, &echoes, vip, 24);
        assert!(counts.iter().all(|&n| n > 0), "{vip}: spread {counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), 24);
    }
}

#[test]
fn udp_to_a_vip_spreads_over_three_backends_and_replies_come_from_the_vip() {
    privileged!("lb_udp_traffic");
    let t = topology("lbu");
    for vip in vips() {
        t.service(vip, IPPROTO_UDP, |_| {});
        let counts = udp_spread(&t, vip, 24);
        assert!(counts.iter().all(|&n| n > 0), "{vip}: spread {counts:?}");
    }
}

#[test]
fn client_affinity_sends_every_connection_to_one_backend() {
    privileged!("lb_affinity_traffic");
    let t = topology("lba");
    let echoes = echoes(&t);
    for vip in vips() {
        t.service(vip, IPPROTO_TCP, |s| s.affinity_timeout = Some(60));
        let counts = tcp_spread(&t, &echoes, vip, 10);
        assert_eq!(
            counts.iter().filter(|&&n| n > 0).count(),
            1,
            "{vip}: {counts:?}"
        );
    }
}

#[test]
fn maglev_service_spreads_by_its_table() {
    privileged!("lb_maglev_traffic");
    let t = topology("lbm");
    t.dp.set_maglev_size(1021).unwrap();
    for vip in vips() {
        t.service(vip, IPPROTO_UDP, |s| {
            s.algorithm = LbAlgorithm::Maglev;
            // Any table naming every slot does for the datapath; the real
            // one comes from cilia-lb.
            s.maglev = Some((0..1021).map(|i| s.slots[i % s.slots.len()]).collect());
        });
        let counts = udp_spread(&t, vip, 24);
        assert!(counts.iter().all(|&n| n > 0), "{vip}: spread {counts:?}");
    }
}

#[test]
fn policy_applies_to_the_backend_identity() {
    privileged!("lb_policy_traffic");
    let t = topology("lbp");
    // The client may reach the first two backends' identities on the
    // backend port, not the third's.
    let entry = |identity: u32| PolicyEntry {
        direction: Direction::Egress,
        identity,
        proto: IPPROTO_TCP,
        port: BACKEND_PORT,
        port_prefix_len: 16,
        verdict: Verdict::Allow,
        rule: 1,
        proxy_port: 0,
    };
    let policy = EndpointPolicy {
        enforcement: Enforcement {
            ingress: false,
            egress: true,
            audit: false,
        },
        entries: vec![entry(2002), entry(2003)],
    };
    t.dp.set_policy(CLIENT_ID, &policy.encode()).unwrap();
    let vip = IpAddr::V4(vip4());
    t.service(vip, IPPROTO_TCP, |_| {});
    let echoes = echoes(&t);
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..12 {
        match exchange(
            &t.client,
            SocketAddr::new(vip, VIP_PORT),
            b"ping",
            Duration::from_millis(300),
        ) {
            Ok(_) => ok += 1,
            Err(_) => refused += 1,
        }
    }
    let counts: Vec<usize> = echoes.iter().map(|e| e.peers().len()).collect();
    assert_eq!(counts[2], 0, "the denied backend got nothing: {counts:?}");
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    assert!(drops(&t.dp, cilia_abi::CILIA_DROP_POLICY) > 0);
}

#[test]
fn a_closed_udp_port_behind_a_vip_refuses_the_client_through_the_vip() {
    privileged!("lb_icmp_traffic");
    let t = topology("lbi");
    // No backend listens on UDP: each answers with a port unreachable,
    // which the client's socket only takes when it quotes the VIP.
    for vip in vips() {
        t.service(vip, IPPROTO_UDP, |_| {});
        let err = t.client.run(|| {
            let bind: SocketAddr = if vip.is_ipv6() {
                "[::]:0".parse().unwrap()
            } else {
                "0.0.0.0:0".parse().unwrap()
            };
            let s = UdpSocket::bind(bind).unwrap();
            s.connect(SocketAddr::new(vip, VIP_PORT)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.send(b"anyone?").unwrap();
            let mut buf = [0u8; 8];
            s.recv(&mut buf).expect_err("nobody answers")
        });
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{vip}: refused at once, not a timeout: {err}"
        );
    }
}

#[test]
fn a_client_that_is_its_own_backend_reaches_itself_through_the_vip() {
    privileged!("lb_hairpin_traffic");
    let t = topology("lbh");
    let echo = Echo::start(&t.client, &[BACKEND_PORT]);
    for (vip, rev_nat, id) in [(IpAddr::V6(vip6()), 9, 300), (IpAddr::V4(vip4()), 10, 301)] {
        let v6 = vip.is_ipv6();
        t.dp.upsert_lb_backends(&[backend(id, client(v6, 0).ip())])
            .unwrap();
        t.dp.upsert_lb_service(&LbService {
            rev_nat,
            frontend: LbFrontend {
                addr: vip,
                port: VIP_PORT,
                proto: IPPROTO_TCP,
            },
            algorithm: LbAlgorithm::Random,
            affinity_timeout: None,
            slots: vec![id],
            maglev: None,
            flags: Default::default(),
        })
        .unwrap();
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let (local, back) = exchange(&t.client, SocketAddr::new(vip, VIP_PORT), &payload, WAIT)
            .unwrap_or_else(|e| panic!("{vip}: hairpin connection: {e}"));
        assert_eq!(back, payload, "{vip}");
        let peer = *echo.peers().last().unwrap();
        assert_eq!(
            (peer.ip().to_canonical(), peer.port()),
            (loopback(v6), local.port()),
            "{vip}: the server sees the service loopback address and the client's port"
        );
    }
}
