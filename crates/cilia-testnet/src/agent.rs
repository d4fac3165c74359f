//! A cilia-agent running inside a test "node" namespace, with its own state
//! dir, bpffs root and socket, driven through the real `cilia` CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bin;
use crate::netns::{unique_name, BpfRoot, Netns};

/// Options of a test agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub ipv6_range: String,
    pub ipv4_range: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            ipv6_range: "fd00:c1a::/112".into(),
            ipv4_range: Some("10.200.0.0/24".into()),
        }
    }
}

/// A node namespace with an agent in it. Dropping it kills the agent and
/// removes the node namespace (and so every host-side device), the pins and
/// the state dir.
pub struct TestAgent {
    pub node: Netns,
    pub bpf_root: BpfRoot,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub options: AgentOptions,
    child: Option<Child>,
    log: PathBuf,
    /// Extra environment of the agent process (e.g. `CILIA_PODMAN`).
    env: Vec<(String, String)>,
    /// Extra flags of the agent process (kept for every `spawn`).
    args: Vec<String>,
}

impl TestAgent {
    pub fn start(options: AgentOptions) -> Self {
        Self::start_with_env(options, &[])
    }

    /// Like `start`, with extra environment variables for the agent (kept
    /// for every `spawn`).
    pub fn start_with_env(options: AgentOptions, env: &[(&str, &str)]) -> Self {
        let node = Netns::new("cnode").expect("create node netns");
        let mut agent = Self::prepare(node, options, Vec::new());
        agent.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        agent.spawn().expect("agent starts");
        agent
    }

    /// Starts an agent in a node namespace made by the caller (e.g. one
    /// wired to a fabric), with extra flags (e.g. `--node-name`); the
    /// agent owns the namespace from now on and removes it on drop. On
    /// failure the error carries the agent's log (and the namespace is gone).
    pub fn start_in(node: Netns, options: AgentOptions, args: Vec<String>) -> Result<Self, String> {
        let mut agent = Self::prepare(node, options, args);
        agent.spawn()?;
        Ok(agent)
    }

    /// The agent's paths and settings, not started yet.
    fn prepare(node: Netns, options: AgentOptions, args: Vec<String>) -> Self {
        let dir = std::env::temp_dir().join(unique_name("cilia-agent-"));
        std::fs::create_dir_all(&dir).expect("create agent temp dir");
        Self {
            node,
            bpf_root: BpfRoot::new(),
            state_dir: dir.join("state"),
            socket: dir.join("cilia.sock"),
            log: dir.join("agent.log"),
            options,
            child: None,
            env: Vec::new(),
            args,
        }
    }

