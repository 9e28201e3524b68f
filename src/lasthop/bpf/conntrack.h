/* conntrack.h: the connection table -- two tables per family, one entry per
 * connection, behind the helpers below (the rest of the data path never
 * names a table, so it does not care which family it handles):
 *  lh_pending4, lh_pending: new connections, until they prove themselves
 *                           (LRU: a flood evicts only other newcomers);
 *  lh_conns4, lh_conns:     confirmed connections (never evicted).
 * IPv4 tables take a 16-byte struct conn_key4, IPv6 ones the 40-byte
 * conn_key; packets, services and change records always carry the full
 * conn_key.
 * A connection is confirmed when the side that did not open it has shown it
 * is really talking to the opener: TCP, the opener's ACK of the answer's
 * SYN-ACK, with the right number (an off-path spoofer never sees it); a TCP
 * connection first seen mid-stream, any non-RST answer; UDP, the opener
 * speaking again after an answer. Pings are never confirmed. */
#pragma once

#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "changes.h"

/* The IPv4 tables' key of an IPv4 conn_key. */
static __always_inline void conn_key4_of(struct conn_key4 *k4, const struct conn_key *k)
{
	k4->saddr = k->saddr[0];
	k4->daddr = k->daddr[0];
	k4->sport = k->sport;
	k4->dport = k->dport;
	k4->proto = k->proto;
	k4->reserved = 0;
	k4->zone = k->zone;
}

/* The full conn_key of an IPv4 tables' key (change records carry it). */
static __always_inline void conn_key_of4(struct conn_key *k, const struct conn_key4 *k4)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr[0] = k4->saddr;
	k->daddr[0] = k4->daddr;
	k->sport = k4->sport;
	k->dport = k4->dport;
	k->proto = k4->proto;
	k->family = FAMILY_V4;
	k->zone = k4->zone;
}

/* Inserts or rewrites k's entry in its family's confirmed (pending = 0) or
 * pending (1) table; bpf_map_update_elem's result. */
static __always_inline long conn_table_update(int pending, const struct conn_key *k,
					      const struct conn_entry *e, __u64 flags)
{
	struct conn_key4 k4;

	if (k->family != FAMILY_V4)
		return pending ? bpf_map_update_elem(&lh_pending, k, e, flags)
			       : bpf_map_update_elem(&lh_conns, k, e, flags);
	conn_key4_of(&k4, k);
	return pending ? bpf_map_update_elem(&lh_pending4, &k4, e, flags)
		       : bpf_map_update_elem(&lh_conns4, &k4, e, flags);
}

/* Removes k from its family's confirmed (pending = 0) or pending (1) table;
 * 0 when it was there. */
static __always_inline long conn_table_delete(int pending, const struct conn_key *k)
{
	struct conn_key4 k4;

	if (k->family != FAMILY_V4)
		return pending ? bpf_map_delete_elem(&lh_pending, k) : bpf_map_delete_elem(&lh_conns, k);
	conn_key4_of(&k4, k);
	return pending ? bpf_map_delete_elem(&lh_pending4, &k4) : bpf_map_delete_elem(&lh_conns4, &k4);
}

/* k's entry in its family's confirmed (pending = 0) or pending (1) table, or
 * NULL. */
static __always_inline struct conn_entry *conn_table_lookup(int pending, const struct conn_key *k)
{
	struct conn_key4 k4;

	if (k->family != FAMILY_V4)
		return pending ? bpf_map_lookup_elem(&lh_pending, k) : bpf_map_lookup_elem(&lh_conns, k);
	conn_key4_of(&k4, k);
	return pending ? bpf_map_lookup_elem(&lh_pending4, &k4) : bpf_map_lookup_elem(&lh_conns4, &k4);
}

/* Looks key up in table first, then in second (*in_second := 1 when found
 * there, or when neither holds it). missed (MISS_*): what a fast path's
 * lookups of the same key just missed, not asked again. */
static __always_inline struct conn_entry *__conn_lookup2(void *first, void *second,
							  const void *key, int missed,
							  int *in_second)
{
	struct conn_entry *e = missed ? NULL : bpf_map_lookup_elem(first, key);

	*in_second = 0;
	if (e)
		return e;
	*in_second = 1;
	return missed == MISS_BOTH ? NULL : bpf_map_lookup_elem(second, key);
}

