/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The per-packet load balancer of the endpoint and node programs: a
 * client's packet to a service frontend is pinned to a backend (a service
 * conntrack entry), translated to it (DNAT, nat.h), counted and, for the
 * replies, translated back (the frontend as source). Which backend a new
 * flow gets is lb.h's, shared with the socket-level load balancer. See
 * "Load balancing" in docs/ARCHITECTURE.md.
 */
#ifndef CILIA_LB_PACKET_H
#define CILIA_LB_PACKET_H

#include "common.h"
#include "conntrack.h"
#include "events.h"
#include "flow.h"
#include "lb.h"
#include "maps.h"
#include "nat.h"

/* What the load balancer did to a packet. */
struct lb_state {
	__u8 frontend[16]; /* the frontend the client addressed */
	__be16 fport;
	__u16 rev_nat; /* 0: not a service packet, untouched */
	__u32 backend_id;
	__u8 selected; /* a backend was chosen for the flow by this packet */
	__u8 pad[3];
};

/*
 * Pins the client's flow to a frontend (its tuple before translation, `key`)
 * to `backend_id`: the service conntrack entry, charged to the client
 * endpoint's budget like its flows. An established TCP flow (no SYN) gets
 * the established timeout, so an idle connection keeps its backend as long
 * as its own entry lives. Returns 0 or the drop reason.
 */
__inline_fn int lb_pin(__u32 len, const struct ct_key *key, __u16 o, struct ct_value *ct,
		       const struct flow *f, __u16 rev_nat, __u32 backend_id, __u64 now)
{
	__u16 life_flags =
	    f->proto == IPPROTO_TCP && !(f->tcp_flags & TCP_FLAG_SYN) ? CILIA_CT_SEEN_REPLY : 0;
	__u64 expires = now + ct_lifetime(f, life_flags);

	if (ct) {
		/* The same flow again, or a slot already counted (expired, or
		 * a pin of the tuple's other orientation): refresh or reuse it,
		 * in this packet's orientation. */
		if (ct->backend_id != backend_id || !(ct->flags & CILIA_CT_SERVICE) ||
		    !ct_forward(ct, o)) {
			ct->packets = 0;
			ct->bytes = 0;
			ct->flags = CILIA_CT_SERVICE | o;
			ct->proxy_port = 0;
			ct->src_identity = 0;
			ct->dst_identity = 0;
			ct->policy_rev = 0;
		}
		ct->rev_nat = rev_nat;
		ct->backend_id = backend_id;
		ct->packets += 1;
		ct->bytes += len;
		ct->expires = expires;
		return 0;
	}

	__u32 zero = 0;
	struct global_config *cfg = bpf_map_lookup_elem(&cilia_config, &zero);
	__u32 budget = cfg && cfg->ct_budget ? cfg->ct_budget : CILIA_CT_BUDGET_DEFAULT;
	__u32 owner = local_endpoint(0);
	__u32 *count = bpf_map_lookup_elem(&cilia_ct_count, &owner);
	struct ct_value fresh = {
	    .expires = expires,
	    .packets = 1,
	    .bytes = len,
	    .flags = CILIA_CT_SERVICE | o,
	    .owner = owner,
	    .rev_nat = rev_nat,
	    .backend_id = backend_id,
	};

	if (!count)
		return CILIA_DROP_CT_FULL;
	if (*count >= budget)
		return CILIA_DROP_CT_BUDGET;
	__sync_fetch_and_add(count, 1);
	if (bpf_map_update_elem(&cilia_ct, key, &fresh, BPF_NOEXIST) < 0) {
		__sync_fetch_and_add(count, -1);
		return CILIA_DROP_CT_FULL;
	}
	return 0;
}

__inline_fn void lb_count(__u32 len, __u16 rev_nat, int new_flow)
{
	__u32 index = rev_nat;
	struct lb_stats *s = bpf_map_lookup_elem(&cilia_lb_stats, &index);

	if (!s)
		return;
	s->flows += new_flow ? 1 : 0;
	s->packets += 1;
	s->bytes += len;
}

/*
 * The backend of the flow of `f` to the service whose master entry is `svc`
 * (its frontend address in the services map `vip`: the packet's
 * destination, or the unspecified address of a NodePort): the one its
 * service conntrack entry pins while that backend exists, else a newly
 * selected one (`*selected` set). Nothing is pinned yet: `key` and `*ct`
 * are what lb_pin needs. Returns the backend id, 0 when there is none.
 * Context-free (maps only): the tc and the XDP load balancers share it.
 */
__inline_fn __u32 lb_choose(const struct flow *f, const struct lb_service_value *svc,
			    const __u8 *vip, __u64 now, struct ct_key *key, __u16 *o,
			    struct ct_value **ct, __u8 *selected)
{
	struct ct_value *pinned;

