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
	__u8 pad;
};

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
		}
		return 0;
	default:
		return 0;
	}
}

#endif
