//! Plain timing benchmarks (`cargo bench`): resolution time and map size for large
//! policy sets. No external harness; prints one line per scenario.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts live heap bytes and their peak, so each scenario reports the peak
/// memory its resolution needed above what was live before it, and every byte
/// ever allocated, which is what Go's `B/op` reports (the Cilium figures the
/// replicas are compared with).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
            TOTAL.fetch_add(layout.size(), Ordering::Relaxed);
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

/// Total bytes allocated while `f` runs (freed ones included) and the peak
/// above the level before it.
fn allocated_during<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let total = TOTAL.load(Ordering::Relaxed);
    let (out, peak) = peak_during(f);
    (out, TOTAL.load(Ordering::Relaxed) - total, peak)
}

use std::sync::Arc;

use cilia_policy::{
    cidr_prefixes, parse_policies, reserved, resolve, IdentityCache, IpNet, Labels, Policy,
    PolicyRepository, LOCAL_CIDR_IDENTITY_BASE, NAMESPACE_LABEL,
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
    // `cargo bench -p cilia-policy --bench resolve -- replicas [a|b|c|d]` runs
    // only the replicas of Cilium's benchmarks (or one of them);
    // `CILIA_BENCH_RESOLVE_ONLY=1` leaves out the agent's path (to profile
    // `resolve` alone).
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "replicas") {
        cilium_replicas(
            args.get(at + 1)
                .map(String::as_str)
                .filter(|a| !a.starts_with('-')),
        );
        return;
    }
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

    println!();
    cilium_replicas(None);
}

// ---------------------------------------------------------------------------
// Replicas of Cilium's own `pkg/policy` benchmarks (issue #11 point 4): the same
// rule shapes, selectors, identity counts, CIDRs and ports, written from their
// description. Cilium cannot be built on this machine (Go 1.19; Cilium needs
// >= 1.21), so its figures are constants taken from issue #11.

/// Cilium's figures for one benchmark: (ms low, ms high, MB allocated per op),
/// from issue #11, measured on this machine by the issue author.
struct CiliumFigures {
    ms: (f64, f64),
    mb: f64,
    timed: &'static str,
}

/// (a) BenchmarkRegenerateL3IngressPolicyRules, from issue #11.
const CILIUM_A: CiliumFigures = CiliumFigures {
    ms: (4.6, 5.6),
    mb: 1.8,
    timed: "resolve + distill",
};
/// (b) BenchmarkRegenerateL3EgressPolicyRules, from issue #11.
const CILIUM_B: CiliumFigures = CiliumFigures {
    ms: (4.9, 5.2),
    mb: 1.8,
    timed: "resolve + distill",
};
/// (c) BenchmarkRegenerateCIDRPolicyRules, from issue #11.
const CILIUM_C: CiliumFigures = CiliumFigures {
    ms: (9.9, 10.5),
    mb: 2.3,
    timed: "distill only",
};
/// (d) BenchmarkRegenerateCIDRDenyPolicyRules, from issue #11 (Cilium's
/// benchmark times only its distill step; cilia's figure is the whole resolution).
const CILIUM_D: CiliumFigures = CiliumFigures {
    ms: (849.0, 978.0),
    mb: 229.0,
    timed: "distill only",
};

/// The subject of every replica: Cilium's `fooIdentity` (label `foo`, empty value),
/// here also in namespace `default`, where the replica policies live.
fn replica_subject() -> Labels {
    Labels::from_pairs([("foo", ""), (NAMESPACE_LABEL, "default")])
}

/// Reserved identities and the subject's own identity (303), which Cilium's
/// benchmarks load before the generated ones.
fn replica_base_cache() -> IdentityCache {
    let mut cache = IdentityCache::new();
    for &(id, name) in reserved::NAMED {
        cache.insert_labels(id, reserved::labels(name));
    }
    cache.insert_labels(303, replica_subject());
    cache
}

