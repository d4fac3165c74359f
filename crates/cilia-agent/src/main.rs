//! `cilia-agent`: parses flags into an [`AgentConfig`] and runs it.

use std::path::PathBuf;

use cilia_agent::{paths, AgentConfig, ClusterOptions, KvstoreKind, NativeRoutes, TunnelMode};
use clap::Parser;
use ipnet::{Ipv4Net, Ipv6Net};

/// The cilia node agent: BPF networking for containers.
///
/// Example: cilia-agent --ipv6-range fd00:c1a::/112 --ipv4-range 10.200.0.0/24
/// A feature switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory for persistent state (database, lock).
    #[arg(long, env = "CILIA_STATE_DIR", default_value = paths::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// bpffs directory for pinned maps and links (bpffs is mounted if needed).
    #[arg(long, env = "CILIA_BPF_ROOT", default_value = paths::DEFAULT_BPF_ROOT)]
    bpf_root: PathBuf,
    /// Unix socket of the REST API (created with mode 0600).
    #[arg(long, env = "CILIA_SOCKET", default_value = paths::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// IPv6 range endpoint addresses come from; its first address is the router.
    #[arg(long, env = "CILIA_IPV6_RANGE", default_value = paths::DEFAULT_IPV6_RANGE)]
    ipv6_range: Ipv6Net,
    /// IPv4 range; IPv4 is off when not given.
    #[arg(long, env = "CILIA_IPV4_RANGE")]
    ipv4_range: Option<Ipv4Net>,
    /// Recent flows kept for `cilia observe`; 0 keeps none, and the datapath
    /// then emits events only while `cilia monitor` runs.
    #[arg(long, env = "CILIA_FLOW_BUFFER_SIZE", default_value_t = cilia_agent::monitor::DEFAULT_FLOW_BUFFER)]
    flow_buffer_size: usize,
    /// Address of the Prometheus metrics endpoint (`/metrics`); `off` to disable.
    #[arg(long, env = "CILIA_METRICS_ADDR", default_value = "127.0.0.1:9962")]
    metrics_addr: String,
    /// Conntrack entries one endpoint may hold; its new flows beyond are
    /// dropped ("Endpoint conntrack budget exhausted"). 0: the built-in
    /// default (32768, an eighth of the default table).
    #[arg(long, env = "CILIA_CT_BUDGET", default_value_t = 0)]
    ct_budget: u32,
    /// Entries of the node's conntrack table, all endpoints together
    /// (1024..=16777216; preallocated, ~150 bytes of kernel memory each, 40 MB at the default).
    /// A table pinned at another size is recreated empty at start:
    /// established flows then meet policy again as new ones.
    #[arg(long, env = "CILIA_CT_MAX", default_value_t = cilia_abi::CILIA_CT_MAX,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    ct_max: u32,
    /// Port of the L7 proxy's transparent listeners (IPv4 and IPv6) in this
    /// network namespace; the proxy runs only while a policy has HTTP rules.
    #[arg(long, env = "CILIA_PROXY_PORT", default_value_t = cilia_proxy::control::DEFAULT_PROXY_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    proxy_port: u16,
    /// Entries of every service's Maglev lookup table: a prime in
    /// 1021..=131071 (larger: more even spread and fewer flows moved when
    /// backends change, at 4 bytes per entry per Maglev service).
    #[arg(long, env = "CILIA_LB_MAGLEV_TABLE_SIZE", default_value_t = cilia_lb::DEFAULT_TABLE_SIZE,
          value_parser = maglev_table_size)]
    lb_maglev_table_size: u32,
    /// How external clients of a NodePort service reach a backend on another
    /// node: snat (replies return through this node) or dsr (the backend's
    /// node answers the client directly). Multi-node mode only.
    #[arg(long, env = "CILIA_LB_MODE", value_enum, default_value = "snat")]
    lb_mode: cilia_agent::service::LbMode,
    /// The `cilia-proxy` executable; default: beside `cilia-agent`.
    #[arg(long, env = "CILIA_PROXY_BIN")]
    proxy_bin: Option<PathBuf>,
    /// This node's name, unique in the cluster (with Kubernetes: the pods'
    /// `spec.nodeName`); default: `K8S_NODE_NAME` (the DaemonSet's downward
    /// API), else the lowercased host name.
    #[arg(long, env = "CILIA_NODE_NAME")]
    node_name: Option<String>,
    /// Watch this Kubernetes API server (a kubeconfig file, its current
    /// context) for pods on this node, namespaces and network policies.
    /// Default: no Kubernetes.
    #[arg(long, env = "CILIA_K8S_KUBECONFIG", conflicts_with = "k8s_in_cluster")]
    k8s_kubeconfig: Option<PathBuf>,
    /// Watch the API server of the cluster the agent runs in (its pod's
    /// service account).
    #[arg(long, env = "CILIA_K8S_IN_CLUSTER")]
    k8s_in_cluster: bool,
    /// How long start-up waits for the first lists of every watched kind
    /// (`60s`, `2m`); the agent then fails naming the kinds missing.
    #[arg(long, env = "CILIA_K8S_SYNC_TIMEOUT", default_value = "60s",
          value_parser = humantime::parse_duration)]
    k8s_sync_timeout: std::time::Duration,
    /// The node's underlay address: the device holding it carries tunnel
    /// and native-routing traffic. Default: the source address of the
    /// default route.
    #[arg(long, env = "CILIA_NODE_IP")]
    node_ip: Option<std::net::IpAddr>,
    /// Where cluster-wide state lives: `embedded` (one node) or `etcd`.
    #[arg(long, env = "CILIA_KVSTORE", value_enum, default_value = "embedded")]
    kvstore: KvstoreKind,
    /// etcd endpoints, comma separated (`http://host:port`).
    #[arg(long, env = "CILIA_KVSTORE_ENDPOINTS", value_delimiter = ',')]
    kvstore_endpoints: Vec<String>,
    /// How packets travel between nodes: `vxlan` (the VNI carries the
    /// sender's identity) or `disabled` (native routing).
    #[arg(long, env = "CILIA_TUNNEL", value_enum, default_value = "vxlan")]
    tunnel: TunnelMode,
    /// UDP port of the VXLAN overlay (the same on every node).
    #[arg(long, env = "CILIA_TUNNEL_PORT", default_value_t = cilia_agent::DEFAULT_TUNNEL_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    tunnel_port: u16,
    /// Native routing: `auto` installs routes to the other nodes' pod
    /// ranges via their node addresses; `external` leaves it to the
    /// operator's routing.
    #[arg(long, env = "CILIA_NATIVE_ROUTES", value_enum, default_value = "auto")]
    native_routes: NativeRoutes,
    /// Seconds the node's entries outlive its agent in the kvstore.
    #[arg(long, env = "CILIA_NODE_LEASE_TTL", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(2..=3600))]
    node_lease_ttl: u64,
    /// Address of the read-only peer API other nodes' relays query
    /// (`cilia observe --cluster`); default `<node-ip>:4244` with
    /// `--kvstore etcd`; `off` to disable.
    #[arg(long, env = "CILIA_PEER_API_ADDR")]
    peer_api_addr: Option<String>,
    /// TCP port of the health endpoint's responder.
    #[arg(long, env = "CILIA_HEALTH_PORT", default_value_t = cilia_agent::DEFAULT_HEALTH_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    health_port: u16,
    /// Network namespace (under /run/netns) of the node's health endpoint;
    /// default `cilia-health-<node-name>`.
    #[arg(long, env = "CILIA_HEALTH_NETNS")]
    health_netns: Option<String>,
    /// Socket-level load balancing: services translated at connect() and
    /// sendmsg() for the node's and the endpoints' sockets. Default: on
    /// when the kernel supports it (a failure is shown in `cilia status`);
    /// `on` makes that failure a start-up error.
    #[arg(long, env = "CILIA_SOCKET_LB", value_enum)]
    socket_lb: Option<cilia_agent::socklb::SocketLbFlag>,
    /// The cgroup v2 directory whose processes' sockets are balanced
    /// (default: the cgroup v2 root, /sys/fs/cgroup, or
    /// /sys/fs/cgroup/unified on a hybrid hierarchy).
    #[arg(long, env = "CILIA_SOCKET_LB_CGROUP")]
    socket_lb_cgroup: Option<std::path::PathBuf>,
    /// Fast attach: a new endpoint is attached at once to the generic
    /// endpoint program (verified once per agent, enforcing the same policy)
    /// and its specialized programs are verified in the background and
    /// swapped in without a packet lost; `off`: every create waits for its
    /// specialized programs' verification.
    #[arg(long, env = "CILIA_FAST_ATTACH", value_enum, default_value = "on")]
    fast_attach: OnOff,
    /// Device the XDP prefilter drops listed source CIDRs on (native XDP,
    /// generic when the driver has none); repeat or comma separate for
    /// several. Default: none (CIDRs are kept, not enforced).
    #[arg(long, env = "CILIA_PREFILTER_DEVICE", value_delimiter = ',')]
    prefilter_device: Vec<String>,
    /// NodePort in XDP on the node's underlay device: `native` (generic
    /// XDP, reported in `cilia status`, where the driver has no native
    /// XDP) or `disabled`. Needs multi-node mode. Example:
    /// `--lb-acceleration native`.
    #[arg(
        long,
        env = "CILIA_LB_ACCELERATION",
        value_enum,
        default_value = "disabled"
    )]
    lb_acceleration: cilia_agent::lbaccel::LbAccelerationFlag,
}

