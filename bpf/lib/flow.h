/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The flow a packet belongs to: addresses, protocol, ports (the ICMP echo
 * identifier stands in for both ports), TCP flags. Parsed once per packet
 * and used by conntrack and policy.
 */
#ifndef CILIA_FLOW_H
#define CILIA_FLOW_H

#include "common.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04

#define ICMP_ECHO_REQUEST   8
#define ICMP_ECHO_REPLY	    0
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY   129

struct flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 tcp_flags;
	__u8 related; /* an ICMP error about the flow in `inner` */
	struct ct_key inner;
};

/* ICMP error types that quote the packet they are about. */
#define ICMP_DEST_UNREACH   3
#define ICMP_TIME_EXCEEDED  11
#define ICMP_PARAMETERPROB  12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PARAMPROB    4

/*
 * Reads the tuple of the packet an ICMP error quotes (its IP header and
 * the first four bytes of its L4 header, which hold the ports). That packet
 * was sent by the error's destination, so the tuple is a conntrack key as-is.
 */
__inline_fn void flow_parse_icmp_error(struct __sk_buff *skb, struct flow *f, __u32 inner)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *p = data + inner;

	if (f->family == CILIA_FAMILY_IPV6) {
		struct ipv6hdr *ip6 = (void *)p;

		if ((void *)(ip6 + 1) + 4 > data_end)
			return;
		__builtin_memcpy(f->inner.saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->inner.daddr, &ip6->daddr, 16);
		f->inner.proto = ip6->nexthdr;
		p = (void *)(ip6 + 1);
	} else {
		struct iphdr *ip = (void *)p;

		if ((void *)(ip + 1) > data_end || ip->ihl != 5)
			return;
		if ((void *)(ip + 1) + 4 > data_end)
			return;
		__builtin_memcpy(f->inner.saddr, &ip->saddr, 4);
		__builtin_memcpy(f->inner.daddr, &ip->daddr, 4);
		f->inner.proto = ip->protocol;
		p = (void *)(ip + 1);
	}
	__builtin_memcpy(&f->inner.sport, p, 2);
	__builtin_memcpy(&f->inner.dport, p + 2, 2);
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
	__u8 *p = data + l4;

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

#endif
