/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Connection tracking and the per-flow policy decision. A flow's first
 * packet meets the policy; later forward packets skip it while the policy
 * revision they were checked at is current (after any policy change they
 * meet it again, so revoking a policy stops open connections); replies are
 * allowed because the forward direction was. Entries expire by timeout; the
 * agent garbage-collects expired ones. Every write of an entry's policy_rev
 * clears its cached deliveries (CILIA_CT_FAST_*, see fast.h).
 */
#ifndef CILIA_CONNTRACK_H
#define CILIA_CONNTRACK_H

#include "common.h"
#include "flow.h"
#include "maps.h"
#include "config.h"
#include "events.h"
#include "policy.h"

/*
 * An opaque copy of `v`: clang can no longer see where it came from, so it
 * cannot turn the arithmetic below back into comparisons, which the BPF
 * backend would emit as branches.
 */
__inline_fn __u64 ct_opaque(__u64 v)
{
	asm volatile("" : "+r"(v));
	return v;
}

/* The sign bit of `v` as 0 or 1, in one instruction clang cannot rewrite. */
__inline_fn __u64 ct_sign(__u64 v)
{
	asm volatile("%[v] >>= 63" : [v] "+r"(v));
	return v;
}

/*
 * Whether the address `s` sorts after `d`: 1 or 0, as four 32-bit words
 * compared lexicographically, in arithmetic (no branch per word).
 */
__inline_fn __u64 ct_addr_after(const __u32 *s, const __u32 *d)
{
	__u64 after = 0, same = 1;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u64 x = ct_opaque(s[i]), y = ct_opaque(d[i]);
		__u64 gt = ct_sign(y - x), lt = ct_sign(x - y);

		after |= same & gt;
		same &= (gt | lt) ^ 1;
	}
	return after;
}

/*
 * Writes the ends of `f` into `k`, exchanged when `swap` (0 or 1) is 1:
 * under a mask of all ones or zeros, not by a branch, 64 bits at a time
 * (both structs are 8-byte aligned for it). The words written are new
 * values to the verifier; copied, each would carry the identity of the
 * flow field it came from, and the two orientations' states would never
 * prune each other.
 */
__inline_fn void ct_key_ends(struct ct_key *k, const struct flow *f, __u64 swap)
{
	const __u64 *s = (const __u64 *)f->saddr, *d = (const __u64 *)f->daddr;
	__u64 *ks = (__u64 *)k->saddr, *kd = (__u64 *)k->daddr;
	__u64 mask = ct_opaque(0 - swap);

#pragma unroll
	for (int i = 0; i < 2; i++) {
		__u64 x = (s[i] ^ d[i]) & mask;

		ks[i] = s[i] ^ x;
		kd[i] = d[i] ^ x;
	}
	__u16 p = (f->sport ^ f->dport) & (__u16)mask;

	k->sport = f->sport ^ p;
	k->dport = f->dport ^ p;
}

/*
 * The canonical key of the flow of `f` (see struct ct_key in abi.h): both
 * directions of a flow get the same key, so one lookup finds the flow
 * whichever end sent the packet. Returns the packet's orientation: 0 when
 * its source is the key's first end, CILIA_CT_SWAPPED when it is the
 * second (an entry whose flags carry the same orientation was begun by
 * this end).
 *
 * The ports decide unless they are equal (an ICMP echo, or two ends of one
 * port), then the addresses. Each way ends in a value the verifier does
 * not know (arithmetic, not a constant per branch), so the states of both
 * ways are one again when this returns: with a constant orientation per
 * branch, the verifier explored the rest of the program once per
 * orientation (946k instructions against 404k for the dual-stack
 * from-container program).
 */
__inline_fn __u16 ct_key_of(struct ct_key *k, const struct flow *f)
{
	__u64 after;
	__u16 o;

	if (f->sport != f->dport)
		after = ct_sign(ct_opaque(f->dport) - ct_opaque(f->sport));
	else
		after = ct_addr_after((const __u32 *)f->saddr, (const __u32 *)f->daddr);
	o = (__u16)(after * CILIA_CT_SWAPPED);
	ct_key_ends(k, f, after);
	k->proto = f->proto;
	k->family = f->family;
	return o;
}

