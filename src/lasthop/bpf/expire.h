/* expire.h: the expiry pass -- the kernel walks every table (confirmed and
 * pending, IPv4 and IPv6) and removes the
 * entries idle past their state's timeout. Each entry's idle time is read
 * against the clock as the walk reaches it, and an entry refreshed after
 * that is simply not idle: no snapshot races the data path. The pass also
 * counts what it leaves, by state, and recounts the entries each VM port
 * opened (its quota's use), so none is leaked by an LRU eviction.
 *
 * A walk of 10,000,000 entries takes seconds, so an entry due just behind
 * where a walk is would wait for the next walk to come round. Instead each
 * walk files the entries due within its horizon in lh_expiry_due, and the
 * next walk starts `lead` before the earliest deadline it left out; a drain
 * visits only the index, each run once its earliest deadline has come, and
 * removes what is due then (read against the clock, as the walk does). */
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
	__u32 live[2][CS_MAX];    /* found by the walk, by table and state: an in-place
				   * entry of a confirmed table counts as pending ([1]) */
	__u32 removed[2][CS_MAX]; /* removed by the drain, then (zeroed between: the stack's
				   * 512 bytes) by the walk, by table and state, the same way */
	__u32 inplace_expired;    /* of those, in-place entries (TC_INPLACE_EXPIRED) */
	__s32 next_left; /* jiffies from started to the earliest deadline left out of the index */
	__s32 due_left;  /* jiffies from started to the earliest deadline in the index */
	__u32 table;     /* the table walked: enum lh_change_table */
	__u32 pass;      /* the mark live entries' hop descriptors get (encap.h) */
	__u32 started;   /* jiffies: when this run began */
	__u32 horizon;   /* jiffies: entries due within this of started are indexed */
	__u32 due_full;  /* entries the index had no room for */
	__u64 filed;     /* lh_expiry.filed when this run began */
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

/* Files entry k (of table t) in the index, due at deadline; 0 when there was room. */
static __always_inline long expire_index(const struct conn_key *k, __u32 t, __u32 deadline)
{
	struct expiry_due d = { .deadline = deadline, .table = t };

	return bpf_map_update_elem(&lh_expiry_due, k, &d, BPF_ANY);
}

/* A live entry: counted by state, its VM port's quota use. Returns its
 * deadline as jiffies from ctx->started (the first at which it is idle past
 * its timeout); the caller indexes it or leaves it to a walk (expire_later). */
static __always_inline __s32 expire_keep(const struct conn_entry *e, struct expire_ctx *ctx,
					 __u32 state)
{
	__u32 timeout;

	if (state >= CS_MAX) /* for the verifier: expire_due keeps it below */
		return 0;
	timeout = ctx->timeout[state];
	ctx->live[ctx->table || (e->flags2 & F_ENTRY2_INPLACE)][state]++;
	hop_desc_keep(e, ctx->pass);
	if (e->flags & F_ENTRY_VM_ORIGIN) {
		__u32 vm = e->vm_ifindex;
		struct vm_usage *u = bpf_map_lookup_elem(&lh_vm_usage, &vm);

		if (u)
			__sync_fetch_and_add(&u->walking, 1);
	}
	/* last_seen ahead of started (refreshed meanwhile) only moves it later */
	return (__s32)(e->last_seen + timeout + 1 - ctx->started);
}

/* An entry due at left (jiffies from started) that is not in the index: the
 * next walk must come before it. */
static __always_inline void expire_later(struct expire_ctx *ctx, __s32 left)
{
	if (left < ctx->next_left)
		ctx->next_left = left;
}

/* A live entry the walk met, due at left: into the index when within the
 * horizon (and there is room), else left to a later walk. */
static __always_inline void expire_file(const struct conn_key *k, struct expire_ctx *ctx,
					__s32 left)
{
	if (left > (__s32)ctx->horizon) {
		expire_later(ctx, left);
		return;
	}
	if (expire_index(k, ctx->table, ctx->started + left)) {
		ctx->due_full++;
		expire_later(ctx, left);
		return;
	}
	if (left < ctx->due_left)
		ctx->due_left = left;
}

/* Removes entry e (key: the map's own, full: the full conn_key) of the table
 * walked, idle past its timeout, counted by its table and state; 0 when it
 * was there to remove. An in-place entry counts as pending: conn_remove. */
