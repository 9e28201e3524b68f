"""The records hosts exchange: a change of one entry, with interfaces by NAME
(hosts number their interfaces differently) and the time the entry has LEFT
before its state's timeout (hosts' clocks differ; no absolute time travels).

On the stream (binary, packed with struct): a message is one batch, fields
``host`` (who published), ``ts`` (its wall clock, for the lag figure only),
``type`` ("changes", "snapshot", "hello": a host asks its peers for their
tables), ``v`` (WIRE_VERSION), ``names`` (a JSON list of the interface
names the batch uses) and ``records``: RECORD_SIZE bytes per record, each a
struct conn_change as the data path wrote it with the three fields of
BINARY_REWRITES rewritten (ifindexes -> 1 + their index in ``names``, 0 =
none; last_seen -> milliseconds left). Encoding and decoding are a slice,
one unpack and one pack per record: no per-field objects.

In a file (`lasthop export`), a record is a JSON list in the order of
WIRE_FIELDS, readable and independent of the struct's layout.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from lasthop import abi

__all__ = [
    "BINARY_REWRITES",
    "RECORD_SIZE",
    "WIRE_FIELDS",
    "WIRE_VERSION",
    "BatchEncoder",
    "decode_batch",
    "Change",
    "decode_record",
    "encode_record",
    "last_seen_for",
    "left_ms",
    "sync_epoch_shift",
]

# name, what it holds (the order of a record's values)
WIRE_FIELDS: tuple[tuple[str, str], ...] = (
    ("kind", "abi.ChangeKind value"),
    ("table", "abi.ChangeTable value"),
    ("key", "struct conn_key, hex: addresses, ports, proto, family, zone"),
    ("uplink", "name of the uplink the request arrived on; '' for a removal"),
    ("vm_port", "name of the VM port serving or opening it; '' = none"),
    ("mac", "last-hop MAC, hex"),
    ("vlan", "VLAN TCIs, outer first"),
    ("flags", "F_ENTRY_* bits"),
    ("state", "abi.State value"),
    ("seq", "TCP: the ACK number that completes the handshake"),
    ("packets", "request packets seen"),
    ("replies", "replies redirected"),
    ("left_ms", "milliseconds left before its state's timeout"),
    ("hop", "a tunnel last hop (flag hop_ext): struct hop_desc, hex; '' = none"),
)


@dataclass(frozen=True)
class Change:
    """One decoded record: the key, and the entry with names instead of ifindexes."""

    kind: abi.ChangeKind
    table: abi.ChangeTable
    key: abi.ConnKey
    uplink: str
    vm_port: str
    entry: abi.ConnEntry  # ifindex, vm_ifindex, last_seen left 0: the applier sets them
    left_ms: int
    hop: bytes = b""  # F_ENTRY_HOP_EXT: its struct hop_desc (the id in entry is the exporter's)


def sync_epoch_shift(hz: int, timeouts: Mapping[int, float]) -> int:
    """lh_settings.sync_shift: the largest shift whose epoch (2**shift jiffies)
    is at most 1/8 of the shortest timeout of a confirmed state (TCP
    established, UDP stream). The data path writes a refresh record at most
    once per entry per epoch, so a busy entry's copy on a peer is never older
    than about two epochs (a quarter of that timeout), while the ring pays one
    record per busy entry per epoch: HZ=1000, udp_stream 180 s -> 2**14
    jiffies, 16.4 s."""
    shortest = min(timeouts[abi.State.TCP_ESTABLISHED], timeouts[abi.State.UDP_STREAM])
    epoch = max(1, int(hz * shortest) // 8)
    return max(0, min(30, epoch.bit_length() - 1))


def left_ms(entry: abi.ConnEntry, now: int, hz: int, timeout_s: int) -> int:
    """Milliseconds *entry* has left at jiffies *now* (0: due)."""
    age = (now - entry.last_seen) % 2**32
    if not hz or age >= 2**31:  # refreshed after *now* was read: not aged at all
        age = 0
    return max(0, timeout_s * 1000 - age * 1000 // hz) if hz else timeout_s * 1000


def last_seen_for(left: int, now: int, hz: int, timeout_s: int) -> int:
    """The last_seen that leaves *left* ms of a *timeout_s* timeout at jiffies
    *now*: now - (timeout - left), never later than now."""
    idle_ms = max(0, timeout_s * 1000 - left)
    return (now - idle_ms * hz // 1000) % 2**32


def encode_record(
    raw: bytes,
    name_of: Callable[[int], str],
    now: int,
    settings: abi.Settings,
    hop: Callable[[int], abi.HopDesc | None] | None = None,
) -> list[object]:
    """A conn_change from lh_changes as the values of WIRE_FIELDS; *hop*
    reads the descriptor of a tunnel last hop (absent: the record carries none)."""
    rec = abi.ConnChange.from_buffer_copy(raw[: ctypes.sizeof(abi.ConnChange)])
    e = rec.entry
    hop_id = abi.hop_desc_id(e)
    desc = hop(hop_id) if hop is not None and hop_id is not None else None
    removal = rec.kind in (abi.ChangeKind.REMOVED, abi.ChangeKind.EXPIRED)
    state = e.state if e.state < abi.CS_MAX else 0
    return [
        rec.kind,
        rec.table,
        bytes(rec.key).hex(),
        "" if removal else name_of(e.ifindex),
        "" if removal or not e.vm_ifindex else name_of(e.vm_ifindex),
        bytes(e.mac).hex(),
        [e.vlan_tci[i] for i in range(min(e.vlan_count, abi.MAX_VLAN_TAGS))],
        e.flags,
        e.state,
        e.seq,
        e.packets,
        e.replies,
        0 if removal else left_ms(e, now, settings.hz, settings.timeout[state]),
        bytes(desc).hex() if desc is not None else "",
    ]


def decode_record(values: list[object]) -> Change:
    """The values of WIRE_FIELDS back into a Change (ValueError when malformed)."""
    if len(values) == len(WIRE_FIELDS) - 1:  # an export made before tunnel hops
        values = [*values, ""]
    if len(values) != len(WIRE_FIELDS):
        raise ValueError(f"a record has {len(WIRE_FIELDS)} fields, got {len(values)}")
    kind, table, key, uplink, vm_port, mac, vlan, flags, state, seq, pk, rp, left, hop = values
    e = abi.ConnEntry(flags=int(flags), state=int(state), seq=int(seq))  # type: ignore[call-overload]
    e.packets, e.replies = int(pk), int(rp)  # type: ignore[call-overload]
    ctypes.memmove(e.mac, bytes.fromhex(str(mac)), abi.ETH_ALEN)
    tags = [int(t) for t in vlan][: abi.MAX_VLAN_TAGS]  # type: ignore[attr-defined]
    e.vlan_count = len(tags)
    for i, t in enumerate(tags):
        e.vlan_tci[i] = t
    return Change(
        kind=abi.ChangeKind(int(kind)),  # type: ignore[call-overload]
        table=abi.ChangeTable(int(table)),  # type: ignore[call-overload]
        key=abi.ConnKey.from_buffer_copy(bytes.fromhex(str(key))),
        uplink=str(uplink),
        vm_port=str(vm_port),
        entry=e,
        left_ms=int(left),  # type: ignore[call-overload]
        hop=_hop_bytes(str(hop)),
    )


def _hop_bytes(text: str) -> bytes:
    """A record's hop field: '' or a whole struct hop_desc in hex."""
    raw = bytes.fromhex(text)
    if raw and len(raw) != ctypes.sizeof(abi.HopDesc):
        raise ValueError(f"a hop is {ctypes.sizeof(abi.HopDesc)} bytes, got {len(raw)}")
    return raw


