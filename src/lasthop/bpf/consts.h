/* consts.h: every constant of the lasthop data path. Those the agent mirrors are
 * enum constants (they reach the BTF); the rest are #defines. */
#pragma once

/* Sizes and values the agent mirrors (lasthop.abi). They are enum constants, not
 * #defines, so they reach the object's BTF (through lh_abi_enums in abi.h)
 * and tests/test_abi.py checks every Python copy against them; for the same
 * reason they take no -D override: the agent would disagree. */
enum lh_const {
	/* Connection table sizes, IPv4 (lh_conns4) and IPv6 (lh_conns). The
	 * agent sets max_entries from the config before loading, so these are
	 * only the defaults the object is built with. */
	CONN_TABLE_SIZE = 1048576,
	CONN_TABLE_SIZE_V6 = 262144,
	/* Interfaces the agent can configure; slot 0 collects packets seen on an
	 * interface the agent did not configure. */
	MAX_IFACES = 256,
	/* Interfaces are looked up by ifindex in an array (inlined, unlike a hash
	 * lookup): ifindexes at or above this cannot be attached. */
	MAX_IFINDEX = 65536,
	/* Services: virtual addresses whose connections are spread over VM ports. */
	MAX_SERVICES     = 256,
	MAX_SERVICE_KEYS = MAX_SERVICES * 4, /* a service may list several ports */
	MAGLEV_SIZE      = 65537,            /* prime: Maglev lookup table slots */
	MAGLEV_SEED      = 0x4c617374,       /* jhash seed of the connection key */
	MAX_VLAN_TAGS    = 2,                /* 802.1ad outer + 802.1Q inner */
	FAMILY_V4        = 4,                /* conn_key/svc_key .family */
	FAMILY_V6        = 6,
	/* Pending table size (connections not yet confirmed): the agent sets it
	 * from the config; this is the default the object is built with. */
	PENDING_TABLE_SIZE = 262144,
	PENDING_TABLE_SIZE_V6 = 65536,
	/* Addresses VM ports may open connections from (configured, learned, services). */
	MAX_VM_ADDRS     = 65536,
	/* Last-hop MACs the uplinks list (allow or deny, lh_hops), and the
	 * refused MACs whose frames are counted (lh_hops_refused, an LRU). */
	MAX_LISTED_HOPS  = 4096,
	MAX_REFUSED_HOPS = 1024,
	/* Last-hop MACs whose address moved to another MAC (lh_hop_moved):
	 * firewalls that failed over, not connections. */
	MAX_MOVED_HOPS   = 1024,
	/* Tunnel endpoint prefixes the uplinks list (allow or deny, lh_endpoints),
	 * two catch-alls per allow-listing uplink included. */
	MAX_LISTED_ENDPOINTS = 4096,
	ENDPOINT_KEY_BITS = 64, /* endpoint_lpm_key bits before the address: uplink, family */
	MAX_ENDPOINTS_DOWN = 1024, /* tunnel endpoints whose neighbour failed or route went (lh_endpoints_down) */
	/* Scope rules (lh_scope), the default among them: first match wins. */
	MAX_SCOPE_RULES  = 64,
	SCOPE_WORDS      = 10, /* 32-bit words of a scope match key (scope_rule) */
	/* Bytes of the lh_changes ring buffer (a power of 2, whole pages): about
	 * 48,000 change records between two reads of the agent. */
	CHANGES_RING_SIZE = 1 << 22,
	/* Fragmented datagrams whose first fragment's decision is remembered
	 * (lh_frags, an LRU): what later fragments follow. */
	FRAG_TABLE_SIZE  = 8192,
	/* VM ports one run of lh_svc_walk looks for (struct svc_walk). */
	SVC_WALK_IFACES = 16,
	/* Distinct last hops beyond MAC and tags (tunnel endpoint + VNI + options,
	 * MPLS stacks): lh_hop_descs, an array of slots -- a hop whose probed
	 * slots are all taken is refused, one a connection uses is never evicted.
	 * An id is slot | generation << HOP_SLOT_BITS (32 bits, conn_entry's
	 * vlan_tci): 14 bits of slot, 18 of generation. */
	HOP_SLOT_BITS    = 14,
	MAX_HOP_DESCS    = 1 << HOP_SLOT_BITS,
	HOP_SLOT_MASK    = MAX_HOP_DESCS - 1,
	HOP_GEN_MASK     = (1 << (32 - HOP_SLOT_BITS)) - 1, /* an id's generation: gen >> 1 */
	/* Geneve options kept per hop: AWS GWLB's three TLVs (endpoint id,
	 * attachment id, flow cookie) take exactly 32 bytes. */
	GENEVE_OPT_MAX   = 32,
	MAX_MPLS_LABELS  = 3,                /* label stack entries learned */
	HOP_DESC_PROBES  = 4,                /* slots tried when two hops hash alike */
	/* struct mpls_meta .magic: the frame metadata is lh_uplink_mpls's */
	MPLS_META_MAGIC  = 0x4d504c53,       /* "MPLS" */
};

