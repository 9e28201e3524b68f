/* fastpath.h: the common case first -- an untagged IPv4/IPv6 TCP segment
 * (no SYN, FIN or RST; no IP options, IPv6 extension headers or fragments)
 * of an established connection in the confirmed table, or a UDP datagram of
 * a confirmed stream. lh_vmport sends such a reply to its last hop
 * (fast_reply: a MAC and tags, or a hop descriptor -- a VXLAN/Geneve
 * endpoint or an MPLS stack), lh_uplink refreshes such a
 * request's entry on a plain Ethernet link (fast_refresh) and sends it on
 * as it came or straight to
 * the VM that answered it (vm_fast_send), each with a few checks, one lookup
 * (and the descriptor's); anything else, or
 * any doubt, returns FAST_NONE before a byte or an entry has changed, and the
 * general path (the same program's global function) handles the packet from
 * the start -- told, when the fast path's lookup missed the confirmed table
 * (skb->cb), to look in the pending one only. So the general path stays
 * the reference of behaviour: each fast path does exactly what it would do
 * with the packet, counters included (tests/bpf and the fast path's own
 * tables, tests/bpf/test_fastpath.py, hold both to it). */
#pragma once

#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "rewrite.h"
#include "service.h"
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
#define FAST_PASS (-2) /* vm_fast_send: left to the kernel (too big, or not sent) */
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

/* The same for UDP (parse_l4's checks: 8 bytes, a length that covers the
 * header and stays inside the datagram); its ports where TCP has them. */
static __always_inline struct udphdr *fast_udp(void *l3, __u32 hlen, __u32 l3_len, void *end)
{
	struct udphdr *uh = l3 + hlen;
	__u32 len;

	if ((void *)(uh + 1) > end || hlen + sizeof(*uh) > l3_len)
		return NULL;
	len = bpf_ntohs(uh->len);
	if (len < sizeof(*uh) || hlen + len > l3_len)
		return NULL;
	return uh;
}

/* The ports (source, destination: TCP's and UDP's first 4 bytes) of a
 * datagram of protocol proto -- TCP, or UDP when udp -- as fast_tcp or
 * fast_udp accept it; else NULL. */
static __always_inline __be16 *fast_ports(void *l3, __u32 hlen, __u32 l3_len, void *end,
					  __u8 proto, int udp)
{
	if (proto == IPPROTO_TCP)
		return (__be16 *)fast_tcp(l3, hlen, l3_len, end);
	if (udp && proto == IPPROTO_UDP)
		return (__be16 *)fast_udp(l3, hlen, l3_len, end);
	return NULL;
}

/* An untagged frame's IPv4 segment as fast_ports wants it: a 20-byte
 * header (no options), no fragment, its total length within the frame. */
static __always_inline __be16 *fast_l4_4(struct __sk_buff *skb, struct ethhdr *eth,
					  struct iphdr **ipp, int udp)
{
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = (void *)(eth + 1);
	__u32 tot;

	if ((void *)(ip + 1) > end || *(__u8 *)ip != 0x45 ||
	    (ip->frag_off & bpf_htons(IP_MF_ | IP_OFFSET_)))
		return NULL;
	tot = bpf_ntohs(ip->tot_len);
	if (sizeof(*eth) + tot > skb->len)
		return NULL; /* also tot 0 (BIG TCP): the general path reads it */
	*ipp = ip;
	return fast_ports(ip, sizeof(*ip), tot, end, ip->protocol, udp);
}

/* The same for IPv6: TCP (or UDP) right after the fixed header, a payload
 * length that is not 0 and within the frame. */
static __always_inline __be16 *fast_l4_6(struct __sk_buff *skb, struct ethhdr *eth,
					  struct ipv6hdr **ipp, int udp)
{
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	__u32 plen;

	if ((void *)(ip6 + 1) > end || ip6->version != 6)
		return NULL;
	plen = bpf_ntohs(ip6->payload_len);
	if (!plen || sizeof(*eth) + sizeof(*ip6) + plen > skb->len)
		return NULL;
	*ipp = ip6;
	return fast_ports(ip6, sizeof(*ip6), sizeof(*ip6) + plen, end, ip6->nexthdr, udp);
}

/* After a miss in the confirmed table: asks the family's pending table
 * for the same key at once and leaves what it held in
 * skb->cb[CB_CONFIRMED_MISS] (MISS_CONFIRMED or MISS_BOTH, fast_lookup).
 * Returns NULL, fast_lookup's answer. */
