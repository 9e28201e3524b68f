"""The fuzzer's oracle: what docs/datapath.md says must happen to a frame,
stated again without the C -- headers read by scapy's dissection, one
header at a time, and the documented rules applied to its fields.

``read()`` is "The parse path" (steps 1-7, and the quoted packet of an ICMP
error); ``uplink()`` and ``vmport()`` are "What each program decides", for
the set-up the fuzzer runs with: no services, no fast path, an empty table
on the uplink, and on the VM port one confirmed entry without a state.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.ipsec import AH
from scapy.layers.l2 import Dot1Q, Ether

from lasthop import abi

C = abi.Counter
ST = abi.State
TC_ACT_OK = 0
TC_ACT_REDIRECT = 7

TPIDS = (0x8100, 0x88A8)
EXT_SKIPPED = (0, 43, 60, 51)  # hop-by-hop, routing, destination options, AH
EXT_FRAGMENT = 44
MAX_TAGS = 2
MAX_EXT = 6  # extension headers skipped before giving up
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
ICMP4_ERRORS = (3, 11, 12)  # destination unreachable, time exceeded, parameter problem
ICMP6_ERRORS = (1, 2, 3, 4)
ECHO4 = (0, 8)
ECHO6 = (128, 129)


@dataclass(frozen=True)
class Key:
    """A connection key as the tables hold it (struct conn_key)."""

    family: int
    saddr: bytes  # 16 bytes: IPv4 in the first 4
    daddr: bytes
    sport: int
    dport: int
    proto: int
    zone: int = 0

    def reversed(self) -> Key:
        return Key(
            self.family, self.daddr, self.saddr, self.dport, self.sport, self.proto, self.zone
        )

    def in_zone(self, zone: int) -> Key:
        return Key(self.family, self.saddr, self.daddr, self.sport, self.dport, self.proto, zone)

    def pack(self) -> bytes:
        k = abi.ConnKey(proto=self.proto, family=self.family, zone=self.zone)
        k.sport, k.dport = socket.htons(self.sport), socket.htons(self.dport)
        raw = bytearray(bytes(k))
        raw[0:16], raw[16:32] = self.saddr, self.daddr
        return bytes(raw)


@dataclass
class Reading:
    """What the parse path makes of a frame."""

    reason: abi.Counter | None = None  # set: pass with this reason
    notes: set[abi.Counter] = field(default_factory=set)  # ip_options, ipv6_ext
    tags: list[int] = field(default_factory=list)  # TCIs, outer first
    outer_ad: bool = False
    key: Key | None = None
    tcp_flags: int = 0
    icmp: str = ""  # "echo", "error", "other" or ""
    echo_request: bool = False
    quoted: Key | None = None  # an ICMP error's quoted packet, when it is one
    quoted_reason: abi.Counter | None = None
    fragment: bool = False  # a first fragment: its UDP length covers more than it holds


def _addr4(raw: str) -> bytes:
    return socket.inet_aton(raw) + bytes(12)


def _addr6(raw: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, raw)


def read(data: bytes, gso: bool) -> Reading:
    """The parse path (docs/datapath.md), for a frame run with or without GSO."""
    r = Reading()
    n = len(data)
    # 3. Ethernet, then up to two tags; a third is not ours
    head = Ether(data[:14])
    # a type of 1500 or less is an 802.3 length to scapy (Dot3): no ethertype, so not IP
    etype, off = getattr(head, "type", getattr(head, "len", 0)), 14
    while etype in TPIDS:
        if len(r.tags) == MAX_TAGS:
            return _fail(r, C.NOT_IP)
        if off + 4 > n:
            return _fail(r, C.MALFORMED)
        tag = Dot1Q(data[off : off + 4])
        r.outer_ad = r.outer_ad or (not r.tags and etype == 0x88A8)
        r.tags.append(tag.prio << 13 | tag.dei << 12 | tag.vlan)
        etype, off = tag.type, off + 4
    if etype == 0x0800:
        got = _ipv4(r, data, off, gso)
    elif etype == 0x86DD:
        got = _ipv6(r, data, off, gso)
    else:
        return _fail(r, C.NOT_IP)
    if got is None:
        return r
    proto, pos, end = got
    _l4(r, data, proto, pos, end)
    return r


def _fail(r: Reading, reason: abi.Counter) -> Reading:
    r.reason = reason
    return r


def _ipv4(r: Reading, data: bytes, off: int, gso: bool) -> tuple[int, int, int] | None:
    """4. -> (protocol, L4 offset, datagram end), or None with r.reason set."""
    n = len(data)
    if off + 20 > n:
        return _none(r, C.MALFORMED)
    ip = IP(data[off : off + 20])
    hlen, total = ip.ihl * 4, ip.len
    if total == 0 and gso:
        total = n - off  # BIG TCP GRO: to the frame's end
    if ip.version != 4 or hlen < 20 or total < hlen or off + total > n:
        return _none(r, C.MALFORMED)
    if hlen > 20:
        r.notes.add(C.IP_OPTIONS)
    r.key = Key(4, _addr4(ip.src), _addr4(ip.dst), 0, 0, ip.proto)
    if ip.frag:  # a later fragment: its first one was never seen (cases stand alone)
        return _none(r, C.FRAGMENT_EARLY)
    r.fragment = bool(ip.flags.MF)  # a first fragment is parsed on as any packet
    return ip.proto, off + hlen, off + total


def _ipv6(r: Reading, data: bytes, off: int, gso: bool) -> tuple[int, int, int] | None:
    """5. -> (protocol, L4 offset, datagram end), or None with r.reason set."""
    n = len(data)
    if off + 40 > n:
        return _none(r, C.MALFORMED)
    ip6 = IPv6(data[off : off + 40])
    if ip6.version != 6 or off + 40 + ip6.plen > n:
        return _none(r, C.MALFORMED)
    if ip6.plen == 0 and not gso:  # strict: no wire jumbograms
        return _none(r, C.MALFORMED)
    end = off + 40 + ip6.plen if ip6.plen else n
    r.key = Key(6, _addr6(ip6.src), _addr6(ip6.dst), 0, 0, 0)
    nh, pos = ip6.nh, off + 40
    for _ in range(MAX_EXT):
        if nh not in EXT_SKIPPED:
            break
        if pos + 2 > end:
            return _none(r, C.MALFORMED)
        if nh == 51:
            ah = AH(data[pos : pos + 2] + bytes(10))  # nh, payloadlen; the rest unread
            size, nxt = (ah.payloadlen + 2) * 4, ah.nh
        else:
            ext = IPv6ExtHdrDestOpt(data[pos : pos + 2])  # next header, length: as all three
            size, nxt = (ext.len + 1) * 8, ext.nh
        if pos + size > end:
            return _none(r, C.MALFORMED)
        r.notes.add(C.IPV6_EXT)
        nh, pos = nxt, pos + size
    if nh == EXT_FRAGMENT:  # one fragment header, after the skipped ones
        if pos + 8 > end:
            return _none(r, C.MALFORMED)
        nxt, off = data[pos], struct.unpack("!H", data[pos + 2 : pos + 4])[0]
        nh, pos = nxt, pos + 8
        if off & 0xFFF8:  # a later fragment, its first never seen
            return _none(r, C.FRAGMENT_EARLY)
        r.fragment = bool(off & 1)  # offset 0 and M clear: an atomic fragment, a whole datagram
    if nh in EXT_SKIPPED or nh == EXT_FRAGMENT:
        return _none(r, C.MALFORMED)  # more extension headers than are skipped
    r.key = Key(6, r.key.saddr, r.key.daddr, 0, 0, nh)
    return nh, pos, end


def _none(r: Reading, reason: abi.Counter) -> tuple[int, int, int] | None:
    """No protocol to go on with: pass with *reason*."""
    r.reason = reason
    return None


def _l4(r: Reading, data: bytes, proto: int, pos: int, end: int) -> None:
    """6. L4 inside the datagram: bytes after `end` are Ethernet padding."""
    assert r.key is not None
    room = end - pos
    k = r.key
    if proto == 6:
        if room < 20:
            return _fail_l4(r, C.MALFORMED)
        th = TCP(data[pos : pos + 20])
        if th.dataofs < 5 or th.dataofs * 4 > room:  # strict: the header inside the segment
            return _fail_l4(r, C.MALFORMED)
        r.tcp_flags = int(th.flags) & 0xFF
        r.key = Key(k.family, k.saddr, k.daddr, th.sport, th.dport, proto)
    elif proto == 17:
        if room < 8:
            return _fail_l4(r, C.MALFORMED)
        uh = UDP(data[pos : pos + 8])
        # strict: as the kernel's udp_rcv (a first fragment holds only the start)
        if uh.len < 8 or (uh.len > room and not r.fragment):
            return _fail_l4(r, C.MALFORMED)
        r.key = Key(k.family, k.saddr, k.daddr, uh.sport, uh.dport, proto)
    elif proto in (1, 58):
        if room < 8:
            return _fail_l4(r, C.MALFORMED)
        if (proto == 1) != (k.family == 4):
            return _fail_l4(r, C.MALFORMED)
        head = _echo_layout(data[pos : pos + 8])
        echo, errors = (ECHO4, ICMP4_ERRORS) if proto == 1 else (ECHO6, ICMP6_ERRORS)
        if head.type in echo:
            r.icmp = "echo"
            r.echo_request = head.type in (8, 128)
            r.key = Key(k.family, k.saddr, k.daddr, head.id, head.id, proto)
        elif head.type in errors:
            r.icmp = "error"
            _quoted(r, data, pos + 8, end)
        else:
            r.icmp = "other"
    # other protocols: ports 0, as read


def _echo_layout(raw: bytes) -> ICMPv6EchoRequest:
    """The first 8 bytes of an ICMP or ICMPv6 header, as an echo lays them
    out (type, code, checksum, identifier, sequence): scapy's ICMPv4 class
    shows the identifier only for its echo types."""
    return ICMPv6EchoRequest(raw)


def _fail_l4(r: Reading, reason: abi.Counter) -> None:
    r.reason = reason


def _quoted(r: Reading, data: bytes, q: int, end: int) -> None:
    """The packet an ICMP error quotes: its IP header and 8 L4 bytes, inside
    the error's datagram; its own lengths unchecked (quotes are truncated)."""
    if q + 20 > end:
        r.quoted_reason = C.MALFORMED
        return
    ip = IP(data[q : q + 20])
    if ip.version == 4:
        hlen = ip.ihl * 4
        if hlen < 20 or q + hlen > end:
            r.quoted_reason = C.MALFORMED
            return
        if ip.frag:
            r.quoted_reason = C.FRAGMENT
            return
        family, src, dst, proto, l4 = 4, _addr4(ip.src), _addr4(ip.dst), ip.proto, q + hlen
    else:
        if q + 40 > end:
            r.quoted_reason = C.MALFORMED
            return
        ip6 = IPv6(data[q : q + 40])
        if ip6.version != 6:
            r.quoted_reason = C.MALFORMED
            return
        family, src, dst, proto, l4 = 6, _addr6(ip6.src), _addr6(ip6.dst), ip6.nh, q + 40
        if proto == EXT_FRAGMENT:  # a quoted fragment: the first one's ports follow its header
            if l4 + 8 > end:
                r.quoted_reason = C.MALFORMED
                return
            proto, _, off = struct.unpack("!BBH", data[l4 : l4 + 4])
            if off & 0xFFF8:
                r.quoted_reason = C.FRAGMENT
                return
            l4 += 8
    if l4 + 8 > end:
        r.quoted_reason = C.MALFORMED
        return
    sport = dport = 0
    if proto in (1, 58):
        sport = dport = _echo_layout(data[l4 : l4 + 8]).id  # a quoted echo: its identifier
    elif proto in (6, 17):
        sport, dport = struct.unpack("!HH", data[l4 : l4 + 4])
    r.quoted = Key(family, src, dst, sport, dport, proto)


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Row:
    """A table entry as expected: which table, its fields, and whether this
    frame touched it ("now") or not ("setup")."""

    table: str  # "confirmed" or "pending"
    mac: bytes
    ifindex: int
    vm_ifindex: int
    flags: int
    packets: int
    replies: int
    tags: tuple[int, ...]
    state: int
    seq: int
    seen: str