/* CPUs whose per-CPU counters the expiry pass sums (bpf_loop bound; the
 * kernel's nr_cpu_ids ends the loop sooner). */
#define MAX_CPUS 4096

/* The expiry pass's deadline index (lh_expiry_due, expire.h): entries a walk
 * found due within its horizon, each removed at its deadline by a drain that
 * visits only them. Full, the rest wait for a walk, as without the index. */
#ifndef EXPIRY_DUE_SIZE
#define EXPIRY_DUE_SIZE 65536
#endif

/* How long before the earliest deadline left out of the index the next walk
 * starts: twice the last walk's length plus this (ms), which covers the
 * agent's interval between runs (1 s by default) and slack. The walk indexes
 * what is due within twice that lead. */
#ifndef EXPIRY_LEAD_MS
#define EXPIRY_LEAD_MS 2000
#endif

#define MAX_IPV6_EXT_HDRS 6   /* extension headers skipped before giving up */

/* Bytes pulled into the linear area when the headers are not there yet. */
#define PULL_LEN 128

/* skb->cb word (the tc hook's scratch, as Cilium's ctx_store_meta uses it) in
 * which a fast path leaves what its lookups missed (MISS_*: fastpath.h), for
 * the general path to read at its end: carried in a register across the
 * parse instead, the flag changed clang's code enough to take lh_uplink's
 * verification from 123k to 201k insns. */
#define CB_CONFIRMED_MISS 0
/* Its values (pkt.confirmed_miss): nothing missed (the entry point's 0: no
 * lookup, or an entry found); the key missed in the confirmed table but the
 * pending one holds it; the key in neither table. */
#define MISS_NONE      0
#define MISS_CONFIRMED 1
#define MISS_BOTH      2

/* Test builds only: 1 drops the datagram bound of in_datagram() (parse.h),
 * the check that keeps headers out of the Ethernet padding, so the fuzzer
 * (tests/fuzz) can show that it catches a parser missing one bounds check. */
#ifndef LH_BROKEN_DATAGRAM_CHECK
#define LH_BROKEN_DATAGRAM_CHECK 0
#endif

/* Test builds only: 1 drops hop_desc_copy's second read of the slot's
 * generation (encap.h), so tests/bpf/test_hop_torn.py can show that its torn
 * rows fail without it. */
#ifndef LH_BROKEN_HOP_RECHECK
#define LH_BROKEN_HOP_RECHECK 0
#endif

/* Test builds only: what hop_torn_hook (encap.h) does to a reply's slot
 * between hop_desc_copy's check and its reads (lh_test_torn .mode). */
