//! A node with the proxy between a client and a server, each in its own
//! network namespace, with transparency done by nftables TPROXY in the node
//! (standing in for cilia's datapath, which assigns redirected packets to the
//! proxy's sockets itself):
//!
//! ```text
//! client ns                node ns (cilia-proxy, nft tproxy)            server ns
//! 192.0.2.10   eth0 <-> nc 192.0.2.1        198.51.100.1 ns <-> eth0 198.51.100.10
//! 2001:db8:c::10           2001:db8:c::1    2001:db8:5::1             2001:db8:5::10
//! ```
//!
//! TCP to ports 80, 81 and 82 entering the node is assigned to the proxy's
//! transparent listener (port 15080) and marked TO_PROXY; the policy route
//! of the design (fwmark TO_PROXY -> table 2005: local default) delivers it
//! locally. Replies of the server to the proxy's upstream sockets (bound to
//! the client's address) are found by `socket transparent 1` and marked the
//! same way. A redirected flow that finds no listener is reset, as the
//! datapath drops it ("L7 proxy unavailable").
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cilia_policy::l7::{HttpRuleSpec, L7Policy};
use cilia_proxy::control::{
    FromProxy, L7Entry, L7Flow, ProxyEndpoint, ProxyPolicy, PROTOCOL_VERSION,
};
use cilia_proxy::control_client::{self, ControlReader, ControlWriter};
use cilia_testnet::netns::{run, unique_name, Netns};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

pub const CLIENT4: &str = "192.0.2.10";
pub const CLIENT6: &str = "2001:db8:c::10";
pub const SERVER4: &str = "198.51.100.10";
pub const SERVER6: &str = "2001:db8:5::10";
pub const NODE_TO_SERVER4: &str = "198.51.100.1";
pub const SERVER_ID: u16 = 1;
pub const SERVER_IDENTITY: u32 = 1000;
pub const CLIENT_ID: u16 = 2;
pub const CLIENT_IDENTITY: u32 = 2000;
pub const RULE: &str = "default/deathstar-l7";
pub const PROXY_PORT: u16 = 15080;
const WAIT: Duration = Duration::from_secs(10);

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

pub fn server4(port: u16) -> SocketAddr {
    SocketAddr::new(ip(SERVER4), port)
}

pub fn server6(port: u16) -> SocketAddr {
    SocketAddr::new(ip(SERVER6), port)
}

/// The proxy process, killed on drop.
pub struct Proxy {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Proxy {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A line of /proc/<pid>/status, in KiB (VmRSS, VmHWM).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proxy status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/pid/status"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- proxy log ---\n{}", self.log_text());
        }
    }
}

