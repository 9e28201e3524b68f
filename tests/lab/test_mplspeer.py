"""The MPLS peer's checksum repair (no root): a reply whose TCP/UDP checksum
the kernel left to offload gets it filled in, exactly as a stack would have
computed it; only a frame whose packet status says so (PACKET_AUXDATA
TP_STATUS_CSUMNOTREADY) is touched."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

from lasthop.lab.mplspeer import (
    AUXDATA,
    PACKET_AUXDATA,
    SOL_PACKET,
    TP_STATUS_CSUMNOTREADY,
    checksummed,
    csum_not_ready,
)

V4 = IP(src="192.0.2.11", dst="198.51.100.20", ttl=63)
V6 = IPv6(src="2001:db8:2::11", dst="2001:db8:100::20", hlim=63)
PARTIAL = 0xEC72  # what the kernel leaves there: the pseudo-header's sum


@pytest.mark.parametrize(
    "packet",
    [
        V4 / UDP(sport=7, dport=40001) / b"ping 0",
        V6 / UDP(sport=7, dport=40001) / b"ping 0",
        V4 / TCP(sport=7, dport=40001, flags="A", seq=1, ack=2) / b"x",
        V6 / TCP(sport=7, dport=40001, flags="PA", seq=1, ack=2) / b"ping 0",
    ],
    ids=["udp4", "udp6", "tcp4", "tcp6"],
)
def test_a_partial_checksum_is_filled_in(packet: Packet) -> None:
    l4 = packet.payload.__class__  # UDP or TCP
    partial = packet.copy()
    partial[l4].chksum = PARTIAL
    assert bytes(partial) != bytes(packet)
    assert checksummed(bytes(partial)).hex() == bytes(packet).hex()


def test_other_protocols_pass_unchanged() -> None:
    raw = bytes(V4 / ICMP(type=0, chksum=PARTIAL) / b"x")
    assert checksummed(raw) == raw


def _aux(status: int) -> tuple[int, int, bytes]:
    return (SOL_PACKET, PACKET_AUXDATA, AUXDATA.pack(status, 48, 48, 0, 14, 0, 0))


@pytest.mark.parametrize(
    "ancdata, ready",
    [
        ([_aux(TP_STATUS_CSUMNOTREADY)], False),
        ([_aux(TP_STATUS_CSUMNOTREADY | 1)], False),
        ([_aux(0)], True),
        ([], True),  # no status: left alone
        ([(SOL_PACKET, PACKET_AUXDATA, b"\x08\x00")], True),  # truncated: left alone
        ([(0, PACKET_AUXDATA, AUXDATA.pack(TP_STATUS_CSUMNOTREADY, 0, 0, 0, 0, 0, 0))], True),
    ],
    ids=["not-ready", "not-ready-and-user", "ready", "none", "truncated", "other-level"],
)
def test_only_a_frame_marked_not_ready_is_repaired(
    ancdata: list[tuple[int, int, bytes]], ready: bool
) -> None:
    assert csum_not_ready(ancdata) is not ready
