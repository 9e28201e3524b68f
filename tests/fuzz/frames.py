"""Frames for the differential fuzzer: generators for every header the data
path parses (valid, every field random), and mutators that break them where
parsers break (truncation at each header boundary, length fields off by one
and by far, flipped bytes, looping or over-long extension chains, bad tags,
bad encapsulations).

Everything is drawn from one ``random.Random`` per case, seeded by (seed,
program, case number), so any single case is made again from its three
numbers alone. Frames are built with scapy; a mutator then edits the bytes at
the offsets the generator recorded (the layout), so a mutated frame is
exactly one defect away from a valid one.
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6ND_RS,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
    PadN,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw

ETH_LEN = 14
TPID_8021Q = 0x8100
TPID_8021AD = 0x88A8
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
EXT_HBH, EXT_ROUTING, EXT_FRAGMENT, EXT_AH, EXT_DSTOPTS = 0, 43, 44, 51, 60
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6 = 1, 6, 17, 58
OTHER_PROTOS = (47, 132, 50, 89, 103, 115, 253)  # GRE, SCTP, ESP, OSPF, PIM, L2TP, test


@dataclass
class Layout:
    """Where the headers of a built frame are (offsets from its start)."""

    tags: list[int] = field(default_factory=list)  # each tag's offset
    l3: int = ETH_LEN  # IP header
    ext: list[int] = field(default_factory=list)  # IPv6 extension headers
    l4: int | None = None  # L4 header
    quote: int | None = None  # an ICMP error's quoted IP header
    end: int = 0  # the datagram's end: bytes after it are Ethernet padding
    family: int = 0  # 4, 6, or 0 (not IP)


@dataclass(frozen=True)
class Sample:
    """One fuzz case: the frame as generated, and as run."""

    cls: str  # the generator's class: tcp4, icmp6-error, ext6, not-ip, ...
    mutation: str  # what the mutator did ("valid": nothing)
    base: bytes  # the frame as generated (valid)
    data: bytes  # the frame as run
    gso_size: int = 0  # run as a GSO skb (GRO-merged) with this segment size


# ---------------------------------------------------------------- fields


def _mac(rng: random.Random, unicast: bool = True) -> str:
    raw = bytearray(rng.randbytes(6))
    raw[0] = raw[0] & 0xFE if unicast else raw[0] | 0x01
    return ":".join(f"{b:02x}" for b in raw)


def _ip4(rng: random.Random) -> str:
    return ".".join(str(b) for b in rng.randbytes(4))


def _ip6(rng: random.Random) -> str:
    words = struct.unpack("!8H", rng.randbytes(16))
    return ":".join(f"{w:x}" for w in words)


def _payload(rng: random.Random, most: int = 48) -> bytes:
    return rng.randbytes(rng.choice((0, 0, rng.randint(1, most))))


# ---------------------------------------------------------------- L4


def _cat(first: Packet, *rest: Packet) -> Packet:
    """first / rest..., without the copies scapy's / makes (3x faster here)."""
    for p in rest:
        if not (isinstance(p, Raw) and not p.load):
            first.add_payload(p)
    return first


def _tcp(rng: random.Random) -> Packet:
    options: list[tuple[str, object]] = []
    if rng.random() < 0.3:
        options = rng.sample(
            [
                ("MSS", rng.randint(0, 0xFFFF)),
                ("NOP", None),
                ("WScale", rng.randint(0, 14)),
                ("SAckOK", b""),
                ("Timestamp", (rng.getrandbits(32), rng.getrandbits(32))),
            ],
            rng.randint(1, 4),
        )
    return _cat(
        TCP(
            sport=rng.getrandbits(16),
            dport=rng.getrandbits(16),
            seq=rng.getrandbits(32),
            ack=rng.getrandbits(32),
            flags=rng.choice((0x02, 0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, rng.getrandbits(8))),
            window=rng.getrandbits(16),
            urgptr=rng.getrandbits(16),
            options=options,
        ),
        Raw(_payload(rng)),
    )


def _udp(rng: random.Random) -> Packet:
    return _cat(UDP(sport=rng.getrandbits(16), dport=rng.getrandbits(16)), Raw(_payload(rng)))


