/* SPDX-License-Identifier: GPL-2.0 */
/*
 * NodePort load balancing in XDP (--lb-acceleration native): the cases
 * that need no policy and no socket buffer, done before the node's stack
 * allocates one, with the same maps and entries as the tc path
 * (nodeport.h, lb_packet.h), so a flow begun here is continued by tc and
 * the other way round:
 *
 * - a client's packet to a NodePort whose backend is on another node
 *   (native routing): the backend chosen and pinned as at tc (lb_choose,
 *   lb_pin), then SNAT (nodeport_snat_port: the same cilia_lb_nat entries)
 *   or DSR (the same header as dsr_encode), and out by the FIB's next hop;
 * - that backend's reply to a SNATed flow: unSNAT and rev-NAT
 *   (nodeport_unsnat_lookup) and out to the client by the FIB.
 *
 * Everything else returns XDP_PASS untouched, and tc, the complete
 * implementation, judges it: a local backend (its ingress policy runs at
 * tc), VXLAN mode (no encapsulation here), externalTrafficPolicy=Local,
 * IPv4 options, IPv6 extension headers, fragments, VLAN tags, ICMP, a FIB
 * miss or an unresolved neighbour, a failed map update (tc then drops with
 * the named reason). A packet is only changed once every lookup that could
 * send it to tc has succeeded.
 */
#ifndef CILIA_XDP_NODEPORT_H
#define CILIA_XDP_NODEPORT_H

#include "common.h"
#include "csum.h"
#include "events.h"
#include "forward.h"
#include "ipcache.h"
#include "lb_packet.h"
#include "nodeport.h"
#include "tunnel.h"

/* The FIB lookup's in/out parameters: off the stack, which the inlined
 * load balancer fills (per CPU, one packet at a time). Not pinned: every
 * loaded copy of the program has its own. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bpf_fib_lookup);
} cilia_xdp_fib SEC(".maps");

__inline_fn struct bpf_fib_lookup *xdp_fib_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&cilia_xdp_fib, &zero);
}

#define XDP_IPV4_END (ETH_HLEN + sizeof(struct iphdr))
#define XDP_IPV6_END (ETH_HLEN + sizeof(struct ipv6hdr))

/*
 * The flow of a plain TCP or UDP packet right after an untagged Ethernet
 * header: IPv4 without options and not a fragment, IPv6 without extension
 * headers. Returns 0, or -1 for anything else (the packet passes to tc).
 */
__inline_fn int xdp_flow_parse(void *data, void *data_end, __u16 proto, struct flow *f)
{
	__u8 *l4;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl != 5)
			return -1;
		if (ip->frag_off & bpf_htons(IPV4_MF | IPV4_OFFSET_MASK))
			return -1;
		f->family = CILIA_FAMILY_IPV4;
		f->proto = ip->protocol;
		f->hop_limit = ip->ttl;
		__builtin_memcpy(f->saddr, &ip->saddr, 4);
		__builtin_memcpy(f->daddr, &ip->daddr, 4);
		f->l4_off = XDP_IPV4_END;
		l4 = (void *)(ip + 1);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return -1;
		f->family = CILIA_FAMILY_IPV6;
		f->proto = ip6->nexthdr;
		f->hop_limit = ip6->hop_limit;
		__builtin_memcpy(f->saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->daddr, &ip6->daddr, 16);
		f->l4_off = XDP_IPV6_END;
		l4 = (void *)(ip6 + 1);
	} else {
		return -1;
	}
	if (f->proto == IPPROTO_TCP) {
		if ((void *)(l4 + 20) > data_end)
			return -1;
		f->tcp_flags = l4[13];
	} else if (f->proto == IPPROTO_UDP) {
		if ((void *)(l4 + 8) > data_end)
			return -1;
	} else {
		return -1;
	}
	__builtin_memcpy(&f->sport, l4, 2);
	__builtin_memcpy(&f->dport, l4 + 2, 2);
	return 0;
}

/* A 16-bit checksum with a partial sum of changes (bpf_csum_diff) added
 * (RFC 1624: HC' = ~(~HC + ~m + m')). */
