// SPDX-License-Identifier: GPL-2.0
/*
 * The empty XDP drop for bench/prefilter.sh: drops every frame, looks at
 * none. With bench/xdpgen.c as the sender it measures what a drop costs
 * when no filter runs at all (generator, veth ring, XDP dispatch): the
 * part every XDP filter pays, subtracted to isolate the prefilter's own.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
