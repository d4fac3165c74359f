//! The prober: every interval, one round over every target address — all
//! echoes sent at once, replies collected until the timeout, then a TCP
//! connect to the health port of each address — published as one
//! [`HealthReport`] and as metrics.
//!
//! A round takes at most `timeout` for the echoes plus `timeout` per
//! address that does not answer the connect; the targets are re-read at
//! each round, so a node that leaves stops being probed (and its metric
//! series go) at the next one.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cilia_api::{NodeHealth, ProbeResult};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use super::{icmp, sleep_unless_stopped, HealthReport, HealthTarget, NsThread};

/// How the prober probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    /// The health port of the other nodes' responders.
    pub port: u16,
    /// Time between the starts of two rounds (at least the round's length).
    pub interval: Duration,
    /// How long an echo reply or a connect may take.
    pub timeout: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            port: super::DEFAULT_HEALTH_PORT,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
        }
    }
}

/// A running prober; stopped when dropped.
pub struct Prober {
    _thread: NsThread,
}

impl Prober {
    /// Starts probing `targets` (re-read every round) from inside the
    /// namespace at `netns`; the receiver sees each round's results, and
    /// `metrics` carries them as `cilia_node_health_*`. Fails when the
    /// namespace cannot be entered or no raw ICMP socket can be opened.
    pub fn start(
        netns: &Path,
        config: ProbeConfig,
        targets: watch::Receiver<Vec<HealthTarget>>,
        metrics: crate::metrics::AgentMetrics,
    ) -> io::Result<(Self, watch::Receiver<Arc<HealthReport>>)> {
        let (report_tx, report) = watch::channel(Arc::new(HealthReport::new()));
        let thread = NsThread::spawn(
            "cilia-health-prober",
            netns,
            Sockets::open,
            move |sockets, stop| {
                let mut round = Round {
                    sockets,
                    config,
                    id: (std::process::id() as u16) ^ 0xc1a0,
                    seq: 0,
                    series: HashSet::new(),
                };
                loop {
                    let started = Instant::now();
                    let list = targets.borrow().clone();
                    let report = round.run(&list);
                    round.publish_metrics(&report, &metrics);
                    report_tx.send_replace(Arc::new(report));
                    let rest = config.interval.saturating_sub(started.elapsed());
                    if sleep_unless_stopped(rest, stop) {
                        break;
                    }
                }
            },
        )?;
        Ok((Self { _thread: thread }, report))
    }
}

/// The raw echo sockets, one per family (a family the namespace lacks has
/// none, and its probes fail saying so).
struct Sockets {
    v4: Option<Socket>,
    v6: Option<Socket>,
}

impl Sockets {
    fn open() -> io::Result<Self> {
        let open = |domain, proto| -> io::Result<Socket> {
            let s = Socket::new(domain, Type::RAW, Some(proto))?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        let v4 = open(Domain::IPV4, Protocol::ICMPV4);
        let v6 = open(Domain::IPV6, Protocol::ICMPV6);
        match (v4, v6) {
            (Err(e), Err(_)) => Err(io::Error::new(
                e.kind(),
                format!("opening raw ICMP sockets for health probes: {e}"),
            )),
            (v4, v6) => Ok(Self {
                v4: v4.ok(),
                v6: v6.ok(),
            }),
        }
    }

    fn of(&self, addr: IpAddr) -> Option<&Socket> {
        match addr {
            IpAddr::V4(_) => self.v4.as_ref(),
            IpAddr::V6(_) => self.v6.as_ref(),
        }
    }
}

/// A probe's outcome: the round trip or connect time, or why not.
type Outcome = Result<Duration, String>;

/// The prober's state across rounds.
struct Round {
    sockets: Sockets,
    config: ProbeConfig,
    /// Echo identifier of this prober.
    id: u16,
    /// Last echo sequence number used.
    seq: u16,
    /// Metric label sets set by the last round (to remove the gone ones).
    series: HashSet<Vec<(String, String)>>,
}

impl Round {
    fn run(&mut self, targets: &[HealthTarget]) -> HealthReport {
        let addrs: Vec<IpAddr> = targets
            .iter()
            .flat_map(|t| t.addresses.iter().copied())
            .collect();
        let when = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut echoes = self.echo_all(&addrs).into_iter();
        let mut report = HealthReport::new();
        for t in targets {
            let mut health = NodeHealth::default();
            for &addr in &t.addresses {
                let echo = echoes.next().unwrap_or_else(|| Err("not probed".into()));
                health.icmp.push(result(addr, echo, &when));
                let tcp = connect(addr, self.config.port, self.config.timeout);
                health.tcp.push(result(addr, tcp, &when));
            }
            report.insert(t.node.clone(), health);
        }
        report
    }