__inline_fn __u16 xdp_csum_apply(__u16 check, __s64 diff)
{
	__u64 s = (__u16)~check;

	s += (__u32)diff;
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* The next hop toward `dst` from `src` (`family`'s addresses) for a packet
 * of `tot_len` bytes (IP header on), its MACs and device in `fib`. Returns
 * the kernel's BPF_FIB_LKUP_RET_*. */
__inline_fn long xdp_fib(struct xdp_md *ctx, struct bpf_fib_lookup *fib, __u32 ifindex, __u8 family,
			 const __u8 *src, const __u8 *dst, __u8 proto, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->ifindex = ifindex;
	fib->l4_protocol = proto;
	fib->tot_len = tot_len;
	if (family == CILIA_FAMILY_IPV6) {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, src, 16);
		__builtin_memcpy(fib->ipv6_dst, dst, 16);
	} else {
		fib->family = AF_INET;
		__builtin_memcpy(&fib->ipv4_src, src, 4);
		__builtin_memcpy(&fib->ipv4_dst, dst, 4);
	}
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* The IP header's total length (IPv4) or payload plus fixed header (IPv6). */
__inline_fn __u16 xdp_ip_len(void *data, void *data_end, __u8 family)
{
	if (family == CILIA_FAMILY_IPV6) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end)
			return 0;
		return bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
	}
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return 0;
	return bpf_ntohs(ip->tot_len);
}

/*
 * Rewrites the packet `f` was parsed from to `f`'s tuple (the new
 * addresses and ports), one hop less to live, every checksum updated
 * incrementally: the IPv4 header's, and the L4 one over the pseudo-header
 * and the ports (a UDP datagram over IPv4 without a checksum keeps none).
 * Returns 0, or -1 when the packet is shorter than parsed.
 */
__inline_fn int xdp_rewrite(void *data, void *data_end, const struct flow *f)
{
	__be16 ports[2] = {f->sport, f->dport};
	__be16 *check;
	__u8 *l4;
	__s64 diff;

	if (f->family == CILIA_FAMILY_IPV6) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		l4 = (void *)(ip6 + 1);
		if ((void *)(l4 + 20) > data_end && f->proto == IPPROTO_TCP)
			return -1;
		if ((void *)(l4 + 8) > data_end)
			return -1;
		/* saddr and daddr follow each other in both. */
		diff = bpf_csum_diff((__u32 *)&ip6->saddr, 32, (__u32 *)f->saddr, 32, 0);
		__builtin_memcpy(&ip6->saddr, f->saddr, 16);
		__builtin_memcpy(&ip6->daddr, f->daddr, 16);
		ip6->hop_limit--;
	} else {
		struct iphdr *ip = data + ETH_HLEN;
		__u32 to[2];

		if ((void *)(ip + 1) > data_end)
			return -1;
		l4 = (void *)(ip + 1);
		if ((void *)(l4 + 20) > data_end && f->proto == IPPROTO_TCP)
			return -1;
		if ((void *)(l4 + 8) > data_end)
			return -1;
		__builtin_memcpy(to, f->saddr, 4);
		__builtin_memcpy(to + 1, f->daddr, 4);
		diff = bpf_csum_diff((__u32 *)&ip->saddr, 8, to, 8, 0);
		__builtin_memcpy(&ip->saddr, f->saddr, 4);
		__builtin_memcpy(&ip->daddr, f->daddr, 4);
		ip->check = xdp_csum_apply(ip->check, diff);
		/* One hop less (RFC 1624, as decrease_ttl). */
		__u32 c = ip->check;

		c += bpf_htons(0x0100);
		ip->check = (__u16)(c + (c >= 0xffff));
		ip->ttl--;
	}
	diff = bpf_csum_diff((__u32 *)l4, 4, (__u32 *)ports, 4, diff);
	__builtin_memcpy(l4, ports, 4);
	check = (__be16 *)(l4 + (f->proto == IPPROTO_TCP ? 16 : 6));
	if ((void *)(check + 1) > data_end)
		return -1;
	if (f->proto == IPPROTO_UDP && f->family == CILIA_FAMILY_IPV4 && !*check)
		return 0;
	*check = xdp_csum_apply(*check, diff);
	if (f->proto == IPPROTO_UDP && !*check)
		*check = 0xffff;
	return 0;
}

