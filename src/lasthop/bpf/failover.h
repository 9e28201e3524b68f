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
 * then B -> C, is written A -> C and B -> C), so one lookup suffices.
 *
 * The agent also writes what the host's neighbour table says (lasthop.
 * failover follows RTM_NEWNEIGH): an address whose entry names a new MAC
 * moves as an announcement does, and a last hop whose entry goes FAILED or
 * INCOMPLETE gets a HOP_UNREACHABLE record: its replies take routing,
 * counted hop_unreachable, until the entry is valid again. */
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
 * sync as a hop change); if the hop no longer answers (its neighbour entry
 * failed: HOP_UNREACHABLE), the entry is left alone and the reply must take
 * routing. Returns enum lh_follow. Without a record anywhere: one flag test
 * (the caller's, failover_needed). A global function: verified once, off the
 * verifier budget of the programs that call it (lh_vmport, lh_uplink_out). */
__noinline int failover_follow(struct conn_entry *e, const struct conn_key *k)
{
	struct hop_key hk = {};
	struct hop_moved *m;
	struct iface_cfg *up;

	if (!e || !k)
		return FOLLOW_NONE;
	hk.ifindex = e->ifindex;
	up = iface_get(hk.ifindex, ROLE_UPLINK);
	if (!up || !(up->flags & F_IFACE_FOLLOW_MOVES))
		return FOLLOW_NONE;
	__builtin_memcpy(hk.mac, e->mac, ETH_ALEN);
	m = bpf_map_lookup_elem(&lh_hop_moved, &hk);
	if (!m)
		return FOLLOW_NONE;
	if (m->flags & HOP_UNREACHABLE)
		return FOLLOW_UNREACHABLE;
	__builtin_memcpy(e->mac, m->mac, ETH_ALEN);
	change_emit(CH_HOP, CHT_EITHER, k, e);
	return FOLLOW_MOVED;
}

/* Whether a reply must ask failover_follow: a record exists somewhere. */
static __always_inline int failover_needed(__u32 settings)
{
	return !!(settings & F_SET_HOPS_MOVED);
}