/* Whether a packet of orientation `o` travels the way the entry's flow
 * began (a forward packet), rather than back (a reply). */
__inline_fn int ct_forward(const struct ct_value *ct, __u16 o)
{
	return (ct->flags & CILIA_CT_SWAPPED) == o;
}

__inline_fn void ct_key_reverse(struct ct_key *r, const struct ct_key *k)
{
	__builtin_memcpy(r->saddr, k->daddr, 16);
	__builtin_memcpy(r->daddr, k->saddr, 16);
	r->sport = k->dport;
	r->dport = k->sport;
	r->proto = k->proto;
	r->family = k->family;
}

__inline_fn __u64 ct_lifetime(const struct flow *f, __u16 flags)
{
	if (f->proto != IPPROTO_TCP)
		return CILIA_CT_OTHER_TIMEOUT * NSEC_PER_SEC;
	if ((f->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) || (flags & CILIA_CT_CLOSING))
		return CILIA_CT_TCP_CLOSE * NSEC_PER_SEC;
	if (flags & CILIA_CT_SEEN_REPLY)
		return CILIA_CT_TCP_TIMEOUT * NSEC_PER_SEC;
	return CILIA_CT_TCP_SYN_TIMEOUT * NSEC_PER_SEC;
}

/*
 * A passing TCP packet's part in closing its flow, as the marks `flags`
 * with the caller's bits `closing`, `fin_fwd`, `fin_reply` (`reply`: the
 * packet answers the flow's first one). A RST closes the flow; a FIN closes
 * its direction, and FINs both ways close it (the last ACK of a graceful
 * close comes after both FINs, and would otherwise give the entry an
 * established connection's lifetime: hours of the endpoint's budget, or of
 * a SNAT port, for a connection that ended). A half-closed connection
 * keeps its lifetime. A SYN opening a connection on the tuple again starts
 * it afresh. Conntrack (ct_track_close) and NodePort's SNAT entries keep
 * these marks.
 */
