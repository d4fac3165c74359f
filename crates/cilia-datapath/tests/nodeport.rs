//! NodePort: external clients reach a service on the node's underlay
//! address. Crafted packets through `cil_from_netdev` and the backend's
//! `cil_from_container` with `BPF_PROG_TEST_RUN` (DNAT to a local backend,
//! SNAT to a remote one, both replies translated back, the traffic policy
//! Local, everything else untouched), then real traffic between a "world"
//! namespace and two nodes joined by a bridge, in VXLAN and native mode.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use cilia_abi::*;
use cilia_datapath::object::PROG_FROM_NETDEV;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{TestProgram, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use cilia_datapath::{BpfDatapath, NodePortOptions};
use cilia_testnet::{BpfRoot, Netns};

mod common;
use common::fixture::{B_ID, B_IDENTITY};
use common::icmp::{icmp_error, read_icmp_error, IcmpError};
use common::l4::{parse, tcp_packet};
use common::serve::{exchange, Echo};
use common::*;

const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;
const REV_NAT: u16 = 9;
const LOCAL_BACKEND: u32 = 10;
const REMOTE_BACKEND: u32 = 20;
const REMOTE_IDENTITY: u32 = 3000;
const B_FROM: (Mac, Mac) = (B_MAC, B_NODE_MAC);
const SNAT: NodePortOptions = NodePortOptions {
    external_local: false,
    dsr: false,
};
const LOCAL: NodePortOptions = NodePortOptions {
    external_local: true,
    dsr: false,
};
const DSR: NodePortOptions = NodePortOptions {
    external_local: false,
    dsr: true,
};
const WIRE: (Mac, Mac) = ([0x0a, 0, 0, 0, 0, 0xef], [0x0a, 0, 0, 0, 0, 0xee]);

fn node_addr(v6: bool, n: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x100,
            0,
            0,
            0,
            0,
            u16::from(n),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, n))
    }
}
/// The NodePort at this node's (node 1's) address.
fn node_port(v6: bool) -> SocketAddr {
    SocketAddr::new(node_addr(v6, 1), NODE_PORT)
}
/// The world client: a documentation address on the underlay's subnet.
fn world(v6: bool, port: u16) -> SocketAddr {
    SocketAddr::new(node_addr(v6, 200), port)
}
fn remote_pod(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6("fd00:c1a:2::10".parse().unwrap())
    } else {
        IpAddr::V4("10.200.2.10".parse().unwrap())
    }
}
fn local_pod(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(b6())
    } else {
        IpAddr::V4(b4())
    }
}
fn any(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

fn nodeport_service(v6: bool, slots: Vec<u32>) -> LbService {
    LbService {
        rev_nat: REV_NAT,
        frontend: LbFrontend {
            addr: any(v6),
            port: NODE_PORT,
            proto: IPPROTO_TCP,
        },
        algorithm: LbAlgorithm::Random,
        affinity_timeout: None,
        slots,
        maglev: None,
        flags: Default::default(),
    }
}

/// Node 1 (198.51.100.1, 2001:db8:100::1) with endpoint B, a remote pod on
/// node 2, and the backends B (local) and the remote pod (remote).
struct Fixture {
    _root: BpfRoot,
    dp: BpfDatapath,
}

impl Fixture {
    fn new(mode: TunnelMode, v6: bool) -> Self {
        let root = BpfRoot::new();
        let dp = BpfDatapath::open(root.path()).expect("open datapath");
        let info = EndpointInfo {
            ifindex: 4142,
            identity: B_IDENTITY,
            endpoint_id: B_ID,
            flags: 0,
            mac: B_MAC,
            node_mac: B_NODE_MAC,
        };
        dp.upsert_endpoint(IpAddr::V6(b6()), info).unwrap();
        dp.upsert_endpoint(IpAddr::V4(b4()), info).unwrap();
        dp.set_policy(info.endpoint_id, &Default::default())
            .unwrap(); // empty: nothing selects it
        for v6 in [false, true] {
            for row in [
                IpcacheEntry {
                    prefix: node_addr(v6, 1).into(),
                    identity: CILIA_ID_HOST,
                    tunnel: None,
                },
                IpcacheEntry {
                    prefix: node_addr(v6, 2).into(),
                    identity: CILIA_ID_REMOTE_NODE,
                    tunnel: None,
                },
                IpcacheEntry {
                    prefix: remote_pod(v6).into(),
                    identity: REMOTE_IDENTITY,
                    tunnel: Some(node_addr(v6, 2)),
                },
            ] {
                dp.upsert_ipcache_value(row.key(), row.value()).unwrap();
            }
        }
        dp.publish_nodes(&[node_addr(false, 2), node_addr(true, 2)])
            .unwrap();
        dp.set_node_config(&NodeConfig {
            tunnel_mode: mode,
            tunnel_ifindex: 4300,
            underlay_ifindex: 4301,
            tunnel_port: if mode == TunnelMode::Vxlan { 8472 } else { 0 },
        })
        .unwrap();
        dp.upsert_lb_backends(&[
            LbBackend {
                id: LOCAL_BACKEND,
                addr: SocketAddr::new(local_pod(v6), BACKEND_PORT),
                state: LbBackendState::Active,
            },
            LbBackend {
                id: REMOTE_BACKEND,
                addr: SocketAddr::new(remote_pod(v6), BACKEND_PORT),
                state: LbBackendState::Active,
            },
        ])
        .unwrap();
        Self { _root: root, dp }
    }

    /// A node (native routing) serving the NodePort service over `slots`.
    fn serving(v6: bool, slots: Vec<u32>, options: NodePortOptions) -> Self {
        let fx = Self::new(TunnelMode::Native, v6);
        fx.dp
            .upsert_nodeport_service(&nodeport_service(v6, slots), options)
            .unwrap();
        fx
    }

    fn netdev(&self) -> TestProgram {
        self.dp.test_node_program(PROG_FROM_NETDEV).unwrap()
    }

    /// Asserts that conntrack holds the NodePort service's flow, from world.
    fn assert_service_flow_from_world(&self, v6: bool) {
        let ct = self.dp.list_ct().unwrap();
        assert!(
            ct.iter()
                .any(|(_, v)| v.rev_nat == REV_NAT && v.src_identity == CILIA_ID_WORLD),
            "v6={v6}: the flow is tracked with its service, from world: {ct:?}"
        );
    }

    fn b(&self) -> TestProgram {
        let cfg = EndpointConfig {
            ipv6: b6().octets(),
            ipv4: b4().octets(),
            mac: B_MAC,
            node_mac: B_NODE_MAC,
            ifindex: 4142,
            identity: B_IDENTITY,
            endpoint_id: B_ID,
            enable_ipv4: 1,
            monitor: 1,
        };
        self.dp.test_program(&cfg).unwrap()
    }
}

/// The local backend B's SYN-ACK to the world client's `port`.
fn syn_ack_of_b(v6: bool, port: u16) -> Vec<u8> {
    tcp_packet(
        SocketAddr::new(local_pod(v6), BACKEND_PORT),
        world(v6, port),
        0x12,
        B_FROM,
    )
}

/// The frontend a DSR packet carries (the format of CILIA_DSR_* in abi.h).
fn dsr_frontend(pkt: &[u8]) -> Option<SocketAddr> {
    let ethertype = u16::from_be_bytes([pkt[12], pkt[13]]);
    if ethertype == ETH_P_IPV6 {
        let h = &pkt[54..];
        (pkt[20] == 60 && h[1] == 2 && h[2] == CILIA_DSR_IPV6_OPT && h[3] == 18).then(|| {
            let a: [u8; 16] = h[6..22].try_into().unwrap();
            SocketAddr::new(IpAddr::from(a), u16::from_be_bytes([h[4], h[5]]))
        })
    } else {
        let o = &pkt[34..];
        (pkt[14] & 0xf >= 7 && o[0] == CILIA_DSR_IPV4_OPT && o[1] == 8).then(|| {
            let a: [u8; 4] = o[4..8].try_into().unwrap();
            SocketAddr::new(IpAddr::from(a), u16::from_be_bytes([o[2], o[3]]))
        })
    }
}

fn families() -> [bool; 2] {
    [false, true]
}

#[test]
fn nodeport_to_a_local_backend_keeps_the_client_address_and_the_reply_shows_the_node_port() {
    privileged!("nodeport_local_backend");
    for v6 in families() {
        let fx = Fixture::serving(v6, vec![LOCAL_BACKEND], SNAT);
        let frontend = node_port(v6);
        let syn = tcp_packet(world(v6, 40000), frontend, 0x02, WIRE);
        let out = fx.netdev().run(&syn).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6={v6}: into the endpoint");
        assert_eq!(&out.packet[..6], &B_MAC);
        let (src, dst, ok) = parse(&out.packet);
        assert_eq!(src, world(v6, 40000), "the client's address is kept");
        assert_eq!(dst, SocketAddr::new(local_pod(v6), BACKEND_PORT));
        assert!(ok, "checksums valid");
        fx.assert_service_flow_from_world(v6);

        let reply = syn_ack_of_b(v6, 40000);
        let out = fx.b().run(&reply).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6={v6}: out of the underlay");
        let (src, dst, ok) = parse(&out.packet);
        assert_eq!(src, frontend, "the node address and port the client used");
        assert_eq!(dst, world(v6, 40000));
        assert!(ok, "checksums valid");
    }
}

#[test]
fn nodeport_to_a_remote_backend_is_snated_to_the_node_and_its_reply_goes_back_to_the_client() {
    privileged!("nodeport_remote_backend_snat");
    for v6 in families() {
        let fx = Fixture::serving(v6, vec![REMOTE_BACKEND], SNAT);
        let netdev = fx.netdev();
        let frontend = node_port(v6);
        let syn = tcp_packet(world(v6, 40001), frontend, 0x02, WIRE);
        let out = netdev.run(&syn).unwrap();
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "v6={v6}: to the backend's node"
        );
        let (src, dst, ok) = parse(&out.packet);
        assert_eq!(src.ip(), node_addr(v6, 1), "SNAT to the node address");
        assert!(
            (CILIA_LB_SNAT_PORT_FIRST..=CILIA_LB_SNAT_PORT_LAST).contains(&src.port()),
            "{src}"
        );
        assert_eq!(dst, SocketAddr::new(remote_pod(v6), BACKEND_PORT));
        assert!(ok, "checksums valid");
        // The same flow keeps its port.
        let again = netdev.run(&syn).unwrap();
        assert_eq!(
            parse(&again.packet).0,
            src,
            "a retransmission keeps the port"
        );
        let nat = fx.dp.lb_nat().unwrap();
        assert_eq!(
            nat.iter().filter(|(k, _)| k.dir == CILIA_NAT_IN).count(),
            1,
            "{nat:?}"
        );

        let reply = tcp_packet(dst, src, 0x12, WIRE);
        let out = netdev.run(&reply).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6={v6}: out to the client");
        let (rsrc, rdst, ok) = parse(&out.packet);
        assert_eq!(rsrc, frontend, "from the node port the client addressed");
        assert_eq!(rdst, world(v6, 40001));
        assert!(ok, "checksums valid");
    }
}

