"""Asymmetry in a packet capture: which connections' replies left by another
way than their requests came (`lasthop pcap`, issue 11).

A capture taken on a host's uplink (or one per uplink) sees both directions
of every connection that stays symmetric. For each connection the requests'
last hop — the capture it was seen in, the source MAC and the VLAN tags — is
compared with the replies' next hop (their destination): when they differ,
the firewall the request came through never saw the reply. The reverse leg
is compared too (the requests' destination with the replies' source): a
difference there is the far side's routing, not the host's, and is reported
apart.

Which end is the client: the sender of a TCP SYN, of the first UDP datagram
seen, of an ICMP echo request. A TCP connection first seen mid-stream has its
direction guessed (the higher port is the client's) and is marked so.
Frames that carry no connection (ARP, non-first fragments, ICMP errors,
other protocols) are counted and left out.

Reading and parsing is dpkt's (pcap and pcapng, 802.1Q/802.1ad tags, MPLS);
the report is plain data, printed by the CLI as tables or JSON.
"""

from __future__ import annotations

import heapq
import socket
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import dpkt

from lasthop.connections import format_mac
from lasthop.endpoint import format_flow
from lasthop.errors import ConfigError

__all__ = [
    "Conn",
    "Hop",
    "Report",
    "analyse",
    "read_names",
]

# Link types with both MACs (a capture on `any` has only the sender's:
# nothing to compare a reply's destination with).
LINKTYPE_ETHERNET = dpkt.pcap.DLT_EN10MB
LINKTYPES_NO_DESTINATION = {113: "LINUX_SLL", 276: "LINUX_SLL2"}

TCP_SYN, TCP_ACK = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK
ICMP_ECHO = {4: (8, 0), 6: (128, 129)}  # family -> (request type, reply type)
_ECHO = (dpkt.icmp.ICMP.Echo, dpkt.icmp6.ICMP6.Echo)


@dataclass(frozen=True, order=True)
class Hop:
    """One side of a frame as the capture saw it: which capture (the uplink),
    the MAC and the VLAN tags (outer first)."""

    where: str
    mac: str
    tags: tuple[int, ...] = ()

    def label(self, names: dict[str, str], *, where: bool = True) -> str:
        """ "fw2 (02:00:..) vlan 100", after "up0: " when *where* (several captures)."""
        name = names.get(self.mac)
        text = f"{name} ({self.mac})" if name else self.mac
        if self.tags:
            text += " vlan " + ".".join(map(str, self.tags))
        return f"{self.where}: {text}" if where else text


@dataclass
class Conn:
    """A connection seen in the capture, client first."""

    family: int
    proto: str  # tcp, udp, icmp
    client: str
    client_port: int  # ICMP: the echo identifier
    server: str
    server_port: int
    guessed: bool = False  # TCP first seen mid-stream: the ends are a guess
    requests: int = 0
    replies: int = 0
    request_from: Counter[Hop] = field(default_factory=Counter)
    request_to: Counter[Hop] = field(default_factory=Counter)
    reply_from: Counter[Hop] = field(default_factory=Counter)
    reply_to: Counter[Hop] = field(default_factory=Counter)

    @property
    def answered(self) -> bool:
        return bool(self.requests and self.replies)

    @property
    def return_asymmetric(self) -> bool:
        """A reply left by a hop no request came from."""
        return self.answered and set(self.reply_to) != set(self.request_from)

    @property
    def forward_asymmetric(self) -> bool:
        """A reply came from a hop no request went to (the far side's routing)."""
        return self.answered and set(self.reply_from) != set(self.request_to)

    def describe(self) -> str:
        return format_flow(self.proto, self.client, self.client_port, self.server, self.server_port)

    def to_json(self, names: dict[str, str]) -> dict[str, Any]:
        def hops(c: Counter[Hop]) -> list[dict[str, Any]]:
            return [
                {"where": h.where, "mac": h.mac, "name": names.get(h.mac, ""),
                 "vlan": list(h.tags), "packets": n}
                for h, n in sorted(c.items())
            ]  # fmt: skip

        return {
            "family": self.family, "proto": self.proto,
            "client": self.client, "client_port": self.client_port,
            "server": self.server, "server_port": self.server_port,
            "guessed": self.guessed, "requests": self.requests, "replies": self.replies,
            "request_from": hops(self.request_from), "reply_to": hops(self.reply_to),
            "request_to": hops(self.request_to), "reply_from": hops(self.reply_from),
        }  # fmt: skip


