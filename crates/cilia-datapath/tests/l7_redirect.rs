//! L7 redirect with real traffic (see "L7 redirect" in
//! docs/ARCHITECTURE.md): a node namespace with the proxy's policy routing,
//! client C and server S as endpoints with the real programs and maps, S's
//! ingress entry for C on TCP/80 naming a proxy port, and a transparent TCP
//! relay in the node playing the proxy (IP_TRANSPARENT listener on the proxy
//! port, SO_MARK FROM_PROXY, upstream bound to the client's address).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cilia_abi::*;
use cilia_datapath::BpfDatapath;
use cilia_testnet::{BpfRoot, Netns};

mod common;
use common::relay::{Relay, PROXY_PORT};
use common::serve::{exchange, Echo};
use common::*;

const C_ID: u16 = 1;
const S_ID: u16 = 2;
const C_IDENTITY: u32 = 1001;
const S_IDENTITY: u32 = 1002;

struct Topology {
    node: Netns,
    c: Netns,
    s: Netns,
    dp: BpfDatapath,
    // Dropped last: the links pinned in it keep the programs attached.
    _root: BpfRoot,
}

/// The node with its router device and proxy routing, endpoints C (the
/// client, A's addresses) and S (the server, B's) wired to it and attached.
fn topology(prefix: &str) -> Topology {
    let root = BpfRoot::new();
    let node = Netns::new(&format!("{prefix}n")).unwrap();
    let c = Netns::new(&format!("{prefix}c")).unwrap();
    let s = Netns::new(&format!("{prefix}s")).unwrap();
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let mark = format!("{CILIA_MARK_TO_PROXY:#x}/{CILIA_MARK_MASK:#x}");
    let (table, pref) = (CILIA_PROXY_ROUTE_TABLE, CILIA_PROXY_RULE_PRIORITY);
    node.sh(&format!(
        "set -e
         ip link add cilia_host type veth peer name cilia_net
         ip link set cilia_host up; ip link set cilia_net up
         ip addr add {gw6}/128 dev cilia_host nodad; ip addr add {gw4}/32 dev cilia_host
         ip rule add fwmark {mark} lookup {table} pref {pref}
         ip route add local 0.0.0.0/0 dev lo table {table}
         ip -6 rule add fwmark {mark} lookup {table} pref {pref}
         ip -6 route add local ::/0 dev lo table {table}",
        gw6 = gw6(),
        gw4 = gw4(),
    ))
    .unwrap();
    let dp = BpfDatapath::open(root.path()).unwrap();
    for (id, identity, ns, host_if, m, node_m, v6, v4) in [
        (C_ID, C_IDENTITY, &c, "lxcc", A_MAC, A_NODE_MAC, a6(), a4()),
        (S_ID, S_IDENTITY, &s, "lxcs", B_MAC, B_NODE_MAC, b6(), b4()),
    ] {
        node.sh(&format!(
            "set -e
             ip link add {host_if} address {hm} type veth peer name eth0 address {em} netns {ns}
             ip link set {host_if} up
             ip route add {v6}/128 dev {host_if}; ip route add {v4}/32 dev {host_if}",
            hm = mac(node_m),
            em = mac(m),
            ns = ns.name(),
        ))
        .unwrap();
        ns.sh(&format!(
            "set -e
             ip addr add {v6}/128 dev eth0 nodad; ip addr add {v4}/32 dev eth0
             ip link set eth0 up
             ip -6 route add {gw6}/128 dev eth0; ip -6 route add default via {gw6} dev eth0
             ip route add {gw4}/32 dev eth0; ip route add default via {gw4} dev eth0",
            gw6 = gw6(),
            gw4 = gw4(),
        ))
        .unwrap();
        let ifindex = node.run(|| nix::net::if_::if_nametoindex(host_if).unwrap());
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
        // Its policy map first, as the agent does (empty: nothing selects it yet).
        dp.set_policy(id, &Default::default()).unwrap();
        node.run(|| dp.attach_endpoint(&config, host_if)).unwrap();
        let info = EndpointInfo {
            ifindex,
            identity,
            endpoint_id: id,
            flags: 0,
            mac: m,
            node_mac: node_m,
        };
        for (ip, len) in [(IpAddr::V6(v6), 128), (IpAddr::V4(v4), 32)] {
            dp.upsert_endpoint(ip, info).unwrap();
            dp.upsert_ipcache(IpcacheKey::new(ip, len), identity)
                .unwrap();
        }
    }
    // S admits C on TCP/80 through the proxy, on TCP/8080 directly.
    let entry = |port: u16, proxy_port: u16| PolicyEntry {
        direction: Direction::Ingress,
        identity: C_IDENTITY,
        proto: 6,
        port,
        port_prefix_len: 16,
        verdict: Verdict::Allow,
        rule: 7,
        proxy_port,
    };
    let policy = EndpointPolicy {
        enforcement: Enforcement {
            ingress: true,
            egress: false,
            audit: false,
        },
        entries: vec![entry(80, PROXY_PORT), entry(8080, 0)],
    };
    dp.set_policy(S_ID, &policy.encode()).unwrap();
    Topology {
        node,
        c,
        s,
        dp,
        _root: root,
    }
}