/// An SNATed flow that ended gives its SNAT port back within the close
/// timeout: after a FIN each way, the client's last ACK (no FIN) must not
/// give the translation an established connection's hours (it did: every
/// graceful connection held one of a backend's 28,232 SNAT ports for six
/// hours). A RST closes at once; a SYN from the same client port starts
/// afresh.
#[test]
fn a_snated_flow_that_ended_gives_its_port_back_within_the_close_timeout() {
    privileged!("nodeport_snat_close");
    let now = || {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).unwrap();
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    };
    let close = u64::from(CILIA_CT_TCP_CLOSE) * 1_000_000_000;
    for v6 in families() {
        let fx = Fixture::serving(v6, vec![REMOTE_BACKEND], SNAT);
        let netdev = fx.netdev();
        let frontend = node_port(v6);
        let client = world(v6, 40011);
        let out = netdev
            .run(&tcp_packet(client, frontend, 0x02, WIRE))
            .unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6={v6}");
        let (snat, backend, _) = parse(&out.packet);
        let to_client = |flags| {
            let out = netdev.run(&tcp_packet(backend, snat, flags, WIRE)).unwrap();
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6={v6}: a reply");
        };
        let to_backend = |flags| {
            let out = netdev
                .run(&tcp_packet(client, frontend, flags, WIRE))
                .unwrap();
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6={v6}: the client's");
            assert_eq!(parse(&out.packet).0, snat, "the same port");
        };
        // The IN entry (which holds the port): (flags, whether its
        // deadline is at most the close timeout away).
        let state = || {
            let nat = fx.dp.lb_nat().unwrap();
            let inn = nat.iter().find(|(k, _)| k.dir == CILIA_NAT_IN).unwrap().1;
            (inn.flags, inn.expires <= now() + close)
        };
        to_client(0x12);
        to_backend(0x10);
        assert_eq!(state(), (0, false), "established");
        to_backend(0x11); // the client's FIN
        to_client(0x10); // the backend goes on: half-closed
        assert_eq!(state(), (CILIA_NAT_FIN_OUT, false), "half-closed");
        to_client(0x11); // the backend's FIN
        to_backend(0x10); // the last ACK
        let all = CILIA_NAT_CLOSING | CILIA_NAT_FIN_OUT | CILIA_NAT_FIN_IN;
        assert_eq!(state(), (all, true), "closed: the port comes back soon");
        let t = now();
        assert!(
            fx.dp
                .lb_nat()
                .unwrap()
                .iter()
                .all(|(_, v)| v.expires <= t + close),
            "both entries"
        );
        // The client opens again from the same port: the same translation.
        to_backend(0x02);
        to_client(0x12);
        assert_eq!(state(), (0, false), "reopened");
        // A RST from the backend closes it at once.
        to_client(0x14);
        assert_eq!(state(), (CILIA_NAT_CLOSING, true), "reset");
    }
}

#[test]
fn nodeport_to_a_remote_backend_goes_through_the_overlay_in_vxlan_mode() {
    privileged!("nodeport_remote_backend_vxlan");
    let fx = Fixture::new(TunnelMode::Vxlan, false);
    fx.dp
        .upsert_nodeport_service(&nodeport_service(false, vec![REMOTE_BACKEND]), SNAT)
        .unwrap();
    let frontend = node_port(false);
    let out = fx
        .netdev()
        .run(&tcp_packet(world(false, 40002), frontend, 0x02, WIRE))
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        drops(&fx.dp, CILIA_DROP_WRITE_FAILED),
        0,
        "the tunnel key was set"
    );
    let counted: u64 = fx
        .dp
        .metrics()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.kind == CILIA_METRIC_FORWARD && k.reason == CILIA_FWD_TUNNEL)
        .map(|(_, v)| v.packets)
        .sum();
    assert_eq!(counted, 1, "sent into the overlay");
}

#[test]
fn netdev_in_vxlan_mode_leaves_everything_but_nodeport_traffic_untouched() {
    privileged!("netdev_vxlan_untouched");
    let fx = Fixture::new(TunnelMode::Vxlan, false);
    fx.dp
        .upsert_nodeport_service(&nodeport_service(false, vec![LOCAL_BACKEND]), SNAT)
        .unwrap();
    let netdev = fx.netdev();
    let node = node_addr(false, 1);
    let vxlan = eth(
        WIRE.1,
        WIRE.0,
        ETH_P_IP,
        &ipv4(
            Ipv4Addr::new(198, 51, 100, 2),
            Ipv4Addr::new(198, 51, 100, 1),
            IPPROTO_UDP,
            64,
            &udp(8472, 8472, b"x"),
        ),
    );
    for packet in [
        vxlan,
        // Another port of the node.
        tcp_packet(world(false, 40003), SocketAddr::new(node, 22), 0x02, WIRE),
        // The node port on an address that is not this node's.
        tcp_packet(
            world(false, 40003),
            SocketAddr::new(node_addr(false, 77), NODE_PORT),
            0x02,
            WIRE,
        ),
        // A local endpoint: in VXLAN mode pods are reached through the overlay.
        tcp_packet(
            world(false, 40003),
            SocketAddr::new(local_pod(false), BACKEND_PORT),
            0x02,
            WIRE,
        ),
    ] {
        let out = netdev.run(&packet).unwrap();
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.packet, packet, "untouched");
    }
    assert!(fx.dp.metrics().unwrap().is_empty(), "nothing counted");
}

#[test]
fn external_traffic_policy_local_sends_external_clients_to_local_backends_only() {
    privileged!("nodeport_local_policy");
    let fx = Fixture::new(TunnelMode::Native, false);
    let netdev = fx.netdev();
    let frontend = node_port(false);
    // No local backend on this node: its slots are empty, the traffic dropped.
    fx.dp
        .upsert_nodeport_service(&nodeport_service(false, vec![]), LOCAL)
        .unwrap();
    let syn = tcp_packet(world(false, 40004), frontend, 0x02, WIRE);
    assert_eq!(netdev.run(&syn).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_NO_BACKEND), 1);
    // A remote backend in the slots of a Local service is refused too.
    fx.dp
        .upsert_nodeport_service(&nodeport_service(false, vec![REMOTE_BACKEND]), LOCAL)
        .unwrap();
    let syn = tcp_packet(world(false, 40005), frontend, 0x02, WIRE);
    assert_eq!(netdev.run(&syn).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(drops(&fx.dp, CILIA_DROP_NO_BACKEND), 2);
    // The local backend serves.
    fx.dp
        .upsert_nodeport_service(&nodeport_service(false, vec![LOCAL_BACKEND]), LOCAL)
        .unwrap();
    let syn = tcp_packet(world(false, 40006), frontend, 0x02, WIRE);
    let out = netdev.run(&syn).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        parse(&out.packet).1,
        SocketAddr::new(local_pod(false), BACKEND_PORT)
    );
    let master = fx.dp.lb_services().unwrap();
    assert_eq!(master.len(), 1, "{master:?}");
}

#[test]
fn a_nodeport_service_needs_the_unspecified_address() {
    privileged!("nodeport_needs_unspecified");
    let fx = Fixture::new(TunnelMode::Native, false);
    let mut svc = nodeport_service(false, vec![LOCAL_BACKEND]);
    svc.frontend.addr = node_addr(false, 1);
    let err = fx.dp.upsert_nodeport_service(&svc, SNAT).unwrap_err();
    assert!(err.to_string().contains("198.51.100.1"), "{err}");
}

