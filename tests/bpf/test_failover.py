"""lh_vmport after a fail-over (bpf/failover.h): a reply whose last hop's
address moved to another MAC (a record in lh_hop_moved) goes to the new
MAC, and its entry follows; only while F_SET_HOPS_MOVED is set and on an
uplink with F_IFACE_FOLLOW_MOVES.

    client ── fw B (dead) ─┐                     lh_hop_moved: (up1, B) -> C
              fw C (new) ──┴─ up1 ── host ── vm1 ── VM 1
    reply:  VM 1 ─▶ vm1 ─▶ entry (up1, B) ─▶ record ─▶ dst := C ─▶ up1
"""

from __future__ import annotations

import pytest
from scapy.packet import Packet

from lasthop import abi
from packets import (
    MAC_FW_A,
    MAC_FW_B,
    MAC_FW_C,
    tcp4_reply,
    tcp4_request,
    tcp6_reply,
    tcp6_request,
)

from .harness import TC_ACT_REDIRECT, VMPORT, Case, Entry, Key, bridged, check, ids, routed

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter
FOLLOW = (("up1", abi.F_IFACE_FOLLOW_MOVES),)
MOVED = abi.F_SET_HOPS_MOVED
B_TO_C = (("up1", MAC_FW_B, MAC_FW_C),)


def entry(request: Packet, **kw) -> Entry:  # type: ignore[no-untyped-def]
    """The entry a request from firewall B on up1 left (three packets seen)."""
    return Entry(Key(request), **{"mac": MAC_FW_B, "iface": "up1", "packets": 3} | kw)


def followed(desc: str, request: Packet, reply: Packet, **kw) -> Case:  # type: ignore[no-untyped-def]
    """A row: B moved to C, the reply goes to C and the entry now says C."""
    return Case(
        desc,
        VMPORT,
        "vm1",
        reply,
        setup=(entry(request),),
        settings=MOVED,
        iface_flags=FOLLOW,
        moved=B_TO_C,
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=kw.pop("output", bridged(reply, dst=MAC_FW_C)),
        after=(entry(request, mac=MAC_FW_C, replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1, ("vm1", C.HOP_FOLLOWED): 1},
        **kw,
    )


def unmoved(desc: str, **kw) -> Case:  # type: ignore[no-untyped-def]
    """A row: the record does not apply, the reply goes to B as ever."""
    return Case(
        desc,
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(entry(tcp4_request()),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply()),
        after=(entry(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
        **{"settings": MOVED, "iface_flags": FOLLOW, "moved": B_TO_C} | kw,
    )


CASES = [
    followed("TCP v4 reply of moved B goes to C; the entry follows", tcp4_request(), tcp4_reply()),
    followed("TCP v6 the same", tcp6_request(), tcp6_reply()),
    followed(
        "routed host: source MAC the uplink's, TTL - 1, to C",
        tcp4_request(),
        tcp4_reply(),
        routed=True,
        output=routed(tcp4_reply(), dst=MAC_FW_C),
    ),
    unmoved("F_SET_HOPS_MOVED clear: the record is not looked at", settings=0),
    unmoved("the uplink does not follow fail-over: the record is ignored", iface_flags=()),
    unmoved("a record of another MAC changes nothing", moved=(("up1", MAC_FW_A, MAC_FW_C),)),
    unmoved(
        "a record of the same MAC on another uplink changes nothing",
        iface_flags=FOLLOW + (("up2", abi.F_IFACE_FOLLOW_MOVES),),
        moved=(("up2", MAC_FW_B, MAC_FW_C),),
    ),
    Case(
        "the uplink's link is down: the entry follows, the reply takes routing",
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(entry(tcp4_request()),),
        settings=MOVED,
        iface_flags=(("up1", abi.F_IFACE_FOLLOW_MOVES | abi.F_IFACE_LINK_DOWN),),
        moved=B_TO_C,
        after=(entry(tcp4_request(), mac=MAC_FW_C),),
        counters={("vm1", C.HOP_DOWN): 1, ("vm1", C.HOP_FOLLOWED): 1},
    ),
]


# The host's neighbour entry for B's address failed (lasthop.neighwatch): a
# HOP_UNREACHABLE record for (up1, B). Its replies take routing, counted; the
# entry keeps B, to be used again when the record goes.
CASES += [
    Case(
        "B does not answer: the reply takes routing, counted; the entry keeps B",
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(entry(tcp4_request()),),
        settings=MOVED,
        iface_flags=FOLLOW,
        unreachable=(("up1", MAC_FW_B),),
        counters={("vm1", C.HOP_UNREACHABLE): 1},
    ),
    Case(
        "v6 the same",
        VMPORT,
        "vm1",
        tcp6_reply(),
        setup=(entry(tcp6_request()),),
        settings=MOVED,
        iface_flags=FOLLOW,
        unreachable=(("up1", MAC_FW_B),),
        counters={("vm1", C.HOP_UNREACHABLE): 1},
    ),
    unmoved(
        "an unreachable record of another MAC changes nothing",
        moved=(),
        unreachable=(("up1", MAC_FW_A),),
    ),
    unmoved(
        "an unreachable record on an uplink that does not follow: ignored",
        moved=(),
        iface_flags=(),
        unreachable=(("up1", MAC_FW_B),),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_failover(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    check(dp, case)


def test_a_second_reply_needs_no_record(dp) -> None:  # type: ignore[no-untyped-def]
    """After the first reply the entry holds C: with the record gone, the next goes to C too."""
    case = CASES[0]
    check(dp, case)
    dp.hop_moved.delete(next(iter(dp.hop_moved.keys())))
    run = dp.run(VMPORT, bytes(tcp4_reply()), "vm1")
    assert run.retval == TC_ACT_REDIRECT
    assert run.data == bytes(bridged(tcp4_reply(), dst=MAC_FW_C))
