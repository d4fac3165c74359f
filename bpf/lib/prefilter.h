/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The XDP prefilter's maps and lookup: source CIDRs dropped before the
 * node's stack sees the packet. Pinned by name under the agent's maps
 * directory like the endpoint maps, so the agent's CIDR updates reach every
 * device's copy of the program and outlive the agent.
 */
#ifndef CILIA_PREFILTER_H
#define CILIA_PREFILTER_H

#include "common.h"

/* Source CIDR -> its counter slot. LPM tries: one longest-prefix lookup
 * per packet, and each element update is atomic for packets. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, CILIA_PREFILTER_MAX);
	__type(key, struct prefilter_v4_key);
	__type(value, struct prefilter_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_prefilter_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, CILIA_PREFILTER_MAX);
	__type(key, struct prefilter_v6_key);
	__type(value, struct prefilter_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_prefilter_v6 SEC(".maps");

/* Dropped packets and bytes per CIDR (slot chosen by the agent). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CILIA_PREFILTER_MAX * 2);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_prefilter_counters SEC(".maps");

/* The listed CIDR holding an IPv4 source, if any. */
__inline_fn const struct prefilter_value *prefilter_lookup_v4(__be32 saddr)
{
	struct prefilter_v4_key key = {.prefixlen = 32};

	__builtin_memcpy(key.addr, &saddr, sizeof(key.addr));
	return bpf_map_lookup_elem(&cilia_prefilter_v4, &key);
}

/* The listed CIDR holding an IPv6 source, if any. */
__inline_fn const struct prefilter_value *prefilter_lookup_v6(const struct in6_addr *saddr)
{
	struct prefilter_v6_key key = {.prefixlen = 128};

	__builtin_memcpy(key.addr, saddr, sizeof(key.addr));
	return bpf_map_lookup_elem(&cilia_prefilter_v6, &key);
}

/* Counts a dropped packet in its CIDR's slot (per-CPU: no atomics). */
__inline_fn void prefilter_count(const struct prefilter_value *v, __u32 bytes)
{
	__u32 slot = v->counter;
	struct metrics_value *c = bpf_map_lookup_elem(&cilia_prefilter_counters, &slot);

	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

#endif
