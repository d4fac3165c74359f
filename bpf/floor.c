// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmark floors, not part of the datapath: the least a tc program must do
 * to deliver a packet of an established IPv4 flow to a local endpoint, so the
 * testrun bench can say how far the endpoint program's fast path is from it
 * (docs/benchmarks.md, "The floor under the fast path"). No guard, no policy
 * revision, no metrics, no event code: parse Ethernet, IPv4 and the ports,
 * look the flow up, refresh its deadline and counters, rewrite the MACs and
 * the TTL, bpf_redirect_peer. The first run of a flow creates its entry.
 *
 *   floor_parse  the same without the lookup (the entry's work on a stack copy)
 *   floor_ct40   one hash lookup with the conntrack key of bpf/lib (40 bytes)
 *   floor_ct16   one hash lookup with an IPv4-only key (16 bytes)
 *
 * And to the node's stack (no rewrite, no redirect: TC_ACT_OK):
 *
 *   floor_stack40  one hash lookup with the 40-byte key, the entry's
 *                  deadline and counters refreshed
 *
 * And the least a *new* flow must cost (every run a flow of its own):
 *
 *   floor_new_ct      a conntrack miss, then the entry's insert, then the
 *                     delivery: no identity, no policy
 *   floor_new_policy  the same with one ipcache LPM lookup (the peer's
 *                     identity) and one policy LPM lookup of the full key
 *                     (identity, direction, protocol, port) between miss and
 *                     insert; a flow nothing allows is dropped there (the
 *                     policy-drop floor: no insert, no delivery)
 *
 * The bench seeds floor_ipcache_map and floor_policy_map and empties
 * floor_new_ct_map between rounds (TestProgram::new_flow_floor). Every
 * floor reads the clock as the datapath does (cil_now() in lib/maps.h), from
 * floor_clock, which its loader fills with the same calibration.
 */
#include "lib/common.h"

struct floor_key16 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
} floor_ct40_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct floor_key16);
	__type(value, struct ct_value);
} floor_ct16_map SEC(".maps");

/* Sized like a small node's conntrack: 20,000 new flows per bench round. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
} floor_new_ct_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
} floor_ipcache_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
} floor_policy_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct clock_config);
} floor_clock SEC(".maps");

/* cil_now() of lib/maps.h on floor_clock. */
static __always_inline __u64 floor_now(void)
{
	__u32 zero = 0;
	struct clock_config *c = bpf_map_lookup_elem(&floor_clock, &zero);

	if (c && c->tick_ns)
		return bpf_jiffies64() * c->tick_ns + c->base_ns;
	return bpf_ktime_get_coarse_ns();
}

/* The delivery an entry would name: the peer's ifindex and MACs. */
#define FLOOR_IFINDEX 4242
static const __u8 floor_mac[ETH_ALEN] = {0x0a, 0, 0, 0, 0, 1};
static const __u8 floor_node_mac[ETH_ALEN] = {0x0a, 0, 0, 0, 0, 2};

/* The delivery itself: one hop less (the IPv4 checksum updated), the
 * peer's MACs, bpf_redirect_peer. */
static __always_inline int floor_deliver(struct ethhdr *eth, struct iphdr *ip)
{
	__u32 check;

	if (ip->ttl <= 1)
		return TC_ACT_OK;
	check = ip->check;
	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xffff));
	ip->ttl--;
	__builtin_memcpy(eth->h_dest, floor_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, floor_node_mac, ETH_ALEN);
	return bpf_redirect_peer(FLOOR_IFINDEX, 0);
}

enum floor_kind { FLOOR_PARSE, FLOOR_CT40, FLOOR_CT16, FLOOR_STACK40 };

