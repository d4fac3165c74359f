/* SPDX-License-Identifier: GPL-2.0 */
/*
 * NodePort: a service reachable on every address of the node, served at the
 * underlay device's ingress (cil_from_netdev) for clients outside the
 * cluster. A frontend of the unspecified address (0.0.0.0 / ::) with
 * CILIA_LB_FLAG_NODEPORT stands for "any address of this node" (an address
 * whose ipcache identity is host). The backend is chosen as for any service
 * (lb_packet.h); then:
 *
 * - a local backend: DNAT only, the endpoint's ingress policy with the
 *   client's identity; its reply gets the node address and nodePort back
 *   (a REVNAT entry of cilia_lb_nat) and leaves by the underlay device;
 * - a remote backend (SNAT): the source becomes this node's address with a
 *   port of CILIA_LB_SNAT_PORT_FIRST..LAST (OUT and IN entries of
 *   cilia_lb_nat), and the packet goes to the backend's node; the reply
 *   comes back to this node (overlay or underlay) addressed to that port,
 *   both translations are reversed and it leaves by the underlay device.
 *
 * See "Load balancing" in docs/ARCHITECTURE.md.
 */
#ifndef CILIA_NODEPORT_H
#define CILIA_NODEPORT_H

#include "common.h"
#include "forward.h"
#include "ipcache.h"
#include "lb_packet.h"
#include "maps.h"
#include "nat.h"
#include "tunnel.h"

/* Tries for a free SNAT port before the packet is dropped. */
#define NODEPORT_SNAT_TRIES 16

/*
 * The NodePort service a packet from outside addresses: TCP or UDP to an
 * address of this node, at a port with a NodePort frontend. 0 otherwise.
 */
__inline_fn struct lb_service_value *nodeport_lookup(const struct flow *f)
{
	struct lb_service_value *svc;
	__u8 any[16] = {};

	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return 0;
	if (ipcache_identity(f->daddr, f->family) != CILIA_ID_HOST)
		return 0;
	svc = lb_service_lookup(any, f->dport, f->proto, f->family);
	if (!svc || !(svc->flags & CILIA_LB_FLAG_NODEPORT))
		return 0;
	return svc;
}

__inline_fn void nat_key_of(struct lb_nat_key *k, const __u8 *saddr, const __u8 *daddr,
			    __be16 sport, __be16 dport, const struct flow *f, __u8 dir)
{
	__builtin_memcpy(k->saddr, saddr, 16);
	__builtin_memcpy(k->daddr, daddr, 16);
	k->sport = sport;
	k->dport = dport;
	k->proto = f->proto;
	k->family = f->family;
	k->dir = dir;
}

/*
 * A local backend's flow (`f` already translated to it): its replies will
 * carry the node address and nodePort the client addressed. Returns 0 or
 * the drop reason.
 */
__inline_fn int nodeport_remember_frontend(const struct flow *f, const struct lb_state *lb,
					   __u64 now)
{
	struct lb_nat_key k = {};
	struct lb_nat_value v = {
	    .port = lb->fport,
	    .fport = lb->fport,
	    .backend_id = lb->backend_id,
	    .expires = now + ct_lifetime(f, CILIA_CT_SEEN_REPLY),
	    .rev_nat = lb->rev_nat,
	    .family = f->family,
	};

	__builtin_memcpy(v.addr, lb->frontend, 16);
	nat_key_of(&k, f->daddr, f->saddr, f->dport, f->sport, f, CILIA_NAT_REVNAT);
	if (bpf_map_update_elem(&cilia_lb_nat, &k, &v, BPF_ANY) < 0)
		return CILIA_DROP_CT_FULL;
	return 0;
}

/*
 * SNAT of a client's packet for a remote backend (`f` already translated
 * to the backend, `lb` the frontend it addressed): the flow keeps its
 * source port while its OUT entry lives and names the same backend; a new
 * one takes the first free port from a hash of the client, and its IN
 * entry is what the backend's reply is matched by. Returns 0 or the drop
 * reason.
 */
