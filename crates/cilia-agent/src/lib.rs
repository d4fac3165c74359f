//! The cilia node agent as a library: [`run`] starts everything from an
//! [`AgentConfig`]; the binary only parses flags.
//!
//! Start-up order matters and is: lock the state dir (one agent per state),
//! probe the kernel (refuse to run without required features), open the
//! store, open the pinned datapath, restore endpoints, and only then serve
//! the API, so no request ever sees a half-restored agent.

pub mod api;
pub mod cluster;
pub mod crash;
pub mod datapath;
pub mod endpoint;
pub mod health;
pub mod ipam;
pub mod k8s;
pub mod lbaccel;
pub mod mesh;
pub mod metrics;
pub mod monitor;
pub mod multinode;
pub mod node;
pub mod nodenet;
pub mod paths;
pub mod policy;
pub mod prefilter;
pub mod proxy;
pub mod relay;
pub mod service;
pub mod socklb;
pub mod store;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::api::AgentState;
use crate::endpoint::{EndpointManager, Pools};
use crate::ipam::Pool;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub bpf_root: PathBuf,
    pub socket: PathBuf,
    pub ipv6_range: Ipv6Net,
    pub ipv4_range: Option<Ipv4Net>,
    /// Recent flows kept for `cilia observe` (0: none, and no events unless
    /// someone runs `cilia monitor`).
    pub flow_buffer_size: usize,
    /// Where to serve Prometheus metrics (`None`: not at all).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Conntrack entries one endpoint may hold (0: CILIA_CT_BUDGET_DEFAULT).
    pub ct_budget: u32,
    /// Entries of the conntrack table (`DatapathOptions::ct_max`).
    pub ct_max: u32,
    /// Port of the L7 proxy's transparent listeners.
    pub proxy_port: u16,
    /// The `cilia-proxy` executable (`None`: beside the agent's own).
    pub proxy_bin: Option<PathBuf>,
    /// Entries of every service's Maglev table (a prime, see
    /// [`cilia_lb::check_table_size`]).
    pub lb_maglev_table_size: u32,
    /// How NodePort services reach backends on other nodes (`--lb-mode`;
    /// NodePort needs multi-node mode).
    pub lb_mode: service::LbMode,
    /// This node in a cluster (kvstore, tunnel, peers).
    pub cluster: ClusterOptions,
    /// Socket-level load balancing (`--socket-lb`, `--socket-lb-cgroup`).
    pub socket_lb: socklb::SocketLbOptions,
    /// Devices the XDP prefilter is attached to (empty: none; its CIDRs
    /// are kept all the same).
    pub prefilter_devices: Vec<String>,
    /// Fast attach (`--fast-attach`): new endpoints start on the generic
    /// program, specialized in the background (see `endpoint::specialize`).
    pub fast_attach: bool,
    /// NodePort in XDP on the underlay device (`--lb-acceleration`).
    pub lb_acceleration: lbaccel::LbAccelerationFlag,
    /// The Kubernetes API server to take pods, namespaces and policies
    /// from (`--k8s-kubeconfig`, `--k8s-in-cluster`); `None`: none.
    pub k8s: Option<cilia_k8s::config::K8sConfig>,
}

/// Where the agent keeps cluster-wide state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvstoreKind {
    /// A file under the state dir: one node, zero setup.
    Embedded,
    /// An etcd v3 cluster shared by every node.
    Etcd,
}

/// How packets travel between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TunnelMode {
    /// A VXLAN overlay whose VNI carries the sender's security identity.
    Vxlan,
    /// Native routing over the underlay; identities from the ipcache.
    Disabled,
}

impl TunnelMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelMode::Vxlan => "vxlan",
            TunnelMode::Disabled => "disabled",
        }
    }
}

/// Who programs the node's routes to other nodes' pod ranges in native mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeRoutes {
    /// The agent: each range via its node's underlay address (the nodes
    /// share a link).
    Auto,
    /// The operator's routing (BGP, static routes): the agent adds none.
    External,
}