@dataclass
class Report:
    """What `lasthop pcap` found."""

    files: list[str]
    frames: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> frames
    conns: dict[tuple[Any, ...], Conn] = field(default_factory=dict)

    def answered(self) -> list[Conn]:
        return [c for c in self.conns.values() if c.answered]

    def return_asymmetric(self) -> list[Conn]:
        return [c for c in self.conns.values() if c.return_asymmetric]

    def forward_asymmetric(self) -> list[Conn]:
        return [c for c in self.conns.values() if c.forward_asymmetric]

    def pairs(self) -> Counter[tuple[Hop, Hop]]:
        """(request came from, reply went to) -> connections, for every hop
        pair of the return-asymmetric connections."""
        out: Counter[tuple[Hop, Hop]] = Counter()
        for c in self.return_asymmetric():
            for came in c.request_from:
                for went in c.reply_to:
                    if went != came:
                        out[(came, went)] += 1
        return out

    def summary(self) -> dict[str, int]:
        conns = list(self.conns.values())
        return {
            "frames": self.frames,
            "connections": len(conns),
            "answered": sum(c.answered for c in conns),
            "unanswered": sum(not c.answered for c in conns),
            "symmetric": sum(
                c.answered and not (c.return_asymmetric or c.forward_asymmetric) for c in conns
            ),
            "return_asymmetric": sum(c.return_asymmetric for c in conns),
            "forward_asymmetric": sum(c.forward_asymmetric for c in conns),
            "guessed": sum(c.guessed for c in conns),
        }

    def to_json(self, names: dict[str, str], limit: int) -> dict[str, Any]:
        return {
            "files": self.files,
            "summary": self.summary(),
            "skipped": dict(sorted(self.skipped.items())),
            "pairs": [
                {"request_from": came.label(names), "reply_to": went.label(names), "connections": n}
                for (came, went), n in self.pairs().most_common()
            ],
            "return_asymmetric": [c.to_json(names) for c in self.return_asymmetric()[:limit]],
            "forward_asymmetric": [c.to_json(names) for c in self.forward_asymmetric()[:limit]],
        }


# -- reading ---------------------------------------------------------------------------


def _frames(path: Path, where: str) -> Iterator[tuple[float, str, bytes]]:
    """(timestamp, where, frame) of one capture file, in the file's order."""
    try:
        f: BinaryIO = path.open("rb")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    with f:
        try:
            reader = dpkt.pcap.UniversalReader(f)
        except (ValueError, dpkt.NeedData) as err:
            raise ConfigError(f"{path}: not a pcap or pcapng capture ({err})") from err
        link = reader.datalink()
        if link in LINKTYPES_NO_DESTINATION:
            raise ConfigError(
                f"{path}: link type {LINKTYPES_NO_DESTINATION[link]} records no destination "
                "MAC: capture on the uplink itself (tcpdump -i up0 -w FILE), not on 'any'"
            )
        if link != LINKTYPE_ETHERNET:
            raise ConfigError(f"{path}: link type {link} is not Ethernet")
        try:
            for ts, buf in reader:
                yield float(ts), where, bytes(buf)
        except (dpkt.NeedData, dpkt.UnpackError, ValueError):
            return  # a capture cut short (tcpdump killed): what was read counts


def _labels(paths: list[Path]) -> list[str]:
    """Each file's name for its hops: the stem (up0.pcap -> up0); the whole
    name when two stems are the same."""
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else str(p) for p in paths]


def read_names(lines: Iterable[str]) -> dict[str, str]:
    """MAC -> name from lines of "MAC NAME" (# starts a comment)."""
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split(None, 1)
        if len(parts) != 2 or not _is_mac(parts[0]):
            raise ConfigError(f"names line {n}: expected 'MAC NAME', got {line.strip()!r}")
        out[parts[0].lower()] = parts[1].strip()
    return out


def _is_mac(text: str) -> bool:
    octets = text.split(":")
    return len(octets) == 6 and all(len(o) == 2 and _is_hex(o) for o in octets)


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


