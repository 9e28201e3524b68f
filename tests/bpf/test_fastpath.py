"""The fast paths (bpf/fastpath.h): lh_vmport's reply and lh_uplink's refresh
of an established connection take a short way first, and do exactly what the
general path does with the same packet.

    uplink (lh_uplink)                          VM port (lh_vmport)
    ACK of an established connection            reply of an established connection
      -> fast_refresh: last_seen, packets         -> fast_reply: MAC := last hop's, tags,
         (anything else: the general path)           redirect (anything else: general)

Two kinds of check: rows with exact expectations (the fast path taken, or
left to the general path, as the row says: lh_trace_fast counts the packets
it took), and every row of the other packet tables run twice from the same
set-up -- through lh_uplink / lh_vmport, and through lh_uplink_general /
lh_vmport_general (the general path alone, test builds only) -- with
everything compared: verdict, redirect, output bytes, counters, tables.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.packet import Packet

from lasthop import abi
from packets import (
    IP6_CLIENT_B,
    IP6_VM_1,
    IP_CLIENT_B,
    IP_VM_1,
    MAC_BROADCAST,
    MAC_FW_A,
    MAC_FW_B,
    MAC_FW_C,
    MAC_VM_1,
    MAC_VM_2,
    PORT_CLIENT,
    PORT_HTTP,
    VLAN_C,
    dot1q,
    eth,
    tci,
)

from . import (
    test_conntrack,
    test_failover,
    test_malformed,
    test_scope,
    test_uplink,
    test_vm_untagged,
    test_vmport,
)
from .harness import (
    CONFIRMED,
    PENDING,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    UPLINK,
    VMPORT,
    Case,
    Datapath,
    Entry,
    Key,
    bridged,
    check,
    ids,
    prepare,
    routed,
)

C = abi.Counter
EST = abi.State.TCP_ESTABLISHED
GENERAL = {UPLINK: "lh_uplink_general", VMPORT: "lh_vmport_general"}
VM_MACS = (("vm1", MAC_VM_1), ("vm2", MAC_VM_2))


def request4(flags: str = "A") -> Packet:
    return (
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags=flags)
    )


def reply4(flags: str = "A", **ip: object) -> Packet:
    return (
        eth(MAC_VM_1, MAC_FW_A)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B, **ip)
        / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags=flags)
    )


def request6(flags: str = "A") -> Packet:
    return (
        eth(MAC_FW_B, MAC_VM_1)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags=flags)
    )


def reply6(flags: str = "A") -> Packet:
    return (
        eth(MAC_VM_1, MAC_FW_A)
        / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B)
        / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags=flags)
    )


def est(request: Packet, **kw: object) -> Entry:
    """An established, confirmed connection from firewall B on up1."""
    fields: dict[str, object] = {"mac": MAC_FW_B, "iface": "up1", "packets": 3, "state": EST}
    fields.update(kw)
    return Entry(Key(request), **fields)  # type: ignore[arg-type]


def fast_taken(dp: Datapath) -> int:
    raw = dp.obj.map("lh_trace_fast").lookup(struct.pack("<I", 0))
    return struct.unpack("<Q", raw[:8])[0] if raw else 0


def reply_row(desc: str, reply: Packet, entry: Entry, **kw: object) -> Case:
    """A reply the fast path takes: to firewall B on up1, bridged."""
    fields: dict[str, object] = {
        "vm_macs": VM_MACS,
        "setup": (entry,),
        "verdict": TC_ACT_REDIRECT,
        "redirect": "up1",
        "output": bridged(reply),
        "after": (entry.but(replies=1, seen="now"),),
        "counters": {("vm1", C.REDIRECTED): 1},
    }
    fields.update(kw)
    return Case(desc, VMPORT, "vm1", reply, **fields)  # type: ignore[arg-type]


def refresh_row(desc: str, request: Packet, entry: Entry, **kw: object) -> Case:
    """A request the fast path refreshes: it goes on unchanged."""
    fields: dict[str, object] = {
        "setup": (entry,),
        "after": (entry.but(packets=entry.packets + 1, seen="now"),),
        "counters": {("up1", C.REFRESHED): 1},
    }
    fields.update(kw)
    return Case(desc, UPLINK, "up1", request, **fields)  # type: ignore[arg-type]


# (case, whether the fast path takes it)
ROWS: list[tuple[Case, bool]] = [
    (reply_row("v4 reply of an established connection", reply4(), est(request4())), True),
    (reply_row("v6 reply of an established connection", reply6(), est(request6())), True),
    (
        reply_row("v4 reply with PSH and data", reply4("PA") / b"data", est(request4())),
        True,
    ),
    (
        reply_row(
            "a tagged last hop: its tag pushed back (into the skb's metadata)",
            reply4(),
            est(request4(), vlans=(tci(VLAN_C),)),
        ),
        True,
    ),
    (
        reply_row(
            "fast path on: the guest's answer makes vm1 the connection's shortcut",
            reply4(),
            est(request4()),
            settings=abi.F_SET_FAST_PATH,
            after=(
                est(
                    request4(),
                    replies=1,
                    seen="now",
                    vm="vm1",
                    flags=abi.F_ENTRY_HOP_KNOWN | abi.F_ENTRY_VM_FAST,
                ),
            ),
        ),
        True,
    ),
    (
        reply_row(
            "a FIN: its state moves",
            reply4("FA"),
            est(request4()),
            after=(
                est(
                    request4(),
                    replies=1,
                    seen="now",
                    state=abi.State.TCP_CLOSING,
                    flags=abi.F_ENTRY_HOP_KNOWN | abi.F_ENTRY_FIN_ANSWERER,
                ),
            ),
            table_counters={abi.TableCounter.STATE_CHANGES: 1},
        ),
        False,
    ),
    (
        reply_row(
            "a RST: its state moves",
            reply4("R"),
            est(request4()),
            after=(est(request4(), replies=1, seen="now", state=abi.State.TCP_CLOSED),),
            table_counters={abi.TableCounter.STATE_CHANGES: 1},
        ),
        False,
    ),
    (
        reply_row(
            "IP options: counted by the general path",
            reply4(options=b"\x94\x04\x00\x00"),
            est(request4()),
            counters={("vm1", C.REDIRECTED): 1, ("vm1", C.IP_OPTIONS): 1},
        ),
        False,
    ),
    (
        reply_row(
            "an IPv6 extension header: counted by the general path",
            eth(MAC_VM_1, MAC_FW_A)
            / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B)
            / IPv6ExtHdrDestOpt()
            / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags="A"),
            est(request6()),
            counters={("vm1", C.REDIRECTED): 1, ("vm1", C.IPV6_EXT): 1},
        ),
        False,
    ),
    (
        reply_row(
            "a pending entry (answered SYN): the general path's second lookup",
            reply4(),
            est(request4(), state=abi.State.TCP_SYN_RECV, table=PENDING),
        ),
        False,
    ),
    (
        reply_row(
            "the guest's MAC not yet known: the general path learns it",
            reply4(),
            est(request4()),
            vm_macs=(("vm2", MAC_VM_2),),
        ),
        False,
    ),
    (
        reply_row(
            "a routed VM port: TTL and the uplink's MAC, by the general path",
            reply4(),
            est(request4()),
            routed=True,
            output=routed(reply4()),
        ),
        False,
    ),
    (
        reply_row(
            "the uplink's link is down",
            reply4(),
            est(request4()),
            iface_flags=(("up1", abi.F_IFACE_LINK_DOWN),),
            verdict=TC_ACT_OK,
            redirect=None,
            output=None,
            after=None,
            counters={("vm1", C.HOP_DOWN): 1},
        ),
        False,
    ),
    (
        reply_row(
            "a hop moved (fail-over): the general path follows it",
            reply4(),
            est(request4()),
            settings=abi.F_SET_HOPS_MOVED,
            iface_flags=(("up1", abi.F_IFACE_FOLLOW_MOVES),),
            moved=(("up1", MAC_FW_B, MAC_FW_C),),
            output=bridged(reply4(), MAC_FW_C),
            after=(est(request4(), mac=MAC_FW_C, replies=1, seen="now"),),
            counters={("vm1", C.REDIRECTED): 1, ("vm1", C.HOP_FOLLOWED): 1},
        ),
        False,
    ),
    (refresh_row("v4 ACK of an established connection", request4(), est(request4())), True),
    (refresh_row("v6 ACK of an established connection", request6(), est(request6())), True),
    (
        refresh_row(
            "a request from another MAC: relearned by the general path",
            eth(MAC_FW_C, MAC_VM_1) / request4()[IP],
            est(request4()),
            after=(est(request4(), mac=MAC_FW_C, packets=4, seen="now"),),
            counters={("up1", C.RELEARNED): 1},
        ),
        False,
    ),
    (
        refresh_row(
            "a tagged request: the general path compares the tags",
            eth(MAC_FW_B, MAC_VM_1, (dot1q(),)) / request4()[IP],
            est(request4()),
            after=(est(request4(), vlans=(tci(VLAN_C),), packets=4, seen="now"),),
            counters={("up1", C.RELEARNED): 1},
        ),
        False,
    ),
    (
        refresh_row(
            "a broadcast frame is no request",
            eth(MAC_FW_B, MAC_BROADCAST) / request4()[IP],
            est(request4()),
            after=None,
            counters={("up1", C.NOT_UNICAST): 1},
        ),
        False,
    ),
    (
        refresh_row(
            "sync on: the general path reports the refresh",
            request4(),
            est(request4()),
            settings=abi.F_SET_SYNC,
        ),
        False,
    ),
    (
        refresh_row(
            "a connection a VM holds: the general path sends it there",
            request4(),
            est(request4(), vm="vm1"),
            vm_macs=VM_MACS,
            verdict=TC_ACT_REDIRECT,
            redirect="vm1",
            output=eth(MAC_FW_B, MAC_VM_1) / request4()[IP],
            counters={("up1", C.REFRESHED): 1, ("up1", C.SVC_PINNED): 1},
        ),
        False,
    ),
    (
        refresh_row(
            "a FIN from the client: its state moves",
            request4("FA"),
            est(request4()),
            after=(
                est(
                    request4(),
                    packets=4,
                    seen="now",
                    state=abi.State.TCP_CLOSING,
                    flags=abi.F_ENTRY_HOP_KNOWN | abi.F_ENTRY_FIN_OPENER,
                ),
            ),
            table_counters={abi.TableCounter.STATE_CHANGES: 1},
        ),
        False,
    ),
]


@pytest.mark.parametrize(("case", "fast"), ROWS, ids=[c.desc for c, _ in ROWS])
def test_fast_path_rows(dp, case: Case, fast: bool) -> None:  # type: ignore[no-untyped-def]
    """Each row does what it says, and the fast path takes exactly the rows it should."""
    before = fast_taken(dp)
    check(dp, case)
    assert fast_taken(dp) - before == int(fast)


def _outcome(dp: Datapath, case: Case, prog: str) -> tuple[object, ...]:
    """Everything a run of prog on the case's packet shows, from the case's set-up."""
    prepare(dp, case)
    counters, tables = dp.counter_values(), dp.table_counter_values()
    t0 = dp.clock()
    run = dp.run(prog, bytes(case.packet), case.iface, case.gso_size)
    t1 = dp.clock()
    after, tables_after = dp.counter_values(), dp.table_counter_values()
    return (
        run.retval,
        dp.redirected_to(),
        run.data,
        {k: after[k] - counters[k] for k in after if after[k] != counters[k]},
        {k: tables_after[k] - tables[k] for k in tables_after if tables_after[k] != tables[k]},
        dp.table(t0, t1),
        dp.vm_addr_rows(),
        dp.usage_rows(),
        dp.refused_rows(),
    )


def _established(case: Case) -> Case:
    """The case with its guests' MACs known and its TCP entries established:
    the set-up the fast paths look for."""
    setup = tuple(e.but(state=EST, table=CONFIRMED) if _is_tcp(e.key) else e for e in case.setup)
    return replace(
        case,
        desc=case.desc + " [established, MACs known]",
        setup=setup,
        vm_macs=case.vm_macs or VM_MACS,
    )


def _is_tcp(key: Key) -> bool:
    return TCP in key.frame


TABLES = [
    *test_vmport.CASES,
    *test_uplink.ALL,
    *test_conntrack.ALL,
    *test_malformed.CASES,
    *test_failover.CASES,
    *test_scope.CASES,
    *test_vm_untagged.ROWS,
    *(c for c, _ in ROWS),
]
SAME = [c for c in TABLES if c.prog in GENERAL]
SAME += [_established(c) for c in SAME]


def test_the_tables_reach_the_fast_paths(dp) -> None:  # type: ignore[no-untyped-def]
    """The comparison below is worth something only if the fast paths take
    part of its rows: of both programs, a good number."""
    taken = {UPLINK: 0, VMPORT: 0}
    for case in SAME:
        before = fast_taken(dp)
        _outcome(dp, case, case.prog)
        taken[case.prog] += fast_taken(dp) - before
    assert taken[UPLINK] >= 10 and taken[VMPORT] >= 10, taken


@pytest.mark.parametrize("case", SAME, ids=ids(SAME))
def test_fast_path_does_what_the_general_path_does(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    """lh_uplink / lh_vmport (fast path first) and the general path alone
    leave the same verdict, frame, counters and tables."""
    assert _outcome(dp, case, case.prog) == _outcome(dp, case, GENERAL[case.prog])