/// The node's place in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// This node's name, unique in the cluster.
    pub node_name: String,
    /// The node's underlay address (`None`: the source address of the
    /// default route, required with `--kvstore etcd`).
    pub node_ip: Option<std::net::IpAddr>,
    pub kvstore: KvstoreKind,
    /// etcd endpoints (`http://host:port`).
    pub kvstore_endpoints: Vec<String>,
    pub tunnel: TunnelMode,
    /// UDP port of the VXLAN overlay.
    pub tunnel_port: u16,
    pub native_routes: NativeRoutes,
    /// Time to live of the node's lease: its entries vanish this long after
    /// its agent stops renewing it.
    pub node_lease_ttl: std::time::Duration,
    /// Where the read-only peer API (flows, status, health) listens for the
    /// other nodes' relays (`None`: nowhere).
    pub peer_api_addr: Option<std::net::SocketAddr>,
    /// TCP port of the health endpoint's responder.
    pub health_port: u16,
    /// Name of the health endpoint's network namespace (under /run/netns).
    pub health_netns: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            node_name: default_node_name(),
            node_ip: None,
            kvstore: KvstoreKind::Embedded,
            kvstore_endpoints: Vec::new(),
            tunnel: TunnelMode::Vxlan,
            tunnel_port: DEFAULT_TUNNEL_PORT,
            native_routes: NativeRoutes::Auto,
            node_lease_ttl: std::time::Duration::from_secs(15),
            peer_api_addr: None,
            health_port: DEFAULT_HEALTH_PORT,
            health_netns: format!("cilia-health-{}", default_node_name()),
        }
    }
}

/// The VXLAN port (the one Linux and Cilium use by default).
pub const DEFAULT_TUNNEL_PORT: u16 = 8472;
/// The health responder's port.
pub const DEFAULT_HEALTH_PORT: u16 = 4240;
/// The peer API's port.
pub const DEFAULT_PEER_API_PORT: u16 = 4244;

/// The node's name when none is given: the lowercased host name.
pub fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_lowercase())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn mkdir_private(path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Takes the state dir's lock, or explains who holds it.
fn lock_state_dir(config: &AgentConfig) -> anyhow::Result<Flock<File>> {
    mkdir_private(&config.state_dir)?;
    let path = config.state_dir.join(paths::LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)?;
            writeln!(lock, "{}", std::process::id())?;
            Ok(lock)
        }
        Err((_, errno)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            if errno == nix::errno::Errno::EWOULDBLOCK {
                bail!(
                    "state dir {} is in use by another cilia-agent (pid {}); stop it or pass another --state-dir",
                    config.state_dir.display(),
                    if holder.is_empty() { "unknown" } else { holder }
                );
            }
            bail!("locking {}: {errno}", path.display())
        }
    }
}

/// Binds the API socket (mode 0600), replacing a stale socket file.
fn bind_socket(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        mkdir_private(parent)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "socket {} is served by another process; pass another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Threads of the runtime's blocking pool, where every API request and
/// background task does its store, map and netlink work (tokio's default
/// is 512). Each thread costs its touched stack and allocator caches: 100
/// CNI ADDs at once (each also asks for the status) ran 110 threads and
/// doubled the agent's RSS. The work is short and CPU- or lock-bound, and
/// no blocking task waits for one that has not started, so beyond a few
/// per CPU more threads only queue behind the same locks and CPUs; requests
/// beyond wait as tasks.
pub const MAX_BLOCKING_THREADS: usize = 16;

/// The glibc tunable that turns off malloc's per-thread caches.
pub const TCACHE_TUNABLE: &str = "glibc.malloc.tcache_count";
/// Where the re-executed agent finds the `GLIBC_TUNABLES` it was given.
const GIVEN_TUNABLES: &str = "CILIA_AGENT_GIVEN_GLIBC_TUNABLES";

/// Re-executes the agent once with glibc's per-thread malloc caches
/// (tcache) off, unless `GLIBC_TUNABLES` already names them (the
/// operator's choice stands). Call it first thing in `main`.
///
/// Why: each thread's tcache keeps up to 7 freed chunks of each of 64
/// small sizes for itself, invisible to the other threads and to
/// `malloc_trim`. The agent's long-lived threads (the runtime's workers and
/// a blocking pool of up to [`MAX_BLOCKING_THREADS`]) each fill theirs as
/// endpoint work passes through them, so over create/delete cycles the
/// allocator's in-use count grew by 3 MiB with no live object behind it,
/// and the heap with it; without the caches it stays flat (1.1 MiB in use)
/// and the agent is 1 MiB smaller at idle (docs/benchmarks.md, "The thread
/// caches"). The agent allocates in request handlers, not in per-packet
/// loops, so the arena's fast bins serve it well enough. The setting is read
/// by the dynamic loader at start only, hence the re-execution (same pid,
/// arguments and environment, before any thread exists). A failed exec is
/// reported and the agent goes on with the caches.
///
/// Opt out by setting the tunable yourself, e.g.
/// `GLIBC_TUNABLES=glibc.malloc.tcache_count=7` (glibc's default).
pub fn exec_without_thread_caches() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        let keep_caches = |why: String| {
            eprintln!(
                "cilia-agent: warning: {why}; running with glibc's per-thread malloc \
                 caches (more memory over time)"
            )
        };
        // Re-executed: the loader has read the setting; the processes the
        // agent starts (the L7 proxy, whose threads are on the request
        // path) get the environment the operator gave.
        if let Some(given) = std::env::var_os(GIVEN_TUNABLES) {
            std::env::remove_var(GIVEN_TUNABLES);
            match given.is_empty() {
                true => std::env::remove_var("GLIBC_TUNABLES"),
                false => std::env::set_var("GLIBC_TUNABLES", given),
            }
            return;
        }
        let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let Some(tunables) = tunables_without_thread_caches(&current) else {
            return;
        };
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| "cilia-agent".into());
        // The binary's own path, not /proc/self/exe: the kernel names the
        // process after the file executed, and `pgrep cilia-agent` must
        // still find it.
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                return keep_caches(format!(
                    "cannot find the agent's binary to re-execute with {TCACHE_TUNABLE}=0 ({e})"
                ))
            }
        };
        let err = std::process::Command::new(exe)
            .arg0(argv0)
            .args(args)
            .env("GLIBC_TUNABLES", tunables)
            .env(GIVEN_TUNABLES, &current)
            .exec();
        keep_caches(format!(
            "re-executing with {TCACHE_TUNABLE}=0 failed ({err})"
        ));
    }
}

