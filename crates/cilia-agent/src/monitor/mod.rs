//! The monitor: reads the datapath's event ring buffer, decodes and enriches
//! events into flows (endpoint, labels, namespace, identity, the rule that
//! decided), keeps a bounded ring of recent flows, and fans flows out to
//! live listeners. The L7 proxy's request records ([`Monitor::record_l7`])
//! become flows the same way, named from the same snapshots.
//!
//! Invariants: memory is bounded (the ring's capacity, a bounded broadcast
//! channel); a slow listener loses flows, told as a `lost` count, and never
//! stalls the reader; the datapath emits events only at the level someone
//! needs (flow ring on: drops and verdicts; a trace listener: everything).
//!
//! Under load, repeated events are aggregated ([`Aggregator`]): per
//! [`AGGREGATION_WINDOW`], the first [`AGGREGATION_PASS`] events of a kind
//! become flows one by one and the rest are counted into one summary flow
//! (`aggregated` = the events it stands for). The event and verdict metrics
//! count every event; `cilia status` and `cilia_monitor_aggregated_events`
//! say how many were folded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cilia_abi::{
    ct_state_name, reason_name, EndpointKey, Event, CILIA_DIR_EGRESS, CILIA_EVENT_DEBUG,
    CILIA_EVENT_DROP, CILIA_EVENT_POLICY_VERDICT, CILIA_EVENT_SERVICE, CILIA_EVENT_TRACE,
    CILIA_METRIC_DROP, CILIA_METRIC_FORWARD, CILIA_MONITOR_DEBUG, CILIA_MONITOR_DROPS,
    CILIA_MONITOR_OFF, CILIA_MONITOR_TRACE, CILIA_VERDICT_AUDIT, CILIA_VERDICT_DENY,
};
use cilia_api::{Flow, FlowL7, FlowPeer, FlowService};
use cilia_proxy::control::{L7Direction, L7Flow, L7Verdict};
use tokio::sync::{broadcast, watch, Notify};
use tracing::warn;

/// Flows kept for `cilia observe` by default.
pub const DEFAULT_FLOW_BUFFER: usize = 4096;

/// What listeners receive.
pub type FlowRef = Arc<Flow>;

/// Shared between the reader task and the API handlers. The ring is behind a
/// std mutex: pushes and snapshots are short and never held across awaits.
pub struct Monitor {
    ring: Mutex<VecDeque<FlowRef>>,
    capacity: usize,
    tx: broadcast::Sender<FlowRef>,
    /// Live `cilia monitor` listeners, and those of them wanting traces.
    listeners: AtomicUsize,
    trace_listeners: AtomicUsize,
    debug_listeners: AtomicUsize,
    metrics: crate::metrics::AgentMetrics,
    /// The latest name snapshot ([`publish_names`] sends it), read by the
    /// packet reader and by [`Monitor::record_l7`].
    names: watch::Sender<Arc<Names>>,
    /// Asks [`publish_names`] for a fresh snapshot at once.
    refresh: Arc<Notify>,
    /// When `record_l7` last waited for a fresh snapshot (ms since `born`).
    l7_waited_ms: AtomicU64,
    born: Instant,
    /// Events folded into summary flows since the agent started.
    aggregated: AtomicU64,
}

