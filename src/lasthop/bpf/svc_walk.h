/* svc_walk.h: moving or forgetting a service's connections in the kernel
 * (lh_svc_walk, run by the agent through BPF_PROG_TEST_RUN when a service or
 * some of its VMs leave). The kernel walks the tables, as the expiry pass
 * does; the agent reads none of them: its cost is one run. */
#pragma once

#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "changes.h"
#include "conntrack.h"
#include "service.h"

struct svc_walk_ctx {
	struct svc_walk req;
	__u32 table; /* the table walked: enum lh_change_table */
};

/* Whether entry e of full key k is one the request names. */
static __always_inline int svc_walk_match(const struct conn_key *k, const struct conn_entry *e,
					  const struct svc_walk *req, struct svc_info **s)
{
	__u32 n = req->count, found = !n;

	if (!e->vm_ifindex || (e->flags & F_ENTRY_VM_ORIGIN))
		return 0;
	for (__u32 i = 0; i < SVC_WALK_IFACES && i < n; i++)
		if (req->ifindex[i] == e->vm_ifindex)
			found = 1;
	if (!found)
		return 0;
	*s = svc_find(k);
	return *s && (*s)->id == req->service_id;
}

/* One entry (key: the map's own, full: the full conn_key): moved in place, or
 * removed and counted as the agent's removal (TC_*_REMOVED), as the agent's
 * own writes were; each change is reported to the sync. */
static __always_inline long svc_walk_entry(void *map, const void *key, const struct conn_key *full,
					   struct conn_entry *e, struct svc_walk_ctx *ctx)
{
	struct svc_info *s = NULL;
	__u32 vm;
	int t;

	if (!svc_walk_match(full, e, &ctx->req, &s))
		return 0;
	vm = ctx->req.drop ? 0 : svc_pick(s, full);
	if (vm) {
		e->vm_ifindex = vm;
		ctx->req.moved++;
		change_emit(CH_HOP, ctx->table, full, e);
		return 0;
	}
	t = conn_remove(map, key, full, e, ctx->table, CH_REMOVED);
	if (t < 0)
		return 0;
	ctx->req.dropped++;
	count_table(t != (int)ctx->table ? TC_INPLACE_REMOVED
		    : t == CHT_PENDING ? TC_PENDING_REMOVED
				       : TC_CONFIRMED_REMOVED);
	return 0;
}

/* An entry of an IPv4 table (conn_key4). */
static long svc_walk_one4(struct bpf_map *map, struct conn_key4 *k4, struct conn_entry *e,
			  struct svc_walk_ctx *ctx)
{
	struct conn_key k;

	conn_key_of4(&k, k4);
	return svc_walk_entry(map, k4, &k, e, ctx);
}

/* An entry of an IPv6 table (conn_key). */
static long svc_walk_one(struct bpf_map *map, struct conn_key *k, struct conn_entry *e,
			 struct svc_walk_ctx *ctx)
{
	return svc_walk_entry(map, k, k, e, ctx);
}

/* Walks the four tables with the request in *ctx. */
static __always_inline void svc_walk_tables(struct svc_walk_ctx *ctx)
{
	ctx->table = CHT_CONFIRMED;
	bpf_for_each_map_elem(&lh_conns4, svc_walk_one4, ctx, 0);
	bpf_for_each_map_elem(&lh_conns, svc_walk_one, ctx, 0);
	ctx->table = CHT_PENDING;
	bpf_for_each_map_elem(&lh_pending4, svc_walk_one4, ctx, 0);
	bpf_for_each_map_elem(&lh_pending, svc_walk_one, ctx, 0);
}