enum lh_torn_mode {
	TORN_OFF     = 0,
	TORN_SWEPT   = 1, /* content cleared, generation + 2: the sweep freed it */
	TORN_CLAIMED = 2, /* another hop's content, generation + 4: freed and claimed again */
	TORN_WRITING = 3, /* another hop's content, generation + 3 (odd): being claimed */
};

#define ENOENT_    2  /* bpf_skb_get_tunnel_opt: the tunnel carried no options */
#define ETH_ALEN   6  /* as linux/if_ether.h: a #define there, so one here too */
#define AF_INET_   2  /* bpf_fib_lookup's family: the socket API's values */
#define AF_INET6_  10

/* Interface roles (lh_ifaces value .role). */
enum lh_role {
	ROLE_NONE    = 0,
	ROLE_UPLINK  = 1,
	ROLE_VM_PORT = 2,
};

/* What kind of link an interface is (iface_cfg .link_kind), set by the agent
 * from the link's kind. Python mirror: lasthop.abi.LinkKind. */
enum lh_link_kind {
	LINK_ETHERNET = 0, /* NIC, veth, tap, bridge port, VLAN device */
	LINK_VXLAN    = 1, /* VXLAN device in external (collect-metadata) mode */
	LINK_GENEVE   = 2, /* Geneve device in external mode */
	LINK_L3       = 3, /* no Ethernet header: tun, WireGuard, xfrm, GRE, IP-in-IP */
	LINK_MPLS     = 4, /* Ethernet uplink with MPLS hand-off: lh_uplink_mpls (XDP) pops
			    * the labels, lh_uplink learns them (mpls.h) */
};

/* How a VM port hands the VM the frames lasthop sends it (iface_cfg
 * .delivery). Python mirror: lasthop.abi.Delivery. */
enum lh_delivery {
	DELIVER_DEVICE = 0, /* out of the port (bpf_redirect): its egress, qdisc, captures */
	DELIVER_PEER   = 1, /* a veth whose guest end is in another namespace: straight into
			     * that end's ingress (bpf_redirect_peer), not through the port */
};

/* What the first fragment of a datagram did (frag_entry .verdict): the
 * later fragments, which carry no ports, do the same. */
enum lh_frag_verdict {
	FRAG_PASSED = 0, /* left to the host */
	FRAG_TO_VM  = 1, /* sent to VM port frag_entry .vm_ifindex */
	FRAG_TO_HOP = 2, /* sent to the last hop frag_entry .hop */
};

/* What a last hop's descriptor holds (hop_desc .kind). Python mirror:
 * lasthop.abi.HopKind. */
enum lh_hop_kind {
	HOP_TUNNEL4 = 1, /* tunnel with an IPv4 remote endpoint */
	HOP_TUNNEL6 = 2, /* tunnel with an IPv6 remote endpoint */
	HOP_MPLS    = 3, /* MPLS label stack on an Ethernet uplink */
};

/* lh_ifaces value .flags */
enum lh_iface_flag {
	F_IFACE_ROUTED  = 1 << 0, /* routed host: frames leaving here get this port's MAC, TTL - 1 */
	F_IFACE_VM_DOWN = 1 << 1, /* VM port: VM removed or down; its connections move or drop */
	F_IFACE_VM_MAC  = 1 << 2, /* VM port: vm_mac is known */
	F_IFACE_ADDRS_FIXED = 1 << 3, /* VM port: only its configured addresses, none learned */
	F_IFACE_LINK_DOWN = 1 << 4, /* uplink: its link is down (the agent follows it): replies
				     * of its connections take ordinary routing until it returns */
	F_IFACE_HOPS_ALLOW = 1 << 5, /* uplink: only the MACs lh_hops lists are last hops */
	F_IFACE_HOPS_DENY  = 1 << 6, /* uplink: the MACs lh_hops lists are not last hops */
	F_IFACE_FOLLOW_MOVES = 1 << 7, /* uplink: replies follow lh_hop_moved (failover.h) */
};

