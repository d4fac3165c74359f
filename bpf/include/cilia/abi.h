/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The one definition of every structure shared between the BPF datapath and
 * userspace. crates/cilia-abi mirrors it; its tests compile this header with
 * the host C compiler and fail when a size or a field offset disagrees.
 *
 * Rules: fixed-width types only, explicit padding, no bitfields, addresses
 * and ports in network byte order.
 */
#ifndef CILIA_ABI_H
#define CILIA_ABI_H

#include <linux/types.h>

/* Capacity of the endpoints map (local endpoints, one entry per address). */
#define CILIA_ENDPOINTS_MAX 65536

/* Address family tags used in map keys. */
#define CILIA_FAMILY_IPV4 4
#define CILIA_FAMILY_IPV6 6

/*
 * Per-endpoint specialization, written into the program's .rodata at load
 * time (global CILIA_CONFIG). The kernel freezes .rodata, so the verifier
 * knows these values and prunes branches of features an endpoint lacks.
 */
struct endpoint_config {
	__u8 ipv6[16];	   /* the endpoint's IPv6 address */
	__u8 ipv4[4];	   /* the endpoint's IPv4 address (if enable_ipv4) */
	__u8 mac[6];	   /* MAC of the container-side interface */
	__u8 node_mac[6];  /* MAC of the host-side veth: the gateway's MAC */
	__u32 ifindex;	   /* ifindex of the host-side veth */
	__u32 identity;	   /* security identity (0 until policy exists) */
	__u16 endpoint_id; /* agent-assigned endpoint id */
	__u8 enable_ipv4;  /* 1 when the endpoint has an IPv4 address */
	__u8 monitor;	   /* 1: event code kept; 0: pruned (the no-monitor baseline) */
};

/* Key of the endpoints map: one of a local endpoint's addresses. */
struct endpoint_key {
	__u8 addr[16]; /* IPv4 uses the first 4 bytes, the rest stay zero */
	__u8 family;   /* CILIA_FAMILY_IPV4 or CILIA_FAMILY_IPV6 */
	__u8 pad[3];
};

/* Value of the endpoints map: where and how to deliver to that endpoint. */
struct endpoint_info {
	__u32 ifindex;	   /* host-side veth; redirect_peer target */
	__u32 identity;	   /* security identity */
	__u16 endpoint_id; /* agent-assigned endpoint id */
	__u16 flags;	   /* reserved, zero */
	__u8 mac[6];	   /* container-side MAC: new destination MAC */
	__u8 node_mac[6];  /* host-side MAC: new source MAC */
};

/* Packet outcomes counted in the per-CPU metrics map. */
#define CILIA_METRIC_FORWARD 1
#define CILIA_METRIC_DROP    2

/* Forward reasons (kind CILIA_METRIC_FORWARD). */
#define CILIA_FWD_ENDPOINT  1 /* redirected to a local endpoint */
#define CILIA_FWD_STACK	    2 /* passed to the host stack */
#define CILIA_FWD_ND_REPLY  3 /* IPv6 neighbour advertisement answered */
#define CILIA_FWD_ARP_REPLY 4 /* ARP reply answered */
#define CILIA_FWD_PROXY	    5 /* to the L7 proxy through the node's stack */
#define CILIA_FWD_TUNNEL    6 /* to another node through the overlay (VXLAN) */
#define CILIA_FWD_NATIVE    7 /* to another node over the underlay (native routing) */
#define CILIA_FWD_XDP	    8 /* NodePort packet sent on by the device's XDP program */
#define CILIA_FWD_ABSORBED  9 /* link chatter answered with silence (MLD report, DAD probe) */