#[test]
fn lb_services_reads_back_the_nodeport_flags() {
    privileged!("nodeport_flags_read_back");
    let fx = Fixture::new(TunnelMode::Native, false);
    let dsr = nodeport_service(false, vec![REMOTE_BACKEND]);
    fx.dp.upsert_nodeport_service(&dsr, DSR).unwrap();
    let mut local = nodeport_service(false, vec![LOCAL_BACKEND]);
    local.rev_nat = REV_NAT + 1;
    local.frontend.port = NODE_PORT + 1;
    fx.dp.upsert_nodeport_service(&local, LOCAL).unwrap();
    let read = fx.dp.lb_services().unwrap();
    assert_eq!(read, vec![DSR.apply(&dsr), LOCAL.apply(&local)]);
    assert_eq!(read[0].flag_names(), ["nodeport", "dsr"]);
    assert_eq!(read[1].flag_names(), ["nodeport", "local"]);
    // Local and DSR mean nothing to a service of one address: refused.
    let mut clusterip = DSR.apply(&dsr);
    clusterip.rev_nat = 50;
    clusterip.frontend.addr = node_addr(false, 1);
    let err = fx.dp.upsert_lb_service(&clusterip).unwrap_err();
    assert!(err.to_string().contains("NodePort services only"), "{err}");
}

#[test]
fn dsr_carries_the_frontend_to_the_backends_node_in_the_packet_that_selects_the_backend() {
    privileged!("nodeport_dsr_encode");
    for v6 in families() {
        let fx = Fixture::serving(v6, vec![REMOTE_BACKEND], DSR);
        let netdev = fx.netdev();
        let frontend = node_port(v6);
        let syn = tcp_packet(world(v6, 40007), frontend, 0x02, WIRE);
        let out = netdev.run(&syn).unwrap();
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "v6={v6}: to the backend's node"
        );
        let (src, dst, ok) = parse(&out.packet);
        assert_eq!(src, world(v6, 40007), "no SNAT: the client's address");
        assert_eq!(dst, SocketAddr::new(remote_pod(v6), BACKEND_PORT));
        assert!(ok, "v6={v6}: checksums and lengths valid");
        assert_eq!(dsr_frontend(&out.packet), Some(frontend), "v6={v6}");
        assert_eq!(
            out.packet.len(),
            syn.len() + if v6 { 24 } else { 8 },
            "v6={v6}: the DSR header is the only growth"
        );
        // Later segments go without it; no NAT state on this node.
        let ack = tcp_packet(world(v6, 40007), frontend, 0x10, WIRE);
        let out = netdev.run(&ack).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(dsr_frontend(&out.packet), None);
        assert_eq!(out.packet.len(), ack.len());
        assert!(fx.dp.lb_nat().unwrap().is_empty(), "no SNAT entries");
    }
}

#[test]
fn the_backends_node_rev_nats_a_dsr_flow_and_answers_the_client_directly() {
    privileged!("nodeport_dsr_decode");
    for v6 in families() {
        // This node holds the backend (B); the LB node is 198.51.100.2.
        let fx = Fixture::serving(v6, vec![LOCAL_BACKEND], DSR);
        // The LB node's packet, made by its own program.
        let lb = Fixture::new(TunnelMode::Native, v6);
        lb.dp
            .upsert_lb_backends(&[LbBackend {
                id: 30,
                addr: SocketAddr::new(local_pod(v6), BACKEND_PORT),
                state: LbBackendState::Active,
            }])
            .unwrap();
        lb.dp.remove_endpoint(local_pod(v6)).unwrap();
        let row = IpcacheEntry {
            prefix: local_pod(v6).into(),
            identity: B_IDENTITY,
            tunnel: Some(node_addr(v6, 2)),
        };
        lb.dp.upsert_ipcache_value(row.key(), row.value()).unwrap();
        lb.dp
            .upsert_nodeport_service(&nodeport_service(v6, vec![30]), DSR)
            .unwrap();
        let frontend = node_port(v6);
        let syn = tcp_packet(world(v6, 40008), frontend, 0x02, WIRE);
        let wire = lb.netdev().run(&syn).unwrap().packet;
        assert_eq!(dsr_frontend(&wire), Some(frontend));

        let out = fx.netdev().run(&wire).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6={v6}: into the backend");
        assert_eq!(&out.packet[..6], &B_MAC);
        fx.assert_service_flow_from_world(v6);
        let reply = syn_ack_of_b(v6, 40008);
        let out = fx.b().run(&reply).unwrap();
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "v6={v6}: out of this node's device"
        );
        let (src, dst, ok) = parse(&out.packet);
        assert_eq!(
            src, frontend,
            "v6={v6}: from the LB node's address and port"
        );
        assert_eq!(dst, world(v6, 40008));
        assert!(ok);
    }
}

#[test]
fn icmp_error_of_a_local_nodeport_backend_reaches_the_client_quoting_the_node_port() {
    privileged!("nodeport_icmp_local_backend");
    for v6 in families() {
        let fx = Fixture::serving(v6, vec![LOCAL_BACKEND], SNAT);
        let frontend = node_port(v6);
        let syn = tcp_packet(world(v6, 40020), frontend, 0x02, WIRE);
        let at_b = fx.netdev().run(&syn).unwrap();
        assert_eq!(at_b.verdict, TC_ACT_REDIRECT);
        let err = icmp_error(
            local_pod(v6),
            world(v6, 0).ip(),
            IcmpError::TooBig(1280),
            &at_b.packet[14..],
            B_FROM,
        );
        let out = fx.b().run(&err).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6={v6}: out of the underlay");
        let seen = read_icmp_error(&out.packet);
        assert_eq!(seen.src, node_addr(v6, 1), "v6={v6}: from the node address");
        assert_eq!(seen.dst, world(v6, 0).ip());
        assert_eq!(seen.quoted_src, world(v6, 40020));
        assert_eq!(seen.quoted_dst, frontend, "v6={v6}: quoting the node port");
        assert!(seen.checksums_ok(), "v6={v6}: {seen:?}");
    }
}

#[test]
fn icmp_error_of_a_remote_backend_about_a_snated_flow_reaches_the_client() {
    privileged!("nodeport_icmp_snat");
    for v6 in families() {
        let fx = Fixture::serving(v6, vec![REMOTE_BACKEND], SNAT);
        let netdev = fx.netdev();
        let frontend = node_port(v6);
        let syn = tcp_packet(world(v6, 40021), frontend, 0x02, WIRE);
        let sent = netdev.run(&syn).unwrap();
        assert_eq!(sent.verdict, TC_ACT_REDIRECT);
        let snat = parse(&sent.packet).0;
        for (from, what) in [
            (remote_pod(v6), "the backend"),
            (node_addr(v6, 2), "a router on the path"),
        ] {
            let err = icmp_error(
                from,
                snat.ip(),
                IcmpError::TooBig(1280),
                &sent.packet[14..],
                WIRE,
            );
            let out = netdev.run(&err).unwrap();
            assert_eq!(
                out.verdict, TC_ACT_REDIRECT,
                "v6={v6} {what}: to the client"
            );
            let seen = read_icmp_error(&out.packet);
            let expect_src = if from == remote_pod(v6) {
                node_addr(v6, 1)
            } else {
                from
            };
            assert_eq!(seen.src, expect_src, "v6={v6} {what}");
            assert_eq!(seen.dst, world(v6, 0).ip(), "v6={v6} {what}");
            assert_eq!(seen.quoted_src, world(v6, 40021), "v6={v6} {what}");
            assert_eq!(seen.quoted_dst, frontend, "v6={v6} {what}");
            assert!(seen.checksums_ok(), "v6={v6} {what}: {seen:?}");
        }
    }
}

/// `pkt` with a DSR header naming `frontend` inserted after the fixed IP
/// header, as a load balancer node writes it (CILIA_DSR_* in abi.h), every
/// length and the IPv4 header checksum fixed: what any host that can reach
/// a pod could send.
fn with_dsr(pkt: &[u8], frontend: SocketAddr) -> Vec<u8> {
    let port = frontend.port().to_be_bytes();
    let mut out = pkt.to_vec();
    match frontend.ip() {
        IpAddr::V4(a) => {
            let mut opt = vec![CILIA_DSR_IPV4_OPT, 8, port[0], port[1]];
            opt.extend_from_slice(&a.octets());
            out.splice(34..34, opt);
            out[14] = 0x47;
            let total = u16::from_be_bytes([out[16], out[17]]) + 8;
            out[16..18].copy_from_slice(&total.to_be_bytes());
            out[24..26].copy_from_slice(&[0, 0]);
            let sum = checksum(&out[14..42]);
            out[24..26].copy_from_slice(&sum.to_be_bytes());
        }
        IpAddr::V6(a) => {
            let mut hdr = vec![out[20], 2, CILIA_DSR_IPV6_OPT, 18, port[0], port[1]];
            hdr.extend_from_slice(&a.octets());
            hdr.extend_from_slice(&[1, 0]);
            out.splice(54..54, hdr);
            out[20] = 60;
            let len = u16::from_be_bytes([out[18], out[19]]) + 24;
            out[18..20].copy_from_slice(&len.to_be_bytes());
        }
    }
    out
}

