//! `scripts/demo.sh` ends everything it started — the agent, the deathstar's
//! HTTP server, the landing loop — and removes its namespaces, pins and
//! files, when it succeeds and when it is interrupted (Ctrl-C). The demo runs
//! on the binaries already built next to this test (`CILIA_DEMO_BIN`), under
//! a name of its own (`CILIA_DEMO_NAME`), so it never touches a user's demo.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cilia_testnet::netns::unique_name;
use cilia_testnet::{bin, bin_dir, require_privileges};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// The demo in a process group of its own, as a shell would start it, with
/// stdout read line by line on a thread.
fn start_demo(name: &str) -> (Child, mpsc::Receiver<String>) {
    start_demo_with(name, &[])
}

fn start_demo_with(name: &str, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    bin("cilia-agent"); // a clear failure when the binaries are not built
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/demo.sh");
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .env("CILIA_DEMO_BIN", bin_dir())
        .env("CILIA_DEMO_NAME", name)
        .env_remove("CILIA_DEMO_KEEP")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Waits (bounded) for the demo to exit; on timeout ends its group.
fn wait_demo(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            panic!("demo did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What of a demo named `name` still exists: processes that carry its
/// environment (everything it starts inherits `CILIA_DEMO_NAME`), its
/// namespaces, its bpffs dir (pins) and its run dir.
fn leftovers(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let marker = format!("CILIA_DEMO_NAME={name}");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|var| var == marker.as_bytes()) {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            out.push(format!("process {pid} ({})", comm.trim()));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            let ns = entry.file_name().to_string_lossy().to_string();
            if ns.starts_with(&format!("{name}-")) {
                out.push(format!("netns {ns}"));
            }
        }
    }
    for path in [format!("/sys/fs/bpf/{name}"), format!("/run/{name}")] {
        if Path::new(&path).exists() {
            out.push(path);
        }
    }
    out
}

#[test]
fn demo_leaves_nothing_behind_when_it_succeeds() {
    if !require_privileges("demo_leaves_nothing_behind_when_it_succeeds") {
        return;
    }
    let name = unique_name("cdemo");
    let (mut child, lines) = start_demo(&name);
    let status = wait_demo(&mut child, Duration::from_secs(240));
    let text: Vec<String> = lines.try_iter().collect();
    assert!(status.success(), "demo failed:\n{}", text.join("\n"));
    assert!(
        text.iter()
            .any(|l| l.contains("tiefighter: 30 of 30 landings")),
        "{}",
        text.join("\n")
    );
    // The three outcomes of the Star Wars scenario at L7, both families.
    let l7: Vec<&String> = text
        .iter()
        .skip_while(|l| !l.contains("import the L7 policy"))
        .take_while(|l| !l.contains("as the proxy saw them"))
        .collect();
    let outcome = |ship: &str, method: &str, result: &str| {
        l7.iter()
            .filter(|l| {
                l.trim_start().starts_with(ship) && l.contains(method) && l.contains(result)
            })
            .count()
    };
    let all = text.join("\n");
    assert_eq!(outcome("tiefighter", "POST", "Ship landed"), 2, "{all}");
    assert_eq!(outcome("tiefighter", "PUT", "Access denied"), 2, "{all}");
    assert_eq!(outcome("xwing", "POST", "dropped"), 2, "{all}");
    // Through the service's virtual addresses: the same verdicts.
    let service: Vec<&String> = text
        .iter()
        .skip_while(|l| !l.contains("a service:"))
        .take_while(|l| !l.contains("the service flows"))
        .collect();
    let via = |ship: &str, result: &str| {
        service
            .iter()
            .filter(|l| l.trim_start().starts_with(ship) && l.contains(result))
            .count()
    };
    assert_eq!(via("tiefighter", "Ship landed"), 2, "{all}");
    assert_eq!(via("xwing", "dropped"), 2, "{all}");
    assert_eq!(leftovers(&name), Vec::<String>::new());
}

#[test]
fn demo_leaves_nothing_behind_when_interrupted() {
    if !require_privileges("demo_leaves_nothing_behind_when_interrupted") {
        return;
    }
    let name = unique_name("cdemo");
    let (mut child, lines) = start_demo(&name);
    // Once the ships land, the agent and the deathstar's server run.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("Ship landed") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                panic!("the demo never landed a ship: {e}");
            }
        }
    }
    let running = leftovers(&name);
    assert!(
        running.iter().filter(|l| l.starts_with("process")).count() >= 3,
        "the demo's processes are visible while it runs: {running:?}"
    );
    // Ctrl-C: SIGINT to the whole foreground process group.
    killpg(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_demo(&mut child, Duration::from_secs(60));
    assert!(!status.success(), "an interrupted demo reports failure");
    assert_eq!(leftovers(&name), Vec::<String>::new());
}

/// `scripts/demo.sh --nodes 2`: the Star Wars scenario across two node
/// namespaces with etcd; the policy is imported once and holds on the other
/// node, L7 included; the cluster's flows name their nodes; nothing is left.
#[test]
fn cluster_demo_runs_the_scenario_across_nodes_and_leaves_nothing_behind() {
    if !require_privileges("cluster_demo") || !cilia_testnet::require_etcd("cluster_demo") {
        return;
    }
    let name = unique_name("cdemo");
    let (mut child, lines) = start_demo_with(&name, &["--nodes", "2"]);
    let status = wait_demo(&mut child, Duration::from_secs(240));
    let text: Vec<String> = lines.try_iter().collect();
    let all = text.join("\n");
    assert!(status.success(), "demo failed:\n{all}");
    let section = |from: &str, to: &str| -> Vec<&String> {
        text.iter()
            .skip_while(|l| !l.contains(from))
            .take_while(|l| !l.contains(to))
            .collect()
    };
    let count = |lines: &[&String], ship: &str, method: &str, result: &str| {
        lines
            .iter()
            .filter(|l| {
                l.trim_start().starts_with(ship) && l.contains(method) && l.contains(result)
            })
            .count()
    };
    let l4 = section("import the L3/L4 policy ONCE", "the whole cluster's flows");
    assert_eq!(count(&l4, "tiefighter", "POST", "Ship landed"), 2, "{all}");
    assert_eq!(count(&l4, "xwing", "POST", "dropped"), 2, "{all}");
    assert!(l4.iter().any(|l| l.contains("node2 has it too")), "{all}");
    let flows = section("the whole cluster's flows", "import the L7 policy");
    assert!(
        flows
            .iter()
            .any(|l| l.contains(" node1 ") && l.contains("Policy denied")),
        "{all}"
    );
    let l7 = section("import the L7 policy", "as node1's proxy saw them");
    assert_eq!(count(&l7, "tiefighter", "POST", "Ship landed"), 2, "{all}");
    assert_eq!(count(&l7, "tiefighter", "PUT", "Access denied"), 2, "{all}");
    assert_eq!(count(&l7, "xwing", "POST", "dropped"), 2, "{all}");
    assert_eq!(leftovers(&name), Vec::<String>::new());
}
