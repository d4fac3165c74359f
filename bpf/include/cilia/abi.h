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
	__u8 pad;
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

/* Drop reasons (kind CILIA_METRIC_DROP). Never reuse a number. */
#define CILIA_DROP_INVALID	   130 /* truncated or malformed packet */
#define CILIA_DROP_UNSUPPORTED_L3  131 /* ethertype not handled */
#define CILIA_DROP_SPOOFED_SOURCE  132 /* source address is not the endpoint's */
#define CILIA_DROP_TTL_EXCEEDED	   133 /* TTL / hop limit would reach zero */
#define CILIA_DROP_UNSUPPORTED_ND  134 /* ND/ICMPv6 control message not served */
#define CILIA_DROP_MULTICAST	   135 /* multicast is not routed */
#define CILIA_DROP_REDIRECT_FAILED 136 /* the kernel refused the redirect */
#define CILIA_DROP_WRITE_FAILED	   137 /* a packet rewrite helper failed */

/* Direction of a counted packet. */
#define CILIA_DIR_EGRESS  1 /* leaving an endpoint (from-container) */
#define CILIA_DIR_INGRESS 2 /* entering an endpoint */

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

#endif /* CILIA_ABI_H */
