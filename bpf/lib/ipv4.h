/* SPDX-License-Identifier: GPL-2.0 */
/* IPv4 from an endpoint: source check, delivery. */
#ifndef CILIA_IPV4_H
#define CILIA_IPV4_H

#include "common.h"
#include "config.h"
#include "forward.h"

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

	__be32 daddr = ip->daddr;
	struct endpoint_info *ep = endpoint_lookup(&daddr, CILIA_FAMILY_IPV4);

	if (!ep) {
		count_forward(skb, CILIA_FWD_STACK, dir);
		return TC_ACT_OK;
	}
	if (ip->ttl <= 1)
		return drop(skb, CILIA_DROP_TTL_EXCEEDED, dir);
	ipv4_decrease_ttl(ip);
	return redirect_to_endpoint(skb, ep, dir);
}

#endif
