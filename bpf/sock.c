// SPDX-License-Identifier: GPL-2.0
/*
 * Socket-level load balancing: cgroup sock_addr programs, attached to one
 * cgroup v2 directory (the agent's --socket-lb-cgroup) and so run for every
 * socket of every process below it, whatever its network namespace.
 *
 * connect4/6, sendmsg4/6: the address a socket is connected or sent to is
 * looked up as a frontend; a service's backend replaces it before the
 * kernel routes anything, so the flow's packets carry the backend from the
 * first one and never meet the per-packet load balancer. recvmsg4/6,
 * getpeername4/6: the backend a translated socket talks to is reported as
 * the frontend the application asked for.
 *
 * Only sockets of network namespaces in cilia_lb_netns are translated:
 * several agents (and whatever else runs on the machine) share one kernel
 * and one cgroup tree, and each serves only its node's and its endpoints'
 * namespaces.
 *
 * An IPv6 socket addressing an IPv4-mapped address (::ffff:a.b.c.d) is
 * served as IPv4: the IPv4 service, the IPv4 backend, written back mapped.
 * (The kernel runs sendmsg4, not sendmsg6, for such a datagram.)
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/ipcache.h"
#include "lib/lb.h"
#include "lib/metrics.h"

/* Return codes of cgroup sock_addr programs. */
#define SYS_REJECT  0 /* the syscall fails with EPERM */
#define SYS_PROCEED 1

/* The address a hook sees, family-independent. */
struct sock_addr {
	__u8 addr[16]; /* IPv4 uses the first 4 bytes */
	__be16 port;
	__u8 family;
	__u8 mapped; /* read from an IPv6 socket as ::ffff:IPv4: written back so */
};

__inline_fn void addr_read4(const struct bpf_sock_addr *ctx, struct sock_addr *a)
{
	__u32 ip = ctx->user_ip4;

	__builtin_memcpy(a->addr, &ip, 4);
	a->port = (__be16)ctx->user_port;
	a->family = CILIA_FAMILY_IPV4;
}

__inline_fn void addr_read6(const struct bpf_sock_addr *ctx, struct sock_addr *a)
{
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2],
	      w3 = ctx->user_ip6[3];

	a->port = (__be16)ctx->user_port;
	if (!w0 && !w1 && w2 == bpf_htonl(0xffff)) {
		__builtin_memcpy(a->addr, &w3, 4);
		a->family = CILIA_FAMILY_IPV4;
		a->mapped = 1;
		return;
	}
	__builtin_memcpy(a->addr, &w0, 4);
	__builtin_memcpy(a->addr + 4, &w1, 4);
	__builtin_memcpy(a->addr + 8, &w2, 4);
	__builtin_memcpy(a->addr + 12, &w3, 4);
	a->family = CILIA_FAMILY_IPV6;
}

__inline_fn void addr_write4(struct bpf_sock_addr *ctx, const __u8 *addr, __be16 port)
{
	__u32 ip;

	__builtin_memcpy(&ip, addr, 4);
	ctx->user_ip4 = ip;
	ctx->user_port = (__u32)port;
}

/* Writes an IPv6 socket's address: `addr` of `family`, mapped if IPv4. */
__inline_fn void addr_write6(struct bpf_sock_addr *ctx, const __u8 *addr, __be16 port, __u8 family)
{
	__u32 w[4] = {};

	if (family == CILIA_FAMILY_IPV4) {
		w[2] = bpf_htonl(0xffff);
		__builtin_memcpy(&w[3], addr, 4);
	} else {
		__builtin_memcpy(w, addr, 16);
	}
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = (__u32)port;
}

__inline_fn struct lb_sock_key sock_key(__u64 cookie, const __u8 *addr, __be16 port, __u8 family,
					__u8 kind)
{
	struct lb_sock_key key = {.cookie = cookie, .port = port, .family = family, .kind = kind};

	__builtin_memcpy(key.addr, addr, 16);
	return key;
}

/*
 * A new socket flow's backend. The client of a socket has no address yet
 * (the kernel picks its source after this hook), so it is named by what
 * outlives one socket and no namespace shares: affinity remembers the
 * socket's network namespace (its cookie), and Maglev hashes the socket's
 * cookie, so each socket is placed on its own. Otherwise the same steps as
 * lb_select_backend: affinity, then the service's algorithm.
 */
__inline_fn __u32 sock_select_backend(const struct sock_addr *fe, __u8 proto,
				      const struct lb_service_value *svc, __u64 netns, __u64 cookie,
				      __u64 now)
{
	__u8 client[16] = {}, sock[16] = {};
	__u32 backend;

	if (!svc->count)
		return 0;
	__builtin_memcpy(client, &netns, 8);
	backend = lb_affinity_backend(svc, client, fe->family, now);
	if (backend)
		return backend;
	if (svc->algorithm == CILIA_LB_ALG_MAGLEV) {
		__builtin_memcpy(sock, &cookie, 8);
		backend = lb_maglev_backend(svc, (svc->flags & CILIA_LB_FLAG_AFFINITY)
						     ? lb_hash(client, 0, fe->family)
						     : lb_hash(sock, 0, CILIA_FAMILY_IPV6));
	} else {
		backend = lb_slot_backend(fe->addr, fe->port, proto, fe->family, svc,
					  (__u16)(bpf_get_prandom_u32() % svc->count) + 1);
	}
	if (backend)
		lb_affinity_update(svc, client, fe->family, backend, now);
	return backend;
}

