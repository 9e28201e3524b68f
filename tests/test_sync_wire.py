"""lasthop.sync.wire: a change record travels with interface names and the
time it has left, and comes back as the same key and entry (no root needed)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from lasthop import abi
from lasthop.sync import wire
from lasthop.sync.wire import (
    HOP_SIZE,
    RECORD_SIZE,
    WIRE_FIELDS,
    WIRE_VERSION,
    BatchEncoder,
    decode_batch,
    decode_record,
    encode_record,
    last_seen_for,
    left_ms,
)

HZ = 250


def _record(kind: abi.ChangeKind, last_seen: int) -> bytes:
    key = abi.ConnKey(sport=0x1234, dport=0x5000, proto=abi.IPPROTO_TCP, family=abi.FAMILY_V4)
    key.saddr[0], key.daddr[0] = 0x0100000A, 0x0200000A
    entry = abi.ConnEntry(last_seen=last_seen, ifindex=7, vm_ifindex=9, seq=42, packets=3)
    entry.state, entry.flags, entry.vlan_count = abi.State.TCP_ESTABLISHED, 1, 1
    entry.vlan_tci[0] = 100
    ctypes.memmove(entry.mac, bytes.fromhex("02fa0000000b"), abi.ETH_ALEN)
    return bytes(abi.ConnChange(kind=kind, table=abi.ChangeTable.CONFIRMED, key=key, entry=entry))


def _settings() -> abi.Settings:
    s = abi.Settings(hz=HZ)
    s.timeout[abi.State.TCP_ESTABLISHED] = 100
    return s


def test_a_record_round_trips_with_names_and_time_left() -> None:
    """Encoded at jiffies now (10 s after last_seen) and decoded, a record keeps
    its key and entry; ifindexes travel as names; 90 s of 100 are left."""
    names = {7: "fw0", 9: "vm0"}
    values = encode_record(
        _record(abi.ChangeKind.PROMOTED, 1000), names.__getitem__, 1000 + 10 * HZ, _settings()
    )
    assert len(values) == len(WIRE_FIELDS)
    c = decode_record(values)
    assert (c.kind, c.table, c.uplink, c.vm_port, c.left_ms) == (
        abi.ChangeKind.PROMOTED, abi.ChangeTable.CONFIRMED, "fw0", "vm0", 90_000,
    )  # fmt: skip
    original = abi.ConnChange.from_buffer_copy(_record(abi.ChangeKind.PROMOTED, 1000))
    assert bytes(c.key) == bytes(original.key)
    original.entry.last_seen = original.entry.ifindex = original.entry.vm_ifindex = 0
    assert bytes(c.entry) == bytes(original.entry)


def test_a_removal_carries_only_its_key() -> None:
    values = encode_record(_record(abi.ChangeKind.EXPIRED, 0), lambda i: "x", 0, _settings())
    c = decode_record(values)
    assert (c.uplink, c.vm_port, c.left_ms) == ("", "", 0)


def test_the_applier_turns_time_left_into_last_seen_on_its_own_clock() -> None:
    """last_seen = now - (timeout - left), across the 32-bit wrap; never in the future."""
    now = 5  # just after a wrap
    seen = last_seen_for(90_000, now, HZ, 100)
    assert seen == (now - 10 * HZ) % 2**32
    e = abi.ConnEntry(last_seen=seen, state=abi.State.TCP_ESTABLISHED)
    assert left_ms(e, now, HZ, 100) == 90_000
    assert last_seen_for(500_000, now, HZ, 100) == now  # more left than our timeout: fresh


# -- the stream's binary batches ---------------------------------------------------


def _names(i: int) -> str:
    return {7: "fw0", 9: "vm0"}[i]


def test_a_binary_batch_round_trips_with_names_and_time_left() -> None:
    """A record packed at 10 s after last_seen comes back on a host where fw0
    is ifindex 3 and vm0 is 4: the same key and entry, its ifindexes this
    host's, last_seen 10 s before the decoding host's now."""
    enc = BatchEncoder(_names, 1000 + 10 * HZ, _settings())
    enc.add([_record(abi.ChangeKind.PROMOTED, 1000)])
    records, names, _ = enc.take()
    assert len(records) == RECORD_SIZE and names == ["fw0", "vm0"]
    batch = decode_batch(records, names, {"fw0": 3, "vm0": 4}.__getitem__, 50_000, _settings())
    original = abi.ConnChange.from_buffer_copy(_record(abi.ChangeKind.PROMOTED, 1000))
    [(key, (raw, confirmed, new))] = batch.writes.items()
    assert key == bytes(original.key) and confirmed and not new
    entry = abi.ConnEntry.from_buffer_copy(raw)
    assert (entry.ifindex, entry.vm_ifindex, entry.last_seen) == (3, 4, 50_000 - 10 * HZ)
    original.entry.ifindex, original.entry.vm_ifindex = 3, 4
    original.entry.last_seen = 50_000 - 10 * HZ
    assert raw == bytes(original.entry)


def test_the_last_record_of_a_key_wins_and_removals_are_keys() -> None:
    """Learned, then expired, in one batch: a removal; expired, then learned:
    an entry (new: the peer learned it into pending)."""
    learned = bytearray(_record(abi.ChangeKind.LEARNED, 1000))
    learned[1] = abi.ChangeTable.PENDING
    expired = _record(abi.ChangeKind.EXPIRED, 0)
    for order, removed in (([bytes(learned), expired], True), ([expired, bytes(learned)], False)):
        enc = BatchEncoder(_names, 1000, _settings())
        enc.add(order)
        records, names, _ = enc.take()
        batch = decode_batch(records, names, {"fw0": 3, "vm0": 4}.__getitem__, 1000, _settings())
        assert (len(batch.removals), len(batch.writes)) == ((1, 0) if removed else (0, 1))
        if not removed:
            [(_, confirmed, new)] = batch.writes.values()
            assert (confirmed, new) == (False, True)


def test_an_uplink_this_host_lacks_is_counted_a_vm_port_becomes_none() -> None:
    enc = BatchEncoder(_names, 1000, _settings())
    enc.add([_record(abi.ChangeKind.PROMOTED, 1000)])
    records, names, _ = enc.take()
    none = decode_batch(records, names, lambda n: 0, 1000, _settings())
    assert (none.unmapped, none.writes) == (1, {})
    no_vm = decode_batch(records, names, lambda n: {"fw0": 3}.get(n, 0), 1000, _settings())
    [(raw, _, _)] = no_vm.writes.values()
    assert abi.ConnEntry.from_buffer_copy(raw).vm_ifindex == 0


def test_a_malformed_batch_is_a_value_error() -> None:
    """A batch cut mid-record, or naming an interface it does not list."""
    enc = BatchEncoder(_names, 1000, _settings())
    enc.add([_record(abi.ChangeKind.PROMOTED, 1000)])
    records, names, _ = enc.take()
    for bad, bad_names in ((records[:-1], names), (records, names[:1])):
        with pytest.raises(ValueError):
            decode_batch(bad, bad_names, {"fw0": 3, "vm0": 4}.__getitem__, 1000, _settings())


def _kinds(*steps: tuple[abi.ChangeKind, abi.ChangeTable]) -> list[bytes]:
    """Records of one key, each (kind, table) in order."""
    out = []
    for kind, table in steps:
        rec = bytearray(_record(kind, 1000))
        rec[1] = table
        out.append(bytes(rec))
    return out


K, T = abi.ChangeKind, abi.ChangeTable
MERGES = [
    # description, one key's records in order, (confirmed, new) of the merged record
    ("a handshake: learned, two state moves, promoted",
     [(K.LEARNED, T.PENDING), (K.STATE, T.EITHER), (K.STATE, T.EITHER), (K.PROMOTED, T.CONFIRMED)],
     (True, False)),
    ("learned, then a state move: still new (the peer's confirmed table lacks it)",
     [(K.LEARNED, T.PENDING), (K.STATE, T.EITHER)], (False, True)),
    ("promoted, then a state move naming either table: still confirmed",
     [(K.LEARNED, T.PENDING), (K.PROMOTED, T.CONFIRMED), (K.STATE, T.EITHER)], (True, False)),
    ("a state move alone: neither (the applier looks the key up)",
     [(K.STATE, T.EITHER)], (False, False)),
    ("confirmed, expired, learned again: new",
     [(K.PROMOTED, T.CONFIRMED), (K.EXPIRED, T.CONFIRMED), (K.LEARNED, T.PENDING)], (False, True)),
]  # fmt: skip


@pytest.mark.parametrize(("steps", "expect"), [m[1:] for m in MERGES], ids=[m[0] for m in MERGES])
def test_the_publisher_merges_a_keys_records_into_one_that_says_what_the_peer_needs(
    steps: list[tuple[abi.ChangeKind, abi.ChangeTable]], expect: tuple[bool, bool]
) -> None:
    """A key's records within a batch travel as one (its last entry), whose
    kind and table say which of the peer's tables it belongs in; decoding
    the records unmerged says the same."""
    enc = BatchEncoder(_names, 1000, _settings())
    enc.add(_kinds(*steps))
    assert enc.count == len(steps)
    records, names, _ = enc.take()
    assert len(records) == RECORD_SIZE
    lookup = {"fw0": 3, "vm0": 4}.__getitem__
    [(_, confirmed, new)] = decode_batch(records, names, lookup, 1000, _settings()).writes.values()
    assert (confirmed, new) == expect
    # the applier merges records no publisher merged (each encoded alone) the same way
    joined = b"".join(_encode_each(_kinds(*steps)))
    [(_, confirmed, new)] = decode_batch(joined, names, lookup, 1000, _settings()).writes.values()
    assert (confirmed, new) == expect


def _encode_each(records: list[bytes]) -> list[bytes]:
    """Each record encoded alone (no merging), with the names of _names in one order."""
    out = []
    for rec in records:
        enc = BatchEncoder(_names, 1000, _settings())
        enc.add([rec])
        one, names, _ = enc.take()
        assert names in ([], ["fw0", "vm0"])  # a removal names no interface
        out.append(one)
    return out


# -- tunnel and MPLS last hops: the descriptor travels, the peer finds or allocates its id ----


def _hop(kind: abi.HopKind, **fields: object) -> abi.HopDesc:
    d = abi.HopDesc(kind=int(kind), mark=77)  # mark: the sender's expiry pass, never sent
    for name, value in fields.items():
        if isinstance(value, (list, tuple, bytes)):
            for i, v in enumerate(value):
                getattr(d, name)[i] = v
        else:
            setattr(d, name, value)
    return d


HOPS = [
    # description, the sender's descriptor
    ("VXLAN, IPv4 endpoint", _hop(abi.HopKind.TUNNEL4, remote=[0x0AFF0001], vni=100)),
    ("VXLAN, IPv6 endpoint", _hop(abi.HopKind.TUNNEL6, remote=[0xFD000000, 0, 0, 2], vni=7)),
    ("Geneve, options", _hop(abi.HopKind.TUNNEL4, remote=[0x0AFF0003], vni=9, opt_len=8,
                             opts=b"\x01\x02\x03\x04\x05\x06\x07\x08")),
    ("MPLS, three labels and a tag", _hop(abi.HopKind.MPLS, mpls=[100 << 12, 200 << 12, 300 << 12],
                                         mpls_count=3, vlan_tci=[10])),
]  # fmt: skip
SENDER_ID, PEER_ID = 0x0001_2345, 0x0000_0777  # the ids each host gave the hop


def _hop_record(kind: abi.ChangeKind = abi.ChangeKind.PROMOTED, saddr: int = 0x0100000A) -> bytes:
    """A confirmed entry whose last hop is descriptor SENDER_ID (flag hop_ext)."""
    rec = abi.ConnChange.from_buffer_copy(_record(kind, 1000))
    rec.key.saddr[0] = saddr
    rec.entry.flags |= abi.F_ENTRY_HOP_EXT
    rec.entry.vlan_count = 0
    rec.entry.vlan_tci[0], rec.entry.vlan_tci[1] = SENDER_ID & 0xFFFF, SENDER_ID >> 16
    return bytes(rec)


class Peer:
    """The peer's lh_hop_descs, as decode_batch's hop_id_of sees it."""

    def __init__(self, room: bool = True) -> None:
        self.stored: dict[bytes, int] = {}
        self.room = room

    def hop_id_of(self, desc: bytes) -> int | None:
        if not self.room:
            return None
        return self.stored.setdefault(desc, PEER_ID + len(self.stored))


@pytest.mark.parametrize("desc", [h[1] for h in HOPS], ids=[h[0] for h in HOPS])
def test_a_tunnel_or_mpls_hop_travels_as_its_descriptor_under_the_peers_own_id(
    desc: abi.HopDesc,
) -> None:
    """The record names the batch's copy of its descriptor (the struct
    hop_desc whole, its kind saying what it holds, mark zeroed); the peer
    is handed exactly those bytes and writes the entry with its own id for
    them, the entry otherwise as sent (flag hop_ext kept)."""
    enc = BatchEncoder(_names, 1000, _settings(), {SENDER_ID: bytes(desc)}.get)
    enc.add([_hop_record()])
    records, names, hops = enc.take()
    sent = abi.HopDesc.from_buffer_copy(bytes(desc))
    sent.mark = 0
    assert hops == bytes(sent) and len(hops) == HOP_SIZE
    peer = Peer()
    batch = decode_batch(
        records, names, {"fw0": 3, "vm0": 4}.__getitem__, 1000, _settings(), hops, peer.hop_id_of
    )
    assert peer.stored == {bytes(sent): PEER_ID}
    [(raw, confirmed, _)] = batch.writes.values()
    entry = abi.ConnEntry.from_buffer_copy(raw)
    assert abi.hop_desc_id(entry) == PEER_ID and confirmed and batch.hop_refused == 0
    original = abi.ConnChange.from_buffer_copy(_hop_record()).entry
    original.vlan_tci[0], original.vlan_tci[1] = PEER_ID & 0xFFFF, PEER_ID >> 16
    original.ifindex, original.vm_ifindex, original.last_seen = 3, 4, entry.last_seen
    assert raw == bytes(original)


def test_records_of_one_hop_share_one_descriptor_in_the_batch() -> None:
    enc = BatchEncoder(_names, 1000, _settings(), {SENDER_ID: bytes(HOPS[0][1])}.get)
    enc.add([_hop_record(saddr=0x0100000A + i) for i in range(5)])
    records, names, hops = enc.take()
    assert len(hops) == HOP_SIZE
    peer = Peer()
    batch = decode_batch(records, names, lambda n: 3, 1000, _settings(), hops, peer.hop_id_of)
    assert len(batch.writes) == 5 and len(peer.stored) == 1


@pytest.mark.parametrize(
    ("gone", "room"),
    [(True, True), (False, False)],
    ids=["the descriptor gone on the sender", "no room for it on the peer"],
)
def test_a_hop_the_peer_cannot_store_is_refused_its_key_removed_and_counted(
    gone: bool, room: bool
) -> None:
    """A record whose descriptor the sender no longer has, or the peer has no
    room for, is not written: the peer removes its older copy of the key
    (never a reply to a wrong endpoint) and counts it hop_refused."""
    descs: dict[int, bytes] = {} if gone else {SENDER_ID: bytes(HOPS[0][1])}
    enc = BatchEncoder(_names, 1000, _settings(), descs.get)
    enc.add([_hop_record()])
    records, names, hops = enc.take()
    batch = decode_batch(records, names, lambda n: 3, 1000, _settings(), hops, Peer(room).hop_id_of)
    assert (batch.hop_refused, batch.writes, len(batch.removals)) == (1, {}, 1)


def test_a_malformed_hop_makes_the_batch_a_value_error() -> None:
    """hops cut mid-descriptor, a record naming a hop the batch lacks, a
    descriptor of a kind this host does not know."""
    enc = BatchEncoder(_names, 1000, _settings(), {SENDER_ID: bytes(HOPS[0][1])}.get)
    enc.add([_hop_record()])
    records, names, hops = enc.take()
    unknown = bytearray(hops)
    unknown[int(abi.HopDesc.kind.offset)] = 99
    for bad in (hops[:-1], b"", bytes(unknown)):
        with pytest.raises(ValueError):
            decode_batch(records, names, lambda n: 3, 1000, _settings(), bad, Peer().hop_id_of)


def test_the_wire_version_names_the_structs_it_carries() -> None:
    """A change to struct conn_change or hop_desc changes the wire: bump
    WIRE_VERSION with it (a peer of another version ignores the batch and
    counts it) and write the new layout here."""
    hop_layout = [(name, getattr(abi.HopDesc, name).offset) for name, *_ in abi.HopDesc._fields_]
    assert (WIRE_VERSION, RECORD_SIZE, HOP_SIZE) == ("4", 84, 88)
    assert hop_layout == [
        ("remote", 0), ("vni", 16), ("mpls", 20), ("vlan_tci", 32), ("kind", 36),
        ("mpls_count", 37), ("opt_len", 38), ("reserved", 39), ("opts", 40), ("mark", 72),
        ("reserved2", 76), ("gen", 80),
    ]  # fmt: skip


def test_keys_whose_hashes_clash_are_still_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records are grouped by a hash of their key; when two keys share one
    (forced here: every key hashes to 0) the grouping falls back to the keys
    themselves, and the batch merges exactly as it does without a clash."""
    one = _kinds((K.LEARNED, T.PENDING), (K.PROMOTED, T.CONFIRMED))
    other = [_hop_record(abi.ChangeKind.LEARNED, saddr=0x0900000A)]  # another key
    records = [one[0], other[0], one[1]]
    lookup = {"fw0": 3, "vm0": 4}.__getitem__

    def merged() -> dict[bytes, tuple[bytes, bool, bool]]:
        enc = BatchEncoder(_names, 1000, _settings(), {SENDER_ID: bytes(HOPS[0][1])}.get)
        enc.add(records)
        raw, names, hops = enc.take()
        assert len(raw) == 2 * RECORD_SIZE
        return decode_batch(raw, names, lookup, 1000, _settings(), hops, Peer().hop_id_of).writes

    plain = merged()
    monkeypatch.setattr(wire, "_MIX", np.zeros_like(wire._MIX))
    assert merged() == plain and len(plain) == 2


