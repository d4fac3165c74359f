/* SPDX-License-Identifier: GPL-2.0 */
/* Includes and small definitions every cilia program needs. */
#ifndef CILIA_COMMON_H
#define CILIA_COMMON_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "cilia/abi.h"

#define __inline_fn static __always_inline

#define NSEC_PER_SEC 1000000000ULL

/* The datapath clock, cil_now(), is in maps.h (it reads a map). */

/* Whether two 16-byte addresses (IPv4 in the first 4 bytes) are equal. */
__inline_fn int addr_eq(const __u8 *a, const __u8 *b)
{
	__u32 x[4], y[4];

	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return !((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]));
}

/* Constants whose UAPI headers drag in libc (ARP) or are kernel-internal (ND). */
#define ARPHRD_ETHER		      1
#define ARPOP_REQUEST		      1
#define ARPOP_REPLY		      2
#define NDISC_ROUTER_SOLICITATION     133
#define NDISC_REDIRECT		      137
#define NDISC_ROUTER_ADVERTISEMENT    134
#define NDISC_NEIGHBOUR_SOLICITATION  135
#define NDISC_NEIGHBOUR_ADVERTISEMENT 136

#endif
