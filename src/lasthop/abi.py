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

# the kernel's
ETH_ALEN = 6
IFNAMSIZ = 16  # linux/if.h: an interface name is at most 15 bytes and a NUL
# IP protocol numbers (linux/in.h, linux/in6.h), as conn_key.proto and svc_key.proto hold them
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
# enum lh_const
CONN_TABLE_SIZE = 1 << 20  # the object's default; the config's table_size sets it
MAX_IFACES = 256
MAX_IFINDEX = 65536  # lh_ifaces is an array by ifindex: higher ones cannot be attached
MAX_SERVICES = 256
MAX_SERVICE_KEYS = MAX_SERVICES * 4
MAGLEV_SIZE = 65537
MAGLEV_SEED = 0x4C617374
MAX_VLAN_TAGS = 2
FAMILY_V4 = 4
FAMILY_V6 = 6


class Role(enum.IntEnum):
    NONE = 0
    UPLINK = 1
    VM_PORT = 2


# enum lh_iface_flag: lh_ifaces value .flags
F_IFACE_ROUTED = 1 << 0
F_IFACE_VM_DOWN = 1 << 1
F_IFACE_VM_MAC = 1 << 2
# enum lh_settings_flag: lh_settings value .flags
F_SET_RELEARN_FIRST = 1 << 0
F_SET_SERVICES = 1 << 1
F_SET_VM_DOWN_DROP = 1 << 2
F_SET_NO_VM_ORIGIN = 1 << 3
F_SET_FAST_PATH = 1 << 4
# enum lh_entry_flag: lh_conns value .flags
F_ENTRY_HOP_KNOWN = 1 << 0
F_ENTRY_VM_ORIGIN = 1 << 1
F_ENTRY_OUTER_8021AD = 1 << 2
F_ENTRY_VM_FAST = 1 << 3


# lh_counters: key = interface slot * CNT_MAX + Counter, CNT_MAX slots per interface
CNT_MAX = 48


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


class ConnEntry(ctypes.Structure):
    _fields_ = [
        ("last_seen", ctypes.c_uint64),
        ("ifindex", ctypes.c_uint32),
        ("vm_ifindex", ctypes.c_uint32),
        ("mac", ctypes.c_uint8 * ETH_ALEN),
        ("vlan_tci", ctypes.c_uint16 * MAX_VLAN_TAGS),
        ("vlan_count", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("tunnel_id", ctypes.c_uint32),
        ("packets", ctypes.c_uint32),
        ("replies", ctypes.c_uint32),
    ]


class IfaceCfg(ctypes.Structure):
    _fields_ = [
        ("mac", ctypes.c_uint8 * ETH_ALEN),
        ("zone", ctypes.c_uint16),
        ("role", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("slot", ctypes.c_uint16),
        ("vm_mac", ctypes.c_uint8 * ETH_ALEN),
        ("reserved", ctypes.c_uint16),
    ]


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
    _fields_ = [("flags", ctypes.c_uint32), ("hz", ctypes.c_uint32)]


# name in BTF -> mirror, for the ABI test
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "conn_key": ConnKey,
    "conn_entry": ConnEntry,
    "iface_cfg": IfaceCfg,
    "lh_settings": Settings,
    "svc_key": SvcKey,
    "svc_info": SvcInfo,
}


def counter_key(slot: int, counter: Counter) -> bytes:
    return bytes(ctypes.c_uint32(slot * CNT_MAX + int(counter)))