	*o = ct_key_of(key, f);
	key->kind = CILIA_CT_KEY_SERVICE;
	pinned = bpf_map_lookup_elem(&cilia_ct, key);
	*ct = pinned;
	if (pinned && pinned->expires > now && (pinned->flags & CILIA_CT_SERVICE) &&
	    ct_forward(pinned, *o) && pinned->rev_nat == svc->rev_nat &&
	    lb_backend_lookup(pinned->backend_id))
		return pinned->backend_id;
	*selected = 1;
	return lb_select_backend(vip, f->dport, f->proto, f->family, svc, f->saddr, f->sport, now);
}

/*
 * The flow of `f` to the service whose master entry is `svc` (see
 * lb_choose for `vip`): the pinned or a newly selected backend, the pin
 * written, the destination rewritten to the backend, counted. Returns 0 or
 * the drop reason; `lb` says what was done.
 */
__inline_fn int lb_translate_to(struct __sk_buff *skb, struct flow *f, struct lb_state *lb,
				const struct lb_service_value *svc, const __u8 *vip)
{
	struct lb_backend *b;
	struct ct_key key = {};
	struct ct_value *ct;
	__u32 id;
	__u16 o;
	__u64 now;
	int reason;

	if (f->frag != FLOW_NOT_FRAG)
		return CILIA_DROP_LB_FRAGMENT;
	now = cil_now();
	id = lb_choose(f, svc, vip, now, &key, &o, &ct, &lb->selected);
	b = lb_backend_lookup(id);
	if (!b || b->family != f->family)
		return CILIA_DROP_NO_BACKEND;
	reason = lb_pin(skb->len, &key, o, ct, f, svc->rev_nat, id, now);
	if (reason)
		return reason;
	lb->rev_nat = svc->rev_nat;
	lb->backend_id = id;
	ct_cb_set_absent(skb, 0); /* the tuple changes */
	lb->fport = f->dport;
	__builtin_memcpy(lb->frontend, f->daddr, 16);
	reason = nat_rewrite(skb, f, 1, b->addr, b->port);
	if (reason)
		return reason;
	lb_count(skb->len, lb->rev_nat, lb->selected);
	return 0;
}

/*
 * The load balancer of a client's packet (from-container, before the
 * destination lookup): a TCP or UDP packet to a frontend goes to the
 * backend its flow is pinned to while that backend exists, else to one
 * lb_select_backend picks (none: CILIA_DROP_NO_BACKEND); its destination
 * is rewritten to the backend, so everything after it (destination,
 * policy, conntrack, delivery) sees the backend. Every other packet costs
 * a read of the frontend filter, and a hash lookup only when its
 * destination's filter bit is set. A fragment to a frontend is dropped
 * (CILIA_DROP_LB_FRAGMENT): its later fragments carry no ports to
 * translate by. ICMP packets are never translated. Returns 0 or the drop
 * reason; `lb` says what was done.
 */
__inline_fn int lb_translate(struct __sk_buff *skb, struct flow *f, struct lb_state *lb)
{
	struct lb_service_value *svc;

	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return 0;
	if (!lb_maybe_frontend(f->daddr, f->family))
		return 0;
	svc = lb_service_lookup(f->daddr, f->dport, f->proto, f->family);
	if (!svc)
		return 0;
	return lb_translate_to(skb, f, lb, svc, f->daddr);
}

/* The service loopback address of the family (CILIA_LB_LOOPBACK_*), 16
 * bytes, IPv4 in the first 4. */
__inline_fn void lb_loopback(__u8 *addr, __u8 family)
{
	__u32 w[4] = {};

	if (family == CILIA_FAMILY_IPV6) {
		w[0] = bpf_htonl((__u32)((__u64)CILIA_LB_LOOPBACK_IPV6_HI >> 32));
		w[1] = bpf_htonl((__u32)CILIA_LB_LOOPBACK_IPV6_HI);
		w[2] = bpf_htonl((__u32)((__u64)CILIA_LB_LOOPBACK_IPV6_LO >> 32));
		w[3] = bpf_htonl((__u32)CILIA_LB_LOOPBACK_IPV6_LO);
	} else {
		w[0] = bpf_htonl(CILIA_LB_LOOPBACK_IPV4);
	}
	__builtin_memcpy(addr, w, 16);
}

__inline_fn int lb_is_loopback(const __u8 *addr, __u8 family)
{
	__u8 lo[16];

	lb_loopback(lo, family);
	return addr_eq(addr, lo);
}

