/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Load-time specialization. CILIA_CONFIG lives in .rodata; the agent writes
 * it before load and the kernel freezes it, so the verifier sees constants.
 * Every read goes through a volatile access: otherwise clang would fold the
 * zero initializer into the code.
 */
#ifndef CILIA_CONFIG_H
#define CILIA_CONFIG_H

#include "common.h"

volatile const struct endpoint_config CILIA_CONFIG = {};

#define CFG_U32(field) (*(const volatile __u32 *)&CILIA_CONFIG.field)

__inline_fn void cfg_copy_mac(__u8 *out, const volatile __u8 *mac)
{
#pragma unroll
	for (int i = 0; i < 6; i++)
		out[i] = mac[i];
}

__inline_fn int cfg_ipv4_enabled(void)
{
	return CILIA_CONFIG.enable_ipv4;
}

__inline_fn __be32 cfg_ipv4(void)
{
	return CFG_U32(ipv4[0]);
}

__inline_fn int cfg_is_own_ipv6(const __u32 *addr)
{
	const volatile __u32 *own = (const volatile __u32 *)CILIA_CONFIG.ipv6;

	return addr[0] == own[0] && addr[1] == own[1] && addr[2] == own[2] && addr[3] == own[3];
}

#endif
