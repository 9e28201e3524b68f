/* lasthop.c: the tc entry points.
 *  lh_uplink  (uplink ingress):  learn or refresh each connection's last hop;
 *                                send service and VM-opened connections to their VM.
 *  lh_vmport  (VM port ingress): send each reply back to its last hop;
 *                                remember connections the VM opens.
 * Both pass, unchanged and counted, whatever they cannot parse. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "rewrite.h"
#include "service.h"
#include "conntrack.h"
#include "expire.h"
#include "frag.h"
#include "svc_walk.h"
#include "failover.h"
#include "scope.h"
#include "prune.h"
#include "fastpath.h"

char LICENSE[] SEC("license") = "GPL";

/* What happened to a packet, counted once at the program's exit: the
 * reason, and optionally a service decision and a table event. */
struct outcome {
	int reason;
	int svc;   /* -1 = none */
	int table; /* -1 = none */
};

static __always_inline void count_outcome(__u32 slot, const struct pkt *p, const struct outcome *o)
{
	if (p->ip_options)
		count(slot, CNT_IP_OPTIONS);
	if (p->ipv6_ext)
		count(slot, CNT_IPV6_EXT);
	count(slot, o->reason);
	if (o->svc >= 0)
		count(slot, o->svc);
	if (o->table >= 0)
		count(slot, o->table);
}

static __always_inline void conn_key_reverse(struct conn_key *key)
{
	__u32 a;
	__u16 port;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		a = key->saddr[i];
		key->saddr[i] = key->daddr[i];
		key->daddr[i] = a;
	}
	port = key->sport;
	key->sport = key->dport;
	key->dport = port;
}

/* Writes the last hop of p (its source MAC, uplink, tags) into e. */
static __always_inline void conn_set_hop(struct conn_entry *e, const struct pkt *p,
					 const __u8 *mac, __u32 ifindex)
{
	__builtin_memcpy(e->mac, mac, ETH_ALEN);
	e->ifindex = ifindex;
	e->vlan_count = p->vlan_count;
	e->vlan_tci[0] = p->vlan_tci[0];
	e->vlan_tci[1] = p->vlan_tci[1];
	e->flags = (e->flags & ~(F_ENTRY_OUTER_8021AD | F_ENTRY_HOP_EXT)) | F_ENTRY_HOP_KNOWN |
		   (p->outer_ad ? F_ENTRY_OUTER_8021AD : 0) | (p->hop_ext ? F_ENTRY_HOP_EXT : 0);
}

static __always_inline int conn_hop_same(const struct conn_entry *e, const struct pkt *p,
					 const __u8 *mac, __u32 ifindex)
{
	return (e->flags & F_ENTRY_HOP_KNOWN) && e->ifindex == ifindex &&
	       e->vlan_count == p->vlan_count && e->vlan_tci[0] == p->vlan_tci[0] &&
	       e->vlan_tci[1] == p->vlan_tci[1] && mac_equal(e->mac, mac) &&
	       !(e->flags & F_ENTRY_HOP_EXT) == !p->hop_ext;
}

static __always_inline struct lh_settings *settings_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&lh_settings, &zero);
}

static __always_inline __u32 settings_flags(void)
{
	struct lh_settings *s = settings_get();

	return s ? s->flags : 0;
}

static __always_inline int is_pure_syn(const struct pkt *p)
{
	return p->key.proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_FLAG_SYN_ | TCP_FLAG_ACK_)) == TCP_FLAG_SYN_;
}

/* Uplink packet of a known connection: refresh it, re-learn the hop on a SYN
 * or (relearn = latest) on a new MAC. Returns the counter to record. */
static __always_inline int conn_refresh(struct conn_entry *e, const struct pkt *p,
					const __u8 *mac, __u32 ifindex, __u32 settings)
{
	int reason;

	e->last_seen = now32();
	e->packets++;
	if (conn_hop_same(e, p, mac, ifindex))
		return CNT_REFRESHED;
	if (!(e->flags & F_ENTRY_HOP_KNOWN))
		reason = CNT_VM_ORIGIN_HOP; /* not LEARNED: the entry was counted when the VM opened it */
	else if (is_pure_syn(p) || !(settings & F_SET_RELEARN_FIRST))
		reason = CNT_RELEARNED;
	else
		return CNT_REFRESHED;
	conn_set_hop(e, p, mac, ifindex);
	change_emit(CH_HOP, CHT_EITHER, &p->key, e);
	return reason;
}

/* A new connection from an uplink: a pending entry with its last hop. */
static __always_inline int conn_learn(const struct pkt *p, const __u8 *mac, __u32 ifindex,
				      __u32 vm_ifindex, __u8 state, __u32 settings)
{
	struct conn_entry e = {};

	e.last_seen = now32();
	if (settings & F_SET_SYNC) /* its LEARNED record stands for this epoch's refresh */
		e.sync_epoch = change_epoch(e.last_seen);
	e.packets = 1;
	e.vm_ifindex = vm_ifindex;
	e.state = state;
	conn_set_hop(&e, p, mac, ifindex);
	return conn_insert(&p->key, &e) < 0 ? CNT_LEARN_FAILED : CNT_LEARNED;
}

/* The VM an existing entry sends its uplink packets to, after checking the
 * VM is up. Returns the VM port, 0 to pass, -1 to drop. */
static __always_inline int uplink_pinned_vm(struct conn_entry *e, const struct pkt *p,
					    __u32 settings, int *svc_reason)
{
	struct iface_cfg *vmc = iface_get(e->vm_ifindex, ROLE_VM_PORT);

	*svc_reason = e->flags & F_ENTRY_VM_ORIGIN ? CNT_VM_ORIGIN_RETURNED : CNT_SVC_PINNED;
	if (vmc && (vmc->flags & F_IFACE_VM_DOWN))
		return svc_vm_down(e, &p->key, settings, svc_reason);
	return e->vm_ifindex;
}

/* A request of a connection whose VM has answered goes straight to that VM's
 * port (vm_fast_send, which says when). Returns TC_ACT_REDIRECT, or
 * TC_ACT_OK (with the shortcut forgotten if it no longer applies). */
static __always_inline int uplink_fast(struct __sk_buff *skb, struct pkt *p,
				       struct conn_entry *e, const struct iface_cfg *up,
				       __u32 settings, int *svc_reason)
{
	struct ethhdr *eth = eth_of(skb);
	int ret;

	if (!eth || p->l3_link)
		return TC_ACT_OK; /* from an L3 link: the host routes it */
	ret = vm_fast_send(skb, eth, e, up, settings, p->l3_off, p->key.family, p->vlan_count);
	if (ret == FAST_NONE) {
		e->vm_ifindex = 0;
		e->flags &= ~(F_ENTRY_VM_FAST | F_ENTRY_VM_NEIGH);
		return TC_ACT_OK;
	}
	if (ret < 0)
		return TC_ACT_OK;
	*svc_reason = CNT_FAST_TO_VM;
	return ret;
}