    fn command(&self, socket: &Path) -> Command {
        let mut cmd = self.node.command(bin("cilia-agent"));
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpf-root")
            .arg(self.bpf_root.path())
            .arg("--socket")
            .arg(socket)
            .arg("--ipv6-range")
            .arg(&self.options.ipv6_range);
        if let Some(v4) = &self.options.ipv4_range {
            cmd.arg("--ipv4-range").arg(v4);
        }
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the agent and waits until its API answers; on failure returns
    /// the agent's log.
    pub fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let child = self
            .command(&self.socket)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("agent exited with {status}: {}", self.log_text()));
                }
            }
            if self.cli(&["status"]).status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "agent did not answer within 20 s: {}",
            self.log_text()
        ))
    }

    /// Runs a second agent process on the same state dir (and the given
    /// socket) to completion, returning its output.
    pub fn run_second_agent(&self, socket: &Path) -> Output {
        self.command(socket).output().expect("run second agent")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the extra environment of the agent for later `spawn`s.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Replaces the extra flags of the agent for later `spawn`s.
    pub fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    /// The extra flags the agent runs with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Whether the agent process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// GET /metrics from inside the node namespace (the agent's default
    /// address, 127.0.0.1:9962, is that namespace's loopback).
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read, Write};
        self.node.run(|| {
            let mut s =
                std::net::TcpStream::connect("127.0.0.1:9962").expect("connect to /metrics");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("read timeout");
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: cilia\r\n\r\n")
                .expect("send the scrape");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read the scrape");
            out
        })
    }

    /// Runs the `cilia` CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("cilia"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run cilia")
    }

    /// Runs the CLI, asserting success, returning stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "cilia {args:?} failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `input` on standard input.
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(bin("cilia"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cilia");
        if let Some(mut stdin) = child.stdin.take() {
            // The CLI may refuse before reading it all: a short write is fine.
            let _ = stdin.write_all(input.as_bytes());
        }
        child.wait_with_output().expect("wait for cilia")
    }

    /// Runs the CLI with `-o json` and parses stdout.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.cli_ok(&all)).expect("cilia printed JSON")
    }

    /// The agent's endpoints, as `cilia endpoint list -o json` prints them.
    pub fn endpoints(&self) -> Vec<serde_json::Value> {
        match self.cli_json(&["endpoint", "list"]) {
            serde_json::Value::Array(endpoints) => endpoints,
            other => panic!("cilia endpoint list printed no list: {other}"),
        }
    }

    /// Waits until no endpoint is `deleting` (a CNI DEL answers once its
    /// endpoints are disconnected; the agent removes their devices,
    /// programs and records right after, through the kernel's grace
    /// periods, which a loaded CI machine stretches); panics after 30 s, the
    /// agent's own bound for an ADD waiting on deletes (`REAP_WAIT`).
    pub fn wait_deletes_finished(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let deleting: Vec<_> = self
                .endpoints()
                .into_iter()
                .filter(|e| e["state"] == "deleting")
                .collect();
            if deleting.is_empty() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                // The agent logs why a delete failed (or where it stopped):
                // its last lines go with the failure.
                let log = self.log_text();
                if let (Some(pid), Ok(_)) = (self.pid(), std::env::var("CILIA_TEST_GDB")) {
                    let out = Command::new("gdb")
                        .args([
                            "-p",
                            &pid.to_string(),
                            "-batch",
                            "-ex",
                            "thread apply all bt",
                        ])
                        .output();
                    if let Ok(out) = out {
                        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
                    }
                    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        let stack =
                            std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
                        let comm =
                            std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                        eprintln!("task {:?} {comm}{stack}", t.file_name());
                    }
                }
                let tail: Vec<&str> = log.lines().rev().take(80).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "endpoints still being deleted after 30 s: {deleting:?}\nagent log (last lines):\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The endpoint of a runtime's container id (the CNI plugin records it).
    pub fn endpoint_of_container(&self, id: &str) -> serde_json::Value {
        self.endpoints()
            .into_iter()
            .find(|e| e["container_id"] == id)
            .unwrap_or_else(|| panic!("no endpoint for container {id}"))
    }

    /// Sets an endpoint's labels through the API (the CLI has no verb for
    /// it: runtimes do it); whether the agent answered 2xx.
    pub fn set_labels(&self, id: u16, labels: &[(&str, &str)]) -> bool {
        use std::io::{Read, Write};
        let body = serde_json::json!({
            "labels": labels.iter().copied().collect::<std::collections::BTreeMap<_, _>>()
        })
        .to_string();
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.socket) else {
            return false;
        };
        let request = format!(
            "PUT /v1/endpoints/{id}/labels HTTP/1.1\r\nHost: cilia\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let mut answer = String::new();
        s.write_all(request.as_bytes()).is_ok()
            && s.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.1 2")
    }

    /// Creates an endpoint in `netns` and returns its JSON, once its
    /// specialized programs are attached (fast attach verifies them after
    /// the create returns): what the tests read of programs and links is
    /// then settled.
    pub fn create_endpoint(&self, netns: &Netns, labels: &str) -> serde_json::Value {
        let ep = self.create_endpoint_fast(netns, labels);
        self.wait_specialized(std::time::Duration::from_secs(60));
        ep
    }

    /// Creates an endpoint in `netns` and returns its JSON as soon as the
    /// create returns (with fast attach: on the generic program).
    pub fn create_endpoint_fast(&self, netns: &Netns, labels: &str) -> serde_json::Value {
        self.cli_json(&[
            "endpoint",
            "create",
            "--netns",
            netns.name(),
            "--labels",
            labels,
        ])
    }

    /// Waits until no endpoint is on the generic program (`cilia status`'s
    /// `endpoints_generic` is 0); panics after `within`.
    pub fn wait_specialized(&self, within: std::time::Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let status = self.cli_json(&["status"]);
            if status["endpoints_generic"].as_u64() == Some(0) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "endpoints still on the generic program after {within:?}: {status}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill9();
        // The health endpoint's namespace, which the agent made (cluster
        // mode): its devices go with it.
        if let Some(i) = self.args.iter().position(|a| a == "--health-netns") {
            if let Some(name) = self.args.get(i + 1) {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
        if let Some(dir) = self.state_dir.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