fn main() {
    // Before any thread exists: every thread allocates under these settings.
    cilia_agent::exec_without_thread_caches();
    cilia_agent::tune_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(cilia_agent::MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cilia-agent: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(agent_main());
}

async fn agent_main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let metrics_addr = match args.metrics_addr.as_str() {
        "off" | "" => None,
        addr => match addr.parse() {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("cilia-agent: --metrics-addr {addr:?}: {e}");
                std::process::exit(2);
            }
        },
    };
    if args.kvstore == KvstoreKind::Etcd && args.kvstore_endpoints.is_empty() {
        eprintln!("cilia-agent: --kvstore etcd needs --kvstore-endpoints URL[,URL]");
        std::process::exit(2);
    }
    let node_ip = match args.node_ip {
        Some(ip) => Some(ip),
        None if args.kvstore == KvstoreKind::Etcd => {
            match cilia_agent::nodenet::default_node_ip() {
                Some(ip) => Some(ip),
                None => {
                    eprintln!(
                    "cilia-agent: --kvstore etcd: this network namespace has no default route to take the node's address from; pass --node-ip"
                );
                    std::process::exit(2);
                }
            }
        }
        None => None,
    };
    let peer_api_addr = match args.peer_api_addr.as_deref() {
        Some("off") | Some("") => None,
        Some(addr) => match addr.parse() {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("cilia-agent: --peer-api-addr {addr:?}: {e}");
                std::process::exit(2);
            }
        },
        None if args.kvstore == KvstoreKind::Etcd => {
            node_ip.map(|ip| std::net::SocketAddr::new(ip, cilia_agent::DEFAULT_PEER_API_PORT))
        }
        None => None,
    };
    let node_name = cilia_k8s::config::node_name(
        args.node_name.as_deref(),
        std::env::var("K8S_NODE_NAME").ok().as_deref(),
        &cilia_agent::default_node_name(),
    );
    let k8s = match cilia_agent::k8s::config_from_flags(
        args.k8s_kubeconfig,
        args.k8s_in_cluster,
        &node_name,
        args.k8s_sync_timeout,
    ) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("cilia-agent: {e:#}");
            std::process::exit(2);
        }
    };
    let cluster = ClusterOptions {
        health_netns: args
            .health_netns
            .unwrap_or_else(|| format!("cilia-health-{node_name}")),
        node_name,
        node_ip,
        kvstore: args.kvstore,
        kvstore_endpoints: args.kvstore_endpoints,
        tunnel: args.tunnel,
        tunnel_port: args.tunnel_port,
        native_routes: args.native_routes,
        node_lease_ttl: std::time::Duration::from_secs(args.node_lease_ttl),
        peer_api_addr,
        health_port: args.health_port,
    };
    let config = AgentConfig {
        state_dir: args.state_dir,
        bpf_root: args.bpf_root,
        socket: args.socket,
        ipv6_range: args.ipv6_range,
        ipv4_range: args.ipv4_range,
        flow_buffer_size: args.flow_buffer_size,
        metrics_addr,
        ct_budget: args.ct_budget,
        ct_max: args.ct_max,
        proxy_port: args.proxy_port,
        proxy_bin: args.proxy_bin,
        lb_maglev_table_size: args.lb_maglev_table_size,
        lb_mode: args.lb_mode,
        cluster,
        socket_lb: cilia_agent::socklb::SocketLbOptions {
            mode: args.socket_lb,
            cgroup: args.socket_lb_cgroup,
        },
        prefilter_devices: args.prefilter_device,
        fast_attach: args.fast_attach == OnOff::On,
        lb_acceleration: args.lb_acceleration,
        k8s,
    };
    if let Err(e) = cilia_agent::run(config).await {
        eprintln!("cilia-agent: {e:#}");
        std::process::exit(1);
    }
}