/// Client, node (running the proxy) and server namespaces. Dropping it
/// kills the proxy and removes the namespaces (and every process in them).
pub struct Topology {
    proxy: Option<Proxy>,
    pub client: Netns,
    pub node: Netns,
    pub server: Netns,
    dir: PathBuf,
    server_task: tokio::task::JoinHandle<()>,
    raw_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The proxy first: it prints its log (kept in `dir`) on a panic.
        drop(self.proxy.take());
        self.server_task.abort();
        for task in &self.raw_tasks {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(client: &Netns, node: &Netns, server: &Netns) {
    let (c, s) = (client.name(), server.name());
    let steps: &[&[&str]] = &[
        &[
            "link", "add", "nc", "type", "veth", "peer", "name", "eth0", "netns", c,
        ],
        &[
            "link", "add", "ns", "type", "veth", "peer", "name", "eth0", "netns", s,
        ],
        &["link", "set", "nc", "up"],
        &["link", "set", "ns", "up"],
        &["addr", "add", "192.0.2.1/24", "dev", "nc"],
        &["addr", "add", "198.51.100.1/24", "dev", "ns"],
        &["addr", "add", "2001:db8:c::1/64", "dev", "nc", "nodad"],
        &["addr", "add", "2001:db8:5::1/64", "dev", "ns", "nodad"],
        &[
            "rule",
            "add",
            "fwmark",
            "0xc10000/0xff0000",
            "lookup",
            "2005",
            "pref",
            "9",
        ],
        &[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "2005",
        ],
        &[
            "-6",
            "rule",
            "add",
            "fwmark",
            "0xc10000/0xff0000",
            "lookup",
            "2005",
            "pref",
            "9",
        ],
        &[
            "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "2005",
        ],
    ];
    for args in steps {
        node.ip(args).expect("node setup");
    }
    for (ns, v4, gw4, v6, gw6) in [
        (
            client,
            "192.0.2.10/24",
            "192.0.2.1",
            "2001:db8:c::10/64",
            "2001:db8:c::1",
        ),
        (
            server,
            "198.51.100.10/24",
            "198.51.100.1",
            "2001:db8:5::10/64",
            "2001:db8:5::1",
        ),
    ] {
        for args in [
            &["link", "set", "eth0", "up"][..],
            &["addr", "add", v4, "dev", "eth0"],
            &["addr", "add", v6, "dev", "eth0", "nodad"],
            &["route", "add", "default", "via", gw4],
            &["-6", "route", "add", "default", "via", gw6],
        ] {
            ns.ip(args).expect("endpoint setup");
        }
    }
    node.sh(
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
         net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0",
    )
    .expect("node sysctls");
    let rules = format!(
        "table inet cilia_test {{
           chain prerouting {{
             type filter hook prerouting priority mangle; policy accept;
             socket transparent 1 meta mark set 0xc10000 accept
             meta nfproto ipv4 tcp dport {{ 80, 81, 82 }} tproxy ip to :{PROXY_PORT} meta mark set 0xc10000 accept
             meta nfproto ipv6 tcp dport {{ 80, 81, 82 }} tproxy ip6 to :{PROXY_PORT} meta mark set 0xc10000 accept
             tcp dport {{ 80, 81, 82 }} reject with tcp reset
           }}
         }}"
    );
    let mut nft = node
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    std::io::Write::write_all(nft.stdin.as_mut().expect("stdin"), rules.as_bytes())
        .expect("nft input");
    drop(nft.stdin.take());
    let out = nft.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Topology {
    /// Builds the namespaces, starts the HTTP server and the proxy binary
    /// (with no policy yet).
    pub async fn new() -> Topology {
        Self::build(true).await
    }

    /// Like [`Topology::new`] without the proxy binary (for a proxy run
    /// in-process with [`InProcess`]).
    pub async fn without_proxy() -> Topology {
        Self::build(false).await
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("topology with a proxy process")
    }

    pub fn proxy_mut(&mut self) -> &mut Proxy {
        self.proxy.as_mut().expect("topology with a proxy process")
    }

    async fn build(with_proxy: bool) -> Topology {
        let client = Netns::new("pxc").expect("client netns");
        let node = Netns::new("pxn").expect("node netns");
        let server = Netns::new("pxs").expect("server netns");
        setup(&client, &node, &server);
        let listener = server
            .run(|| std::net::TcpListener::bind("[::]:80"))
            .expect("server listens on [::]:80");
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let server_task = tokio::spawn(serve_http(listener));
        let raw = server
            .run(|| std::net::TcpListener::bind("[::]:82"))
            .expect("server listens on [::]:82");
        raw.set_nonblocking(true).expect("nonblocking");
        let raw = tokio::net::TcpListener::from_std(raw).expect("tokio listener");
        let raw_tasks = vec![tokio::spawn(serve_cut_response(raw))];
        let dir = std::env::temp_dir().join(unique_name("cilia-proxy-test-"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let proxy = with_proxy.then(|| spawn_proxy(&node, &dir));
        Topology {
            proxy,
            client,
            node,
            server,
            dir,
            server_task,
            raw_tasks,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A TCP connection from the client namespace.
    pub async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let sock = self.client.run(|| {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(dst),
                socket2::Type::STREAM,
                None,
            )?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })?;
        let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
        tokio::time::timeout(WAIT, sock.connect(dst))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))?
    }

    /// An HTTP/1.1 keep-alive client connection from the client namespace.
    pub async fn http(&self, dst: SocketAddr) -> HttpClient {
        let stream = self.connect(dst).await.expect("connect through the proxy");
        let local = stream.local_addr().expect("local addr");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("client handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        HttpClient { sender, local }
    }

    /// A control connection that has read the proxy's Hello.
    pub async fn control(&self) -> (ControlClient, FromProxy) {
        let c = ControlClient::connect(&self.proxy().socket).await;
        let hello = c.hello.clone();
        (c, hello)
    }
}

fn spawn_proxy(node: &Netns, dir: &Path) -> Proxy {
    let socket = dir.join("proxy.sock");
    let log = dir.join("proxy.log");
    let log_file = std::fs::File::create(&log).expect("proxy log");
    let child = node
        .command(env!("CARGO_BIN_EXE_cilia-proxy"))
        .arg("--control-socket")
        .arg(&socket)
        .arg("--port")
        .arg(PROXY_PORT.to_string())
        .env("RUST_LOG", "cilia_proxy=debug")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn cilia-proxy");
    let mut proxy = Proxy { child, socket, log };
    let deadline = Instant::now() + WAIT;
    while !proxy.socket.exists() {
        if let Ok(Some(status)) = proxy.child.try_wait() {
            panic!("cilia-proxy exited {status}: {}", proxy.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "no control socket after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy
}

/// Whether a command exists and runs in the node (`ss -ltn` for listeners).
pub fn node_listens(node: &Netns, port: u16) -> bool {
    let out = run(node
        .command("ss")
        .args(["-Hltn", &format!("sport = :{port}")]))
    .expect("ss");
    !out.trim().is_empty()
}

// ---------------------------------------------------------------- server

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = BoxBody<Bytes, BoxError>;

fn text(s: String) -> TestBody {
    Full::new(Bytes::from(s))
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Port 82 of the server: reads a request head, answers a head promising
/// 1000 bytes and 7 of them, then resets the connection.
async fn serve_cut_response(listener: tokio::net::TcpListener) {
    use tokio::io::AsyncReadExt;
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial")
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = stream.set_zero_linger();
            drop(stream); // RST
        });
    }
}

/// The test server: answers every request with `x-peer` (the address it
/// saw); `/echo` streams the request body back, `/v1/request-landing` says
/// "Ship landed", `/slow` answers after 1.5 s, anything else "ok <method> <path>".
async fn serve_http(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            return;
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                let path = req.uri().path().to_string();
                let body = match path.as_str() {
                    "/echo" => req.into_body().map_err(BoxError::from).boxed(),
                    "/v1/request-landing" => text("Ship landed\n".into()),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        text("slow ok\n".into())
                    }
                    _ => text(format!("ok {} {}\n", req.method(), req.uri())),
                };
                let mut resp = Response::new(body);
                resp.headers_mut()
                    .insert("x-peer", peer.to_string().parse().expect("header value"));
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ---------------------------------------------------------------- client

pub type ClientBody = BoxBody<Bytes, std::io::Error>;

pub struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<ClientBody>,
    pub local: SocketAddr,
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn peer(&self) -> SocketAddr {
        self.headers
            .get("x-peer")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or_else(|| panic!("no x-peer in {self:?}"))
    }
}

pub fn empty() -> ClientBody {
    Full::new(Bytes::new())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

impl HttpClient {
    pub async fn send(&mut self, req: Request<ClientBody>) -> Result<Response<Incoming>, String> {
        tokio::time::timeout(WAIT, async {
            self.sender.ready().await.map_err(|e| e.to_string())?;
            self.sender
                .send_request(req)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| "no answer in time".to_string())?
    }

    /// `method path` with `headers` and an empty body, answer read whole.
    pub async fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.request_body(method, path, headers, "").await
    }

    /// `method path` with `headers` and `body`, answer read whole.
    pub async fn request_body(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "deathstar.empire.svc");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .send(
                req.body(
                    Full::new(Bytes::from_static(body.as_bytes()))
                        .map_err(|never: Infallible| match never {})
                        .boxed(),
                )
                .expect("request"),
            )
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(WAIT, body.collect())
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes();
        Answer {
            status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

/// A request body of `len` zero bytes, generated as it is sent.
pub struct Zeros {
    pub left: u64,
}

const CHUNK: usize = 64 * 1024;
static ZEROS: [u8; CHUNK] = [0; CHUNK];

impl hyper::body::Body for Zeros {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..n])))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

// ---------------------------------------------------------------- control

/// The library's control client, with panics instead of errors.
pub struct ControlClient {
    pub hello: FromProxy,
    read: ControlReader,
    write: ControlWriter,
}

impl ControlClient {
    pub async fn connect(path: &Path) -> ControlClient {
        let (hello, read, write) = tokio::time::timeout(WAIT, control_client::connect(path))
            .await
            .expect("hello in time")
            .expect("control socket");
        ControlClient {
            hello: FromProxy::Hello {
                version: hello.version,
                pid: hello.pid,
                revision: hello.revision,
            },
            read,
            write,
        }
    }

    pub async fn recv(&mut self) -> FromProxy {
        tokio::time::timeout(WAIT, self.read.recv())
            .await
            .expect("control message in time")
            .expect("control message")
    }

    /// Sends a policy and returns the answer to it (skipping flow records).
    pub async fn apply(&mut self, policy: &ProxyPolicy) -> FromProxy {
        self.write.send_policy(policy).await.expect("control write");
        for _ in 0..10_000 {
            match self.recv().await {
                FromProxy::Flow(_) => continue,
                other => return other,
            }
        }
        panic!("no answer to the policy");
    }

    pub async fn next_flow(&mut self) -> L7Flow {
        for _ in 0..100 {
            if let FromProxy::Flow(f) = self.recv().await {
                return f;
            }
        }
        panic!("no flow record");
    }
}

// ---------------------------------------------------------------- policies

pub fn rule(method: &str, path: &str) -> HttpRuleSpec {
    HttpRuleSpec {
        method: Some(method.into()),
        path: Some(path.into()),
        ..Default::default()
    }
}

/// The deathstar's ingress: the tiefighter may land, read its status and,
/// with the force header, its secret; and use /echo.
pub fn deathstar_rules() -> Vec<HttpRuleSpec> {
    vec![
        rule("POST", "/v1/request-landing"),
        rule("GET", "/v1/status"),
        HttpRuleSpec {
            headers: vec!["X-Has-Force: true".into()],
            ..rule("GET", "/v1/secret")
        },
        rule("POST", "/echo"),
        rule("GET", "/slow"),
    ]
}

/// Server (deathstar) and client (tiefighter) endpoints; the server's
/// ingress on port 80 from the client identity allows `rules`.
pub fn policy(revision: u64, rules: Vec<HttpRuleSpec>) -> ProxyPolicy {
    let entry = |port| L7Entry {
        identity: CLIENT_IDENTITY,
        proto: 6,
        port,
        port_prefix_len: 16,
        policy: L7Policy::Http(rules.clone()),
        rules: vec![RULE.into()],
    };
    ProxyPolicy {
        version: PROTOCOL_VERSION,
        revision,
        endpoints: vec![
            ProxyEndpoint {
                id: SERVER_ID,
                identity: SERVER_IDENTITY,
                addrs: vec![ip(SERVER4), ip(SERVER6)],
                ingress: vec![entry(80), entry(81), entry(82)],
                egress: vec![],
            },
            ProxyEndpoint {
                id: CLIENT_ID,
                identity: CLIENT_IDENTITY,
                addrs: vec![ip(CLIENT4), ip(CLIENT6)],
                ingress: vec![],
                egress: vec![],
            },
        ],
        prefixes: vec![],
    }
}

/// A topology whose proxy enforces [`deathstar_rules`], with the control
/// connection that applied it.
pub async fn with_policy() -> (Topology, ControlClient) {
    let topo = Topology::new().await;
    let (mut control, _) = topo.control().await;
    let answer = control.apply(&policy(1, deathstar_rules())).await;
    assert_eq!(answer, FromProxy::Applied { revision: 1 });
    wait_listening(&topo).await;
    (topo, control)
}

/// Waits (bounded) until the proxy's listener is open after a policy.
pub async fn wait_listening(topo: &Topology) {
    let deadline = Instant::now() + WAIT;
    while !node_listens(&topo.node, PROXY_PORT) {
        assert!(Instant::now() < deadline, "proxy never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- in-process

/// `cilia_proxy::run_until` on a thread of its own inside the node
/// namespace (its runtime's threads, and so every socket the proxy opens,
/// live there). Stopped and joined on drop.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    pub socket: PathBuf,
}

impl InProcess {
    pub fn start(node: &Netns, config: cilia_proxy::Config) -> InProcess {
        assert!(!config.control_socket.exists(), "fresh socket path");
        Self::start_replacing(node, config)
    }

    /// Starts it where a (stale) file may already exist: waits for a socket.
    pub fn start_replacing(node: &Netns, config: cilia_proxy::Config) -> InProcess {
        use std::os::unix::fs::FileTypeExt;
        let netns = std::fs::File::open(node.path()).expect("node netns");
        let socket = config.control_socket.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime
                .block_on(cilia_proxy::run_until(config, async {
                    let _ = stopped.await;
                }))
                .map_err(|e| e.to_string())
        });
        let deadline = Instant::now() + WAIT;
        while !std::fs::metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            assert!(!thread.is_finished(), "in-process proxy stopped early");
            assert!(
                Instant::now() < deadline,
                "no control socket after {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        InProcess {
            stop: Some(stop),
            thread: Some(thread),
            socket,
        }
    }

    /// Stops the proxy and returns how it ended.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| "proxy thread panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}
