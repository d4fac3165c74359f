/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Policy verdict for one direction of one endpoint, in a constant number of
 * lookups: the enforcement flag, then the longest match for the peer's
 * identity and for "any identity". Deny wins; with no match the endpoint is
 * allowed unless a policy selects it in that direction (default deny).
 */
#ifndef CILIA_POLICY_H
#define CILIA_POLICY_H

#include "common.h"
#include "maps.h"

#define POLICY_FULL_PREFIX 64 /* identity + direction + proto + port */
#define POLICY_L3_PREFIX   40 /* identity + direction */

__inline_fn int policy_allows(__u32 endpoint_id, __u8 dir, __u32 peer, __u8 proto, __be16 dport)
{
	void *map = bpf_map_lookup_elem(&cilia_policy, &endpoint_id);
	struct policy_key key = {
	    .prefixlen = POLICY_L3_PREFIX,
	    .identity = bpf_htonl(CILIA_ID_ENFORCEMENT),
	    .direction = dir,
	};
	struct policy_value *v;
	int enforced, allow = 0;

	if (!map)
		return 1; /* no policy map yet: nothing selects the endpoint */
	v = bpf_map_lookup_elem(map, &key);
	enforced = v && v->verdict;

	key.prefixlen = POLICY_FULL_PREFIX;
	key.identity = bpf_htonl(peer);
	key.proto = proto;
	key.dport = dport;
	v = bpf_map_lookup_elem(map, &key);
	if (v) {
		if (v->verdict == CILIA_VERDICT_DENY)
			return 0;
		allow = 1;
	}
	key.identity = 0;
	v = bpf_map_lookup_elem(map, &key);
	if (v) {
		if (v->verdict == CILIA_VERDICT_DENY)
			return 0;
		allow = 1;
	}
	return allow || !enforced;
}

#endif
