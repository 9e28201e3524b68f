/* expire.h: the expiry pass -- the kernel walks every table (confirmed and
 * pending, IPv4 and IPv6) and removes the
 * entries idle past their state's timeout. Each entry's idle time is read
 * against the clock as the walk reaches it, and an entry refreshed after
 * that is simply not idle: no snapshot races the data path. The pass also
 * counts what it leaves, by state, and recounts the entries each VM port
 * opened (its quota's use), so none is leaked by an LRU eviction. */
#pragma once

#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "changes.h"
#include "conntrack.h"
#include "encap.h"

/* The kernel's struct, for the kfunc below (only its name matters to BTF). */
struct bpf_map {
	__u32 max_entries;
} __attribute__((preserve_access_index));

/* Kernel 6.6+: a map's element count as the kernel keeps it (LRU evictions too). */
extern long long bpf_map_sum_elem_count(const struct bpf_map *map) __ksym;

struct expire_ctx {
	__u32 timeout[CS_MAX]; /* jiffies, by state */
	__u32 live[CS_MAX];
	__u32 expired[CS_MAX];
	__s32 next_left; /* jiffies until the earliest deadline of a live entry */
	__u32 table;     /* the table walked: enum lh_change_table */
	__u32 pass;      /* the mark live entries' hop descriptors get (encap.h) */
};

/* Whether entry e is idle past its state's timeout (*state := its state,
 * *idle_out := jiffies since its last packet). */
static __always_inline int expire_due(const struct conn_entry *e, const struct expire_ctx *ctx,
				      __u32 *state, __u32 *idle_out)
{
	__u32 idle = now32() - e->last_seen, s = e->state;

	*idle_out = idle;
	if (s >= CS_MAX)
		s = CS_NONE;
	*state = s;
	/* (__s32)idle < 0: refreshed by another CPU since now32() was read */
	return (__s32)idle > 0 && idle > ctx->timeout[s];
}

/* A live entry: counted by state, its deadline, its VM port's quota use. */
static __always_inline void expire_keep(const struct conn_entry *e, struct expire_ctx *ctx,
					__u32 state, __u32 idle)
{
	__u32 timeout;

	if (state >= CS_MAX) /* for the verifier: expire_due keeps it below */
		return;
	timeout = ctx->timeout[state];
	ctx->live[state]++;
	hop_desc_keep(e, ctx->pass);
	/* jiffies until idle > timeout; idle < 0 (refreshed meanwhile) only adds */
	if ((__s32)(timeout - idle + 1) < ctx->next_left)
		ctx->next_left = timeout - idle + 1;
	if (e->flags & F_ENTRY_VM_ORIGIN) {
		__u32 vm = e->vm_ifindex;
		struct vm_usage *u = bpf_map_lookup_elem(&lh_vm_usage, &vm);

		if (u)
			__sync_fetch_and_add(&u->walking, 1);
	}
}

/* An entry of an IPv6 table (conn_key). */
static long expire_one(struct bpf_map *map, struct conn_key *k, struct conn_entry *e,
		       struct expire_ctx *ctx)
{
	__u32 state, idle;

	if (expire_due(e, ctx, &state, &idle)) {
		change_emit(CH_EXPIRED, ctx->table, k, NULL); /* before: k is freed after */
		if (!bpf_map_delete_elem(map, k)) {
			if (state < CS_MAX)
				ctx->expired[state]++;
			return 0;
		}
	}
	expire_keep(e, ctx, state, idle);
	return 0;
}

/* An entry of an IPv4 table (conn_key4): its record carries the full key. */
static long expire_one4(struct bpf_map *map, struct conn_key4 *k4, struct conn_entry *e,
			struct expire_ctx *ctx)
{
	struct conn_key k;
	__u32 state, idle;

	if (expire_due(e, ctx, &state, &idle)) {
		conn_key_of4(&k, k4);
		change_emit(CH_EXPIRED, ctx->table, &k, NULL);
		if (!bpf_map_delete_elem(map, k4)) {
			if (state < CS_MAX)
				ctx->expired[state]++;
			return 0;
		}
	}
	expire_keep(e, ctx, state, idle);
	return 0;
}