static __always_inline struct conn_entry *fast_missed(struct __sk_buff *skb, void *pending,
						       const void *key)
{
	skb->cb[CB_CONFIRMED_MISS] = bpf_map_lookup_elem(pending, key) ? MISS_CONFIRMED : MISS_BOTH;
	return NULL;
}

/* The confirmed entry of an established connection, for the segment's key
 * reversed (rev, a reply) or as read; NULL when it is not that. udp (a
 * constant): a UDP datagram of a confirmed stream (CS_UDP_STREAM, where no
 * packet moves the state) is one too. When the key was looked up and the
 * confirmed table has no entry, the pending table is asked at once, with
 * the same key, and skb->cb[CB_CONFIRMED_MISS] (the entry point wrote
 * MISS_NONE there) says what it held: MISS_CONFIRMED (the general path then
 * looks in the pending table only) or MISS_BOTH (it looks in neither:
 * pkt.confirmed_miss, conn_lookup). The general path would ask the pending
 * table anyway, a parse later; asked here, right after the confirmed
 * table, a new connection's two misses of cold buckets cost ~100 ns less
 * in lh_uplink (docs/bench-lab.md, fifth round) -- measured, and
 * consistent with the CPU overlapping the two loads. An established
 * connection's packet (a hit) pays nothing more. In the packet, not a
 * return code: one more value to carry made clang keep the fast path's
 * entry pointer on the stack, ~24 ns per reply. */
static __always_inline struct conn_entry *fast_lookup(struct __sk_buff *skb, struct ethhdr *eth,
						       __u16 zone, int rev, int udp)
{
	struct conn_entry *e = NULL;
	__be16 *ports;
	__u8 proto;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct conn_key4 k = { .zone = zone };
		struct iphdr *ip = NULL;

		ports = fast_l4_4(skb, eth, &ip, udp);
		if (!ports || !ip)
			return NULL;
		k.proto = proto = ip->protocol;
		k.saddr = rev ? ip->daddr : ip->saddr;
		k.daddr = rev ? ip->saddr : ip->daddr;
		k.sport = rev ? ports[1] : ports[0];
		k.dport = rev ? ports[0] : ports[1];
		e = bpf_map_lookup_elem(&lh_conns4, &k);
		if (!e)
			return fast_missed(skb, &lh_pending4, &k);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct conn_key k = { .family = FAMILY_V6, .zone = zone };
		struct ipv6hdr *ip6 = NULL;

		ports = fast_l4_6(skb, eth, &ip6, udp);
		if (!ports || !ip6)
			return NULL;
		k.proto = proto = ip6->nexthdr;
		__builtin_memcpy(k.saddr, rev ? &ip6->daddr : &ip6->saddr, 16);
		__builtin_memcpy(k.daddr, rev ? &ip6->saddr : &ip6->daddr, 16);
		k.sport = rev ? ports[1] : ports[0];
		k.dport = rev ? ports[0] : ports[1];
		e = bpf_map_lookup_elem(&lh_conns, &k);
		if (!e)
			return fast_missed(skb, &lh_pending, &k);
	} else {
		return NULL;
	}
	if (e->state != (proto == IPPROTO_TCP ? CS_TCP_ESTABLISHED : CS_UDP_STREAM))
		return NULL;
	return e;
}

static __always_inline __u32 fast_settings(void)
{
	__u32 zero = 0;
	struct lh_settings *s = bpf_map_lookup_elem(&lh_settings, &zero);

	return s ? s->flags : 0;
}

/* The hop descriptor of a reply's entry (F_ENTRY_HOP_EXT: a tunnel endpoint
 * or an MPLS stack) when the reply can follow it, with encap_hop_of's checks:
 * there, a kind this code pushes, an MPLS reply one frame, its endpoint not
 * marked down (asked only while F_SET_ENDPOINTS_DOWN says a record exists: a
 * global function's call). NULL: the general path takes the reply, and
 * counts why. */
static __always_inline struct hop_desc *fast_hop(const struct __sk_buff *skb,
						 const struct conn_entry *e, __u32 settings)
{
	struct hop_desc *d = hop_desc_of(e);

	if (!d || encap_hop_usable(skb, d))
		return NULL;
	if ((settings & F_SET_ENDPOINTS_DOWN) && endpoint_unreachable(d))
		return NULL;
	return d;
}

/* lh_vmport's common case: a reply of an established connection whose last
 * hop is a MAC and tags, or a hop descriptor (a VXLAN/Geneve endpoint, an
 * MPLS stack: encap_apply), on an uplink that is up and not an L3 link, from
 * a bridged VM port whose guest's MAC is known. Returns the verdict, or
 * FAST_NONE. */
