/* endpoints.h: trusted tunnel endpoints (issue 11, item 2). On a tunnel
 * uplink (VXLAN, Geneve) a last hop is also its remote endpoint; the config's
 * allow_endpoints / deny_endpoints list endpoint prefixes per uplink. A
 * request from an endpoint the list refuses is not learned, refreshes
 * nothing and takes the host's normal path, counted hop_untrusted and per
 * (uplink, endpoint) in lh_endpoints_refused. Only while F_SET_ENDPOINTS
 * says some uplink has a list: otherwise one flag test.
 *
 * And item 4 for tunnels: an endpoint that does not answer -- its neighbour
 * entry FAILED, or the host has no route toward it (lasthop.routewatch); the
 * agent's lasthop.failover writes it into lh_endpoints_down -- stops its
 * entries' use: their replies take the host's routing, counted
 * hop_unreachable, until it answers (and has a route) again. Only while
 * F_SET_ENDPOINTS_DOWN says a record exists. */
#pragma once

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"

/* (uplink, family, endpoint prefix) -> ENDPOINT_TRUSTED or ENDPOINT_REFUSED,
 * longest prefix first. The agent writes each listed prefix, and for an
 * allow-list also the uplink's /0 of each family as ENDPOINT_REFUSED: an
 * uplink with no entry trusts every endpoint. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_LISTED_ENDPOINTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct endpoint_lpm_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_endpoints SEC(".maps");

/* (uplink, endpoint) -> tunnel requests refused by its uplink's list (what
 * `stats` shows). An LRU: ever new forged endpoints replace old counts. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_REFUSED_HOPS);
	__type(key, struct endpoint_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_endpoints_refused SEC(".maps");

/* (0, family, endpoint address) whose neighbour entry failed, or toward which
 * the host has no route; value unused. Written and retired by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENDPOINTS_DOWN);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct endpoint_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_endpoints_down SEC(".maps");

/* The endpoint_key of descriptor d's remote endpoint on uplink ifindex. */
static __always_inline void endpoint_key_of(struct endpoint_key *k, const struct hop_desc *d,
					    __u32 ifindex)
{
	k->ifindex = ifindex;
	if (d->kind == HOP_TUNNEL4) {
		k->family = FAMILY_V4;
		k->addr[0] = bpf_htonl(d->remote[0]); /* the tunnel key's is host order */
	} else {
		k->family = FAMILY_V6;
		__builtin_memcpy(k->addr, d->remote, sizeof(k->addr));
	}
}

/* Whether descriptor d's endpoint does not answer (a record in
 * lh_endpoints_down). No record anywhere: one flag test. A global function,
 * off the budget of lh_vmport, whose replies ask it. */
__noinline int endpoint_unreachable(const struct hop_desc *d)
{
	struct endpoint_key k = {};
	struct lh_settings *s;
	__u32 zero = 0;

	s = bpf_map_lookup_elem(&lh_settings, &zero);
	if (!d || !s || !(s->flags & F_SET_ENDPOINTS_DOWN))
		return 0;
	endpoint_key_of(&k, d, 0);
	return bpf_map_lookup_elem(&lh_endpoints_down, &k) != NULL;
}

/* Whether uplink ifindex's list lets descriptor d's remote endpoint be a
 * last hop; a refusal is counted per endpoint. No list anywhere: one flag
 * test. A global function: verified once, off the uplink program's budget. */
__noinline int endpoint_trusted(const struct hop_desc *d, __u32 ifindex)
{
	struct endpoint_lpm_key k = {};
	struct endpoint_key rk = {};
	__u64 one = 1, *n;
	struct lh_settings *s;
	__u32 zero = 0;
	__u8 *verdict;

	s = bpf_map_lookup_elem(&lh_settings, &zero);
	if (!d || !s || !(s->flags & F_SET_ENDPOINTS))
		return 1;
	endpoint_key_of(&rk, d, ifindex);
	k.prefixlen = ENDPOINT_KEY_BITS + (rk.family == FAMILY_V4 ? 32 : 128);
	k.ifindex = ifindex;
	k.family = rk.family;
	__builtin_memcpy(k.addr, rk.addr, sizeof(k.addr));
	verdict = bpf_map_lookup_elem(&lh_endpoints, &k);
	if (!verdict || *verdict == ENDPOINT_TRUSTED)
		return 1;
	n = bpf_map_lookup_elem(&lh_endpoints_refused, &rk);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&lh_endpoints_refused, &rk, &one, BPF_NOEXIST);
	return 0;
}