/// `GLIBC_TUNABLES` with the thread caches off, from its current value;
/// `None` when it already sets them (either way).
pub fn tunables_without_thread_caches(current: &str) -> Option<String> {
    let named = current
        .split(':')
        .any(|t| t.split('=').next() == Some(TCACHE_TUNABLE));
    match (named, current.is_empty()) {
        (true, _) => None,
        (false, true) => Some(format!("{TCACHE_TUNABLE}=0")),
        (false, false) => Some(format!("{current}:{TCACHE_TUNABLE}=0")),
    }
}

/// Keeps the agent's resident memory near what it uses (glibc malloc; call
/// it first thing in `main`, before any thread starts). Two settings, each
/// measured in docs/benchmarks.md ("Concurrent CNI ADDs"):
/// * at most two malloc arenas: glibc otherwise gives each thread that
///   meets contention its own (up to 8 per CPU), and memory freed in one
///   arena is of no use to the others — with many API requests on the
///   blocking pool at once that multiplied the peak;
/// * a fixed mmap threshold (128 KiB): a load parses the kernel's BTF into
///   buffers of several MiB; with glibc's adaptive threshold, the first such
///   buffer freed raises the threshold, and the next ones come from the
///   heap, where they stay resident after they are freed.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; it is called
        // before any other thread exists.
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
            nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

/// Hands the heap's free pages back to the system (glibc `malloc_trim`):
/// glibc only shrinks the top of an arena by itself, so the pages freed in
/// the middle by a burst of endpoint work (a hundred ADDs at once, their
/// specialization, their deletes) would otherwise stay resident until the
/// same allocations come again. Walking the free lists of the two arenas
/// takes well under a millisecond; call it after such bursts, off the
/// async workers.
pub fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator; it
    // takes the arenas' locks itself.
    unsafe {
        nix::libc::malloc_trim(0);
    }
    // The same moments suit the embedded BPF objects, read only by loads.
    cilia_datapath::object::release_object_pages();
}

/// How often expired conntrack entries are removed and budgets recounted.
const CT_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the datapath is asked whether an endpoint nears its budget
/// (a walk of the endpoints map and a read of each local endpoint's
/// budget count).
const CT_PRESSURE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);
/// The least time between two GCs, early ones included: a walk of a full
/// table costs tens of milliseconds.
const CT_GC_MIN_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// What the conntrack GC loop does at one of its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtGcWhen {
    /// A GC interval has passed (or none ran yet): collect.
    Due,
    /// Collect if an endpoint nears its budget.
    IfPressed,
    /// The last GC was too recent for another.
    NotYet,
}

/// When the conntrack GC runs, given the time since the last one. An
/// endpoint opening short connections at a steady rate holds, between two
/// GCs, the entries of those that ended in the last close timeout (10 s)
/// plus those that expired since the last GC: with GCs only every 10 s,
/// its budget (32,768 by default) capped it at ~1,600 new connections per
/// second. A GC started as soon as an endpoint nears its budget (at most
/// one a second) also removes that endpoint's closed entries idle for a
/// second (`BpfDatapath::gc_ct`), so it then holds about the last
/// 1 + 1.5 s of them: the cap becomes ~budget / 2.5 s, ~13,000 per second
/// at the default. Only endpoints near their budget cost early GCs.
fn ct_gc_when(since_last: Option<std::time::Duration>, early_gap: std::time::Duration) -> CtGcWhen {
    match since_last {
        None => CtGcWhen::Due,
        Some(d) if d >= CT_GC_INTERVAL => CtGcWhen::Due,
        Some(d) if d >= early_gap => CtGcWhen::IfPressed,
        Some(_) => CtGcWhen::NotYet,
    }
}

