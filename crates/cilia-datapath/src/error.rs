use std::path::PathBuf;

/// Everything that can go wrong between the agent and the kernel. Each
/// variant names the object involved, so the message stands on its own.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: String,
        #[source]
        source: aya::maps::MapError,
    },
    /// The kernel refused to load a program: `summary` is the end of the
    /// verifier's log, where it says why (the full log goes to the agent's
    /// debug log).
    #[error("program {name}: the verifier rejected it ({source}): {summary}")]
    Verifier {
        name: String,
        #[source]
        source: std::io::Error,
        summary: String,
    },
    #[error("endpoint {endpoint_id} has no pinned link at {pin}: it is not attached")]
    NotAttached { endpoint_id: u16, pin: PathBuf },
    #[error("pinned link {pin} is attached to device {found}, not the endpoint's device {expected}: restart the agent to re-attach it")]
    WrongDevice {
        pin: PathBuf,
        found: u32,
        expected: u32,
    },
    /// A datapath setting out of its range (`DatapathOptions`).
    #[error("datapath configuration: {0}")]
    Config(String),
    #[error("map {0} is missing from the BPF object")]
    MissingMap(&'static str),
    #[error("the generic endpoint program is not available on this kernel: {0}")]
    GenericUnavailable(String),
    #[error("program {0} is missing from the BPF object")]
    MissingProgram(&'static str),
    #[error("pinned map {path} does not match this build: {reason}")]
    IncompatiblePin { path: PathBuf, reason: String },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    #[error("bpffs root {path}: {reason}")]
    BpfRoot { path: PathBuf, reason: String },
    /// A service or backend the load balancer's maps cannot hold as given.
    #[error("{object}: {reason}")]
    InvalidLb { object: String, reason: String },
    /// A failure [`crate::fake::FakeDatapath`] was told to inject.
    #[error("{operation}: failure injected by the fake datapath")]
    Injected { operation: &'static str },
    #[error("prefilter CIDR {cidr}: {reason}")]
    Prefilter { cidr: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Attempts at a program load the kernel interrupted.
const LOAD_ATTEMPTS: u32 = 5;

/// Loads a program (`load` is its `load()`), again when the kernel answers
/// EAGAIN: the verifier stops with EAGAIN when a signal is pending for the
/// loading thread (in a process that handles SIGCHLD, any child's exit),
/// which says nothing about the program. libbpf retries the same way;
/// aya 0.14 does not (a long verification, such as `cil_from_netdev`'s, met
/// it in one suite run).
pub(crate) fn load_program(
    name: &str,
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), DatapathError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                tracing::debug!(
                    program = name,
                    attempt,
                    "program load interrupted (EAGAIN): again"
                );
                attempt += 1;
            }
            other => return other.map_err(|e| DatapathError::program(name, e)),
        }
    }
}

impl DatapathError {
    pub(crate) fn program(name: &str, source: impl Into<aya::programs::ProgramError>) -> Self {
        match source.into() {
            aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                let log = verifier_log.to_string();
                tracing::debug!(program = name, log = %log, "verifier log");
                Self::Verifier {
                    name: name.to_string(),
                    source: io_error,
                    summary: verifier_summary(&log),
                }
            }
            source => Self::Program {
                name: name.to_string(),
                source,
            },
        }
    }

    pub(crate) fn map(name: &str, source: impl Into<aya::maps::MapError>) -> Self {
        Self::Map {
            name: name.to_string(),
            source: source.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Lines of a verifier log kept in an error message.
const VERIFIER_SUMMARY_LINES: usize = 4;

/// The part of a verifier log that says why a program was rejected: its
/// last lines before the statistics. The log is a trace of every
/// instruction the verifier walked (thousands of lines for an endpoint
/// program); the reason is where the walk stopped, at its end.
pub fn verifier_summary(log: &str) -> String {
    let is_stats = |l: &str| {
        l.starts_with("processed ")
            || l.starts_with("verification time")
            || l.starts_with("stack depth")
    };
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_stats(l))
        .collect();
    if lines.is_empty() {
        return "no verifier log".into();
    }
    let start = lines.len().saturating_sub(VERIFIER_SUMMARY_LINES);
    let mut summary = lines[start..].join(" | ");
    if let Some((cut, _)) = summary.char_indices().nth(400) {
        summary.truncate(cut);
        summary.push('…');
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_summary_keeps_the_reason_at_the_end_and_drops_the_statistics() {
        let log = "func#0 @0\n0: R1=ctx() R10=fp0\n0: (bf) r6 = r1\n1: (79) r0 = *(u64 *)(r1 +32752)\ninvalid bpf_context access off=32752 size=8\nprocessed 2 insns (limit 1000000) max_states_per_insn 0\n";
        assert_eq!(
            verifier_summary(log),
            "0: R1=ctx() R10=fp0 | 0: (bf) r6 = r1 | 1: (79) r0 = *(u64 *)(r1 +32752) | invalid bpf_context access off=32752 size=8"
        );
        assert_eq!(verifier_summary(""), "no verifier log");
    }
}
