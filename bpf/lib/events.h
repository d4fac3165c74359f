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
	__u32 rule;    /* cookie of the deciding entry, 0: default verdict */
	__u8 dir;      /* direction whose policy decided */
	__u8 verdict;  /* CILIA_VERDICT_ALLOW, _DENY or _AUDIT */
	__u8 match;    /* CILIA_MATCH_* */
	__u8 checked;  /* policy was consulted (a new or re-checked flow) */
	__u32 level;   /* monitor level, read once per packet with the revision */
	__u8 ct_state; /* CILIA_CT_STATE_* */
};

__inline_fn __u32 monitor_level(void)
{
	__u32 zero = 0;
	struct global_config *cfg = bpf_map_lookup_elem(&cilia_config, &zero);

	return cfg ? cfg->monitor_level : CILIA_MONITOR_OFF;
}

/* Emits one event if the monitor `level` asks for its type. `f` may be 0
 * for packets that were not parsed. */
__inline_fn void emit_event(struct __sk_buff *skb, __u32 level, __u8 type, __u8 reason, __u8 dir,
			    const struct flow *f, __u32 src_id, __u32 dst_id, __u16 peer,
			    const struct decision *d)
{
	if (!CILIA_CONFIG.monitor)
		return; /* specialized without events: the verifier prunes the rest */
	if (level == CILIA_MONITOR_OFF ||
	    (type == CILIA_EVENT_TRACE && level < CILIA_MONITOR_TRACE) ||
	    (type == CILIA_EVENT_DEBUG && level < CILIA_MONITOR_DEBUG))
		return;

	/* Built in place in the ring buffer: an event is too large for the
	 * stack of a program that inlines every step of the packet path. */
	struct event *ev = bpf_ringbuf_reserve(&cilia_events, sizeof(*ev), 0);

	if (!ev) {
		metrics_count(CILIA_METRIC_LOST, type, dir, 1);
		return;
	}
	ev->ts = bpf_ktime_get_ns();
	ev->type = type;
	ev->reason = reason;
	ev->dir = d ? d->dir : dir;
	ev->verdict = d ? d->verdict : 0;
	ev->endpoint_id = CILIA_CONFIG.endpoint_id;
	ev->peer_endpoint = peer;
	ev->src_identity = src_id;
	ev->dst_identity = dst_id;
	ev->rule = d ? d->rule : 0;
	ev->len = skb->len;
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
	__u32 cap = skb->len;

	if (cap > CILIA_EVENT_CAPLEN)
		cap = CILIA_EVENT_CAPLEN;
	ev->caplen = 0;
	if (cap > 0 && bpf_skb_load_bytes(skb, 0, ev->data, cap) == 0)
		ev->caplen = cap;
	bpf_ringbuf_submit(ev, 0);
}

/* Count a drop, report it, and return the tc verdict that drops. */
__inline_fn int drop(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	metrics_count(CILIA_METRIC_DROP, reason, dir, skb->len);
	if (CILIA_CONFIG.monitor)
		emit_event(skb, monitor_level(), CILIA_EVENT_DROP, reason, dir, 0,
			   CILIA_CONFIG.identity, 0, 0, 0);
	return TC_ACT_SHOT;
}

/* A policy drop, with the flow and the decision that denied it. */
__inline_fn int drop_policy(struct __sk_buff *skb, const struct flow *f, __u32 src_id, __u32 dst_id,
			    __u16 peer, const struct decision *d)
{
	metrics_count(CILIA_METRIC_DROP, CILIA_DROP_POLICY, d->dir, skb->len);
	emit_event(skb, d->level, CILIA_EVENT_DROP, CILIA_DROP_POLICY, d->dir, f, src_id, dst_id,
		   peer, d);
	return TC_ACT_SHOT;
}

__inline_fn void count_forward(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	metrics_count(CILIA_METRIC_FORWARD, reason, dir, skb->len);
}

#endif
