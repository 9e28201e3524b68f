/* rewrite.h: sending a reply back to its last hop: MACs, TTL, VLAN tags, redirect. */
#pragma once

#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "parse.h"
#include "maps.h"
#include "encap.h"
#include "mpls.h"

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

/* Routed hop: TTL or hop limit minus one, IPv4 checksum patched incrementally
 * (RFC 1624, as the kernel's ip_decrease_ttl does). The IP header is found
 * by its offset (p->l3_off), not by p->l3: a global function given the
 * packet as memory has offsets, not pointers. Returns 0, or
 * -CNT_TTL_EXPIRED when the kernel must answer instead. */
static __always_inline int rewrite_ttl(struct __sk_buff *skb, const struct pkt *p)
{
	void *data_end = (void *)(long)skb->data_end;
	void *l3 = (void *)(long)skb->data;
	__u32 off = p->l3_off;

	asm volatile("" : "+r"(off)); /* checked here, where it is used: the verifier must see it */
	if (off > PULL_LEN) /* it lies in what parse_packet pulls */
		return -CNT_MALFORMED;
	l3 += off;
	if (p->key.family == FAMILY_V4) {
		struct iphdr *ip = l3;
		__u32 check;

		if ((void *)(ip + 1) > data_end)
			return -CNT_MALFORMED;
		if (ip->ttl <= 1)
			return -CNT_TTL_EXPIRED;
		check = ip->check;
		check += bpf_htons(0x0100);
		ip->check = (__u16)(check + (check >= 0xFFFF));
		ip->ttl--;
	} else {
		struct ipv6hdr *ip6 = l3;

		if ((void *)(ip6 + 1) > data_end)
			return -CNT_MALFORMED;
		if (ip6->hop_limit <= 1)
			return -CNT_TTL_EXPIRED;
		ip6->hop_limit--;
	}
	return 0;
}

/* Puts back count tags (tci0 outer, tci1 inner; outer_ad: the outer one is
 * 802.1ad), inner first so the outer ends up outermost. Returns 0 or
 * -CNT_REWRITE_FAILED. */
static __always_inline int rewrite_tags(struct __sk_buff *skb, __u8 count, int outer_ad,
					__u16 tci0, __u16 tci1)
{
	__u16 outer = outer_ad ? ETH_P_8021AD_ : ETH_P_8021Q;

	if (count >= 2 && bpf_skb_vlan_push(skb, bpf_htons(ETH_P_8021Q), tci1))
		return -CNT_REWRITE_FAILED;
	if (count >= 1 && bpf_skb_vlan_push(skb, bpf_htons(outer), tci0))
		return -CNT_REWRITE_FAILED;
	return 0;
}

/* Puts back the tags the request carried (the entry's). */
static __always_inline int rewrite_vlan(struct __sk_buff *skb, const struct conn_entry *e)
{
	return rewrite_tags(skb, e->vlan_count, e->flags & F_ENTRY_OUTER_8021AD, e->vlan_tci[0],
			    e->vlan_tci[1]);
}

/* An entry's tags as encap_reply takes them: vlan_count | outer 802.1ad << 8. */
static __always_inline __u32 encap_vlan(const struct conn_entry *e)
{
	return e->vlan_count | !!(e->flags & F_ENTRY_OUTER_8021AD) << 8;
}

/* The reply of an entry whose hop is the descriptor *id* names (its
 * vlan_tci, F_ENTRY_HOP_EXT), vlan: the entry's vlan_count |
 * F_ENTRY_OUTER_8021AD's bit << 8. What the hop needs is copied out of its
 * slot, the slot's generation checked before and after (hop_desc_copy: a
 * slot swept or claimed for another hop since the caller's check is
 * -CNT_HOP_DESC_GONE, nothing changed by this), then the tunnel key (and
 * options) set or the labels pushed, then the tags (the descriptor holds
 * them: the entry's vlan_tci holds the id), all from the copy. Returns 0 or
 * a negative reason. A global function, verified once: inlined in the
 * general path, it doubled every state of lh_vmport's many ways to a reply
 * past the verifier's 1,000,000 insns; the fast path calls it too (the
 * copy and the push, inlined, took lh_vmport's stack past what the chain of
 * calls below the general path leaves). */
