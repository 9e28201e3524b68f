"""The change records the data path writes to lh_changes for the agent's sync.

    client --SYN--> fw B --> up1 [lh_uplink]  --> LEARNED (pending)
    client <-SYN-ACK- fw B <-- up1 <-- vm1 [lh_vmport]  --> STATE
    client --ACK--> fw B --> up1  --> STATE, then PROMOTED (confirmed)
    client --SYN--> fw C --> up1  --> HOP (the last hop moved to fw C)
    client --data--> fw B --> up1  --> REFRESH, once per sync epoch
    lh_expire: an idle entry goes  --> EXPIRED (no entry, only its key)

Each row runs one case of the packet tables (harness.check) with sync on
and compares the ring's records byte for byte with the conn_change the row
expects: kind, table, key and the entry as it stood at the change. With
sync off the ring stays empty; a full ring drops records and counts them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lasthop import abi
from lasthop.libbpf import RingBuffer
from packets import MAC_FW_B, MAC_FW_C, eth

from .harness import CONFIRMED, PENDING, SEEN_SETUP, Case, Datapath, Entry, check
from .test_conntrack import (
    DATA,
    HZ,
    MARGIN,
    SEQ_VM,
    SYN,
    TCP_ROWS,
    TIMEOUTS,
    conn,
    keyed,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

K = abi.ChangeKind
T = abi.ChangeTable
ST = abi.State
TC = abi.TableCounter
SYNC = abi.F_SET_SYNC


@dataclass(frozen=True)
class Record:
    """A conn_change a row expects: entry None = a removal (zeroed entry)."""

    kind: abi.ChangeKind
    table: abi.ChangeTable
    entry: Entry | None = None
    key: Entry | None = None  # the key's owner when entry is None


@pytest.fixture
def ring(dp: Datapath) -> Iterator[RingBuffer]:
    rb = RingBuffer(dp.obj.map("lh_changes").fd)
    rb.read()  # what earlier tests left
    try:
        yield rb
    finally:
        rb.close()


def expected_bytes(dp: Datapath, want: Record, got: abi.ConnChange, t0: int, t1: int) -> bytes:
    """The record's bytes as the row states it; an entry seen "now" takes the
    record's last_seen once it is checked to lie within the run."""
    r = abi.ConnChange(kind=int(want.kind), table=int(want.table))
    owner = want.entry or want.key
    assert owner is not None
    ctypes.memmove(ctypes.byref(r.key), owner.key.pack(), ctypes.sizeof(abi.ConnKey))
    if want.entry is not None:
        seen = SEEN_SETUP
        if want.entry.seen == "now":
            assert (got.entry.last_seen - t0) % 2**32 <= (t1 - t0) % 2**32
            seen = got.entry.last_seen
        r.entry = dp.pack_entry(want.entry, seen)
        if want.kind == K.LEARNED:  # stamped with its epoch (sync_shift 0 here: the jiffy)
            r.entry.sync_epoch = seen & 0xFF
    return bytes(r)


def check_records(dp: Datapath, ring: RingBuffer, case: Case, want: list[Record]) -> None:
    t0 = dp.clock()
    check(dp, case)
    t1 = dp.clock()
    got = ring.read()
    assert len(got) == len(want), [abi.ChangeKind(g[0]).name for g in got]
    for raw, w in zip(got, want, strict=True):
        rec = abi.ConnChange.from_buffer_copy(raw)
        assert raw == expected_bytes(dp, w, rec, t0, t1), f"{w.kind.name}: {raw.hex()}"


def row(desc: str) -> Case:
    """A row of test_conntrack's TCP table, with sync on."""
    case = next(c for c in TCP_ROWS if c.desc.startswith(desc))
    return Case(**{**case.__dict__, "settings": case.settings | SYNC})


LEARN = row("the client's SYN: a pending entry")
ANSWER = row("the VM's SYN-ACK: SYN received")
CONFIRM = row("the client's ACK of the SYN-ACK")
SYN_C = eth(MAC_FW_C, SYN.dst) / SYN.payload  # the client's SYN again, through fw C
RELEARN = Case(
    "a SYN through firewall C: the last hop moves",
    "lh_uplink",
    "up1",
    SYN_C,
    setup=(conn(ST.TCP_SYN_SENT),),
    settings=SYNC,
    after=(conn(ST.TCP_SYN_SENT, packets=2, seen="now").but(mac=MAC_FW_C),),
    counters={("up1", abi.Counter.RELEARNED): 1},
)