# -- the stream's binary records ---------------------------------------------------

WIRE_VERSION = "2"  # of the binary record: bump when struct conn_change changes
RECORD_SIZE = ctypes.sizeof(abi.ConnChange)
_ENTRY = abi.ConnChange.entry.offset
_KEY, _KEY_END = abi.ConnChange.key.offset, abi.ConnChange.key.offset + ctypes.sizeof(abi.ConnKey)
# struct conn_entry's first three u32, rewritten on the wire (offsets checked below)
_TRIPLE = struct.Struct("<III")
BINARY_REWRITES: tuple[tuple[str, str], ...] = (
    ("entry.last_seen", "milliseconds left before its state's timeout (0 for a removal)"),
    ("entry.ifindex", "1 + index of the uplink's name in the batch's names; 0 = none"),
    ("entry.vm_ifindex", "1 + index of the VM port's name in the batch's names; 0 = none"),
)
assert (abi.ConnEntry.last_seen.offset, abi.ConnEntry.ifindex.offset) == (0, 4)
assert abi.ConnEntry.vm_ifindex.offset == 8
_STATE = _ENTRY + abi.ConnEntry.state.offset
_FLAGS = _ENTRY + abi.ConnEntry.flags.offset
_REMOVAL_KINDS = frozenset((int(abi.ChangeKind.REMOVED), int(abi.ChangeKind.EXPIRED)))


