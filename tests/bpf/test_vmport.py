"""lh_vmport: what a VM sends, sent back the way its connection came.

A reply whose connection is known leaves by the request's last hop: the
destination MAC becomes the last hop's (routed: the source MAC the uplink's,
TTL or hop limit minus one), tags are restored, and the frame is redirected
to the uplink. Everything else passes unchanged, counted.

VLAN tags: bpf_skb_vlan_push() puts the outermost tag into skb metadata,
which BPF_PROG_TEST_RUN does not return; what the run shows is the data,
where QinQ leaves the inner tag. test_veth.py checks the tags on the wire.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6ND_NS,
    ICMPv6ND_RS,
    ICMPv6PacketTooBig,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lasthop import abi
from packets import (
    ECHO_ID,
    ECHO_SEQ,
    IP6_CLIENT_B,
    IP6_VM_1,
    IP_CLIENT_B,
    IP_VM_1,
    MAC_FW_A,
    MAC_FW_B,
    MAC_UPLINK_2,
    MAC_VM_1,
    MAC_VM_2,
    MAC_VMPORT_1,
    PORT_CLIENT,
    PORT_HTTP,
    VLAN_C,
    VLAN_S,
    echo4_reply,
    echo4_request,
    echo6_reply,
    echo6_request,
    eth,
    l3,
    tci,
    tcp4_reply,
    tcp4_request,
    tcp6_reply,
    tcp6_request,
    udp4_reply,
    udp4_request,
    udp6_reply,
    udp6_request,
)

from .harness import (
    PENDING,
    SLOT0,
    TC_ACT_REDIRECT,
    VMPORT,
    Case,
    Entry,
    Key,
    bridged,
    check,
    ids,
    inner_tag,
    mac_bytes,
    routed,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter
TC = abi.TableCounter
ST = abi.State
HOP = abi.F_ENTRY_HOP_KNOWN
AD = abi.F_ENTRY_OUTER_8021AD


def reply_to(request: Packet, **kw) -> Entry:  # type: ignore[no-untyped-def]
    """The entry a request from firewall B on up1 left behind (three packets seen):
    confirmed, with no state (as carried over from a table without states), so
    these rows show the reply path alone; test_conntrack.py has the states."""
    return Entry(
        Key(request, zone=kw.pop("zone", 0)),
        mac=MAC_FW_B,
        iface=kw.pop("iface", "up1"),
        packets=3,
        **kw,
    )


def hit(desc: str, request: Packet, reply: Packet, **kw) -> Case:  # type: ignore[no-untyped-def]
    """A row: the reply finds its entry and goes to firewall B on up1, bridged."""
    entry = reply_to(request)
    return Case(
        desc,
        VMPORT,
        "vm1",
        reply,
        setup=(entry,),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(reply),
        after=(entry.but(replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
        **kw,
    )


def reply_with_checksum(want: int) -> Packet:
    """A routed v4 reply whose IP checksum is *want*, by choice of the IP id:
    the header's ones'-complement sum moves one for one with the id."""
    frame = tcp4_reply(dst_mac=MAC_VMPORT_1)
    frame[IP].id = 0
    total = ~Ether(bytes(frame))[IP].chksum & 0xFFFF
    frame[IP].id = ((~want & 0xFFFF) - total) % 0xFFFF
    assert Ether(bytes(frame))[IP].chksum == want
    return frame


# TTL - 1 adds 0x0100 to the checksum: from 0xfeff the sum folds to 0x0000
# (RFC 1624, as ip_decrease_ttl does); from 0xffxx it carries out of the top byte.
CHECKSUM_FOLD = reply_with_checksum(0xFEFF)
CHECKSUM_CARRY = reply_with_checksum(0xFF12)


def icmp4_error(kind: dict, quoted: Packet) -> Packet:  # type: ignore[type-arg]
    """An ICMP error VM 1 sends to the client about a packet it received."""
    return eth(MAC_VM_1, MAC_FW_A) / IP(src=IP_VM_1, dst=IP_CLIENT_B) / ICMP(**kind) / l3(quoted)


def icmp6_error(err: Packet, quoted: Packet) -> Packet:
    return eth(MAC_VM_1, MAC_FW_A) / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B) / err / l3(quoted)


PORT_UNREACH = {"type": "dest-unreach", "code": "port-unreachable"}
FRAG_NEEDED = {"type": "dest-unreach", "code": "fragmentation-needed", "nexthopmtu": 1400}
TIME_EXCEEDED = {"type": "time-exceeded", "code": 0}

HITS = [
    hit("TCP v4 reply goes to firewall B on up1", tcp4_request(), tcp4_reply()),
    hit("TCP v6 reply goes to firewall B", tcp6_request(), tcp6_reply()),
    hit("UDP v4 reply goes to firewall B", udp4_request(), udp4_reply()),
    hit("UDP v6 reply goes to firewall B", udp6_request(), udp6_reply()),
    hit("ICMP echo reply v4 follows its request by identifier", echo4_request(), echo4_reply()),
    hit("ICMPv6 echo reply follows its request by identifier", echo6_request(), echo6_reply()),
    Case(
        "a reply whose request came on up2 is redirected to up2",
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(reply_to(tcp4_request(), iface="up2"),),
        verdict=TC_ACT_REDIRECT,
        redirect="up2",
        output=bridged(tcp4_reply()),
        after=(reply_to(tcp4_request(), iface="up2", replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "the VM port's zone finds the entry of that zone",
        VMPORT,
        "vm1",
        tcp4_reply(),
        zones=(("vm1", 7),),
        setup=(reply_to(tcp4_request(), zone=7),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply()),
        after=(reply_to(tcp4_request(), zone=7, replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "IPv4 options on a reply are counted and the reply redirected",
        VMPORT,
        "vm1",
        eth(MAC_VM_1, MAC_FW_A)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B, options=b"\x94\x04\x00\x00")
        / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags="A"),
        setup=(reply_to(tcp4_request()),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(
            eth(MAC_VM_1, MAC_FW_A)
            / IP(src=IP_VM_1, dst=IP_CLIENT_B, options=b"\x94\x04\x00\x00")
            / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags="A")
        ),
        after=(reply_to(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1, ("vm1", C.IP_OPTIONS): 1},
    ),
]

ROUTED = [
    Case(
        "routed v4: source MAC := uplink's, TTL - 1, checksum still right",
        VMPORT,
        "vm1",
        tcp4_reply(dst_mac=MAC_VMPORT_1),
        routed=True,
        setup=(reply_to(tcp4_request()),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=routed(tcp4_reply(dst_mac=MAC_VMPORT_1)),
        after=(reply_to(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "routed v4: checksum 0xfeff folds to 0x0000",
        VMPORT,
        "vm1",
        CHECKSUM_FOLD,
        routed=True,
        setup=(reply_to(tcp4_request()),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=routed(CHECKSUM_FOLD),
        after=(reply_to(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "routed v4: checksum 0xff12 carries out of its top byte",
        VMPORT,
        "vm1",
        CHECKSUM_CARRY,
        routed=True,
        setup=(reply_to(tcp4_request()),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=routed(CHECKSUM_CARRY),
        after=(reply_to(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "routed v6: hop limit - 1",
        VMPORT,
        "vm1",
        tcp6_reply(dst_mac=MAC_VMPORT_1),
        routed=True,
        setup=(reply_to(tcp6_request()),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=routed(tcp6_reply(dst_mac=MAC_VMPORT_1)),
        after=(reply_to(tcp6_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "routed via up2: the source MAC is up2's",
        VMPORT,
        "vm1",
        udp4_reply(dst_mac=MAC_VMPORT_1),
        routed=True,
        setup=(reply_to(udp4_request(), iface="up2"),),
        verdict=TC_ACT_REDIRECT,
        redirect="up2",
        output=routed(udp4_reply(dst_mac=MAC_VMPORT_1), src=MAC_UPLINK_2),
        after=(reply_to(udp4_request(), iface="up2", replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "routed v4, TTL 1: left to the kernel (it sends time exceeded)",
        VMPORT,
        "vm1",
        tcp4_reply(dst_mac=MAC_VMPORT_1, ttl=1),
        routed=True,
        setup=(reply_to(tcp4_request()),),
        counters={("vm1", C.TTL_EXPIRED): 1},
    ),
    Case(
        "routed v4, TTL 0: left to the kernel",
        VMPORT,
        "vm1",
        tcp4_reply(dst_mac=MAC_VMPORT_1, ttl=0),
        routed=True,
        setup=(reply_to(tcp4_request()),),
        counters={("vm1", C.TTL_EXPIRED): 1},
    ),
    Case(
        "routed v6, hop limit 1: left to the kernel",
        VMPORT,
        "vm1",
        tcp6_reply(dst_mac=MAC_VMPORT_1, hlim=1),
        routed=True,
        setup=(reply_to(tcp6_request()),),
        counters={("vm1", C.TTL_EXPIRED): 1},
    ),
    Case(
        "bridged, TTL 1: only the MAC changes, nothing expires on a bridge",
        VMPORT,
        "vm1",
        tcp4_reply(ttl=1),
        setup=(reply_to(tcp4_request()),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply(ttl=1)),
        after=(reply_to(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
]

VLANS = [
    Case(
        "one 802.1Q tag: pushed into skb metadata, the data changes only its MAC",
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(reply_to(tcp4_request(), vlans=(tci(VLAN_C),)),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply()),
        after=(reply_to(tcp4_request(), vlans=(tci(VLAN_C),), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "QinQ: the inner 802.1Q tag is in the data, the outer in metadata",
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(reply_to(tcp4_request(), vlans=(tci(VLAN_S), tci(VLAN_C)), flags=HOP | AD),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=inner_tag(bridged(tcp4_reply()), tci(VLAN_C)),
        after=(
            reply_to(
                tcp4_request(),
                vlans=(tci(VLAN_S), tci(VLAN_C)),
                flags=HOP | AD,
                replies=1,
                seen="now",
            ),
        ),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "two 802.1Q tags v6: the inner tag is in the data",
        VMPORT,
        "vm1",
        tcp6_reply(),
        setup=(reply_to(tcp6_request(), vlans=(tci(VLAN_S), tci(VLAN_C))),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=inner_tag(bridged(tcp6_reply()), tci(VLAN_C)),
        after=(reply_to(tcp6_request(), vlans=(tci(VLAN_S), tci(VLAN_C)), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "routed QinQ: MACs, TTL and the inner tag",
        VMPORT,
        "vm1",
        tcp4_reply(dst_mac=MAC_VMPORT_1),
        routed=True,
        setup=(reply_to(tcp4_request(), vlans=(tci(VLAN_S), tci(VLAN_C)), flags=HOP | AD),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=inner_tag(routed(tcp4_reply(dst_mac=MAC_VMPORT_1)), tci(VLAN_C)),
        after=(
            reply_to(
                tcp4_request(),
                vlans=(tci(VLAN_S), tci(VLAN_C)),
                flags=HOP | AD,
                replies=1,
                seen="now",
            ),
        ),
        counters={("vm1", C.REDIRECTED): 1},
    ),
]


def icmp_hit(desc: str, request: Packet, error: Packet, **kw) -> Case:  # type: ignore[no-untyped-def]
    """A row: an ICMP error about request's connection goes to its last hop."""
    entry = reply_to(request)
    return Case(
        desc,
        VMPORT,
        "vm1",
        error,
        setup=(entry,),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=kw.pop("output", bridged(error)),
        after=(entry.but(replies=1, seen="now"),),
        counters={("vm1", C.ICMP_ERROR_REDIRECTED): 1},
        **kw,
    )