@dataclass
class Expected:
    verdict: int = TC_ACT_OK
    redirect: int = 0  # ifindex, 0: none
    output: bytes = b""
    counters: dict[tuple[int, abi.Counter], int] = field(default_factory=dict)
    table_counters: dict[abi.TableCounter, int] = field(default_factory=dict)
    table: dict[bytes, Row] = field(default_factory=dict)
    outcome: str = ""  # the counted reason's name: the case's class of result


@dataclass(frozen=True)
class Port:
    """An interface as the fuzzer configures it."""

    ifindex: int
    slot: int
    zone: int


def _count(e: Expected, port: Port, r: Reading, reason: abi.Counter) -> Expected:
    e.counters = {(port.slot, c): 1 for c in r.notes} | {(port.slot, reason): 1}
    e.outcome = reason.name.lower()
    return e


def _first_state(r: Reading, proto: int) -> int:
    if proto == 6:
        syn = r.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        return int(ST.TCP_SYN_SENT if syn else ST.TCP_MIDSTREAM)
    if proto in (1, 58):
        return int(ST.ICMP_NEW)
    return int(ST.UDP_NEW)


def uplink(data: bytes, r: Reading, up: Port) -> Expected:
    """lh_uplink with an empty table, no services: what is learned, or why not."""
    e = Expected(output=data)
    if r.reason is not None:
        return _count(e, up, r, r.reason)
    if r.icmp == "other":
        return _count(e, up, r, C.ICMP_OTHER)
    if r.icmp == "error":
        return _count(e, up, r, C.ICMP_ERROR_MISS)  # errors from outside are no connection
    if data[0] & 1:
        return _count(e, up, r, C.NOT_UNICAST)
    assert r.key is not None
    if r.key.proto == 6 and r.tcp_flags & TCP_RST:
        return _count(e, up, r, C.RST_UNKNOWN)
    flags = abi.F_ENTRY_HOP_KNOWN | (abi.F_ENTRY_OUTER_8021AD if r.outer_ad else 0)
    row = Row(
        "pending",
        data[6:12],
        up.ifindex,
        0,
        flags,
        1,
        0,
        tuple(r.tags),
        _first_state(r, r.key.proto),
        0,
        "now",
    )
    e.table = {r.key.in_zone(up.zone).pack(): row}
    e.table_counters = {abi.TableCounter.PENDING_INSERTED: 1}
    return _count(e, up, r, C.LEARNED)


