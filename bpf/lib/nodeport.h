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

#ifndef TCP_FLAG_ACK
#define TCP_FLAG_ACK 0x10
#endif

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
 * How long a NodePort translation lives from this packet on: an unanswered
 * TCP SYN only the SYN timeout (a SYN flood cannot hold the SNAT ports), a
 * closing TCP flow the close timeout, anything else the established one.
 */
__inline_fn __u64 nodeport_lifetime(const struct flow *f)
{
	int syn = f->proto == IPPROTO_TCP && (f->tcp_flags & TCP_FLAG_SYN) &&
		  !(f->tcp_flags & TCP_FLAG_ACK);

	return ct_lifetime(f, syn ? 0 : CILIA_CT_SEEN_REPLY);
}

/* An SNATed flow's IN entry `in` after its packet `f` (`reply`: from the
 * backend): its closing marks (tcp_close_marks), and how long the flow's
 * translation lives from this packet on. */
__inline_fn __u64 nodeport_snat_lifetime(struct lb_nat_value *in, const struct flow *f,
					 const int reply)
{
	if (f->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST | TCP_FLAG_SYN))
		in->flags = (__u8)tcp_close_marks(in->flags, f, reply, CILIA_NAT_CLOSING,
						  CILIA_NAT_FIN_OUT, CILIA_NAT_FIN_IN);
	if (f->proto == IPPROTO_TCP && (in->flags & CILIA_NAT_CLOSING))
		return CILIA_CT_TCP_CLOSE * NSEC_PER_SEC;
	return nodeport_lifetime(f);
}

/*
 * The SNAT port of a client's flow to a remote backend (`f` already
 * translated to the backend, `lb` the frontend it addressed): the flow
 * keeps its source port while its OUT entry lives, names the same backend
 * and its IN entry still names this client; a new one takes the first free
 * port from a hash of the client, and its IN entry is what the backend's
 * reply is matched by. The source address becomes the frontend (the node
 * address the client addressed). Maps only: the tc and the XDP paths keep
 * the same entries. Returns 0 with `*port` set, or the drop reason.
 */
__inline_fn int nodeport_snat_port(const struct flow *f, const struct lb_state *lb, __u64 now,
				   __be16 *port)
{
	const __u32 range = CILIA_LB_SNAT_PORT_LAST - CILIA_LB_SNAT_PORT_FIRST + 1;
	__u64 expires = now + nodeport_lifetime(f);
	struct lb_nat_key out = {}, in = {};
	struct lb_nat_value *v, *back;
	__u32 base;

	*port = 0;
	nat_key_of(&out, f->saddr, lb->frontend, f->sport, lb->fport, f, CILIA_NAT_OUT);
	v = bpf_map_lookup_elem(&cilia_lb_nat, &out);
	if (v && v->backend_id == lb->backend_id && v->expires > now) {
		nat_key_of(&in, f->daddr, lb->frontend, f->dport, v->port, f, CILIA_NAT_IN);
		back = bpf_map_lookup_elem(&cilia_lb_nat, &in);
		if (back && back->expires > now && back->port == f->sport &&
		    addr_eq(back->addr, f->saddr)) {
			expires = now + nodeport_snat_lifetime(back, f, 0);
			v->expires = expires;
			back->expires = expires;
			*port = v->port;
			return 0;
		}
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
		*port = candidate;
		break;
	}
	if (!*port)
		return CILIA_DROP_CT_FULL;

	struct lb_nat_value snat = {
	    .port = *port,
	    .fport = lb->fport,
	    .backend_id = lb->backend_id,
	    .expires = expires,
	    .rev_nat = lb->rev_nat,
	    .family = f->family,
	};
	__builtin_memcpy(snat.addr, lb->frontend, 16);
	if (bpf_map_update_elem(&cilia_lb_nat, &out, &snat, BPF_ANY) < 0)
		return CILIA_DROP_CT_FULL;
	return 0;
}

/* SNAT of a client's packet for a remote backend (nodeport_snat_port).
 * Returns 0 or the drop reason. */
__inline_fn int nodeport_snat(struct __sk_buff *skb, struct flow *f, const struct lb_state *lb,
			      __u64 now)
{
	__be16 port;
	int reason = nodeport_snat_port(f, lb, now, &port);

	if (reason)
		return reason;
	return nat_rewrite(skb, f, 0, lb->frontend, port);
}