static __always_inline int fast_reply(struct __sk_buff *skb, const struct iface_cfg *cfg)
{
	struct ethhdr *eth = eth_of(skb);
	struct hop_desc *d = NULL;
	struct conn_entry *e;
	struct iface_cfg *up;
	__u32 settings, ifindex;
	int fast, ret, err;

	if (!eth || skb->vlan_present ||
	    (cfg->flags & (F_IFACE_VM_MAC | F_IFACE_ROUTED)) != F_IFACE_VM_MAC)
		return FAST_NONE;
	e = fast_lookup(skb, eth, cfg->zone, 1, 1);
	if (!e || !(e->flags & F_ENTRY_HOP_KNOWN))
		return FAST_NONE;
	settings = fast_settings();
	if (settings & F_SET_HOPS_MOVED)
		return FAST_NONE; /* failover_follow may move the hop */
	ifindex = e->ifindex;
	up = iface_get(ifindex, ROLE_UPLINK);
	if (!up || (up->flags & F_IFACE_LINK_DOWN) || up->link_kind == LINK_L3)
		return FAST_NONE;
	if (e->flags & F_ENTRY_HOP_EXT) {
		d = fast_hop(skb, e, settings);
		if (!d)
			return FAST_NONE;
	}
	/* vm_fast_eligible, bridged: this port's guest answered */
	fast = !e->vm_ifindex && (settings & F_SET_FAST_PATH) &&
	       mac_equal(eth->h_source, cfg->vm_mac);
	__builtin_memcpy(eth->h_dest, e->mac, ETH_ALEN);
	if (d && d->kind == HOP_MPLS && !e->vlan_count)
		err = encap_mpls_fast(skb, encap_hop_id(e)); /* no tags: inline */
	else if (d && (d->kind == HOP_MPLS || d->opt_len))
		err = encap_reply(skb, encap_hop_id(e), encap_vlan(e)); /* global: see there */
	else if (d)
		err = encap_tunnel_fast(skb, encap_hop_id(e), encap_vlan(e));
	else
		err = e->vlan_count ? rewrite_vlan(skb, e) : 0;
	if (err) {
		count(cfg->slot, -err);
		trace_fast();
		return TC_ACT_OK;
	}
	e->last_seen = now32();
	e->replies++;
	trace_redirect(ifindex);
	trace_tunnel(skb);
	ret = bpf_redirect(ifindex, 0);
	if (fast) {
		e->vm_ifindex = skb->ifindex;
		e->flags |= F_ENTRY_VM_FAST;
	}
	count(cfg->slot, CNT_REDIRECTED);
	if (d)
		count(cfg->slot, CNT_ENCAP_REDIRECTED);
	trace_fast();
	return ret;
}

/* Routed host: does the host's own neighbour entry for a request's
 * destination (the VM's address: the IP header at l3_off, of family family)
 * name VM port vm_ifindex's guest? The lookup is the one the kernel makes
 * for the request: from the uplink it came in on. So a guest that answers
 * from an address the host routes to another guest takes no connection.
 * A global function: its 64-byte lookup stays off its callers' stacks.
 * Returns 1 when it does. */
__noinline int vm_neigh_is(struct __sk_buff *skb, __u32 vm_ifindex, __u32 l3_off, __u32 family)
{
	struct iface_cfg *vm = iface_get(vm_ifindex, ROLE_VM_PORT);
	struct bpf_fib_lookup fib = {};
	__u8 dmac[8] __attribute__((aligned(8))); /* mac_equal reads words: not from fib */

	if (!skb || !vm)
		return 0;
	fib.ifindex = skb->ifindex;
	if (family == FAMILY_V4) {
		fib.family = AF_INET_;
		if (bpf_skb_load_bytes(skb, l3_off + offsetof(struct iphdr, daddr), &fib.ipv4_dst,
				       sizeof(fib.ipv4_dst)))
			return 0;
	} else {
		fib.family = AF_INET6_;
		if (bpf_skb_load_bytes(skb, l3_off + offsetof(struct ipv6hdr, daddr), fib.ipv6_dst,
				       sizeof(fib.ipv6_dst)))
			return 0;
	}
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	__builtin_memcpy(dmac, fib.dmac, ETH_ALEN);
	return mac_equal(dmac, vm->vm_mac);
}