/* Whether new connections go into the confirmed tables first (F_SET_INPLACE:
 * lh_settings' inplace_quota > 0). */
static __always_inline int inplace_on(void)
{
	__u32 zero = 0;
	struct lh_settings *s = bpf_map_lookup_elem(&lh_settings, &zero);

	return s && (s->flags & F_SET_INPLACE);
}

/* The entry of p's key (*pending := 1 when it is in a pending table; an
 * unconfirmed entry in a confirmed table, F_ENTRY2_INPLACE, is not: the
 * caller tests its bit). A key is in one table (a promotion inserts it into
 * the confirmed one, then deletes it from the pending one; only while
 * another CPU promotes it is it in both), so the order mostly decides what a
 * miss costs. With in-place entries on, the confirmed table holds most new
 * connections too: confirmed first for every packet. Otherwise a TCP segment
 * with SYN set (a new connection, its SYN-ACK, or one sent again) belongs to
 * a connection not yet confirmed, so pending first; any other packet most
 * likely to an established one, so confirmed first -- unless a fast path
 * just missed it there, or in both (p->confirmed_miss: never for a SYN). */
static __always_inline struct conn_entry *conn_lookup(const struct pkt *p, int *pending)
{
	int syn = p->key.proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_SYN_) && !inplace_on();
	struct conn_entry *e;
	struct conn_key4 k4;
	int second;

	if (p->key.family == FAMILY_V4) {
		conn_key4_of(&k4, &p->key);
		if (syn)
			e = __conn_lookup2(&lh_pending4, &lh_conns4, &k4, 0, &second);
		else
			e = __conn_lookup2(&lh_conns4, &lh_pending4, &k4, p->confirmed_miss,
					   &second);
	} else if (syn) {
		e = __conn_lookup2(&lh_pending, &lh_conns, &p->key, 0, &second);
	} else {
		e = __conn_lookup2(&lh_conns, &lh_pending, &p->key, p->confirmed_miss, &second);
	}
	*pending = syn ? !second : second;
	return e;
}

/* The state a connection starts in from its first packet; CS_NONE = do not
 * remember (a RST ends what we never saw). */
static __always_inline __u8 conn_first_state(const struct pkt *p)
{
	__u8 f = p->tcp_flags;

	if (p->key.proto == IPPROTO_TCP) {
		if (f & TCP_FLAG_RST_)
			return CS_NONE;
		return (f & (TCP_FLAG_SYN_ | TCP_FLAG_ACK_)) == TCP_FLAG_SYN_ ? CS_TCP_SYN_SENT
									    : CS_TCP_MIDSTREAM;
	}
	if (p->key.proto == IPPROTO_ICMP || p->key.proto == IPPROTO_ICMPV6)
		return CS_ICMP_NEW;
	return CS_UDP_NEW;
}

/* Asks lh_expire for a walk at its next run, as user space's writers do
 * (lh_expiry_request: any new token; an add makes one without a random). */
static __always_inline void expiry_ask(void)
{
	__u32 zero = 0;
	__u64 *token = bpf_map_lookup_elem(&lh_expiry_request, &zero);

	if (token)
		__sync_fetch_and_add(token, 1);
}

/* Entry e of key k (in table t: enum lh_change_table) was just made or moved
 * to its state by this packet. When that state's timeout is shorter than the
 * expiry's lead (lh_expiry[0].soon, kept by lh_expire), a walk may not meet
 * the entry before it is due: file it in lh_expiry_due now, due a timeout from
 * now, and bring the next drain forward to it (expire.h). Any other state:
 * one array lookup and a bit test. Since such a change calls for no walk
 * (expire_change_gap), a filing that fails (the index full) asks for one.
 * The filing is counted last, by an atomic add (a full barrier on x86): a
 * drain or walk that began before the count moved may store a due_next that
 * hides this one, and the next run, seeing the count past the one it began
 * with, drains again; one that began after it sees the index entry and the
 * lowered due_next. */