static __always_inline long expire_remove(void *map, const void *key, const struct conn_key *full,
					  struct conn_entry *e, struct expire_ctx *ctx,
					  __u32 state)
{
	int t = conn_remove(map, key, full, e, ctx->table, CH_EXPIRED);

	if (t < 0)
		return -1;
	if (state < CS_MAX)
		ctx->removed[t == CHT_PENDING][state]++;
	ctx->inplace_expired += t != ctx->table;
	return 0;
}

/* An entry of an IPv6 table (conn_key). */
static long expire_one(struct bpf_map *map, struct conn_key *k, struct conn_entry *e,
		       struct expire_ctx *ctx)
{
	__u32 state, idle;

	if (expire_due(e, ctx, &state, &idle) && !expire_remove(map, k, k, e, ctx, state))
		return 0;
	expire_file(k, ctx, expire_keep(e, ctx, state));
	return 0;
}

/* An entry of an IPv4 table (conn_key4): its record carries the full key. */
static long expire_one4(struct bpf_map *map, struct conn_key4 *k4, struct conn_entry *e,
			struct expire_ctx *ctx)
{
	struct conn_key k;
	__u32 state, idle;

	__s32 left;

	if (expire_due(e, ctx, &state, &idle)) {
		conn_key_of4(&k, k4);
		if (!expire_remove(map, k4, &k, e, ctx, state))
			return 0;
	}
	left = expire_keep(e, ctx, state);
	if (left > (__s32)ctx->horizon) { /* most entries: no full key needed */
		expire_later(ctx, left);
		return 0;
	}
	conn_key_of4(&k, k4);
	expire_file(&k, ctx, left);
	return 0;
}

/* The drain, one index entry: gone from its table (removed, promoted: a
 * change a walk follows) -> out of the index; idle past its timeout now ->
 * removed, as the walk removes it; refreshed -> its new deadline, in the
 * index while within the horizon, else left to a walk. */
static long expire_drain_one(struct bpf_map *map, struct conn_key *k, struct expiry_due *d,
			     struct expire_ctx *ctx)
{
	__u32 state, idle, t, timeout;
	struct conn_entry *e;
	__s32 left;

	t = d->table == CHT_CONFIRMED ? CHT_CONFIRMED : CHT_PENDING;
	e = conn_table_lookup(t, k);
	if (!e && d->table == CHT_EITHER) { /* filed by the data path: either table */
		t = CHT_CONFIRMED;
		e = conn_table_lookup(t, k);
	}
	d->table = t;
	if (!e) {
		bpf_map_delete_elem(map, k);
		return 0;
	}
	if (expire_due(e, ctx, &state, &idle)) {
		int as = conn_table_remove(t, k, e, CH_EXPIRED);

		if (as >= 0 && state < CS_MAX) {
			ctx->removed[as == CHT_PENDING][state]++;
			ctx->inplace_expired += as != (int)t;
			if (e->flags & F_ENTRY_VM_ORIGIN) { /* the next walk recounts it too */
				__u32 vm = e->vm_ifindex;
				struct vm_usage *u = bpf_map_lookup_elem(&lh_vm_usage, &vm);

				if (u && u->counted)
					__sync_fetch_and_add(&u->counted, -1);
			}
		}
		bpf_map_delete_elem(map, k);
		return 0;
	}
	if (state >= CS_MAX)
		return 0;
	timeout = ctx->timeout[state];
	left = (__s32)(e->last_seen + timeout + 1 - ctx->started);
	if (left > (__s32)ctx->horizon) {
		bpf_map_delete_elem(map, k);
		expire_later(ctx, left);
		return 0;
	}
	d->deadline = ctx->started + left;
	if (left < ctx->due_left)
		ctx->due_left = left;
	return 0;
}

/* Drains the index when its earliest deadline has come, when the data path
 * filed entries since the last drain or walk began (a filing may have
 * lowered due_next just before that drain or walk stored its own: see
 * conn_file_soon), or when the expiry state is new (whatever an index of
 * before holds is looked at once). Adds what it
 * removed to st; the deadlines it left out of the index move st->next_due
 * earlier. Returns 1 when it ran. */