#[test]
fn a_dsr_frontend_is_believed_only_for_a_cluster_nodes_dsr_nodeport_and_its_backend() {
    privileged!("nodeport_dsr_forged");
    for v6 in families() {
        // This node holds the backend B of the DSR service; the same port
        // + 1 is a NodePort in SNAT mode.
        let fx = Fixture::serving(v6, vec![LOCAL_BACKEND], DSR);
        let mut snat = nodeport_service(v6, vec![LOCAL_BACKEND]);
        snat.rev_nat = REV_NAT + 1;
        snat.frontend.port = NODE_PORT + 1;
        fx.dp.upsert_nodeport_service(&snat, SNAT).unwrap();
        let netdev = fx.netdev();
        let backend = SocketAddr::new(local_pod(v6), BACKEND_PORT);
        let lb_node = |port| SocketAddr::new(node_addr(v6, 2), port);
        let forged = [
            (
                "an address of no node",
                SocketAddr::new(node_addr(v6, 77), NODE_PORT),
                backend,
            ),
            ("the client's own address", world(v6, NODE_PORT), backend),
            ("a port of no NodePort", lb_node(30999), backend),
            ("a NodePort in SNAT mode", lb_node(NODE_PORT + 1), backend),
            (
                "another port of the backend",
                lb_node(NODE_PORT),
                SocketAddr::new(local_pod(v6), 22),
            ),
        ];
        for (i, (what, frontend, to)) in forged.into_iter().enumerate() {
            let syn = with_dsr(
                &tcp_packet(world(v6, 41000 + i as u16), to, 0x02, WIRE),
                frontend,
            );
            assert_eq!(
                dsr_frontend(&syn),
                Some(frontend),
                "the test's own encoding"
            );
            let out = netdev.run(&syn).unwrap();
            assert_eq!(out.verdict, TC_ACT_SHOT, "v6={v6}: {what}");
            assert_eq!(
                drops(&fx.dp, CILIA_DROP_DSR_FORGED),
                i as u64 + 1,
                "v6={v6}: {what}: dropped as forged"
            );
        }
        assert!(
            fx.dp.lb_nat().unwrap().is_empty(),
            "v6={v6}: a forged frontend leaves no REVNAT entry"
        );
        assert!(fx.dp.list_ct().unwrap().is_empty(), "v6={v6}: nor a flow");

        // What a load balancer node writes is still believed.
        let syn = with_dsr(
            &tcp_packet(world(v6, 41100), backend, 0x02, WIRE),
            lb_node(NODE_PORT),
        );
        let out = netdev.run(&syn).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "v6={v6}: into the backend");
        let nat = fx.dp.lb_nat().unwrap();
        assert_eq!(nat.len(), 1, "v6={v6}: {nat:?}");
        assert_eq!(nat[0].1.rev_nat, REV_NAT);
    }
}

// ---- real traffic: a world client and two nodes on the fabric ----

const ECHO_PORT: u16 = 8080;
/// Backend on node 2.
const PORT_TO_NODE2: u16 = 30080;
/// Backend on node 1.
const PORT_TO_NODE1: u16 = 30081;
/// Underlay MTU 1500 minus the IPv6 VXLAN overhead (70).
const OVERLAY_MTU: u32 = 1430;

fn pod(v6: bool, n: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xc1a, u16::from(n), 0, 0, 0, 0, 0x10))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 200, n, 10))
    }
}

fn fabric_addr(v6: bool, n: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(cilia_testnet::cluster::node_ipv6(n))
    } else {
        IpAddr::V4(cilia_testnet::cluster::node_ipv4(n))
    }
}

fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Node `n` on the fabric: its endpoint (an echo server's namespace) and
/// its datapath, with the node programs on `eth0` (and the VXLAN device).
struct Node {
    ep: Netns,
    dp: BpfDatapath,
}

fn real_node(
    root: &BpfRoot,
    ns: &Netns,
    n: u8,
    mode: TunnelMode,
    options: NodePortOptions,
) -> Node {
    let ep = Netns::new("cep").unwrap();
    let (m, node_m) = if n == 1 {
        (A_MAC, A_NODE_MAC)
    } else {
        (B_MAC, B_NODE_MAC)
    };
    ns.sh("ip link set lo up").unwrap();
    if mode == TunnelMode::Vxlan {
        ns.sh(&format!(
            "set -e
             ip link add cilia_vxlan type vxlan external dstport 8472 nolearning
             ip link set cilia_vxlan addrgenmode none
             ip link set cilia_vxlan arp off mtu {OVERLAY_MTU} up"
        ))
        .unwrap();
    }
    ns.sh(&format!(
        "set -e
         ip link add lxc0 address {hm} mtu {OVERLAY_MTU} type veth peer name eth0 address {em} mtu {OVERLAY_MTU} netns {ep}
         ip link set lxc0 up
         ip route add {v6}/128 dev lxc0; ip route add {v4}/32 dev lxc0",
        hm = mac_str(node_m),
        em = mac_str(m),
        ep = ep.name(),
        v6 = pod(true, n),
        v4 = pod(false, n),
    ))
    .unwrap();
    ep.sh(&format!(
        "set -e
         ip link set lo up
         ip addr add {v6}/128 dev eth0 nodad; ip addr add {v4}/32 dev eth0
         ip link set eth0 up
         ip -6 route add fd00:c1a:{n}::1/128 dev eth0; ip -6 route add default via fd00:c1a:{n}::1 dev eth0
         ip route add 10.200.{n}.1/32 dev eth0; ip route add default via 10.200.{n}.1 dev eth0",
        v6 = pod(true, n),
        v4 = pod(false, n),
    ))
    .unwrap();
    let dp = BpfDatapath::open(&root.path().join(format!("node{n}"))).unwrap();
    let ifindex = ns.run(|| nix::net::if_::if_nametoindex("lxc0").unwrap());
    let identity = 1000 + u32::from(n);
    let config = EndpointConfig {
        ipv6: match pod(true, n) {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => unreachable!(),
        },
        ipv4: match pod(false, n) {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(_) => unreachable!(),
        },
        mac: m,
        node_mac: node_m,
        ifindex,
        identity,
        endpoint_id: u16::from(n),
        enable_ipv4: 1,
        monitor: 1,
    };
    ns.run(|| dp.attach_endpoint(&config, "lxc0")).unwrap();
    let info = EndpointInfo {
        ifindex,
        identity,
        endpoint_id: u16::from(n),
        flags: 0,
        mac: m,
        node_mac: node_m,
    };
    dp.upsert_endpoint(pod(true, n), info).unwrap();
    dp.upsert_endpoint(pod(false, n), info).unwrap();
    dp.set_policy(info.endpoint_id, &Default::default())
        .unwrap(); // empty: nothing selects it

    let peer = 3 - n;
    let (tunnel_ifindex, underlay_ifindex) = ns.run(|| {
        (
            nix::net::if_::if_nametoindex("cilia_vxlan").unwrap_or(0),
            nix::net::if_::if_nametoindex("eth0").unwrap(),
        )
    });
    dp.set_node_config(&NodeConfig {
        tunnel_mode: mode,
        tunnel_ifindex,
        underlay_ifindex,
        tunnel_port: if mode == TunnelMode::Vxlan { 8472 } else { 0 },
    })
    .unwrap();
    if mode == TunnelMode::Vxlan {
        ns.run(|| dp.attach_overlay("cilia_vxlan")).unwrap();
    }
    ns.run(|| dp.attach_netdev("eth0")).unwrap();
    dp.publish_nodes(&[fabric_addr(false, peer), fabric_addr(true, peer)])
        .unwrap();
    for v6 in [false, true] {
        for row in [
            IpcacheEntry {
                prefix: fabric_addr(v6, n).into(),
                identity: CILIA_ID_HOST,
                tunnel: None,
            },
            IpcacheEntry {
                prefix: fabric_addr(v6, peer).into(),
                identity: CILIA_ID_REMOTE_NODE,
                tunnel: None,
            },
            IpcacheEntry {
                prefix: pod(v6, peer).into(),
                identity: 1000 + u32::from(peer),
                tunnel: Some(fabric_addr(v6, peer)),
            },
        ] {
            dp.upsert_ipcache_value(row.key(), row.value()).unwrap();
        }
    }
    // The same NodePort services on every node: one port to node 2's
    // endpoint, one to node 1's, each family.
    let mut backends = Vec::new();
    for (id, v6, n) in [(1, false, 2), (2, true, 2), (3, false, 1), (4, true, 1)] {
        backends.push(LbBackend {
            id,
            addr: SocketAddr::new(pod(v6, n), ECHO_PORT),
            state: LbBackendState::Active,
        });
    }
    dp.upsert_lb_backends(&backends).unwrap();
    for (rev_nat, v6, port, backend, on) in [
        (1, false, PORT_TO_NODE2, 1, 2),
        (2, true, PORT_TO_NODE2, 2, 2),
        (3, false, PORT_TO_NODE1, 3, 1),
        (4, true, PORT_TO_NODE1, 4, 1),
    ] {
        // externalTrafficPolicy=Local: the agent writes this node's
        // backends only.
        let slots = if options.external_local && on != n {
            vec![]
        } else {
            vec![backend]
        };
        let mut svc = nodeport_service(v6, slots);
        svc.rev_nat = rev_nat;
        svc.frontend.port = port;
        dp.upsert_nodeport_service(&svc, options).unwrap();
    }
    Node { ep, dp }
}

fn nodeport_from_the_world(mode: TunnelMode) {
    let fabric = cilia_testnet::cluster::Fabric::new(2).unwrap();
    let world_ns = fabric.attach(200).unwrap();
    let root = BpfRoot::new();
    let nodes = [
        real_node(&root, fabric.node(1), 1, mode, SNAT),
        real_node(&root, fabric.node(2), 2, mode, SNAT),
    ];
    let echoes = [
        Echo::start(&nodes[0].ep, &[ECHO_PORT]),
        Echo::start(&nodes[1].ep, &[ECHO_PORT]),
    ];
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    for v6 in [false, true] {
        for n in [1u8, 2] {
            for (port, backend_node) in [(PORT_TO_NODE1, 1u8), (PORT_TO_NODE2, 2u8)] {
                let to = SocketAddr::new(fabric_addr(v6, n), port);
                let (local, back) = exchange(&world_ns, to, &payload, WAIT)
                    .unwrap_or_else(|e| panic!("{mode:?}: world -> {to}: {e}"));
                assert_eq!(back, payload, "{mode:?}: world -> {to}");
                let peer = *echoes[usize::from(backend_node - 1)]
                    .peers()
                    .last()
                    .unwrap();
                if backend_node == n {
                    assert_eq!(
                        peer, local,
                        "{mode:?} {to}: a local backend sees the client"
                    );
                } else {
                    assert_eq!(
                        peer.ip(),
                        fabric_addr(v6, n),
                        "{mode:?} {to}: a remote backend sees the node (SNAT)"
                    );
                }
            }
        }
    }
    // A node process reaches the other node's endpoint, and the reply
    // comes back to the node's own address the same way (no forwarding).
    let via = if mode == TunnelMode::Vxlan {
        "dev cilia_vxlan".to_string()
    } else {
        "via 198.51.100.1".to_string()
    };
    fabric
        .node(2)
        .sh(&format!(
            "ip route add 10.200.1.10/32 {via}; ip -6 route add fd00:c1a:1::10/128 {}",
            if mode == TunnelMode::Vxlan {
                via.clone()
            } else {
                "via 2001:db8:100::1".to_string()
            }
        ))
        .unwrap();
    for v6 in [false, true] {
        let to = SocketAddr::new(pod(v6, 1), ECHO_PORT);
        let (local, back) = exchange(fabric.node(2), to, b"from node 2", WAIT)
            .unwrap_or_else(|e| panic!("{mode:?}: node 2 -> {to}: {e}"));
        assert_eq!(back, b"from node 2");
        assert_eq!(local.ip(), fabric_addr(v6, 2), "{mode:?}");
    }
    let in_entries = nodes[0]
        .dp
        .lb_nat()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.dir == CILIA_NAT_IN)
        .count();
    assert!(in_entries >= 2, "node 1 SNATed both families");
}

