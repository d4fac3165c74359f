/* SPDX-License-Identifier: GPL-2.0 */
/* IPv6 from an endpoint: neighbour discovery, source check, delivery. */
#ifndef CILIA_IPV6_H
#define CILIA_IPV6_H

#include "common.h"
#include "config.h"
#include "flow.h"
#include "forward.h"
#include "verdict.h"
#include "ndisc.h"

__inline_fn int handle_ipv6(struct __sk_buff *skb, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u32 saddr[4], daddr[4];

	if ((void *)(ip6 + 1) > data_end)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (ip6->version != 6)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (ip6->nexthdr == IPPROTO_ICMPV6) {
		__u8 *icmp = (void *)(ip6 + 1);

		if ((void *)(icmp + 4) > data_end)
			return drop(skb, CILIA_DROP_INVALID, dir);
		if (icmp[0] >= NDISC_ROUTER_SOLICITATION && icmp[0] <= NDISC_REDIRECT)
			return handle_nd(skb, icmp[0], dir);
	}

	__builtin_memcpy(saddr, &ip6->saddr, 16);
	__builtin_memcpy(daddr, &ip6->daddr, 16);
	if (((__u8 *)daddr)[0] == 0xff)
		return drop(skb, CILIA_DROP_MULTICAST, dir);
	if (!cfg_is_own_ipv6(saddr))
		return drop(skb, CILIA_DROP_SPOOFED_SOURCE, dir);
	struct flow f = {.family = CILIA_FAMILY_IPV6, .proto = ip6->nexthdr};

	__builtin_memcpy(f.saddr, saddr, 16);
	__builtin_memcpy(f.daddr, daddr, 16);
	if (flow_parse_l4(skb, &f, ETH_HLEN + sizeof(struct ipv6hdr)) < 0)
		return drop(skb, CILIA_DROP_INVALID, dir);

	struct endpoint_info *ep = 0;
	int verdict = from_container_verdict(skb, &f, &ep, dir);

	if (verdict != CILIA_CONTINUE || !ep)
		return verdict;

	/* Helpers above may have moved the packet: load it again. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip6 = data + ETH_HLEN;
	if ((void *)(ip6 + 1) > data_end)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (ip6->hop_limit <= 1)
		return drop(skb, CILIA_DROP_TTL_EXCEEDED, dir);
	ip6->hop_limit--;
	return redirect_to_endpoint(skb, ep, dir);
}

/* IPv6 from the host stack to the endpoint: ingress policy only. */
__inline_fn int handle_ipv6_to_endpoint(struct __sk_buff *skb, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u8 *l4 = (void *)(ip6 + 1);

	if ((void *)(l4 + 1) > data_end)
		return TC_ACT_OK; /* not ours to judge: the stack built it */
	if (ip6->nexthdr == IPPROTO_ICMPV6 && l4[0] >= NDISC_ROUTER_SOLICITATION &&
	    l4[0] <= NDISC_REDIRECT)
		return TC_ACT_OK;
	/* Multicast from the node (MLD and the like) is link business. */
	if (ip6->daddr.in6_u.u6_addr8[0] == 0xff)
		return TC_ACT_OK;

	struct flow f = {.family = CILIA_FAMILY_IPV6, .proto = ip6->nexthdr};
	__builtin_memcpy(f.saddr, &ip6->saddr, 16);
	__builtin_memcpy(f.daddr, &ip6->daddr, 16);
	if (flow_parse_l4(skb, &f, ETH_HLEN + sizeof(struct ipv6hdr)) < 0)
		return drop(skb, CILIA_DROP_INVALID, dir);
	return to_container_verdict(skb, &f, dir);
}

#endif
