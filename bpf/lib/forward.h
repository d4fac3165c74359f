/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Local delivery: a packet for another endpoint on this node gets the
 * target's MACs and is handed straight to the target's network namespace
 * with bpf_redirect_peer. The host stack (and its ip_forward sysctl) is
 * never involved.
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

__inline_fn int redirect_to_endpoint(struct __sk_buff *skb, const struct endpoint_info *ep,
				     __u8 dir)
{
	__u32 ifindex = ep->ifindex;

	if (eth_rewrite(skb, ep->mac, ep->node_mac) < 0)
		return drop(skb, CILIA_DROP_WRITE_FAILED, dir);
	count_forward(skb, CILIA_FWD_ENDPOINT, dir);
	return bpf_redirect_peer(ifindex, 0);
}

#endif
