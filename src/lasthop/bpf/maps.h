/* maps.h: the maps of the data path, all pinned by name under the agent's bpffs folder. */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"

/* Confirmed IPv4 connections (request direction, 16-byte key) -> last hop
 * and state. A plain hash, not an LRU: nothing evicts a confirmed
 * connection; only expiry, a close or the agent removes one. Full, it
 * refuses new confirmations (they stay pending), as conntrack's early drop
 * spares assured connections. Each family has its own tables so an IPv4
 * packet hashes and compares 16 bytes, not a 40-byte conn_key, and its
 * element stores 24 bytes less; conntrack.h's helpers pick the table. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONN_TABLE_SIZE);
	__type(key, struct conn_key4);
	__type(value, struct conn_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_conns4 SEC(".maps");

/* IPv4 connections not yet confirmed (a SYN, a first datagram, a mid-stream
 * packet): LRU, so a flood of spoofed packets only evicts other newcomers. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PENDING_TABLE_SIZE);
	__type(key, struct conn_key4);
	__type(value, struct conn_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_pending4 SEC(".maps");

/* Confirmed IPv6 connections (conn_key of FAMILY_V6) -> last hop and state:
 * as lh_conns4. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONN_TABLE_SIZE_V6);
	__type(key, struct conn_key);
	__type(value, struct conn_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_conns SEC(".maps");

/* IPv6 connections not yet confirmed: as lh_pending4. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PENDING_TABLE_SIZE_V6);
	__type(key, struct conn_key);
	__type(value, struct conn_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_pending SEC(".maps");

/* 0 -> the count of unconfirmed entries in lh_conns4 and lh_conns
 * (F_ENTRY2_INPLACE), against lh_settings' inplace_quota. One word, not per
 * CPU: the quota needs its exact value at every insert (conntrack.h). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct inplace_count);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_inplace SEC(".maps");

/* enum lh_table_counter -> events, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TC_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_table_counters SEC(".maps");

/* 0 -> what the last expiry pass found (written by lh_expire and lh_stats only). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct expiry_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_expiry SEC(".maps");

/* Full conn_key -> when its entry is due (struct expiry_due): what the last
 * expiry walks found due within their horizon, so a drain removes each at its
 * deadline without walking the table (expire.h). Not preallocated: it costs
 * memory only for the entries in it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, EXPIRY_DUE_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct conn_key);
	__type(value, struct expiry_due);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_expiry_due SEC(".maps");

/* 0 -> a token user space changes after it wrote or removed entries itself
 * (flush, upgrade, new timeouts): the next lh_expire walks even if the data
 * path changed nothing. A token, not a flag, so no one needs an atomic op. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_expiry_request SEC(".maps");

/* (VM port, address) -> why the port may open connections from it. Not
 * preallocated: it costs memory only for the addresses in it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VM_ADDRS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vm_addr_key);
	__type(value, struct vm_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_vm_addrs SEC(".maps");

/* (uplink, MAC) the agent lists from the config's allow_last_hops or
 * deny_last_hops (the uplink's F_IFACE_HOPS_* says which); value unused. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LISTED_HOPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct hop_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_hops SEC(".maps");

/* (uplink, MAC) -> frames refused by its uplink's list (what `stats` shows).
 * An LRU: frames from ever new forged MACs replace old counts, never fill it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_REFUSED_HOPS);
	__type(key, struct hop_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_hops_refused SEC(".maps");

/* A fragmented datagram (addresses, protocol, IP id) -> what its first
 * fragment did, for the later ones (frag.h). An LRU of its own: a flood of
 * fragment ids evicts only other fragments' state, never a connection. Not
 * pinned: a datagram in flight across an agent upgrade is all it loses. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FRAG_TABLE_SIZE);
	__type(key, struct frag_key);
	__type(value, struct frag_entry);
} lh_frags SEC(".maps");

/* Slot -> a last hop beyond MAC and tags (encap.h): tunnel endpoint, VNI,
 * Geneve options, tags, and the slot's generation. Entries with
 * F_ENTRY_HOP_EXT name one by id (slot | generation): a reply reads its slot
 * and checks the generation, no hash lookup. Learning claims a free slot
 * among the hop's HOP_DESC_PROBES (compare-and-swap on the generation), so a
 * flood of new hops is refused when they are taken, never evicts one in use;
 * lh_expire frees the slots no live entry names. The agent stores through
 * lh_hop_put (test run), never writing a slot itself. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_HOP_DESCS);
	__type(key, __u32);
	__type(value, struct hop_desc);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_hop_descs SEC(".maps");

/* 0 -> the descriptor being built for this CPU's packet (off the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hop_desc);
} lh_hop_scratch SEC(".maps");

/* VM port ifindex -> the entries it opened (its quota's use); an element
 * appears when the port first opens one. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_IFACES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct vm_usage);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_vm_usage SEC(".maps");

/* Table changes for the agent's sync (struct conn_change records), written
 * only while F_SET_SYNC is set; full, a record is dropped and counted
 * (TC_SYNC_LOST): the data path never waits. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CHANGES_RING_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_changes SEC(".maps");

/* ifindex -> role, zone, own MAC and counter slot; role ROLE_NONE = not attached. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_IFINDEX);
	__type(key, __u32);
	__type(value, struct iface_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_ifaces SEC(".maps");

/* slot * CNT_MAX + enum lh_counter -> packets, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTERS_SIZE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_counters SEC(".maps");

/* 0 -> host-wide settings. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lh_settings);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_settings SEC(".maps");

/* Service address (and port) -> service id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICE_KEYS);
	__type(key, struct svc_key);
	__type(value, struct svc_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_services SEC(".maps");

/* One service's Maglev table: slot -> VM port ifindex (0 = no VM). The agent
 * builds a new one and swaps it into lh_maglev in one update, so no packet
 * ever sees a half-built table. */
