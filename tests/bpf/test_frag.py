"""Every fragment of a datagram follows its first one (lh_frags, frag.h).

Only a first fragment carries ports; the data path remembers what it did by
(addresses, protocol, IP id) and sends the later fragments the same way:

    request:  fw B --frag 1 (ports)--> up1 [lh_uplink] --> vm1   entry pinned to vm1
              fw B --frag 2, 3 ------> up1 [lh_uplink] --> vm1   lh_frags: to vm1
    reply:    vm1 --frag 1 (ports)--> [lh_vmport] --> up1 --> fw B   entry's last hop
              vm1 --frag 2, 3 ------> [lh_vmport] --> up1 --> fw B   lh_frags: that hop

A later fragment whose first one was not seen passes unchanged, counted
fragment_early; a flood of fragment ids only ever evicts other fragments'
state (lh_frags is an LRU of its own), never a connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lasthop import abi
from packets import (
    IP6_CLIENT_B,
    IP6_VM_1,
    IP_CLIENT_A,
    IP_CLIENT_B,
    IP_VM_1,
    MAC_FW_B,
    MAC_UPLINK_1,
    MAC_VM_1,
    MAC_VMPORT_1,
    PORT_CLIENT,
    PORT_DNS,
    udp4_fragments,
    udp6_fragments,
)

from .conftest import FRAG_TABLE_SIZE
from .harness import (
    MARKS,
    ST,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    UPLINK,
    VMPORT,
    C,
    Case,
    Datapath,
    Entry,
    Key,
    bridged,
    check,
    routed,
)

pytestmark = MARKS


def request4(**kw) -> list[Packet]:  # type: ignore[no-untyped-def]
    """A client's fragmented UDP request through firewall B, to the uplink's MAC."""
    return udp4_fragments(
        src=IP_CLIENT_B, dst=IP_VM_1, sport=PORT_CLIENT, dport=PORT_DNS,
        src_mac=MAC_FW_B, dst_mac=MAC_UPLINK_1, **kw,
    )  # fmt: skip


def request6(**kw) -> list[Packet]:  # type: ignore[no-untyped-def]
    return udp6_fragments(
        src=IP6_CLIENT_B, dst=IP6_VM_1, sport=PORT_CLIENT, dport=PORT_DNS,
        src_mac=MAC_FW_B, dst_mac=MAC_UPLINK_1, **kw,
    )  # fmt: skip


def to_vm(frame: Packet) -> Packet:
    """As a fragment reaches VM 1 on a bridged host: its guest's MAC, nothing else."""
    return bridged(frame, dst=MAC_VM_1)


def pinned(first: Packet) -> Entry:
    """A service connection the agent's Maglev pick pinned to vm1, confirmed."""
    return Entry(Key(first), mac=MAC_FW_B, iface="up1", vm="vm1", packets=3, state=ST.UDP_STREAM)


def answered(first: Packet) -> Entry:
    """A client's connection to VM 1, learned on up1 (the reply's key reversed)."""
    return Entry(Key(first, reverse=True), mac=MAC_FW_B, iface="up1", packets=3,
                 state=ST.UDP_STREAM)  # fmt: skip


@dataclass(frozen=True)
class Datagram:
    """A first fragment's row (checked in full by the harness) and what each
    later fragment of the same datagram must then do."""

    first: Case
    later: tuple[Packet, ...]
    verdict: int
    redirect: str | None
    outputs: tuple[Packet, ...] | None  # None: unchanged
    reason: abi.Counter

    def __str__(self) -> str:
        return self.first.desc


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def run_later(dp: Datapath, prog: str, iface: str, frame: Packet) -> tuple[int, bytes, dict]:  # type: ignore[type-arg]
    """Runs one more frame on the data path as the first case left it."""
    before = dp.counter_values()
    dp.trace.update(_u32(0), _u32(0))
    run = dp.run(prog, bytes(frame), iface)
    after = dp.counter_values()
    return run.retval, run.data, {k: after[k] - before[k] for k in after if after[k] != before[k]}