# -- analysis --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Packet:
    """What one frame says about a connection: a side of it."""

    family: int
    proto: str
    src: str
    sport: int
    dst: str
    dport: int
    first: str  # "client": this frame opens the connection; "server": it answers; "" unknown
    src_hop: Hop
    dst_hop: Hop


def analyse(paths: list[Path]) -> Report:
    """Reads every capture (merged by time) and sorts its frames into connections."""
    if not paths:
        raise ConfigError("no capture file given")
    report = Report(files=[str(p) for p in paths])
    streams = [_frames(p, w) for p, w in zip(paths, _labels(paths), strict=True)]
    for _ts, where, buf in heapq.merge(*streams, key=lambda t: t[0]):
        report.frames += 1
        pkt = _parse(buf, where, report.skipped)
        if pkt is not None:
            _account(report.conns, pkt)
    return report


def _parse(buf: bytes, where: str, skipped: Counter[str]) -> _Packet | None:
    try:
        eth = dpkt.ethernet.Ethernet(buf)
    except (dpkt.UnpackError, dpkt.NeedData):
        skipped["truncated"] += 1
        return None
    tags = tuple(t.id for t in getattr(eth, "vlan_tags", ()))
    ip = eth.data
    if isinstance(ip, dpkt.ip.IP):
        family, src, dst = (
            4,
            socket.inet_ntop(socket.AF_INET, ip.src),
            socket.inet_ntop(socket.AF_INET, ip.dst),
        )
        if ip.offset:  # a later fragment: no ports
            skipped["fragment"] += 1
            return None
    elif isinstance(ip, dpkt.ip6.IP6):
        family = 6
        src = socket.inet_ntop(socket.AF_INET6, ip.src)
        dst = socket.inet_ntop(socket.AF_INET6, ip.dst)
    else:
        skipped["not_ip"] += 1
        return None
    src_hop = Hop(where, format_mac(eth.src), tags)
    dst_hop = Hop(where, format_mac(eth.dst), tags)
    l4 = ip.data
    if isinstance(l4, dpkt.tcp.TCP):
        syn, ack = bool(l4.flags & TCP_SYN), bool(l4.flags & TCP_ACK)
        first = "client" if syn and not ack else "server" if syn else ""
        return _Packet(family, "tcp", src, l4.sport, dst, l4.dport, first, src_hop, dst_hop)
    if isinstance(l4, dpkt.udp.UDP):
        return _Packet(family, "udp", src, l4.sport, dst, l4.dport, "client", src_hop, dst_hop)
    if isinstance(l4, (dpkt.icmp.ICMP, dpkt.icmp6.ICMP6)):
        request, reply = ICMP_ECHO[family]
        if l4.type in (request, reply) and isinstance(l4.data, _ECHO):
            ident = l4.data.id
            first = "client" if l4.type == request else "server"
            return _Packet(family, "icmp", src, ident, dst, ident, first, src_hop, dst_hop)
        skipped["icmp_other"] += 1
        return None
    skipped["other_protocol" if not isinstance(l4, bytes) else "truncated"] += 1
    return None


def _account(conns: dict[tuple[Any, ...], Conn], p: _Packet) -> None:
    a, b = (p.src, p.sport), (p.dst, p.dport)
    key = (p.family, p.proto, *min(a, b), *max(a, b))
    conn = conns.get(key)
    if conn is None:
        conn = conns[key] = _open(p)
    if (p.src, p.sport) == (conn.client, conn.client_port):
        conn.requests += 1
        conn.request_from[p.src_hop] += 1
        conn.request_to[p.dst_hop] += 1
    else:
        conn.replies += 1
        conn.reply_from[p.src_hop] += 1
        conn.reply_to[p.dst_hop] += 1


def _open(p: _Packet) -> Conn:
    """A new connection from its first frame seen: who is the client."""
    sender_is_client = p.first == "client"
    guessed = p.first == ""
    if guessed:  # TCP mid-stream: the ephemeral (higher) port is the client's
        sender_is_client = p.sport > p.dport
    if sender_is_client:
        return Conn(p.family, p.proto, p.src, p.sport, p.dst, p.dport, guessed)
    return Conn(p.family, p.proto, p.dst, p.dport, p.src, p.sport, guessed)
