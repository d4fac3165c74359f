//! Crash-point injection: the agent is made to abort (`CILIA_CRASH_AT`) at
//! every step of endpoint create, delete and label change; after a restart
//! the kernel state equals the records — no orphan device, pin or map
//! entry, and no record without its device, links and entries.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;

use cilia_agent::crash::{CRASH_ENV, CRASH_POINTS};
use cilia_testnet::{privileged, AgentOptions, Netns, TestAgent};

fn names_in(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Devices, link pins, policy map pins and endpoint map entries are
/// exactly those of the ready records; not-ready records own none.
fn assert_kernel_matches_records(agent: &TestAgent, point: &str) {
    let records = agent.cli_json(&["endpoint", "list"]);
    let records = records.as_array().unwrap();
    assert!(
        records.iter().all(|r| r["state"] != "creating"),
        "{point}: no half-made record survives: {records:#?}"
    );
    let ready: Vec<&serde_json::Value> = records.iter().filter(|r| r["state"] == "ready").collect();
    let ids: Vec<u64> = ready.iter().map(|r| r["id"].as_u64().unwrap()).collect();

    let devices: BTreeSet<String> = agent
        .node
        .ip(&["-o", "link"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("lxc"))
        .collect();
    let want: BTreeSet<String> = ids.iter().map(|id| format!("lxc{id}")).collect();
    assert_eq!(devices, want, "{point}: devices");

    let links = names_in(&agent.bpf_root.path().join("links"));
    let want: BTreeSet<String> = ids
        .iter()
        .flat_map(|id| [format!("ep{id}"), format!("ep{id}_to")])
        .collect();
    assert_eq!(links, want, "{point}: link pins");

    let policy = names_in(&agent.bpf_root.path().join("policy"));
    for name in &policy {
        let owner = name.trim_start_matches("ep").split('_').next().unwrap();
        assert!(
            ids.contains(&owner.parse().unwrap()),
            "{point}: orphan policy map pin {name}"
        );
    }
    for id in &ids {
        assert!(
            policy.contains(&format!("ep{id}_a")) || policy.contains(&format!("ep{id}_b")),
            "{point}: endpoint {id} has its policy map"
        );
    }

    let entries = agent.cli_json(&["bpf", "endpoint", "list"]);
    let addresses: BTreeSet<String> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = ready
        .iter()
        .flat_map(|r| [r["ipv6"].as_str(), r["ipv4"].as_str()])
        .flatten()
        .map(String::from)
        .collect();
    assert_eq!(addresses, want, "{point}: endpoint map entries");
}

/// Sets the endpoint's labels to `app=<app>` over the API; whether the
/// agent answered with success.
fn put_labels(agent: &TestAgent, id: &str, app: &str) -> bool {
    agent.set_labels(id.parse().expect("endpoint id"), &[("app", app)])
}

/// Runs the operation `point` belongs to with the agent set to abort
/// there, restarts it normally and checks the kernel against the records.
fn crash_and_restore(point: &str) {
    let mut agent = TestAgent::start(AgentOptions::default());
    let kept = Netns::new("ccrk").unwrap();
    let target_ns = Netns::new("ccrt").unwrap();
    agent.create_endpoint(&kept, "app=kept");
    let existing = agent.create_endpoint(&target_ns, "app=target");
    let id = existing["id"].as_u64().unwrap().to_string();
    let fresh = Netns::new("ccrn").unwrap();

    agent.kill9();
    agent.set_env(&[(CRASH_ENV, point)]);
    agent.spawn().unwrap();
    let out = match point.split(':').next().unwrap() {
        "endpoint-create" => agent.cli(&[
            "endpoint",
            "create",
            "--netns",
            fresh.name(),
            "--labels",
            "app=new",
        ]),
        "endpoint-delete" => agent.cli(&["endpoint", "delete", &id]),
        "endpoint-labels" => {
            assert!(
                !put_labels(&agent, &id, "relabelled"),
                "{point}: the agent died"
            );
            agent.cli(&["status"]) // fails: nobody serves the socket
        }
        other => panic!("no operation for {other}"),
    };
    assert!(
        !out.status.success(),
        "{point}: the agent died mid-operation"
    );
    assert!(
        agent.log_text().contains(&format!("{CRASH_ENV}={point}")),
        "{point}: crashed at the point: {}",
        agent.log_text()
    );
    agent.kill9(); // reaps the aborted process

    agent.set_env(&[]);
    agent.spawn().unwrap();
    assert_kernel_matches_records(&agent, point);
    // The endpoint kept aside is untouched and the agent still works.
    let again = Netns::new("ccra").unwrap();
    agent.create_endpoint(&again, "app=after");
    assert_kernel_matches_records(&agent, point);
}

#[test]
fn after_a_crash_at_any_step_the_kernel_state_equals_the_records() {
    privileged!("crash_points");
    for point in CRASH_POINTS {
        crash_and_restore(point);
    }
}

#[test]
fn a_label_change_cut_short_is_completed_with_the_recorded_identity() {
    privileged!("crash_labels");
    let mut agent = TestAgent::start(AgentOptions::default());
    let ns = Netns::new("ccrl").unwrap();
    let ep = agent.create_endpoint(&ns, "app=before");
    let id = ep["id"].as_u64().unwrap().to_string();
    agent.kill9();
    agent.set_env(&[(CRASH_ENV, "endpoint-labels:after-record")]);
    agent.spawn().unwrap();
    assert!(
        !put_labels(&agent, &id, "after"),
        "the agent died mid-change"
    );
    agent.kill9();
    agent.set_env(&[]);
    agent.spawn().unwrap();
    let rec = agent.cli_json(&["endpoint", "get", &id]);
    let entry = agent.cli_json(&["bpf", "endpoint", "list"]);
    let entry = entry
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint_id"].as_u64() == rec["id"].as_u64())
        .unwrap()
        .clone();
    assert_eq!(rec["labels"]["app"], "after");
    assert_eq!(
        entry["identity"], rec["identity"],
        "map entry carries the recorded identity"
    );
    assert!(
        agent.log_text().contains("re-specializing"),
        "the program baked with the old identity was replaced"
    );
}