def test_a_hop_record_naming_an_uplink_this_host_lacks_stores_no_descriptor() -> None:
    """Skipped as unmapped, like any record of an uplink not here: its
    descriptor is not stored (it would only wait for the sweep)."""
    enc = BatchEncoder(_names, 1000, _settings(), {SENDER_ID: bytes(HOPS[0][1])}.get)
    enc.add([_hop_record()])
    records, names, hops = enc.take()
    peer = Peer()
    batch = decode_batch(records, names, lambda n: 0, 1000, _settings(), hops, peer.hop_id_of)
    assert (batch.unmapped, batch.hop_refused, batch.writes, peer.stored) == (1, 0, {}, {})


def test_an_export_of_the_hash_release_keeps_its_hop_and_other_sizes_are_refused() -> None:
    """An export written while hop_desc was 76 bytes (WIRE_VERSION 3, no
    generation) imports with the same content, padded; a hop of any other
    size is refused, naming both sizes."""
    desc = _hop(abi.HopKind.TUNNEL4, vni=100)
    content = abi.HopDesc.mark.offset
    base = ["1", "0", bytes(abi.ConnKey()).hex(), "up0", "vm0", "02" * 6, [], "0", "0", "0", "0"]
    base += ["0", "0"]
    old = decode_record([*base, bytes(desc)[:76].hex()])
    assert len(old.hop) == HOP_SIZE and old.hop[:content] == bytes(desc)[:content]
    with pytest.raises(ValueError, match=rf"a hop is {HOP_SIZE} bytes \(76 before release 5\)"):
        decode_record([*base, bytes(desc)[:80].hex()])


