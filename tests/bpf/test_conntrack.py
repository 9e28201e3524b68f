"""Connection states, the two tables, and what a VM may open.

A client opens a connection to VM 1 through firewall B; VM 1 answers by
its own gateway (firewall A), and lh_vmport sends the answer back to B:

    client --SYN--> fw B --> up1 [lh_uplink] --------> VM 1
    client <-SYN-ACK- fw B <-- up1 <-- vm1 [lh_vmport] <- VM 1 (to fw A)
    client --ACK--> fw B --> up1: handshake done, lh_pending -> lh_conns

Each row starts from one entry in the state under test and sends one
packet; it checks the verdict, the frame, the counters (per interface and
table-wide), both tables, lh_vm_addrs and lh_vm_usage afterwards. The expiry
pass (lh_expire) runs on tables written directly, with ages against the
data path's clock.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Packet

from lasthop import abi
from lasthop.datapath import request_expiry
from lasthop.libbpf import BpfObject
from packets import (
    IP6_VM_1,
    IP_CLIENT_B,
    IP_VM_1,
    IP_VM_2,
    MAC_FW_B,
    MAC_VM_1,
    PORT_CLIENT,
    PORT_HTTP,
    echo4_reply,
    echo4_request,
    eth,
    tcp4_reply,
    tcp4_request,
    tcp6_reply,
    tcp6_request,
    udp4_reply,
    udp4_request,
)

from .conftest import TestNetns
from .harness import (
    CONFIRMED,
    EITHER,
    HOP,
    MARKS,
    PENDING,
    ST,
    TC,
    TC_ACT_REDIRECT,
    UPLINK,
    VMPORT,
    C,
    Case,
    Datapath,
    Entry,
    Iface,
    Key,
    bridged,
    check,
    ids,
)

pytestmark = MARKS

ORIG = abi.VmAddrOrigin
ORIGIN = abi.F_ENTRY_VM_ORIGIN
FIN_O = abi.F_ENTRY_FIN_OPENER
FIN_A = abi.F_ENTRY_FIN_ANSWERER

# ---------------------------------------------------------------- frames

SYN = tcp4_request("S")  # the client opens
SEQ_CLIENT = SYN[TCP].seq
SYN_ACK = tcp4_reply("SA")  # VM 1 answers
SEQ_VM = SYN_ACK[TCP].seq
assert SYN_ACK[TCP].ack == SEQ_CLIENT + 1


def client(flags: str, ack: int = SEQ_VM + 1) -> Packet:
    """The client's next segment (after its SYN), through firewall B."""
    return (
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags=flags, seq=SEQ_CLIENT + 1, ack=ack)
    )


ACK = client("A")  # completes the handshake
ACK_WRONG = client("A", ack=SEQ_VM + 2)  # an ACK of a SYN-ACK it never saw
DATA = tcp4_request("A")  # a segment of a connection the table lost
VM_DATA = tcp4_reply("A")
VM_RST = tcp4_reply("R")
VM_FIN = tcp4_reply("FA")
CLIENT_FIN = client("FA")
CLIENT_RST = client("R", ack=0)
VM_SYN = tcp4_reply("S")  # VM 1 opens a connection to the client's address
SERVER_SYN_ACK = tcp4_request("SA")  # ... and the client's side answers it
SPOOFED_SYN = (
    eth(MAC_VM_1, MAC_FW_B)
    / IP(src=IP_VM_2, dst=IP_CLIENT_B)
    / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags="S")
)  # VM 1 as VM 2
QUERY, ANSWER = udp4_request(), udp4_reply()
PING, PONG = echo4_request(), echo4_reply()

# ---------------------------------------------------------------- entries and rows


def conn(state: abi.State, table: str = PENDING, frame: Packet = SYN, **kw) -> Entry:  # type: ignore[no-untyped-def]
    """The client's connection, learned from firewall B on up1."""
    return Entry(
        Key(frame),
        mac=MAC_FW_B,
        iface="up1",
        state=state,
        table=table,
        packets=kw.pop("packets", 1),
        **kw,
    )


def vm_opened(state: abi.State, table: str = PENDING, **kw) -> Entry:  # type: ignore[no-untyped-def]
    """The connection VM 1 opened to the client's address; no last hop yet."""
    return Entry(
        Key(VM_SYN, reverse=True),
        flags=kw.pop("flags", ORIGIN),
        packets=0,
        vm="vm1",
        state=state,
        table=table,
        **kw,
    )


def counted(iface: str, *reasons: abi.Counter) -> dict[tuple[str, abi.Counter], int]:
    return {(iface, r): 1 for r in reasons}


PROMOTED = {TC.PENDING_PROMOTED: 1, TC.CONFIRMED_INSERTED: 1}
MOVED = {TC.STATE_CHANGES: 1}


def _table_counters(before: Entry, changes: dict, kw: dict) -> dict:  # type: ignore[type-arg]
    """The row's table counters: those it names, and one state change when
    its *changes* move the entry to another state."""
    counts = dict(kw.pop("table_counters", {}))
    if changes.get("state", before.state) != before.state:
        counts |= MOVED
    return counts


def client_says(
    desc: str,
    frame: Packet,
    before: Entry,
    changes: dict,  # type: ignore[type-arg]
    also: tuple[abi.Counter, ...] = (),
    **kw,
) -> Case:  # type: ignore[no-untyped-def]
    """A row: the client's frame on up1 refreshes *before*, which then has *changes*."""
    after = before.but(packets=before.packets + 1, seen="now", **changes)
    return Case(
        desc,
        UPLINK,
        "up1",
        frame,
        setup=(before,),
        after=(after,),
        counters=counted("up1", C.REFRESHED, *also),
        table_counters=_table_counters(before, changes, kw),
        **kw,
    )


def vm_says(
    desc: str,
    frame: Packet,
    before: Entry,
    changes: dict,  # type: ignore[type-arg]
    also: tuple[abi.Counter, ...] = (),
    **kw,
) -> Case:  # type: ignore[no-untyped-def]
    """A row: VM 1's frame goes back to firewall B on up1; *before* then has *changes*."""
    after = before.but(replies=before.replies + 1, seen="now", **changes)
    return Case(
        desc,
        VMPORT,
        "vm1",
        frame,
        setup=(before,),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(frame),
        after=(after,),
        counters=counted("vm1", C.REDIRECTED, *also),
        table_counters=_table_counters(before, changes, kw),
        **kw,
    )


VM1_LEARNED = (("vm1", IP_VM_1, ORIG.LEARNED),)

# ---------------------------------------------------------------- TCP