static __always_inline void conn_file_soon(const struct conn_key *k, const struct conn_entry *e,
					   __u32 t)
{
	struct expiry_due d = { .table = t };
	struct expiry_stats *st;
	struct lh_settings *s;
	__u32 zero = 0, state = e->state;
	__u64 timeout;

	st = bpf_map_lookup_elem(&lh_expiry, &zero);
	if (!st || state >= CS_MAX || !(st->soon & (1U << state)))
		return;
	s = bpf_map_lookup_elem(&lh_settings, &zero);
	if (!s)
		return;
	timeout = (__u64)s->timeout[state] * s->hz;
	d.deadline = now32() + (__u32)timeout + 1; /* soon: timeout < lead, far below 2^30 */
	if (bpf_map_update_elem(&lh_expiry_due, k, &d, BPF_ANY)) {
		expiry_ask(); /* full: left to a walk, as the walks leave it (due_full) */
		return;
	}
	if ((__s32)(d.deadline - st->due_next) < 0)
		st->due_next = d.deadline;
	__sync_fetch_and_add(&st->filed, 1);
}

/* Reserves a place for an unconfirmed entry in a confirmed table: the count
 * in lh_inplace taken up by one while below the quota (returned, to give the
 * place back should the insert fail), else NULL. Added first and checked
 * after, so concurrent inserts never take the count past the quota. */
static __always_inline struct inplace_count *inplace_reserve(void)
{
	__u32 zero = 0;
	struct lh_settings *s = bpf_map_lookup_elem(&lh_settings, &zero);
	struct inplace_count *c = bpf_map_lookup_elem(&lh_inplace, &zero);

	if (!s || !c || c->count >= s->inplace_quota)
		return NULL;
	if (__sync_fetch_and_add(&c->count, 1) < s->inplace_quota)
		return c;
	__sync_fetch_and_add(&c->count, -1);
	return NULL;
}

/* Takes the in-place bit off e (atomically, on the 8-byte word that holds
 * flags2) and gives its place in the quota back. Returns 1 when this call
 * cleared it, 0 when it was clear already (not in place, or another CPU's
 * confirmation or removal got there first): each in-place entry leaves the
 * count exactly once, whichever CPU clears its bit. */
static __always_inline int inplace_clear(struct conn_entry *e)
{
	__u64 *w = (__u64 *)((char *)e + CONN_ENTRY_WORD2_OFF);
	__u64 bit = (__u64)F_ENTRY2_INPLACE << CONN_ENTRY_FLAGS2_SHIFT;
	struct inplace_count *c;
	__u32 zero = 0;

	if (!(e->flags2 & F_ENTRY2_INPLACE))
		return 0;
	if (!(__sync_fetch_and_and(w, ~bit) & bit))
		return 0;
	c = bpf_map_lookup_elem(&lh_inplace, &zero);
	if (c)
		__sync_fetch_and_add(&c->count, -1);
	return 1;
}

/* Removes entry e of table t (enum lh_change_table: map, the family's map
 * of it; key, the map's own key; full, the full conn_key) and reports it
 * (kind: CH_REMOVED or CH_EXPIRED). An in-place entry of a confirmed table
 * gives its place in the quota back first (inplace_clear: exactly once,
 * whichever CPU gets there) and counts as pending. Returns the table it
 * counted as, or -1 when another CPU removed it first. */
static __always_inline int conn_remove(void *map, const void *key, const struct conn_key *full,
				       struct conn_entry *e, __u32 t, __u8 kind)
{
	int as = t == CHT_CONFIRMED && inplace_clear(e) ? CHT_PENDING : t;

	change_emit(kind, as, full, NULL); /* before: the key is freed after */
	return bpf_map_delete_elem(map, key) ? -1 : as;
}

/* conn_remove of entry e named by its full key k, in its family's table t
 * (CHT_CONFIRMED or CHT_PENDING: conn_table_delete picks the map). */
static __always_inline int conn_table_remove(__u32 t, const struct conn_key *k,
					     struct conn_entry *e, __u8 kind)
{
	int as = t == CHT_CONFIRMED && inplace_clear(e) ? CHT_PENDING : t;

	change_emit(kind, as, k, NULL);
	return conn_table_delete(t, k) ? -1 : as;
}

/* Inserts e for k as a new, unconfirmed connection: an IPv4 one into
 * lh_conns4 marked F_ENTRY2_INPLACE while the in-place quota has room (not
 * pings: they never confirm; not IPv6: its tables are small by default, and
 * sizing lh_conns for the quota too would cost its memory twice), else into
 * its family's pending table (the LRU).
 * Returns 1 (inserted), 0 (another CPU inserted the key a moment ago: left
 * as it wrote it), or -CNT_LEARN_FAILED. */
