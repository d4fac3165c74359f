//! Plain timing benchmarks (`cargo bench`): resolution time and map size for large
//! policy sets. No external harness; prints one line per scenario.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts live heap bytes and their peak, so each scenario reports the peak
/// memory its resolution needed above what was live before it.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated above the current level while `f` runs.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

use cilia_policy::{
    cidr_prefixes, parse_policies, resolve, IdentityCache, IpNet, Labels, Policy,
    LOCAL_CIDR_IDENTITY_BASE, NAMESPACE_LABEL,
};

const RULES: usize = 1000;
const IDENTITIES: u32 = 3000;

fn subject() -> Labels {
    Labels::from_pairs([(NAMESPACE_LABEL, "default"), ("app", "server")])
}

fn cache_with_endpoints(policies: &[Policy]) -> IdentityCache {
    let mut cache = IdentityCache::new();
    for i in 0..IDENTITIES {
        let app = if i % 2 == 0 { "client" } else { "other" };
        cache.insert_labels(
            1000 + i,
            Labels::from_pairs([
                (NAMESPACE_LABEL.to_string(), "default".to_string()),
                ("app".to_string(), app.to_string()),
                ("pod".to_string(), format!("p{i}")),
            ]),
        );
    }
    for (n, prefix) in cidr_prefixes(policies).into_iter().enumerate() {
        cache.insert_cidr(LOCAL_CIDR_IDENTITY_BASE + n as u32, prefix);
    }
    cache
}

fn policy(sections: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: bench, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n{sections}"
    )
}

fn run(name: &str, yaml: &str) {
    let parse_start = Instant::now();
    let policies = match parse_policies("bench.yaml", yaml) {
        Ok(p) => p,
        Err(e) => panic!("{name}: {e}"),
    };
    let parse_time = parse_start.elapsed();
    let cache = cache_with_endpoints(&policies);
    let subject = subject();
    let mut times = Vec::new();
    let mut entries = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while times.len() < 3 || (times.len() < 20 && Instant::now() < deadline) {
        let start = Instant::now();
        let resolved = resolve(black_box(&policies), &subject, &cache);
        times.push(start.elapsed());
        entries = resolved.entries.len();
    }
    times.sort();
    let (_, peak) = peak_during(|| resolve(&policies, &subject, &cache));
    println!(
        "{name:<48} resolve median {:>10.3?} min {:>10.3?} ({} runs) | parse {:>10.3?} | {entries} entries | peak {:.1} KiB",
        times[times.len() / 2],
        times[0],
        times.len(),
        parse_time,
        peak as f64 / 1024.0,
    );
}

/// (e) A node's worth: 1000 endpoints, 10,000 rules (100 policies of 100
/// L3/L4 rules, each selecting a slice of the endpoints), every endpoint
/// resolved once, as a full regeneration does.
fn node_scale() {
    const ENDPOINTS: u32 = 1000;
    const POLICIES: usize = 100;
    const RULES_PER_POLICY: usize = 100;
    let mut yaml = String::new();
    for p in 0..POLICIES {
        let _ = writeln!(
            yaml,
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{p}, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{tier: t{}}}}}\n  ingress:",
            p % 10
        );
        for r in 0..RULES_PER_POLICY {
            let _ = writeln!(
                yaml,
                "  - fromEndpoints: [{{matchLabels: {{app: a{}}}}}]\n    toPorts: [{{ports: [{{port: '{}', protocol: TCP}}]}}]",
                (p * RULES_PER_POLICY + r) % 50,
                8000 + r
            );
        }
    }
    let policies = match parse_policies("node.yaml", &yaml) {
        Ok(p) => p,
        Err(e) => panic!("(e): {e}"),
    };
    let labels = |i: u32| {
        Labels::from_pairs([
            (NAMESPACE_LABEL.to_string(), "default".to_string()),
            ("app".to_string(), format!("a{}", i % 50)),
            ("tier".to_string(), format!("t{}", i % 10)),
            ("pod".to_string(), format!("p{i}")),
        ])
    };
    let mut cache = IdentityCache::new();
    for i in 0..ENDPOINTS {
        cache.insert_labels(1000 + i, labels(i));
    }
    let start = Instant::now();
    let (entries, peak) = peak_during(|| {
        let mut entries = 0usize;
        for i in 0..ENDPOINTS {
            entries += resolve(black_box(&policies), &labels(i), &cache)
                .entries
                .len();
        }
        entries
    });
    println!(
        "{:<48} {:>10.3?} for all endpoints ({:.3?} each) | {entries} entries | peak {:.1} KiB",
        "(e) 1000 endpoints x 10000 rules",
        start.elapsed(),
        start.elapsed() / ENDPOINTS,
        peak as f64 / 1024.0,
    );
}

