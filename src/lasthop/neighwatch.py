"""The host's neighbour table as a fail-over source (issue 11, items 3 and 4).

Besides the announcements it reads on the uplinks (lasthop.failover), the
agent follows the host's own neighbour table for the uplinks that opt in
(``follow_failover``): the kernel's RTM_NEWNEIGH events, on a netlink socket
of their own, cost nothing while the table is steady, and one dump per
uplink at start (and after a reload) seeds which MAC owns which address.

- An entry that names a MAC (REACHABLE, STALE, DELAY, PROBE, PERMANENT) is
  read as an announcement of its address from that MAC: when the address
  had another MAC, that MAC's connections follow, by the same record in
  lh_hop_moved and the same trust rules (firewall_addresses, the uplink's
  allow/deny lists).
- An entry that went FAILED (the host asked and nobody answered) makes the
  MAC that owned the address unreachable: its replies take the host's
  routing, counted hop_unreachable, until the entry names a MAC again.
  INCOMPLETE is the kernel still asking (a new entry): it waits for FAILED.
- RTM_DELNEIGH (the kernel forgot an entry it did not need) says nothing
  about a last hop, and changes nothing there; a tunnel endpoint marked
  unreachable (below) is tried again.

Tunnel endpoints (item 4): a FAILED entry of any device, while a tunnel
uplink is attached, marks that address unreachable as an endpoint
(lh_endpoints_down): replies of entries whose hop is that endpoint take the
host's routing until its entry names a MAC again or is deleted (the kernel
collects a FAILED entry after a while: the endpoint is then tried again).
An endpoint behind a router is followed by its route (lasthop.routewatch).

Neighbour entries of a bridge the uplink is a port of count for the uplink
(a bridged host holds its neighbours on the bridge).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from lasthop.rtevents import event_socket, queued

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["NeighbourEvent", "NeighbourWatch", "neighbour_event"]

log = logging.getLogger("lasthop")
RTMGRP_NEIGH = 0x4  # linux/rtnetlink.h
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
# states whose entry names the neighbour's current MAC (the kernel's NUD_VALID, but NOARP)
NUD_NAMES_MAC = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT


@dataclass(frozen=True)
class NeighbourEvent:
    """What one neighbour message says of a hop on neighbour device *ifindex*:
    *address* is at *mac* (an announcement), or (mac None) it failed, or
    (*deleted*) the kernel forgot it."""

    ifindex: int
    address: IPAddress
    mac: bytes | None
    deleted: bool = False


def neighbour_event(msg: Any) -> NeighbourEvent | None:
    """The event a RTM_NEWNEIGH or RTM_DELNEIGH message (pyroute2's ndmsg)
    carries; None for any other message, family (a bridge's FDB) or state."""
    if msg.get("event") not in (None, "RTM_NEWNEIGH", "RTM_DELNEIGH"):
        return None
    if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
        return None
    dst = msg.get_attr("NDA_DST")
    if dst is None:
        return None
    try:
        address = ipaddress.ip_address(dst)
    except ValueError:
        return None
    if msg.get("event") == "RTM_DELNEIGH":
        return NeighbourEvent(msg["ifindex"], address, None, deleted=True)
    state = msg["state"]
    if state & NUD_NAMES_MAC:
        lladdr = msg.get_attr("NDA_LLADDR")
        if not isinstance(lladdr, str):
            return None
        mac = bytes.fromhex(lladdr.replace(":", ""))
        if len(mac) != 6 or mac == bytes(6):
            return None
        return NeighbourEvent(msg["ifindex"], address, mac)
    if state & NUD_FAILED:
        return NeighbourEvent(msg["ifindex"], address, None)
    return None


class NeighbourWatch:
    """A netlink socket subscribed to neighbour changes, and the seed dump.

    A plain socket with pyroute2's parser (as Links.watch), so that select()
    sees every event; the dump goes through an IPRoute of its own."""

    def __init__(self) -> None:
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        self.sock = event_socket(RTMGRP_NEIGH)
        self._marshal = MarshalRtnl()
        self.lost_events = False  # the kernel dropped events: the caller dumps again

    def close(self) -> None:
        self.sock.close()

    def events(self) -> Iterator[NeighbourEvent]:
        """The events queued now (call when the socket is readable)."""
        for data in queued(self.sock):
            if data is None:
                log.warning("neighbour events were lost (ENOBUFS): reading the uplinks' again")
                self.lost_events = True
                continue
            for msg in self._marshal.parse(data):
                ev = neighbour_event(msg)
                if ev is not None:
                    yield ev

    @staticmethod
    def dump(ifindexes: Iterable[int]) -> list[NeighbourEvent]:
        """The neighbour entries of *ifindexes* now: one dump each."""
        from pyroute2 import IPRoute

        out = []
        with IPRoute() as ipr:
            for ifindex in ifindexes:
                for msg in ipr.get_neighbours(ifindex=ifindex):
                    ev = neighbour_event(msg)
                    if ev is not None and ev.ifindex == ifindex:
                        out.append(ev)
        return out
