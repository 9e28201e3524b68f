/* lasthop.c: the tc entry points.
 *  lh_uplink  (uplink ingress):  learn or refresh each connection's last hop.
 *  lh_vmport  (VM port ingress): send each reply back to its last hop.
 * Both pass, unchanged and counted, whatever they cannot parse. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "rewrite.h"

char LICENSE[] SEC("license") = "GPL";

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
	e->flags = (e->flags & ~F_ENTRY_OUTER_8021AD) | F_ENTRY_HOP_KNOWN |
		   (p->outer_ad ? F_ENTRY_OUTER_8021AD : 0);
}

static __always_inline int conn_hop_same(const struct conn_entry *e, const struct pkt *p,
					 const __u8 *mac, __u32 ifindex)
{
	return (e->flags & F_ENTRY_HOP_KNOWN) && e->ifindex == ifindex &&
	       e->vlan_count == p->vlan_count && e->vlan_tci[0] == p->vlan_tci[0] &&
	       e->vlan_tci[1] == p->vlan_tci[1] &&
	       *(__u32 *)e->mac == *(__u32 *)mac && *(__u16 *)(e->mac + 4) == *(__u16 *)(mac + 4);
}

static __always_inline __u32 settings_flags(void)
{
	__u32 zero = 0;
	struct lh_settings *s = bpf_map_lookup_elem(&lh_settings, &zero);

	return s ? s->flags : 0;
}

/* Uplink packet of a known connection: refresh it, re-learn the hop on a SYN
 * or (relearn = latest) on a new MAC. Returns the counter to record. */
static __always_inline int conn_refresh(struct conn_entry *e, const struct pkt *p,
					const __u8 *mac, __u32 ifindex)
{
	int syn = (p->tcp_flags & (TCP_FLAG_SYN_ | TCP_FLAG_ACK_)) == TCP_FLAG_SYN_;
	int reason = CNT_REFRESHED;

	e->last_seen = bpf_ktime_get_coarse_ns();
	e->packets++;
	if (conn_hop_same(e, p, mac, ifindex))
		return CNT_REFRESHED;
	if (!(e->flags & F_ENTRY_HOP_KNOWN))
		reason = CNT_LEARNED; /* first uplink packet of a VM-opened connection */
	else if (syn || !(settings_flags() & F_SET_RELEARN_FIRST))
		reason = CNT_RELEARNED;
	else
		return CNT_REFRESHED;
	conn_set_hop(e, p, mac, ifindex);
	return reason;
}

static __always_inline int conn_learn(const struct pkt *p, const __u8 *mac, __u32 ifindex)
{
	struct conn_entry e = {};

	e.last_seen = bpf_ktime_get_coarse_ns();
	e.packets = 1;
	conn_set_hop(&e, p, mac, ifindex);
	if (bpf_map_update_elem(&lh_conns, &p->key, &e, BPF_ANY))
		return CNT_LEARN_FAILED;
	return CNT_LEARNED;
}

/* Returns the config of skb's interface, or NULL when the agent did not
 * attach it with that role (counted in slot 0). */
static __always_inline struct iface_cfg *iface_of(struct __sk_buff *skb, __u8 role)
{
	__u32 ifindex = skb->ifindex;
	struct iface_cfg *cfg = bpf_map_lookup_elem(&lh_ifaces, &ifindex);

	return cfg && cfg->role == role ? cfg : NULL;
}

static __always_inline int pass_reason(const struct pkt *p)
{
	if (p->icmp_kind == ICMP_KIND_OTHER)
		return CNT_ICMP_OTHER;
	if (p->icmp_kind == ICMP_KIND_ERROR)
		return CNT_ICMP_ERROR_MISS;
	return -1;
}

SEC("tc")
int lh_uplink(struct __sk_buff *skb)
{
	struct iface_cfg *cfg = iface_of(skb, ROLE_UPLINK);
	struct pkt p = {};
	struct cursor c;
	struct conn_entry *e;
	struct ethhdr *eth;
	int reason;

	if (!cfg) {
		count(0, CNT_NO_IFACE);
		return TC_ACT_OK;
	}
	reason = parse_packet(skb, &p, &c);
	if (reason < 0) {
		reason = -reason;
		goto out;
	}
	reason = pass_reason(&p); /* ICMP errors and ND from outside are not connections */
	if (reason >= 0)
		goto out;
	eth = (void *)(long)skb->data;
	if ((void *)(eth + 1) > (void *)(long)skb->data_end) {
		reason = CNT_MALFORMED;
		goto out;
	}
	p.key.zone = cfg->zone;
	e = bpf_map_lookup_elem(&lh_conns, &p.key);
	if (e)
		reason = conn_refresh(e, &p, eth->h_source, skb->ifindex);
	else
		reason = conn_learn(&p, eth->h_source, skb->ifindex);
out:
	if (p.ip_options)
		count(cfg->slot, CNT_IP_OPTIONS);
	if (p.ipv6_ext)
		count(cfg->slot, CNT_IPV6_EXT);
	count(cfg->slot, reason);
	return TC_ACT_OK;
}

/* An ICMP error a VM sends about a connection: the key is the quoted packet
 * (the request, as it arrived), so no reversal. */
static __always_inline int icmp_error_key(struct pkt *p, struct cursor *c)
{
	struct conn_key quoted = {};
	int err = parse_quoted(c, &quoted);

	if (err)
		return err;
	quoted.zone = p->key.zone;
	p->key = quoted;
	return 0;
}

SEC("tc")
int lh_vmport(struct __sk_buff *skb)
{
	struct iface_cfg *cfg = iface_of(skb, ROLE_VM_PORT);
	struct pkt p = {};
	struct cursor c;
	struct conn_entry *e;
	int reason, hit = CNT_REDIRECTED, ret = TC_ACT_OK;

	if (!cfg) {
		count(0, CNT_NO_IFACE);
		return TC_ACT_OK;
	}
	reason = parse_packet(skb, &p, &c);
	if (reason < 0) {
		reason = -reason;
		goto out;
	}
	p.key.zone = cfg->zone;
	if (p.icmp_kind == ICMP_KIND_ERROR) {
		reason = icmp_error_key(&p, &c);
		if (reason < 0) {
			reason = CNT_ICMP_ERROR_MISS;
			goto out;
		}
		hit = CNT_ICMP_ERROR_REDIRECTED;
	} else if (p.icmp_kind == ICMP_KIND_OTHER) {
		reason = CNT_ICMP_OTHER;
		goto out;
	} else {
		conn_key_reverse(&p.key);
	}
	e = bpf_map_lookup_elem(&lh_conns, &p.key);
	if (!e || !(e->flags & F_ENTRY_HOP_KNOWN)) {
		reason = hit == CNT_REDIRECTED ? CNT_MISS : CNT_ICMP_ERROR_MISS;
		goto out;
	}
	ret = reply_to_last_hop(skb, &p, e, cfg);
	if (ret < 0) {
		reason = -ret;
		ret = TC_ACT_OK;
		if (reason == CNT_MISS && hit != CNT_REDIRECTED)
			reason = CNT_ICMP_ERROR_MISS;
		goto out;
	}
	reason = hit;
out:
	if (p.ip_options)
		count(cfg->slot, CNT_IP_OPTIONS);
	if (p.ipv6_ext)
		count(cfg->slot, CNT_IPV6_EXT);
	count(cfg->slot, reason);
	return ret;
}

/* The baseline the benchmark compares against: a tc program that does nothing. */
SEC("tc")
int lh_empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}
