/* failover.h: replies follow a firewall's fail-over at once (issue 11, item 3).
 *
 * When a firewall pair fails over, the new active unit announces the shared
 * address from its own MAC (gratuitous ARP, unsolicited neighbour
 * advertisement). The agent sees the announcement on an uplink that opted in
 * (F_IFACE_FOLLOW_MOVES), checks the announcer is one the config trusts, and
 * writes old MAC -> new MAC into lh_hop_moved. A reply then looks its entry's
 * (uplink, MAC) up there -- one lookup, and only while F_SET_HOPS_MOVED says
 * the map holds a record -- and, found, rewrites the entry to the new MAC
 * before sending: every entry of the old MAC follows on its next reply, with
 * no walk of the table by anyone. The agent keeps chains resolved (A -> B,
 * then B -> C, is written A -> C and B -> C), so one lookup suffices. */
#pragma once

#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "changes.h"

/* (uplink, last-hop MAC that no longer answers) -> the MAC its address moved
 * to. Written and retired by the agent (lasthop.failover); read per reply. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_MOVED_HOPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct hop_key);
	__type(value, struct hop_moved);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_hop_moved SEC(".maps");

/* Entry e (of key k) of a reply about to go to its last hop: if that hop's
 * address moved to another MAC, the entry takes the new MAC (reported to the
 * sync as a hop change). Returns 1 when it moved. Without a record anywhere:
 * one flag test. */
static __always_inline int failover_follow(struct conn_entry *e, const struct conn_key *k,
					   __u32 settings)
{
	struct hop_key hk = { .ifindex = e->ifindex };
	struct hop_moved *m;
	struct iface_cfg *up;

	if (!(settings & F_SET_HOPS_MOVED))
		return 0;
	up = iface_get(e->ifindex, ROLE_UPLINK);
	if (!up || !(up->flags & F_IFACE_FOLLOW_MOVES))
		return 0;
	__builtin_memcpy(hk.mac, e->mac, ETH_ALEN);
	m = bpf_map_lookup_elem(&lh_hop_moved, &hk);
	if (!m)
		return 0;
	__builtin_memcpy(e->mac, m->mac, ETH_ALEN);
	change_emit(CH_HOP, CHT_EITHER, k, e);
	return 1;
}
