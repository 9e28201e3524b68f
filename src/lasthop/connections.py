"""Records of the per-connection table and the counters, decoded for people
and for JSON (the shapes documented in docs/cli.md)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from lasthop import abi
from lasthop.clock import Clock

__all__ = ["Connection", "decode", "PROTO_NAMES", "format_mac", "counter_name", "ifname"]

PROTO_NAMES = {
    abi.IPPROTO_ICMP: "icmp",
    abi.IPPROTO_TCP: "tcp",
    abi.IPPROTO_UDP: "udp",
    abi.IPPROTO_ICMPV6: "icmpv6",
    47: "gre",
    50: "esp",
    132: "sctp",
}
_FLAG_NAMES = {
    abi.F_ENTRY_HOP_KNOWN: "hop_known",
    abi.F_ENTRY_VM_ORIGIN: "vm_origin",
    abi.F_ENTRY_OUTER_8021AD: "outer_8021ad",
    abi.F_ENTRY_VM_FAST: "vm_fast",
}


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def counter_name(reason: int) -> str:
    try:
        return abi.Counter(reason).name.lower()
    except ValueError:
        return f"reason_{reason}"


def _addr(words: Any, family: int) -> str:
    raw = bytes(words)
    if family == abi.FAMILY_V4:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def ifname(ifindex: int) -> str:
    """The name of *ifindex* in the calling thread's network namespace."""
    if not ifindex:
        return ""
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"if{ifindex}"


@dataclass(frozen=True)
class Connection:
    """One entry: a connection (request direction) and its last hop."""

    proto: str
    family: int
    src: str
    dst: str
    sport: int
    dport: int
    zone: int
    mac: str
    uplink: str
    uplink_ifindex: int
    vlan: list[int]
    age_s: float
    packets: int
    replies: int
    vm_port: str
    flags: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decode(key: abi.ConnKey, entry: abi.ConnEntry, now_jiffies: int, hz: int) -> Connection:
    """One entry as a record; ages from the data path's clock (lasthop.clock)."""
    icmp = key.proto in (abi.IPPROTO_ICMP, abi.IPPROTO_ICMPV6)
    return Connection(
        proto=PROTO_NAMES.get(key.proto, str(key.proto)),
        family=key.family,
        src=_addr(key.saddr, key.family),
        dst=_addr(key.daddr, key.family),
        sport=socket.ntohs(key.sport),
        dport=0 if icmp else socket.ntohs(key.dport),
        zone=key.zone,
        mac=format_mac(bytes(entry.mac)) if entry.flags & abi.F_ENTRY_HOP_KNOWN else "",
        uplink=ifname(entry.ifindex) if entry.flags & abi.F_ENTRY_HOP_KNOWN else "",
        uplink_ifindex=entry.ifindex,
        vlan=[entry.vlan_tci[i] & 0x0FFF for i in range(min(entry.vlan_count, abi.MAX_VLAN_TAGS))],
        age_s=round(Clock.age_s(now_jiffies, entry.last_seen, hz), 3),
        packets=entry.packets,
        replies=entry.replies,
        vm_port=ifname(entry.vm_ifindex),
        flags=[name for bit, name in _FLAG_NAMES.items() if entry.flags & bit],
    )