/// 3000 endpoint identities (1000..3999), each with its own `foo<i>` label and
/// four shared ones in namespace `monitoring`; none carries `bar`, so the L3
/// replicas' peers select no identity, as in Cilium's.
fn replica_label_cache() -> IdentityCache {
    let mut cache = replica_base_cache();
    for i in 0..3000u32 {
        cache.insert_labels(
            1000 + i,
            Labels::from_pairs([
                (format!("foo{i}"), String::new()),
                (
                    "io.cilium.k8s.policy.cluster".to_string(),
                    "default".to_string(),
                ),
                (
                    "io.cilium.k8s.policy.serviceaccount".to_string(),
                    "default".to_string(),
                ),
                (NAMESPACE_LABEL.to_string(), "monitoring".to_string()),
                ("app".to_string(), "analytics-erneh".to_string()),
            ]),
        );
    }
    cache
}

/// One CIDR identity per distinct prefix of the policies.
fn replica_cidr_cache(policies: &[Policy]) -> IdentityCache {
    let mut cache = replica_base_cache();
    for (n, prefix) in cidr_prefixes(policies).into_iter().enumerate() {
        cache.insert_cidr(LOCAL_CIDR_IDENTITY_BASE + 1 + n as u32, prefix);
    }
    cache
}

/// The CIDR and TCP port of rule `i` of Cilium's CIDR generators: the prefix
/// length cycles through /8, /16, /24, /28, /32 (offset `shift`), the first
/// octet through 10, 192, 244, and the other octets are `i` modulo `mods`.
fn replica_cidr(i: u32, port_mod: u32, shift: u32, mods: [u32; 4]) -> (String, u32) {
    let first = [10, 192, 244][(i % 3) as usize];
    let (b, c, d) = (i % mods[0], i % mods[1], (i % mods[2]) << 4);
    let cidr = match (i + shift) % 5 {
        0 => format!("{first}.0.0.0/8"),
        1 => format!("{first}.{b}.0.0/16"),
        2 => format!("{first}.{b}.{c}.0/24"),
        3 => format!("{first}.{b}.{c}.{d}/28"),
        _ => format!("{first}.{b}.{c}.{}/32", i % mods[3]),
    };
    (cidr, 80 + i % port_mod)
}

/// Allow rule `i` of the CIDR replicas (Cilium's `generateCIDREgressRule`).
fn replica_allow_cidr(i: u32) -> (String, u32) {
    replica_cidr(i, 97, 0, [17, 121, 16, 255])
}

/// Deny rule `j` of the CIDR deny replica (Cilium's `generateCIDREgressDenyRule`,
/// called with `i + 773`).
fn replica_deny_cidr(j: u32) -> (String, u32) {
    replica_cidr(j, 131, 21, [23, 119, 15, 253])
}

const REPLICA_HEADER: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n";

/// One policy (Cilium: 1000 rules under one set of policy labels) with 1000
/// identical specs selecting `foo`, each with the one peer rule `section`.
fn replica_specs(name: &str, section: impl Fn(u32) -> String) -> String {
    let mut yaml =
        format!("{REPLICA_HEADER}metadata: {{name: {name}, namespace: default}}\nspecs:\n");
    for i in 1..=1000 {
        let _ = write!(
            yaml,
            "- endpointSelector: {{matchLabels: {{foo: ''}}}}\n{}",
            section(i)
        );
    }
    yaml
}

struct Replica {
    name: &'static str,
    yaml: String,
    cidr_identities: bool,
    cilium: CiliumFigures,
}

