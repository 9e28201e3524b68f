/* parse.h: header parsers, Ethernet to L4, for tc programs.
 * Each parse_<hdr>(c, ...) advances the cursor past its header and returns the
 * next protocol (>= 0) or a negative enum lh_counter reason to pass with.
 * Fields are read in network order and stored in network order unless noted. */
#pragma once

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "abi.h"

#define ETH_P_8021AD_ 0x88A8
#define IP_MF_        0x2000
#define IP_OFFSET_    0x1FFF
#define IP6_OFFSET_   0xFFF8 /* IPv6 fragment header: offset, in 8-byte units, above 3 flag bits */
#define IP6_MF_       0x0001
#define TCP_FLAG_FIN_ 0x01
#define TCP_FLAG_SYN_ 0x02
#define TCP_FLAG_RST_ 0x04
#define TCP_FLAG_ACK_ 0x10

struct cursor {
	void *pos;
	void *end;
};

/* What the ICMP header says the packet is. */
enum icmp_kind {
	ICMP_KIND_NONE  = 0, /* not ICMP */
	ICMP_KIND_ECHO  = 1, /* echo request or reply: keyed by identifier */
	ICMP_KIND_ERROR = 2, /* error quoting a packet of some connection */
	ICMP_KIND_OTHER = 3, /* anything else: passed */
};

/* A parsed packet. key is as read (saddr = this packet's source). */
struct pkt {
	struct conn_key key;
	__u16 vlan_tci[MAX_VLAN_TAGS]; /* host order, [0] outer */
	__u8  vlan_count;
	__u8  outer_ad;     /* outer tag is 802.1ad */
	__u8  tcp_flags;
	__u32 tcp_seq;      /* host order */
	__u32 tcp_ack;      /* host order */
	__u8  icmp_kind;    /* enum icmp_kind */
	__u8  echo_request; /* ICMP(v6) echo request: an ICMP "connection" opens with one */
	__u8  ip_options;   /* IPv4 header longer than 20 bytes */
	__u8  ipv6_ext;     /* IPv6 extension headers skipped */
	__u16 l3_off;       /* offset of the IP header from the frame start */
	__u32 l3_len;       /* the datagram's length as its IP header states it */
	void *l3;           /* the IP header (valid until the packet changes) */
	/* Fragments: frag != 0 for any fragment, frag_later != 0 for one after
	 * the first (no L4 header: the key holds addresses and protocol only).
	 * Both keep the header's bits as read, not 0/1: the verifier then
	 * tracks no constant through the rest of the program, so fragments
	 * do not double its states. */
	__u16 frag;         /* IPv4 MF and offset, or IPv6 offset and M, as read */
	__u16 frag_later;   /* the offset bits alone */
	__u8  frag_proto;   /* fragment: IPv4 protocol, or the fragment header's next header */
	__u8  l3_link;      /* no Ethernet header: the frame arrived on an L3 link (set before parsing) */
	__u32 frag_id;      /* fragment: IPv4 identification or IPv6 fragment id, network order */
	__u8  hop_ext;      /* uplink: vlan_tci holds a hop descriptor's id (encap.h) */
	__u8  confirmed_miss; /* MISS_*: a fast path looked the key up and missed it in the
			       * confirmed table (fastpath.h): conn_lookup asks the pending one
			       * only, or (MISS_BOTH) neither */
};

/* The frame's Ethernet header, or NULL when the frame is shorter. */
static __always_inline struct ethhdr *eth_of(struct __sk_buff *skb)
{
	struct ethhdr *eth = (void *)(long)skb->data;

	return (void *)(eth + 1) <= (void *)(long)skb->data_end ? eth : NULL;
}

/* Whether n bytes from the cursor lie inside the IP datagram. Bytes after it
 * are Ethernet padding, not headers: the frame's end is not enough. */
static __always_inline int in_datagram(const struct cursor *c, const struct pkt *p, __u32 n)
{
	return LH_BROKEN_DATAGRAM_CHECK || c->pos + n - p->l3 <= p->l3_len;
}

/* Ethernet, then up to MAX_VLAN_TAGS 802.1Q/802.1ad tags in the data.
 * Returns the ethertype in host order. */
