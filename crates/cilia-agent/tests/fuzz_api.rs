//! Fuzzing the REST API: mutated JSON bodies (and paths) sent over the unix
//! socket to a real agent. Whatever arrives, the agent answers with a 2xx or
//! a 4xx whose error is a JSON `ApiError` on one line of bounded length,
//! never a 5xx, a hang or a crash, and stays healthy afterwards.
//!
//! Seeds: `fuzz/api/*.req` (first line `METHOD PATH`, then the body); budget
//! and replay from `CILIA_FUZZ_*`. Endpoint namespaces are forced to names
//! that do not exist, so no input can put a device anywhere.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cilia_testnet::fuzz::{corpus, mutate_bytes, save_crash, Budget, Rng};
use cilia_testnet::{require_privileges, AgentOptions, TestAgent};

const DICT: &[&[u8]] = &[
    b"\"labels\":{\"reserved:host\":\"\"},",
    b"\"labels\":{\"io.kubernetes.pod.namespace\":\"kube-system\"},",
    b"\"ifname\":\"eth0#x\",",
    b"\"container_id\":\"\",",
    b"\"namespace\":\"\",",
    b"\"yaml\":\"--- {a: *b}\",",
    b"\"dport\":\"99999/TCP\",",
    b"null",
    b"[[[[[[[[[[[[[[[[",
    b"{\"\":{\"\":{\"\":{}}}}",
    b"\"\\u0000\\n\\r\"",
    b"1e999",
    b"-1",
    b"65536",
    b"true",
];

/// Splits a corpus entry into (method, path, body).
fn request_parts(input: &[u8]) -> (String, String, Vec<u8>) {
    let nl = input
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(input.len());
    let line = String::from_utf8_lossy(&input[..nl]).to_string();
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("GET").to_string();
    let path = words.next().unwrap_or("/").to_string();
    let body = input.get(nl + 1..).unwrap_or_default().to_vec();
    (method, path, body)
}

/// Forces endpoint namespaces to names that cannot exist.
fn defang(body: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut m)) if m.contains_key("netns") => {
            let ns = m["netns"].as_str().unwrap_or_default().replace('/', "_");
            m.insert("netns".into(), format!("cilia-fuzz-none-{ns}").into());
            serde_json::to_vec(&m).unwrap()
        }
        _ => body.to_vec(),
    }
}

/// One HTTP/1.1 request; returns (status, body) or None on a dead socket
/// or a response that never came.
fn send(socket: &Path, method: &str, path: &str, body: &[u8]) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: cilia\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    // The server may answer (and close) before it reads a body it does not
    // want: what counts is the answer, so a failed body write is fine.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    // A server that answers without reading the body closes with unread
    // data, and the kernel reports ECONNRESET after the answer: keep what
    // was read.
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Some((status, body))
}

#[test]
fn mutated_api_requests_get_a_4xx_or_2xx_never_a_crash() {
    if !require_privileges("fuzz_api") {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/api");
    let seeds = corpus(&dir);
    assert!(!seeds.is_empty());
    let agent = TestAgent::start(AgentOptions::default());
    let mut budget = Budget::from_env("api", 20_000);
    let mut rng = Rng::new(budget.seed);
    while budget.another() {
        let seed = rng.pick(&seeds).clone();
        let (method, mut path, body) = request_parts(&seed);
        let body = defang(&mutate_bytes(&mut rng, &body, DICT));
        if rng.below(8) == 0 {
            let mutated = mutate_bytes(
                &mut rng,
                path.as_bytes(),
                &[b"%00", b"/..", b"?x=", b"/99999"],
            );
            // Only what an HTTP request line can carry.
            path = String::from_utf8_lossy(&mutated)
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .collect();
            if !path.starts_with('/') {
                path.insert(0, '/');
            }
        }
        let mut input = format!("{method} {path}\n").into_bytes();
        input.extend_from_slice(&body);
        let broken = match send(&agent.socket, &method, &path, &body) {
            None => Some("no answer (agent dead or hung)".to_string()),
            Some((status, _)) if status >= 500 => Some(format!("status {status}")),
            Some((status, text)) if status >= 400 => {
                let one_line = text.trim_end().lines().count() <= 1;
                // An empty body: hyper refused the request line itself
                // (say, a character no URI may hold) before any handler ran.
                let json = text.trim().is_empty()
                    || serde_json::from_str::<serde_json::Value>(text.trim())
                        .is_ok_and(|e| e["code"].is_string() && e["message"].is_string());
                (!one_line || text.len() > 2048 || !json)
                    .then(|| format!("error body of {} bytes: {text:.300}", text.len()))
            }
            Some(_) => None,
        };
        if let Some(what) = broken {
            let path = save_crash(&dir, &budget, &input);
            panic!(
                "{what} (request saved as {}); agent log:\n{}",
                path.display(),
                agent.log_text()
            );
        }
    }
    budget.report("api");
    let (status, _) = send(&agent.socket, "GET", "/v1/healthz", b"").expect("agent alive");
    assert_eq!(status, 200, "agent healthy after the fuzz");
}
