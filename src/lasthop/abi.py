"""The map ABI in Python: ctypes mirrors of the structs in bpf/abi.h, and the
constants, flags and counters of bpf/consts.h.

Keep in sync with src/lasthop/bpf/abi.h and consts.h; tests/test_abi.py checks
sizes, offsets, enum values and every constant here (and any copy of one
elsewhere in the package) against the compiled object's BTF. The kernel's own
numbers (ETH_ALEN, IFNAMSIZ, IPPROTO_*) are checked against its headers.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress

# the kernel's
ETH_ALEN = 6
IFNAMSIZ = 16  # linux/if.h: an interface name is at most 15 bytes and a NUL
# IP protocol numbers (linux/in.h, linux/in6.h), as conn_key.proto and svc_key.proto hold them
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
# enum lh_const
CONN_TABLE_SIZE = 1 << 20  # lh_conns4, the object's default; the config's table_size sets it
CONN_TABLE_SIZE_V6 = 262144  # lh_conns; the config's table_size_v6 sets it
MAX_IFACES = 256
MAX_IFINDEX = 65536  # lh_ifaces is an array by ifindex: higher ones cannot be attached
MAX_SERVICES = 256
MAX_SERVICE_KEYS = MAX_SERVICES * 4
MAGLEV_SIZE = 65537
MAGLEV_SEED = 0x4C617374
MAX_VLAN_TAGS = 2
FAMILY_V4 = 4
FAMILY_V6 = 6
PENDING_TABLE_SIZE = 262144  # lh_pending4; the config's pending_table_size sets it
PENDING_TABLE_SIZE_V6 = 65536  # lh_pending; the config's pending_table_size_v6 sets it
MAX_VM_ADDRS = 65536
MAX_LISTED_HOPS = 4096
MAX_REFUSED_HOPS = 1024
MAX_MOVED_HOPS = 1024  # lh_hop_moved: last hops whose address moved (failover)
MAX_LISTED_ENDPOINTS = 4096  # lh_endpoints: listed tunnel endpoint prefixes, catch-alls too
ENDPOINT_KEY_BITS = 64  # EndpointLpmKey bits before the address: uplink, family
MAX_ENDPOINTS_DOWN = 1024  # lh_endpoints_down: endpoints with a failed neighbour entry or no route
MAX_SCOPE_RULES = 64  # lh_scope: the config's scope rules and the default
SCOPE_WORDS = 10  # 32-bit words of a scope match key (ScopeRule)
CHANGES_RING_SIZE = 1 << 22  # lh_changes, bytes
FRAG_TABLE_SIZE = 8192  # lh_frags: fragmented datagrams whose first fragment's decision is kept
SVC_WALK_IFACES = 16  # VM ports one run of lh_svc_walk looks for
HOP_SLOT_BITS = 14  # a hop id's slot bits; the rest are the slot's generation
MAX_HOP_DESCS = 1 << HOP_SLOT_BITS  # lh_hop_descs: slots for distinct tunnel/MPLS last hops
HOP_SLOT_MASK = MAX_HOP_DESCS - 1
HOP_GEN_MASK = (1 << (32 - HOP_SLOT_BITS)) - 1  # a hop id's generation bits: gen >> 1
GENEVE_OPT_MAX = 32  # Geneve option bytes a hop keeps
MAX_MPLS_LABELS = 3
HOP_DESC_PROBES = 4
MPLS_META_MAGIC = 0x4D504C53  # struct mpls_meta.magic: "MPLS"


class Role(enum.IntEnum):
    NONE = 0
    UPLINK = 1
    VM_PORT = 2


class LinkKind(enum.IntEnum):
    """enum lh_link_kind: what an interface carries (iface_cfg.link_kind)."""

    ETHERNET = 0
    VXLAN = 1
    GENEVE = 2
    L3 = 3  # no Ethernet header: tun, WireGuard, xfrm, GRE, IP-in-IP
    MPLS = 4  # Ethernet with MPLS hand-off: lh_uplink_mpls (XDP) pops, lh_uplink learns


class Delivery(enum.IntEnum):
    """enum lh_delivery: how a VM port hands the VM lasthop's frames (iface_cfg.delivery)."""

    DEVICE = 0  # out of the port (bpf_redirect)
    PEER = 1  # into the guest end of a veth in another namespace (bpf_redirect_peer)


