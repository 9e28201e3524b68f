"""Records of the per-connection table and the counters, decoded for people
and for JSON (the shapes documented in docs/cli.md)."""

from __future__ import annotations

import functools
import ipaddress
import json
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from lasthop import abi
from lasthop.clock import Clock
from lasthop.errors import FilterError

__all__ = [
    "Connection",
    "ConnFilter",
    "decode",
    "PROTO_NAMES",
    "format_mac",
    "counter_name",
    "ifname",
    "state_name",
    "json_array",
]

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
    abi.F_ENTRY_FIN_OPENER: "fin_opener",
    abi.F_ENTRY_FIN_ANSWERER: "fin_answerer",
    abi.F_ENTRY_HOP_EXT: "hop_ext",
    abi.F_ENTRY_VM_NEIGH: "vm_neigh",
}
HopLookup = Callable[[int], abi.HopDesc | None]  # hop id -> its lh_hop_descs descriptor


def json_array(items: Iterable[dict[str, Any]]) -> Iterator[str]:
    """A JSON list in pieces, one element at a time: `show --json` and
    /v1/connections stream a million entries without holding them as one document."""
    n = 0
    yield "["
    for n, item in enumerate(items, 1):
        yield ("," if n > 1 else "") + "\n " + json.dumps(item)
    yield "\n]\n" if n else "]\n"


def state_name(state: int) -> str:
    try:
        return abi.State(state).name.lower()
    except ValueError:
        return f"state_{state}"


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
    state: str = "none"
    flags: list[str] = field(default_factory=list)
    # a tunnel last hop (lh_hop_descs): remote endpoint, VNI, Geneve options (hex)
    endpoint: str = ""
    vni: int | None = None
    geneve_options: str = ""
    # an MPLS last hop (lh_hop_descs): its labels, outer first
    mpls: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def endpoint_str(desc: abi.HopDesc) -> str:
    """A tunnel descriptor's remote endpoint (its words are in host order)."""
    if desc.kind == abi.HopKind.TUNNEL4:
        return str(ipaddress.IPv4Address(int(desc.remote[0])))
    if desc.kind == abi.HopKind.TUNNEL6:
        return str(ipaddress.IPv6Address(bytes(desc.remote)))
    return ""


def _hop_fields(entry: abi.ConnEntry, hop: HopLookup | None) -> dict[str, Any]:
    """VLAN, endpoint and VNI of an entry's last hop; those of a descriptor
    (F_ENTRY_HOP_EXT) from *hop*, "gone" when it is no longer there."""
    tags = list(entry.vlan_tci)
    hop_id = abi.hop_desc_id(entry)
    out: dict[str, Any] = {}
    if hop_id is not None:
        desc = hop(hop_id) if hop is not None else None
        tags = list(desc.vlan_tci) if desc is not None else [0, 0]
        out["endpoint"] = endpoint_str(desc) if desc is not None else "gone"
        if desc is not None and desc.kind in (abi.HopKind.TUNNEL4, abi.HopKind.TUNNEL6):
            out["vni"] = int(desc.vni)
            out["geneve_options"] = bytes(desc.opts[: desc.opt_len]).hex()
        if desc is not None and desc.kind == abi.HopKind.MPLS:
            n = min(int(desc.mpls_count), abi.MAX_MPLS_LABELS)
            out["mpls"] = [int(desc.mpls[i]) >> 12 for i in range(n)]
    out["vlan"] = [tags[i] & 0x0FFF for i in range(min(entry.vlan_count, abi.MAX_VLAN_TAGS))]
    return out


def tunnel_str(c: Connection) -> str:
    """A tunnel last hop as `show` and `explain` print it: "198.51.100.2 vni 100",
    an MPLS one "mpls 16001/24002" (labels outer first)."""
    if c.mpls:
        return "mpls " + "/".join(str(label) for label in c.mpls)
    if not c.endpoint:
        return ""
    return c.endpoint + (f" vni {c.vni}" if c.vni is not None else "")


def decode(
    key: abi.ConnKey,
    entry: abi.ConnEntry,
    now_jiffies: int,
    hz: int,
    names: dict[int, str] | None = None,
    hop: HopLookup | None = None,
) -> Connection:
    """One entry as a record; ages from the data path's clock (lasthop.clock).
    *names* caches interface names across calls (one lookup per ifindex);
    *hop* reads a tunnel hop's descriptor (cache it: one lookup per hop)."""
    icmp = key.proto in (abi.IPPROTO_ICMP, abi.IPPROTO_ICMPV6)
    cache = names if names is not None else {}

    def name(ifindex: int) -> str:
        if ifindex not in cache:
            cache[ifindex] = ifname(ifindex)
        return cache[ifindex]

    return Connection(
        proto=PROTO_NAMES.get(key.proto, str(key.proto)),
        family=key.family,
        src=_addr(key.saddr, key.family),
        dst=_addr(key.daddr, key.family),
        sport=socket.ntohs(key.sport),
        dport=0 if icmp else socket.ntohs(key.dport),
        zone=key.zone,
        # an L3 link's last hop is the link alone: no MAC (the entry's is zero)
        mac=format_mac(bytes(entry.mac))
        if entry.flags & abi.F_ENTRY_HOP_KNOWN and any(entry.mac)
        else "",
        uplink=name(entry.ifindex) if entry.flags & abi.F_ENTRY_HOP_KNOWN else "",
        uplink_ifindex=entry.ifindex,
        age_s=round(Clock.age_s(now_jiffies, entry.last_seen, hz), 3),
        packets=entry.packets,
        replies=entry.replies,
        vm_port=name(entry.vm_ifindex),
        state=state_name(entry.state),
        flags=[name for bit, name in _FLAG_NAMES.items() if entry.flags & bit],
        **_hop_fields(entry, hop),
    )


@dataclass(frozen=True)
class ConnFilter:
    """Which connections `show` lists; every given field must match.
    client / server: an address or a prefix (CIDR); uplink, vm_port: names;
    state: a state name (abi.State, lower case); mac: the last hop's MAC."""

    client: str | None = None
    server: str | None = None
    uplink: str | None = None
    vm_port: str | None = None
    state: str | None = None
    mac: str | None = None

    def __post_init__(self) -> None:
        for what in ("client", "server"):
            value = getattr(self, what)
            if value is not None:
                try:
                    ipaddress.ip_network(value, strict=False)
                except ValueError:
                    raise FilterError(f"{what}: {value!r} is not an address or prefix") from None
        if self.state is not None and self.state not in {s.name.lower() for s in abi.State}:
            names = ", ".join(s.name.lower() for s in abi.State)
            raise FilterError(f"state: {self.state!r} is not one of {names}")

    @functools.cached_property
    def _nets(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network | None, ...]:
        return tuple(
            None if p is None else ipaddress.ip_network(p, strict=False)
            for p in (self.client, self.server)
        )

    @staticmethod
    def _within(addr: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> bool:
        if net is None:
            return True
        ip = ipaddress.ip_address(addr)
        return ip.version == net.version and ip in net

    def matches(self, c: Connection) -> bool:
        client, server = self._nets
        return (
            self._within(c.src, client)
            and self._within(c.dst, server)
            and (self.uplink is None or c.uplink == self.uplink)
            and (self.vm_port is None or c.vm_port == self.vm_port)
            and (self.state is None or c.state == self.state)
            and (self.mac is None or c.mac == self.mac.lower())
        )
