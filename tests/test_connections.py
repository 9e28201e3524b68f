"""lasthop.connections: an entry as `show` prints it (no kernel needed)."""

from __future__ import annotations

import socket

from lasthop import abi
from lasthop.connections import decode, tunnel_str

NAMES = {7: "up0", 9: "vm1"}  # ifindex -> name, as decode's cache holds them
HOP_ID = 0x00050006


def key4() -> abi.ConnKey:
    key = abi.ConnKey(
        sport=socket.htons(40001), dport=socket.htons(80), proto=abi.IPPROTO_TCP, family=4
    )
    key.saddr[0] = int.from_bytes(socket.inet_aton("198.51.100.20"), "little")
    key.daddr[0] = int.from_bytes(socket.inet_aton("192.0.2.11"), "little")
    return key


def entry(mac: bytes, flags: int = abi.F_ENTRY_HOP_KNOWN) -> abi.ConnEntry:
    e = abi.ConnEntry(ifindex=7, vm_ifindex=9, flags=flags, state=int(abi.State.TCP_ESTABLISHED))
    e.mac[:] = list(mac)
    return e


def test_an_ethernet_hop_shows_its_mac() -> None:
    c = decode(key4(), entry(bytes.fromhex("02fa0000000b")), 0, 1000, dict(NAMES))
    assert (c.mac, c.uplink, c.mpls, tunnel_str(c)) == ("02:fa:00:00:00:0b", "up0", [], "")


def test_an_l3_link_hop_shows_the_link_and_no_mac() -> None:
    """An L3 uplink's entry (its MAC zero: the link is the hop) shows no MAC, not 00:00:..."""
    c = decode(key4(), entry(bytes(6)), 0, 1000, dict(NAMES))
    assert (c.mac, c.uplink) == ("", "up0")


def test_an_mpls_hop_shows_its_labels_outer_first() -> None:
    """An entry naming an MPLS descriptor shows the stack's labels (TC dropped),
    its tags from the descriptor, and `show` prints "mpls 16001/24002"."""
    e = entry(bytes.fromhex("02fa0000000b"), abi.F_ENTRY_HOP_KNOWN | abi.F_ENTRY_HOP_EXT)
    e.vlan_count = 1
    e.vlan_tci[0], e.vlan_tci[1] = HOP_ID & 0xFFFF, HOP_ID >> 16
    d = abi.HopDesc(kind=int(abi.HopKind.MPLS), mpls_count=2)
    d.mpls[0], d.mpls[1] = 16001 << 12 | 5 << 9, 24002 << 12
    d.vlan_tci[0] = 5 << 13 | 100
    c = decode(key4(), e, 0, 1000, dict(NAMES), hop={HOP_ID: d}.get)
    assert (c.mpls, c.vlan, c.endpoint, c.vni) == ([16001, 24002], [100], "", None)
    assert tunnel_str(c) == "mpls 16001/24002"
    assert c.to_json()["mpls"] == [16001, 24002]