/* Drop reasons (kind CILIA_METRIC_DROP). Never reuse a number. */
#define CILIA_DROP_INVALID	     130 /* truncated or malformed packet */
#define CILIA_DROP_UNSUPPORTED_L3    131 /* ethertype not handled */
#define CILIA_DROP_SPOOFED_SOURCE    132 /* source address is not the endpoint's */
#define CILIA_DROP_TTL_EXCEEDED	     133 /* TTL / hop limit would reach zero */
#define CILIA_DROP_UNSUPPORTED_ND    134 /* ND/ICMPv6 control message not served */
#define CILIA_DROP_MULTICAST	     135 /* multicast is not routed */
#define CILIA_DROP_REDIRECT_FAILED   136 /* the kernel refused the redirect */
#define CILIA_DROP_WRITE_FAILED	     137 /* a packet rewrite helper failed */
#define CILIA_DROP_POLICY	     138 /* policy denied */
#define CILIA_DROP_CT_FULL	     139 /* conntrack table full: new flows fail closed */
#define CILIA_DROP_EXT_HDR	     140 /* IPv6 extension header chain unknown, too long or routed */
#define CILIA_DROP_FRAG_NO_FLOW	     141 /* later fragment of an unknown or denied datagram */
#define CILIA_DROP_ND_INVALID	     142 /* neighbour discovery failing hop limit/address checks */
#define CILIA_DROP_CT_BUDGET	     143 /* the endpoint has used its conntrack budget */
#define CILIA_DROP_PROXY_UNAVAILABLE 144 /* L7 redirect: the proxy has no socket for the flow */
#define CILIA_DROP_PROXY_PATH	     145 /* L7 redirect not possible on this path */
#define CILIA_DROP_UNKNOWN_NODE	     146 /* tunnel packet from an address that is no known node */
#define CILIA_DROP_NO_ROUTE	     147 /* node traffic for no local endpoint, or no tunnel to its node */
#define CILIA_DROP_PREFILTER	     148 /* source in an XDP prefilter CIDR */
#define CILIA_DROP_NO_BACKEND	     149 /* service frontend without an active backend */
#define CILIA_DROP_LB_FRAGMENT	     150 /* fragmented datagram to a service frontend */
#define CILIA_DROP_TUNNEL_PORT	     151 /* endpoint UDP to a node's overlay port (VNI forgery) */
#define CILIA_DROP_DSR_FORGED	     152 /* DSR option no cluster node's load balancer wrote */
#define CILIA_DROP_NO_POLICY	     153 /* endpoint without a policy map: fail closed */
#define CILIA_DROP_UNCONFIGURED	     156 /* generic endpoint program on a device with no config */

/* Direction of a counted packet. */
#define CILIA_DIR_EGRESS  1 /* leaving an endpoint (from-container) */
#define CILIA_DIR_INGRESS 2 /* entering an endpoint */

/*
 * The metrics map is a per-CPU array with one slot per (kind, reason,
 * direction): index kind << KIND_SHIFT | reason << REASON_SHIFT | dir
 * (metrics_index in lib/metrics.h). Counting a packet is an array slot,
 * not a hash lookup: it is on every packet's path. Kinds and directions
 * take two bits each, reasons eight. `struct metrics_key` is how
 * userspace names a slot.
 */
#define CILIA_METRICS_MAX	   4096
#define CILIA_METRICS_KIND_SHIFT   10
#define CILIA_METRICS_REASON_SHIFT 2

