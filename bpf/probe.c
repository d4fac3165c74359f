// SPDX-License-Identifier: GPL-2.0
/*
 * Kernel feature probes and the benchmark baseline. Each program is loaded
 * on its own; a verifier rejection tells the agent a helper or program type
 * is missing.
 */
#include "lib/common.h"

/* Baseline for benchmarks: the cheapest possible tc program. */
SEC("classifier")
int probe_empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

SEC("classifier")
int probe_redirect_peer(struct __sk_buff *skb)
{
	if (skb->mark == 0xdead)
		return bpf_redirect_peer(0, 0);
	return TC_ACT_OK;
}

SEC("xdp")
int probe_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