TCP_ROWS = [
    Case(
        "the client's SYN: a pending entry, SYN sent",
        UPLINK,
        "up1",
        SYN,
        after=(conn(ST.TCP_SYN_SENT, seen="now"),),
        counters=counted("up1", C.LEARNED),
        table_counters={TC.PENDING_INSERTED: 1},
    ),
    vm_says(
        "the VM's SYN-ACK: SYN received, seq = its seq + 1, the VM's address learned",
        SYN_ACK,
        conn(ST.TCP_SYN_SENT),
        {"state": ST.TCP_SYN_RECV, "seq": SEQ_VM + 1},
        also=(C.VM_ADDR_LEARNED,),
        vm_addrs_after=VM1_LEARNED,
    ),
    client_says(
        "the client's ACK of the SYN-ACK: established, moved into lh_conns",
        ACK,
        conn(ST.TCP_SYN_RECV, seq=SEQ_VM + 1),
        {"state": ST.TCP_ESTABLISHED, "table": CONFIRMED},
        also=(C.CONFIRMED,),
        table_counters=PROMOTED,
    ),
    client_says(
        "an ACK with the wrong number confirms nothing",
        ACK_WRONG,
        conn(ST.TCP_SYN_RECV, seq=SEQ_VM + 1),
        {},
    ),
    client_says("an ACK before any SYN-ACK confirms nothing", ACK, conn(ST.TCP_SYN_SENT), {}),
    client_says(
        "a SYN-ACK from the opener's side answers nothing", client("SA"), conn(ST.TCP_SYN_SENT), {}
    ),
    client_says("the client's SYN sent again: still SYN sent", SYN, conn(ST.TCP_SYN_SENT), {}),
    vm_says(
        "a SYN-ACK sent again takes its seq; the address is learned only once",
        SYN_ACK,
        conn(ST.TCP_SYN_RECV, seq=1),
        {"seq": SEQ_VM + 1},
    ),
    vm_says(
        "the VM's RST to a SYN: closed, still pending",
        VM_RST,
        conn(ST.TCP_SYN_SENT),
        {"state": ST.TCP_CLOSED},
        also=(C.VM_ADDR_LEARNED,),
        vm_addrs_after=VM1_LEARNED,
    ),
    Case(
        "a mid-stream segment of an unknown connection: pending, mid-stream",
        UPLINK,
        "up1",
        DATA,
        after=(conn(ST.TCP_MIDSTREAM, seen="now"),),
        counters=counted("up1", C.LEARNED),
        table_counters={TC.PENDING_INSERTED: 1},
    ),
    vm_says(
        "the VM's answer to a mid-stream connection confirms it",
        VM_DATA,
        conn(ST.TCP_MIDSTREAM),
        {"state": ST.TCP_ESTABLISHED, "table": CONFIRMED},
        also=(C.CONFIRMED,),
        table_counters=PROMOTED,
    ),
    client_says(
        "the client speaking again mid-stream confirms nothing", DATA, conn(ST.TCP_MIDSTREAM), {}
    ),
    vm_says(
        "a RST answer to a mid-stream connection closes it, unconfirmed",
        VM_RST,
        conn(ST.TCP_MIDSTREAM),
        {"state": ST.TCP_CLOSED},
    ),
    vm_says(
        "a SYN-ACK answer to a mid-stream connection confirms nothing",
        SYN_ACK,
        conn(ST.TCP_MIDSTREAM),
        {},
    ),
    client_says(
        "the client's FIN: closing",
        CLIENT_FIN,
        conn(ST.TCP_ESTABLISHED, CONFIRMED),
        {"state": ST.TCP_CLOSING, "flags": HOP | FIN_O},
    ),
    vm_says(
        "the VM's FIN first: closing",
        VM_FIN,
        conn(ST.TCP_ESTABLISHED, CONFIRMED),
        {"state": ST.TCP_CLOSING, "flags": HOP | FIN_A},
    ),
    vm_says(
        "the VM's FIN after the client's: closed",
        VM_FIN,
        conn(ST.TCP_CLOSING, CONFIRMED, flags=HOP | FIN_O),
        {"state": ST.TCP_CLOSED, "flags": HOP | FIN_O | FIN_A},
    ),
    client_says(
        "the client's FIN sent again: still closing",
        CLIENT_FIN,
        conn(ST.TCP_CLOSING, CONFIRMED, flags=HOP | FIN_O),
        {},
    ),
    client_says(
        "the client's RST closes an established connection",
        CLIENT_RST,
        conn(ST.TCP_ESTABLISHED, CONFIRMED),
        {"state": ST.TCP_CLOSED},
    ),
    client_says("a FIN on SYN sent is no close", client("FA"), conn(ST.TCP_SYN_SENT), {}),
    client_says(
        "a SYN on a closed tuple: a new connection in the same entry, FINs cleared",
        SYN,
        conn(ST.TCP_CLOSED, CONFIRMED, flags=HOP | FIN_O | FIN_A),
        {"state": ST.TCP_SYN_SENT, "flags": HOP},
    ),
    client_says(
        "a SYN on a closing tuple starts again too",
        SYN,
        conn(ST.TCP_CLOSING, CONFIRMED, flags=HOP | FIN_A),
        {"state": ST.TCP_SYN_SENT, "flags": HOP},
    ),
    client_says(
        "a SYN on an established connection changes no state",
        SYN,
        conn(ST.TCP_ESTABLISHED, CONFIRMED),
        {},
    ),
    vm_says(
        "a SYN from the answerer on a closed tuple does not reopen it",
        tcp4_reply("S"),
        conn(ST.TCP_CLOSED, CONFIRMED),
        {},
    ),
    Case(
        "a RST of no known connection is not learned",
        UPLINK,
        "up1",
        CLIENT_RST,
        counters=counted("up1", C.RST_UNKNOWN),
    ),
    Case(
        "a RST-ACK of no known connection is not learned",
        UPLINK,
        "up1",
        client("RA"),
        counters=counted("up1", C.RST_UNKNOWN),
    ),
]

# ---------------------------------------------------------------- UDP and ICMP

UDP_ICMP_ROWS = [
    vm_says(
        "UDP: the VM's answer: answered, its address learned",
        ANSWER,
        conn(ST.UDP_NEW, frame=QUERY),
        {"state": ST.UDP_ANSWERED},
        also=(C.VM_ADDR_LEARNED,),
        vm_addrs_after=VM1_LEARNED,
    ),
    client_says(
        "UDP: the client speaks after the answer: a stream, confirmed",
        QUERY,
        conn(ST.UDP_ANSWERED, frame=QUERY),
        {"state": ST.UDP_STREAM, "table": CONFIRMED},
        also=(C.CONFIRMED,),
        table_counters=PROMOTED,
    ),
    client_says(
        "UDP: the client again with no answer yet: still new",
        QUERY,
        conn(ST.UDP_NEW, frame=QUERY),
        {},
    ),
    vm_says(
        "UDP: the VM again after its answer: still answered",
        ANSWER,
        conn(ST.UDP_ANSWERED, frame=QUERY),
        {},
    ),
    client_says(
        "UDP: a stream stays a stream", QUERY, conn(ST.UDP_STREAM, CONFIRMED, frame=QUERY), {}
    ),
    vm_says(
        "ICMP: the echo reply: answered, the VM's address learned",
        PONG,
        conn(ST.ICMP_NEW, frame=PING),
        {"state": ST.ICMP_ANSWERED},
        also=(C.VM_ADDR_LEARNED,),
        vm_addrs_after=VM1_LEARNED,
    ),
    client_says(
        "ICMP: the next echo request: a ping is never confirmed",
        PING,
        conn(ST.ICMP_ANSWERED, frame=PING),
        {},
    ),
]

