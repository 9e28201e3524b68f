"""lasthop.routewatch and the route half of failover.EndpointsDown, without a
kernel: which route messages make a check due (encoded as the kernel sends
them, parsed by pyroute2's own parser), at most one check per gap however
many arrive, what a route lookup's answer means, and how a missing route and
a failed neighbour entry together keep a tunnel endpoint down."""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from lasthop import abi
from lasthop.failover import EndpointsDown, FailoverWatch
from lasthop.neighwatch import NeighbourEvent
from lasthop.routewatch import (
    CHECK_SHARE,
    MAX_ROUTE_CHECKS,
    RECHECK_GAP,
    RTM_F_CLONED,
    RTN_BLACKHOLE,
    RTN_PROHIBIT,
    RTN_THROW,
    RTN_UNREACHABLE,
    RouteWatch,
    endpoint_routed,
    route_changed,
)
from test_failover import ENDPOINT, MAC_A, EndpointRecorder  # the same fakes

RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH = 24, 25, 28
RTN_UNICAST = 1
OTHER = ipaddress.ip_address("fd00:ff::2")


def route_msg(
    kind: int = RTM_NEWROUTE, dst: str = "10.255.0.0", family: int = socket.AF_INET, flags: int = 0
) -> bytes:
    """A route message as the kernel would send it."""
    msg = rtmsg()
    msg["header"]["type"] = kind
    msg["family"] = family
    msg["dst_len"] = 24
    msg["type"] = RTN_UNICAST
    msg["flags"] = flags
    msg["attrs"] = [("RTA_DST", dst)]
    msg.encode()
    return bytes(msg.data)


def neigh_msg() -> bytes:
    msg = ndmsg()
    msg["header"]["type"] = RTM_NEWNEIGH
    msg["family"] = socket.AF_INET
    msg["attrs"] = [("NDA_DST", "10.0.0.1")]
    msg.encode()
    return bytes(msg.data)


def parsed(data: bytes) -> Any:
    (msg,) = MarshalRtnl().parse(data)
    return msg


