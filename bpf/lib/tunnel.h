/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Other nodes. A remote prefix (an ipcache entry with a tunnel) is reached
 * the way the node's config says: through the VXLAN device with the tunnel
 * key set (the outer destination is the remote node, the VNI carries the
 * source's security identity, so the receiver enforces its policy without
 * trusting the inner source address), or natively over the underlay device
 * with the remote node as next hop (bpf_redirect_neigh: the node's IP
 * stack and its ip_forward sysctl are never involved; an IPv6 packet for a
 * node known only by an IPv4 address takes the node's route to its prefix,
 * which the agent installs). Mode off: the stack.
 */
#ifndef CILIA_TUNNEL_H
#define CILIA_TUNNEL_H

#include "common.h"
#include "events.h"
#include "forward.h"
#include "maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* The largest identity a VXLAN network identifier can carry (24 bits). */
#define VNI_MAX 0xffffff

__inline_fn struct node_config *node_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&cilia_node_config, &zero);
}

/*
 * Sets the tunnel key of a packet for the node at `remote`: outer
 * destination, VNI = `identity`. Returns 0 or a negative error.
 */
__inline_fn long tunnel_key_set(struct __sk_buff *skb, const struct ipcache_value *remote,
				__u32 identity)
{
	struct bpf_tunnel_key key = {.tunnel_id = identity, .tunnel_ttl = 64};
	__u64 flags = 0;

	if (remote->tunnel_family == CILIA_FAMILY_IPV6) {
		__builtin_memcpy(key.remote_ipv6, remote->tunnel, 16);
		flags = BPF_F_TUNINFO_IPV6;
	} else {
		__u32 addr;

		__builtin_memcpy(&addr, remote->tunnel, 4);
		key.remote_ipv4 = bpf_ntohl(addr);
	}
	return bpf_skb_set_tunnel_key(skb, &key, sizeof(key), flags);
}

/*
 * The packet's tunnel key, outer IPv4 or IPv6 (`*family` tells which).
 * Returns 0, or a negative error when the packet carries none.
 */
__inline_fn long tunnel_key_get(struct __sk_buff *skb, struct bpf_tunnel_key *key, __u8 *family)
{
	if (!bpf_skb_get_tunnel_key(skb, key, sizeof(*key), 0)) {
		*family = CILIA_FAMILY_IPV4;
		return 0;
	}
	*family = CILIA_FAMILY_IPV6;
	return bpf_skb_get_tunnel_key(skb, key, sizeof(*key), BPF_F_TUNINFO_IPV6);
}

/* Whether a tunnel key's outer source is a node of the cluster. */
__inline_fn int tunnel_from_known_node(const struct bpf_tunnel_key *key, __u8 family)
{
	struct endpoint_key node = {.family = family};

	if (family == CILIA_FAMILY_IPV6) {
		__builtin_memcpy(node.addr, key->remote_ipv6, 16);
	} else {
		__u32 addr = bpf_htonl(key->remote_ipv4);

		__builtin_memcpy(node.addr, &addr, 4);
	}
	return bpf_map_lookup_elem(&cilia_nodes, &node) != 0;
}

/*
 * An allowed packet for a prefix on the node at `remote`. The source's
 * identity travels in the VNI (VXLAN); natively, the receiver looks the
 * source up in its ipcache.
 */
__inline_fn int deliver_to_node(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
				const struct decision *d, const struct ipcache_value *remote,
				__u8 dir)
{
	struct node_config *cfg = node_config();
	struct bpf_redir_neigh nh = {};
	int reason;

	if (!cfg || cfg->tunnel_mode == CILIA_TUNNEL_OFF)
		return deliver_to_stack(skb, f, p, d, dir);
	if (cfg->tunnel_mode == CILIA_TUNNEL_VXLAN) {
		__u32 ifindex = cfg->tunnel_ifindex;

		if (tunnel_key_set(skb, remote, p->src_id) < 0)
			return drop_decided(skb, f, p, d, CILIA_DROP_WRITE_FAILED, dir);
		count_forward(skb, CILIA_FWD_TUNNEL, dir);
		event_trace(skb, f, p, d->level, CILIA_FWD_TUNNEL, dir);
		return bpf_redirect(ifindex, 0);
	}
	__u32 ifindex = cfg->underlay_ifindex;

	reason = decrease_ttl(skb, f->family);
	if (reason)
		return drop_decided(skb, f, p, d, reason, dir);
	count_forward(skb, CILIA_FWD_NATIVE, dir);
	event_trace(skb, f, p, d->level, CILIA_FWD_NATIVE, dir);
	if (remote->tunnel_family == CILIA_FAMILY_IPV6) {
		nh.nh_family = AF_INET6;
		__builtin_memcpy(nh.ipv6_nh, remote->tunnel, 16);
	} else if (f->family == CILIA_FAMILY_IPV4) {
		nh.nh_family = AF_INET;
		__builtin_memcpy(&nh.ipv4_nh, remote->tunnel, 4);
	} else {
		/* The kernel takes an IPv4 next hop for IPv4 packets only: an
		 * IPv6 packet for a node known by its IPv4 address follows the
		 * node's routes (FIB lookup, no forwarding sysctl involved). */
		return bpf_redirect_neigh(ifindex, 0, 0, 0);
	}
	return bpf_redirect_neigh(ifindex, &nh, sizeof(nh), 0);
}

#endif