/// `--lb-maglev-table-size`: a prime in range.
fn maglev_table_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    cilia_lb::check_table_size(n).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maglev_table_size_must_be_a_prime_in_range() {
        assert_eq!(maglev_table_size("16381"), Ok(16381));
        assert_eq!(maglev_table_size("1021"), Ok(1021));
        for (bad, reason) in [
            ("16384", "not prime"),
            ("1019", "outside 1021..=131071"),
            ("262139", "outside"),
            ("x", "not a number"),
        ] {
            let e = maglev_table_size(bad).expect_err(bad);
            assert!(e.contains(reason), "{bad}: {e}");
        }
    }

    #[test]
    fn kubernetes_is_off_unless_asked_for() {
        let args = Args::try_parse_from(["cilia-agent"]).expect("defaults parse");
        assert_eq!(
            (args.k8s_kubeconfig.as_ref(), args.k8s_in_cluster),
            (None, false)
        );
        assert_eq!(args.k8s_sync_timeout, std::time::Duration::from_secs(60));
        let k8s = cilia_agent::k8s::config_from_flags(None, false, "n1", args.k8s_sync_timeout);
        assert!(k8s.unwrap().is_none());
    }

    #[test]
    fn kubernetes_flags_build_the_settings() {
        let args = Args::try_parse_from([
            "cilia-agent",
            "--k8s-kubeconfig",
            "/etc/kube.conf",
            "--k8s-sync-timeout",
            "5s",
        ])
        .unwrap();
        let k8s = cilia_agent::k8s::config_from_flags(
            args.k8s_kubeconfig,
            args.k8s_in_cluster,
            "node-1",
            args.k8s_sync_timeout,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            k8s.source,
            cilia_k8s::config::Source::Kubeconfig("/etc/kube.conf".into())
        );
        assert_eq!(k8s.sync_timeout, std::time::Duration::from_secs(5));
        assert_eq!(k8s.node_name, "node-1");
        assert!(Args::try_parse_from([
            "cilia-agent",
            "--k8s-kubeconfig",
            "/k",
            "--k8s-in-cluster"
        ])
        .is_err());
        assert!(Args::try_parse_from(["cilia-agent", "--k8s-sync-timeout", "soon"]).is_err());
    }

    #[test]
    fn the_flag_defaults_to_16381() {
        let args = Args::try_parse_from(["cilia-agent"]).expect("defaults parse");
        assert_eq!(args.lb_maglev_table_size, 16381);
        assert!(Args::try_parse_from(["cilia-agent", "--lb-maglev-table-size", "4096"]).is_err());
    }
}
