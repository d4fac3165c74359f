//! Knowledge of the embedded BPF objects: their bytes and the names of the
//! programs, maps and globals inside. Loading lives in [`crate::endpoint`].

/// The endpoint object (`bpf/lxc.c`).
pub static LXC_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lxc.o"));
/// The generic endpoint object (`bpf/lxc.c` built with `CILIA_GENERIC`):
/// one copy per agent, its configuration per device in a map.
pub static LXC_GENERIC_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lxc_generic.o"));
/// The node object (`bpf/overlay.c`): traffic between nodes.
pub static OVERLAY_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay.o"));
/// The socket load balancer (`bpf/sock.c`): cgroup sock_addr programs.
pub static SOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.o"));
/// The XDP prefilter (`bpf/xdp.c`): listed source CIDRs dropped on node devices.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp.o"));
/// Feature probes and the benchmark baseline (`bpf/probe.c`).
pub static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe.o"));
/// Benchmark floors (`bpf/floor.c`): only the testrun bench loads them.
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor.o"));

/// Hands the embedded objects' pages back to the kernel
/// (`MADV_PAGEOUT`): they are read only while a program is loaded (the
/// generic one at start, a specialized one per endpoint), and would
/// otherwise stay in the agent's resident set for its life, about 0.8 MiB
/// of an idle agent's 20. Only the pages wholly inside an object are
/// touched; `MADV_PAGEOUT` never loses contents (clean file pages are read
/// again on the next load), so a load running meanwhile is unaffected.
pub fn release_object_pages() {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => return,
    };
    for object in [
        LXC_OBJECT,
        LXC_GENERIC_OBJECT,
        OVERLAY_OBJECT,
        SOCK_OBJECT,
        XDP_OBJECT,
        PROBE_OBJECT,
    ] {
        let start = (object.as_ptr() as usize).next_multiple_of(page);
        let end = (object.as_ptr() as usize + object.len()) / page * page;
        if end > start {
            // SAFETY: an advice about pages of a static that lives as long
            // as the process; MADV_PAGEOUT keeps their contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT);
            }
        }
    }
}

/// tc program on the ingress of an endpoint's host-side veth.
pub const PROG_FROM_CONTAINER: &str = "cil_from_container";
/// tc program on the egress of an endpoint's host-side veth.
pub const PROG_TO_CONTAINER: &str = "cil_to_container";
/// tc program on the ingress of the node's VXLAN device.
pub const PROG_FROM_OVERLAY: &str = "cil_from_overlay";
/// tc program on the egress of the node's VXLAN device.
pub const PROG_TO_OVERLAY: &str = "cil_to_overlay";
/// tc program on the ingress of the node's underlay device (native routing).
pub const PROG_FROM_NETDEV: &str = "cil_from_netdev";
/// Socket LB programs (cgroup sock_addr hooks), by hook.
pub const PROG_SOCK_CONNECT4: &str = "cil_sock_connect4";
pub const PROG_SOCK_CONNECT6: &str = "cil_sock_connect6";
pub const PROG_SOCK_SENDMSG4: &str = "cil_sock_sendmsg4";
pub const PROG_SOCK_SENDMSG6: &str = "cil_sock_sendmsg6";
pub const PROG_SOCK_RECVMSG4: &str = "cil_sock_recvmsg4";
pub const PROG_SOCK_RECVMSG6: &str = "cil_sock_recvmsg6";
pub const PROG_SOCK_GETPEERNAME4: &str = "cil_sock_getpeername4";
pub const PROG_SOCK_GETPEERNAME6: &str = "cil_sock_getpeername6";
/// XDP program of the prefilter on a node device.
pub const PROG_XDP_PREFILTER: &str = "cil_xdp_prefilter";
/// The empty tc program (benchmark baseline).
pub const PROG_EMPTY: &str = "probe_empty";
/// Clock sample for the calibration (`clock.rs`): coarse clock, jiffies.
pub const PROG_PROBE_CLOCK: &str = "probe_clock";
/// Verifier probe for `bpf_redirect_peer`.
pub const PROG_PROBE_REDIRECT_PEER: &str = "probe_redirect_peer";
/// XDP probe.
pub const PROG_PROBE_XDP: &str = "probe_xdp";
/// Benchmark floors (`bpf/floor.c`): parse and deliver without a lookup,
/// with one lookup of the 40-byte conntrack key, of a 16-byte IPv4 key;
/// one lookup of the 40-byte key and the packet passed to the stack;
/// a new flow's miss, insert and delivery without and with one ipcache and
/// one policy lookup (`TestProgram::new_flow_floor`).
pub const PROG_FLOOR_PARSE: &str = "floor_parse";
pub const PROG_FLOOR_CT40: &str = "floor_ct40";
pub const PROG_FLOOR_CT16: &str = "floor_ct16";
pub const PROG_FLOOR_STACK40: &str = "floor_stack40";
pub const PROG_FLOOR_NEW_CT: &str = "floor_new_ct";
pub const PROG_FLOOR_NEW_POLICY: &str = "floor_new_policy";