#[test]
fn world_reaches_nodeport_services_on_both_nodes_through_the_vxlan_overlay() {
    privileged!("world_reaches_nodeport_services_on_both_nodes_through_the_vxlan_overlay");
    nodeport_from_the_world(TunnelMode::Vxlan);
}

#[test]
fn world_reaches_nodeport_services_on_both_nodes_by_native_routing() {
    privileged!("world_reaches_nodeport_services_on_both_nodes_by_native_routing");
    nodeport_from_the_world(TunnelMode::Native);
}

/// Whether `tcpdump` is installed. Without it: under `CI=true` this panics;
/// elsewhere it prints why the test is skipped and returns `false`.
fn require_tcpdump(test: &str) -> bool {
    if std::process::Command::new("tcpdump")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: no `tcpdump` in PATH and CI=true forbids skipping: run scripts/setup.sh");
    }
    eprintln!("SKIPPED {test}: no `tcpdump` in PATH (run scripts/setup.sh)");
    false
}

/// tcpdump on `eth0` of `ns`, packets the device sends (`-Q out`) that
/// match `filter`; [`Capture::stop`] returns them, one line each.
struct Capture(Option<std::process::Child>);

impl Capture {
    fn start(ns: &Netns, filter: &str) -> Self {
        use std::io::BufRead;
        let mut child = ns
            .command("tcpdump")
            .args(["-i", "eth0", "-Q", "out", "-n", "-l", filter])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Capturing once it says so.
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break,
                Some(Ok(_)) => continue,
                other => panic!("tcpdump did not start: {other:?}"),
            }
        }
        Self(Some(child))
    }

    fn stop(mut self) -> Vec<String> {
        let child = self.0.take().unwrap();
        // Let the last packets reach the capture, then stop it (SIGINT:
        // tcpdump flushes what it has).
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn dsr_replies_bypass_the_lb_node(mode: TunnelMode) {
    let fabric = cilia_testnet::cluster::Fabric::new(2).unwrap();
    let world_ns = fabric.attach(200).unwrap();
    let root = BpfRoot::new();
    let nodes = [
        real_node(&root, fabric.node(1), 1, mode, DSR),
        real_node(&root, fabric.node(2), 2, mode, DSR),
    ];
    let echo = Echo::start(&nodes[1].ep, &[ECHO_PORT]);
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let filter = format!("tcp src port {PORT_TO_NODE2}");
    for v6 in [false, true] {
        let lb_node = Capture::start(fabric.node(1), &filter);
        let backend_node = Capture::start(fabric.node(2), &filter);
        let to = SocketAddr::new(fabric_addr(v6, 1), PORT_TO_NODE2);
        let (local, back) = exchange(&world_ns, to, &payload, WAIT)
            .unwrap_or_else(|e| panic!("{mode:?}: world -> {to}: {e}"));
        assert_eq!(back, payload, "{mode:?}: world -> {to}");
        assert_eq!(
            echo.peers().last(),
            Some(&local),
            "{mode:?} {to}: the backend sees the client (no SNAT)"
        );
        let via_lb = lb_node.stop();
        let via_backend = backend_node.stop();
        assert!(
            via_lb.is_empty(),
            "{mode:?} {to}: no reply leaves the LB node: {via_lb:?}"
        );
        let from_frontend = format!("{} > {}", tcpdump_addr(to), tcpdump_addr(local));
        assert!(
            via_backend.iter().any(|l| l.contains(&from_frontend)),
            "{mode:?} {to}: the backend's node sends the replies as {from_frontend}: {via_backend:?}"
        );
    }
}

/// An address and port as tcpdump prints them (`198.51.100.1.30080`).
fn tcpdump_addr(a: SocketAddr) -> String {
    format!("{}.{}", a.ip(), a.port())
}

#[test]
fn dsr_replies_go_from_the_backends_node_to_the_client_through_the_vxlan_overlay() {
    privileged!("dsr_replies_go_from_the_backends_node_to_the_client_through_the_vxlan_overlay");
    if !require_tcpdump("dsr_vxlan") {
        return;
    }
    dsr_replies_bypass_the_lb_node(TunnelMode::Vxlan);
}

#[test]
fn dsr_replies_go_from_the_backends_node_to_the_client_by_native_routing() {
    privileged!("dsr_replies_go_from_the_backends_node_to_the_client_by_native_routing");
    if !require_tcpdump("dsr_native") {
        return;
    }
    dsr_replies_bypass_the_lb_node(TunnelMode::Native);
}

#[test]
fn external_traffic_policy_local_serves_the_world_only_on_the_backends_node() {
    privileged!("external_traffic_policy_local_serves_the_world_only_on_the_backends_node");
    let fabric = cilia_testnet::cluster::Fabric::new(2).unwrap();
    let world_ns = fabric.attach(200).unwrap();
    let root = BpfRoot::new();
    let nodes = [
        real_node(&root, fabric.node(1), 1, TunnelMode::Native, LOCAL),
        real_node(&root, fabric.node(2), 2, TunnelMode::Native, LOCAL),
    ];
    let echo = Echo::start(&nodes[1].ep, &[ECHO_PORT]);
    for v6 in [false, true] {
        let on_backend_node = SocketAddr::new(fabric_addr(v6, 2), PORT_TO_NODE2);
        let (local, back) = exchange(&world_ns, on_backend_node, b"local", WAIT).unwrap();
        assert_eq!(back, b"local");
        assert_eq!(
            echo.peers().last(),
            Some(&local),
            "{on_backend_node}: the client's address"
        );
        let elsewhere = SocketAddr::new(fabric_addr(v6, 1), PORT_TO_NODE2);
        assert!(
            exchange(
                &world_ns,
                elsewhere,
                b"local",
                std::time::Duration::from_secs(1)
            )
            .is_err(),
            "{elsewhere}: no local backend, no service"
        );
    }
    assert!(drops(&nodes[0].dp, CILIA_DROP_NO_BACKEND) >= 2);
}

// ---- NodePort acceleration: the device's XDP program ----

use cilia_datapath::prefilter::{XDP_PASS, XDP_TX};
use cilia_datapath::XdpFeatures;

const ACCEL: XdpFeatures = XdpFeatures {
    prefilter: false,
    lb_acceleration: true,
};
/// The MAC of node 2 and of the world client, as node 1's neighbours.
const NODE2_MAC: Mac = [0x0a, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: Mac = [0x0a, 0, 0, 0, 0, 0xc8];

/// A namespace where the XDP program's FIB lookups find answers: `eth0`
/// (a veth) holds node 1's addresses, node 2 and the world client are
/// permanent neighbours, forwarding is on for `eth0` (the kernel's FIB
/// helper answers only for a device that forwards).
struct XdpNet {
    ns: Netns,
    ifindex: u32,
    mac: Mac,
}

impl XdpNet {
    fn new() -> Self {
        let ns = Netns::new("cxdp").unwrap();
        ns.sh(&format!(
            "set -e
             ip link set lo up
             ip link add eth0 type veth peer name peer0
             ip link set peer0 up; ip link set eth0 up
             ip addr add 198.51.100.1/24 dev eth0
             ip addr add 2001:db8:100::1/64 dev eth0 nodad
             sysctl -qw net.ipv4.conf.eth0.forwarding=1 net.ipv6.conf.eth0.forwarding=1
             ip neigh add 198.51.100.2 lladdr {n2} dev eth0 nud permanent
             ip neigh add 198.51.100.200 lladdr {c} dev eth0 nud permanent
             ip neigh add 2001:db8:100::2 lladdr {n2} dev eth0 nud permanent
             ip neigh add 2001:db8:100::c8 lladdr {c} dev eth0 nud permanent",
            n2 = mac_str(NODE2_MAC),
            c = mac_str(CLIENT_MAC),
        ))
        .unwrap();
        let ifindex = ns.run(|| nix::net::if_::if_nametoindex("eth0").unwrap());
        let mac = ns
            .sh("ip -br link show eth0")
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect::<Vec<_>>()
            .try_into()
            .unwrap();
        Self { ns, ifindex, mac }
    }

    fn run(
        &self,
        prog: &cilia_datapath::prefilter::XdpTestProgram,
        frame: &[u8],
    ) -> (u32, Vec<u8>) {
        self.ns.run(|| prog.run_on(frame, self.ifindex)).unwrap()
    }
}

fn ttl(pkt: &[u8]) -> u8 {
    if u16::from_be_bytes([pkt[12], pkt[13]]) == ETH_P_IPV6 {
        pkt[21]
    } else {
        pkt[22]
    }
}

#[test]
fn xdp_snats_a_nodeport_flow_to_a_remote_backend_and_tc_continues_it() {
    privileged!("xdp_nodeport_snat");
    let net = XdpNet::new();
    for v6 in families() {
        let fx = Fixture::new(TunnelMode::Native, v6);
        fx.dp
            .upsert_nodeport_service(&nodeport_service(v6, vec![REMOTE_BACKEND]), SNAT)
            .unwrap();
        let xdp = fx.dp.test_xdp_program(ACCEL).unwrap();
        let frontend = SocketAddr::new(node_addr(v6, 1), NODE_PORT);
        let syn = tcp_packet(world(v6, 40101), frontend, 0x02, WIRE);
        let (verdict, out) = net.run(&xdp, &syn);
        assert_eq!(
            verdict, XDP_TX,
            "v6={v6}: back out of the device it came in by"
        );
        assert_eq!(&out[..6], &NODE2_MAC, "v6={v6}: to the backend's node");
        assert_eq!(&out[6..12], &net.mac, "v6={v6}: from the device");
        let (src, dst, ok) = parse(&out);
        assert_eq!(
            src.ip(),
            node_addr(v6, 1),
            "v6={v6}: SNAT to the node address"
        );
        assert!(
            (CILIA_LB_SNAT_PORT_FIRST..=CILIA_LB_SNAT_PORT_LAST).contains(&src.port()),
            "{src}"
        );
        assert_eq!(dst, SocketAddr::new(remote_pod(v6), BACKEND_PORT));
        assert!(ok, "v6={v6}: every checksum valid after the rewrite");
        assert_eq!(ttl(&out), ttl(&syn) - 1, "v6={v6}: one hop less");
        assert_eq!(counted(&fx.dp, CILIA_METRIC_FORWARD, CILIA_FWD_XDP), 1);
        let stats = fx.dp.lb_stats(REV_NAT).unwrap();
        assert!(
            stats.flows == 1 && stats.packets == 1,
            "v6={v6}: counted per service as at tc: {stats:?}"
        );

        // The flow's next segment at tc (XDP off): the same port, the
        // same entries.
        let ack = tcp_packet(world(v6, 40101), frontend, 0x10, WIRE);
        let at_tc = fx.netdev().run(&ack).unwrap();
        assert_eq!(at_tc.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            parse(&at_tc.packet).0,
            src,
            "v6={v6}: tc keeps XDP's SNAT port"
        );
        let nat = fx.dp.lb_nat().unwrap();
        assert_eq!(
            nat.iter().filter(|(k, _)| k.dir == CILIA_NAT_IN).count(),
            1,
            "{nat:?}"
        );

        // The backend's reply, unSNATed in XDP.
        let reply = tcp_packet(dst, src, 0x12, WIRE);
        let (verdict, out) = net.run(&xdp, &reply);
        assert_eq!(verdict, XDP_TX, "v6={v6}: out to the client");
        assert_eq!(&out[..6], &CLIENT_MAC);
        let (rsrc, rdst, ok) = parse(&out);
        assert_eq!(
            rsrc, frontend,
            "v6={v6}: from the node port the client addressed"
        );
        assert_eq!(rdst, world(v6, 40101));
        assert!(ok, "v6={v6}: checksums valid");
    }
}

#[test]
fn xdp_reply_of_a_flow_tc_snated_goes_back_to_the_client() {
    privileged!("xdp_nodeport_reply_of_tc");
    let net = XdpNet::new();
    for v6 in families() {
        let fx = Fixture::new(TunnelMode::Native, v6);
        fx.dp
            .upsert_nodeport_service(&nodeport_service(v6, vec![REMOTE_BACKEND]), SNAT)
            .unwrap();
        let frontend = SocketAddr::new(node_addr(v6, 1), NODE_PORT);
        let syn = tcp_packet(world(v6, 40102), frontend, 0x02, WIRE);
        let out = fx.netdev().run(&syn).unwrap();
        let (src, dst, _) = parse(&out.packet);
        let xdp = fx.dp.test_xdp_program(ACCEL).unwrap();
        let (verdict, out) = net.run(&xdp, &tcp_packet(dst, src, 0x12, WIRE));
        assert_eq!(verdict, XDP_TX, "v6={v6}");
        let (rsrc, rdst, ok) = parse(&out);
        assert_eq!((rsrc, rdst), (frontend, world(v6, 40102)), "v6={v6}");
        assert!(ok);
    }
}

#[test]
fn xdp_dsr_carries_the_frontend_in_the_packet_that_selects_the_backend() {
    privileged!("xdp_nodeport_dsr");
    let net = XdpNet::new();
    for v6 in families() {
        let fx = Fixture::new(TunnelMode::Native, v6);
        fx.dp
            .upsert_nodeport_service(&nodeport_service(v6, vec![REMOTE_BACKEND]), DSR)
            .unwrap();
        let xdp = fx.dp.test_xdp_program(ACCEL).unwrap();
        let frontend = SocketAddr::new(node_addr(v6, 1), NODE_PORT);
        let syn = tcp_packet(world(v6, 40103), frontend, 0x02, WIRE);
        let (verdict, out) = net.run(&xdp, &syn);
        assert_eq!(verdict, XDP_TX, "v6={v6}");
        assert_eq!(&out[..6], &NODE2_MAC);
        let (src, dst, ok) = parse(&out);
        assert_eq!(src, world(v6, 40103), "v6={v6}: no SNAT");
        assert_eq!(dst, SocketAddr::new(remote_pod(v6), BACKEND_PORT));
        assert!(ok, "v6={v6}: checksums and lengths valid");
        assert_eq!(dsr_frontend(&out), Some(frontend), "v6={v6}");
        assert_eq!(out.len(), syn.len() + if v6 { 24 } else { 8 });
        // What tc makes of the same SYN is the same packet (but the MACs).
        let fx_tc = Fixture::new(TunnelMode::Native, v6);
        fx_tc
            .dp
            .upsert_nodeport_service(&nodeport_service(v6, vec![REMOTE_BACKEND]), DSR)
            .unwrap();
        let tc = fx_tc.netdev().run(&syn).unwrap().packet;
        assert_eq!(&out[12..], &tc[12..], "v6={v6}: one DSR format");

        let ack = tcp_packet(world(v6, 40103), frontend, 0x10, WIRE);
        let (verdict, out) = net.run(&xdp, &ack);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            dsr_frontend(&out),
            None,
            "v6={v6}: later segments go without it"
        );
        assert_eq!(out.len(), ack.len());
        assert!(fx.dp.lb_nat().unwrap().is_empty(), "no SNAT entries");
    }
}

#[test]
fn xdp_passes_what_tc_must_judge_untouched_and_unpinned() {
    privileged!("xdp_nodeport_passes");
    let net = XdpNet::new();
    for v6 in families() {
        let frontend = SocketAddr::new(node_addr(v6, 1), NODE_PORT);
        // A local backend: its ingress policy runs at tc.
        let fx = Fixture::new(TunnelMode::Native, v6);
        fx.dp
            .upsert_nodeport_service(&nodeport_service(v6, vec![LOCAL_BACKEND]), SNAT)
            .unwrap();
        let xdp = fx.dp.test_xdp_program(ACCEL).unwrap();
        let syn = tcp_packet(world(v6, 40104), frontend, 0x02, WIRE);
        assert_eq!(
            net.run(&xdp, &syn),
            (XDP_PASS, syn.clone()),
            "v6={v6}: local backend"
        );
        assert!(
            fx.dp.list_ct().unwrap().is_empty(),
            "v6={v6}: nothing pinned"
        );
        // Not a NodePort: another port of the node, and a node-to-node
        // packet.
        let other = tcp_packet(
            world(v6, 40105),
            SocketAddr::new(node_addr(v6, 1), 22),
            0x02,
            WIRE,
        );
        assert_eq!(net.run(&xdp, &other), (XDP_PASS, other.clone()), "v6={v6}");
        // VXLAN mode: no encapsulation in XDP.
        let vx = Fixture::new(TunnelMode::Vxlan, v6);
        vx.dp
            .upsert_nodeport_service(&nodeport_service(v6, vec![REMOTE_BACKEND]), SNAT)
            .unwrap();
        let xdp = vx.dp.test_xdp_program(ACCEL).unwrap();
        assert_eq!(
            net.run(&xdp, &syn),
            (XDP_PASS, syn.clone()),
            "v6={v6}: vxlan"
        );
        // externalTrafficPolicy=Local with a remote backend: tc drops it.
        let local = Fixture::new(TunnelMode::Native, v6);
        local
            .dp
            .upsert_nodeport_service(&nodeport_service(v6, vec![REMOTE_BACKEND]), LOCAL)
            .unwrap();
        let xdp = local.dp.test_xdp_program(ACCEL).unwrap();
        assert_eq!(
            net.run(&xdp, &syn),
            (XDP_PASS, syn.clone()),
            "v6={v6}: Local"
        );
        // Acceleration off: the program is the prefilter alone.
        let off = fx.dp.test_xdp_program(XdpFeatures::default()).unwrap();
        assert_eq!(net.run(&off, &syn).0, XDP_PASS);
    }
    // A remote backend whose node has no neighbour entry: tc resolves it.
    let fx = Fixture::new(TunnelMode::Native, false);
    fx.dp
        .upsert_nodeport_service(&nodeport_service(false, vec![REMOTE_BACKEND]), SNAT)
        .unwrap();
    net.ns.sh("ip neigh del 198.51.100.2 dev eth0").unwrap();
    let xdp = fx.dp.test_xdp_program(ACCEL).unwrap();
    let syn = tcp_packet(
        world(false, 40106),
        SocketAddr::new(node_addr(false, 1), NODE_PORT),
        0x02,
        WIRE,
    );
    assert_eq!(net.run(&xdp, &syn), (XDP_PASS, syn.clone()), "no neighbour");
}

#[test]
fn xdp_prefilter_still_drops_when_acceleration_shares_the_program() {
    privileged!("xdp_nodeport_prefilter");
    let net = XdpNet::new();
    let fx = Fixture::new(TunnelMode::Native, false);
    fx.dp
        .upsert_nodeport_service(&nodeport_service(false, vec![REMOTE_BACKEND]), SNAT)
        .unwrap();
    fx.dp
        .upsert_prefilter(&[PrefilterEntry {
            cidr: "198.51.100.200/32".parse().unwrap(),
            counter: 0,
        }])
        .unwrap();
    let both = fx
        .dp
        .test_xdp_program(XdpFeatures {
            prefilter: true,
            lb_acceleration: true,
        })
        .unwrap();
    let frontend = SocketAddr::new(node_addr(false, 1), NODE_PORT);
    let listed = tcp_packet(world(false, 40107), frontend, 0x02, WIRE);
    assert_eq!(
        net.run(&both, &listed).0,
        cilia_datapath::prefilter::XDP_DROP
    );
    let other = tcp_packet(
        SocketAddr::new(node_addr(false, 201), 40108),
        frontend,
        0x02,
        WIRE,
    );
    assert_eq!(
        net.run(&both, &other).0,
        XDP_TX,
        "an unlisted client is balanced"
    );
}

/// Turns a device's TX checksum offload off (`ETHTOOL_STXCSUM`), in the
/// calling thread's namespace.
fn tx_checksum_off(dev: &str) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    // SAFETY: a socket we own and an ifreq that outlives the call, whose
    // data pointer points at a live ethtool_value.
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::ioctl(fd, SIOCETHTOOL, &mut req);
        libc::close(fd);
        rc
    };
    assert_eq!(
        rc,
        0,
        "{dev}: tx checksum off: {}",
        std::io::Error::last_os_error()
    );
}