def _quoted4(rng: random.Random) -> bytes:
    """The start of a packet as an ICMPv4 error quotes it (a request to the host)."""
    inner = IP(src=_ip4(rng), dst=_ip4(rng), ttl=rng.randint(1, 255), id=rng.getrandbits(16))
    if rng.random() < 0.2:
        inner.options = b"\x01" * 4 * rng.randint(1, 3)
    l4 = rng.choice((_tcp, _udp, lambda r: ICMP(type=8, id=r.getrandbits(16))))(rng)
    raw = bytes(_cat(inner, l4))
    hlen = (raw[0] & 0x0F) * 4
    return raw[: rng.choice((hlen + 8, hlen + 8, len(raw), hlen + rng.randint(8, 40)))]


def _quoted6(rng: random.Random) -> bytes:
    inner = IPv6(src=_ip6(rng), dst=_ip6(rng), hlim=rng.randint(1, 255))
    l4 = rng.choice(
        (_tcp, _udp, lambda r: ICMPv6EchoRequest(id=r.getrandbits(16), seq=r.getrandbits(16)))
    )(rng)
    if rng.random() < 0.2:  # a fragment's quote: the first (ports after it) or a later one
        offset = rng.choice((0, 0, rng.randint(1, 8191)))
        inner = _cat(inner, IPv6ExtHdrFragment(offset=offset, m=1, id=rng.getrandbits(32)))
    raw = bytes(_cat(inner, l4))
    return raw[: rng.choice((48, len(raw), 40 + rng.randint(8, 40)))]


def _icmp4(rng: random.Random) -> tuple[str, Packet]:
    kind = rng.choice(("echo", "echo", "error", "error", "other"))
    if kind == "echo":
        return "icmp4-echo", _cat(
            ICMP(type=rng.choice((0, 8)), id=rng.getrandbits(16), seq=rng.getrandbits(16)),
            Raw(_payload(rng)),
        )
    if kind == "error":
        t = rng.choice((3, 11, 12))
        return "icmp4-error", _cat(ICMP(type=t, code=rng.randint(0, 15)), Raw(_quoted4(rng)))
    t = rng.choice((5, 9, 10, 13, 14, 17, 18, rng.randint(19, 255)))
    return "icmp4-other", _cat(ICMP(type=t, code=rng.getrandbits(8)), Raw(_payload(rng, 16)))


def _icmp6(rng: random.Random) -> tuple[str, Packet]:
    kind = rng.choice(("echo", "echo", "error", "error", "other"))
    if kind == "echo":
        cls = rng.choice((ICMPv6EchoRequest, ICMPv6EchoReply))
        return "icmp6-echo", _cat(
            cls(id=rng.getrandbits(16), seq=rng.getrandbits(16)), Raw(_payload(rng))
        )
    if kind == "error":
        err = rng.choice(
            (
                ICMPv6DestUnreach(code=rng.randint(0, 7)),
                ICMPv6PacketTooBig(mtu=rng.getrandbits(32)),
                ICMPv6TimeExceeded(code=rng.randint(0, 1)),
                ICMPv6ParamProblem(code=rng.randint(0, 3), ptr=rng.getrandbits(32)),
            )
        )
        return "icmp6-error", _cat(err, Raw(_quoted6(rng)))
    other = rng.choice(
        (
            ICMPv6ND_NS(tgt=_ip6(rng)),
            ICMPv6ND_RS(),
            Raw(bytes([rng.randint(130, 255), 0]) + bytes(6)),
        )
    )
    return "icmp6-other", other


# ---------------------------------------------------------------- IP


def _ext6(rng: random.Random, nh: int, count: int) -> list[Packet]:
    """count IPv6 extension headers, the last leading to nh."""
    out: list[Packet] = []
    for _ in range(count):
        pick = rng.choice(("hbh", "dst", "rh", "srh", "ah"))
        if pick == "hbh":
            h: Packet = IPv6ExtHdrHopByHop(options=[PadN(optdata=bytes(rng.randint(0, 12)))])
        elif pick == "dst":
            h = IPv6ExtHdrDestOpt(options=[PadN(optdata=bytes(rng.randint(0, 12)))])
        elif pick == "rh":
            h = IPv6ExtHdrRouting(
                type=rng.choice((0, 2, 3)),
                segleft=rng.randint(0, 3),
                addresses=[_ip6(rng) for _ in range(rng.randint(0, 2))],
            )
        elif pick == "srh":
            h = IPv6ExtHdrSegmentRouting(addresses=[_ip6(rng) for _ in range(rng.randint(1, 3))])
        else:
            words = rng.randint(1, 4)  # ICV words: AH is (payloadlen + 2) * 4 bytes
            h = AH(
                spi=rng.getrandbits(32),
                seq=rng.getrandbits(32),
                payloadlen=words + 1,
                icv=rng.randbytes(4 * words),
            )
        out.append(h)
    _link(out, nh)
    return out