/* lh_settings value .flags */
enum lh_settings_flag {
	F_SET_RELEARN_FIRST = 1 << 0, /* keep the first MAC seen; only a SYN re-learns */
	F_SET_SERVICES      = 1 << 1, /* some service is configured: look new connections up */
	F_SET_VM_DOWN_DROP  = 1 << 2, /* on_vm_down = "drop": a down VM's connections are dropped */
	F_SET_NO_VM_ORIGIN  = 1 << 3, /* vm_origin = false: do not remember connections VMs open */
	F_SET_FAST_PATH     = 1 << 4, /* requests skip bridge/routing to the VM that answered */
	F_SET_SYNC          = 1 << 5, /* sync is on: report table changes in lh_changes */
	F_SET_HOPS_MOVED    = 1 << 6, /* lh_hop_moved holds a record: replies look their hop up */
	F_SET_SCOPE         = 1 << 7, /* scope rules in lh_scope: new connections are matched */
	F_SET_ENDPOINTS     = 1 << 8, /* an uplink lists tunnel endpoints: requests look theirs up */
	F_SET_ENDPOINTS_DOWN = 1 << 9, /* lh_endpoints_down holds a record: tunnel replies look */
	F_SET_INPLACE       = 1 << 10, /* inplace_quota > 0: new connections go into the confirmed
					* tables first, unconfirmed (F_ENTRY2_INPLACE) */
};

/* lh_conns value .flags */
enum lh_entry_flag {
	F_ENTRY_HOP_KNOWN    = 1 << 0, /* last hop learned on an uplink */
	F_ENTRY_VM_ORIGIN    = 1 << 1, /* connection opened by a VM (full proxy) */
	F_ENTRY_OUTER_8021AD = 1 << 2, /* outer tag was 802.1ad (0x88a8), not 802.1Q */
	F_ENTRY_VM_FAST      = 1 << 3, /* fast path: vm_ifindex is the port that answered */
	F_ENTRY_FIN_OPENER   = 1 << 4, /* TCP: the side that opened sent a FIN */
	F_ENTRY_FIN_ANSWERER = 1 << 5, /* TCP: the side that answered sent a FIN */
	F_ENTRY_HOP_EXT      = 1 << 6, /* last hop has a descriptor in lh_hop_descs: vlan_tci
					* holds its id (low half first), the tags are in it */
	F_ENTRY_VM_NEIGH     = 1 << 7, /* with VM_FAST, routed: the shortcut waits for the
					* neighbour check of its first request (vm_fast_send) */
};

/* lh_conns value .flags2 */
enum lh_entry_flag2 {
	F_ENTRY2_INPLACE     = 1 << 0, /* in a confirmed table (lh_conns4/lh_conns) but not
					* confirmed yet: counted in lh_inplace, shown as pending */
};

/* What a fail-over record says of its hop (hop_moved .flags). Python
 * mirror: lasthop.abi.HOP_UNREACHABLE. */
enum lh_hop_flag {
	HOP_UNREACHABLE = 1 << 0, /* the hop's neighbour entry failed: its entries are not used */
};

/* lh_endpoints value: what a listed prefix says of an endpoint in it. */
enum lh_endpoint_verdict {
	ENDPOINT_TRUSTED = 1,
	ENDPOINT_REFUSED = 2,
};

/* What failover_follow did with a reply's entry (failover.h). */
enum lh_follow {
	FOLLOW_NONE        = 0, /* no record: the entry's hop as it is */
	FOLLOW_MOVED       = 1, /* the hop's address moved: the entry now holds the new MAC */
	FOLLOW_UNREACHABLE = 2, /* the hop does not answer: the reply takes routing */
};

/* What a scope rule does with a new connection (scope_rule .action). */
enum lh_scope_action {
	SCOPE_END   = 0, /* no rule here or after: the list ends */
	SCOPE_LEARN = 1, /* lasthop handles it */
	SCOPE_PASS  = 2, /* the host's normal path, counted scope_passed */
};