/// Global in `.rodata` of `xdp.c`: `{CILIA_XDP_MAGIC, CILIA_XDP_* flags}`.
pub const GLOBAL_XDP_FEATURES: &str = "CILIA_XDP_FEATURES";
/// Global in `.rodata` holding [`cilia_abi::EndpointConfig`].
pub const GLOBAL_CONFIG: &str = "CILIA_CONFIG";

/// The generic object's own (unpinned) hash: host-side veth ifindex ->
/// that endpoint's configuration.
pub const MAP_GENERIC_CONFIG: &str = "cilia_generic_config";

/// Shared map: local endpoint address -> delivery info.
pub const MAP_ENDPOINTS: &str = "cilia_endpoints";
/// Shared array: the address filter of the local endpoints' addresses,
/// in front of `cilia_endpoints` (`CILIA_ADDR_FILTER_WORDS` in abi.h).
pub const MAP_ENDPOINT_FILTER: &str = "cilia_endpoint_filter";
/// Shared per-CPU map: packet counters by outcome.
pub const MAP_METRICS: &str = "cilia_metrics";

/// Shared LPM trie: prefix -> security identity.
pub const MAP_IPCACHE: &str = "cilia_ipcache";
/// Shared hash of maps: endpoint id -> that endpoint's policy LPM trie.
pub const MAP_POLICY: &str = "cilia_policy";
/// Shared hash: connection tracking (not an LRU: see bpf/lib/maps.h).
pub const MAP_CT: &str = "cilia_ct";
/// Shared array: endpoint id -> conntrack entries it owns (its budget use).
pub const MAP_CT_COUNT: &str = "cilia_ct_count";
/// Shared array: endpoint id -> its delivery, what a conntrack entry's
/// cached delivery names (`bpf/lib/fast.h`).
pub const MAP_ENDPOINT_SLOTS: &str = "cilia_endpoint_slots";
/// Shared LRU hash: ports of fragmented datagrams, for later fragments.
pub const MAP_FRAGS: &str = "cilia_frags";
/// Shared one-slot array: global runtime settings (policy revision).
pub const MAP_CONFIG: &str = "cilia_config";
/// The datapath clock's calibration (`struct clock_config`, one slot).
pub const MAP_CLOCK: &str = "cilia_clock";
/// Ring buffer of datapath events for the monitor.
pub const MAP_EVENTS: &str = "cilia_events";
/// Shared hash: underlay addresses of the cluster's nodes.
pub const MAP_NODES: &str = "cilia_nodes";
/// Shared one-slot array: the node's tunnel mode and devices.
pub const MAP_NODE_CONFIG: &str = "cilia_node_config";
/// Shared hash: service frontend -> master entry and backend slots.
pub const MAP_LB_SERVICES: &str = "cilia_lb_services";
/// Shared array: the address filter of the frontends' addresses, in front
/// of `cilia_lb_services` (`CILIA_ADDR_FILTER_WORDS` in abi.h).
pub const MAP_LB_FILTER: &str = "cilia_lb_filter";
/// Shared hash: backend id -> address and state.
pub const MAP_LB_BACKENDS: &str = "cilia_lb_backends";
/// Shared hash: rev-NAT id -> the frontend replies carry as source.
pub const MAP_LB_REVNAT: &str = "cilia_lb_revnat";
/// Shared LRU hash: a service's client address -> its backend (affinity).
pub const MAP_LB_AFFINITY: &str = "cilia_lb_affinity";
/// Shared per-CPU array: rev-NAT id -> the service's counters.
pub const MAP_LB_STATS: &str = "cilia_lb_stats";
/// Shared hash of maps: rev-NAT id -> that service's Maglev table.
pub const MAP_LB_MAGLEV: &str = "cilia_lb_maglev";
/// Shared LRU hash: NodePort translations (SNAT, a local backend's frontend).
pub const MAP_LB_NAT: &str = "cilia_lb_nat";

/// Shared hash: netns cookie -> 1 for the namespaces the socket LB serves.
pub const MAP_LB_NETNS: &str = "cilia_lb_netns";
/// Shared LRU hash: the socket LB's translations per socket.
pub const MAP_LB_SOCK: &str = "cilia_lb_sock";
/// Shared socket storage: the socket LB's state of each socket it
/// translated (its connected translation), so that the reverse hooks skip
/// every other socket at once.
pub const MAP_LB_SOCK_STORAGE: &str = "cilia_lb_sock_storage";

