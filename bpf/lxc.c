// SPDX-License-Identifier: GPL-2.0
/*
 * Endpoint programs: one specialized copy per endpoint (CILIA_CONFIG), two
 * entry points on the endpoint's host-side veth. Each reads as the packet's
 * path: parse -> guard -> decide -> deliver, the same steps for both
 * families; every step that refuses a packet names why (a CILIA_DROP_*).
 */
#include "lib/common.h"
#include "lib/arp.h"
#include "lib/config.h"
#include "lib/decide.h"
#include "lib/fast.h"
#include "lib/flow.h"
#include "lib/forward.h"
#include "lib/guard.h"
#include "lib/ipcache.h"
#include "lib/lb_icmp.h"
#include "lib/lb_packet.h"
#include "lib/ndisc.h"
#include "lib/nodeport.h"

/*
 * The generic build (CILIA_GENERIC, see "Endpoint programs: specialized and
 * generic" in ARCHITECTURE.md) leaves out two translations of the
 * from-container program: hairpin, and an ICMP error a backend sends about a
 * service flow. Without a specialized build's pruning, the verifier explored
 * them together with the rest past its million instructions (over 1M against
 * ~330k without them, kernel 6.18). Until its specialized programs replace
 * the generic ones, an endpoint's own service flow back into itself is
 * dropped by its kernel (martian source), and its ICMP errors about a
 * service flow are translated by the client's to-container program instead.
 */
#ifdef CILIA_GENERIC
#define CILIA_LB_FULL 0
#else
#define CILIA_LB_FULL 1
#endif
#include "lib/tunnel.h"

/*
 * TCX ingress of the host-side veth: every packet the container sends. Its
 * egress policy applies and, for a local destination, that endpoint's
 * ingress policy too (the packet never passes the other's program).
 */
SEC("classifier")
int cil_from_container(struct __sk_buff *skb)
{
	const __u8 dir = CILIA_DIR_EGRESS;
	__be16 proto = eth_proto(skb);
	struct flow f = {};
	struct decision d = {.dir = dir, .verdict = CILIA_VERDICT_ALLOW};
	struct endpoint_info *dst;
	struct ipcache_value *remote = 0;
	int reason;

#ifdef CILIA_GENERIC
	if (!cil_generic_enter(skb))
		return drop(skb, CILIA_DROP_UNCONFIGURED, dir);
#endif

	/* Parse: the neighbour protocols are answered here, from the node. */
	if (!proto)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (proto == bpf_htons(ETH_P_ARP))
		return cfg_ipv4_enabled() ? handle_arp(skb, dir)
					  : drop(skb, CILIA_DROP_UNSUPPORTED_L3, dir);
	reason = flow_parse(skb, proto, &f);
	if (reason)
		return drop(skb, reason, dir);
	if (flow_is_nd(&f))
		return nd_from_container(skb, &f, dir);
	if (mld_report_from_container(&f))
		return absorb(skb, dir);

	/* Guard: its own source address; later fragments follow the first. */
	reason = from_container_guard(&f);
	if (!reason)
		reason = frag_follow(&f);
	if (reason)
		return drop(skb, reason, dir);

	/* Fast path: an established flow whose entry caches its delivery
	 * (fast.h); `rev` is the revision the rest of the way decides at. */
	__u32 rev = 0;

	reason = fast_established(skb, &f, dir, &rev);
	if (reason != CILIA_FAST_MISS)
		return reason;

	/* Load balance: a packet to a service frontend is translated to its
	 * flow's backend; from here on it is a packet to the backend, and the
	 * backend's policy applies (see "Load balancing" in ARCHITECTURE.md). */
	struct lb_state lb = {};

	reason = lb_translate(skb, &f, &lb);
	if (!reason && CILIA_LB_FULL)
		reason = lb_hairpin_unloop(skb, &f);
	if (reason)
		return drop(skb, reason, dir);
	d.rev_nat = lb.rev_nat;
	d.ct_absent = ct_cb_absent(skb);

	/* Decide: the local destination, else the ipcache entry (which also
	 * says whether it lives on another node), names the peer's identity. */
	dst = endpoint_lookup_dst(f.daddr, f.family);
	if (!dst)
		remote = ipcache_lookup(f.daddr, f.family);
	struct peers p = {
	    .src_id = CILIA_CONFIG.identity,
	    .dst_id = dst ? dst->identity : (remote ? remote->identity : CILIA_ID_WORLD),
	    .egress_ep = CILIA_CONFIG.endpoint_id,
	    .ingress_ep = dst ? dst->endpoint_id : 0,
	};
	if (lb.selected)
		event_service(skb, &f, &p, lb.frontend, lb.fport, lb.rev_nat, dir);
	reason = decide(skb, &f, &p, &d, dir);
	if (reason)
		return drop_decided(skb, &f, &p, &d, reason, dir);

	/* Deliver: flows through the L7 proxy by the node's stack (see
	 * "L7 redirect" in docs/ARCHITECTURE.md), the rest directly: to a
	 * local endpoint, to another node, or to the stack. A service
	 * backend's reply gets the frontend as its source (a NodePort's
	 * leaves by the underlay device); a reply to another node's own
	 * address goes to that node, as its pods' packets do. An ICMP error
	 * about a service flow quotes the frontend the client addressed
	 * (see lb_icmp.h), and a NodePort's leaves like the replies. */
	if (CILIA_LB_FULL && d.ct_state == CILIA_CT_STATE_RELATED && d.rev_nat) {
		__u8 nodeport = 0;

		reason = lb_reverse_icmp(skb, &f, d.rev_nat, &nodeport);
		if (reason)
			return drop_decided(skb, &f, &p, &d, reason, dir);
		if (nodeport)
			return nodeport_to_client(skb, &f, &p, &d, dir);
	}
	if (d.ct_state == CILIA_CT_STATE_REPLY) {
		__u8 nodeport = 0;
		struct ipcache_value route = {};

		if (d.ct_flags & CILIA_CT_FROM_PROXY)
			return deliver_reply_to_proxy(skb, &f, &p, &d, dir);
		/* The peer of a redirected flow never saw it: only the proxy answers. */
		if (d.ct_flags & CILIA_CT_TO_PROXY)
			return drop_decided(skb, &f, &p, &d, CILIA_DROP_PROXY_PATH, dir);
		reason = lb_reverse_to(skb, &f, d.rev_nat, &nodeport);
		if (reason)
			return drop_decided(skb, &f, &p, &d, reason, dir);
		if (nodeport)
			return nodeport_to_client(skb, &f, &p, &d, dir);
		if (!dst && !(remote && remote->tunnel_family) && node_route(&f, &route))
			return deliver_to_node(skb, &f, &p, &d, &route, dir);
	} else if (d.ct_flags & CILIA_CT_TO_PROXY) {
		reason = CILIA_LB_FULL ? lb_hairpin_unloop_packet(skb, &f) : 0;
		if (reason)
			return drop_decided(skb, &f, &p, &d, reason, dir);
		return deliver_to_proxy(skb, &f, &p, &d, dir);
	}
	if (dst) {
		/* A service flow back into its own client: from the service
		 * loopback address, and its replies to that address readdressed
		 * (see "Hairpin" in ARCHITECTURE.md). */
		reason = 0;
		if (CILIA_LB_FULL && f.unloop)
			reason = lb_hairpin_unloop_packet(skb, &f);
		else if (CILIA_LB_FULL && d.ct_state != CILIA_CT_STATE_REPLY)
			reason = lb_hairpin(skb, &f, d.rev_nat);
		if (reason)
			return drop_decided(skb, &f, &p, &d, reason, dir);
		if (dst->endpoint_id)
			fast_remember(&f, &d, lb.rev_nat, rev, dst->endpoint_id);
		return deliver_to_endpoint(skb, &f, &p, &d, dst, dir);
	}
	if (remote && remote->tunnel_family)
		return deliver_to_node(skb, &f, &p, &d, remote, dir);
	fast_remember(&f, &d, lb.rev_nat, rev, 0);
	return deliver_to_stack(skb, &f, &p, &d, dir);
}

