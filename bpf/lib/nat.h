/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Address and port rewriting of a parsed TCP or UDP packet, both families,
 * with every checksum the rewrite touches: the IPv4 header checksum, and
 * the L4 checksum over the pseudo-header (address) and the header (port).
 * The kernel's csum helpers keep checksum-offloaded packets
 * (CHECKSUM_PARTIAL, as a veth hands them over) right as well. Used by the
 * load balancer: DNAT of a client's packet to the backend, and the reverse
 * of it (the frontend as source) on replies.
 */
#ifndef CILIA_NAT_H
#define CILIA_NAT_H

#include "common.h"
#include "flow.h"

#define NAT_IPV4_CSUM_OFF (ETH_HLEN + 10)
#define NAT_IPV4_SADDR	  (ETH_HLEN + 12)
#define NAT_IPV4_DADDR	  (ETH_HLEN + 16)
#define NAT_IPV6_SADDR	  (ETH_HLEN + 8)
#define NAT_IPV6_DADDR	  (ETH_HLEN + 24)

/* Where the L4 checksum lives; 0 for a protocol the NAT does not handle. */
__inline_fn __u32 nat_l4_csum_off(const struct flow *f)
{
	if (f->proto == IPPROTO_TCP)
		return f->l4_off + 16;
	if (f->proto == IPPROTO_UDP)
		return f->l4_off + 6;
	return 0;
}

/*
 * Rewrites the destination (`dst` 1) or source (`dst` 0) address and port
 * of the packet `f` describes to `addr`/`port` (network byte order, `addr`
 * of the flow's family), and `f` with it. Returns 0 or a drop reason.
 */
__inline_fn int nat_rewrite(struct __sk_buff *skb, struct flow *f, int dst, const __u8 *addr,
			    __be16 port)
{
	__u32 csum_off = nat_l4_csum_off(f);
	/* UDP over IPv4 may carry no checksum (0): keep it so, and never
	 * write a computed 0 (it would mean "none"). */
	__u64 mangled = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u8 *old_addr = dst ? f->daddr : f->saddr;
	__be16 old_port = dst ? f->dport : f->sport;
	__u32 port_off = f->l4_off + (dst ? 2 : 0);

	if (!csum_off || !f->l4_off || f->l4_off > FLOW_L4_OFF_MAX)
		return CILIA_DROP_INVALID;
	if (f->family == CILIA_FAMILY_IPV6) {
		__u32 from[4], to[4];
		__s64 diff;

		__builtin_memcpy(from, old_addr, 16);
		__builtin_memcpy(to, addr, 16);
		diff = bpf_csum_diff(from, 16, to, 16, 0);
		if (diff < 0 ||
		    bpf_skb_store_bytes(skb, dst ? NAT_IPV6_DADDR : NAT_IPV6_SADDR, to, 16, 0) < 0)
			return CILIA_DROP_WRITE_FAILED;
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled) < 0)
			return CILIA_DROP_WRITE_FAILED;
	} else {
		__be32 from, to;

		__builtin_memcpy(&from, old_addr, 4);
		__builtin_memcpy(&to, addr, 4);
		if (bpf_skb_store_bytes(skb, dst ? NAT_IPV4_DADDR : NAT_IPV4_SADDR, &to, 4, 0) <
			0 ||
		    bpf_l3_csum_replace(skb, NAT_IPV4_CSUM_OFF, from, to, 4) < 0 ||
		    bpf_l4_csum_replace(skb, csum_off, from, to, BPF_F_PSEUDO_HDR | mangled | 4) <
			0)
			return CILIA_DROP_WRITE_FAILED;
	}
	if (bpf_skb_store_bytes(skb, port_off, &port, 2, 0) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | 2) < 0)
		return CILIA_DROP_WRITE_FAILED;
	if (f->family == CILIA_FAMILY_IPV6)
		__builtin_memcpy(old_addr, addr, 16);
	else
		__builtin_memcpy(old_addr, addr, 4);
	if (dst)
		f->dport = port;
	else
		f->sport = port;
	return 0;
}

#endif
