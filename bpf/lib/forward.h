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
#include "filter.h"
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
 * endpoint_lookup of a from-container packet's destination, behind the
 * endpoints' address filter: a destination that is no local endpoint (the
 * world, another node) skips the hash's bucket. Only where a wrong "none"
 * fails closed: such a packet would go to the node's stack, and the
 * destination's to-container program drops a local endpoint's packet that
 * comes that way (CILIA_DROP_SPOOFED_SOURCE). Never for a source: the
 * guards ask whether a source is a local endpoint.
 */
__inline_fn struct endpoint_info *endpoint_lookup_dst(const void *addr, __u8 family)
{
	if (!addr_filter_has(&cilia_endpoint_filter, addr, family))
		return 0;
	return endpoint_lookup(addr, family);
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

/* Marks a packet for the node's proxy route: local delivery, whatever the
 * destination address (rule fwmark TO_PROXY/MASK -> CILIA_PROXY_ROUTE_TABLE). */
__inline_fn void mark_to_proxy(struct __sk_buff *skb)
{
	/* Volatile: clang would store the one changed byte, and the
	 * verifier admits only whole-word writes of skb->mark. */
	volatile __u32 *mark = &skb->mark;

	*mark = (*mark & ~CILIA_MARK_MASK) | CILIA_MARK_TO_PROXY;
}

/*
 * The L7 proxy's socket for a redirected flow: its own socket of this
 * 4-tuple (an accepted or half-open connection) if there is one, else its
 * transparent listener on the proxy port. A listener found by the first
 * lookup is somebody's server on the original port of the node, never the
 * proxy's: not taken. Returns a reference to release, or 0.
 */
__inline_fn struct bpf_sock *proxy_socket(struct __sk_buff *skb, const struct flow *f,
					  __be16 proxy_port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 len;

	if (f->family == CILIA_FAMILY_IPV6) {
		__builtin_memcpy(t.ipv6.saddr, f->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, f->daddr, 16);
		t.ipv6.sport = f->sport;
		t.ipv6.dport = f->dport;
		len = sizeof(t.ipv6);
	} else {
		__builtin_memcpy(&t.ipv4.saddr, f->saddr, 4);
		__builtin_memcpy(&t.ipv4.daddr, f->daddr, 4);
		t.ipv4.sport = f->sport;
		t.ipv4.dport = f->dport;
		len = sizeof(t.ipv4);
	}
	sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			return sk;
		bpf_sk_release(sk);
	}
	if (f->family == CILIA_FAMILY_IPV6)
		t.ipv6.dport = proxy_port;
	else
		t.ipv4.dport = proxy_port;
	sk = bpf_sk_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (sk && sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return 0;
	}
	return sk;
}

/*
 * A packet of a redirected flow (CILIA_CT_TO_PROXY) goes to the L7 proxy:
 * assigned to its socket here, at TCX ingress, then through the node's
 * stack with the TO_PROXY mark. No socket: dropped (fail closed).
 */
__inline_fn int deliver_to_proxy(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
				 const struct decision *d, __u8 dir)
{
	struct bpf_sock *sk = proxy_socket(skb, f, d->proxy_port);
	long err;

	if (!sk)
		return drop_decided(skb, f, p, d, CILIA_DROP_PROXY_UNAVAILABLE, dir);
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return drop_decided(skb, f, p, d, CILIA_DROP_PROXY_UNAVAILABLE, dir);
	mark_to_proxy(skb);
	count_forward(skb, CILIA_FWD_PROXY, dir);
	event_trace(skb, f, p, d->level, CILIA_FWD_PROXY, dir);
	return TC_ACT_OK;
}

/*
 * A reply to a connection the proxy opened for a client (its entry is
 * CILIA_CT_FROM_PROXY): addressed to the client, but the proxy's socket
 * holds the client's address, so it goes to the node's stack marked for
 * local delivery, never to the client itself.
 */
__inline_fn int deliver_reply_to_proxy(struct __sk_buff *skb, const struct flow *f,
				       const struct peers *p, const struct decision *d, __u8 dir)
{
	mark_to_proxy(skb);
	count_forward(skb, CILIA_FWD_PROXY, dir);
	event_trace(skb, f, p, d->level, CILIA_FWD_PROXY, dir);
	return TC_ACT_OK;
}

#endif
