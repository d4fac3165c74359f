/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Who may send what, before any policy: an endpoint sends with its own
 * address only, and a packet from the node's stack never carries a local
 * endpoint's address (local endpoints reach each other by redirect; on the
 * node any local user can bind any address), unless the L7 proxy sends it
 * for that endpoint. Multicast is link business:
 * not routed from endpoints, and toward them only the node's link-local
 * MLD and IGMP.
 */
#ifndef CILIA_GUARD_H
#define CILIA_GUARD_H

#include "common.h"
#include "config.h"
#include "flow.h"
#include "forward.h"

/*
 * UDP to a node's address on the overlay port. A node accepts a tunnel
 * packet by its outer source alone (a known node), and trusts the VNI as
 * the sender's identity: if the endpoint's packet reached another node with
 * its node's address as source (masquerading on the way), the endpoint
 * would choose its identity there. No endpoint has business with that port
 * of a node, so it never leaves. One array lookup, for UDP only.
 */
__inline_fn int to_tunnel_port(const struct flow *f)
{
	struct endpoint_key node = {.family = f->family};
	struct node_config *cfg;
	__u32 zero = 0;

	if (f->proto != IPPROTO_UDP)
		return 0;
	cfg = bpf_map_lookup_elem(&cilia_node_config, &zero);
	if (!cfg || !cfg->tunnel_port || f->dport != bpf_htons((__u16)cfg->tunnel_port))
		return 0;
	__builtin_memcpy(node.addr, f->daddr, 16);
	return bpf_map_lookup_elem(&cilia_nodes, &node) != 0;
}

/* A packet from the endpoint. Returns 0 or the drop reason. */
__inline_fn int from_container_guard(const struct flow *f)
{
	if (f->family == CILIA_FAMILY_IPV6) {
		if (!cfg_is_own_ipv6((const __u32 *)f->saddr))
			return CILIA_DROP_SPOOFED_SOURCE;
	} else {
		__be32 saddr;

		__builtin_memcpy(&saddr, f->saddr, 4);
		if (saddr != cfg_ipv4())
			return CILIA_DROP_SPOOFED_SOURCE;
	}
	if (to_tunnel_port(f))
		return CILIA_DROP_TUNNEL_PORT;
	return flow_is_multicast(f) ? CILIA_DROP_MULTICAST : 0;
}

/*
 * A unicast packet from the node's stack, whose source is the local
 * endpoint `src` (0: none). Only the L7 proxy may speak for a local
 * endpoint: its packets carry CILIA_MARK_FROM_PROXY, which no container can
 * forge (a veth clears the mark between namespaces). Returns 0 or the drop
 * reason.
 */
__inline_fn int to_container_guard(const struct endpoint_info *src, int via_proxy)
{
	return src && !via_proxy ? CILIA_DROP_SPOOFED_SOURCE : 0;
}

/* Whether the L7 proxy sent the packet (its sockets' SO_MARK). */
__inline_fn int from_proxy(const struct __sk_buff *skb)
{
	return (skb->mark & CILIA_MARK_MASK) == CILIA_MARK_FROM_PROXY;
}

/* Multicast from the node's stack: link-local MLD (ICMPv6, hop limit 1)
 * and IGMP (TTL 1) pass, the rest is not routed. */
__inline_fn int to_container_multicast(struct __sk_buff *skb, const struct flow *f, __u8 dir)
{
	if (f->family == CILIA_FAMILY_IPV6 && f->proto == IPPROTO_ICMPV6 && f->hop_limit == 1 &&
	    f->daddr[1] == 0x02)
		return TC_ACT_OK;
	if (f->family == CILIA_FAMILY_IPV4 && f->proto == IPPROTO_IGMP && f->hop_limit == 1)
		return TC_ACT_OK;
	return drop(skb, CILIA_DROP_MULTICAST, dir);
}

#endif
