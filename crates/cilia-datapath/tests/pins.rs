//! Pins left by an earlier agent: shared maps are checked by kernel type,
//! max_entries, key/value size and the pinned ABI version, and recreated
//! when they do not match; an endpoint's pinned links are read back (the
//! device they are attached to, the configuration baked into the program).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use aya::maps::{Array, MapData, MapInfo};
use cilia_abi::EndpointConfig;
use cilia_datapath::object::{MAP_CT, SHARED_MAPS};
use cilia_datapath::{BpfDatapath, PIN_ABI_VERSION};
use cilia_testnet::{BpfRoot, Netns};

mod common;
use common::*;

fn pin_array(path: &std::path::Path, value: u32) {
    let _ = std::fs::remove_file(path);
    let mut a = Array::<MapData, u32>::create(1, 0).unwrap();
    a.set(0, value, 0).unwrap();
    a.pin(path).unwrap();
}

#[test]
fn reopening_pins_of_this_build_recreates_nothing() {
    privileged!("pins_reopen");
    let root = BpfRoot::new();
    let first = BpfDatapath::open(root.path()).unwrap();
    assert!(first.recreated_maps().is_empty());
    let second = BpfDatapath::open(root.path()).unwrap();
    assert!(
        second.recreated_maps().is_empty(),
        "{:?}",
        second.recreated_maps()
    );
}

#[test]
fn a_pinned_map_of_another_type_and_size_is_recreated_and_reported() {
    privileged!("pins_wrong_type");
    let root = BpfRoot::new();
    drop(BpfDatapath::open(root.path()).unwrap());
    // An older build's conntrack map: an array, of other sizes.
    let ct = root.path().join("maps").join(MAP_CT);
    pin_array(&ct, 7);
    let dp = BpfDatapath::open(root.path()).unwrap();
    let recreated = dp.recreated_maps();
    assert_eq!(recreated.len(), 1, "{recreated:?}");
    assert_eq!(recreated[0].name, MAP_CT);
    assert!(recreated[0].reason.contains("type"), "{recreated:?}");
    assert!(recreated[0].reason.contains("key size"), "{recreated:?}");
    let info = MapInfo::from_pin(&ct).unwrap();
    assert_eq!(
        info.key_size() as usize,
        std::mem::size_of::<cilia_abi::CtKey>()
    );
    // The new map works.
    assert!(dp.list_ct().unwrap().is_empty());
}

#[test]
fn pins_of_another_abi_version_are_all_recreated() {
    privileged!("pins_abi_version");
    let root = BpfRoot::new();
    drop(BpfDatapath::open(root.path()).unwrap());
    pin_array(
        &root.path().join("maps").join("cilia_abi"),
        PIN_ABI_VERSION + 1,
    );
    let dp = BpfDatapath::open(root.path()).unwrap();
    let names: Vec<&str> = dp
        .recreated_maps()
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(names.len(), SHARED_MAPS.len(), "{names:?}");
    assert!(dp.recreated_maps()[0].reason.contains("ABI version"));
    drop(dp);
    let again = BpfDatapath::open(root.path()).unwrap();
    assert!(
        again.recreated_maps().is_empty(),
        "the new version is pinned"
    );
}

fn config(ifindex: u32, identity: u32) -> EndpointConfig {
    EndpointConfig {
        ipv6: a6().octets(),
        ipv4: a4().octets(),
        mac: A_MAC,
        node_mac: A_NODE_MAC,
        ifindex,
        identity,
        endpoint_id: 9,
        enable_ipv4: 1,
        monitor: 1,
    }
}

#[test]
fn pinned_links_report_their_device_and_whether_their_program_matches_the_record() {
    privileged!("pins_links");
    let root = BpfRoot::new();
    let ns = Netns::new("cpin").unwrap();
    ns.ip(&[
        "link", "add", "lxc9", "type", "veth", "peer", "name", "peer9",
    ])
    .unwrap();
    let ifindex: u32 = ns.run(|| nix::net::if_::if_nametoindex("lxc9").unwrap());
    let dp = BpfDatapath::open(root.path()).unwrap();
    let attached = config(ifindex, 300);
    ns.run(|| dp.attach_endpoint(&attached, "lxc9")).unwrap();

    let links = dp.check_links(&attached).unwrap().unwrap();
    assert_eq!(links.len(), 2);
    assert!(links
        .iter()
        .all(|l| l.ifindex == ifindex && l.config_matches));

    // The record says another identity: the program is stale.
    let links = dp.check_links(&config(ifindex, 301)).unwrap().unwrap();
    assert!(links.iter().all(|l| !l.config_matches));

    // The device is gone: the links point nowhere.
    ns.ip(&["link", "del", "lxc9"]).unwrap();
    let links = dp.check_links(&attached).unwrap().unwrap();
    assert!(links.iter().all(|l| l.ifindex == 0), "{links:?}");

    dp.detach_endpoint(9).unwrap();
    assert!(dp.check_links(&attached).unwrap().is_none());
}

#[test]
fn an_endpoint_policy_map_of_another_layout_is_recreated_when_written() {
    privileged!("pins_policy_map");
    let root = BpfRoot::new();
    let dp = BpfDatapath::open(root.path()).unwrap();
    let pin = root.path().join("policy").join("ep5_a");
    pin_array(&pin, 1);
    let entries = std::collections::BTreeMap::new();
    let update = dp.set_policy(5, &entries).unwrap();
    assert_eq!((update.added, update.removed), (0, 0));
    let info = MapInfo::from_pin(&pin).unwrap();
    assert_eq!(info.max_entries(), cilia_abi::CILIA_POLICY_MAX);
    assert_eq!(dp.get_policy(5).unwrap(), Some(entries));
}

#[test]
fn pins_of_a_build_before_multi_node_recreate_only_the_ipcache() {
    privileged!("pins_before_multi_node");
    use aya::maps::LpmTrie;
    use cilia_datapath::object::{MAP_IPCACHE, MAP_NODES, MAP_NODE_CONFIG};
    let root = BpfRoot::new();
    drop(BpfDatapath::open(root.path()).unwrap());
    let maps = root.path().join("maps");
    // That build's ipcache value was identity and flags only (8 bytes),
    // and it had no node maps.
    for name in [MAP_IPCACHE, MAP_NODES, MAP_NODE_CONFIG] {
        std::fs::remove_file(maps.join(name)).unwrap();
    }
    let old =
        LpmTrie::<MapData, [u8; 20], [u8; 8]>::create(cilia_abi::CILIA_IPCACHE_MAX, 1).unwrap();
    old.pin(maps.join(MAP_IPCACHE)).unwrap();
    let dp = BpfDatapath::open(root.path()).unwrap();
    let recreated = dp.recreated_maps();
    assert_eq!(recreated.len(), 1, "{recreated:?}");
    assert_eq!(recreated[0].name, MAP_IPCACHE);
    assert!(
        recreated[0].reason.contains("value size 8"),
        "{recreated:?}"
    );
    for name in [MAP_NODES, MAP_NODE_CONFIG] {
        assert!(maps.join(name).exists(), "{name} created");
    }
    assert!(dp.nodes().unwrap().is_empty());
}