class FragVerdict(enum.IntEnum):
    """enum lh_frag_verdict: what a datagram's first fragment did (frag_entry.verdict)."""

    PASSED = 0
    TO_VM = 1
    TO_HOP = 2


# enum lh_iface_flag: lh_ifaces value .flags
F_IFACE_ROUTED = 1 << 0
F_IFACE_VM_DOWN = 1 << 1
F_IFACE_VM_MAC = 1 << 2
F_IFACE_ADDRS_FIXED = 1 << 3
F_IFACE_LINK_DOWN = 1 << 4
F_IFACE_HOPS_ALLOW = 1 << 5
F_IFACE_HOPS_DENY = 1 << 6
F_IFACE_FOLLOW_MOVES = 1 << 7
# enum lh_settings_flag: lh_settings value .flags
F_SET_RELEARN_FIRST = 1 << 0
F_SET_SERVICES = 1 << 1
F_SET_VM_DOWN_DROP = 1 << 2
F_SET_NO_VM_ORIGIN = 1 << 3
F_SET_FAST_PATH = 1 << 4
F_SET_SYNC = 1 << 5
F_SET_HOPS_MOVED = 1 << 6
F_SET_SCOPE = 1 << 7
F_SET_ENDPOINTS = 1 << 8
F_SET_ENDPOINTS_DOWN = 1 << 9
F_SET_INPLACE = 1 << 10  # inplace_quota > 0: new connections wait in the confirmed tables
# enum lh_entry_flag: lh_conns value .flags
F_ENTRY_HOP_KNOWN = 1 << 0
F_ENTRY_VM_ORIGIN = 1 << 1
F_ENTRY_OUTER_8021AD = 1 << 2
F_ENTRY_VM_FAST = 1 << 3
F_ENTRY_FIN_OPENER = 1 << 4
F_ENTRY_FIN_ANSWERER = 1 << 5
F_ENTRY_HOP_EXT = 1 << 6  # vlan_tci holds the id of its lh_hop_descs descriptor
F_ENTRY_VM_NEIGH = 1 << 7  # routed VM_FAST: its first request checks the host's neighbour
# enum lh_entry_flag2: lh_conns value .flags2
F_ENTRY2_INPLACE = 1 << 0  # in a confirmed table, not confirmed yet (counted in lh_inplace)
# enum lh_hop_flag: lh_hop_moved value .flags
HOP_UNREACHABLE = 1 << 0  # the hop's neighbour entry failed: its entries are not used
# enum lh_endpoint_verdict: lh_endpoints value
ENDPOINT_TRUSTED = 1
ENDPOINT_REFUSED = 2


class State(enum.IntEnum):
    """enum conn_state: where a connection stands (conn_entry.state)."""

    NONE = 0
    TCP_SYN_SENT = 1
    TCP_SYN_RECV = 2
    TCP_MIDSTREAM = 3
    TCP_ESTABLISHED = 4
    TCP_CLOSING = 5
    TCP_CLOSED = 6
    UDP_NEW = 7
    UDP_ANSWERED = 8
    UDP_STREAM = 9
    ICMP_NEW = 10
    ICMP_ANSWERED = 11


CS_MAX = 12


class TableCounter(enum.IntEnum):
    """enum lh_table_counter: table-wide events (lh_table_counters)."""

    PENDING_INSERTED = 0
    PENDING_PROMOTED = 1
    PENDING_EXPIRED = 2
    PENDING_REMOVED = 3
    CONFIRMED_INSERTED = 4
    CONFIRMED_EXPIRED = 5
    CONFIRMED_REMOVED = 6
    CONFIRM_REFUSED = 7
    EXPIRY_PASSES = 8
    STATE_CHANGES = 9
    EXPIRY_SKIPPED = 10
    SYNC_LOST = 11
    INPLACE_INSERTED = 12
    INPLACE_CONFIRMED = 13
    INPLACE_EXPIRED = 14
    INPLACE_REMOVED = 15


TC_MAX = 16


class ChangeKind(enum.IntEnum):
    """enum lh_change_kind: what a change record (conn_change.kind) reports."""

    LEARNED = 1
    HOP = 2
    STATE = 3
    PROMOTED = 4
    REMOVED = 5
    EXPIRED = 6
    REFRESH = 7