def service_row(desc: str, frags: list[Packet]) -> Datagram:
    entry = pinned(frags[0])
    return Datagram(
        Case(
            desc,
            UPLINK,
            "up1",
            frags[0],
            setup=(entry,),
            vm_macs=(("vm1", MAC_VM_1),),
            verdict=TC_ACT_REDIRECT,
            redirect="vm1",
            output=to_vm(frags[0]),
            after=(entry.but(packets=4, seen="now"),),
            counters={("up1", C.REFRESHED): 1, ("up1", C.SVC_PINNED): 1},
        ),
        tuple(frags[1:]),
        TC_ACT_REDIRECT,
        "vm1",
        tuple(to_vm(f) for f in frags[1:]),
        C.FRAGMENT_FOLLOWED,
    )


def reply_row(desc: str, frags: list[Packet], routed_: bool = False) -> Datagram:
    entry = answered(frags[0])
    out = (lambda f: routed(f)) if routed_ else (lambda f: bridged(f))
    return Datagram(
        Case(
            desc,
            VMPORT,
            "vm1",
            frags[0],
            setup=(entry,),
            routed=routed_,
            verdict=TC_ACT_REDIRECT,
            redirect="up1",
            output=out(frags[0]),
            after=(entry.but(replies=1, seen="now"),),
            counters={("vm1", C.REDIRECTED): 1},
        ),
        tuple(frags[1:]),
        TC_ACT_REDIRECT,
        "up1",
        tuple(out(f) for f in frags[1:]),
        C.FRAGMENT_FOLLOWED,
    )


DATAGRAMS = [
    service_row("v4 request fragments all go to the service's VM", request4()),
    service_row("v6 request fragments all go to the service's VM", request6()),
    reply_row("v4 reply fragments all go to the request's last hop", udp4_fragments()),
    reply_row("v6 reply fragments all go to the request's last hop", udp6_fragments()),
    reply_row(
        "routed: every reply fragment gets the uplink's MAC and TTL - 1",
        udp4_fragments(dst_mac=MAC_VMPORT_1),
        routed_=True,
    ),
    Datagram(
        Case(
            "a VM's first fragment of no known connection passes (it may not open one)",
            VMPORT,
            "vm1",
            udp4_fragments()[0],
            counters={("vm1", C.VM_ORIGIN_SPOOFED): 1},
        ),
        tuple(udp4_fragments()[1:]),
        TC_ACT_OK,
        None,
        None,
        C.FRAGMENT,
    ),
]


@pytest.mark.parametrize("row", DATAGRAMS, ids=str)
def test_later_fragments_follow_the_first(dp: Datapath, row: Datagram) -> None:
    """The first fragment is handled as any packet of its connection; every
    later one of its datagram gets the same verdict, target and rewrite."""
    check(dp, row.first)
    for i, frame in enumerate(row.later):
        verdict, data, counters = run_later(dp, row.first.prog, row.first.iface, frame)
        assert verdict == row.verdict
        assert dp.redirected_to() == row.redirect
        want = frame if row.outputs is None else row.outputs[i]
        assert data == bytes(want), Ether(data).summary()
        assert counters == {(row.first.iface, row.reason): 1}


def test_out_of_order_later_fragment_passes_counted(dp: Datapath) -> None:
    """A later fragment ahead of its first passes unchanged (nothing is held
    back), counted fragment_early; the ones after the first follow it."""
    frags = udp4_fragments()
    dp.put(answered(frags[0]))
    verdict, data, counters = run_later(dp, VMPORT, "vm1", frags[2])
    assert (verdict, data, counters) == (TC_ACT_OK, bytes(frags[2]), {("vm1", C.FRAGMENT_EARLY): 1})
    assert run_later(dp, VMPORT, "vm1", frags[0])[0] == TC_ACT_REDIRECT
    verdict, data, counters = run_later(dp, VMPORT, "vm1", frags[1])
    assert (verdict, data, counters) == (
        TC_ACT_REDIRECT,
        bytes(bridged(frags[1])),
        {("vm1", C.FRAGMENT_FOLLOWED): 1},
    )