static __always_inline int parse_eth(struct cursor *c, struct pkt *p)
{
	struct ethhdr *eth = c->pos;
	__u16 proto;

	if ((void *)(eth + 1) > c->end)
		return -CNT_MALFORMED;
	proto = bpf_ntohs(eth->h_proto);
	c->pos = eth + 1;

#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		struct vlan_hdr { __be16 tci; __be16 proto; } *vh = c->pos;

		if (proto != ETH_P_8021Q && proto != ETH_P_8021AD_)
			break;
		if ((void *)(vh + 1) > c->end)
			return -CNT_MALFORMED;
		if (p->vlan_count >= MAX_VLAN_TAGS)
			return -CNT_NOT_IP; /* a third tag: not ours to handle */
		if (p->vlan_count == 0 && proto == ETH_P_8021AD_)
			p->outer_ad = 1;
		p->vlan_tci[p->vlan_count & 1] = bpf_ntohs(vh->tci);
		p->vlan_count++;
		proto = bpf_ntohs(vh->proto);
		c->pos = vh + 1;
	}
	if (proto == ETH_P_8021Q || proto == ETH_P_8021AD_)
		return -CNT_NOT_IP;
	return proto;
}

/* IPv4: checks IHL and total length against the frame; options are skipped.
 * A later fragment (no ports to key on) returns -CNT_FRAGMENT with the
 * addresses in the key. Returns the L4 protocol. */
static __always_inline int parse_ipv4(struct cursor *c, struct pkt *p, struct __sk_buff *skb)
{
	struct iphdr *ip = c->pos;
	__u32 hlen, tot, off = p->l3_off, frame_len = skb->len;

	if ((void *)(ip + 1) > c->end)
		return -CNT_MALFORMED;
	hlen = ip->ihl * 4;
	tot = bpf_ntohs(ip->tot_len);
	/* total length 0 on a GSO packet: BIG TCP GRO over 64 KiB, as long as the
	 * frame (the kernel's iph_totlen() reads it so too) */
	if (!tot && skb->gso_size)
		tot = frame_len - off;
	if (ip->version != 4 || hlen < sizeof(*ip) || tot < hlen || off + tot > frame_len)
		return -CNT_MALFORMED;
	if (c->pos + hlen > c->end)
		return -CNT_MALFORMED;
	p->ip_options = hlen > sizeof(*ip);
	p->l3_len = tot;
	p->key.family = FAMILY_V4;
	p->key.proto = ip->protocol;
	p->key.saddr[0] = ip->saddr;
	p->key.daddr[0] = ip->daddr;
	c->pos += hlen;
	/* a fragment: the first carries the ports, the later ones follow it (frag.h) */
	p->frag = ip->frag_off & bpf_htons(IP_MF_ | IP_OFFSET_);
	if (p->frag) {
		p->frag_later = ip->frag_off & bpf_htons(IP_OFFSET_);
		p->frag_proto = ip->protocol;
		p->frag_id = ip->id;
		if (p->frag_later)
			return -CNT_FRAGMENT;
	}
	return ip->protocol;
}

/* The IPv6 fragment header (RFC 8200 4.5): one per packet. Returns the next
 * header; fills p's fragment fields unless it is an atomic fragment (offset
 * 0, no more: a whole datagram, handled as one). */
static __always_inline int parse_frag6(struct cursor *c, struct pkt *p)
{
	struct { __u8 next; __u8 reserved; __be16 off; __be32 id; } *fh = c->pos;

	if ((void *)(fh + 1) > c->end || !in_datagram(c, p, sizeof(*fh)))
		return -CNT_MALFORMED;
	if (p->frag)
		return -CNT_MALFORMED; /* a second fragment header */
	c->pos = fh + 1;
	p->frag = fh->off & bpf_htons(IP6_OFFSET_ | IP6_MF_);
	if (!p->frag)
		return fh->next;
	p->frag_later = fh->off & bpf_htons(IP6_OFFSET_);
	p->frag_proto = fh->next;
	p->frag_id = fh->id;
	return fh->next;
}

/* IPv6: checks the payload length, skips hop-by-hop, routing, destination
 * options and AH headers, then a fragment header (a later fragment stops
 * there: no L4). Returns the L4 protocol. */
