"""A narrow link beyond a lab peer: what a router does with a packet too
large for its next link -- "fragmentation needed" (IPv4 with DF set) or
"packet too big" (IPv6) back to the packet's source, quoting it. The lab
peers that forward in Python (TunLink, MplsPeer) write any size into their
tun devices, so a path-MTU test through them needs the router played here.

    VM ── host ── uplink ══ peer (Narrow: mtu 1280) ──▶ client
                        ◀══ ICMP error from `router`, quoting the VM's packet
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address

import dpkt

__all__ = ["Narrow"]

ICMP_UNREACH, ICMP_FRAG_NEEDED = 3, 4  # RFC 792 / RFC 1191
ICMP6_PACKET_TOO_BIG = 2  # RFC 4443
QUOTE4 = 576 - 20 - 8  # RFC 1812 4.3.2.3: the error no longer than 576 bytes
QUOTE6 = 1280 - 40 - 8  # RFC 4443 2.4(c): no longer than the minimum IPv6 MTU
ERROR_TTL = 64


@dataclass
class Narrow:
    """The next link's *mtu*; errors come from *router* (an IPv4 and an IPv6
    address). `sent` counts the errors made."""

    mtu: int
    router: tuple[str, str]
    sent: int = field(default=0)

    def error_for(self, packet: bytes) -> bytes | None:
        """The ICMP error about IP *packet*, or None when it fits the link or
        may be fragmented (IPv4 without DF: the router fragments it)."""
        if len(packet) <= self.mtu or not packet:
            return None
        if packet[0] >> 4 == 4:
            error = self._error4(packet)
        elif packet[0] >> 4 == 6:
            error = self._error6(packet)
        else:
            return None
        if error is not None:
            self.sent += 1
        return error

    def _error4(self, packet: bytes) -> bytes | None:
        ip = dpkt.ip.IP(packet)
        if not ip.df:
            return None
        icmp = dpkt.icmp.ICMP(
            type=ICMP_UNREACH,
            code=ICMP_FRAG_NEEDED,
            data=dpkt.icmp.ICMP.Unreach(mtu=self.mtu, data=packet[:QUOTE4]),
        )
        out = dpkt.ip.IP(
            src=ip_address(self.router[0]).packed,
            dst=ip.src,
            p=dpkt.ip.IP_PROTO_ICMP,
            ttl=ERROR_TTL,
            data=icmp,
        )
        out.len = len(out)  # header and checksums filled in by bytes()
        return bytes(out)

    def _error6(self, packet: bytes) -> bytes:
        ip6 = dpkt.ip6.IP6(packet)
        body = dpkt.icmp6.ICMP6(
            type=ICMP6_PACKET_TOO_BIG,
            code=0,
            data=dpkt.icmp6.ICMP6.TooBig(mtu=self.mtu, data=packet[:QUOTE6]),
        )
        out = dpkt.ip6.IP6(
            src=ip_address(self.router[1]).packed,
            dst=ip6.src,
            nxt=dpkt.ip.IP_PROTO_ICMP6,
            hlim=ERROR_TTL,
            data=body,
        )
        out.plen = len(bytes(body))
        return bytes(out)
