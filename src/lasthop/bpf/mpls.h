/* mpls.h: MPLS on Ethernet uplinks (link_kind LINK_MPLS) -- the label stack a
 * request arrived under, learned as a hop descriptor (kind HOP_MPLS) and put
 * back on the reply.
 *
 * tc cannot take labels off: bpf_skb_adjust_room refuses an skb whose
 * protocol is not IPv4/IPv6 and bpf_skb_change_proto converts only v4 <-> v6
 * (net/core/filter.c), and this kernel has no act_mpls. So the uplink gets an
 * XDP program too, lh_uplink_mpls (mpls_pop): it takes the stack off the
 * frame and puts it in the frame's metadata (struct mpls_meta), which the
 * kernel hands to tc with the skb (skb->data_meta; generic XDP and veth's
 * native XDP both set it). lh_uplink then learns it (mpls_learn). The reply
 * (lh_vmport) gets the stack back by mpls_push, called by encap_reply: room
 * at the head (bpf_skb_change_head), the Ethernet addresses moved to it.
 *
 * TTL, the uniform model of RFC 3443 (Linux's default, net.mpls.ip_ttl_propagate
 * = 1): taking the stack off, the IP TTL becomes the top label's when that is
 * lower (never higher: a pipe-model peer's 255 leaves it alone); putting it
 * back, every label's TTL is the reply's IP TTL (after a routed host's - 1).
 * The TC bits are kept as learned, the bottom-of-stack bit is set on the
 * last label only. */
#pragma once

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/mpls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "encap.h"

#define MPLS_LSE_LEN 4  /* bytes of one label stack entry */
#define MPLS_KEEP    (MPLS_LS_LABEL_MASK | MPLS_LS_TC_MASK) /* what a descriptor keeps of an entry */

_Static_assert(sizeof(struct mpls_meta) % 4 == 0 && sizeof(struct mpls_meta) <= 32,
	       "bpf_xdp_adjust_meta takes up to 32 bytes, in 4-byte steps");

/* IPv4 TTL := ttl, the header checksum patched (RFC 1624 eqn. 3: the 16-bit
 * word holding TTL and protocol changes). */
static __always_inline void mpls_set_ttl4(struct iphdr *ip, __u8 ttl)
{
	__u16 old = *(__u16 *)&ip->ttl, new;
	__u32 sum;

	ip->ttl = ttl;
	new = *(__u16 *)&ip->ttl;
	sum = (__u16)~ip->check + (__u16)~old + new;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip->check = ~sum;
}

/* XDP, an uplink's frame: an MPLS unicast frame (Ethernet, up to
 * MAX_VLAN_TAGS tags in the data, 0x8847) with 1..MAX_MPLS_LABELS labels above
 * IPv4 or IPv6 loses its labels -- the Ethernet header (and tags) moved up to
 * the IP header, its type the IP version's -- and gets them in its metadata.
 * Returns CNT_MPLS_POPPED; 0 for a frame that is not MPLS (untouched,
 * uncounted: lh_uplink counts it); or a negative reason, the frame unchanged:
 * -CNT_MPLS_MALFORMED (truncated stack or IP header), -CNT_ENCAP_UNSUPPORTED
 * (more labels than MAX_MPLS_LABELS, neither IPv4 nor IPv6 under them, or
 * no room for metadata: a driver without it). */
static __always_inline int mpls_pop(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct mpls_meta m = { .magic = MPLS_META_MAGIC };
	struct ethhdr *eth = data;
	__u32 l2 = sizeof(*eth), n = 0, lse = 0, shift;
	__u16 *type, *from, *to;
	__be16 proto;
	__u8 *inner;

	if ((void *)(eth + 1) > end)
		return 0;
	type = data + offsetof(struct ethhdr, h_proto);
#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		if (*type != bpf_htons(ETH_P_8021Q) && *type != bpf_htons(ETH_P_8021AD_))
			break;
		if (data + l2 + 4 > end)
			return 0; /* a truncated tag: lh_uplink's to count */
		type = data + l2 + 2;
		l2 += 4;
	}
	if (*type != bpf_htons(ETH_P_MPLS_UC))
		return 0;
