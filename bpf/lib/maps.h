/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Maps shared by every endpoint program. Pinned by name under the agent's
 * bpffs root, so each endpoint's program (a separately loaded, specialized
 * copy of the same object) sees the same maps, and they outlive the agent.
 */
#ifndef CILIA_MAPS_H
#define CILIA_MAPS_H

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CILIA_ENDPOINTS_MAX);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct metrics_key);
	__type(value, struct metrics_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, CILIA_IPCACHE_MAX);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ipcache SEC(".maps");

/*
 * Template of every endpoint's policy map (the inner map). Sizes rather than
 * types: clang emits the key/value structs of an inner map only as forward
 * declarations in BTF, which the loader cannot size.
 */
struct policy_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, CILIA_POLICY_MAX);
	__uint(key_size, sizeof(struct policy_key));
	__uint(value_size, sizeof(struct policy_value));
	__uint(map_flags, BPF_F_NO_PREALLOC);
};

/*
 * Endpoint id -> that endpoint's policy map. The agent fills a fresh inner
 * map and swaps it in with one update, so a packet sees either the old or
 * the new policy of an endpoint, never a mix.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, CILIA_POLICY_ENDPOINTS_MAX);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct policy_inner);
} cilia_policy SEC(".maps");

/*
 * Conntrack. A plain hash, not an LRU: an LRU would let one endpoint that
 * churns flows evict everybody else's (revoked entries included). Instead
 * each endpoint has a budget (cilia_ct_count), a full table refuses new
 * flows with a named drop, and the agent's GC removes expired entries.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CILIA_CT_MAX);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ct SEC(".maps");

/* Endpoint id -> conntrack entries it owns. Incremented by the datapath on
 * create, recounted by the agent's GC (which is what frees budget). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CILIA_POLICY_ENDPOINTS_MAX);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ct_count SEC(".maps");

/* First fragments' ports, for the later fragments of the same datagram. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CILIA_FRAG_MAX);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_frags SEC(".maps");

/* Drop, trace and policy-verdict events for the agent's monitor. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CILIA_EVENTS_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct global_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_config SEC(".maps");

#endif