static __always_inline int floor_run(struct __sk_buff *skb, enum floor_kind kind)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__be16 *ports = (void *)(ip + 1);
	struct ct_value fresh = {.packets = 1}, scratch = {}, *ct = &scratch;

	if ((void *)(ports + 2) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5)
		return TC_ACT_OK;
	if (kind == FLOOR_CT40 || kind == FLOOR_STACK40) {
		struct ct_key key = {.sport = ports[0], .dport = ports[1], .proto = ip->protocol};

		__builtin_memcpy(key.saddr, &ip->saddr, 4);
		__builtin_memcpy(key.daddr, &ip->daddr, 4);
		ct = bpf_map_lookup_elem(&floor_ct40_map, &key);
		if (!ct) {
			bpf_map_update_elem(&floor_ct40_map, &key, &fresh, BPF_NOEXIST);
			return TC_ACT_OK;
		}
	} else if (kind == FLOOR_CT16) {
		struct floor_key16 key = {
		    .saddr = ip->saddr,
		    .daddr = ip->daddr,
		    .sport = ports[0],
		    .dport = ports[1],
		    .proto = ip->protocol,
		};

		ct = bpf_map_lookup_elem(&floor_ct16_map, &key);
		if (!ct) {
			bpf_map_update_elem(&floor_ct16_map, &key, &fresh, BPF_NOEXIST);
			return TC_ACT_OK;
		}
	}
	ct->expires = floor_now() + 60 * NSEC_PER_SEC;
	ct->packets += 1;
	ct->bytes += skb->len;
	if (kind == FLOOR_STACK40)
		return TC_ACT_OK;
	return floor_deliver(eth, ip);
}

/* identity + direction + protocol + port, as bpf/lib/policy.h looks it up */
#define FLOOR_POLICY_FULL_PREFIX 64

static __always_inline int floor_new(struct __sk_buff *skb, int with_policy)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__be16 *ports = (void *)(ip + 1);
	struct ct_value fresh = {.packets = 1};
	struct ct_key key = {};

	if ((void *)(ports + 2) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5)
		return TC_ACT_OK;
	key.sport = ports[0];
	key.dport = ports[1];
	key.proto = ip->protocol;
	__builtin_memcpy(key.saddr, &ip->saddr, 4);
	__builtin_memcpy(key.daddr, &ip->daddr, 4);
	/* An established flow is not what these floors time. */
	if (bpf_map_lookup_elem(&floor_new_ct_map, &key))
		return TC_ACT_OK;
	if (with_policy) {
		struct ipcache_key ik = {.prefixlen = 32 + 32, .family = CILIA_FAMILY_IPV4};
		struct ipcache_value *peer;
		struct policy_key pk = {
		    .prefixlen = FLOOR_POLICY_FULL_PREFIX,
		    .direction = CILIA_DIR_EGRESS,
		    .proto = ip->protocol,
		    .dport = ports[1],
		};
		struct policy_value *verdict;

		__builtin_memcpy(ik.addr, &ip->daddr, 4);
		peer = bpf_map_lookup_elem(&floor_ipcache_map, &ik);
		fresh.dst_identity = peer ? peer->identity : CILIA_ID_WORLD;
		pk.identity = bpf_htonl(fresh.dst_identity);
		verdict = bpf_map_lookup_elem(&floor_policy_map, &pk);
		if (!verdict || verdict->verdict != CILIA_VERDICT_ALLOW)
			return TC_ACT_SHOT;
	}
	fresh.expires = floor_now() + 60 * NSEC_PER_SEC;
	fresh.bytes = skb->len;
	if (bpf_map_update_elem(&floor_new_ct_map, &key, &fresh, BPF_NOEXIST) < 0)
		return TC_ACT_SHOT;
	return floor_deliver(eth, ip);
}

SEC("classifier")
int floor_new_ct(struct __sk_buff *skb)
{
	return floor_new(skb, 0);
}

SEC("classifier")
int floor_new_policy(struct __sk_buff *skb)
{
	return floor_new(skb, 1);
}

SEC("classifier")
int floor_parse(struct __sk_buff *skb)
{
	return floor_run(skb, FLOOR_PARSE);
}

SEC("classifier")
int floor_ct40(struct __sk_buff *skb)
{
	return floor_run(skb, FLOOR_CT40);
}

SEC("classifier")
int floor_ct16(struct __sk_buff *skb)
{
	return floor_run(skb, FLOOR_CT16);
}

SEC("classifier")
int floor_stack40(struct __sk_buff *skb)
{
	return floor_run(skb, FLOOR_STACK40);
}

char LICENSE[] SEC("license") = "GPL";
