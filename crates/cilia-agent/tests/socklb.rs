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

/// Work for the client helper (unset: the helper does nothing).
const CLIENT_ENV: &str = "CILIA_SOCKLB_AGENT_CLIENT";

/// Run only inside the helper process (see `client_in`): connects to the
/// address in `CILIA_SOCKLB_AGENT_CLIENT`, sends "hi", closes its side and
/// prints `RESULT <getpeername> <answer>` or `RESULT ERR <error>`.
#[test]
fn socklb_agent_client_helper() {
    use std::io::{Read, Write};
    let Ok(addr) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let run = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let peer = s.peer_addr()?;
        s.write_all(b"hi")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(format!("{peer} {reply}"))
    };
    println!("\nRESULT {}", run().unwrap_or_else(|e| format!("ERR {e}")));
}

/// Runs the helper in `cgroup`, inside the network namespace `ns`, against
/// `addr`; returns what it printed after `RESULT `.
fn client_in(cgroup: &TestCgroup, ns: &Netns, addr: std::net::SocketAddr) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && exec nsenter --net="$2" -- "$3" --exact socklb_agent_client_helper --nocapture --test-threads=1"#)
        .arg("sh")
        .arg(&cgroup.0)
        .arg(ns.path())
        .arg(std::env::current_exe().unwrap())
        .env(CLIENT_ENV, addr.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("no result from the client helper: {stdout}"))
}

#[test]
fn an_endpoint_connecting_to_a_frontend_reaches_the_backend_endpoint() {
    privileged!("an_endpoint_connecting_to_a_frontend_reaches_the_backend_endpoint");
    use std::io::{Read, Write};
    let cgroup = TestCgroup::new();
    let node = Netns::new("slagent").unwrap();
    let args = vec![
        "--socket-lb".to_string(),
        "on".to_string(),
        "--socket-lb-cgroup".to_string(),
        cgroup.0.display().to_string(),
    ];
    let agent = TestAgent::start_in(node, AgentOptions::default(), args).unwrap();
    let client = Netns::new("slcli").unwrap();
    let server = Netns::new("slsrv").unwrap();
    agent.create_endpoint(&client, "app=client");
    let backend = agent.create_endpoint(&server, "app=server");
    let std::net::IpAddr::V4(backend_ip) = cilia_testnet::ip_of(&backend, "ipv4") else {
        panic!("no IPv4 backend address");
    };
    let listener = server.run(move || std::net::TcpListener::bind((backend_ip, 8080)).unwrap());
    let srv = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let local = conn.local_addr().unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut request = Vec::new();
        let _ = conn.read_to_end(&mut request);
        conn.write_all(b"backend").unwrap();
        local
    });
    let frontend = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(192, 0, 2, 10), 80);
    agent.cli_ok(&[
        "service",
        "update",
        "--frontend",
        &format!("{frontend}/tcp"),
        "--backends",
        &format!("{backend_ip}:8080"),
    ]);
    let result = client_in(&cgroup, &client, frontend.into());
    assert_eq!(
        result,
        format!("{frontend} backend"),
        "getpeername shows the frontend"
    );
    // The backend endpoint accepted on its own address: the client
    // endpoint's packets carried it (its namespace is served).
    assert_eq!(
        srv.join().unwrap(),
        std::net::SocketAddr::from((backend_ip, 8080))
    );
}
