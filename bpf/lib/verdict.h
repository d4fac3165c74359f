/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The per-packet decision both address families share, once the flow is
 * parsed: where the packet goes (a local endpoint, or the stack) and whether
 * the policies of both ends let it.
 */
#ifndef CILIA_VERDICT_H
#define CILIA_VERDICT_H

#include "common.h"
#include "config.h"
#include "conntrack.h"
#include "flow.h"
#include "forward.h"
#include "ipcache.h"
#include "events.h"
#include "frag.h"

/* Not a tc verdict: the caller goes on to deliver to a local endpoint. */
#define CILIA_CONTINUE -1

/*
 * From the endpoint: its egress policy and, for a local destination, that
 * endpoint's ingress policy. Returns CILIA_CONTINUE with *ep set when the
 * caller should deliver to that endpoint, else the tc verdict.
 */
__inline_fn int from_container_verdict(struct __sk_buff *skb, const struct flow *f,
				       struct endpoint_info **ep, __u8 dir)
{
	struct endpoint_info *dst = endpoint_lookup(f->daddr, f->family);
	__u32 dst_id = dst ? dst->identity : ipcache_identity(f->daddr, f->family);
	__u16 peer = dst ? dst->endpoint_id : 0;
	struct decision d = {.dir = dir, .verdict = CILIA_VERDICT_ALLOW};
	__u32 src_id = CILIA_CONFIG.identity;

	int reason = flow_allowed(skb, f, CILIA_CONFIG.endpoint_id, peer, src_id, dst_id, &d);

	emit_event(skb, d.level, CILIA_EVENT_DEBUG, d.ct_state, dir, f, src_id, dst_id, peer, &d);
	if (reason == CILIA_DROP_POLICY)
		return drop_policy(skb, f, src_id, dst_id, peer, &d);
	if (reason)
		return drop(skb, reason, dir);
	frag_remember(f);
	if (d.checked)
		emit_event(skb, d.level, CILIA_EVENT_POLICY_VERDICT, 0, d.dir, f, src_id, dst_id,
			   peer, &d);
	if (!dst) {
		count_forward(skb, CILIA_FWD_STACK, dir);
		emit_event(skb, d.level, CILIA_EVENT_TRACE, CILIA_FWD_STACK, dir, f, src_id, dst_id,
			   0, 0);
		return TC_ACT_OK;
	}
	emit_event(skb, d.level, CILIA_EVENT_TRACE, CILIA_FWD_ENDPOINT, dir, f, src_id, dst_id,
		   peer, 0);
	*ep = dst;
	return CILIA_CONTINUE;
}

/* From the node's stack to the endpoint: its ingress policy only. */
__inline_fn int to_container_verdict(struct __sk_buff *skb, const struct flow *f, __u8 dir)
{
	struct decision d = {.dir = dir, .verdict = CILIA_VERDICT_ALLOW};
	__u32 src_id = ipcache_identity(f->saddr, f->family);
	__u32 dst_id = CILIA_CONFIG.identity;

	int reason;

	/*
	 * Local endpoints reach each other by redirect, never through the
	 * stack: a packet from the stack with a local endpoint's source address
	 * was forged there (any local user can bind any address), and must not
	 * pass with that endpoint's identity.
	 */
	if (endpoint_lookup(f->saddr, f->family))
		return drop(skb, CILIA_DROP_SPOOFED_SOURCE, dir);
	reason = flow_allowed(skb, f, 0, CILIA_CONFIG.endpoint_id, src_id, dst_id, &d);
	emit_event(skb, d.level, CILIA_EVENT_DEBUG, d.ct_state, dir, f, src_id, dst_id, 0, &d);
	if (reason == CILIA_DROP_POLICY)
		return drop_policy(skb, f, src_id, dst_id, 0, &d);
	if (reason)
		return drop(skb, reason, dir);
	frag_remember(f);
	if (d.checked)
		emit_event(skb, d.level, CILIA_EVENT_POLICY_VERDICT, 0, d.dir, f, src_id, dst_id, 0,
			   &d);
	emit_event(skb, d.level, CILIA_EVENT_TRACE, CILIA_FWD_ENDPOINT, dir, f, src_id, dst_id, 0,
		   0);
	return TC_ACT_OK;
}

#endif