/* Moves the first `n` bytes at `data + by` to `data` (by > 0: the front
 * grew). Forward, two bytes at a time: a byte is read before its slot is
 * written over. */
#define XDP_MOVE_FRONT(data, data_end, n, by)                                                      \
	do {                                                                                       \
		if ((data) + (n) + (by) > (data_end))                                              \
			return -1;                                                                 \
		_Pragma("unroll") for (int i = 0; i < (n); i += 2)                                 \
		{                                                                                  \
			__u16 w;                                                                   \
			__builtin_memcpy(&w, (data) + (by) + i, 2);                                \
			__builtin_memcpy((data) + i, &w, 2);                                       \
		}                                                                                  \
	} while (0)

/*
 * Inserts the DSR header (the format of dsr_encode) after the fixed IP
 * header: the head grows by `grow` bytes and the Ethernet and IP headers
 * move to the new front. Returns 0, or -1 when the head cannot grow.
 */
__inline_fn int xdp_dsr_encode(struct xdp_md *ctx, const struct lb_state *lb, __u8 family,
			       __u32 grow)
{
	void *data, *data_end;

	if (bpf_xdp_adjust_head(ctx, -(int)grow))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (family == CILIA_FAMILY_IPV4) {
		struct iphdr *ip = data + ETH_HLEN;

		XDP_MOVE_FRONT(data, data_end, XDP_IPV4_END, CILIA_DSR_IPV4_OPT_LEN);
		if (data + XDP_IPV4_END + CILIA_DSR_IPV4_OPT_LEN > data_end)
			return -1;
		dsr_ipv4_option(data + XDP_IPV4_END, lb);
		ip->ihl = 7;
		ip->tot_len = bpf_htons(bpf_ntohs(ip->tot_len) + CILIA_DSR_IPV4_OPT_LEN);
		ip->check = 0;
		ip->check = csum_fold(
		    bpf_csum_diff(0, 0, (__u32 *)ip, sizeof(*ip) + CILIA_DSR_IPV4_OPT_LEN, 0));
		return 0;
	}

	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u8 *ext = data + XDP_IPV6_END;

	XDP_MOVE_FRONT(data, data_end, XDP_IPV6_END, CILIA_DSR_IPV6_HDR_LEN);
	if ((void *)(ext + CILIA_DSR_IPV6_HDR_LEN) > data_end)
		return -1;
	__builtin_memset(ext, 0, CILIA_DSR_IPV6_HDR_LEN);
	dsr_ipv6_header(ext, lb, ip6->nexthdr);
	ip6->nexthdr = IPV6_EXT_DEST_OPTS;
	ip6->payload_len = bpf_htons(bpf_ntohs(ip6->payload_len) + CILIA_DSR_IPV6_HDR_LEN);
	return 0;
}

/* An event of an XDP packet: the fields of the tc one, the frame's first
 * bytes read with bpf_xdp_load_bytes. `rule` 0 keeps event_fill_meta's. */
__inline_fn void xdp_event(struct xdp_md *ctx, __u32 len, __u8 type, __u8 reason,
			   const struct flow *f, const struct peers *p, __u32 rule,
			   const __u8 *frontend, __be16 fport)
{
	struct event *ev = bpf_ringbuf_reserve(&cilia_events, sizeof(*ev), 0);
	__u32 cap = len;

	if (!ev) {
		metrics_count(CILIA_METRIC_LOST, type, CILIA_DIR_INGRESS, 1);
		return;
	}
	event_fill_meta(ev, len, type, reason, CILIA_DIR_INGRESS, f, p, 0);
	if (type == CILIA_EVENT_SERVICE) {
		ev->rule = rule;
		ev->sport = fport;
		__builtin_memcpy(ev->saddr, frontend, 16);
	}
	if (cap > CILIA_EVENT_CAPLEN)
		cap = CILIA_EVENT_CAPLEN;
	ev->caplen = 0;
	/* 1..CILIA_EVENT_CAPLEN (a power of two) in a form the verifier keeps:
	 * the helper takes no zero length. A frame has bytes. */
	cap = ((cap - 1) & (CILIA_EVENT_CAPLEN - 1)) + 1;
	if (bpf_xdp_load_bytes(ctx, 0, ev->data, cap) == 0)
		ev->caplen = cap;
	bpf_ringbuf_submit(ev, 0);
}