struct metrics_key {
	__u8 kind;   /* CILIA_METRIC_* */
	__u8 reason; /* CILIA_FWD_* or CILIA_DROP_* */
	__u8 dir;    /* CILIA_DIR_* */
	__u8 pad;
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* ---- identities, ipcache, policy, conntrack ---- */

/* Reserved security identities (fixed, as in Cilium). */
#define CILIA_ID_HOST	     1
#define CILIA_ID_WORLD	     2
#define CILIA_ID_UNMANAGED   3
#define CILIA_ID_HEALTH	     4
#define CILIA_ID_INIT	     5
#define CILIA_ID_REMOTE_NODE 6

#define CILIA_IPCACHE_MAX	   524288
#define CILIA_POLICY_MAX	   131072
#define CILIA_POLICY_ENDPOINTS_MAX 65536
#define CILIA_CT_MAX		   262144
/* Conntrack entries one endpoint may hold when the config sets no budget. */
#define CILIA_CT_BUDGET_DEFAULT 32768
/* Fragmented datagrams tracked at once (LRU: the oldest are forgotten). */
#define CILIA_FRAG_MAX 16384
/* IPv6 extension headers walked before the chain counts as too long. */
#define CILIA_IPV6_EXT_MAX 8

/* ipcache: LPM trie, prefix -> identity. prefixlen counts the family byte
 * and padding (32 bits) plus the address prefix. */
struct ipcache_key {
	__u32 prefixlen;
	__u8 family; /* CILIA_FAMILY_* */
	__u8 pad[3];
	__u8 addr[16];
};

/*
 * tunnel_family != 0: the prefix is remote, it lives on the node whose
 * underlay address is `tunnel` (its first 4 bytes for IPv4); packets to it
 * go through the overlay or, natively routed, via that node.
 */
struct ipcache_value {
	__u32 identity;
	__u32 flags; /* reserved, zero */
	__u8 tunnel[16];
	__u8 tunnel_family; /* 0: not remote; else CILIA_FAMILY_* of `tunnel` */
	__u8 pad[3];
	__u32 encap_key; /* reserved (encryption key), zero */
};

/* Per-endpoint policy: LPM trie over [identity][direction][proto][port].
 * prefixlen 40 = identity+direction (all L4), 48 = +protocol, 48+n = +n
 * leading port bits. Two lookups per verdict: the peer identity and 0 (any). */
struct policy_key {
	__u32 prefixlen;
	__be32 identity;
	__u8 direction; /* CILIA_DIR_* */
	__u8 proto;	/* IPPROTO_*, 0 = any */
	__be16 dport;
};

#define CILIA_VERDICT_ALLOW 1
#define CILIA_VERDICT_DENY  2

/* What an entry matches, reported in policy-verdict events. */
#define CILIA_MATCH_NONE   0 /* no entry: the default verdict */
#define CILIA_MATCH_L3	   1 /* identity, all L4 */
#define CILIA_MATCH_PROTO  2 /* identity + protocol, all ports */
#define CILIA_MATCH_PORT   3 /* identity + protocol + port (prefix) */
#define CILIA_MATCH_NO_MAP 4 /* the endpoint has no policy map: denied */

/*
 * The enforcement marker: at most one entry per policy map, under identity
 * 0 ("any") with prefix length CILIA_POLICY_MARKER_PREFIX (the identity
 * alone, no direction). The "any identity" lookup of either direction
 * returns it when no any-identity entry matches more specifically, so a
 * packet that no entry allows learns its direction's enforcement from the
 * lookup it made anyway. Its verdict is CILIA_VERDICT_MARKER (never an
 * entry's); its `match` byte holds each direction's CILIA_ENFORCE* flags,
 * ingress in the low four bits, egress shifted by CILIA_ENFORCE_EGRESS_SHIFT.
 * No marker: neither direction is enforced.
 */
#define CILIA_POLICY_MARKER_PREFIX 32
#define CILIA_VERDICT_MARKER	   0
#define CILIA_ENFORCE		   1 /* default deny in this direction */
#define CILIA_ENFORCE_AUDIT	   2 /* audit mode: would-be drops pass, reported as AUDIT */
#define CILIA_ENFORCE_EGRESS_SHIFT 4

struct policy_value {
	__u8 verdict;	   /* CILIA_VERDICT_ALLOW/DENY; the marker's: CILIA_VERDICT_MARKER */
	__u8 match;	   /* CILIA_MATCH_* of this entry; the marker's: CILIA_ENFORCE* flags */
	__be16 proxy_port; /* L7 proxy port (network byte order) of an allow; 0: none */
	__u32 rule;	   /* rule cookie: which policy rule this entry comes from */
};

/*
 * Conntrack: a hash keyed by the flow's 5-tuple in canonical order, the
 * same key for both directions, so that one lookup finds a flow from
 * either end (bpf/lib/conntrack.h, ct_key_of). The two ends, each its
 * port as stored (network byte order) then its address as four 32-bit
 * words in host byte order, compare lexicographically; the smaller is
 * (saddr, sport). Which end began the flow is CILIA_CT_SWAPPED in
 * ct_value.flags. 8-byte aligned: the datapath writes the ends 64 bits at
 * a time (its size, 40, and its offsets are the same either way).
 */
/* ct_key.kind: a flow's entry, or a service pin (the client's tuple to a
 * frontend, CILIA_CT_SERVICE). Apart, so that no packet of a flow meets a
 * pin under its key in either orientation (a packet "from" a frontend to a
 * client's port would otherwise find the client's pin as its reverse). */
#define CILIA_CT_KEY_FLOW    0
#define CILIA_CT_KEY_SERVICE 1
struct ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport; /* ICMP echo: the identifier in both ports */
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 kind; /* CILIA_CT_KEY_*: flows and service pins never share a key */
	__u8 pad;
} __attribute__((aligned(8)));

#define CILIA_CT_SEEN_REPLY 1
/* A TCP flow that closed: a RST, or a FIN each way (CILIA_CT_FIN_FWD and
 * _FIN_REPLY). Its entry then lives CILIA_CT_TCP_CLOSE from its last
 * packet, so its endpoint's conntrack budget gets it back soon; a SYN that
 * opens a new connection on the same tuple clears all three. */
#define CILIA_CT_CLOSING   2
#define CILIA_CT_FIN_FWD   512
#define CILIA_CT_FIN_REPLY 1024
/* The flow was revoked by a policy change: it stays tracked (so neither side
 * can restart it as a new flow in the other direction) and is dropped until a
 * later policy allows it again. */
#define CILIA_CT_DENIED 4
/* L7 redirect (see "L7 redirect" in docs/ARCHITECTURE.md). TO_PROXY: the
 * client leg of a redirected flow, its packets are assigned to the proxy's
 * socket at ct_value.proxy_port; FROM_PROXY: a flow the proxy opened on a
 * client's behalf, whose replies go back to the proxy through the stack. */