/* Sends an uplink packet to VM port vm (> 0), passes it (0) or drops it (< 0). */
static __always_inline int uplink_to_vm(struct __sk_buff *skb, struct pkt *p, int vm,
					struct outcome *o)
{
	int ret;

	if (vm <= 0)
		return vm < 0 ? TC_ACT_SHOT : TC_ACT_OK;
	ret = send_to_vm(skb, p, vm);
	if (ret < 0) {
		o->svc = -ret;
		return TC_ACT_OK;
	}
	return ret;
}

/* A connection never seen: learn it (pending) and, for a service, pick its VM. */
static __always_inline int uplink_new(struct __sk_buff *skb, struct pkt *p, const __u8 *mac,
				      __u32 settings, struct outcome *o)
{
	__u8 state = conn_first_state(p);
	struct svc_info *s;
	int vm = 0;

	if (state == CS_NONE) {
		o->reason = CNT_RST_UNKNOWN;
		return TC_ACT_OK;
	}
	if (scope_passes(&p->key, skb->ifindex, settings)) { /* the user keeps it out */
		o->reason = CNT_SCOPE_PASSED;
		return TC_ACT_OK;
	}
	s = settings & F_SET_SERVICES ? svc_find(&p->key) : NULL;
	if (s) {
		vm = svc_pick(s, &p->key);
		if (!vm) {
			/* no entry: its next packet (a retransmitted SYN) tries again */
			o->reason = CNT_SVC_NO_BACKEND;
			return TC_ACT_OK;
		}
		o->svc = CNT_SVC_SELECTED;
	}
	o->reason = conn_learn(p, mac, skb->ifindex, vm, state, settings);
	return uplink_to_vm(skb, p, vm, o);
}

/* An uplink packet of a known connection: refresh, track, and send it where
 * the entry says. */
static __always_inline int uplink_known(struct __sk_buff *skb, struct pkt *p,
					struct conn_entry *e, const struct iface_cfg *up,
					const __u8 *mac, __u32 settings, struct outcome *o)
{
	o->reason = conn_refresh(e, p, mac, skb->ifindex, settings);
	if (!e->vm_ifindex)
		return TC_ACT_OK;
	if (e->flags & F_ENTRY_VM_FAST)
		return uplink_fast(skb, p, e, up, settings, &o->svc);
	return uplink_to_vm(skb, p, uplink_pinned_vm(e, p, settings, &o->svc), o);
}

/* A SYN from outside is a new connection: it never follows an entry a VM
 * opened (that one waits for a SYN-ACK), so no VM can claim the connections
 * a client will open by opening their tuples first. */
static __always_inline void vm_origin_supersede(const struct conn_key *k, int pending,
						struct conn_entry *e, struct outcome *o)
{
	if (pending)
		conn_drop_pending(k);
	else
		conn_drop_confirmed(k, e);
	o->table = CNT_VM_ORIGIN_SUPERSEDED;
}

/* Whether the uplink's list (allow_last_hops / deny_last_hops) lets *mac* be a
 * last hop; a refusal is counted per MAC. No list: one flag test. */
static __always_inline int hop_trusted(const struct iface_cfg *up, __u32 ifindex,
				       const __u8 *mac)
{
	struct hop_key k = { .ifindex = ifindex };
	__u64 one = 1, *n;
	int listed;

	if (!(up->flags & (F_IFACE_HOPS_ALLOW | F_IFACE_HOPS_DENY)))
		return 1;
	__builtin_memcpy(k.mac, mac, ETH_ALEN);
	listed = bpf_map_lookup_elem(&lh_hops, &k) != NULL;
	if (listed == !!(up->flags & F_IFACE_HOPS_ALLOW))
		return 1;
	n = bpf_map_lookup_elem(&lh_hops_refused, &k);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&lh_hops_refused, &k, &one, BPF_NOEXIST);
	return 0;
}

/* Learns or refreshes the connection of an uplink packet and decides where it
 * goes: TC_ACT_OK (the host forwards it), a redirect to a VM, or TC_ACT_SHOT.
 * l3: an L3 link's packet (a constant: see uplink_main), whose last hop is
 * the link alone. */
static __always_inline int uplink_conn(struct __sk_buff *skb, struct pkt *p,
				       const struct iface_cfg *up, struct outcome *o, int l3)
{
	struct ethhdr *eth = eth_of(skb); /* on an L3 link: not a MAC header, unused */
	__u8 no_mac[8] __attribute__((aligned(8))) = {}; /* an L3 link's last hop: the link */
	__u32 settings = settings_flags();
	const __u8 *src = no_mac;
	struct conn_entry *e;
	int pending, confirmed, ret;
	__u8 state;

	if (!l3) {
		if (!eth) {
			o->reason = CNT_MALFORMED;
			return TC_ACT_OK;
		}
		/* a bridge port also sees floods and multicast: only unicast can be a request */
		if (eth->h_dest[0] & 1) {
			o->reason = CNT_NOT_UNICAST;
			return TC_ACT_OK;
		}
		/* an untrusted host on the segment neither opens nor takes over a connection */
		if (!hop_trusted(up, skb->ifindex, eth->h_source)) {
			o->reason = CNT_HOP_UNTRUSTED;
			return TC_ACT_OK;
		}
		src = eth->h_source;
	}
	e = conn_lookup(p, &pending);
	if (e && (e->flags & F_ENTRY_VM_ORIGIN) && is_pure_syn(p)) {
		vm_origin_supersede(&p->key, pending, e, o);
		e = NULL;
	}
	if (!e)
		return uplink_new(skb, p, src, settings, o);
	state = e->state;
	confirmed = conn_track(e, p, !(e->flags & F_ENTRY_VM_ORIGIN));
	ret = uplink_known(skb, p, e, up, src, settings, o);
	if (confirmed)
		o->table = conn_confirm(&p->key, e, pending);
	else if ((settings & F_SET_SYNC) && o->reason == CNT_REFRESHED && e->state == state)
		change_refresh(&p->key, e); /* nothing else reported it */
	return ret;
}

/* The key of the connection an ICMP error quotes a packet of, as quoted:
 * from a VM, the request as it arrived (no reversal); from an uplink, a
 * packet that left (the caller reverses it). */
static __always_inline int icmp_error_key(struct pkt *p, struct cursor *c)
{
	struct conn_key quoted = {};
	int err = parse_quoted(c, p, &quoted);

	if (err)
		return err;
	quoted.zone = p->key.zone;
	p->key = quoted;
	return 0;
}

/* An ICMP error from outside (a router beyond the firewall: "fragmentation
 * needed", "packet too big") about a packet that left: it goes to the VM port
 * that holds the connection (a service's, a VM-opened one, the fast path's),
 * so path-MTU discovery works for a VM behind a service. A connection no VM
 * port holds is left to the bridge or routing, which deliver it by address.
 * Returns the verdict | the counter << 8. A global function, verified once
 * (not on every path lh_uplink's parser leaves): it takes the packet as
 * offsets -- of the IP header and of the quote -- and meta = zone | tags
 * << 16 | l3_link << 18 | family << 24. */
