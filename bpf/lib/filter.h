/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Address filters (see CILIA_ADDR_FILTER_WORDS in abi.h): one read of a
 * small array before the lookup of a large hash, so that a packet to an
 * address the hash does not hold skips the cold bucket it would touch.
 */
#ifndef CILIA_FILTER_H
#define CILIA_FILTER_H

#include "common.h"

/* An address's bit; IPv4 addresses use the first 4 bytes. */
__inline_fn __u32 addr_filter_bit(const __u8 *addr, __u8 family)
{
	const __u32 *w = (const __u32 *)addr;
	__u32 x = w[0];

	if (family == CILIA_FAMILY_IPV6)
		x ^= w[1] ^ w[2] ^ w[3];
	return (x * (__u32)CILIA_ADDR_FILTER_MUL) >> 16;
}

/* Whether the filter `map` has the address's bit set: the hash behind it
 * may hold the address. */
__inline_fn int addr_filter_has(void *map, const __u8 *addr, __u8 family)
{
	__u32 bit = addr_filter_bit(addr, family);
	__u32 word = bit >> 6;
	__u64 *w = bpf_map_lookup_elem(map, &word);

	/* In bounds, so never missing; were it, the lookup decides. */
	return !w || ((*w >> (bit & 63)) & 1);
}

#endif