# ---------------------------------------------------------------- what a VM may open

QUOTA_FULL = (("vm1", (5, 4, 1)),)  # in use: counted 1 + created since the pass 5 - 4 = 2

VM_ADDR_ROWS = [
    Case(
        "a VM's SYN from an address it does not own: not remembered",
        VMPORT,
        "vm1",
        VM_SYN,
        counters=counted("vm1", C.VM_ORIGIN_SPOOFED),
    ),
    Case(
        "a VM's SYN from another VM's address: not remembered",
        VMPORT,
        "vm1",
        SPOOFED_SYN,
        vm_addrs=(("vm1", IP_VM_1), ("vm2", IP_VM_2)),
        counters=counted("vm1", C.VM_ORIGIN_SPOOFED),
    ),
    Case(
        "a VM's SYN from its own address on another port: not remembered",
        VMPORT,
        "vm1",
        VM_SYN,
        vm_addrs=(("vm2", IP_VM_1),),
        counters=counted("vm1", C.VM_ORIGIN_SPOOFED),
    ),
    Case(
        "a VM's SYN from its configured address: remembered, pending",
        VMPORT,
        "vm1",
        VM_SYN,
        vm_addrs=(("vm1", IP_VM_1),),
        after=(vm_opened(ST.TCP_SYN_SENT, seen="now"),),
        counters=counted("vm1", C.VM_ORIGIN_LEARNED),
        table_counters={TC.PENDING_INSERTED: 1},
        vm_usage_after=(("vm1", (1, 0, 0)),),
    ),
    Case(
        "a VM's SYN from an address it was learned to own: remembered",
        VMPORT,
        "vm1",
        VM_SYN,
        vm_addrs=(("vm1", IP_VM_1, ORIG.LEARNED),),
        after=(vm_opened(ST.TCP_SYN_SENT, seen="now"),),
        counters=counted("vm1", C.VM_ORIGIN_LEARNED),
        table_counters={TC.PENDING_INSERTED: 1},
        vm_usage_after=(("vm1", (1, 0, 0)),),
    ),
    Case(
        "a VM's datagram from a service address of its pool: remembered",
        VMPORT,
        "vm1",
        ANSWER,
        vm_addrs=(("vm1", IP_VM_1, ORIG.SERVICE),),
        after=(vm_opened(ST.UDP_NEW, seen="now").but(key=Key(ANSWER, reverse=True)),),
        counters=counted("vm1", C.VM_ORIGIN_LEARNED),
        table_counters={TC.PENDING_INSERTED: 1},
        vm_usage_after=(("vm1", (1, 0, 0)),),
    ),
    Case(
        "quota reached (counted + created since the pass): not remembered",
        VMPORT,
        "vm1",
        VM_SYN,
        vm_addrs=(("vm1", IP_VM_1),),
        vm_quota=2,
        vm_usage=QUOTA_FULL,
        counters=counted("vm1", C.VM_ORIGIN_QUOTA),
    ),
    Case(
        "room in the quota: remembered, created + 1",
        VMPORT,
        "vm1",
        VM_SYN,
        vm_addrs=(("vm1", IP_VM_1),),
        vm_quota=3,
        vm_usage=QUOTA_FULL,
        after=(vm_opened(ST.TCP_SYN_SENT, seen="now"),),
        counters=counted("vm1", C.VM_ORIGIN_LEARNED),
        table_counters={TC.PENDING_INSERTED: 1},
        vm_usage_after=(("vm1", (6, 4, 1)),),
    ),
    Case(
        "quota 0 is no limit",
        VMPORT,
        "vm1",
        VM_SYN,
        vm_addrs=(("vm1", IP_VM_1),),
        vm_usage=(("vm1", (1000, 0, 1000)),),
        after=(vm_opened(ST.TCP_SYN_SENT, seen="now"),),
        counters=counted("vm1", C.VM_ORIGIN_LEARNED),
        table_counters={TC.PENDING_INSERTED: 1},
        vm_usage_after=(("vm1", (1001, 0, 1000)),),
    ),
    Case(
        "another port's quota is not this one's",
        VMPORT,
        "vm1",
        VM_SYN,
        vm_addrs=(("vm1", IP_VM_1),),
        vm_quota=2,
        vm_usage=(("vm2", (5, 4, 1)),),
        after=(vm_opened(ST.TCP_SYN_SENT, seen="now"),),
        counters=counted("vm1", C.VM_ORIGIN_LEARNED),
        table_counters={TC.PENDING_INSERTED: 1},
        vm_usage_after=(("vm1", (1, 0, 0)), ("vm2", (5, 4, 1))),
    ),
    vm_says(
        "v6: the VM's SYN-ACK teaches its IPv6 address",
        tcp6_reply("SA"),
        conn(ST.TCP_SYN_SENT, frame=tcp6_request()),
        {"state": ST.TCP_SYN_RECV, "seq": SEQ_VM + 1},
        also=(C.VM_ADDR_LEARNED,),
        vm_addrs_after=(("vm1", IP6_VM_1, ORIG.LEARNED),),
    ),
    vm_says(
        "a port with fixed addresses learns none",
        SYN_ACK,
        conn(ST.TCP_SYN_SENT),
        {"state": ST.TCP_SYN_RECV, "seq": SEQ_VM + 1},
        iface_flags=(("vm1", abi.F_IFACE_ADDRS_FIXED),),
    ),
    vm_says(
        "a configured address stays configured",
        SYN_ACK,
        conn(ST.TCP_SYN_SENT),
        {"state": ST.TCP_SYN_RECV, "seq": SEQ_VM + 1},
        vm_addrs=(("vm1", IP_VM_1),),
    ),
    vm_says(
        "a service connection's answer teaches nothing (the agent grants virtual addresses)",
        SYN_ACK,
        conn(ST.TCP_SYN_SENT, vm="vm1"),
        {"state": ST.TCP_SYN_RECV, "seq": SEQ_VM + 1},
    ),
    Case(
        "the client's SYN on a VM-opened tuple supersedes it: a new connection",
        UPLINK,
        "up1",
        SYN,
        setup=(vm_opened(ST.TCP_SYN_SENT),),
        after=(conn(ST.TCP_SYN_SENT, seen="now"),),
        counters=counted("up1", C.LEARNED, C.VM_ORIGIN_SUPERSEDED),
        table_counters={TC.PENDING_REMOVED: 1, TC.PENDING_INSERTED: 1},
    ),
    Case(
        "... a confirmed VM-opened tuple too",
        UPLINK,
        "up1",
        SYN,
        setup=(vm_opened(ST.TCP_ESTABLISHED, CONFIRMED),),
        after=(conn(ST.TCP_SYN_SENT, seen="now"),),
        counters=counted("up1", C.LEARNED, C.VM_ORIGIN_SUPERSEDED),
        table_counters={TC.CONFIRMED_REMOVED: 1, TC.PENDING_INSERTED: 1},
    ),
    Case(
        "the answer a VM-opened connection waits for: SYN received",
        UPLINK,
        "up1",
        SERVER_SYN_ACK,
        setup=(vm_opened(ST.TCP_SYN_SENT),),
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="vm1",
        after=(
            vm_opened(
                ST.TCP_SYN_RECV,
                seq=SEQ_CLIENT + 1,
                mac=MAC_FW_B,
                iface="up1",
                flags=ORIGIN | HOP,
                seen="now",
            ).but(packets=1),
        ),
        counters=counted("up1", C.VM_ORIGIN_HOP, C.VM_ORIGIN_RETURNED),
        table_counters=MOVED,
    ),
    vm_says(
        "the VM's ACK of the answer confirms the connection it opened",
        VM_DATA,
        vm_opened(
            ST.TCP_SYN_RECV, seq=SEQ_CLIENT + 1, mac=MAC_FW_B, iface="up1", flags=ORIGIN | HOP
        ),
        {"state": ST.TCP_ESTABLISHED, "table": CONFIRMED},
        also=(C.CONFIRMED,),
        table_counters=PROMOTED,
    ),
]