/// The least time before the next early GC, after an early one that
/// removed `removed` entries: [`CT_GC_MIN_GAP`] when it gave back at
/// least a sixteenth of the budget, else twice the gap before (up to the
/// interval). An endpoint whose count grows near its budget with flows
/// that stay live (not ended connections) would otherwise have the agent
/// walk the whole table every second for nothing: an endpoint could make
/// the agent spend up to a sixth of a CPU on a full table.
fn next_early_gap(gap: std::time::Duration, removed: usize, budget: u32) -> std::time::Duration {
    if removed as u64 * 16 >= u64::from(budget) {
        CT_GC_MIN_GAP
    } else {
        (gap * 2).min(CT_GC_INTERVAL)
    }
}

/// Runs the agent until SIGINT/SIGTERM. Links and maps stay pinned on exit:
/// traffic between endpoints keeps flowing without the agent.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let _lock = lock_state_dir(&config)?;

    let features = cilia_datapath::probe_kernel();
    let missing = features.missing_required();
    if !missing.is_empty() {
        let names: Vec<String> = missing
            .iter()
            .map(|f| format!("{} ({})", f.name, f.detail))
            .collect();
        bail!(
            "kernel {} lacks required features: {}",
            features.kernel,
            names.join(", ")
        );
    }
    for f in features.features.iter().filter(|f| !f.present) {
        warn!(feature = f.name, detail = %f.detail, "optional kernel feature missing");
    }

    let pools = Pools {
        v6: Pool::new(IpNet::V6(config.ipv6_range)).context("--ipv6-range")?,
        v4: config
            .ipv4_range
            .map(|r| Pool::new(IpNet::V4(r)))
            .transpose()
            .context("--ipv4-range")?,
    };
    let store = store::Store::open(&config.state_dir.join(paths::STATE_DB))?;
    let datapath = cilia_datapath::BpfDatapath::open_with(
        &config.bpf_root,
        &cilia_datapath::DatapathOptions {
            ct_max: config.ct_max,
        },
    )?;
    datapath
        .set_ct_budget(config.ct_budget)
        .context("setting the conntrack budget")?;
    let recreated = datapath.recreated_maps().to_vec();
    // One handle for every subsystem: the datapath locks each map on its
    // own, for one operation at a time.
    let datapath: endpoint::DatapathHandle = Arc::new(datapath);
    let events = datapath.event_reader();
    let socket_lb = socklb::start(&config.socket_lb, &datapath)?;
    let cluster_mode = config.cluster.kvstore == KvstoreKind::Etcd;
    if cluster_mode {
        let name = &config.cluster.node_name;
        if name.is_empty() || name.len() > 253 || name.contains(['/', ' ']) {
            bail!("--node-name {name:?}: give a name of 1-253 characters without '/' or spaces");
        }
    }
    // The node's devices and programs for other nodes, before endpoints are
    // restored: they meet a datapath that reaches the cluster.
    let node_dp = if cluster_mode {
        Some(multinode::prepare_datapath(&config.cluster, &datapath)?)
    } else {
        None
    };
    // The watches start at once; their lists are applied once the agent's
    // state exists, and awaited before it serves.
    let k8s_watches = match &config.k8s {
        Some(k) => Some(k8s::Watches::start(k).await?),
        None => None,
    };
    let mut manager = EndpointManager::new(
        store,
        datapath.clone(),
        Box::new(endpoint::netdev::Rtnetlink),
        pools,
    );
    manager.kubernetes = k8s_watches.is_some();
    manager.mtu = node_dp.as_ref().map(|n| n.endpoint_mtu);
    manager.spares = Some(
        endpoint::spares::PolicySpares::start(datapath.clone(), manager.store.clone())
            .context("starting the spare policy maps' thread")?,
    );
    let serves_underlay = node_dp.is_some();
    let underlay = node_dp.as_ref().map(|n| lbaccel::UnderlayDevice {
        name: n.underlay.ifname.clone(),
        native_routing: config.cluster.tunnel == TunnelMode::Disabled,
    });
    manager.socket_lb = socket_lb.node_netns();
    if !recreated.is_empty() {
        let names: Vec<&str> = recreated.iter().map(|m| m.name.as_str()).collect();
        warn!(maps = ?names, "pinned maps were recreated for this build; re-attaching every endpoint");
        manager.reattach_all = true;
    }
    manager
        .ensure_router()
        .context("setting up the node's router addresses")?;
    manager.restore().context("restoring endpoints")?;
    manager
        .sync_socket_lb_netns()
        .context("serving the endpoints' namespaces with the socket load balancer")?;
    // Cluster mode: the health endpoint (identity `health`), then the
    // cluster client, with the store's identities made cluster-wide.
    let health_endpoint = if cluster_mode {
        let path =
            health::create_health_netns(&config.cluster.health_netns).with_context(|| {
                format!(
                    "creating the health endpoint's network namespace {}",
                    config.cluster.health_netns
                )
            })?;
        let rec = manager
            .ensure_health_endpoint(&path.display().to_string())
            .context("creating the health endpoint")?;
        Some((path, rec))
    } else {
        None
    };
    let cluster_link = match node_dp {
        Some(node) => {
            let opts = &config.cluster;
            let mut cc = cluster::ClusterConfig::new(
                opts.node_name.clone(),
                multinode::node_ips(&node.underlay),
                config.ipv6_range,
            );
            cc.ipv4_range = config.ipv4_range;
            cc.health_ips = health_endpoint
                .as_ref()
                .map(|(_, r)| r.ips())
                .unwrap_or_default();
            cc.peer_api = opts.peer_api_addr;
            cc.tunnel = opts.tunnel.as_str().into();
            cc.lease_ttl = opts.node_lease_ttl;
            cc.kvstore = format!("etcd {}", opts.kvstore_endpoints.join(","));
            let endpoints = opts.kvstore_endpoints.clone();
            let (client, events) = cluster::ClusterClient::start(cc, move || {
                cilia_kvstore::EtcdStore::connect(&endpoints)
                    .map(|s| Box::new(s) as Box<dyn cilia_kvstore::KvStore>)
            });
            manager
                .store
                .set_identity_allocator(Arc::new(client.clone()));
            let conflicts = client.reconcile_identities(&manager.store.identities()?);
            manager.policy().cluster = Some(client.clone());
            let link = multinode::MultiNode::new(client, opts.clone(), node);
            for (id, reason) in conflicts {
                warn!(identity = id, %reason, "the cluster disagrees with a local identity");
                multinode::MultiNode::note_conflict(&link, format!("identity {id}: {reason}"));
            }
            Some((link, events))
        }
        None => None,
    };
    let restored = manager.list()?.len();
    // Services after endpoints: their backends are usually endpoints, and
    // the maps are pinned, so traffic to them never stopped meanwhile.
    let maglev_size = cilia_lb::check_table_size(config.lb_maglev_table_size)
        .context("--lb-maglev-table-size")?;
    let mut services = service::Services::new(manager.store.clone(), datapath.clone(), maglev_size);
    if serves_underlay {
        // The underlay device carries the node programs: NodePort works.
        services = services.with_nodeport(config.lb_mode);
    }
    let services = Arc::new(services);
    let restored_services = services.restore().context("restoring services")?;
    let prefilter = Arc::new(
        prefilter::Prefilter::start(
            manager.store.clone(),
            datapath.clone(),
            &config.prefilter_devices,
        )
        .context("starting the XDP prefilter")?,
    );
    // After the prefilter: both live in the underlay device's one XDP
    // program, each start swapping its feature in or out.
    let lb_acceleration =
        lbaccel::LbAcceleration::start(config.lb_acceleration, &datapath, underlay.as_ref())?;

    // Bind every listener before announcing readiness: a bad address is a
    // start-up error, never an agent that dies after saying it is ready.
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                " (is the loopback interface of this network namespace up? `ip link set lo up`)"
            } else {
                ""
            };
            anyhow::anyhow!(
                "binding the metrics address {addr}: {e}{hint}; or pass --metrics-addr off"
            )
        })?),
        None => None,
    };
    let peer_listener = match (cluster_mode, config.cluster.peer_api_addr) {
        (true, Some(addr)) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("binding the peer API address {addr}: {e}; or pass --peer-api-addr off")
        })?),
        _ => None,
    };
    let listener = bind_socket(&config.socket)?;
    let agent_metrics = metrics::AgentMetrics::default();
    // The cluster's views for the API, and the health endpoint's threads
    // (kept for the agent's lifetime: dropping them stops them).
    let mut cluster_view = None;
    let mut health_threads = None;
    if let (Some((link, _)), Some((path, _))) = (&cluster_link, &health_endpoint) {
        let (nodes_tx, nodes_rx) = tokio::sync::watch::channel(link.api_nodes());
        let (targets_tx, targets_rx) = tokio::sync::watch::channel(link.health_targets());
        let port = config.cluster.health_port;
        let responder = health::Responder::start(path, port)
            .with_context(|| format!("starting the health responder on port {port}"))?;
        let (prober, report) = health::Prober::start(
            path,
            health::ProbeConfig {
                port,
                ..Default::default()
            },
            targets_rx,
            agent_metrics.clone(),
        )
        .context("starting the health prober")?;
        health_threads = Some((responder, prober));
        tokio::spawn(link.clone().refresh(nodes_tx, targets_tx));
        cluster_view = Some(relay::ClusterView {
            node_name: config.cluster.node_name.clone(),
            nodes: nodes_rx,
            health: Some(report),
        });
    }
    let policy = manager.policy_handle();
    let (policy_summary, l7_summary) = {
        let mut policy = manager.policy();
        policy.metrics = agent_metrics.clone();
        policy.proxy_port = config.proxy_port;
        (policy.subscribe(), policy.subscribe_l7())
    };
    let proxy_config = proxy::ProxyConfig::for_agent(
        &config.socket,
        &config.state_dir,
        config.proxy_port,
        config.proxy_bin.clone(),
    );
    let (proxy_status_tx, proxy_status) =
        tokio::sync::watch::channel(proxy::ProxyStatus::NotNeeded);
    let (proxy_covered_tx, proxy_covered) = tokio::sync::watch::channel(proxy::Covered::default());
    let store = manager.store.clone();
    let pools = manager.pools().clone();
    let flow_monitor = monitor::Monitor::new(config.flow_buffer_size, agent_metrics.clone());
    let state = Arc::new(AgentState {
        specializer: std::sync::OnceLock::new(),
        monitor: flow_monitor.clone(),
        endpoints: Mutex::new(manager),
        policy,
        policy_summary,
        store,
        pools,
        datapath,
        metrics: agent_metrics.clone(),
        creates: Arc::new(tokio::sync::Semaphore::new(api::create_permits())),
        reaps: Arc::new(tokio::sync::Semaphore::new(api::create_permits())),
        features,
        state_dir: config.state_dir.display().to_string(),
        bpf_root: config.bpf_root.display().to_string(),
        proxy: proxy_status,
        proxy_port: config.proxy_port,
        l7_summary: l7_summary.clone(),
        proxy_covered,
        cluster: cluster_view,
        multinode: cluster_link.as_ref().map(|(l, _)| l.clone()),
        socket_lb,
        services,
        prefilter,
        lb_acceleration,
        k8s: k8s_watches.as_ref().map(|w| w.view.clone()),
    });
    let _health_threads = health_threads;
    if config.fast_attach {
        let spec =
            endpoint::specialize::start(Arc::downgrade(&state), |s: &AgentState| &s.endpoints);
        state
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .specialize = Some(spec.clone());
        let _ = state.specializer.set(spec);
    }
    if let Some((link, events)) = cluster_link {
        let (l, p, dp) = (link.clone(), state.policy.clone(), state.datapath.clone());
        std::thread::Builder::new()
            .name("cilia-cluster-apply".into())
            .spawn(move || l.run_events(events, p, dp))
            .context("starting the cluster event thread")?;
        tokio::spawn(link.publish_local_ips(state.store.clone(), l7_summary.clone()));
    }
    if let Some(watches) = k8s_watches {
        watches.apply(state.clone()).await?;
    }
    if let Some(l) = peer_listener {
        let addr = l.local_addr()?;
        info!(%addr, "serving the peer API (read-only) for the cluster relay");
        let s = state.clone();
        tokio::spawn(async move {
            if let Err(e) = relay::serve_peer_api(l, s).await {
                warn!(error = %e, "peer API stopped");
            }
        });
    }
    info!(
        socket = %config.socket.display(),
        endpoints = restored,
        services = restored_services,
        ipv6_range = %config.ipv6_range,
        ipv4_range = ?config.ipv4_range,
        "cilia-agent ready"
    );
    tokio::spawn(endpoint::labels::learn_labels(state.clone()));
    // Name snapshots for the monitor: datapath events and the proxy's L7
    // flows (also when the event ring buffer is unavailable).
    let s = state.clone();
    let snapshot = Arc::new(move || {
        let summary = s.policy_summary.borrow().clone();
        monitor::Names::of(&s.store, &summary)
    });
    tokio::spawn(monitor::publish_names(
        snapshot,
        Arc::downgrade(&flow_monitor),
    ));
    {
        // Local NodePort services hold this node's backends only: rewritten
        // when the node's endpoints change (every publication of the L7
        // summary follows an endpoint or policy change).
        let mut changes = l7_summary.clone();
        let services = state.services.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let s = services.clone();
                match tokio::task::spawn_blocking(move || s.refresh_local()).await {
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "rewriting the Local NodePort services")
                    }
                    Err(e) => tracing::warn!(error = %e, "rewriting the Local NodePort services"),
                    Ok(Ok(_)) => {}
                }
            }
        });
    }
    {
        // The L7 proxy: its policy follows the policy subsystem and the
        // endpoints; its flows feed the monitor.
        let (policy_tx, policy_rx) = tokio::sync::watch::channel(None);
        tokio::spawn(proxy::publish_policy(
            state.store.clone(),
            l7_summary,
            policy_tx,
            proxy_covered_tx,
        ));
        tokio::spawn(proxy::supervise(
            proxy_config,
            policy_rx,
            proxy_status_tx,
            flow_monitor.clone(),
        ));
    }
    match events {
        Ok(Some(reader)) => {
            let feed = flow_monitor.names_feed();
            // The monitor level lives in the config map beside the policy
            // revision; the datapath serializes the two read-modify-writes
            // of that map (a level change never undoes a revision bump). It
            // is set from a task of its own, so the reader never waits.
            let (level_tx, mut level_rx) = tokio::sync::watch::channel(u32::MAX);
            let s = state.clone();
            tokio::spawn(async move {
                while level_rx.changed().await.is_ok() {
                    let wanted = *level_rx.borrow_and_update();
                    let s = s.clone();
                    let set =
                        tokio::task::spawn_blocking(move || s.datapath.set_monitor_level(wanted))
                            .await;
                    if !matches!(set, Ok(Ok(()))) {
                        warn!(
                            level = wanted,
                            "setting the datapath's monitor level failed: retrying"
                        );
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        level_rx.mark_changed();
                    }
                }
            });
            tokio::spawn(monitor::run(feed, level_tx, flow_monitor, reader));
        }
        Err(e) => warn!(error = %e, "monitor disabled"),
        Ok(None) => warn!("event ring buffer unavailable: monitor disabled"),
    }
    // The node's addresses are `host` in the ipcache: re-read them
    // periodically (a short lock: one getifaddrs and the difference).
    let node_state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(node::NODE_ADDRESS_RESYNC);
        loop {
            tick.tick().await;
            let s = node_state.clone();
            let result = tokio::task::spawn_blocking(move || {
                s.policy
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .sync_node_addresses()
            })
            .await;
            if let Ok(Err(e)) = result {
                warn!(error = %e, "syncing the node's addresses to the ipcache failed");
            }
        }
    });
    // Conntrack garbage collection: expired entries take room in a table
    // that never evicts, and only the recount after a GC gives endpoints
    // their budget back; so it runs often, and early when an endpoint
    // nears its budget (see `ct_gc_when`). It holds only the conntrack
    // maps' locks inside the datapath: endpoint create/delete never wait.
    let gc_state = state.clone();
    let gc_metrics = agent_metrics.clone();
    let ct_budget = match config.ct_budget {
        0 => cilia_abi::CILIA_CT_BUDGET_DEFAULT,
        b => b,
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CT_PRESSURE_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<std::time::Instant> = None;
        let mut early_gap = CT_GC_MIN_GAP;
        loop {
            tick.tick().await;
            let when = ct_gc_when(last.map(|t| t.elapsed()), early_gap);
            if when == CtGcWhen::NotYet {
                continue;
            }
            let (s, m) = (gc_state.clone(), gc_metrics.clone());
            let result = tokio::task::spawn_blocking(move || {
                if when == CtGcWhen::IfPressed && !s.datapath.ct_pressure()? {
                    return Ok(None);
                }
                let collected = metrics::collect_conntrack_garbage(s.datapath.as_ref(), &m)?;
                if when == CtGcWhen::Due {
                    // A regular quiet moment: whatever the last seconds'
                    // API requests freed goes back to the system.
                    trim_allocator();
                } else {
                    m.ct_gc_early.inc();
                }
                Ok::<_, cilia_datapath::DatapathError>(Some(collected))
            })
            .await;
            match result {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(n))) => {
                    last = Some(std::time::Instant::now());
                    if when == CtGcWhen::IfPressed {
                        early_gap = next_early_gap(early_gap, n, ct_budget);
                    }
                    if n > 0 {
                        tracing::debug!(
                            removed = n,
                            early = when == CtGcWhen::IfPressed,
                            "conntrack gc"
                        );
                    }
                }
                Ok(Err(e)) => {
                    // Retried at the next interval, not at every check.
                    last = Some(std::time::Instant::now());
                    warn!(error = %e, "conntrack gc failed");
                }
                Err(_) => {}
            }
        }
    });
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr()?;
        let s = state.clone();
        let m = agent_metrics.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let (s, m) = (s.clone(), m.clone());
                async move {
                    // Store counts from a read transaction, map walks under
                    // each map's own lock: no subsystem lock.
                    let snap = tokio::task::spawn_blocking(move || {
                        metrics::scrape(&s.store, s.datapath.as_ref())
                    })
                    .await;
                    match snap {
                        Ok(Ok(snap)) => (
                            axum::http::StatusCode::OK,
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            metrics::render(&snap, &m),
                        ),
                        Ok(Err(e)) => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            e.to_string(),
                        ),
                        Err(e) => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            e.to_string(),
                        ),
                    }
                }
            }),
        );
        info!(%addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "metrics server stopped");
            }
        });
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail in a tokio runtime");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("shutting down; endpoints keep running (pinned)");
    };
    axum::serve(listener, api::router(state, agent_metrics))
        .with_graceful_shutdown(shutdown)
        .await?;
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conntrack_gc_runs_on_its_interval_and_early_only_after_the_gap() {
        let ms = std::time::Duration::from_millis;
        let gap = CT_GC_MIN_GAP;
        assert_eq!(ct_gc_when(None, gap), CtGcWhen::Due, "at start");
        assert_eq!(ct_gc_when(Some(ms(500)), gap), CtGcWhen::NotYet);
        assert_eq!(ct_gc_when(Some(ms(999)), gap), CtGcWhen::NotYet);
        assert_eq!(ct_gc_when(Some(ms(1000)), gap), CtGcWhen::IfPressed);
        assert_eq!(ct_gc_when(Some(ms(9999)), gap), CtGcWhen::IfPressed);
        assert_eq!(ct_gc_when(Some(ms(10_000)), gap), CtGcWhen::Due);
        assert_eq!(ct_gc_when(Some(ms(60_000)), gap), CtGcWhen::Due);
        // After early runs that freed little, early ones wait longer.
        assert_eq!(ct_gc_when(Some(ms(3000)), ms(4000)), CtGcWhen::NotYet);
        assert_eq!(ct_gc_when(Some(ms(4000)), ms(4000)), CtGcWhen::IfPressed);
    }

    #[test]
    fn early_gcs_that_free_little_back_off_to_the_interval() {
        let s = std::time::Duration::from_secs;
        // A sixteenth of the budget given back: as soon as allowed again.
        assert_eq!(next_early_gap(s(8), 2048, 32768), CT_GC_MIN_GAP);
        assert_eq!(next_early_gap(CT_GC_MIN_GAP, 5000, 32768), CT_GC_MIN_GAP);
        // Less: twice the wait, never beyond the regular interval.
        assert_eq!(next_early_gap(CT_GC_MIN_GAP, 2047, 32768), s(2));
        assert_eq!(next_early_gap(s(2), 0, 32768), s(4));
        assert_eq!(next_early_gap(s(8), 0, 32768), CT_GC_INTERVAL);
        assert_eq!(next_early_gap(CT_GC_INTERVAL, 0, 32768), CT_GC_INTERVAL);
        // A small budget: 10 of 150 is enough.
        assert_eq!(next_early_gap(s(4), 10, 150), CT_GC_MIN_GAP);
    }

    #[test]
    fn the_thread_caches_are_turned_off_unless_the_operator_set_them() {
        assert_eq!(
            tunables_without_thread_caches("").as_deref(),
            Some("glibc.malloc.tcache_count=0")
        );
        assert_eq!(
            tunables_without_thread_caches("glibc.malloc.check=3").as_deref(),
            Some("glibc.malloc.check=3:glibc.malloc.tcache_count=0")
        );
        // The operator's own value stands, whatever it is.
        assert_eq!(
            tunables_without_thread_caches("glibc.malloc.tcache_count=7"),
            None
        );
        assert_eq!(
            tunables_without_thread_caches("glibc.malloc.check=3:glibc.malloc.tcache_count=2"),
            None
        );
        // A longer name that starts the same is another tunable.
        assert_eq!(
            tunables_without_thread_caches("glibc.malloc.tcache_count_x=1").as_deref(),
            Some("glibc.malloc.tcache_count_x=1:glibc.malloc.tcache_count=0")
        );
    }
}
