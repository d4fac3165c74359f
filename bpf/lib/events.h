/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Events for the monitor, through one ring buffer, gated by the monitor
 * level in the config map: with nobody listening (level off) the datapath
 * only counts. An event the ring buffer has no room for is counted as lost,
 * never silently discarded.
 */
#ifndef CILIA_EVENTS_H
#define CILIA_EVENTS_H

#include "common.h"
#include "config.h"
#include "flow.h"
#include "maps.h"
#include "metrics.h"

/* What policy decided for a flow, for counters and events. */
struct decision {
	__u32 rule;	   /* cookie of the deciding entry, 0: default verdict */
	__u8 dir;	   /* direction whose policy decided */
	__u8 verdict;	   /* CILIA_VERDICT_ALLOW, _DENY or _AUDIT */
	__u8 match;	   /* CILIA_MATCH_* */
	__u8 checked;	   /* policy was consulted (a new or re-checked flow) */
	__u32 level;	   /* monitor level, read once per packet with the revision */
	__u8 ct_state;	   /* CILIA_CT_STATE_* */
	__u16 ct_flags;	   /* CILIA_CT_* of the flow's entry (a reply: the forward one's) */
	__be16 proxy_port; /* policy: the allow entry's; a CILIA_CT_TO_PROXY flow: its */
	__u16 rev_nat;	   /* in: the service of a translated packet (stored in a new
			    * flow's entry); out: the forward entry's (a reply: rev-NAT it) */
	__u8 ct_absent;	   /* in: the flow's tuple, as the packet now carries it, had
			    * no conntrack entry either way when the fast path looked
			    * (fast.h): conntrack need not look again */
	__u8 pad;
};

/*
 * The two ends of a packet as policy sees them: their identities, and the
 * local endpoints whose egress / ingress policy applies (0: none, e.g. the
 * host stack or the world). `via_proxy`: the L7 proxy sent the packet for
 * the source (CILIA_MARK_FROM_PROXY), having enforced the L7 policy.
 */
struct peers {
	__u32 src_id;
	__u32 dst_id;
	__u16 egress_ep;
	__u16 ingress_ep;
	__u8 via_proxy;
	__u8 can_assign; /* a node program at tc ingress: may hand a flow to the proxy */
};

/*
 * The endpoint a packet is reported and charged for: the program's own, or
 * for the node programs (no endpoint of their own, endpoint_id 0) the
 * packet's local endpoint.
 */
__inline_fn __u16 local_endpoint(const struct peers *p)
{
	__u16 self = CILIA_CONFIG.endpoint_id;

	return self ? self : (p ? p->ingress_ep : 0);
}

__inline_fn __u32 monitor_level(void)
{
	__u32 zero = 0;
	struct global_config *cfg = bpf_map_lookup_elem(&cilia_config, &zero);

	return cfg ? cfg->monitor_level : CILIA_MONITOR_OFF;
}

/* Whether the monitor `level` asks for events of `type`. */
__inline_fn int event_wanted(__u32 level, __u8 type)
{
	if (!CILIA_CONFIG.monitor || level == CILIA_MONITOR_OFF)
		return 0; /* specialized without events, the verifier prunes the rest */
	if (type == CILIA_EVENT_TRACE)
		return level >= CILIA_MONITOR_TRACE;
	if (type == CILIA_EVENT_DEBUG)
		return level >= CILIA_MONITOR_DEBUG;
	return 1;
}

/*
 * Writes one event in place in the ring buffer (an event is too large for
 * the stack of a program that inlines the whole packet path). `f`, `p` and
 * `d` may be 0 for packets not parsed or not decided. A full ring buffer
 * is counted as lost, never silently.
 */
__inline_fn void event_fill_meta(struct event *ev, __u32 len, __u8 type, __u8 reason, __u8 dir,
				 const struct flow *f, const struct peers *p,
				 const struct decision *d)
{
	ev->ts = bpf_ktime_get_ns();
	ev->type = type;
	ev->reason = reason;
	ev->dir = d ? d->dir : dir;
	ev->verdict = d ? d->verdict : 0;
	ev->endpoint_id = local_endpoint(p);
	/* The local peer: the endpoint at the other end of this program's. */
	ev->peer_endpoint =
	    p && CILIA_CONFIG.endpoint_id && p->egress_ep == CILIA_CONFIG.endpoint_id
		? p->ingress_ep
		: 0;
	ev->src_identity = p ? p->src_id : CILIA_CONFIG.identity;
	ev->dst_identity = p ? p->dst_id : 0;
	ev->rule = d ? d->rule : 0;
	ev->len = len;
	ev->match = d ? d->match : 0;
	ev->family = f ? f->family : 0;
	ev->proto = f ? f->proto : 0;
	ev->sport = f ? f->sport : 0;
	ev->dport = f ? f->dport : 0;
	if (f) {
		__builtin_memcpy(ev->saddr, f->saddr, 16);
		__builtin_memcpy(ev->daddr, f->daddr, 16);
	} else {
		__builtin_memset(ev->saddr, 0, 16);
		__builtin_memset(ev->daddr, 0, 16);
	}
}

