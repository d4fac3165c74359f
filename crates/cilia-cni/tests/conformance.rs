//! The plugin binary as a runtime drives it (environment + stdin, result or
//! CNI error on stdout), against a real test agent and namespaces of the
//! test's own. The agent-free cases need no privileges.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Write;
use std::process::{Command, Stdio};

use cilia_testnet::{bin, require_privileges, AgentOptions, Netns, TestAgent};
use serde_json::{json, Value};

/// Runs the plugin; returns (exit success, parsed stdout or Null).
fn plugin(envs: &[(&str, &str)], stdin: &str) -> (bool, Value) {
    let mut cmd = Command::new(bin("cilia-cni"));
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout {stdout:?}: {e}"))
    };
    (out.status.success(), value)
}

fn conf(version: &str, socket: &str) -> String {
    json!({"cniVersion": version, "name": "cilia", "type": "cilia-cni", "socket": socket,
           "retrySeconds": 0, "dns": {"nameservers": ["fd00:c1a::53"]}})
    .to_string()
}

fn env<'a>(cmd: &'a str, cid: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p1"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

#[test]
fn version_and_input_errors_need_no_agent() {
    let (ok, v) = plugin(&[("CNI_COMMAND", "VERSION")], "");
    assert!(ok);
    assert_eq!(
        v,
        json!({"cniVersion":"1.1.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]})
    );
    let sock = "/nonexistent/cilia.sock";
    let (ok, v) = plugin(&env("ADD", "c1", "/run/netns/x"), &conf("0.3.1", sock));
    assert!(!ok);
    assert_eq!(v["code"], 1);
    assert!(v["msg"].as_str().unwrap().contains("0.3.1"), "{v}");
    let (ok, v) = plugin(&env("ADD", "c1", "/run/netns/x"), "{\"cniVersion\":");
    assert!(!ok);
    assert_eq!(v["code"], 6);
    let mut e = env("ADD", "c1", "/run/netns/x");
    e.retain(|(k, _)| *k != "CNI_CONTAINERID");
    let (ok, v) = plugin(&e, &conf("1.0.0", sock));
    assert!(!ok);
    assert_eq!(
        (v["code"].clone(), v["cniVersion"].clone()),
        (json!(4), json!("1.0.0"))
    );
    // An unreachable agent: try again later, never a false success.
    let (ok, v) = plugin(&env("DEL", "c1", ""), &conf("1.0.0", sock));
    assert!(!ok);
    assert_eq!(v["code"], 11, "{v}");
    let (ok, v) = plugin(&env("STATUS", "", ""), &conf("1.1.0", sock));
    assert!(!ok);
    assert_eq!(v["code"], 50, "{v}");
}

#[test]
fn add_check_del_gc_status_against_a_real_agent() {
    if !require_privileges("add_check_del_gc_status_against_a_real_agent") {
        return;
    }
    let agent = TestAgent::start(AgentOptions::default());
    let sock = agent.socket.to_str().unwrap().to_string();
    let ns1 = Netns::new("cep").unwrap();
    let ns2 = Netns::new("cep").unwrap();
    let p1 = ns1.path().to_string_lossy().to_string();
    let p2 = ns2.path().to_string_lossy().to_string();

    assert_eq!(
        plugin(&env("STATUS", "", ""), &conf("1.1.0", &sock)),
        (true, Value::Null)
    );

    // ADD, 1.0.0: spec-shaped result with the agent's addresses.
    let (ok, r1) = plugin(&env("ADD", "ctr1", &p1), &conf("1.0.0", &sock));
    assert!(ok, "{r1}");
    assert_eq!(r1["cniVersion"], "1.0.0");
    assert_eq!(r1["interfaces"][0]["name"], "eth0");
    assert_eq!(r1["interfaces"][0]["sandbox"], p1.as_str());
    assert_eq!(r1["ips"][0]["gateway"], "fd00:c1a::1");
    assert_eq!(r1["ips"][0]["interface"], 0);
    assert!(r1["ips"][0].get("version").is_none());
    assert!(r1["ips"][0]["address"].as_str().unwrap().ends_with("/128"));
    assert_eq!(r1["ips"][1]["gateway"], "10.200.0.1");
    assert!(r1["ips"][1]["address"].as_str().unwrap().ends_with("/32"));
    assert_eq!(
        r1["routes"],
        json!([{"dst":"::/0","gw":"fd00:c1a::1"},{"dst":"0.0.0.0/0","gw":"10.200.0.1"}])
    );
    assert_eq!(r1["dns"]["nameservers"][0], "fd00:c1a::53");
    let mac = ns1.ip(&["link", "show", "eth0"]).unwrap();
    assert!(
        mac.contains(r1["interfaces"][0]["mac"].as_str().unwrap()),
        "{mac}"
    );

    // ADD, 0.4.0, with labels from args: `version` on every IP.
    let labelled = json!({"cniVersion": "0.4.0", "name": "cilia", "type": "cilia-cni",
        "socket": sock, "args": {"cni": {"labels": [{"key": "app", "value": "db"}]}}})
    .to_string();
    let (ok, r2) = plugin(&env("ADD", "ctr2", &p2), &labelled);
    assert!(ok, "{r2}");
    assert_eq!(r2["ips"][0]["version"], "6");
    assert_eq!(r2["ips"][1]["version"], "4");
    let ep2 = agent.endpoint_of_container("ctr2");
    assert_eq!(ep2["labels"]["app"], "db");
    assert_eq!(ep2["labels_pending"], false);

    // The two namespaces reach each other with the result's addresses.
    let addr2 = r2["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(ns1.sh(&format!("ping -c1 -W2 {addr2}")).is_ok());

    // CHECK against prevResult.
    let with_prev = |prev: &Value| {
        json!({"cniVersion": "1.0.0", "name": "cilia", "type": "cilia-cni", "socket": sock,
               "prevResult": prev})
        .to_string()
    };
    assert_eq!(
        plugin(&env("CHECK", "ctr1", &p1), &with_prev(&r1)),
        (true, Value::Null)
    );
    let (ok, v) = plugin(&env("CHECK", "ctr1", &p1), &with_prev(&r2));
    assert!(!ok);
    assert_eq!(v["code"], 104, "{v}");
    let (ok, v) = plugin(&env("CHECK", "nope", &p1), &with_prev(&r1));
    assert!(!ok);
    assert_eq!(v["code"], 3, "{v}");

    // A repeated ADD (runtime retry after a crash) replaces, never duplicates.
    let (ok, _) = plugin(&env("ADD", "ctr1", &p1), &conf("1.1.0", &sock));
    assert!(ok);
    assert_eq!(agent.endpoints().len(), 2);

    // GC: ctr2 is no longer a valid attachment.
    let gc = json!({"cniVersion": "1.1.0", "name": "cilia", "type": "cilia-cni", "socket": sock,
        "cni.dev/valid-attachments": [{"containerID": "ctr1", "ifname": "eth0"}]})
    .to_string();
    assert_eq!(plugin(&env("GC", "", ""), &gc), (true, Value::Null));
    assert_eq!(container_ids(&agent), vec![json!("ctr1")]);

    // DEL: idempotent, with an empty netns (containerd), for unknown containers.
    for _ in 0..2 {
        assert_eq!(
            plugin(&env("DEL", "ctr1", ""), &conf("1.0.0", &sock)),
            (true, Value::Null)
        );
    }
    assert_eq!(
        plugin(&env("DEL", "unknown", &p1), &conf("0.4.0", &sock)),
        (true, Value::Null)
    );
    agent.wait_deletes_finished();
    assert_eq!(agent.cli_json(&["endpoint", "list"]), json!([]));
    assert!(
        ns1.ip(&["link", "show", "eth0"]).is_err(),
        "eth0 left in the netns"
    );
}

#[test]
fn status_reports_an_exhausted_pool_and_add_shows_it() {
    if !require_privileges("status_reports_an_exhausted_pool_and_add_shows_it") {
        return;
    }
    let agent = TestAgent::start(AgentOptions {
        ipv6_range: "fd00:c1d::/126".into(),
        ipv4_range: None,
    });
    let sock = agent.socket.to_str().unwrap().to_string();
    let nss: Vec<Netns> = (0..3).map(|_| Netns::new("cep").unwrap()).collect();
    for (i, ns) in nss.iter().take(2).enumerate() {
        let path = ns.path().to_string_lossy().to_string();
        let (ok, r) = plugin(&env("ADD", &format!("x{i}"), &path), &conf("1.0.0", &sock));
        assert!(ok, "{r}");
        assert_eq!(r["ips"].as_array().unwrap().len(), 1, "IPv6 only: {r}");
    }
    let (ok, v) = plugin(&env("STATUS", "", ""), &conf("1.1.0", &sock));
    assert!(!ok);
    assert_eq!(v["code"], 50);
    assert!(v["msg"].as_str().unwrap().contains("exhausted"), "{v}");
    let path = nss[2].path().to_string_lossy().to_string();
    let (ok, v) = plugin(&env("ADD", "x2", &path), &conf("1.0.0", &sock));
    assert!(!ok);
    assert_eq!(v["code"], 101);
    assert_eq!(
        v["msg"],
        "IPAM pool fd00:c1d::/126 is exhausted: all 2 addresses are allocated"
    );
}

/// A network config named `network`, as a runtime passes it for one of
/// several networks that all use cilia-cni.
fn net_conf(network: &str, socket: &str, extra: Value) -> String {
    let mut c = json!({"cniVersion": "1.1.0", "name": network, "type": "cilia-cni",
                       "socket": socket, "retrySeconds": 0});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c.to_string()
}

/// The container ids of the endpoints, once the deletes DEL and GC began
/// are finished.
fn container_ids(agent: &TestAgent) -> Vec<Value> {
    agent.wait_deletes_finished();
    let mut ids: Vec<Value> = agent
        .endpoints()
        .iter()
        .map(|e| e["container_id"].clone())
        .collect();
    ids.sort_by_key(|v| v.to_string());
    ids
}

fn first_address(result: &Value) -> String {
    result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn gc_of_one_network_leaves_other_networks_endpoints_and_their_traffic() {
    if !require_privileges("gc_of_one_network_leaves_other_networks_endpoints_and_their_traffic") {
        return;
    }
    let mut agent = TestAgent::start(AgentOptions::default());
    let sock = agent.socket.to_str().unwrap().to_string();
    let (ns_a, ns_b1, ns_b2, ns_cli) = (
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
        Netns::new("cep").unwrap(),
    );
    let path = |ns: &Netns| ns.path().to_string_lossy().to_string();
    let (p_a, p_b1, p_b2) = (path(&ns_a), path(&ns_b1), path(&ns_b2));
    let net_a = net_conf("net-a", &sock, json!({}));
    let net_b = net_conf("net-b", &sock, json!({}));

    let (ok, r_a) = plugin(&env("ADD", "pod-a", &p_a), &net_a);
    assert!(ok, "{r_a}");
    for (cid, p) in [("pod-b1", &p_b1), ("pod-b2", &p_b2)] {
        let (ok, r) = plugin(&env("ADD", cid, p), &net_b);
        assert!(ok, "{r}");
    }
    // An endpoint made with the CLI: never any CNI network's to collect.
    let manual = agent.create_endpoint(&ns_cli, "app=manual");
    let manual_ip = manual["ipv6"].as_str().unwrap().to_string();

    // The network and interface are recorded, shown, and kept across a restart.
    agent.kill9();
    agent.spawn().unwrap();
    let ep_a = agent.endpoint_of_container("pod-a");
    assert_eq!(
        (&ep_a["network"], &ep_a["ifname"]),
        (&json!("net-a"), &json!("eth0"))
    );
    assert!(manual.get("network").is_none(), "{manual}");
    let shown = agent.cli_ok(&["endpoint", "get", &ep_a["id"].to_string()]);
    assert!(
        shown.contains("Network:     net-a (CNI, interface eth0)"),
        "{shown}"
    );

    // GC of net-b with no valid attachment: only net-b's endpoints go.
    let gc_b = net_conf("net-b", &sock, json!({"cni.dev/valid-attachments": []}));
    assert_eq!(plugin(&env("GC", "", ""), &gc_b), (true, Value::Null));
    assert_eq!(container_ids(&agent), vec![json!("pod-a"), Value::Null]);
    assert!(
        ns_b1.ip(&["link", "show", "eth0"]).is_err(),
        "net-b's interface left behind"
    );
    // net-a's endpoint still carries traffic (to the CLI-made endpoint).
    ns_a.sh(&format!("ping -c1 -W2 {manual_ip}"))
        .expect("net-a's endpoint reaches the manual endpoint after net-b's GC");

    // GC of net-a listing pod-a keeps it; DEL and CHECK through net-b do not see it.
    let gc_a = net_conf(
        "net-a",
        &sock,
        json!({"cni.dev/valid-attachments": [{"containerID": "pod-a", "ifname": "eth0"}]}),
    );
    assert_eq!(plugin(&env("GC", "", ""), &gc_a), (true, Value::Null));
    assert_eq!(
        plugin(&env("DEL", "pod-a", ""), &net_b),
        (true, Value::Null)
    );
    assert_eq!(container_ids(&agent), vec![json!("pod-a"), Value::Null]);
    let prev = json!({"prevResult": r_a});
    let (ok, v) = plugin(
        &env("CHECK", "pod-a", &p_a),
        &net_conf("net-b", &sock, prev.clone()),
    );
    assert!(!ok);
    assert_eq!(v["code"], 3, "{v}");
    assert_eq!(
        plugin(
            &env("CHECK", "pod-a", &p_a),
            &net_conf("net-a", &sock, prev)
        ),
        (true, Value::Null)
    );
    let a_ip = first_address(&r_a);
    ns_cli
        .sh(&format!("ping -c1 -W2 {a_ip}"))
        .expect("the manual endpoint still reaches net-a's");

    // DEL through net-a removes it; the CLI-made endpoint is left.
    assert_eq!(
        plugin(&env("DEL", "pod-a", ""), &net_a),
        (true, Value::Null)
    );
    assert_eq!(container_ids(&agent), vec![Value::Null]);
}