def _link(chain: list[Packet], nh: int) -> None:
    """Each header's next header: the one after it, the last one's nh."""
    for i, h in enumerate(chain):
        h.nh = _ext_number(chain[i + 1]) if i + 1 < len(chain) else nh


def _ext_number(h: Packet) -> int:
    if isinstance(h, IPv6ExtHdrHopByHop):
        return EXT_HBH
    if isinstance(h, IPv6ExtHdrDestOpt):
        return EXT_DSTOPTS
    if isinstance(h, AH):
        return EXT_AH
    if isinstance(h, IPv6ExtHdrFragment):
        return EXT_FRAGMENT
    return EXT_ROUTING


def _l4(rng: random.Random, family: int) -> tuple[str, int, Packet]:
    """(class, protocol number, L4 header and payload)."""
    pick = rng.random()
    f = str(family)
    if pick < 0.35:
        return "tcp" + f, PROTO_TCP, _tcp(rng)
    if pick < 0.6:
        return "udp" + f, PROTO_UDP, _udp(rng)
    if pick < 0.9:
        cls, l4 = _icmp4(rng) if family == 4 else _icmp6(rng)
        return cls, PROTO_ICMP if family == 4 else PROTO_ICMPV6, l4
    if pick < 0.95:  # ICMP of the other IP version: refused by rule
        return (
            "icmp-mismatch" + f,
            PROTO_ICMPV6 if family == 4 else PROTO_ICMP,
            Raw(bytes([128, 0, 0, 0]) + rng.randbytes(4)),
        )
    return "other" + f, rng.choice(OTHER_PROTOS), Raw(_payload(rng))


def _ip(rng: random.Random) -> tuple[str, Packet, int]:
    """(class, IP datagram, family)."""
    family = 4 if rng.random() < 0.5 else 6
    cls, proto, l4 = _l4(rng, family)
    if family == 4:
        ip = IP(
            src=_ip4(rng),
            dst=_ip4(rng),
            tos=rng.getrandbits(8),
            id=rng.getrandbits(16),
            flags=rng.choice((0, 2)),
            ttl=rng.randint(0, 255),
            proto=proto,
        )
        if rng.random() < 0.2:
            ip.options = rng.choice((b"\x94\x04\x00\x00", b"\x01" * 4 * rng.randint(1, 10)))
        return cls, _cat(ip, l4), family
    ip6 = IPv6(
        src=_ip6(rng),
        dst=_ip6(rng),
        tc=rng.getrandbits(8),
        fl=rng.getrandbits(20),
        hlim=rng.randint(0, 255),
    )
    count = rng.choice((0, 0, 0, 1, 2, 3))
    if rng.random() < 0.08:  # a long chain: up to the parser's six, or past them
        cls, count = "ext6", rng.randint(4, 8)
    chain = _ext6(rng, proto, count)
    if rng.random() < 0.05:  # a fragment header somewhere in the chain
        frag = IPv6ExtHdrFragment(
            offset=rng.getrandbits(13), m=rng.getrandbits(1), id=rng.getrandbits(32)
        )
        at = rng.randint(0, len(chain))
        chain.insert(at, frag)
        _link(chain, proto)
        cls = "frag6"
    ip6.nh = _ext_number(chain[0]) if chain else proto
    return cls, _cat(ip6, *chain, l4), family


def _not_ip(rng: random.Random) -> Packet:
    return rng.choice(
        (
            lambda: ARP(psrc=_ip4(rng), pdst=_ip4(rng)),
            lambda: Raw(rng.randbytes(rng.randint(0, 46))),
        )
    )()


# ---------------------------------------------------------------- frames