__noinline int uplink_icmp_error(struct __sk_buff *skb, __u32 l3_off, __u32 l3_len,
				 __u32 quote_off, __u32 meta)
{
	__u32 family = meta >> 24 & 0xff;
	struct iface_cfg *vm;
	struct conn_entry *e;
	struct pkt q = {};
	struct cursor c;
	int pending, ret, vm_ifindex;

	if (!skb || l3_off > PULL_LEN || quote_off > PULL_LEN)
		return CNT_ICMP_ERROR_MISS << 8;
	q.l3 = (void *)(long)skb->data + l3_off;
	q.l3_off = l3_off;
	q.l3_len = l3_len;
	q.key.zone = meta & 0xffff;
	q.vlan_count = meta >> 16 & 3;
	q.l3_link = meta >> 18 & 1;
	c.pos = (void *)(long)skb->data + quote_off;
	c.end = (void *)(long)skb->data_end;
	ret = icmp_error_key(&q, &c);
	if (ret == -CNT_FRAGMENT) {
		/* a later fragment's quote: its datagram's first fragment knew */
		c.pos = (void *)(long)skb->data + quote_off;
		vm_ifindex = frag_quoted_vm(&c, &q, family);
		if (vm_ifindex < 0)
			return CNT_ICMP_ERROR_MISS << 8;
		q.key.family = family; /* send_to_vm's: the error's own */
	} else {
		if (ret < 0 || q.key.family != family)
			return CNT_ICMP_ERROR_MISS << 8; /* unreadable, or ICMPv4 quoting IPv6 */
		conn_key_reverse(&q.key); /* the quote left the host: a reply's direction */
		e = conn_lookup(&q, &pending);
		if (!e)
			return CNT_ICMP_ERROR_MISS << 8;
		/* a routed shortcut not yet checked (vm_fast_send) holds nothing */
		vm_ifindex = e->flags & F_ENTRY_VM_NEIGH ? 0 : e->vm_ifindex;
	}
	vm = iface_get(vm_ifindex, ROLE_VM_PORT);
	if (!vm_ifindex || !vm || (vm->flags & F_IFACE_VM_DOWN))
		return CNT_ICMP_ERROR_FORWARDED << 8;
	ret = send_to_vm(skb, &q, vm_ifindex);
	if (ret < 0)
		return CNT_ICMP_ERROR_FORWARDED << 8;
	return CNT_ICMP_ERROR_REDIRECTED << 8 | ret;
}

/* An uplink packet of a connection (not ICMP but echo), parsed: learned or
 * refreshed, sent where its entry says, counted. A global function, given
 * the caller's packet as memory of unknown content: it is verified once,
 * for any content, so every way through the parser shares one verification
 * of what follows (p->l3 and the cursor are the caller's; nothing here
 * needs them: header offsets do). l3: an L3 link's packet (a constant:
 * uplink_parsed_eth and uplink_parsed_l3). */
static __always_inline int uplink_parsed(struct __sk_buff *skb, struct pkt *p, int l3)
{
	struct iface_cfg *cfg = iface_get(skb->ifindex, ROLE_UPLINK);
	struct outcome o = { .svc = -1, .table = -1 };
	int ret = TC_ACT_OK;

	if (!p || !cfg)
		return TC_ACT_OK;
	ret = uplink_conn(skb, p, cfg, &o, l3);
	if (p->frag)
		frag_remember(p, ret, 1); /* a first fragment: the later ones follow it */
	count_outcome(cfg->slot, p, &o);
	return ret;
}

__noinline int uplink_parsed_eth(struct __sk_buff *skb, struct pkt *p)
{
	return uplink_parsed(skb, p, 0);
}

__noinline int uplink_parsed_l3(struct __sk_buff *skb, struct pkt *p)
{
	return uplink_parsed(skb, p, 1);
}

/* l3: the uplink is an L3 link (no Ethernet header): a constant of each
 * entry point, so each is verified with its own kind of frame only.
 * after_fast: a fast path ran first and left CB_CONFIRMED_MISS (a constant). */
static __always_inline int uplink_main(struct __sk_buff *skb, int l3, int after_fast)
{
	struct iface_cfg *cfg = iface_get(skb->ifindex, ROLE_UPLINK);
	struct outcome o = { .svc = -1, .table = -1 };
	struct pkt p = {};
	struct cursor c;
	int ret = TC_ACT_OK;

	if (!cfg) {
		count(0, CNT_NO_IFACE);
		return TC_ACT_OK;
	}
	p.l3_link = l3;
	o.reason = parse_packet(skb, &p, &c);
	p.key.zone = cfg->zone;
	if (o.reason < 0) {
		o.reason = -o.reason;
		if (p.frag_later)
			ret = frag_follow_to_vm(skb, &p, &o.reason);
		goto out;
	}
	/* neighbour discovery from outside is no connection */
	if (p.icmp_kind == ICMP_KIND_OTHER) {
		o.reason = CNT_ICMP_OTHER;
		goto out;
	}
	if (p.icmp_kind != ICMP_KIND_ERROR) {
		/* a tunnel's or MPLS stack's hop: its descriptor's id in the tags'
		 * place (never on an L3 link). Here, not in uplink_parsed: below
		 * that the calls' stacks would pass the verifier's 512 bytes. */
		o.reason = l3 || cfg->link_kind == LINK_ETHERNET
				   ? 0 /* no hop beyond MAC and tags: no call */
				   : hop_learn(skb, (__u32 *)p.vlan_tci);
		if (o.reason < 0) {
			o.reason = -o.reason;
			goto out;
		}
		p.hop_ext = o.reason;
		p.confirmed_miss = after_fast ? skb->cb[CB_CONFIRMED_MISS] : 0;
		return l3 ? uplink_parsed_l3(skb, &p) : uplink_parsed_eth(skb, &p);
	}
	ret = uplink_icmp_error(skb, p.l3_off, p.l3_len, c.pos - (void *)(long)skb->data,
				p.key.zone | p.vlan_count << 16 | l3 << 18 | p.key.family << 24);
	o.reason = ret >> 8;
	ret &= 0xff;
out:
	count_outcome(cfg->slot, &p, &o);
	return ret;
}

/* The common case first (fast_refresh), else the general path (told when
 * the fast path missed the key in the confirmed table). */
static __always_inline int uplink_entry(struct __sk_buff *skb)
{
	struct iface_cfg *cfg = iface_get(skb->ifindex, ROLE_UPLINK);
	int ret;

	skb->cb[CB_CONFIRMED_MISS] = MISS_NONE; /* fast_lookup's MISS_* when it misses */
	ret = cfg ? fast_refresh(skb, cfg) : FAST_NONE;
	return ret != FAST_NONE ? ret : uplink_main(skb, 0, 1);
}

SEC("tc")
int lh_uplink(struct __sk_buff *skb)
{
	return uplink_entry(skb);
}

/* lh_uplink for an L3 link (link_kind LINK_L3: tun, WireGuard, xfrm, GRE,
 * IP-in-IP): the frame starts at its IP header, the last hop is the link. */