# a record as struct sees it: kind, table, key, the three rewritten u32, the entry's rest
_RECORD = struct.Struct(f"<BB2x{_KEY_END - _KEY}sIII{RECORD_SIZE - _ENTRY - _TRIPLE.size}s")
assert _RECORD.size == RECORD_SIZE and _KEY == 4
_REST_STATE = abi.ConnEntry.state.offset - _TRIPLE.size  # offsets within the entry's rest
_REST_FLAGS = abi.ConnEntry.flags.offset - _TRIPLE.size


class BatchEncoder:
    """Packs conn_change records (from lh_changes, or a snapshot) into one
    batch: the records' bytes and the names they use."""

    def __init__(self, name_of: Callable[[int], str], now: int, settings: abi.Settings) -> None:
        self._name_of = name_of
        self._now, self._hz = now, settings.hz
        self._timeouts = [settings.timeout[i] for i in range(abi.CS_MAX)]
        self._ids: dict[int, int] = {0: 0}
        self.names: list[str] = []
        self._out: list[bytes] = []

    @property
    def count(self) -> int:
        return len(self._out)

    def _id(self, ifindex: int) -> int:
        self.names.append(self._name_of(ifindex))
        found = self._ids[ifindex] = len(self.names)
        return found

    def add(self, records: Iterable[bytes]) -> None:
        """Records as the ring (or a snapshot) gives them."""
        now, hz, timeouts, ids = self._now, self._hz, self._timeouts, self._ids
        out, pack, unpack = self._out, _RECORD.pack, _RECORD.unpack_from
        removals, cs_max = _REMOVAL_KINDS, abi.CS_MAX
        for raw in records:
            kind, table, key, last_seen, ifindex, vm_ifindex, rest = unpack(raw)
            if kind in removals:
                out.append(pack(kind, table, key, 0, 0, 0, rest))
                continue
            state = rest[_REST_STATE]
            timeout = timeouts[state if state < cs_max else 0] * 1000
            age = (now - last_seen) & 0xFFFFFFFF
            if age >= 0x80000000:  # refreshed after now was read: not aged at all
                age = 0
            left = timeout - age * 1000 // hz if hz else timeout
            up = ids.get(ifindex)
            if up is None:
                up = self._id(ifindex)
            vm = ids.get(vm_ifindex)
            if vm is None:
                vm = self._id(vm_ifindex)
            out.append(pack(kind, table, key, left if left > 0 else 0, up, vm, rest))

    def take(self) -> tuple[bytes, list[str]]:
        """The batch so far (records, names); the encoder starts a new one."""
        out, names = b"".join(self._out), self.names
        self._out, self.names, self._ids = [], [], {0: 0}
        return out, names


