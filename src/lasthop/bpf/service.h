/* service.h: choosing a VM for a service connection (Maglev) and sending
 * uplink packets to the VM a connection is pinned to. */
#pragma once

#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "hash.h"
#include "maps.h"
#include "parse.h"
#include "rewrite.h"

/* The service a new connection is for, or NULL. */
static __always_inline struct svc_info *svc_find(const struct conn_key *k)
{
	struct svc_key sk = {};
	struct svc_info *s;

	__builtin_memcpy(sk.addr, k->daddr, sizeof(sk.addr));
	sk.family = k->family;
	sk.proto = k->proto;
	if (k->proto == IPPROTO_TCP || k->proto == IPPROTO_UDP) {
		sk.port = k->dport;
		s = bpf_map_lookup_elem(&lh_services, &sk);
		if (s)
			return s;
		sk.port = 0;
	}
	s = bpf_map_lookup_elem(&lh_services, &sk);
	if (s)
		return s;
	sk.proto = 0;
	return bpf_map_lookup_elem(&lh_services, &sk);
}

/* The VM port the service's Maglev table gives the connection, 0 = none. */
static __always_inline __u32 svc_pick(const struct svc_info *s, const struct conn_key *k)
{
	__u32 id = s->id, slot;
	__u32 *vm;
	void *table;

	table = bpf_map_lookup_elem(&lh_maglev, &id);
	if (!table)
		return 0;
	slot = jhash2_10((const __u32 *)k, MAGLEV_SEED) % MAGLEV_SIZE;
	vm = bpf_map_lookup_elem(table, &slot);
	return vm ? *vm : 0;
}

/* Sends an uplink packet to VM port vm_ifindex: destination MAC := the VM's
 * (routed: source MAC := the port's, TTL - 1), its VLAN tags removed; from
 * an L3 link, with a new Ethernet header (and TTL - 1). Returns
 * TC_ACT_REDIRECT or a negative reason to pass with.
 * A global function, verified once rather than at each of lh_uplink's many
 * ways to a VM (a pinned service, the fast path, a VM-opened connection,
 * ICMP errors, fragments); a global function takes no pointer into the
 * caller's packet, so it gets what it needs of it as numbers: the IP
 * header's offset, the family, and tags | l3_link << 2. */
__noinline int send_to_vm_at(struct __sk_buff *skb, __u32 vm_ifindex, __u32 l3_off,
			     __u32 family, __u32 tags_l3)
{
	struct iface_cfg *vm = iface_get(vm_ifindex, ROLE_VM_PORT);
	struct pkt q = {};
	int err;

	if (!skb || !vm || !(vm->flags & F_IFACE_VM_MAC))
		return -CNT_MISS;
	if (l3_off > PULL_LEN)
		return -CNT_MALFORMED;
	q.l3_off = l3_off; /* rewrite_ttl checks it against data_end */
	q.key.family = family;
	q.vlan_count = tags_l3 & 3;
	if (tags_l3 >> 2 & 1) {
		err = rewrite_push_eth(skb, &q, vm->mac, vm->vm_mac);
	} else {
		err = rewrite_l2(skb, &q, vm->flags & F_IFACE_ROUTED, vm->mac, vm->vm_mac);
		if (!err)
			err = rewrite_untag(skb, &q); /* the VM expects no tag (an access port) */
	}
	if (err)
		return err;
	trace_redirect(vm_ifindex);
	/* straight into the guest's side of a veth (lh_uplink runs at tc ingress,
	 * which redirect_peer needs): no second trip through the backlog. Not a
	 * frame that came tagged or from an L3 link: its MAC header was rebuilt
	 * here, and the peer's ingress takes the skb as it stands. */
	if (vm->delivery == DELIVER_PEER && !(tags_l3 & 7))
		return bpf_redirect_peer(vm_ifindex, 0);
	return bpf_redirect(vm_ifindex, 0);
}

static __always_inline int send_to_vm(struct __sk_buff *skb, struct pkt *p, __u32 vm_ifindex)
{
	return send_to_vm_at(skb, vm_ifindex, p->l3_off, p->key.family,
			     p->vlan_count | (__u32)p->l3_link << 2);
}

/* An entry pinned to a VM that is now down: choose again ("reassign") or
 * drop. Returns the VM to use, 0 to pass, or -1 to drop. With no VM to
 * choose, the entry keeps the down VM, so a later packet chooses again. */
static __always_inline int svc_vm_down(struct conn_entry *e, const struct conn_key *k,
				       __u32 settings, int *reason)
{
	struct svc_info *s;
	__u32 vm;

	if (e->flags & F_ENTRY_VM_ORIGIN) {
		*reason = CNT_MISS; /* the VM that opened it is gone: nothing to move to */
		return 0;
	}
	if (settings & F_SET_VM_DOWN_DROP) {
		*reason = CNT_SVC_DROPPED;
		return -1;
	}
	s = svc_find(k);
	vm = s ? svc_pick(s, k) : 0;
	*reason = vm ? CNT_SVC_REASSIGNED : CNT_SVC_NO_BACKEND;
	if (vm)
		e->vm_ifindex = vm;
	return vm;
}
