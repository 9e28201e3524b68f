/* changes.h: the table's changes, reported to the agent's sync through the
 * lh_changes ring buffer -- one call per place the data path changes an
 * entry. Without sync (F_SET_SYNC clear) a call costs one array lookup. */
#pragma once

#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"

/* Reports one change of entry e (NULL: a removal, no entry) of key k (kind:
 * enum lh_change_kind, table: enum lh_change_table). Never waits: no room,
 * the record is counted lost. */
static __always_inline void change_emit(__u8 kind, __u8 table, const struct conn_key *k,
					const struct conn_entry *e)
{
	__u32 zero = 0;
	struct lh_settings *s = bpf_map_lookup_elem(&lh_settings, &zero);
	struct conn_change *r;

	if (!s || !(s->flags & F_SET_SYNC))
		return;
	r = bpf_ringbuf_reserve(&lh_changes, sizeof(*r), 0);
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
