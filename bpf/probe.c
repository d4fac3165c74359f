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

/*
 * The clock calibration's sample (crates/cilia-datapath/src/clock.rs):
 * writes the coarse clock, jiffies and the coarse clock again, three
 * little-endian u64, after the packet's first 14 bytes; the packet comes
 * back from BPF_PROG_TEST_RUN with them.
 */
SEC("classifier")
int probe_clock(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u64 *out = data + 14;

	if ((void *)(out + 3) > data_end)
		return TC_ACT_SHOT;
	out[0] = bpf_ktime_get_coarse_ns();
	out[1] = bpf_jiffies64();
	out[2] = bpf_ktime_get_coarse_ns();
	return TC_ACT_OK;
}

SEC("xdp")
int probe_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