/*
 * TCX egress of the host-side veth: what the node's stack delivers to the
 * container (from the node or routed from elsewhere). Its ingress policy
 * applies, with the source identity from the ipcache. Local endpoints never
 * come this way (redirect_peer skips it), except through the L7 proxy,
 * which speaks for them (CILIA_MARK_FROM_PROXY): then the source identity
 * is the endpoint's, and the proxy has already enforced the L7 policy.
 */
SEC("classifier")
int cil_to_container(struct __sk_buff *skb)
{
	const __u8 dir = CILIA_DIR_INGRESS;
	__be16 proto = eth_proto(skb);
	struct flow f = {};
	struct decision d = {.dir = dir, .verdict = CILIA_VERDICT_ALLOW};
	struct endpoint_info *src;
	int via_proxy = from_proxy(skb);
	int reason;

#ifdef CILIA_GENERIC
	if (!cil_generic_enter(skb))
		return drop(skb, CILIA_DROP_UNCONFIGURED, dir);
#endif

	/* Parse: ARP and other link protocols are the stack's business. */
	if (proto != bpf_htons(ETH_P_IPV6) && proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (proto == bpf_htons(ETH_P_IP) && !cfg_ipv4_enabled())
		return TC_ACT_OK;
	reason = flow_parse(skb, proto, &f);
	if (reason)
		return drop(skb, reason, dir);
	if (flow_is_nd(&f))
		return nd_to_container(skb, &f, dir);
	if (flow_is_multicast(&f))
		return to_container_multicast(skb, &f, dir);

	/* Guard: no local endpoint's address but the proxy's; later fragments
	 * follow the first. */
	src = endpoint_lookup(f.saddr, f.family);
	reason = to_container_guard(src, via_proxy);
	if (!reason)
		reason = frag_follow(&f);
	if (reason)
		return drop(skb, reason, dir);

	/* Decide. */
	struct peers p = {
	    .src_id = src ? src->identity : ipcache_identity(f.saddr, f.family),
	    .dst_id = CILIA_CONFIG.identity,
	    .ingress_ep = CILIA_CONFIG.endpoint_id,
	    .via_proxy = via_proxy,
	};
	reason = decide(skb, &f, &p, &d, dir);
	if (reason)
		return drop_decided(skb, &f, &p, &d, reason, dir);

	/* Deliver: the stack hands it on; a service backend's reply with the
	 * frontend as its source, an ICMP error about its flow quoting it. */
	if (d.ct_state == CILIA_CT_STATE_REPLY || d.ct_state == CILIA_CT_STATE_RELATED) {
		__u8 nodeport = 0;

		reason = d.ct_state == CILIA_CT_STATE_REPLY
			     ? lb_reverse(skb, &f, d.rev_nat)
			     : lb_reverse_icmp(skb, &f, d.rev_nat, &nodeport);
		if (reason)
			return drop_decided(skb, &f, &p, &d, reason, dir);
	}
	event_trace(skb, &f, &p, d.level, CILIA_FWD_ENDPOINT, dir);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