struct maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAGLEV_SIZE);
	__type(key, __u32);
	__type(value, __u32);
};

/* Service id -> its Maglev table. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, MAX_SERVICES);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct maglev_table);
} lh_maglev SEC(".maps");

#ifdef LH_TRACE_REDIRECT
/* Test builds only: 0 -> ifindex of the last bpf_redirect(), because
 * BPF_PROG_TEST_RUN reports the verdict but not where a redirect goes. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} lh_trace SEC(".maps");

static __always_inline void trace_redirect(__u32 ifindex)
{
	__u32 zero = 0;

	bpf_map_update_elem(&lh_trace, &zero, &ifindex, BPF_ANY);
}

/* Test builds only: the tunnel key (and Geneve options) a redirected reply
 * leaves with, read back with bpf_skb_get_tunnel_key: test run can let a
 * program set a key, never give a packet one, and its output shows no
 * metadata. (A key set for sending reads back with the endpoint as its
 * local address: the helper reads a key as received, remote = source.) */
struct tunnel_trace {
	__u32 family;  /* 4 or 6: the key read back (BPF_F_TUNINFO_IPV6 for 6); 0: none */
	__s32 opt_len; /* bpf_skb_get_tunnel_opt: bytes of options, or a negative error */
	struct bpf_tunnel_key key;
	__u8  opts[GENEVE_OPT_MAX];
};

/* Test builds only: 0 -> what the last trace_tunnel read. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tunnel_trace);
} lh_trace_tunnel SEC(".maps");

/* Test builds only: a change to make to the next reply's hop slot between
 * its check and its reads (hop_torn_hook, encap.h), then mode 0 again. */
struct torn_test {
	__u32 mode;            /* enum lh_torn_mode */
	__u32 reserved;
	struct hop_desc with;  /* the content TORN_CLAIMED / TORN_WRITING write (up to .mark) */
};

/* Test builds only: 0 -> the change to make (struct torn_test). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct torn_test);
} lh_test_torn SEC(".maps");

static __always_inline void trace_tunnel(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct tunnel_trace *t = bpf_map_lookup_elem(&lh_trace_tunnel, &zero);

	if (!t)
		return;
	t->family = 0;
	if (!bpf_skb_get_tunnel_key(skb, &t->key, sizeof(t->key), 0))
		t->family = 4;
	else if (!bpf_skb_get_tunnel_key(skb, &t->key, sizeof(t->key), BPF_F_TUNINFO_IPV6))
		t->family = 6;
	t->opt_len = bpf_skb_get_tunnel_opt(skb, t->opts, sizeof(t->opts));
}
#else
static __always_inline void trace_redirect(__u32 ifindex) {}
static __always_inline void trace_tunnel(struct __sk_buff *skb) {}
#endif

static __always_inline void count(__u32 slot, __u32 reason)
{
	__u32 key = slot * CNT_MAX + reason;
	__u64 *n = bpf_map_lookup_elem(&lh_counters, &key);

	if (n)
		*n += 1;
}

/* The data path's clock: the low 32 bits of jiffies (conn_entry.last_seen). */
static __always_inline __u32 now32(void)
{
	return (__u32)bpf_jiffies64();
}

static __always_inline void count_table_n(__u32 what, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(&lh_table_counters, &what);

	if (c)
		*c += n;
}

static __always_inline void count_table(__u32 what)
{
	count_table_n(what, 1);
}

/* The config of interface ifindex if the agent attached it with role, else NULL. */
static __always_inline struct iface_cfg *iface_get(__u32 ifindex, __u8 role)
{
	struct iface_cfg *cfg = bpf_map_lookup_elem(&lh_ifaces, &ifindex);

	return cfg && cfg->role == role ? cfg : NULL;
}