static __always_inline int parse_ipv6(struct cursor *c, struct pkt *p, struct __sk_buff *skb)
{
	struct ipv6hdr *ip6 = c->pos;
	__u32 off = p->l3_off, plen, frame_len = skb->len;
	int next;

	if ((void *)(ip6 + 1) > c->end)
		return -CNT_MALFORMED;
	plen = bpf_ntohs(ip6->payload_len);
	if (ip6->version != 6 || off + sizeof(*ip6) + plen > frame_len)
		return -CNT_MALFORMED;
	/* payload length 0 on a GSO packet: BIG TCP GRO over 64 KiB, as long as
	 * the frame (the kernel's ipv6_payload_len() reads it so too). Strict
	 * otherwise: a wire jumbogram (RFC 2675, a hop-by-hop Jumbo option) needs
	 * a link MTU over 64 KiB, which no Ethernet has, so 0 is malformed. */
	if (!plen && !skb->gso_size)
		return -CNT_MALFORMED;
	p->l3_len = plen ? sizeof(*ip6) + plen : frame_len - off;
	p->key.family = FAMILY_V6;
	__builtin_memcpy(p->key.saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->key.daddr, &ip6->daddr, 16);
	next = ip6->nexthdr;
	c->pos = ip6 + 1;

#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT_HDRS; i++) {
		struct { __u8 next; __u8 len; } *ext = c->pos;
		__u32 len;

		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING &&
		    next != IPPROTO_DSTOPTS && next != IPPROTO_AH)
			break;
		if ((void *)(ext + 1) > c->end)
			return -CNT_MALFORMED;
		len = next == IPPROTO_AH ? (ext->len + 2) * 4 : (ext->len + 1) * 8;
		if (c->pos + len > c->end || !in_datagram(c, p, len))
			return -CNT_MALFORMED;
		p->ipv6_ext = 1;
		next = ext->next;
		c->pos += len;
	}
	/* the fragment header, once, after the others (outside the loop: one
	 * more branch per extension header costs the verifier dearly) */
	if (next == IPPROTO_FRAGMENT) {
		next = parse_frag6(c, p);
		if (next < 0)
			return next;
		if (p->frag_later)
			return -CNT_FRAGMENT;
	}
	if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	    next == IPPROTO_AH || next == IPPROTO_FRAGMENT)
		return -CNT_MALFORMED; /* more extension headers than we skip (or some after a fragment header) */
	p->key.proto = next;
	return next;
}

static __always_inline int icmp4_kind(__u8 type)
{
	if (type == ICMP_ECHO || type == ICMP_ECHOREPLY)
		return ICMP_KIND_ECHO;
	if (type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB)
		return ICMP_KIND_ERROR;
	return ICMP_KIND_OTHER;
}

static __always_inline int icmp6_kind(__u8 type)
{
	if (type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY)
		return ICMP_KIND_ECHO;
	if (type >= ICMPV6_DEST_UNREACH && type <= ICMPV6_PARAMPROB)
		return ICMP_KIND_ERROR;
	return ICMP_KIND_OTHER;
}

/* TCP, UDP, ICMP/ICMPv6: ports (or echo identifier) into the key. Other
 * protocols are keyed with ports 0. Returns 0. */
static __always_inline int parse_l4(struct cursor *c, struct pkt *p)
{
	switch (p->key.proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = c->pos;

		if ((void *)(th + 1) > c->end || !in_datagram(c, p, sizeof(*th)) || th->doff < 5)
			return -CNT_MALFORMED;
		/* strict: a header longer than the segment is no segment (the
		 * kernel's tcp_v4_rcv/tcp_v6_rcv drop it too) */
		if (!in_datagram(c, p, th->doff * 4))
			return -CNT_MALFORMED;
		p->key.sport = th->source;
		p->key.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->tcp_seq = bpf_ntohl(th->seq);
		p->tcp_ack = bpf_ntohl(th->ack_seq);
		return 0;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = c->pos;

		if ((void *)(uh + 1) > c->end || !in_datagram(c, p, sizeof(*uh)))
			return -CNT_MALFORMED;
		/* strict: the UDP length covers its own header and stays inside the
		 * datagram (shorter is allowed: the kernel's udp_rcv trims the rest) */
		if (bpf_ntohs(uh->len) < sizeof(*uh) ||
		    (!p->frag && !in_datagram(c, p, bpf_ntohs(uh->len))))
			return -CNT_MALFORMED; /* a first fragment holds only the start of it */
		p->key.sport = uh->source;
		p->key.dport = uh->dest;
		return 0;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		struct icmphdr *ih = c->pos; /* ICMPv6 shares the first 8 bytes' layout */

		if ((void *)(ih + 1) > c->end || !in_datagram(c, p, sizeof(*ih)))
			return -CNT_MALFORMED;
		if ((p->key.proto == IPPROTO_ICMP) != (p->key.family == FAMILY_V4))
			return -CNT_MALFORMED;
		p->icmp_kind = p->key.proto == IPPROTO_ICMP ? icmp4_kind(ih->type)
							    : icmp6_kind(ih->type);
		if (p->icmp_kind == ICMP_KIND_ECHO) {
			p->echo_request = ih->type == ICMP_ECHO || ih->type == ICMPV6_ECHO_REQUEST;
			p->key.sport = ih->un.echo.id;
			p->key.dport = ih->un.echo.id;
		}
		c->pos = ih + 1;
		return 0;
	}
	default:
		return 0;
	}
}

