/* SPDX-License-Identifier: GPL-2.0 */
/* Per-CPU packet counters by outcome, reason and direction. */
#ifndef CILIA_METRICS_H
#define CILIA_METRICS_H

#include "maps.h"

__inline_fn void metrics_count(__u8 kind, __u8 reason, __u8 dir, __u32 bytes)
{
	struct metrics_key key = {.kind = kind, .reason = reason, .dir = dir};
	struct metrics_value *val = bpf_map_lookup_elem(&cilia_metrics, &key);

	if (val) {
		/* per-CPU value: no other writer, no atomics needed */
		val->packets += 1;
		val->bytes += bytes;
		return;
	}
	struct metrics_value init = {.packets = 1, .bytes = bytes};
	bpf_map_update_elem(&cilia_metrics, &key, &init, BPF_NOEXIST);
}

#endif
