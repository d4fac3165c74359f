//! Prometheus metrics, served in text format on a TCP address of its own
//! (`--metrics-addr`, loopback by default). Datapath counters are read from
//! the per-CPU metrics map at scrape time (never duplicated in the agent);
//! what only the agent sees (regeneration time, API durations, conntrack GC,
//! policy verdicts from the monitor, the L7 proxy's HTTP requests) is
//! recorded as it happens.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

use cilia_abi::{
    reason_name, CILIA_DIR_EGRESS, CILIA_METRIC_DROP, CILIA_METRIC_FORWARD, CILIA_METRIC_LOST,
};

type Labels = Vec<(String, String)>;

fn histogram() -> Histogram {
    // 100 µs .. ~3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

fn http_histogram() -> Histogram {
    // 25 µs .. ~3.3 s: a denied request is answered by the proxy in tens of
    // µs, a forwarded one takes the upstream's time (loopback: sub-ms).
    Histogram::new(exponential_buckets(0.000025, 2.0, 18))
}

/// The status class of an HTTP status (`2xx` …; `other` outside 100..=599).
/// Classes, not codes: a label value per code would let any upstream
/// create series at will (up to 900 per verdict); the code is in each flow.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// The verdict label of an L7 flow: the same words as the flow's verdict.
fn http_verdict(v: cilia_proxy::control::L7Verdict) -> &'static str {
    use cilia_proxy::control::L7Verdict;
    match v {
        L7Verdict::Forwarded => "FORWARDED",
        L7Verdict::Denied => "DROPPED",
        L7Verdict::Error => "ERROR",
    }
}

/// Metrics recorded as things happen. Clones share their values.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    pub regeneration: Histogram,
    pub api_requests: Family<Labels, Histogram, fn() -> Histogram>,
    pub ct_gc_runs: Counter,
    pub ct_gc_deleted: Counter,
    /// GC runs started before their interval because an endpoint neared
    /// its conntrack budget (counted in `ct_gc_runs` too).
    pub ct_gc_early: Counter,
    /// Entries of ended TCP connections a GC removed before their close
    /// timeout because their endpoint neared its budget.
    pub ct_gc_closed_early: Counter,
    /// Conntrack GC runs that failed, and the last one's error while no
    /// run has succeeded since (`cilia status` shows it: expired entries
    /// stay and budgets are not given back meanwhile).
    pub ct_gc_failures: Counter,
    pub ct_gc_error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    pub verdicts: Family<Labels, Counter>,
    /// Events the monitor decoded, by type (and drop reason).
    pub events: Family<Labels, Counter>,
    /// Events counted into a monitor summary flow instead of a flow each, by type.
    pub aggregated: Family<Labels, Counter>,
    /// HTTP requests the L7 proxy handled, by verdict and status class.
    pub http_requests: Family<Labels, Counter>,
    /// Their latency as the proxy measured it, by verdict.
    pub http_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// The health prober's latest probe of another node's health address
    /// answered (1) or not (0), by node, probe (`icmp`, `tcp`) and address.
    pub node_health_reachable: Family<Labels, Gauge>,
    /// That probe's round trip or connect time, seconds (answered only).
    pub node_health_latency: Family<Labels, Gauge<f64, AtomicU64>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            regeneration: histogram(),
            api_requests: Family::new_with_constructor(histogram),
            ct_gc_runs: Counter::default(),
            ct_gc_deleted: Counter::default(),
            ct_gc_early: Counter::default(),
            ct_gc_closed_early: Counter::default(),
            ct_gc_failures: Counter::default(),
            ct_gc_error: Default::default(),
            verdicts: Family::default(),
            events: Family::default(),
            aggregated: Family::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(http_histogram),
            node_health_reachable: Family::default(),
            node_health_latency: Family::default(),
        }
    }
}

impl AgentMetrics {
    /// Counts one HTTP request the L7 proxy reported.
    pub fn record_http(
        &self,
        verdict: cilia_proxy::control::L7Verdict,
        status: u16,
        latency_us: u64,
    ) {
        let verdict = http_verdict(verdict);
        self.http_requests
            .get_or_create(&labels(&[
                ("verdict", verdict),
                ("status", status_class(status)),
            ]))
            .inc();
        self.http_duration
            .get_or_create(&labels(&[("verdict", verdict)]))
            .observe(latency_us as f64 / 1e6);
    }
}

