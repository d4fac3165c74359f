//! The XDP prefilter end to end, through the CLI: an agent in a node
//! namespace whose device `eth0` leads to a "world" namespace holding an
//! allowed source (192.0.2.2, 2001:db8:1::2) and sources of a listed CIDR
//! (203.0.113.9, 2001:db8:bad::9). Listed sources are dropped on the
//! device while the allowed one flows; the CIDRs survive an agent restart
//! (and the prefilter keeps dropping while the agent is gone); errors name
//! the CIDR; without a device the CIDRs are kept and `status` says so.
//! Documentation addresses only.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use cilia_testnet::cluster::poll;
use cilia_testnet::{privileged, AgentOptions, Netns, TestAgent};

const NODE4: &str = "192.0.2.1";
const NODE6: &str = "2001:db8:1::1";
const ALLOWED4: &str = "192.0.2.2";
const ALLOWED6: &str = "2001:db8:1::2";
const LISTED4: &str = "203.0.113.9";
const LISTED6: &str = "2001:db8:bad::9";

/// A node namespace wired to a new world namespace (returned second).
fn node_and_world() -> (Netns, Netns) {
    let world = Netns::new("cpfw").unwrap();
    let node = Netns::new("cnode").unwrap();
    node.sh(&format!(
        "set -e
         ip link add eth0 type veth peer name eth0 netns {w}
         ip addr add {NODE4}/24 dev eth0
         ip addr add {NODE6}/64 dev eth0 nodad
         ip link set eth0 up
         ip route add {LISTED4}/32 via {ALLOWED4}
         ip -6 route add {LISTED6}/128 via {ALLOWED6}",
        w = world.name()
    ))
    .unwrap();
    world
        .sh(&format!(
            "set -e
             ip addr add {ALLOWED4}/24 dev eth0
             ip addr add {LISTED4}/32 dev eth0
             ip addr add {ALLOWED6}/64 dev eth0 nodad
             ip addr add {LISTED6}/128 dev eth0 nodad
             ip link set eth0 up"
        ))
        .unwrap();
    (node, world)
}

/// Whether one of two pings from `src` (in `world`) to `dst` came back.
fn reaches(world: &Netns, src: &str, dst: &str) -> bool {
    world
        .command("ping")
        .args(["-n", "-c", "2", "-i", "0.2", "-W", "1", "-I", src, dst])
        .output()
        .unwrap()
        .status
        .success()
}

