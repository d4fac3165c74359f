//! Kernel feature probing. The agent calls [`probe_kernel`] at start and
//! refuses to run when a required feature is missing, naming it, instead of
//! failing later on the first endpoint.

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
use aya::util::KernelVersion;

/// One probed kernel capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub present: bool,
    /// Without it the agent does not start.
    pub required: bool,
    /// What it is used for, or why it is missing.
    pub detail: String,
}

/// All probed features, in a stable order.
#[derive(Debug, Clone, Default)]
pub struct FeatureReport {
    pub kernel: String,
    pub features: Vec<Feature>,
}

impl FeatureReport {
    /// The required features that are absent.
    pub fn missing_required(&self) -> Vec<&Feature> {
        self.features
            .iter()
            .filter(|f| f.required && !f.present)
            .collect()
    }
}

fn feature<E: std::fmt::Display>(
    name: &'static str,
    required: bool,
    result: Result<bool, E>,
    use_: &str,
) -> Feature {
    let (present, detail) = match result {
        Ok(true) => (true, use_.to_string()),
        Ok(false) => (false, format!("not supported by this kernel ({use_})")),
        Err(e) => (false, format!("probe failed: {e}")),
    };
    Feature {
        name,
        present,
        required,
        detail,
    }
}

/// The datapath clock (`crate::clock`): without a calibration the programs
/// read the coarse clock, correct but dearer per packet.
fn clock_feature(calibration: Result<cilia_abi::ClockConfig, String>) -> Feature {
    let (present, detail) = match calibration {
        Ok(c) => (
            true,
            format!(
                "datapath deadlines from jiffies ({} Hz) calibrated to CLOCK_MONOTONIC_COARSE: \
                 one inlined load per packet",
                crate::clock::hz(&c)
            ),
        ),
        Err(reason) => (
            false,
            format!("{reason}; datapath deadlines read the coarse clock (slower per packet)"),
        ),
    };
    Feature {
        name: "jiffies_clock",
        present,
        required: false,
        detail,
    }
}

/// The map types the datapath needs, each with what it holds.
const REQUIRED_MAPS: [(&str, MapType, &str); 3] = [
    (
        "ringbuf",
        MapType::RingBuf,
        "BPF ring buffer: datapath events",
    ),
    (
        "lpm_trie",
        MapType::LpmTrie,
        "LPM trie maps: ipcache and CIDR lookups",
    ),
    (
        "lru_hash",
        MapType::LruHash,
        "LRU hash maps: connection tracking",
    ),
];

/// Probes the running kernel. Needs CAP_BPF (root) to give true answers.
pub fn probe_kernel() -> FeatureReport {
    let kernel = KernelVersion::current()
        .map(|v| v.to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let tcx = KernelVersion::current().map(|v| v >= KernelVersion::new(6, 6, 0));
    let mut features = vec![
        feature(
            "btf",
            true,
            std::path::Path::new("/sys/kernel/btf/vmlinux").try_exists(),
            "kernel type information, /sys/kernel/btf/vmlinux",
        ),
        feature(
            "tcx",
            true,
            tcx,
            "TCX links (kernel >= 6.6): pinnable tc attachments",
        ),
        feature(
            "redirect_peer",
            true,
            is_helper_supported(
                ProgramType::SchedClassifier,
                BpfHelper::BPF_FUNC_redirect_peer,
            ),
            "bpf_redirect_peer: delivery into an endpoint's namespace",
        ),
    ];
    features.extend(
        REQUIRED_MAPS
            .iter()
            .map(|&(name, map, use_)| feature(name, true, is_map_supported(map), use_)),
    );
    features.push(feature(
        "xdp",
        false,
        is_program_supported(ProgramType::Xdp),
        "XDP programs: prefilter and load-balancer acceleration",
    ));
    features.push(clock_feature(crate::clock::calibration()));
    FeatureReport { kernel, features }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_feature_names_the_hz_or_why_the_coarse_clock_is_read() {
        let ok = clock_feature(Ok(cilia_abi::ClockConfig {
            tick_ns: 4_000_000,
            base_ns: 0,
        }));
        assert!(ok.present && !ok.required);
        assert!(ok.detail.contains("250 Hz"), "{}", ok.detail);
        let failed = clock_feature(Err("jiffies did not change in 600 ms".into()));
        assert!(!failed.present && !failed.required);
        assert!(
            failed.detail.contains("jiffies did not change")
                && failed.detail.contains("coarse clock"),
            "{}",
            failed.detail
        );
    }
}