/*
 * Whether `f` is a remote backend's reply to a SNATed NodePort flow (to
 * this node at a SNAT port with an IN entry): then 1, its entry refreshed,
 * and the client (`client`, 16 bytes, and `*client_port`) and the nodePort
 * (`*fport`) it goes back from. Maps only, shared with the XDP path.
 */
__inline_fn int nodeport_unsnat_lookup(const struct flow *f, __u8 *client, __be16 *client_port,
				       __be16 *fport)
{
	struct lb_nat_key in = {};
	struct lb_nat_value *v;

	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return 0;
	nat_key_of(&in, f->saddr, f->daddr, f->sport, f->dport, f, CILIA_NAT_IN);
	v = bpf_map_lookup_elem(&cilia_lb_nat, &in);
	if (!v)
		return 0;
	v->expires = cil_now() + nodeport_snat_lifetime(v, f, 1);
	__builtin_memcpy(client, v->addr, 16);
	*client_port = v->port;
	*fport = v->fport;
	return 1;
}

/*
 * A remote backend's reply to a SNATed NodePort flow: back to the client,
 * from the node address and nodePort it addressed. Returns 0 with `*hit`
 * set when translated, 0 when the packet is no such reply, or the drop
 * reason.
 */
__inline_fn int nodeport_unsnat(struct __sk_buff *skb, struct flow *f, __u8 *hit)
{
	__u8 node[16];
	__u8 client[16];
	__be16 client_port, fport;
	int reason;

	if (!nodeport_unsnat_lookup(f, client, &client_port, &fport))
		return 0;
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

/* The IPv4 header checksum and the length fields the DSR header changes. */
#define DSR_IPV4_TOT_LEN   (ETH_HLEN + 2)
#define DSR_IPV6_PAYLOAD   (ETH_HLEN + 4)
#define DSR_IPV6_NEXTHDR   (ETH_HLEN + 6)
#define DSR_IPV4_OPT_OFF   (ETH_HLEN + 20)
#define DSR_IPV6_EXT_OFF   (ETH_HLEN + 40)
#define IPV6_EXT_DEST_OPTS 60

/* Whether a packet to a DSR service's remote backend carries the frontend:
 * the one that selects the backend (every TCP SYN, retransmissions
 * included; a UDP flow's first datagram). */
__inline_fn int dsr_wanted(const struct flow *f, const struct lb_state *lb)
{
	if (f->proto == IPPROTO_TCP)
		return (f->tcp_flags & TCP_FLAG_SYN) && !(f->tcp_flags & TCP_FLAG_ACK);
	return lb->selected;
}

/* The IPv4 DSR option (CILIA_DSR_IPV4_OPT_LEN bytes) naming `lb`'s frontend. */
__inline_fn void dsr_ipv4_option(__u8 *o, const struct lb_state *lb)
{
	o[0] = CILIA_DSR_IPV4_OPT;
	o[1] = CILIA_DSR_IPV4_OPT_LEN;
	__builtin_memcpy(o + 2, &lb->fport, 2);
	__builtin_memcpy(o + 4, lb->frontend, 4);
}

/* The IPv6 Destination Options header (CILIA_DSR_IPV6_HDR_LEN bytes, zeroed
 * by the caller) naming `lb`'s frontend, followed by `next`. */
__inline_fn void dsr_ipv6_header(__u8 *hdr, const struct lb_state *lb, __u8 next)
{
	hdr[0] = next;
	hdr[1] = CILIA_DSR_IPV6_HDR_LEN / 8 - 1;
	hdr[2] = CILIA_DSR_IPV6_OPT;
	hdr[3] = CILIA_DSR_IPV6_OPT_LEN;
	__builtin_memcpy(hdr + 4, &lb->fport, 2);
	__builtin_memcpy(hdr + 6, lb->frontend, 16);
	hdr[22] = 1; /* PadN, no data bytes */
}

/*
 * Inserts the DSR header (the frontend the client addressed, see CILIA_DSR_*
 * in abi.h) right after the fixed IP header. An IPv4 packet that already
 * has options is refused (CILIA_DROP_INVALID): the option must come first.
 * Returns 0 or the drop reason.
 */
__inline_fn int dsr_encode(struct __sk_buff *skb, struct flow *f, const struct lb_state *lb)
{
	if (f->family == CILIA_FAMILY_IPV4) {
		__be32 opt[2];
		__u8 *o = (__u8 *)opt;
		__be16 old_len, new_len, old_word, new_word;
		__u8 vihl = 0x47; /* version 4, 7 words: the option makes two */
		__s64 diff;

		if (f->l4_off != DSR_IPV4_OPT_OFF)
			return CILIA_DROP_INVALID;
		dsr_ipv4_option(o, lb);
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &old_word, 2) < 0 ||
		    bpf_skb_load_bytes(skb, DSR_IPV4_TOT_LEN, &old_len, 2) < 0)
			return CILIA_DROP_INVALID;
		new_len = bpf_htons(bpf_ntohs(old_len) + CILIA_DSR_IPV4_OPT_LEN);
		new_word = old_word;
		__builtin_memcpy(&new_word, &vihl, 1);
		if (bpf_skb_adjust_room(skb, CILIA_DSR_IPV4_OPT_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
			return CILIA_DROP_WRITE_FAILED;
		diff = bpf_csum_diff(0, 0, opt, sizeof(opt), 0);
		if (diff < 0 ||
		    bpf_skb_store_bytes(skb, DSR_IPV4_OPT_OFF, opt, sizeof(opt), 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_HLEN, &new_word, 2, 0) < 0 ||
		    bpf_skb_store_bytes(skb, DSR_IPV4_TOT_LEN, &new_len, 2, 0) < 0 ||
		    bpf_l3_csum_replace(skb, NAT_IPV4_CSUM_OFF, old_word, new_word, 2) < 0 ||
		    bpf_l3_csum_replace(skb, NAT_IPV4_CSUM_OFF, old_len, new_len, 2) < 0 ||
		    bpf_l3_csum_replace(skb, NAT_IPV4_CSUM_OFF, 0, diff, 0) < 0)
			return CILIA_DROP_WRITE_FAILED;
		f->l4_off += CILIA_DSR_IPV4_OPT_LEN;
		return 0;
	}

	__u8 hdr[CILIA_DSR_IPV6_HDR_LEN] = {};
	__be16 len;
	__u8 next = IPV6_EXT_DEST_OPTS;

	if (bpf_skb_load_bytes(skb, DSR_IPV6_NEXTHDR, hdr, 1) < 0 ||
	    bpf_skb_load_bytes(skb, DSR_IPV6_PAYLOAD, &len, 2) < 0)
		return CILIA_DROP_INVALID;
	dsr_ipv6_header(hdr, lb, hdr[0]);
	len = bpf_htons(bpf_ntohs(len) + CILIA_DSR_IPV6_HDR_LEN);
	if (bpf_skb_adjust_room(skb, CILIA_DSR_IPV6_HDR_LEN, BPF_ADJ_ROOM_NET, 0) < 0 ||
	    bpf_skb_store_bytes(skb, DSR_IPV6_EXT_OFF, hdr, sizeof(hdr), 0) < 0 ||
	    bpf_skb_store_bytes(skb, DSR_IPV6_NEXTHDR, &next, 1, 0) < 0 ||
	    bpf_skb_store_bytes(skb, DSR_IPV6_PAYLOAD, &len, 2, 0) < 0)
		return CILIA_DROP_WRITE_FAILED;
	f->l4_off += CILIA_DSR_IPV6_HDR_LEN;
	return 0;
}

/*
 * The frontend a DSR packet carries, if it carries one (where dsr_encode
 * put it): `addr` (16 bytes, zeroed by the caller) and `port`. Returns 1
 * when found.
 */
__inline_fn int dsr_decode(struct __sk_buff *skb, const struct flow *f, __u8 *addr, __be16 *port)
{
	__u8 b[CILIA_DSR_IPV6_HDR_LEN];

	if (f->family == CILIA_FAMILY_IPV4) {
		if (f->l4_off < DSR_IPV4_OPT_OFF + CILIA_DSR_IPV4_OPT_LEN ||
		    bpf_skb_load_bytes(skb, DSR_IPV4_OPT_OFF, b, CILIA_DSR_IPV4_OPT_LEN) < 0)
			return 0;
		if (b[0] != CILIA_DSR_IPV4_OPT || b[1] != CILIA_DSR_IPV4_OPT_LEN)
			return 0;
		__builtin_memcpy(port, b + 2, 2);
		__builtin_memcpy(addr, b + 4, 4);
		return 1;
	}
	if (bpf_skb_load_bytes(skb, DSR_IPV6_NEXTHDR, b, 1) < 0 || b[0] != IPV6_EXT_DEST_OPTS)
		return 0;
	if (bpf_skb_load_bytes(skb, DSR_IPV6_EXT_OFF, b, sizeof(b)) < 0)
		return 0;
	if (b[2] != CILIA_DSR_IPV6_OPT || b[3] != CILIA_DSR_IPV6_OPT_LEN)
		return 0;
	__builtin_memcpy(port, b + 4, 2);
	__builtin_memcpy(addr, b + 6, 16);
	return 1;
}

/* Slots of a DSR service whose backends dsr_accept compares the packet's
 * destination with (a forged option costs at most this many lookups). */
#define DSR_BACKEND_SCAN_MAX 256

/* bpf_loop state of dsr_is_backend: the slot key (its slot set per
 * iteration) and the destination looked for. */
struct dsr_scan {
	struct lb_service_key key;
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 found;
};

static long dsr_scan_slot(__u32 i, void *ctx)
{
	struct dsr_scan *s = ctx;
	struct lb_service_value *v;
	struct lb_backend *b;

	s->key.slot = (__u16)(i + 1);
	v = bpf_map_lookup_elem(&cilia_lb_services, &s->key);
	if (!v)
		return 0;
	b = lb_backend_lookup(v->backend_id);
	if (b && b->family == s->family && b->port == s->port && addr_eq(b->addr, s->addr)) {
		s->found = 1;
		return 1;
	}
	return 0;
}

/*
 * Whether the packet's destination (address and port) is a backend in the
 * slots of the service `svc` (its key: `port`, the packet's protocol and
 * family, the unspecified address). A service of more than
 * DSR_BACKEND_SCAN_MAX slots is searched in its first ones only and
 * otherwise admitted: the bound keeps a forged option cheap (see "DSR
 * validation" in docs/SERVICES.md).
 */
__inline_fn int dsr_is_backend(const struct flow *f, const struct lb_service_value *svc,
			       __be16 port)
{
	struct dsr_scan s = {
	    .key = {.port = port, .proto = f->proto, .family = f->family, .gen = svc->gen},
	    .port = f->dport,
	    .family = f->family,
	};
	__u32 n = svc->count;

	__builtin_memcpy(s.addr, f->daddr, 16);
	if (n > DSR_BACKEND_SCAN_MAX)
		n = DSR_BACKEND_SCAN_MAX;
	if (bpf_loop(n, dsr_scan_slot, &s, 0) < 0)
		return 0;
	return s.found || svc->count > DSR_BACKEND_SCAN_MAX;
}

/*
 * On the backend's node: a packet from another node carrying a DSR
 * frontend of one of this node's NodePort services starts a flow whose
 * replies the backend's node translates itself (the frontend as source, a
 * REVNAT entry) and sends straight to the client. In native routing nothing
 * authenticates who wrote the option (it comes with the client's address),
 * so it is believed only when it names what a cluster node's load balancer
 * writes: an address of a cluster node (ipcache identity host or
 * remote-node), the port of a NodePort service in DSR mode here, and the
 * packet going to one of that service's backends. Anything else would make
 * this node send the backend's replies from an address of the sender's
 * choosing: dropped, CILIA_DROP_DSR_FORGED. Returns 0 (`*rev_nat` the
 * service's rev-NAT id for the flow's conntrack entry, 0 for a packet
 * without the option) or the drop reason.
 */
__inline_fn int dsr_accept(struct __sk_buff *skb, const struct flow *f, __u16 *rev_nat)
{
	const __u8 dsr_nodeport = CILIA_LB_FLAG_NODEPORT | CILIA_LB_FLAG_DSR;
	struct lb_service_value *svc;
	__u8 any[16] = {};
	struct lb_state lb = {};
	__u32 node;

	*rev_nat = 0;
	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return 0;
	if (!dsr_decode(skb, f, lb.frontend, &lb.fport))
		return 0;
	node = ipcache_identity(lb.frontend, f->family);
	if (node != CILIA_ID_HOST && node != CILIA_ID_REMOTE_NODE)
		return CILIA_DROP_DSR_FORGED;
	svc = lb_service_lookup(any, lb.fport, f->proto, f->family);
	if (!svc || (svc->flags & dsr_nodeport) != dsr_nodeport ||
	    !dsr_is_backend(f, svc, lb.fport))
		return CILIA_DROP_DSR_FORGED;
	lb.rev_nat = svc->rev_nat;
	if (nodeport_remember_frontend(f, &lb, cil_now()))
		return CILIA_DROP_CT_FULL;
	*rev_nat = lb.rev_nat;
	return 0;
}

#endif
