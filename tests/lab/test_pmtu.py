"""The lab's narrow link (lasthop.lab.pmtu, no root): a packet too big for
it, and not to be fragmented, gets the router's ICMP error -- exactly what
scapy builds for the same quote -- and anything else none."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.packet import Packet

from lasthop.lab.pmtu import QUOTE4, QUOTE6, Narrow

ROUTER = ("198.51.100.1", "2001:db8:100::1")
V4 = IP(src="192.0.2.11", dst="198.51.100.20", ttl=63, id=7)
DF4 = IP(src="192.0.2.11", dst="198.51.100.20", ttl=63, id=7, flags="DF")
V6 = IPv6(src="2001:db8:2::11", dst="2001:db8:100::20", hlim=63)
ANSWER = UDP(sport=7, dport=40001) / (b"x" * 1400)


def expected(packet: Packet) -> bytes:
    """The router's error about *packet*, as scapy computes it."""
    raw = bytes(packet)
    if IP in packet:
        return bytes(
            IP(src=ROUTER[0], dst=packet[IP].src, ttl=64, id=0)
            / ICMP(type=3, code=4, nexthopmtu=1280)
            / raw[:QUOTE4]
        )
    return bytes(
        IPv6(src=ROUTER[1], dst=packet[IPv6].src, hlim=64)
        / ICMPv6PacketTooBig(mtu=1280)
        / raw[:QUOTE6]
    )


@pytest.mark.parametrize("packet", [DF4 / ANSWER, V6 / ANSWER], ids=["v4 with DF", "v6"])
def test_a_packet_too_big_gets_the_routers_error(packet: Packet) -> None:
    narrow = Narrow(1280, ROUTER)
    assert narrow.error_for(bytes(packet)) == expected(packet)
    assert narrow.sent == 1


@pytest.mark.parametrize(
    "packet",
    [V4 / ANSWER, DF4 / UDP() / (b"x" * 1200), V6 / UDP()],
    ids=["v4 without DF: the router fragments it", "v4 that fits", "v6 that fits"],
)
def test_what_fits_or_may_be_fragmented_gets_none(packet: Packet) -> None:
    narrow = Narrow(1280, ROUTER)
    assert narrow.error_for(bytes(packet)) is None
    assert narrow.sent == 0