__noinline int encap_reply(struct __sk_buff *skb, __u32 id, __u32 vlan)
{
	struct hop_reply r;
	int err;

	if (!skb)
		return -CNT_REWRITE_FAILED;
	err = hop_desc_copy(id, &r);
	if (err)
		return err;
	if (r.kind == HOP_MPLS)
		err = mpls_push(skb, &r); /* before the tags: they go outside the labels */
	else
		err = encap_set_tunnel(skb, &r);
	if (err)
		return err;
	return rewrite_tags(skb, vlan & 0xff, vlan >> 8 & 1, r.vlan_tci[0], r.vlan_tci[1]);
}

/* The fast path's reply to a tunnel hop without options (VXLAN), inline:
 * encap_reply's copy and re-check with only the key (on lh_vmport's stack,
 * where an options copy would not fit) and the tags, no global call.
 * Returns 0 or a negative reason (a hop with options or of another kind by
 * now: gone, as its generation moved). */
static __always_inline int encap_tunnel_fast(struct __sk_buff *skb, __u32 id, __u32 vlan)
{
	struct bpf_tunnel_key key = {};
	struct hop_desc *d;
	__u64 gen = 0;
	__u8 kind, opts;
	__u32 tags;

	d = hop_copy_begin(id, &gen);
	if (!d)
		return -CNT_HOP_DESC_GONE;
	kind = d->kind;
	opts = d->opt_len;
	hop_key_fill(d, kind, &key);
	tags = d->vlan_tci[0] | (__u32)d->vlan_tci[1] << 16;
	if (!hop_gen_same(d, gen))
		return -CNT_HOP_DESC_GONE;
	if (opts || (kind != HOP_TUNNEL4 && kind != HOP_TUNNEL6))
		return -CNT_ENCAP_UNSUPPORTED; /* (only a build without the re-check gets here) */
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key),
				   kind == HOP_TUNNEL6 ? BPF_F_TUNINFO_IPV6 : 0))
		return -CNT_REWRITE_FAILED;
	return rewrite_tags(skb, vlan & 0xff, vlan >> 8 & 1, tags & 0xffff, tags >> 16);
}

/* The fast path's reply to an MPLS hop when no tags go on (the entry has
 * none), inline: encap_reply's copy and re-check with only the entries,
 * kept in registers (mpls_word) across the push's helper call rather than
 * on lh_vmport's stack, no global call (10-15 ns: docs/datapath.md). Returns
 * 0 or a negative reason (another kind by now: gone, as its generation
 * moved). */
static __always_inline int encap_mpls_fast(struct __sk_buff *skb, __u32 id)
{
	struct hop_desc *d;
	__u32 n, w0, w1, w2;
	__u64 gen = 0;
	__u8 kind;

	d = hop_copy_begin(id, &gen);
	if (!d)
		return -CNT_HOP_DESC_GONE;
	kind = d->kind;
	n = d->mpls_count;
	w0 = mpls_word(d->mpls[0], 0, n);
	w1 = mpls_word(d->mpls[1], 1, n);
	w2 = mpls_word(d->mpls[2], 2, n);
	if (!hop_gen_same(d, gen))
		return -CNT_HOP_DESC_GONE;
	if (kind != HOP_MPLS)
		return -CNT_ENCAP_UNSUPPORTED; /* (only a build without the re-check gets here) */
	return __mpls_push(skb, w0, w1, w2); /* a count out of 1..3: no last entry, refused */
}

/* A frame for a VM port gets what the bridge would give it: no 802.1Q or
 * 802.1ad tag, neither in the data nor in the skb's VLAN metadata (each
 * bpf_skb_vlan_pop takes the outermost tag off, wherever it is, and moves
 * the next one from the data into the metadata). Returns 0 or
 * -CNT_REWRITE_FAILED. */
