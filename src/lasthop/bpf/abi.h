/* abi.h: the structs the data path shares with the agent (the map ABI).
 * Python mirror: src/lasthop/abi.py -- keep in sync; tests/test_abi.py checks
 * sizes and offsets against this object's BTF. */
#pragma once

#include <linux/types.h>

/* A connection, always oriented as its first packet arrived on an uplink
 * (request direction: saddr = the client). Addresses and ports in network
 * order; IPv4 addresses sit in word 0 with words 1-3 zero. ICMP echo puts
 * its identifier in both ports so the key reverses onto itself. */
struct conn_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  family; /* FAMILY_V4 or FAMILY_V6 */
	__u16 zone;   /* routing domain of the interface, host order */
};

/* An IPv4 connection in 16 bytes: the key of lh_conns4 and lh_pending4 (the
 * IPv6 tables keep struct conn_key). The same fields as a conn_key of
 * FAMILY_V4, the family implied; conntrack.h converts between the two, so
 * only its helpers know which table a family lives in. */
struct conn_key4 {
	__u32 saddr;  /* network order */
	__u32 daddr;
	__u16 sport;  /* network order */
	__u16 dport;
	__u8  proto;
	__u8  reserved; /* 0 */
	__u16 zone;   /* host order */
};

/* Per-connection state: the last hop its request came from, and where the
 * connection stands. 40 bytes, so a table element stays under 150 bytes of
 * kernel memory: hence last_seen in 32 bits (ages are differences modulo
 * 2^32 jiffies; timeouts are capped far below the wrap). */
struct conn_entry {
	__u32 last_seen;    /* low 32 bits of bpf_jiffies64() at the last packet (see lh_clock) */
	__u32 ifindex;      /* uplink the request arrived on */
	__u32 vm_ifindex;   /* VM port that serves or opened the connection, 0 = none */
	__u32 seq;          /* TCP handshake: the ACK number that completes it (host order) */
	__u32 packets;      /* request packets seen (approximate: not atomic) */
	__u32 replies;      /* reply packets redirected (approximate: not atomic) */
	__u8  mac[ETH_ALEN];/* last hop: the request's source MAC */
	__u16 vlan_tci[MAX_VLAN_TAGS]; /* [0] outer, [1] inner, host order, with PCP/DEI */
	__u8  vlan_count;   /* tags in vlan_tci */
	__u8  flags;        /* F_ENTRY_* */
	__u8  state;        /* enum conn_state */
	__u8  sync_epoch;   /* sync on: the epoch (changes.h) of its last refresh record, low 8 bits */
	__u8  flags2;       /* F_ENTRY2_*: cleared by 64-bit atomics on the word at
			     * CONN_ENTRY_WORD2_OFF (conntrack.h), never by a plain store */
	__u8  reserved;
};

/* The 8-byte-aligned word of conn_entry that holds flags2, and where flags2
 * sits in it (little-endian: its byte 6). */
#define CONN_ENTRY_WORD2_OFF 32
#define CONN_ENTRY_FLAGS2_SHIFT ((__builtin_offsetof(struct conn_entry, flags2) - \
				  CONN_ENTRY_WORD2_OFF) * 8)
_Static_assert(__builtin_offsetof(struct conn_entry, flags2) - CONN_ENTRY_WORD2_OFF < 8,
	       "flags2 is in the word at CONN_ENTRY_WORD2_OFF");

/* Per-interface settings, written by the agent (lh_ifaces value); vm_mac
 * is also filled in by lh_vmport the first time the VM speaks. */
struct iface_cfg {
	__u8  mac[ETH_ALEN];    /* the interface's own MAC: routed frames leave from it */
	__u16 zone;             /* routing domain, host order */
	__u8  role;             /* enum lh_role */
	__u8  flags;            /* F_IFACE_* */
	__u16 slot;             /* counter slot, 1 .. MAX_IFACES - 1 */
	__u8  vm_mac[ETH_ALEN]; /* VM port: the guest's MAC, valid with F_IFACE_VM_MAC */
	__u8  link_kind;        /* enum lh_link_kind */
	__u8  delivery;         /* VM port: enum lh_delivery */
};

/* lh_frags key: one fragmented datagram, as its IP header names it
 * (addresses as read, not reversed: each direction has its own). */