ALL = TCP_ROWS + UDP_ICMP_ROWS + VM_ADDR_ROWS


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_conntrack(dp: Datapath, case: Case) -> None:
    check(dp, case)


# ---------------------------------------------------------------- confirmed table full


@pytest.fixture(scope="module")
def tiny(test_object: Path, topology: dict[str, Iface]) -> Iterator[Datapath]:
    """The object with room for one confirmed connection."""
    obj = BpfObject(
        test_object,
        pin_root=None,
        max_entries={"lh_conns4": 1, "lh_pending4": 64, "lh_conns": 1, "lh_pending": 64},
    )
    try:
        yield Datapath(obj, topology)
    finally:
        obj.close()


@pytest.fixture
def full(tiny: Datapath, test_netns: TestNetns) -> Iterator[Datapath]:
    test_netns.enter()
    try:
        tiny.reset()
        yield tiny
    finally:
        test_netns.leave()


# another established connection of the client's: it fills lh_conns
OTHER = Entry(
    Key(
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / TCP(sport=PORT_CLIENT + 1, dport=PORT_HTTP)
    ),
    mac=MAC_FW_B,
    iface="up1",
    state=ST.TCP_ESTABLISHED,
)

FULL_ROWS = [
    client_says(
        "confirmed table full: the handshake's ACK is refused, the entry stays pending",
        ACK,
        conn(ST.TCP_SYN_RECV, seq=SEQ_VM + 1),
        {"state": ST.TCP_ESTABLISHED},
        also=(C.CONFIRM_REFUSED,),
        table_counters={TC.CONFIRM_REFUSED: 1},
    ),
    vm_says(
        "confirmed table full: a mid-stream answer is refused too",
        VM_DATA,
        conn(ST.TCP_MIDSTREAM),
        {"state": ST.TCP_ESTABLISHED},
        also=(C.CONFIRM_REFUSED,),
        table_counters={TC.CONFIRM_REFUSED: 1},
    ),
    vm_says(
        "confirmed table full: a refused connection's replies still go to its last hop",
        VM_DATA,
        conn(ST.TCP_ESTABLISHED),
        {},
    ),
]


@pytest.mark.parametrize("case", FULL_ROWS, ids=ids(FULL_ROWS))
def test_confirmed_table_full(full: Datapath, case: Case) -> None:
    """lh_conns holds OTHER and has no room: a connection that proves itself stays pending."""
    check(
        full, replace(case, setup=(*case.setup, OTHER), after=(*(case.after or case.setup), OTHER))
    )


# ---------------------------------------------------------------- expiry

HZ = 1000  # jiffies per second, as settings.hz says (the ages below are in jiffies)
TIMEOUTS = {
    ST.NONE: 600,
    ST.TCP_SYN_SENT: 10,
    ST.TCP_SYN_RECV: 10,
    ST.TCP_MIDSTREAM: 60,
    ST.TCP_ESTABLISHED: 7440,
    ST.TCP_CLOSING: 120,
    ST.TCP_CLOSED: 10,
    ST.UDP_NEW: 30,
    ST.UDP_ANSWERED: 30,
    ST.UDP_STREAM: 180,
    ST.ICMP_NEW: 30,
    ST.ICMP_ANSWERED: 30,
}
MARGIN = 5 * HZ  # far from the boundary: the clock moves while the test runs


def keyed(n: int) -> Key:
    """A distinct client connection per n (source port)."""
    return Key(
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / TCP(sport=20000 + n, dport=PORT_HTTP)
    )


def remaining(dp: Datapath) -> dict[bytes, tuple[str, abi.State]]:
    return {k: (v.table, v.state) for k, v in dp.table().items()}


def stats_by_state(rows: object, t: int) -> dict[abi.State, int]:
    return {s: int(rows[t][s]) for s in ST if rows[t][s]}  # type: ignore[index]


def test_expire_removes_each_state_past_its_timeout(dp: Datapath) -> None:
    """Per state, an entry idle past its timeout goes and one inside it stays, in
    both tables; lh_expiry counts what is live and what expired, by table and
    state, and the table counters the removals."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)
    now = dp.clock()
    keep, gone = {}, {}
    n = 0
    for state, seconds in TIMEOUTS.items():
        for table in (CONFIRMED, PENDING):
            for old, into in ((seconds * HZ + MARGIN, gone), (seconds * HZ - MARGIN, keep)):
                if old < 0:
                    old = 0
                key = keyed(n)
                n += 1
                dp.put(
                    Entry(key, mac=MAC_FW_B, iface="up1", state=state, table=table),
                    last_seen=(now - old) % 2**32,
                )
                into[key.pack()] = (table, state)
    before = dp.table_counter_values()
    assert dp.expire() == 1
    after = dp.table_counter_values()

    assert remaining(dp) == keep
    st = dp.expiry_stats()
    per_table = len(TIMEOUTS)
    assert st.passes == 1
    assert stats_by_state(st.live, 0) == dict.fromkeys(TIMEOUTS, 1)
    assert stats_by_state(st.live, 1) == dict.fromkeys(TIMEOUTS, 1)
    assert stats_by_state(st.expired, 0) == dict.fromkeys(TIMEOUTS, 1)
    assert stats_by_state(st.expired, 1) == dict.fromkeys(TIMEOUTS, 1)
    assert (st.started - now) % 2**32 < 10 * HZ and (st.finished - st.started) % 2**32 < HZ
    deltas = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert deltas == {
        TC.CONFIRMED_EXPIRED: per_table,
        TC.PENDING_EXPIRED: per_table,
        TC.EXPIRY_PASSES: 1,
    }


def test_expired_counts_add_up_over_passes_and_live_counts_do_not(dp: Datapath) -> None:
    """live[] is what the last pass left; expired[] accumulates."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)
    now = dp.clock()
    for n in range(2):
        dp.put(
            Entry(keyed(n), state=ST.UDP_NEW, table=PENDING),
            last_seen=(now - 31 * HZ - MARGIN) % 2**32,
        )
    dp.put(Entry(keyed(9), state=ST.UDP_NEW, table=PENDING), last_seen=now)
    dp.expire()
    dp.put(
        Entry(keyed(3), state=ST.UDP_NEW, table=PENDING), last_seen=(now - 31 * HZ - MARGIN) % 2**32
    )
    dp.expire()
    st = dp.expiry_stats()
    assert (st.passes, st.live[1][ST.UDP_NEW], st.expired[1][ST.UDP_NEW]) == (2, 1, 3)
    assert remaining(dp) == {keyed(9).pack(): (PENDING, ST.UDP_NEW)}