#define CILIA_CT_TO_PROXY   8
#define CILIA_CT_FROM_PROXY 16
/* Entry keyed by the client's tuple to a service frontend (never a packet's
 * own flow entry): it pins the flow to ct_value.backend_id. */
#define CILIA_CT_SERVICE 32
/* The entry's delivery is cached (see bpf/lib/fast.h): FAST_FWD for its
 * forward packets from the endpoint that sends them, FAST_REPLY for its
 * replies; the target is in ct_value.backend_id. Valid only at the entry's
 * policy_rev: every write of policy_rev clears both. */
#define CILIA_CT_FAST_FWD   64
#define CILIA_CT_FAST_REPLY 128
#define CILIA_CT_FAST_MASK  192 /* FAST_FWD | FAST_REPLY */
/* The flow's first packet went from the key's (daddr, dport) to its
 * (saddr, sport): the key's order is canonical, not the flow's. */
#define CILIA_CT_SWAPPED 256

struct ct_value {
	__u64 expires;	  /* cil_now() deadline (CLOCK_MONOTONIC_COARSE) */
	__u64 packets;	  /* forward packets */
	__u64 bytes;	  /* forward bytes */
	__u32 policy_rev; /* revision the flow's policy was checked at */
	__u32 src_identity;
	__u32 dst_identity;
	__u16 flags;	   /* CILIA_CT_* */
	__u16 owner;	   /* endpoint whose program created the entry (its budget) */
	__be16 proxy_port; /* CILIA_CT_TO_PROXY: the proxy's port; else 0 */
	__u16 rev_nat;	   /* flow to a service backend: the service's rev-NAT id (replies get
			    * the frontend as source); else 0 */
	__u32 backend_id;  /* CILIA_CT_SERVICE entry: the backend the flow is pinned to;
			    * any other: the cached deliveries (CILIA_CT_FAST_*), forward
			    * in the low 16 bits, reply in the high: an endpoint id, 0 the
			    * node's stack */
};

/* Fragments: the first fragment of an allowed datagram leaves its ports
 * here, so later fragments (which carry none) follow the same flow. */
struct frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id; /* IPv4: the 16-bit identification; IPv6: the fragment header's */
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct frag_value {
	__u64 expires; /* cil_now() deadline */
	__be16 sport;
	__be16 dport;
	__u8 pad[4];
};

#define CILIA_FRAG_TIMEOUT 30 /* seconds, as the kernel's ipfrag_time */

/* Timeouts (seconds). */
#define CILIA_CT_TCP_TIMEOUT	 21600
#define CILIA_CT_TCP_SYN_TIMEOUT 60
#define CILIA_CT_TCP_CLOSE	 10
#define CILIA_CT_OTHER_TIMEOUT	 60

/* Global runtime settings: array map, one slot. */
/* Monitor aggregation levels: with nobody listening, only counters. */
#define CILIA_MONITOR_OFF   0
#define CILIA_MONITOR_DROPS 1 /* drops and policy verdicts of new flows */
#define CILIA_MONITOR_TRACE 2 /* + every forwarded packet */
#define CILIA_MONITOR_DEBUG 3 /* + the conntrack state of every packet */

struct global_config {
	__u32 policy_rev;    /* bumped on every policy change */
	__u32 monitor_level; /* CILIA_MONITOR_* */
	__u32 ct_budget;     /* conntrack entries per endpoint; 0: CILIA_CT_BUDGET_DEFAULT */
	__u32 maglev_size;   /* entries of every Maglev table; 0: CILIA_LB_MAGLEV_SIZE_DEFAULT */
};

/*
 * The datapath clock (cil_now() in maps.h): array map, one slot, written by
 * the agent at start from a calibration (crates/cilia-datapath/src/clock.rs).
 * now = jiffies * tick_ns + base_ns (wrapping), CLOCK_MONOTONIC_COARSE within
 * a tick; tick_ns 0 (not calibrated): bpf_ktime_get_coarse_ns() itself.
 */
struct clock_config {
	__u64 tick_ns; /* ns per jiffy (TICK_NSEC); 0: not calibrated */
	__u64 base_ns; /* CLOCK_MONOTONIC_COARSE - jiffies * tick_ns, wrapping */
};

/* ---- nodes ---- */

/* Capacity of the nodes map (underlay addresses of the cluster's nodes). */
#define CILIA_NODES_MAX 4096

/* Value of the nodes map (key: struct endpoint_key of an underlay address):
 * a tunnel packet is accepted only from an address in it. */
struct node_value {
	__u32 flags; /* reserved, zero */
	__u32 pad;
};

