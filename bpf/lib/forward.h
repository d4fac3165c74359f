/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Delivery, once a packet is allowed: to a local endpoint, it gets the
 * target's MACs, one hop less to live, and is handed straight to the
 * target's network namespace with bpf_redirect_peer (the node's IP stack
 * and its ip_forward sysctl are never involved); anything else goes to the
 * node's stack unchanged.
 */
#ifndef CILIA_FORWARD_H
#define CILIA_FORWARD_H

#include "common.h"
#include "eth.h"
#include "maps.h"
#include "events.h"

__inline_fn struct endpoint_info *endpoint_lookup(const void *addr, __u8 family)
{
	struct endpoint_key key = {.family = family};

	if (family == CILIA_FAMILY_IPV6)
		__builtin_memcpy(key.addr, addr, 16);
	else
		__builtin_memcpy(key.addr, addr, 4);
	return bpf_map_lookup_elem(&cilia_endpoints, &key);
}

/*
 * One hop less: the IPv6 hop limit, or the IPv4 TTL with the header
 * checksum updated incrementally (RFC 1624). Returns 0 or the drop reason.
 */
__inline_fn int decrease_ttl(struct __sk_buff *skb, __u8 family)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (family == CILIA_FAMILY_IPV6) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end)
			return CILIA_DROP_INVALID;
		if (ip6->hop_limit <= 1)
			return CILIA_DROP_TTL_EXCEEDED;
		ip6->hop_limit--;
		return 0;
	}
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return CILIA_DROP_INVALID;
	if (ip->ttl <= 1)
		return CILIA_DROP_TTL_EXCEEDED;

	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xffff));
	ip->ttl--;
	return 0;
}

__inline_fn int deliver_to_endpoint(struct __sk_buff *skb, const struct flow *f,
				    const struct peers *p, const struct decision *d,
				    const struct endpoint_info *ep, __u8 dir)
{
	__u32 ifindex = ep->ifindex;
	int reason;

	event_trace(skb, f, p, d->level, CILIA_FWD_ENDPOINT, dir);
	reason = decrease_ttl(skb, f->family);
	if (reason)
		return drop(skb, reason, dir);
	if (eth_rewrite(skb, ep->mac, ep->node_mac) < 0)
		return drop(skb, CILIA_DROP_WRITE_FAILED, dir);
	count_forward(skb, CILIA_FWD_ENDPOINT, dir);
	return bpf_redirect_peer(ifindex, 0);
}

__inline_fn int deliver_to_stack(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
				 const struct decision *d, __u8 dir)
{
	count_forward(skb, CILIA_FWD_STACK, dir);
	event_trace(skb, f, p, d->level, CILIA_FWD_STACK, dir);
	return TC_ACT_OK;
}

#endif