class ChangeTable(enum.IntEnum):
    """enum lh_change_table: which table a change record's entry is in."""

    CONFIRMED = 0
    PENDING = 1
    EITHER = 2


class ScopeAction(enum.IntEnum):
    """enum lh_scope_action: what a scope rule does with a new connection."""

    END = 0
    LEARN = 1
    PASS = 2


class VmAddrOrigin(enum.IntEnum):
    """enum vm_addr_origin: why a VM port may open connections from an address."""

    CONFIGURED = 1
    LEARNED = 2
    SERVICE = 3


# lh_counters: key = interface slot * CNT_MAX + Counter, CNT_MAX slots per interface
CNT_MAX = 64


class Counter(enum.IntEnum):
    """enum lh_counter: why a packet was handled as it was."""

    LEARNED = 0
    RELEARNED = 1
    REFRESHED = 2
    REDIRECTED = 3
    MISS = 4
    NOT_IP = 5
    MALFORMED = 6
    FRAGMENT = 7
    ICMP_ERROR_REDIRECTED = 8
    ICMP_ERROR_MISS = 9
    ICMP_OTHER = 10
    TTL_EXPIRED = 11
    LEARN_FAILED = 12
    REWRITE_FAILED = 13
    NO_IFACE = 14
    IP_OPTIONS = 15
    IPV6_EXT = 16
    VM_ORIGIN_LEARNED = 17
    VM_ORIGIN_RETURNED = 18
    SVC_SELECTED = 19
    SVC_PINNED = 20
    SVC_NO_BACKEND = 21
    SVC_REASSIGNED = 22
    AGENT_REMOVED = 23
    SVC_DROPPED = 24
    VM_ORIGIN_PENDING = 25
    NOT_UNICAST = 26
    VM_ORIGIN_HOP = 27
    FAST_TO_VM = 28
    HOST_ICMP_REDIRECTED = 29
    HOST_ICMP_MISS = 30
    HOST_ICMP_TAGGED = 31
    CONFIRMED = 32
    CONFIRM_REFUSED = 33
    VM_ORIGIN_SPOOFED = 34
    VM_ORIGIN_QUOTA = 35
    VM_ORIGIN_SUPERSEDED = 36
    VM_ADDR_LEARNED = 37
    RST_UNKNOWN = 38
    HOP_DOWN = 39
    HOP_UNTRUSTED = 40
    HOP_DESC_FULL = 41
    HOP_DESC_GONE = 42
    ENCAP_UNSUPPORTED = 43
    ENCAP_REDIRECTED = 44
    FRAGMENT_FOLLOWED = 45
    FRAGMENT_EARLY = 46
    ICMP_ERROR_FORWARDED = 47
    HOP_FOLLOWED = 48
    SCOPE_PASSED = 49
    SCOPE_FLUSHED = 50
    HOP_UNREACHABLE = 51
    MPLS_POPPED = 52
    MPLS_MALFORMED = 53
    MPLS_GSO = 54
    HOP_SLOT_BUSY = 59


class HopKind(enum.IntEnum):
    """enum lh_hop_kind: what a hop descriptor (hop_desc.kind) holds."""

    TUNNEL4 = 1
    TUNNEL6 = 2
    MPLS = 3


class ConnKey(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint32 * 4),
        ("daddr", ctypes.c_uint32 * 4),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("zone", ctypes.c_uint16),
    ]


class ConnKey4(ctypes.Structure):
    """struct conn_key4: the 16-byte key of the IPv4 tables (lh_conns4,
    lh_pending4); the same fields as a ConnKey of FAMILY_V4."""

    _fields_ = [
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
        ("zone", ctypes.c_uint16),
    ]


def key4_of(key: ConnKey) -> ConnKey4:
    """The IPv4 tables' key of an IPv4 ConnKey."""
    return ConnKey4(
        saddr=key.saddr[0],
        daddr=key.daddr[0],
        sport=key.sport,
        dport=key.dport,
        proto=key.proto,
        zone=key.zone,
    )


def key_of4(key4: ConnKey4) -> ConnKey:
    """The full ConnKey of an IPv4 tables' key."""
    key = ConnKey(
        sport=key4.sport, dport=key4.dport, proto=key4.proto, family=FAMILY_V4, zone=key4.zone
    )
    key.saddr[0] = key4.saddr
    key.daddr[0] = key4.daddr
    return key