fn main() {
    // (a) 1000 identical L3 ingress rules selecting 1500 of 3000 identities.
    let mut s = String::from("  ingress:\n");
    for _ in 0..RULES {
        s.push_str("  - fromEndpoints: [{matchLabels: {app: client}}]\n");
    }
    run("(a) 1000 identical L3 ingress rules", &policy(&s));

    // (b) the same for egress.
    let mut s = String::from("  egress:\n");
    for _ in 0..RULES {
        s.push_str("  - toEndpoints: [{matchLabels: {app: client}}]\n");
    }
    run("(b) 1000 identical L3 egress rules", &policy(&s));

    // (c) 1000 egress rules, each toCIDR [10.2.3.0/24, ff02::/64].
    let mut s = String::from("  egress:\n");
    for _ in 0..RULES {
        s.push_str("  - toCIDR: [10.2.3.0/24, 'ff02::/64']\n");
    }
    run("(c) 1000 egress toCIDR rules", &policy(&s));

    // (d) 1000 rules each with one distinct allow CIDR+port and one distinct deny
    // CIDR+port, prefix lengths /8../32 mixed.
    let mut allow = String::from("  egress:\n");
    let mut deny = String::from("  egressDeny:\n");
    for i in 0..RULES as u32 {
        let len = 8 + (i % 25);
        let a = IpNet::new(
            std::net::Ipv4Addr::from(0x0A00_0000u32 + i * 7919 * 256).into(),
            len as u8,
        )
        .map(|n| n.trunc());
        let d = IpNet::new(
            std::net::Ipv4Addr::from(0x6400_0000u32 + i * 104_729 * 16).into(),
            (32 - (i % 25)) as u8,
        )
        .map(|n| n.trunc());
        let (Ok(a), Ok(d)) = (a, d) else {
            panic!("bad prefix")
        };
        let _ = writeln!(
            allow,
            "  - toCIDR: ['{a}']\n    toPorts: [{{ports: [{{port: '{}', protocol: TCP}}]}}]",
            1000 + i
        );
        let _ = writeln!(
            deny,
            "  - toCIDR: ['{d}']\n    toPorts: [{{ports: [{{port: '{}', protocol: UDP}}]}}]",
            2000 + i
        );
    }
    run(
        "(d) 1000 allow+deny CIDR/port rules (/8../32)",
        &policy(&format!("{allow}{deny}")),
    );

    // (f) L7: 100 ingress rules, each from the clients to a distinct TCP port
    // with two HTTP rules, plus one HTTP rule on port 80 for every peer (identity
    // 0), which folds into every client identity with an allow covering port 80.
    let mut s = String::from("  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n");
    s.push_str("  - toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET, path: /health}]}}]\n");
    for i in 0..RULES / 10 {
        let _ = writeln!(
            s,
            "  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: '{}', protocol: TCP}}], rules: {{http: [{{method: GET, path: '/v1/.*'}}, {{method: POST, path: /v1/items}}]}}}}]",
            10_000 + i
        );
    }
    run(
        "(f) 100 L7 rules on distinct ports + 1 for any peer",
        &policy(&s),
    );

    node_scale();
}
