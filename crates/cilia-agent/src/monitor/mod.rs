//! The monitor: reads the datapath's event ring buffer, decodes and enriches
//! events into flows (endpoint, labels, namespace, identity, the rule that
//! decided), keeps a bounded ring of recent flows, and fans flows out to
//! live listeners.
//!
//! Invariants: memory is bounded (the ring's capacity, a bounded broadcast
//! channel); a slow listener loses flows, told as a `lost` count, and never
//! stalls the reader; the datapath emits events only at the level someone
//! needs (flow ring on: drops and verdicts; a trace listener: everything).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cilia_abi::{
    ct_state_name, reason_name, EndpointKey, Event, CILIA_DIR_EGRESS, CILIA_EVENT_DEBUG,
    CILIA_EVENT_DROP, CILIA_EVENT_POLICY_VERDICT, CILIA_EVENT_TRACE, CILIA_METRIC_DROP,
    CILIA_METRIC_FORWARD, CILIA_MONITOR_DEBUG, CILIA_MONITOR_DROPS, CILIA_MONITOR_OFF,
    CILIA_MONITOR_TRACE, CILIA_VERDICT_AUDIT, CILIA_VERDICT_DENY,
};
use cilia_api::{Flow, FlowPeer};
use tokio::sync::broadcast;
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
        })
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

    fn publish(&self, flow: Flow) {
        self.metrics
            .events
            .get_or_create(&vec![
                ("type".to_string(), flow.event.clone()),
                (
                    "reason".to_string(),
                    flow.drop_reason.clone().unwrap_or_default(),
                ),
            ])
            .inc();
        if flow.policy.is_some() {
            self.metrics
                .verdicts
                .get_or_create(&vec![
                    ("verdict".to_string(), flow.verdict.clone()),
                    ("direction".to_string(), flow.direction.clone()),
                ])
                .inc();
        }
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
    /// Endpoint id -> (labels, namespace).
    pub endpoints: HashMap<u16, (BTreeMap<String, String>, String)>,
    /// Address -> endpoint id.
    pub addresses: HashMap<IpAddr, u16>,
    /// Rule names by cookie - 1.
    pub rules: crate::policy::RuleNames,
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

impl Names {
    /// Whether an event names an endpoint or a rule this snapshot lacks.
    fn lacks(&self, ev: &Event) -> bool {
        ev.rule as usize > self.rules.len()
            || (ev.endpoint_id != 0 && !self.endpoints.contains_key(&ev.endpoint_id))
    }

    /// The snapshot of the current endpoints (from the store) and rules
    /// (from the policy's summary).
    pub fn of(
        store: &crate::store::Store,
        policy: &crate::policy::repository::PolicySummary,
    ) -> Option<Self> {
        let mut names = Self {
            rules: policy.rule_names.clone(),
            ..Self::default()
        };
        for rec in store.endpoints().ok()? {
            for ip in rec.ips() {
                names.addresses.insert(ip, rec.id);
            }
            names.endpoints.insert(rec.id, (rec.labels, rec.namespace));
        }
        Some(names)
    }

    fn peer(&self, ip: Option<IpAddr>, port: Option<u16>, identity: u32) -> FlowPeer {
        let endpoint = ip.and_then(|ip| self.addresses.get(&ip).copied());
        let (labels, namespace) = endpoint
            .and_then(|id| self.endpoints.get(&id).cloned())
            .map(|(l, n)| (l, Some(n)))
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
        source: enrich.peer(src_ip, port(ev.sport), ev.src_identity),
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
    }
}

/// Publishes name snapshots for the reader: every 250 ms, and at once when
/// the reader asks. This task reads the store and the policy summary (off
/// the async threads); the reader never does.
pub async fn publish_names(
    manager: Arc<dyn Fn() -> Option<Names> + Send + Sync>,
    tx: tokio::sync::watch::Sender<Arc<Names>>,
    refresh: Arc<tokio::sync::Notify>,
) {
    loop {
        let m = manager.clone();
        if let Ok(Some(names)) = tokio::task::spawn_blocking(move || m()).await {
            tx.send_if_modified(|current| {
                let changed = **current != names;
                if changed {
                    *current = Arc::new(names);
                }
                changed
            });
        }
        if tx.is_closed() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(250), refresh.notified()).await;
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
    loop {
        level.send_if_modified(|l| {
            let wanted = monitor.wanted_level();
            let changed = *l != wanted;
            *l = wanted;
            changed
        });
        // Wake at least every 200 ms to follow listener changes.
        batch.clear();
        match reader.read(&mut batch, Duration::from_millis(200)).await {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "monitor stopped: reading events failed");
                return;
            }
        }
        if batch.iter().any(|ev| names.rx.borrow().lacks(ev)) {
            names.rx.mark_unchanged();
            names.refresh.notify_one();
            let _ = tokio::time::timeout(FRESH_NAMES_WAIT, names.rx.changed()).await;
        }
        let snapshot = names.rx.borrow().clone();
        for ev in &batch {
            monitor.publish(decode(ev, &snapshot));
        }
    }
}
