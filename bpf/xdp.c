// SPDX-License-Identifier: GPL-2.0
/*
 * The XDP program of a node device: the one program a device can hold,
 * doing what the agent asked for on it (CILIA_XDP_FEATURES, load-time):
 *
 * - the prefilter (CILIA_XDP_PREFILTER): drops packets whose source lies in
 *   a listed CIDR before the node's stack (or any tc program) sees them;
 * - NodePort acceleration (CILIA_XDP_LB_ACCEL, on the underlay device):
 *   the NodePort cases that need no policy, see lib/xdp_nodeport.h.
 *
 * - cil_xdp_prefilter: XDP on a node device (native mode where the driver
 *   has it, generic otherwise), link pinned at node/prefilter_<mode>_<dev>.
 *
 * The path: parse (Ethernet, up to two VLAN tags, the IPv4 or IPv6 source)
 * -> prefilter: look the source up (longest prefix), count and drop
 * -> NodePort: translate and send, or pass.
 * Anything it cannot parse passes: the stack and the tc programs are the
 * judges of malformed frames and of everything this program does not do.
 */
#include "lib/common.h"
#include "lib/prefilter.h"
#include "lib/xdp_nodeport.h"

#define ETH_P_8021Q_  0x8100
#define ETH_P_8021AD_ 0x88A8
#define VLAN_HLEN_    4

/* {CILIA_XDP_MAGIC, CILIA_XDP_* flags}; the loader sets the flags. */
volatile const __u32 CILIA_XDP_FEATURES[2] = {CILIA_XDP_MAGIC, 0};

__inline_fn int xdp_feature(__u32 flag)
{
	return (*(const volatile __u32 *)&CILIA_XDP_FEATURES[1]) & flag;
}

/* The network protocol after the Ethernet header and its VLAN tags; *off
 * becomes the network header's offset. 0: too short to tell. */
__inline_fn __u16 parse_eth(void *data, void *data_end, __u32 *off)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return 0;
	__u16 proto = eth->h_proto;
	__u32 at = sizeof(*eth);

#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q_) && proto != bpf_htons(ETH_P_8021AD_))
			break;
		/* A VLAN tag: TCI, then the encapsulated protocol. */
		__be16 *next = data + at + 2;
		if ((void *)(next + 1) > data_end)
			return 0;
		proto = *next;
		at += VLAN_HLEN_;
	}
	*off = at;
	return proto;
}

/* The listed CIDR holding the packet's source, if any. */
__inline_fn const struct prefilter_value *prefilter_match(void *data, void *data_end, __u16 proto,
							  __u32 off)
{
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip4 = data + off;
		if ((void *)(ip4 + 1) > data_end)
			return 0;
		return prefilter_lookup_v4(ip4->saddr);
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;
		if ((void *)(ip6 + 1) > data_end)
			return 0;
		return prefilter_lookup_v6(&ip6->saddr);
	}
	return 0;
}

SEC("xdp")
int cil_xdp_prefilter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 off = 0;

	/* Parse. */
	__u16 proto = parse_eth(data, data_end, &off);

	/* Prefilter: count and drop a listed source. */
	if (xdp_feature(CILIA_XDP_PREFILTER)) {
		const struct prefilter_value *hit = prefilter_match(data, data_end, proto, off);

		if (hit) {
			prefilter_count(hit, (__u32)(data_end - data));
			return XDP_DROP;
		}
	}

	/* NodePort: untagged frames only (tc's offsets are fixed too). */
	if (xdp_feature(CILIA_XDP_LB_ACCEL) && off == ETH_HLEN)
		return xdp_nodeport(ctx, proto);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