SEC("tc")
int lh_uplink_l3(struct __sk_buff *skb)
{
	return uplink_main(skb, 1, 0);
}

/* XDP on an MPLS uplink (link_kind LINK_MPLS), before lh_uplink: takes the
 * label stack off an MPLS frame into the frame's metadata, where lh_uplink
 * learns it (mpls.h). Every frame passes; what it did is counted. */
SEC("xdp")
int lh_uplink_mpls(struct xdp_md *ctx)
{
	struct iface_cfg *cfg = iface_get(ctx->ingress_ifindex, ROLE_UPLINK);
	int reason;

	if (!cfg)
		return XDP_PASS; /* lh_uplink counts it */
	reason = mpls_pop(ctx);
	if (reason)
		count(cfg->slot, reason < 0 ? -reason : reason);
	return XDP_PASS;
}

/* May VM port ifindex open a connection from the (reversed) key's daddr?
 * Only from an address it owns, within its quota. Returns 0 or the reason. */
static __always_inline int vm_origin_allowed(const struct pkt *p, __u32 ifindex, __u32 quota)
{
	struct vm_addr_key ak = { .ifindex = ifindex, .family = p->key.family };
	struct vm_usage *u;

	__builtin_memcpy(ak.addr, p->key.daddr, sizeof(ak.addr));
	if (!bpf_map_lookup_elem(&lh_vm_addrs, &ak))
		return CNT_VM_ORIGIN_SPOOFED;
	u = bpf_map_lookup_elem(&lh_vm_usage, &ifindex);
	if (!u) {
		struct vm_usage fresh = {};

		bpf_map_update_elem(&lh_vm_usage, &ifindex, &fresh, BPF_NOEXIST);
		u = bpf_map_lookup_elem(&lh_vm_usage, &ifindex);
		if (!u)
			return CNT_LEARN_FAILED;
	}
	if (quota && u->counted + (u->created - u->base) >= quota)
		return CNT_VM_ORIGIN_QUOTA;
	return 0;
}

/* A VM packet with no entry: if it opens a connection, remember the VM so
 * the server's replies come back to it (full-proxy VMs sharing an address).
 * A global function: its frame is not on the stack of vmport_parsed's
 * deepest calls (the verifier allows 512 bytes for a chain of calls). */
__noinline int vm_origin_learn(const struct pkt *p, __u32 vm_ifindex)
{
	struct lh_settings *s = settings_get();
	struct conn_entry e = {};
	struct vm_usage *u;
	int err;

	if (!p)
		return CNT_MISS;
	if (!s || (s->flags & F_SET_NO_VM_ORIGIN))
		return CNT_MISS;
	if (p->key.proto == IPPROTO_TCP && !is_pure_syn(p))
		return CNT_MISS;
	if ((p->key.proto == IPPROTO_ICMP || p->key.proto == IPPROTO_ICMPV6) && !p->echo_request)
		return CNT_MISS; /* an echo reply answers something; it opens nothing */
	if (scope_passes(&p->key, 0, s->flags))
		return CNT_SCOPE_PASSED;
	err = vm_origin_allowed(p, vm_ifindex, s->vm_quota);
	if (err)
		return err;
	e.last_seen = now32();
	e.vm_ifindex = vm_ifindex;
	e.flags = F_ENTRY_VM_ORIGIN;
	e.state = conn_first_state(p);
	err = conn_insert(&p->key, &e);
	if (err < 0)
		return CNT_LEARN_FAILED;
	u = bpf_map_lookup_elem(&lh_vm_usage, &vm_ifindex);
	if (err && u)
		__sync_fetch_and_add(&u->created, 1);
	return CNT_VM_ORIGIN_LEARNED;
}

/* The VM answered a client's new connection: the address the client reached
 * is one the VM may open connections from. Not for services (their virtual
 * address is the agent's to grant) nor ports with configured addresses. */
static __always_inline int vm_addr_learn(const struct pkt *p, const struct conn_entry *e,
					 const struct iface_cfg *cfg, __u32 ifindex)
{
	struct vm_addr_key ak = { .ifindex = ifindex, .family = p->key.family };
	struct vm_addr v = { .origin = VM_ADDR_LEARNED };

	if ((e->flags & F_ENTRY_VM_ORIGIN) || (cfg->flags & F_IFACE_ADDRS_FIXED) ||
	    (e->vm_ifindex && !(e->flags & F_ENTRY_VM_FAST)))
		return -1;
	__builtin_memcpy(ak.addr, p->key.daddr, sizeof(ak.addr));
	/* known already (every connection to it but the first): a lookup, which
	 * takes no lock, settles it without the update's bucket lock */
	if (bpf_map_lookup_elem(&lh_vm_addrs, &ak) ||
	    bpf_map_update_elem(&lh_vm_addrs, &ak, &v, BPF_NOEXIST))
		return -1;
	return CNT_VM_ADDR_LEARNED;
}

/* The guest's MAC, learned once, for the fast path and service traffic:
 * only from a frame whose source address (key k's saddr, or its daddr when
 * k is reversed) the port's VM owns -- in lh_vm_addrs: configured, learned
 * from its answer to a client, or a service address of its pool. Tenants
 * are hostile and a VM segment may hold another router: its neighbour
 * solicitation, or any frame from an address not the VM's, teaches
 * nothing. Returns 1 when it learned. A global function: verified once,
 * off lh_vmport's budget. */
__noinline int vm_mac_learn(struct __sk_buff *skb, struct iface_cfg *cfg,
			    const struct conn_key *k, int reversed)
{
	struct vm_addr_key ak = {};
	struct ethhdr *eth;

	if (!skb || !cfg || !k || cfg->flags & F_IFACE_VM_MAC)
		return 0;
	eth = eth_of(skb);
	if (!eth)
		return 0;
	ak.ifindex = skb->ifindex;
	ak.family = k->family;
	if (reversed)
		__builtin_memcpy(ak.addr, k->daddr, sizeof(ak.addr));
	else
		__builtin_memcpy(ak.addr, k->saddr, sizeof(ak.addr));
	if (!bpf_map_lookup_elem(&lh_vm_addrs, &ak))
		return 0;
	__builtin_memcpy(cfg->vm_mac, eth->h_source, ETH_ALEN);
	cfg->flags |= F_IFACE_VM_MAC;
	return 1;
}

/* May the VM's answer make this port the connection's shortcut (see
 * uplink_fast)? Only a reply from the port's own guest, on an entry not yet
 * bound to a VM. On a routed host the shortcut also needs the guest to be
 * the one the host itself routes the VM's address to: its first request
 * checks that (F_ENTRY_VM_NEIGH, vm_fast_send), so a connection that never
 * takes the shortcut never pays the lookup. Read before the reply's
 * headers change. */
static __always_inline int vm_fast_eligible(struct __sk_buff *skb, const struct conn_entry *e,
					    const struct iface_cfg *cfg)
{
	struct ethhdr *eth = eth_of(skb);

	if (e->vm_ifindex || !(cfg->flags & F_IFACE_VM_MAC) || !eth)
		return 0;
	return (settings_flags() & F_SET_FAST_PATH) && mac_equal(eth->h_source, cfg->vm_mac);
}