static __always_inline int rewrite_untag(struct __sk_buff *skb, const struct pkt *p)
{
#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++)
		if (i < p->vlan_count && bpf_skb_vlan_pop(skb))
			return -CNT_REWRITE_FAILED;
	return 0;
}

/* A packet of an L3 link (no MAC header) for an Ethernet port: the host
 * routes it, so TTL - 1, then an Ethernet header src -> dst in front
 * (bpf_skb_change_head exists for this: an L3 skb redirected into an L2
 * device). Returns 0 or a negative reason to pass with. */
static __always_inline int rewrite_push_eth(struct __sk_buff *skb, struct pkt *p,
					    const __u8 *src, const __u8 *dst)
{
	__u16 proto = p->key.family == FAMILY_V4 ? ETH_P_IP : ETH_P_IPV6;
	struct ethhdr *eth;
	int err = rewrite_ttl(skb, p);

	if (err)
		return err;
	if (bpf_skb_change_head(skb, sizeof(*eth), 0))
		return -CNT_REWRITE_FAILED;
	eth = eth_of(skb);
	if (!eth)
		return -CNT_REWRITE_FAILED;
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	eth->h_proto = bpf_htons(proto);
	return 0;
}

/* Forwarding a frame one hop: destination MAC := dst; on a routed hop also
 * source MAC := src and TTL - 1. Returns 0 or a negative reason to pass with
 * (the TTL check runs before anything is written). */
static __always_inline int rewrite_l2(struct __sk_buff *skb, struct pkt *p, int routed,
				      const __u8 *src, const __u8 *dst)
{
	struct ethhdr *eth = eth_of(skb);
	int err;

	if (!eth)
		return -CNT_MALFORMED;
	if (routed) {
		err = rewrite_ttl(skb, p);
		if (err)
			return err;
		__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	}
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	return 0;
}

/* Sends the packet back the way its connection's request came: destination
 * MAC := last hop (routed: source MAC := uplink's, TTL - 1), tags restored,
 * redirected to the uplink. Returns TC_ACT_REDIRECT, or a negative reason
 * with the packet unchanged (but for the TTL check, which runs first). */
static __always_inline int reply_to_last_hop(struct __sk_buff *skb, struct pkt *p,
					     struct conn_entry *e, const struct iface_cfg *vm)
{
	__u32 ifindex = e->ifindex;
	struct iface_cfg *up = iface_get(ifindex, ROLE_UPLINK);
	int err;

	if (!up)
		return -CNT_MISS; /* the uplink is gone: ordinary routing */
	if (up->flags & F_IFACE_LINK_DOWN)
		return -CNT_HOP_DOWN; /* not into a dead link: ordinary routing, until it returns */
	if (up->link_kind == LINK_L3) {
		/* no MAC on an L3 link: the kernel takes the Ethernet header off
		 * on the redirect (__bpf_redirect_no_mac); the host routes the
		 * reply into the link, so TTL - 1 whatever the VM port */
		err = rewrite_ttl(skb, p);
		if (err)
			return err;
	} else {
		struct hop_desc *d = NULL;

		if ((e->flags & F_ENTRY_HOP_EXT) && !(d = encap_hop_of(skb, e, &err)))
			return err; /* its tunnel hop is gone: unchanged, ordinary routing */
		err = rewrite_l2(skb, p, vm->flags & F_IFACE_ROUTED, up->mac, e->mac);
		if (err)
			return err;
		if (d)
			err = encap_reply(skb, encap_hop_id(e), encap_vlan(e));
		else
			err = rewrite_vlan(skb, e);
		if (err)
			return err;
	}
	/* a connection lives while either side speaks: a stream the VM sends with
	 * nothing coming back must not age out */
	e->last_seen = now32();
	e->replies++;
	trace_redirect(ifindex);
	trace_tunnel(skb);
	return bpf_redirect(ifindex, 0);
}
