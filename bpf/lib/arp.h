/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ARP responder: the endpoint's gateway (and any other IPv4 neighbour it
 * asks for) answers with the host-side veth's MAC, so no bridge and no
 * proxy_arp sysctl are needed. Replies to the host's own requests and
 * announcements go to the stack.
 */
#ifndef CILIA_ARP_H
#define CILIA_ARP_H

#include "common.h"
#include "config.h"
#include "events.h"

struct arp_eth {
	__be16 hrd;
	__be16 pro;
	__u8 hln;
	__u8 pln;
	__be16 op;
	__u8 sha[6];
	__be32 sip;
	__u8 tha[6];
	__be32 tip;
} __attribute__((packed));

__inline_fn int handle_arp(struct __sk_buff *skb, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct arp_eth *arp = data + ETH_HLEN;
	__u8 node_mac[6];

	if ((void *)(arp + 1) > data_end)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (arp->hrd != bpf_htons(ARPHRD_ETHER) || arp->pro != bpf_htons(ETH_P_IP) ||
	    arp->hln != 6 || arp->pln != 4)
		return drop(skb, CILIA_DROP_INVALID, dir);
	if (arp->sip != 0 && arp->sip != cfg_ipv4())
		return drop(skb, CILIA_DROP_SPOOFED_SOURCE, dir);
	if (arp->op != bpf_htons(ARPOP_REQUEST) || arp->tip == cfg_ipv4() || arp->sip == 0) {
		count_forward(skb, CILIA_FWD_STACK, dir);
		return TC_ACT_OK;
	}

	/* Turn the request into the reply, in place. */
	__be32 target = arp->tip;

	cfg_copy_mac(node_mac, CILIA_CONFIG.node_mac);
	arp->op = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(arp->tha, arp->sha, 6);
	arp->tip = arp->sip;
	__builtin_memcpy(arp->sha, node_mac, 6);
	arp->sip = target;
	__builtin_memcpy(eth->h_dest, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, node_mac, 6);

	count_forward(skb, CILIA_FWD_ARP_REPLY, dir);
	/* egress of the host-side veth delivers into the container */
	return bpf_redirect(skb->ifindex, 0);
}

#endif
