/* SPDX-License-Identifier: GPL-2.0 */
/*
 * IPv6 neighbour discovery responder. A neighbour solicitation from the
 * endpoint for any address but its own is answered with a neighbour
 * advertisement carrying the host-side veth's MAC (router, solicited,
 * override): the node is the endpoint's only neighbour. Advertisements
 * (answers to the host's solicitations) and router solicitations go to the
 * stack, once they pass the checks below.
 */
#ifndef CILIA_NDISC_H
#define CILIA_NDISC_H

#include "common.h"
#include "config.h"
#include "csum.h"
#include "events.h"

#define ND_NS_LEN	     24		/* ICMPv6 header + reserved + target */
#define ND_NA_LEN	     32		/* NA + target link-layer address option */
#define ND_FLAGS_RSO	     0xe0000000 /* router | solicited | override */
#define ND_OPT_TARGET_LLADDR 2

#define ND_HOP_LIMIT 255 /* RFC 4861: anything less was forwarded */

#define MLD_V1_REPORT 131 /* RFC 2710 */
#define MLD_V1_DONE   132
#define MLD_V2_REPORT 143 /* RFC 3810 */

__inline_fn int ipv6_is_link_local(const __u8 *addr)
{
	return addr[0] == 0xfe && (addr[1] & 0xc0) == 0x80;
}

__inline_fn int ipv6_is_unspecified(const __u8 *addr)
{
	__u32 a[4];

	__builtin_memcpy(a, addr, 16);
	return !(a[0] | a[1] | a[2] | a[3]);
}

/* ff02::1 (all nodes) or ff02::2 (all routers), `last` being 1 or 2. */
__inline_fn int ipv6_is_all(const __u8 *addr, __u8 last)
{
	__u32 a[4];

	__builtin_memcpy(a, addr, 16);
	return a[0] == bpf_htonl(0xff020000) && !a[1] && !a[2] && a[3] == bpf_htonl(last);
}

/* ff02::1:ffXX:XXXX, the solicited-node group of `target` when given. */
__inline_fn int ipv6_is_solicited_node(const __u8 *addr, const __u8 *target)
{
	__u32 a[4];

	__builtin_memcpy(a, addr, 16);
	if (a[0] != bpf_htonl(0xff020000) || a[1] || a[2] != bpf_htonl(1) || addr[12] != 0xff)
		return 0;
	return !target ||
	       (addr[13] == target[13] && addr[14] == target[14] && addr[15] == target[15]);
}

/*
 * An MLD listener report or done message as a host sends it (RFC 2710,
 * RFC 3810): whole, hop limit 1, to a link-scope group, from the
 * unspecified address (before its link-local address is ready) or a
 * link-local one. A container's kernel sends these for its solicited-node
 * groups when its interface comes up. The node routes no multicast from
 * endpoints, so nobody listens: they are absorbed. Anything else multicast
 * meets the guard (and is dropped by name).
 */
__inline_fn int mld_report_from_container(const struct flow *f)
{
	if (f->family != CILIA_FAMILY_IPV6 || f->proto != IPPROTO_ICMPV6 || !f->l4_off ||
	    f->frag != FLOW_NOT_FRAG)
		return 0;
	if (f->icmp_type != MLD_V1_REPORT && f->icmp_type != MLD_V1_DONE &&
	    f->icmp_type != MLD_V2_REPORT)
		return 0;
	return f->hop_limit == 1 && f->daddr[0] == 0xff && (f->daddr[1] & 0x0f) == 0x02 &&
	       (ipv6_is_unspecified(f->saddr) || ipv6_is_link_local(f->saddr));
}

/*
 * The checks an ND message from the endpoint must pass (RFC 4861 and "a
 * container is not a router"): hop limit 255, no extension headers, a source
 * that is the endpoint's own or link-local (unspecified for a solicitation),
 * a destination on the link, and for an advertisement a target that is the
 * endpoint's own. Router advertisements and redirects are never accepted.
 * Returns 0 or the drop reason.
 */
__inline_fn int nd_from_container_check(const struct flow *f, const __u8 *target)
{
	int own_src = cfg_is_own_ipv6((const __u32 *)f->saddr) || ipv6_is_link_local(f->saddr);

	if (f->icmp_type == NDISC_ROUTER_ADVERTISEMENT || f->icmp_type == NDISC_REDIRECT)
		return CILIA_DROP_UNSUPPORTED_ND;
	if (f->hop_limit != ND_HOP_LIMIT || f->l4_off != ETH_HLEN + sizeof(struct ipv6hdr))
		return CILIA_DROP_ND_INVALID;
	switch (f->icmp_type) {
	case NDISC_NEIGHBOUR_SOLICITATION:
		if (!own_src && !ipv6_is_unspecified(f->saddr))
			return CILIA_DROP_SPOOFED_SOURCE;
		if (ipv6_is_link_local(f->daddr) || ipv6_is_solicited_node(f->daddr, target) ||
		    addr_eq(f->daddr, target))
			return 0;
		return CILIA_DROP_ND_INVALID;
	case NDISC_NEIGHBOUR_ADVERTISEMENT:
		if (!own_src)
			return CILIA_DROP_SPOOFED_SOURCE;
		if (!cfg_is_own_ipv6((const __u32 *)target) && !ipv6_is_link_local(target))
			return CILIA_DROP_SPOOFED_SOURCE;
		if (ipv6_is_link_local(f->daddr) || ipv6_is_all(f->daddr, 1))
			return 0;
		return CILIA_DROP_ND_INVALID;
	default: /* router solicitation */
		if (!own_src && !ipv6_is_unspecified(f->saddr))
			return CILIA_DROP_SPOOFED_SOURCE;
		return ipv6_is_all(f->daddr, 2) ? 0 : CILIA_DROP_ND_INVALID;
	}
}