#pragma unroll
	for (int i = 0; i < MAX_MPLS_LABELS; i++) {
		__be32 *e = data + l2 + i * MPLS_LSE_LEN;

		if ((void *)(e + 1) > end)
			return -CNT_MPLS_MALFORMED;
		lse = bpf_ntohl(*e);
		m.lse[i] = lse;
		n = i + 1;
		if (lse & MPLS_LS_S_MASK)
			break;
	}
	if (!(lse & MPLS_LS_S_MASK)) /* no bottom of stack in MAX_MPLS_LABELS entries */
		return data + l2 + (MAX_MPLS_LABELS + 1) * MPLS_LSE_LEN > end ? -CNT_MPLS_MALFORMED
									  : -CNT_ENCAP_UNSUPPORTED;
	m.count = n;
	shift = n * MPLS_LSE_LEN;
	inner = data + l2 + shift;
	if ((void *)(inner + 1) > end)
		return -CNT_MPLS_MALFORMED;
	if (*inner >> 4 == 4) {
		struct iphdr *ip = (void *)inner;

		if ((void *)(ip + 1) > end)
			return -CNT_MPLS_MALFORMED;
		proto = bpf_htons(ETH_P_IP);
	} else if (*inner >> 4 == 6) {
		struct ipv6hdr *ip6 = (void *)inner;

		if ((void *)(ip6 + 1) > end)
			return -CNT_MPLS_MALFORMED;
		proto = bpf_htons(ETH_P_IPV6);
	} else {
		return -CNT_ENCAP_UNSUPPORTED; /* a pseudowire, or anything else */
	}
	/* room for the metadata first: nothing is changed when a driver has none */
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(m)))
		return -CNT_ENCAP_UNSUPPORTED;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	/* uniform model: the IP TTL no higher than the top label's */
	inner = data + l2 + shift;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)inner;

		if ((void *)(ip + 1) > end)
			return -CNT_MPLS_MALFORMED; /* (checked above: for the verifier) */
		if ((m.lse[0] & 0xff) < ip->ttl)
			mpls_set_ttl4(ip, m.lse[0] & 0xff);
	} else {
		struct ipv6hdr *ip6 = (void *)inner;

		if ((void *)(ip6 + 1) > end)
			return -CNT_MPLS_MALFORMED;
		if ((m.lse[0] & 0xff) < ip6->hop_limit)
			ip6->hop_limit = m.lse[0] & 0xff;
	}
	/* the Ethernet header and tags move up to the IP header, last byte first
	 * (the ranges overlap), in 2-byte steps: l2 is 14, 18 or 22 */
	from = data;
	to = data + shift;
#pragma unroll
	for (int i = (sizeof(*eth) + MAX_VLAN_TAGS * 4) / 2 - 1; i >= 0; i--) {
		if (i >= l2 / 2)
			continue;
		if ((void *)(to + i + 1) > end)
			return -CNT_MPLS_MALFORMED; /* (checked above: for the verifier) */
		to[i] = from[i];
	}
	to[l2 / 2 - 1] = proto;
	/* the moved-from bytes leave the frame; the metadata moves with its start */
	if (bpf_xdp_adjust_head(ctx, shift))
		return -CNT_MPLS_MALFORMED; /* cannot happen: an IP header follows */
	data = (void *)(long)ctx->data;
	struct mpls_meta *meta = (void *)(long)ctx->data_meta;

	if ((void *)(meta + 1) > data)
		return -CNT_ENCAP_UNSUPPORTED;
	meta->magic = m.magic;
#pragma unroll
	for (int i = 0; i < MAX_MPLS_LABELS; i++)
		meta->lse[i] = m.lse[i];
	meta->count = m.count;
	meta->reserved[0] = meta->reserved[1] = meta->reserved[2] = 0;
	return CNT_MPLS_POPPED;
}

/* tc, an MPLS uplink's request: the stack lh_uplink_mpls left in the frame's
 * metadata, as a descriptor (kind HOP_MPLS; label and TC of each entry, the
 * request's tags from *tags) resolved to its id, which replaces the tags in
 * *tags (low half first). Returns 1 when it learned one, 0 when the frame
 * brought none (not MPLS), or a negative reason to pass with. */
static __always_inline int mpls_learn(struct __sk_buff *skb, __u32 *tags)
{
	struct mpls_meta *m = (void *)(long)skb->data_meta;
	__u32 zero = 0, id = 0, n;
	struct hop_desc *d;
	int err;

	if ((void *)(m + 1) > (void *)(long)skb->data || m->magic != MPLS_META_MAGIC)
		return 0;
	n = m->count;
	if (n < 1 || n > MAX_MPLS_LABELS)
		return -CNT_ENCAP_UNSUPPORTED;
	d = bpf_map_lookup_elem(&lh_hop_scratch, &zero);
	if (!d)
		return -CNT_ENCAP_UNSUPPORTED;
	__builtin_memset(d, 0, sizeof(*d));
	d->kind = HOP_MPLS;
	d->mpls_count = n;
#pragma unroll
	for (int i = 0; i < MAX_MPLS_LABELS; i++)
		if (i < n)
			d->mpls[i] = m->lse[i] & MPLS_KEEP;
	__builtin_memcpy(d->vlan_tci, tags, sizeof(d->vlan_tci));
	err = hop_desc_resolve(d, &id);
	if (err)
		return err;
	*tags = id;
	return 1;
}

/* Uplink (not an L3 link): a request's hop descriptor, a tunnel's
 * (encap_learn) or an MPLS stack's (mpls_learn), its id in the tags' place:
 * *tags is the request's p->vlan_tci seen as one word. Returns 1 when it
 * learned one (the caller sets p->hop_ext), 0 on a plain Ethernet uplink,
 * or a negative reason to pass with. A global function, verified once: off
 * lh_uplink's paths and its stack (inlined, the tunnel key's 44 bytes and
 * these branches were lh_uplink's). */