def icmp_miss(desc: str, error: Packet, setup: tuple[Entry, ...] = ()) -> Case:
    return Case(desc, VMPORT, "vm1", error, setup=setup, counters={("vm1", C.ICMP_ERROR_MISS): 1})


ICMP_ERRORS = [
    icmp_hit(
        "v4 port unreachable about a known UDP request follows its last hop",
        udp4_request(),
        icmp4_error(PORT_UNREACH, udp4_request()),
    ),
    icmp_hit(
        "v4 fragmentation needed about a known TCP request follows its last hop",
        tcp4_request("A"),
        icmp4_error(FRAG_NEEDED, tcp4_request("A")),
    ),
    icmp_hit(
        "v4 time exceeded about a known echo request follows its last hop",
        echo4_request(),
        icmp4_error(TIME_EXCEEDED, echo4_request()),
    ),
    icmp_hit(
        "v6 packet too big about a known TCP request follows its last hop",
        tcp6_request("A"),
        icmp6_error(ICMPv6PacketTooBig(mtu=1280), tcp6_request("A")),
    ),
    icmp_hit(
        "v6 destination unreachable about a known UDP request follows its last hop",
        udp6_request(),
        icmp6_error(ICMPv6DestUnreach(code=4), udp6_request()),
    ),
    icmp_hit(
        "routed: an ICMP error gets the uplink's MAC and TTL - 1 too",
        udp4_request(),
        icmp4_error(PORT_UNREACH, udp4_request()),
        routed=True,
        output=routed(icmp4_error(PORT_UNREACH, udp4_request())),
    ),
    icmp_miss(
        "v4 port unreachable about no known connection: passed",
        icmp4_error(PORT_UNREACH, udp4_request()),
    ),
    icmp_miss(
        "v6 packet too big about no known connection: passed",
        icmp6_error(ICMPv6PacketTooBig(mtu=1280), tcp6_request("A")),
    ),
    icmp_miss(
        "an error about another connection of the same hosts: passed",
        icmp4_error(PORT_UNREACH, udp4_request()),
        setup=(reply_to(tcp4_request()),),
    ),
    icmp_miss(
        "a quote shorter than 8 bytes of L4 header: passed",
        eth(MAC_VM_1, MAC_FW_A)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B)
        / ICMP(**PORT_UNREACH)
        / bytes(l3(udp4_request()))[:24],
        setup=(reply_to(udp4_request()),),
    ),
    icmp_miss(
        "an error whose quote lies in the Ethernet padding after its datagram: passed",
        eth(MAC_VM_1, MAC_FW_A)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B, len=20 + 8)
        / ICMP(**PORT_UNREACH)
        / l3(udp4_request()),
        setup=(reply_to(udp4_request()),),
    ),
    icmp_miss(
        "a v6 error whose quote lies in the Ethernet padding after its datagram: passed",
        eth(MAC_VM_1, MAC_FW_A)
        / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B, plen=8)
        / ICMPv6DestUnreach(code=4)
        / l3(udp6_request()),
        setup=(reply_to(udp6_request()),),
    ),
    icmp_miss(
        "an error whose quote's L4 bytes lie in the Ethernet padding: passed",
        eth(MAC_VM_1, MAC_FW_A)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B, len=20 + 8 + 20 + 4)
        / ICMP(**PORT_UNREACH)
        / l3(udp4_request()),
        setup=(reply_to(udp4_request()),),
    ),
    icmp_miss(
        "a quoted fragment (offset set): passed",
        eth(MAC_VM_1, MAC_FW_A)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B)
        / ICMP(**PORT_UNREACH)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1, frag=100, proto=17)
        / bytes(8),
        setup=(reply_to(udp4_request()),),
    ),
    Case(
        "ICMP other (timestamp) from a VM: passed",
        VMPORT,
        "vm1",
        eth(MAC_VM_1, MAC_FW_A) / IP(src=IP_VM_1, dst=IP_CLIENT_B) / ICMP(type="timestamp-reply"),
        counters={("vm1", C.ICMP_OTHER): 1},
    ),
    Case(
        "neighbour solicitation from a VM: passed",
        VMPORT,
        "vm1",
        eth(MAC_VM_1, "33:33:ff:00:00:20")
        / IPv6(src=IP6_VM_1, dst="ff02::1:ff00:20")
        / ICMPv6ND_NS(tgt=IP6_CLIENT_B),
        counters={("vm1", C.ICMP_OTHER): 1},
    ),
    Case(
        "router solicitation from a VM: passed",
        VMPORT,
        "vm1",
        eth(MAC_VM_1, "33:33:00:00:00:02") / IPv6(src=IP6_VM_1, dst="ff02::2") / ICMPv6ND_RS(),
        counters={("vm1", C.ICMP_OTHER): 1},
    ),
]

