/* SPDX-License-Identifier: GPL-2.0 */
/* IPv4 to and from an endpoint: source check, delivery. */
#ifndef CILIA_IPV4_H
#define CILIA_IPV4_H

#include "common.h"
#include "config.h"
#include "flow.h"
#include "forward.h"
#include "verdict.h"

/* TTL decrement with incremental checksum update (RFC 1624). */
__inline_fn void ipv4_decrease_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xffff));
	ip->ttl--;
}

__inline_fn int ipv4_is_multicast(const struct flow *f)
{
	return (f->daddr[0] & 0xf0) == 0xe0 || (f->daddr[0] == 0xff && f->daddr[1] == 0xff &&
						f->daddr[2] == 0xff && f->daddr[3] == 0xff);
}

__inline_fn int handle_ipv4(struct __sk_buff *skb, __u8 dir)
{
	struct flow f = {};
	int reason = flow_parse_ipv4(skb, &f);
	__be32 saddr;

	if (reason)
		return drop(skb, reason, dir);
	__builtin_memcpy(&saddr, f.saddr, 4);
	if (saddr != cfg_ipv4())
		return drop(skb, CILIA_DROP_SPOOFED_SOURCE, dir);
	if (ipv4_is_multicast(&f))
		return drop(skb, CILIA_DROP_MULTICAST, dir);
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
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (ip->ttl <= 1)
		return drop(skb, CILIA_DROP_TTL_EXCEEDED, dir);
	ipv4_decrease_ttl(ip);
	return redirect_to_endpoint(skb, ep, dir);
}

/*
 * IPv4 from the host stack to the endpoint: ingress policy. Of multicast
 * and broadcast, only IGMP from the node passes (link business); the rest
 * is not routed to endpoints.
 */
__inline_fn int handle_ipv4_to_endpoint(struct __sk_buff *skb, __u8 dir)
{
	struct flow f = {};
	int reason = flow_parse_ipv4(skb, &f);

	if (reason)
		return drop(skb, reason, dir);
	if (ipv4_is_multicast(&f)) {
		if (f.proto == IPPROTO_IGMP && f.hop_limit == 1)
			return TC_ACT_OK;
		return drop(skb, CILIA_DROP_MULTICAST, dir);
	}
	reason = frag_follow(&f);
	if (reason)
		return drop(skb, reason, dir);
	return to_container_verdict(skb, &f, dir);
}

#endif