/* A connection's state (conn_entry .state), from the packets both programs
 * see. "Opener" is the side that sent the first packet: the uplink side, or
 * the VM for VM_ORIGIN entries. Each state has its own timeout
 * (lh_settings .timeout); the confirmed ones live in lh_conns, the rest in
 * lh_pending. Python mirror: lasthop.abi.State. */
enum conn_state {
	CS_NONE            = 0,  /* not tracked (entries written before states existed) */
	CS_TCP_SYN_SENT    = 1,  /* pending: the opener's SYN */
	CS_TCP_SYN_RECV    = 2,  /* pending: answered by a SYN-ACK; .seq = the ACK that completes it */
	CS_TCP_MIDSTREAM   = 3,  /* pending: first seen mid-connection (after a restart or table loss) */
	CS_TCP_ESTABLISHED = 4,  /* confirmed: handshake completed, or mid-stream answered */
	CS_TCP_CLOSING     = 5,  /* FIN from one side */
	CS_TCP_CLOSED      = 6,  /* RST, or FIN from both sides */
	CS_UDP_NEW         = 7,  /* pending: the opener spoke (UDP and other protocols) */
	CS_UDP_ANSWERED    = 8,  /* pending: the other side answered */
	CS_UDP_STREAM      = 9,  /* confirmed: the opener spoke again after the answer */
	CS_ICMP_NEW        = 10, /* pending: echo request */
	CS_ICMP_ANSWERED   = 11, /* pending: echo reply seen (pings are never confirmed) */
	CS_MAX             = 12,
};

/* Table-wide events (lh_table_counters key), counted by the data path, the
 * expiry program and (REMOVED) the agent. Exact: each is counted where the
 * map operation it names succeeded. Python mirror: lasthop.abi.TableCounter. */
enum lh_table_counter {
	TC_PENDING_INSERTED   = 0, /* new entry in lh_pending */
	TC_PENDING_PROMOTED   = 1, /* moved from lh_pending to lh_conns */
	TC_PENDING_EXPIRED    = 2, /* removed by lh_expire: idle past its state's timeout */
	TC_PENDING_REMOVED    = 3, /* removed by the agent (flush, services) or superseded */
	TC_CONFIRMED_INSERTED = 4, /* new entry in lh_conns (a promotion) */
	TC_CONFIRMED_EXPIRED  = 5,
	TC_CONFIRMED_REMOVED  = 6,
	TC_CONFIRM_REFUSED    = 7, /* lh_conns full: the connection stays pending */
	TC_EXPIRY_PASSES      = 8, /* lh_expire walks */
	TC_STATE_CHANGES      = 9, /* an entry moved to another state (the data path) */
	TC_EXPIRY_SKIPPED     = 10, /* lh_expire runs that did not walk: no change, nothing due */
	TC_SYNC_LOST          = 11, /* change records lh_changes had no room for (sync on) */
	TC_INPLACE_INSERTED   = 12, /* new unconfirmed entry in a confirmed table (in place) */
	TC_INPLACE_CONFIRMED  = 13, /* an in-place entry confirmed: its bit cleared, no move */
	TC_INPLACE_EXPIRED    = 14, /* an in-place entry removed by lh_expire */
	TC_INPLACE_REMOVED    = 15, /* an in-place entry removed by the agent or superseded */
	TC_MAX                = 16,
};

/* What a change record reports (conn_change .kind). Python mirror:
 * lasthop.abi.ChangeKind. */
