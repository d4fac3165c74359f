/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ICMP errors about translated flows. An error a backend (or a router on
 * the path) sends about a service flow quotes the packet it is about, as
 * the backend saw it: to the backend's address and port. The client's
 * stack matches an error to its socket by the quote, so the quote must
 * name what the client sent (the frontend), and an error the backend
 * itself sent comes from the frontend, as its replies do. Without that the
 * client ignores the error: no ECONNREFUSED for a closed UDP port, no path
 * MTU discovery through a service.
 *
 * The rewrite is incremental and keeps every checksum right: the outer
 * IPv4 header's, the ICMP checksum (over the message; ICMPv6 over the
 * pseudo-header too), the quoted IPv4 header's, and the quoted L4 checksum
 * when the quote holds it. The checksums are computed here, not by the
 * kernel's L4 helpers: the quoted checksums are payload to the kernel, and
 * a consistent rewrite leaves the sum over the whole packet unchanged, so
 * a CHECKSUM_COMPLETE value stays valid.
 */
#ifndef CILIA_LB_ICMP_H
#define CILIA_LB_ICMP_H

#include "common.h"
#include "flow.h"
#include "maps.h"
#include "nat.h"

/* What to change in an ICMP error (icmp_error_rewrite), ICMP_RW_* in `set`. */
#define ICMP_RW_OUTER_SRC 1
#define ICMP_RW_OUTER_DST 2
#define ICMP_RW_INNER_SRC 4
#define ICMP_RW_INNER_DST 8

/* The new values, by pointer (map values or the flow: they are read only
 * while rewriting, in the order outer source, outer destination, quoted
 * destination, quoted source, so one may point at what an earlier step
 * has not changed yet). */
struct icmp_rewrite {
	const __u8 *outer_src;
	const __u8 *outer_dst;
	const __u8 *inner_src; /* with inner_sport */
	const __u8 *inner_dst; /* with inner_dport */
	__be16 inner_sport;
	__be16 inner_dport;
	__u8 set;
	__u8 pad[3];
};

/* A checksum field holding `old`, after the data it covers changed by
 * `diff` (a sum of bpf_csum_diff results). */
