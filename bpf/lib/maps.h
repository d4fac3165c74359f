/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Maps shared by every endpoint program. Pinned by name under the agent's
 * bpffs root, so each endpoint's program (a separately loaded, specialized
 * copy of the same object) sees the same maps, and they outlive the agent.
 */
#ifndef CILIA_MAPS_H
#define CILIA_MAPS_H

#include "common.h"

/* A map shared by every endpoint's program: pinned by name, so each
 * separately loaded copy finds (and the agent validates) the same one. */
#define CILIA_SHARED_MAP(name, map_type, max, key_type, value_type)                                \
	struct {                                                                                   \
		__uint(type, map_type);                                                            \
		__uint(max_entries, max);                                                          \
		__type(key, key_type);                                                             \
		__type(value, value_type);                                                         \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                                               \
	} name SEC(".maps")

CILIA_SHARED_MAP(cilia_endpoints, BPF_MAP_TYPE_HASH, CILIA_ENDPOINTS_MAX, struct endpoint_key,
		 struct endpoint_info);

/* Address filter of the local endpoints' addresses (CILIA_ADDR_FILTER_WORDS). */
CILIA_SHARED_MAP(cilia_endpoint_filter, BPF_MAP_TYPE_ARRAY, CILIA_ADDR_FILTER_WORDS, __u32, __u64);

CILIA_SHARED_MAP(cilia_metrics, BPF_MAP_TYPE_PERCPU_ARRAY, CILIA_METRICS_MAX, __u32,
		 struct metrics_value);

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, CILIA_IPCACHE_MAX);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ipcache SEC(".maps");

/*
 * Template of every endpoint's policy map (the inner map). Sizes rather than
 * types: clang emits the key/value structs of an inner map only as forward
 * declarations in BTF, which the loader cannot size.
 */
struct policy_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, CILIA_POLICY_MAX);
	__uint(key_size, sizeof(struct policy_key));
	__uint(value_size, sizeof(struct policy_value));
	__uint(map_flags, BPF_F_NO_PREALLOC);
};

/*
 * Endpoint id -> that endpoint's policy map. The agent fills a fresh inner
 * map and swaps it in with one update, so a packet sees either the old or
 * the new policy of an endpoint, never a mix. An array (ids are 16 bits):
 * the JIT inlines its lookup, where a hash of maps cost a hash and a bucket
 * walk on every new flow and policy drop; an empty slot reads as no map.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, CILIA_POLICY_ENDPOINTS_MAX);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct policy_inner);
} cilia_policy SEC(".maps");

/*
 * Conntrack. A plain hash, not an LRU: an LRU would let one endpoint that
 * churns flows evict everybody else's (revoked entries included). Instead
 * each endpoint has a budget (cilia_ct_count), a full table refuses new
 * flows with a named drop, and the agent's GC removes expired entries.
 */
CILIA_SHARED_MAP(cilia_ct, BPF_MAP_TYPE_HASH, CILIA_CT_MAX, struct ct_key, struct ct_value);

/* Endpoint id -> conntrack entries it owns. Incremented by the datapath on
 * create, recounted by the agent's GC (which is what frees budget). */
CILIA_SHARED_MAP(cilia_ct_count, BPF_MAP_TYPE_ARRAY, CILIA_POLICY_ENDPOINTS_MAX, __u32, __u32);

/* Endpoint id -> its delivery (the value its addresses have in
 * cilia_endpoints): what a conntrack entry's cached delivery names
 * (bpf/lib/fast.h). Written with the addresses; trusted only at the
 * policy revision the cache was written at. */
CILIA_SHARED_MAP(cilia_endpoint_slots, BPF_MAP_TYPE_ARRAY, CILIA_POLICY_ENDPOINTS_MAX, __u32,
		 struct endpoint_info);

/* First fragments' ports, for the later fragments of the same datagram. */
CILIA_SHARED_MAP(cilia_frags, BPF_MAP_TYPE_LRU_HASH, CILIA_FRAG_MAX, struct frag_key,
		 struct frag_value);

/* Drop, trace and policy-verdict events for the agent's monitor. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CILIA_EVENTS_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_events SEC(".maps");

CILIA_SHARED_MAP(cilia_config, BPF_MAP_TYPE_ARRAY, 1, __u32, struct global_config);

CILIA_SHARED_MAP(cilia_clock, BPF_MAP_TYPE_ARRAY, 1, __u32, struct clock_config);

/*
 * The clock of every deadline the datapath keeps (conntrack entries,
 * backend pins, NAT and fragment entries): CLOCK_MONOTONIC_COARSE, which
 * the agent's GC reads too (`datapath_clock_ns`), to within a tick.
 *
 * Why jiffies: bpf_ktime_get_coarse_ns() was the dearest single step of an
 * established packet (a helper call, the timekeeper's seqlock, a timespec
 * normalization: ~27 ns of ~105 ns of program time on the to-stack fast
 * path, bench/bpf-lines.sh), while the verifier inlines bpf_jiffies64()
 * into one load. Both advance at the same tick, so with the tick length and
 * the offset the agent calibrated (struct clock_config) the product is the
 * coarse clock. Deadlines are seconds long; a tick of error changes
 * nothing. Until calibrated (tick_ns 0) the coarse clock itself.
 */