/* A reply (not an ICMP error) of a known connection: track its state, learn
 * the VM's address from its first answer. Returns 1 when it confirms. */
static __always_inline int vmport_track(struct __sk_buff *skb, const struct pkt *p,
					struct conn_entry *e, struct iface_cfg *cfg,
					struct outcome *o)
{
	__u8 before = e->state;
	int confirmed = conn_track(e, p, !!(e->flags & F_ENTRY_VM_ORIGIN));

	if (e->state != before && (before == CS_TCP_SYN_SENT || before == CS_UDP_NEW ||
				   before == CS_ICMP_NEW)) {
		o->table = vm_addr_learn(p, e, cfg, skb->ifindex);
		if (o->table == CNT_VM_ADDR_LEARNED) /* this frame's source: now the VM's */
			vm_mac_learn(skb, cfg, &p->key, 1);
	}
	return confirmed;
}

/* Sends a VM packet of a known connection to its last hop. */
static __always_inline int vmport_reply(struct __sk_buff *skb, struct pkt *p,
					struct conn_entry *e, struct iface_cfg *cfg, int hit,
					struct outcome *o)
{
	int ret, fast;

	if (!(e->flags & F_ENTRY_HOP_KNOWN)) {
		if (e->flags & F_ENTRY_VM_ORIGIN && hit == CNT_REDIRECTED)
			o->reason = CNT_VM_ORIGIN_PENDING;
		return TC_ACT_OK;
	}
	fast = hit == CNT_REDIRECTED && vm_fast_eligible(skb, e, cfg);
	if (failover_needed(settings_flags())) { /* its firewall failed over, or is gone */
		ret = failover_follow(e, &p->key);
		if (ret == FOLLOW_UNREACHABLE) {
			o->reason = CNT_HOP_UNREACHABLE;
			return TC_ACT_OK;
		}
		if (ret == FOLLOW_MOVED)
			count(cfg->slot, CNT_HOP_FOLLOWED);
	}
	ret = reply_to_last_hop(skb, p, e, cfg);
	if (ret < 0) {
		if (ret != -CNT_MISS)
			o->reason = -ret;
		return TC_ACT_OK;
	}
	if (fast) {
		e->vm_ifindex = skb->ifindex;
		e->flags |= F_ENTRY_VM_FAST | (cfg->flags & F_IFACE_ROUTED ? F_ENTRY_VM_NEIGH : 0);
	}
	if (e->flags & F_ENTRY_HOP_EXT)
		o->svc = CNT_ENCAP_REDIRECTED;
	o->reason = hit;
	return ret;
}

/* Finds the entry of a VM packet (an ICMP error: of the packet it quotes)
 * and sends it to the last hop. */
static __always_inline int vmport_conn(struct __sk_buff *skb, struct pkt *p,
				       struct iface_cfg *cfg, struct outcome *o)
{
	int hit = CNT_REDIRECTED, ret, pending, confirmed = 0;
	struct conn_entry *e;

	if (p->icmp_kind == ICMP_KIND_ERROR) { /* its key is the quote's (vmport_main) */
		o->reason = CNT_ICMP_ERROR_MISS;
		hit = CNT_ICMP_ERROR_REDIRECTED;
	} else if (p->icmp_kind == ICMP_KIND_OTHER) {
		o->reason = CNT_ICMP_OTHER;
		return TC_ACT_OK;
	} else {
		conn_key_reverse(&p->key);
		o->reason = CNT_MISS;
	}
	e = conn_lookup(p, &pending);
	if (!e) {
		if (hit == CNT_REDIRECTED)
			o->reason = vm_origin_learn(p, skb->ifindex);
		return TC_ACT_OK;
	}
	if (hit == CNT_REDIRECTED)
		confirmed = vmport_track(skb, p, e, cfg, o);
	ret = vmport_reply(skb, p, e, cfg, hit, o);
	if (confirmed)
		o->table = conn_confirm(&p->key, e, pending);
	return ret;
}

/* A VM port's packet, parsed (an ICMP error's key: the quoted packet's):
 * sent to its last hop, or learned, or passed; counted. A global function,
 * as uplink_parsed: verified once, whichever way the parser went. */
__noinline int vmport_parsed(struct __sk_buff *skb, struct pkt *p)
{
	struct iface_cfg *cfg = iface_get(skb->ifindex, ROLE_VM_PORT);
	struct outcome o = { .svc = -1, .table = -1 };
	int ret;

	if (!p || !cfg)
		return TC_ACT_OK;
	ret = vmport_conn(skb, p, cfg, &o);
	if (p->frag && p->icmp_kind == ICMP_KIND_NONE)
		frag_remember(p, ret, 0); /* its key reversed: not for an ICMP error's quote */
	count_outcome(cfg->slot, p, &o);
	return ret;
}

/* after_fast: as uplink_main's. */
static __always_inline int vmport_main(struct __sk_buff *skb, int after_fast)
{
	struct iface_cfg *cfg = iface_get(skb->ifindex, ROLE_VM_PORT);
	struct outcome o = { .svc = -1, .table = -1 };
	struct pkt p = {};
	struct cursor c;
	int ret = TC_ACT_OK;

	if (!cfg) {
		count(0, CNT_NO_IFACE);
		return TC_ACT_OK;
	}
	o.reason = parse_packet(skb, &p, &c);
	p.key.zone = cfg->zone;
	if (o.reason < 0) {
		o.reason = -o.reason;
		if (p.frag_later)
			ret = frag_follow_to_hop(skb, &p, cfg, &o.reason, &o.svc);
		goto out;
	}
	if (!(cfg->flags & F_IFACE_VM_MAC)) /* learned once: no call after */
		vm_mac_learn(skb, cfg, &p.key, 0);
	/* an ICMP error is about the packet it quotes: its key, read here
	 * where the cursor is a packet pointer */
	if (p.icmp_kind == ICMP_KIND_ERROR && icmp_error_key(&p, &c) < 0) {
		o.reason = CNT_ICMP_ERROR_MISS;
		goto out;
	}
	p.confirmed_miss = after_fast ? skb->cb[CB_CONFIRMED_MISS] : 0;
	return vmport_parsed(skb, &p);
out:
	count_outcome(cfg->slot, &p, &o);
	return ret;
}

/* The common case first (fast_reply), else the general path (told when
 * the fast path missed the key in the confirmed table). */
static __always_inline int vmport_entry(struct __sk_buff *skb)
{
	struct iface_cfg *cfg = iface_get(skb->ifindex, ROLE_VM_PORT);
	int ret;

	skb->cb[CB_CONFIRMED_MISS] = MISS_NONE; /* fast_lookup's MISS_* when it misses */
	ret = cfg ? fast_reply(skb, cfg) : FAST_NONE;
	return ret != FAST_NONE ? ret : vmport_main(skb, 1);
}