__inline_fn __u16 csum_adjust(__u16 old, __u64 diff)
{
	__u64 s = (__u16)~old;

	s += diff;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* The change of a 16-bit field from `from` to `to`, as bpf_csum_diff
 * reports changes. */
__inline_fn __u64 csum_diff16(__be16 from, __be16 to)
{
	__u32 f = from, t = to;
	__s64 d = bpf_csum_diff(&f, 4, &t, 4, 0);

	return d < 0 ? 0 : (__u32)d;
}

/*
 * Writes the address `to` (of the packet's family) at `off`, where `from`
 * was. Returns its change of the checksums that cover it, or -1.
 */
__inline_fn __s64 icmp_store_addr(struct __sk_buff *skb, __u32 off, const __u8 *from,
				  const __u8 *to, __u8 family)
{
	__u32 a[4] = {}, b[4] = {};
	__s64 d;

	if (family == CILIA_FAMILY_IPV6) {
		__builtin_memcpy(a, from, 16);
		__builtin_memcpy(b, to, 16);
		d = bpf_csum_diff(a, 16, b, 16, 0);
		if (d < 0 || bpf_skb_store_bytes(skb, off, b, 16, 0) < 0)
			return -1;
		return (__u32)d;
	}
	__builtin_memcpy(a, from, 4);
	__builtin_memcpy(b, to, 4);
	d = bpf_csum_diff(a, 4, b, 4, 0);
	if (d < 0 || bpf_skb_store_bytes(skb, off, b, 4, 0) < 0)
		return -1;
	return (__u32)d;
}

/* Loads the 16-bit field at `off`, stores `adjusted by diff`; returns the
 * field's own change, or -1. `udp4`: an IPv4 UDP checksum (0: none, stays
 * so; a computed 0 is written as 0xffff). */
__inline_fn __s64 icmp_fix_csum(struct __sk_buff *skb, __u32 off, __u64 diff, int udp4)
{
	__be16 old, new;

	if (bpf_skb_load_bytes(skb, off, &old, 2) < 0)
		return -1;
	if (udp4 && !old)
		return 0;
	new = csum_adjust(old, diff);
	if (udp4 && !new)
		new = 0xffff;
	if (bpf_skb_store_bytes(skb, off, &new, 2, 0) < 0)
		return -1;
	return csum_diff16(old, new);
}

/*
 * Rewrites the ICMP error `f` (f->related: its quote parsed into f->inner,
 * an IPv4 quote without options, an IPv6 quote without extension headers)
 * as `rw` says, `f` with it. Returns 0 or the drop reason.
 */
__inline_fn int icmp_error_rewrite(struct __sk_buff *skb, struct flow *f,
				   const struct icmp_rewrite *rw)
{
	int v6 = f->family == CILIA_FAMILY_IPV6;
	__u32 inner = f->l4_off + 8;
	__u32 inner_l4 = inner + (v6 ? 40 : 20);
	__u32 l4_csum_off;
	__u64 icmp_diff = 0, ip_diff = 0, l4_diff = 0;
	__be16 port;
	__s64 d;

	if (!f->related || !f->l4_off || f->l4_off > FLOW_L4_OFF_MAX)
		return CILIA_DROP_INVALID;
	if (f->inner.proto == IPPROTO_TCP)
		l4_csum_off = inner_l4 + 16;
	else if (f->inner.proto == IPPROTO_UDP)
		l4_csum_off = inner_l4 + 6;
	else
		return CILIA_DROP_INVALID;
	/* A quote too short to hold its L4 checksum keeps none to fix. */
	if (l4_csum_off + 2 > skb->len)
		l4_csum_off = 0;

	/* The outer addresses: the IPv4 header checksum, or the ICMPv6
	 * pseudo-header. */
	if (rw->set & ICMP_RW_OUTER_SRC) {
		d = icmp_store_addr(skb, v6 ? NAT_IPV6_SADDR : NAT_IPV4_SADDR, f->saddr,
				    rw->outer_src, f->family);
		if (d < 0)
			return CILIA_DROP_WRITE_FAILED;
		if (v6)
			icmp_diff += d;
		else if (bpf_l3_csum_replace(skb, NAT_IPV4_CSUM_OFF, 0, d, 0) < 0)
			return CILIA_DROP_WRITE_FAILED;
		__builtin_memcpy(f->saddr, rw->outer_src, 16);
	}
	if (rw->set & ICMP_RW_OUTER_DST) {
		d = icmp_store_addr(skb, v6 ? NAT_IPV6_DADDR : NAT_IPV4_DADDR, f->daddr,
				    rw->outer_dst, f->family);
		if (d < 0)
			return CILIA_DROP_WRITE_FAILED;
		if (v6)
			icmp_diff += d;
		else if (bpf_l3_csum_replace(skb, NAT_IPV4_CSUM_OFF, 0, d, 0) < 0)
			return CILIA_DROP_WRITE_FAILED;
		__builtin_memcpy(f->daddr, rw->outer_dst, 16);
	}

	/* The quote: ICMP message bytes, covered by the quoted IPv4 header
	 * checksum (addresses) and the quoted L4 checksum (pseudo-header
	 * and ports). */
	if (rw->set & ICMP_RW_INNER_DST) {
		d = icmp_store_addr(skb, inner + (v6 ? 24 : 16), f->inner.daddr, rw->inner_dst,
				    f->family);
		if (d < 0)
			return CILIA_DROP_WRITE_FAILED;
		icmp_diff += d;
		ip_diff += d;
		l4_diff += d;
		d = csum_diff16(f->inner.dport, rw->inner_dport);
		port = rw->inner_dport;
		if (bpf_skb_store_bytes(skb, inner_l4 + 2, &port, 2, 0) < 0)
			return CILIA_DROP_WRITE_FAILED;
		icmp_diff += d;
		l4_diff += d;
		__builtin_memcpy(f->inner.daddr, rw->inner_dst, 16);
		f->inner.dport = rw->inner_dport;
	}
	if (rw->set & ICMP_RW_INNER_SRC) {
		d = icmp_store_addr(skb, inner + (v6 ? 8 : 12), f->inner.saddr, rw->inner_src,
				    f->family);
		if (d < 0)
			return CILIA_DROP_WRITE_FAILED;
		icmp_diff += d;
		ip_diff += d;
		l4_diff += d;
		d = csum_diff16(f->inner.sport, rw->inner_sport);
		port = rw->inner_sport;
		if (bpf_skb_store_bytes(skb, inner_l4, &port, 2, 0) < 0)
			return CILIA_DROP_WRITE_FAILED;
		icmp_diff += d;
		l4_diff += d;
		__builtin_memcpy(f->inner.saddr, rw->inner_src, 16);
		f->inner.sport = rw->inner_sport;
	}
	if (!v6 && (rw->set & (ICMP_RW_INNER_SRC | ICMP_RW_INNER_DST))) {
		d = icmp_fix_csum(skb, inner + 10, ip_diff, 0);
		if (d < 0)
			return CILIA_DROP_WRITE_FAILED;
		icmp_diff += d;
	}
	if (l4_csum_off && (rw->set & (ICMP_RW_INNER_SRC | ICMP_RW_INNER_DST))) {
		d = icmp_fix_csum(skb, l4_csum_off, l4_diff, !v6 && f->inner.proto == IPPROTO_UDP);
		if (d < 0)
			return CILIA_DROP_WRITE_FAILED;
		icmp_diff += d;
	}
	if (icmp_fix_csum(skb, f->l4_off + 2, icmp_diff, 0) < 0)
		return CILIA_DROP_WRITE_FAILED;
	return 0;
}

/*
 * An ICMP error about a service flow (`rev_nat` from the flow's forward
 * entry, which the quote matched: client -> backend), on its way to the
 * client: the quote's destination becomes the frontend the client
 * addressed and, when the backend itself sent the error, the outer source
 * too. A NodePort's frontend is the node address and nodePort the client
 * used (the flow's REVNAT entry), and `*nodeport` is set: the error leaves
 * by the underlay device, as the replies do. A service removed meanwhile
 * leaves the error as it is. Returns 0 or the drop reason.
 */
__inline_fn int lb_reverse_icmp(struct __sk_buff *skb, struct flow *f, __u16 rev_nat,
				__u8 *nodeport)
{
	struct icmp_rewrite rw = {.set = ICMP_RW_INNER_DST};
	struct lb_revnat *r;
	__u32 w[4];

	if (!rev_nat || !f->related)
		return 0;
	if (f->inner.proto != IPPROTO_TCP && f->inner.proto != IPPROTO_UDP)
		return 0;
	r = bpf_map_lookup_elem(&cilia_lb_revnat, &rev_nat);
	if (!r || r->family != f->family)
		return 0;
	__builtin_memcpy(w, r->addr, 16);
	if (!(w[0] | w[1] | w[2] | w[3])) {
		/* The quote is client -> backend; the REVNAT entry is keyed by
		 * the reply's tuple, backend -> client. */
		struct lb_nat_key k = {.sport = f->inner.dport,
				       .dport = f->inner.sport,
				       .proto = f->inner.proto,
				       .family = f->family,
				       .dir = CILIA_NAT_REVNAT};
		struct lb_nat_value *v;

		__builtin_memcpy(k.saddr, f->inner.daddr, 16);
		__builtin_memcpy(k.daddr, f->inner.saddr, 16);
		v = bpf_map_lookup_elem(&cilia_lb_nat, &k);
		if (!v)
			return 0;
		rw.inner_dst = v->addr;
		rw.inner_dport = v->port;
		*nodeport = 1;
	} else {
		rw.inner_dst = r->addr;
		rw.inner_dport = r->port;
	}
	if (addr_eq(f->saddr, f->inner.daddr)) {
		rw.set |= ICMP_RW_OUTER_SRC;
		rw.outer_src = rw.inner_dst;
	}
	return icmp_error_rewrite(skb, f, &rw);
}

/*
 * A remote backend's ICMP error about a NodePort flow this node SNATed
 * (the quote: node:snat-port -> backend, whose IN entry names the client):
 * back to the client, quoting what the client sent (client -> node
 * address:nodePort), from the node address when the backend sent it.
 * Returns 0 with `*hit` set when translated, 0 when the packet is no such
 * error, or the drop reason.
 */
__inline_fn int nodeport_unsnat_icmp(struct __sk_buff *skb, struct flow *f, __u8 *hit)
{
	struct icmp_rewrite rw = {.set = ICMP_RW_OUTER_DST | ICMP_RW_INNER_SRC | ICMP_RW_INNER_DST};
	struct lb_nat_key in = {};
	struct lb_nat_value *v;
	int reason;

	if (!f->related || (f->inner.proto != IPPROTO_TCP && f->inner.proto != IPPROTO_UDP) ||
	    !addr_eq(f->inner.saddr, f->daddr))
		return 0;
	__builtin_memcpy(in.saddr, f->inner.daddr, 16);
	__builtin_memcpy(in.daddr, f->inner.saddr, 16);
	in.sport = f->inner.dport;
	in.dport = f->inner.sport;
	in.proto = f->inner.proto;
	in.family = f->family;
	in.dir = CILIA_NAT_IN;
	v = bpf_map_lookup_elem(&cilia_lb_nat, &in);
	if (!v || v->expires <= cil_now())
		return 0;
	/* The node address is the quote's source (checked above) until the
	 * last step rewrites it. */
	rw.outer_dst = v->addr;
	rw.inner_src = v->addr;
	rw.inner_sport = v->port;
	rw.inner_dst = f->inner.saddr;
	rw.inner_dport = v->fport;
	if (addr_eq(f->saddr, f->inner.daddr)) {
		rw.set |= ICMP_RW_OUTER_SRC;
		rw.outer_src = f->inner.saddr;
	}
	reason = icmp_error_rewrite(skb, f, &rw);
	if (!reason)
		*hit = 1;
	return reason;
}

#endif
