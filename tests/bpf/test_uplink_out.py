"""lh_uplink_out (uplink egress): ICMP errors the host itself sends about a
connection follow that connection's last hop; everything else leaves as it is.

A routed host whose VM link is narrower answers a client's big packet with
"fragmentation needed" (v4) or "packet too big" (v6), routed by the host's
own table to its default gateway -- the wrong firewall, which drops it, and
path-MTU discovery breaks. These rows show the data path sending it back the
way the connection came."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lasthop import abi
from packets import (
    IP6_CLIENT_B,
    IP6_ROUTER,
    IP_CLIENT_B,
    IP_ROUTER,
    MAC_FW_A,
    MAC_FW_B,
    MAC_FW_C,
    MAC_UPLINK_1,
    MAC_UPLINK_2,
    dot1q,
    eth,
    l3,
    tcp4_reply,
    tcp4_request,
    tcp6_request,
)

from .harness import TC_ACT_REDIRECT, Case, Entry, Key, check, ids

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

UPLINK_OUT = "lh_uplink_out"
C = abi.Counter
HOP = abi.F_ENTRY_HOP_KNOWN
FRAG_NEEDED = {"type": "dest-unreach", "code": "fragmentation-needed", "nexthopmtu": 1400}


def learned(request: Packet, iface: str = "up1", **kw) -> Entry:  # type: ignore[no-untyped-def]
    """The entry the request from firewall B left on *iface*."""
    return Entry(Key(request), mac=MAC_FW_B, iface=iface, packets=1, **kw)


def host_frag_needed(quoted: Packet, src_mac: str = MAC_UPLINK_1) -> Packet:
    """The host's "fragmentation needed" to the client, addressed by its own
    routing to its default gateway, firewall A."""
    return (
        eth(src_mac, MAC_FW_A)
        / IP(src=IP_ROUTER, dst=IP_CLIENT_B)
        / ICMP(**FRAG_NEEDED)
        / l3(quoted)
    )


def host_too_big(quoted: Packet) -> Packet:
    return (
        eth(MAC_UPLINK_1, MAC_FW_A)
        / IPv6(src=IP6_ROUTER, dst=IP6_CLIENT_B)
        / ICMPv6PacketTooBig(mtu=1280)
        / l3(quoted)
    )


def to(frame: Packet, dst: str, src: str | None = None) -> Packet:
    out = Ether(bytes(frame))
    out.dst = dst
    if src:
        out.src = src
    return out


CASES = [
    Case(
        "v4 fragmentation needed about a known request goes to its firewall, same uplink",
        UPLINK_OUT,
        "up1",
        host_frag_needed(tcp4_request("A")),
        setup=(learned(tcp4_request()),),
        output=to(host_frag_needed(tcp4_request("A")), MAC_FW_B),
        counters={("up1", C.HOST_ICMP_REDIRECTED): 1},
    ),
    Case(
        "v6 packet too big about a known request goes to its firewall",
        UPLINK_OUT,
        "up1",
        host_too_big(tcp6_request("A")),
        setup=(learned(tcp6_request()),),
        output=to(host_too_big(tcp6_request("A")), MAC_FW_B),
        counters={("up1", C.HOST_ICMP_REDIRECTED): 1},
    ),
    Case(
        "a connection that came in on the other uplink: redirected there, with its MAC",
        UPLINK_OUT,
        "up1",
        host_frag_needed(tcp4_request("A")),
        setup=(learned(tcp4_request(), iface="up2"),),
        verdict=TC_ACT_REDIRECT,
        redirect="up2",
        output=to(host_frag_needed(tcp4_request("A")), MAC_FW_B, MAC_UPLINK_2),
        counters={("up1", C.HOST_ICMP_REDIRECTED): 1},
    ),
    Case(
        "about no known connection: left as routed, counted",
        UPLINK_OUT,
        "up1",
        host_frag_needed(tcp4_request("A")),
        counters={("up1", C.HOST_ICMP_MISS): 1},
    ),
    Case(
        "about a VLAN-tagged connection: left as routed, counted",
        UPLINK_OUT,
        "up1",
        host_frag_needed(tcp4_request("A")),
        setup=(learned(tcp4_request(), vlans=(100,)),),
        counters={("up1", C.HOST_ICMP_TAGGED): 1},
    ),
    Case(
        "a TCP reply leaving the uplink is not looked at",
        UPLINK_OUT,
        "up1",
        tcp4_reply(),
        setup=(learned(tcp4_request()),),
    ),
    Case(
        "an echo reply the host sends is no error: untouched, uncounted",
        UPLINK_OUT,
        "up1",
        eth(MAC_UPLINK_1, MAC_FW_A) / IP(src=IP_ROUTER, dst=IP_CLIENT_B) / ICMP(type="echo-reply"),
        setup=(learned(tcp4_request()),),
    ),
    Case(
        "a tagged frame is not looked at",
        UPLINK_OUT,
        "up1",
        eth(MAC_UPLINK_1, MAC_FW_A, (dot1q(),)) / l3(host_frag_needed(tcp4_request("A"))),
        setup=(learned(tcp4_request()),),
    ),
    Case(
        "on an interface that is no uplink: untouched, uncounted",
        UPLINK_OUT,
        "vm1",
        host_frag_needed(tcp4_request("A")),
        setup=(learned(tcp4_request()),),
    ),
]


FOLLOW = (("up1", abi.F_IFACE_FOLLOW_MOVES),)

# The host's own errors follow a fail-over as a VM's replies do (failover.h):
# firewall B's address moved to C, or B no longer answers.
CASES += [
    Case(
        "B moved to C: the host's error goes to C and the entry follows",
        UPLINK_OUT,
        "up1",
        host_frag_needed(tcp4_request("A")),
        setup=(learned(tcp4_request()),),
        settings=abi.F_SET_HOPS_MOVED,
        iface_flags=FOLLOW,
        moved=(("up1", MAC_FW_B, MAC_FW_C),),
        output=to(host_frag_needed(tcp4_request("A")), MAC_FW_C),
        after=(Entry(Key(tcp4_request()), mac=MAC_FW_C, iface="up1", packets=1),),
        counters={("up1", C.HOST_ICMP_REDIRECTED): 1, ("up1", C.HOP_FOLLOWED): 1},
    ),
    Case(
        "B does not answer: the host's error is left as routed, counted",
        UPLINK_OUT,
        "up1",
        host_frag_needed(tcp4_request("A")),
        setup=(learned(tcp4_request()),),
        settings=abi.F_SET_HOPS_MOVED,
        iface_flags=FOLLOW,
        unreachable=(("up1", MAC_FW_B),),
        counters={("up1", C.HOP_UNREACHABLE): 1},
    ),
    Case(
        "B moved, but F_SET_HOPS_MOVED is clear: the record is not looked at",
        UPLINK_OUT,
        "up1",
        host_frag_needed(tcp4_request("A")),
        setup=(learned(tcp4_request()),),
        iface_flags=FOLLOW,
        moved=(("up1", MAC_FW_B, MAC_FW_C),),
        output=to(host_frag_needed(tcp4_request("A")), MAC_FW_B),
        counters={("up1", C.HOST_ICMP_REDIRECTED): 1},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_uplink_out(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    check(dp, case)
