/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Policy verdict for one direction of one endpoint, in a constant number of
 * lookups: the enforcement flag, then the longest match for the peer's
 * identity and for "any identity". Deny wins; with no match the endpoint is
 * allowed unless a policy selects it in that direction (default deny). An
 * endpoint without a policy map is denied (CILIA_DROP_NO_POLICY).
 */
#ifndef CILIA_POLICY_H
#define CILIA_POLICY_H

#include "common.h"
#include "events.h"
#include "maps.h"

#define POLICY_FULL_PREFIX 64 /* identity + direction + proto + port */
#define POLICY_L3_PREFIX   40 /* identity + direction */

/*
 * Returns whether the endpoint's policy in `dir` lets a packet from/to
 * `peer` on proto/dport through, and fills `d` with the deciding entry
 * (with its L7 proxy port when that entry is an allow naming one).
 */
__inline_fn int policy_allows(__u32 endpoint_id, __u8 dir, __u32 peer, __u8 proto, __be16 dport,
			      struct decision *d)
{
	void *map = bpf_map_lookup_elem(&cilia_policy, &endpoint_id);
	struct policy_key key = {
	    .prefixlen = POLICY_L3_PREFIX,
	    .identity = bpf_htonl(CILIA_ID_ENFORCEMENT),
	    .direction = dir,
	};
	struct policy_value *v, *hit = 0;
	__u8 flags = 0;

	d->dir = dir;
	d->checked = 1;
	d->rule = 0;
	d->match = CILIA_MATCH_NONE;
	d->verdict = CILIA_VERDICT_ALLOW;
	d->proxy_port = 0;
	if (!map) {
		/* Every endpoint has a map (empty when nothing selects it) from
		 * before its program sees a packet until after it is detached.
		 * None means state is missing or torn: fail closed. */
		d->match = CILIA_MATCH_NO_MAP;
		d->verdict = CILIA_VERDICT_DENY;
		return 0;
	}
	v = bpf_map_lookup_elem(map, &key);
	if (v)
		flags = v->verdict;

	key.prefixlen = POLICY_FULL_PREFIX;
	key.identity = bpf_htonl(peer);
	key.proto = proto;
	key.dport = dport;
	v = bpf_map_lookup_elem(map, &key);
	if (v) {
		hit = v;
		if (v->verdict == CILIA_VERDICT_DENY)
			goto denied;
	}
	key.identity = 0;
	v = bpf_map_lookup_elem(map, &key);
	if (v) {
		if (v->verdict == CILIA_VERDICT_DENY) {
			hit = v;
			goto denied;
		}
		if (!hit)
			hit = v;
	}
	if (hit) {
		d->rule = hit->rule;
		d->match = hit->match;
		d->proxy_port = hit->proxy_port;
		return 1;
	}
	if (!(flags & CILIA_ENFORCE))
		return 1;
	goto refuse;
denied:
	d->rule = hit->rule;
	d->match = hit->match;
refuse:
	if (flags & CILIA_ENFORCE_AUDIT) {
		d->verdict = CILIA_VERDICT_AUDIT;
		return 1;
	}
	d->verdict = CILIA_VERDICT_DENY;
	return 0;
}

#endif
