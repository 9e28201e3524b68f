"""lasthop.neighwatch without a kernel: which neighbour messages say what.
Messages are encoded as the kernel sends them and parsed by pyroute2's own
parser (the watch's path): an entry naming a MAC is an announcement, a
FAILED one a lost hop; INCOMPLETE, deletions and a bridge's FDB say nothing."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from lasthop.neighwatch import (
    NUD_DELAY,
    NUD_FAILED,
    NUD_INCOMPLETE,
    NUD_NOARP,
    NUD_PERMANENT,
    NUD_PROBE,
    NUD_REACHABLE,
    NUD_STALE,
    NeighbourEvent,
    neighbour_event,
)

RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
AF_BRIDGE = 7
MAC_B = "02:fa:00:00:00:0b"


def wire(
    state: int,
    dst: str = "10.0.0.1",
    lladdr: str | None = MAC_B,
    kind: int = RTM_NEWNEIGH,
    family: int | None = None,
) -> ndmsg:
    """A neighbour message as the kernel would send it, read back by pyroute2."""
    msg = ndmsg()
    msg["header"]["type"] = kind
    msg["family"] = family or (socket.AF_INET6 if ":" in dst else socket.AF_INET)
    msg["ifindex"] = 7
    msg["state"] = state
    msg["attrs"] = [("NDA_DST", dst)] + ([("NDA_LLADDR", lladdr)] if lladdr else [])
    msg.encode()
    (parsed,) = MarshalRtnl().parse(msg.data)
    return parsed


@pytest.mark.parametrize("state", [NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_PERMANENT])
def test_an_entry_naming_a_mac_is_an_announcement(state: int) -> None:
    assert neighbour_event(wire(state)) == NeighbourEvent(
        7, ipaddress.ip_address("10.0.0.1"), bytes.fromhex("02fa0000000b")
    )


def test_an_ipv6_entry_too() -> None:
    ev = neighbour_event(wire(NUD_REACHABLE, dst="2001:db8::1"))
    assert ev is not None and ev.address == ipaddress.ip_address("2001:db8::1")


def test_a_deleted_entry_is_forgotten_not_failed() -> None:
    assert neighbour_event(wire(NUD_STALE, kind=RTM_DELNEIGH)) == NeighbourEvent(
        7, ipaddress.ip_address("10.0.0.1"), None, deleted=True
    )


def test_a_failed_entry_is_a_lost_hop() -> None:
    assert neighbour_event(wire(NUD_FAILED, lladdr=None)) == NeighbourEvent(
        7, ipaddress.ip_address("10.0.0.1"), None
    )


@pytest.mark.parametrize(
    ("desc", "msg"),
    [
        ("INCOMPLETE: the kernel still asks", lambda: wire(NUD_INCOMPLETE, lladdr=None)),
        ("NOARP: no neighbour behind it", lambda: wire(NUD_NOARP)),
        ("a bridge's FDB entry", lambda: wire(NUD_REACHABLE, family=AF_BRIDGE)),
        ("a valid state without a MAC", lambda: wire(NUD_REACHABLE, lladdr=None)),
        ("an all-zero MAC", lambda: wire(NUD_REACHABLE, lladdr="00:00:00:00:00:00")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_what_says_nothing(desc: str, msg) -> None:  # type: ignore[no-untyped-def]
    assert neighbour_event(msg()) is None, desc
