/* SPDX-License-Identifier: GPL-2.0 */
/* Ethernet header access and rewrite. */
#ifndef CILIA_ETH_H
#define CILIA_ETH_H

#include "common.h"

/*
 * Set destination and source MAC. bpf_skb_store_bytes invalidates packet
 * pointers, so callers re-load data/data_end afterwards.
 */
__inline_fn int eth_rewrite(struct __sk_buff *skb, const __u8 *dst, const __u8 *src)
{
	__u8 macs[12];

	__builtin_memcpy(macs, dst, 6);
	__builtin_memcpy(macs + 6, src, 6);
	return bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0);
}

#endif