def test_an_entry_refreshed_after_the_pass_read_the_clock_is_kept(dp: Datapath) -> None:
    """last_seen slightly ahead of the clock (another CPU refreshed it while the
    pass ran) is an age below zero, not 2^32 jiffies: kept, even with a timeout of 0."""
    dp.set_settings(0, hz=HZ, timeouts={ST.TCP_ESTABLISHED: 0})
    now = dp.clock()
    ahead = Entry(keyed(1), state=ST.TCP_ESTABLISHED)
    behind = Entry(keyed(2), state=ST.TCP_ESTABLISHED)
    dp.put(ahead, last_seen=(now + 2 * HZ) % 2**32)
    dp.put(behind, last_seen=(now - MARGIN) % 2**32)
    dp.expire()
    assert remaining(dp) == {keyed(1).pack(): (CONFIRMED, ST.TCP_ESTABLISHED)}
    raw = dp.conns.lookup(keyed(1).pack())
    assert raw is not None
    assert abi.ConnEntry.from_buffer_copy(raw[: ctypes.sizeof(abi.ConnEntry)]).last_seen == (
        (now + 2 * HZ) % 2**32
    )


WALKED, SKIPPED = 1, 2  # lh_expire's verdicts


def back_date(dp: Datapath, jiffies: int) -> None:
    """Moves the last walk's start (and so every moment reckoned from it) back."""
    st = dp.expiry_stats()
    st.started = (st.started - jiffies) % 2**32
    dp.expiry.update(bytes(4), bytes(st))


def test_a_table_at_rest_is_not_walked(dp: Datapath) -> None:
    """After a walk, runs that find no change and no entry due skip the walk
    (counted); the live counts the walk left stay; a refresh is no change."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)
    dp.put(conn(ST.TCP_ESTABLISHED, CONFIRMED), last_seen=dp.clock())
    assert dp.expire() == WALKED
    before = dp.table_counter_values()
    assert [dp.expire() for _ in range(3)] == [SKIPPED] * 3
    assert dp.run(UPLINK, bytes(client("A")), "up1").retval is not None  # a refresh
    assert dp.expire() == SKIPPED
    after = dp.table_counter_values()
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        TC.EXPIRY_SKIPPED: 4
    }
    st = dp.expiry_stats()
    assert (st.passes, st.skipped, stats_by_state(st.live, 0)) == (
        1, 4, {ST.TCP_ESTABLISHED: 1},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "frame", "live"),
    [
        ("a new connection", SYN, {ST.TCP_ESTABLISHED: 1, ST.TCP_SYN_SENT: 1}),
        ("a state move (FIN)", CLIENT_FIN, {ST.TCP_CLOSING: 1}),
    ],
)
def test_a_change_by_the_data_path_makes_a_run_walk(
    dp: Datapath, change: str, frame: Packet, live: dict[abi.State, int]
) -> None:
    """Once the shortest timeout less the lead has passed since the last walk
    began, a change (a new entry, a state move) makes the next run walk; with
    no change, that run skips."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)
    established = conn(ST.TCP_ESTABLISHED, CONFIRMED)
    dp.put(established if frame is CLIENT_FIN else established.but(key=keyed(1)), dp.clock())
    assert (dp.expire(), dp.expire()) == (WALKED, SKIPPED)
    back_date(dp, 10 * HZ)  # the shortest timeout (10 s) has passed
    assert dp.expire() == SKIPPED  # no change yet
    dp.run(UPLINK, bytes(frame), "up1")
    assert dp.expire() == WALKED, change
    st = dp.expiry_stats()
    assert stats_by_state(st.live, 0) | stats_by_state(st.live, 1) == live


def test_a_request_from_user_space_makes_the_next_run_walk(dp: Datapath) -> None:
    """Entries written or removed by the agent are no change the data path saw:
    the writer's token asks for a walk."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)
    assert (dp.expire(), dp.expire()) == (WALKED, SKIPPED)
    request_expiry(dp.expiry_request)
    assert (dp.expire(), dp.expire()) == (WALKED, SKIPPED)


def test_a_change_waits_until_a_walk_can_still_file_it_in_time(dp: Datapath) -> None:
    """A change by the data path calls for a walk only once the shortest
    timeout less the lead has passed since the last walk began: an entry it
    made is not due before then, and that walk meets it in time. A request
    from user space walks at once."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)  # shortest: 10 s
    dp.put(conn(ST.TCP_ESTABLISHED, CONFIRMED).but(key=keyed(1)), dp.clock())
    assert dp.expire() == WALKED
    lead = dp.expiry_stats().lead
    assert HZ * 2 <= lead < HZ * 3  # EXPIRY_LEAD_MS + twice a walk of two entries
    dp.run(UPLINK, bytes(SYN), "up1")
    assert dp.expire() == SKIPPED
    back_date(dp, 10 * HZ - lead - MARGIN)  # not yet
    assert dp.expire() == SKIPPED
    back_date(dp, MARGIN)
    assert dp.expire() == WALKED
    st = dp.expiry_stats()
    assert stats_by_state(st.live, 0) | stats_by_state(st.live, 1) == {
        ST.TCP_ESTABLISHED: 1, ST.TCP_SYN_SENT: 1,
    }  # fmt: skip


