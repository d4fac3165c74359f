/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Service lookup and backend selection, shared by the per-packet load
 * balancer (the endpoint programs) and the socket-level one (sock.c). What
 * is decided here is only *which* backend; translating the packet or the
 * socket address, and pinning the flow, is the caller's business.
 */
#ifndef CILIA_LB_H
#define CILIA_LB_H

#include "common.h"
#include "filter.h"
#include "maps.h"

/* Whether some frontend may have the address (its bit in cilia_lb_filter). */
__inline_fn int lb_maybe_frontend(const __u8 *addr, __u8 family)
{
	return addr_filter_has(&cilia_lb_filter, addr, family);
}

/* The frontend's master entry (slot 0), or 0 when no service has it. */
__inline_fn struct lb_service_value *lb_service_lookup(const __u8 *addr, __be16 port, __u8 proto,
						       __u8 family)
{
	struct lb_service_key key = {.port = port, .proto = proto, .family = family};

	if (family == CILIA_FAMILY_IPV6)
		__builtin_memcpy(key.addr, addr, 16);
	else
		__builtin_memcpy(key.addr, addr, 4);
	return bpf_map_lookup_elem(&cilia_lb_services, &key);
}

__inline_fn struct lb_backend *lb_backend_lookup(__u32 backend_id)
{
	return backend_id ? bpf_map_lookup_elem(&cilia_lb_backends, &backend_id) : 0;
}

/* A 32-bit mix of a client (address and port): spreads Maglev lookups. */
__inline_fn __u32 lb_hash(const __u8 *addr, __be16 port, __u8 family)
{
	__u32 w[4] = {};
	__u32 h = 0x9e3779b9u ^ family;

	if (family == CILIA_FAMILY_IPV6)
		__builtin_memcpy(w, addr, 16);
	else
		__builtin_memcpy(w, addr, 4);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		h ^= w[i];
		h *= 0x85ebca6bu;
		h ^= h >> 13;
	}
	h ^= (__u32)port;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

/* The backend in slot `slot` (1..count) of the master's generation. */
__inline_fn __u32 lb_slot_backend(const __u8 *addr, __be16 port, __u8 proto, __u8 family,
				  const struct lb_service_value *svc, __u16 slot)
{
	struct lb_service_key key = {
	    .port = port, .proto = proto, .family = family, .slot = slot, .gen = svc->gen};
	struct lb_service_value *v;

	if (family == CILIA_FAMILY_IPV6)
		__builtin_memcpy(key.addr, addr, 16);
	else
		__builtin_memcpy(key.addr, addr, 4);
	v = bpf_map_lookup_elem(&cilia_lb_services, &key);
	return v ? v->backend_id : 0;
}

/* Entry `hash mod size` of the service's Maglev table; 0 without one. */
__inline_fn __u32 lb_maglev_backend(const struct lb_service_value *svc, __u32 hash)
{
	__u32 zero = 0, outer = svc->rev_nat, index, size = CILIA_LB_MAGLEV_SIZE_DEFAULT;
	struct global_config *g = bpf_map_lookup_elem(&cilia_config, &zero);
	__u32 *backend;
	void *table;

	if (g && g->maglev_size)
		size = g->maglev_size;
	table = bpf_map_lookup_elem(&cilia_lb_maglev, &outer);
	if (!table)
		return 0;
	index = hash % size;
	backend = bpf_map_lookup_elem(table, &index);
	return backend ? *backend : 0;
}

/*
 * The affinity entry of a client of the service, when it is younger than
 * the service's timeout and its backend still active; 0 otherwise.
 */
__inline_fn __u32 lb_affinity_backend(const struct lb_service_value *svc, const __u8 *client,
				      __u8 family, __u64 now)
{
	struct lb_affinity_key key = {.rev_nat = svc->rev_nat, .family = family};
	struct lb_affinity_value *v;
	struct lb_backend *b;

	if (!(svc->flags & CILIA_LB_FLAG_AFFINITY))
		return 0;
	if (family == CILIA_FAMILY_IPV6)
		__builtin_memcpy(key.addr, client, 16);
	else
		__builtin_memcpy(key.addr, client, 4);
	v = bpf_map_lookup_elem(&cilia_lb_affinity, &key);
	if (!v || now - v->last_used > (__u64)svc->affinity_timeout * NSEC_PER_SEC)
		return 0;
	b = lb_backend_lookup(v->backend_id);
	if (!b || b->state != CILIA_LB_BACKEND_ACTIVE)
		return 0;
	return v->backend_id;
}

/* Records (or refreshes) a client's backend for an affinity service. */
__inline_fn void lb_affinity_update(const struct lb_service_value *svc, const __u8 *client,
				    __u8 family, __u32 backend_id, __u64 now)
{
	struct lb_affinity_key key = {.rev_nat = svc->rev_nat, .family = family};
	struct lb_affinity_value v = {.last_used = now, .backend_id = backend_id};

	if (!(svc->flags & CILIA_LB_FLAG_AFFINITY))
		return;
	if (family == CILIA_FAMILY_IPV6)
		__builtin_memcpy(key.addr, client, 16);
	else
		__builtin_memcpy(key.addr, client, 4);
	bpf_map_update_elem(&cilia_lb_affinity, &key, &v, BPF_ANY);
}

/*
 * Picks the backend of a new flow from `client` (address, port) to the
 * frontend (addr, port, proto, family) whose master entry is `svc`:
 * affinity first, then the service's algorithm. Returns the backend id,
 * 0 when the service has no active backend.
 */
__inline_fn __u32 lb_select_backend(const __u8 *addr, __be16 port, __u8 proto, __u8 family,
				    const struct lb_service_value *svc, const __u8 *client,
				    __be16 client_port, __u64 now)
{
	__u32 backend;

	if (!svc->count)
		return 0;
	backend = lb_affinity_backend(svc, client, family, now);
	if (backend)
		return backend;
	if (svc->algorithm == CILIA_LB_ALG_MAGLEV)
		/* Affinity services hash the client address alone, so a
		 * forgotten affinity entry finds the same backend again. */
		backend = lb_maglev_backend(
		    svc, lb_hash(client, (svc->flags & CILIA_LB_FLAG_AFFINITY) ? 0 : client_port,
				 family));
	else
		backend = lb_slot_backend(addr, port, proto, family, svc,
					  (__u16)(bpf_get_prandom_u32() % svc->count) + 1);
	if (backend)
		lb_affinity_update(svc, client, family, backend, now);
	return backend;
}

#endif
