/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Connection tracking and the per-flow policy decision. A flow's first
 * packet meets the policy; later forward packets skip it while the policy
 * revision they were checked at is current (after any policy change they
 * meet it again, so revoking a policy stops open connections); replies are
 * allowed because the forward direction was. Entries expire by timeout; the
 * agent garbage-collects expired ones.
 */
#ifndef CILIA_CONNTRACK_H
#define CILIA_CONNTRACK_H

#include "common.h"
#include "flow.h"
#include "maps.h"
#include "policy.h"

#define NSEC_PER_SEC 1000000000ULL

__inline_fn void ct_key_of(struct ct_key *k, const struct flow *f)
{
	__builtin_memcpy(k->saddr, f->saddr, 16);
	__builtin_memcpy(k->daddr, f->daddr, 16);
	k->sport = f->sport;
	k->dport = f->dport;
	k->proto = f->proto;
	k->family = f->family;
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
	if (f->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		return CILIA_CT_TCP_CLOSE * NSEC_PER_SEC;
	if (flags & CILIA_CT_SEEN_REPLY)
		return CILIA_CT_TCP_TIMEOUT * NSEC_PER_SEC;
	return CILIA_CT_TCP_SYN_TIMEOUT * NSEC_PER_SEC;
}

/*
 * A tracked flow that the policy no longer allows keeps its entry, marked
 * denied at this revision. Deleting it would let the peer's next packet
 * start a "new" flow in the other direction, of which the revoked side's
 * packets would then be replies. Returns the verdict: denied.
 */
__inline_fn int ct_revoke(struct ct_value *ct, __u32 rev)
{
	if (ct) {
		ct->flags |= CILIA_CT_DENIED;
		ct->policy_rev = rev;
	}
	return 0;
}

/*
 * Decides whether the packet of flow `f` may pass. `egress_ep` / `ingress_ep`
 * are the endpoints whose egress / ingress policy applies (0: none), and
 * `src_id` / `dst_id` the peers' identities. On a deny, *deny_dir says which
 * direction's policy denied it.
 */
__inline_fn int flow_allowed(struct __sk_buff *skb, const struct flow *f, __u32 egress_ep,
			     __u32 ingress_ep, __u32 src_id, __u32 dst_id, struct decision *d)
{
	struct ct_key key = {}, rkey = {};
	struct ct_value *ct, *reply;
	__u64 now = bpf_ktime_get_ns();
	__u32 zero = 0;
	struct global_config *cfg = bpf_map_lookup_elem(&cilia_config, &zero);
	/* One lookup for both: the revision and, for events, the monitor level. */
	__u32 rev = cfg ? cfg->policy_rev : 0;

	d->level = cfg ? cfg->monitor_level : CILIA_MONITOR_OFF;
	int live;

	ct_key_of(&key, f);
	ct = bpf_map_lookup_elem(&cilia_ct, &key);
	live = ct && ct->expires > now;
	if (live && ct->policy_rev == rev) {
		ct->expires = now + ct_lifetime(f, ct->flags);
		d->ct_state = CILIA_CT_STATE_ESTABLISHED;
		if (ct->flags & CILIA_CT_DENIED) {
			d->ct_state = CILIA_CT_STATE_REVOKED;
			d->verdict = CILIA_VERDICT_DENY;
			return 0; /* revoked, and the policy has not changed since */
		}
		ct->packets += 1;
		ct->bytes += skb->len;
		return 1;
	}
	/* An ICMP error about a tracked flow is part of that flow. */
	if (f->related) {
		struct ct_value *orig = bpf_map_lookup_elem(&cilia_ct, &f->inner);

		if (orig && orig->expires > now && !(orig->flags & CILIA_CT_DENIED)) {
			d->ct_state = CILIA_CT_STATE_RELATED;
			return 1;
		}
	}
	if (!live) {
		ct_key_reverse(&rkey, &key);
		reply = bpf_map_lookup_elem(&cilia_ct, &rkey);
		if (reply && reply->expires > now) {
			d->ct_state = CILIA_CT_STATE_REPLY;
			/* The other side of a revoked flow may not revive it either. */
			if (reply->flags & CILIA_CT_DENIED) {
				d->ct_state = CILIA_CT_STATE_REVOKED;
				d->verdict = CILIA_VERDICT_DENY;
				return 0;
			}
			reply->flags |= CILIA_CT_SEEN_REPLY;
			reply->expires = now + ct_lifetime(f, reply->flags);
			return 1;
		}
	}

	d->ct_state = live ? CILIA_CT_STATE_ESTABLISHED : CILIA_CT_STATE_NEW;
	if (egress_ep && !policy_allows(egress_ep, CILIA_DIR_EGRESS, dst_id, f->proto, f->dport, d))
		return ct_revoke(live ? ct : 0, rev);
	if (ingress_ep) {
		struct decision in = {.level = d->level, .ct_state = d->ct_state};

		if (!policy_allows(ingress_ep, CILIA_DIR_INGRESS, src_id, f->proto, f->dport,
				   &in)) {
			*d = in;
			return ct_revoke(live ? ct : 0, rev);
		}
		/* Report the ingress side unless egress only passed by audit. */
		if (d->verdict != CILIA_VERDICT_AUDIT)
			*d = in;
	}

	if (live) {
		ct->flags &= ~CILIA_CT_DENIED;
		ct->policy_rev = rev;
		ct->packets += 1;
		ct->bytes += skb->len;
		ct->expires = now + ct_lifetime(f, ct->flags);
		return 1;
	}
	struct ct_value fresh = {
	    .expires = now + ct_lifetime(f, 0),
	    .packets = 1,
	    .bytes = skb->len,
	    .policy_rev = rev,
	    .src_identity = src_id,
	    .dst_identity = dst_id,
	};
	/* An LRU map evicts the oldest flow rather than refusing a new one. */
	bpf_map_update_elem(&cilia_ct, &key, &fresh, BPF_ANY);
	return 1;
}

#endif
