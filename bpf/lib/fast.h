/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The established-flow fast path of the from-container program: one
 * conntrack lookup per packet, in either direction (the key is the same
 * for both, see ct_key_of in conntrack.h), instead of a service lookup, a
 * destination lookup (hash or LPM) and the conntrack lookups.
 *
 * The full path (lxc.c) remembers in a flow's conntrack entry where it
 * delivered the flow's packets: to a local endpoint (its id, whose delivery
 * is in cilia_endpoint_slots) or to the node's stack. It does so only for
 * the plain cases: a packet neither translated by the load balancer nor
 * through the L7 proxy, no rev-NAT, no fragment, no ICMP error, and only
 * once the flow is established (a forward packet of a live entry, or a
 * reply of a flow whose reply was already seen). The next packet of the
 * flow finds its entry first and is delivered the same way, with the same
 * counters and conntrack updates, skipping the rest.
 *
 * Why this cannot let a packet around the policy: the cache is trusted only
 * while the entry's policy_rev is the datapath's current one, and that
 * revision is bumped by every change of what the full path reads to decide
 * a packet's fate or delivery: policy, endpoints, the ipcache, nodes and
 * services (the agent bumps it after each such write). Every write of an
 * entry's policy_rev clears its cache (conntrack.h), so a re-checked flow
 * takes the full path once more before it is cached again. A denied,
 * revoked, service or proxy entry never takes this path. The guard before
 * it (the source address, the tunnel port, multicast) is unchanged, and
 * so are the drops: anything unusual (a TTL about to expire, monitor
 * tracing on) goes the full way.
 */
#ifndef CILIA_FAST_H
#define CILIA_FAST_H

#include "common.h"
#include "conntrack.h"
#include "eth.h"
#include "events.h"
#include "flow.h"
#include "forward.h"
#include "maps.h"

/* Not a tc verdict: the packet goes the full way. */
#define CILIA_FAST_MISS (-1)

/* Entry flags that keep a flow off the fast path. */
#define CILIA_CT_NOT_FAST                                                                          \
	(CILIA_CT_DENIED | CILIA_CT_SERVICE | CILIA_CT_TO_PROXY | CILIA_CT_FROM_PROXY)

__inline_fn int fast_candidate(const struct flow *f)
{
	return f->frag == FLOW_NOT_FRAG && !f->related && !f->unloop;
}

/* A TCP SYN without ACK opens a connection: nothing to find, and a
 * connection's setup rate is what the fast path's miss would cost. A FIN
 * or a RST changes its flow's state (ct_track_close): the full path's. */
__inline_fn int tcp_state_change(const struct flow *f)
{
	return f->proto == IPPROTO_TCP &&
	       ((f->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN ||
		(f->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)));
}

/*
 * Delivers a packet of an established flow whose entry caches its delivery.
 * Returns the tc verdict, or CILIA_FAST_MISS (nothing changed: the full path
 * decides; it leaves ct_cb_absent set when the flow had no entry).
 */