/// Node `n`'s underlay ready for NodePort acceleration: forwarding on
/// `eth0` (the FIB helper answers only for a forwarding device); on the
/// fabric's side of its veth an XDP program (a veth takes frames sent by
/// XDP_TX from its peer only when it runs in XDP mode itself) and no TX
/// checksum offload: a veth otherwise hands over CHECKSUM_PARTIAL frames,
/// whose checksum field is only a partial sum that XDP, seeing bytes and
/// no metadata, cannot update (a NIC delivers complete checksums).
fn prepare_acceleration(fabric: &cilia_testnet::cluster::Fabric, n: u8) -> aya::Ebpf {
    fabric
        .node(n)
        .sh("sysctl -qw net.ipv4.conf.eth0.forwarding=1 net.ipv6.conf.eth0.forwarding=1")
        .unwrap();
    fabric.ns().run(|| tx_checksum_off(&format!("n{n}")));
    let mut ebpf = aya::EbpfLoader::new()
        .load(cilia_datapath::object::PROBE_OBJECT)
        .unwrap();
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(cilia_datapath::object::PROG_PROBE_XDP)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    fabric
        .ns()
        .run(|| prog.attach(&format!("n{n}"), aya::programs::XdpMode::Driver))
        .unwrap();
    ebpf
}