/* How packets for remote prefixes (ipcache entries with a tunnel) leave. */
#define CILIA_TUNNEL_OFF    0 /* through the node's stack, as any other */
#define CILIA_TUNNEL_VXLAN  1 /* VXLAN overlay, source identity in the VNI */
#define CILIA_TUNNEL_NATIVE 2 /* routed over the underlay, next hop the node */

/* The node's tunnel settings: array map, one slot. */
struct node_config {
	__u32 tunnel_mode;	/* CILIA_TUNNEL_* */
	__u32 tunnel_ifindex;	/* the VXLAN device (external mode) */
	__u32 underlay_ifindex; /* the device holding the node's underlay address */
	__u32 tunnel_port;	/* the overlay's UDP port (host byte order); 0: no overlay */
};

/* ---- address filters ---- */

/*
 * An address filter is an array of CILIA_ADDR_FILTER_WORDS 64-bit words,
 * one bit per CILIA_ADDR_FILTER_BITS-th of the address space, set while
 * the hash map it stands in front of holds a key with an address on it. A
 * program looks the map up only when the bit of the address is set, so a
 * packet to an address the map does not hold skips a bucket the address
 * picks (a cold line where traffic goes to many addresses) for one read of
 * an 8 KB array; with a thousand addresses held, 1.5 % of the others share
 * a bit and still pay the lookup. The agent sets a bit before the first key
 * on it is written and clears it after the last is removed, so a held key's
 * bit is never clear. An address's bit: its 16 bytes (IPv4: the first 4,
 * the rest zero) as four 32-bit words in host order, xor-folded, times
 * CILIA_ADDR_FILTER_MUL, the top 16 bits of the 32-bit product.
 *   cilia_lb_filter        in front of cilia_lb_services (frontend addresses)
 *   cilia_endpoint_filter  in front of cilia_endpoints, for a
 *                          from-container packet's destination
 */
#define CILIA_ADDR_FILTER_WORDS 1024
#define CILIA_ADDR_FILTER_BITS	65536
#define CILIA_ADDR_FILTER_MUL	0x9e3779b1

/* ---- load balancing (services) ---- */

/*
 * A service is a frontend (address, port, protocol) with a list of active
 * backends. Its rev-NAT id (1..65535, the agent's service id) names it in
 * conntrack, the rev-NAT map, the affinity map and the Maglev map.
 *
 * cilia_lb_services holds, per frontend, one master entry (slot 0, gen 0)
 * and the active backends' slots 1..count of the master's generation. An
 * update writes the other generation's slots, then replaces the master (one
 * map update: a packet sees the old list or the new one, never a mix), then
 * deletes the previous generation's slots.
 */
#define CILIA_LB_SERVICES_MAX 262144 /* master + backend slot entries */
#define CILIA_LB_BACKENDS_MAX 65536
#define CILIA_LB_REVNAT_MAX   65536
#define CILIA_LB_AFFINITY_MAX 65536
/* Maglev lookup table: entries per service (a prime); configurable at start. */
#define CILIA_LB_MAGLEV_SIZE_DEFAULT 16381
/* Backend slots one service may have (slot numbers fit 15 bits). */
#define CILIA_LB_SLOTS_MAX 32767

struct lb_service_key {
	__u8 addr[16]; /* frontend address; IPv4 uses the first 4 bytes */
	__be16 port;   /* frontend port */
	__u8 proto;    /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 family;   /* CILIA_FAMILY_* */
	__u16 slot;    /* 0: the master entry; 1..count: a backend slot */
	__u8 gen; /* slot entries: generation (1 or 2) of the master that uses them; master: 0 */
	__u8 pad;
};

/* Algorithm of a service (lb_service_value.algorithm). */
#define CILIA_LB_ALG_RANDOM 1 /* a random active slot */
#define CILIA_LB_ALG_MAGLEV 2 /* the service's Maglev table, by the flow's hash */

/* Flags of a master entry. */
#define CILIA_LB_FLAG_AFFINITY 1 /* client-address affinity (cilia_lb_affinity) */
/* NodePort: the frontend address is 0.0.0.0 / :: and stands for every
 * address of the node (served at the underlay device, cil_from_netdev). */
#define CILIA_LB_FLAG_NODEPORT 2
/* externalTrafficPolicy=Local: external traffic only to backends on this
 * node (the agent writes only those into the slots; the datapath refuses
 * a remote one). */
#define CILIA_LB_FLAG_LOCAL 4
/* NodePort, remote backend: direct server return (no SNAT; the frontend
 * rides to the backend's node in an IP option, see CILIA_DSR_*). */
#define CILIA_LB_FLAG_DSR 8