fn stderr_of(agent: &TestAgent, args: &[&str]) -> String {
    let out = agent.cli(args);
    assert!(!out.status.success(), "cilia {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// (packets, bytes) of `cidr` in `cilia prefilter list -o json`.
fn counts(agent: &TestAgent, cidr: &str) -> (u64, u64) {
    let list = agent.cli_json(&["prefilter", "list"]);
    let c = list["cidrs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cidr"] == cidr)
        .unwrap_or_else(|| panic!("{cidr} not listed: {list}"));
    (c["packets"].as_u64().unwrap(), c["bytes"].as_u64().unwrap())
}

#[test]
fn listed_sources_are_dropped_on_the_device_and_survive_a_restart() {
    privileged!("listed_sources_are_dropped_on_the_device_and_survive_a_restart");
    let (node, world) = node_and_world();
    let mut agent = TestAgent::start_in(
        node,
        AgentOptions::default(),
        vec!["--prefilter-device".into(), "eth0".into()],
    )
    .unwrap();
    let status = agent.cli_ok(&["status"]);
    assert!(
        status.contains("Prefilter:    eth0 (native); 0 CIDRs"),
        "{status}"
    );
    for (src, dst) in [(LISTED4, NODE4), (LISTED6, NODE6)] {
        assert!(reaches(&world, src, dst), "{src} before any CIDR");
    }

    let out = agent.cli_ok(&[
        "prefilter",
        "update",
        "--cidr",
        "203.0.113.0/24",
        "--cidr",
        "2001:db8:bad::/48",
    ]);
    assert!(out.contains("Devices: eth0 (native)"), "{out}");
    assert!(out.contains("203.0.113.0/24"), "{out}");
    for (src, dst, listed) in [
        (LISTED4, NODE4, true),
        (LISTED6, NODE6, true),
        (ALLOWED4, NODE4, false),
        (ALLOWED6, NODE6, false),
    ] {
        assert_eq!(!reaches(&world, src, dst), listed, "{src} -> {dst}");
    }
    let (packets, bytes) = counts(&agent, "203.0.113.0/24");
    assert!(
        packets >= 2 && bytes >= 2 * 98,
        "{packets} packets, {bytes} bytes"
    );
    assert!(counts(&agent, "2001:db8:bad::/48").0 >= 2);
    let metrics = agent.scrape_metrics();
    assert!(
        metrics.contains("cilia_prefilter_drops_total{cidr=\"203.0.113.0/24\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("cilia_prefilter_drop_bytes_total{cidr=\"2001:db8:bad::/48\"}"));

    // Errors name the CIDR and the reason, and change nothing.
    for (cidr, reason) in [
        ("198.51.100.7/24", "host bits set"),
        ("198.51.100.0", "not a CIDR"),
        ("2001:db8::/129", "not a CIDR"),
    ] {
        let e = stderr_of(
            &agent,
            &[
                "prefilter",
                "update",
                "--cidr",
                "198.51.100.0/24",
                "--cidr",
                cidr,
            ],
        );
        assert!(e.contains(cidr) && e.contains(reason), "{cidr}: {e}");
    }
    let e = stderr_of(
        &agent,
        &["prefilter", "delete", "--cidr", "198.51.100.0/24"],
    );
    assert!(e.contains("198.51.100.0/24: not in the prefilter"), "{e}");
    assert_eq!(
        agent.cli_json(&["prefilter", "list"])["cidrs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // The agent dies: the pinned prefilter keeps dropping. Restarted, it
    // has the same CIDRs (and their counts) and device.
    agent.kill9();
    assert!(!reaches(&world, LISTED4, NODE4));
    assert!(reaches(&world, ALLOWED4, NODE4));
    agent.spawn().unwrap();
    let after = counts(&agent, "203.0.113.0/24");
    assert!(
        after.0 >= packets + 2,
        "counts kept across the restart: {after:?}"
    );
    assert!(!reaches(&world, LISTED6, NODE6));
    let status = agent.cli_ok(&["status"]);
    assert!(
        status.contains("Prefilter:    eth0 (native); 2 CIDRs"),
        "{status}"
    );

    // Delete: the source passes again, the other CIDR still drops.
    agent.cli_ok(&["prefilter", "delete", "--cidr", "203.0.113.0/24"]);
    assert!(reaches(&world, LISTED4, NODE4));
    assert!(!reaches(&world, LISTED6, NODE6));

    // Started without the flag, the agent detaches the prefilter; the
    // CIDR stays stored and listed.
    agent.kill9();
    agent.set_args(Vec::new());
    agent.spawn().unwrap();
    assert!(poll(Duration::from_secs(3), || reaches(
        &world, LISTED6, NODE6
    )));
    let list = agent.cli_json(&["prefilter", "list"]);
    assert_eq!(list["devices"].as_array().unwrap().len(), 0, "{list}");
    assert_eq!(list["cidrs"][0]["cidr"], "2001:db8:bad::/48");
}

#[test]
fn without_a_device_cidrs_are_stored_and_status_says_not_attached() {
    privileged!("without_a_device_cidrs_are_stored_and_status_says_not_attached");
    let agent = TestAgent::start(AgentOptions::default());
    let status = agent.cli_ok(&["status"]);
    assert!(
        status.contains("Prefilter:    not attached (no --prefilter-device); 0 CIDRs stored"),
        "{status}"
    );
    let out = agent.cli_ok(&[
        "prefilter",
        "update",
        "--cidr",
        "203.0.113.0/24,2001:db8::/32",
    ]);
    assert!(out.contains("Devices: none"), "{out}");
    let list = agent.cli_json(&["prefilter", "list"]);
    let cidrs: Vec<&str> = list["cidrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cidr"].as_str().unwrap())
        .collect();
    assert_eq!(cidrs, ["203.0.113.0/24", "2001:db8::/32"]);
    assert!(agent
        .cli_ok(&["status", "--verbose"])
        .contains("not attached (no --prefilter-device); 2 CIDRs stored"));
    // A device that does not exist fails the start, naming it.
    let e = TestAgent::start_in(
        Netns::new("cnode").unwrap(),
        AgentOptions::default(),
        vec!["--prefilter-device".into(), "nosuchdev0".into()],
    )
    .err()
    .expect("the agent refuses a missing prefilter device");
    assert!(e.contains("prefilter device nosuchdev0"), "{e}");
}