fn xdp_forwarded(dp: &BpfDatapath) -> u64 {
    counted(dp, CILIA_METRIC_FORWARD, CILIA_FWD_XDP)
}

fn world_reaches_a_remote_backend_through_xdp(options: NodePortOptions) {
    let fabric = cilia_testnet::cluster::Fabric::new(2).unwrap();
    let world_ns = fabric.attach(200).unwrap();
    let root = BpfRoot::new();
    let nodes = [
        real_node(&root, fabric.node(1), 1, TunnelMode::Native, options),
        real_node(&root, fabric.node(2), 2, TunnelMode::Native, options),
    ];
    let _peer_xdp = prepare_acceleration(&fabric, 1);
    let link = fabric
        .node(1)
        .run(|| nodes[0].dp.attach_lb_acceleration("eth0", false))
        .unwrap();
    assert_eq!(
        link.mode,
        cilia_datapath::PrefilterMode::Native,
        "veth has native XDP"
    );
    let echo = Echo::start(&nodes[1].ep, &[ECHO_PORT]);
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    for v6 in [false, true] {
        let before = xdp_forwarded(&nodes[0].dp);
        let to = SocketAddr::new(fabric_addr(v6, 1), PORT_TO_NODE2);
        let (local, back) = exchange(&world_ns, to, &payload, WAIT)
            .unwrap_or_else(|e| panic!("dsr={}: world -> {to}: {e}", options.dsr));
        assert_eq!(back, payload, "world -> {to}");
        let peer = *echo.peers().last().unwrap();
        if options.dsr {
            assert_eq!(peer, local, "{to}: DSR keeps the client's address");
        } else {
            assert_eq!(peer.ip(), fabric_addr(v6, 1), "{to}: SNAT to node 1");
        }
        let by_xdp = xdp_forwarded(&nodes[0].dp) - before;
        // The client's SYN, ACKs, data and FIN at least (the very first
        // packets may go through tc while the neighbours are resolved).
        assert!(
            by_xdp >= 3,
            "dsr={} {to}: XDP sent {by_xdp} packets",
            options.dsr
        );
    }
    let stats = nodes[0].dp.lb_stats(1).unwrap();
    assert!(
        stats.packets >= 3,
        "per-service counters count XDP's packets: {stats:?}"
    );
}

#[test]
fn world_reaches_a_remote_backend_through_xdp_acceleration_with_snat() {
    privileged!("world_reaches_a_remote_backend_through_xdp_acceleration_with_snat");
    world_reaches_a_remote_backend_through_xdp(SNAT);
}

#[test]
fn world_reaches_a_remote_backend_through_xdp_acceleration_with_dsr() {
    privileged!("world_reaches_a_remote_backend_through_xdp_acceleration_with_dsr");
    world_reaches_a_remote_backend_through_xdp(DSR);
}

/// A drop the stream could have suffered: not the node-1 endpoint's own
/// IPv6 chatter (router solicitations, MLD reports from `::`), which its
/// program refuses whatever XDP does.
fn stream_drop(k: &MetricsKey) -> bool {
    k.kind == CILIA_METRIC_DROP
        && k.reason != CILIA_DROP_SPOOFED_SOURCE
        && k.reason != CILIA_DROP_UNSUPPORTED_ND
}