struct lb_service_value {
	__u32 backend_id; /* slot entry: the backend; master: 0 */
	__u16 count;	  /* master: active backend slots (0: drop CILIA_DROP_NO_BACKEND) */
	__u16 rev_nat;	  /* master: the service's rev-NAT id */
	__u8 gen;	  /* master: generation of the slots in use (1 or 2) */
	__u8 algorithm;	  /* master: CILIA_LB_ALG_* */
	__u8 flags;	  /* master: CILIA_LB_FLAG_* */
	__u8 pad;
	__u32 affinity_timeout; /* master, CILIA_LB_FLAG_AFFINITY: seconds */
};

/*
 * Hairpin: a client endpoint's flow to a service whose chosen backend is
 * the endpoint itself comes back to it from the service loopback address
 * of its family (never its own: its kernel would drop a packet from its
 * own address arriving on its interface as martian), with the client's
 * port; the backend's replies to it are translated back. Reserved: no
 * endpoint or node may use these. IPv4 169.254.42.1 (link-local); IPv6
 * fdc1:1a5b::1 (a ULA, RFC 4193), in two 64-bit halves.
 */
#define CILIA_LB_LOOPBACK_IPV4	  0xa9fe2a01
#define CILIA_LB_LOOPBACK_IPV6_HI 0xfdc11a5b00000000
#define CILIA_LB_LOOPBACK_IPV6_LO 0x1

/* Backend states (lb_backend.state). Only active backends are in slots;
 * the others stay in the backends map so pinned flows finish. */
#define CILIA_LB_BACKEND_ACTIVE	     1
#define CILIA_LB_BACKEND_TERMINATING 2
#define CILIA_LB_BACKEND_QUARANTINED 3

/* Backends map: backend id (agent-assigned, never 0) -> address. */
struct lb_backend {
	__u8 addr[16];
	__be16 port;
	__u8 family; /* CILIA_FAMILY_* */
	__u8 state;  /* CILIA_LB_BACKEND_* */
};

/* Rev-NAT map: rev-NAT id -> the frontend replies appear to come from. */
struct lb_revnat {
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 pad;
};

/* Affinity map (LRU): a client address of a service -> its backend. */
struct lb_affinity_key {
	__u8 addr[16]; /* client address */
	__u16 rev_nat;
	__u8 family;
	__u8 pad;
};

struct lb_affinity_value {
	__u64 last_used; /* cil_now(); older than the timeout: chosen anew */
	__u32 backend_id;
	__u32 pad;
};

/* Per-service counters: a per-CPU array indexed by rev-NAT id. */
struct lb_stats {
	__u64 flows;   /* new flows given a backend (either load balancer) */
	__u64 packets; /* packets translated by the per-packet load balancer */
	__u64 bytes;
};

/*
 * Socket-level load balancing (bpf/sock.c): cgroup programs translate a
 * socket's frontend address to a backend at connect()/sendmsg() time, so
 * its packets carry the backend already. Only sockets of network
 * namespaces in cilia_lb_netns (key: netns cookie, value: the endpoint id
 * there, 0 for the node) are translated. A connected socket's translation
 * lives in its socket storage (struct lb_sock_storage). cilia_lb_sock
 * (LRU) remembers, per unconnected UDP socket, which frontend each backend
 * stands for (kind REVERSE: recvmsg reports the frontend) and which
 * backend a frontend was given (kind FORWARD: later datagrams of the
 * socket go to the same backend).
 */
#define CILIA_LB_NETNS_MAX 4096	  /* network namespaces served by the socket LB */
#define CILIA_LB_SOCK_MAX  131072 /* (socket, address) translations remembered */

/* lb_sock_key.kind */
#define CILIA_LB_SOCK_REVERSE 1 /* addr/port: a backend; value: its frontend */
#define CILIA_LB_SOCK_FORWARD 2 /* addr/port: a frontend; value: its backend (UDP) */

struct lb_sock_key {
	__u64 cookie;  /* bpf_get_socket_cookie() of the socket */
	__u8 addr[16]; /* IPv4 uses the first 4 bytes */
	__be16 port;
	__u8 family; /* CILIA_FAMILY_* */
	__u8 kind;   /* CILIA_LB_SOCK_* */
	__u8 pad[4];
};

struct lb_sock_value {
	__u8 addr[16]; /* REVERSE: the frontend; FORWARD: the backend */
	__be16 port;
	__u8 family;
	__u8 pad;
	__u32 backend_id;
	__u16 rev_nat;
	__u16 pad2;
};

/*
 * Value of cilia_lb_sock_storage, the socket storage of each socket the
 * socket LB translated: the translation of its connect() (family 0 when
 * none: a socket that only sent unconnected datagrams), and whether
 * cilia_lb_sock holds reverse entries for it (unconnected sends). The
 * reverse hooks run for every socket below the cgroup and consult
 * cilia_lb_sock only when this says so.
 */