static __always_inline int expire_drain(struct expiry_stats *st, struct expire_ctx *ctx)
{
	__u64 expired = 0;

	if (st->passes && (__s32)(ctx->started - st->due_next) < 0 && ctx->filed == st->filed_seen)
		return 0;
	ctx->due_left = 1 << 30;
	ctx->next_left = 1 << 30;
	bpf_for_each_map_elem(&lh_expiry_due, expire_drain_one, ctx, 0);
#pragma unroll
	for (int t = 0; t < 2; t++) {
		__u64 n = 0;
#pragma unroll
		for (int s = 0; s < CS_MAX; s++) {
			__u32 d = ctx->removed[t][s];

			st->expired[t][s] += d;
			st->live[t][s] = st->live[t][s] > d ? st->live[t][s] - d : 0;
			n += d;
		}
		if (t)
			n -= ctx->inplace_expired; /* in place: counted apart */
		if (n)
			count_table_n(t ? TC_PENDING_EXPIRED : TC_CONFIRMED_EXPIRED, n);
		expired += n;
	}
	count_table_n(TC_INPLACE_EXPIRED, ctx->inplace_expired);
	expired += ctx->inplace_expired;
	ctx->inplace_expired = 0;
	st->due_expired += expired;
	st->due_next = ctx->started + ctx->due_left;
	st->filed_seen = ctx->filed;
	st->indexed = bpf_map_sum_elem_count((struct bpf_map *)&lh_expiry_due);
	if (ctx->next_left < (1 << 30) &&
	    ctx->next_left < (__s32)(st->next_due + st->lead - ctx->started))
		st->next_due = ctx->started + ctx->next_left - st->lead;
	st->drains++;
	return 1;
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

/* Walks one table, both families (map4: its IPv4 map, map6: its IPv6 one;
 * t: 0 confirmed, 1 pending), counting what it finds in ctx. */
static __always_inline void expire_table(void *map4, void *map6, int t, struct expire_ctx *ctx)
{
	ctx->table = t;
	bpf_for_each_map_elem(map4, expire_one4, ctx, 0);
	bpf_for_each_map_elem(map6, expire_one, ctx, 0);
}

/* After walking both tables: what they found into stats (index t: 0
 * confirmed, 1 pending, in-place entries with the pending ones). */
static __always_inline void expire_tables_done(struct expire_ctx *ctx, struct expiry_stats *st)
{
#pragma unroll
	for (int t = 0; t < 2; t++) {
		__u64 expired = 0;

#pragma unroll
		for (int s = 0; s < CS_MAX; s++) {
			st->live[t][s] = ctx->live[t][s];
			st->expired[t][s] += ctx->removed[t][s];
			expired += ctx->removed[t][s];
		}
		if (t)
			expired -= ctx->inplace_expired; /* in place: counted apart */
		if (expired)
			count_table_n(t ? TC_PENDING_EXPIRED : TC_CONFIRMED_EXPIRED, expired);
	}
	count_table_n(TC_INPLACE_EXPIRED, ctx->inplace_expired);
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
	TC_CONFIRMED_REMOVED, TC_STATE_CHANGES,	   TC_INPLACE_INSERTED,
	TC_INPLACE_CONFIRMED, TC_INPLACE_REMOVED,
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

/* Jiffies after a walk began before a change by the data path calls for the
 * next one: a changed entry is due no sooner than the shortest timeout after
 * the walk began, and a walk that starts lead before that meets it in time
 * to file it in the index. The states in *filing* (st->soon_since) do not
 * count: the data path has filed their entries itself since that walk
 * began, so no walk need meet them. 0 when the shortest timeout is within
 * the lead; 2^30 (~12 days at HZ 1000) when every state is filed. */
static __always_inline __u32 expire_change_gap(const struct expire_ctx *ctx, __u32 lead,
					       __u32 filing)
{
	__u32 shortest = 1 << 30;

#pragma unroll
	for (int i = 0; i < CS_MAX; i++) {
		/* a filed state's timeout made 2^32 - 1: never the shortest */
		__u32 t = ctx->timeout[i] | -((filing >> i) & 1);

		if (t < shortest)
			shortest = t;
	}
	return shortest > lead ? shortest - lead : 0;
}

/* The states whose timeout is shorter than lead (jiffies): their entries
 * the data path files in the index itself (conn_file_soon). */
static __always_inline __u32 expire_soon_states(const struct expire_ctx *ctx, __u32 lead)
{
	__u32 soon = 0;

	/* without a branch: an `if` per state gave the verifier 2^CS_MAX paths
	 * (lh_expire 65k -> 343k insns). timeout - lead is negative, its top
	 * bit set, exactly when timeout < lead (both below 2^32); the barrier
	 * keeps clang from turning the shift back into a compare and a jump. */
#pragma unroll
	for (int i = 0; i < CS_MAX; i++) {
		__u64 d = (__u64)ctx->timeout[i] - lead;

		barrier_var(d);
		soon |= (__u32)(d >> 63) << i;
	}
	return soon;
}

/* Whether this run may skip the walk: a walk has run, user space asked for
 * none since it began, the next walk's moment (st->next_due) has not come,
 * and the data path changed nothing -- or too recently to need a walk yet
 * (expire_change_gap). Records what the walk, if any, starts from. */
static __always_inline int expire_skip(struct expiry_stats *st, const struct expire_ctx *ctx)
{
	__u32 zero = 0, now = ctx->started;
	__u64 *token = bpf_map_lookup_elem(&lh_expiry_request, &zero);
	__u64 request = token ? *token : 0, changes = table_changes();

	st->checked = now;
	if (st->passes && request == st->request && (__s32)(now - st->next_due) < 0 &&
	    (changes == st->changes ||
	     (__s32)(now - st->started) < (__s32)expire_change_gap(ctx, st->lead, st->soon_since)))
		return 1;
	st->changes = changes;
	st->request = request;
	return 0;
}

/* One run of lh_expire: the drain when the index has something due, then the
 * walk when expire_skip finds it needed. Returns 1 when it walked, 2 when it
 * did not (drained or not), 0 when the agent has not configured the data path
 * yet (no HZ: no timeout means anything). */
static __always_inline int expire_run(void)
{
	struct expire_ctx ctx = {};
	struct lh_settings *s;
	struct expiry_stats *st;
	__u32 zero = 0, walked, soon;

	s = bpf_map_lookup_elem(&lh_settings, &zero);
	st = bpf_map_lookup_elem(&lh_expiry, &zero);
	if (!s || !st || !s->hz)
		return 0;
	ctx.started = now32();
	/* an atomic read (a full barrier on x86) before the drain reads the
	 * index and the walk due_next: see conn_file_soon */
	ctx.filed = __sync_fetch_and_add(&st->filed, 0);
	expire_timeouts(&ctx, s);
	if (!st->lead)
		st->lead = EXPIRY_LEAD_MS * (__u64)s->hz / 1000;
	soon = st->soon = expire_soon_states(&ctx, st->lead); /* the timeouts may be new */
	ctx.horizon = 2 * st->lead;
	expire_drain(st, &ctx);
	if (expire_skip(st, &ctx)) {
		st->skipped++;
		count_table(TC_EXPIRY_SKIPPED);
		return 2;
	}
	/* what the index holds (the drain above brought st->due_next up to date,
	 * or it is still ahead) stays in it: the walk's earliest deadline starts there */
	ctx.due_left = (__s32)(st->due_next - ctx.started);
	if (!st->passes || ctx.due_left > (1 << 30))
		ctx.due_left = 1 << 30;
	ctx.next_left = 1 << 30; /* an empty table: nothing is due for ~12 days at HZ 1000 */
	ctx.pass = (__u32)st->passes + 1;
	st->started = ctx.started;
	bpf_for_each_map_elem(&lh_vm_usage, usage_begin, NULL, 0);
	/* the drain's are counted */
	__builtin_memset(ctx.removed, 0, sizeof(ctx.removed));
	ctx.inplace_expired = 0;
	expire_table(&lh_conns4, &lh_conns, 0, &ctx);
	expire_table(&lh_pending4, &lh_pending, 1, &ctx);
	expire_tables_done(&ctx, st);
	bpf_for_each_map_elem(&lh_vm_usage, usage_end, NULL, 0);
	bpf_for_each_map_elem(&lh_hop_descs, hop_desc_sweep, &ctx.pass, 0);
	st->finished = now32();
	walked = st->finished - ctx.started;
	st->lead = 2 * walked + EXPIRY_LEAD_MS * (__u64)s->hz / 1000;
	st->soon = expire_soon_states(&ctx, st->lead);
	/* filed all along since this walk began: soon at its start and now */
	st->soon_since = soon & st->soon;
	st->next_due = ctx.started + ctx.next_left - st->lead;
	st->due_next = ctx.started + ctx.due_left;
	st->filed_seen = ctx.filed;
	st->indexed = bpf_map_sum_elem_count((struct bpf_map *)&lh_expiry_due);
	st->due_full += ctx.due_full;
	st->passes++;
	count_table(TC_EXPIRY_PASSES);
	return 1;
}