fn replicas() -> Vec<Replica> {
    let l3_ingress = replica_specs("l3-ingress", |_| {
        "  ingress:\n  - fromEndpoints: [{matchLabels: {bar: ''}}]\n".to_string()
    });
    let l3_egress = replica_specs("l3-egress", |_| {
        "  egress:\n  - toEndpoints: [{matchLabels: {bar: ''}}]\n".to_string()
    });
    let cidr = replica_specs("cidr", |i| {
        let (cidr, port) = replica_allow_cidr(i);
        format!("  egress:\n  - toCIDR: ['{cidr}']\n    toPorts: [{{ports: [{{port: '{port}', protocol: TCP}}]}}]\n")
    });
    // Cilium's deny replica names each rule apart (cidr-<i>): 1000 policies.
    let mut cidr_deny = String::new();
    for i in 1..=1000u32 {
        let (allow, allow_port) = replica_allow_cidr(i);
        let (deny, deny_port) = replica_deny_cidr(i + 773);
        let _ = write!(
            cidr_deny,
            "---\n{REPLICA_HEADER}metadata: {{name: cidr-{i}, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{foo: ''}}}}\n  egress:\n  - toCIDR: ['{allow}']\n    toPorts: [{{ports: [{{port: '{allow_port}', protocol: TCP}}]}}]\n  egressDeny:\n  - toCIDR: ['{deny}']\n    toPorts: [{{ports: [{{port: '{deny_port}', protocol: TCP}}]}}]\n"
        );
    }
    vec![
        Replica {
            name: "(a) Cilium RegenerateL3IngressPolicyRules",
            yaml: l3_ingress,
            cidr_identities: false,
            cilium: CILIUM_A,
        },
        Replica {
            name: "(b) Cilium RegenerateL3EgressPolicyRules",
            yaml: l3_egress,
            cidr_identities: false,
            cilium: CILIUM_B,
        },
        Replica {
            name: "(c) Cilium RegenerateCIDRPolicyRules",
            yaml: cidr,
            cidr_identities: true,
            cilium: CILIUM_C,
        },
        Replica {
            name: "(d) Cilium RegenerateCIDRDenyPolicyRules",
            yaml: cidr_deny,
            cidr_identities: true,
            cilium: CILIUM_D,
        },
    ]
}

/// Runs every replica: median resolution time, bytes allocated by one
/// resolution (total and peak), entries, and the ratios to Cilium's figures.
fn cilium_replicas(only: Option<&str>) {
    println!("Replicas of Cilium's pkg/policy benchmarks; Cilium figures from issue #11, measured on this machine by the issue author");
    for r in replicas() {
        if only.is_some_and(|o| !r.name.starts_with(&format!("({o})"))) {
            continue;
        }
        let policies = match parse_policies("replica.yaml", &r.yaml) {
            Ok(p) => p,
            Err(e) => panic!("{}: {e}", r.name),
        };
        let cache = if r.cidr_identities {
            replica_cidr_cache(&policies)
        } else {
            replica_label_cache()
        };
        let subject = replica_subject();
        let mut times = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        while times.len() < 5 || (times.len() < 200 && Instant::now() < deadline) {
            let start = Instant::now();
            let resolved = resolve(black_box(&policies), &subject, &cache);
            times.push(start.elapsed());
            drop(black_box(resolved));
        }
        times.sort();
        let (resolved, total, peak) =
            allocated_during(|| resolve(black_box(&policies), &subject, &cache));
        let median = times[times.len() / 2].as_secs_f64() * 1e3;
        let mb = total as f64 / 1e6;
        let c = &r.cilium;
        println!(
            "{:<44} median {median:>9.3} ms min {:>9.3} ms ({} runs) | allocated {mb:.3} MB peak {:.3} MB | {} entries | Cilium {}-{} ms {} MB ({}): time x{:.1}-{:.1}, memory x{:.1}",
            r.name,
            times[0].as_secs_f64() * 1e3,
            times.len(),
            peak as f64 / 1e6,
            resolved.entries.len(),
            c.ms.0,
            c.ms.1,
            c.mb,
            c.timed,
            c.ms.0 / median,
            c.ms.1 / median,
            c.mb / mb,
        );
        if std::env::var_os("CILIA_BENCH_RESOLVE_ONLY").is_none() {
            agent_path(&r, &policies, &cache, &subject);
        }
    }
}

