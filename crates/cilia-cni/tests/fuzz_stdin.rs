//! Fuzzing the CNI plugin as a runtime drives it: mutated network
//! configurations on stdin and odd environments. Whatever it gets, the
//! plugin answers with a result or a CNI error object (numeric code, one
//! message line of bounded length) and exits: never a panic, a hang or raw
//! text on stdout. No agent runs: the socket always points nowhere, so no
//! input can reach a real node's agent.
//!
//! Seeds: `fuzz/stdin/`; budget and replay from `CILIA_FUZZ_*`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cilia_testnet::bin;
use cilia_testnet::fuzz::{corpus, mutate_bytes, save_crash, Budget, Rng};

const DICT: &[&[u8]] = &[
    b"\"cniVersion\":\"1.1.0\",",
    b"\"cniVersion\":\"0.3.1\",",
    b"\"prevResult\":{},",
    b"\"cni.dev/valid-attachments\":[],",
    b"\"args\":{\"cni\":{\"labels\":{\"reserved:host\":\"\"}}},",
    b"\"name\":\"\",",
    b"null",
    b"[[[[[[[[[[",
    b"\"\\u0000\"",
    b"1e999",
    b"-1",
];

const COMMANDS: &[&str] = &[
    "ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "", "add", "X",
];
const ODD: &[&str] = &[
    "",
    "eth0",
    "eth0#x",
    "a/b",
    "../../etc",
    "x\ny",
    "IgnoreUnknown=1;K8S_POD_NAME=p",
    "K8S_POD_NAME=",
    "=;=;",
    "/run/netns/none",
    "\u{7f}\u{1b}[2J",
];

/// Forces the parts that could reach something real: the agent socket
/// (nowhere) and retries (none).
fn defang(input: &[u8], socket: &str) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(input) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("socket".into(), socket.into());
            m.insert("retrySeconds".into(), 0.into());
            serde_json::to_vec(&m).unwrap()
        }
        _ => input.to_vec(),
    }
}

#[test]
fn mutated_cni_input_gets_a_result_or_a_cni_error_never_a_crash() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/stdin");
    let seeds = corpus(&dir);
    assert!(!seeds.is_empty());
    let socket = std::env::temp_dir().join(format!("cilia-fuzz-{}.sock", std::process::id()));
    let socket = socket.to_str().unwrap().to_string();
    let mut budget = Budget::from_env("cni-stdin", 3_000);
    let mut rng = Rng::new(budget.seed);
    while budget.another() {
        let seed = rng.pick(&seeds).clone();
        let input = defang(&mutate_bytes(&mut rng, &seed, DICT), &socket);
        let mut cmd = Command::new(bin("cilia-cni"));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", rng.pick(COMMANDS))
            .env("CNI_CONTAINERID", rng.pick(ODD))
            .env("CNI_NETNS", rng.pick(ODD))
            .env("CNI_IFNAME", rng.pick(ODD))
            .env("CNI_ARGS", rng.pick(ODD))
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let _ = child.stdin.take().unwrap().write_all(&input);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let broken = match status {
            None => Some("hung for 10 s".to_string()),
            Some(status) => {
                let out = child.wait_with_output().unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout);
                if status.code() == Some(101) || status.code().is_none() {
                    Some(format!(
                        "crashed ({status}): {}",
                        String::from_utf8_lossy(&out.stderr)
                    ))
                } else if status.success() {
                    None
                } else {
                    match serde_json::from_str::<serde_json::Value>(&stdout) {
                        Ok(err) => {
                            let msg = err["msg"].as_str().unwrap_or_default();
                            if !err["code"].is_u64() || msg.is_empty() {
                                Some(format!("not a CNI error object: {stdout:.300}"))
                            } else if msg.contains('\n') || msg.len() > 1024 {
                                Some(format!("error message of {} bytes: {msg:.300}", msg.len()))
                            } else {
                                None
                            }
                        }
                        Err(_) => Some(format!("stdout is not JSON: {stdout:.300}")),
                    }
                }
            }
        };
        if let Some(what) = broken {
            let path = save_crash(&dir, &budget, &input);
            panic!("{what} (stdin saved as {})", path.display());
        }
    }
    budget.report("cni-stdin");
}
