//! Fuzzing the policy parser with mutated YAML: whatever the input, parsing
//! ends quickly with policies or with one error line of bounded length,
//! never a panic, a hang or an error that floods a terminal.
//!
//! Seeds: `fuzz/yaml/` (the Star Wars examples and hand-made shapes); budget
//! and replay from `CILIA_FUZZ_*` (see `cilia_testnet::fuzz`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cilia_policy::parse_policies;
use cilia_testnet::fuzz::{corpus, mutate_bytes, save_crash, Budget, Rng};

const DICT: &[&[u8]] = &[
    b"\n---\n",
    b"--- ",
    b"\n...\n",
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"!!binary ",
    b"matchLabels:\n",
    b"matchExpressions: [{key: a, operator: NotIn, values: []}]",
    b"toCIDR: [0.0.0.0/0]",
    b"toCIDRSet: [{cidr: ::/0, except: [::/1]}]",
    b"port: \"65536\"",
    b"endPort: 1",
    b"protocol: ANY",
    b"ingressDeny:\n",
    b"toEntities: [world, all, host]",
    b"\"k8s:io.kubernetes.pod.namespace\": x",
    b"{}",
    b"[]",
    b"~",
    b"\t",
    b"\r\n",
    b"    ",
    b"\xff\xfe",
    b"rules: {http: [{method: GET, path: '/a(b'}]}",
    b"rules:\n  http:\n  - path: .*\n",
    b"headerMatches: [{name: X, mismatch: LOG}]",
    b"headers: ['Bad Name: x']",
    b"(a+)+{1000}",
    b"rules: {kafka: []}",
];

#[test]
fn mutated_policy_yaml_never_panics_hangs_or_floods() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/yaml");
    let seeds = corpus(&dir);
    assert!(!seeds.is_empty(), "corpus in {}", dir.display());
    let mut budget = Budget::from_env("policy-yaml", 100_000);
    let mut rng = Rng::new(budget.seed);
    while budget.another() {
        let seed = rng.pick(&seeds).clone();
        let input = mutate_bytes(&mut rng, &seed, DICT);
        let text = String::from_utf8_lossy(&input);
        let started = Instant::now();
        let result = std::panic::catch_unwind(|| parse_policies("fuzz.yaml", &text));
        let took = started.elapsed();
        let broken = match &result {
            Err(_) => Some("panicked".to_string()),
            Ok(_) if took > Duration::from_secs(2) => Some(format!("took {took:?}")),
            Ok(Err(e)) => {
                let msg = e.to_string();
                (msg.contains('\n') || msg.len() > 1024)
                    .then(|| format!("error of {} bytes / several lines: {msg:.200}", msg.len()))
            }
            Ok(Ok(_)) => None,
        };
        if let Some(what) = broken {
            let path = save_crash(&dir, &budget, &input);
            panic!("{what} (input saved as {})", path.display());
        }
    }
    budget.report("policy-yaml");
}
