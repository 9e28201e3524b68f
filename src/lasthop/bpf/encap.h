/* encap.h: last hops beyond a MAC and tags -- the tunnel key of a VXLAN or
 * Geneve uplink (remote endpoint, VNI, Geneve options), stored once per
 * distinct hop in lh_hop_descs, read on the request and put back on the reply.
 * An entry names its descriptor by id (F_ENTRY_HOP_EXT, the id in vlan_tci):
 * conn_entry stays 40 bytes. */
#pragma once

#include <stddef.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "hash.h"
#include "endpoints.h"

struct bpf_map; /* the kernel's: hop_desc_sweep only passes it on (expire.h declares it) */

#define HOP_DESC_WORDS (offsetof(struct hop_desc, mark) / 4) /* content: hashed and compared */
#define TUNNEL_TTL_    64 /* outer TTL of a reply (IPDEFTTL), as Cilium's encap sets it */

_Static_assert(HOP_DESC_WORDS == 18, "hop_desc_hash mixes 18 words");

/* jhash (lookup3) of a descriptor's 18 content words. */
static __always_inline __u32 hop_desc_hash(const struct hop_desc *d)
{
	const __u32 *w = (const __u32 *)d;
	__u32 a, b, c;

	a = b = c = JHASH_INITVAL + (HOP_DESC_WORDS << 2);
#pragma unroll
	for (int i = 0; i < 15; i += 3) {
		a += w[i];
		b += w[i + 1];
		c += w[i + 2];
		__jhash_mix(a, b, c);
	}
	a += w[15];
	b += w[16];
	c += w[17];
	__jhash_final(a, b, c);
	return c;
}

static __always_inline int hop_desc_equal(const struct hop_desc *x, const struct hop_desc *y)
{
	const __u32 *a = (const __u32 *)x, *b = (const __u32 *)y;
	__u32 diff = 0;

#pragma unroll
	for (int i = 0; i < HOP_DESC_WORDS; i++)
		diff |= a[i] ^ b[i];
	return !diff;
}

/* The mark a descriptor in use carries: the expiry pass under way or next
 * (lh_expire sweeps, after its walk, those no live entry marked). */
static __always_inline __u32 hop_desc_pass(void)
{
	__u32 zero = 0;
	struct expiry_stats *st = bpf_map_lookup_elem(&lh_expiry, &zero);

	return st ? (__u32)st->passes + 1 : 1;
}

/* The id of descriptor *d* in lh_hop_descs, inserted when new: its hash, or
 * one of the next HOP_DESC_PROBES - 1 ids when another hop holds it. A full
 * table refuses the new hop; it never replaces one. Returns 0 or
 * -CNT_HOP_DESC_FULL. */
static __always_inline int hop_desc_resolve(struct hop_desc *d, __u32 *id)
{
	__u32 h = hop_desc_hash(d), mark = hop_desc_pass();
	struct hop_desc *cur;

	d->mark = mark;
#pragma unroll
	for (int i = 0; i < HOP_DESC_PROBES; i++) {
		__u32 k = h + i;

		cur = bpf_map_lookup_elem(&lh_hop_descs, &k);
		if (!cur) {
			if (!bpf_map_update_elem(&lh_hop_descs, &k, d, BPF_NOEXIST)) {
				*id = k;
				return 0;
			}
			cur = bpf_map_lookup_elem(&lh_hop_descs, &k); /* another CPU raced us */
			if (!cur)
				return -CNT_HOP_DESC_FULL;
		}
		if (hop_desc_equal(cur, d)) {
			if (cur->mark != mark)
				cur->mark = mark;
			*id = k;
			return 0;
		}
	}
	return -CNT_HOP_DESC_FULL;
}

/* A tunnel uplink's request: its tunnel key (IPv4 remote, else IPv6) and,
 * on Geneve, its options. Returns 0 or -CNT_ENCAP_UNSUPPORTED (no metadata:
 * not an external-mode device, or options over GENEVE_OPT_MAX). */
static __always_inline int encap_read_tunnel(struct __sk_buff *skb, const struct iface_cfg *cfg,
					     struct hop_desc *d)
{
	struct bpf_tunnel_key key = {};
	int n;

	if (!bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0)) {
		d->kind = HOP_TUNNEL4;
		d->remote[0] = key.remote_ipv4;
	} else if (!bpf_skb_get_tunnel_key(skb, &key, sizeof(key), BPF_F_TUNINFO_IPV6)) {
		d->kind = HOP_TUNNEL6;
		__builtin_memcpy(d->remote, key.remote_ipv6, sizeof(d->remote));
	} else {
		return -CNT_ENCAP_UNSUPPORTED;
	}
	d->vni = key.tunnel_id;
	if (cfg->link_kind != LINK_GENEVE)
		return 0;
	n = bpf_skb_get_tunnel_opt(skb, d->opts, sizeof(d->opts));
	if (n == -ENOENT_)
		return 0; /* no options */
	if (n < 0 || n > GENEVE_OPT_MAX)
		return -CNT_ENCAP_UNSUPPORTED;
	d->opt_len = n;
	return 0;
}

