/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Fragments. Only the first fragment of a datagram carries the L4 header,
 * so policy and conntrack judge the datagram by it; when it passes, its
 * ports are remembered under (addresses, id, protocol), and the later
 * fragments take them and follow the same flow (including a policy change
 * in between: they meet conntrack as any packet of the flow does). A later
 * fragment with no remembered first one (unknown, denied, out of order or
 * forgotten) is dropped: fail closed.
 */
#ifndef CILIA_FRAG_H
#define CILIA_FRAG_H

#include "common.h"
#include "flow.h"
#include "maps.h"

__inline_fn void frag_key_of(struct frag_key *k, const struct flow *f)
{
	__builtin_memcpy(k->saddr, f->saddr, 16);
	__builtin_memcpy(k->daddr, f->daddr, 16);
	k->id = f->frag_id;
	k->proto = f->proto;
	k->family = f->family;
}

/* Gives a later fragment its datagram's ports. Returns 0 or a drop reason. */
__inline_fn int frag_follow(struct flow *f)
{
	struct frag_key key = {};
	struct frag_value *v;

	if (f->frag != FLOW_FRAG_LATER)
		return 0;
	frag_key_of(&key, f);
	v = bpf_map_lookup_elem(&cilia_frags, &key);
	if (!v || v->expires <= cil_now())
		return CILIA_DROP_FRAG_NO_FLOW;
	f->sport = v->sport;
	f->dport = v->dport;
	return 0;
}

/* After the first fragment of a datagram passed: remember its ports. */
__inline_fn void frag_remember(const struct flow *f)
{
	struct frag_key key = {};
	struct frag_value v = {
	    .expires = cil_now() + CILIA_FRAG_TIMEOUT * NSEC_PER_SEC,
	    .sport = f->sport,
	    .dport = f->dport,
	};

	if (f->frag != FLOW_FRAG_FIRST)
		return;
	frag_key_of(&key, f);
	bpf_map_update_elem(&cilia_frags, &key, &v, BPF_ANY);
}

#endif
