"""Frames lasthop cannot or must not key on pass unchanged and are counted.

Each row is a transform of a well-formed frame (truncated, bad length,
fragment, unknown type, ...) and runs on both programs: on an uplink the
table must stay empty, and on a VM port the reply's connection is in the
table, so a parser that accepted the frame would redirect it. Frames shorter
than an Ethernet header cannot be tested: BPF_PROG_TEST_RUN refuses them
(EINVAL), as the stack never hands them to tc.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from lasthop import abi
from packets import (
    IP6_CLIENT_B,
    IP6_VM_1,
    MAC_FW_B,
    MAC_VM_1,
    VLAN_OTHER,
    dot1ad,
    dot1q,
    echo4_reply,
    echo4_request,
    echo6_reply,
    echo6_request,
    tcp4_reply,
    tcp4_request,
    tcp6_reply,
    tcp6_request,
    udp4_reply,
    udp4_request,
)

from .harness import (
    PENDING,
    TC_ACT_REDIRECT,
    UPLINK,
    VMPORT,
    Case,
    Entry,
    Key,
    bridged,
    check,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter

# base name -> (request on an uplink, reply from VM 1, the request whose entry the reply finds)
BASES = {
    "tcp4": (tcp4_request("A"), tcp4_reply(), tcp4_request()),
    "tcp6": (tcp6_request("A"), tcp6_reply(), tcp6_request()),
    "udp4": (udp4_request(), udp4_reply(), udp4_request()),
    "icmp4": (echo4_request(), echo4_reply(), echo4_request()),
    "icmp6": (echo6_request(), echo6_reply(), echo6_request()),
}


def _split(frame: Packet) -> tuple[Packet, Packet, bytes]:
    """(Ethernet, IP header without payload, L4 bytes) of a dissected frame."""
    e = Ether(bytes(frame))
    ip = e[IP] if IP in e else e[IPv6]
    l4 = bytes(ip.payload)
    head = ip.copy()
    head.remove_payload()
    if IP in e:
        head.len = head.chksum = None
    else:
        head.plen = None
    return Ether(src=e.src, dst=e.dst, type=e.type), head, l4


def _proto(frame: Packet) -> int:
    e = Ether(bytes(frame))
    return int(e[IP].proto if IP in e else e[IPv6].nh)


def cut(n: int) -> Callable[[Packet], bytes]:
    """The frame's first n bytes: lengths in the headers still claim the rest."""
    return lambda f: bytes(f)[:n]


def cut_l4(n: int) -> Callable[[Packet], Packet]:
    """The L4 header cut to n bytes, with IP lengths that agree with the frame."""

    def make(f: Packet) -> Packet:
        eth, head, l4 = _split(f)
        return eth / head / Raw(l4[:n])

    return make


def set_ip(**fields: object) -> Callable[[Packet], Packet]:
    """Rebuilt with some IPv4/IPv6 header fields forced."""

    def make(f: Packet) -> Packet:
        e = Ether(bytes(f))
        ip = e[IP] if IP in e else e[IPv6]
        for name, value in fields.items():
            setattr(ip, name, value)
        if IP in e and "chksum" not in fields:
            del ip.chksum
        return e

    return make


def set_tcp(**fields: object) -> Callable[[Packet], Packet]:
    def make(f: Packet) -> Packet:
        e = Ether(bytes(f))
        for name, value in fields.items():
            setattr(e[TCP], name, value)
        del e[TCP].chksum
        return e

    return make


def set_udp(**fields: object) -> Callable[[Packet], Packet]:
    def make(f: Packet) -> Packet:
        e = Ether(bytes(f))
        for name, value in fields.items():
            setattr(e[UDP], name, value)
        del e[UDP].chksum
        return e

    return make


def udp_len_past(n: int) -> Callable[[Packet], Packet]:
    """The UDP length n bytes longer than the datagram holds."""

    def make(f: Packet) -> Packet:
        return set_udp(len=len(Ether(bytes(f))[UDP]) + n)(f)

    return make


def ext6(*headers: Packet) -> Callable[[Packet], Packet]:
    """IPv6 extension headers inserted before the L4 header."""

    def make(f: Packet) -> Packet:
        eth, head, l4 = _split(f)
        del head.nh  # scapy fills in the first extension header's number
        chain = head
        for i, h in enumerate(headers):
            h = h.copy()
            if i == len(headers) - 1:
                h.nh = _proto(f)  # the last one leads to the original L4 header
            chain = chain / h
        return eth / chain / Raw(l4)

    return make


def retag(*tags: Packet) -> Callable[[Packet], Packet]:
    def make(f: Packet) -> Packet:
        e = Ether(bytes(f))
        out = Ether(src=e.src, dst=e.dst)
        for t in tags:
            out = out / t
        return out / e.payload

    return make


def replace_l3(build: Callable[[Packet], Packet]) -> Callable[[Packet], Packet]:
    def make(f: Packet) -> Packet:
        e = Ether(bytes(f))
        return Ether(src=e.src, dst=e.dst) / build(e)

    return make