/* event_fill_meta, and the packet's first bytes from the socket buffer. */
__inline_fn void event_fill(struct event *ev, struct __sk_buff *skb, __u8 type, __u8 reason,
			    __u8 dir, const struct flow *f, const struct peers *p,
			    const struct decision *d)
{
	event_fill_meta(ev, skb->len, type, reason, dir, f, p, d);
	__u32 cap = skb->len;

	if (cap > CILIA_EVENT_CAPLEN)
		cap = CILIA_EVENT_CAPLEN;
	ev->caplen = 0;
	if (cap > 0 && bpf_skb_load_bytes(skb, 0, ev->data, cap) == 0)
		ev->caplen = cap;
}

__inline_fn void event_emit(struct __sk_buff *skb, __u8 type, __u8 reason, __u8 dir,
			    const struct flow *f, const struct peers *p, const struct decision *d)
{
	struct event *ev = bpf_ringbuf_reserve(&cilia_events, sizeof(*ev), 0);

	if (!ev) {
		metrics_count(CILIA_METRIC_LOST, type, dir, 1);
		return;
	}
	event_fill(ev, skb, type, reason, dir, f, p, d);
	/* Flags 0: the kernel wakes the reader only when this event lands in an
	 * empty ring; the agent then lets a batch gather before draining, so a
	 * busy ring costs one wake-up per batch, not one per event. */
	bpf_ringbuf_submit(ev, 0);
}

/*
 * A new flow to a service was given a backend (monitor level drops and
 * above): the flow `f` already goes to the backend; the source fields name
 * the frontend the client addressed, `rule` the service's rev-NAT id.
 */
__inline_fn void event_service(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
			       const __u8 *frontend, __be16 fport, __u16 rev_nat, __u8 dir)
{
	struct event *ev;

	if (!CILIA_CONFIG.monitor || !event_wanted(monitor_level(), CILIA_EVENT_SERVICE))
		return;
	ev = bpf_ringbuf_reserve(&cilia_events, sizeof(*ev), 0);
	if (!ev) {
		metrics_count(CILIA_METRIC_LOST, CILIA_EVENT_SERVICE, dir, 1);
		return;
	}
	event_fill(ev, skb, CILIA_EVENT_SERVICE, 0, dir, f, p, 0);
	ev->rule = rev_nat;
	ev->sport = fport;
	__builtin_memcpy(ev->saddr, frontend, 16);
	bpf_ringbuf_submit(ev, 0);
}

/* The conntrack state of a packet (debug level). */
__inline_fn void event_debug(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
			     const struct decision *d, __u8 dir)
{
	if (event_wanted(d->level, CILIA_EVENT_DEBUG))
		event_emit(skb, CILIA_EVENT_DEBUG, d->ct_state, dir, f, p, d);
}

/* Policy was consulted for a flow and let it through (or audited it). */
__inline_fn void event_verdict(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
			       const struct decision *d)
{
	if (d->checked && event_wanted(d->level, CILIA_EVENT_POLICY_VERDICT))
		event_emit(skb, CILIA_EVENT_POLICY_VERDICT, 0, d->dir, f, p, d);
}

/* A forwarded packet (trace level); `reason` is a CILIA_FWD_*. */
__inline_fn void event_trace(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
			     __u32 level, __u8 reason, __u8 dir)
{
	if (event_wanted(level, CILIA_EVENT_TRACE))
		event_emit(skb, CILIA_EVENT_TRACE, reason, dir, f, p, 0);
}

/* Count a drop, report it, and return the tc verdict that drops. */
__inline_fn int drop(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	metrics_count(CILIA_METRIC_DROP, reason, dir, skb->len);
	if (CILIA_CONFIG.monitor && event_wanted(monitor_level(), CILIA_EVENT_DROP))
		event_emit(skb, CILIA_EVENT_DROP, reason, dir, 0, 0, 0);
	return TC_ACT_SHOT;
}

/* A drop after the flow was decided: the event names the flow, the peers and,
 * for a policy drop, the decision that denied it. */
__inline_fn int drop_decided(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
			     const struct decision *d, __u8 reason, __u8 dir)
{
	int policy = reason == CILIA_DROP_POLICY;
	__u8 at = policy ? d->dir : dir;

	metrics_count(CILIA_METRIC_DROP, reason, at, skb->len);
	if (event_wanted(d->level, CILIA_EVENT_DROP))
		event_emit(skb, CILIA_EVENT_DROP, reason, at, f, p, policy ? d : 0);
	return TC_ACT_SHOT;
}

__inline_fn void count_forward(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	metrics_count(CILIA_METRIC_FORWARD, reason, dir, skb->len);
}

/*
 * Link chatter of an interface coming up (the container's MLD reports and
 * DAD probe, the host side's router solicitation toward it): each end is
 * the other's only neighbour and the silence is what the protocol expects.
 * Not a drop, so no drop event: one per container start would bury the
 * drops that matter. Counted as forward reason "absorbed".
 */
__inline_fn int absorb(struct __sk_buff *skb, __u8 dir)
{
	metrics_count(CILIA_METRIC_FORWARD, CILIA_FWD_ABSORBED, dir, skb->len);
	return TC_ACT_SHOT;
}

#endif
