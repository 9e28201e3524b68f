/* scope.h: which connections lasthop handles (issue 11, item 1). The agent
 * writes the config's scope rules, its default last, into lh_scope; a new
 * connection -- one in neither table, about to be learned -- is matched
 * against them, first match wins, and one a rule passes takes the host's
 * normal path, counted scope_passed. Only while F_SET_SCOPE is set, and
 * never on a known connection's packets: changing the rules keeps the
 * established entries; `lasthop flush --out-of-scope` removes them
 * (prune.h). */
#pragma once

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "changes.h"
#include "conntrack.h"

/* index -> scope rule, in order; the first with action SCOPE_END ends the list. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SCOPE_RULES);
	__type(key, __u32);
	__type(value, struct scope_rule);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_scope SEC(".maps");

struct scope_ctx {
	__u32 key[SCOPE_WORDS]; /* the connection's match key (struct scope_rule says the words) */
	__u16 port;             /* its destination port, host order */
	__u32 action;           /* enum lh_scope_action: SCOPE_LEARN until a rule says otherwise */
};

/* One rule: every word compared under its mask without a branch (a
 * verifier-friendly shape: the walk of prune.h runs this per entry). */
static long scope_rule_step(__u32 i, struct scope_ctx *c)
{
	struct scope_rule *r = bpf_map_lookup_elem(&lh_scope, &i);
	__u32 diff = 0;

	if (!r || r->action == SCOPE_END)
		return 1;
#pragma unroll
	for (int w = 0; w < SCOPE_WORDS; w++)
		diff |= (c->key[w] & r->mask[w]) ^ r->value[w];
	if (diff || (__u16)(c->port - r->port_lo) > (__u16)(r->port_hi - r->port_lo))
		return 0;
	c->action = r->action;
	return 1;
}

static __always_inline void scope_key(struct scope_ctx *c, const struct conn_key *k,
				     __u32 ifindex)
{
	c->port = bpf_ntohs(k->dport);
	c->action = SCOPE_LEARN;
	__builtin_memcpy(c->key, k->saddr, 16);
	__builtin_memcpy(&c->key[4], k->daddr, 16);
	c->key[8] = k->proto | (__u32)k->family << 8 | (__u32)k->zone << 16;
	c->key[9] = ifindex;
}

/* The action of the first rule connection k (arriving on uplink ifindex,
 * 0 = opened by a VM) matches; SCOPE_LEARN when none does. */
static __always_inline __u32 scope_decide(const struct conn_key *k, __u32 ifindex)
{
	struct scope_ctx c;

	scope_key(&c, k, ifindex);
	bpf_loop(MAX_SCOPE_RULES, scope_rule_step, &c, 0);
	return c.action;
}

/* Whether a new connection is out of scope (F_SET_SCOPE clear: never). */
static __always_inline int scope_passes(const struct conn_key *k, __u32 ifindex, __u32 settings)
{
	return (settings & F_SET_SCOPE) && scope_decide(k, ifindex) == SCOPE_PASS;
}
