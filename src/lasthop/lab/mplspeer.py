"""A label-edge router for the lab: the kernel here routes no MPLS, so this
process plays the provider edge in front of an MPLS-labelled uplink. IP
packets from the client's namespace (a tun device) leave on an Ethernet link
under a label stack; labelled frames coming back lose their labels and go to
the client -- each one checked as it arrives (the stack it carries, its
bottom-of-stack bit, its TTLs against the IP TTL).

    client ns: tun NAME  <==  MplsPeer (this process)  ==>  AF_PACKET on DEV (ns B) ──▶ host uplink
               IP packets         push / check + pop          Ethernet / MPLS stack / IP

A reply the host's kernel left to be checksummed on the way out (the VM's
veth offloads it: CHECKSUM_PARTIAL, which a veth carries to its peer as is)
reaches this raw socket with its TCP/UDP checksum not filled in, and the
client's stack would drop it; a NIC would have filled it in before the wire.
So the peer asks for each frame's packet status (PACKET_AUXDATA) and fills
in the checksum of a frame marked TP_STATUS_CSUMNOTREADY -- of no other: a
checksum the data path got wrong still reaches the client wrong.

With *narrow* set, the client sits behind a link of that MTU: a packet from
the host too big for it, and not to be fragmented, goes no further; the host
gets the router's ICMP error (lasthop.lab.pmtu) under the peer's labels.

The tun device lives as long as the peer (closing its fd removes it).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

import dpkt

from lasthop.lab.namespaces import open_socket
from lasthop.lab.pmtu import Narrow
from lasthop.lab.tunlink import MAX_PACKET, Forwarder, TunEnd, open_tun

__all__ = ["LabelCheck", "MplsPeer"]

ETH_P_ALL = 0x0003
ETH_P_MPLS_UC = 0x8847
ETH_TYPE = {4: 0x0800, 6: 0x86DD}
S_BIT = 1 << 8
DEFAULT_TTL = 64  # the label TTL of what the peer sends (the IP TTL, uniform model)
SOL_PACKET = 263  # linux/socket.h
PACKET_AUXDATA = 8  # linux/if_packet.h: a struct tpacket_auxdata with every frame
TP_STATUS_CSUMNOTREADY = 1 << 3  # the frame's L4 checksum is still the kernel's to fill in
AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata: tp_status first


@dataclass(frozen=True)
class LabelCheck:
    """One labelled frame the peer received: its labels (outer first) and
    whether its stack was right -- the bottom-of-stack bit on the last entry
    only, every TTL the IP TTL (uniform model), the TC bits as sent."""

    labels: tuple[int, ...]
    ttls: tuple[int, ...]
    ip_ttl: int
    bottom_ok: bool
    tc_ok: bool

    @property
    def ok(self) -> bool:
        return self.bottom_ok and self.tc_ok and all(t == self.ip_ttl for t in self.ttls)


def stack_bytes(labels: tuple[int, ...], tc: int, ttl: int) -> bytes:
    """Label stack entries, network order, S on the last."""
    return b"".join(
        struct.pack("!I", label << 12 | tc << 9 | (S_BIT if i == len(labels) - 1 else 0) | ttl)
        for i, label in enumerate(labels)
    )


def checksummed(packet: bytes) -> bytes:
    """*packet* (IPv4 or IPv6) with its TCP or UDP checksum filled in (dpkt
    computes a zero one, in IPv4 along with a zero header checksum, which
    comes out as it was); anything else unchanged."""
    ip: dpkt.Packet = dpkt.ip.IP(packet) if packet[0] >> 4 == 4 else dpkt.ip6.IP6(packet)
    if not isinstance(ip.data, (dpkt.tcp.TCP, dpkt.udp.UDP)):
        return packet
    ip.data.sum = 0
    if isinstance(ip, dpkt.ip.IP):
        ip.sum = 0
    return bytes(ip)


def csum_not_ready(ancdata: list[tuple[int, int, bytes]]) -> bool:
    """Whether a frame's PACKET_AUXDATA says its checksum is not filled in yet."""
    return any(
        level == SOL_PACKET
        and kind == PACKET_AUXDATA
        and len(data) >= AUXDATA.size
        and AUXDATA.unpack_from(data)[0] & TP_STATUS_CSUMNOTREADY
        for level, kind, data in ancdata
    )


