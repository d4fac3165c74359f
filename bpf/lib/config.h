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

#ifndef CILIA_GENERIC
volatile const struct endpoint_config CILIA_CONFIG = {};
#else
/*
 * The generic build (lxc_generic.o, -DCILIA_GENERIC): one program, verified
 * once per agent, attached to a new endpoint at once so that it enforces
 * policy from its first packet while its specialized build is verified in
 * the background and swapped in through the link (see "Endpoint programs"
 * in docs/ARCHITECTURE.md). The configuration is the same struct, read
 * from a map keyed by the host-side veth's ifindex: cil_generic_enter
 * copies the packet's endpoint's entry into a per-CPU slot, which every
 * CILIA_CONFIG read then refers to. A tc program runs to its end on its CPU
 * (no other tc program runs there meanwhile: none of the helpers it calls
 * runs a program synchronously), so the slot is this packet's until it
 * returns. The map is the agent's, not pinned: it lives as long as the
 * generic program does, which keeps it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CILIA_ENDPOINTS_MAX);
	__type(key, __u32);
	__type(value, struct endpoint_config);
} cilia_generic_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct endpoint_config);
} cilia_generic_now SEC(".maps");

/* A constant in-bounds key of an array: the kernel (≥ 6.14) knows the
 * lookup cannot fail, so no NULL check is needed (nor possible to keep:
 * clang would fold it away). Where the kernel does not, the generic
 * program fails to load and the agent reports it and specializes every
 * endpoint before attaching, as before. */
__inline_fn struct endpoint_config *cfg_now(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&cilia_generic_now, &zero);
}

#define CILIA_CONFIG (*cfg_now())

/*
 * Makes the configuration of the endpoint whose device `skb` passes the
 * current one. 0 when the agent has not (or no longer) configured that
 * device: the caller drops the packet, failing closed; the slot is then
 * zeroed so that the drop is charged to no endpoint.
 */
__inline_fn int cil_generic_enter(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_config *cfg = bpf_map_lookup_elem(&cilia_generic_config, &ifindex);
	struct endpoint_config *now = cfg_now();

	if (!cfg) {
		__builtin_memset(now, 0, sizeof(*now));
		return 0;
	}
	__builtin_memcpy(now, cfg, sizeof(*now));
	return 1;
}
#endif

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