impl Monitor {
    pub fn new(capacity: usize, metrics: crate::metrics::AgentMetrics) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(Self {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(65536))),
            capacity,
            tx,
            listeners: AtomicUsize::new(0),
            trace_listeners: AtomicUsize::new(0),
            debug_listeners: AtomicUsize::new(0),
            metrics,
            names: watch::Sender::new(Arc::new(Names::default())),
            refresh: Arc::new(Notify::new()),
            l7_waited_ms: AtomicU64::new(0),
            born: Instant::now(),
            aggregated: AtomicU64::new(0),
        })
    }

    /// What the packet reader needs to name endpoints and rules.
    pub fn names_feed(&self) -> NamesFeed {
        NamesFeed {
            rx: self.names.subscribe(),
            refresh: self.refresh.clone(),
        }
    }

    /// Replaces the name snapshot (what [`publish_names`] does).
    pub fn set_names(&self, names: Names) {
        self.names.send_replace(Arc::new(names));
    }

    /// Records one HTTP request the L7 proxy handled: a flow (event `l7`)
    /// named like packet flows, in the ring and to live listeners, and in
    /// the `cilia_proxy_http_*` metrics. When the current snapshot lacks
    /// the deciding endpoint (just created), it asks for a fresh one and
    /// waits for it at most [`FRESH_NAMES_WAIT`], and at most once per
    /// [`L7_WAIT_INTERVAL`], so a stream of flows naming a gone endpoint
    /// costs the caller (the proxy client's reader) almost nothing.
    pub async fn record_l7(&self, flow: &L7Flow) {
        let mut rx = self.names.subscribe();
        if rx.borrow().lacks_endpoint(flow.endpoint_id) && self.may_wait_for_names() {
            self.refresh.notify_one();
            let _ = tokio::time::timeout(FRESH_NAMES_WAIT, rx.changed()).await;
        }
        let names = rx.borrow().clone();
        self.metrics
            .record_http(flow.verdict, flow.status, flow.latency_us);
        self.push(decode_l7(flow, &names));
    }

    /// Whether `record_l7` may wait now (none did within `L7_WAIT_INTERVAL`).
    fn may_wait_for_names(&self) -> bool {
        // Stored as ms since `born`, plus 1: 0 means never.
        let now = self.born.elapsed().as_millis() as u64 + 1;
        let last = self.l7_waited_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= L7_WAIT_INTERVAL.as_millis() as u64)
            && self
                .l7_waited_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The event level the datapath must emit for the current listeners.
    pub fn wanted_level(&self) -> u32 {
        if self.debug_listeners.load(Ordering::Relaxed) > 0 {
            CILIA_MONITOR_DEBUG
        } else if self.trace_listeners.load(Ordering::Relaxed) > 0 {
            CILIA_MONITOR_TRACE
        } else if self.capacity > 0 || self.listeners.load(Ordering::Relaxed) > 0 {
            CILIA_MONITOR_DROPS
        } else {
            CILIA_MONITOR_OFF
        }
    }

    /// Counts a datapath event in the metrics (a summary flow: every event
    /// it stands for), then pushes it.
    fn publish(&self, flow: Flow) {
        let n = flow.aggregated.unwrap_or(1);
        self.metrics
            .events
            .get_or_create(&vec![
                ("type".to_string(), flow.event.clone()),
                (
                    "reason".to_string(),
                    flow.drop_reason.clone().unwrap_or_default(),
                ),
            ])
            .inc_by(n);
        if flow.policy.is_some() {
            self.metrics
                .verdicts
                .get_or_create(&vec![
                    ("verdict".to_string(), flow.verdict.clone()),
                    ("direction".to_string(), flow.direction.clone()),
                ])
                .inc_by(n);
        }
        if flow.aggregated.is_some() {
            self.aggregated.fetch_add(n, Ordering::Relaxed);
            self.metrics
                .aggregated
                .get_or_create(&vec![("type".to_string(), flow.event.clone())])
                .inc_by(n);
        }
        self.push(flow);
    }

    /// Events that got no flow of their own but were counted into a
    /// summary flow, since the agent started.
    pub fn aggregated(&self) -> u64 {
        self.aggregated.load(Ordering::Relaxed)
    }

    /// Into the ring (when it is on) and to live listeners.
    fn push(&self, flow: Flow) {
        let flow = Arc::new(flow);
        if self.capacity > 0 {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(flow.clone());
        }
        // No receivers is fine: nobody is listening.
        let _ = self.tx.send(flow);
    }

    /// The recent flows, oldest first.
    /// How many flows the ring holds.
    pub fn buffered(&self) -> usize {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn recent(&self) -> Vec<FlowRef> {
        self.ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Subscribes to live flows; the guard keeps the datapath's event level
    /// up while it lives.
    pub fn subscribe(
        self: &Arc<Self>,
        traces: bool,
        debug: bool,
    ) -> (broadcast::Receiver<FlowRef>, ListenerGuard) {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        if traces {
            self.trace_listeners.fetch_add(1, Ordering::Relaxed);
        }
        if debug {
            self.debug_listeners.fetch_add(1, Ordering::Relaxed);
        }
        (
            self.tx.subscribe(),
            ListenerGuard {
                monitor: self.clone(),
                traces,
                debug,
            },
        )
    }
}

/// Counts a live listener for as long as it exists.
pub struct ListenerGuard {
    monitor: Arc<Monitor>,
    traces: bool,
    debug: bool,
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.monitor.listeners.fetch_sub(1, Ordering::Relaxed);
        if self.traces {
            self.monitor.trace_listeners.fetch_sub(1, Ordering::Relaxed);
        }
        if self.debug {
            self.monitor.debug_listeners.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Names and labels the reader attaches to events: a snapshot the agent
/// sends whenever endpoints or rules may have changed. The reader never
/// touches the endpoint manager, so a long regeneration cannot stall it; a
/// snapshot a moment old can only miss a new endpoint or rule, never misname
/// one (rule cookies are stable).
#[derive(Debug, Default, PartialEq)]
pub struct Names {
    /// Endpoint id -> (labels, namespace); the flows share the labels.
    pub endpoints: HashMap<u16, (Arc<BTreeMap<String, String>>, String)>,
    /// Address -> endpoint id.
    pub addresses: HashMap<IpAddr, u16>,
    /// Rule names by cookie - 1.
    pub rules: crate::policy::RuleNames,
    /// Labels of other nodes' identities (cluster mode): names a peer that
    /// is no local endpoint.
    pub identities: Arc<BTreeMap<u32, BTreeMap<String, String>>>,
}

/// Where the reader gets its name snapshots from, and how it asks for a
/// fresh one (an event named an endpoint or a rule it does not know yet).
pub struct NamesFeed {
    pub rx: tokio::sync::watch::Receiver<Arc<Names>>,
    pub refresh: Arc<tokio::sync::Notify>,
}

/// How long the reader waits for a fresh snapshot it asked for before it
/// decodes with what it has.
const FRESH_NAMES_WAIT: Duration = Duration::from_millis(50);

/// `record_l7` waits for a fresh snapshot at most once per this interval.
const L7_WAIT_INTERVAL: Duration = Duration::from_secs(1);

/// The drop reason of a request the L7 policy denied (answered 403).
pub const L7_DENIED_REASON: &str = "L7 policy denied";

impl Names {
    /// Whether an event names an endpoint or a rule this snapshot lacks.
    fn lacks(&self, ev: &Event) -> bool {
        ev.rule as usize > self.rules.len() || self.lacks_endpoint(ev.endpoint_id)
    }

    fn lacks_endpoint(&self, id: u16) -> bool {
        id != 0 && !self.endpoints.contains_key(&id)
    }

    /// The snapshot of the current endpoints (from the store) and rules
    /// (from the policy's summary).
    pub fn of(
        store: &crate::store::Store,
        policy: &crate::policy::repository::PolicySummary,
    ) -> Option<Self> {
        let mut names = Self {
            rules: policy.rule_names.clone(),
            identities: policy.remote_identities.clone(),
            ..Self::default()
        };
        for rec in store.endpoints().ok()? {
            for ip in rec.ips() {
                names.addresses.insert(ip, rec.id);
            }
            names
                .endpoints
                .insert(rec.id, (Arc::new(rec.labels), rec.namespace));
        }
        Some(names)
    }

    /// A local endpoint by id, without address (a socket-level service
    /// flow: its source is not chosen yet); id 0 is the node.
    fn endpoint_peer(&self, id: u16) -> FlowPeer {
        let (labels, namespace) = self
            .endpoints
            .get(&id)
            .cloned()
            .map(|(l, n)| (l, Some(n)))
            .unwrap_or_default();
        FlowPeer {
            endpoint: (id != 0).then_some(id),
            ip: None,
            port: None,
            identity: if id == 0 { cilia_abi::CILIA_ID_HOST } else { 0 },
            labels,
            namespace,
        }
    }

    fn peer(&self, ip: Option<IpAddr>, port: Option<u16>, identity: u32) -> FlowPeer {
        let endpoint = ip.and_then(|ip| self.addresses.get(&ip).copied());
        let (labels, namespace) = endpoint
            .and_then(|id| self.endpoints.get(&id).cloned())
            .map(|(l, n)| (l, Some(n)))
            .or_else(|| {
                // A pod of another node: its identity's labels.
                let mut labels = self.identities.get(&identity)?.clone();
                let ns = labels.remove(crate::store::NAMESPACE_LABEL);
                labels.retain(|k, _| !k.starts_with(crate::store::NAMESPACE_LABELS_PREFIX));
                Some((Arc::new(labels), ns))
            })
            .unwrap_or_default();
        FlowPeer {
            endpoint,
            ip: ip.map(|ip| ip.to_string()),
            port,
            identity,
            labels,
            namespace,
        }
    }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        1 => "ICMP",
        6 => "TCP",
        17 => "UDP",
        58 => "ICMPv6",
        132 => "SCTP",
        _ => "",
    }
}

/// Wall-clock time of a monotonic timestamp.
fn wall_clock(ts_ns: u64) -> (SystemTime, u64) {
    let now_mono = cilia_datapath::monotonic_ns();
    let now = SystemTime::now();
    let t = now
        .checked_sub(Duration::from_nanos(now_mono.saturating_sub(ts_ns)))
        .unwrap_or(now);
    let ns = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t, ns)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// The source address (and port, for TCP/UDP) of a captured packet that
/// starts at its Ethernet header, as the endpoint programs see packets.
fn packet_source(data: &[u8], proto: u8) -> Option<(IpAddr, Option<u16>)> {
    const ETH: usize = 14;
    let ethertype = u16::from_be_bytes([*data.get(12)?, *data.get(13)?]);
    let (ip, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(data.get(ETH)? & 0x0f) * 4;
            let a: [u8; 4] = data.get(ETH + 12..ETH + 16)?.try_into().ok()?;
            (IpAddr::from(a), ETH + ihl)
        }
        0x86dd => {
            let a: [u8; 16] = data.get(ETH + 8..ETH + 24)?.try_into().ok()?;
            (IpAddr::from(a), ETH + 40)
        }
        _ => return None,
    };
    let port = matches!(proto, 6 | 17)
        .then(|| Some(u16::from_be_bytes([*data.get(l4)?, *data.get(l4 + 1)?])))
        .flatten();
    Some((ip, port))
}

fn decode(ev: &Event, enrich: &Names) -> Flow {
    let addr = |a: [u8; 16]| {
        EndpointKey {
            addr: a,
            family: ev.family,
            pad: [0; 3],
        }
        .ip()
    };
    let (src_ip, dst_ip) = if ev.family == 0 {
        (None, None)
    } else {
        (addr(ev.saddr), addr(ev.daddr))
    };
    let ported = matches!(ev.proto, 6 | 17 | 132);
    let port = |p: u16| ported.then_some(u16::from_be(p));
    let (time, time_ns) = wall_clock(ev.ts);
    let verdict = match (ev.type_, ev.verdict) {
        (CILIA_EVENT_DROP, _) => "DROPPED",
        (_, CILIA_VERDICT_AUDIT) => "AUDIT",
        (_, CILIA_VERDICT_DENY) => "DROPPED",
        _ => "FORWARDED",
    };
    let event = match ev.type_ {
        CILIA_EVENT_DROP => "drop",
        CILIA_EVENT_TRACE => "trace",
        CILIA_EVENT_POLICY_VERDICT => "policy-verdict",
        CILIA_EVENT_DEBUG => "debug",
        CILIA_EVENT_SERVICE => "service",
        _ => "unknown",
    };
    let policy = (ev.type_ == CILIA_EVENT_POLICY_VERDICT
        || (ev.type_ == CILIA_EVENT_DROP && ev.reason == cilia_abi::CILIA_DROP_POLICY))
        .then(|| {
            if ev.rule == 0 {
                if verdict == "FORWARDED" {
                    "default allow".to_string()
                } else {
                    "default deny".to_string()
                }
            } else {
                enrich
                    .rules
                    .name(ev.rule)
                    .unwrap_or_else(|| format!("rule #{}", ev.rule))
            }
        });
    let caplen = usize::from(ev.caplen).min(ev.data.len());
    // A service event: saddr/sport the frontend, daddr/dport the backend;
    // the client (the flow's source) is in the captured packet.
    let (source, service) = if ev.type_ == CILIA_EVENT_SERVICE {
        let (client_ip, client_port) = packet_source(&ev.data[..caplen], ev.proto)
            .map_or((None, None), |(ip, port)| (Some(ip), port));
        let sock = |ip: Option<IpAddr>, p: u16| {
            ip.map_or_else(String::new, |ip| {
                std::net::SocketAddr::new(ip, u16::from_be(p)).to_string()
            })
        };
        let socket = ev.reason == cilia_abi::CILIA_LB_PATH_SOCKET;
        let service = FlowService {
            balancer: if socket { "socket" } else { "per-packet" }.into(),
            id: ev.rule as u16,
            frontend: format!(
                "{}/{}",
                sock(src_ip, ev.sport),
                proto_name(ev.proto).to_ascii_lowercase()
            ),
            backend: sock(dst_ip, ev.dport),
        };
        let client = if socket {
            enrich.endpoint_peer(ev.endpoint_id)
        } else {
            enrich.peer(client_ip, client_port, ev.src_identity)
        };
        (client, Some(service))
    } else {
        (enrich.peer(src_ip, port(ev.sport), ev.src_identity), None)
    };
    Flow {
        time: humantime::format_rfc3339_nanos(time).to_string(),
        time_ns,
        event: event.into(),
        verdict: verdict.into(),
        drop_reason: (ev.type_ == CILIA_EVENT_DROP)
            .then(|| reason_name(CILIA_METRIC_DROP, ev.reason).to_string()),
        direction: if ev.dir == CILIA_DIR_EGRESS {
            "egress"
        } else {
            "ingress"
        }
        .into(),
        observed_at: ev.endpoint_id,
        source,
        destination: enrich.peer(dst_ip, port(ev.dport), ev.dst_identity),
        protocol: proto_name(ev.proto).into(),
        length: ev.len,
        policy,
        trace: match ev.type_ {
            CILIA_EVENT_TRACE => Some(reason_name(CILIA_METRIC_FORWARD, ev.reason).to_string()),
            CILIA_EVENT_DEBUG => Some(format!("conntrack: {}", ct_state_name(ev.reason))),
            _ => None,
        },
        data: (caplen > 0).then(|| hex(&ev.data[..caplen])),
        l7: None,
        service,
        aggregated: None,
        node: None,
    }
}

/// The flow of one HTTP request the proxy reported, named from `names`.
fn decode_l7(flow: &L7Flow, names: &Names) -> Flow {
    let time = UNIX_EPOCH + Duration::from_nanos(flow.time_unix_ns);
    let (verdict, drop_reason, outcome) = match flow.verdict {
        L7Verdict::Forwarded => ("FORWARDED", None, "forwarded"),
        L7Verdict::Denied => ("DROPPED", Some(L7_DENIED_REASON), "denied"),
        L7Verdict::Error => ("ERROR", None, "error"),
    };
    // The proxy's dual-stack sockets may report an IPv4 peer as ::ffff:a.b.c.d.
    let peer = |addr: std::net::SocketAddr, identity| {
        names.peer(Some(addr.ip().to_canonical()), Some(addr.port()), identity)
    };
    Flow {
        time: humantime::format_rfc3339_nanos(time).to_string(),
        time_ns: flow.time_unix_ns,
        event: "l7".into(),
        verdict: verdict.into(),
        drop_reason: drop_reason.map(String::from),
        direction: match flow.direction {
            L7Direction::Ingress => "ingress",
            L7Direction::Egress => "egress",
        }
        .into(),
        observed_at: flow.endpoint_id,
        source: peer(flow.src, flow.src_identity),
        destination: peer(flow.dst, flow.dst_identity),
        protocol: "TCP".into(),
        length: 0,
        policy: (!flow.rules.is_empty()).then(|| flow.rules.join(", ")),
        trace: None,
        data: None,
        l7: Some(FlowL7 {
            protocol: "http".into(),
            method: flow.method.clone(),
            path: flow.path.clone(),
            host: flow.host.clone(),
            status: flow.status,
            latency_us: flow.latency_us,
            verdict: outcome.into(),
        }),
        service: None,
        aggregated: None,
        node: None,
    }
}

/// Publishes name snapshots into `monitor`: every 250 ms, and at once when
/// the reader or `record_l7` asks. This task reads the store and the policy
/// summary (off the async threads); the readers never do. It ends with the
/// monitor.
pub async fn publish_names(
    manager: Arc<dyn Fn() -> Option<Names> + Send + Sync>,
    monitor: Weak<Monitor>,
) {
    loop {
        let m = manager.clone();
        let fresh = tokio::task::spawn_blocking(move || m()).await;
        let Some(monitor) = monitor.upgrade() else {
            return;
        };
        if let Ok(Some(names)) = fresh {
            monitor.names.send_if_modified(|current| {
                let changed = **current != names;
                if changed {
                    *current = Arc::new(names);
                }
                changed
            });
        }
        let refresh = monitor.refresh.clone();
        drop(monitor);
        let _ = tokio::time::timeout(Duration::from_millis(250), refresh.notified()).await;
    }
}

/// Events of one kind become flows one by one at most this many times per
/// [`AGGREGATION_WINDOW`]; the rest of the window's are summarised.
pub const AGGREGATION_PASS: u32 = 8;

/// The window of [`AGGREGATION_PASS`]: also the longest a summary waits.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(1);

/// Kinds tracked per window (memory bound); events of further kinds in the
/// same window become flows one by one.
pub const AGGREGATION_KINDS: usize = 4096;

/// What makes events "of one kind": for verdicts and drops the decision and
/// its parties, not the source port (every new connection has its own); for
/// traces and debug events the flow itself (its 5-tuple), so a busy flow's
/// packets are sampled, not merged with another flow's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AggregationKey {
    type_: u8,
    reason: u8,
    dir: u8,
    verdict: u8,
    endpoint: u16,
    proto: u8,
    src_identity: u32,
    dst_identity: u32,
    rule: u32,
    dport: u16,
    /// Traces and debug events only: the rest of the 5-tuple.
    sport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

impl AggregationKey {
    fn of(ev: &Event) -> Self {
        // Service events: per service, client identity and backend.
        let per_flow = matches!(
            ev.type_,
            CILIA_EVENT_TRACE | CILIA_EVENT_DEBUG | CILIA_EVENT_SERVICE
        );
        Self {
            type_: ev.type_,
            reason: ev.reason,
            dir: ev.dir,
            verdict: ev.verdict,
            endpoint: ev.endpoint_id,
            proto: ev.proto,
            src_identity: ev.src_identity,
            dst_identity: ev.dst_identity,
            rule: ev.rule,
            dport: ev.dport,
            sport: if per_flow { ev.sport } else { 0 },
            saddr: if per_flow { ev.saddr } else { [0; 16] },
            daddr: if per_flow { ev.daddr } else { [0; 16] },
        }
    }
}

/// A kind's events in the current window.
struct Seen {
    passed: u32,
    /// Events held back, and the last of them (what its summary shows).
    held: u64,
    last: Option<Box<Event>>,
}

/// Keeps repeated events off the flow path when they come fast: decoding,
/// naming and fanning out every one of them costs the agent CPU on the
/// machine the traffic runs on. Below [`AGGREGATION_PASS`] events of a kind
/// per window nothing changes; above it one summary flow per kind and
/// window carries the count of the held events.
pub struct Aggregator {
    window_start: Instant,
    seen: HashMap<AggregationKey, Seen>,
}

impl Default for Aggregator {
    fn default() -> Self {
        Self {
            window_start: Instant::now(),
            seen: HashMap::new(),
        }
    }
}

impl Aggregator {
    /// Whether `ev` becomes a flow now; if not, it is held for the summary.
    fn pass(&mut self, ev: &Event) -> bool {
        let key = AggregationKey::of(ev);
        if self.seen.len() >= AGGREGATION_KINDS && !self.seen.contains_key(&key) {
            return true;
        }
        let seen = self.seen.entry(key).or_insert(Seen {
            passed: 0,
            held: 0,
            last: None,
        });
        if seen.passed < AGGREGATION_PASS {
            seen.passed += 1;
            return true;
        }
        seen.held += 1;
        match &mut seen.last {
            Some(last) => **last = *ev,
            None => seen.last = Some(Box::new(*ev)),
        }
        false
    }

    /// When the window is over (at `now`): the summaries of the held events,
    /// each the last held event and how many it stands for; a new window.
    fn close_window(&mut self, now: Instant) -> Vec<(Event, u64)> {
        if now.duration_since(self.window_start) < AGGREGATION_WINDOW {
            return Vec::new();
        }
        self.window_start = now;
        self.seen
            .drain()
            .filter_map(|(_, s)| s.last.map(|ev| (*ev, s.held)))
            .collect()
    }
}

/// Reads events until the agent stops, and says which event level the
/// datapath must emit for the current listeners (`level`: the task that
/// owns the datapath's config applies it). It works from what it is sent
/// and never waits for the endpoint manager.
pub async fn run(
    mut names: NamesFeed,
    level: tokio::sync::watch::Sender<u32>,
    monitor: Arc<Monitor>,
    mut reader: cilia_datapath::events::EventReader,
) {
    let mut batch = Vec::new();
    let mut aggregator = Aggregator::default();
    loop {
        level.send_if_modified(|l| {
            let wanted = monitor.wanted_level();
            let changed = *l != wanted;
            *l = wanted;
            changed
        });
        // Wake at least every 200 ms to follow listener changes.
        batch.clear();
        if let Err(e) = reader.read(&mut batch, Duration::from_millis(200)).await {
            warn!(error = %e, "monitor stopped: reading events failed");
            return;
        }
        batch.retain(|ev| aggregator.pass(ev));
        let summaries = aggregator.close_window(Instant::now());
        if batch.is_empty() && summaries.is_empty() {
            continue;
        }
        let lacking = |rx: &watch::Receiver<Arc<Names>>| {
            let names = rx.borrow();
            batch.iter().any(|ev| names.lacks(ev))
                || summaries.iter().any(|(ev, _)| names.lacks(ev))
        };
        if lacking(&names.rx) {
            names.rx.mark_unchanged();
            names.refresh.notify_one();
            let _ = tokio::time::timeout(FRESH_NAMES_WAIT, names.rx.changed()).await;
        }
        let snapshot = names.rx.borrow().clone();
        for ev in &batch {
            monitor.publish(decode(ev, &snapshot));
        }
        for (ev, held) in &summaries {
            monitor.publish(Flow {
                aggregated: Some(*held),
                ..decode(ev, &snapshot)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;

    const DEATHSTAR: u16 = 1;
    const TIEFIGHTER: u16 = 3;

    /// A deathstar (fd00::2, 10.200.0.2) and a tiefighter (fd00::3) in `default`.
    fn names() -> Names {
        let labels = |class: &str| -> Arc<BTreeMap<String, String>> {
            Arc::new([("class".to_string(), class.to_string())].into())
        };
        Names {
            endpoints: [
                (DEATHSTAR, (labels("deathstar"), "default".to_string())),
                (TIEFIGHTER, (labels("tiefighter"), "default".to_string())),
            ]
            .into(),
            addresses: [
                ("fd00::2".parse().unwrap(), DEATHSTAR),
                ("10.200.0.2".parse().unwrap(), DEATHSTAR),
                ("fd00::3".parse().unwrap(), TIEFIGHTER),
            ]
            .into(),
            ..Names::default()
        }
    }

    /// The tiefighter's `PUT /v1/exhaust-port`, denied by the deathstar's
    /// ingress L7 policy.
    fn denied_put() -> L7Flow {
        L7Flow {
            time_unix_ns: 1_700_000_000_123_456_789,
            endpoint_id: DEATHSTAR,
            direction: L7Direction::Ingress,
            src: "[fd00::3]:40000".parse().unwrap(),
            dst: "[fd00::2]:80".parse().unwrap(),
            src_identity: 300,
            dst_identity: 301,
            method: "PUT".into(),
            path: "/v1/exhaust-port".into(),
            host: Some("deathstar".into()),
            status: 403,
            latency_us: 400,
            verdict: L7Verdict::Denied,
            rules: vec!["default/rule1".into()],
        }
    }

    fn monitor(capacity: usize) -> Arc<Monitor> {
        let m = Monitor::new(capacity, crate::metrics::AgentMetrics::default());
        m.set_names(names());
        m
    }

    #[tokio::test]
    async fn a_denied_request_is_a_dropped_l7_flow_naming_both_sides_and_the_rule() {
        let m = monitor(16);
        m.record_l7(&denied_put()).await;
        let flows = m.recent();
        assert_eq!(flows.len(), 1);
        let f = &*flows[0];
        assert_eq!(
            (
                f.event.as_str(),
                f.verdict.as_str(),
                f.drop_reason.as_deref()
            ),
            ("l7", "DROPPED", Some(L7_DENIED_REASON))
        );
        assert_eq!(
            (f.direction.as_str(), f.observed_at),
            ("ingress", DEATHSTAR)
        );
        assert_eq!(f.policy.as_deref(), Some("default/rule1"));
        assert_eq!(f.source.endpoint, Some(TIEFIGHTER));
        assert_eq!(f.source.labels["class"], "tiefighter");
        assert_eq!(f.source.namespace.as_deref(), Some("default"));
        assert_eq!((f.source.identity, f.source.port), (300, Some(40000)));
        assert_eq!(f.destination.endpoint, Some(DEATHSTAR));
        assert_eq!(f.destination.labels["class"], "deathstar");
        assert_eq!(f.destination.ip.as_deref(), Some("fd00::2"));
        assert_eq!(
            (f.destination.identity, f.destination.port),
            (301, Some(80))
        );
        assert_eq!(f.time_ns, 1_700_000_000_123_456_789);
        assert_eq!(f.time, "2023-11-14T22:13:20.123456789Z");
        assert_eq!(f.protocol, "TCP");
        assert_eq!(
            f.l7,
            Some(FlowL7 {
                protocol: "http".into(),
                method: "PUT".into(),
                path: "/v1/exhaust-port".into(),
                host: Some("deathstar".into()),
                status: 403,
                latency_us: 400,
                verdict: "denied".into(),
            })
        );
    }

    #[tokio::test]
    async fn forwarded_and_failed_requests_carry_no_drop_reason() {
        let m = monitor(16);
        for (verdict, status) in [(L7Verdict::Forwarded, 200), (L7Verdict::Error, 502)] {
            m.record_l7(&L7Flow {
                verdict,
                status,
                ..denied_put()
            })
            .await;
        }
        let got: Vec<_> = m
            .recent()
            .iter()
            .map(|f| {
                let l7 = f.l7.as_ref().unwrap();
                (
                    f.verdict.clone(),
                    f.drop_reason.clone(),
                    l7.verdict.clone(),
                    l7.status,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("FORWARDED".into(), None, "forwarded".into(), 200),
                ("ERROR".into(), None, "error".into(), 502),
            ]
        );
    }

    #[tokio::test]
    async fn an_egress_request_without_rules_names_no_policy() {
        let m = monitor(16);
        m.record_l7(&L7Flow {
            endpoint_id: TIEFIGHTER,
            direction: L7Direction::Egress,
            rules: vec![],
            ..denied_put()
        })
        .await;
        let f = &m.recent()[0];
        assert_eq!(
            (f.direction.as_str(), f.observed_at),
            ("egress", TIEFIGHTER)
        );
        assert_eq!(f.policy, None);
    }

    #[tokio::test]
    async fn an_ipv4_mapped_address_is_named_as_the_ipv4_endpoint() {
        let m = monitor(16);
        m.record_l7(&L7Flow {
            dst: "[::ffff:10.200.0.2]:80".parse().unwrap(),
            ..denied_put()
        })
        .await;
        let f = &m.recent()[0];
        assert_eq!(f.destination.ip.as_deref(), Some("10.200.0.2"));
        assert_eq!(f.destination.endpoint, Some(DEATHSTAR));
    }

    #[tokio::test]
    async fn live_listeners_receive_l7_flows_also_with_the_ring_off() {
        let m = monitor(0);
        let (mut rx, _guard) = m.subscribe(false, false);
        m.record_l7(&denied_put()).await;
        let f = rx.try_recv().unwrap();
        assert_eq!(f.event, "l7");
        assert!(m.recent().is_empty());
    }

    #[tokio::test]
    async fn l7_flows_are_counted_in_the_proxy_metrics_only() {
        let metrics = crate::metrics::AgentMetrics::default();
        let m = Monitor::new(0, metrics.clone());
        m.record_l7(&denied_put()).await;
        let text = crate::metrics::render(&crate::metrics::Snapshot::default(), &metrics);
        assert!(
            text.contains("cilia_proxy_http_requests_total{verdict=\"DROPPED\",status=\"4xx\"} 1"),
            "{text}"
        );
        // Not a datapath event nor a packet's policy verdict.
        assert!(!text.contains("cilia_monitor_events_total{"), "{text}");
        assert!(!text.contains("cilia_policy_verdicts_total{"), "{text}");
    }

    #[test]
    fn record_l7_can_run_in_a_spawned_task() {
        fn send<T: Send>(_: &T) {}
        let m = monitor(1);
        let flow = denied_put();
        send(&m.record_l7(&flow));
    }

    #[tokio::test]
    async fn a_flow_naming_a_new_endpoint_waits_for_a_fresh_snapshot() {
        let m = Monitor::new(16, crate::metrics::AgentMetrics::default());
        // The publisher: answers the refresh with the snapshot that knows it.
        let publisher = {
            let m = m.clone();
            tokio::spawn(async move {
                m.refresh.notified().await;
                m.set_names(names());
            })
        };
        m.record_l7(&denied_put()).await;
        publisher.await.unwrap();
        let f = &m.recent()[0];
        assert_eq!(f.destination.labels["class"], "deathstar");
    }

    #[tokio::test]
    async fn flows_naming_a_gone_endpoint_wait_at_most_once_per_interval() {
        let m = Monitor::new(32, crate::metrics::AgentMetrics::default());
        let started = tokio::time::Instant::now();
        for _ in 0..20 {
            m.record_l7(&denied_put()).await;
        }
        // One wait of FRESH_NAMES_WAIT, not twenty.
        assert!(
            started.elapsed() < FRESH_NAMES_WAIT * 4,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(m.recent().len(), 20);
        assert_eq!(m.recent()[19].destination.endpoint, None);
    }

    /// A policy verdict of tiefighter (300) -> deathstar (301) on port 80,
    /// from source port `sport`.
    fn verdict(sport: u16) -> Event {
        let mut ev: Event = zeroed_event();
        ev.type_ = CILIA_EVENT_POLICY_VERDICT;
        ev.endpoint_id = DEATHSTAR;
        ev.family = 6;
        ev.proto = 6;
        ev.src_identity = 300;
        ev.dst_identity = 301;
        ev.rule = 1;
        ev.sport = sport.to_be();
        ev.dport = 80u16.to_be();
        ev
    }

    /// The tiefighter's (fd00::3, port 40000) new TCP flow to the service
    /// 7 frontend [fd00::100]:80, given the deathstar (fd00::2) port 8080.
    fn service_event() -> Event {
        let mut ev: Event = zeroed_event();
        ev.type_ = CILIA_EVENT_SERVICE;
        ev.dir = CILIA_DIR_EGRESS;
        ev.endpoint_id = TIEFIGHTER;
        ev.family = 6;
        ev.proto = 6;
        ev.src_identity = 301;
        ev.dst_identity = 300;
        ev.rule = 7;
        ev.saddr = "fd00::100".parse::<std::net::Ipv6Addr>().unwrap().octets();
        ev.sport = 80u16.to_be();
        ev.daddr = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        ev.dport = 8080u16.to_be();
        let mut packet = vec![0u8; 14 + 40 + 4];
        packet[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        packet[14] = 0x60;
        packet[14 + 6] = 6;
        packet[14 + 8..14 + 24]
            .copy_from_slice(&"fd00::3".parse::<std::net::Ipv6Addr>().unwrap().octets());
        packet[14 + 24..14 + 40].copy_from_slice(&ev.saddr);
        packet[54..56].copy_from_slice(&40000u16.to_be_bytes());
        packet[56..58].copy_from_slice(&80u16.to_be_bytes());
        ev.data[..packet.len()].copy_from_slice(&packet);
        ev.caplen = packet.len() as u8;
        ev
    }

    #[test]
    fn a_service_event_names_the_client_the_backend_and_the_service() {
        let flow = decode(&service_event(), &names());
        assert_eq!(flow.event, "service");
        assert_eq!(flow.verdict, "FORWARDED");
        assert_eq!(flow.source.ip.as_deref(), Some("fd00::3"));
        assert_eq!(flow.source.port, Some(40000));
        assert_eq!(flow.source.endpoint, Some(TIEFIGHTER));
        assert_eq!(flow.destination.ip.as_deref(), Some("fd00::2"));
        assert_eq!(flow.destination.port, Some(8080));
        assert_eq!(flow.destination.endpoint, Some(DEATHSTAR));
        let service = flow.service.expect("service");
        assert_eq!(service.id, 7);
        assert_eq!(service.frontend, "[fd00::100]:80/tcp");
        assert_eq!(service.backend, "[fd00::2]:8080");
    }

    /// Measurement, not a check (`cargo test -p cilia-agent --lib --
    /// --ignored --test-threads=1 flow_ring_heap`; docs/benchmarks.md): the
    /// heap a full ring of 4096 labelled policy drops holds, per flow.
    #[test]
    #[ignore]
    fn flow_ring_heap_per_flow() {
        const N: usize = 4096;
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let heap = || unsafe { nix::libc::mallinfo2() }.uordblks;
        let names = names();
        let m = Monitor::new(N, crate::metrics::AgentMetrics::default());
        let mut ev = verdict(40000);
        ev.type_ = CILIA_EVENT_DROP;
        ev.reason = cilia_abi::CILIA_DROP_POLICY;
        ev.saddr = "fd00::3".parse::<std::net::Ipv6Addr>().unwrap().octets();
        ev.daddr = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        ev.caplen = ev.data.len() as u8;
        let probe = decode(&ev, &names);
        assert_eq!(probe.source.labels["class"], "tiefighter");
        assert_eq!(probe.destination.labels["class"], "deathstar");
        drop(probe);
        let before = heap();
        for i in 0..N {
            ev.sport = (40000 + i as u16).to_be();
            m.push(decode(&ev, &names));
        }
        let after = heap();
        assert_eq!(m.buffered(), N);
        println!(
            "flow ring: {N} labelled drops, {} bytes of heap per flow",
            (after - before) / N
        );
    }

    fn zeroed_event() -> Event {
        Event::from_bytes(&[0u8; std::mem::size_of::<Event>()]).unwrap()
    }

    #[test]
    fn verdicts_beyond_the_pass_count_in_a_window_become_one_summary_with_their_count() {
        let mut agg = Aggregator::default();
        let start = agg.window_start;
        let passed = (0..20).filter(|i| agg.pass(&verdict(40000 + i))).count();
        assert_eq!(passed, AGGREGATION_PASS as usize);
        let summaries = agg.close_window(start + AGGREGATION_WINDOW);
        assert_eq!(summaries.len(), 1);
        let (last, held) = summaries[0];
        assert_eq!(held, 20 - u64::from(AGGREGATION_PASS));
        assert_eq!(
            u16::from_be(last.sport),
            40019,
            "the summary shows the last event"
        );
    }

    #[test]
    fn an_open_window_yields_no_summary_and_a_new_window_passes_again() {
        let mut agg = Aggregator::default();
        let start = agg.window_start;
        for i in 0..20 {
            agg.pass(&verdict(40000 + i));
        }
        assert!(agg.close_window(start).is_empty());
        assert!(!agg.pass(&verdict(1)), "still held in the open window");
        assert_eq!(agg.close_window(start + AGGREGATION_WINDOW).len(), 1);
        assert!(agg.pass(&verdict(2)), "a new window starts counting afresh");
    }

    #[test]
    fn few_events_of_a_kind_pass_one_by_one_and_leave_no_summary() {
        let mut agg = Aggregator::default();
        let start = agg.window_start;
        assert!((0..AGGREGATION_PASS as u16).all(|i| agg.pass(&verdict(40000 + i))));
        assert!(agg.close_window(start + AGGREGATION_WINDOW).is_empty());
    }

    #[test]
    fn verdicts_of_different_decisions_are_not_merged() {
        let mut agg = Aggregator::default();
        for i in 0..AGGREGATION_PASS as u16 {
            agg.pass(&verdict(40000 + i));
        }
        let denied = Event {
            verdict: CILIA_VERDICT_DENY,
            ..verdict(1)
        };
        let other_port = Event {
            dport: 443u16.to_be(),
            ..verdict(1)
        };
        assert!(agg.pass(&denied));
        assert!(agg.pass(&other_port));
    }

    #[test]
    fn traces_are_sampled_per_flow_not_merged_across_flows() {
        let mut agg = Aggregator::default();
        let trace = |sport| Event {
            type_: CILIA_EVENT_TRACE,
            ..verdict(sport)
        };
        for _ in 0..AGGREGATION_PASS {
            assert!(agg.pass(&trace(40000)));
        }
        assert!(!agg.pass(&trace(40000)), "the busy flow is sampled");
        assert!(agg.pass(&trace(40001)), "another flow's first packets pass");
    }

    #[test]
    fn kinds_beyond_the_bound_pass_untracked() {
        let mut agg = Aggregator::default();
        let trace = |sport| Event {
            type_: CILIA_EVENT_TRACE,
            ..verdict(sport)
        };
        for i in 0..AGGREGATION_KINDS as u16 {
            agg.pass(&trace(i));
        }
        let extra = trace(u16::MAX);
        assert!((0..2 * AGGREGATION_PASS).all(|_| agg.pass(&extra)));
        assert_eq!(agg.seen.len(), AGGREGATION_KINDS);
    }

    #[tokio::test]
    async fn a_summary_flow_counts_every_event_it_stands_for() {
        let metrics = crate::metrics::AgentMetrics::default();
        let m = Monitor::new(16, metrics.clone());
        let (mut rx, _guard) = m.subscribe(false, false);
        m.publish(Flow {
            aggregated: Some(12),
            ..decode(&verdict(40000), &names())
        });
        assert_eq!(rx.try_recv().unwrap().aggregated, Some(12));
        assert_eq!(m.aggregated(), 12);
        let text = crate::metrics::render(&crate::metrics::Snapshot::default(), &metrics);
        for line in [
            "cilia_monitor_events_total{type=\"policy-verdict\",reason=\"\"} 12",
            "cilia_policy_verdicts_total{verdict=\"FORWARDED\",direction=\"ingress\"} 12",
            "cilia_monitor_aggregated_events_total{type=\"policy-verdict\"} 12",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
