//! A small, dependency-free mutation fuzzer for stable Rust: seeded
//! randomness, a time and run budget from the environment, a corpus kept in
//! the repository, failing inputs saved beside it. The fuzz targets (packets
//! through the endpoint program, policy YAML, CNI stdin, API bodies) are
//! ordinary tests, so CI runs each for a bounded time.
//!
//! `CILIA_FUZZ_SECS` (default 5) and `CILIA_FUZZ_RUNS` bound a run;
//! `CILIA_FUZZ_SEED` replays one (every run prints its seed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// xorshift64*: seedable and fast; enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One fuzz run: its seed, budget and progress.
pub struct Budget {
    pub seed: u64,
    deadline: Instant,
    max_runs: u64,
    pub runs: u64,
    started: Instant,
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

impl Budget {
    /// Reads the budget from the environment; `default_runs` caps the runs
    /// when `CILIA_FUZZ_RUNS` is unset.
    pub fn from_env(target: &str, default_runs: u64) -> Self {
        let seed = env_num("CILIA_FUZZ_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        let secs = env_num("CILIA_FUZZ_SECS").unwrap_or(5);
        let max_runs = env_num("CILIA_FUZZ_RUNS").unwrap_or(default_runs);
        println!("fuzz {target}: seed {seed}, {secs} s, at most {max_runs} runs");
        let started = Instant::now();
        Self {
            seed,
            deadline: started + Duration::from_secs(secs),
            max_runs,
            runs: 0,
            started,
        }
    }

    /// Whether another run fits; counts it.
    pub fn another(&mut self) -> bool {
        if self.runs >= self.max_runs || Instant::now() >= self.deadline {
            return false;
        }
        self.runs += 1;
        true
    }

    pub fn report(&self, target: &str) {
        println!(
            "fuzz {target}: {} runs in {:?}",
            self.runs,
            self.started.elapsed()
        );
    }
}

/// The inputs kept in `dir` (one per file; missing dir: none).
pub fn corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Saves a failing input as `crash-<seed>-<run>` in `dir` and returns its
/// path, so the failure can be replayed and kept in the corpus.
pub fn save_crash(dir: &Path, budget: &Budget, input: &[u8]) -> PathBuf {
    let _ = std::fs::create_dir_all(dir);
    let path = dir.join(format!("crash-{}-{}", budget.seed, budget.runs));
    let _ = std::fs::write(&path, input);
    path
}

/// Byte-level mutations of `input`, a few at a time; `dict` holds tokens
/// worth inserting (field names, odd values).
pub fn mutate_bytes(rng: &mut Rng, input: &[u8], dict: &[&[u8]]) -> Vec<u8> {
    let mut p = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !p.is_empty() => {
                let i = rng.below(p.len());
                p[i] ^= 1 << rng.below(8);
            }
            1 if !p.is_empty() => {
                let at = rng.below(p.len());
                let len = rng.below((p.len() - at).min(32) + 1);
                p.drain(at..at + len);
            }
            2 if !dict.is_empty() => {
                let at = rng.below(p.len() + 1);
                let token = rng.pick(dict);
                p.splice(at..at, token.iter().copied());
            }
            3 if !p.is_empty() => {
                // Duplicate a slice: repeated keys, nested structures.
                let at = rng.below(p.len());
                let len = rng.below((p.len() - at).min(64) + 1);
                let copy = p[at..at + len].to_vec();
                let to = rng.below(p.len() + 1);
                p.splice(to..to, copy);
            }
            4 => {
                let at = rng.below(p.len() + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                p.splice(at..at, bytes);
            }
            _ => {
                let cut = rng.below(p.len() + 1);
                p.truncate(cut);
            }
        }
    }
    p
}
