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

/* The id naming slot *slot* while its generation is *gen* (even). */
static __always_inline __u32 hop_id_of(__u32 slot, __u64 gen)
{
	return slot | ((__u32)(gen >> 1) & HOP_GEN_MASK) << HOP_SLOT_BITS;
}

/* Claims the free slot *cur* (kind 0, generation *gen*, even) for *d*: a
 * compare-and-swap makes the generation odd, so of two CPUs claiming it one
 * wins, and a reply never takes the half-written slot for its hop; the
 * content is written, then the generation made even again (an atomic add:
 * the content is visible before it). Returns 0 with *id* set, or
 * -CNT_HOP_SLOT_BUSY when another CPU got there first. */
static __always_inline int hop_slot_claim(struct hop_desc *cur, __u64 gen, __u32 slot,
					   const struct hop_desc *d, __u32 *id)
{
	if (__sync_val_compare_and_swap(&cur->gen, gen, gen + 1) != gen)
		return -CNT_HOP_SLOT_BUSY;
	__builtin_memcpy(cur, d, offsetof(struct hop_desc, reserved2));
	__sync_fetch_and_add(&cur->gen, 1);
	*id = hop_id_of(slot, gen + 2);
	return 0;
}

/* The id of descriptor *d* in lh_hop_descs, stored when new: the slot its
 * hash names or one of the next HOP_DESC_PROBES - 1, the first that holds
 * the same content, else the first free one, claimed (hop_slot_claim). Slots
 * are read only here, on the learning side; a reply reads its entry's slot
 * (encap_hop_of). A hop whose slots are all taken is refused; one in use is
 * never replaced. Returns 0, -CNT_HOP_DESC_FULL or -CNT_HOP_SLOT_BUSY. */
