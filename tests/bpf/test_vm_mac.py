"""lh_vmport learns the guest's MAC (lh_ifaces .vm_mac, for the fast path and
service traffic) only from a frame whose source address the VM owns -- an
address in lh_vm_addrs for its port: configured, learned from its answer to
a client, or a service address of its pool. Tenants are hostile, and a VM
segment may hold another router:

    router (MAC_VM_2, fe80::2 / 192.0.2.99) ─┐
                                             ├── vm1 ── host
    VM 1   (MAC_VM_1, 192.0.2.11)          ──┘

Found in the HA lab: the router's neighbour solicitation was the port's first
IP frame, its MAC became "the guest's", and the fast path sent the clients'
bytes to the router. Each row: the frame, the port's addresses, the MAC the
port holds after (None: none learned).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
from scapy.packet import Packet

from lasthop import abi
from packets import (
    IP6_VM_1,
    IP_CLIENT_B,
    IP_VM_1,
    MAC_FW_A,
    MAC_FW_B,
    MAC_VM_1,
    MAC_VM_2,
    eth,
    tcp4_reply,
    tcp6_reply,
    udp4_reply,
    udp4_request,
)

from .harness import PENDING, VMPORT, Entry, Key, VmAddr

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

ORIG = abi.VmAddrOrigin
IP_OTHER = "192.0.2.99"  # the other router's address on the VM segment
IP6_OTHER_LL = "fe80::2"

# the other router asks for VM 1's address: multicast, from its own MAC and address
ROUTER_NS = (
    eth(MAC_VM_2, "33:33:ff:00:00:11")
    / IPv6(src=IP6_OTHER_LL, dst="ff02::1:ff00:11", hlim=255)
    / ICMPv6ND_NS(tgt=IP6_VM_1)
)
ROUTER_UDP = eth(MAC_VM_2, MAC_FW_A) / IP(src=IP_OTHER, dst=IP_CLIENT_B) / UDP(sport=53, dport=53)
OWN = (("vm1", IP_VM_1), ("vm1", IP6_VM_1))


@dataclass(frozen=True)
class Row:
    desc: str
    frame: Packet
    vm_addrs: tuple[tuple[str, str] | VmAddr, ...]
    learned: str | None  # the port's guest MAC after the frame
    setup: tuple[Entry, ...] = ()


def answer_entry() -> Entry:
    """A client's datagram through firewall B that VM 1 has not answered yet."""
    return Entry(
        Key(udp4_request()), mac=MAC_FW_B, iface="up1", state=abi.State.UDP_NEW, table=PENDING
    )


ROWS = [
    Row("attack: another router's neighbour solicitation teaches nothing", ROUTER_NS, OWN, None),
    Row("attack: another MAC's frame from an address the VM does not own", ROUTER_UDP, OWN, None),
    Row(
        "attack: another MAC's frame, and the port has no address yet",
        ROUTER_UDP,
        (),
        None,
    ),
    Row("the VM's frame from its configured IPv4 address", tcp4_reply(), OWN, MAC_VM_1),
    Row("the VM's frame from its configured IPv6 address", tcp6_reply(), OWN, MAC_VM_1),
    Row(
        "the VM's frame from an address learned earlier",
        tcp4_reply(),
        (("vm1", IP_VM_1, ORIG.LEARNED),),
        MAC_VM_1,
    ),
    Row(
        "the VM's frame from a service address of its pool",
        tcp4_reply(),
        (("vm1", IP_VM_1, ORIG.SERVICE),),
        MAC_VM_1,
    ),
    Row(
        "the VM's address on another port teaches nothing", tcp4_reply(), (("vm2", IP_VM_1),), None
    ),
    Row(
        "the VM's first answer to a client: its address, then its MAC, learned",
        udp4_reply(),
        (),
        MAC_VM_1,
        setup=(answer_entry(),),
    ),
]


def vm_mac_of(dp, name: str) -> str | None:  # type: ignore[no-untyped-def]
    raw = dp.iface_map.lookup(dp.ifaces[name].ifindex.to_bytes(4, "little"))
    cfg = abi.IfaceCfg.from_buffer_copy(raw[: ctypes.sizeof(abi.IfaceCfg)])
    if not cfg.flags & abi.F_IFACE_VM_MAC:
        return None
    return ":".join(f"{b:02x}" for b in bytes(cfg.vm_mac))


@pytest.mark.parametrize("row", ROWS, ids=[r.desc for r in ROWS])
def test_vm_mac_learned_only_from_an_owned_address(dp, row: Row) -> None:  # type: ignore[no-untyped-def]
    dp.reset()
    for entry in row.setup:
        dp.put(entry)
    for addr in row.vm_addrs:
        dp.add_vm_addr(*addr)
    dp.run(VMPORT, bytes(row.frame), "vm1")
    assert vm_mac_of(dp, "vm1") == row.learned


def test_a_learned_mac_is_not_replaced_by_a_later_frame(dp) -> None:  # type: ignore[no-untyped-def]
    """Once the VM's MAC is known, another MAC's frame, even from the VM's
    own address, changes nothing."""
    dp.reset()
    for addr in OWN:
        dp.add_vm_addr(*addr)
    dp.run(VMPORT, bytes(tcp4_reply()), "vm1")
    spoof = eth(MAC_VM_2, MAC_FW_A) / IP(src=IP_VM_1, dst=IP_CLIENT_B) / UDP(sport=53, dport=53)
    dp.run(VMPORT, bytes(spoof), "vm1")
    assert vm_mac_of(dp, "vm1") == MAC_VM_1