@dataclass(frozen=True)
class Bad:
    desc: str
    bases: tuple[str, ...]
    make: Callable[[Packet], Packet | bytes]
    counters: tuple[abi.Counter, ...] = (C.MALFORMED,)


E = 14  # where the Ethernet header ends

# IP headers cut short: BPF_PROG_TEST_RUN refuses an IPv4 (IPv6) ethertype with
# less than 20 (40) bytes after the Ethernet header, but a veth or tap delivers
# such frames to tc, so test_veth.py sends these rows over a veth.
SHORT_L3 = [
    Bad("Ethernet header only, ethertype IPv4", ("tcp4",), cut(E)),
    Bad("Ethernet header only, ethertype IPv6", ("tcp6",), cut(E)),
    Bad("IPv4 header cut at 19 bytes", ("tcp4",), cut(E + 19)),
    Bad("IPv6 header cut at 39 bytes", ("tcp6",), cut(E + 39)),
]

ROWS = [
    # truncated at every layer
    Bad("802.1Q tag cut short", ("tcp4",), lambda f: bytes(retag(dot1q())(f))[: E + 2]),
    Bad(
        "second (inner) tag of QinQ cut short",
        ("tcp4",),
        lambda f: bytes(retag(dot1ad(), dot1q())(f))[: E + 4 + 2],
    ),
    Bad(
        "IPv4 header with options cut short (total length beyond the frame)",
        ("tcp4",),
        lambda f: bytes(set_ip(options=b"\x94\x04\x00\x00")(f))[: E + 22],
    ),
    Bad("TCP header cut at 19 bytes (IP lengths agree)", ("tcp4", "tcp6"), cut_l4(19)),
    Bad("TCP header cut at 3 bytes", ("tcp4",), cut_l4(3)),
    Bad("UDP header cut at 7 bytes", ("udp4",), cut_l4(7)),
    Bad("ICMP header cut at 7 bytes", ("icmp4",), cut_l4(7)),
    Bad("ICMPv6 header cut at 7 bytes", ("icmp6",), cut_l4(7)),
    Bad("TCP data offset below 5", ("tcp4", "tcp6"), set_tcp(dataofs=4)),
    Bad("UDP length 0", ("udp4",), set_udp(len=0)),
    Bad("UDP length 7, shorter than its header", ("udp4",), set_udp(len=7)),
    Bad("UDP length one byte past the datagram", ("udp4",), udp_len_past(1)),
    Bad("UDP length far past the datagram", ("udp4",), set_udp(len=0xFFFF)),
    Bad("TCP data offset one word past the segment", ("tcp4", "tcp6"), set_tcp(dataofs=6)),
    Bad("TCP data offset far past the segment", ("tcp4", "tcp6"), set_tcp(dataofs=15)),
    # bad lengths and versions
    Bad("IPv4 total length beyond the frame", ("tcp4", "udp4"), set_ip(len=200)),
    Bad("IPv4 total length shorter than the IPv4 header", ("tcp4",), set_ip(len=19)),
    Bad("IPv4 IHL below 5", ("tcp4",), set_ip(ihl=4)),
    Bad("IPv4 ethertype, version 6 inside", ("tcp4",), set_ip(version=6)),
    Bad("IPv6 ethertype, version 4 inside", ("tcp6",), set_ip(version=4)),
    Bad("IPv6 payload length beyond the frame", ("tcp6",), set_ip(plen=100)),
    # the IP header's length is the datagram's: bytes after it are Ethernet padding
    Bad(
        "IPv4 total length ends inside the L4 header (the rest is padding)",
        ("tcp4", "udp4", "icmp4"),
        set_ip(len=20 + 4),
    ),
    Bad(
        "IPv6 payload length ends inside the L4 header (the rest is padding)",
        ("tcp6", "icmp6"),
        set_ip(plen=4),
    ),
    Bad(
        "IPv6 payload length ends inside an extension header",
        ("tcp6",),
        lambda f: set_ip(plen=4)(ext6(IPv6ExtHdrDestOpt())(f)),
    ),
    Bad(
        "IPv6 extension header cut short (payload length 1)",
        ("tcp6",),
        replace_l3(lambda e: IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1, nh=60) / Raw(b"\x06")),
    ),
    Bad(
        "IPv6 extension header whose length runs past the frame",
        ("tcp6",),
        lambda f: bytes(ext6(IPv6ExtHdrHopByHop(len=20))(f)),
    ),
    Bad(
        "more IPv6 extension headers than the parser skips",
        ("tcp6",),
        ext6(*[IPv6ExtHdrDestOpt() for _ in range(7)]),
        (C.MALFORMED, C.IPV6_EXT),
    ),
    Bad(
        "ICMP (IPv4's protocol 1) inside IPv6",
        ("tcp6",),
        replace_l3(lambda e: IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1, nh=1) / Raw(bytes(8))),
    ),
    # later fragments (no ports to key on) whose first fragment was never seen
    # (test_frag.py has the ones that follow it)
    Bad("IPv4 later fragment (offset set)", ("udp4",), set_ip(frag=185), (C.FRAGMENT_EARLY,)),
    Bad(
        "IPv6 later fragment after hop-by-hop",
        ("tcp6",),
        ext6(IPv6ExtHdrHopByHop(), IPv6ExtHdrFragment(offset=10)),
        (C.FRAGMENT_EARLY, C.IPV6_EXT),
    ),
    Bad(
        "IPv6 fragment header cut short",
        ("tcp6",),
        replace_l3(lambda e: IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1, nh=44) / Raw(b"\x06\x00\x00")),
    ),
    Bad(
        "two IPv6 fragment headers",
        ("tcp6",),
        ext6(IPv6ExtHdrFragment(m=1, id=7), IPv6ExtHdrFragment(m=1, id=7)),
    ),
    Bad(
        "IPv4 first fragment too short for its TCP header",
        ("tcp4",),
        lambda f: (
            Ether(bytes(f)[:14])
            / IP(src=f[IP].src, dst=f[IP].dst, flags="MF", proto=6)
            / Raw(bytes(f[TCP])[:8])
        ),
    ),
    # not IP
    Bad(
        "ARP",
        ("tcp4",),
        replace_l3(lambda e: ARP(psrc="192.0.2.1", pdst="192.0.2.11")),
        (C.NOT_IP,),
    ),
    Bad(
        "LLDP",
        ("tcp4",),
        lambda f: Ether(src=MAC_FW_B, dst=MAC_VM_1, type=0x88CC) / Raw(bytes(30)),
        (C.NOT_IP,),
    ),
    Bad("a third VLAN tag", ("tcp4",), retag(dot1ad(), dot1q(), dot1q(VLAN_OTHER)), (C.NOT_IP,)),
]


