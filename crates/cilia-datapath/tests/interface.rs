//! The domain-level [`Datapath`] interface on the kernel: typed rows in,
//! typed rows out, the same encoding the fake stores.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::IpAddr;

use cilia_abi::{
    CtEntry, Direction, EndpointPolicy, Enforcement, IpcacheEntry, PolicyDelta, PolicyEntry,
    Verdict,
};
use cilia_datapath::testrun::{TC_ACT_REDIRECT, TC_ACT_SHOT};
use cilia_datapath::Datapath;

mod common;
use common::fixture::*;
use common::*;

fn b_allows_a(port: u16, verdict: Verdict) -> PolicyEntry {
    PolicyEntry {
        direction: Direction::Ingress,
        identity: A_IDENTITY,
        proto: 6,
        port,
        port_prefix_len: 16,
        verdict,
        rule: 9,
        proxy_port: 0,
    }
}

fn ingress_enforced(entries: Vec<PolicyEntry>) -> EndpointPolicy {
    EndpointPolicy {
        enforcement: Enforcement {
            ingress: true,
            ..Default::default()
        },
        entries,
    }
}

#[test]
fn endpoint_policy_reads_back_as_it_was_set() {
    privileged!("iface_policy_roundtrip");
    let fx = Fixture::new();
    let dp: &dyn Datapath = &fx.dp;
    let policy = ingress_enforced(vec![b_allows_a(80, Verdict::Allow)]);
    dp.set_endpoint_policy(B_ID, &policy).unwrap();
    assert_eq!(dp.endpoint_policy(B_ID).unwrap(), Some(policy));
    dp.remove_endpoint_policy(B_ID).unwrap();
    assert_eq!(dp.endpoint_policy(B_ID).unwrap(), None);
}

#[test]
fn incremental_policy_update_changes_verdicts_in_place() {
    privileged!("iface_policy_update");
    let fx = Fixture::new();
    let dp: &dyn Datapath = &fx.dp;
    dp.set_endpoint_policy(
        B_ID,
        &ingress_enforced(vec![b_allows_a(80, Verdict::Allow)]),
    )
    .unwrap();
    let a = fx.a();
    assert_eq!(a.run(&a_to_b(81)).unwrap().verdict, TC_ACT_SHOT);
    let update = dp
        .update_endpoint_policy(
            B_ID,
            &PolicyDelta {
                upserts: vec![b_allows_a(81, Verdict::Allow)],
                removes: vec![b_allows_a(80, Verdict::Allow)],
                enforcement: None,
            },
        )
        .unwrap();
    assert_eq!((update.added, update.removed), (1, 1));
    assert_eq!(a.run(&a_to_b(81)).unwrap().verdict, TC_ACT_REDIRECT);
    assert_eq!(a.run(&a_to_b(80)).unwrap().verdict, TC_ACT_SHOT);
    let policy = dp.endpoint_policy(B_ID).unwrap().unwrap();
    assert_eq!(policy.entries, vec![b_allows_a(81, Verdict::Allow)]);
}

#[test]
fn ipcache_rows_publish_and_withdraw() {
    privileged!("iface_ipcache");
    let fx = Fixture::new();
    let dp: &dyn Datapath = &fx.dp;
    let world = IpcacheEntry {
        prefix: "203.0.113.0/24".parse().unwrap(),
        identity: 7777,
        tunnel: None,
    };
    dp.publish_ipcache(&[world]).unwrap();
    assert!(dp.ipcache().unwrap().contains(&world));
    dp.withdraw_ipcache(&[world.prefix]).unwrap();
    assert!(!dp.ipcache().unwrap().contains(&world));
}

