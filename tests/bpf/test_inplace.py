"""New connections confirmed in place: an unconfirmed entry waits in the
confirmed table itself (F_ENTRY2_INPLACE), under a quota the kernel counts
exactly (lh_inplace), and is confirmed by clearing its bit -- no move.

    client --SYN--> fw B --> up1 [lh_uplink]: into lh_conns4, bit set, count + 1
    client <-SYN-ACK- fw B <-- up1 <-- vm1 [lh_vmport]: the same entry
    client --ACK--> fw B --> up1: bit cleared (atomic fetch-and), count - 1

Each row is a packet table row as in test_conntrack.py (the whole table and
every counter after it), with lh_settings' inplace_quota set; harness.check
also holds lh_inplace's count to the in-place entries the row adds and
removes. Over the quota (or for pings and IPv6) a new connection takes the
pending LRU exactly as without it. Expiry, the agent's removal
(lh_conn_remove) and a confirmation that finds the bit already clear each
take the count down exactly once.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from scapy.layers.inet import TCP

from lasthop import abi
from packets import IP_VM_1, MAC_FW_B, echo4_request, tcp6_request, udp4_reply, udp4_request

from . import test_conntrack
from .harness import (
    CONFIRMED,
    MARKS,
    PENDING,
    ST,
    TC,
    UPLINK,
    C,
    Case,
    Datapath,
    Entry,
    Key,
    check,
    ids,
)
from .test_conntrack import (
    ACK,
    ACK_WRONG,
    DATA,
    ORIG,
    OTHER,
    SEQ_VM,
    SYN,
    SYN_ACK,
    VM_DATA,
    VM_RST,
    client_says,
    conn,
    counted,
    vm_opened,
    vm_says,
)

pytestmark = MARKS
tiny, full = test_conntrack.tiny, test_conntrack.full  # the fixtures of a full lh_conns4

IP = abi.F_ENTRY2_INPLACE
QUOTA = 4
QUERY, ANSWER = udp4_request(), udp4_reply()
PING = echo4_request()
SYN6 = tcp6_request("S")
VM1_LEARNED = (("vm1", IP_VM_1, ORIG.LEARNED),)


def waiting(state: abi.State, frame=SYN, **kw) -> Entry:  # type: ignore[no-untyped-def]
    """The client's connection, unconfirmed, in place in lh_conns4."""
    return conn(state, CONFIRMED, frame=frame, flags2=IP, **kw)


def q(case: Case, **kw) -> Case:  # type: ignore[no-untyped-def]
    """*case* with the in-place quota on (QUOTA)."""
    return replace(case, inplace_quota=QUOTA, **kw)


