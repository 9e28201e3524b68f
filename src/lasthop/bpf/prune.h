/* prune.h: removing, in the kernel, the entries a rule no longer wants --
 * those the scope rules now pass (`lasthop flush --out-of-scope`), those of
 * an uplink the config no longer has (a reload). One walk of the tables,
 * run by the agent through test run; user space reads none of it. Each
 * removal gets a change record (sync on) and a TC_*_REMOVED count. */
#pragma once

#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "changes.h"
#include "conntrack.h"
#include "scope.h"

/* What a prune walk removes. */
enum prune_what {
	PRUNE_OUT_OF_SCOPE = 1, /* entries the scope rules now pass */
	PRUNE_GONE_UPLINK  = 2, /* entries whose last hop's uplink is not attached any more */
};

struct prune_ctx {
	__u32 what;    /* enum prune_what */
	__u32 table;   /* enum lh_change_table of the map walked */
	__u32 removed; /* entries of that map removed */
	__u32 inplace; /* of those, in-place (unconfirmed) entries of a confirmed map */
};

/* Removes entry e found by the walk (conn_remove), counted in ctx. */
static __always_inline void prune_remove(void *map, const void *key, const struct conn_key *k,
					 struct conn_entry *e, struct prune_ctx *ctx)
{
	int t = conn_remove(map, key, k, e, ctx->table, CH_REMOVED);

	if (t < 0)
		return;
	ctx->removed++;
	ctx->inplace += t != ctx->table;
}

static __always_inline int prune_wanted(const struct conn_key *k, const struct conn_entry *e,
					__u32 what)
{
	if (what == PRUNE_GONE_UPLINK)
		return (e->flags & F_ENTRY_HOP_KNOWN) && !iface_get(e->ifindex, ROLE_UPLINK);
	return scope_decide(k, (e->flags & F_ENTRY_HOP_KNOWN) ? e->ifindex : 0) == SCOPE_PASS;
}

/* An entry of an IPv6 table. */
static long prune_one(struct bpf_map *map, struct conn_key *k, struct conn_entry *e,
		      struct prune_ctx *ctx)
{
	if (prune_wanted(k, e, ctx->what))
		prune_remove(map, k, k, e, ctx);
	return 0;
}

/* An entry of an IPv4 table (conn_key4). */
static long prune_one4(struct bpf_map *map, struct conn_key4 *k4, struct conn_entry *e,
		       struct prune_ctx *ctx)
{
	struct conn_key k;

	conn_key_of4(&k, k4);
	if (prune_wanted(&k, e, ctx->what))
		prune_remove(map, k4, &k, e, ctx);
	return 0;
}

/* Walks one table, both families; returns the entries removed (counted). */
static __always_inline __u32 prune_table(void *map4, void *map6, __u32 t, __u32 what)
{
	struct prune_ctx ctx = { .what = what, .table = t };

	bpf_for_each_map_elem(map4, prune_one4, &ctx, 0);
	bpf_for_each_map_elem(map6, prune_one, &ctx, 0);
	/* no branch on the count: the verifier would follow every value of it */
	count_table_n(t == CHT_PENDING ? TC_PENDING_REMOVED : TC_CONFIRMED_REMOVED,
		      ctx.removed - ctx.inplace);
	count_table_n(TC_INPLACE_REMOVED, ctx.inplace);
	return ctx.removed;
}

static __always_inline __u32 prune(__u32 what)
{
	return prune_table(&lh_conns4, &lh_conns, CHT_CONFIRMED, what) +
	       prune_table(&lh_pending4, &lh_pending, CHT_PENDING, what);
}
