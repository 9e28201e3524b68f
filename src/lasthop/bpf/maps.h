/* maps.h: the maps of the data path, all pinned by name under the agent's bpffs folder. */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "abi.h"

/* Connection (request direction) -> its last hop and state. LRU: a full table
 * evicts the least recently used connection, which falls back to routing. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CONN_TABLE_SIZE);
	__type(key, struct conn_key);
	__type(value, struct conn_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lh_conns SEC(".maps");

/* ifindex -> role, zone, own MAC and counter slot of an attached interface. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_IFACES);
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

static __always_inline void count(__u32 slot, __u32 reason)
{
	__u32 key = slot * CNT_MAX + reason;
	__u64 *n = bpf_map_lookup_elem(&lh_counters, &key);

	if (n)
		*n += 1;
}