def ip_ttl(packet: bytes) -> int:
    """An IP packet's TTL or hop limit."""
    return packet[8] if packet[0] >> 4 == 4 else packet[7]


@dataclass
class MplsPeer:
    """The label-edge router: *tun* in the client's namespace, *dev* the
    Ethernet end facing the host's uplink (its MAC *mac*), frames sent to
    *host_mac* under *labels* (traffic class *tc*)."""

    tun: TunEnd
    dev_ns: str
    dev: str
    mac: bytes
    host_mac: bytes
    labels: tuple[int, ...]
    tc: int = 5
    received: list[LabelCheck] = field(default_factory=list)
    unlabelled: int = 0  # frames from the host without labels (ARP, ...): not forwarded
    narrow: Narrow | None = None  # the client's side: a narrower link beyond a router
    _tun_fd: int | None = None
    _sock: socket.socket | None = None
    _forwarder: Forwarder | None = None

    def start(self) -> MplsPeer:
        self._tun_fd = open_tun(self.tun)
        try:
            self._sock = open_socket(
                self.dev_ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
            )
            self._sock.bind((self.dev, 0))  # the name is looked up in the socket's namespace
            self._sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        except BaseException:
            os.close(self._tun_fd)
            raise
        self._forwarder = Forwarder("mplspeer", (self._tun_fd, self._sock.fileno()), self._step)
        return self

    def _to_host(self, packet: bytes) -> None:
        version = packet[0] >> 4
        if version not in ETH_TYPE:
            return
        head = self.host_mac + self.mac + struct.pack("!H", ETH_P_MPLS_UC)
        assert self._sock is not None
        self._sock.send(head + stack_bytes(self.labels, self.tc, ip_ttl(packet)) + packet)

    def _from_host(self, frame: bytes) -> bytes | None:
        """The IP packet of a labelled frame (its stack checked and noted), or None."""
        if len(frame) < 14 or struct.unpack("!H", frame[12:14])[0] != ETH_P_MPLS_UC:
            self.unlabelled += 1
            return None
        pos, entries = 14, []
        while pos + 4 <= len(frame):
            (lse,) = struct.unpack("!I", frame[pos : pos + 4])
            entries.append(lse)
            pos += 4
            if lse & S_BIT:
                break
        packet = frame[pos:]
        if not packet or not entries:
            return None
        self.received.append(
            LabelCheck(
                labels=tuple(e >> 12 for e in entries),
                ttls=tuple(e & 0xFF for e in entries),
                ip_ttl=ip_ttl(packet),
                bottom_ok=[bool(e & S_BIT) for e in entries]
                == [i == len(entries) - 1 for i in range(len(entries))],
                tc_ok=all((e >> 9) & 7 == self.tc for e in entries),
            )
        )
        return packet

    def _step(self, fd: int) -> None:
        """One packet: from the tun to the host, labelled; or a frame from the host to the tun."""
        assert self._tun_fd is not None and self._sock is not None
        if fd == self._tun_fd:
            self._to_host(os.read(fd, MAX_PACKET))
            return
        data, ancdata, _, addr = self._sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(AUXDATA.size))
        if addr[2] == socket.PACKET_OUTGOING:
            return  # our own frames, seen leaving
        packet = self._from_host(data)
        if packet is not None:
            if csum_not_ready(ancdata):
                packet = checksummed(packet)
            error = self.narrow.error_for(packet) if self.narrow else None
            if error is not None:
                self._to_host(error)  # the router's answer, under the labels
                return
            os.write(self._tun_fd, packet)

    def stop(self) -> None:
        """Ends the forwarder, closes the socket and removes the tun device."""
        if self._forwarder is not None:
            self._forwarder.stop()
        if self._sock is not None:
            self._sock.close()
        if self._tun_fd is not None:
            os.close(self._tun_fd)
        self._tun_fd = self._sock = self._forwarder = None

    def __enter__(self) -> MplsPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
