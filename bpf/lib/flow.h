/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The flow a packet belongs to: addresses, protocol, ports (the ICMP echo
 * identifier stands in for both ports), TCP flags, fragment position. Parsed
 * once per packet, for both families, and used by conntrack and policy.
 *
 * The parse is where policy is won or lost: the L4 protocol and ports are
 * what L4 rules match, so they come from the real L4 header, past every IPv6
 * extension header, never from the first `nexthdr`. What cannot be parsed
 * with certainty is dropped with a named reason.
 */
#ifndef CILIA_FLOW_H
#define CILIA_FLOW_H

#include "common.h"
#include "config.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

#define ICMP_ECHO_REQUEST   8
#define ICMP_ECHO_REPLY	    0
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY   129

/* ICMP error types that quote the packet they are about. */
#define ICMP_DEST_UNREACH   3
#define ICMP_TIME_EXCEEDED  11
#define ICMP_PARAMETERPROB  12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PARAMPROB    4

/* IPv6 extension headers (RFC 8200 and the IANA registry). */
#define IPV6_EXT_HOP	 0
#define IPV6_EXT_ROUTING 43
#define IPV6_EXT_FRAG	 44
#define IPV6_EXT_AH	 51
#define IPV6_EXT_DEST	 60
#define IPV6_EXT_MOB	 135
#define IPV6_EXT_HIP	 139
#define IPV6_EXT_SHIM6	 140
#define IPV6_EXT_TEST1	 253
#define IPV6_EXT_TEST2	 254

#define IPV4_MF		 0x2000
#define IPV4_OFFSET_MASK 0x1fff

/* Where the L4 header may start at the latest: bounds the parse. */
#define FLOW_L4_OFF_MAX 512

#define FLOW_NOT_FRAG	0
#define FLOW_FRAG_FIRST 1 /* first fragment: carries the L4 header, more follow */
#define FLOW_FRAG_LATER 2 /* later fragment: no L4 header; ports from the first */

struct flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 tcp_flags;
	__u8 related;	/* an ICMP error about the flow in `inner` */
	__u8 frag;	/* FLOW_NOT_FRAG, FLOW_FRAG_* */
	__u8 hop_limit; /* IPv6 hop limit or IPv4 TTL as received */
	__u8 icmp_type; /* ICMP / ICMPv6 type, when proto is one of them */
	__u8 unloop;	/* readdressed from the service loopback address (lb_hairpin_unloop) */
	__u32 l4_off;	/* offset of the L4 header; 0 when this packet has none */
	__u32 frag_id;	/* fragment identification, when frag != FLOW_NOT_FRAG */
	struct ct_key inner;
} __attribute__((aligned(8))); /* addresses read 64 bits at a time (ct_key_of) */

/*
 * Reads the tuple of the packet an ICMP error quotes: its IP header and the
 * first 8 bytes of its L4 header, never more. That packet was sent by the
 * error's destination, so the tuple is a conntrack key as-is. A quote that
 * cannot be read with certainty (IPv4 options, IPv6 extension headers,
 * an error about an ICMP error) leaves the error unrelated: policy decides.
 */
__inline_fn void flow_parse_icmp_error(struct __sk_buff *skb, struct flow *f, __u32 inner)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *p = data + inner;
	__u8 proto;

	if (inner > FLOW_L4_OFF_MAX)
		return;
	if (f->family == CILIA_FAMILY_IPV6) {
		struct ipv6hdr *ip6 = (void *)p;

		if ((void *)(ip6 + 1) + 8 > data_end)
			return;
		__builtin_memcpy(f->inner.saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->inner.daddr, &ip6->daddr, 16);
		proto = ip6->nexthdr;
		p = (void *)(ip6 + 1);
	} else {
		struct iphdr *ip = (void *)p;

		if ((void *)(ip + 1) + 8 > data_end || ip->ihl != 5)
			return;
		__builtin_memcpy(f->inner.saddr, &ip->saddr, 4);
		__builtin_memcpy(f->inner.daddr, &ip->daddr, 4);
		proto = ip->protocol;
		p = (void *)(ip + 1);
	}
	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		__builtin_memcpy(&f->inner.sport, p, 2);
		__builtin_memcpy(&f->inner.dport, p + 2, 2);
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if (p[0] != ICMP_ECHO_REQUEST && p[0] != ICMP_ECHO_REPLY &&
		    p[0] != ICMPV6_ECHO_REQUEST && p[0] != ICMPV6_ECHO_REPLY)
			return;
		__builtin_memcpy(&f->inner.sport, p + 4, 2);
		f->inner.dport = f->inner.sport;
		break;
	default:
		return;
	}
	f->inner.proto = proto;
	f->inner.family = f->family;
	f->related = 1;
}

