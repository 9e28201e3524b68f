/* fastpath.h: the common case first -- an untagged IPv4/IPv6 TCP segment
 * (no SYN, FIN or RST; no IP options, IPv6 extension headers or fragments)
 * of an established connection in the confirmed table, on a plain Ethernet
 * link. lh_vmport sends such a reply to its last hop (fast_reply), lh_uplink
 * refreshes such a request's entry (fast_refresh), each with a few checks,
 * one lookup and no call; anything else, or any doubt, returns FAST_NONE
 * before a byte or an entry has changed, and the general path (the same
 * program's global function) handles the packet from the start. So the
 * general path stays the reference of behaviour: each fast path does exactly
 * what it would do with the packet, counters included (tests/bpf and the
 * fast path's own table, tests/bpf/test_fastpath.py, hold both to it). */
#pragma once

#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "rewrite.h"
#include "changes.h"

#ifdef LH_TRACE_REDIRECT
/* Test builds only: 0 -> packets a fast path took (the test checks it took
 * the ones it should). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lh_trace_fast SEC(".maps");

static __always_inline void trace_fast(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&lh_trace_fast, &zero);

	if (n)
		*n += 1;
}
#else
static __always_inline void trace_fast(void) {}
#endif

#define FAST_NONE (-1) /* not the common case: the general path takes the packet */
#define FAST_MISS (-2) /* FAST_NONE, and the confirmed table has no entry for the key */
#define FAST_TCP_OFF_ 13 /* the TCP header's flags byte */
#define FAST_TCP_STOP_ (TCP_FLAG_SYN_ | TCP_FLAG_FIN_ | TCP_FLAG_RST_) /* a state may move */

/* The TCP header of an untagged frame's datagram that starts at l3 and is
 * l3_len bytes long (its IP header hlen bytes), with the general parser's
 * strict checks (parse_l4: 20 bytes, data offset >= 5, the header inside
 * the datagram), and no flag that could move a state; else NULL. */
static __always_inline struct tcphdr *fast_tcp(void *l3, __u32 hlen, __u32 l3_len, void *end)
{
	struct tcphdr *th = l3 + hlen;

	if ((void *)(th + 1) > end || hlen + sizeof(*th) > l3_len)
		return NULL;
	if (th->doff < 5 || hlen + th->doff * 4 > l3_len)
		return NULL;
	if (((__u8 *)th)[FAST_TCP_OFF_] & FAST_TCP_STOP_)
		return NULL;
	return th;
}

/* An untagged frame's IPv4 TCP segment as fast_tcp wants it: a 20-byte
 * header (no options), no fragment, its total length within the frame. */
static __always_inline struct tcphdr *fast_tcp4(struct __sk_buff *skb, struct ethhdr *eth,
						 struct iphdr **ipp)
{
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = (void *)(eth + 1);
	__u32 tot;

	if ((void *)(ip + 1) > end || *(__u8 *)ip != 0x45 || ip->protocol != IPPROTO_TCP ||
	    (ip->frag_off & bpf_htons(IP_MF_ | IP_OFFSET_)))
		return NULL;
	tot = bpf_ntohs(ip->tot_len);
	if (sizeof(*eth) + tot > skb->len)
		return NULL; /* also tot 0 (BIG TCP): the general path reads it */
	*ipp = ip;
	return fast_tcp(ip, sizeof(*ip), tot, end);
}

/* The same for IPv6: TCP right after the fixed header, a payload length
 * that is not 0 and within the frame. */
static __always_inline struct tcphdr *fast_tcp6(struct __sk_buff *skb, struct ethhdr *eth,
						 struct ipv6hdr **ipp)
{
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	__u32 plen;

	if ((void *)(ip6 + 1) > end || ip6->version != 6 || ip6->nexthdr != IPPROTO_TCP)
		return NULL;
	plen = bpf_ntohs(ip6->payload_len);
	if (!plen || sizeof(*eth) + sizeof(*ip6) + plen > skb->len)
		return NULL;
	*ipp = ip6;
	return fast_tcp(ip6, sizeof(*ip6), sizeof(*ip6) + plen, end);
}

/* The confirmed entry of an established connection, for the segment's key
 * reversed (rev, a reply) or as read; NULL when it is not that (*missed := 1
 * when the confirmed table was looked up and holds no entry for the key). */