struct frag_key {
	__u32 saddr[4]; /* network order, IPv4 in word 0 */
	__u32 daddr[4];
	__u32 id;       /* IPv4 identification (16 bits) or IPv6 fragment id, network order */
	__u8  proto;    /* IPv4 protocol, or the IPv6 fragment header's next header */
	__u8  family;   /* FAMILY_V4 or FAMILY_V6 */
	__u16 zone;     /* routing domain of the interface, host order */
};

/* lh_frags value: what the datagram's first fragment did. */
struct frag_entry {
	__u8  verdict;          /* enum lh_frag_verdict */
	__u8  reserved[3];
	__u32 vm_ifindex;       /* FRAG_TO_VM: the VM port */
	struct conn_entry hop;  /* FRAG_TO_HOP: a copy of the connection's entry (its last hop) */
};

/* lh_hop_descs value (an array slot): a last hop beyond MAC and tags, stored
 * once per distinct hop; entries with F_ENTRY_HOP_EXT name it by id = slot |
 * (gen >> 1) << HOP_SLOT_BITS (encap.h). The slot is the jhash of the content
 * words, probed on a clash. Everything before .mark is content. */
struct hop_desc {
	__u32 remote[4];   /* tunnel: remote endpoint, IPv4 in word 0, host order (bpf_tunnel_key) */
	__u32 vni;         /* tunnel: VNI, host order */
	__u32 mpls[MAX_MPLS_LABELS]; /* MPLS: label stack entries, outer first, host order,
				      * S bit and TTL zero (restored on the reply) */
	__u16 vlan_tci[MAX_VLAN_TAGS]; /* the request's tags, as conn_entry's would be */
	__u8  kind;        /* enum lh_hop_kind */
	__u8  mpls_count;  /* labels in mpls */
	__u8  opt_len;     /* Geneve options, bytes (a multiple of 4) */
	__u8  reserved;    /* 0 */
	__u8  opts[GENEVE_OPT_MAX]; /* Geneve options, as received */
	__u32 mark;        /* not content: the expiry pass that last found it in use */
	__u32 reserved2;   /* 0 */
	__u64 gen;         /* the slot's generation: odd while being written (claimed
			    * or swept by compare-and-swap), even when stable; an id
			    * names the slot only while its gen matches (encap.h) */
};

/* The metadata lh_uplink_mpls (XDP) puts in front of a frame whose label
 * stack it took off (bpf_xdp_adjust_meta), for lh_uplink to learn
 * (skb->data_meta): the stack as received. 20 bytes, a multiple of 4. */
struct mpls_meta {
	__u32 magic;                  /* MPLS_META_MAGIC: this program's, no other's */
	__u32 lse[MAX_MPLS_LABELS];   /* label stack entries, outer first, host order, as received */
	__u8  count;                  /* entries in lse: 1..MAX_MPLS_LABELS */
	__u8  reserved[3];            /* 0 */
};

/* lh_vm_addrs key: an address a VM port may open connections from. */
/* lh_hops and lh_hops_refused key: a last-hop MAC on one uplink. */
struct hop_key {
	__u32 ifindex;
	__u8  mac[6];
	__u16 pad; /* zero */
};

/* lh_endpoints key: a tunnel endpoint prefix of one uplink; prefixlen counts
 * the bits of ifindex and family too (ENDPOINT_KEY_BITS + the prefix's). */
struct endpoint_lpm_key {
	__u32 prefixlen;
	__u32 ifindex;
	__u32 family;  /* FAMILY_V4 or FAMILY_V6 */
	__u32 addr[4]; /* network order, IPv4 in word 0 */
};

/* lh_endpoints_refused key: a tunnel endpoint on one uplink. */
struct endpoint_key {
	__u32 ifindex;
	__u32 family;  /* FAMILY_V4 or FAMILY_V6 */
	__u32 addr[4]; /* network order, IPv4 in word 0 */
};

/* lh_hop_moved value: the MAC a last hop's address moved to, or (with
 * HOP_UNREACHABLE) that the hop no longer answers (failover.h). */
struct hop_moved {
	__u8  mac[ETH_ALEN]; /* the new MAC; HOP_UNREACHABLE: the hop's own, unused */
	__u16 flags;         /* HOP_* */
};

