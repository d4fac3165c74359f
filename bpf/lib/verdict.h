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
#include "metrics.h"

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
	__u8 deny_dir = dir;

	if (!flow_allowed(skb, f, CILIA_CONFIG.endpoint_id, dst ? dst->endpoint_id : 0,
			  CILIA_CONFIG.identity, dst_id, &deny_dir))
		return drop(skb, CILIA_DROP_POLICY, deny_dir);
	if (!dst) {
		count_forward(skb, CILIA_FWD_STACK, dir);
		return TC_ACT_OK;
	}
	*ep = dst;
	return CILIA_CONTINUE;
}

/* From the node's stack to the endpoint: its ingress policy only. */
__inline_fn int to_container_verdict(struct __sk_buff *skb, const struct flow *f, __u8 dir)
{
	__u8 deny_dir = dir;

	if (!flow_allowed(skb, f, 0, CILIA_CONFIG.endpoint_id,
			  ipcache_identity(f->saddr, f->family), CILIA_CONFIG.identity, &deny_dir))
		return drop(skb, CILIA_DROP_POLICY, deny_dir);
	return TC_ACT_OK;
}

#endif