SEC("tc")
int lh_vmport(struct __sk_buff *skb)
{
	return vmport_entry(skb);
}

/* Only ICMP and ICMPv6 frames (untagged, IPv6 without extension headers)
 * are worth parsing on uplink egress, which carries every reply; the test
 * reads two bytes. */
static __always_inline int maybe_icmp(struct __sk_buff *skb)
{
	struct ethhdr *eth = eth_of(skb);
	struct iphdr *ip;
	struct ipv6hdr *ip6;

	if (!eth)
		return 0;
	ip = (void *)(eth + 1);
	ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > (void *)(long)skb->data_end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return ip->protocol == IPPROTO_ICMP;
	return eth->h_proto == bpf_htons(ETH_P_IPV6) && ip6->nexthdr == IPPROTO_ICMPV6;
}

/* A host-sent ICMP error goes to the last hop of the connection it quotes:
 * destination MAC := last hop (source MAC := that uplink's), redirected when
 * the connection came in on another uplink. Like a VM's reply, it follows
 * the hop's fail-over (counted hop_followed on this uplink's slot). */
static __always_inline int host_icmp_to_last_hop(struct __sk_buff *skb, struct pkt *p,
						 struct cursor *c, __u32 slot, int *reason)
{
	struct conn_entry *e;
	struct iface_cfg *up;
	__u32 ifindex;
	int pending, follow;

	*reason = CNT_HOST_ICMP_MISS;
	if (icmp_error_key(p, c) < 0)
		return TC_ACT_OK;
	e = conn_lookup(p, &pending);
	if (!e || !(e->flags & F_ENTRY_HOP_KNOWN))
		return TC_ACT_OK;
	if (e->vlan_count || (e->flags & F_ENTRY_HOP_EXT)) {
		*reason = CNT_HOST_ICMP_TAGGED; /* the host's own tagging (or tunnel) applies */
		return TC_ACT_OK;
	}
	if (failover_needed(settings_flags())) {
		follow = failover_follow(e, &p->key);
		if (follow == FOLLOW_UNREACHABLE) {
			*reason = CNT_HOP_UNREACHABLE;
			return TC_ACT_OK;
		}
		if (follow == FOLLOW_MOVED)
			count(slot, CNT_HOP_FOLLOWED);
	}
	ifindex = e->ifindex;
	up = iface_get(ifindex, ROLE_UPLINK);
	if (up && up->flags & F_IFACE_LINK_DOWN) {
		*reason = CNT_HOP_DOWN;
		return TC_ACT_OK;
	}
	if (!up || rewrite_l2(skb, p, 0, up->mac, e->mac) < 0)
		return TC_ACT_OK;
	if (ifindex != skb->ifindex) {
		struct ethhdr *eth = eth_of(skb);

		if (!eth)
			return TC_ACT_OK;
		__builtin_memcpy(eth->h_source, up->mac, ETH_ALEN);
	}
	*reason = CNT_HOST_ICMP_REDIRECTED;
	if (ifindex == skb->ifindex)
		return TC_ACT_OK; /* already leaving by the right interface */
	trace_redirect(ifindex);
	return bpf_redirect(ifindex, 0);
}

/* Uplink egress: ICMP errors the host itself sends about a connection (a
 * routed host's "fragmentation needed" when a VM's link is narrower, "time
 * exceeded") follow the connection's last hop, as the VMs' own do -- so
 * path-MTU discovery works through the host too. Everything else leaves
 * untouched and uncounted (this hook also carries every redirected reply). */
SEC("tc")
int lh_uplink_out(struct __sk_buff *skb)
{
	struct iface_cfg *cfg = iface_get(skb->ifindex, ROLE_UPLINK);
	struct pkt p = {};
	struct cursor c;
	int reason, ret;

	if (!cfg || cfg->link_kind == LINK_L3 || !maybe_icmp(skb))
		return TC_ACT_OK; /* an L3 link's frames have no MAC to choose */
	reason = parse_packet(skb, &p, &c);
	if (reason < 0 || p.icmp_kind != ICMP_KIND_ERROR)
		return TC_ACT_OK;
	p.key.zone = cfg->zone;
	ret = host_icmp_to_last_hop(skb, &p, &c, cfg->slot, &reason);
	count(cfg->slot, reason);
	return ret;
}

/* The data path's clock for the agent: returns the low 32 bits of jiffies.
 * Entries are stamped with jiffies because bpf_jiffies64() costs ~2 ns where
 * bpf_ktime_get_coarse_ns() cost ~20 ns per packet. Pinned; run by test run. */
SEC("tc")
int lh_clock(struct __sk_buff *skb)
{
	return now32();
}

/* The expiry pass (expire.h), run by the agent through BPF_PROG_TEST_RUN
 * every second. It drains the deadline index when something in it is due,
 * and walks only when the table changed since the last walk or the next
 * walk's moment has come: a table at rest costs nothing, however large.
 * Returns 1 when it walked, 2 when it had no need to, 0 when the agent has
 * not configured the data path yet (no HZ: no timeout means anything). */
SEC("tc")
int lh_expire(struct __sk_buff *skb)
{
	return expire_run();
}

/* Each table's element count as the kernel keeps it (exact, including LRU
 * evictions), both families summed, into lh_expiry[0].elements: what `stats` reads instead of
 * walking the table. The in-place entries (lh_inplace) are pending connections
 * in the confirmed maps: counted with the pending ones. Run by test run. */
SEC("tc")
int lh_stats(struct __sk_buff *skb)
{
	struct inplace_count *c;
	struct expiry_stats *st;
	__u32 zero = 0;
	__s64 inplace;

	st = bpf_map_lookup_elem(&lh_expiry, &zero);
	c = bpf_map_lookup_elem(&lh_inplace, &zero);
	if (!st || !c)
		return 0;
	st->elements[0] = bpf_map_sum_elem_count((struct bpf_map *)&lh_conns4) +
			  bpf_map_sum_elem_count((struct bpf_map *)&lh_conns);
	st->elements[1] = bpf_map_sum_elem_count((struct bpf_map *)&lh_pending4) +
			  bpf_map_sum_elem_count((struct bpf_map *)&lh_pending);
	/* the count is taken before an insert: ahead of the map by inserts under way */
	inplace = c->count < st->elements[0] ? c->count : st->elements[0];
	st->elements[0] -= inplace;
	st->elements[1] += inplace;
	return 1;
}

/* Moves or forgets a service's connections (svc_walk.h): the frame is a
 * struct svc_walk, read as the request and written back with the counts.
 * Run by test run (the agent's services, through its pin). Returns 1, or 0
 * when the frame is too short. */
SEC("tc")
int lh_svc_walk(struct __sk_buff *skb)
{
	struct svc_walk *req = (void *)(long)skb->data;
	struct svc_walk_ctx ctx = {};

	if ((void *)(req + 1) > (void *)(long)skb->data_end)
		return 0;
	ctx.req = *req;
	svc_walk_tables(&ctx);
	req->moved = ctx.req.moved;
	req->dropped = ctx.req.dropped;
	return 1;
}