ROWS = [
    q(
        Case(
            "the client's SYN, quota free: in lh_conns4, unconfirmed, counted",
            UPLINK,
            "up1",
            SYN,
            after=(waiting(ST.TCP_SYN_SENT, seen="now"),),
            counters=counted("up1", C.LEARNED),
            table_counters={TC.INPLACE_INSERTED: 1},
        )
    ),
    q(
        Case(
            "the client's SYN, quota taken: the pending LRU, as without in-place entries",
            UPLINK,
            "up1",
            SYN,
            after=(conn(ST.TCP_SYN_SENT, seen="now"),),
            counters=counted("up1", C.LEARNED),
            table_counters={TC.PENDING_INSERTED: 1},
        ),
        inplace=QUOTA,
    ),
    q(
        Case(
            "a ping never confirms: the pending LRU, quota free",
            UPLINK,
            "up1",
            PING,
            after=(conn(ST.ICMP_NEW, frame=PING, seen="now"),),
            counters=counted("up1", C.LEARNED),
            table_counters={TC.PENDING_INSERTED: 1},
        )
    ),
    q(
        Case(
            "IPv6: the pending LRU, quota free (in place is lh_conns4's)",
            UPLINK,
            "up1",
            SYN6,
            after=(conn(ST.TCP_SYN_SENT, frame=SYN6, seen="now"),),
            counters=counted("up1", C.LEARNED),
            table_counters={TC.PENDING_INSERTED: 1},
        )
    ),
    q(
        vm_says(
            "the VM's SYN-ACK finds it in place: SYN received, still unconfirmed",
            SYN_ACK,
            waiting(ST.TCP_SYN_SENT),
            {"state": ST.TCP_SYN_RECV, "seq": SEQ_VM + 1},
            also=(C.VM_ADDR_LEARNED,),
            vm_addrs_after=VM1_LEARNED,
        )
    ),
    q(
        client_says(
            "the client's ACK confirms it in place: bit cleared, count down, no move",
            ACK,
            waiting(ST.TCP_SYN_RECV, seq=SEQ_VM + 1),
            {"state": ST.TCP_ESTABLISHED, "flags2": 0},
            also=(C.CONFIRMED,),
            table_counters={TC.INPLACE_CONFIRMED: 1},
        )
    ),
    q(
        client_says(
            "the ACK finds the bit already clear (another CPU confirmed it): counted once",
            ACK,
            conn(ST.TCP_SYN_RECV, CONFIRMED, seq=SEQ_VM + 1),
            {"state": ST.TCP_ESTABLISHED},
        ),
        inplace=1,  # another connection's: untouched
    ),
    q(
        client_says(
            "an ACK with the wrong number confirms nothing in place either",
            ACK_WRONG,
            waiting(ST.TCP_SYN_RECV, seq=SEQ_VM + 1),
            {},
        )
    ),
    q(
        vm_says(
            "the VM's RST to an in-place SYN: closed, still unconfirmed",
            VM_RST,
            waiting(ST.TCP_SYN_SENT),
            {"state": ST.TCP_CLOSED},
            also=(C.VM_ADDR_LEARNED,),
            vm_addrs_after=VM1_LEARNED,
        )
    ),
    q(
        Case(
            "a mid-stream segment: in place, mid-stream",
            UPLINK,
            "up1",
            DATA,
            after=(waiting(ST.TCP_MIDSTREAM, seen="now"),),
            counters=counted("up1", C.LEARNED),
            table_counters={TC.INPLACE_INSERTED: 1},
        )
    ),
    q(
        vm_says(
            "the VM's answer confirms a mid-stream connection in place",
            VM_DATA,
            waiting(ST.TCP_MIDSTREAM),
            {"state": ST.TCP_ESTABLISHED, "flags2": 0},
            also=(C.CONFIRMED,),
            table_counters={TC.INPLACE_CONFIRMED: 1},
        )
    ),
    q(
        Case(
            "UDP: the first datagram, in place",
            UPLINK,
            "up1",
            QUERY,
            after=(waiting(ST.UDP_NEW, frame=QUERY, seen="now"),),
            counters=counted("up1", C.LEARNED),
            table_counters={TC.INPLACE_INSERTED: 1},
        )
    ),
    q(
        vm_says(
            "UDP: the answer, in place",
            ANSWER,
            waiting(ST.UDP_NEW, frame=QUERY),
            {"state": ST.UDP_ANSWERED},
            also=(C.VM_ADDR_LEARNED,),
            vm_addrs_after=VM1_LEARNED,
        )
    ),
    q(
        client_says(
            "UDP: the opener again after the answer confirms it in place",
            QUERY,
            waiting(ST.UDP_ANSWERED, frame=QUERY),
            {"state": ST.UDP_STREAM, "flags2": 0},
            also=(C.CONFIRMED,),
            table_counters={TC.INPLACE_CONFIRMED: 1},
        )
    ),
    q(
        client_says(
            "a pending LRU entry still confirms by a move (the quota was taken when it came)",
            ACK,
            conn(ST.TCP_SYN_RECV, PENDING, seq=SEQ_VM + 1),
            {"state": ST.TCP_ESTABLISHED, "table": CONFIRMED},
            also=(C.CONFIRMED,),
            table_counters={TC.PENDING_PROMOTED: 1, TC.CONFIRMED_INSERTED: 1},
        )
    ),
    q(
        Case(
            "the client's SYN supersedes an in-place VM-opened tuple: its place freed, taken again",
            UPLINK,
            "up1",
            SYN,
            setup=(vm_opened(ST.TCP_SYN_SENT, CONFIRMED, flags2=IP),),
            after=(waiting(ST.TCP_SYN_SENT, seen="now"),),
            counters=counted("up1", C.LEARNED, C.VM_ORIGIN_SUPERSEDED),
            table_counters={TC.INPLACE_REMOVED: 1, TC.INPLACE_INSERTED: 1},
        )
    ),
]


@pytest.mark.parametrize("case", ROWS, ids=ids(ROWS))
def test_inplace(dp: Datapath, case: Case) -> None:
    check(dp, case)


# ---------------------------------------------------------------- removal