    /// Sends an echo to every address at once, then collects the replies
    /// until all came or the timeout passed; outcomes in `addrs`' order.
    fn echo_all(&mut self, addrs: &[IpAddr]) -> Vec<Outcome> {
        self.drain_stale();
        let mut out: Vec<Option<Outcome>> = vec![None; addrs.len()];
        // seq -> (index into addrs, when sent)
        let mut pending: HashMap<u16, (usize, Instant)> = HashMap::new();
        for (i, &addr) in addrs.iter().enumerate() {
            self.seq = self.seq.wrapping_add(1);
            let Some(sock) = self.sockets.of(addr) else {
                out[i] = Some(Err("no raw ICMP socket for this family".into()));
                continue;
            };
            let msg = icmp::echo_request(addr.is_ipv6(), self.id, self.seq, b"cilia-health");
            match sock.send_to(&msg, &SocketAddr::new(addr, 0).into()) {
                Ok(_) => {
                    pending.insert(self.seq, (i, Instant::now()));
                }
                Err(e) => out[i] = Some(Err(format!("sending echo: {e}"))),
            }
        }
        let deadline = Instant::now() + self.config.timeout;
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.wait_readable(left) {
                break;
            }
            for (v6, sock) in [(false, &self.sockets.v4), (true, &self.sockets.v6)] {
                let Some(sock) = sock else { continue };
                for reply in read_replies(sock, v6) {
                    if reply.id != self.id {
                        continue;
                    }
                    let Some(&(i, sent)) = pending.get(&reply.seq) else {
                        continue;
                    };
                    if reply.source.is_some_and(|s| s != addrs[i]) {
                        continue;
                    }
                    pending.remove(&reply.seq);
                    out[i] = Some(Ok(sent.elapsed()));
                }
            }
        }
        let timeout = humantime::format_duration(self.config.timeout).to_string();
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(format!("no echo reply within {timeout}"))))
            .collect()
    }

    /// Discards replies that came after their round's timeout.
    fn drain_stale(&self) {
        for (v6, sock) in [(false, &self.sockets.v4), (true, &self.sockets.v6)] {
            if let Some(sock) = sock {
                read_replies(sock, v6);
            }
        }
    }

    /// Waits until a socket has something to read, at most `wait`.
    fn wait_readable(&self, wait: Duration) -> bool {
        let mut fds: Vec<libc::pollfd> = [&self.sockets.v4, &self.sockets.v6]
            .into_iter()
            .flatten()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd
        // for the call's duration, and its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        n > 0
    }

    /// Sets the `cilia_node_health_*` series of `report`, removing those of
    /// addresses no longer probed.
    fn publish_metrics(&mut self, report: &HealthReport, m: &crate::metrics::AgentMetrics) {
        let mut now = HashSet::new();
        for (node, health) in report {
            for (probe, results) in [("icmp", &health.icmp), ("tcp", &health.tcp)] {
                for r in results {
                    let labels = vec![
                        ("node".to_string(), node.clone()),
                        ("probe".to_string(), probe.to_string()),
                        ("address".to_string(), r.address.to_string()),
                    ];
                    m.node_health_reachable
                        .get_or_create(&labels)
                        .set(i64::from(r.reachable));
                    match r.latency_ms {
                        Some(ms) => {
                            m.node_health_latency.get_or_create(&labels).set(ms / 1e3);
                        }
                        None => {
                            m.node_health_latency.remove(&labels);
                        }
                    }
                    now.insert(labels);
                }
            }
        }
        for gone in self.series.difference(&now) {
            m.node_health_reachable.remove(gone);
            m.node_health_latency.remove(gone);
        }
        self.series = now;
    }
}

/// Every echo reply waiting on `sock` (non-blocking; other ICMP ignored).
fn read_replies(sock: &Socket, v6: bool) -> Vec<icmp::EchoReply> {
    let mut buf = [0u8; 2048];
    let mut out = Vec::new();
    // Bounded: a flood of ICMP cannot keep the prober reading forever.
    for _ in 0..1024 {
        match (&*sock).read(&mut buf) {
            Ok(n) => out.extend(icmp::parse_echo_reply(v6, &buf[..n])),
            Err(_) => break,
        }
    }
    out
}

/// A TCP connect to `addr`'s health port, timed.
fn connect(addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
    let started = Instant::now();
    match TcpStream::connect_timeout(&SocketAddr::new(addr, port), timeout) {
        Ok(_) => Ok(started.elapsed()),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(format!(
            "no connection within {}",
            humantime::format_duration(timeout)
        )),
        Err(e) => Err(format!("connecting to port {port}: {e}")),
    }
}

fn result(address: IpAddr, outcome: Outcome, when: &str) -> ProbeResult {
    let (reachable, latency_ms, error) = match outcome {
        Ok(d) => (true, Some(d.as_secs_f64() * 1e3), None),
        Err(e) => (false, None, Some(e)),
    };
    ProbeResult {
        address,
        reachable,
        latency_ms,
        last_probe: Some(when.to_string()),
        error,
    }
}