def wait_clock(dp: Datapath, jiffy: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while (dp.clock() - jiffy) % 2**32 >= 2**31:
        assert time.monotonic() < deadline, "the clock did not reach the deadline"
        time.sleep(0.02)


def expire_until_gone(dp: Datapath, key: bytes, due: int) -> list[int]:
    """Runs lh_expire once a jiffy until the entry *key* is gone, checking it
    is still there after every run before its deadline *due*; the verdicts."""
    verdicts = []
    while key in dp.table():
        t = dp.clock()
        verdicts.append(dp.expire())
        if (t - due) % 2**32 >= 2**31:  # before the deadline: still there
            assert key in dp.table()
        wait_clock(dp, (t + 1) % 2**32)
        assert len(verdicts) < 10_000
    return verdicts


SOON = 100  # jiffies: well inside the horizon (twice the lead, >= 4 s)


@pytest.mark.parametrize(
    ("table", "frame"),
    [(PENDING, SYN), (CONFIRMED, SYN), (PENDING, tcp6_request())],
    ids=["pending v4", "confirmed v4", "pending v6"],
)
def test_an_entry_due_soon_goes_at_its_deadline_without_another_walk(
    dp: Datapath, table: str, frame: Packet
) -> None:
    """The walk files an entry due within its horizon in lh_expiry_due (key,
    deadline, table); runs before the deadline skip; the first run after it
    removes the entry without walking (the drain), counted as a walk's removal
    is; the index is empty after, and the next walk is not brought forward."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)
    now = dp.clock()
    gone_at = (now + SOON + 1) % 2**32  # the first jiffy it is idle past its timeout
    soon = conn(ST.UDP_NEW, table, frame)
    dp.put(soon, last_seen=(now + SOON - TIMEOUTS[ST.UDP_NEW] * HZ) % 2**32)
    dp.put(conn(ST.TCP_ESTABLISHED, CONFIRMED).but(key=keyed(1)), last_seen=now)
    assert dp.expire() == WALKED
    assert dp.expiry_index() == {soon.key.pack(): (gone_at, table)}
    st = dp.expiry_stats()
    assert (st.due_next, st.indexed) == (gone_at, 1)
    assert (st.next_due - now) % 2**32 > TIMEOUTS[ST.TCP_ESTABLISHED] * HZ // 2  # not soon
    before = dp.table_counter_values()
    verdicts = expire_until_gone(dp, soon.key.pack(), gone_at)
    assert set(verdicts) == {SKIPPED}
    assert remaining(dp) == {keyed(1).pack(): (CONFIRMED, ST.TCP_ESTABLISHED)}
    assert dp.expiry_index() == {}
    st = dp.expiry_stats()
    t = 1 if table == PENDING else 0
    assert (st.passes, st.due_expired, st.indexed, st.expired[t][ST.UDP_NEW]) == (1, 1, 0, 1)
    assert st.live[t][ST.UDP_NEW] == 0 and st.live[0][ST.TCP_ESTABLISHED] == 1
    assert st.drains >= 1
    after = dp.table_counter_values()
    expired = TC.PENDING_EXPIRED if table == PENDING else TC.CONFIRMED_EXPIRED
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        expired: 1, TC.EXPIRY_SKIPPED: len(verdicts),
    }  # fmt: skip


def test_an_indexed_entry_refreshed_meanwhile_stays_with_its_new_deadline(dp: Datapath) -> None:
    """A packet after the walk (last_seen moved, no change counted) keeps the
    entry: the drain at the old deadline re-reads it and files the new one; a
    refresh past the horizon takes it out of the index and brings the next
    walk forward to lead before its deadline."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)
    now = dp.clock()
    near, far = conn(ST.UDP_NEW, PENDING), conn(ST.UDP_NEW, PENDING, frame=tcp6_request())
    for e in (near, far):
        dp.put(e, last_seen=(now + SOON - TIMEOUTS[ST.UDP_NEW] * HZ) % 2**32)
    dp.put(conn(ST.TCP_ESTABLISHED, CONFIRMED).but(key=keyed(1)), last_seen=now)
    assert dp.expire() == WALKED
    assert set(dp.expiry_index()) == {near.key.pack(), far.key.pack()}
    lead = dp.expiry_stats().lead
    horizon = 2 * lead
    near_seen = (now + 2 * SOON - TIMEOUTS[ST.UDP_NEW] * HZ) % 2**32  # due SOON later
    far_seen = (now + horizon + 10 * HZ - TIMEOUTS[ST.UDP_NEW] * HZ) % 2**32
    for e, seen in ((near, near_seen), (far, far_seen)):  # as a packet would: no request
        dp.tables[PENDING].update(e.key.pack(), bytes(dp.pack_entry(e, seen)))
    wait_clock(dp, (now + SOON + 1) % 2**32)
    assert dp.expire() == SKIPPED
    near_due = (near_seen + TIMEOUTS[ST.UDP_NEW] * HZ + 1) % 2**32
    far_due = (far_seen + TIMEOUTS[ST.UDP_NEW] * HZ + 1) % 2**32
    assert dp.expiry_index() == {near.key.pack(): (near_due, PENDING)}
    assert set(remaining(dp)) == {near.key.pack(), far.key.pack(), keyed(1).pack()}
    st = dp.expiry_stats()
    assert st.next_due == (far_due - lead) % 2**32
    assert (st.due_next, st.indexed, st.due_expired, st.passes) == (near_due, 1, 0, 1)


CHANGE_COUNTERS = (
    TC.PENDING_INSERTED, TC.PENDING_REMOVED, TC.CONFIRMED_INSERTED, TC.CONFIRMED_REMOVED,
    TC.STATE_CHANGES, TC.INPLACE_INSERTED, TC.INPLACE_CONFIRMED, TC.INPLACE_REMOVED,
)  # fmt: skip  # what lh_expire sums to tell whether the data path changed the table


def test_the_data_path_files_an_entry_whose_timeout_is_shorter_than_the_lead(
    dp: Datapath,
) -> None:
    """A walk may not meet an entry due sooner than the lead, so the data path
    files it itself: a RST moves an established entry to tcp_closed (here 1 s,
    under the lead of >= 2 s); lh_expiry_due holds it at once, due a timeout
    after the packet, its table left to the drain (EITHER); with no walk after
    (the change marked seen), the drain finds it in the confirmed table and
    removes it at its deadline, counted as expired."""
    timeouts = TIMEOUTS | {ST.TCP_CLOSED: 1}
    dp.set_settings(0, hz=HZ, timeouts=timeouts)
    closing = conn(ST.TCP_ESTABLISHED, CONFIRMED)
    dp.put(closing, last_seen=dp.clock())
    dp.put(conn(ST.TCP_ESTABLISHED, CONFIRMED).but(key=keyed(1)), last_seen=dp.clock())
    assert dp.expire() == WALKED
    st = dp.expiry_stats()
    assert st.soon == 1 << ST.TCP_CLOSED and st.lead >= 2 * HZ
    assert dp.expiry_index() == {}
    t0 = dp.clock()
    dp.run(UPLINK, bytes(CLIENT_RST), "up1")
    t1 = dp.clock()
    assert remaining(dp)[closing.key.pack()] == (CONFIRMED, ST.TCP_CLOSED)
    ((key, (due, table)),) = dp.expiry_index().items()
    assert (key, table) == (closing.key.pack(), EITHER)
    assert (due - (t0 + HZ + 1)) % 2**32 <= (t1 - t0) % 2**32
    assert dp.expiry_stats().due_next == due
    # the walk this change calls for would file it too: mark the change seen
    st = dp.expiry_stats()
    counts = dp.table_counter_values()
    st.changes = sum(counts[c] for c in CHANGE_COUNTERS)
    dp.expiry.update(bytes(4), bytes(st))
    verdicts = expire_until_gone(dp, closing.key.pack(), due)
    assert set(verdicts) == {SKIPPED}
    assert remaining(dp) == {keyed(1).pack(): (CONFIRMED, ST.TCP_ESTABLISHED)}
    assert dp.expiry_index() == {}
    st = dp.expiry_stats()
    assert (st.passes, st.due_expired, st.expired[0][ST.TCP_CLOSED]) == (1, 1, 1)
    after = dp.table_counter_values()
    assert after[TC.CONFIRMED_EXPIRED] - counts[TC.CONFIRMED_EXPIRED] == 1


ALL_STATES = (1 << len(ST)) - 1


@pytest.mark.parametrize(
    ("timeouts", "frame", "filed", "gap_s"),
    [
        # tcp_closed (1 s) under the lead: filed; the next shortest, 10 s, sets the gap
        ({ST.TCP_CLOSED: 1}, CLIENT_RST, 1 << ST.TCP_CLOSED, 10),
        # every state under the lead: every change filed, none calls for a walk
        (dict.fromkeys(ST, 1), SYN, ALL_STATES, None),
    ],
    ids=["rst to tcp_closed", "every state filed"],
)
def test_a_change_the_data_path_files_itself_calls_for_no_walk(
    dp: Datapath, timeouts: dict[abi.State, int], frame: Packet, filed: int, gap_s: int | None
) -> None:
    """An entry moved to a state whose timeout is under the lead is in the index
    as soon as the packet has passed (the data path files it), so no walk need
    meet it: such a change does not hurry the next walk (before: a walk at the
    next run, back to back on a changing 10,000,000-entry table). Changes to the
    other states still call for one, a lead before the shortest of theirs."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS | timeouts)
    established = conn(ST.TCP_ESTABLISHED, CONFIRMED)  # the RST's; the SYN's is new
    dp.put(established if frame is CLIENT_RST else established.but(key=keyed(1)), dp.clock())
    assert dp.expire() == WALKED
    lead = dp.expiry_stats().lead
    assert (dp.expiry_stats().soon_since, dp.expire()) == (filed, SKIPPED)
    dp.run(UPLINK, bytes(frame), "up1")
    assert Key(frame).pack() in dp.expiry_index()  # filed by the data path
    assert dp.expire() == SKIPPED
    if gap_s is None:
        back_date(dp, 2**29)  # days: still no walk
        assert dp.expire() == SKIPPED
        return
    back_date(dp, gap_s * HZ - lead - MARGIN)
    assert dp.expire() == SKIPPED
    back_date(dp, MARGIN)
    assert dp.expire() == WALKED


def test_a_filing_the_index_has_no_room_for_asks_for_a_walk(dp: Datapath) -> None:
    """lh_expiry_due full: the data path cannot file the entry, so it asks for
    the walk its change no longer calls for (a new lh_expiry_request token)."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS | {ST.TCP_CLOSED: 1})
    closing = conn(ST.TCP_ESTABLISHED, CONFIRMED)
    dp.put(closing, last_seen=dp.clock())
    assert (dp.expire(), dp.expire()) == (WALKED, SKIPPED)
    size = dp.expiry_due.info.max_entries
    keys = b"".join(_index_key(n) for n in range(size))
    value = bytes(abi.ExpiryDue(deadline=(dp.clock() + 3600 * HZ) % 2**32, table=0))
    dp.expiry_due.update_batch(keys, value * size, size)
    token = dp.expiry_request.lookup(bytes(4))
    dp.run(UPLINK, bytes(CLIENT_RST), "up1")
    assert remaining(dp)[closing.key.pack()] == (CONFIRMED, ST.TCP_CLOSED)
    assert closing.key.pack() not in dp.expiry_index()
    assert dp.expiry_request.lookup(bytes(4)) != token
    assert dp.expire() == WALKED


def _index_key(n: int) -> bytes:
    """A conn_key no test connection has: 10.255.x.y, n spread over x and y."""
    k = abi.ConnKey(family=abi.FAMILY_V4, proto=17, sport=1, dport=1)
    k.saddr[0] = int.from_bytes(bytes([10, 255, n >> 8 & 0xFF, n & 0xFF]), "little")
    k.daddr[0] = n >> 16
    return bytes(k)


def test_a_filing_a_drain_may_have_hidden_is_drained_at_the_next_run(dp: Datapath) -> None:
    """A drain or walk stores the index's earliest deadline at its end; a filing
    by the data path meanwhile may have lowered due_next just before, and be
    hidden. Every filing is counted (lh_expiry.filed), so a run that finds the
    count past the one the last drain or walk began with drains again: here
    the hiding store is written by hand (due_next an hour away) and the entry
    still goes at its deadline, by the drain, without a walk."""
    timeouts = TIMEOUTS | {ST.TCP_CLOSED: 1}
    dp.set_settings(0, hz=HZ, timeouts=timeouts)
    closing = conn(ST.TCP_ESTABLISHED, CONFIRMED)
    dp.put(closing, last_seen=dp.clock())
    assert (dp.expire(), dp.expire()) == (WALKED, SKIPPED)
    before = dp.expiry_stats()
    dp.run(UPLINK, bytes(CLIENT_RST), "up1")
    ((key, (due, _)),) = dp.expiry_index().items()
    st = dp.expiry_stats()
    assert (st.filed, st.filed_seen) == (before.filed + 1, before.filed)
    st.due_next = (dp.clock() + 3600 * HZ) % 2**32  # a drain's store hid the filing
    dp.expiry.update(bytes(4), bytes(st))
    drains = st.drains
    assert dp.expire() == SKIPPED  # the change calls for no walk (tcp_closed is filed)
    st = dp.expiry_stats()
    assert (st.drains, st.filed_seen) == (drains + 1, st.filed)
    assert (st.due_next - due) % 2**32 <= 1  # the entry's deadline again (its last packet's jiffy)
    assert set(expire_until_gone(dp, key, due)) == {SKIPPED}
    assert dp.expiry_stats().due_expired == before.due_expired + 1


def test_without_hz_the_pass_does_nothing(dp: Datapath) -> None:
    """Before the agent has written settings.hz no timeout means anything: nothing removed."""
    dp.put(Entry(keyed(1), state=ST.UDP_NEW, table=PENDING), last_seen=0)
    before = dp.table_counter_values()
    assert dp.expire() == 0
    assert remaining(dp) == {keyed(1).pack(): (PENDING, ST.UDP_NEW)}
    assert dp.table_counter_values() == before
    assert dp.expiry_stats().passes == 0


def test_expiry_recounts_each_vm_ports_opened_entries(dp: Datapath) -> None:
    """After a pass, a VM port's use is what the pass found (counted) plus what it
    created since the pass began (created - base): entries that expired, or were
    evicted, no longer hold its quota."""
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)
    now = dp.clock()
    old = (now - TIMEOUTS[ST.TCP_SYN_SENT] * HZ - MARGIN) % 2**32
    for n, (vm, last_seen, table) in enumerate(
        (
            ("vm1", now, PENDING),
            ("vm1", now, CONFIRMED),
            ("vm1", old, PENDING),
            ("vm2", now, PENDING),
        )
    ):
        state = ST.TCP_SYN_SENT if table == PENDING else ST.TCP_ESTABLISHED
        dp.put(
            Entry(keyed(n), flags=ORIGIN, vm=vm, packets=0, state=state, table=table),
            last_seen=last_seen,
        )
    dp.put(
        Entry(keyed(9), mac=MAC_FW_B, iface="up1", vm="vm1", state=ST.TCP_ESTABLISHED),
        last_seen=now,
    )  # a service connection of vm1's: not VM-opened, not counted
    dp.set_usage("vm1", (10, 3, 5))  # 5 counted before, 7 created since: 12 in use
    dp.set_usage("vm2", (1, 0, 0))
    dp.expire()
    assert dp.usage_rows() == {"vm1": (10, 10, 2), "vm2": (1, 1, 1)}
    u = dp.usage("vm1")
    assert (u.walking, u.next_base) == (2, 10)


