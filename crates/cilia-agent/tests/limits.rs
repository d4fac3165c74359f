//! Hostile inputs against a real agent: each is refused quickly, in one line
//! naming the field or limit, and the agent keeps serving the legitimate case.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cilia_testnet::{privileged, AgentOptions, TestAgent};

/// A policy refusal is cheap: well within this on a loaded 2-CPU debug build.
const QUICK: Duration = Duration::from_secs(5);

/// One raw HTTP/1.1 exchange on the agent's socket (head, then `body`).
/// The body is written by a thread of its own and write errors are ignored:
/// the agent may answer and close before it has read all of it.
fn raw_http(agent: &TestAgent, head: &str, body: Vec<u8>) -> String {
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(QUICK)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&body);
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the agent closes or the answer's JSON body is complete.
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
        if out.ends_with(b"}") {
            break;
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A CNP in `default` allowing egress to `n` distinct /32s.
fn cidr_policy(name: &str, n: u32) -> String {
    let mut yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  endpointSelector: {{}}\n  egress:\n  - toCIDR:\n"
    );
    for i in 0..n {
        yaml.push_str(&format!(
            "    - 10.{}.{}.{}/32\n",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
    }
    yaml
}

#[test]
fn an_import_over_the_cidr_limit_is_refused_quickly_and_a_legitimate_one_still_works() {
    privileged!(
        "an_import_over_the_cidr_limit_is_refused_quickly_and_a_legitimate_one_still_works"
    );
    let agent = TestAgent::start(AgentOptions::default());
    let over = cidr_policy("over", cilia_policy::limits::MAX_CIDRS as u32 + 1);
    let started = Instant::now();
    let out = agent.cli_stdin(&["policy", "import", "-"], &over);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success());
    assert!(took < QUICK, "refusal took {took:?}");
    assert!(stderr.contains("(MAX_CIDRS)"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let list = agent.cli_json(&["policy", "get"]);
    assert!(list["policies"].as_array().unwrap().is_empty(), "{list}");

    let out = agent.cli_stdin(&["policy", "import", "-"], &cidr_policy("fine", 100));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_body_over_the_limit_gets_an_api_error_naming_the_limit() {
    privileged!("a_body_over_the_limit_gets_an_api_error_naming_the_limit");
    let agent = TestAgent::start(AgentOptions::default());
    let len = cilia_api::limits::MAX_BODY_BYTES + 1;
    let started = Instant::now();
    let answer = raw_http(
        &agent,
        &format!(
            "POST /v1/policy HTTP/1.1\r\nHost: cilia\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        ),
        vec![b' '; len],
    );
    assert!(started.elapsed() < QUICK);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"code\":\"body-too-large\""), "{answer}");
    assert!(answer.contains("(MAX_BODY_BYTES)"), "{answer}");
}

#[test]
fn the_api_refuses_a_bad_ifname_and_reserved_labels_naming_the_field() {
    privileged!("the_api_refuses_a_bad_ifname_and_reserved_labels_naming_the_field");
    let agent = TestAgent::start(AgentOptions::default());
    for (body, want) in [
        (
            r#"{"netns":"/proc/self/ns/net","ifname":"eth0#x"}"#,
            r#"ifname: \"eth0#x\": may contain only [A-Za-z0-9_.-]"#,
        ),
        (
            r#"{"netns":"/proc/self/ns/net","labels":{"io.kubernetes.pod.namespace":"kube-system"}}"#,
            "key io.kubernetes.pod.namespace is reserved",
        ),
        (
            r#"{"netns":"/proc/self/ns/net","container_id":"../x"}"#,
            "container_id: ",
        ),
    ] {
        let answer = raw_http(
            &agent,
            &format!(
                "POST /v1/endpoints HTTP/1.1\r\nHost: cilia\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            ),
            body.as_bytes().to_vec(),
        );
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(want), "{answer}");
    }
    let eps = agent.cli_json(&["endpoint", "list"]);
    assert!(eps.as_array().unwrap().is_empty(), "{eps}");
}

#[test]
fn every_refusal_is_a_one_line_json_error_even_from_the_http_layer() {
    privileged!("every_refusal_is_a_one_line_json_error_even_from_the_http_layer");
    let agent = TestAgent::start(AgentOptions::default());
    let long = "9".repeat(10_000);
    for (request, status, code) in [
        // A path parameter that does not parse (axum's rejection).
        (
            format!("GET /v1/endpoints/{long} HTTP/1.1\r\nHost: cilia\r\n\r\n"),
            "400",
            "invalid-request",
        ),
        // A method the route does not serve.
        (
            "PATCH /v1/status HTTP/1.1\r\nHost: cilia\r\n\r\n".to_string(),
            "405",
            "method-not-allowed",
        ),
        // No such route.
        (
            "GET /v1/nothing HTTP/1.1\r\nHost: cilia\r\n\r\n".to_string(),
            "404",
            "not-found",
        ),
    ] {
        let answer = raw_http(&agent, &request, Vec::new());
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer:.300}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let err: serde_json::Value = serde_json::from_str(body.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {body:.300}"));
        assert_eq!(err["code"], code, "{err}");
        let message = err["message"].as_str().unwrap();
        assert!(
            message.len() < 400 && !message.contains('\n'),
            "{message:.300}"
        );
    }
}