static __always_inline struct conn_entry *fast_lookup(struct __sk_buff *skb, struct ethhdr *eth,
						       __u16 zone, int rev, int *missed)
{
	struct conn_entry *e = NULL;
	struct tcphdr *th;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct conn_key4 k = { .proto = IPPROTO_TCP, .zone = zone };
		struct iphdr *ip = NULL;

		th = fast_tcp4(skb, eth, &ip);
		if (!th || !ip)
			return NULL;
		k.saddr = rev ? ip->daddr : ip->saddr;
		k.daddr = rev ? ip->saddr : ip->daddr;
		k.sport = rev ? th->dest : th->source;
		k.dport = rev ? th->source : th->dest;
		e = bpf_map_lookup_elem(&lh_conns4, &k);
		*missed = !e;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct conn_key k = { .proto = IPPROTO_TCP, .family = FAMILY_V6, .zone = zone };
		struct ipv6hdr *ip6 = NULL;

		th = fast_tcp6(skb, eth, &ip6);
		if (!th || !ip6)
			return NULL;
		__builtin_memcpy(k.saddr, rev ? &ip6->daddr : &ip6->saddr, 16);
		__builtin_memcpy(k.daddr, rev ? &ip6->saddr : &ip6->daddr, 16);
		k.sport = rev ? th->dest : th->source;
		k.dport = rev ? th->source : th->dest;
		e = bpf_map_lookup_elem(&lh_conns, &k);
		*missed = !e;
	}
	if (!e || e->state != CS_TCP_ESTABLISHED)
		return NULL;
	return e;
}

static __always_inline __u32 fast_settings(void)
{
	__u32 zero = 0;
	struct lh_settings *s = bpf_map_lookup_elem(&lh_settings, &zero);

	return s ? s->flags : 0;
}

/* lh_vmport's common case: a reply of an established connection whose last
 * hop is a MAC (and tags) on a plain Ethernet uplink that is up, from a bridged
 * VM port whose guest's MAC is known. Returns the verdict, or FAST_NONE. */
static __always_inline int fast_reply(struct __sk_buff *skb, const struct iface_cfg *cfg)
{
	struct ethhdr *eth = eth_of(skb);
	struct conn_entry *e;
	struct iface_cfg *up;
	__u32 settings, ifindex;
	int fast, ret, missed = 0;

	if (!eth || skb->vlan_present ||
	    (cfg->flags & (F_IFACE_VM_MAC | F_IFACE_ROUTED)) != F_IFACE_VM_MAC)
		return FAST_NONE;
	e = fast_lookup(skb, eth, cfg->zone, 1, &missed);
	if (!e || (e->flags & (F_ENTRY_HOP_KNOWN | F_ENTRY_HOP_EXT)) != F_ENTRY_HOP_KNOWN)
		return FAST_NONE;
	settings = fast_settings();
	if (settings & F_SET_HOPS_MOVED)
		return FAST_NONE; /* failover_follow may move the hop */
	ifindex = e->ifindex;
	up = iface_get(ifindex, ROLE_UPLINK);
	if (!up || (up->flags & F_IFACE_LINK_DOWN) || up->link_kind != LINK_ETHERNET)
		return FAST_NONE;
	/* vm_fast_eligible, bridged: this port's guest answered */
	fast = !e->vm_ifindex && (settings & F_SET_FAST_PATH) &&
	       mac_equal(eth->h_source, cfg->vm_mac);
	__builtin_memcpy(eth->h_dest, e->mac, ETH_ALEN);
	if (e->vlan_count && rewrite_vlan(skb, e)) {
		count(cfg->slot, CNT_REWRITE_FAILED);
		trace_fast();
		return TC_ACT_OK;
	}
	e->last_seen = now32();
	e->replies++;
	trace_redirect(ifindex);
	ret = bpf_redirect(ifindex, 0);
	if (fast) {
		e->vm_ifindex = skb->ifindex;
		e->flags |= F_ENTRY_VM_FAST;
	}
	count(cfg->slot, CNT_REDIRECTED);
	trace_fast();
	return ret;
}

/* lh_uplink's common case: a request of an established connection that
 * goes on as it came (no VM holds it), from the same last hop (MAC, no tags)
 * on an Ethernet uplink with no list of last hops. Returns TC_ACT_OK, or
 * FAST_NONE (FAST_MISS: the confirmed table has no entry for the key, which
 * the general path then need not look up again). */
static __always_inline int fast_refresh(struct __sk_buff *skb, const struct iface_cfg *cfg)
{
	struct ethhdr *eth = eth_of(skb);
	struct conn_entry *e;
	__u32 settings;
	int missed = 0;

	if (!eth || skb->vlan_present || cfg->link_kind != LINK_ETHERNET ||
	    (cfg->flags & (F_IFACE_HOPS_ALLOW | F_IFACE_HOPS_DENY)) || (eth->h_dest[0] & 1))
		return FAST_NONE;
	e = fast_lookup(skb, eth, cfg->zone, 0, &missed);
	if (!e)
		return missed ? FAST_MISS : FAST_NONE;
	if (e->vm_ifindex || e->ifindex != skb->ifindex || e->vlan_count ||
	    e->vlan_tci[0] || e->vlan_tci[1] ||
	    (e->flags & (F_ENTRY_HOP_KNOWN | F_ENTRY_HOP_EXT)) != F_ENTRY_HOP_KNOWN ||
	    !mac_equal(e->mac, eth->h_source))
		return FAST_NONE;
	settings = fast_settings();
	if (settings & F_SET_SYNC)
		return FAST_NONE; /* its refresh record needs the full key: the general path */
	e->last_seen = now32();
	e->packets++;
	count(cfg->slot, CNT_REFRESHED);
	trace_fast();
	return TC_ACT_OK;
}
