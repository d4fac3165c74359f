//! The two-endpoint policy fixture: endpoints A and B with identities,
//! both in the endpoints map and the ipcache, and builders for the policy
//! entries and TCP packets the policy and attack fixtures send.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cilia_abi::*;
use cilia_datapath::packet::*;
use cilia_datapath::testrun::TestProgram;
use cilia_datapath::BpfDatapath;
use cilia_testnet::BpfRoot;

use super::*;

pub const A_ID: u16 = 1;
pub const B_ID: u16 = 2;
pub const A_IDENTITY: u32 = 1001;
pub const B_IDENTITY: u32 = 1002;

pub fn world4() -> Ipv4Addr {
    "192.0.2.7".parse().unwrap()
}

pub struct Fixture {
    _root: BpfRoot,
    pub dp: BpfDatapath,
    /// Run the generic build of the endpoint programs (configuration from
    /// its map) instead of the specialized ones.
    pub generic: bool,
}

pub fn config(
    id: u16,
    identity: u32,
    mac: Mac,
    node_mac: Mac,
    v6: Ipv6Addr,
    v4: Option<Ipv4Addr>,
) -> EndpointConfig {
    EndpointConfig {
        ipv6: v6.octets(),
        ipv4: v4.map(|a| a.octets()).unwrap_or_default(),
        mac,
        node_mac,
        ifindex: 4000 + u32::from(id),
        identity,
        endpoint_id: id,
        enable_ipv4: u8::from(v4.is_some()),
        monitor: 1,
    }
}

impl Fixture {
    pub fn new() -> Self {
        let root = BpfRoot::new();
        let dp = BpfDatapath::open(root.path()).unwrap();
        for (id, identity, mac, node_mac, ip) in [
            (A_ID, A_IDENTITY, A_MAC, A_NODE_MAC, a6()),
            (B_ID, B_IDENTITY, B_MAC, B_NODE_MAC, b6()),
        ] {
            let info = EndpointInfo {
                ifindex: 4000 + u32::from(id),
                identity,
                endpoint_id: id,
                flags: 0,
                mac,
                node_mac,
            };
            dp.upsert_endpoint(IpAddr::V6(ip), info).unwrap();
            dp.upsert_ipcache(IpcacheKey::new(IpAddr::V6(ip), 128), identity)
                .unwrap();
            // As the agent does: an endpoint nothing selects has an empty
            // policy map (none at all fails closed).
            dp.set_policy(id, &BTreeMap::new()).unwrap();
        }
        dp.upsert_endpoint(
            IpAddr::V4(a4()),
            EndpointInfo {
                ifindex: 4001,
                identity: A_IDENTITY,
                endpoint_id: A_ID,
                flags: 0,
                mac: A_MAC,
                node_mac: A_NODE_MAC,
            },
        )
        .unwrap();
        Self {
            _root: root,
            dp,
            generic: false,
        }
    }

    /// The bpffs directory the datapath pins under.
    #[allow(dead_code)] // not every test binary looks at pins
    pub fn path(&self) -> &std::path::Path {
        self._root.path()
    }

    /// The same endpoints, their packets run by the generic programs.
    pub fn generic() -> Self {
        Self {
            generic: true,
            ..Self::new()
        }
    }

    fn program(&self, config: &EndpointConfig, from_container: bool) -> TestProgram {
        use cilia_datapath::object::{PROG_FROM_CONTAINER, PROG_TO_CONTAINER};
        let name = if from_container {
            PROG_FROM_CONTAINER
        } else {
            PROG_TO_CONTAINER
        };
        match (self.generic, from_container) {
            (true, _) => self.dp.test_generic_program(Some(config), name).unwrap(),
            (false, true) => self.dp.test_program(config).unwrap(),
            (false, false) => self.dp.test_program_to_container(config).unwrap(),
        }
    }

    /// Endpoint A's program from the container (dual stack).
    pub fn a(&self) -> TestProgram {
        self.program(&a_config(), true)
    }

    /// Endpoint B's program from the container (IPv6 only).
    pub fn b(&self) -> TestProgram {
        self.program(&b_config(), true)
    }

    /// Endpoint A's program toward the container.
    pub fn a_to_container(&self) -> TestProgram {
        self.program(&a_config(), false)
    }

    /// Endpoint B's program toward the container.
    pub fn b_to_container(&self) -> TestProgram {
        self.program(&b_config(), false)
    }
}

fn a_config() -> EndpointConfig {
    config(A_ID, A_IDENTITY, A_MAC, A_NODE_MAC, a6(), Some(a4()))
}