/// C sends `hello` to `server` and reads the answer: (its own address, the
/// answer), or the connect error.
fn request(
    c: &Netns,
    server: SocketAddr,
    connect: Duration,
) -> std::io::Result<(SocketAddr, Vec<u8>)> {
    exchange(c, server, b"hello", connect)
}

fn conntrack(dp: &BpfDatapath) -> Vec<CtEntry> {
    dp.list_ct()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| CtEntry::decode(k, v))
        .collect()
}

/// The whole story for one family: C reaches S:80 through the relay, with
/// S seeing C's address; a flow without a proxy port goes directly; with
/// the relay gone, C's SYNs are dropped as "L7 proxy unavailable".
fn proxied_flow_reaches_the_server_through_the_relay(prefix: &str, c_ip: IpAddr, s_ip: IpAddr) {
    let t = topology(prefix);
    let mut relay = Relay::start(&t.node);
    // The server in S, on the proxied port and on the direct one.
    let server = Echo::start(&t.s, &[80, 8080]);

    // Through the proxy.
    let s80 = SocketAddr::new(s_ip, 80);
    let (client, answer) = request(&t.c, s80, WAIT).unwrap();
    assert_eq!(answer, b"hello");
    assert_eq!(client.ip(), c_ip);
    assert_eq!(
        relay.accepted(),
        vec![(client, s80)],
        "the relay's socket has the original destination as its local address"
    );
    let upstream_peer = server.peers()[0];
    assert_eq!(upstream_peer.ip(), c_ip, "S sees C's address");
    assert_ne!(upstream_peer, client, "the upstream leg is another flow");
    let ct = conntrack(&t.dp);
    let leg = |src: SocketAddr| {
        ct.iter()
            .find(|e| e.source == src && e.destination == s80)
            .unwrap_or_else(|| panic!("no conntrack entry {src} -> {s80}: {ct:?}"))
    };
    let client_leg = leg(client);
    assert!(
        client_leg.to_proxy && !client_leg.from_proxy,
        "{client_leg:?}"
    );
    assert_eq!(client_leg.proxy_port, PROXY_PORT);
    assert_eq!(client_leg.src_identity, C_IDENTITY);
    let upstream_leg = leg(upstream_peer);
    assert!(
        upstream_leg.from_proxy && !upstream_leg.to_proxy,
        "{upstream_leg:?}"
    );
    assert_eq!(
        upstream_leg.src_identity, C_IDENTITY,
        "the client's identity"
    );

    // A flow without a proxy port goes directly, from C's own socket.
    let s8080 = SocketAddr::new(s_ip, 8080);
    let (client, answer) = request(&t.c, s8080, WAIT).unwrap();
    assert_eq!(answer, b"hello");
    assert_eq!(server.peers()[1], client, "S sees C's own connection");
    assert_eq!(relay.accepted().len(), 1, "the relay saw nothing of it");
    let ct = conntrack(&t.dp);
    let direct = ct
        .iter()
        .find(|e| e.source == client && e.destination == s8080)
        .unwrap();
    assert!(!direct.to_proxy && !direct.from_proxy && direct.proxy_port == 0);

    // No proxy: fail closed.
    relay.stop();
    let before = drops(&t.dp, CILIA_DROP_PROXY_UNAVAILABLE);
    let err = request(&t.c, s80, Duration::from_millis(1500)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(drops(&t.dp, CILIA_DROP_PROXY_UNAVAILABLE) > before);
    assert_eq!(server.peers().len(), 2, "S never saw the attempt");
}

#[test]
fn ipv6_proxied_flow_reaches_the_server_through_the_proxy_and_fails_closed_without_it() {
    privileged!("ipv6_l7_redirect");
    proxied_flow_reaches_the_server_through_the_relay("cl7v6", IpAddr::V6(a6()), IpAddr::V6(b6()));
}

#[test]
fn ipv4_proxied_flow_reaches_the_server_through_the_proxy_and_fails_closed_without_it() {
    privileged!("ipv4_l7_redirect");
    proxied_flow_reaches_the_server_through_the_relay("cl7v4", IpAddr::V4(a4()), IpAddr::V4(b4()));
}