/// The same replica the way the agent programs an endpoint: the policy's
/// contribution (its rules expanded to candidate keys) is computed once and
/// shared by every endpoint the policy selects; per endpoint, the merged
/// policy is built from the kept contributions and its entries taken for the
/// map. That per-endpoint step is timed, the counterpart of Cilium's distill
/// (which starts from its resolved policy and selector cache); the merged
/// policy stays with the endpoint, so what it retains is reported too.
fn agent_path(r: &Replica, policies: &[Policy], cache: &IdentityCache, subject: &Labels) {
    let kept: Vec<(String, Arc<Policy>)> = policies
        .iter()
        .map(|p| (p.qualified_name(), Arc::new(p.clone())))
        .collect();
    let mut repo = PolicyRepository::new();
    repo.set_policies(kept.iter().map(|(k, p)| (k.as_str(), p)));
    repo.set_identities(cache.clone());
    let basis = repo.basis(subject);
    let mut times = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while times.len() < 5 || (times.len() < 200 && Instant::now() < deadline) {
        let start = Instant::now();
        let merged = repo.merged(black_box(&basis));
        let entries = merged.resolved();
        times.push(start.elapsed());
        drop(black_box((merged, entries)));
    }
    times.sort();
    let before = LIVE.load(Ordering::Relaxed);
    let (merged, total, peak) = allocated_during(|| repo.merged(black_box(&basis)));
    let retained = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let ((), entries_total, _) = allocated_during(|| drop(black_box(merged.resolved())));
    let change = change_times(r, subject, &mut repo);
    let median = times[times.len() / 2].as_secs_f64() * 1e3;
    let mb = (total + entries_total) as f64 / 1e6;
    let c = &r.cilium;
    println!(
        "{:<44} median {median:>9.3} ms min {:>9.3} ms ({} runs) | allocated {mb:.3} MB peak {:.3} MB | {} entries | kept per endpoint {:.3} MB ({} B per entry) | vs Cilium: time x{:.1}-{:.1}, memory x{:.1}",
        "  the agent's path, per endpoint",
        times[0].as_secs_f64() * 1e3,
        times.len(),
        peak as f64 / 1e6,
        merged.entry_count(),
        retained as f64 / 1e6,
        retained.checked_div(merged.entry_count()).unwrap_or(0),
        c.ms.0 / median,
        c.ms.1 / median,
        c.mb / mb,
    );
    if let Some((median, min, upserted)) = change {
        println!(
            "{:<44} median {median:>9.3} ms min {min:>9.3} ms | {upserted} entries upserted, as many removed",
            "  the agent's path, a change of every entry"
        );
    }
}

/// A change of every entry of an endpoint's merged policy: the replica with
/// every port moved (TCP port p becomes 1p) and back, alternately, as an
/// edit of the policy moves it; the update of the merged policy is timed
/// (the new contribution is computed before). None for a replica without
/// ports. Returns (median ms, min ms, entries upserted).
fn change_times(
    r: &Replica,
    subject: &Labels,
    repo: &mut PolicyRepository,
) -> Option<(f64, f64, usize)> {
    if !r.yaml.contains("port: '") {
        return None;
    }
    let moved = r.yaml.replace("port: '", "port: '1");
    let sets: Vec<Vec<(String, Arc<Policy>)>> = [&r.yaml, &moved]
        .into_iter()
        .map(|yaml| {
            let policies = parse_policies("replica.yaml", yaml).expect("replica parses");
            policies
                .into_iter()
                .map(|p| (p.qualified_name(), Arc::new(p)))
                .collect()
        })
        .collect();
    let basis = repo.basis(subject);
    let mut merged = repo.merged(&basis);
    let mut times = Vec::new();
    let mut upserted = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while times.len() < 4 || (times.len() < 40 && Instant::now() < deadline) {
        let set = &sets[(times.len() + 1) % 2];
        repo.set_policies(set.iter().map(|(k, p)| (k.as_str(), p)));
        let basis = repo.basis(subject);
        let start = Instant::now();
        let delta = repo.update_merged(&mut merged, black_box(&basis));
        times.push(start.elapsed());
        upserted = delta.upserted.len();
        drop(black_box(delta));
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Some((ms(times[times.len() / 2]), ms(times[0]), upserted))
}
