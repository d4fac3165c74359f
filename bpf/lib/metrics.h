/* SPDX-License-Identifier: GPL-2.0 */
/* Per-CPU packet counters by outcome, reason and direction. */
#ifndef CILIA_METRICS_H
#define CILIA_METRICS_H

#include "maps.h"

__inline_fn __u32 metrics_index(__u8 kind, __u8 reason, __u8 dir)
{
	return ((__u32)(kind & 3) << CILIA_METRICS_KIND_SHIFT) |
	       ((__u32)reason << CILIA_METRICS_REASON_SHIFT) | (dir & 3);
}

__inline_fn void metrics_count(__u8 kind, __u8 reason, __u8 dir, __u32 bytes)
{
	__u32 index = metrics_index(kind, reason, dir);
	struct metrics_value *val = bpf_map_lookup_elem(&cilia_metrics, &index);

	if (val) {
		/* per-CPU value: no other writer, no atomics needed */
		val->packets += 1;
		val->bytes += bytes;
	}
}

#endif
