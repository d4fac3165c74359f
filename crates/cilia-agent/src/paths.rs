//! Every on-disk location the agent uses, in one place.

/// Persistent agent state (database, lock). `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cilia";
/// bpffs directory holding pinned maps and links. `--bpf-root`.
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/cilia";
/// REST API socket. `--socket`.
pub const DEFAULT_SOCKET: &str = cilia_api::DEFAULT_SOCKET;

/// Inside the state dir: the redb database.
pub const STATE_DB: &str = "state.redb";
/// Inside the state dir: held (flock) by the running agent.
pub const LOCK_FILE: &str = "agent.lock";

/// Default endpoint ranges when none is configured (ULA / private).
pub const DEFAULT_IPV6_RANGE: &str = "fd00:c1a::/112";