/*
 * ND from the node's stack to the endpoint: its router solicitations are
 * absorbed; otherwise only solicitations and advertisements (this
 * program's own answers to the endpoint among them: they come back through
 * here), hop limit 255 (sent on this link, not forwarded), from a unicast
 * or unspecified source to link-local, the endpoint's own address, all
 * nodes or a solicited-node group.
 */
__inline_fn int nd_to_container(struct __sk_buff *skb, const struct flow *f, __u8 dir)
{
	/* The host side's own router solicitations when the veth comes up:
	 * an endpoint is no router, silence is the answer. */
	if (f->icmp_type == NDISC_ROUTER_SOLICITATION && f->hop_limit == ND_HOP_LIMIT &&
	    ipv6_is_all(f->daddr, 2))
		return absorb(skb, dir);
	if (f->icmp_type != NDISC_NEIGHBOUR_SOLICITATION &&
	    f->icmp_type != NDISC_NEIGHBOUR_ADVERTISEMENT)
		return drop(skb, CILIA_DROP_UNSUPPORTED_ND, dir);
	if (f->hop_limit != ND_HOP_LIMIT || f->saddr[0] == 0xff)
		return drop(skb, CILIA_DROP_ND_INVALID, dir);
	if (!ipv6_is_link_local(f->daddr) && !cfg_is_own_ipv6((const __u32 *)f->daddr) &&
	    !ipv6_is_all(f->daddr, 1) && !ipv6_is_solicited_node(f->daddr, 0))
		return drop(skb, CILIA_DROP_ND_INVALID, dir);
	return TC_ACT_OK;
}

__inline_fn int nd_from_container(struct __sk_buff *skb, const struct flow *f, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u8 *icmp = (void *)(ip6 + 1);
	__u32 saddr[4], target[4], pseudo[10], reply[8];
	__u8 peer_mac[6], node_mac[6];
	int reason;

	__builtin_memset(target, 0, sizeof(target));
	if (f->icmp_type == NDISC_NEIGHBOUR_SOLICITATION ||
	    f->icmp_type == NDISC_NEIGHBOUR_ADVERTISEMENT) {
		if ((void *)(icmp + ND_NS_LEN) > data_end)
			return drop(skb, CILIA_DROP_INVALID, dir);
		__builtin_memcpy(target, icmp + 8, 16);
	}
	reason = nd_from_container_check(f, (const __u8 *)target);
	if (reason)
		return drop(skb, reason, dir);
	if (f->icmp_type != NDISC_NEIGHBOUR_SOLICITATION) {
		count_forward(skb, CILIA_FWD_STACK, dir);
		return TC_ACT_OK;
	}
	if ((void *)(icmp + ND_NS_LEN) > data_end)
		return drop(skb, CILIA_DROP_INVALID, dir);

	__builtin_memcpy(saddr, f->saddr, 16);
	__builtin_memcpy(peer_mac, eth->h_source, 6);
	/* Duplicate address detection (unspecified source): silence says the
	 * address is unique, which IPAM and per-endpoint MACs guarantee. */
	if (!(saddr[0] | saddr[1] | saddr[2] | saddr[3]))
		return absorb(skb, dir);
	if (cfg_is_own_ipv6(target)) {
		count_forward(skb, CILIA_FWD_STACK, dir);
		return TC_ACT_OK;
	}

	cfg_copy_mac(node_mac, CILIA_CONFIG.node_mac);

	/* The advertisement: ICMPv6 header, flags, target, target LL option. */
	__builtin_memset(reply, 0, sizeof(reply));
	((__u8 *)reply)[0] = NDISC_NEIGHBOUR_ADVERTISEMENT;
	reply[1] = bpf_htonl(ND_FLAGS_RSO);
	__builtin_memcpy(&reply[2], target, 16);
	((__u8 *)reply)[24] = ND_OPT_TARGET_LLADDR;
	((__u8 *)reply)[25] = 1; /* option length in units of 8 bytes */
	__builtin_memcpy((__u8 *)reply + 26, node_mac, 6);

	/* Checksum over the pseudo-header (src, dst, length, next header). */
	__builtin_memcpy(&pseudo[0], target, 16);
	__builtin_memcpy(&pseudo[4], saddr, 16);
	pseudo[8] = bpf_htonl(ND_NA_LEN);
	pseudo[9] = bpf_htonl(IPPROTO_ICMPV6);
	__s64 sum = bpf_csum_diff(0, 0, pseudo, sizeof(pseudo), 0);

	sum = bpf_csum_diff(0, 0, reply, sizeof(reply), (__u32)sum);
	((__u16 *)reply)[1] = csum_fold(sum);

	struct ipv6hdr hdr = {
	    .version = 6,
	    .payload_len = bpf_htons(ND_NA_LEN),
	    .nexthdr = IPPROTO_ICMPV6,
	    .hop_limit = 255,
	};
	__builtin_memcpy(&hdr.saddr, target, 16);
	__builtin_memcpy(&hdr.daddr, saddr, 16);

	if (skb->len != ETH_HLEN + sizeof(hdr) + ND_NA_LEN &&
	    bpf_skb_change_tail(skb, ETH_HLEN + sizeof(hdr) + ND_NA_LEN, 0) < 0)
		return drop(skb, CILIA_DROP_WRITE_FAILED, dir);
	if (bpf_skb_store_bytes(skb, 0, peer_mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, node_mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &hdr, sizeof(hdr), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(hdr), reply, sizeof(reply), 0) < 0)
		return drop(skb, CILIA_DROP_WRITE_FAILED, dir);

	count_forward(skb, CILIA_FWD_ND_REPLY, dir);
	return bpf_redirect(skb->ifindex, 0);
}

#endif
