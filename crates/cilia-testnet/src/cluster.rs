//! Several nodes on one machine: a "fabric" namespace with a bridge (the
//! underlay), node namespaces wired to it by veths, one etcd on the bridge
//! address, and an agent per node driven by the real `cilia` CLI.
//!
//! Addressing (fixed, documentation ranges only; no namespace has a route
//! toward the machine's uplink): the bridge holds `198.51.100.254/24` and
//! `2001:db8:100::fe/64`; node N holds `198.51.100.N/24` and
//! `2001:db8:100::N/64` on its `eth0` and owns the pod ranges
//! `fd00:c1a:N::/112` and `10.200.N.0/24`. Every namespace is named with the
//! `cnode` prefix so CI's leak check sees it; everything goes on drop (agents
//! first, then etcd, then the fabric), also when a test panics.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{AgentOptions, TestAgent};
use crate::etcd::Etcd;
use crate::netns::{CommandError, Netns};

/// The bridge's IPv4 address (where etcd listens).
pub const FABRIC_IPV4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
/// The bridge's IPv6 address.
pub const FABRIC_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0xfe);
/// The lease the test agents hold their node and ipcache keys with.
pub const LEASE_TTL_SECS: u32 = 5;

/// Node `n`'s underlay IPv4 address, `198.51.100.n`.
pub fn node_ipv4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, n)
}

/// Node `n`'s underlay IPv6 address, `2001:db8:100::n` (`n` written in
/// decimal digits, as the design's addressing reads).
pub fn node_ipv6(n: u8) -> Ipv6Addr {
    format!("2001:db8:100::{n}")
        .parse()
        .expect("a node index makes a valid IPv6 address")
}

/// Node `n`'s name, `node<n>`.
pub fn node_name(n: u8) -> String {
    format!("node{n}")
}

/// Node `n`'s IPv6 pod range, `fd00:c1a:n::/112`.
pub fn node_ipv6_range(n: u8) -> String {
    format!("fd00:c1a:{n}::/112")
}

/// Node `n`'s IPv4 pod range, `10.200.n.0/24`.
pub fn node_ipv4_range(n: u8) -> String {
    format!("10.200.{n}.0/24")
}

/// The underlay: a fabric namespace with bridge `br0`, and node namespaces
/// each with an `eth0` on it.
pub struct Fabric {
    // Dropped before `ns`: a node namespace goes before the bridge it hangs on.
    nodes: BTreeMap<u8, Netns>,
    ns: Netns,
}

impl Fabric {
    /// The fabric and `nodes` node namespaces, numbered 1..=nodes.
    pub fn new(nodes: u8) -> Result<Self, CommandError> {
        let ns = Netns::new("cnode")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        // No STP and no snooping: ports forward at once, ND/ARP multicast floods.
        ns.ip(&[
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        ns.ip(&["addr", "add", &format!("{FABRIC_IPV4}/24"), "dev", "br0"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{FABRIC_IPV6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        let mut fabric = Self {
            nodes: BTreeMap::new(),
            ns,
        };
        for n in 1..=nodes {
            let node = fabric.attach(n)?;
            fabric.nodes.insert(n, node);
        }
        Ok(fabric)
    }

    /// The fabric namespace (bridge, etcd).
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Node `n`'s namespace, while the fabric still holds it (an agent
    /// started on it takes it over: see [`Cluster::node_ns`]).
    pub fn node(&self, n: u8) -> &Netns {
        self.nodes
            .get(&n)
            .unwrap_or_else(|| panic!("fabric holds no namespace for node {n}"))
    }

    /// Hands node `n`'s namespace over (to an agent).
    pub fn take_node(&mut self, n: u8) -> Netns {
        self.nodes
            .remove(&n)
            .unwrap_or_else(|| panic!("fabric holds no namespace for node {n}"))
    }

    /// A new namespace on the fabric at host number `n` (`198.51.100.n`,
    /// `2001:db8:100::n` on its `eth0`): a node, or a stranger such as an
    /// attacker. Its fabric-side veth (`n<n>`) goes when it is dropped.
    pub fn attach(&self, n: u8) -> Result<Netns, CommandError> {
        assert!((1..254).contains(&n), "host number {n} is not in 1..254");
        let node = Netns::new("cnode")?;
        let port = format!("n{n}");
        node.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.ns.name(),
        ])?;
        self.ns.ip(&["link", "set", &port, "master", "br0"])?;
        self.ns.ip(&["link", "set", &port, "up"])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/24", node_ipv4(n)),
            "dev",
            "eth0",
        ])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/64", node_ipv6(n)),
            "dev",
            "eth0",
            "nodad",
        ])?;
        node.ip(&["link", "set", "eth0", "up"])?;
        Ok(node)
    }
}

