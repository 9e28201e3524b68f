"""Spoofed traffic for the lab's table tests: frames built with scapy, sent
raw (AF_PACKET) from inside one of the lab's namespaces, so they carry any
source address and MAC the test chooses, past the sender's own routing.

    spoofed_connections(...)  a flood of made-up TCP connections, several
                              packets each (SYN, ACK with data and random
                              numbers, SYN retransmits), as an attacker or a
                              churn of short connections sends them
    spoofed_syns(...)         pure SYNs from one (borrowed) address and port
                              towards a range of a client's ports
    RawSender                 a packet socket on one interface of a namespace
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from collections.abc import Iterable, Sequence

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lasthop.lab.namespaces import open_socket

__all__ = [
    "FLOOD_SOURCES",
    "RawSender",
    "spoofed_connections",
    "spoofed_syns",
]

# Where the flood's made-up clients live (RFC 2544 benchmarking range: no lab
# object has an address there).
FLOOD_SOURCES = ipaddress.ip_network("198.18.0.0/15")
ETH_P_ALL = 0x0003


def _ip(src: str, dst: str) -> Packet:
    return IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)


def _sum16(data: bytes) -> int:
    """The ones' complement sum of 16-bit words (IP, TCP checksums)."""
    if len(data) % 2:
        data += b"\0"
    words: tuple[int, ...] = struct.unpack(f"!{len(data) // 2}H", data)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class _Template:
    """An IPv4 TCP frame built once by scapy; copies get a new tuple and new
    sequence numbers written in, checksums recomputed (scapy builds a frame in
    about a millisecond: too slow for tens of thousands). The first copy is
    checked against scapy's own build of the same expression."""

    IP_AT, TCP_AT = 14, 34

    def __init__(self, flags: str, payload: bytes) -> None:
        self.flags, self.payload = flags, payload
        self.raw = bytearray(bytes(self._scapy(("0.0.0.0", 0, "0.0.0.0", 0), 0, 0, "", "")))
        assert len(self.raw) == self.TCP_AT + 20 + len(payload), "IP or TCP options in template"
        self.checked = False

    def _scapy(
        self, t: tuple[str, int, str, int], seq: int, ack: int, src_mac: str, dst_mac: str
    ) -> Packet:
        s, sp, d, dp = t
        pkt = (
            Ether(src=src_mac or None, dst=dst_mac or None)
            / IP(src=s, dst=d)
            / TCP(sport=sp, dport=dp, flags=self.flags, seq=seq, ack=ack, window=64240)
        )
        return pkt / Raw(self.payload) if self.payload else pkt

    def frame(
        self, t: tuple[str, int, str, int], seq: int, ack: int, src_mac: str, dst_mac: str
    ) -> bytes:
        s, sp, d, dp = t
        b = bytearray(self.raw)
        b[0:6] = bytes.fromhex(dst_mac.replace(":", ""))
        b[6:12] = bytes.fromhex(src_mac.replace(":", ""))
        ip, tcp = self.IP_AT, self.TCP_AT
        b[ip + 12 : ip + 16] = socket.inet_aton(s)
        b[ip + 16 : ip + 20] = socket.inet_aton(d)
        b[ip + 10 : ip + 12] = b"\0\0"
        struct.pack_into("!H", b, ip + 10, ~_sum16(bytes(b[ip:tcp])) & 0xFFFF)
        struct.pack_into("!HHII", b, tcp, sp, dp, seq, ack)
        b[tcp + 16 : tcp + 18] = b"\0\0"
        segment = bytes(b[tcp:])
        pseudo = b[ip + 12 : ip + 20] + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(segment))
        struct.pack_into("!H", b, tcp + 16, ~_sum16(bytes(pseudo) + segment) & 0xFFFF)
        if not self.checked:
            expected = bytes(self._scapy(t, seq, ack, src_mac, dst_mac))
            assert bytes(b) == expected, "patched frame differs from scapy's build"
            self.checked = True
        return bytes(b)


def spoofed_connections(
    *,
    src_mac: str,
    targets: Sequence[tuple[str, str, int]],
    count: int,
    seed: int = 8,
    batch: int = 500,
) -> list[bytes]:
    """*count* made-up IPv4 TCP connections from random sources in
    FLOOD_SOURCES to random (MAC, address, port) of *targets*, three packets each:
    a pure SYN; an ACK carrying data with random sequence and acknowledgement
    numbers (no attacker sees the SYN-ACK, so it cannot complete the
    handshake); then a retransmitted SYN (even connections) or more data (odd
    ones). Ordered batch by batch: a batch's SYNs, then its second packets,
    then its third, so each batch alone overflows a small pending table."""
    rng = random.Random(seed)
    first = int(FLOOD_SOURCES.network_address)
    tuples: list[tuple[str, int, str, int]] = []
    macs: list[str] = []
    seen: set[tuple[str, int, str, int]] = set()
    while len(tuples) < count:
        src = str(ipaddress.IPv4Address(first + rng.randrange(FLOOD_SOURCES.num_addresses)))
        dst_mac, dst, dport = targets[rng.randrange(len(targets))]
        t = (src, rng.randrange(1024, 65536), dst, dport)
        if t not in seen:
            seen.add(t)
            tuples.append(t)
            macs.append(dst_mac)
    syn = _Template("S", b"")
    data = _Template("PA", b"GET / HTTP/1.0\r\n\r\n")
    more = _Template("PA", b"more data\n")
    frames: list[bytes] = []
    for start in range(0, count, batch):
        chunk = list(zip(tuples[start : start + batch], macs[start : start + batch], strict=True))
        isn = [rng.randrange(1 << 31) for _ in chunk]
        frames += [syn.frame(t, i, 0, src_mac, m) for (t, m), i in zip(chunk, isn, strict=True)]
        frames += [
            data.frame(t, i + 1, rng.randrange(1 << 32), src_mac, m)
            for (t, m), i in zip(chunk, isn, strict=True)
        ]
        frames += [
            syn.frame(t, i, 0, src_mac, m)
            if n % 2 == 0
            else more.frame(t, i + 19, rng.randrange(1 << 32), src_mac, m)
            for n, ((t, m), i) in enumerate(zip(chunk, isn, strict=True))
        ]
    return frames


def spoofed_syns(
    *,
    src_mac: str,
    dst_mac: str,
    src: str,
    sport: int,
    dst: str,
    dports: Iterable[int],
    seed: int = 8,
) -> list[bytes]:
    """Pure SYNs from (*src*, *sport*) — an address the sender borrows — to
    each port of *dports* at *dst*."""
    rng = random.Random(seed)
    l2 = Ether(src=src_mac, dst=dst_mac)
    return [
        bytes(l2 / _ip(src, dst) / TCP(sport=sport, dport=p, flags="S", seq=rng.randrange(1 << 32)))
        for p in dports
    ]


class RawSender:
    """A packet socket bound to interface *ifname* inside namespace *ns*:
    frames go out exactly as built."""

    def __init__(self, ns: str, ifname: str) -> None:
        self.sock = open_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)

    def send(self, frames: Iterable[bytes]) -> int:
        """Sends every frame (blocking while the socket's buffer is full); returns the count."""
        n = 0
        for frame in frames:
            self.sock.send(frame)
            n += 1
        return n

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