/*
 * Reads the L4 header at offset `l4`. Returns 0, or -1 when the header the
 * protocol requires is truncated. Protocols without ports get zero ports.
 */
__inline_fn int flow_parse_l4(struct __sk_buff *skb, struct flow *f, __u32 l4)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *p;

	if (l4 > FLOW_L4_OFF_MAX)
		return -1;
	f->l4_off = l4;
	p = data + l4;
	switch (f->proto) {
	case IPPROTO_TCP:
		if ((void *)(p + 14) > data_end)
			return -1;
		__builtin_memcpy(&f->sport, p, 2);
		__builtin_memcpy(&f->dport, p + 2, 2);
		f->tcp_flags = p[13];
		return 0;
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if ((void *)(p + 4) > data_end)
			return -1;
		__builtin_memcpy(&f->sport, p, 2);
		__builtin_memcpy(&f->dport, p + 2, 2);
		return 0;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if ((void *)(p + 8) > data_end)
			return -1;
		f->icmp_type = p[0];
		if (p[0] == ICMP_ECHO_REQUEST || p[0] == ICMP_ECHO_REPLY ||
		    p[0] == ICMPV6_ECHO_REQUEST || p[0] == ICMPV6_ECHO_REPLY) {
			__builtin_memcpy(&f->sport, p + 4, 2);
			f->dport = f->sport;
		} else if ((f->proto == IPPROTO_ICMP &&
			    (p[0] == ICMP_DEST_UNREACH || p[0] == ICMP_TIME_EXCEEDED ||
			     p[0] == ICMP_PARAMETERPROB)) ||
			   (f->proto == IPPROTO_ICMPV6 && p[0] >= ICMPV6_DEST_UNREACH &&
			    p[0] <= ICMPV6_PARAMPROB)) {
			flow_parse_icmp_error(skb, f, l4 + 8);
		}
		return 0;
	default:
		return 0;
	}
}

/*
 * Walks the IPv6 extension headers from offset `off` (just past the fixed
 * header) to the L4 header, at most CILIA_IPV6_EXT_MAX of them. Sets the L4
 * protocol, the fragment position and *off. Returns 0 or a drop reason:
 * a chain too long, a Hop-by-Hop header not first, two Fragment headers, a
 * Routing header with segments left (an endpoint is not a router) and the
 * extension headers nobody here processes (Mobility, HIP, Shim6, testing).
 */
__inline_fn int ipv6_walk_ext(struct __sk_buff *skb, struct flow *f, __u32 *off, __u8 nexthdr)
{
	__u8 hdr[8];

#pragma unroll
	for (int i = 0; i <= CILIA_IPV6_EXT_MAX; i++) {
		switch (nexthdr) {
		case IPV6_EXT_HOP:
			if (i != 0)
				return CILIA_DROP_EXT_HDR;
			break;
		case IPV6_EXT_ROUTING:
		case IPV6_EXT_FRAG:
		case IPV6_EXT_AH:
		case IPV6_EXT_DEST:
			break;
		case IPV6_EXT_MOB:
		case IPV6_EXT_HIP:
		case IPV6_EXT_SHIM6:
		case IPV6_EXT_TEST1:
		case IPV6_EXT_TEST2:
			return CILIA_DROP_EXT_HDR;
		default:
			f->proto = nexthdr;
			return 0;
		}
		if (i == CILIA_IPV6_EXT_MAX || *off > FLOW_L4_OFF_MAX)
			return CILIA_DROP_EXT_HDR;
		if (bpf_skb_load_bytes(skb, *off, hdr, sizeof(hdr)) < 0)
			return CILIA_DROP_INVALID;
		if (nexthdr == IPV6_EXT_FRAG) {
			__u16 frag_off = ((__u16)hdr[2] << 8) | hdr[3];

			if (f->frag != FLOW_NOT_FRAG)
				return CILIA_DROP_EXT_HDR;
			__builtin_memcpy(&f->frag_id, hdr + 4, 4);
			*off += 8;
			if (frag_off & 0xfff8) {
				/* A later fragment: what follows is payload. */
				f->frag = FLOW_FRAG_LATER;
				f->proto = hdr[0];
				return 0;
			}
			/* Offset 0 without "more": an atomic fragment, a whole packet. */
			if (frag_off & 1)
				f->frag = FLOW_FRAG_FIRST;
		} else if (nexthdr == IPV6_EXT_AH) {
			*off += ((__u32)hdr[1] + 2) * 4;
		} else {
			if (nexthdr == IPV6_EXT_ROUTING && hdr[3] != 0)
				return CILIA_DROP_EXT_HDR;
			*off += ((__u32)hdr[1] + 1) * 8;
		}
		nexthdr = hdr[0];
	}
	return CILIA_DROP_EXT_HDR;
}

