/* SPDX-License-Identifier: GPL-2.0 */
/* Address -> security identity (and, for a remote prefix, its node), by
 * longest prefix; world when unknown. */
#ifndef CILIA_IPCACHE_H
#define CILIA_IPCACHE_H

#include "common.h"
#include "maps.h"

/* The entry covering `addr`, or 0 (world, not remote). */
__inline_fn struct ipcache_value *ipcache_lookup(const __u8 *addr, __u8 family)
{
	struct ipcache_key key = {.family = family};

	if (family == CILIA_FAMILY_IPV6) {
		key.prefixlen = 32 + 128;
		__builtin_memcpy(key.addr, addr, 16);
	} else {
		key.prefixlen = 32 + 32;
		__builtin_memcpy(key.addr, addr, 4);
	}
	return bpf_map_lookup_elem(&cilia_ipcache, &key);
}

__inline_fn __u32 ipcache_identity(const __u8 *addr, __u8 family)
{
	struct ipcache_value *v = ipcache_lookup(addr, family);

	return v ? v->identity : CILIA_ID_WORLD;
}

#endif
