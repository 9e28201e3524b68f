/* changes.h: the table's changes, reported to the agent's sync through the
 * lh_changes ring buffer -- one call per place the data path changes an
 * entry. Without sync (F_SET_SYNC clear) a call costs one array lookup.
 *
 * Refreshes (a packet that changes nothing but last_seen) are reported too,
 * or a peer's copy would age from the last change and a busy long-lived
 * connection expire there: at most one CH_REFRESH per entry per sync epoch,
 * epoch = jiffies >> lh_settings.sync_shift, its low 8 bits kept in the
 * entry (sync_epoch). The agent picks the shift so that an epoch is about
 * 1/8 of the shortest timeout of a confirmed state (sync_epoch_shift in
 * lasthop/sync/wire.py, set with F_SET_SYNC): a busy entry's copy is then never older than about
 * two epochs, a quarter of that timeout. */
#pragma once

#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"

/* Writes one record (kind: enum lh_change_kind, table: enum lh_change_table)
 * of entry e (NULL: a removal, no entry) of key k, sync or not. Never waits:
 * no room, the record is counted lost. */
static __always_inline void __change_write(__u8 kind, __u8 table, const struct conn_key *k,
					   const struct conn_entry *e)
{
	struct conn_change *r = bpf_ringbuf_reserve(&lh_changes, sizeof(*r), 0);

	if (!r) {
		count_table(TC_SYNC_LOST);
		return;
	}
	r->kind = kind;
	r->table = table;
	r->reserved[0] = 0;
	r->reserved[1] = 0;
	__builtin_memcpy(&r->key, k, sizeof(r->key));
	if (e)
		__builtin_memcpy(&r->entry, e, sizeof(r->entry));
	else
		__builtin_memset(&r->entry, 0, sizeof(r->entry));
	bpf_ringbuf_submit(r, 0);
}

/* Reports one change of entry e (NULL: a removal) of key k, sync on. */
static __always_inline void change_emit(__u8 kind, __u8 table, const struct conn_key *k,
					const struct conn_entry *e)
{
	__u32 zero = 0;
	struct lh_settings *s = bpf_map_lookup_elem(&lh_settings, &zero);

	if (!s || !(s->flags & F_SET_SYNC))
		return;
	__change_write(kind, table, k, e);
}

/* The sync epoch of jiffies now32 (low 8 bits), or 0 when sync is off. */
static __always_inline __u8 change_epoch(__u32 now32)
{
	__u32 zero = 0;
	struct lh_settings *s = bpf_map_lookup_elem(&lh_settings, &zero);

	if (!s || !(s->flags & F_SET_SYNC))
		return 0;
	return (__u8)(now32 >> (s->sync_shift & 31));
}

/* Entry e of key k was only refreshed (its last_seen just set): one
 * CH_REFRESH the first time in an epoch. Callers test F_SET_SYNC first, so
 * without sync the packet path pays nothing here. */
static __always_inline void change_refresh(const struct conn_key *k, struct conn_entry *e)
{
	__u32 zero = 0;
	struct lh_settings *s = bpf_map_lookup_elem(&lh_settings, &zero);
	__u8 epoch;

	if (!s || !(s->flags & F_SET_SYNC))
		return;
	epoch = (__u8)(e->last_seen >> (s->sync_shift & 31));
	if (epoch == e->sync_epoch)
		return;
	e->sync_epoch = epoch;
	__change_write(CH_REFRESH, CHT_EITHER, k, e);
}
