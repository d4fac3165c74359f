/* SPDX-License-Identifier: GPL-2.0 */
/* IPv6 to and from an endpoint: neighbour discovery, source check, delivery. */
#ifndef CILIA_IPV6_H
#define CILIA_IPV6_H

#include "common.h"
#include "config.h"
#include "flow.h"
#include "forward.h"
#include "verdict.h"
#include "ndisc.h"

__inline_fn int is_nd(const struct flow *f)
{
	return f->proto == IPPROTO_ICMPV6 && f->l4_off &&
	       f->icmp_type >= NDISC_ROUTER_SOLICITATION && f->icmp_type <= NDISC_REDIRECT;
}

__inline_fn int handle_ipv6(struct __sk_buff *skb, __u8 dir)
{
	struct flow f = {};
	int reason = flow_parse_ipv6(skb, &f);

	if (reason)
		return drop(skb, reason, dir);
	if (is_nd(&f))
		return handle_nd(skb, &f, dir);
	if (f.daddr[0] == 0xff)
		return drop(skb, CILIA_DROP_MULTICAST, dir);
	if (!cfg_is_own_ipv6((const __u32 *)f.saddr))
		return drop(skb, CILIA_DROP_SPOOFED_SOURCE, dir);
	reason = frag_follow(&f);
	if (reason)
		return drop(skb, reason, dir);

	struct endpoint_info *ep = 0;
	int verdict = from_container_verdict(skb, &f, &ep, dir);

	if (verdict != CILIA_CONTINUE || !ep)
		return verdict;

	/* Helpers above may have moved the packet: load it again. */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;

	if ((void *)(ip6 + 1) > data_end)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (ip6->hop_limit <= 1)
		return drop(skb, CILIA_DROP_TTL_EXCEEDED, dir);
	ip6->hop_limit--;
	return redirect_to_endpoint(skb, ep, dir);
}

/*
 * IPv6 from the host stack to the endpoint: ingress policy. Neighbour
 * discovery is checked as on the way out; link-local multicast passes only
 * as ICMPv6 with hop limit 1 (MLD), the rest of multicast is not routed.
 */
__inline_fn int handle_ipv6_to_endpoint(struct __sk_buff *skb, __u8 dir)
{
	struct flow f = {};
	int reason = flow_parse_ipv6(skb, &f);

	if (reason)
		return drop(skb, reason, dir);
	if (is_nd(&f))
		return nd_to_container(skb, &f, dir);
	if (f.daddr[0] == 0xff) {
		if (f.proto == IPPROTO_ICMPV6 && f.hop_limit == 1 && f.daddr[1] == 0x02)
			return TC_ACT_OK;
		return drop(skb, CILIA_DROP_MULTICAST, dir);
	}
	reason = frag_follow(&f);
	if (reason)
		return drop(skb, reason, dir);
	return to_container_verdict(skb, &f, dir);
}

#endif
