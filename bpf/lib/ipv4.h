/* SPDX-License-Identifier: GPL-2.0 */
/* IPv4 from an endpoint: source check, delivery. */
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

__inline_fn int handle_ipv4(struct __sk_buff *skb, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (ip->version != 4 || ip->ihl < 5)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (ip->saddr != cfg_ipv4())
		return drop(skb, CILIA_DROP_SPOOFED_SOURCE, dir);

	__u8 first = ((__u8 *)&ip->daddr)[0];

	if ((first & 0xf0) == 0xe0 || ip->daddr == 0xffffffff)
		return drop(skb, CILIA_DROP_MULTICAST, dir);

	struct flow f = {.family = CILIA_FAMILY_IPV4, .proto = ip->protocol};
	__u32 l4 = ETH_HLEN + ip->ihl * 4;

	__builtin_memcpy(f.saddr, &ip->saddr, 4);
	__builtin_memcpy(f.daddr, &ip->daddr, 4);
	/* Non-first fragments carry no L4 header: they match L3 rules only. */
	if (!(ip->frag_off & bpf_htons(0x1fff)) && flow_parse_l4(skb, &f, l4) < 0)
		return drop(skb, CILIA_DROP_INVALID, dir);

	struct endpoint_info *ep = 0;
	int verdict = from_container_verdict(skb, &f, &ep, dir);

	if (verdict != CILIA_CONTINUE || !ep)
		return verdict;

	/* Helpers above may have moved the packet: load it again. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (ip->ttl <= 1)
		return drop(skb, CILIA_DROP_TTL_EXCEEDED, dir);
	ipv4_decrease_ttl(ip);
	return redirect_to_endpoint(skb, ep, dir);
}

/* IPv4 from the host stack to the endpoint: ingress policy only. */
__inline_fn int handle_ipv4_to_endpoint(struct __sk_buff *skb, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end || ip->ihl < 5)
		return TC_ACT_OK; /* not ours to judge: the stack built it */
	if ((((__u8 *)&ip->daddr)[0] & 0xf0) == 0xe0 || ip->daddr == 0xffffffff)
		return TC_ACT_OK; /* multicast and broadcast: link business */

	struct flow f = {.family = CILIA_FAMILY_IPV4, .proto = ip->protocol};
	__u32 l4 = ETH_HLEN + ip->ihl * 4;

	__builtin_memcpy(f.saddr, &ip->saddr, 4);
	__builtin_memcpy(f.daddr, &ip->daddr, 4);
	if (!(ip->frag_off & bpf_htons(0x1fff)) && flow_parse_l4(skb, &f, l4) < 0)
		return drop(skb, CILIA_DROP_INVALID, dir);
	return to_container_verdict(skb, &f, dir);
}

#endif
