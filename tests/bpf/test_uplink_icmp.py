"""lh_uplink: ICMP errors from outside reach the VM that holds their connection.

A router beyond the firewall answers a VM's reply with "fragmentation needed"
(IPv4) or "packet too big" (IPv6), quoting the reply as it left:

    VM 1 --reply--> [lh_vmport] --> up1 --> fw B --> router (MTU 1400)
    VM 1 <--------- [lh_uplink] <-- up1 <-- fw B <-- ICMP error quoting the reply

The quote, reversed, is the connection's key. A connection a VM port holds
(a service's, one the VM opened, the fast path's) gets the error on that port,
rewritten as its requests are (the guest's MAC; routed: the port's MAC and
TTL - 1; no VLAN tag); any other known one is left to the bridge or routing
(icmp_error_forwarded), an unknown one counted icmp_error_miss. No error
changes an entry.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lasthop import abi
from packets import (
    IP6_ROUTER,
    IP6_VM_1,
    IP_ROUTER,
    IP_VM_1,
    MAC_FW_B,
    MAC_UPLINK_1,
    MAC_VM_1,
    MAC_VMPORT_1,
    dot1ad,
    dot1q,
    eth,
    l3,
    tcp4_reply,
    tcp4_request,
    tcp6_reply,
    tcp6_request,
    udp4_reply,
    udp4_request,
)

from .harness import TC_ACT_REDIRECT, UPLINK, Case, Entry, Key, check, ids

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter
ST = abi.State
HOP = abi.F_ENTRY_HOP_KNOWN
FRAG_NEEDED = {"type": "dest-unreach", "code": "fragmentation-needed", "nexthopmtu": 1400}


def frag_needed(quoted: Packet, dst_mac: str = MAC_VM_1, vlans: tuple[Packet, ...] = ()) -> Packet:
    """A router's "fragmentation needed" about a reply VM 1 sent, through fw B."""
    return (
        eth(MAC_FW_B, dst_mac, vlans)
        / IP(src=IP_ROUTER, dst=IP_VM_1)
        / ICMP(**FRAG_NEEDED)
        / l3(quoted)
    )


def too_big(quoted: Packet, dst_mac: str = MAC_VM_1) -> Packet:
    return (
        eth(MAC_FW_B, dst_mac)
        / IPv6(src=IP6_ROUTER, dst=IP6_VM_1)
        / ICMPv6PacketTooBig(mtu=1280)
        / l3(quoted)
    )


def to_vm(frame: Packet) -> Packet:
    """The frame as the bridge would give it to VM 1: its MAC, untagged."""
    e = Ether(bytes(frame))
    ip = e[IP] if IP in e else e[IPv6]
    return Ether(src=e.src, dst=MAC_VM_1) / ip


def routed_to_vm(frame: Packet) -> Packet:
    """As a routed host gives it to VM 1: from the port's MAC, TTL - 1."""
    out = to_vm(frame)
    out.src = MAC_VMPORT_1
    if IP in out:
        out[IP].ttl -= 1
        del out[IP].chksum
    else:
        out[IPv6].hlim -= 1
    return Ether(bytes(out))


def held(request: Packet, **kw) -> Entry:  # type: ignore[no-untyped-def]
    """request's connection, held by vm1 (flags say how: service, VM-opened, fast)."""
    kw.setdefault("state", ST.TCP_ESTABLISHED)
    return Entry(Key(request), mac=MAC_FW_B, iface="up1", vm="vm1", packets=3, **kw)


def to_vm_row(desc: str, setup: Entry, error: Packet, **kw) -> Case:  # type: ignore[no-untyped-def]
    return Case(
        desc,
        UPLINK,
        "up1",
        error,
        setup=(setup,),
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="vm1",
        output=kw.pop("output", to_vm(error)),
        counters={("up1", C.ICMP_ERROR_REDIRECTED): 1},
        **kw,
    )


def passed_row(
    desc: str, error: Packet, counter: abi.Counter, setup: tuple[Entry, ...] = (), **kw
) -> Case:  # type: ignore[no-untyped-def]
    return Case(desc, UPLINK, "up1", error, setup=setup, vm_macs=(("vm1", MAC_VM_1),),
                counters={("up1", counter): 1}, **kw)  # fmt: skip


