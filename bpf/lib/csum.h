/* SPDX-License-Identifier: GPL-2.0 */
/* Internet checksum helpers. */
#ifndef CILIA_CSUM_H
#define CILIA_CSUM_H

#include "common.h"

/* Fold a 32-bit partial sum (as returned by bpf_csum_diff) to 16 bits. */
__inline_fn __u16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

#endif
