/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The decision, for both families and both programs: conntrack and the
 * policies of both ends (conntrack.h), with its debug and policy-verdict
 * events; an allowed first fragment leaves its ports for the rest.
 */
#ifndef CILIA_DECIDE_H
#define CILIA_DECIDE_H

#include "common.h"
#include "conntrack.h"
#include "events.h"
#include "flow.h"
#include "frag.h"

/* Returns 0 when the packet may pass, else the drop reason. */
__inline_fn int decide(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
		       struct decision *d, __u8 dir)
{
	int reason = flow_allowed(skb, f, p, d);

	event_debug(skb, f, p, d, dir);
	if (reason)
		return reason;
	frag_remember(f);
	event_verdict(skb, f, p, d);
	return 0;
}

#endif
