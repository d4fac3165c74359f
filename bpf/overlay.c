// SPDX-License-Identifier: GPL-2.0
/*
 * Node programs: traffic between this node and the others. One copy per
 * node, loaded with a CILIA_CONFIG of no endpoint (endpoint_id 0): what
 * they decide is charged and reported to the packet's local endpoint.
 *
 * - cil_from_overlay: TCX ingress of the VXLAN device (external mode).
 * - cil_to_overlay: TCX egress of the VXLAN device.
 * - cil_from_netdev: TCX ingress of the underlay device (native routing,
 *   and NodePort in every mode).
 *
 * Like the endpoint programs, each reads as the packet's path:
 * parse -> guard -> decide -> deliver.
 */
#include "lib/common.h"
#include "lib/config.h"
#include "lib/decide.h"
#include "lib/flow.h"
#include "lib/forward.h"
#include "lib/guard.h"
#include "lib/ipcache.h"
#include "lib/lb_icmp.h"
#include "lib/lb_packet.h"
#include "lib/nodeport.h"
#include "lib/tunnel.h"

#define PACKET_HOST 0 /* linux/if_packet.h: to us */

/*
 * The destination endpoint's ingress policy for a packet from another
 * node, then delivery: a flow redirected to the L7 proxy is assigned to its
 * socket here (tc ingress), a reply of a flow the proxy opened goes back to
 * the proxy through the stack, the rest straight into the endpoint.
 */
__inline_fn int from_node_to_endpoint(struct __sk_buff *skb, struct flow *f,
				      const struct endpoint_info *dst, __u32 src_id, __u16 rev_nat,
				      __u8 dir)
{
	int reason;

	/* Guard: no local endpoint's address comes from another node; later
	 * fragments follow the first; a DSR frontend only as a cluster
	 * node's load balancer writes it (see dsr_accept), and then this
	 * node rev-NATs the replies. */
	reason = endpoint_lookup(f->saddr, f->family) ? CILIA_DROP_SPOOFED_SOURCE : 0;
	if (!reason)
		reason = frag_follow(f);
	if (!reason && !rev_nat)
		reason = dsr_accept(skb, f, &rev_nat);
	if (reason)
		return drop(skb, reason, dir);

	struct decision d = {.dir = dir, .verdict = CILIA_VERDICT_ALLOW, .rev_nat = rev_nat};

	/* Decide. */
	struct peers p = {
	    .src_id = src_id,
	    .dst_id = dst->identity,
	    .ingress_ep = dst->endpoint_id,
	    .can_assign = 1,
	};
	reason = decide(skb, f, &p, &d, dir);
	if (reason)
		return drop_decided(skb, f, &p, &d, reason, dir);

	/* Deliver. What goes to the proxy passes the node's stack, which
	 * takes only frames addressed to it: a decapsulated frame still
	 * carries the sending endpoint's gateway MAC. */
	if (d.ct_state == CILIA_CT_STATE_REPLY) {
		if (d.ct_flags & CILIA_CT_FROM_PROXY) {
			bpf_skb_change_type(skb, PACKET_HOST);
			return deliver_reply_to_proxy(skb, f, &p, &d, dir);
		}
		if (d.ct_flags & CILIA_CT_TO_PROXY)
			return drop_decided(skb, f, &p, &d, CILIA_DROP_PROXY_PATH, dir);
		/* A remote service backend's reply to a local client: the
		 * frontend as its source, as the client addressed it. */
		reason = lb_reverse(skb, f, d.rev_nat);
		if (reason)
			return drop_decided(skb, f, &p, &d, reason, dir);
	} else if (d.ct_state == CILIA_CT_STATE_RELATED) {
		/* An ICMP error about a remote backend's flow: quoting the
		 * frontend the local client addressed. */
		__u8 nodeport = 0;

		reason = lb_reverse_icmp(skb, f, d.rev_nat, &nodeport);
		if (reason)
			return drop_decided(skb, f, &p, &d, reason, dir);
	} else if (d.ct_flags & CILIA_CT_TO_PROXY) {
		bpf_skb_change_type(skb, PACKET_HOST);
		return deliver_to_proxy(skb, f, &p, &d, dir);
	}
	return deliver_to_endpoint(skb, f, &p, &d, dst, dir);
}

/*
 * TCX ingress of the VXLAN device: a decapsulated frame from another node,
 * with the tunnel's metadata. Accepted only from a known node (its outer
 * source in cilia_nodes); the source identity is the VNI, which that node's
 * datapath set. Only local endpoints are served here: the overlay carries
 * routed IP between nodes, nothing for the node itself. Neighbour discovery
 * never crosses it (the device is NOARP; each side answers its endpoints
 * locally), so ND, ARP and multicast from a tunnel are dropped.
 */