#[test]
fn toggling_acceleration_and_the_prefilter_under_a_tcp_stream_loses_nothing() {
    privileged!("toggling_acceleration_and_the_prefilter_under_a_tcp_stream_loses_nothing");
    use std::io::{Read, Write};
    let fabric = cilia_testnet::cluster::Fabric::new(2).unwrap();
    let world_ns = fabric.attach(200).unwrap();
    let root = BpfRoot::new();
    let nodes = [
        real_node(&root, fabric.node(1), 1, TunnelMode::Native, SNAT),
        real_node(&root, fabric.node(2), 2, TunnelMode::Native, SNAT),
    ];
    let _peer_xdp = prepare_acceleration(&fabric, 1);
    let _echo = Echo::start(&nodes[1].ep, &[ECHO_PORT]);
    let dp = &nodes[0].dp;
    let node1 = fabric.node(1);
    // A prefilter of an unrelated CIDR keeps the device's link, so the
    // toggles below swap programs inside it.
    dp.upsert_prefilter(&[PrefilterEntry {
        cidr: "203.0.113.0/24".parse().unwrap(),
        counter: 0,
    }])
    .unwrap();
    node1.run(|| dp.attach_prefilter("eth0")).unwrap();
    let pin = root.path().join("node1/node/prefilter_native_eth0");
    let link_id = cilia_datapath::inspect::link_target(&pin).unwrap().link_id;

    let to = SocketAddr::new(fabric_addr(false, 1), PORT_TO_NODE2);
    let mut stream = world_ns
        .run(|| std::net::TcpStream::connect_timeout(&to, WAIT))
        .unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let chunk: Vec<u8> = (0..32 * 1024u32).map(|i| (i % 253) as u8).collect();
    let drops_before: u64 = dp
        .metrics()
        .unwrap()
        .iter()
        .filter(|(k, _)| stream_drop(k))
        .map(|(_, v)| v.packets)
        .sum();
    let mut sent = Vec::new();
    for round in 0..12 {
        stream.write_all(&chunk).unwrap();
        sent.extend_from_slice(&chunk);
        if round % 2 == 0 {
            node1
                .run(|| dp.attach_lb_acceleration("eth0", false))
                .unwrap();
        } else {
            node1.run(|| dp.detach_lb_acceleration("eth0")).unwrap();
        }
        assert_eq!(
            cilia_datapath::inspect::link_target(&pin).unwrap().link_id,
            link_id,
            "round {round}: the same link, its program swapped"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Acceleration on, then the whole link away (a real detach) mid-stream.
    node1
        .run(|| dp.attach_lb_acceleration("eth0", false))
        .unwrap();
    stream.write_all(&chunk).unwrap();
    sent.extend_from_slice(&chunk);
    let by_xdp = xdp_forwarded(dp);
    node1.run(|| dp.detach_lb_acceleration("eth0")).unwrap();
    node1.run(|| dp.detach_prefilter("eth0")).unwrap();
    assert!(!pin.exists());
    stream.write_all(&chunk).unwrap();
    sent.extend_from_slice(&chunk);
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), sent.len(), "every byte came back");
    assert!(back == sent, "in order and intact");
    assert!(by_xdp > 0, "XDP carried part of the stream");
    let drops_after: u64 = dp
        .metrics()
        .unwrap()
        .iter()
        .filter(|(k, _)| stream_drop(k))
        .map(|(_, v)| v.packets)
        .sum();
    let drops: Vec<_> = dp
        .metrics()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| stream_drop(k))
        .collect();
    assert_eq!(
        drops_after, drops_before,
        "nothing dropped by the datapath: {drops:?}"
    );
}

#[test]
fn acceleration_on_a_device_without_native_xdp_falls_back_to_generic_and_says_why() {
    privileged!("acceleration_on_a_device_without_native_xdp_falls_back_to_generic_and_says_why");
    let ns = Netns::new("cxdpg").unwrap();
    ns.sh("set -e; ip link set lo up; ip link add eth0 type veth peer name peer0")
        .unwrap();
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).unwrap();
    // The loopback device has no native XDP.
    let link = ns.run(|| dp.attach_lb_acceleration("lo", false)).unwrap();
    assert_eq!(link.mode, cilia_datapath::PrefilterMode::Generic);
    assert!(
        link.native_error.is_some(),
        "the driver's refusal is reported: {link:?}"
    );
    assert_eq!(dp.lb_acceleration_links().unwrap().len(), 1);
    assert!(
        dp.prefilter_links().unwrap().is_empty(),
        "the prefilter is not on"
    );
    // Forced generic on a device that has native XDP.
    let forced = ns.run(|| dp.attach_lb_acceleration("eth0", true)).unwrap();
    assert_eq!(forced.mode, cilia_datapath::PrefilterMode::Generic);
    assert_eq!(forced.native_error.as_deref(), Some("generic mode forced"));
    // Adding the prefilter keeps acceleration and the mode (one program).
    let both = ns.run(|| dp.attach_prefilter("eth0")).unwrap();
    assert_eq!(both.mode, cilia_datapath::PrefilterMode::Generic);
    let devices = dp.xdp_devices().unwrap();
    let eth0 = devices.iter().find(|d| d.link.ifname == "eth0").unwrap();
    assert_eq!(
        eth0.features,
        XdpFeatures {
            prefilter: true,
            lb_acceleration: true
        },
        "read back from the attached program"
    );
    // A reload keeps what each device's program does.
    assert_eq!(dp.reload_prefilter().unwrap(), 2);
    let eth0 = dp
        .xdp_devices()
        .unwrap()
        .into_iter()
        .find(|d| d.link.ifname == "eth0")
        .unwrap();
    assert!(eth0.features.prefilter && eth0.features.lb_acceleration);
    dp.detach_lb_acceleration("lo").unwrap();
    dp.detach_lb_acceleration("eth0").unwrap();
    assert!(dp.lb_acceleration_links().unwrap().is_empty());
    assert_eq!(
        dp.prefilter_links().unwrap().len(),
        1,
        "the prefilter stays on eth0"
    );
}

/// Benchmark (ignored by default; `bench/xdp-nodeport.sh` runs it): one
/// TCP transfer of 256 MiB from the world client through node 1's NodePort
/// to a sink on node 2 (SNAT, IPv4, native routing; the sink answers with
/// the byte count), with acceleration off, on, and off again in the same
/// run on the same topology. Every forward segment and every ACK crosses
/// node 1's underlay device, in XDP or at tc. Prints one markdown row per
/// phase and the ratio.
#[test]
#[ignore]
fn bench_nodeport_throughput_with_and_without_xdp_acceleration() {
    privileged!("bench_nodeport_throughput_with_and_without_xdp_acceleration");
    use std::io::{Read, Write};
    const BYTES: usize = 256 << 20;
    const PHASES: usize = 3;
    let fabric = cilia_testnet::cluster::Fabric::new(2).unwrap();
    let world_ns = fabric.attach(200).unwrap();
    let root = BpfRoot::new();
    let nodes = [
        real_node(&root, fabric.node(1), 1, TunnelMode::Native, SNAT),
        real_node(&root, fabric.node(2), 2, TunnelMode::Native, SNAT),
    ];
    let _peer_xdp = prepare_acceleration(&fabric, 1);
    let listener = nodes[1]
        .ep
        .run(|| std::net::TcpListener::bind(SocketAddr::from(([0u16; 8], ECHO_PORT))))
        .unwrap();
    let sink = std::thread::spawn(move || {
        for _ in 0..PHASES {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(WAIT)).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            loop {
                match conn.read(&mut buf).unwrap() {
                    0 => break,
                    n => total += n as u64,
                }
            }
            conn.write_all(&total.to_be_bytes()).unwrap();
        }
    });
    let to = SocketAddr::new(fabric_addr(false, 1), PORT_TO_NODE2);
    let dp = &nodes[0].dp;
    let node1 = fabric.node(1);
    let chunk = vec![0x5au8; 1 << 16];
    let rate = |accel: bool| -> f64 {
        if accel {
            node1
                .run(|| dp.attach_lb_acceleration("eth0", false))
                .unwrap();
        } else {
            node1.run(|| dp.detach_lb_acceleration("eth0")).unwrap();
        }
        let xdp_before = xdp_forwarded(dp);
        let mut conn = world_ns
            .run(|| std::net::TcpStream::connect_timeout(&to, WAIT))
            .unwrap();
        conn.set_read_timeout(Some(WAIT)).unwrap();
        conn.set_write_timeout(Some(WAIT)).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..BYTES / chunk.len() {
            conn.write_all(&chunk).unwrap();
        }
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut count = [0u8; 8];
        conn.read_exact(&mut count).unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(u64::from_be_bytes(count), BYTES as u64);
        let mbit = BYTES as f64 * 8.0 / secs / 1e6;
        let by_xdp = xdp_forwarded(dp) - xdp_before;
        println!(
            "| {} | {} MiB | {mbit:.0} | {by_xdp} |",
            if accel { "native XDP" } else { "tc only" },
            BYTES >> 20
        );
        if accel {
            assert!(by_xdp > 1000, "XDP carried the transfer");
        }
        mbit
    };
    println!("| acceleration | transfer | Mbit/s | packets sent by XDP |");
    println!("|---|---|---|---|");
    let off1 = rate(false);
    let on = rate(true);
    let off2 = rate(false);
    sink.join().unwrap();
    println!(
        "\nratio on / off: {:.2} (off before {off1:.0}, after {off2:.0} Mbit/s)",
        on / ((off1 + off2) / 2.0)
    );
}