static __always_inline int hop_desc_resolve(struct hop_desc *d, __u32 *id)
{
	__u32 h = hop_desc_hash(d), mark = hop_desc_pass(), free_slot = 0;
	struct hop_desc *cur, *free_cur = NULL;
	__u64 gen, free_gen = 0;

	d->mark = mark;
#pragma unroll
	for (int i = 0; i < HOP_DESC_PROBES; i++) {
		__u32 slot = (h + i) & HOP_SLOT_MASK;

		cur = bpf_map_lookup_elem(&lh_hop_descs, &slot);
		if (!cur)
			return -CNT_HOP_DESC_FULL;
		gen = cur->gen;
		if (gen & 1)
			continue; /* being written: neither ours nor free */
		if (!cur->kind) {
			if (!free_cur) {
				free_cur = cur;
				free_slot = slot;
				free_gen = gen;
			}
			continue;
		}
		if (hop_desc_equal(cur, d) && cur->gen == gen) { /* not swept meanwhile */
			if (cur->mark != mark)
				cur->mark = mark;
			*id = hop_id_of(slot, gen);
			return 0;
		}
	}
	if (!free_cur)
		return -CNT_HOP_DESC_FULL;
	return hop_slot_claim(free_cur, free_gen, free_slot, d, id);
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

/* What a reply takes from its hop's slot, copied out of it (hop_desc_copy)
 * and used from the copy: the slot may be swept and claimed for another hop
 * while the reply is under way. Not in a map: encap_reply's stack. */
struct hop_reply {
	struct bpf_tunnel_key key;   /* tunnel: remote, VNI, TTL, as the reply sets it */
	__u32 lse[MAX_MPLS_LABELS];  /* MPLS: label and TC of each entry, host order, outer first */
	__u16 vlan_tci[MAX_VLAN_TAGS]; /* the request's tags (the descriptor's) */
	__u8  kind;                  /* enum lh_hop_kind */
	__u8  mpls_count;            /* labels in lse */
	__u8  opt_len;               /* Geneve options, bytes */
	__u8  reserved;
	__u8  opts[GENEVE_OPT_MAX];  /* Geneve options (only when opt_len) */
};

/* The tunnel key (and Geneve options) of a reply's hop, from its copy: the
 * device it is redirected to encapsulates with them. */
static __always_inline int encap_set_tunnel(struct __sk_buff *skb, const struct hop_reply *r)
{
	__u64 len = r->opt_len; /* 64 bits: no zero-extended copy tested in its place */

	if (bpf_skb_set_tunnel_key(skb, (struct bpf_tunnel_key *)&r->key, sizeof(r->key),
				   r->kind == HOP_TUNNEL6 ? BPF_F_TUNINFO_IPV6 : 0))
		return -CNT_REWRITE_FAILED;
	if (!len)
		return 0;
	/* 1..GENEVE_OPT_MAX in the register the helper gets (as a __u32,
	 * clang tested a zero-extended copy and passed the original: a bench
	 * variant was refused, "invalid zero-sized read") */
	barrier_var(len);
	if (len < 1 || len > GENEVE_OPT_MAX)
		return -CNT_REWRITE_FAILED;
	return bpf_skb_set_tunnel_opt(skb, (void *)r->opts, len) ? -CNT_REWRITE_FAILED : 0;
}

/* The id of the descriptor an entry with F_ENTRY_HOP_EXT names (in its vlan_tci). */
static __always_inline __u32 encap_hop_id(const struct conn_entry *e)
{
	return e->vlan_tci[0] | (__u32)e->vlan_tci[1] << 16;
}

/* Whether generation *gen* of a slot is the one *id* was given for, and
 * even (not being written): gen << 13 keeps gen's low bit at the id's bit
 * 13, where the id has 0. */
static __always_inline int hop_gen_names(__u64 gen, __u32 id)
{
	return (__u32)gen << (HOP_SLOT_BITS - 1) == (id & ~(__u32)HOP_SLOT_MASK);
}

/* The descriptor entry *e* (F_ENTRY_HOP_EXT) names: the slot of lh_hop_descs
 * its id names (an array read), if that slot still holds the hop the id was
 * given for -- its generation the id's and even (hop_gen_names), a kind set.
 * The id is read again after the lookup rather than kept (lh_vmport's chain
 * has no stack to spare). NULL: the hop is gone. What the reply then sends
 * is read again, with the generation checked around it (hop_desc_copy). */
static __always_inline struct hop_desc *hop_desc_of(const struct conn_entry *e)
{
	__u32 slot = encap_hop_id(e) & HOP_SLOT_MASK;
	struct hop_desc *d = bpf_map_lookup_elem(&lh_hop_descs, &slot);

	if (!d || !hop_gen_names(d->gen, encap_hop_id(e)) || !d->kind)
		return NULL;
	return d;
}

#ifdef LH_TRACE_REDIRECT
/* Test builds only: the change lh_test_torn asks for, made to the reply's
 * slot between hop_desc_copy's check and its reads, once -- what the sweep
 * and a learning CPU can do there (tests/bpf/test_hop_torn.py). */
static __always_inline void hop_torn_hook(struct hop_desc *d)
{
	__u32 zero = 0;
	struct torn_test *t = bpf_map_lookup_elem(&lh_test_torn, &zero);

	if (!t || !t->mode)
		return;
	if (t->mode == TORN_SWEPT)
		__builtin_memset(d, 0, offsetof(struct hop_desc, reserved2));
	else
		__builtin_memcpy(d, &t->with, offsetof(struct hop_desc, reserved2));
	d->gen += t->mode == TORN_SWEPT ? 2 : t->mode == TORN_CLAIMED ? 4 : 3;
	t->mode = 0;
}
#else
static __always_inline void hop_torn_hook(struct hop_desc *d) {}
#endif

/* A slot's generation, read where it stands: volatile, so the compiler
 * neither drops the second read nor moves it across the content reads
 * (barrier() keeps those in place). */
static __always_inline __u64 hop_gen_read(const struct hop_desc *d)
{
	return *(volatile const __u64 *)&d->gen;
}

/* The second read of a seqlock-style copy: the generation still *gen*. */
static __always_inline int hop_gen_same(const struct hop_desc *d, __u64 gen)
{
	barrier();
	return LH_BROKEN_HOP_RECHECK || hop_gen_read(d) == gen;
}

/* The first half of an inline copy (encap_tunnel_fast, encap_mpls_fast):
 * the slot *id* names, its generation read into *gen* before the content
 * is -- NULL when the id no longer names it (swept, claimed, or being
 * written). The copy ends with hop_gen_same(d, *gen). */
static __always_inline struct hop_desc *hop_copy_begin(__u32 id, __u64 *gen)
{
	__u32 slot = id & HOP_SLOT_MASK;
	struct hop_desc *d = bpf_map_lookup_elem(&lh_hop_descs, &slot);

	if (!d)
		return NULL;
	*gen = hop_gen_read(d);
	if (!hop_gen_names(*gen, id))
		return NULL;
	barrier();
	hop_torn_hook(d);
	return d;
}

/* A tunnel hop's key (remote, VNI, TTL) from descriptor d into *key (zeroed). */
static __always_inline void hop_key_fill(const struct hop_desc *d, __u8 kind,
					 struct bpf_tunnel_key *key)
{
	key->tunnel_id = d->vni;
	key->tunnel_ttl = TUNNEL_TTL_;
	if (kind == HOP_TUNNEL6)
		__builtin_memcpy(key->remote_ipv6, d->remote, sizeof(key->remote_ipv6));
	else
		key->remote_ipv4 = d->remote[0];
}

/* What a reply sends for the hop *id* names, copied from its slot into *r*,
 * seqlock-style: the slot's generation read before the reads (it must be the
 * id's, and even: hop_copy_begin), read again after them, and unchanged --
 * else the slot was swept, or claimed for another hop, or is being written,
 * between the check and the reads, and the copy may be cleared, half-written
 * or another hop's: -CNT_HOP_DESC_GONE, the reply is not sent to it. The
 * compiler may not move the reads across the two reads of gen (volatile,
 * barrier()); the CPU neither: x86 keeps loads in order (the claim and the
 * sweep write content between two atomics). Returns 0 or a negative
 * reason. */
static __always_inline int hop_desc_copy(__u32 id, struct hop_reply *r)
{
	struct hop_desc *d;
	__u64 gen = 0;
	__u32 n;

	d = hop_copy_begin(id, &gen);
	if (!d)
		return -CNT_HOP_DESC_GONE;
	r->kind = d->kind;
	r->vlan_tci[0] = d->vlan_tci[0];
	r->vlan_tci[1] = d->vlan_tci[1];
	if (r->kind == HOP_MPLS) {
		n = d->mpls_count;
		r->mpls_count = n;
#pragma unroll
		for (int i = 0; i < MAX_MPLS_LABELS; i++)
			r->lse[i] = d->mpls[i];
	} else {
		__builtin_memset(&r->key, 0, sizeof(r->key));
		hop_key_fill(d, r->kind, &r->key);
		r->opt_len = d->opt_len;
		if (r->opt_len)
			__builtin_memcpy(r->opts, d->opts, sizeof(r->opts));
	}
	if (!hop_gen_same(d, gen))
		return -CNT_HOP_DESC_GONE;
	if (r->kind != HOP_TUNNEL4 && r->kind != HOP_TUNNEL6 && r->kind != HOP_MPLS)
		return -CNT_ENCAP_UNSUPPORTED; /* (only a build without the re-check gets here) */
	return 0;
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
	struct hop_desc *d = hop_desc_of(e);

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
	struct hop_desc *d;

	if (!(e->flags & F_ENTRY_HOP_EXT))
		return;
	d = hop_desc_of(e);
	if (d && d->mark != pass)
		d->mark = pass;
}

/* After the walk: a descriptor no live entry marked during this pass, nor the
 * data path since it began, is unused: its slot is freed -- the generation
 * made odd by compare-and-swap (another writer meanwhile: left for the next
 * pass; a mark by the data path between the test and the swap: the
 * generation put back, the id still valid), the content cleared (kind 0:
 * free), the generation even again and 2 on, so no id given for the old hop
 * names the slot any more. (*pass is the pass's mark; every slot is
 * visited, MAX_HOP_DESCS of them.) */
static long hop_desc_sweep(struct bpf_map *map, __u32 *slot, struct hop_desc *d, __u32 *pass)
{
	__u64 gen = d->gen;

	if (!d->kind || (gen & 1) || d->mark == *pass)
		return 0;
	if (__sync_val_compare_and_swap(&d->gen, gen, gen + 1) != gen)
		return 0;
	if (d->mark == *pass) {
		__sync_fetch_and_add(&d->gen, -1);
		return 0;
	}
	__builtin_memset(d, 0, offsetof(struct hop_desc, reserved2));
	__sync_fetch_and_add(&d->gen, 1);
	return 0;
}