/*
 * Hairpin, forward (at delivery, after policy): a service packet whose
 * backend is the client endpoint itself (source and destination are its
 * address) gets the service loopback address as source, so that the
 * endpoint's kernel takes it (a packet from its own address on its
 * interface would be martian); the client's port stays, so the reply (to
 * the loopback address, see lb_hairpin_unloop) names the flow. Conntrack
 * and policy saw the flow endpoint -> endpoint. Returns 0 or the drop
 * reason.
 */
__inline_fn int lb_hairpin(struct __sk_buff *skb, struct flow *f, __u16 rev_nat)
{
	__u8 lo[16];

	if (!rev_nat || (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP) ||
	    !addr_eq(f->saddr, f->daddr))
		return 0;
	lb_loopback(lo, f->family);
	return nat_rewrite(skb, f, 0, lo, f->sport);
}

/*
 * Hairpin, reply (before the destination lookup): the endpoint's answer to
 * the service loopback address is addressed back to the endpoint itself
 * (its own address, the packet's source; the port says which socket), so
 * conntrack finds the flow it answers (endpoint -> endpoint) and the reply
 * gets the frontend as source like any other. Anything else sent to the
 * loopback address becomes the endpoint's traffic to itself, which policy
 * judges and its kernel drops. Only `f` changes here (`f->unloop` set):
 * the packet is rewritten at delivery (lb_hairpin_unloop_packet), as
 * rewriting it before the decision had the verifier explore the decision
 * twice. Returns 0 or the drop reason.
 */
__inline_fn int lb_hairpin_unloop(struct __sk_buff *skb, struct flow *f)
{
	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return 0;
	if (!lb_is_loopback(f->daddr, f->family))
		return 0;
	f->unloop = 1;
	ct_cb_set_absent(skb, 0); /* the tuple changes */
	/* The endpoint's own address, read from the packet: copied from
	 * f->saddr, the verifier would track the two as one value and prune
	 * far less (909k instructions against 432k, dual-stack endpoint). */
	if (f->family == CILIA_FAMILY_IPV6)
		return bpf_skb_load_bytes(skb, NAT_IPV6_SADDR, f->daddr, 16) < 0
			   ? CILIA_DROP_INVALID
			   : 0;
	return bpf_skb_load_bytes(skb, NAT_IPV4_SADDR, f->daddr, 4) < 0 ? CILIA_DROP_INVALID : 0;
}

/*
 * After the decision, of a packet lb_hairpin_unloop readdressed: its destination
 * (still the loopback address in the packet) becomes the endpoint's own.
 * Returns 0 or the drop reason.
 */
__inline_fn int lb_hairpin_unloop_packet(struct __sk_buff *skb, struct flow *f)
{
	__u8 self[16];

	if (!f->unloop)
		return 0;
	__builtin_memcpy(self, f->daddr, 16);
	lb_loopback(f->daddr, f->family);
	f->unloop = 0;
	return nat_rewrite(skb, f, 1, self, f->dport);
}

/*
 * A reply of a flow to a service backend (its forward entry has
 * `rev_nat`): the source becomes the frontend the client addressed, so the
 * client's socket recognises it. A service removed meanwhile has no rev-NAT
 * entry any more: the reply passes as it is. A NodePort's reply gets the
 * node address and nodePort the client addressed (the REVNAT entry of
 * cilia_lb_nat) and `*nodeport` set: it leaves by the underlay device.
 * Returns 0 or the drop reason.
 */
__inline_fn int lb_reverse_to(struct __sk_buff *skb, struct flow *f, __u16 rev_nat, __u8 *nodeport)
{
	struct lb_revnat *r;
	__u8 zero[16] = {};

	if (!rev_nat)
		return 0;
	r = bpf_map_lookup_elem(&cilia_lb_revnat, &rev_nat);
	if (!r || r->family != f->family)
		return 0;
	if (addr_eq(r->addr, zero)) {
		/* A NodePort: the node address the client addressed, kept
		 * when the flow was translated. */
		struct lb_nat_key k = {.sport = f->sport,
				       .dport = f->dport,
				       .proto = f->proto,
				       .family = f->family,
				       .dir = CILIA_NAT_REVNAT};
		struct lb_nat_value *v;

		__builtin_memcpy(k.saddr, f->saddr, 16);
		__builtin_memcpy(k.daddr, f->daddr, 16);
		v = bpf_map_lookup_elem(&cilia_lb_nat, &k);
		if (!v)
			return 0;
		*nodeport = 1;
		return nat_rewrite(skb, f, 0, v->addr, v->port);
	}
	return nat_rewrite(skb, f, 0, r->addr, r->port);
}

__inline_fn int lb_reverse(struct __sk_buff *skb, struct flow *f, __u16 rev_nat)
{
	__u8 nodeport = 0;

	return lb_reverse_to(skb, f, rev_nat, &nodeport);
}

#endif
