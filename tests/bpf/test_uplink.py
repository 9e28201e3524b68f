"""lh_uplink: what a request arriving on an uplink teaches the table.

Every row runs on a reset data path and checks the verdict, the frame (an
uplink never changes a request it only learns from), the counter deltas and
the whole table afterwards.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import Dot1Q
from scapy.packet import Raw

from lasthop import abi
from packets import (
    IP6_CLIENT_B,
    IP6_VM_1,
    IP_CLIENT_B,
    IP_VM_1,
    IP_VM_2,
    MAC_BROADCAST,
    MAC_FW_B,
    MAC_FW_C,
    MAC_UPLINK_1,
    MAC_VM_1,
    MAC_VM_2,
    MAC_VMPORT_1,
    PORT_CLIENT,
    PORT_DNS,
    PORT_HTTP,
    VLAN_C,
    VLAN_OTHER,
    VLAN_PCP,
    VLAN_S,
    dot1ad,
    dot1q,
    echo4_request,
    echo6_request,
    eth,
    l3,
    tci,
    tcp4_reply,
    tcp4_request,
    tcp6_request,
    udp4_request,
    udp6_request,
)

from .harness import (
    PENDING,
    SLOT0,
    TC_ACT_REDIRECT,
    UPLINK,
    Case,
    Entry,
    Key,
    check,
    ids,
    routed,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter
TC = abi.TableCounter
ST = abi.State
HOP = abi.F_ENTRY_HOP_KNOWN
AD = abi.F_ENTRY_OUTER_8021AD


def learned(frame, state: abi.State, **kw) -> Entry:  # type: ignore[no-untyped-def]
    """The entry a first request from firewall B on up1 creates: pending, in
    the state its first packet sets."""
    return Entry(
        Key(frame, zone=kw.pop("zone", 0)),
        mac=kw.pop("mac", MAC_FW_B),
        iface=kw.pop("iface", "up1"),
        seen="now",
        state=state,
        table=PENDING,
        **kw,
    )


LEARNED = {("up1", C.LEARNED): 1}
INSERTED = {TC.PENDING_INSERTED: 1}


def learn(desc: str, frame, state: abi.State, **kw) -> Case:  # type: ignore[no-untyped-def]
    """A row: the frame arrives on up1 with an empty table and is learned, pending."""
    return Case(
        desc,
        UPLINK,
        "up1",
        frame,
        after=(learned(frame, state),),
        counters=kw.pop("counters", LEARNED),
        table_counters=INSERTED,
        **kw,
    )


SYN = ST.TCP_SYN_SENT
REQ4 = tcp4_request("A")
KNOWN = Entry(
    Key(REQ4), mac=MAC_FW_B, iface="up1", packets=5, state=ST.TCP_ESTABLISHED
)  # an established connection, confirmed

LEARNING = [
    learn("TCP v4 SYN from firewall B is learned, SYN sent", tcp4_request("S"), ST.TCP_SYN_SENT),
    learn("TCP v6 SYN is learned, SYN sent", tcp6_request("S"), ST.TCP_SYN_SENT),
    learn("UDP v4 is learned, new", udp4_request(), ST.UDP_NEW),
    learn("UDP v6 is learned, new", udp6_request(), ST.UDP_NEW),
    learn("ICMP echo request v4 is learned by identifier", echo4_request(), ST.ICMP_NEW),
    learn("ICMPv6 echo request is learned by identifier", echo6_request(), ST.ICMP_NEW),
    learn(
        "a mid-stream TCP segment (no SYN) is learned: the agent may start late",
        REQ4,
        ST.TCP_MIDSTREAM,
    ),
    Case(
        "a request on the second uplink is learned there",
        UPLINK,
        "up2",
        tcp4_request(),
        after=(learned(tcp4_request(), SYN, iface="up2"),),
        counters={("up2", C.LEARNED): 1},
        table_counters=INSERTED,
    ),
    Case(
        "the uplink's zone is part of the key",
        UPLINK,
        "up1",
        tcp4_request(),
        zones=(("up1", 7),),
        after=(learned(tcp4_request(), SYN, zone=7),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
    Case(
        "an 802.1Q tag is learned with its priority",
        UPLINK,
        "up1",
        tcp4_request(vlans=(dot1q(),)),
        after=(learned(tcp4_request(), SYN, vlans=(tci(VLAN_C),)),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
    Case(
        "the DEI bit of a tag is kept",
        UPLINK,
        "up1",
        tcp4_request(vlans=(Dot1Q(prio=VLAN_PCP, dei=1, vlan=VLAN_C),)),
        after=(learned(tcp4_request(), SYN, vlans=(tci(VLAN_C) | 1 << 12,)),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
    Case(
        "QinQ: 802.1ad outer and 802.1Q inner tags are learned, outer first",
        UPLINK,
        "up1",
        tcp4_request(vlans=(dot1ad(), dot1q())),
        after=(learned(tcp4_request(), SYN, vlans=(tci(VLAN_S), tci(VLAN_C)), flags=HOP | AD),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
    Case(
        "two 802.1Q tags are learned without the 802.1ad flag",
        UPLINK,
        "up1",
        tcp6_request(vlans=(dot1q(VLAN_S), dot1q(VLAN_C))),
        after=(learned(tcp6_request(), SYN, vlans=(tci(VLAN_S), tci(VLAN_C))),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
    Case(
        "IPv4 with options is learned and the options counted",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1, options=b"\x94\x04\x00\x00")
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="S"),
        after=(learned(tcp4_request(), SYN),),
        table_counters=INSERTED,
        counters={("up1", C.LEARNED): 1, ("up1", C.IP_OPTIONS): 1},
    ),
    Case(
        "IPv6 hop-by-hop, destination options and routing headers are skipped",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting()
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP),
        after=(learned(tcp6_request(), SYN),),
        table_counters=INSERTED,
        counters={("up1", C.LEARNED): 1, ("up1", C.IPV6_EXT): 1},
    ),
    learn(
        "IPv6 AH is skipped: the key's protocol is the one after it",
        eth(MAC_FW_B, MAC_VM_1)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1)
        / AH(nh=6, payloadlen=4, spi=7, seq=1, icv=bytes(12))
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="S"),
        SYN,
        counters={("up1", C.LEARNED): 1, ("up1", C.IPV6_EXT): 1},
    ),
    learn(
        "IPv6 segment routing header is skipped: the key's protocol is the one after it",
        eth(MAC_FW_B, MAC_VM_1)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1)
        / IPv6ExtHdrSegmentRouting(addresses=[IP6_VM_1])
        / UDP(sport=PORT_CLIENT, dport=PORT_DNS),
        ST.UDP_NEW,
        counters={("up1", C.LEARNED): 1, ("up1", C.IPV6_EXT): 1},
    ),
    learn(
        "lenient: an IPv4 header checksum is not checked (the kernel checks it after tc)",
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1, chksum=0xBAD)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="S"),
        SYN,
    ),
    learn(
        "a protocol without ports (GRE) is learned with ports 0",
        eth(MAC_FW_B, MAC_VM_1) / IP(src=IP_CLIENT_B, dst=IP_VM_1, proto=47) / Raw(bytes(8)),
        ST.UDP_NEW,
    ),
    Case(
        "BIG TCP: a GRO packet with IPv4 total length 0 runs to the frame's end",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1, len=0)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="A")
        / Raw(bytes(1448 * 2)),
        gso_size=1448,
        after=(learned(tcp4_request(), ST.TCP_MIDSTREAM),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
    Case(
        "IPv4 total length 0 on a frame that is no GSO packet is malformed",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1, len=0)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="A")
        / Raw(bytes(100)),
        counters={("up1", C.MALFORMED): 1},
    ),
    Case(
        "BIG TCP: a GRO packet with IPv6 payload length 0 runs to the frame's end",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1, plen=0)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="A")
        / Raw(bytes(1448 * 2)),
        gso_size=1448,
        after=(learned(tcp6_request(), ST.TCP_MIDSTREAM),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
    Case(
        "IPv6 payload length 0 on a frame that is no GSO packet is malformed (no wire jumbograms)",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1, plen=0)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="A")
        / Raw(bytes(100)),
        counters={("up1", C.MALFORMED): 1},
    ),
    Case(
        "Ethernet padding after the IPv4 total length is ignored",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1, len=40)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="S")
        / Raw(bytes(6)),
        after=(learned(tcp4_request(), SYN),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
]

REFRESH = [
    Case(
        "a known connection's request refreshes last_seen and counts a packet",
        UPLINK,
        "up1",
        REQ4,
        setup=(KNOWN,),
        after=(KNOWN.but(packets=6, seen="now"),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "a SYN from a new MAC re-learns, even with relearn = first",
        UPLINK,
        "up1",
        tcp4_request("S", src_mac=MAC_FW_C),
        setup=(KNOWN,),
        settings=abi.F_SET_RELEARN_FIRST,
        after=(KNOWN.but(mac=MAC_FW_C, packets=6, seen="now"),),
        counters={("up1", C.RELEARNED): 1},
    ),
    Case(
        "relearn = latest (default): a segment from a new MAC re-learns",
        UPLINK,
        "up1",
        tcp4_request("A", src_mac=MAC_FW_C),
        setup=(KNOWN,),
        after=(KNOWN.but(mac=MAC_FW_C, packets=6, seen="now"),),
        counters={("up1", C.RELEARNED): 1},
    ),
    Case(
        "relearn = first: a segment from a new MAC keeps the first hop",
        UPLINK,
        "up1",
        tcp4_request("A", src_mac=MAC_FW_C),
        setup=(KNOWN,),
        settings=abi.F_SET_RELEARN_FIRST,
        after=(KNOWN.but(packets=6, seen="now"),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "relearn = first: a SYN-ACK is no new connection and does not re-learn",
        UPLINK,
        "up1",
        tcp4_request("SA", src_mac=MAC_FW_C),
        setup=(KNOWN,),
        settings=abi.F_SET_RELEARN_FIRST,
        after=(KNOWN.but(packets=6, seen="now"),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "the same MAC on another uplink re-learns the uplink",
        UPLINK,
        "up2",
        REQ4,
        setup=(KNOWN,),
        after=(KNOWN.but(iface="up2", packets=6, seen="now"),),
        counters={("up2", C.RELEARNED): 1},
    ),
    Case(
        "a new VLAN re-learns the tags",
        UPLINK,
        "up1",
        tcp4_request("A", vlans=(dot1q(VLAN_OTHER),)),
        setup=(KNOWN.but(vlans=(tci(VLAN_C),)),),
        after=(KNOWN.but(vlans=(tci(VLAN_OTHER),), packets=6, seen="now"),),
        counters={("up1", C.RELEARNED): 1},
    ),
    Case(
        "QinQ to a single tag: the 802.1ad flag is cleared",
        UPLINK,
        "up1",
        tcp4_request("A", vlans=(dot1q(VLAN_C),)),
        setup=(KNOWN.but(vlans=(tci(VLAN_S), tci(VLAN_C)), flags=HOP | AD),),
        after=(KNOWN.but(vlans=(tci(VLAN_C),), packets=6, seen="now"),),
        counters={("up1", C.RELEARNED): 1},
    ),
    Case(
        "untagged after tagged re-learns no tags",
        UPLINK,
        "up1",
        REQ4,
        setup=(KNOWN.but(vlans=(tci(VLAN_C),)),),
        after=(KNOWN.but(packets=6, seen="now"),),
        counters={("up1", C.RELEARNED): 1},
    ),
    Case(
        "the zone keeps connections apart: same 5-tuple, other zone, new entry",
        UPLINK,
        "up1",
        REQ4,
        zones=(("up1", 7),),
        setup=(KNOWN,),
        after=(KNOWN, learned(REQ4, ST.TCP_MIDSTREAM, zone=7)),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
]

NOT_LEARNED = [
    Case(
        "an interface the agent did not configure: passed, counted in slot 0",
        UPLINK,
        "spare",
        tcp4_request(),
        counters={(SLOT0, C.NO_IFACE): 1},
    ),
    Case(
        "lh_uplink on a VM port (role mismatch): passed, counted in slot 0",
        UPLINK,
        "vm1",
        tcp4_request(),
        counters={(SLOT0, C.NO_IFACE): 1},
    ),
    Case(
        "a broadcast frame is not a request",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_BROADCAST) / l3(udp4_request()),
        counters={("up1", C.NOT_UNICAST): 1},
    ),
    Case(
        "a multicast frame is not a request",
        UPLINK,
        "up1",
        eth(MAC_FW_B, "01:00:5e:00:00:fb") / l3(udp4_request()),
        counters={("up1", C.NOT_UNICAST): 1},
    ),
    Case(
        "an ICMP error from outside is no connection",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / ICMP(type="dest-unreach", code="port-unreachable")
        / l3(tcp4_reply()),
        counters={("up1", C.ICMP_ERROR_MISS): 1},
    ),
    Case(
        "neighbour discovery is no connection",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1) / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1) / ICMPv6ND_NS(tgt=IP6_VM_1),
        counters={("up1", C.ICMP_OTHER): 1},
    ),
    Case(
        "an ICMP timestamp request is no connection",
        UPLINK,
        "up1",
        eth(MAC_FW_B, MAC_VM_1) / IP(src=IP_CLIENT_B, dst=IP_VM_1) / ICMP(type="timestamp-request"),
        counters={("up1", C.ICMP_OTHER): 1},
    ),
]

VM_ORIGIN = [
    Case(
        "the first uplink packet of a VM-opened connection learns its hop and goes to the VM",
        UPLINK,
        "up1",
        tcp4_request("SA"),
        setup=(
            Entry(
                Key(tcp4_request("SA")),
                flags=abi.F_ENTRY_VM_ORIGIN,
                packets=0,
                vm="vm1",
                state=SYN,
                table=PENDING,
            ),
        ),
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="vm1",
        after=(
            Entry(
                Key(tcp4_request("SA")),
                mac=MAC_FW_B,
                iface="up1",
                flags=abi.F_ENTRY_VM_ORIGIN | HOP,
                packets=1,
                vm="vm1",
                seen="now",
                state=ST.TCP_SYN_RECV,
                seq=1001,
                table=PENDING,
            ),
        ),
        counters={("up1", C.VM_ORIGIN_HOP): 1, ("up1", C.VM_ORIGIN_RETURNED): 1},
        table_counters={TC.STATE_CHANGES: 1},
    ),
]


FAST = abi.F_SET_FAST_PATH
BOUND = Entry(
    Key(tcp4_request()),
    mac=MAC_FW_B,
    iface="up1",
    flags=HOP | abi.F_ENTRY_VM_FAST,
    packets=3,
    vm="vm1",
    state=ST.TCP_ESTABLISHED,
)

FAST_PATH = [
    Case(
        "fast path: a request of a bound connection goes straight to its VM's port",
        UPLINK,
        "up1",
        tcp4_request("A"),
        setup=(BOUND,),
        settings=FAST,
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="vm1",
        after=(BOUND.but(packets=4, seen="now"),),
        counters={("up1", C.REFRESHED): 1, ("up1", C.FAST_TO_VM): 1},
    ),
    Case(
        "fast path: a frame for another guest's MAC unbinds and crosses the bridge",
        UPLINK,
        "up1",
        tcp4_request("A"),
        setup=(BOUND,),
        settings=FAST,
        vm_macs=(("vm1", MAC_VM_2),),
        after=(BOUND.but(packets=4, seen="now", vm=None, flags=HOP),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "fast path turned off: the binding is dropped, the bridge forwards",
        UPLINK,
        "up1",
        tcp4_request("A"),
        setup=(BOUND,),
        vm_macs=(("vm1", MAC_VM_1),),
        after=(BOUND.but(packets=4, seen="now", vm=None, flags=HOP),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "fast path: a port that is no VM port any more unbinds",
        UPLINK,
        "up1",
        tcp4_request("A"),
        setup=(BOUND,),
        settings=FAST,
        roles=(("vm1", abi.Role.NONE),),
        after=(BOUND.but(packets=4, seen="now", vm=None, flags=HOP),),
        counters={("up1", C.REFRESHED): 1},
    ),
]

# A routed host: requests come addressed to the uplink, and leave to the VM
# with the VM port's MAC as source and TTL - 1, as the kernel would route them.
ROUTED_REQUEST = eth(MAC_FW_B, MAC_UPLINK_1) / l3(tcp4_request("A"))
ROUTED_TTL_1 = (
    eth(MAC_FW_B, MAC_UPLINK_1)
    / IP(src=IP_CLIENT_B, dst=IP_VM_1, ttl=1)
    / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="A", seq=1000)
)
ROUTED_BIG = ROUTED_REQUEST / Raw(bytes(1600))  # beyond vm1's 1500-byte MTU
# GRO-merged, 1510-byte segments. (Test run sets no gso_type, so only "too
# big" can be modelled here; segments that fit are shown by the PMTU lab test.)
ROUTED_GRO = ROUTED_REQUEST / Raw(bytes(1470 * 2))

# A routed shortcut bound by the VM's answer (VM_NEIGH): its first request
# checks that the host's neighbour for the address is the port's guest
#
#   fw B ── up1 ── lh_uplink: entry (VM_FAST | VM_NEIGH, vm1) ── bpf_fib_lookup(IP_VM_1)
#                     │ neighbour = vm1's guest: redirect, check done (VM_NEIGH cleared)
#                     └ another MAC, or none: unbind, the kernel routes it
UNCHECKED = BOUND.but(flags=HOP | abi.F_ENTRY_VM_FAST | abi.F_ENTRY_VM_NEIGH)
# a connection to an address the test host has no route or neighbour for
ROUTED_NO_NEIGH = (
    eth(MAC_FW_B, MAC_UPLINK_1)
    / IP(src=IP_CLIENT_B, dst=IP_VM_2)
    / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="A", seq=1000)
)
UNCHECKED_NO_NEIGH = Entry(
    Key(ROUTED_NO_NEIGH),
    mac=MAC_FW_B,
    iface="up1",
    flags=HOP | abi.F_ENTRY_VM_FAST | abi.F_ENTRY_VM_NEIGH,
    packets=3,
    vm="vm1",
    state=ST.TCP_ESTABLISHED,
)

ROUTED_FAST_PATH = [
    Case(
        "routed fast path: a request to the uplink goes straight to the VM, routed",
        UPLINK,
        "up1",
        ROUTED_REQUEST,
        setup=(BOUND,),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="vm1",
        output=routed(ROUTED_REQUEST, src=MAC_VMPORT_1, dst=MAC_VM_1),
        after=(BOUND.but(packets=4, seen="now"),),
        counters={("up1", C.REFRESHED): 1, ("up1", C.FAST_TO_VM): 1},
    ),
    Case(
        "routed fast path: the shortcut's first request finds the host's neighbour for the "
        "address is the port's guest: straight to the VM, the check done",
        UPLINK,
        "up1",
        ROUTED_REQUEST,
        setup=(UNCHECKED,),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="vm1",
        output=routed(ROUTED_REQUEST, src=MAC_VMPORT_1, dst=MAC_VM_1),
        after=(BOUND.but(packets=4, seen="now"),),
        counters={("up1", C.REFRESHED): 1, ("up1", C.FAST_TO_VM): 1},
    ),
    Case(
        "routed fast path: the shortcut's first request finds the host's neighbour is "
        "another guest (spoofed answer, or the neighbour changed): unbinds and is routed",
        UPLINK,
        "up1",
        ROUTED_REQUEST,
        setup=(UNCHECKED,),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_2),),
        after=(BOUND.but(packets=4, seen="now", vm=None, flags=HOP),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "routed fast path: the shortcut's first request finds no neighbour for the address "
        "(failed, or none): unbinds and is routed",
        UPLINK,
        "up1",
        ROUTED_NO_NEIGH,
        setup=(UNCHECKED_NO_NEIGH,),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        after=(UNCHECKED_NO_NEIGH.but(packets=4, seen="now", vm=None, flags=HOP),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "routed fast path: an unchecked shortcut's frame too big for the VM's link is left "
        "to the kernel, the check still to come",
        UPLINK,
        "up1",
        ROUTED_BIG,
        setup=(UNCHECKED,),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        after=(UNCHECKED.but(packets=4, seen="now"),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "routed fast path: a frame not addressed to the uplink unbinds and is routed",
        UPLINK,
        "up1",
        tcp4_request("A"),
        setup=(BOUND,),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        after=(BOUND.but(packets=4, seen="now", vm=None, flags=HOP),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "routed fast path: TTL 1 is left to the kernel (time exceeded); the binding stays",
        UPLINK,
        "up1",
        ROUTED_TTL_1,
        setup=(BOUND,),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        after=(BOUND.but(packets=4, seen="now"),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "routed fast path: too big for the VM's link is left to the kernel (PMTU); "
        "the binding stays",
        UPLINK,
        "up1",
        ROUTED_BIG,
        setup=(BOUND,),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        after=(BOUND.but(packets=4, seen="now"),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "routed fast path: a GRO-merged frame whose segments are too big for the VM's "
        "link is left to the kernel",
        UPLINK,
        "up1",
        ROUTED_GRO,
        gso_size=1470,
        setup=(BOUND,),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        after=(BOUND.but(packets=4, seen="now"),),
        counters={("up1", C.REFRESHED): 1},
    ),
]

# allow_last_hops / deny_last_hops (F_IFACE_HOPS_*, lh_hops): a MAC the uplink's list
# refuses neither opens a connection nor takes one over; it is counted with its MAC
ALLOW, DENY = abi.F_IFACE_HOPS_ALLOW, abi.F_IFACE_HOPS_DENY
TRUSTED_HOPS = [
    Case(
        "allow-list: a listed firewall's SYN is learned",
        UPLINK,
        "up1",
        tcp4_request("S"),
        iface_flags=(("up1", ALLOW),),
        hops=(("up1", MAC_FW_B),),
        after=(learned(tcp4_request("S"), ST.TCP_SYN_SENT),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
    Case(
        "allow-list: another MAC's SYN is not learned, counted with its MAC",
        UPLINK,
        "up1",
        tcp4_request("S", src_mac=MAC_FW_C),
        iface_flags=(("up1", ALLOW),),
        hops=(("up1", MAC_FW_B),),
        counters={("up1", C.HOP_UNTRUSTED): 1},
        refused={("up1", MAC_FW_C): 1},
    ),
    Case(
        "allow-list: an unlisted MAC cannot take over a known connection",
        UPLINK,
        "up1",
        tcp4_request("A", src_mac=MAC_FW_C),
        setup=(KNOWN,),
        iface_flags=(("up1", ALLOW),),
        hops=(("up1", MAC_FW_B),),
        counters={("up1", C.HOP_UNTRUSTED): 1},
        refused={("up1", MAC_FW_C): 1},
    ),
    Case(
        "allow-list of another uplink lists nothing here",
        UPLINK,
        "up1",
        tcp4_request("S"),
        iface_flags=(("up1", ALLOW),),
        hops=(("up2", MAC_FW_B),),
        counters={("up1", C.HOP_UNTRUSTED): 1},
        refused={("up1", MAC_FW_B): 1},
    ),
    Case(
        "deny-list: a listed MAC is not learned (IPv6)",
        UPLINK,
        "up1",
        tcp6_request("S", src_mac=MAC_FW_C),
        iface_flags=(("up1", DENY),),
        hops=(("up1", MAC_FW_C),),
        counters={("up1", C.HOP_UNTRUSTED): 1},
        refused={("up1", MAC_FW_C): 1},
    ),
    Case(
        "deny-list: any other MAC is learned",
        UPLINK,
        "up1",
        tcp6_request("S"),
        iface_flags=(("up1", DENY),),
        hops=(("up1", MAC_FW_C),),
        after=(learned(tcp6_request("S"), ST.TCP_SYN_SENT),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
    Case(
        "no list: lh_hops entries for the uplink change nothing",
        UPLINK,
        "up1",
        tcp4_request("S", src_mac=MAC_FW_C),
        hops=(("up1", MAC_FW_B),),
        after=(learned(tcp4_request("S"), ST.TCP_SYN_SENT, mac=MAC_FW_C),),
        counters=LEARNED,
        table_counters=INSERTED,
    ),
]

ALL = LEARNING + REFRESH + NOT_LEARNED + VM_ORIGIN + FAST_PATH + ROUTED_FAST_PATH + TRUSTED_HOPS


def test_refused_macs_are_counted_per_mac(dp) -> None:  # type: ignore[no-untyped-def]
    """Three frames from one refused MAC and one from another: two rows, exact counts."""
    dp.reset()
    dp.configure("up1", flags=ALLOW)
    dp.list_hop("up1", MAC_FW_B)
    for mac in (MAC_FW_C, MAC_FW_C, MAC_FW_C, MAC_VM_2):
        dp.run(UPLINK, bytes(tcp4_request("S", src_mac=mac)), "up1")
    assert dp.refused_rows() == {("up1", MAC_FW_C): 3, ("up1", MAC_VM_2): 1}
    assert dp.table() == {}


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_uplink(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    check(dp, case)