/* Sends the rewritten frame to the FIB's next hop: its MACs, and back out
 * of the device it came in by (XDP_TX) or redirected to the FIB's one. */
__inline_fn int xdp_send(struct xdp_md *ctx, const struct bpf_fib_lookup *fib, __u32 ifindex)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	if (fib->ifindex == ifindex)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

/* Counts a packet the XDP program sent on, and traces it (trace level). */
__inline_fn void xdp_forwarded(struct xdp_md *ctx, __u32 len, const struct flow *f,
			       const struct peers *p)
{
	metrics_count(CILIA_METRIC_FORWARD, CILIA_FWD_XDP, CILIA_DIR_INGRESS, len);
	if (event_wanted(monitor_level(), CILIA_EVENT_TRACE))
		xdp_event(ctx, len, CILIA_EVENT_TRACE, CILIA_FWD_XDP, f, p, 0, 0, 0);
}

/* A remote backend's reply to a SNATed NodePort flow (`*hit` set): unSNAT,
 * rev-NAT, out to the client; XDP_PASS when the FIB cannot say where the
 * client is. Any other packet: XDP_PASS, `*hit` clear. */
__inline_fn int xdp_nodeport_reply(struct xdp_md *ctx, __u32 ifindex, struct flow *f, __u32 len,
				   __u8 *hit)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct bpf_fib_lookup *fib = xdp_fib_scratch();
	struct node_config *cfg = node_config();
	__u8 client[16] = {};
	__be16 client_port, fport;

	if (!cfg || !cfg->underlay_ifindex || !fib)
		return XDP_PASS;
	if (!nodeport_unsnat_lookup(f, client, &client_port, &fport))
		return XDP_PASS;
	*hit = 1;
	if (f->hop_limit <= 1)
		return XDP_PASS;
	if (xdp_fib(ctx, fib, ifindex, f->family, f->daddr, client, f->proto,
		    xdp_ip_len(data, data_end, f->family)) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	/* From the node address and nodePort the client addressed. */
	__builtin_memcpy(f->saddr, f->daddr, 16);
	f->sport = fport;
	__builtin_memcpy(f->daddr, client, 16);
	f->dport = client_port;
	if (xdp_rewrite(data, data_end, f))
		return XDP_ABORTED;
	xdp_forwarded(ctx, len, f, 0);
	return xdp_send(ctx, fib, ifindex);
}

/*
 * A client's packet to a NodePort service (`svc`) whose backend is on
 * another node: pinned, SNATed or DSR-encoded, sent to the backend's node.
 * XDP_PASS (tc decides) for a local backend, a service of local backends
 * only, a backend tc cannot route either, a FIB without an answer, or a
 * map update that failed.
 */