def generate(rng: random.Random) -> tuple[str, bytes, Layout]:
    """A valid frame of a random class: (class, bytes, layout)."""
    eth = Ether(src=_mac(rng), dst=_mac(rng, unicast=rng.random() < 0.93))
    tags: list[Packet] = []
    for i in range(rng.choice((0, 0, 0, 1, 1, 2))):
        tpid = rng.choice((TPID_8021Q, TPID_8021AD)) if i == 0 else TPID_8021Q
        (tags[-1] if tags else eth).type = tpid
        tci = rng.getrandbits(16)
        tags.append(Dot1Q(prio=tci >> 13, dei=tci >> 12 & 1, vlan=tci & 0xFFF))
    layout = Layout(tags=[ETH_LEN + 4 * i for i in range(len(tags))])
    layout.l3 = ETH_LEN + 4 * len(tags)
    if rng.random() < 0.04:
        cls, body, family = "not-ip", _not_ip(rng), 0
        if isinstance(body, Raw):
            (tags[-1] if tags else eth).type = rng.choice(
                (0x88CC, 0x8847, 0x0806, rng.getrandbits(16))
            )
    else:
        cls, body, family = _ip(rng)
    raw = bytes(_cat(eth, *tags, body))
    layout.family = family
    layout.end = len(raw)
    _locate(raw, layout)
    if rng.random() < 0.3:  # Ethernet padding: zeros to 60 bytes, or random bytes
        pad = rng.choice((bytes(max(0, 60 - len(raw))), rng.randbytes(rng.randint(1, 48))))
        raw += pad
    return cls, raw, layout


def _locate(raw: bytes, layout: Layout) -> None:
    """Fills in the IPv6 extension headers', L4's and a quote's offsets."""
    pos = layout.l3
    if layout.family == 4:
        pos += (raw[pos] & 0x0F) * 4
        nh = raw[layout.l3 + 9]
    elif layout.family == 6:
        nh, pos = raw[pos + 6], pos + 40
        while nh in (EXT_HBH, EXT_ROUTING, EXT_DSTOPTS, EXT_AH, EXT_FRAGMENT):
            layout.ext.append(pos)
            if nh == EXT_FRAGMENT:
                size = 8
            elif nh == EXT_AH:
                size = (raw[pos + 1] + 2) * 4
            else:
                size = (raw[pos + 1] + 1) * 8
            nh, pos = raw[pos], pos + size
    else:
        return
    layout.l4 = pos
    if nh in (PROTO_ICMP, PROTO_ICMPV6) and pos + 8 < layout.end:
        t = raw[pos]
        if (nh == PROTO_ICMP and t in (3, 11, 12)) or (nh == PROTO_ICMPV6 and 1 <= t <= 4):
            layout.quote = pos + 8


# ---------------------------------------------------------------- mutators


def _put(raw: bytes, at: int, value: bytes) -> bytes:
    if at < 0 or at + len(value) > len(raw):
        return raw
    return raw[:at] + value + raw[at + len(value) :]


def _u16(v: int) -> bytes:
    return struct.pack("!H", v & 0xFFFF)


def _near(rng: random.Random, v: int, top: int) -> int:
    """A value off by one or by far from v."""
    return rng.choice(
        (v - 1, v + 1, v - 1, v + 1, 0, top, v + rng.randint(2, 64), rng.randint(0, top))
    )


