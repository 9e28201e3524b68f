"""Frames and small helpers the benchmarks share. Frames are built by hand:
scapy is a test dependency, not the package's."""

from __future__ import annotations

import struct

__all__ = ["TCP_ACK", "TCP_SYN", "csum", "quiet", "skb_ctx", "tcp4_frame", "tcp6_frame", "u32"]

TCP_ACK, TCP_SYN = 0x10, 0x02
_SKB_CTX_SIZE = 192  # struct __sk_buff, as a test run's context
_SKB_IFINDEX_OFF = 40  # __sk_buff.ifindex


def skb_ctx(ifindex: int) -> bytes:
    """A test run's __sk_buff context: the frame arrived on *ifindex*."""
    ctx = bytearray(_SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, _SKB_IFINDEX_OFF, ifindex)
    return bytes(ctx)


def csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of *data* (even length)."""
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 8192, 0, 0)


def tcp4_frame(
    src: bytes, dst: bytes, saddr: bytes, daddr: bytes, sport: int, dport: int, flags: int = TCP_ACK
) -> bytes:
    """Ethernet + IPv4 (checksum right) + TCP (checksum 0: lasthop reads no checksum)."""
    l4 = _tcp(sport, dport, flags)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, 6, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return dst + src + b"\x08\x00" + ip + l4


def tcp6_frame(
    src: bytes, dst: bytes, saddr: bytes, daddr: bytes, sport: int, dport: int, flags: int = TCP_ACK
) -> bytes:
    l4 = _tcp(sport, dport, flags)
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), 6, 64, saddr, daddr)
    return dst + src + b"\x86\xdd" + ip6 + l4


def u32(n: int) -> bytes:
    """A map key or value of one u32, in host order."""
    return struct.pack("=I", n)


def quiet(_: str) -> None:
    """A progress callback that says nothing."""
