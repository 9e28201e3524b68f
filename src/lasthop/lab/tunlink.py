"""A point-to-point L3 link between two namespaces: a tun device at each end
and a forwarder thread copying packets between them -- a stand-in for a
WireGuard, GRE or IPsec peer, whose interface has no Ethernet header (the
kernel hands tc an IP packet, skb->protocol saying which family).

    ns A: tun NAME_A  <==  TunLink (this process: read one, write the other)  ==>  ns B: tun NAME_B

With *narrow* set, the way from B to A is a link of that MTU behind a router
(lasthop.lab.pmtu): a packet too big for it, and not to be fragmented, is not
forwarded; B gets the router's ICMP error instead (a path-MTU test).

The devices live as long as the link: closing their file descriptors (stop)
removes them, so nothing is left behind.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from lasthop.lab.namespaces import LabError, made_in
from lasthop.lab.pmtu import Narrow

__all__ = ["Forwarder", "TunEnd", "TunLink"]

TUNSETIFF = 0x400454CA  # linux/if_tun.h: _IOW('T', 202, int)
IFF_TUN = 0x0001  # an L3 device: packets start at the IP header
IFF_NO_PI = 0x1000  # no 4-byte packet information header in front
MAX_PACKET = 65535


@dataclass(frozen=True)
class TunEnd:
    ns: str  # network namespace the device is made in
    name: str  # its interface name


def open_tun(end: TunEnd) -> int:
    """Creates tun device *end.name* in namespace *end.ns*; returns its fd
    (the device goes away when the fd is closed)."""

    def make() -> int:  # a tun device is made in its opener's namespace
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", end.name.encode(), IFF_TUN | IFF_NO_PI))
        except BaseException:
            os.close(fd)
            raise
        return fd

    try:
        return made_in(end.ns, make)
    except OSError as err:
        raise LabError(f"tun {end.name} in {end.ns}: {err}") from err


class Forwarder:
    """The thread of a lab forwarder (TunLink, mplspeer.MplsPeer): it waits
    on *fds* and hands each that is readable to *step*, which moves one
    packet (an OSError there drops it: the other end not up yet, or a packet
    it refused), until stop() wakes it through a pipe and joins it. The fds
    stay their owner's to close."""

    def __init__(self, name: str, fds: tuple[int, ...], step: Callable[[int], None]) -> None:
        self._fds = fds
        self._step = step
        self._stop = os.pipe()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([*self._fds, self._stop[0]], [], [])
            if self._stop[0] in ready:
                return
            for fd in ready:
                try:
                    self._step(fd)
                except OSError:
                    continue

    def stop(self) -> None:
        os.write(self._stop[1], b"x")
        self._thread.join(timeout=5)
        for fd in self._stop:
            os.close(fd)


@dataclass
class TunLink:
    """Two tun devices joined by a forwarder thread; packets counted per direction."""

    a: TunEnd
    b: TunEnd
    forwarded: dict[str, int] = field(default_factory=lambda: {"a->b": 0, "b->a": 0})
    narrow: Narrow | None = None  # the way from B to A: a narrower link beyond a router
    _fds: tuple[int, int] | None = None
    _forwarder: Forwarder | None = None

    def start(self) -> TunLink:
        fa = open_tun(self.a)
        try:
            fb = open_tun(self.b)
        except BaseException:
            os.close(fa)
            raise
        self._fds = (fa, fb)
        other = {fa: (fb, "a->b"), fb: (fa, "b->a")}

        def step(fd: int) -> None:
            packet = os.read(fd, MAX_PACKET)
            to, way = other[fd]
            error = self.narrow.error_for(packet) if way == "b->a" and self.narrow else None
            if error is not None:
                os.write(fd, error)  # the router's answer, back where it came from
                return
            os.write(to, packet)
            self.forwarded[way] += 1

        self._forwarder = Forwarder("tunlink", self._fds, step)
        return self

    def stop(self) -> None:
        """Ends the forwarder and removes both devices."""
        if self._forwarder is not None:
            self._forwarder.stop()
        for fd in self._fds or ():
            os.close(fd)
        self._fds = self._forwarder = None

    def __enter__(self) -> TunLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