__inline_fn __u64 cil_now(void)
{
	__u32 zero = 0;
	struct clock_config *c = bpf_map_lookup_elem(&cilia_clock, &zero);

	if (c && c->tick_ns)
		return bpf_jiffies64() * c->tick_ns + c->base_ns;
	return bpf_ktime_get_coarse_ns();
}

/* Underlay addresses of the cluster's nodes: the only senders whose tunnel
 * packets the overlay accepts. */
CILIA_SHARED_MAP(cilia_nodes, BPF_MAP_TYPE_HASH, CILIA_NODES_MAX, struct endpoint_key,
		 struct node_value);

/* How packets for remote prefixes leave the node (tunnel mode, devices). */
CILIA_SHARED_MAP(cilia_node_config, BPF_MAP_TYPE_ARRAY, 1, __u32, struct node_config);

/* ---- load balancing (see "Load balancing" in docs/ARCHITECTURE.md) ---- */

/* Frontend -> master entry (slot 0) and the backend slots of its generation. */
CILIA_SHARED_MAP(cilia_lb_services, BPF_MAP_TYPE_HASH, CILIA_LB_SERVICES_MAX, struct lb_service_key,
		 struct lb_service_value);

/* Address filter of the frontends' addresses (CILIA_ADDR_FILTER_WORDS). */
CILIA_SHARED_MAP(cilia_lb_filter, BPF_MAP_TYPE_ARRAY, CILIA_ADDR_FILTER_WORDS, __u32, __u64);

/* Backend id -> address and state. */
CILIA_SHARED_MAP(cilia_lb_backends, BPF_MAP_TYPE_HASH, CILIA_LB_BACKENDS_MAX, __u32,
		 struct lb_backend);

/* rev-NAT id -> the frontend replies carry as their source. */
CILIA_SHARED_MAP(cilia_lb_revnat, BPF_MAP_TYPE_HASH, CILIA_LB_REVNAT_MAX, __u16, struct lb_revnat);

/* Client address of a service -> the backend it sticks to (LRU: the oldest
 * clients are forgotten, never an error). */
CILIA_SHARED_MAP(cilia_lb_affinity, BPF_MAP_TYPE_LRU_HASH, CILIA_LB_AFFINITY_MAX,
		 struct lb_affinity_key, struct lb_affinity_value);

/* rev-NAT id -> the service's counters (per CPU). */
CILIA_SHARED_MAP(cilia_lb_stats, BPF_MAP_TYPE_PERCPU_ARRAY, CILIA_LB_REVNAT_MAX, __u32,
		 struct lb_stats);

/*
 * Template of a service's Maglev table: entry i -> backend id. Each table
 * has the agent's configured size (BPF_F_INNER_MAP lets inner arrays differ
 * in max_entries from this template); the agent fills a fresh table and
 * swaps it in with one update of cilia_lb_maglev.
 */
struct lb_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CILIA_LB_MAGLEV_SIZE_DEFAULT);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
	__uint(map_flags, BPF_F_INNER_MAP);
};

/* rev-NAT id (as __u32) -> that service's Maglev table. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, CILIA_LB_REVNAT_MAX);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct lb_maglev_inner);
} cilia_lb_maglev SEC(".maps");

/* Socket LB: netns cookie -> the endpoint id living there (0: the node)
 * for the network namespaces this agent serves; other sockets are left
 * alone. The id names the client in service events. */
CILIA_SHARED_MAP(cilia_lb_netns, BPF_MAP_TYPE_HASH, CILIA_LB_NETNS_MAX, __u64, __u16);

/* Socket LB: per translated socket, backend -> frontend (what recvmsg and
 * getpeername report) and, for UDP, frontend -> backend (LRU: a forgotten
 * socket shows the backend's address, never an error). */
CILIA_SHARED_MAP(cilia_lb_sock, BPF_MAP_TYPE_LRU_HASH, CILIA_LB_SOCK_MAX, struct lb_sock_key,
		 struct lb_sock_value);
/*
 * The socket LB's (sock.c) own state of each socket it translated, in the
 * socket's storage (struct lb_sock_storage): the reverse hooks run for
 * every recvmsg() and getpeername() of every socket below the cgroup (the
 * cgroup root by default: every process of the machine); a socket without
 * storage (nearly all of them) costs one pointer walk, and a connected one
 * finds its translation there, with no socket cookie and no hash lookup.
 * It lives and dies with its socket, so it is never evicted while the
 * socket is open. Pinned by name, so a restart or a reload keeps it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct lb_sock_storage);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb_sock_storage SEC(".maps");

/* NodePort translations (SNAT of external clients to remote backends, the
 * frontend of a local backend's replies); see struct lb_nat_key. */
CILIA_SHARED_MAP(cilia_lb_nat, BPF_MAP_TYPE_LRU_HASH, CILIA_LB_NAT_MAX, struct lb_nat_key,
		 struct lb_nat_value);

#endif