@pytest.mark.parametrize(
    ("desc", "data", "changed"),
    [
        ("an IPv4 route added", route_msg(), True),
        ("an IPv4 route deleted", route_msg(RTM_DELROUTE), True),
        ("an IPv6 route deleted", route_msg(RTM_DELROUTE, "fd00:ff::", socket.AF_INET6), True),
        ("an IPv6 cache entry", route_msg(dst="fd00:ff::", family=socket.AF_INET6,
                                          flags=RTM_F_CLONED), False),
        ("a neighbour message", neigh_msg(), False),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
def test_which_messages_are_route_changes(desc: str, data: bytes, changed: bool) -> None:
    assert route_changed(parsed(data)) is changed, desc


class FakeIPRoute:
    """IPRoute.route('get') answering one route type, or one error."""

    def __init__(self, rtype: int = RTN_UNICAST, error: int = 0) -> None:
        self.rtype, self.error = rtype, error
        self.asked: list[str] = []

    def route(self, cmd: str, dst: str) -> list[dict[str, int]]:
        assert cmd == "get"
        self.asked.append(dst)
        if self.error:
            raise NetlinkError(self.error)
        return [{"type": self.rtype}]


@pytest.mark.parametrize(
    ("desc", "ipr", "routed"),
    [
        ("a unicast route", FakeIPRoute(), True),
        ("no route (ENETUNREACH)", FakeIPRoute(error=errno.ENETUNREACH), False),
        ("an unreachable route (EHOSTUNREACH)", FakeIPRoute(error=errno.EHOSTUNREACH), False),
        ("a blackhole route (EINVAL)", FakeIPRoute(error=errno.EINVAL), False),
        ("a prohibit route (EACCES)", FakeIPRoute(error=errno.EACCES), False),
        ("a blackhole named", FakeIPRoute(RTN_BLACKHOLE), False),
        ("an unreachable named", FakeIPRoute(RTN_UNREACHABLE), False),
        ("a prohibit named", FakeIPRoute(RTN_PROHIBIT), False),
        ("a throw named", FakeIPRoute(RTN_THROW), False),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_what_a_route_lookup_says(desc: str, ipr: FakeIPRoute, routed: bool) -> None:
    assert endpoint_routed(ipr, ENDPOINT) is routed, desc
    assert ipr.asked == ["10.255.0.3"]


def test_another_lookup_error_is_raised_not_read_as_no_route() -> None:
    with pytest.raises(NetlinkError):
        endpoint_routed(FakeIPRoute(error=errno.ENOMEM), ENDPOINT)


def fed_watch(*datagrams: bytes) -> RouteWatch:
    """A RouteWatch whose socket holds *datagrams* (a socket pair in place of netlink)."""
    watch = RouteWatch()
    watch.sock.close()
    watch.sock, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    watch.sock.setblocking(False)
    for data in datagrams:
        sender.send(data)
    sender.close()
    return watch


def test_a_burst_of_changes_makes_one_check_due_at_most_once_per_gap() -> None:
    watch = fed_watch()
    try:
        assert watch.due(0.0) and watch.wait(0.0) == 0.0  # the first check seeds
        watch.checked(0.0)
        assert not watch.due(1.0) and watch.wait(1.0) is None
        feeder = fed_watch(*[route_msg(RTM_DELROUTE)] * 100)
        watch.sock.close()
        watch.sock = feeder.sock
        watch.read()  # drains the whole burst
        with pytest.raises(BlockingIOError):
            watch.sock.recv(1)
        assert watch.due(1.0)
        watch.checked(2.0)
        watch.pending = True  # another change right after
        assert not watch.due(2.0 + RECHECK_GAP / 2)
        assert watch.wait(2.0 + RECHECK_GAP / 2) == pytest.approx(RECHECK_GAP / 2)
        assert watch.due(2.0 + RECHECK_GAP)
        watch.checked(4.0, took=0.5)  # a long check (many endpoints): the gap grows with it
        watch.pending = True
        assert not watch.due(4.0 + 0.5 * CHECK_SHARE - 0.1) and watch.due(4.0 + 0.5 * CHECK_SHARE)
    finally:
        watch.close()


def test_read_drains_the_socket_and_only_route_changes_count() -> None:
    watch = fed_watch(neigh_msg(), neigh_msg())
    try:
        watch.checked(0.0)
        watch.read()
        assert not watch.pending  # nothing about routes
        with pytest.raises(BlockingIOError):
            watch.sock.recv(1)
    finally:
        watch.close()


# -------------------------------------------------------- endpoints down for want of a route


def test_an_endpoint_with_no_route_is_down_until_a_route_is_back() -> None:
    rec = EndpointRecorder()
    eps = EndpointsDown(rec)
    eps.routes({ENDPOINT: False, OTHER: True}, now=0.0)
    assert rec.down == {ENDPOINT}
    eps.routes({ENDPOINT: True, OTHER: True}, now=1.0)
    assert rec.down == set() and eps.why == {}


def test_a_route_back_leaves_an_endpoint_whose_neighbour_failed_down_and_back() -> None:
    rec = EndpointRecorder()
    eps = EndpointsDown(rec)
    eps.routes({ENDPOINT: False}, now=0.0)
    eps.see(NeighbourEvent(3, ENDPOINT, None), now=1.0)  # FAILED too
    eps.routes({ENDPOINT: True}, now=2.0)
    assert rec.down == {ENDPOINT}, "the neighbour entry is still FAILED"
    eps.routes({ENDPOINT: False}, now=3.0)
    eps.see(NeighbourEvent(3, ENDPOINT, MAC_A), now=4.0)  # answers, but no route
    assert rec.down == {ENDPOINT}, "the route is still missing"
    eps.see(NeighbourEvent(3, ENDPOINT, None, deleted=True), now=5.0)
    assert rec.down == {ENDPOINT}
    eps.routes({ENDPOINT: True}, now=6.0)
    assert rec.down == set()


def test_an_endpoint_with_no_route_does_not_age_out_but_a_failed_neighbour_does() -> None:
    rec = EndpointRecorder()
    eps = EndpointsDown(rec)
    eps.routes({ENDPOINT: False}, now=0.0)
    eps.see(NeighbourEvent(3, OTHER, None), now=0.0)
    assert eps.retire_older(now=1e9, max_age=10.0) == 1
    assert rec.down == {ENDPOINT} and eps.unrouted() == {ENDPOINT}


def test_no_route_records_share_the_bound() -> None:
    rec = EndpointRecorder()
    eps = EndpointsDown(rec)
    many = {ipaddress.ip_address(0x0AFF0000 + n): False for n in range(abi.MAX_ENDPOINTS_DOWN + 5)}
    eps.routes(many, now=0.0)
    assert len(rec.down) == len(eps.down) == len(eps.why) == abi.MAX_ENDPOINTS_DOWN


class TunnelController:
    """What FailoverWatch.check_routes asks of the controller."""

    def __init__(self, endpoints: set[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
        self.endpoints = endpoints
        self.reads = 0
        self.down: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()

    def tunnel_endpoints(self) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        self.reads += 1
        return set(self.endpoints)

    def set_endpoint_down(self, address: Any, down: bool) -> None:
        (self.down.add if down else self.down.discard)(address)


def test_a_check_asks_each_known_endpoint_once_and_again_those_down_for_no_route() -> None:
    """The endpoints come from the hop descriptors (one read per check); an
    endpoint down for want of a route whose descriptor has gone is still
    asked, so a route back retires it."""
    c = TunnelController({ENDPOINT, OTHER})
    watch = FailoverWatch(c)  # type: ignore[arg-type]
    try:
        routes = {ENDPOINT: False, OTHER: True}
        asked: list[Any] = []

        def routed(address: Any) -> bool:
            asked.append(address)
            return routes[address]

        watch.check_routes(0.0, routed)
        assert c.down == {ENDPOINT} and sorted(map(str, asked)) == ["10.255.0.3", "fd00:ff::2"]
        c.endpoints = {OTHER}  # its descriptor expired
        routes[ENDPOINT] = True
        asked.clear()
        watch.check_routes(1.0, routed)
        assert c.down == set() and set(asked) == {ENDPOINT, OTHER} and c.reads == 2
    finally:
        watch._wake_r.close()
        watch._wake_w.close()


def test_a_check_asks_at_most_max_route_checks_and_the_next_check_the_rest() -> None:
    """Many endpoints (a flood of forged ones fills lh_hop_descs): each check
    asks at most MAX_ROUTE_CHECKS of them, plus those down for want of a
    route, and says more are left; successive checks cover them all."""
    many = {ipaddress.ip_address(0x0AFF0000 + n) for n in range(MAX_ROUTE_CHECKS * 2 + 50)}
    c = TunnelController(many | {OTHER})
    watch = FailoverWatch(c)  # type: ignore[arg-type]
    try:
        asked: list[Any] = []

        def routed(address: Any) -> bool:
            asked.append(address)
            return address != OTHER

        lefts = []
        for n in range(3):
            before = len(asked)
            lefts.append(watch.check_routes(float(n), routed))
            assert len(asked) - before <= MAX_ROUTE_CHECKS + 1
        assert lefts == [True, True, False]
        assert set(asked) == many | {OTHER} and c.down == {OTHER}
        assert OTHER in asked[-MAX_ROUTE_CHECKS - 1 :], "an unrouted endpoint is asked each time"
    finally:
        watch._wake_r.close()
        watch._wake_w.close()