MISSES = [
    Case(
        "a reply with no entry: passed, counted as a miss",
        VMPORT,
        "vm1",
        tcp4_reply("A"),
        counters={("vm1", C.MISS): 1},
    ),
    Case(
        "an entry of another zone is not this VM port's",
        VMPORT,
        "vm1",
        tcp4_reply(),
        zones=(("vm1", 7),),
        setup=(reply_to(tcp4_request()),),
        counters={("vm1", C.MISS): 1},
    ),
    Case(
        "the entry's uplink is no longer configured: ordinary routing",
        VMPORT,
        "vm1",
        tcp4_reply(),
        roles=(("up1", abi.Role.NONE),),
        setup=(reply_to(tcp4_request()),),
        counters={("vm1", C.MISS): 1},
    ),
    Case(
        "the entry's uplink link is down: ordinary routing, counted, the entry kept",
        VMPORT,
        "vm1",
        tcp4_reply(),
        iface_flags=(("up1", abi.F_IFACE_LINK_DOWN),),
        setup=(reply_to(tcp4_request()),),
        after=(reply_to(tcp4_request()),),
        counters={("vm1", C.HOP_DOWN): 1},
    ),
    Case(
        "IPv6 the same: the link of the entry's uplink is down",
        VMPORT,
        "vm1",
        tcp6_reply(),
        iface_flags=(("up1", abi.F_IFACE_LINK_DOWN),),
        setup=(reply_to(tcp6_request()),),
        after=(reply_to(tcp6_request()),),
        counters={("vm1", C.HOP_DOWN): 1},
    ),
    Case(
        "another uplink's link down changes nothing for this reply",
        VMPORT,
        "vm1",
        tcp4_reply(),
        iface_flags=(("up2", abi.F_IFACE_LINK_DOWN),),
        setup=(reply_to(tcp4_request()),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply()),
        after=(reply_to(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "the entry's interface is now a VM port: ordinary routing",
        VMPORT,
        "vm1",
        tcp4_reply(),
        roles=(("up1", abi.Role.VM_PORT),),
        setup=(reply_to(tcp4_request()),),
        counters={("vm1", C.MISS): 1},
    ),
    Case(
        "a VM packet in the request's own direction is no reply",
        VMPORT,
        "vm1",
        eth(MAC_VM_1, MAC_FW_A)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags="A"),
        setup=(reply_to(tcp4_request()),),
        counters={("vm1", C.MISS): 1},
    ),
    Case(
        "an interface the agent did not configure: passed, counted in slot 0",
        VMPORT,
        "spare",
        tcp4_reply(),
        setup=(reply_to(tcp4_request()),),
        counters={(SLOT0, C.NO_IFACE): 1},
    ),
    Case(
        "lh_vmport on an uplink (role mismatch): passed, counted in slot 0",
        VMPORT,
        "up1",
        tcp4_reply(),
        setup=(reply_to(tcp4_request()),),
        counters={(SLOT0, C.NO_IFACE): 1},
    ),
]

VM_ORIGIN_SYN = tcp4_reply("S")  # VM 1 opens a connection to the client's address
# VM 1 pings the client's address
VM_PING = (
    eth(MAC_VM_1, MAC_FW_A)
    / IP(src=IP_VM_1, dst=IP_CLIENT_B)
    / ICMP(type="echo-request", id=ECHO_ID, seq=ECHO_SEQ)
)

ORIGIN = abi.F_ENTRY_VM_ORIGIN
OWN = (("vm1", IP_VM_1),)  # VM 1 may open connections from its own address
OPENED = {("vm1", C.VM_ORIGIN_LEARNED): 1}
ONE_OPENED = (("vm1", (1, 0, 0)),)  # lh_vm_usage: created, base, counted


def opened(frame: Packet, state: abi.State) -> Entry:
    """The pending entry a VM's first packet leaves: the VM, no last hop yet."""
    return Entry(
        Key(frame, reverse=True),
        flags=ORIGIN,
        packets=0,
        vm="vm1",
        seen="now",
        state=state,
        table=PENDING,
    )


VM_SENDS = [
    Case(
        "a VM's SYN from its own address is remembered against the VM, with no last hop",
        VMPORT,
        "vm1",
        VM_ORIGIN_SYN,
        vm_addrs=OWN,
        after=(opened(VM_ORIGIN_SYN, ST.TCP_SYN_SENT),),
        counters=OPENED,
        table_counters={TC.PENDING_INSERTED: 1},
        vm_usage_after=ONE_OPENED,
    ),
    Case(
        "with VM-opened connections off, a VM's SYN creates nothing",
        VMPORT,
        "vm1",
        VM_ORIGIN_SYN,
        vm_addrs=OWN,
        settings=abi.F_SET_NO_VM_ORIGIN,
        counters={("vm1", C.MISS): 1},
    ),
    Case(
        "a VM's UDP datagram with no entry is remembered against the VM",
        VMPORT,
        "vm1",
        udp4_reply(),
        vm_addrs=OWN,
        after=(opened(udp4_reply(), ST.UDP_NEW),),
        counters=OPENED,
        table_counters={TC.PENDING_INSERTED: 1},
        vm_usage_after=ONE_OPENED,
    ),
    Case(
        "a VM's echo request with no entry is remembered against the VM",
        VMPORT,
        "vm1",
        VM_PING,
        vm_addrs=OWN,
        after=(opened(VM_PING, ST.ICMP_NEW),),
        counters=OPENED,
        table_counters={TC.PENDING_INSERTED: 1},
        vm_usage_after=ONE_OPENED,
    ),
    Case(
        "a VM's echo reply with no entry opens nothing: a plain miss",
        VMPORT,
        "vm1",
        echo4_reply(),
        vm_addrs=OWN,
        counters={("vm1", C.MISS): 1},
    ),
    Case(
        "a VM's ICMPv6 echo reply with no entry opens nothing: a plain miss",
        VMPORT,
        "vm1",
        echo6_reply(),
        vm_addrs=OWN,
        counters={("vm1", C.MISS): 1},
    ),
    Case(
        "a VM-opened connection with no reply yet: passed, pending",
        VMPORT,
        "vm1",
        tcp4_reply("A"),
        vm_addrs=OWN,
        setup=(
            Entry(
                Key(tcp4_reply("A"), reverse=True),
                flags=ORIGIN,
                packets=0,
                vm="vm1",
                state=ST.TCP_SYN_SENT,
                table=PENDING,
            ),
        ),
        counters={("vm1", C.VM_ORIGIN_PENDING): 1},
    ),
    Case(
        "a VM's SYN never changes an existing last hop",
        VMPORT,
        "vm1",
        tcp4_reply("S"),
        vm_addrs=OWN,
        setup=(reply_to(tcp4_request()),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply("S")),
        after=(reply_to(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
]

FAST = abi.F_SET_FAST_PATH
VM_FAST = abi.F_ENTRY_VM_FAST
VM_NEIGH = abi.F_ENTRY_VM_NEIGH
# another guest (MAC_VM_2) answering from VM 1's address
SPOOFED_REPLY = eth(MAC_VM_2, MAC_VMPORT_1) / l3(tcp4_reply())

FAST_PATH = [
    Case(
        "fast path: the guest's reply binds its port to the connection",
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(reply_to(tcp4_request()),),
        settings=FAST,
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply()),
        after=(reply_to(tcp4_request(), replies=1, seen="now", vm="vm1", flags=HOP | VM_FAST),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "fast path off (fast_path = false): the reply binds nothing",
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(reply_to(tcp4_request()),),
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply()),
        after=(reply_to(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "fast path: a reply from another MAC than the port's guest binds nothing",
        VMPORT,
        "vm1",
        tcp4_reply(),
        setup=(reply_to(tcp4_request()),),
        settings=FAST,
        vm_macs=(("vm1", MAC_VM_2),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(tcp4_reply()),
        after=(reply_to(tcp4_request(), replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "routed fast path: the guest's reply binds its port, the neighbour check left to "
        "the first request that takes the shortcut (VM_NEIGH)",
        VMPORT,
        "vm1",
        tcp4_reply(dst_mac=MAC_VMPORT_1),
        setup=(reply_to(tcp4_request()),),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=routed(tcp4_reply(dst_mac=MAC_VMPORT_1)),
        after=(
            reply_to(
                tcp4_request(), replies=1, seen="now", vm="vm1", flags=HOP | VM_FAST | VM_NEIGH
            ),
        ),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "routed fast path: a guest that is not the host's neighbour for the address binds "
        "only until the first request checks (test_uplink: it unbinds there)",
        VMPORT,
        "vm1",
        SPOOFED_REPLY,
        setup=(reply_to(tcp4_request()),),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_2),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=routed(SPOOFED_REPLY),
        after=(
            reply_to(
                tcp4_request(), replies=1, seen="now", vm="vm1", flags=HOP | VM_FAST | VM_NEIGH
            ),
        ),
        counters={("vm1", C.REDIRECTED): 1},
    ),
    Case(
        "routed fast path: a bound port's guest answering again checks nothing, binds nothing new",
        VMPORT,
        "vm1",
        tcp4_reply(dst_mac=MAC_VMPORT_1),
        setup=(reply_to(tcp4_request(), vm="vm1", flags=HOP | VM_FAST | VM_NEIGH),),
        settings=FAST,
        routed=True,
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=routed(tcp4_reply(dst_mac=MAC_VMPORT_1)),
        after=(
            reply_to(
                tcp4_request(), replies=1, seen="now", vm="vm1", flags=HOP | VM_FAST | VM_NEIGH
            ),
        ),
        counters={("vm1", C.REDIRECTED): 1},
    ),
]

CASES = HITS + ROUTED + VLANS + ICMP_ERRORS + MISSES + VM_SENDS + FAST_PATH


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_vmport(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    check(dp, case)


def test_vmport_learns_the_guest_mac_once(dp) -> None:  # type: ignore[no-untyped-def]
    """The first frame a VM sends from an address it owns records the guest's
    MAC in lh_ifaces (for service traffic to it); a later frame from another
    MAC does not change it (bpf/test_vm_mac.py: the frames that teach nothing)."""
    dp.add_vm_addr("vm1", IP_VM_1)
    dp.run(VMPORT, bytes(tcp4_reply()), "vm1")
    dp.run(VMPORT, bytes(eth("52:54:00:00:00:99", MAC_FW_A) / l3(tcp4_reply())), "vm1")
    raw = dp.iface_map.lookup(dp.ifaces["vm1"].ifindex.to_bytes(4, "little"))
    cfg = abi.IfaceCfg.from_buffer_copy(raw)
    assert cfg.flags & abi.F_IFACE_VM_MAC
    assert bytes(cfg.vm_mac) == mac_bytes(MAC_VM_1)
