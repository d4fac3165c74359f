/* SPDX-License-Identifier: GPL-2.0 */
/* IPv6 from an endpoint: neighbour discovery, source check, delivery. */
#ifndef CILIA_IPV6_H
#define CILIA_IPV6_H

#include "common.h"
#include "config.h"
#include "forward.h"
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

	struct endpoint_info *ep = endpoint_lookup(daddr, CILIA_FAMILY_IPV6);

	if (!ep) {
		count_forward(skb, CILIA_FWD_STACK, dir);
		return TC_ACT_OK;
	}
	if (ip6->hop_limit <= 1)
		return drop(skb, CILIA_DROP_TTL_EXCEEDED, dir);
	ip6->hop_limit--;
	return redirect_to_endpoint(skb, ep, dir);
}

#endif