#define CILIA_LB_SOCK_F_SENT 1 /* unconnected sends: reverse entries in cilia_lb_sock */

struct lb_sock_storage {
	__u8 frontend[16]; /* what connect() asked for; IPv4 uses the first 4 bytes */
	__u8 backend[16];  /* what the socket was connected to instead */
	__be16 frontend_port;
	__be16 backend_port;
	__u8 family; /* CILIA_FAMILY_* of both; 0: no connected translation */
	__u8 flags;  /* CILIA_LB_SOCK_F_* */
	__u8 pad[2];
};

/* ---- NodePort (external traffic at the underlay device) ---- */

/* Capacity of the NodePort NAT map (LRU: the oldest translations go first). */
#define CILIA_LB_NAT_MAX 65536
/* Source ports of SNAT (host byte order, first and last). */
#define CILIA_LB_SNAT_PORT_FIRST 32768
#define CILIA_LB_SNAT_PORT_LAST	 60999

/*
 * DSR: the frontend (node address, nodePort) in the packet that selects a
 * remote backend (a TCP SYN, a UDP flow's first datagram), inserted right
 * after the fixed IP header. IPv4: option type 0x9e (copied, class 0,
 * number 30: the RFC 4727 experiment), length 8: type, length, port (2,
 * network order), address (4). IPv6: a Destination Options header (next
 * header 60) of 24 bytes: next header, length 2, option type 0x1e (RFC 4727
 * experiment; action 00: skipped by a receiver that does not know it),
 * option length 18, port (2), address (16), then PadN (1, 0).
 */
#define CILIA_DSR_IPV4_OPT     0x9e
#define CILIA_DSR_IPV4_OPT_LEN 8
#define CILIA_DSR_IPV6_OPT     0x1e
#define CILIA_DSR_IPV6_OPT_LEN 18
#define CILIA_DSR_IPV6_HDR_LEN 24

/* Which translation a NAT entry holds (lb_nat_key.dir). */
#define CILIA_NAT_OUT	 1 /* client -> node:nodePort: the SNAT address/port and backend */
#define CILIA_NAT_IN	 2 /* backend -> node:snat-port: the client to restore */
#define CILIA_NAT_REVNAT 3 /* local or DSR backend -> client: the node:nodePort to show */

/* Key of cilia_lb_nat: a tuple as the packet carries it, and the kind. */
struct lb_nat_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 dir; /* CILIA_NAT_* */
	__u8 pad;
};

/* Value of cilia_lb_nat. OUT: addr/port the SNAT source; IN: the client
 * (destination to restore), `fport` the nodePort (source port to restore;
 * the address is the packet's destination); REVNAT: the node address and
 * nodePort replies carry as source. */
struct lb_nat_value {
	__u8 addr[16];
	__be16 port;
	__be16 fport;
	__u32 backend_id; /* OUT: the backend of the translation */
	__u64 expires;	  /* cil_now() deadline; a stale entry may be reused */
	__u16 rev_nat;
	__u8 family;
	__u8 flags; /* IN entries: CILIA_NAT_* (the flow's closing state) */
	__u8 pad[4];
};

/* lb_nat_value.flags of an IN entry, as CILIA_CT_CLOSING / _FIN_FWD /
 * _FIN_REPLY for a conntrack entry: a closing flow's translation lives the
 * close timeout from its last packet, and gives its SNAT port back. */
#define CILIA_NAT_CLOSING 1
#define CILIA_NAT_FIN_OUT 2 /* a FIN from the client */
#define CILIA_NAT_FIN_IN  4 /* a FIN from the backend */

/* ---- XDP prefilter ---- */

/* CIDRs of each family in the prefilter (LPM tries cilia_prefilter_v4/_v6). */
#define CILIA_PREFILTER_MAX 65536

struct prefilter_v4_key {
	__u32 prefixlen; /* the CIDR's prefix length */
	__u8 addr[4];
};

struct prefilter_v6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Value of both tries: the CIDR's counter slot in cilia_prefilter_counters
 * (a per-CPU array of struct metrics_value, CILIA_PREFILTER_MAX * 2 slots). */
struct prefilter_value {
	__u32 counter;
	__u32 pad;
};

/* ---- the XDP program of a node device (bpf/xdp.c) ---- */

/*
 * What the device's program does: CILIA_XDP_FEATURES = {CILIA_XDP_MAGIC,
 * flags}, a load-time constant. The magic tags it in the program's .rodata,
 * so the loader reads back what an attached program does.
 */