class _FakeMap:
    def __init__(self, rows: list[tuple[bytes, bytes]]) -> None:
        self.rows = rows

    def items(self) -> object:
        return iter(self.rows)


class _FakeMaps:
    """Maps.tables() of one IPv4 confirmed table holding *rows* (conn_key4, entry)."""

    def __init__(self, rows: list[tuple[bytes, bytes]]) -> None:
        from lasthop.datapath import Table

        self._tables = (Table(_FakeMap(rows), abi.FAMILY_V4, abi.ChangeTable.CONFIRMED),)  # type: ignore[arg-type]

    def tables(self) -> tuple[object, ...]:
        return self._tables


def test_a_snapshot_names_an_in_place_entry_pending_without_its_bit() -> None:
    """An unconfirmed entry waiting in lh_conns4 (F_ENTRY2_INPLACE) goes to a
    peer or an export as a pending connection, and its bit never travels: the
    receiver's kernel count knows nothing of it."""
    from lasthop.sync.replicator import _snapshot

    def row(sport: int, flags2: int) -> tuple[bytes, bytes]:
        key = abi.ConnKey4(saddr=0x0100000A, daddr=0x0200000A, sport=sport, dport=80, proto=6)
        return bytes(key), bytes(abi.ConnEntry(state=1, flags2=flags2))

    chunks = list(_snapshot(_FakeMaps([row(1, abi.F_ENTRY2_INPLACE), row(2, 0)])))  # type: ignore[arg-type]
    size = ctypes.sizeof(abi.ConnChange)
    records = [abi.ConnChange.from_buffer_copy(r[i : i + size])
               for r in chunks for i in range(0, len(r), size)]  # fmt: skip
    assert [(r.key.sport, r.table, r.entry.flags2) for r in records] == [
        (1, abi.ChangeTable.PENDING, 0),
        (2, abi.ChangeTable.CONFIRMED, 0),
    ]