def cases() -> list[Case]:
    out = []
    for row in ROWS:
        for base in row.bases:
            request, reply, conn = BASES[base]
            frame = row.make(request)
            out.append(
                Case(
                    f"{row.desc} [{base}, uplink]",
                    UPLINK,
                    "up1",
                    frame,
                    counters={("up1", c): 1 for c in row.counters},
                )
            )
            entry = Entry(Key(conn), mac=MAC_FW_B, iface="up1", packets=3)
            out.append(
                Case(
                    f"{row.desc} [{base}, VM port]",
                    VMPORT,
                    "vm1",
                    row.make(reply),
                    setup=(entry,),
                    counters={("vm1", c): 1 for c in row.counters},
                )
            )
    return out


CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_malformed_passes_unchanged(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    check(dp, case)


MIDSTREAM = Entry(
    Key(tcp4_request()),
    mac=MAC_FW_B,
    iface="up1",
    seen="now",
    state=abi.State.TCP_MIDSTREAM,
    table=PENDING,
)

CONTROLS = [
    Case(
        "control: a well-formed request of the same shape is learned",
        UPLINK,
        "up1",
        tcp4_request("A"),
        counters={("up1", C.LEARNED): 1},
        table_counters={abi.TableCounter.PENDING_INSERTED: 1},
        after=(MIDSTREAM,),
    ),
    Case(
        "control: IPv4 DF is no fragment",
        UPLINK,
        "up1",
        set_ip(flags="DF")(tcp4_request("A")),
        counters={("up1", C.LEARNED): 1},
        table_counters={abi.TableCounter.PENDING_INSERTED: 1},
        after=(MIDSTREAM,),
    ),
    Case(
        "control: a UDP length shorter than the datagram is learned (the rest is trimmed)",
        UPLINK,
        "up1",
        set_udp(len=8)(udp4_request()),
        counters={("up1", C.LEARNED): 1},
        table_counters={abi.TableCounter.PENDING_INSERTED: 1},
        after=(
            Entry(
                Key(udp4_request()),
                mac=MAC_FW_B,
                iface="up1",
                seen="now",
                state=abi.State.UDP_NEW,
                table=PENDING,
            ),
        ),
    ),
    Case(
        "control: a well-formed reply of the same shape is redirected",
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(Entry(Key(tcp4_request()), mac=MAC_FW_B, iface="up1"),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply()),
        after=(Entry(Key(tcp4_request()), mac=MAC_FW_B, iface="up1", replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
]


@pytest.mark.parametrize("case", CONTROLS, ids=[c.desc for c in CONTROLS])
def test_controls_are_handled(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    """The rows above fail for their defect, not their shape: the same frames,
    well formed, are learned and redirected."""
    check(dp, case)


def test_no_row_is_a_noop() -> None:
    """Every malformed frame differs from the well-formed frame it came from."""
    for row in ROWS + SHORT_L3:
        for base in row.bases:
            request = BASES[base][0]
            assert bytes(row.make(request)) != bytes(request), row.desc