/* lh_scope value: one scope rule, as a value and a mask over the words of a
 * new connection's match key (scope.h): the connection matches when every
 * word's (key & mask) == value and its destination port is in lo..hi. A
 * word masked out matches anything. Words: 0-3 source address, 4-7
 * destination address (the request's, network order, IPv4 in word 0), 8
 * proto | family << 8 | zone << 16, 9 the uplink's ifindex (0 for a
 * connection a VM opens). Ports in host order. */
struct scope_rule {
	__u32 value[SCOPE_WORDS];
	__u32 mask[SCOPE_WORDS];
	__u16 port_lo;  /* 0 and 65535 = any */
	__u16 port_hi;
	__u8  action;   /* enum lh_scope_action */
	__u8  reserved[3];
};

struct vm_addr_key {
	__u32 ifindex;  /* the VM port */
	__u32 family;   /* FAMILY_V4 or FAMILY_V6 */
	__u32 addr[4];  /* network order, IPv4 in word 0 */
};

/* lh_vm_addrs value .origin */
enum vm_addr_origin {
	VM_ADDR_CONFIGURED = 1, /* the config names it for the port */
	VM_ADDR_LEARNED    = 2, /* the VM answered a client's connection to it */
	VM_ADDR_SERVICE    = 3, /* a service's virtual address; the port is in its pool */
};

struct vm_addr {
	__u32 origin; /* enum vm_addr_origin */
};

/* lh_vm_usage value, by VM port ifindex: how many entries the VM opened.
 * In use = counted + (created - base): the last expiry pass counted the
 * VM_ORIGIN entries it found and noted `created` as it began, so entries
 * evicted or expired since are forgotten at the next pass, never leaked. */
struct vm_usage {
	__u32 created; /* VM_ORIGIN entries ever created (data path, atomic) */
	__u32 base;    /* created, as the last complete pass began */
	__u32 counted; /* VM_ORIGIN entries the last complete pass found */
	__u32 walking; /* the pass under way: entries found so far */
	__u32 next_base; /* the pass under way: created, as it began */
};

/* A service address: lh_services key. Lookup tries (addr, proto, port), then
 * (addr, proto, 0), then (addr, 0, 0): port 0 and proto 0 mean any. */
struct svc_key {
	__u32 addr[4]; /* network order, IPv4 in word 0 */
	__u16 port;    /* network order */
	__u8  proto;
	__u8  family;  /* FAMILY_V4 or FAMILY_V6 */
};

/* lh_services value. */
struct svc_info {
	__u32 id;    /* index of the service's Maglev table in lh_maglev */
	__u32 flags; /* reserved */
};

/* Host-wide settings (lh_settings[0]). */
struct lh_settings {
	__u32 flags;         /* F_SET_* */
	__u32 hz;            /* jiffies per second, measured by the agent, for entry ages */
	__u32 timeout[CS_MAX]; /* seconds an entry may stay idle, by enum conn_state */
	__u32 vm_quota;      /* entries each VM port may open (VM_ORIGIN) */
	__u32 sync_shift;    /* sync: a refresh epoch is jiffies >> sync_shift (the agent sets it) */
	__u32 inplace_quota; /* new connections that may wait in the confirmed tables
			      * (F_ENTRY2_INPLACE, both families), 0 = none: lh_inplace */
};

/* lh_inplace[0]: the kernel's count of unconfirmed entries in the confirmed
 * tables (F_ENTRY2_INPLACE), both families. Exact: added to (atomically)
 * before an insert in place, taken from exactly once when the entry's bit is
 * cleared (confirmation, or removal: whoever clears the bit, by atomic
 * fetch-and, takes it off). */
struct inplace_count {
	__u64 count;
};

/* lh_expiry[0]: what the last expiry pass found. Per-state counts are a
 * snapshot the kernel took while walking; table totals between passes come
 * from the kernel's own element counts (lh_stats). */
