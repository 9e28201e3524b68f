"""Frames the data path sends from a tagged uplink to a VM port carry no tag.

A VM port is an access port: the bridge would strip the uplink's 802.1Q (or
802.1ad + 802.1Q) tags before the guest sees the frame. So does lasthop when
it sends a frame there itself -- a service's, the fast path's, a VM-opened
connection's -- whether the tags are in the frame (test run) or the outer one
already in the skb's VLAN metadata (test_veth.py checks that on the wire):

    fw B --[8100 a064] IP--> up1 [lh_uplink] --redirect--> vm1 --IP--> VM 1
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lasthop import abi
from packets import (
    MAC_FW_B,
    MAC_VM_1,
    VLAN_C,
    VLAN_S,
    dot1ad,
    dot1q,
    tci,
    tcp4_request,
    tcp6_request,
)

from .harness import PENDING, TC_ACT_REDIRECT, UPLINK, Case, Entry, Key, check, ids

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter
ST = abi.State
HOP = abi.F_ENTRY_HOP_KNOWN
AD = abi.F_ENTRY_OUTER_8021AD

TAGS = {
    "802.1Q": ((dot1q(VLAN_C),), (tci(VLAN_C),), 0),
    "QinQ": ((dot1ad(VLAN_S), dot1q(VLAN_C)), (tci(VLAN_S), tci(VLAN_C)), AD),
    "two 802.1Q": ((dot1q(VLAN_S), dot1q(VLAN_C)), (tci(VLAN_S), tci(VLAN_C)), 0),
}


def untagged(frame: Packet) -> Packet:
    """What the bridge gives VM 1: the frame without its tags, to the guest's MAC."""
    e = Ether(bytes(frame))
    ip = e[IP] if IP in e else e[IPv6]
    return Ether(src=e.src, dst=MAC_VM_1) / ip


def rows() -> list[Case]:
    out = []
    for name, (tags, tcis, ad) in TAGS.items():
        for fam, make in (("v4", tcp4_request), ("v6", tcp6_request)):
            frame = make("A", vlans=tags)
            key = Key(frame)
            entry = Entry(key, mac=MAC_FW_B, iface="up1", vm="vm1", packets=3,
                          vlans=tcis, flags=HOP | ad, state=ST.TCP_ESTABLISHED)  # fmt: skip
            out.append(
                Case(
                    f"{name} {fam}: a service's request reaches its VM untagged",
                    UPLINK, "up1", frame, setup=(entry,), vm_macs=(("vm1", MAC_VM_1),),
                    verdict=TC_ACT_REDIRECT, redirect="vm1", output=untagged(frame),
                    after=(entry.but(packets=4, seen="now"),),
                    counters={("up1", C.REFRESHED): 1, ("up1", C.SVC_PINNED): 1},
                )
            )  # fmt: skip
        frame = tcp4_request("A", vlans=tags)
        fast = Entry(Key(frame), mac=MAC_FW_B, iface="up1", vm="vm1", packets=3, vlans=tcis,
                     flags=HOP | ad | abi.F_ENTRY_VM_FAST, state=ST.TCP_ESTABLISHED)  # fmt: skip
        out.append(
            Case(
                f"{name}: a fast-path request reaches its VM untagged",
                UPLINK, "up1", tcp4_request("A", src_mac=MAC_FW_B, vlans=tags),
                setup=(fast,), settings=abi.F_SET_FAST_PATH, vm_macs=(("vm1", MAC_VM_1),),
                verdict=TC_ACT_REDIRECT, redirect="vm1", output=untagged(frame),
                after=(fast.but(packets=4, seen="now"),),
                counters={("up1", C.REFRESHED): 1, ("up1", C.FAST_TO_VM): 1},
            )
        )  # fmt: skip
        synack = tcp4_request("SA", vlans=tags)
        opened = Entry(Key(synack), flags=abi.F_ENTRY_VM_ORIGIN, packets=0, vm="vm1",
                       state=ST.TCP_SYN_SENT, table=PENDING)  # fmt: skip
        out.append(
            Case(
                f"{name}: the server's answer to a VM-opened connection reaches it untagged",
                UPLINK, "up1", synack, setup=(opened,), vm_macs=(("vm1", MAC_VM_1),),
                verdict=TC_ACT_REDIRECT, redirect="vm1", output=untagged(synack),
                after=(opened.but(mac=MAC_FW_B, iface="up1", vlans=tcis,
                                  flags=abi.F_ENTRY_VM_ORIGIN | HOP | ad, packets=1,
                                  seen="now", state=ST.TCP_SYN_RECV, seq=1001),),
                counters={("up1", C.VM_ORIGIN_HOP): 1, ("up1", C.VM_ORIGIN_RETURNED): 1},
                table_counters={abi.TableCounter.STATE_CHANGES: 1},
            )
        )  # fmt: skip
    return out


ROWS = rows()


@pytest.mark.parametrize("case", ROWS, ids=ids(ROWS))
def test_vm_gets_no_tag(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    check(dp, case)
