/* conntrack.h: the connection table -- two maps, one entry per connection.
 *  lh_pending: new connections, until they prove themselves (LRU: a flood
 *              evicts only other newcomers);
 *  lh_conns:   confirmed connections (never evicted).
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

/* The entry of p's key (*pending := 1 when it is in lh_pending). A key is
 * in one table (a promotion inserts it into lh_conns, then deletes it from
 * lh_pending; only while another CPU promotes it is it in both), so the
 * order mostly decides what a miss costs: a TCP segment with SYN set (a new
 * connection, its SYN-ACK, or one sent again) belongs to a connection not
 * yet confirmed, so lh_pending first; any other packet most likely to an
 * established one, so lh_conns first. */
static __always_inline struct conn_entry *conn_lookup(const struct pkt *p, int *pending)
{
	struct conn_entry *e;

	if (p->key.proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_SYN_)) {
		e = bpf_map_lookup_elem(&lh_pending, &p->key);
		*pending = 1;
		if (e)
			return e;
		*pending = 0;
		return bpf_map_lookup_elem(&lh_conns, &p->key);
	}
	e = bpf_map_lookup_elem(&lh_conns, &p->key);
	*pending = 0;
	if (e)
		return e;
	*pending = 1;
	return bpf_map_lookup_elem(&lh_pending, &p->key);
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

/* Inserts e for p's key into lh_pending. Returns 1 (inserted), 0 (another
 * CPU inserted the key a moment ago: left as it wrote it), or -CNT_LEARN_FAILED. */
static __always_inline int conn_insert(const struct conn_key *k, const struct conn_entry *e)
{
	long err = bpf_map_update_elem(&lh_pending, k, e, BPF_NOEXIST);

	if (err == -17 /* EEXIST */)
		return 0;
	if (err)
		return -CNT_LEARN_FAILED;
	count_table(TC_PENDING_INSERTED);
	change_emit(CH_LEARNED, CHT_PENDING, k, e);
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
	if (e->state != before)
		change_emit(CH_STATE, CHT_EITHER, &p->key, e);
	return confirmed;
}

/* Moves a pending connection that has proved itself into lh_conns. Returns
 * the reason to count: CNT_CONFIRMED, CNT_CONFIRM_REFUSED (lh_conns full:
 * it stays pending, and works as before), or -1 when another CPU did it. */
static __always_inline int conn_promote(const struct conn_key *k, const struct conn_entry *e)
{
	struct conn_entry copy = *e;
	long err = bpf_map_update_elem(&lh_conns, k, &copy, BPF_NOEXIST);

	if (err == -17 /* EEXIST */)
		return -1;
	if (err) {
		count_table(TC_CONFIRM_REFUSED);
		return CNT_CONFIRM_REFUSED;
	}
	count_table(TC_CONFIRMED_INSERTED);
	change_emit(CH_PROMOTED, CHT_CONFIRMED, k, &copy);
	if (!bpf_map_delete_elem(&lh_pending, k))
		count_table(TC_PENDING_PROMOTED);
	return CNT_CONFIRMED;
}

/* Removes a pending entry the data path replaces (counted as removed). */
static __always_inline void conn_drop_pending(const struct conn_key *k)
{
	if (!bpf_map_delete_elem(&lh_pending, k))
		count_table(TC_PENDING_REMOVED);
	change_emit(CH_REMOVED, CHT_PENDING, k, NULL);
}