struct expiry_stats {
	__u64 passes;
	__u32 started;   /* jiffies (low 32 bits) when the last pass began */
	__u32 finished;  /* ... and ended */
	__u32 live[2][CS_MAX];     /* [0] confirmed, [1] pending (both families): entries left, by state */
	__u64 expired[2][CS_MAX];  /* removed by expiry since the table was created, by state */
	__s64 elements[2];         /* the kernel's element count of each table, both families (lh_stats) */
	__u64 changes;      /* the table's change count when the last walk began */
	__u64 request;      /* lh_expiry_request's token when the last walk began */
	__u64 skipped;      /* runs that did not walk */
	__u32 next_due;     /* jiffies: the next walk, lead before the earliest deadline it left
			     * out of lh_expiry_due */
	__u32 checked;      /* jiffies: the last run, walked or not */
	__u32 lead;         /* jiffies: twice the last walk's length + EXPIRY_LEAD_MS */
	__u32 due_next;     /* jiffies: the earliest deadline in lh_expiry_due (a drain runs then) */
	__u64 drains;       /* runs that drained lh_expiry_due */
	__u64 due_expired;  /* of expired[]: removed by a drain at their deadline */
	__u64 due_full;     /* entries a walk could not index (lh_expiry_due full) */
	__u32 indexed;      /* entries in lh_expiry_due after the last walk or drain */
	__u32 soon;         /* 1 << state for each state whose timeout is shorter than lead: a
			     * walk may not meet such an entry before it is due, so the data
			     * path files it in lh_expiry_due itself (conntrack.h) */
	__u32 soon_since;   /* the states of `soon` both when the last walk began and when it
			     * ended: the data path has filed their entries all along since,
			     * so a change to one calls for no walk (expire_change_gap) */
	__u64 filed;        /* entries the data path filed in lh_expiry_due (conn_file_soon) */
	__u64 filed_seen;   /* `filed` when the last drain or walk began: past it, the next run
			     * drains (a filing may hide behind that drain's due_next) */
};

/* lh_expiry_due value: when an entry the walk found due soon is due. */
struct expiry_due {
	__u32 deadline; /* jiffies: the first at which it is idle past its timeout */
	__u32 table;    /* CHT_CONFIRMED or CHT_PENDING: the table that held it (CHT_EITHER:
			 * filed by the data path, which did not know; the drain looks) */
};

/* lh_svc_walk's frame (the test run's data in and out): which service
 * connections to move or forget, and what it did. An entry matches when a
 * VM port holds it (not one the VM opened), its key finds service_id as
 * svc_find does, and (count > 0) its VM port is among ifindex[0..count). */
struct svc_walk {
	__u32 service_id;
	__u32 count;                    /* ifindex[] used; 0: any VM port */
	__u32 ifindex[SVC_WALK_IFACES];
	__u32 drop;    /* 1: remove each match; 0: move it to the service's Maglev choice
			* (removed when there is none) */
	__u32 moved;   /* out: entries moved */
	__u32 dropped; /* out: entries removed */
	__u32 reserved;
};

/* lh_changes record: one change of one entry, as the data path made it
 * (sync on). The entry is a copy taken at the change. */
struct conn_change {
	__u8  kind;     /* enum lh_change_kind */
	__u8  table;    /* enum lh_change_table */
	__u8  reserved[2];
	struct conn_key   key;
	struct conn_entry entry;
};

/* Keeps the ABI's enums in the object's BTF (enum constants alone leave no
 * type behind), so tests/test_abi.py can check lasthop.abi against them:
 * the roles, the counters, the flags and the sizes of consts.h.
 * libbpf skips the section: no map is created and nothing runs. */
struct lh_abi_enums {
	enum lh_role           role;
	enum lh_counter        counter;
	enum lh_const          consts;
	enum lh_iface_flag     iface_flag;
	enum lh_settings_flag  settings_flag;
	enum lh_entry_flag     entry_flag;
	enum lh_entry_flag2    entry_flag2;
	enum conn_state        state;
	enum lh_table_counter  table_counter;
	enum vm_addr_origin    vm_addr_origin;
	enum lh_change_kind    change_kind;
	enum lh_change_table   change_table;
	enum lh_scope_action   scope_action;
	enum lh_link_kind      link_kind;
	enum lh_frag_verdict   frag_verdict;
	struct conn_change     change; /* lh_changes has no key or value type to carry it */
	struct svc_walk        svc_walk; /* lh_svc_walk's frame: no map carries it */
	enum lh_hop_kind       hop_kind;
	enum lh_hop_flag       hop_flag;
	enum lh_endpoint_verdict endpoint_verdict;
	struct mpls_meta       mpls_meta; /* frame metadata: no map carries it */
	enum lh_delivery       delivery;
};
struct lh_abi_enums lh_abi_enums __attribute__((section(".lh_btf"), used));
