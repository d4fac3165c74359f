//! The datapath clock's calibration.
//!
//! Every deadline the datapath keeps is on CLOCK_MONOTONIC_COARSE, which the
//! agent's GC reads too. Reading it from BPF (`bpf_ktime_get_coarse_ns`) was
//! the dearest step of an established packet; `bpf_jiffies64` is inlined by
//! the verifier into one load. Both advance at the kernel's tick, so
//! `jiffies * TICK_NSEC + base` is the coarse clock to within a tick, once
//! the tick length and the base are known. The kernel exposes neither to
//! userspace, so they are measured here: a probe program (`probe_clock` in
//! bpf/probe.c) reads jiffies and the coarse clock through
//! `BPF_PROG_TEST_RUN`; the tick length is the time (CLOCK_MONOTONIC)
//! between jiffies' changes over some ticks, snapped to the HZ a kernel can
//! have, and the base comes from a reading both clocks agree on. The result
//! goes to the `cilia_clock` map, which
//! `cil_now()` reads (bpf/lib/maps.h); without it (`tick_ns` 0) programs
//! read the coarse clock as before, so a failed calibration costs speed,
//! never correctness.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cilia_abi::ClockConfig;

use crate::error::DatapathError;
use crate::object::PROG_PROBE_CLOCK;
use crate::testrun::TestProgram;

/// What the tick length is timed over: at least this many ticks and
/// [`MIN_SPAN`]. Reads [`POLL`] apart see a tick up to a poll late, 0.25 %
/// of the span; the HZ values a kernel can be built with are at least 2.4 %
/// apart (250 and 256, 1000 and 1024).
const MIN_TICKS: u64 = 4;
const MIN_SPAN: u64 = 40_000_000;
/// Time between two reads while waiting for jiffies to change.
const POLL: Duration = Duration::from_micros(100);
/// How long one attempt may take (4 ticks at HZ 24 are 167 ms).
const ATTEMPT_LIMIT: Duration = Duration::from_millis(600);
/// Steady readings the base is taken from.
const BASE_READINGS: usize = 3;
/// Attempts before giving up.
const ATTEMPTS: usize = 3;
/// Every HZ a Linux architecture offers (Kconfig's choices and fixed values).
const KNOWN_HZ: [u64; 15] = [
    24, 32, 48, 64, 100, 128, 200, 250, 256, 300, 500, 512, 1000, 1024, 1200,
];
/// How far a measured tick may be from its HZ's (relative).
const TOLERANCE: f64 = 0.01;
const NSEC_PER_SEC: u64 = 1_000_000_000;

/// One reading of the probe: the coarse clock before and after jiffies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    pub coarse: u64,
    pub jiffies: u64,
    pub coarse_after: u64,
}

/// The calibration of this boot, measured once per process (the relation
/// between jiffies and the monotonic clock holds until the next boot).
pub fn calibration() -> Result<ClockConfig, String> {
    static CALIBRATION: OnceLock<Result<ClockConfig, String>> = OnceLock::new();
    CALIBRATION
        .get_or_init(|| measure().map_err(|e| e.to_string()))
        .clone()
}

/// The HZ of a calibration (for logs and status).
pub fn hz(config: &ClockConfig) -> u64 {
    NSEC_PER_SEC.checked_div(config.tick_ns).unwrap_or(0)
}

/// The kernel's TICK_NSEC for `hz`.
fn tick_nsec(hz: u64) -> u64 {
    (NSEC_PER_SEC + hz / 2) / hz
}

fn measure() -> Result<ClockConfig, DatapathError> {
    let probe = TestProgram::probe(PROG_PROBE_CLOCK)?;
    let read = || -> Result<(Sample, u64), String> {
        let out = probe.run(&[0u8; 64]).map_err(|e| e.to_string())?.packet;
        let word = |i: usize| {
            let at = 14 + 8 * i;
            u64::from_le_bytes(out[at..at + 8].try_into().expect("eight bytes"))
        };
        let sample = Sample {
            coarse: word(0),
            jiffies: word(1),
            coarse_after: word(2),
        };
        Ok((sample, crate::endpoint::monotonic_ns()))
    };
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        match attempt(&read) {
            Ok(config) => return Ok(config),
            Err(e) => last = e,
        }
    }
    Err(DatapathError::Config(format!(
        "datapath clock calibration failed after {ATTEMPTS} attempts: {last}"
    )))
}