#define CILIA_XDP_MAGIC	    0x58444350 /* "PCDX" in memory order, little endian */
#define CILIA_XDP_PREFILTER 1	       /* drop sources in a prefilter CIDR */
#define CILIA_XDP_LB_ACCEL  2	       /* NodePort load balancing (--lb-acceleration native) */

/* ---- L7 proxy ---- */

/*
 * Packet marks (skb->mark, the proxy's SO_MARK), in the bits of
 * CILIA_MARK_MASK. TO_PROXY: set by the datapath on a packet it hands to the
 * node's stack for the proxy; a policy-routing rule (fwmark TO_PROXY/MASK ->
 * table CILIA_PROXY_ROUTE_TABLE, which routes everything as local) makes the
 * stack deliver it locally whatever its destination. FROM_PROXY: set by the
 * proxy on its sockets; the datapath then trusts the packet's endpoint source
 * address (the proxy speaks for the client). Containers cannot forge it: a
 * veth clears the mark when a packet changes network namespace.
 */
#define CILIA_MARK_MASK	      0x00ff0000
#define CILIA_MARK_TO_PROXY   0x00c10000
#define CILIA_MARK_FROM_PROXY 0x00c20000
/* Routing table and rule priority of the TO_PROXY rule (both families). */
#define CILIA_PROXY_ROUTE_TABLE	  2005
#define CILIA_PROXY_RULE_PRIORITY 9

/* ---- events (one ring buffer) ---- */

/* 1 MiB: 7,281 events of 144 bytes (with the ring's header). The agent
 * drains 10 ms after a batch's first event, so the ring loses events only
 * above ~700k events/s sustained. Its pages are resident twice in the
 * reader (the kernel maps the data area two times over), so this size is
 * 2 MiB of the agent's RSS: 4 MiB cost 8. */
#define CILIA_EVENTS_SIZE  1048576 /* 1 MiB */
#define CILIA_EVENT_CAPLEN 64

#define CILIA_EVENT_DROP	   1
#define CILIA_EVENT_TRACE	   2
#define CILIA_EVENT_POLICY_VERDICT 3
#define CILIA_EVENT_DEBUG	   4 /* reason: CILIA_CT_STATE_* */
/* A new flow to a service was given a backend (level CILIA_MONITOR_DROPS
 * and above): saddr/sport the frontend, daddr/dport the backend chosen,
 * rule the service's rev-NAT id, endpoint_id the client endpoint, src/dst
 * identity the client's and the backend's, data the client's packet. */
#define CILIA_EVENT_SERVICE 5
/* Which load balancer chose the backend (event.reason of a service event).
 * A socket-level choice has no packet: caplen 0, sport the frontend's port,
 * endpoint_id the endpoint whose namespace the socket is in (0: the node). */
#define CILIA_LB_PATH_PACKET 0 /* per packet, in the client's from-container program */
#define CILIA_LB_PATH_SOCKET 1 /* at connect()/sendmsg(), in the socket LB */

/* Conntrack state of a packet, reported by debug events. */
#define CILIA_CT_STATE_NEW	   1 /* first packet: policy decided */
#define CILIA_CT_STATE_ESTABLISHED 2 /* forward packet of a tracked flow */
#define CILIA_CT_STATE_REPLY	   3 /* reply of a tracked flow */
#define CILIA_CT_STATE_RELATED	   4 /* ICMP error about a tracked flow */
#define CILIA_CT_STATE_REVOKED	   5 /* flow revoked by a policy change */

#define CILIA_VERDICT_AUDIT 3 /* policy verdict: would be denied, passed (audit mode) */

/* Metric kind of events the ring buffer had no room for. */
#define CILIA_METRIC_LOST 3

struct event {
	__u64 ts;	     /* bpf_ktime_get_ns() */
	__u8 type;	     /* CILIA_EVENT_* */
	__u8 reason;	     /* drop: CILIA_DROP_*; trace: CILIA_FWD_* */
	__u8 dir;	     /* CILIA_DIR_* */
	__u8 verdict;	     /* policy verdict: CILIA_VERDICT_* */
	__u16 endpoint_id;   /* endpoint whose program saw the packet */
	__u16 peer_endpoint; /* local peer endpoint, 0 when none */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 rule;  /* rule cookie of the deciding entry, 0: default */
	__u32 len;   /* packet length */
	__u8 family; /* 0 when the packet was not parsed */
	__u8 proto;
	__u8 match;  /* CILIA_MATCH_* */
	__u8 caplen; /* bytes of `data` that are valid */
	__be16 sport;
	__be16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 data[CILIA_EVENT_CAPLEN]; /* the packet's first bytes */
};

#endif /* CILIA_ABI_H */