class ConnEntry(ctypes.Structure):
    _fields_ = [
        ("last_seen", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("vm_ifindex", ctypes.c_uint32),
        ("seq", ctypes.c_uint32),
        ("packets", ctypes.c_uint32),
        ("replies", ctypes.c_uint32),
        ("mac", ctypes.c_uint8 * ETH_ALEN),
        ("vlan_tci", ctypes.c_uint16 * MAX_VLAN_TAGS),
        ("vlan_count", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("sync_epoch", ctypes.c_uint8),
        ("flags2", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
    ]


class ConnChange(ctypes.Structure):
    """struct conn_change: one record of the lh_changes ring buffer."""

    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("table", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 2),
        ("key", ConnKey),
        ("entry", ConnEntry),
    ]


class IfaceCfg(ctypes.Structure):
    _fields_ = [
        ("mac", ctypes.c_uint8 * ETH_ALEN),
        ("zone", ctypes.c_uint16),
        ("role", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("slot", ctypes.c_uint16),
        ("vm_mac", ctypes.c_uint8 * ETH_ALEN),
        ("link_kind", ctypes.c_uint8),  # enum lh_link_kind
        ("delivery", ctypes.c_uint8),  # enum lh_delivery (VM port)
    ]


class HopDesc(ctypes.Structure):
    """struct hop_desc: lh_hop_descs value (an array slot), a last hop beyond
    MAC and tags, and the slot's generation (hop_id_of)."""

    _fields_ = [
        ("remote", ctypes.c_uint32 * 4),  # host order words (bpf_tunnel_key), IPv4 in word 0
        ("vni", ctypes.c_uint32),
        ("mpls", ctypes.c_uint32 * MAX_MPLS_LABELS),
        ("vlan_tci", ctypes.c_uint16 * MAX_VLAN_TAGS),
        ("kind", ctypes.c_uint8),
        ("mpls_count", ctypes.c_uint8),
        ("opt_len", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
        ("opts", ctypes.c_uint8 * GENEVE_OPT_MAX),
        ("mark", ctypes.c_uint32),
        ("reserved2", ctypes.c_uint32),
        ("gen", ctypes.c_uint64),  # odd while being written; an id names it while gen matches
    ]


class MplsMeta(ctypes.Structure):
    """struct mpls_meta: the frame metadata lh_uplink_mpls leaves for lh_uplink."""

    _fields_ = [
        ("magic", ctypes.c_uint32),  # MPLS_META_MAGIC
        ("lse", ctypes.c_uint32 * MAX_MPLS_LABELS),  # host order, outer first, as received
        ("count", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
    ]


def hop_id_of(slot: int, gen: int) -> int:
    """encap.h's hop_id_of: the id naming *slot* while its generation is *gen*."""
    return (slot & HOP_SLOT_MASK) | ((gen >> 1) & HOP_GEN_MASK) << HOP_SLOT_BITS


def hop_id_slot(hop_id: int) -> tuple[int, int]:
    """The slot an id names and the (smallest) generation that makes it name it."""
    return hop_id & HOP_SLOT_MASK, (hop_id >> HOP_SLOT_BITS) << 1


def hop_id_names(hop_id: int, gen: int) -> bool:
    """Whether *hop_id* names its slot while the slot's generation is *gen*
    (encap.h's hop_desc_of: even, its low bits the id's)."""
    return not gen & 1 and hop_id_of(hop_id, gen) == hop_id


def hop_desc_id(entry: ConnEntry) -> int | None:
    """The lh_hop_descs id an entry names, None when it names none."""
    if not entry.flags & F_ENTRY_HOP_EXT:
        return None
    return int(entry.vlan_tci[0]) | int(entry.vlan_tci[1]) << 16


class SvcKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32 * 4),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
    ]


class SvcInfo(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class Settings(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("hz", ctypes.c_uint32),
        ("timeout", ctypes.c_uint32 * CS_MAX),
        ("vm_quota", ctypes.c_uint32),
        ("sync_shift", ctypes.c_uint32),
        ("inplace_quota", ctypes.c_uint32),
    ]


def table_events(ev: dict[TableCounter, int]) -> dict[str, int]:
    """The table counters as `stats` reports them (both tables' inserted,
    expired, removed; promoted; evicted from the pending LRU without its
    element count, which the caller subtracts): an unconfirmed entry waiting
    in a confirmed table (F_ENTRY2_INPLACE) is a pending connection, its
    confirmation a promotion (docs/table.md)."""
    T = TableCounter
    pending_in = ev[T.PENDING_INSERTED] + ev[T.INPLACE_INSERTED]
    promoted = ev[T.PENDING_PROMOTED] + ev[T.INPLACE_CONFIRMED]
    expired = ev[T.PENDING_EXPIRED] + ev[T.INPLACE_EXPIRED]
    removed = ev[T.PENDING_REMOVED] + ev[T.INPLACE_REMOVED]
    return {
        "confirmed_inserted": ev[T.CONFIRMED_INSERTED] + ev[T.INPLACE_CONFIRMED],
        "confirmed_expired": ev[T.CONFIRMED_EXPIRED],
        "confirmed_removed": ev[T.CONFIRMED_REMOVED],
        "pending_inserted": pending_in,
        "pending_expired": expired,
        "pending_removed": removed,
        "promoted": promoted,
        "pending_left": pending_in - promoted - expired - removed,
    }


class InplaceCount(ctypes.Structure):
    """struct inplace_count: lh_inplace[0], the in-place entries' count."""

    _fields_ = [("count", ctypes.c_uint64)]


class ExpiryStats(ctypes.Structure):
    _fields_ = [
        ("passes", ctypes.c_uint64),
        ("started", ctypes.c_uint32),
        ("finished", ctypes.c_uint32),
        ("live", (ctypes.c_uint32 * CS_MAX) * 2),
        ("expired", (ctypes.c_uint64 * CS_MAX) * 2),
        ("elements", ctypes.c_int64 * 2),
        ("changes", ctypes.c_uint64),
        ("request", ctypes.c_uint64),
        ("skipped", ctypes.c_uint64),
        ("next_due", ctypes.c_uint32),
        ("checked", ctypes.c_uint32),
        ("lead", ctypes.c_uint32),
        ("due_next", ctypes.c_uint32),
        ("drains", ctypes.c_uint64),
        ("due_expired", ctypes.c_uint64),
        ("due_full", ctypes.c_uint64),
        ("indexed", ctypes.c_uint32),
        ("soon", ctypes.c_uint32),
        ("soon_since", ctypes.c_uint32),
        ("filed", ctypes.c_uint64),
        ("filed_seen", ctypes.c_uint64),
    ]


class ExpiryDue(ctypes.Structure):
    """struct expiry_due (abi.h): lh_expiry_due's value, when an indexed entry is due."""

    _fields_ = [("deadline", ctypes.c_uint32), ("table", ctypes.c_uint32)]


class SvcWalk(ctypes.Structure):
    """struct svc_walk (abi.h): lh_svc_walk's frame, the request in and the counts out."""

    _fields_ = [
        ("service_id", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32 * SVC_WALK_IFACES),
        ("drop", ctypes.c_uint32),
        ("moved", ctypes.c_uint32),
        ("dropped", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class RefKey(ctypes.Structure):
    """struct ref_key (lasthop.c): lh_ref_conns' key, the bench reference's
    IPv4 tuple in request orientation (saddr = the client); addresses and
    ports in network order, proto (IPPROTO_TCP) in host order."""

    _fields_ = [
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint32),
    ]


class HopKey(ctypes.Structure):
    """struct hop_key: a last-hop MAC on one uplink (lh_hops, lh_hops_refused)."""

    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("mac", ctypes.c_uint8 * 6),
        ("pad", ctypes.c_uint16),
    ]


def hop_key(ifindex: int, mac: bytes) -> HopKey:
    key = HopKey(ifindex=ifindex)
    key.mac[:] = list(mac)
    return key


class HopMoved(ctypes.Structure):
    """struct hop_moved: lh_hop_moved's value, the MAC a last hop's address moved
    to, or (flags HOP_UNREACHABLE) that the hop no longer answers."""

    _fields_ = [
        ("mac", ctypes.c_uint8 * ETH_ALEN),
        ("flags", ctypes.c_uint16),
    ]


def hop_moved(mac: bytes, flags: int = 0) -> HopMoved:
    value = HopMoved(flags=flags)
    value.mac[:] = list(mac)
    return value


class ScopeRule(ctypes.Structure):
    """struct scope_rule: one rule of lh_scope, a value and a mask over the
    match key's words (bpf/abi.h says which); ports in host order."""

    _fields_ = [
        ("value", ctypes.c_uint32 * SCOPE_WORDS),
        ("mask", ctypes.c_uint32 * SCOPE_WORDS),
        ("port_lo", ctypes.c_uint16),
        ("port_hi", ctypes.c_uint16),
        ("action", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
    ]


class EndpointLpmKey(ctypes.Structure):
    """struct endpoint_lpm_key: a tunnel endpoint prefix of one uplink (lh_endpoints);
    prefixlen counts the uplink's and family's bits too (ENDPOINT_KEY_BITS)."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint32 * 4),
    ]


class EndpointKey(ctypes.Structure):
    """struct endpoint_key: a tunnel endpoint on one uplink (lh_endpoints_refused;
    lh_endpoints_down: uplink 0)."""

    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint32 * 4),
    ]


def endpoint_text(key: EndpointKey) -> str:
    """The endpoint an EndpointKey names, as text ("192.0.2.1", "2001:db8::1")."""
    raw = bytes(key.addr)
    return str(ipaddress.ip_address(raw[:4] if key.family == FAMILY_V4 else raw))


def endpoint_lpm_key(ifindex: int, family: int, addr: bytes, bits: int) -> EndpointLpmKey:
    """The lh_endpoints key of prefix *addr*/*bits* (4 or 16 bytes, network order)."""
    key = EndpointLpmKey(prefixlen=ENDPOINT_KEY_BITS + bits, ifindex=ifindex, family=family)
    ctypes.memmove(key.addr, addr, len(addr))
    return key


class VmAddrKey(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint32 * 4),
    ]


class VmAddr(ctypes.Structure):
    _fields_ = [("origin", ctypes.c_uint32)]


class VmUsage(ctypes.Structure):
    _fields_ = [
        ("created", ctypes.c_uint32),
        ("base", ctypes.c_uint32),
        ("counted", ctypes.c_uint32),
        ("walking", ctypes.c_uint32),
        ("next_base", ctypes.c_uint32),
    ]


class FragKey(ctypes.Structure):
    """struct frag_key: one fragmented datagram (lh_frags)."""

    _fields_ = [
        ("saddr", ctypes.c_uint32 * 4),
        ("daddr", ctypes.c_uint32 * 4),
        ("id", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("zone", ctypes.c_uint16),
    ]


class FragEntry(ctypes.Structure):
    """struct frag_entry: what a datagram's first fragment did (lh_frags)."""

    _fields_ = [
        ("verdict", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
        ("vm_ifindex", ctypes.c_uint32),
        ("hop", ConnEntry),
    ]


# name in BTF -> mirror, for the ABI test
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "conn_key": ConnKey,
    "conn_key4": ConnKey4,
    "conn_entry": ConnEntry,
    "conn_change": ConnChange,
    "iface_cfg": IfaceCfg,
    "hop_desc": HopDesc,
    "mpls_meta": MplsMeta,
    "lh_settings": Settings,
    "inplace_count": InplaceCount,
    "svc_key": SvcKey,
    "svc_info": SvcInfo,
    "expiry_stats": ExpiryStats,
    "expiry_due": ExpiryDue,
    "vm_addr_key": VmAddrKey,
    "hop_key": HopKey,
    "hop_moved": HopMoved,
    "endpoint_lpm_key": EndpointLpmKey,
    "endpoint_key": EndpointKey,
    "scope_rule": ScopeRule,
    "vm_addr": VmAddr,
    "vm_usage": VmUsage,
    "ref_key": RefKey,
    "frag_key": FragKey,
    "frag_entry": FragEntry,
    "svc_walk": SvcWalk,
}


def counter_key(slot: int, counter: Counter) -> bytes:
    return bytes(ctypes.c_uint32(slot * CNT_MAX + int(counter)))


def vm_addr_key(ifindex: int, family: int, addr: bytes) -> VmAddrKey:
    """The lh_vm_addrs key of an address (4 or 16 bytes, network order)."""
    key = VmAddrKey(ifindex=ifindex, family=family)
    ctypes.memmove(key.addr, addr, len(addr))
    return key