ROWS = [
    (LEARN, [Record(K.LEARNED, T.PENDING, conn(ST.TCP_SYN_SENT, seen="now"))]),
    (
        ANSWER,
        [Record(K.STATE, T.EITHER, conn(ST.TCP_SYN_RECV, seq=SEQ_VM + 1))],
    ),
    (
        CONFIRM,
        [
            Record(K.STATE, T.EITHER, conn(ST.TCP_ESTABLISHED, seq=SEQ_VM + 1)),
            Record(
                K.PROMOTED,
                T.CONFIRMED,
                conn(ST.TCP_ESTABLISHED, CONFIRMED, seq=SEQ_VM + 1, packets=2, seen="now"),
            ),
        ],
    ),
    (
        RELEARN,
        [Record(K.HOP, T.EITHER, conn(ST.TCP_SYN_SENT, packets=2, seen="now").but(mac=MAC_FW_C))],
    ),
]


@pytest.mark.parametrize(("case", "want"), ROWS, ids=[c.desc for c, _ in ROWS])
def test_change_record_bytes(
    dp: Datapath, ring: RingBuffer, case: Case, want: list[Record]
) -> None:
    """With sync on, each change writes exactly the records the row lists."""
    check_records(dp, ring, case, want)


@pytest.mark.parametrize("case", [LEARN, ANSWER, CONFIRM, RELEARN], ids=lambda c: c.desc)
def test_no_record_with_sync_off(dp: Datapath, ring: RingBuffer, case: Case) -> None:
    """With sync off the same changes write nothing to the ring."""
    check_records(dp, ring, Case(**{**case.__dict__, "settings": case.settings & ~SYNC}), [])


def test_expiry_reports_each_removed_entry(dp: Datapath, ring: RingBuffer) -> None:
    """lh_expire writes one EXPIRED record (key, zeroed entry) per entry it
    removes, naming its table, and none for the entries it keeps."""
    dp.set_settings(SYNC, hz=HZ, timeouts=TIMEOUTS)
    now = dp.clock()
    old = TIMEOUTS[ST.TCP_ESTABLISHED] * HZ + MARGIN
    gone = {CONFIRMED: keyed(1), PENDING: keyed(2)}
    for table, key in gone.items():
        dp.put(Entry(key, state=ST.TCP_ESTABLISHED, table=table), last_seen=(now - old) % 2**32)
    dp.put(Entry(keyed(3), state=ST.TCP_ESTABLISHED), last_seen=now)
    assert dp.expire() == 1
    got = {bytes(r) for r in ring.read()}
    want = set()
    for table, key in gone.items():
        r = abi.ConnChange(kind=K.EXPIRED, table=T.CONFIRMED if table == CONFIRMED else T.PENDING)
        ctypes.memmove(ctypes.byref(r.key), key.pack(), ctypes.sizeof(abi.ConnKey))
        want.add(bytes(r))
    assert got == want


def test_full_ring_counts_what_it_drops(dp: Datapath, ring: RingBuffer) -> None:
    """The data path never waits for the reader: once the ring is full each
    further record is dropped and counted (TC_SYNC_LOST)."""
    dp.set_settings(SYNC)
    dp.put(conn(ST.TCP_SYN_SENT))
    # a record takes its size rounded up to 8 bytes, plus an 8-byte header
    fits = abi.CHANGES_RING_SIZE // ((ctypes.sizeof(abi.ConnChange) + 7) // 8 * 8 + 8)
    frames = [bytes(SYN_C), bytes(SYN)]  # each moves the last hop: one record
    before = dp.table_counter_values()[TC.SYNC_LOST]
    sent = 0
    while sent < fits + 100:
        for f in frames:
            dp.run("lh_uplink", f, "up1")
        sent += len(frames)
    lost = dp.table_counter_values()[TC.SYNC_LOST] - before
    kept = len(ring.read())
    assert kept + lost == sent
    assert kept == fits and lost == sent - fits


EPOCH_SHIFT = 30  # 2**30 jiffies an epoch: no boundary falls within a test


