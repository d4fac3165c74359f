// SPDX-License-Identifier: GPL-2.0
/*
 * The two-device floor of bench/policy-scale.sh: a tc program that hands
 * every packet to the peer of device TARGET (an ifindex, set with -D at
 * build time) by bpf_redirect_peer and looks at nothing: the shape of an
 * endpoint's path (container veth -> node -> the destination's veth)
 * without any of cilia's work, to tell the path's cost from the program's.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#ifndef TARGET
#error "build with -DTARGET=<ifindex>"
#endif

SEC("tc")
int redirect_peer(struct __sk_buff *skb)
{
	return bpf_redirect_peer(TARGET, 0);
}

char LICENSE[] SEC("license") = "GPL";