def test_stats_reads_the_kernels_element_counts(dp: Datapath) -> None:
    """lh_stats writes each table's element count into lh_expiry[0].elements."""
    for n in range(3):
        dp.put(Entry(keyed(n), state=ST.TCP_ESTABLISHED))
    for n in range(3, 8):
        dp.put(Entry(keyed(n), state=ST.TCP_SYN_SENT, table=PENDING))
    assert dp.obj.program("lh_stats").test_run(bytes(14)).retval == 1
    assert list(dp.expiry_stats().elements) == [3, 5]


# ---------------------------------------------------------------- the families' tables
#
#   IPv4: lh_pending4 --ACK--> lh_conns4   (16-byte conn_key4)
#   IPv6: lh_pending  --ACK--> lh_conns    (40-byte conn_key)
#
# The same handshake in each family ends in its own family's maps, and never
# in the other's; expiry and a full confirmed table work the same in both.

FAMILIES = {"v4": (tcp4_request, tcp4_reply), "v6": (tcp6_request, tcp6_reply)}
MAPS_OF = {"v4": ("lh_conns4", "lh_pending4"), "v6": ("lh_conns", "lh_pending")}


def map_counts(dp: Datapath) -> dict[str, int]:
    """Elements of each of the four maps, by name."""
    return {
        "lh_conns4": dp.conns.map4.count(),
        "lh_pending4": dp.pending.map4.count(),
        "lh_conns": dp.conns.map6.count(),
        "lh_pending": dp.pending.map6.count(),
    }