def vmport_setup(r: Reading, vm: Port) -> Key | None:
    """The key of the entry a frame of this reading would find (the
    fuzzer's set-up puts it in the table before the mutated frame runs)."""
    if r.reason is not None or r.key is None:
        return None
    if r.icmp == "error":
        return r.quoted.in_zone(vm.zone) if r.quoted else None
    if r.icmp == "other":
        return None
    return r.key.reversed().in_zone(vm.zone)


def vmport(
    data: bytes, r: Reading, vm: Port, up: Port, setup: tuple[Key, Row] | None, last_hop: bytes
) -> Expected:
    """lh_vmport, bridged, with the entry *setup* (a confirmed one without a
    state, last hop `last_hop` on `up`) in the table: a reply or an error
    finding it goes back to the last hop, anything else passes."""
    e = Expected(output=data)
    if setup:
        e.table = {setup[0].pack(): setup[1]}
    if r.reason is not None:
        return _count(e, vm, r, r.reason)
    assert r.key is not None
    if r.icmp == "other":
        return _count(e, vm, r, C.ICMP_OTHER)
    if r.icmp == "error":
        key, hit = (r.quoted.in_zone(vm.zone) if r.quoted else None), C.ICMP_ERROR_REDIRECTED
    else:
        key, hit = r.key.reversed().in_zone(vm.zone), C.REDIRECTED
    if setup is None or key is None or key != setup[0]:
        if hit == C.ICMP_ERROR_REDIRECTED:
            return _count(e, vm, r, C.ICMP_ERROR_MISS)
        return _count(e, vm, r, _vm_miss(r))
    row = setup[1]
    e.table = {
        setup[0].pack(): Row(
            row.table,
            row.mac,
            row.ifindex,
            row.vm_ifindex,
            row.flags,
            row.packets,
            row.replies + 1,
            row.tags,
            row.state,
            row.seq,
            "now",
        )
    }
    e.verdict, e.redirect = TC_ACT_REDIRECT, up.ifindex
    e.output = last_hop + data[6:]  # bridged: the destination MAC only
    return _count(e, vm, r, hit)


def _vm_miss(r: Reading) -> abi.Counter:
    """No entry: does the VM open a connection? Not with a TCP segment other
    than a SYN, nor an ICMP other than an echo request; an opener it may not
    open from (the fuzzer gives the port no address) is refused."""
    assert r.key is not None
    if r.key.proto == 6 and r.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN:
        return C.MISS
    if r.key.proto in (1, 58) and not r.echo_request:
        return C.MISS
    return C.VM_ORIGIN_SPOOFED


__all__ = ["Expected", "Key", "Port", "Reading", "Row", "read", "uplink", "vmport", "vmport_setup"]