enum lh_change_kind {
	CH_LEARNED  = 1, /* new entry (pending): an uplink packet, or a VM opened it */
	CH_HOP      = 2, /* its last hop changed (re-learned, or first learned for a VM-opened one),
			  * or (the agent) its VM: a service moved it */
	CH_STATE    = 3, /* it moved to another state */
	CH_PROMOTED = 4, /* it moved from lh_pending to lh_conns */
	CH_REMOVED  = 5, /* removed: superseded (the data path), or flushed or dropped (the agent) */
	CH_EXPIRED  = 6, /* lh_expire removed it: idle past its state's timeout */
	CH_REFRESH  = 7, /* only refreshed: at most one per entry per sync epoch (changes.h) */
};

/* Which table a change record's entry is in (conn_change .table): the index
 * of expiry_stats' per-table arrays. A state move does not know it. Python
 * mirror: lasthop.abi.ChangeTable. */
enum lh_change_table {
	CHT_CONFIRMED = 0,
	CHT_PENDING   = 1,
	CHT_EITHER    = 2, /* whichever holds the key */
};

/* Counter slots, per interface: lh_counters key = iface slot * CNT_MAX + reason,
 * CNT_MAX slots per interface whatever the number of reasons in use (room to
 * add reasons without moving any key). Python mirror: lasthop.abi.Counter and
 * abi.CNT_MAX (checked against BTF by a test). */