/* The packet an ICMP error quotes: its IP header and first 8 L4 bytes, into
 * key as quoted (no check of the quoted lengths: quotes are truncated). The
 * quote must lie inside the error's own datagram (p): bytes after it are
 * Ethernet padding, not a quote. */
static __always_inline int parse_quoted(struct cursor *c, const struct pkt *p,
					struct conn_key *key)
{
	struct iphdr *ip = c->pos;

	if ((void *)(ip + 1) > c->end || !in_datagram(c, p, sizeof(*ip)))
		return -CNT_MALFORMED;
	if (ip->version == 4) {
		__u32 hlen = ip->ihl * 4;

		if (hlen < sizeof(*ip) || c->pos + hlen > c->end || !in_datagram(c, p, hlen))
			return -CNT_MALFORMED;
		if (ip->frag_off & bpf_htons(IP_OFFSET_))
			return -CNT_FRAGMENT;
		key->family = FAMILY_V4;
		key->proto = ip->protocol;
		key->saddr[0] = ip->saddr;
		key->daddr[0] = ip->daddr;
		c->pos += hlen;
	} else {
		struct ipv6hdr *ip6 = c->pos;

		if ((void *)(ip6 + 1) > c->end || !in_datagram(c, p, sizeof(*ip6)) ||
		    ip6->version != 6)
			return -CNT_MALFORMED;
		key->family = FAMILY_V6;
		key->proto = ip6->nexthdr;
		__builtin_memcpy(key->saddr, &ip6->saddr, 16);
		__builtin_memcpy(key->daddr, &ip6->daddr, 16);
		c->pos = ip6 + 1;
		/* a quoted first fragment (a "packet too big" about a fragmented
		 * reply) names its connection after its fragment header; a later
		 * one has no ports */
		if (key->proto == IPPROTO_FRAGMENT) {
			struct { __u8 next; __u8 reserved; __be16 off; __be32 id; } *fh = c->pos;

			if ((void *)(fh + 1) > c->end || !in_datagram(c, p, sizeof(*fh)))
				return -CNT_MALFORMED;
			if (fh->off & bpf_htons(IP6_OFFSET_))
				return -CNT_FRAGMENT;
			key->proto = fh->next;
			c->pos = fh + 1;
		}
	}

	struct { __be16 a; __be16 b; __u8 type; __u8 code; __be16 id; } *l4 = c->pos;

	if ((void *)l4 + 8 > c->end || !in_datagram(c, p, 8))
		return -CNT_MALFORMED;
	if (key->proto == IPPROTO_ICMP || key->proto == IPPROTO_ICMPV6) {
		/* quoted echo: type, code, checksum, identifier */
		struct icmphdr *ih = c->pos;

		key->sport = ih->un.echo.id;
		key->dport = ih->un.echo.id;
	} else if (key->proto == IPPROTO_TCP || key->proto == IPPROTO_UDP) {
		key->sport = l4->a;
		key->dport = l4->b;
	}
	return 0;
}

/* Parses the frame at skb into p (from its IP header when the caller set
 * p->l3_link). Returns 0 or a negative reason to pass. */
static __always_inline int parse_packet(struct __sk_buff *skb, struct pkt *p, struct cursor *c)
{
	__u32 linear = skb->data_end - skb->data;
	int proto;

	if (linear < PULL_LEN && skb->len > linear)
		bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);

	c->pos = (void *)(long)skb->data;
	c->end = (void *)(long)skb->data_end;

	/* A tag the driver or the stack already took off the frame is the outer one. */
	if (skb->vlan_present) {
		p->vlan_tci[0] = skb->vlan_tci;
		p->outer_ad = skb->vlan_proto == bpf_htons(ETH_P_8021AD_);
		p->vlan_count = 1;
	}
	/* an L3 link (p->l3_link, the caller's): no Ethernet header, the family in skb->protocol */
	proto = p->l3_link ? bpf_ntohs(skb->protocol) : parse_eth(c, p);
	if (proto < 0)
		return proto;
	p->l3 = c->pos;
	p->l3_off = c->pos - (void *)(long)skb->data;
	if (proto == ETH_P_IP)
		proto = parse_ipv4(c, p, skb);
	else if (proto == ETH_P_IPV6)
		proto = parse_ipv6(c, p, skb);
	else
		return -CNT_NOT_IP;
	if (proto < 0)
		return proto;
	return parse_l4(c, p);
}