SEC("classifier")
int cil_from_overlay(struct __sk_buff *skb)
{
	const __u8 dir = CILIA_DIR_INGRESS;
	struct bpf_tunnel_key key = {};
	struct endpoint_info *dst;
	struct flow f = {};
	__u8 outer_family;
	__u32 src_id;
	__be16 proto;
	int reason;

	/* Guard the tunnel: a known node, a valid identity. */
	if (tunnel_key_get(skb, &key, &outer_family) < 0 ||
	    !tunnel_from_known_node(&key, outer_family))
		return drop(skb, CILIA_DROP_UNKNOWN_NODE, dir);
	src_id = key.tunnel_id;
	/* Another node's own traffic: that node is remote-node here. */
	if (src_id == CILIA_ID_HOST)
		src_id = CILIA_ID_REMOTE_NODE;
	if (!src_id || src_id > VNI_MAX)
		return drop(skb, CILIA_DROP_INVALID, dir);

	/* Parse the inner packet. */
	proto = eth_proto(skb);
	if (proto != bpf_htons(ETH_P_IPV6) && proto != bpf_htons(ETH_P_IP))
		return drop(skb, CILIA_DROP_UNSUPPORTED_L3, dir);
	reason = flow_parse(skb, proto, &f);
	if (reason)
		return drop(skb, reason, dir);
	if (flow_is_nd(&f))
		return drop(skb, CILIA_DROP_UNSUPPORTED_ND, dir);
	if (flow_is_multicast(&f))
		return drop(skb, CILIA_DROP_MULTICAST, dir);

	/* A remote backend's reply to a NodePort flow this node SNATed. */
	__u8 unsnat = 0;

	reason = nodeport_unsnat(skb, &f, &unsnat);
	if (!reason && !unsnat)
		reason = nodeport_unsnat_icmp(skb, &f, &unsnat);
	if (reason)
		return drop(skb, reason, dir);
	if (unsnat)
		return nodeport_to_client(skb, &f, 0, 0, dir);

	dst = endpoint_lookup(f.daddr, f.family);
	if (!dst) {
		/* An endpoint's packet for this node's own address (the reply
		 * to a node process, which the sending node tunnels here
		 * rather than forward it): the stack's, as it would be from
		 * the underlay. The frame still carries the sender's gateway
		 * MAC. */
		if (ipcache_identity(f.daddr, f.family) == CILIA_ID_HOST) {
			bpf_skb_change_type(skb, PACKET_HOST);
			return TC_ACT_OK;
		}
		return drop(skb, CILIA_DROP_NO_ROUTE, dir);
	}
	return from_node_to_endpoint(skb, &f, dst, src_id, 0, dir);
}

/*
 * TCX egress of the VXLAN device. A packet an endpoint sent already has
 * its tunnel key (from-container set it before the redirect) and passes
 * untouched. The rest was routed into the device by the node's stack (the
 * L7 proxy answering or calling a remote endpoint, a node process): it gets
 * the key of its destination's node from the ipcache, with the identity of
 * the local endpoint the L7 proxy speaks for (CILIA_MARK_FROM_PROXY), else
 * host. A local endpoint's address without the proxy's mark is forged (any
 * node process can bind it): dropped, as at to-container.
 */
SEC("classifier")
int cil_to_overlay(struct __sk_buff *skb)
{
	const __u8 dir = CILIA_DIR_EGRESS;
	struct bpf_tunnel_key key = {};
	struct ipcache_value *remote;
	struct endpoint_info *src;
	struct flow f = {};
	__u8 outer_family;
	__u32 src_id = CILIA_ID_HOST;
	__be16 proto;
	int reason;

	if (!tunnel_key_get(skb, &key, &outer_family))
		return TC_ACT_OK;

	proto = eth_proto(skb);
	if (proto != bpf_htons(ETH_P_IPV6) && proto != bpf_htons(ETH_P_IP))
		return drop(skb, CILIA_DROP_UNSUPPORTED_L3, dir);
	reason = flow_parse(skb, proto, &f);
	if (reason)
		return drop(skb, reason, dir);
	if (flow_is_multicast(&f))
		return drop(skb, CILIA_DROP_MULTICAST, dir);

	src = endpoint_lookup(f.saddr, f.family);
	if (src) {
		if (!from_proxy(skb))
			return drop(skb, CILIA_DROP_SPOOFED_SOURCE, dir);
		src_id = src->identity;
	}
	remote = ipcache_lookup(f.daddr, f.family);
	if (!remote || !remote->tunnel_family)
		return drop(skb, CILIA_DROP_NO_ROUTE, dir);
	if (tunnel_key_set(skb, remote, src_id) < 0)
		return drop(skb, CILIA_DROP_WRITE_FAILED, dir);
	count_forward(skb, CILIA_FWD_TUNNEL, dir);
	return TC_ACT_OK;
}