def _truncate(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    bounds = [ETH_LEN, lay.l3, lay.end, *lay.tags, *(t + 4 for t in lay.tags), *lay.ext]
    bounds += [e + 2 for e in lay.ext]
    if lay.family:
        bounds += [lay.l3 + (20 if lay.family == 4 else 40)]
    if lay.l4 is not None:
        bounds += [lay.l4, lay.l4 + 8, lay.l4 + 20]
    if lay.quote is not None:
        bounds += [lay.quote, lay.quote + 20, lay.quote + 28, lay.quote + 40, lay.quote + 48]
    n = max(ETH_LEN, rng.choice(bounds) + rng.choice((-1, 0, 0, 1)))
    return f"truncate@{n}", raw[:n]


def _ip_length(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    """The IP header's own length field: total length, or payload length."""
    if lay.family == 4:
        v = struct.unpack_from("!H", raw, lay.l3 + 2)[0]
        n = _near(rng, v, 0xFFFF)
        return f"ipv4.len={n}", _put(raw, lay.l3 + 2, _u16(n))
    if lay.family == 6:
        v = struct.unpack_from("!H", raw, lay.l3 + 4)[0]
        n = _near(rng, v, 0xFFFF)
        return f"ipv6.plen={n}", _put(raw, lay.l3 + 4, _u16(n))
    return _flip(rng, raw, lay)


def _ihl(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    if lay.family != 4:
        return _ip_length(rng, raw, lay)
    ihl = rng.choice(((raw[lay.l3] & 0x0F) - 1, (raw[lay.l3] & 0x0F) + 1, rng.randint(0, 15)))
    ihl &= 0x0F
    return f"ipv4.ihl={ihl}", _put(raw, lay.l3, bytes([0x40 | ihl]))


def _version(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    if not lay.family or lay.l3 >= len(raw):
        return _flip(rng, raw, lay)
    v = rng.choice((4, 6, 0, 15, rng.randint(0, 15)))
    return f"ip.version={v}", _put(raw, lay.l3, bytes([v << 4 | raw[lay.l3] & 0x0F]))


def _l4_length(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    """TCP data offset, UDP length."""
    if lay.l4 is None or lay.l4 + 14 > len(raw):
        return _ip_length(rng, raw, lay)
    proto = raw[lay.l3 + 9] if lay.family == 4 else _last_nh(raw, lay)
    if proto == PROTO_TCP:
        doff = _near(rng, raw[lay.l4 + 12] >> 4, 15) & 0x0F
        return f"tcp.doff={doff}", _put(
            raw, lay.l4 + 12, bytes([doff << 4 | raw[lay.l4 + 12] & 0x0F])
        )
    if proto == PROTO_UDP:
        v = struct.unpack_from("!H", raw, lay.l4 + 4)[0]
        n = _near(rng, v, 0xFFFF)
        return f"udp.len={n}", _put(raw, lay.l4 + 4, _u16(n))
    return _ip_length(rng, raw, lay)


def _last_nh(raw: bytes, lay: Layout) -> int:
    return raw[lay.ext[-1]] if lay.ext else raw[lay.l3 + 6]


def _ext(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    """An extension header's length or next header: off, looping, or a fragment."""
    if not lay.ext:
        return _ip_length(rng, raw, lay)
    i = rng.randrange(len(lay.ext))
    at = lay.ext[i]
    if rng.random() < 0.5 and at + 2 <= len(raw):
        n = _near(rng, raw[at + 1], 255) & 0xFF
        return f"ext[{i}].len={n}", _put(raw, at + 1, bytes([n]))
    own = raw[lay.ext[i - 1]] if i else raw[lay.l3 + 6]  # this header's own number
    nh = rng.choice((own, EXT_FRAGMENT, EXT_HBH, EXT_AH, rng.getrandbits(8)))
    return f"ext[{i}].nh={nh}", _put(raw, at, bytes([nh]))  # own: the chain loops


def _fragment(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    if lay.family != 4:
        return _ext(rng, raw, lay)
    v = rng.choice((0x2000, rng.randint(1, 0x1FFF), 0x4000, rng.getrandbits(16)))
    return f"ipv4.frag_off={v:#x}", _put(raw, lay.l3 + 6, _u16(v))


def _proto(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    """The protocol number: another L4, an extension header, or an ICMP of the other version."""
    if not lay.family:
        return _flip(rng, raw, lay)
    at = lay.l3 + 9 if lay.family == 4 else (lay.ext[-1] if lay.ext else lay.l3 + 6)
    p = rng.choice(
        (
            PROTO_TCP,
            PROTO_UDP,
            PROTO_ICMP,
            PROTO_ICMPV6,
            EXT_HBH,
            EXT_FRAGMENT,
            EXT_AH,
            EXT_DSTOPTS,
            rng.getrandbits(8),
        )
    )
    return f"proto={p}", _put(raw, at, bytes([p]))


def _tags(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    """A bad tag: a tag's TPID where the IP ethertype was (a third, or a truncated one)."""
    at = lay.l3 - 2  # the ethertype before the IP header
    tpid = rng.choice((TPID_8021Q, TPID_8021AD))
    if rng.random() < 0.5:
        return f"ethertype@{at}={tpid:#x}", _put(raw, at, _u16(tpid))
    t = rng.choice((ETHERTYPE_IPV4, ETHERTYPE_IPV6, 0x0806, rng.getrandbits(16)))
    return f"ethertype@{at}={t:#x}", _put(raw, at, _u16(t))


def _quote(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    """An ICMP error's quote: its version, IHL or fragment offset, or the
    outer datagram ending before it (the quote then lies in the padding)."""
    if lay.quote is None or lay.quote + 8 > len(raw):
        return _ip_length(rng, raw, lay)
    q = lay.quote
    pick = rng.randrange(4)
    if pick == 0:
        v = rng.choice((4, 6, 0, rng.randint(0, 15)))
        return f"quote.version={v}", _put(raw, q, bytes([v << 4 | raw[q] & 0x0F]))
    if pick == 1:
        ihl = rng.randint(0, 15)
        return f"quote.ihl={ihl}", _put(raw, q, bytes([raw[q] & 0xF0 | ihl]))
    if pick == 2:
        v = rng.choice((0x2000, rng.randint(1, 0x1FFF)))
        return f"quote.frag_off={v:#x}", _put(raw, q + 6, _u16(v))
    # the outer datagram ends at or inside the quote: the rest is padding
    cut = q - lay.l3 + rng.choice((0, 4, 20, 24, 27, 40, 47))
    if lay.family == 4:
        return f"ipv4.len={cut}", _put(raw, lay.l3 + 2, _u16(cut))
    return f"ipv6.plen={cut - 40}", _put(raw, lay.l3 + 4, _u16(max(cut - 40, 0)))


def _flip(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    out = bytearray(raw)
    at = []
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(ETH_LEN if len(raw) > ETH_LEN else 0, len(raw))
        out[i] ^= rng.randint(1, 255)
        at.append(i)
    return f"flip@{','.join(map(str, at))}", bytes(out)


def _gso(rng: random.Random, raw: bytes, lay: Layout) -> tuple[str, bytes]:
    """Length 0 (BIG TCP GRO's 'to the frame's end'): the runner makes some of these GSO."""
    if lay.family == 4:
        return "ipv4.len=0", _put(raw, lay.l3 + 2, _u16(0))
    if lay.family == 6:
        return "ipv6.plen=0", _put(raw, lay.l3 + 4, _u16(0))
    return _flip(rng, raw, lay)


Mutator = Callable[[random.Random, bytes, Layout], tuple[str, bytes]]
MUTATORS: tuple[tuple[Mutator, int], ...] = (
    (_truncate, 6),
    (_ip_length, 4),
    (_ihl, 1),
    (_version, 1),
    (_l4_length, 4),
    (_ext, 3),
    (_fragment, 1),
    (_proto, 2),
    (_tags, 1),
    (_quote, 4),
    (_flip, 4),
    (_gso, 1),
)


PER_BASE = 8  # cases per generated frame: the frame itself, then 7 mutations of it


@functools.lru_cache(maxsize=2)
def base(seed: int, program: str, number: int) -> tuple[str, bytes, Layout]:
    """Generated frame *number* of a run (scapy builds are the slow part:
    each is mutated PER_BASE - 1 times)."""
    return generate(random.Random(f"{seed}:{program}:base:{number}"))


def sample(seed: int, program: str, case: int) -> Sample:
    """Case number *case* of *seed* for *program*, made again from these
    three alone: generated frame case // PER_BASE, as generated (the first
    of each PER_BASE cases) or with one or two mutations."""
    cls, raw, lay = base(seed, program, case // PER_BASE)
    rng = random.Random(f"{seed}:{program}:{case}")
    s = Sample(cls, "valid", raw, raw)
    if case % PER_BASE:
        mutators, weights = zip(*MUTATORS, strict=True)
        for _ in range(rng.choice((1, 1, 1, 2))):
            try:
                name, out = rng.choices(mutators, weights)[0](rng, s.data, lay)
            except (struct.error, IndexError):  # a field a first mutation cut off
                continue
            if len(out) >= ETH_LEN and out != s.data:
                s = replace(
                    s, data=out, mutation=name if s.mutation == "valid" else f"{s.mutation}+{name}"
                )
    if s.data == s.base:  # no mutation applied, or two that undid each other
        s = replace(s, mutation="valid")
    if rng.random() < 0.05:
        s = replace(s, gso_size=rng.randint(1, 9000))
    return s


__all__ = ["Layout", "Sample", "generate", "sample"]