/// State read at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// (kind, reason, direction, packets, bytes) from the datapath.
    pub datapath: Vec<(u8, u8, u8, u64, u64)>,
    /// (state, count).
    pub endpoints: Vec<(String, u64)>,
    /// (kind, count).
    pub identities: Vec<(String, u64)>,
    pub conntrack_entries: u64,
    /// (map, entries, capacity).
    pub map_fill: Vec<(String, u64, u64)>,
    pub policy_revision: u64,
    /// Per service (rev-NAT id): (id, flows, packets, bytes).
    pub services: Vec<(u16, u64, u64, u64)>,
    /// (cidr, packets, bytes) the XDP prefilter dropped.
    pub prefilter: Vec<(String, u64, u64)>,
    /// (device, XDP mode) of NodePort acceleration.
    pub lb_acceleration: Vec<(String, &'static str)>,
}

/// The part of a [`Snapshot`] that comes from the agent's store.
#[derive(Debug, Default, Clone)]
pub struct StorePart {
    pub endpoint_ids: Vec<u16>,
    /// (state, count).
    pub endpoints: Vec<(String, u64)>,
    /// (kind, count).
    pub identities: Vec<(String, u64)>,
    pub policy_revision: u64,
}

/// Completes a snapshot with what the datapath holds: counters, conntrack
/// and map fill levels. The datapath locks each map on its own, so this
/// waits for no endpoint create or policy change.
pub fn datapath_part(
    store: StorePart,
    dp: &dyn cilia_datapath::Datapath,
) -> Result<Snapshot, cilia_datapath::DatapathError> {
    // The count the last conntrack GC made (it walks the table every
    // CT_GC_INTERVAL anyway): a scrape that walked it too would cost a
    // syscall per entry, on the CPUs endpoint creation needs.
    let ct = match dp.ct_live() {
        Some(n) => n,
        None => {
            let now = cilia_datapath::datapath_clock_ns();
            dp.conntrack()?
                .iter()
                .filter(|e| e.expires_ns > now)
                .count() as u64
        }
    };
    let bpf_endpoints = dp.endpoints()?.len() as u64;
    let prefilter = dp.prefilter()?;
    let prefilter_v4 = prefilter
        .iter()
        .filter(|c| c.entry.cidr.addr().is_ipv4())
        .count() as u64;
    let ipcache = dp.ipcache()?.len() as u64;
    let mut policy_max = 0u64;
    for id in &store.endpoint_ids {
        if let Some(p) = dp.endpoint_policy(*id)? {
            let markers = u64::from(p.enforcement.ingress) + u64::from(p.enforcement.egress);
            policy_max = policy_max.max(p.entries.len() as u64 + markers);
        }
    }
    Ok(Snapshot {
        datapath: dp
            .metrics()?
            .into_iter()
            .map(|m| {
                let k = m.key();
                (k.kind, k.reason, k.dir, m.packets, m.bytes)
            })
            .collect(),
        endpoints: store.endpoints,
        identities: store.identities,
        conntrack_entries: ct,
        map_fill: vec![
            (
                "cilia_endpoints".into(),
                bpf_endpoints,
                u64::from(cilia_abi::CILIA_ENDPOINTS_MAX),
            ),
            (
                "cilia_ipcache".into(),
                ipcache,
                u64::from(cilia_abi::CILIA_IPCACHE_MAX),
            ),
            ("cilia_ct".into(), ct, u64::from(dp.ct_capacity())),
            (
                "policy (fullest endpoint)".into(),
                policy_max,
                u64::from(cilia_abi::CILIA_POLICY_MAX),
            ),
            (
                "cilia_prefilter_v4".into(),
                prefilter_v4,
                u64::from(cilia_abi::CILIA_PREFILTER_MAX),
            ),
            (
                "cilia_prefilter_v6".into(),
                prefilter.len() as u64 - prefilter_v4,
                u64::from(cilia_abi::CILIA_PREFILTER_MAX),
            ),
        ],
        policy_revision: store.policy_revision,
        services: dp
            .lb_stats()?
            .into_iter()
            .map(|(id, s)| (id, s.flows, s.packets, s.bytes))
            .collect(),
        prefilter: prefilter
            .iter()
            .map(|c| (c.entry.cidr.to_string(), c.packets, c.bytes))
            .collect(),
        lb_acceleration: dp
            .lb_acceleration_links()?
            .into_iter()
            .map(|l| (l.ifname, l.mode.name()))
            .collect(),
    })
}