__inline_fn __u32 tcp_close_marks(__u32 flags, const struct flow *f, const int reply,
				  const __u32 closing, const __u32 fin_fwd, const __u32 fin_reply)
{
	/* tcp_flags is 0 for a packet that is not TCP. */
	const __u32 tf = f->tcp_flags;

	if (!(tf & (TCP_FLAG_FIN | TCP_FLAG_RST | TCP_FLAG_SYN)))
		return flags; /* most packets */
	if (!reply && (tf & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		flags &= ~(closing | fin_fwd | fin_reply);
	if (tf & TCP_FLAG_RST)
		flags |= closing;
	if (tf & TCP_FLAG_FIN)
		flags |= reply ? fin_reply : fin_fwd;
	if ((flags & (fin_fwd | fin_reply)) == (fin_fwd | fin_reply))
		flags |= closing;
	return flags;
}

/* tcp_close_marks on a conntrack entry. Never called for a revoked flow:
 * its entry keeps the lifetime that keeps it revoked. */
__inline_fn void ct_track_close(struct ct_value *ct, const struct flow *f, const int reply)
{
	if (f->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST | TCP_FLAG_SYN))
		ct->flags = (__u16)tcp_close_marks(ct->flags, f, reply, CILIA_CT_CLOSING,
						   CILIA_CT_FIN_FWD, CILIA_CT_FIN_REPLY);
}

/*
 * Whether the established-flow fast path (fast.h) found no entry for the
 * packet's flow (its one key for both directions), so that conntrack need not look
 * again for a new flow's first packet. Kept in the skb's control block,
 * which the verifier does not track as a value: as a variable it would
 * know, the rest of the program was verified once per value (dual-stack
 * from-container 556k -> 729k instructions; 615k this way). Reset first
 * thing by the fast path, so nothing the container's stack left in the
 * control block is ever read; cleared by whatever rewrites the tuple
 * before conntrack sees it (the load balancer), so it always describes the
 * tuple conntrack looks up. Only the from-container program
 * sets and reads it (d->ct_absent); an entry another CPU creates after the
 * fast path looked only makes the packet meet the policy as a new flow's
 * first packet, so nothing is skipped that could let a packet through.
 * In assembly: clang would otherwise keep &skb->cb as a pointer of its
 * own, and the verifier admits accesses through the context pointer
 * itself only. Read as stored (1 or 0), not compared: a comparison would
 * hand the verifier a known value again.
 */
#define CT_CB_ABSENT (offsetof(struct __sk_buff, cb) + 0)

__inline_fn __u8 ct_cb_absent(struct __sk_buff *skb)
{
	__u32 v;

	asm volatile("%[v] = *(u32 *)(%[skb] + %[off])"
		     : [v] "=r"(v)
		     : [skb] "r"(skb), [off] "i"(CT_CB_ABSENT));
	return v;
}

__inline_fn void ct_cb_set_absent(struct __sk_buff *skb, __u32 v)
{
	asm volatile("*(u32 *)(%[skb] + %[off]) = %[v]"
		     :
		     : [v] "r"(v), [skb] "r"(skb), [off] "i"(CT_CB_ABSENT));
}

/* Not a drop reason: the packet may pass. */
#define CILIA_PASS 0

/*
 * A tracked flow that the policy no longer allows keeps its entry, marked
 * denied at this revision. Deleting it would let the peer's next packet
 * start a "new" flow in the other direction, of which the revoked side's
 * packets would then be replies. Returns the drop reason.
 */
__inline_fn int ct_revoke(struct ct_value *ct, __u32 rev, const struct decision *d)
{
	/* A missing policy map drops the packet but revokes nothing: the
	 * flow is judged again once the map is back. */
	if (d->match == CILIA_MATCH_NO_MAP)
		return CILIA_DROP_NO_POLICY;
	if (ct) {
		ct->flags = (ct->flags | CILIA_CT_DENIED) & ~CILIA_CT_FAST_MASK;
		ct->policy_rev = rev;
	}
	return CILIA_DROP_POLICY;
}

__inline_fn int ct_live(const struct ct_value *ct, __u64 now)
{
	return ct && ct->expires > now && !(ct->flags & CILIA_CT_DENIED);
}

/*
 * Whether the live flow `ct`, found by an ICMP error's quote of
 * orientation `o`, is one the quote belongs to: the quote is its forward
 * packet (an error about a service flow leaves its rev-NAT id, unless it
 * went through the L7 proxy), or a reply that was seen.
 */
__inline_fn int ct_quotes(const struct ct_value *ct, __u16 o, __u16 *rev_nat)
{
	if (ct_forward(ct, o)) {
		if (!(ct->flags & CILIA_CT_FROM_PROXY))
			*rev_nat = ct->rev_nat;
		return 1;
	}
	return (ct->flags & CILIA_CT_SEEN_REPLY) != 0;
}

/*
 * Whether an ICMP error belongs to the flow it quotes. The quote must be a
 * packet the error's destination sent to its source: an endpoint is not a
 * router, so it may only quote packets that were sent to it (from the stack,
 * `from_endpoint` 0, a router on the path may report about the endpoint's
 * packet, so only the quoted source is checked). And the flow must be
 * tracked in the quoted direction: the quote is its forward packet, or a
 * reply that was seen. Anything else meets policy as plain ICMP. A service
 * entry (the client's tuple to a frontend) is no flow of its own. An error
 * about a service flow's forward packet (client -> backend, not through
 * the L7 proxy) leaves the flow's rev-NAT id in `*rev_nat`: the error is
 * translated back to the frontend on its way to the client (lb_icmp.h).
 */
__inline_fn int ct_related(const struct flow *f, int from_endpoint, __u64 now, __u16 *rev_nat)
{
	struct ct_key rev = {};
	struct ct_value *ct;

	if (!f->related || !addr_eq(f->inner.saddr, f->daddr))
		return 0;
	if (from_endpoint && !addr_eq(f->inner.daddr, f->saddr))
		return 0;
	/* The quote as it was sent is the flow's key when its ends are in
	 * canonical order, else the quote reversed is: two lookups (for an
	 * ICMP error only), but no canonical copy of the quote, whose
	 * spills the to-container program has no stack for. */
	ct = bpf_map_lookup_elem(&cilia_ct, &f->inner);
	if (ct_live(ct, now) && !(ct->flags & CILIA_CT_SERVICE))
		return ct_quotes(ct, 0, rev_nat);
	ct_key_reverse(&rev, &f->inner);
	ct = bpf_map_lookup_elem(&cilia_ct, &rev);
	if (!ct_live(ct, now) || (ct->flags & CILIA_CT_SERVICE))
		return 0;
	return ct_quotes(ct, CILIA_CT_SWAPPED, rev_nat);
}

/*
 * A reply of a flow checked at an older policy revision: the policies that
 * let the forward direction in must still do so, else the responder could
 * keep a revoked flow alive by talking. The forward flow ran from this
 * packet's destination to its source, to this packet's source port.
 */
__inline_fn int reply_still_allowed(const struct flow *f, const struct peers *p, struct decision *d)
{
	if (p->ingress_ep &&
	    !policy_allows(p->ingress_ep, CILIA_DIR_EGRESS, p->src_id, f->proto, f->sport, d))
		return 0;
	if (p->egress_ep) {
		struct decision in = {.level = d->level, .ct_state = d->ct_state};

		if (!policy_allows(p->egress_ep, CILIA_DIR_INGRESS, p->dst_id, f->proto, f->sport,
				   &in)) {
			*d = in;
			return 0;
		}
	}
	return 1;
}

/*
 * Creates the conntrack entry of a new flow, charged to this endpoint's
 * budget (a node program's: the destination endpoint's). Returns 0 or the
 * drop reason: budget used up, or table full.
 */
__inline_fn int ct_create(struct __sk_buff *skb, const struct ct_key *key, __u16 o,
			  const struct flow *f, __u32 rev, __u32 budget, const struct peers *p,
			  __u64 now, const struct decision *d)
{
	__u32 owner = local_endpoint(p);
	__u32 *count = bpf_map_lookup_elem(&cilia_ct_count, &owner);
	struct ct_value fresh = {
	    .expires = now + ct_lifetime(f, 0),
	    .packets = 1,
	    .bytes = skb->len,
	    .policy_rev = rev,
	    .src_identity = p->src_id,
	    .dst_identity = p->dst_id,
	    .flags = d->ct_flags | o,
	    .owner = owner,
	    .proxy_port = d->proxy_port,
	    .rev_nat = d->rev_nat,
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

/*
 * How a new flow that policy allowed travels, as the CILIA_CT_* flags of
 * its entry (d->ct_flags; d->proxy_port stays set only for a redirect).
 * Sent by the L7 proxy for a client: FROM_PROXY (the proxy enforced L7;
 * its replies go back to it). Allowed by an entry naming a proxy port:
 * TO_PROXY, possible only for TCP and at a tc ingress hook, where a packet
 * can be assigned to the proxy's socket (an endpoint's from-container
 * program, or a node program: `can_assign`); anywhere else the flow is
 * dropped (fail closed). Returns 0 or the drop reason.
 */
__inline_fn int ct_new_flow_mode(const struct flow *f, const struct peers *p, struct decision *d)
{
	d->ct_flags = 0;
	if (p->via_proxy) {
		d->ct_flags = CILIA_CT_FROM_PROXY;
		d->proxy_port = 0;
		return 0;
	}
	if (!d->proxy_port)
		return 0;
	if (f->proto != IPPROTO_TCP || !(p->egress_ep || p->can_assign))
		return CILIA_DROP_PROXY_PATH;
	d->ct_flags = CILIA_CT_TO_PROXY;
	return 0;
}

/*
 * Decides whether the packet of flow `f` between peers `p` may pass.
 * Returns CILIA_PASS or the drop reason; on a policy deny, `d` says which
 * direction's policy denied it. `d->ct_flags` and `d->proxy_port` say how
 * the flow travels (see ct_new_flow_mode); for a reply, they are those of
 * the forward entry.
 */
__inline_fn int flow_allowed(struct __sk_buff *skb, const struct flow *f, const struct peers *p,
			     struct decision *d)
{
	struct ct_key key = {}, rkey = {};
	struct ct_value *ct, *reply;
	__u64 now = cil_now();
	__u32 zero = 0;
	struct global_config *cfg = bpf_map_lookup_elem(&cilia_config, &zero);
	/* One lookup for all: the revision, the budget and, for events, the
	 * monitor level. */
	__u32 rev = cfg ? cfg->policy_rev : 0;
	__u32 budget = cfg && cfg->ct_budget ? cfg->ct_budget : CILIA_CT_BUDGET_DEFAULT;

	d->level = cfg ? cfg->monitor_level : CILIA_MONITOR_OFF;
	/* Kept across the policy steps below, which replace `d`. */
	__u16 rev_nat = d->rev_nat;
	int live;

	/* One key for both directions (canonical, ct_key_of): the entry
	 * is a flow this packet is forward in when it has the packet's
	 * orientation `o`, else one the packet may answer (`reply`, below). */
	const __u16 o = ct_key_of(&key, f);
	/* The flow had no entry when the fast path looked (ct_cb_absent): a
	 * new flow. */
	const __u8 absent = d->ct_absent;

	ct = absent ? 0 : bpf_map_lookup_elem(&cilia_ct, &key);
	/* Service pins live under keys of their own (CILIA_CT_KEY_SERVICE),
	 * so a flow's key never names one; should one be met, it is never a
	 * flow, nor the forward entry of a reply. */
	live = ct && ct_forward(ct, o) && ct->expires > now && !(ct->flags & CILIA_CT_SERVICE);
	/* A packet the load balancer translated for service `rev_nat` that
	 * meets the entry of another flow with the same translated tuple (a
	 * direct flow to the backend closed a moment ago from the same client
	 * port, or a flow of another service): the tuple now names this
	 * service flow, which starts here like any new flow (its policy
	 * decided at this revision, the entry's slot reused). Kept, the old
	 * entry would leave the backend's replies without their rev-NAT. */
	if (live && rev_nat && ct->rev_nat != rev_nat)
		live = 0;
	if (live && ct->policy_rev == rev) {
		if (!(ct->flags & CILIA_CT_DENIED))
			ct_track_close(ct, f, 0);
		ct->expires = now + ct_lifetime(f, ct->flags);
		d->ct_state = CILIA_CT_STATE_ESTABLISHED;
		if (ct->flags & CILIA_CT_DENIED) {
			d->ct_state = CILIA_CT_STATE_REVOKED;
			d->verdict = CILIA_VERDICT_DENY;
			return CILIA_DROP_POLICY; /* revoked, and the policy has not changed */
		}
		ct->packets += 1;
		ct->bytes += skb->len;
		d->ct_flags = ct->flags;
		d->proxy_port = ct->proxy_port;
		d->rev_nat = ct->rev_nat;
		return CILIA_PASS;
	}
	if (ct_related(f, p->egress_ep != 0, now, &d->rev_nat)) {
		d->ct_state = CILIA_CT_STATE_RELATED;
		return CILIA_PASS;
	}
	if (!live) {
		/* The same entry, looked up again (cache hot) from a copy of
		 * the key: looking `key` itself up a second time took the
		 * verifier past its limit (over 1M instructions for the
		 * dual-stack program), the copy costs it next to nothing. */
		__builtin_memcpy(&rkey, &key, sizeof(key));

		reply = absent ? 0 : bpf_map_lookup_elem(&cilia_ct, &rkey);
		if (reply && !ct_forward(reply, o) && reply->expires > now &&
		    !(reply->flags & CILIA_CT_SERVICE)) {
			d->ct_state = CILIA_CT_STATE_REPLY;
			if (reply->policy_rev != rev) {
				if (!reply_still_allowed(f, p, d))
					return ct_revoke(reply, rev, d);
				reply->flags &= ~(CILIA_CT_DENIED | CILIA_CT_FAST_MASK);
				reply->policy_rev = rev;
				d->checked = 0; /* a re-check, not a new flow: no verdict event */
			}
			/* The other side of a revoked flow may not revive it either. */
			if (reply->flags & CILIA_CT_DENIED) {
				d->ct_state = CILIA_CT_STATE_REVOKED;
				d->verdict = CILIA_VERDICT_DENY;
				return CILIA_DROP_POLICY;
			}
			reply->flags |= CILIA_CT_SEEN_REPLY;
			ct_track_close(reply, f, 1);
			reply->expires = now + ct_lifetime(f, reply->flags);
			d->ct_flags = reply->flags;
			d->proxy_port = reply->proxy_port;
			d->rev_nat = reply->rev_nat;
			return CILIA_PASS;
		}
	}

	d->ct_state = live ? CILIA_CT_STATE_ESTABLISHED : CILIA_CT_STATE_NEW;
	if (p->egress_ep &&
	    !policy_allows(p->egress_ep, CILIA_DIR_EGRESS, p->dst_id, f->proto, f->dport, d))
		return ct_revoke(live ? ct : 0, rev, d);
	if (p->ingress_ep) {
		struct decision in = {.level = d->level, .ct_state = d->ct_state};
		/* Either side's entry may name the proxy: it serves both. */
		__be16 proxy_port = d->proxy_port;

		if (!policy_allows(p->ingress_ep, CILIA_DIR_INGRESS, p->src_id, f->proto, f->dport,
				   &in)) {
			*d = in;
			return ct_revoke(live ? ct : 0, rev, d);
		}
		/* Report the ingress side unless egress only passed by audit. */
		if (d->verdict != CILIA_VERDICT_AUDIT)
			*d = in;
		d->proxy_port = proxy_port ? proxy_port : in.proxy_port;
	}

	if (live) {
		/* A re-check decides whether the flow may go on, not how: the
		 * way it was set up (direct, or through the proxy) stays. But a
		 * direct flow that the policy now sends to the proxy is revoked:
		 * its requests would never meet the HTTP rules. The client's next
		 * connection goes through the proxy. */
		if (d->proxy_port && !p->via_proxy &&
		    !(ct->flags & (CILIA_CT_TO_PROXY | CILIA_CT_FROM_PROXY))) {
			d->verdict = CILIA_VERDICT_DENY;
			return ct_revoke(ct, rev, d);
		}
		ct->flags &= ~(CILIA_CT_DENIED | CILIA_CT_FAST_MASK);
		ct->policy_rev = rev;
		ct->packets += 1;
		ct->bytes += skb->len;
		ct_track_close(ct, f, 0);
		ct->expires = now + ct_lifetime(f, ct->flags);
		d->ct_flags = ct->flags;
		d->proxy_port = ct->proxy_port;
		d->rev_nat = ct->rev_nat;
		return CILIA_PASS;
	}
	int reason = ct_new_flow_mode(f, p, d);

	if (reason)
		return reason;
	d->rev_nat = rev_nat;
	if (ct) {
		/* An expired entry the GC has not removed yet, of either
		 * orientation: reuse its slot, which is already counted against
		 * its owner, in this packet's orientation. */
		ct->expires = now + ct_lifetime(f, 0);
		ct->packets = 1;
		ct->bytes = skb->len;
		ct->policy_rev = rev;
		ct->src_identity = p->src_id;
		ct->dst_identity = p->dst_id;
		ct->flags = d->ct_flags | o;
		ct->proxy_port = d->proxy_port;
		ct->rev_nat = rev_nat;
		ct->backend_id = 0;
		return CILIA_PASS;
	}
	return ct_create(skb, &key, o, f, rev, budget, p, now, d);
}

#endif