/* Parses the IPv6 packet after the Ethernet header. Returns 0 or a drop reason. */
__inline_fn int flow_parse_ipv6(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u32 off = ETH_HLEN + sizeof(struct ipv6hdr);
	int reason;

	if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
		return CILIA_DROP_INVALID;
	f->family = CILIA_FAMILY_IPV6;
	f->hop_limit = ip6->hop_limit;
	__builtin_memcpy(f->saddr, &ip6->saddr, 16);
	__builtin_memcpy(f->daddr, &ip6->daddr, 16);
	reason = ipv6_walk_ext(skb, f, &off, ip6->nexthdr);
	if (reason)
		return reason;
	if (f->frag == FLOW_FRAG_LATER)
		return 0;
	return flow_parse_l4(skb, f, off) < 0 ? CILIA_DROP_INVALID : 0;
}

/* Parses the IPv4 packet after the Ethernet header. Returns 0 or a drop reason. */
__inline_fn int flow_parse_ipv4(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u16 frag_off;

	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
		return CILIA_DROP_INVALID;
	f->family = CILIA_FAMILY_IPV4;
	f->proto = ip->protocol;
	f->hop_limit = ip->ttl;
	__builtin_memcpy(f->saddr, &ip->saddr, 4);
	__builtin_memcpy(f->daddr, &ip->daddr, 4);
	frag_off = bpf_ntohs(ip->frag_off);
	if (frag_off & (IPV4_MF | IPV4_OFFSET_MASK))
		f->frag_id = bpf_ntohs(ip->id);
	if (frag_off & IPV4_OFFSET_MASK) {
		f->frag = FLOW_FRAG_LATER;
		return 0;
	}
	if (frag_off & IPV4_MF)
		f->frag = FLOW_FRAG_FIRST;
	return flow_parse_l4(skb, f, ETH_HLEN + ip->ihl * 4) < 0 ? CILIA_DROP_INVALID : 0;
}

/* The Ethernet type of the frame; 0 when it is too short to have one. */
__inline_fn __be16 eth_proto(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return 0;
	return eth->h_proto;
}

/*
 * Parses an IP packet of either family (IPv4 only where the endpoint has
 * it). Returns 0 or a drop reason.
 */
__inline_fn int flow_parse(struct __sk_buff *skb, __be16 proto, struct flow *f)
{
	if (proto == bpf_htons(ETH_P_IPV6))
		return flow_parse_ipv6(skb, f);
	if (proto == bpf_htons(ETH_P_IP) && cfg_ipv4_enabled())
		return flow_parse_ipv4(skb, f);
	return CILIA_DROP_UNSUPPORTED_L3;
}

/* Neighbour discovery: ICMPv6 types 133 to 137. */
__inline_fn int flow_is_nd(const struct flow *f)
{
	return f->proto == IPPROTO_ICMPV6 && f->l4_off &&
	       f->icmp_type >= NDISC_ROUTER_SOLICITATION && f->icmp_type <= NDISC_REDIRECT;
}

/* Multicast, or IPv4 limited broadcast. */
__inline_fn int flow_is_multicast(const struct flow *f)
{
	if (f->family == CILIA_FAMILY_IPV6)
		return f->daddr[0] == 0xff;
	return (f->daddr[0] & 0xf0) == 0xe0 || (f->daddr[0] == 0xff && f->daddr[1] == 0xff &&
						f->daddr[2] == 0xff && f->daddr[3] == 0xff);
}

#endif
