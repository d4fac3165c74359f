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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cilia_abi::{
    ct_state_name, reason_name, EndpointKey, Event, CILIA_DIR_EGRESS, CILIA_EVENT_DEBUG,
    CILIA_EVENT_DROP, CILIA_EVENT_POLICY_VERDICT, CILIA_EVENT_TRACE, CILIA_METRIC_DROP,
    CILIA_METRIC_FORWARD, CILIA_MONITOR_DEBUG, CILIA_MONITOR_DROPS, CILIA_MONITOR_OFF,
    CILIA_MONITOR_TRACE, CILIA_VERDICT_AUDIT, CILIA_VERDICT_DENY,
};
use cilia_api::{Flow, FlowPeer};
use tokio::sync::broadcast;
use tracing::warn;

use crate::api::Shared;

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

/// Names and labels the reader attaches to events, refreshed from the
/// endpoint manager now and then (never blocking on it).
#[derive(Default)]
struct Enrichment {
    /// Endpoint id -> (labels, namespace).
    endpoints: HashMap<u16, (BTreeMap<String, String>, String)>,
    /// Address -> endpoint id.
    addresses: HashMap<IpAddr, u16>,
    /// Rule names by cookie - 1 (cookies are stable: a stale copy can only
    /// miss new rules, never misname one).
    rules: Vec<String>,
    refreshed: Option<Instant>,
}

impl Enrichment {
    fn refresh(&mut self, state: &Shared, batch: &[Event]) {
        // Refresh when stale, or at once when an event names a rule or an
        // endpoint this copy does not know yet.
        let unknown = batch.iter().any(|e| {
            e.rule as usize > self.rules.len()
                || (e.endpoint_id != 0 && !self.endpoints.contains_key(&e.endpoint_id))
        });
        if !unknown
            && self
                .refreshed
                .is_some_and(|t| t.elapsed() < Duration::from_millis(250))
        {
            return;
        }
        // try_lock: a long regeneration must not stall the event reader.
        let Ok(mgr) = state.manager.try_lock() else {
            return;
        };
        let Ok(list) = mgr.list() else { return };
        self.endpoints.clear();
        self.addresses.clear();
        self.rules = mgr.rule_names();
        for rec in list {
            for ip in rec.ips() {
                self.addresses.insert(ip, rec.id);
            }
            self.endpoints.insert(rec.id, (rec.labels, rec.namespace));
        }
        self.refreshed = Some(Instant::now());
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

fn decode(ev: &Event, enrich: &Enrichment) -> Flow {
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
                    .get(ev.rule as usize - 1)
                    .cloned()
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
    }
}

/// Reads events until the agent stops, and keeps the datapath's event
/// level matched to the listeners.
pub async fn run(
    state: Shared,
    monitor: Arc<Monitor>,
    mut reader: cilia_datapath::events::EventReader,
) {
    let mut enrich = Enrichment::default();
    let mut level = u32::MAX;
    let mut batch = Vec::new();
    loop {
        let wanted = monitor.wanted_level();
        if wanted != level {
            let s = state.clone();
            let set = tokio::task::spawn_blocking(move || {
                s.manager
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set_monitor_level(wanted)
            })
            .await;
            if matches!(set, Ok(Ok(()))) {
                level = wanted;
            }
        }
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
        enrich.refresh(&state, &batch);
        for ev in &batch {
            monitor.publish(decode(ev, &enrich));
        }
    }
}