/// Prefilter LPM trie: IPv4 source CIDR -> counter slot.
pub const MAP_PREFILTER_V4: &str = "cilia_prefilter_v4";
/// Prefilter LPM trie: IPv6 source CIDR -> counter slot.
pub const MAP_PREFILTER_V6: &str = "cilia_prefilter_v6";
/// Prefilter per-CPU array: dropped packets and bytes per counter slot.
pub const MAP_PREFILTER_COUNTERS: &str = "cilia_prefilter_counters";

/// The shared maps with the layout the embedded object expects, used to
/// validate pins left by an earlier agent before reusing them.
pub struct MapSpec {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
}

pub const SHARED_MAPS: &[MapSpec] = &[
    MapSpec {
        name: MAP_ENDPOINTS,
        key_size: core::mem::size_of::<cilia_abi::EndpointKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::EndpointInfo>() as u32,
    },
    MapSpec {
        name: MAP_ENDPOINT_FILTER,
        key_size: 4,
        value_size: 8,
    },
    MapSpec {
        name: MAP_IPCACHE,
        key_size: core::mem::size_of::<cilia_abi::IpcacheKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::IpcacheValue>() as u32,
    },
    MapSpec {
        name: MAP_POLICY,
        key_size: 4,
        value_size: 4,
    },
    MapSpec {
        name: MAP_CT,
        key_size: core::mem::size_of::<cilia_abi::CtKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::CtValue>() as u32,
    },
    MapSpec {
        name: MAP_CT_COUNT,
        key_size: 4,
        value_size: 4,
    },
    MapSpec {
        name: MAP_ENDPOINT_SLOTS,
        key_size: 4,
        value_size: core::mem::size_of::<cilia_abi::EndpointInfo>() as u32,
    },
    MapSpec {
        name: MAP_FRAGS,
        key_size: core::mem::size_of::<cilia_abi::FragKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::FragValue>() as u32,
    },
    MapSpec {
        name: MAP_CONFIG,
        key_size: 4,
        value_size: core::mem::size_of::<cilia_abi::GlobalConfig>() as u32,
    },
    MapSpec {
        name: MAP_CLOCK,
        key_size: 4,
        value_size: core::mem::size_of::<cilia_abi::ClockConfig>() as u32,
    },
    MapSpec {
        name: MAP_EVENTS,
        key_size: 0,
        value_size: 0,
    },
    MapSpec {
        name: MAP_NODES,
        key_size: core::mem::size_of::<cilia_abi::EndpointKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::NodeValue>() as u32,
    },
    MapSpec {
        name: MAP_NODE_CONFIG,
        key_size: 4,
        value_size: core::mem::size_of::<cilia_abi::NodeConfigValue>() as u32,
    },
    MapSpec {
        name: MAP_LB_SERVICES,
        key_size: core::mem::size_of::<cilia_abi::LbServiceKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::LbServiceValue>() as u32,
    },
    MapSpec {
        name: MAP_LB_FILTER,
        key_size: 4,
        value_size: 8,
    },
    MapSpec {
        name: MAP_LB_BACKENDS,
        key_size: 4,
        value_size: core::mem::size_of::<cilia_abi::LbBackendValue>() as u32,
    },
    MapSpec {
        name: MAP_LB_REVNAT,
        key_size: 2,
        value_size: core::mem::size_of::<cilia_abi::LbRevNatValue>() as u32,
    },
    MapSpec {
        name: MAP_LB_AFFINITY,
        key_size: core::mem::size_of::<cilia_abi::LbAffinityKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::LbAffinityValue>() as u32,
    },
    MapSpec {
        name: MAP_LB_STATS,
        key_size: 4,
        value_size: core::mem::size_of::<cilia_abi::LbStats>() as u32,
    },
    MapSpec {
        name: MAP_LB_MAGLEV,
        key_size: 4,
        value_size: 4,
    },
    MapSpec {
        name: MAP_LB_NETNS,
        key_size: 8,
        value_size: 2,
    },
    MapSpec {
        name: MAP_LB_SOCK,
        key_size: core::mem::size_of::<cilia_abi::LbSockKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::LbSockValue>() as u32,
    },
    MapSpec {
        name: MAP_LB_SOCK_STORAGE,
        key_size: 4,
        value_size: core::mem::size_of::<cilia_abi::LbSockStorage>() as u32,
    },
    MapSpec {
        name: MAP_LB_NAT,
        key_size: core::mem::size_of::<cilia_abi::LbNatKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::LbNatValue>() as u32,
    },
    MapSpec {
        name: MAP_METRICS,
        key_size: core::mem::size_of::<cilia_abi::MetricsKey>() as u32,
        value_size: core::mem::size_of::<cilia_abi::MetricsValue>() as u32,
    },
];