/// A whole snapshot: the store's counts, then the datapath's.
pub fn scrape(
    store: &crate::store::Store,
    dp: &dyn cilia_datapath::Datapath,
) -> Result<Snapshot, crate::endpoint::EndpointError> {
    let store = StorePart::read(store)?;
    Ok(datapath_part(store, dp)?)
}

impl StorePart {
    /// Reads the store's counts: a read transaction of its own, so a
    /// scrape waits for no subsystem's lock.
    pub fn read(store: &crate::store::Store) -> Result<Self, crate::store::StoreError> {
        let endpoints = store.endpoints()?;
        let mut by_state: std::collections::BTreeMap<String, u64> = Default::default();
        for e in &endpoints {
            let state = serde_json::to_value(e.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            *by_state.entry(state).or_default() += 1;
        }
        Ok(StorePart {
            endpoint_ids: endpoints.iter().map(|e| e.id).collect(),
            endpoints: by_state.into_iter().collect(),
            identities: vec![
                (
                    "reserved".into(),
                    crate::policy::repository::RESERVED.len() as u64,
                ),
                ("endpoint".into(), store.identities()?.len() as u64),
                ("cidr".into(), store.cidr_identity_count()? as u64),
            ],
            policy_revision: store.policy_revision()?,
        })
    }
}

/// One conntrack garbage collection, counted in `m`; it holds only the
/// conntrack map's own lock inside the datapath. Returns how many entries
/// it removed.
pub fn collect_conntrack_garbage(
    dp: &dyn cilia_datapath::Datapath,
    m: &AgentMetrics,
) -> Result<usize, cilia_datapath::DatapathError> {
    let report = match dp.gc_conntrack() {
        Ok(report) => report,
        Err(e) => {
            m.ct_gc_failures.inc();
            *m.ct_gc_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(e.to_string());
            return Err(e);
        }
    };
    *m.ct_gc_error
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    m.ct_gc_runs.inc();
    m.ct_gc_deleted.inc_by(report.expired as u64);
    m.ct_gc_closed_early.inc_by(report.closed_early as u64);
    Ok(report.expired + report.closed_early)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Renders the Prometheus text exposition of `snap` and `m`.
pub fn render(snap: &Snapshot, m: &AgentMetrics) -> String {
    let mut reg = Registry::with_prefix("cilia");
    let drops: Family<Labels, Counter> = Family::default();
    let drop_bytes: Family<Labels, Counter> = Family::default();
    let forwards: Family<Labels, Counter> = Family::default();
    let forward_bytes: Family<Labels, Counter> = Family::default();
    let lost: Family<Labels, Counter> = Family::default();
    for (kind, reason, dir, packets, bytes) in &snap.datapath {
        let direction = if *dir == CILIA_DIR_EGRESS {
            "egress"
        } else {
            "ingress"
        };
        match *kind {
            CILIA_METRIC_DROP => {
                let l = labels(&[
                    ("reason", reason_name(*kind, *reason)),
                    ("direction", direction),
                ]);
                drops.get_or_create(&l).inc_by(*packets);
                drop_bytes.get_or_create(&l).inc_by(*bytes);
            }
            CILIA_METRIC_FORWARD => {
                let l = labels(&[
                    ("reason", reason_name(*kind, *reason)),
                    ("direction", direction),
                ]);
                forwards.get_or_create(&l).inc_by(*packets);
                forward_bytes.get_or_create(&l).inc_by(*bytes);
            }
            CILIA_METRIC_LOST => {
                let ty = match *reason {
                    cilia_abi::CILIA_EVENT_DROP => "drop",
                    cilia_abi::CILIA_EVENT_TRACE => "trace",
                    cilia_abi::CILIA_EVENT_SERVICE => "service",
                    _ => "policy-verdict",
                };
                lost.get_or_create(&labels(&[("type", ty)]))
                    .inc_by(*packets);
            }
            _ => {}
        }
    }
    reg.register(
        "drop_count",
        "Packets dropped by the datapath, by reason and direction",
        drops,
    );
    reg.register_with_unit(
        "drop",
        "Bytes dropped by the datapath",
        Unit::Bytes,
        drop_bytes,
    );
    reg.register(
        "forward_count",
        "Packets forwarded by the datapath, by where to and direction",
        forwards,
    );
    reg.register_with_unit(
        "forward",
        "Bytes forwarded by the datapath",
        Unit::Bytes,
        forward_bytes,
    );
    reg.register(
        "events_lost",
        "Datapath events the ring buffer had no room for",
        lost,
    );

    let service_flows: Family<Labels, Counter> = Family::default();
    let service_packets: Family<Labels, Counter> = Family::default();
    let service_bytes: Family<Labels, Counter> = Family::default();
    for (id, flows, packets, bytes) in &snap.services {
        let l = labels(&[("service", &id.to_string())]);
        service_flows.get_or_create(&l).inc_by(*flows);
        service_packets.get_or_create(&l).inc_by(*packets);
        service_bytes.get_or_create(&l).inc_by(*bytes);
    }
    reg.register(
        "service_flows",
        "New flows to a service given a backend, by service id",
        service_flows,
    );
    reg.register(
        "service_packets",
        "Packets the per-packet load balancer translated, by service id",
        service_packets,
    );
    reg.register(
        "service_bytes",
        "Bytes the per-packet load balancer translated, by service id",
        service_bytes,
    );
    let prefilter_drops: Family<Labels, Counter> = Family::default();
    let prefilter_bytes: Family<Labels, Counter> = Family::default();
    for (cidr, packets, bytes) in &snap.prefilter {
        let l = labels(&[("cidr", cidr)]);
        prefilter_drops.get_or_create(&l).inc_by(*packets);
        prefilter_bytes.get_or_create(&l).inc_by(*bytes);
    }
    reg.register(
        "prefilter_drops",
        "Packets the XDP prefilter dropped, by source CIDR",
        prefilter_drops,
    );
    reg.register_with_unit(
        "prefilter_drop",
        "Bytes the XDP prefilter dropped, by source CIDR",
        Unit::Bytes,
        prefilter_bytes,
    );
    let accel: Family<Labels, Gauge> = Family::default();
    for (device, mode) in &snap.lb_acceleration {
        accel
            .get_or_create(&labels(&[("device", device), ("mode", mode)]))
            .set(1);
    }
    reg.register(
        "lb_acceleration",
        "NodePort acceleration in XDP on a device (1), by XDP mode: native, or generic (the driver has no native XDP); what it forwarded is cilia_forward_count{reason=\"xdp-nodeport\"}",
        accel,
    );

    let endpoints: Family<Labels, Gauge> = Family::default();
    for (state, n) in &snap.endpoints {
        endpoints
            .get_or_create(&labels(&[("state", state)]))
            .set(*n as i64);
    }
    reg.register("endpoints", "Endpoints, by state", endpoints);
    let identities: Family<Labels, Gauge> = Family::default();
    for (kind, n) in &snap.identities {
        identities
            .get_or_create(&labels(&[("kind", kind)]))
            .set(*n as i64);
    }
    reg.register("identities", "Security identities, by kind", identities);
    let ct = Gauge::<i64>::default();
    ct.set(snap.conntrack_entries as i64);
    reg.register(
        "conntrack_entries",
        "Live connection tracking entries, as counted by the last GC (every 10 s)",
        ct,
    );
    let revision = Gauge::<i64>::default();
    revision.set(snap.policy_revision as i64);
    reg.register(
        "policy_revision",
        "Revision of the imported policy",
        revision,
    );
    let fill: Family<Labels, Gauge<f64, AtomicU64>> = Family::default();
    for (map, entries, capacity) in &snap.map_fill {
        let ratio = if *capacity == 0 {
            0.0
        } else {
            *entries as f64 / *capacity as f64
        };
        fill.get_or_create(&labels(&[("map", map)])).set(ratio);
    }
    reg.register(
        "bpf_map_pressure",
        "Fill level of BPF maps (entries / capacity)",
        fill,
    );

    reg.register(
        "policy_verdicts",
        "Policy verdicts of new flows seen by the monitor",
        m.verdicts.clone(),
    );
    reg.register(
        "monitor_events",
        "Datapath events the monitor received, by type and drop reason",
        m.events.clone(),
    );
    reg.register(
        "monitor_aggregated_events",
        "Datapath events the monitor counted into a summary flow (under load) instead of a flow each, by type",
        m.aggregated.clone(),
    );
    reg.register_with_unit(
        "endpoint_regeneration",
        "Time to recompute and program every endpoint's policy",
        Unit::Seconds,
        m.regeneration.clone(),
    );
    reg.register_with_unit(
        "api_request_duration",
        "REST API request durations, by method and route",
        Unit::Seconds,
        m.api_requests.clone(),
    );
    reg.register(
        "proxy_http_requests",
        "HTTP requests the L7 proxy handled, by verdict (FORWARDED, DROPPED by L7 policy, ERROR upstream) and status class",
        m.http_requests.clone(),
    );
    reg.register_with_unit(
        "proxy_http_request_duration",
        "Time from an HTTP request's head to its response's head, as the L7 proxy measured it, by verdict",
        Unit::Seconds,
        m.http_duration.clone(),
    );
    reg.register(
        "conntrack_gc_runs",
        "Conntrack garbage collection runs",
        m.ct_gc_runs.clone(),
    );
    reg.register(
        "conntrack_gc_deleted",
        "Expired conntrack entries removed",
        m.ct_gc_deleted.clone(),
    );
    reg.register(
        "conntrack_gc_early_runs",
        "Conntrack garbage collection runs started before their interval because an endpoint neared its conntrack budget",
        m.ct_gc_early.clone(),
    );
    reg.register(
        "conntrack_gc_closed_early",
        "Conntrack entries of ended TCP connections removed before their close timeout because their endpoint neared its conntrack budget",
        m.ct_gc_closed_early.clone(),
    );
    reg.register(
        "conntrack_gc_failures",
        "Conntrack garbage collection runs that failed (expired entries stay, budgets are not given back)",
        m.ct_gc_failures.clone(),
    );

    reg.register(
        "node_health_reachable",
        "Whether the latest health probe of another node's health address answered, by node, probe (icmp, tcp) and address",
        m.node_health_reachable.clone(),
    );
    reg.register_with_unit(
        "node_health_latency",
        "Round trip (icmp) or connect time (tcp) of the latest answered health probe, by node, probe and address",
        Unit::Seconds,
        m.node_health_latency.clone(),
    );

    let heap: Family<Labels, Gauge> = Family::default();
    for (state, bytes) in heap_bytes() {
        heap.get_or_create(&labels(&[("state", state)]))
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    reg.register_with_unit(
        "agent_heap",
        "The agent's heap as its allocator counts it: in_use (allocated), free (held by the allocator, not in use: what fragmentation keeps), mmapped (large allocations mapped on their own)",
        Unit::Bytes,
        heap,
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// The allocator's own count of the agent's heap (glibc's `mallinfo2`):
/// beside VmRSS it tells retained objects (in_use grows) from
/// fragmentation (free grows, or resident pages hold little in use). Empty
/// where the allocator is not glibc's.
fn heap_bytes() -> Vec<(&'static str, u64)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics (it takes
        // the arenas' locks itself).
        let info = unsafe { nix::libc::mallinfo2() };
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        vec![
            ("in_use", n(info.uordblks)),
            ("free", n(info.fordblks)),
            ("mmapped", n(info.hblkhd)),
        ]
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_conntrack_gc_is_counted_and_kept_until_one_succeeds() {
        let dp = cilia_datapath::fake::FakeDatapath::new();
        let m = AgentMetrics::default();
        dp.fail_next("gc_conntrack", 2);
        for failures in 1..=2 {
            assert!(collect_conntrack_garbage(&dp, &m).is_err());
            assert_eq!(m.ct_gc_failures.get(), failures);
            assert!(m.ct_gc_error.lock().unwrap().is_some());
        }
        assert_eq!(m.ct_gc_runs.get(), 0);
        collect_conntrack_garbage(&dp, &m).unwrap();
        assert_eq!(m.ct_gc_runs.get(), 1);
        assert_eq!(*m.ct_gc_error.lock().unwrap(), None, "cleared by a success");
    }

    #[test]
    fn exposition_names_are_in_the_cilia_namespace_with_units() {
        let snap = Snapshot {
            datapath: vec![(
                CILIA_METRIC_DROP,
                cilia_abi::CILIA_DROP_POLICY,
                cilia_abi::CILIA_DIR_INGRESS,
                3,
                222,
            )],
            endpoints: vec![("ready".into(), 2)],
            conntrack_entries: 5,
            map_fill: vec![("cilia_ct".into(), 5, 10)],
            services: vec![(7, 2, 10, 1500)],
            prefilter: vec![("203.0.113.0/24".into(), 4, 256)],
            ..Default::default()
        };
        let m = AgentMetrics::default();
        m.regeneration.observe(0.002);
        let text = render(&snap, &m);
        for needle in [
            "cilia_service_flows_total{service=\"7\"} 2",
            "cilia_service_packets_total{service=\"7\"} 10",
            "cilia_service_bytes_total{service=\"7\"} 1500",
            "cilia_drop_count_total{reason=\"Policy denied\",direction=\"ingress\"} 3",
            "cilia_drop_bytes_total{reason=\"Policy denied\",direction=\"ingress\"} 222",
            "cilia_endpoints{state=\"ready\"} 2",
            "cilia_conntrack_entries 5",
            "cilia_bpf_map_pressure{map=\"cilia_ct\"} 0.5",
            "cilia_endpoint_regeneration_seconds_count 1",
            "cilia_prefilter_drops_total{cidr=\"203.0.113.0/24\"} 4",
            "cilia_prefilter_drop_bytes_total{cidr=\"203.0.113.0/24\"} 256",
            "cilia_agent_heap_bytes{state=\"in_use\"}",
            "cilia_agent_heap_bytes{state=\"free\"}",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
    }

    #[test]
    fn http_requests_are_counted_by_verdict_and_status_class() {
        use cilia_proxy::control::L7Verdict;
        let m = AgentMetrics::default();
        m.record_http(L7Verdict::Forwarded, 201, 800);
        m.record_http(L7Verdict::Forwarded, 200, 300);
        m.record_http(L7Verdict::Denied, 403, 40);
        m.record_http(L7Verdict::Error, 502, 2_000_000);
        let text = render(&Snapshot::default(), &m);
        for needle in [
            "cilia_proxy_http_requests_total{verdict=\"FORWARDED\",status=\"2xx\"} 2",
            "cilia_proxy_http_requests_total{verdict=\"DROPPED\",status=\"4xx\"} 1",
            "cilia_proxy_http_requests_total{verdict=\"ERROR\",status=\"5xx\"} 1",
            "cilia_proxy_http_request_duration_seconds_count{verdict=\"FORWARDED\"} 2",
            "cilia_proxy_http_request_duration_seconds_sum{verdict=\"ERROR\"} 2.0",
            // 40 µs falls in the 50 µs bucket: sub-ms latencies are resolved.
            "cilia_proxy_http_request_duration_seconds_bucket{le=\"0.00005\",verdict=\"DROPPED\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
    }

    #[test]
    fn status_classes_bound_the_label_values() {
        assert_eq!(
            [100, 204, 301, 403, 599, 0, 600, 999].map(status_class),
            ["1xx", "2xx", "3xx", "4xx", "5xx", "other", "other", "other"]
        );
    }
}
