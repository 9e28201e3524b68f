"""The host's routes toward tunnel endpoints (issue 11, item 4).

A tunnel endpoint on the underlay's own link that stops answering shows as
a FAILED neighbour entry (lasthop.neighwatch); one behind a router shows
only as its route going: deleted, or replaced by an unreachable, blackhole,
prohibit or throw route. The agent follows the kernel's RTM_NEWROUTE and
RTM_DELROUTE events (a netlink socket of its own, IPv4 and IPv6: nothing
to do while the routes are steady) and, after a burst of them, asks the
kernel (RTM_GETROUTE, in the agent's namespace: the host's) for a route to
each endpoint the data path knows -- the remote endpoints of lh_hop_descs'
tunnel descriptors, a bounded map, never the connection table. At most one
such check per RECHECK_GAP seconds, or CHECK_SHARE times the last one's
duration when longer (many endpoints), however fast the routes churn: a
full BGP table's flaps cost the same as one change.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from lasthop.rtevents import event_socket, queued

__all__ = ["RouteWatch", "endpoint_routed", "route_changed", "routed_endpoints"]

log = logging.getLogger("lasthop")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RTMGRP_IPV4_ROUTE = 0x40  # linux/rtnetlink.h
RTMGRP_IPV6_ROUTE = 0x400
RECHECK_GAP = 0.2  # s: the shortest time between two checks of the endpoints' routes
MAX_ROUTE_CHECKS = 256  # endpoints asked per check (~0.5 ms each): the rest at the next
CHECK_SHARE = 10  # and at least this many times the last check's duration: <= 1/10 of the thread
RTM_F_CLONED = 0x200  # a route cache entry (IPv6 exceptions), not a route of a table
# route types that carry nothing toward their destination (linux/rtnetlink.h)
RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW = 6, 7, 8, 9
NO_WAY = {RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW}

RouteLookup = Callable[[IPAddress], bool]  # endpoint -> whether the host routes toward it


def route_changed(msg: Any) -> bool:
    """Whether a message (pyroute2's rtmsg) is a route of an IPv4 or IPv6
    table added, changed or deleted; a cache entry is not."""
    if msg.get("event") not in ("RTM_NEWROUTE", "RTM_DELROUTE"):
        return False
    if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
        return False
    return not msg["flags"] & RTM_F_CLONED


def endpoint_routed(ipr: Any, address: IPAddress) -> bool:
    """Whether the host has a route that carries packets to *address*
    (RTM_GETROUTE through pyroute2's IPRoute *ipr*): the kernel answers a
    blackhole, unreachable, prohibit or throw route, or none, with an error
    (EINVAL, EHOSTUNREACH, EACCES, ENETUNREACH), or names its type."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        answer = ipr.route("get", dst=str(address))
    except NetlinkError as err:
        if err.code in (errno.EINVAL, errno.EHOSTUNREACH, errno.EACCES, errno.ENETUNREACH):
            return False
        raise
    return bool(answer) and all(msg["type"] not in NO_WAY for msg in answer)


def routed_endpoints(endpoints: Iterable[IPAddress], routed: RouteLookup) -> dict[IPAddress, bool]:
    """Each distinct endpoint of *endpoints*, and whether the host routes toward it."""
    return {address: routed(address) for address in set(endpoints)}


class RouteWatch:
    """A netlink socket subscribed to IPv4 and IPv6 route changes (a plain
    socket with pyroute2's parser, as NeighbourWatch), and the rate of checks."""

    def __init__(self) -> None:
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        self.sock = event_socket(RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        self._marshal = MarshalRtnl()
        self.pending = True  # a check is due: the first one seeds
        self.last_check = float("-inf")
        self.gap = RECHECK_GAP  # s: the time from one check to the next

    def close(self) -> None:
        self.sock.close()

    def read(self) -> None:
        """Drains the queued events (call when the socket is readable): any
        route change makes a check due. Lost events (ENOBUFS) do too."""
        for data in queued(self.sock):
            if data is None:
                self.pending = True
                continue
            if not self.pending:
                self.pending = any(route_changed(msg) for msg in self._marshal.parse(data))

    def due(self, now: float) -> bool:
        """Whether to check now: a change is pending and the last check is
        gap old. The caller then checks and calls checked()."""
        return self.pending and now - self.last_check >= self.gap

    def wait(self, now: float) -> float | None:
        """Seconds until a pending check is due (the caller's select timeout), or None."""
        if not self.pending:
            return None
        return max(0.0, self.last_check + self.gap - now)

    def checked(self, now: float, took: float = 0.0) -> None:
        """A check began at *now* and took *took* seconds."""
        self.pending = False
        self.last_check = now
        self.gap = max(RECHECK_GAP, CHECK_SHARE * took)
