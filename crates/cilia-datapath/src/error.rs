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
    #[error("map {0} is missing from the BPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the BPF object")]
    MissingProgram(&'static str),
    #[error("pinned map {path} does not match this build: {reason}")]
    IncompatiblePin { path: PathBuf, reason: String },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    #[error("bpffs root {path}: {reason}")]
    BpfRoot { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl DatapathError {
    pub(crate) fn program(name: &str, source: impl Into<aya::programs::ProgramError>) -> Self {
        Self::Program {
            name: name.to_string(),
            source: source.into(),
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