REQ4, REQ6 = tcp4_request("A"), tcp6_request("A")
SERVICE4 = held(REQ4)
SERVICE6 = held(REQ6)
# a connection VM 1 opened: keyed as the server's packets arrive (server = "client")
OPENED4 = held(REQ4, flags=HOP | abi.F_ENTRY_VM_ORIGIN)
FAST4 = held(REQ4, flags=HOP | abi.F_ENTRY_VM_FAST)
LEARNED4 = Entry(Key(REQ4), mac=MAC_FW_B, iface="up1", packets=3, state=ST.TCP_ESTABLISHED)

ROWS = [
    to_vm_row("v4 fragmentation needed about a service's reply goes to its VM",
              SERVICE4, frag_needed(tcp4_reply(), dst_mac=MAC_UPLINK_1)),
    to_vm_row("v6 packet too big about a service's reply goes to its VM",
              SERVICE6, too_big(tcp6_reply(), dst_mac=MAC_UPLINK_1)),
    to_vm_row("v4 fragmentation needed about a VM-opened connection goes to that VM",
              OPENED4, frag_needed(tcp4_reply())),
    to_vm_row("v4 fragmentation needed about a fast-path connection goes to its VM",
              FAST4, frag_needed(tcp4_reply())),
    to_vm_row("a UDP connection's error too", held(udp4_request(), state=ST.UDP_STREAM),
              frag_needed(udp4_reply())),
    to_vm_row("routed: the port's MAC and TTL - 1, as a request gets",
              SERVICE4, frag_needed(tcp4_reply(), dst_mac=MAC_UPLINK_1),
              routed=True, output=routed_to_vm(frag_needed(tcp4_reply()))),
    to_vm_row("from a tagged uplink: the VM gets it untagged",
              SERVICE4, frag_needed(tcp4_reply(), vlans=(dot1q(),))),
    to_vm_row("from a QinQ uplink: the VM gets it untagged",
              SERVICE4, frag_needed(tcp4_reply(), vlans=(dot1ad(), dot1q()))),
    passed_row("about a connection no VM port holds: left to the bridge",
               frag_needed(tcp4_reply()), C.ICMP_ERROR_FORWARDED, setup=(LEARNED4,)),
    passed_row("about a routed shortcut whose neighbour check is still to come "
               "(VM_NEIGH): left to routing",
               frag_needed(tcp4_reply(), dst_mac=MAC_UPLINK_1), C.ICMP_ERROR_FORWARDED,
               setup=(held(REQ4, flags=HOP | abi.F_ENTRY_VM_FAST | abi.F_ENTRY_VM_NEIGH),),
               routed=True),
    passed_row("about a service whose VM is down: left to routing",
               frag_needed(tcp4_reply()), C.ICMP_ERROR_FORWARDED, setup=(SERVICE4,),
               iface_flags=(("vm1", abi.F_IFACE_VM_DOWN),)),
    passed_row("about no known connection: passed", frag_needed(tcp4_reply()),
               C.ICMP_ERROR_MISS),
    passed_row("about another connection of the same hosts: passed",
               frag_needed(udp4_reply()), C.ICMP_ERROR_MISS, setup=(SERVICE4,)),
    passed_row("a quote cut inside its L4 header: passed",
               eth(MAC_FW_B, MAC_VM_1) / IP(src=IP_ROUTER, dst=IP_VM_1) / ICMP(**FRAG_NEEDED)
               / Raw(bytes(l3(tcp4_reply()))[:24]),
               C.ICMP_ERROR_MISS, setup=(SERVICE4,)),
    passed_row("an ICMPv4 error quoting IPv6: passed",
               eth(MAC_FW_B, MAC_VM_1) / IP(src=IP_ROUTER, dst=IP_VM_1) / ICMP(**FRAG_NEEDED)
               / l3(tcp6_reply()),
               C.ICMP_ERROR_MISS, setup=(SERVICE6,)),
    passed_row("a quoted UDP header of a non-first fragment: passed",
               eth(MAC_FW_B, MAC_VM_1) / IP(src=IP_ROUTER, dst=IP_VM_1) / ICMP(**FRAG_NEEDED)
               / IP(src=IP_VM_1, dst="198.51.100.20", frag=100, proto=17) / Raw(bytes(UDP())),
               C.ICMP_ERROR_MISS),
]  # fmt: skip


@pytest.mark.parametrize("case", ROWS, ids=ids(ROWS))
def test_uplink_icmp_error(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    check(dp, case)