fn attempt(read: &impl Fn() -> Result<(Sample, u64), String>) -> Result<ClockConfig, String> {
    let deadline = Instant::now() + ATTEMPT_LIMIT;
    let next = |prev: Sample| -> Result<(Sample, u64), String> {
        loop {
            std::thread::sleep(POLL);
            let cur = read()?;
            if cur.0.jiffies != prev.jiffies {
                return Ok(cur);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "jiffies did not change in {} ms",
                    ATTEMPT_LIMIT.as_millis()
                ));
            }
        }
    };
    // The first read showing each new jiffies value: its time is the
    // tick's to within a read.
    let first = next(read()?.0)?;
    let mut last = first;
    while last.0.jiffies.wrapping_sub(first.0.jiffies) < MIN_TICKS
        || last.1.saturating_sub(first.1) < MIN_SPAN
    {
        last = next(last.0)?;
    }
    let tick_ns = fit((first.0.jiffies, first.1), (last.0.jiffies, last.1))?;
    // The base from readings that held still for a poll (not taken
    // between the kernel's jiffies and timekeeper updates). The coarse
    // clock is set when the tick's handler runs, a little after the tick
    // (or, after an idle spell, anywhere within one): the least base of a
    // few readings is the tick itself.
    let mut bases = Vec::with_capacity(BASE_READINGS);
    while bases.len() < BASE_READINGS {
        let a = read()?.0;
        std::thread::sleep(POLL);
        let b = read()?.0;
        if let Some(base) = base(a, b, tick_ns) {
            bases.push(base);
            std::thread::sleep(POLL * 7);
        }
        if Instant::now() > deadline {
            return Err("no steady reading of the two clocks".into());
        }
    }
    let base_ns = earliest(&bases);
    let config = ClockConfig { tick_ns, base_ns };
    check(&config, read()?.0)?;
    Ok(config)
}

/// The tick length from the times (CLOCK_MONOTONIC) two jiffies values
/// were first seen: the nearest HZ a kernel can have, if within
/// [`TOLERANCE`].
pub(crate) fn fit(a: (u64, u64), b: (u64, u64)) -> Result<u64, String> {
    let ticks = b.0.wrapping_sub(a.0);
    let elapsed = b.1.saturating_sub(a.1);
    if ticks < MIN_TICKS || elapsed < MIN_SPAN {
        return Err(format!("{ticks} ticks in {elapsed} ns"));
    }
    let measured = elapsed as f64 / ticks as f64;
    let hz = KNOWN_HZ
        .iter()
        .copied()
        .min_by(|x, y| {
            let dx = (tick_nsec(*x) as f64 - measured).abs();
            let dy = (tick_nsec(*y) as f64 - measured).abs();
            dx.total_cmp(&dy)
        })
        .expect("known HZ values");
    let tick = tick_nsec(hz);
    if (tick as f64 - measured).abs() > TOLERANCE * tick as f64 {
        return Err(format!(
            "a tick of {measured:.0} ns (over {ticks} ticks) is no kernel's HZ"
        ));
    }
    Ok(tick)
}

/// The base from two reads a poll apart, if both clocks held still
/// between them (so neither read fell between their updates).
pub(crate) fn base(a: Sample, b: Sample, tick_ns: u64) -> Option<u64> {
    let steady = a == b && a.coarse == a.coarse_after;
    steady.then(|| a.coarse.wrapping_sub(a.jiffies.wrapping_mul(tick_ns)))
}

/// The earliest of some bases (wrapping values close to each other).
fn earliest(bases: &[u64]) -> u64 {
    bases
        .iter()
        .copied()
        .reduce(|a, b| if (b.wrapping_sub(a) as i64) < 0 { b } else { a })
        .unwrap_or(0)
}