@dataclass
class DecodedBatch:
    """A batch made ready for this host's tables: the last record of each key
    (each carries its entry whole, so the last one is the truth), as
    key -> (entry bytes, confirmed, new) to write, and keys to remove. *new*:
    the peer's data path learned it into pending, so its confirmed table had
    no such key, nor has ours (its removal came before, in order)."""

    writes: dict[bytes, tuple[bytes, bool, bool]]
    removals: list[bytes]
    unmapped: int  # records naming an uplink this host does not have
    records: int  # in the batch, all told
    hop_refused: int = 0  # tunnel last hops (their id means nothing here): removed, not written


def decode_batch(
    records: bytes,
    names: list[str],
    index_of: Callable[[str], int],
    now: int,
    settings: abi.Settings,
) -> DecodedBatch:
    """A binary batch back into entries for this host at jiffies *now*:
    names -> its ifindexes (an uplink it lacks: skipped, counted; a VM port
    it lacks: no VM), milliseconds left -> last_seen. ValueError when the
    batch is malformed."""
    if len(records) % RECORD_SIZE:
        raise ValueError(f"a batch is whole records of {RECORD_SIZE} bytes, got {len(records)}")
    local = [0, *(index_of(n) for n in names)]
    hz, cs_max = settings.hz, abi.CS_MAX
    timeouts = [settings.timeout[i] * 1000 for i in range(abi.CS_MAX)]
    # plain ints: comparing with an IntEnum costs more, per record
    confirmed_table, vm_fast = int(abi.ChangeTable.CONFIRMED), abi.F_ENTRY_VM_FAST
    pending_table, learned = int(abi.ChangeTable.PENDING), int(abi.ChangeKind.LEARNED)
    removals = _REMOVAL_KINDS
    triple = _TRIPLE.pack
    writes: dict[bytes, tuple[bytes, bool, bool] | None] = {}
    unmapped = hop_refused = 0
    hop_ext = abi.F_ENTRY_HOP_EXT
    try:
        for kind, table, key, left, up, vm, rest in _RECORD.iter_unpack(records):
            if kind in removals:
                writes[key] = None
                continue
            if rest[_REST_FLAGS] & hop_ext:
                # its hop is an id into the peer's lh_hop_descs, which the record
                # does not carry: never guess it, and drop a copy of older news
                writes[key] = None
                hop_refused += 1
                continue
            ifindex, vm_ifindex = local[up], local[vm]
            if up and not ifindex:
                unmapped += 1
                continue
            state = rest[_REST_STATE]
            idle = timeouts[state if state < cs_max else 0] - left
            last_seen = (now - (idle if idle > 0 else 0) * hz // 1000) & 0xFFFFFFFF
            if not vm_ifindex and rest[_REST_FLAGS] & vm_fast:
                flags = rest[_REST_FLAGS] & ~vm_fast
                rest = rest[:_REST_FLAGS] + bytes((flags,)) + rest[_REST_FLAGS + 1 :]
            writes[key] = (
                triple(last_seen, ifindex, vm_ifindex) + rest,
                table == confirmed_table,
                kind == learned and table == pending_table,
            )
    except IndexError:
        raise ValueError(f"a record names an interface beyond the batch's {len(names)}") from None
    return DecodedBatch(
        writes={k: v for k, v in writes.items() if v is not None},
        removals=[k for k, v in writes.items() if v is None],
        unmapped=unmapped,
        records=len(records) // RECORD_SIZE,
        hop_refused=hop_refused,
    )


def record_of(kind: int, table: int, key: bytes, entry: bytes) -> bytes:
    """A conn_change record of an entry read from a table (a snapshot)."""
    return bytes((kind, table, 0, 0)) + key + entry