/* Before the walk: each VM port counts again from the current `created`. */
static long usage_begin(struct bpf_map *map, __u32 *ifindex, struct vm_usage *u, void *ctx)
{
	if (u->created || u->counted) {
		u->walking = 0;
		u->next_base = u->created;
	}
	return 0;
}

/* After the walk: what it found replaces the previous pass's count. */
static long usage_end(struct bpf_map *map, __u32 *ifindex, struct vm_usage *u, void *ctx)
{
	if (u->created || u->counted) {
		u->counted = u->walking;
		u->base = u->next_base;
	}
	return 0;
}

/* Walks one table, both families (map4: its IPv4 map, map6: its IPv6 one);
 * adds what it found to stats (index t: 0 confirmed, 1 pending). */
static __always_inline void expire_table(void *map4, void *map6, int t, struct expire_ctx *ctx,
					 struct expiry_stats *st)
{
	__u64 expired = 0;

	ctx->table = t;
	__builtin_memset(ctx->live, 0, sizeof(ctx->live));
	__builtin_memset(ctx->expired, 0, sizeof(ctx->expired));
	bpf_for_each_map_elem(map4, expire_one4, ctx, 0);
	bpf_for_each_map_elem(map6, expire_one, ctx, 0);
#pragma unroll
	for (int s = 0; s < CS_MAX; s++) {
		st->live[t][s] = ctx->live[s];
		st->expired[t][s] += ctx->expired[s];
		expired += ctx->expired[s];
	}
	if (expired)
		count_table_n(t ? TC_PENDING_EXPIRED : TC_CONFIRMED_EXPIRED, expired);
}

/* Ages are in jiffies: the agent's timeouts (seconds) times HZ, capped so
 * they stay far below the 2^31 jiffies a 32-bit age can tell apart. */
static __always_inline void expire_timeouts(struct expire_ctx *ctx, const struct lh_settings *s)
{
#pragma unroll
	for (int i = 0; i < CS_MAX; i++) {
		__u64 t = (__u64)s->timeout[i] * s->hz;

		ctx->timeout[i] = t < (1U << 30) ? t : (1U << 30);
	}
}

/* The events that change which entries exist or when they are due: inserts,
 * removals (the data path's and the agent's) and state moves. Expiry's own
 * removals are not in it: a walk does not call for another. */
static const __u32 change_counters[] = {
	TC_PENDING_INSERTED, TC_PENDING_REMOVED,   TC_CONFIRMED_INSERTED,
	TC_CONFIRMED_REMOVED, TC_STATE_CHANGES,
};

static long sum_cpu_changes(__u32 cpu, __u64 *sum)
{
#pragma unroll
	for (int i = 0; i < sizeof(change_counters) / sizeof(change_counters[0]); i++) {
		__u32 key = change_counters[i];
		__u64 *n = bpf_map_lookup_percpu_elem(&lh_table_counters, &key, cpu);

		if (!n)
			return 1; /* past the last CPU */
		*sum += *n;
	}
	return 0;
}

/* The table's change count: the counters above, summed over every CPU. A CPU
 * counts a change after making it, so a count seen here covers the entry. */
static __always_inline __u64 table_changes(void)
{
	__u64 sum = 0;

	bpf_loop(MAX_CPUS, sum_cpu_changes, &sum, 0);
	return sum;
}

/* Whether this run may skip the walk: a walk has run, nothing changed since it
 * began (neither the data path nor user space), and the earliest deadline it
 * left is still ahead. Records what the walk, if any, starts from. */
static __always_inline int expire_skip(struct expiry_stats *st, __u32 now)
{
	__u32 zero = 0;
	__u64 *token = bpf_map_lookup_elem(&lh_expiry_request, &zero);
	__u64 request = token ? *token : 0, changes = table_changes();

	st->checked = now;
	if (st->passes && changes == st->changes && request == st->request &&
	    (__s32)(now - st->next_due) < 0)
		return 1;
	st->changes = changes;
	st->request = request;
	return 0;
}