/* Stores a hop descriptor as learning does (hop_desc_resolve: the slot that
 * holds the same content, else a free one claimed): the frame is a struct
 * hop_desc, its .mark, .reserved2 and .gen ignored. Run by test run (the
 * agent's import, the sync's applier, an upgrade: user space cannot
 * compare-and-swap a slot). Returns 1 with the id written into the frame's
 * .mark, 0 when the frame is no descriptor (short, or an unknown kind), or
 * the reason the hop was refused (CNT_HOP_DESC_FULL, CNT_HOP_SLOT_BUSY). */
SEC("tc")
int lh_hop_put(struct __sk_buff *skb)
{
	struct hop_desc *req = (void *)(long)skb->data;
	struct hop_desc d;
	__u32 id = 0;
	int err;

	if ((void *)(req + 1) > (void *)(long)skb->data_end)
		return 0;
	__builtin_memcpy(&d, req, sizeof(d));
	if (d.kind != HOP_TUNNEL4 && d.kind != HOP_TUNNEL6 && d.kind != HOP_MPLS)
		return 0;
	d.reserved2 = 0;
	d.gen = 0;
	err = hop_desc_resolve(&d, &id);
	if (err)
		return -err;
	req->mark = id;
	return 1;
}

/* The agent removes a connection from its family's confirmed table (flush,
 * services, the sync's removals): the full conn_key is the frame. An
 * in-place entry gives its place in the quota back (inplace_clear): user
 * space cannot clear its bit atomically. Run by test run. Returns 0 when the
 * table has no such entry, 1 when it removed a confirmed one, 2 an in-place
 * one (a pending connection). Neither counted nor reported: the agent does
 * both, as for the pending table's removals it makes itself. */
SEC("tc")
int lh_conn_remove(struct __sk_buff *skb)
{
	struct conn_key *req = (void *)(long)skb->data;
	struct conn_entry *e;
	struct conn_key k;
	int inplace;

	if ((void *)(req + 1) > (void *)(long)skb->data_end)
		return 0;
	__builtin_memcpy(&k, req, sizeof(k));
	e = conn_table_lookup(0, &k);
	if (!e)
		return 0;
	inplace = inplace_clear(e);
	if (conn_table_delete(0, &k))
		return 0; /* another CPU removed it first (and counts it) */
	return 1 + inplace;
}

/* `lasthop flush --out-of-scope`: removes, in the kernel, every entry the
 * scope rules in lh_scope now pass (prune.h); returns how many. Run by test run. */
SEC("tc")
int lh_scope_flush(struct __sk_buff *skb)
{
	return prune(PRUNE_OUT_OF_SCOPE);
}

/* A reload removed an uplink: removes the entries whose last hop's uplink is
 * no longer attached (prune.h); returns how many. Run by test run. */
SEC("tc")
int lh_prune_uplinks(struct __sk_buff *skb)
{
	return prune(PRUNE_GONE_UPLINK);
}

/* The benchmark's reference for a reply: the irreducible work of one --
 * parse Ethernet/IPv4/TCP, one lookup of a 16-byte key in an LRU hash,
 * rewrite the destination MAC, redirect. lasthop's own paths are measured
 * against it in the same run (bench/datapath.py). Never attached. */
struct ref_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u32 proto;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ref_key);
	__type(value, struct conn_entry);
} lh_ref_conns SEC(".maps");

/* What lh_reference adds to its work (bench builds: the floors below). */
enum ref_floor {
	REF_PLAIN,	/* nothing: lh_reference itself */
	REF_TUNNEL_KEY, /* bpf_skb_set_tunnel_key, as a reply through a VXLAN hop */
	REF_MPLS_PUSH,	/* BENCH_MPLS_LABELS labels pushed, as a reply under MPLS */
};

#ifdef LH_BENCH
static __always_inline int ref_floor_add(struct __sk_buff *skb, enum ref_floor floor, __u8 ttl);
#endif

/* A constant *floor* leaves the code of the others out: lh_reference's own is
 * what it was before the floors (the same instructions). */
static __always_inline int reference_run(struct __sk_buff *skb, enum ref_floor floor)
{
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = eth_of(skb);
	struct ref_key k = {};
	struct conn_entry *e;
	struct iphdr *ip;
	struct tcphdr *th;

	if (!eth || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	th = (void *)ip + ip->ihl * 4;
	if ((void *)(th + 1) > data_end)
		return TC_ACT_OK;
	k.saddr = ip->daddr; /* the reply reversed onto the request's key */
	k.daddr = ip->saddr;
	k.sport = th->dest;
	k.dport = th->source;
	k.proto = IPPROTO_TCP;
	e = bpf_map_lookup_elem(&lh_ref_conns, &k);
	if (!e)
		return TC_ACT_OK;
	__builtin_memcpy(eth->h_dest, e->mac, ETH_ALEN);
#ifdef LH_BENCH
	if (floor != REF_PLAIN && ref_floor_add(skb, floor, ip->ttl))
		return TC_ACT_SHOT;
#endif
	return bpf_redirect(e->ifindex, 0);
}

SEC("tc")
int lh_reference(struct __sk_buff *skb)
{
	return reference_run(skb, REF_PLAIN);
}

#ifdef LH_TRACE_REDIRECT
/* Test builds only: lh_uplink and lh_vmport without their fast path, so the
 * fast path's test (tests/bpf/test_fastpath.py) can hold it to what the
 * general path does with the same packet. */
SEC("tc")
int lh_uplink_general(struct __sk_buff *skb)
{
	return uplink_main(skb, 0, 0);
}

SEC("tc")
int lh_vmport_general(struct __sk_buff *skb)
{
	return vmport_main(skb, 0);
}
#endif

/* The baseline the benchmark compares against: a tc program that does nothing. */
SEC("tc")
int lh_empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

#ifdef LH_BENCH
/* Bench builds only (bench/datapath.py): test run repeats one frame, so a
 * repeated SYN is a new connection only once. These run lh_uplink's and
 * lh_vmport's code, then add one to the frame's client address (untagged
 * IPv4: the source address on the uplink, the destination on the VM port),
 * so each of `repeat` runs is a packet of the next new connection. lh_step
 * is the step alone, the cost the bench subtracts. */
#define BENCH_SADDR_OFF 26 /* Ethernet 14 + offsetof(struct iphdr, saddr) */
#define BENCH_DADDR_OFF 30

static __always_inline void bench_step(struct __sk_buff *skb, __u32 off)
{
	void *data = (void *)(long)skb->data;
	__be32 *a = data + off;

	if ((void *)(a + 1) <= (void *)(long)skb->data_end)
		*a = bpf_htonl(bpf_ntohl(*a) + 1);
}

SEC("tc")
int lh_bench_uplink(struct __sk_buff *skb)
{
	int ret = uplink_entry(skb);

	bench_step(skb, BENCH_SADDR_OFF);
	return ret;
}

SEC("tc")
int lh_bench_vmport(struct __sk_buff *skb)
{
	int ret = vmport_entry(skb);

	bench_step(skb, BENCH_DADDR_OFF);
	return ret;
}

/* lh_vmport on a routed reply, its IPv4 TTL put back after each run (+ 1,
 * the checksum patched as mpls_set_ttl4 does: nothing is kept across the
 * run, whose stack is lh_vmport's), so `repeat` runs see the same packet,
 * not one whose TTL runs out. (Untagged frame.) */
SEC("tc")
int lh_bench_vmport_ttl(struct __sk_buff *skb)
{
	int ret = vmport_entry(skb);
	struct ethhdr *eth = eth_of(skb);
	struct iphdr *ip;

	if (ret != TC_ACT_REDIRECT || !eth)
		return ret;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) <= (void *)(long)skb->data_end)
		mpls_set_ttl4(ip, ip->ttl + 1);
	return ret;
}