def test_another_datagram_id_does_not_follow(dp: Datapath) -> None:
    """The IP id is part of the datagram: a later fragment of another id, same
    addresses, is not sent the first one's way."""
    frags, other = udp4_fragments(), udp4_fragments(ident=0x1234)
    dp.put(answered(frags[0]))
    assert run_later(dp, VMPORT, "vm1", frags[0])[0] == TC_ACT_REDIRECT
    verdict, data, counters = run_later(dp, VMPORT, "vm1", other[1])
    assert (verdict, data, counters) == (TC_ACT_OK, bytes(other[1]), {("vm1", C.FRAGMENT_EARLY): 1})


def test_reply_direction_state_is_not_the_request_direction(dp: Datapath) -> None:
    """A reply datagram's state is keyed on its own addresses: a request
    fragment with the same id, addresses the other way round, does not follow it."""
    dp.put(answered(udp4_fragments()[0]))
    assert run_later(dp, VMPORT, "vm1", udp4_fragments()[0])[0] == TC_ACT_REDIRECT
    later = request4()[1]
    verdict, data, counters = run_later(dp, UPLINK, "up1", later)
    assert (verdict, data, counters) == (TC_ACT_OK, bytes(later), {("up1", C.FRAGMENT_EARLY): 1})


def test_fragment_id_flood_evicts_only_fragment_state(dp: Datapath) -> None:
    """The attack: a host on the segment sends ten times lh_frags' size of
    first fragments, each of a new datagram id, then as many later fragments
    of ids never seen. lh_frags stays within its size (an LRU); every
    connection the tables held before is still there, unchanged; later
    fragments of unknown ids store nothing; and a datagram that starts after
    the flood is followed as usual."""
    victim = answered(udp4_fragments()[0])
    other = Entry(Key(request4()[0]), mac=MAC_FW_B, iface="up1", packets=3, state=ST.UDP_STREAM)
    dp.put(victim)
    dp.put(other)
    before = dp.table(0, 2**32 - 1)
    flood = 10 * FRAG_TABLE_SIZE
    attacker = dict(src=IP_CLIENT_A, dst=IP_VM_1, sport=PORT_CLIENT, dport=PORT_DNS,
                    src_mac=MAC_FW_B, dst_mac=MAC_VM_1)  # fmt: skip
    template = udp4_fragments(**attacker)  # type: ignore[arg-type]
    for n in range(flood):
        first = Ether(bytes(template[0]))
        first[IP].id = n
        del first[IP].chksum
        dp.run(UPLINK, bytes(first), "up1")
    assert len(list(dp.frags.keys())) <= FRAG_TABLE_SIZE
    start = len(list(dp.frags.keys()))
    early_before = dp.counter_values()[("up1", C.FRAGMENT_EARLY)]
    for n in range(flood):
        later = Ether(bytes(template[1]))
        later[IP].id = 0xFFFF - n  # above every id the first fragments used
        del later[IP].chksum
        dp.run(UPLINK, bytes(later), "up1")
    assert len(list(dp.frags.keys())) == start  # later fragments store nothing
    assert dp.counter_values()[("up1", C.FRAGMENT_EARLY)] - early_before == flood
    after = dp.table(0, 2**32 - 1)
    for key, entry in before.items():
        assert after[key] == entry
    frags = udp4_fragments(ident=0x7777)
    assert run_later(dp, VMPORT, "vm1", frags[0])[0] == TC_ACT_REDIRECT
    verdict, data, counters = run_later(dp, VMPORT, "vm1", frags[1])
    assert (verdict, counters) == (TC_ACT_REDIRECT, {("vm1", C.FRAGMENT_FOLLOWED): 1})
