/* frag.h: the later fragments of a datagram follow its first one (lh_frags).
 * Only a first fragment carries the ports that find a connection; what it
 * did is remembered by (addresses, protocol, IP id, zone), as Cilium's
 * ipv4_frag_register_datagram does, and every later fragment of that
 * datagram does the same: to the same VM port, or to the same last hop. Each
 * direction keys on addresses as read, so requests (uplink -> VM) and
 * replies (VM -> last hop) never meet. A later fragment whose first one was
 * not seen -- out of order, or forgotten by the LRU -- passes unchanged and
 * is counted CNT_FRAGMENT_EARLY: the data path holds no packet back. An
 * ICMP error from outside that quotes a later fragment of a VM's reply finds
 * the connection's VM port the same way (frag_quoted_vm). */
#pragma once

#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "rewrite.h"
#include "service.h"
#include "conntrack.h"

/* The datagram a fragment belongs to, from its header as read: from p's key,
 * reversed back if the caller reversed it. */
static __always_inline void frag_key_of(struct frag_key *k, const struct pkt *p, int reversed)
{
	__builtin_memcpy(k->saddr, reversed ? p->key.daddr : p->key.saddr, sizeof(k->saddr));
	__builtin_memcpy(k->daddr, reversed ? p->key.saddr : p->key.daddr, sizeof(k->daddr));
	k->id = p->frag_id;
	k->proto = p->frag_proto;
	k->family = p->key.family;
	k->zone = p->key.zone;
}

/* A first fragment went its way (verdict ret; p->key is its connection's
 * key by now, as the uplink read it: the VM port's reversed, to_vm = 0):
 * remember where, for the fragments after it. Redirected, its connection's
 * entry says to which VM (uplink, to_vm) or last hop (VM port). A global
 * function: verified once, not once per path that reaches it. */
__noinline int frag_remember(const struct pkt *p, int ret, int to_vm)
{
	struct frag_entry fe = {};
	struct conn_entry *e;
	struct frag_key k;
	int pending;

	if (!p || !p->frag || p->frag_later)
		return 0;
	frag_key_of(&k, p, !to_vm);

	if (ret == TC_ACT_REDIRECT) {
		e = conn_lookup(p, &pending);
		if (!e)
			return 0;
		if (to_vm) {
			fe.verdict = FRAG_TO_VM;
			fe.vm_ifindex = e->vm_ifindex;
		} else {
			fe.verdict = FRAG_TO_HOP;
			fe.hop = *e;
		}
	}
	bpf_map_update_elem(&lh_frags, &k, &fe, BPF_ANY);
	return 0;
}

/* The remembered decision of a later fragment's datagram, or NULL (counted
 * early); *reason says what a pass means. */
static __always_inline struct frag_entry *frag_find(const struct pkt *p, int *reason)
{
	struct frag_entry *fe;
	struct frag_key k;

	frag_key_of(&k, p, 0);
	fe = bpf_map_lookup_elem(&lh_frags, &k);

	*reason = fe ? CNT_FRAGMENT : CNT_FRAGMENT_EARLY;
	return fe;
}

/* Uplink: a later fragment goes to the VM port its first one went to. */
static __always_inline int frag_follow_to_vm(struct __sk_buff *skb, struct pkt *p, int *reason)
{
	struct frag_entry *fe = frag_find(p, reason);
	int ret;

	if (!fe || fe->verdict != FRAG_TO_VM)
		return TC_ACT_OK;
	ret = send_to_vm(skb, p, fe->vm_ifindex);
	if (ret < 0)
		return TC_ACT_OK;
	*reason = CNT_FRAGMENT_FOLLOWED;
	return ret;
}

/* VM port: a later fragment of a reply goes to the last hop its first one
 * went to -- fe->hop is a copy of the connection's entry, so a tunnel or MPLS
 * hop's descriptor id comes with it, and the fragment gets the same tunnel
 * key or labels (*svc := encap_redirected, as the first was), an L3
 * link's the same TTL - 1. A hop that no longer takes it (descriptor swept,
 * uplink gone or down, endpoint unreachable, TTL out) passes it unchanged,
 * counted with that reason, as it would a reply. */
static __always_inline int frag_follow_to_hop(struct __sk_buff *skb, struct pkt *p,
					      const struct iface_cfg *vm, int *reason, int *svc)
{
	struct frag_entry *fe = frag_find(p, reason);
	int ret;

	if (!fe || fe->verdict != FRAG_TO_HOP)
		return TC_ACT_OK;
	ret = reply_to_last_hop(skb, p, &fe->hop, vm);
	if (ret < 0) {
		*reason = -ret;
		return TC_ACT_OK;
	}
	if (fe->hop.flags & F_ENTRY_HOP_EXT)
		*svc = CNT_ENCAP_REDIRECTED;
	*reason = CNT_FRAGMENT_FOLLOWED;
	return ret;
}

/* Uplink: an ICMP error from outside quoting a later fragment of a reply (no
 * ports: a "packet too big" about each fragment of a VM's large answer). Its
 * datagram, as the quote's header names it, is the one lh_frags remembered
 * when its first fragment left a VM port: the copy of the entry says which VM
 * port holds the connection. c is at the quote, inside q's datagram (q->l3,
 * q->l3_len, q->key.zone); family: the error's own. Returns that VM port (0: none holds it), or -1
 * when the datagram is not known (or the quote cannot be read). */
static __always_inline int frag_quoted_vm(struct cursor *c, const struct pkt *q, __u32 family)
{
	struct iphdr *ip = c->pos;
	struct frag_entry *fe;
	struct frag_key k = {};

	if ((void *)(ip + 1) > c->end || !in_datagram(c, q, sizeof(*ip)))
		return -1;
	if (ip->version == 4) {
		k.saddr[0] = ip->saddr;
		k.daddr[0] = ip->daddr;
		k.id = ip->id;
		k.proto = ip->protocol;
		k.family = FAMILY_V4;
	} else {
		struct ipv6hdr *ip6 = c->pos;
		struct { __u8 next; __u8 reserved; __be16 off; __be32 id; } *fh = (void *)(ip6 + 1);

		if ((void *)(fh + 1) > c->end || !in_datagram(c, q, sizeof(*ip6) + sizeof(*fh)) ||
		    ip6->nexthdr != IPPROTO_FRAGMENT)
			return -1;
		__builtin_memcpy(k.saddr, &ip6->saddr, sizeof(k.saddr));
		__builtin_memcpy(k.daddr, &ip6->daddr, sizeof(k.daddr));
		k.id = fh->id;
		k.proto = fh->next;
		k.family = FAMILY_V6;
	}
	if (k.family != family)
		return -1; /* an ICMPv4 error quoting IPv6, or the other way round */
	k.zone = q->key.zone;
	fe = bpf_map_lookup_elem(&lh_frags, &k);
	if (!fe || fe->verdict != FRAG_TO_HOP)
		return -1;
	return fe->hop.vm_ifindex;
}
