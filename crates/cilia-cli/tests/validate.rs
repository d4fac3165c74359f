//! `cilia policy validate` works offline (no agent) and reports the file,
//! field path and reason of a bad policy in one line.

use std::io::Write;
use std::process::{Command, Stdio};

fn cilia(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cilia"))
        // A socket nobody serves: validate must not need it.
        .args(["--socket", "/nonexistent/cilia.sock"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cilia");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("cilia output")
}

fn example(name: &str) -> String {
    format!(
        "{}/../../examples/starwars/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn validate_accepts_the_example_policies_without_an_agent() {
    for file in [
        "cnp-l3-l4.yaml",
        "networkpolicy-l3-l4.yaml",
        "deny-tiefighter.yaml",
    ] {
        let out = cilia(&["policy", "validate", &example(file)], None);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid:"));
    }
}

#[test]
fn validate_names_file_field_and_reason_of_a_bad_policy() {
    let bad = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rule1
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports:
      - port: eighty!
";
    let out = cilia(&["policy", "validate", "-"], Some(bad));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for needle in [
        "stdin",
        "rule1",
        "spec.ingress[0].toPorts[0].ports[0].port",
        "eighty!",
    ] {
        assert!(err.contains(needle), "{needle:?} missing in {err}");
    }
}

#[test]
fn validate_refuses_unsupported_fields_by_name() {
    let fqdn = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: dns
spec:
  endpointSelector: {}
  egress:
  - toFQDNs:
    - matchName: example.com
";
    let out = cilia(&["policy", "validate", "-"], Some(fqdn));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("toFQDNs") && err.contains("not supported"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_a_one_line_error() {
    let out = cilia(&["policy", "validate", "/nonexistent/policy.yaml"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/policy.yaml"), "{err}");
}

#[test]
fn an_unreachable_agent_is_a_one_line_error_naming_the_socket() {
    let out = cilia(&["status"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/cilia.sock"), "{err}");
}

#[test]
fn validate_reports_documents_read_empty_ones_and_each_policy() {
    let yaml = "---
# nothing here
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow}
spec: {endpointSelector: {}, ingress: [{fromEntities: [host]}]}
--- {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: deny}, spec: {endpointSelector: {}, ingressDeny: [{fromEntities: [world]}]}}
";
    let out = cilia(&["policy", "validate", "-"], Some(yaml));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "stdin: read 3 document(s)
note: document 1 is empty: skipped
valid: CiliumNetworkPolicy default/allow (document 2)
valid: CiliumNetworkPolicy default/deny (document 3)
"
    );
}

#[test]
fn validate_refuses_a_billion_laughs_document_naming_it() {
    let mut yaml = String::from("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: lol}\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..9 {
        let p = i - 1;
        yaml.push_str(&format!(
            "l{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n"
        ));
    }
    let out = cilia(&["policy", "validate", "-"], Some(&yaml));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("stdin: document 1") && err.contains("aliases"),
        "{err}"
    );
}