fn b_config() -> EndpointConfig {
    config(B_ID, B_IDENTITY, B_MAC, B_NODE_MAC, b6(), None)
}

/// The enforcement marker of direction `dir` alone (`enforce_both`: both).
pub fn enforce(dir: u8) -> (PolicyKey, PolicyValue) {
    marker(Enforcement {
        ingress: dir == CILIA_DIR_INGRESS,
        egress: dir == CILIA_DIR_EGRESS,
        audit: false,
    })
}

/// The enforcement marker of both directions.
pub fn enforce_both() -> (PolicyKey, PolicyValue) {
    marker(Enforcement {
        ingress: true,
        egress: true,
        audit: false,
    })
}

/// The enforcement marker of `e` (see "The enforcement marker" in ARCHITECTURE.md).
pub fn marker(e: Enforcement) -> (PolicyKey, PolicyValue) {
    e.encode().into_iter().next().unwrap()
}

/// An ingress allow of TCP port `port` from endpoint A's identity.
pub fn allow_tcp_from_a(port: u16) -> (PolicyKey, PolicyValue) {
    rule(
        CILIA_DIR_INGRESS,
        A_IDENTITY,
        6,
        port,
        16,
        CILIA_VERDICT_ALLOW,
    )
}

pub fn rule(
    dir: u8,
    identity: u32,
    proto: u8,
    port: u16,
    port_bits: u32,
    verdict: u8,
) -> (PolicyKey, PolicyValue) {
    let prefixlen = if proto == 0 { 40 } else { 48 + port_bits };
    (
        PolicyKey {
            prefixlen,
            identity: identity.to_be(),
            direction: dir,
            proto,
            dport: port.to_be(),
        },
        PolicyValue {
            verdict,
            rule: 7,
            ..Default::default()
        },
    )
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 0x50;
    t[13] = flags;
    t
}

pub fn a_to_b(dport: u16) -> Vec<u8> {
    eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(a6(), b6(), IPPROTO_TCP, 64, &tcp(40000, dport, 0x02)),
    )
}

pub fn b_to_a(sport: u16) -> Vec<u8> {
    eth(
        B_NODE_MAC,
        B_MAC,
        ETH_P_IPV6,
        &ipv6(b6(), a6(), IPPROTO_TCP, 64, &tcp(sport, 40000, 0x12)),
    )
}

pub fn set(dp: &mut BpfDatapath, id: u16, entries: &[(PolicyKey, PolicyValue)]) {
    let map: BTreeMap<_, _> = entries.iter().copied().collect();
    assert_eq!(
        map.len(),
        entries.len(),
        "two entries under one key (both directions enforced: enforce_both())"
    );
    dp.set_policy(id, &map).unwrap();
}

pub fn drain_events(rb: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        out.extend(Event::from_bytes(&item));
    }
    out
}

/// B admits A on every port but TCP/22, which it denies outright.
pub fn b_denies_ssh_from_a(fx: &mut Fixture) {
    set(
        &mut fx.dp,
        B_ID,
        &[
            enforce(CILIA_DIR_INGRESS),
            rule(CILIA_DIR_INGRESS, A_IDENTITY, 0, 0, 0, CILIA_VERDICT_ALLOW),
            rule(CILIA_DIR_INGRESS, A_IDENTITY, 6, 22, 16, CILIA_VERDICT_DENY),
        ],
    );
}

/// B admits A on one protocol and port only.
pub fn b_admits_from_a(fx: &mut Fixture, proto: u8, port: u16) {
    set(
        &mut fx.dp,
        B_ID,
        &[
            enforce(CILIA_DIR_INGRESS),
            rule(
                CILIA_DIR_INGRESS,
                A_IDENTITY,
                proto,
                port,
                16,
                CILIA_VERDICT_ALLOW,
            ),
        ],
    );
}

/// B admits A on TCP/80 only.
pub fn b_admits_http_from_a(fx: &mut Fixture) {
    b_admits_from_a(fx, 6, 80);
}

/// A may send DNS (UDP/53) to the world, nothing else.
pub fn a_sends_only_dns_to_world(fx: &mut Fixture) {
    set(
        &mut fx.dp,
        A_ID,
        &[
            enforce(CILIA_DIR_EGRESS),
            rule(
                CILIA_DIR_EGRESS,
                CILIA_ID_WORLD,
                17,
                53,
                16,
                CILIA_VERDICT_ALLOW,
            ),
        ],
    );
}
