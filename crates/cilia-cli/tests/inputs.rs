//! Hostile or malformed inputs are refused by the CLI itself, in one line
//! naming the flag, before anything is sent to the agent (the socket given
//! here is served by nobody, so reaching it would be a different error).

use std::process::Command;

fn cilia(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cilia"))
        .args(["--socket", "/nonexistent/cilia.sock"])
        .args(args)
        .output()
        .expect("run cilia");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

fn refused(args: &[&str]) -> String {
    let (ok, stderr) = cilia(args);
    assert!(!ok, "{args:?} was accepted");
    assert!(!stderr.contains("cannot reach the cilia agent"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn ifname_with_a_hash_is_refused_up_front_naming_the_flag() {
    let e = refused(&["endpoint", "create", "--netns", "x", "--ifname", "eth0#x"]);
    assert!(
        e.contains("--ifname: \"eth0#x\": may contain only [A-Za-z0-9_.-]"),
        "{e}"
    );
}

#[test]
fn a_valid_endpoint_request_gets_as_far_as_the_agent() {
    let (ok, e) = cilia(&[
        "endpoint", "create", "--netns", "x", "--ifname", "net1", "--labels", "app=web",
    ]);
    assert!(!ok);
    assert!(e.contains("cannot reach the cilia agent"), "{e}");
}

#[test]
fn a_64kb_label_value_gives_one_short_line() {
    let labels = format!("app={}", "a".repeat(65536));
    let e = refused(&["endpoint", "create", "--netns", "x", "--labels", &labels]);
    assert!(e.len() < 300, "{} bytes", e.len());
    assert!(e.contains("--labels: label \"app=aaa"), "{e}");
}

#[test]
fn ten_thousand_labels_are_refused_naming_the_limit() {
    let labels: Vec<String> = (0..10_000).map(|i| format!("k{i}=v")).collect();
    let e = refused(&[
        "endpoint",
        "create",
        "--netns",
        "x",
        "--labels",
        &labels.join(","),
    ]);
    assert!(e.contains("more than the limit of 64 (MAX_LABELS)"), "{e}");
}

#[test]
fn reserved_label_keys_are_refused_naming_the_label() {
    for label in [
        "io.kubernetes.pod.namespace=kube-system",
        "io.cilium.k8s.namespace.labels.team=a",
    ] {
        let e = refused(&["endpoint", "create", "--netns", "x", "--labels", label]);
        assert!(e.contains(label) && e.contains("reserved"), "{e}");
    }
}

#[test]
fn a_policy_text_over_the_limit_is_refused_before_it_is_sent() {
    let file = std::env::temp_dir().join(format!("cilia-cli-huge-{}.yaml", std::process::id()));
    let mut yaml = String::from("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: huge}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR:\n");
    for i in 0..1_000_000u32 {
        yaml.push_str(&format!(
            "    - 10.{}.{}.{}/32\n",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
    }
    std::fs::write(&file, yaml).expect("write policy");
    let started = std::time::Instant::now();
    let e = refused(&["policy", "import", file.to_str().expect("utf-8 path")]);
    std::fs::remove_file(&file).expect("remove policy file");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert!(e.contains("(MAX_POLICY_BYTES)"), "{e}");
}

#[test]
fn a_named_port_without_protocol_is_refused_naming_the_flag() {
    let e = refused(&[
        "endpoint",
        "create",
        "--netns",
        "x",
        "--named-port",
        "http=8080",
    ]);
    assert!(e.contains("--named-port"), "{e}");
    assert!(e.contains("NAME=PROTO/PORT"), "{e}");
}

#[test]
fn a_port_name_declared_twice_with_different_ports_is_refused_up_front() {
    let e = refused(&[
        "endpoint",
        "create",
        "--netns",
        "x",
        "--named-port",
        "http=TCP/80",
        "--named-port",
        "http=tcp/8080",
    ]);
    assert_eq!(
        e,
        "Error: --named-port: named port \"http\": declared twice with different ports: TCP/80 and TCP/8080"
    );
    let e = refused(&[
        "endpoint",
        "create",
        "--netns",
        "x",
        "--named-port",
        "Http=TCP/80",
    ]);
    assert!(
        e.contains("--named-port: named port \"Http\": is not a port name"),
        "{e}"
    );
}

#[test]
fn valid_named_ports_get_as_far_as_the_agent() {
    let (ok, e) = cilia(&[
        "endpoint",
        "create",
        "--netns",
        "x",
        "--named-port",
        "http=TCP/8080",
        "--named-port",
        "http=TCP/8080",
        "--named-port",
        "dns=udp/53",
    ]);
    assert!(!ok);
    assert!(e.contains("cannot reach the cilia agent"), "{e}");
}
