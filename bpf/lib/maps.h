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

#endif