__inline_fn int xdp_nodeport_forward(struct xdp_md *ctx, __u32 ifindex, struct flow *f,
				     const struct lb_service_value *svc, __u32 len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct bpf_fib_lookup *fib = xdp_fib_scratch();
	struct lb_state lb = {};
	struct ipcache_value *remote;
	struct lb_backend *b;
	struct ct_key key = {};
	struct ct_value *ct;
	__u8 any[16] = {};
	__u8 dsr = svc->flags & CILIA_LB_FLAG_DSR;
	__u64 now = cil_now();
	__u32 id, grow = 0;
	__u16 o;
	__be16 port;

	if ((svc->flags & CILIA_LB_FLAG_LOCAL) || !fib)
		return XDP_PASS;
	if (f->hop_limit <= 1)
		return XDP_PASS;

	/* Which backend: the pinned one or a new choice, as at tc. Nothing is
	 * written before the packet is known to be ours. */
	id = lb_choose(f, svc, any, now, &key, &o, &ct, &lb.selected);
	b = lb_backend_lookup(id);
	if (!b || b->family != f->family)
		return XDP_PASS;
	if (endpoint_lookup(b->addr, f->family))
		return XDP_PASS;
	remote = ipcache_lookup(b->addr, f->family);
	if (!remote || !remote->tunnel_family)
		return XDP_PASS;
	lb.rev_nat = svc->rev_nat;
	lb.backend_id = id;
	lb.fport = f->dport;
	__builtin_memcpy(lb.frontend, f->daddr, 16);
	if (dsr && dsr_wanted(f, &lb))
		grow = f->family == CILIA_FAMILY_IPV6 ? CILIA_DSR_IPV6_HDR_LEN
						      : CILIA_DSR_IPV4_OPT_LEN;

	/* Where to: the backend's node as next hop, as tc's redirect_neigh
	 * (an IPv6 packet for a node known by IPv4: the backend's route). */
	const __u8 *hop = remote->tunnel_family == f->family ? remote->tunnel : b->addr;

	if (xdp_fib(ctx, fib, ifindex, f->family, dsr ? f->saddr : f->daddr, hop, f->proto,
		    xdp_ip_len(data, data_end, f->family) + grow) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;

	/* Decide: pin the flow, translate it (maps first: a failure leaves the
	 * packet untouched for tc, which drops it with the reason). */
	if (lb_pin(len, &key, o, ct, f, svc->rev_nat, id, now))
		return XDP_PASS;
	__builtin_memcpy(f->daddr, b->addr, 16);
	f->dport = b->port;

	struct peers p = {.src_id = dsr ? ipcache_identity(f->saddr, f->family) : CILIA_ID_HOST,
			  .dst_id = remote->identity};

	if (lb.selected && CILIA_CONFIG.monitor &&
	    event_wanted(monitor_level(), CILIA_EVENT_SERVICE))
		xdp_event(ctx, len, CILIA_EVENT_SERVICE, 0, f, &p, lb.rev_nat, lb.frontend,
			  lb.fport);
	if (!dsr) {
		if (nodeport_snat_port(f, &lb, now, &port))
			return XDP_PASS;
		__builtin_memcpy(f->saddr, lb.frontend, 16);
		f->sport = port;
	}

	/* Act: rewrite, grow the DSR header, send. */
	if (xdp_rewrite(data, data_end, f))
		return XDP_ABORTED;
	if (grow && xdp_dsr_encode(ctx, &lb, f->family, grow))
		return XDP_ABORTED;
	lb_count(len, lb.rev_nat, lb.selected);
	xdp_forwarded(ctx, len, f, &p);
	return xdp_send(ctx, fib, ifindex);
}

/*
 * NodePort in XDP on the node's underlay device: the reply of a SNATed
 * flow, or a client's packet to a remote backend; XDP_PASS for the rest.
 */
__inline_fn int xdp_nodeport(struct xdp_md *ctx, __u16 proto)
{
	/* Read once: the compiler may otherwise keep &ctx->ingress_ifindex,
	 * a modified context pointer the verifier refuses to dereference. */
	__u32 ifindex = ctx->ingress_ifindex;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct lb_service_value *svc;
	struct node_config *cfg;
	struct flow f = {};
	__u32 len = data_end - data;
	__u8 reply = 0;
	int verdict;

	if (xdp_flow_parse(data, data_end, proto, &f))
		return XDP_PASS;
	if (f.family == CILIA_FAMILY_IPV4 && !cfg_ipv4_enabled())
		return XDP_PASS;
	verdict = xdp_nodeport_reply(ctx, ifindex, &f, len, &reply);
	if (reply)
		return verdict;
	cfg = node_config();
	if (!cfg || cfg->tunnel_mode != CILIA_TUNNEL_NATIVE)
		return XDP_PASS;
	svc = nodeport_lookup(&f);
	if (!svc)
		return XDP_PASS;
	return xdp_nodeport_forward(ctx, ifindex, &f, svc, len);
}

#endif
