//! Policy import at the repository level (`cargo bench -p cilia-policy --bench import`):
//! ten imports of 10,000 rules against three endpoints, as in the agent's import
//! benchmark (docs/benchmarks.md, "Policy import"), without the agent. Each import
//! is timed from `set_policies` to every endpoint's merged map, two ways: a full
//! merge of every endpoint whose basis changed, and the incremental merge
//! ([`MergedPolicy`]); the full way is given each new identity cache, the
//! incremental way only the CIDR identities the import added. Each import's time is printed with its ratio to import 1
//! (the same 10,000 rules alone) of the same run: the goal is import 10 ≈ import 1.
//! No external harness; each mode runs `RUNS` times, the median per import is shown.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cilia_policy::{
    cidr_prefixes, parse_policies, Basis, IdentityCache, IdentityId, IpNet, Labels, MergedPolicy,
    Policy, PolicyRepository, LOCAL_CIDR_IDENTITY_BASE, NAMESPACE_LABEL,
};

const IMPORTS: usize = 10;
const CHUNK: usize = 10_000;
const RUNS: usize = 3;

/// Import `k` of `IMPORTS` (see `cilia_policy::workload`).
fn scale_policy(k: usize, last: bool) -> String {
    cilia_policy::workload::scale_policy(k, CHUNK, last)
}

fn subjects() -> Vec<Labels> {
    ["server", "client", "other"]
        .iter()
        .map(|app| Labels::from_pairs([(NAMESPACE_LABEL, "default"), ("app", app)]))
        .collect()
}

/// The policy set (key, policy) and identity cache after one import, and the
/// CIDR identities the import added.
type Node = (
    Vec<(String, Arc<Policy>)>,
    IdentityCache,
    Vec<(IdentityId, IpNet)>,
);

/// The node after each import (built untimed: the agent's own bookkeeping, not
/// the repository's).
fn inputs() -> Vec<Node> {
    let mut cache = IdentityCache::new();
    for (i, s) in subjects().into_iter().enumerate() {
        cache.insert_labels(1000 + i as u32, s);
    }
    let mut policies: Vec<(String, Arc<Policy>)> = Vec::new();
    let mut next_cidr = LOCAL_CIDR_IDENTITY_BASE;
    let mut out = Vec::new();
    for k in 0..IMPORTS {
        let yaml = scale_policy(k, k + 1 == IMPORTS);
        let parsed = match parse_policies("import.yaml", &yaml) {
            Ok(p) => p,
            Err(e) => panic!("import {k}: {e}"),
        };
        for p in parsed {
            policies.push((format!("policy-scale-{k:02}"), Arc::new(p)));
        }
        let new: Vec<&Policy> = policies[policies.len() - 1..]
            .iter()
            .map(|(_, p)| &**p)
            .collect();
        let mut added = Vec::new();
        for prefix in cidr_prefixes(new) {
            cache.insert_cidr(next_cidr, prefix);
            added.push((next_cidr, prefix));
            next_cidr += 1;
        }
        out.push((policies.clone(), cache.clone(), added));
    }
    out
}

#[derive(Clone, Copy)]
enum Mode {
    Full,
    Incremental,
}

/// One import's time, and the parts of it spent on identities and merging.
type Times = (Duration, Duration, Duration);

/// One run of the ten imports.
fn run(mode: Mode, inputs: &[Node]) -> Vec<Times> {
    let subjects = subjects();
    let mut repo = PolicyRepository::new();
    let mut bases: Vec<Basis> = subjects.iter().map(|_| Basis::default()).collect();
    let mut merged: Vec<MergedPolicy> = subjects.iter().map(|_| MergedPolicy::new()).collect();
    let mut times = Vec::new();
    for (policies, cache, added) in inputs {
        let cache = cache.clone();
        let start = Instant::now();
        let mut merging = Duration::ZERO;
        repo.set_policies(policies.iter().map(|(k, p)| (k.as_str(), p)));
        let identities_start = Instant::now();
        match mode {
            Mode::Full => repo.set_identities(cache),
            Mode::Incremental => {
                repo.change_identities([], added.iter().map(|(id, net)| (*id, Some(*net))))
            }
        }
        let identities = identities_start.elapsed();
        for (i, subject) in subjects.iter().enumerate() {
            let basis = repo.basis(subject);
            let merge_start = Instant::now();
            match mode {
                Mode::Full => {
                    if basis != bases[i] {
                        black_box(repo.merge(&basis));
                    }
                }
                Mode::Incremental => {
                    black_box(repo.update_merged(&mut merged[i], &basis));
                }
            }
            merging += merge_start.elapsed();
            bases[i] = basis;
        }
        times.push((start.elapsed(), identities, merging));
    }
    times
}

fn main() {
    let inputs = inputs();
    for (name, mode) in [
        ("full merge", Mode::Full),
        ("incremental merge", Mode::Incremental),
    ] {
        let runs: Vec<Vec<Times>> = (0..RUNS).map(|_| run(mode, &inputs)).collect();
        // The run whose import total is the median, per import.
        let median = |k: usize| {
            let mut t: Vec<Times> = runs.iter().map(|r| r[k]).collect();
            t.sort();
            t[t.len() / 2]
        };
        let base = median(0).0;
        let total: Duration = (0..IMPORTS).map(|k| median(k).0).sum();
        println!("{name}: {IMPORTS} imports of {CHUNK} rules, 3 endpoints (median of {RUNS} runs)");
        for k in 0..IMPORTS {
            let (t, identities, merging) = median(k);
            println!(
                "  import {:>2} ({:>6} rules in): {:>10.3?}  ratio {:.2}  (identities {:>10.3?}, merging {:>10.3?})",
                k + 1,
                k * CHUNK,
                t,
                t.as_secs_f64() / base.as_secs_f64(),
                identities,
                merging
            );
        }
        println!("  all: {total:.3?}");
    }
}