def only(dp: Datapath, name: str) -> dict[str, int]:
    """map_counts as it must be with one entry, in map *name*."""
    return {m: int(m == name) for m in map_counts(dp)}


def handshake(family: str) -> tuple[Packet, Packet, Packet]:
    """SYN, SYN-ACK and the ACK that completes them, in *family*."""
    request, reply = FAMILIES[family]
    syn, syn_ack = request("S"), reply("SA")
    ack = request("A")
    ack[TCP].seq, ack[TCP].ack = syn[TCP].seq + 1, syn_ack[TCP].seq + 1
    return syn, syn_ack, ack


@pytest.mark.parametrize("family", FAMILIES)
def test_a_connection_lives_in_its_familys_tables(dp: Datapath, family: str) -> None:
    """The SYN makes an entry in the family's pending map, the SYN-ACK finds
    it there, the ACK moves it to the family's confirmed map; the other
    family's maps stay empty throughout; the table counters are the same."""
    confirmed_map, pending_map = MAPS_OF[family]
    syn, syn_ack, ack = handshake(family)
    before = dp.table_counter_values()
    assert dp.run(UPLINK, bytes(syn), "up1").retval == 0
    assert map_counts(dp) == only(dp, pending_map)
    assert dp.run(VMPORT, bytes(syn_ack), "vm1").retval == TC_ACT_REDIRECT
    assert dp.run(UPLINK, bytes(ack), "up1").retval == 0
    assert map_counts(dp) == only(dp, confirmed_map)
    ((key, view),) = dp.table().items()
    assert (key, view.table, view.state) == (Key(syn).pack(), CONFIRMED, ST.TCP_ESTABLISHED)
    after = dp.table_counter_values()
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        TC.PENDING_INSERTED: 1,
        TC.PENDING_PROMOTED: 1,
        TC.CONFIRMED_INSERTED: 1,
        TC.STATE_CHANGES: 2,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_expiry_walks_each_familys_tables(dp: Datapath, family: str) -> None:
    """An idle entry goes and a fresh one stays, in both tables of either
    family; lh_expiry counts them per table (both families summed)."""
    request, _ = FAMILIES[family]
    dp.set_settings(0, hz=HZ, timeouts=TIMEOUTS)
    now = dp.clock()
    old = (now - TIMEOUTS[ST.UDP_NEW] * HZ - MARGIN) % 2**32
    keep = {}
    for n, (table, state, seen) in enumerate(
        (
            (CONFIRMED, ST.TCP_ESTABLISHED, now),
            (CONFIRMED, ST.UDP_STREAM, (now - TIMEOUTS[ST.UDP_STREAM] * HZ - MARGIN) % 2**32),
            (PENDING, ST.TCP_SYN_SENT, now),
            (PENDING, ST.UDP_NEW, old),
        )
    ):
        frame = request("A")
        frame[TCP].sport = 30000 + n
        dp.put(Entry(Key(frame), mac=MAC_FW_B, iface="up1", state=state, table=table), seen)
        if seen == now:
            keep[Key(frame).pack()] = (table, state)
    assert dp.expire() == 1
    assert remaining(dp) == keep
    confirmed_map, pending_map = MAPS_OF[family]
    assert map_counts(dp) == {m: int(m in (confirmed_map, pending_map)) for m in map_counts(dp)}
    st = dp.expiry_stats()
    assert stats_by_state(st.live, 0) == {ST.TCP_ESTABLISHED: 1}
    assert stats_by_state(st.live, 1) == {ST.TCP_SYN_SENT: 1}
    assert stats_by_state(st.expired, 0) == {ST.UDP_STREAM: 1}
    assert stats_by_state(st.expired, 1) == {ST.UDP_NEW: 1}
    assert dp.obj.program("lh_stats").test_run(bytes(14)).retval == 1
    assert list(dp.expiry_stats().elements) == [1, 1]


@pytest.mark.parametrize(
    ("family", "filler"), [("v4", "v4"), ("v6", "v6"), ("v4", "v6"), ("v6", "v4")]
)
def test_a_full_confirmed_table_refuses_only_its_own_family(
    full: Datapath, family: str, filler: str
) -> None:
    """Each family's confirmed map holds one entry here: filled by an
    established connection of family *filler*, it refuses the handshake of a
    *family* connection when the two are the same family, and takes it when
    they are not."""
    request, _ = FAMILIES[filler]
    other = request("A")
    other[TCP].sport = PORT_CLIENT + 1
    full.put(Entry(Key(other), mac=MAC_FW_B, iface="up1", state=ST.TCP_ESTABLISHED))
    syn, syn_ack, ack = handshake(family)
    for prog, frame, iface in ((UPLINK, syn, "up1"), (VMPORT, syn_ack, "vm1")):
        full.run(prog, bytes(frame), iface)
    before = full.table_counter_values()
    full.run(UPLINK, bytes(ack), "up1")
    after = full.table_counter_values()
    refused = family == filler
    assert after[TC.CONFIRM_REFUSED] - before[TC.CONFIRM_REFUSED] == int(refused)
    assert after[TC.CONFIRMED_INSERTED] - before[TC.CONFIRMED_INSERTED] == int(not refused)
    view = full.table()[Key(syn).pack()]
    assert (view.table, view.state) == (PENDING if refused else CONFIRMED, ST.TCP_ESTABLISHED)