static __always_inline int conn_insert(const struct conn_key *k, struct conn_entry *e)
{
	struct inplace_count *c;
	long err;

	if (k->family == FAMILY_V4 && e->state != CS_ICMP_NEW && inplace_on() &&
	    (c = inplace_reserve())) {
		e->flags2 |= F_ENTRY2_INPLACE;
		err = conn_table_update(0, k, e, BPF_NOEXIST);
		if (!err) {
			count_table(TC_INPLACE_INSERTED);
			change_emit(CH_LEARNED, CHT_PENDING, k, e);
			conn_file_soon(k, e, CHT_CONFIRMED);
			return 1;
		}
		__sync_fetch_and_add(&c->count, -1);
		e->flags2 &= ~F_ENTRY2_INPLACE;
		if (err == -17 /* EEXIST */)
			return 0;
		/* the confirmed table full: the LRU, as without the quota */
	}
	err = conn_table_update(1, k, e, BPF_NOEXIST);
	if (err == -17 /* EEXIST */)
		return 0;
	if (err)
		return -CNT_LEARN_FAILED;
	count_table(TC_PENDING_INSERTED);
	change_emit(CH_LEARNED, CHT_PENDING, k, e);
	conn_file_soon(k, e, CHT_PENDING);
	return 1;
}

/* TCP: FIN and RST, from either side. */
static __always_inline void tcp_track_close(struct conn_entry *e, __u8 f, int from_opener)
{
	if (f & TCP_FLAG_RST_) {
		e->state = CS_TCP_CLOSED;
		return;
	}
	if (!(f & TCP_FLAG_FIN_) || e->state < CS_TCP_SYN_RECV || e->state > CS_TCP_CLOSING)
		return;
	e->flags |= from_opener ? F_ENTRY_FIN_OPENER : F_ENTRY_FIN_ANSWERER;
	e->state = (e->flags & (F_ENTRY_FIN_OPENER | F_ENTRY_FIN_ANSWERER)) ==
			   (F_ENTRY_FIN_OPENER | F_ENTRY_FIN_ANSWERER)
		       ? CS_TCP_CLOSED
		       : CS_TCP_CLOSING;
}

/* TCP: the handshake and mid-stream answers. Returns 1 when p confirms. */
static __always_inline int tcp_track_open(struct conn_entry *e, const struct pkt *p,
					  int from_opener)
{
	__u8 f = p->tcp_flags & (TCP_FLAG_SYN_ | TCP_FLAG_ACK_ | TCP_FLAG_RST_ | TCP_FLAG_FIN_);
	__u8 syn_ack = TCP_FLAG_SYN_ | TCP_FLAG_ACK_;

	switch (e->state) {
	case CS_TCP_SYN_SENT:
		if (!from_opener && (f & (syn_ack | TCP_FLAG_RST_)) == syn_ack) {
			e->state = CS_TCP_SYN_RECV;
			e->seq = p->tcp_seq + 1;
		}
		return 0;
	case CS_TCP_SYN_RECV:
		if (!from_opener && (f & (syn_ack | TCP_FLAG_RST_)) == syn_ack)
			e->seq = p->tcp_seq + 1; /* a SYN-ACK sent again */
		if (from_opener && (f & (syn_ack | TCP_FLAG_RST_)) == TCP_FLAG_ACK_ &&
		    p->tcp_ack == e->seq) {
			e->state = CS_TCP_ESTABLISHED;
			return 1;
		}
		return 0;
	case CS_TCP_MIDSTREAM:
		if (!from_opener && !(f & (TCP_FLAG_SYN_ | TCP_FLAG_RST_))) {
			e->state = CS_TCP_ESTABLISHED;
			return 1;
		}
		return 0;
	default:
		return 0;
	}
}