/* Uplink: a request's hop descriptor, when its link is a tunnel. Its id takes
 * the tags' place in *tags (the request's p->vlan_tci seen as one word; the
 * tags go into the descriptor), so conn_set_hop/conn_hop_same store and
 * compare it as they do tags. Returns 1 when it learned one, 0 when the link
 * is no tunnel, or a negative reason to pass with. */
static __always_inline int encap_learn(struct __sk_buff *skb, const struct iface_cfg *cfg,
				       __u32 *tags)
{
	__u32 zero = 0, id = 0;
	struct hop_desc *d;
	int err;

	if (cfg->link_kind != LINK_VXLAN && cfg->link_kind != LINK_GENEVE)
		return 0;
	d = bpf_map_lookup_elem(&lh_hop_scratch, &zero);
	if (!d)
		return -CNT_ENCAP_UNSUPPORTED;
	__builtin_memset(d, 0, sizeof(*d));
	err = encap_read_tunnel(skb, cfg, d);
	if (err)
		return err;
	if (!endpoint_trusted(d, skb->ifindex))
		return -CNT_HOP_UNTRUSTED; /* an endpoint the uplink's list refuses */
	__builtin_memcpy(d->vlan_tci, tags, sizeof(d->vlan_tci));
	err = hop_desc_resolve(d, &id);
	if (err)
		return err;
	*tags = id; /* low half first: vlan_tci[0] */
	return 1;
}

/* The tunnel key (and Geneve options) of descriptor d on the reply: the
 * device it is redirected to encapsulates with them. */
static __always_inline int encap_set_tunnel(struct __sk_buff *skb, const struct hop_desc *d)
{
	struct bpf_tunnel_key key = {};
	__u64 flags = 0;
	__u32 len = d->opt_len;

	key.tunnel_id = d->vni;
	key.tunnel_ttl = TUNNEL_TTL_;
	if (d->kind == HOP_TUNNEL6) {
		__builtin_memcpy(key.remote_ipv6, d->remote, sizeof(key.remote_ipv6));
		flags = BPF_F_TUNINFO_IPV6;
	} else {
		key.remote_ipv4 = d->remote[0];
	}
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), flags))
		return -CNT_REWRITE_FAILED;
	if (len > GENEVE_OPT_MAX)
		return -CNT_REWRITE_FAILED;
	if (len && bpf_skb_set_tunnel_opt(skb, (void *)d->opts, len))
		return -CNT_REWRITE_FAILED;
	return 0;
}

/* The id of the descriptor an entry with F_ENTRY_HOP_EXT names (in its vlan_tci). */
static __always_inline __u32 encap_hop_id(const struct conn_entry *e)
{
	return e->vlan_tci[0] | (__u32)e->vlan_tci[1] << 16;
}

/* Whether the reply skb can follow descriptor d, its endpoint aside: a
 * kind this code pushes, and an MPLS hop's reply one frame (mpls.h).
 * Returns 0 or a negative reason. */
static __always_inline int encap_hop_usable(const struct __sk_buff *skb, const struct hop_desc *d)
{
	if (d->kind == HOP_MPLS && skb->gso_size)
		return -CNT_MPLS_GSO;
	if (d->kind != HOP_TUNNEL4 && d->kind != HOP_TUNNEL6 && d->kind != HOP_MPLS)
		return -CNT_ENCAP_UNSUPPORTED;
	return 0;
}

/* The descriptor an entry with F_ENTRY_HOP_EXT names, if the reply skb can
 * follow it: looked up before the reply is touched, so a reply that cannot
 * passes unchanged (encap_hop_usable; its endpoint unreachable:
 * endpoints.h). Returns NULL with *err set otherwise. */
static __always_inline struct hop_desc *encap_hop_of(const struct __sk_buff *skb,
						     const struct conn_entry *e, int *err)
{
	__u32 id = encap_hop_id(e);
	struct hop_desc *d = bpf_map_lookup_elem(&lh_hop_descs, &id);

	if (!d) {
		*err = -CNT_HOP_DESC_GONE;
		return NULL;
	}
	*err = encap_hop_usable(skb, d);
	if (!*err && endpoint_unreachable(d))
		*err = -CNT_HOP_UNREACHABLE;
	return *err ? NULL : d;
}

/* The expiry walk met a live entry: its descriptor is in use. */
static __always_inline void hop_desc_keep(const struct conn_entry *e, __u32 pass)
{
	__u32 id = encap_hop_id(e);
	struct hop_desc *d;

	if (!(e->flags & F_ENTRY_HOP_EXT))
		return;
	d = bpf_map_lookup_elem(&lh_hop_descs, &id);
	if (d && d->mark != pass)
		d->mark = pass;
}

/* After the walk: a descriptor no live entry marked during this pass, nor the
 * data path since it began, is unused. (*pass is the pass's mark.) */
static long hop_desc_sweep(struct bpf_map *map, __u32 *id, struct hop_desc *d, __u32 *pass)
{
	if (d->mark != *pass)
		bpf_map_delete_elem(map, id);
	return 0;
}
