/* consts.h: every constant of the lasthop data path. Those the agent mirrors are
 * enum constants (they reach the BTF); the rest are #defines. */
#pragma once

/* Sizes and values the agent mirrors (lasthop.abi). They are enum constants, not
 * #defines, so they reach the object's BTF (through lh_abi_enums in abi.h)
 * and tests/test_abi.py checks every Python copy against them; for the same
 * reason they take no -D override: the agent would disagree. */
enum lh_const {
	/* Connection table size. The agent sets max_entries from the config
	 * before loading, so this is only the default the object is built with. */
	CONN_TABLE_SIZE = 1048576,
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
};

#define MAX_IPV6_EXT_HDRS 6   /* extension headers skipped before giving up */

/* Bytes pulled into the linear area when the headers are not there yet. */
#define PULL_LEN 128

#define ETH_ALEN   6  /* as linux/if_ether.h: a #define there, so one here too */
#define AF_INET_   2  /* bpf_fib_lookup's family: the socket API's values */
#define AF_INET6_  10

/* Interface roles (lh_ifaces value .role). */
enum lh_role {
	ROLE_NONE    = 0,
	ROLE_UPLINK  = 1,
	ROLE_VM_PORT = 2,
};

/* lh_ifaces value .flags */
enum lh_iface_flag {
	F_IFACE_ROUTED  = 1 << 0, /* routed host: frames leaving here get this port's MAC, TTL - 1 */
	F_IFACE_VM_DOWN = 1 << 1, /* VM port: VM removed or down; its connections move or drop */
	F_IFACE_VM_MAC  = 1 << 2, /* VM port: vm_mac is known */
};

/* lh_settings value .flags */
enum lh_settings_flag {
	F_SET_RELEARN_FIRST = 1 << 0, /* keep the first MAC seen; only a SYN re-learns */
	F_SET_SERVICES      = 1 << 1, /* some service is configured: look new connections up */
	F_SET_VM_DOWN_DROP  = 1 << 2, /* on_vm_down = "drop": a down VM's connections are dropped */
	F_SET_NO_VM_ORIGIN  = 1 << 3, /* vm_origin = false: do not remember connections VMs open */
	F_SET_FAST_PATH     = 1 << 4, /* requests skip bridge/routing to the VM that answered */
};

/* lh_conns value .flags */
enum lh_entry_flag {
	F_ENTRY_HOP_KNOWN    = 1 << 0, /* last hop learned on an uplink */
	F_ENTRY_VM_ORIGIN    = 1 << 1, /* connection opened by a VM (full proxy) */
	F_ENTRY_OUTER_8021AD = 1 << 2, /* outer tag was 802.1ad (0x88a8), not 802.1Q */
	F_ENTRY_VM_FAST      = 1 << 3, /* fast path: vm_ifindex is the port that answered */
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
	CNT_FRAGMENT            = 7,  /* IP fragment (no ports to key on): passed */
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
	CNT_MAX                 = 48,
};

enum { COUNTERS_SIZE = MAX_IFACES * CNT_MAX };
