//! The agent's socket load balancer flags: attached to the cgroup given
//! (one of the test's own), serving the node's and each endpoint's network
//! namespace, shown in `cilia status`, kept across a restart; `on` with a
//! cgroup it cannot use refuses to start; `off` says so.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::PathBuf;

use cilia_testnet::netns::unique_name;
use cilia_testnet::{privileged, AgentOptions, Netns, TestAgent};

/// A cgroup v2 directory of the test's own, removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new() -> Self {
        let root = cilia_datapath::socklb::default_cgroup_root()
            .expect("this test needs a cgroup v2 mount");
        let path = root.join(unique_name("cilia-test-"));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn socket_lb_line(agent: &TestAgent) -> String {
    agent
        .cli_ok(&["status"])
        .lines()
        .find(|l| l.starts_with("Socket LB:"))
        .unwrap_or_else(|| panic!("no Socket LB line in cilia status"))
        .to_string()
}

#[test]
fn socket_lb_serves_the_node_and_each_endpoint_namespace() {
    privileged!("socket_lb_serves_the_node_and_each_endpoint_namespace");
    let cgroup = TestCgroup::new();
    let node = Netns::new("slagent").unwrap();
    let args = vec![
        "--socket-lb".to_string(),
        "on".to_string(),
        "--socket-lb-cgroup".to_string(),
        cgroup.0.display().to_string(),
    ];
    let mut agent = TestAgent::start_in(node, AgentOptions::default(), args).unwrap();
    let line = socket_lb_line(&agent);
    assert!(
        line.contains(&cgroup.0.display().to_string()) && line.contains("1 network namespaces"),
        "{line}"
    );
    let pod = Netns::new("slpod").unwrap();
    let ep = agent.create_endpoint(&pod, "app=a");
    assert!(socket_lb_line(&agent).contains("2 network namespaces"));
    // A restart finds the links pinned and the namespaces again.
    agent.kill9();
    agent.spawn().unwrap();
    assert!(socket_lb_line(&agent).contains("2 network namespaces"));
    let id = ep["id"].to_string();
    agent.cli_ok(&["endpoint", "delete", &id]);
    assert!(socket_lb_line(&agent).contains("1 network namespaces"));
    // A link removed behind the agent's back shows.
    std::fs::remove_file(agent.bpf_root.path().join("socklb/connect4")).unwrap();
    let line = socket_lb_line(&agent);
    assert!(line.contains("7 of 8 programs"), "{line}");
}

#[test]
fn socket_lb_on_refuses_to_start_without_a_cgroup_v2_directory() {
    privileged!("socket_lb_on_refuses_to_start_without_a_cgroup_v2_directory");
    let node = Netns::new("slagent").unwrap();
    let not_cgroup = std::env::temp_dir().display().to_string();
    let args = vec![
        "--socket-lb".to_string(),
        "on".to_string(),
        "--socket-lb-cgroup".to_string(),
        not_cgroup,
    ];
    let err = match TestAgent::start_in(node, AgentOptions::default(), args) {
        Ok(_) => panic!("the agent started with --socket-lb on and no cgroup v2 directory"),
        Err(e) => e,
    };
    assert!(
        err.contains("--socket-lb on") && err.contains("cgroup v2"),
        "{err}"
    );
}

#[test]
fn socket_lb_off_is_shown_as_off() {
    privileged!("socket_lb_off_is_shown_as_off");
    let node = Netns::new("slagent").unwrap();
    let args = vec!["--socket-lb".to_string(), "off".to_string()];
    let agent = TestAgent::start_in(node, AgentOptions::default(), args).unwrap();
    assert!(socket_lb_line(&agent).contains("disabled"));
}