/* lh_vmport on a reply through an MPLS hop of BENCH_MPLS_LABELS labels, the
 * labels taken off again after each run (bench_mpls_undo), so `repeat` runs
 * see the same frame. The undo is timed with the run: the bench subtracts
 * its cost, measured alone by lh_bench_mpls_undo in the same rounds.
 *
 * The undo takes the labels' bytes off at the head, whichever way the push
 * grew the frame: by bpf_skb_adjust_room at the MAC header (the MAC header
 * 14 bytes, the labels after it) or by bpf_skb_change_head (the MAC header
 * reset to the frame's start: all 22 bytes). adjust_room's shrink removes
 * bytes after the MAC header, which after change_head is the IP header, and
 * no tc helper pulls the head -- but __skb_vlan_pop does: it moves the MAC
 * addresses 4 bytes on and pulls 4, the next type read from the frame. So
 * the undo writes the 10 bytes after the addresses as two 802.1Q tags and
 * the IPv4 type (over the type and the labels), pushes two tags as skb
 * metadata (the second push moves the first into the frame, in front of the
 * written ones, and makes skb->protocol 802.1Q: the only way a helper sets
 * it to a tag's), then pops four times: the metadata tag, then the three
 * tags in the frame, each moved to the metadata and dropped by the next pop.
 * 12 bytes in, 12 bytes out: the frame is the reply again, protocol IPv4,
 * MAC header 14 bytes, no tag (skbuff.c: skb_vlan_push, skb_vlan_pop). */
#define BENCH_MPLS_LABELS 2
#define BENCH_UNDO_TAGS   3 /* tags the undo takes off: BENCH_MPLS_LABELS * 4 + 4 bytes */

_Static_assert(BENCH_UNDO_TAGS * 4 == BENCH_MPLS_LABELS * MPLS_LSE_LEN + 4,
	       "the undo's tags cover the labels and the tag its second push moves in");

static __always_inline int bench_mpls_undo(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__be16 *w = data + 2 * ETH_ALEN;

	if ((void *)(w + 2 * (BENCH_UNDO_TAGS - 1) + 1) > end)
		return -1;
	w[0] = bpf_htons(ETH_P_8021Q);
	w[1] = 0;
	w[2] = bpf_htons(ETH_P_8021Q);
	w[3] = 0;
	w[4] = bpf_htons(ETH_P_IP);
	if (bpf_skb_vlan_push(skb, bpf_htons(ETH_P_8021Q), 0) ||
	    bpf_skb_vlan_push(skb, bpf_htons(ETH_P_8021Q), 0))
		return -1;
#pragma unroll
	for (int i = 0; i < BENCH_UNDO_TAGS + 1; i++)
		if (bpf_skb_vlan_pop(skb))
			return -1;
	return 0;
}

SEC("tc")
int lh_bench_vmport_mpls(struct __sk_buff *skb)
{
	int ret = vmport_entry(skb);

	if (ret == TC_ACT_REDIRECT)
		bench_mpls_undo(skb);
	return ret;
}

/* The undo alone: the bench runs it on a frame with BENCH_MPLS_LABELS * 4
 * bytes after its Ethernet header for each of its `repeat` runs, so every
 * run takes off as much as lh_bench_vmport_mpls's undo does (the bench
 * checks the frame after). Returns TC_ACT_OK, or TC_ACT_SHOT when
 * the undo failed. */
SEC("tc")
int lh_bench_mpls_undo(struct __sk_buff *skb)
{
	return bench_mpls_undo(skb) ? TC_ACT_SHOT : TC_ACT_OK;
}

/* The floors of issue 9's tunnel targets: lh_reference's work and the one
 * helper a reply through that hop cannot do without -- the tunnel key set
 * (bpf_skb_set_tunnel_key, a key built on the stack), or BENCH_MPLS_LABELS
 * labels pushed (bpf_skb_change_head, the addresses moved, the type, the
 * labels with the IP TTL), taken off again as lh_bench_vmport_mpls's are
 * (the bench subtracts that undo, as from the MPLS reply). Each against
 * lh_reference is the lowest ratio a reply through that hop can have to a
 * plain one (bench/datapath.py). Returns 0, or -1 when a helper failed. */
#define BENCH_VNI	100
#define BENCH_VTEP	0xc0000201 /* 192.0.2.1 */
#define BENCH_MPLS_LSE0 (16001 << 12 | 5 << 9)
#define BENCH_MPLS_LSE1 (24002 << 12 | 5 << 9)

static __always_inline int ref_floor_add(struct __sk_buff *skb, enum ref_floor floor, __u8 ttl)
{
	const __u32 shift = BENCH_MPLS_LABELS * MPLS_LSE_LEN;
	struct bpf_tunnel_key key = {};
	void *data, *end;
	__be32 *lse;

	if (floor == REF_TUNNEL_KEY) {
		key.tunnel_id = BENCH_VNI;
		key.tunnel_ttl = 64;
		key.remote_ipv4 = BENCH_VTEP;
		return bpf_skb_set_tunnel_key(skb, &key, sizeof(key), 0) ? -1 : 0;
	}
	if (bpf_skb_change_head(skb, shift, 0))
		return -1;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + shift > end)
		return -1;
	__builtin_memmove(data, data + shift, 2 * ETH_ALEN);
	*(__be16 *)(data + 2 * ETH_ALEN) = bpf_htons(ETH_P_MPLS_UC);
	lse = data + ETH_HLEN;
	lse[0] = bpf_htonl(BENCH_MPLS_LSE0 | ttl);
	lse[1] = bpf_htonl(BENCH_MPLS_LSE1 | MPLS_LS_S_MASK | ttl);
	return bench_mpls_undo(skb);
}

SEC("tc")
int lh_bench_ref_vxlan(struct __sk_buff *skb)
{
	return reference_run(skb, REF_TUNNEL_KEY);
}

SEC("tc")
int lh_bench_ref_mpls(struct __sk_buff *skb)
{
	return reference_run(skb, REF_MPLS_PUSH);
}

SEC("tc")
int lh_bench_step(struct __sk_buff *skb)
{
	bench_step(skb, BENCH_SADDR_OFF);
	return TC_ACT_OK;
}
#endif