__inline_fn int nodeport_snat(struct __sk_buff *skb, struct flow *f, const struct lb_state *lb,
			      __u64 now)
{
	const __u32 range = CILIA_LB_SNAT_PORT_LAST - CILIA_LB_SNAT_PORT_FIRST + 1;
	__u64 expires = now + ct_lifetime(f, CILIA_CT_SEEN_REPLY);
	struct lb_nat_key out = {}, in = {};
	struct lb_nat_value *v;
	__be16 port = 0;
	__u32 base;

	nat_key_of(&out, f->saddr, lb->frontend, f->sport, lb->fport, f, CILIA_NAT_OUT);
	v = bpf_map_lookup_elem(&cilia_lb_nat, &out);
	if (v && v->backend_id == lb->backend_id && v->expires > now) {
		v->expires = expires;
		return nat_rewrite(skb, f, 0, lb->frontend, v->port);
	}

	struct lb_nat_value client = {
	    .port = f->sport,
	    .fport = lb->fport,
	    .backend_id = lb->backend_id,
	    .expires = expires,
	    .rev_nat = lb->rev_nat,
	    .family = f->family,
	};
	__builtin_memcpy(client.addr, f->saddr, 16);
	base = lb_hash(f->saddr, f->sport, f->family);
	for (int i = 0; i < NODEPORT_SNAT_TRIES; i++) {
		__be16 candidate = bpf_htons(CILIA_LB_SNAT_PORT_FIRST + (base + i) % range);

		nat_key_of(&in, f->daddr, lb->frontend, f->dport, candidate, f, CILIA_NAT_IN);
		v = bpf_map_lookup_elem(&cilia_lb_nat, &in);
		if (v && v->expires > now)
			continue;
		if (bpf_map_update_elem(&cilia_lb_nat, &in, &client, BPF_ANY) < 0)
			return CILIA_DROP_CT_FULL;
		port = candidate;
		break;
	}
	if (!port)
		return CILIA_DROP_CT_FULL;

	struct lb_nat_value snat = {
	    .port = port,
	    .fport = lb->fport,
	    .backend_id = lb->backend_id,
	    .expires = expires,
	    .rev_nat = lb->rev_nat,
	    .family = f->family,
	};
	__builtin_memcpy(snat.addr, lb->frontend, 16);
	if (bpf_map_update_elem(&cilia_lb_nat, &out, &snat, BPF_ANY) < 0)
		return CILIA_DROP_CT_FULL;
	return nat_rewrite(skb, f, 0, lb->frontend, port);
}

/*
 * A remote backend's reply to a SNATed NodePort flow (to this node at a
 * SNAT port with an IN entry): back to the client, from the node address
 * and nodePort it addressed. Returns 0 with `*hit` set when translated, 0
 * when the packet is no such reply, or the drop reason.
 */
__inline_fn int nodeport_unsnat(struct __sk_buff *skb, struct flow *f, __u8 *hit)
{
	struct lb_nat_key in = {};
	struct lb_nat_value *v;
	__u8 node[16];
	__u8 client[16];
	__be16 client_port, fport;
	int reason;

	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return 0;
	nat_key_of(&in, f->saddr, f->daddr, f->sport, f->dport, f, CILIA_NAT_IN);
	v = bpf_map_lookup_elem(&cilia_lb_nat, &in);
	if (!v)
		return 0;
	v->expires = bpf_ktime_get_ns() + ct_lifetime(f, CILIA_CT_SEEN_REPLY);
	__builtin_memcpy(client, v->addr, 16);
	client_port = v->port;
	fport = v->fport;
	__builtin_memcpy(node, f->daddr, 16);
	reason = nat_rewrite(skb, f, 1, client, client_port);
	if (!reason)
		reason = nat_rewrite(skb, f, 0, node, fport);
	if (!reason)
		*hit = 1;
	return reason;
}

/*
 * A NodePort reply, translated back: out of the underlay device to the
 * client, next hop by the node's FIB (no IP forwarding involved). Without
 * an underlay device in the node config: the stack.
 */
__inline_fn int nodeport_to_client(struct __sk_buff *skb, const struct flow *f,
				   const struct peers *p, const struct decision *d, __u8 dir)
{
	struct node_config *cfg = node_config();
	__u32 level = d ? d->level : monitor_level();
	int reason;

	if (!cfg || !cfg->underlay_ifindex) {
		count_forward(skb, CILIA_FWD_STACK, dir);
		event_trace(skb, f, p, level, CILIA_FWD_STACK, dir);
		return TC_ACT_OK;
	}
	__u32 ifindex = cfg->underlay_ifindex;

	reason = decrease_ttl(skb, f->family);
	if (reason)
		return drop(skb, reason, dir);
	count_forward(skb, CILIA_FWD_NATIVE, dir);
	event_trace(skb, f, p, level, CILIA_FWD_NATIVE, dir);
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}

/*
 * The node an address belongs to, as a route: a reply to a cluster node's
 * own address (a SNATed NodePort flow's, or one a node process opened)
 * goes straight to that node, as a packet for its pods would. 0 when the
 * address is no node's.
 */
__inline_fn int node_route(const struct flow *f, struct ipcache_value *route)
{
	struct endpoint_key node = {.family = f->family};

	__builtin_memcpy(node.addr, f->daddr, 16);
	if (!bpf_map_lookup_elem(&cilia_nodes, &node))
		return 0;
	__builtin_memcpy(route->tunnel, f->daddr, 16);
	route->tunnel_family = f->family;
	route->identity = CILIA_ID_REMOTE_NODE;
	return 1;
}

#endif
