// SPDX-License-Identifier: GPL-2.0
/*
 * The XDP prefilter: drops packets whose source address lies in a listed
 * CIDR before the node's stack (or any tc program) sees them.
 *
 * - cil_xdp_prefilter: XDP on a node device (native mode where the driver
 *   has it, generic otherwise), link pinned at node/prefilter_<mode>_<dev>.
 *
 * The path: parse (Ethernet, up to two VLAN tags, the IPv4 or IPv6 source)
 * -> look the source up (longest prefix) -> count and drop, or pass.
 * Anything it cannot parse passes: the stack is the judge of malformed
 * frames, the prefilter only of listed sources.
 */
#include "lib/common.h"
#include "lib/prefilter.h"

#define ETH_P_8021Q_  0x8100
#define ETH_P_8021AD_ 0x88A8
#define VLAN_HLEN_    4

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

SEC("xdp")
int cil_xdp_prefilter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	const struct prefilter_value *hit = 0;
	__u32 off = 0;

	/* Parse. */
	__u16 proto = parse_eth(data, data_end, &off);

	/* Look the source up. */
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip4 = data + off;
		if ((void *)(ip4 + 1) > data_end)
			return XDP_PASS;
		hit = prefilter_lookup_v4(ip4->saddr);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;
		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		hit = prefilter_lookup_v6(&ip6->saddr);
	}
	if (!hit)
		return XDP_PASS;

	/* Count and drop. */
	prefilter_count(hit, (__u32)(data_end - data));
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