/// A fresh sample must read the same time through the calibration as
/// through the coarse clock, to within two ticks (each is at most about a
/// tick behind the time).
pub(crate) fn check(config: &ClockConfig, s: Sample) -> Result<(), String> {
    let now = s
        .jiffies
        .wrapping_mul(config.tick_ns)
        .wrapping_add(config.base_ns);
    let off = (now.wrapping_sub(s.coarse) as i64).unsigned_abs();
    if off > 2 * config.tick_ns {
        return Err(format!(
            "the calibrated clock is {off} ns off the coarse clock (tick {} ns)",
            config.tick_ns
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// jiffies start 300 s before wrapping 32 bits, as the kernel's do.
    fn jiffies_at(hz: u64, ticks: u64) -> u64 {
        (1u64 << 32) - 300 * hz + ticks
    }

    #[test]
    fn every_common_hz_is_found_from_ticks_seen_late_by_up_to_a_poll() {
        for hz in [24, 100, 250, 256, 300, 1000, 1024] {
            let tick = tick_nsec(hz);
            let ticks = MIN_TICKS.max((MIN_SPAN + 100_000).div_ceil(tick));
            let t0 = 7_000_000_000;
            // Seen 100 µs late at the start, on time at the end, and the
            // other way round.
            for (late_a, late_b) in [(100_000, 0), (0, 100_000), (30_000, 60_000)] {
                let a = (jiffies_at(hz, 5), t0 + late_a);
                let b = (jiffies_at(hz, 5 + ticks), t0 + ticks * tick + late_b);
                assert_eq!(fit(a, b), Ok(tick), "hz {hz}");
            }
            // Jiffies caught up by several ticks at once count as such.
            let b = (jiffies_at(hz, 5 + 3 * ticks), t0 + 3 * ticks * tick);
            assert_eq!(fit((jiffies_at(hz, 5), t0), b), Ok(tick));
        }
    }

    #[test]
    fn too_few_ticks_and_a_tick_no_kernel_has_are_refused() {
        assert!(fit((10, 0), (12, 80_000_000)).is_err());
        assert!(fit((0, 0), (10, 36_000_000)).is_err());
        // 10 kHz, and 275 Hz (between 250 and 300).
        assert!(fit((0, 0), (500, 50_000_000)).is_err());
        assert!(fit((0, 0), (20, 72_727_272)).is_err());
        // Time going backwards is no measurement.
        assert!(fit((0, 5), (10, 0)).is_err());
    }

    #[test]
    fn the_base_comes_only_from_a_reading_that_held_still_and_reads_the_coarse_clock() {
        let tick = tick_nsec(250);
        let j = jiffies_at(250, 4242);
        let coarse = 9_000_000_000;
        let s = Sample {
            coarse,
            jiffies: j,
            coarse_after: coarse,
        };
        let base_ns = base(s, s, tick).unwrap();
        let config = ClockConfig {
            tick_ns: tick,
            base_ns,
        };
        // A later reading, through the calibration, reads the coarse clock.
        let later = Sample {
            coarse: coarse + 1000 * tick,
            jiffies: j + 1000,
            coarse_after: coarse + 1000 * tick,
        };
        check(&config, later).unwrap();
        // Jiffies moved between the two reads, or the coarse clock did, or
        // a tick passed inside one read: no base.
        let moved = Sample {
            jiffies: j + 1,
            ..s
        };
        assert_eq!(base(s, moved, tick), None);
        let caught_up = Sample {
            coarse: coarse + tick,
            coarse_after: coarse + tick,
            ..s
        };
        assert_eq!(base(s, caught_up, tick), None);
        let torn = Sample {
            coarse_after: coarse + tick,
            ..s
        };
        assert_eq!(base(torn, torn, tick), None);
        // The earliest base wins, also across a wrap.
        assert_eq!(earliest(&[5, 3, 9]), 3);
        assert_eq!(earliest(&[2, u64::MAX - 1, 7]), u64::MAX - 1);
        // A calibration three ticks off fails its check.
        let off = Sample {
            coarse: later.coarse + 3 * tick,
            coarse_after: later.coarse + 3 * tick,
            ..later
        };
        assert!(check(&config, off).is_err());
    }
}