#[test]
fn conntrack_reads_as_typed_rows_of_the_flows_the_program_made() {
    privileged!("iface_conntrack");
    let fx = Fixture::new();
    let dp: &dyn Datapath = &fx.dp;
    dp.set_endpoint_policy(
        B_ID,
        &ingress_enforced(vec![b_allows_a(80, Verdict::Allow)]),
    )
    .unwrap();
    assert_eq!(fx.a().run(&a_to_b(80)).unwrap().verdict, TC_ACT_REDIRECT);
    let rows: Vec<CtEntry> = dp.conntrack().unwrap();
    let flow = rows
        .iter()
        .find(|r| r.destination.port() == 80)
        .expect("a conntrack row for A -> B:80");
    assert_eq!(flow.source.ip(), IpAddr::V6(a6()));
    assert_eq!(flow.destination.ip(), IpAddr::V6(b6()));
    assert_eq!(
        (flow.src_identity, flow.dst_identity),
        (A_IDENTITY, B_IDENTITY)
    );
    dp.remove_conntrack(flow).unwrap();
    assert!(!dp.conntrack().unwrap().contains(flow));
}

#[test]
fn endpoints_read_back_as_rows() {
    privileged!("iface_endpoints");
    let fx = Fixture::new();
    let dp: &dyn Datapath = &fx.dp;
    let rows = dp.endpoints().unwrap();
    let b = rows.iter().find(|r| r.ip == IpAddr::V6(b6())).unwrap();
    assert_eq!((b.endpoint_id, b.identity), (B_ID, B_IDENTITY));
    dp.withdraw_endpoint(b.ip).unwrap();
    assert!(!dp.endpoints().unwrap().iter().any(|r| r.ip == b.ip));
}

#[test]
fn one_shared_handle_serves_policy_writes_and_conntrack_walks_from_many_threads() {
    privileged!("iface_shared");
    let fx = Fixture::new();
    let dp: std::sync::Arc<dyn Datapath> = std::sync::Arc::new(fx.dp);
    let threads: Vec<_> = (0..4u16)
        .map(|t| {
            let dp = dp.clone();
            std::thread::spawn(move || {
                for round in 0..20u16 {
                    let id = 100 + t;
                    let policy = ingress_enforced(vec![b_allows_a(1000 + round, Verdict::Allow)]);
                    dp.set_endpoint_policy(id, &policy).unwrap();
                    assert_eq!(dp.endpoint_policy(id).unwrap(), Some(policy));
                    dp.conntrack().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for id in 100..104 {
        let policy = dp.endpoint_policy(id).unwrap().unwrap();
        assert_eq!(policy.entries, vec![b_allows_a(1019, Verdict::Allow)]);
        dp.remove_endpoint_policy(id).unwrap();
    }
}

/// The node rows behave the same on the kernel and on the fake.
fn node_rows_round_trip(dp: &dyn Datapath) {
    use cilia_abi::{NodeConfig, TunnelMode};
    let config = NodeConfig {
        tunnel_mode: TunnelMode::Vxlan,
        tunnel_ifindex: 12,
        underlay_ifindex: 2,
        tunnel_port: 8472,
    };
    assert_eq!(dp.node_config().unwrap(), NodeConfig::default());
    dp.set_node_config(&config).unwrap();
    assert_eq!(dp.node_config().unwrap(), config);
    let nodes: Vec<IpAddr> = ["198.51.100.2", "2001:db8:100::2"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    dp.publish_nodes(&nodes).unwrap();
    assert_eq!(dp.nodes().unwrap(), nodes);
    dp.withdraw_nodes(&nodes[..1]).unwrap();
    dp.withdraw_nodes(&nodes[..1]).unwrap();
    assert_eq!(dp.nodes().unwrap(), nodes[1..]);
    let remote = IpcacheEntry {
        prefix: "fd00:c1a:2::/112".parse().unwrap(),
        identity: 2,
        tunnel: Some(nodes[0]),
    };
    dp.publish_ipcache(&[remote]).unwrap();
    assert!(dp.ipcache().unwrap().contains(&remote));
    assert_eq!(dp.node_links().unwrap(), Default::default());
}

#[test]
fn node_config_nodes_and_remote_prefixes_read_back_as_rows() {
    privileged!("iface_node_rows");
    let fx = Fixture::new();
    node_rows_round_trip(&fx.dp);
    node_rows_round_trip(&cilia_datapath::fake::FakeDatapath::new());
}
