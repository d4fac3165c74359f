// SPDX-License-Identifier: GPL-2.0
/*
 * Endpoint program. One specialized copy per endpoint, attached with TCX to
 * the ingress of the endpoint's host-side veth, i.e. it sees every packet the
 * container sends: parse -> answer neighbour discovery -> check the source
 * -> deliver to a local endpoint or hand to the host stack.
 */
#include "lib/common.h"
#include "lib/arp.h"
#include "lib/config.h"
#include "lib/ipv4.h"
#include "lib/ipv6.h"
#include "lib/metrics.h"

SEC("classifier")
int cil_from_container(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	const __u8 dir = CILIA_DIR_EGRESS;

	if ((void *)(eth + 1) > data_end)
		return drop(skb, CILIA_DROP_INVALID, dir);

	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IPV6):
		return handle_ipv6(skb, dir);
	case bpf_htons(ETH_P_IP):
		if (!cfg_ipv4_enabled())
			return drop(skb, CILIA_DROP_UNSUPPORTED_L3, dir);
		return handle_ipv4(skb, dir);
	case bpf_htons(ETH_P_ARP):
		if (!cfg_ipv4_enabled())
			return drop(skb, CILIA_DROP_UNSUPPORTED_L3, dir);
		return handle_arp(skb, dir);
	default:
		return drop(skb, CILIA_DROP_UNSUPPORTED_L3, dir);
	}
}

/*
 * Attached with TCX to the egress of the host-side veth: packets the node's
 * stack delivers to the container (from the host or routed from elsewhere).
 * Local endpoint-to-endpoint traffic never passes here: redirect_peer skips
 * it, and the sender's program already applied this endpoint's ingress policy.
 */
SEC("classifier")
int cil_to_container(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	const __u8 dir = CILIA_DIR_INGRESS;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IPV6):
		return handle_ipv6_to_endpoint(skb, dir);
	case bpf_htons(ETH_P_IP):
		if (!cfg_ipv4_enabled())
			return TC_ACT_OK;
		return handle_ipv4_to_endpoint(skb, dir);
	default:
		return TC_ACT_OK; /* ARP and the like: the stack's business */
	}
}

char LICENSE[] SEC("license") = "GPL";
