/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Policy verdict for one direction of one endpoint, in a constant number of
 * lookups: the longest match for the peer's identity and for "any
 * identity"; the second also returns the endpoint's enforcement marker when
 * no any-identity entry matches (see CILIA_POLICY_MARKER_PREFIX in abi.h),
 * so a packet no entry allows costs two lookups, as an allowed one does.
 * Deny wins; with no match the endpoint is allowed unless a policy selects
 * it in that direction (default deny). An endpoint without a policy map is
 * denied (CILIA_DROP_NO_POLICY).
 */
#ifndef CILIA_POLICY_H
#define CILIA_POLICY_H

#include "common.h"
#include "events.h"
#include "maps.h"

#define POLICY_FULL_PREFIX 64 /* identity + direction + proto + port */

/* The CILIA_ENFORCE* flags of direction `dir` in the marker's value. */
__inline_fn __u8 marker_flags(const struct policy_value *v, __u8 dir)
{
	return dir == CILIA_DIR_EGRESS ? v->match >> CILIA_ENFORCE_EGRESS_SHIFT : v->match & 0xf;
}

/*
 * The marker looked up by itself: for a deny when an any-identity entry
 * hid it from the "any" lookup (its flags then only say whether the deny
 * is audited; none found reads as not audited: the packet is dropped).
 */
__inline_fn __u8 policy_enforcement(void *map, __u8 dir)
{
	struct policy_key key = {.prefixlen = CILIA_POLICY_MARKER_PREFIX};
	struct policy_value *v = bpf_map_lookup_elem(map, &key);

	return v && v->verdict == CILIA_VERDICT_MARKER ? marker_flags(v, dir) : 0;
}

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
	    .prefixlen = POLICY_FULL_PREFIX,
	    .identity = bpf_htonl(peer),
	    .direction = dir,
	    .proto = proto,
	    .dport = dport,
	};
	struct policy_value *v, *any, *hit;
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
	key.identity = 0;
	any = bpf_map_lookup_elem(map, &key);
	/* The marker, with its flags; else an any-identity entry hid it. */
	int marker = any && any->verdict == CILIA_VERDICT_MARKER;

	if (marker)
		flags = marker_flags(any, dir);
	if (v && v->verdict == CILIA_VERDICT_DENY) {
		hit = v;
		goto denied;
	}
	if (any && any->verdict == CILIA_VERDICT_DENY) {
		hit = any;
		goto denied;
	}
	/* A marker met under the peer's identity (identity 0) is no entry. */
	if (v && v->verdict == CILIA_VERDICT_ALLOW)
		hit = v;
	else if (any && any->verdict == CILIA_VERDICT_ALLOW)
		hit = any;
	else if (flags & CILIA_ENFORCE)
		goto refuse;
	else
		return 1;
	d->rule = hit->rule;
	d->match = hit->match;
	d->proxy_port = hit->proxy_port;
	return 1;
denied:
	d->rule = hit->rule;
	d->match = hit->match;
	if (any && !marker)
		flags = policy_enforcement(map, dir);
refuse:
	if (flags & CILIA_ENFORCE_AUDIT) {
		d->verdict = CILIA_VERDICT_AUDIT;
		return 1;
	}
	d->verdict = CILIA_VERDICT_DENY;
	return 0;
}

#endif