/* conn_track's work once the common case is ruled out. */
static __always_inline int conn_step(struct conn_entry *e, const struct pkt *p, int from_opener)
{
	int confirmed = 0;

	switch (e->state) {
	case CS_UDP_NEW:
	case CS_ICMP_NEW:
		if (!from_opener)
			e->state += 1; /* _ANSWERED */
		return 0;
	case CS_UDP_ANSWERED:
		if (!from_opener)
			return 0;
		e->state = CS_UDP_STREAM;
		return 1;
	case CS_UDP_STREAM:
	case CS_ICMP_ANSWERED:
	case CS_NONE:
		return 0;
	}
	/* TCP */
	if (from_opener && (p->tcp_flags & (TCP_FLAG_SYN_ | TCP_FLAG_ACK_ | TCP_FLAG_RST_)) ==
				   TCP_FLAG_SYN_ &&
	    (e->state == CS_TCP_CLOSED || e->state == CS_TCP_CLOSING)) {
		/* the port pair used again: a new connection in the same entry */
		e->state = CS_TCP_SYN_SENT;
		e->flags &= ~(F_ENTRY_FIN_OPENER | F_ENTRY_FIN_ANSWERER);
		return 0;
	}
	confirmed = tcp_track_open(e, p, from_opener);
	tcp_track_close(e, p->tcp_flags, from_opener);
	return confirmed && e->state == CS_TCP_ESTABLISHED;
}

/* Moves a connection along its states by one packet. from_opener: the packet
 * comes from the side that opened it. Returns 1 when the connection has just
 * proved itself (the caller promotes it), else 0. A move is counted: it may
 * shorten the entry's timeout, which the expiry pass must then learn of. */
static __always_inline int conn_track(struct conn_entry *e, const struct pkt *p, int from_opener)
{
	__u8 before = e->state;
	int confirmed;

	/* the common case, a segment of an established connection: nothing moves */
	if (before == CS_TCP_ESTABLISHED &&
	    !(p->tcp_flags & (TCP_FLAG_SYN_ | TCP_FLAG_FIN_ | TCP_FLAG_RST_)))
		return 0;
	confirmed = conn_step(e, p, from_opener);
	if (e->state != before)
		count_table(TC_STATE_CHANGES);
	if (e->state != before) {
		change_emit(CH_STATE, CHT_EITHER, &p->key, e);
		conn_file_soon(&p->key, e, CHT_EITHER);
	}
	return confirmed;
}

/* Moves a pending connection that has proved itself into its family's
 * confirmed table. Returns the reason to count: CNT_CONFIRMED,
 * CNT_CONFIRM_REFUSED (the confirmed table full:
 * it stays pending, and works as before), or -1 when another CPU did it. */
static __always_inline int conn_promote(const struct conn_key *k, const struct conn_entry *e)
{
	struct conn_entry copy = *e;
	long err = conn_table_update(0, k, &copy, BPF_NOEXIST);

	if (err == -17 /* EEXIST */)
		return -1;
	if (err) {
		count_table(TC_CONFIRM_REFUSED);
		return CNT_CONFIRM_REFUSED;
	}
	count_table(TC_CONFIRMED_INSERTED);
	change_emit(CH_PROMOTED, CHT_CONFIRMED, k, &copy);
	if (!conn_table_delete(1, k))
		count_table(TC_PENDING_PROMOTED);
	return CNT_CONFIRMED;
}

/* A connection that has proved itself: moved into its family's confirmed
 * table when it is in the pending one (conn_promote), or, in place there
 * already (F_ENTRY2_INPLACE), confirmed by clearing its bit: no insert, no
 * delete. Returns conn_promote's reasons; -1 also when it was confirmed
 * already or another CPU confirmed or removed it first. */
static __always_inline int conn_confirm(const struct conn_key *k, struct conn_entry *e,
					int pending)
{
	if (pending)
		return conn_promote(k, e);
	if (!inplace_clear(e))
		return -1;
	count_table(TC_INPLACE_CONFIRMED);
	change_emit(CH_PROMOTED, CHT_CONFIRMED, k, e);
	return CNT_CONFIRMED;
}

/* Removes an entry of the confirmed table the data path replaces; an
 * in-place (unconfirmed) one counts as a pending entry removed. */
static __always_inline void conn_drop_confirmed(const struct conn_key *k, struct conn_entry *e)
{
	int as = conn_table_remove(CHT_CONFIRMED, k, e, CH_REMOVED);

	if (as >= 0)
		count_table(as == CHT_PENDING ? TC_INPLACE_REMOVED : TC_CONFIRMED_REMOVED);
}

/* Removes a pending entry the data path replaces (counted as removed). */
static __always_inline void conn_drop_pending(const struct conn_key *k)
{
	if (!conn_table_delete(1, k))
		count_table(TC_PENDING_REMOVED);
	change_emit(CH_REMOVED, CHT_PENDING, k, NULL);
}