__inline_fn void count_flow(__u16 rev_nat)
{
	__u32 index = rev_nat;
	struct lb_stats *stats = bpf_map_lookup_elem(&cilia_lb_stats, &index);

	if (stats)
		stats->flows++;
}

/* The security identity of a backend address: a local endpoint's, else
 * the ipcache's. */
__inline_fn __u32 backend_identity(const struct lb_backend *b)
{
	struct endpoint_key key = {.family = b->family};
	struct endpoint_info *ep;

	__builtin_memcpy(key.addr, b->addr, 16);
	ep = bpf_map_lookup_elem(&cilia_endpoints, &key);
	return ep ? ep->identity : ipcache_identity(b->addr, b->family);
}

/*
 * The monitor's service event of a new socket flow (level
 * CILIA_MONITOR_DROPS and above, as the per-packet LB's): frontend and
 * backend, no packet, the endpoint whose namespace the socket is in.
 */
__inline_fn void sock_event(const struct sock_addr *fe, const struct lb_backend *b, __u8 proto,
			    __u16 rev_nat, __u16 endpoint_id)
{
	struct global_config *cfg;
	struct event *ev;
	__u32 zero = 0;

	cfg = bpf_map_lookup_elem(&cilia_config, &zero);
	if (!cfg || cfg->monitor_level == CILIA_MONITOR_OFF)
		return;
	ev = bpf_ringbuf_reserve(&cilia_events, sizeof(*ev), 0);
	if (!ev) {
		metrics_count(CILIA_METRIC_LOST, CILIA_EVENT_SERVICE, CILIA_DIR_EGRESS, 1);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts = bpf_ktime_get_ns();
	ev->type = CILIA_EVENT_SERVICE;
	ev->reason = CILIA_LB_PATH_SOCKET;
	ev->dir = CILIA_DIR_EGRESS;
	ev->endpoint_id = endpoint_id;
	ev->dst_identity = backend_identity(b);
	ev->rule = rev_nat;
	ev->family = fe->family;
	ev->proto = proto;
	ev->sport = fe->port;
	ev->dport = b->port;
	__builtin_memcpy(ev->saddr, fe->addr, 16);
	__builtin_memcpy(ev->daddr, b->addr, 16);
	bpf_ringbuf_submit(ev, 0);
}

/*
 * Translates a socket's destination `a` (in place) when it is a frontend
 * and the socket's namespace is served. `sticky` (UDP sendmsg): a socket
 * that already sent to this frontend keeps its backend while that backend
 * exists, as a flow of the per-packet load balancer does. Returns
 * SYS_REJECT for a frontend without a backend, else SYS_PROCEED.
 */
__inline_fn int sock_translate(struct bpf_sock_addr *ctx, struct sock_addr *a, __u8 proto,
			       int sticky)
{
	struct lb_sock_value reverse = {}, forward = {}, *known;
	struct lb_sock_storage *st;
	struct lb_service_value *svc;
	struct lb_sock_key key;
	struct lb_backend *b = 0;
	__u32 backend_id = 0;
	__u64 netns, cookie, now;
	__u16 *endpoint_id;

	/* Nearly every connect() and sendmsg() of the machine addresses no
	 * frontend: the address filter (one word of a small array) says so
	 * before the namespace's hash lookup. */
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	if (!lb_maybe_frontend(a->addr, a->family))
		return SYS_PROCEED;
	netns = bpf_get_netns_cookie(ctx);
	endpoint_id = bpf_map_lookup_elem(&cilia_lb_netns, &netns);
	if (!endpoint_id)
		return SYS_PROCEED;
	svc = lb_service_lookup(a->addr, a->port, proto, a->family);
	if (!svc)
		return SYS_PROCEED;

	cookie = bpf_get_socket_cookie(ctx);
	key = sock_key(cookie, a->addr, a->port, a->family, CILIA_LB_SOCK_FORWARD);
	if (sticky) {
		known = bpf_map_lookup_elem(&cilia_lb_sock, &key);
		if (known) {
			b = lb_backend_lookup(known->backend_id);
			if (b)
				backend_id = known->backend_id;
		}
	}
	if (!backend_id) {
		now = cil_now();
		backend_id = sock_select_backend(a, proto, svc, netns, cookie, now);
		b = lb_backend_lookup(backend_id);
		if (!b)
			return SYS_REJECT;
		count_flow(svc->rev_nat);
		sock_event(a, b, proto, svc->rev_nat, *endpoint_id);
		if (sticky) {
			__builtin_memcpy(forward.addr, b->addr, 16);
			forward.port = b->port;
			forward.family = b->family;
			forward.backend_id = backend_id;
			forward.rev_nat = svc->rev_nat;
			bpf_map_update_elem(&cilia_lb_sock, &key, &forward, BPF_ANY);
		}
	}
	if (!b || b->family != a->family)
		return SYS_REJECT;
	/* Without storage the reverse hooks would not know the socket: one the
	 * kernel cannot give storage to (out of memory) is refused rather than
	 * shown its backend. */
	st = bpf_sk_storage_get(&cilia_lb_sock_storage, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return SYS_REJECT;
	if (sticky) {
		/* An unconnected socket may send to several frontends: one
		 * reverse entry each. */
		if (!(st->flags & CILIA_LB_SOCK_F_SENT))
			st->flags |= CILIA_LB_SOCK_F_SENT;
		__builtin_memcpy(reverse.addr, a->addr, 16);
		reverse.port = a->port;
		reverse.family = a->family;
		reverse.backend_id = backend_id;
		reverse.rev_nat = svc->rev_nat;
		key = sock_key(cookie, b->addr, b->port, b->family, CILIA_LB_SOCK_REVERSE);
		bpf_map_update_elem(&cilia_lb_sock, &key, &reverse, BPF_ANY);
	} else {
		/* connect(): the socket's one peer from now on. */
		__builtin_memcpy(st->frontend, a->addr, 16);
		__builtin_memcpy(st->backend, b->addr, 16);
		st->frontend_port = a->port;
		st->backend_port = b->port;
		st->family = a->family;
	}

	__builtin_memcpy(a->addr, b->addr, 16);
	a->port = b->port;
	return SYS_PROCEED;
}

/* The frontend a translated socket's peer `a` stands for, written into
 * `a`; 0 when the socket was not translated to it. */
__inline_fn int sock_reverse(struct bpf_sock_addr *ctx, struct sock_addr *a)
{
	struct lb_sock_storage *st = bpf_sk_storage_get(&cilia_lb_sock_storage, ctx->sk, 0, 0);
	struct lb_sock_value *v;
	struct lb_sock_key key;

	if (!st)
		return 0;
	if (st->family == a->family && st->backend_port == a->port &&
	    addr_eq(st->backend, a->addr)) {
		__builtin_memcpy(a->addr, st->frontend, 16);
		a->port = st->frontend_port;
		return 1;
	}
	if (!(st->flags & CILIA_LB_SOCK_F_SENT))
		return 0;
	key = sock_key(bpf_get_socket_cookie(ctx), a->addr, a->port, a->family,
		       CILIA_LB_SOCK_REVERSE);
	v = bpf_map_lookup_elem(&cilia_lb_sock, &key);
	if (!v || v->family != a->family)
		return 0;
	__builtin_memcpy(a->addr, v->addr, 16);
	a->port = v->port;
	return 1;
}

/* connect() and UDP sendmsg() of an IPv4 socket. */
__inline_fn int forward4(struct bpf_sock_addr *ctx, int sticky)
{
	struct sock_addr a = {};
	int ret;

	addr_read4(ctx, &a);
	ret = sock_translate(ctx, &a, (__u8)ctx->protocol, sticky);
	if (ret == SYS_PROCEED)
		addr_write4(ctx, a.addr, a.port);
	return ret;
}

/* connect() and UDP sendmsg() of an IPv6 socket (IPv4-mapped included). */
__inline_fn int forward6(struct bpf_sock_addr *ctx, int sticky)
{
	struct sock_addr a = {};
	int ret;

	addr_read6(ctx, &a);
	ret = sock_translate(ctx, &a, (__u8)ctx->protocol, sticky);
	if (ret == SYS_PROCEED)
		addr_write6(ctx, a.addr, a.port, a.family);
	return ret;
}

SEC("cgroup/connect4")
int cil_sock_connect4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, 0);
}

SEC("cgroup/connect6")
int cil_sock_connect6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, 0);
}

SEC("cgroup/sendmsg4")
int cil_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, 1);
}

SEC("cgroup/sendmsg6")
int cil_sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, 1);
}

/* recvmsg() (the datagram's source) and getpeername() of an IPv4 socket:
 * these hooks must always proceed. */
__inline_fn int reverse4(struct bpf_sock_addr *ctx)
{
	struct sock_addr a = {};

	addr_read4(ctx, &a);
	if (sock_reverse(ctx, &a))
		addr_write4(ctx, a.addr, a.port);
	return SYS_PROCEED;
}

__inline_fn int reverse6(struct bpf_sock_addr *ctx)
{
	struct sock_addr a = {};

	addr_read6(ctx, &a);
	if (sock_reverse(ctx, &a))
		addr_write6(ctx, a.addr, a.port, a.family);
	return SYS_PROCEED;
}

SEC("cgroup/recvmsg4")
int cil_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/recvmsg6")
int cil_sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

SEC("cgroup/getpeername4")
int cil_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/getpeername6")
int cil_sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

char LICENSE[] SEC("license") = "GPL";