/// How nodes carry pod traffic to each other (`--tunnel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// VXLAN overlay (`--tunnel vxlan`).
    Vxlan,
    /// Native routing over the underlay (`--tunnel disabled`).
    Native,
}

impl Tunnel {
    /// The value of `--tunnel`.
    pub fn flag(self) -> &'static str {
        match self {
            Tunnel::Vxlan => "vxlan",
            Tunnel::Native => "disabled",
        }
    }
}

/// Per-node start options beyond the fixed addressing.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub tunnel: Tunnel,
    pub lease_ttl_secs: u32,
    /// Appended after the cluster flags.
    pub extra_args: Vec<String>,
}

impl NodeOptions {
    pub fn new(tunnel: Tunnel) -> Self {
        Self {
            tunnel,
            lease_ttl_secs: LEASE_TTL_SECS,
            extra_args: Vec::new(),
        }
    }
}

/// The flags of node `n`'s agent with etcd at `etcd`.
pub fn node_args(n: u8, etcd: &str, options: &NodeOptions) -> Vec<String> {
    let mut args: Vec<String> = [
        "--node-name",
        &node_name(n),
        "--node-ip",
        &node_ipv4(n).to_string(),
        "--kvstore",
        "etcd",
        "--kvstore-endpoints",
        etcd,
        "--tunnel",
        options.tunnel.flag(),
        "--node-lease-ttl",
        &options.lease_ttl_secs.to_string(),
        "--peer-api-addr",
        &SocketAddr::new(IpAddr::V4(node_ipv4(n)), 4244).to_string(),
        // The agent makes this namespace; a CI-known prefix, unique per
        // test (they run in parallel), removed with the agent.
        "--health-netns",
        &crate::netns::unique_name("cnode"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(options.extra_args.iter().cloned());
    args
}

/// A fabric, etcd in it, and agents on (some of) its nodes.
pub struct Cluster {
    // Field order is drop order: agents (and their node namespaces), etcd,
    // then the fabric.
    agents: BTreeMap<u8, TestAgent>,
    pub etcd: Etcd,
    pub fabric: Fabric,
}

impl Cluster {
    /// A fabric of `nodes` nodes and a healthy etcd; no agent yet.
    pub fn new(nodes: u8) -> Self {
        let fabric = Fabric::new(nodes).expect("create the fabric");
        let etcd = Etcd::start(fabric.ns(), IpAddr::V4(FABRIC_IPV4)).expect("etcd starts");
        Self {
            agents: BTreeMap::new(),
            etcd,
            fabric,
        }
    }

    /// `nodes` nodes, each running an agent in `tunnel` mode.
    pub fn start(nodes: u8, tunnel: Tunnel) -> Self {
        let mut cluster = Self::new(nodes);
        for n in 1..=nodes {
            cluster.start_node(n, &NodeOptions::new(tunnel));
        }
        cluster
    }

    /// Starts node `n`'s agent (`--node-name node<n>` and the rest of
    /// [`node_args`]) and waits until its API answers.
    pub fn start_node(&mut self, n: u8, options: &NodeOptions) {
        let node = self.fabric.take_node(n);
        let agent_options = AgentOptions {
            ipv6_range: node_ipv6_range(n),
            ipv4_range: Some(node_ipv4_range(n)),
        };
        let args = node_args(n, &self.etcd.endpoint(), options);
        let agent = TestAgent::start_in(node, agent_options, args)
            .unwrap_or_else(|log| panic!("node{n}'s agent does not start: {log}"));
        self.agents.insert(n, agent);
    }

    /// The numbers of the nodes with an agent.
    pub fn nodes(&self) -> Vec<u8> {
        self.agents.keys().copied().collect()
    }

    pub fn agent(&self, n: u8) -> &TestAgent {
        self.agents
            .get(&n)
            .unwrap_or_else(|| panic!("node{n} runs no agent"))
    }

    pub fn agent_mut(&mut self, n: u8) -> &mut TestAgent {
        self.agents
            .get_mut(&n)
            .unwrap_or_else(|| panic!("node{n} runs no agent"))
    }

    /// Node `n`'s namespace, with or without an agent.
    pub fn node_ns(&self, n: u8) -> &Netns {
        match self.agents.get(&n) {
            Some(agent) => &agent.node,
            None => self.fabric.node(n),
        }
    }

    /// SIGKILL node `n`'s agent; its namespace, pins and state stay.
    pub fn kill9(&mut self, n: u8) {
        self.agent_mut(n).kill9();
    }

    /// Starts node `n`'s agent again (same flags, state and pins).
    pub fn restart(&mut self, n: u8) {
        self.agent_mut(n)
            .spawn()
            .unwrap_or_else(|log| panic!("node{n}'s agent does not restart: {log}"));
    }

    /// Removes node `n` for good: its agent is killed, its namespace,
    /// pins and state deleted, and it is not restarted.
    pub fn remove_node(&mut self, n: u8) {
        drop(self.agents.remove(&n));
    }

    /// A new pod (endpoint namespace, prefix `cep`) on node `n` with
    /// `labels` (`k=v,k=v`).
    pub fn pod(&self, n: u8, labels: &str) -> Pod {
        let ns = Netns::new("cep").expect("create pod netns");
        let endpoint = self.agent(n).create_endpoint(&ns, labels);
        Pod {
            ns,
            endpoint,
            node: n,
        }
    }

    /// Polls until every agent's `cilia node list -o json` names every node
    /// with an agent; on timeout returns the last lists seen.
    pub fn wait_nodes_listed(&self, within: Duration) -> Result<(), String> {
        let want: Vec<String> = self.nodes().into_iter().map(node_name).collect();
        let mut seen = String::new();
        let ok = poll(within, || {
            seen.clear();
            self.agents.values().all(|agent| {
                let names = node_names(agent);
                seen.push_str(&format!("{names:?}\n"));
                want.iter().all(|w| names.contains(w))
            })
        });
        if ok {
            Ok(())
        } else {
            Err(format!("nodes {want:?} not all listed; lists:\n{seen}"))
        }
    }
}

/// The names in an agent's `cilia node list -o json` (empty on error).
pub fn node_names(agent: &TestAgent) -> Vec<String> {
    let out = agent.cli(&["node", "list", "-o", "json"]);
    if !out.status.success() {
        return Vec::new();
    }
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(serde_json::Value::Array(nodes)) => nodes
            .iter()
            .filter_map(|n| n["name"].as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// An endpoint on a node, in its own namespace.
pub struct Pod {
    pub ns: Netns,
    /// As `cilia endpoint create -o json` printed it.
    pub endpoint: serde_json::Value,
    pub node: u8,
}

impl Pod {
    /// Its address of `family` (`"ipv6"` or `"ipv4"`).
    pub fn ip(&self, family: &str) -> IpAddr {
        crate::ip_of(&self.endpoint, family)
    }

    pub fn id(&self) -> u16 {
        self.endpoint["id"]
            .as_u64()
            .and_then(|id| u16::try_from(id).ok())
            .expect("endpoint id")
    }

    pub fn identity(&self) -> u32 {
        self.endpoint["identity"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .expect("endpoint identity")
    }
}

/// Calls `check` every 200 ms until it is true or `within` has passed.
pub fn poll(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two pings (0.2 s apart, 2 s wait) from `from` to `to`; whether one came back.
pub fn ping(from: &Netns, to: IpAddr) -> bool {
    from.command("ping")
        .args(["-c", "2", "-i", "0.2", "-W", "2", &to.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A TCP connection from inside `from` (connect timeout `within`), with 5 s
/// read and write timeouts.
pub fn tcp_connect(from: &Netns, to: SocketAddr, within: Duration) -> Result<TcpStream, String> {
    let conn = from
        .run(|| TcpStream::connect_timeout(&to, within))
        .map_err(|e| format!("connect {to}: {e}"))?;
    for r in [
        conn.set_read_timeout(Some(Duration::from_secs(5))),
        conn.set_write_timeout(Some(Duration::from_secs(5))),
        conn.set_nodelay(true),
    ] {
        r.map_err(|e| e.to_string())?;
    }
    Ok(conn)
}

/// Sends `payload` on an echo connection and reads it back whole.
pub fn exchange(conn: &mut TcpStream, payload: &[u8]) -> Result<(), String> {
    conn.write_all(payload)
        .map_err(|e| format!("send {} bytes: {e}", payload.len()))?;
    let mut back = vec![0u8; payload.len()];
    conn.read_exact(&mut back)
        .map_err(|e| format!("read {} bytes back: {e}", payload.len()))?;
    if back != payload {
        return Err("echoed bytes differ".into());
    }
    Ok(())
}

/// A TCP echo server listening in a namespace: every connection gets its
/// bytes back until it closes. Stops (and joins its threads) on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `ip:port` (port 0: any) inside `ns`.
    pub fn start(ns: &Netns, ip: IpAddr, port: u16) -> Self {
        let listener = ns
            .run(|| TcpListener::bind(SocketAddr::new(ip, port)))
            .unwrap_or_else(|e| panic!("bind {ip}:{port} in {}: {e}", ns.name()));
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let flag = flag.clone();
                        conns.push(std::thread::spawn(move || echo(conn, &flag)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TCP echo round trip of `payload` from `client` to `server`'s `addr`.
pub fn tcp_echo(
    server: &Netns,
    client: &Netns,
    addr: IpAddr,
    payload: &[u8],
) -> Result<(), String> {
    let srv = EchoServer::start(server, addr, 0);
    let mut conn = tcp_connect(client, srv.addr, Duration::from_secs(3))?;
    exchange(&mut conn, payload)
}

/// One UDP echo round trip from `client` to `server`'s `addr` (5 s wait).
pub fn udp_echo(server: &Netns, client: &Netns, addr: IpAddr) -> Result<(), String> {
    let srv = server
        .run(|| UdpSocket::bind(SocketAddr::new(addr, 0)))
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let to = srv.local_addr().map_err(|e| e.to_string())?;
    srv.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        if let Ok((n, peer)) = srv.recv_from(&mut buf) {
            let _ = srv.send_to(&buf[..n], peer);
        }
    });
    let any = if addr.is_ipv6() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let sock = client
        .run(|| UdpSocket::bind(SocketAddr::new(any, 0)))
        .map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    sock.send_to(b"hello over udp", to)
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut buf = [0u8; 64];
    let result = match sock.recv_from(&mut buf) {
        Ok((n, _)) if &buf[..n] == b"hello over udp" => Ok(()),
        Ok(_) => Err("wrong UDP echo".into()),
        Err(e) => Err(format!("no UDP echo from {to}: {e}")),
    };
    let _ = echo.join();
    result
}

/// A VXLAN frame as a stranger on the underlay would craft it: UDP to
/// `to`:8472, VXLAN header with `vni`, inner Ethernet (`inner_dst_mac`),
/// IPv4 or IPv6 (by `inner_dst`'s family), UDP with `payload`.
#[derive(Debug, Clone)]
pub struct VxlanFrame {
    pub to: IpAddr,
    pub vni: u32,
    pub inner_dst_mac: String,
    pub inner_src: IpAddr,
    pub inner_dst: SocketAddr,
    pub payload: String,
}

/// Builds the frame in python3 (argv: node, VNI, MAC, inner src, inner
/// dst, port, count, payload) and sends it `count` times, 20 ms apart.
const SEND_VXLAN: &str = r#"
import socket, struct, sys, time
def csum(b):
    if len(b) % 2:
        b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
node, vni, mac, src, dst, port, count, payload = sys.argv[1:9]
vni, port, count, payload = int(vni), int(port), int(count), payload.encode()
dmac = bytes.fromhex(mac.replace(':', ''))
smac = bytes.fromhex('020000000099')
ulen = 8 + len(payload)
udp = struct.pack('!HHHH', 40000, port, ulen, 0) + payload
if ':' in dst:
    s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    c = csum(s6 + d6 + struct.pack('!I', ulen) + b'\0\0\0\x11' + udp) or 0xffff
    udp = udp[:6] + struct.pack('!H', c) + udp[8:]
    inner = dmac + smac + b'\x86\xdd' + struct.pack('!IHBB', 6 << 28, ulen, 17, 64) + s6 + d6 + udp
else:
    hdr = struct.pack('!BBHHHBBH', 0x45, 0, 20 + ulen, 1, 0, 64, 17, 0)
    hdr += socket.inet_aton(src) + socket.inet_aton(dst)
    hdr = hdr[:10] + struct.pack('!H', csum(hdr)) + hdr[12:]
    inner = dmac + smac + b'\x08\x00' + hdr + udp
frame = struct.pack('!II', 0x08000000, vni << 8) + inner
s = socket.socket(socket.AF_INET6 if ':' in node else socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(frame, (node, 8472))
    time.sleep(0.02)
"#;

/// Sends `frame` `count` times from inside `from` (python3 builds it).
pub fn send_vxlan(from: &Netns, frame: &VxlanFrame, count: u32) -> Result<(), String> {
    let out = from
        .command("python3")
        .args(["-c", SEND_VXLAN])
        .arg(frame.to.to_string())
        .arg(frame.vni.to_string())
        .arg(&frame.inner_dst_mac)
        .arg(frame.inner_src.to_string())
        .arg(frame.inner_dst.ip().to_string())
        .arg(frame.inner_dst.port().to_string())
        .arg(count.to_string())
        .arg(&frame.payload)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "sending VXLAN frames: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}