HZ = 1000
TIMEOUT_S = 10


def keyed(n: int, state: abi.State = ST.TCP_SYN_SENT, flags2: int = IP) -> Entry:
    """The n-th of many in-place connections from firewall B."""
    frame = SYN.copy()
    frame[TCP].sport = 20000 + n
    return Entry(Key(frame), mac=MAC_FW_B, iface="up1", state=state, flags2=flags2)


def test_expiry_frees_the_quota_and_counts_in_place_entries_as_pending(dp: Datapath) -> None:
    """An in-place entry idle past its timeout goes (the count down by one
    each, TC_INPLACE_EXPIRED, expired[pending]); a live one is counted live
    as pending; a confirmed neighbour in the same map stays confirmed."""
    dp.set_settings(0, hz=HZ, timeouts={ST.TCP_SYN_SENT: TIMEOUT_S, ST.TCP_ESTABLISHED: 600},
                    inplace_quota=QUOTA)  # fmt: skip
    now = dp.clock()
    old, young = (now - (TIMEOUT_S + 5) * HZ) % 2**32, (now - HZ) % 2**32
    gone, kept = [keyed(0), keyed(1)], [keyed(2)]
    confirmed = keyed(3, ST.TCP_ESTABLISHED, 0)
    for e in gone:
        dp.put(e, last_seen=old)
    for e in (*kept, confirmed):
        dp.put(e, last_seen=young)
    dp.set_inplace(3)
    before = dp.table_counter_values()
    assert dp.expire() == 1
    after = dp.table_counter_values()

    assert set(dp.table()) == {e.key.pack() for e in (*kept, confirmed)}
    assert dp.inplace_count() == 1
    st = dp.expiry_stats()
    assert st.live[1][ST.TCP_SYN_SENT] == 1 and st.live[0][ST.TCP_SYN_SENT] == 0
    assert st.live[0][ST.TCP_ESTABLISHED] == 1
    assert st.expired[1][ST.TCP_SYN_SENT] == 2 and st.expired[0][ST.TCP_SYN_SENT] == 0
    deltas = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert deltas == {TC.INPLACE_EXPIRED: 2, TC.EXPIRY_PASSES: 1}


def test_the_agents_removal_gives_the_place_back_once(dp: Datapath) -> None:
    """lh_conn_remove (the agent's way to remove from a confirmed table):
    2 and the count down for an in-place entry, 1 and the count untouched for
    a confirmed one, 0 for a key the table does not hold."""
    dp.set_settings(0, inplace_quota=QUOTA)
    waiting_e, confirmed = keyed(0), keyed(1, ST.TCP_ESTABLISHED, 0)
    dp.put(waiting_e)
    dp.put(confirmed)
    dp.set_inplace(1)
    prog = dp.obj.program("lh_conn_remove")

    assert prog.test_run(waiting_e.key.pack()).retval == 2
    assert dp.inplace_count() == 0
    assert prog.test_run(confirmed.key.pack()).retval == 1
    assert dp.inplace_count() == 0
    assert prog.test_run(confirmed.key.pack()).retval == 0
    assert dp.table() == {}


def test_the_stats_program_counts_in_place_entries_as_pending(dp: Datapath) -> None:
    """lh_stats: an in-place entry is an element of lh_conns4, but `stats`
    reads it among the pending ones."""
    dp.set_settings(0, inplace_quota=QUOTA)
    for e in (keyed(0), keyed(1), keyed(2, ST.TCP_ESTABLISHED, 0)):
        dp.put(e)
    dp.set_inplace(2)
    assert dp.obj.program("lh_stats").test_run(bytes(64)).retval == 1
    assert list(dp.expiry_stats().elements) == [1, 2]


def test_a_full_confirmed_table_sends_a_new_connection_to_the_lru(full: Datapath) -> None:
    """lh_conns4 full (one entry of room, OTHER in it): the in-place insert
    fails, its place in the quota is given back, and the SYN takes the LRU."""
    check(
        full,
        q(
            Case(
                "the client's SYN, quota free, lh_conns4 full: the pending LRU",
                UPLINK,
                "up1",
                SYN,
                setup=(OTHER,),
                after=(OTHER, conn(ST.TCP_SYN_SENT, seen="now")),
                counters=counted("up1", C.LEARNED),
                table_counters={TC.PENDING_INSERTED: 1},
            )
        ),
    )