__noinline int hop_learn(struct __sk_buff *skb, __u32 *tags)
{
	struct iface_cfg *cfg;

	if (!skb || !tags)
		return 0;
	cfg = iface_get(skb->ifindex, ROLE_UPLINK);
	if (!cfg)
		return 0;
	if (cfg->link_kind == LINK_MPLS)
		return mpls_learn(skb, tags);
	return encap_learn(skb, cfg, tags);
}

_Static_assert(MAX_MPLS_LABELS == 3, "__mpls_push takes three entries");

/* Label stack entry i of n as a reply pushes it, host order, TTL not yet
 * in: label and TC as learned, the bottom-of-stack bit on the last entry
 * only. 0 past n. */
static __always_inline __u32 mpls_word(__u32 lse, __u32 i, __u32 n)
{
	if (i >= n)
		return 0;
	return (lse & MPLS_KEEP) | (i == n - 1 ? MPLS_LS_S_MASK : 0);
}

/* The reply of an MPLS hop: its entries w0, w1, w2 (mpls_word: the first
 * with the bottom-of-stack bit is the last one pushed, so the count needs
 * no register of its own across the helper's call) pushed under the
 * Ethernet header -- room made at the head (bpf_skb_change_head: 44-46 ns
 * here, where bpf_skb_adjust_room at the MAC header took 107-110,
 * docs/datapath.md), the Ethernet addresses moved to the new start, type
 * 0x8847 and the entries written after them: each entry's TTL the IP
 * header's. The entries, the type and the TTL are read and written in
 * place, after the helper's call (the headers are in the linear part). The
 * kernel's MAC header is then the frame's first 4n + 14 bytes and its
 * network header still the IP header: tc pushes all of it back before the
 * redirect (skb->mac_len, sch_handle_ingress). A frame whose Ethernet type
 * is not its protocol (a tag in the data) is not one this pushes. Called
 * before the tags go on (pushed as skb metadata, then in front of the type
 * as the kernel inserts them). Returns 0 or a negative reason
 * (-CNT_ENCAP_UNSUPPORTED before anything changes). */
static __always_inline int __mpls_push(struct __sk_buff *skb, __u32 w0, __u32 w1, __u32 w2)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 shift, ttl;
	__u32 *to, *from;
	__be32 *lse;
	__u8 *at;

	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return -CNT_ENCAP_UNSUPPORTED;
	if ((void *)(eth + 1) > end || eth->h_proto != skb->protocol)
		return -CNT_ENCAP_UNSUPPORTED;
	if (w0 & MPLS_LS_S_MASK)
		shift = MPLS_LSE_LEN;
	else if (w1 & MPLS_LS_S_MASK)
		shift = 2 * MPLS_LSE_LEN;
	else if (w2 & MPLS_LS_S_MASK)
		shift = 3 * MPLS_LSE_LEN;
	else
		return -CNT_ENCAP_UNSUPPORTED; /* no last entry: not a stack mpls_word made */
	if (bpf_skb_change_head(skb, shift, 0))
		return -CNT_REWRITE_FAILED;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	eth = data;
	to = data;
	from = data + shift;
	lse = data + sizeof(*eth);
	at = data + sizeof(*eth) + shift + (skb->protocol == bpf_htons(ETH_P_IP)
					    ? offsetof(struct iphdr, ttl)
					    : offsetof(struct ipv6hdr, hop_limit));
	/* the addresses, the entries and the TTL after them (an IP header
	 * follows the room: never short) */
	if ((void *)(from + 3) > end || (void *)(lse + MAX_MPLS_LABELS) > end ||
	    (void *)(at + 1) > end)
		return -CNT_REWRITE_FAILED;
	/* the 12 bytes of addresses, 4n bytes to the front, first word first
	 * (each word read before the ones after it are written) */
	to[0] = from[0];
	to[1] = from[1];
	to[2] = from[2];
	ttl = *at;
	lse[0] = bpf_htonl(w0 | ttl);
	if (!(w0 & MPLS_LS_S_MASK)) {
		lse[1] = bpf_htonl(w1 | ttl);
		if (!(w1 & MPLS_LS_S_MASK))
			lse[2] = bpf_htonl(w2 | ttl);
	}
	eth->h_proto = bpf_htons(ETH_P_MPLS_UC);
	return 0;
}

/* The reply of an MPLS hop: the stack of its descriptor, copied into *r
 * (hop_desc_copy), pushed (__mpls_push). Returns 0 or a negative reason
 * (-CNT_ENCAP_UNSUPPORTED before anything changes). */
static __always_inline int mpls_push(struct __sk_buff *skb, const struct hop_reply *r)
{
	__u32 n = r->mpls_count;

	if (n < 1 || n > MAX_MPLS_LABELS)
		return -CNT_ENCAP_UNSUPPORTED;
	return __mpls_push(skb, mpls_word(r->lse[0], 0, n), mpls_word(r->lse[1], 1, n),
			   mpls_word(r->lse[2], 2, n));
}