/* A request of entry e (F_ENTRY_VM_FAST: its VM has answered) straight to
 * that VM's port, skipping the bridge (and, on a routed host, the routing)
 * -- but only when the frame is addressed as the kernel would forward it:
 * to that port's guest (bridged) or to this uplink (up, routed), so no VM
 * can claim another's connection; on a routed host, the first request that
 * takes the shortcut (F_ENTRY_VM_NEIGH) also checks that the host routes
 * the address to that guest (vm_neigh_is): once per connection, and never
 * for a connection that sends one request (its answer does not check). The
 * frame's IP header at l3_off, tags tags. Returns the redirect's verdict;
 * FAST_PASS when the kernel is to forward it (a routed frame too big for
 * the VM's link, or one the rewrite refused: a TTL run out); FAST_NONE,
 * nothing changed, when the shortcut no longer applies. lh_uplink's general
 * path (uplink_fast) and fast path (fast_refresh) both send with it. */
static __always_inline int vm_fast_send(struct __sk_buff *skb, const struct ethhdr *eth,
					struct conn_entry *e, const struct iface_cfg *up,
					__u32 settings, __u32 l3_off, __u32 family, __u32 tags)
{
	__u32 vm = e->vm_ifindex, mtu = 0;
	struct iface_cfg *vmc = iface_get(vm, ROLE_VM_PORT);
	int routed, ret;

	if (!vmc || !(settings & F_SET_FAST_PATH) ||
	    (vmc->flags & (F_IFACE_VM_DOWN | F_IFACE_VM_MAC)) != F_IFACE_VM_MAC)
		return FAST_NONE;
	routed = vmc->flags & F_IFACE_ROUTED;
	if (!mac_equal(eth->h_dest, routed ? up->mac : vmc->vm_mac))
		return FAST_NONE;
	if (routed && bpf_check_mtu(skb, vm, &mtu, 0, BPF_MTU_CHK_SEGS))
		return FAST_PASS;
	if (routed && (e->flags & F_ENTRY_VM_NEIGH)) {
		if (!vm_neigh_is(skb, vm, l3_off, family))
			return FAST_NONE;
		e->flags &= ~F_ENTRY_VM_NEIGH;
	}
	ret = send_to_vm_at(skb, vm, l3_off, family, tags); /* bridged: the MAC is already there */
	return ret < 0 ? FAST_PASS : ret;
}

/* lh_uplink's common case: a request of an established connection (or of
 * a confirmed UDP stream) from the same last hop (MAC, no tags) on an
 * Ethernet uplink with no list of last hops, that goes on as it came (no VM
 * holds it) or straight to the VM that answered it (vm_fast_send). One
 * lookup: the general path, which would look the entry up again, sees only
 * what this one declines. Returns the verdict, or FAST_NONE. */
static __always_inline int fast_refresh(struct __sk_buff *skb, const struct iface_cfg *cfg)
{
	struct ethhdr *eth = eth_of(skb);
	struct conn_entry *e;
	__u32 settings;
	int ret = TC_ACT_OK;

	if (!eth || skb->vlan_present || cfg->link_kind != LINK_ETHERNET ||
	    (cfg->flags & (F_IFACE_HOPS_ALLOW | F_IFACE_HOPS_DENY)) || (eth->h_dest[0] & 1))
		return FAST_NONE;
	e = fast_lookup(skb, eth, cfg->zone, 0, 1);
	if (!e || e->ifindex != skb->ifindex || e->vlan_count || e->vlan_tci[0] ||
	    e->vlan_tci[1] ||
	    (e->flags & (F_ENTRY_HOP_KNOWN | F_ENTRY_HOP_EXT)) != F_ENTRY_HOP_KNOWN ||
	    (e->vm_ifindex && !(e->flags & F_ENTRY_VM_FAST)) || !mac_equal(e->mac, eth->h_source))
		return FAST_NONE;
	settings = fast_settings();
	if (settings & F_SET_SYNC)
		return FAST_NONE; /* its refresh record needs the full key: the general path */
	if (e->vm_ifindex) {
		ret = vm_fast_send(skb, eth, e, cfg, settings, sizeof(*eth),
				   eth->h_proto == bpf_htons(ETH_P_IP) ? FAMILY_V4 : FAMILY_V6, 0);
		if (ret == FAST_NONE)
			return FAST_NONE; /* the general path forgets the shortcut */
	}
	e->last_seen = now32();
	e->packets++;
	count(cfg->slot, CNT_REFRESHED);
	if (ret >= 0 && e->vm_ifindex)
		count(cfg->slot, CNT_FAST_TO_VM);
	trace_fast();
	return ret >= 0 ? ret : TC_ACT_OK;
}