@pytest.mark.parametrize(
    ("stored", "records"),
    [(0, 0), (1, 1)],
    ids=["a refresh within the entry's epoch: nothing", "the first in a new epoch: one record"],
)
def test_refresh_once_per_epoch(dp: Datapath, ring: RingBuffer, stored: int, records: int) -> None:
    """A data segment that only refreshes an established entry writes a
    REFRESH record (the entry stamped with the epoch, its last_seen now)
    when the epoch stored in the entry is not the current one, else none;
    a second segment right after writes none."""
    dp.set_settings(SYNC, sync_shift=EPOCH_SHIFT)
    before = conn(ST.TCP_ESTABLISHED, CONFIRMED)
    t0 = dp.clock()
    epoch = (t0 >> EPOCH_SHIFT) & 0xFF
    e = dp.pack_entry(before)
    e.sync_epoch = (epoch + stored) & 0xFF  # stored = 1: an earlier epoch's stamp
    dp.tables[CONFIRMED].update(before.key.pack(), bytes(e))
    dp.run("lh_uplink", bytes(DATA), "up1")
    t1 = dp.clock()
    assert (t1 >> EPOCH_SHIFT) & 0xFF == epoch, "an epoch boundary fell within the test"
    got = ring.read()
    assert len(got) == records, [abi.ChangeKind(g[0]).name for g in got]
    if records:
        rec = abi.ConnChange.from_buffer_copy(got[0])
        assert (rec.entry.last_seen - t0) % 2**32 <= (t1 - t0) % 2**32
        want = abi.ConnChange(kind=K.REFRESH, table=T.EITHER)
        ctypes.memmove(ctypes.byref(want.key), before.key.pack(), ctypes.sizeof(abi.ConnKey))
        want.entry = dp.pack_entry(before.but(packets=2), rec.entry.last_seen)
        want.entry.sync_epoch = epoch
        assert got[0] == bytes(want), got[0].hex()
    dp.run("lh_uplink", bytes(DATA), "up1")  # the same epoch again
    assert ring.read() == []


def test_no_refresh_record_with_sync_off(dp: Datapath, ring: RingBuffer) -> None:
    """With sync off a refresh writes nothing and leaves the entry's epoch alone."""
    dp.set_settings(0, sync_shift=EPOCH_SHIFT)
    before = conn(ST.TCP_ESTABLISHED, CONFIRMED)
    dp.put(before)
    dp.run("lh_uplink", bytes(DATA), "up1")
    assert ring.read() == []
    raw = dp.tables[CONFIRMED].lookup(before.key.pack())
    assert raw is not None and abi.ConnEntry.from_buffer_copy(raw).sync_epoch == 0


def test_read_bytes_takes_every_record_whole_across_the_rings_end(
    dp: Datapath, ring: RingBuffer
) -> None:
    """The publisher's bulk read (numpy over the ring's mapped pages) gives
    every record, in order, byte for byte as the one-at-a-time read does,
    also where the records run past the end of the ring's data and on from
    its start (the ring is read in rounds until its position has wrapped)."""
    dp.set_settings(SYNC)
    dp.put(conn(ST.TCP_SYN_SENT))
    frames = [bytes(SYN_C), bytes(SYN)]  # each moves the last hop: one record
    size = ctypes.sizeof(abi.ConnChange)
    stride = (size + 7) // 8 * 8 + 8
    per_round = 5000
    macs_want = [bytes.fromhex(m.replace(":", "")) for m in (MAC_FW_C, MAC_FW_B)]
    lost = dp.table_counter_values()[TC.SYNC_LOST]
    for _ in range(abi.CHANGES_RING_SIZE // (stride * per_round) + 2):  # past the end, once
        for i in range(per_round):
            dp.run("lh_uplink", frames[i % 2], "up1")
        got = ring.read_bytes(size)
        assert len(got) == per_round * size
        records = [abi.ConnChange.from_buffer_copy(got, o) for o in range(0, len(got), size)]
        assert {r.kind for r in records} == {K.HOP}
        macs = [bytes(r.entry.mac) for r in records]
        assert macs == macs_want * (per_round // 2)
    assert ring.read_bytes(size) == b"" and ring.read() == []
    assert dp.table_counter_values()[TC.SYNC_LOST] == lost
