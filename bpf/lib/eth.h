/* SPDX-License-Identifier: GPL-2.0 */
/* Ethernet header access and rewrite. */
#ifndef CILIA_ETH_H
#define CILIA_ETH_H

#include "common.h"

/*
 * Set destination and source MAC, written in place: the Ethernet header is
 * always in the linear data at tc, and a direct write is far cheaper than
 * bpf_skb_store_bytes on the forwarding path. Returns 0, or -1 when the
 * frame is shorter than an Ethernet header.
 */
__inline_fn int eth_rewrite(struct __sk_buff *skb, const __u8 *dst, const __u8 *src)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	return 0;
}

#endif