/*
 * A NodePort packet from outside (`svc` its service): the service's
 * backend, then a local one meets its ingress policy with the client's
 * identity and gets the packet with the client's address; a remote one
 * gets it SNATed to this node's address, through the overlay or natively.
 * externalTrafficPolicy=Local admits local backends only.
 */
__inline_fn int nodeport_forward(struct __sk_buff *skb, struct flow *f,
				 const struct lb_service_value *svc, __u8 dir)
{
	struct lb_state lb = {};
	struct ipcache_value *remote;
	struct endpoint_info *dst;
	__u8 any[16] = {};
	__u32 client_id = ipcache_identity(f->saddr, f->family);
	__u8 local_only = svc->flags & CILIA_LB_FLAG_LOCAL;
	__u64 now = cil_now();
	int reason;

	reason = lb_translate_to(skb, f, &lb, svc, any);
	if (reason)
		return drop(skb, reason, dir);
	dst = endpoint_lookup(f->daddr, f->family);
	if (dst) {
		struct peers p = {
		    .src_id = client_id, .dst_id = dst->identity, .ingress_ep = dst->endpoint_id};

		if (lb.selected)
			event_service(skb, f, &p, lb.frontend, lb.fport, lb.rev_nat, dir);
		reason = nodeport_remember_frontend(f, &lb, now);
		if (reason)
			return drop(skb, reason, dir);
		return from_node_to_endpoint(skb, f, dst, client_id, lb.rev_nat, dir);
	}
	remote = ipcache_lookup(f->daddr, f->family);
	if (local_only)
		return drop(skb, CILIA_DROP_NO_BACKEND, dir);
	if (!remote || !remote->tunnel_family)
		return drop(skb, CILIA_DROP_NO_ROUTE, dir);

	/* SNAT: the backend's node sees this node as the source
	 * (remote-node). DSR: the client, and the frontend in the packet
	 * that selects the backend; the replies do not come back here. */
	__u8 dsr = svc->flags & CILIA_LB_FLAG_DSR;
	struct peers p = {.src_id = dsr ? client_id : CILIA_ID_HOST, .dst_id = remote->identity};
	struct decision d = {.dir = dir, .verdict = CILIA_VERDICT_ALLOW, .level = monitor_level()};

	if (lb.selected)
		event_service(skb, f, &p, lb.frontend, lb.fport, lb.rev_nat, dir);
	if (dsr)
		reason = dsr_wanted(f, &lb) ? dsr_encode(skb, f, &lb) : 0;
	else
		reason = nodeport_snat(skb, f, &lb, now);
	if (reason)
		return drop(skb, reason, dir);
	return deliver_to_node(skb, f, &p, &d, remote, dir);
}

/*
 * TCX ingress of the underlay device, in every tunnel mode. A remote
 * backend's reply to a NodePort flow this node SNATed goes back to its
 * client; a NodePort packet from outside goes to its service's backend.
 * Natively routed (no overlay) packets for a local endpoint, routed here by
 * another node, meet that endpoint's ingress policy with the source
 * identity from the ipcache (the underlay is trusted for source addresses)
 * and are handed straight to it, without the node's IP forwarding.
 * Everything else is the node's own traffic (the cluster's control plane,
 * ARP, the tunnel's UDP...): the stack's, untouched.
 */
SEC("classifier")
int cil_from_netdev(struct __sk_buff *skb)
{
	const __u8 dir = CILIA_DIR_INGRESS;
	__be16 proto = eth_proto(skb);
	struct lb_service_value *svc;
	struct endpoint_info *dst;
	struct flow f = {};
	__u8 unsnat = 0;
	int reason;

	if (proto != bpf_htons(ETH_P_IPV6) && proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (flow_parse(skb, proto, &f))
		return TC_ACT_OK;
	if (flow_is_nd(&f))
		return TC_ACT_OK;

	if (f.frag != FLOW_FRAG_LATER) {
		reason = nodeport_unsnat(skb, &f, &unsnat);
		if (!reason && !unsnat)
			reason = nodeport_unsnat_icmp(skb, &f, &unsnat);
		if (reason)
			return drop(skb, reason, dir);
		if (unsnat)
			return nodeport_to_client(skb, &f, 0, 0, dir);
		svc = nodeport_lookup(&f);
		if (svc)
			return nodeport_forward(skb, &f, svc, dir);
	}

	/* Pods of other nodes arrive here only in native mode (VXLAN: the
	 * overlay carries them; off: no other nodes): in any other mode
	 * what is left is the node's own. */
	struct node_config *cfg = node_config();

	if (!cfg || cfg->tunnel_mode != CILIA_TUNNEL_NATIVE)
		return TC_ACT_OK;
	dst = endpoint_lookup(f.daddr, f.family);
	if (!dst)
		return TC_ACT_OK;
	return from_node_to_endpoint(skb, &f, dst, ipcache_identity(f.saddr, f.family), 0, dir);
}

char LICENSE[] SEC("license") = "GPL";