enum lh_counter {
	CNT_LEARNED             = 0,  /* new entry from an uplink packet */
	CNT_RELEARNED           = 1,  /* last hop changed: SYN, or a new MAC with relearn=latest */
	CNT_REFRESHED           = 2,  /* entry seen again, last hop unchanged */
	CNT_REDIRECTED          = 3,  /* reply sent to its last hop */
	CNT_MISS                = 4,  /* reply with no entry: left to ordinary routing */
	CNT_NOT_IP              = 5,  /* not IPv4/IPv6 (ARP, LLDP, ...): passed */
	CNT_MALFORMED           = 6,  /* truncated header or bad length: passed */
	CNT_FRAGMENT            = 7,  /* later IP fragment whose first one was passed: passed too */
	CNT_ICMP_ERROR_REDIRECTED = 8, /* ICMP error sent along its connection's last hop */
	CNT_ICMP_ERROR_MISS     = 9,  /* ICMP error about no known connection: passed */
	CNT_ICMP_OTHER          = 10, /* ICMP neither echo nor error (ND, router adv.): passed */
	CNT_TTL_EXPIRED         = 11, /* routed reply with TTL <= 1: left to the kernel */
	CNT_LEARN_FAILED        = 12, /* table insert failed: passed */
	CNT_REWRITE_FAILED      = 13, /* VLAN push failed: passed */
	CNT_NO_IFACE            = 14, /* interface not configured by the agent: passed */
	CNT_IP_OPTIONS          = 15, /* IPv4 header with options (handled as usual) */
	CNT_IPV6_EXT            = 16, /* IPv6 extension headers skipped (handled as usual) */
	CNT_VM_ORIGIN_LEARNED   = 17, /* new connection opened by a VM, remembered */
	CNT_VM_ORIGIN_RETURNED  = 18, /* uplink packet of a VM-opened connection sent to its VM */
	CNT_SVC_SELECTED        = 19, /* service connection: VM chosen by the Maglev table */
	CNT_SVC_PINNED          = 20, /* service packet sent to the VM its entry holds */
	CNT_SVC_NO_BACKEND      = 21, /* service with no healthy VM: passed */
	CNT_SVC_REASSIGNED      = 22, /* entry's VM down: chosen again */
	CNT_AGENT_REMOVED       = 23, /* written by the agent: entries it aged out or flushed */
	CNT_SVC_DROPPED         = 24, /* packet for a down VM with on_vm_down = "drop" */
	CNT_VM_ORIGIN_PENDING   = 25, /* VM packet of a connection it opened, no reply seen yet */
	CNT_NOT_UNICAST         = 26, /* uplink frame to a multicast/broadcast MAC: no connection */
	CNT_VM_ORIGIN_HOP       = 27, /* first reply of a VM-opened connection: its last hop learned */
	CNT_FAST_TO_VM          = 28, /* request sent straight to the VM port that answered it */
	CNT_HOST_ICMP_REDIRECTED = 29, /* ICMP error the host sent, moved to its connection's last hop */
	CNT_HOST_ICMP_MISS      = 30, /* ICMP error the host sent about no known connection: left */
	CNT_HOST_ICMP_TAGGED    = 31, /* ... about a VLAN-tagged connection: left as routed */
	CNT_CONFIRMED           = 32, /* connection proved itself: moved to the confirmed table */
	CNT_CONFIRM_REFUSED     = 33, /* confirmed table full: the connection stays pending */
	CNT_VM_ORIGIN_SPOOFED   = 34, /* VM opened a connection from an address it does not own: not remembered */
	CNT_VM_ORIGIN_QUOTA     = 35, /* VM port's quota of opened connections reached: not remembered */
	CNT_VM_ORIGIN_SUPERSEDED = 36, /* uplink SYN on a VM-opened entry: a new connection replaces it */
	CNT_VM_ADDR_LEARNED     = 37, /* VM port's address learned from its answer to a client */
	CNT_RST_UNKNOWN         = 38, /* TCP RST of no known connection: nothing to remember */
	CNT_HOP_DOWN            = 39, /* reply whose last hop's uplink link is down: left to routing */
	CNT_HOP_UNTRUSTED       = 40, /* uplink frame from a MAC its list refuses: not learned, passed */
	CNT_HOP_DESC_FULL       = 41, /* lh_hop_descs full: a new tunnel/MPLS hop not learned, passed */
	CNT_HOP_DESC_GONE       = 42, /* reply whose hop descriptor is gone: left to routing */
	CNT_ENCAP_UNSUPPORTED   = 43, /* tunnel frame without metadata, options over GENEVE_OPT_MAX,
				       * or an MPLS stack deeper than MAX_MPLS_LABELS: passed */
	CNT_ENCAP_REDIRECTED    = 44, /* reply sent into a tunnel or under MPLS labels (also REDIRECTED) */
	CNT_FRAGMENT_FOLLOWED   = 45, /* later fragment sent where its datagram's first one went */
	CNT_FRAGMENT_EARLY      = 46, /* later fragment, its first one not seen (out of order,
				       * or forgotten by the LRU): passed */
	CNT_ICMP_ERROR_FORWARDED = 47, /* uplink ICMP error about a connection no VM port holds:
					* left to the bridge or routing, which reach its VM */
	CNT_HOP_FOLLOWED        = 48, /* reply whose last hop had moved (failover): entry and frame
				       * sent to the hop's new MAC (counted besides the redirect) */
	CNT_SCOPE_PASSED        = 49, /* new connection a scope rule passes: not learned, passed */
	CNT_SCOPE_FLUSHED       = 50, /* (slot 0) entries flush --out-of-scope removed */
	CNT_HOP_UNREACHABLE     = 51, /* reply whose last hop's neighbour entry failed (or whose
				       * tunnel endpoint is unreachable): left to routing */
	CNT_MPLS_POPPED         = 52, /* (XDP) MPLS frame: labels taken off, kept in its metadata
				       * for lh_uplink (counted besides what lh_uplink does) */
	CNT_MPLS_MALFORMED      = 53, /* (XDP) MPLS frame truncated in its label stack or the IP
				       * header under it: passed unchanged */
	CNT_MPLS_GSO            = 54, /* reply to an MPLS hop larger than a frame (GSO): the kernel
				       * here cannot segment MPLS, so it is left to routing */
	CNT_HOP_SLOT_BUSY       = 59, /* a new tunnel/MPLS hop's free slot was claimed by another
				       * CPU at the same moment: not learned, passed */
	CNT_MAX                 = 64,
};

enum { COUNTERS_SIZE = MAX_IFACES * CNT_MAX };