__inline_fn int fast_established(struct __sk_buff *skb, const struct flow *f, __u8 dir, __u32 *rev)
{
	struct ct_key key = {};
	struct ct_value *ct;
	struct endpoint_info *ep = 0;
	__u32 zero = 0, target;
	__u16 o;
	__u64 now;
	int reply = 0;
	struct global_config *cfg = bpf_map_lookup_elem(&cilia_config, &zero);

	/* Read before anything the full path looks up: the agent bumps the
	 * revision after it changes a map, so a delivery decided from maps
	 * read after this is cached only if no change came in between. */
	*rev = cfg ? cfg->policy_rev : 0;
	ct_cb_set_absent(skb, 0);
	if (!cfg || !fast_candidate(f) || tcp_state_change(f) ||
	    event_wanted(cfg->monitor_level, CILIA_EVENT_TRACE))
		return CILIA_FAST_MISS;
	o = ct_key_of(&key, f);
	ct = bpf_map_lookup_elem(&cilia_ct, &key);
	if (!ct) {
		ct_cb_set_absent(skb, 1);
		return CILIA_FAST_MISS;
	}
	if (ct_forward(ct, o)) {
		if (!(ct->flags & CILIA_CT_FAST_FWD))
			return CILIA_FAST_MISS;
		target = ct->backend_id & 0xffff;
	} else {
		if (!(ct->flags & CILIA_CT_FAST_REPLY))
			return CILIA_FAST_MISS;
		reply = 1;
		target = ct->backend_id >> 16;
	}
	now = cil_now();
	if (ct->policy_rev != *rev || ct->expires <= now || (ct->flags & CILIA_CT_NOT_FAST) ||
	    ct->rev_nat)
		return CILIA_FAST_MISS;
	/* A flow's first reply may come this way (cached when the flow began,
	 * fast_remember): it marks the reply seen, as the full path would. */
	if (reply)
		ct->flags |= CILIA_CT_SEEN_REPLY;
	if (target) {
		ep = bpf_map_lookup_elem(&cilia_endpoint_slots, &target);
		if (!ep || ep->endpoint_id != target || !ep->ifindex)
			return CILIA_FAST_MISS;
		/* An expiring hop limit is the full path's to report. */
		if (decrease_ttl(skb, f->family))
			return CILIA_FAST_MISS;
		if (eth_rewrite(skb, ep->mac, ep->node_mac) < 0)
			return drop(skb, CILIA_DROP_WRITE_FAILED, dir);
	}
	ct->expires = now + ct_lifetime(f, ct->flags);
	if (!reply) {
		ct->packets += 1;
		ct->bytes += skb->len;
	}
	if (!ep) {
		count_forward(skb, CILIA_FWD_STACK, dir);
		return TC_ACT_OK;
	}
	count_forward(skb, CILIA_FWD_ENDPOINT, dir);
	return bpf_redirect_peer(ep->ifindex, 0);
}

/*
 * After the full path delivered a packet of `f` to `target` (an endpoint
 * id, 0 the stack): caches that delivery in the flow's entry, when the
 * packet was a plain one (see the top of this file) of a flow it began or
 * found established, and the entry is at `rev`, the revision read before
 * the full path looked anything up. `translated`: the load balancer
 * rewrote the packet.
 *
 * A flow's first packet caches both ways at once when it goes from this
 * endpoint to another local one: its replies can only come back through
 * that endpoint's from-container program, to this endpoint, and the full
 * path would do nothing else with them (no policy: a reply follows its
 * entry; the fast path marks the reply seen). So of a connection between
 * two local endpoints only the first packet takes the full path; before,
 * the second forward packet and the first reply did too (a third of a
 * short connection's packets).
 */
__inline_fn void fast_remember(const struct flow *f, const struct decision *d, int translated,
			       __u32 rev, __u16 target)
{
	struct ct_key key = {};
	struct ct_value *ct;
	__u16 o;

	/* One test of all, not a branch each: every branch here would split
	 * the verifier's states before the delivery that follows. */
	if ((__u32)translated | f->frag | f->related | f->unloop | d->rev_nat |
	    (d->ct_flags & (CILIA_CT_TO_PROXY | CILIA_CT_FROM_PROXY)))
		return;
	if (d->ct_state == CILIA_CT_STATE_ESTABLISHED || d->ct_state == CILIA_CT_STATE_NEW) {
		o = ct_key_of(&key, f);
		ct = bpf_map_lookup_elem(&cilia_ct, &key);
		if (!ct || !ct_forward(ct, o) || ct->policy_rev != rev ||
		    (ct->flags & CILIA_CT_NOT_FAST) || ct->rev_nat)
			return;
		if (d->ct_state == CILIA_CT_STATE_NEW && target) {
			ct->backend_id = ((__u32)CILIA_CONFIG.endpoint_id << 16) | target;
			ct->flags |= CILIA_CT_FAST_FWD | CILIA_CT_FAST_REPLY;
			return;
		}
		ct->backend_id = (ct->backend_id & 0xffff0000) | target;
		ct->flags |= CILIA_CT_FAST_FWD;
	} else if (d->ct_state == CILIA_CT_STATE_REPLY) {
		o = ct_key_of(&key, f);
		ct = bpf_map_lookup_elem(&cilia_ct, &key);
		if (!ct || ct_forward(ct, o) || ct->policy_rev != rev ||
		    (ct->flags & CILIA_CT_NOT_FAST) || ct->rev_nat ||
		    !(ct->flags & CILIA_CT_SEEN_REPLY))
			return;
		ct->backend_id = (ct->backend_id & 0xffff) | ((__u32)target << 16);
		ct->flags |= CILIA_CT_FAST_REPLY;
	}
}

#endif
