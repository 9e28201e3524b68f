"""The records hosts exchange: a change of one entry, with interfaces by NAME
(hosts number their interfaces differently) and the time the entry has LEFT
before its state's timeout (hosts' clocks differ; no absolute time travels).

On the stream (binary, packed with struct): a message is one batch, fields
``host`` (who published), ``ts`` (its wall clock, for the lag figure only),
``type`` ("changes", "snapshot", "hello": a host asks its peers for their
tables), ``v`` (WIRE_VERSION), ``names`` (a JSON list of the interface
names the batch uses), ``records``: RECORD_SIZE bytes per record, each a
struct conn_change as the data path wrote it with the fields of
BINARY_REWRITES rewritten (ifindexes -> 1 + their index in ``names``, 0 =
none; last_seen -> milliseconds left; a tunnel/MPLS last hop's descriptor
id -> 1 + its index in ``hops``), and ``hops``: the descriptors those
records name, HOP_SIZE bytes each, a struct hop_desc whole (its ``kind``
says what it holds: a tunnel endpoint and VNI, an MPLS label stack, ...)
with ``mark`` zeroed; the peer stores each under an id of its own (find
or allocate, as the data path does). Encoding and decoding work on the
whole batch at once (numpy structured arrays over its bytes, RECORD_DTYPE;
a key's records grouped by a hash of the key, _groups): no Python per record.

In a file (`lasthop export`), a record is a JSON list in the order of
WIRE_FIELDS, readable and independent of the struct's layout.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lasthop import abi

__all__ = [
    "BINARY_REWRITES",
    "RECORD_DTYPE",
    "RECORD_SIZE",
    "WIRE_FIELDS",
    "WIRE_VERSION",
    "HOP_SIZE",
    "Batch",
    "BatchEncoder",
    "Change",
    "DecodedBatch",
    "decode_batch",
    "decode_record",
    "encode_record",
    "full_keys4",
    "records_of",
    "last_seen_for",
    "left_ms",
    "split_families",
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
    """A record's hop field: '' or a whole struct hop_desc in hex (an older
    release's export: 76 bytes, no generation -- its content is the same)."""
    raw = bytes.fromhex(text)
    size = ctypes.sizeof(abi.HopDesc)
    if raw and len(raw) not in (size, _HOP_SIZE_V3):
        raise ValueError(f"a hop is {size} bytes ({_HOP_SIZE_V3} before release 5), got {len(raw)}")
    return raw.ljust(size, b"\0") if raw else raw


# -- the stream's binary records ---------------------------------------------------

WIRE_VERSION = "4"  # of the binary batch: bump when struct conn_change or hop_desc changes
# (4: hop_desc gained reserved2 and gen, 88 bytes: lh_hop_descs is an array of slots)
RECORD_SIZE = ctypes.sizeof(abi.ConnChange)
HOP_SIZE = ctypes.sizeof(abi.HopDesc)
_HOP_SIZE_V3 = 76  # WIRE_VERSION 3's hop_desc (lh_hop_descs a hash): content and mark
_HOP_CONTENT = int(abi.HopDesc.mark.offset)  # a descriptor's bytes that travel (mark: 0)
KEY_SIZE = ctypes.sizeof(abi.ConnKey)
ENTRY_SIZE = ctypes.sizeof(abi.ConnEntry)
BINARY_REWRITES: tuple[tuple[str, str], ...] = (
    ("entry.last_seen", "milliseconds left before its state's timeout (0 for a removal)"),
    ("entry.ifindex", "1 + index of the uplink's name in the batch's names; 0 = none"),
    ("entry.vm_ifindex", "1 + index of the VM port's name in the batch's names; 0 = none"),
    ("entry.vlan_tci", "flag hop_ext: 1 + index of its hop_desc in the batch's hops; 0 = gone"),
)
_KEY, _ENTRY = int(abi.ConnChange.key.offset), int(abi.ConnChange.entry.offset)


def _entry_field(name: str) -> int:
    return _ENTRY + int(getattr(abi.ConnEntry, name).offset)


# struct conn_change as numpy sees it (offsets from the ctypes mirror, which
# tests/test_abi.py checks against the object's BTF); key and entry whole as
# opaque bytes, and the fields the wire reads or rewrites
RECORD_DTYPE = np.dtype(
    {
        "names": ["kind", "table", "key", "family", "entry", "last_seen", "ifindex",
                  "vm_ifindex", "flags", "state", "hop"],
        "formats": ["u1", "u1", f"V{KEY_SIZE}", "u1", f"V{ENTRY_SIZE}", "<u4", "<u4", "<u4",
                    "u1", "u1", "<u4"],
        "offsets": [int(abi.ConnChange.kind.offset), int(abi.ConnChange.table.offset),
                    int(abi.ConnChange.key.offset),
                    int(abi.ConnChange.key.offset) + int(abi.ConnKey.family.offset), _ENTRY,
                    _entry_field("last_seen"), _entry_field("ifindex"),
                    _entry_field("vm_ifindex"), _entry_field("flags"), _entry_field("state"),
                    _entry_field("vlan_tci")],  # flag hop_ext: the id, tci[0] | tci[1] << 16
        "itemsize": RECORD_SIZE,
    }
)  # fmt: skip
_REMOVAL_KINDS = np.array([abi.ChangeKind.REMOVED, abi.ChangeKind.EXPIRED], dtype=np.uint8)


def _timeouts_ms(settings: abi.Settings) -> np.ndarray:
    """Each state's timeout in ms, indexed by state (a state beyond CS_MAX: the first's)."""
    return np.array([settings.timeout[i] * 1000 for i in range(abi.CS_MAX)], dtype=np.int64)


def _states(arr: np.ndarray) -> np.ndarray:
    state = arr["state"].astype(np.intp)
    state[state >= abi.CS_MAX] = 0
    return state


@dataclass
class _Merged:
    """The last record of each key of a batch (its index) and what the
    key's records together say of it: *confirmed*, the last table it was
    written to is the confirmed one (a record naming it, not followed by a
    removal or a new learning; a state or hop move after a promotion names
    EITHER table, and the key is still confirmed); *new*, it was learned into
    pending since it was last confirmed or removed, so the peer's confirmed
    table lacks it."""

    last: np.ndarray
    confirmed: np.ndarray
    new: np.ndarray


# odd 64-bit multipliers mixing a key's ten 32-bit words into one hash (_groups)
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53,
                 0x27D4EB2F165667C5, 0x85EBCA77C2B2AE63, 0x94D049BB133111EB,
                 0xBF58476D1CE4E5B9], dtype=np.uint64)  # fmt: skip
assert RECORD_SIZE % 4 == 0 and _KEY % 4 == 0 and len(_MIX) == KEY_SIZE // 4


def _groups(records: bytes, n: int) -> tuple[np.ndarray, int]:
    """Each record's key group (numbered in order of first appearance) and
    how many groups: the keys hashed column-wise, grouped by hash with numpy,
    every member checked equal to its group's first key (a clash of hashes:
    grouped by a dict instead)."""
    w = RECORD_SIZE // 4
    words = np.frombuffer(records, "<u4").reshape(n, w)[:, _KEY // 4 : (_KEY + KEY_SIZE) // 4]
    with np.errstate(over="ignore"):
        h = np.bitwise_xor.reduce(words.astype(np.uint64) * _MIX, axis=1)
    order = np.argsort(h, kind="stable")  # equal hashes keep the batch's order
    h = h[order]
    starts = np.empty(n, bool)
    starts[:1], starts[1:] = True, h[1:] != h[:-1]
    first = order[starts]  # each group's first record
    group = np.empty(n, np.intp)
    group[order] = np.cumsum(starts) - 1
    if not (words == words[first[group]]).all():  # two keys, one hash
        seen: dict[bytes, int] = {}
        keys = [records[o : o + KEY_SIZE] for o in range(_KEY, len(records), RECORD_SIZE)]
        return np.array([seen.setdefault(k, len(seen)) for k in keys], np.intp), len(seen)
    rank = np.empty(len(first), np.intp)  # groups numbered by their first record
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[group], len(first)


def _merge(records: bytes, arr: np.ndarray) -> _Merged:
    n = len(arr)
    group, ngroups = _groups(records, n)
    index = np.arange(n)

    def last_where(mask: np.ndarray) -> np.ndarray:
        out = np.full(ngroups, -1, dtype=np.intp)
        np.maximum.at(out, group[mask], index[mask])
        return out

    removal = np.isin(arr["kind"], _REMOVAL_KINDS)
    last = last_where(np.ones(n, dtype=bool))
    removed = last_where(removal)
    confirmed = last_where(~removal & (arr["table"] == abi.ChangeTable.CONFIRMED))
    learned = last_where(
        (arr["kind"] == abi.ChangeKind.LEARNED) & (arr["table"] == abi.ChangeTable.PENDING)
    )
    return _Merged(
        last=last,
        confirmed=confirmed > np.maximum(removed, learned),
        new=learned > np.maximum(removed, confirmed),
    )


class Batch(NamedTuple):
    """A batch as it travels: the records back to back, the interface names
    and the hop descriptors (back to back) they use."""

    records: bytes
    names: list[str]
    hops: bytes


HopOf = Callable[[int], "bytes | None"]  # a local descriptor id -> its hop_desc bytes (None: gone)


class BatchEncoder:
    """Packs conn_change records (from lh_changes, or a snapshot) into one
    batch: the records' bytes, the names and the hop descriptors they use
    (*hop_of* reads a descriptor of this host's lh_hop_descs)."""

    def __init__(
        self,
        name_of: Callable[[int], str],
        now: int,
        settings: abi.Settings,
        hop_of: HopOf | None = None,
    ) -> None:
        self._name_of, self._hop_of = name_of, hop_of
        self._now, self._hz = now, settings.hz
        self._timeouts = _timeouts_ms(settings)
        self._ids: dict[int, int] = {0: 0}
        self.names: list[str] = []
        self._hop_ids: dict[int, int] = {}
        self._hops: list[bytes] = []
        self._out: list[bytes] = []
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def _id(self, ifindex: int) -> int:
        found = self._ids.get(ifindex)
        if found is None:
            self.names.append(self._name_of(ifindex))
            found = self._ids[ifindex] = len(self.names)
        return found

    def _hop(self, hop_id: int) -> int:
        """1 + the index in the batch's hops of this host's descriptor
        *hop_id*, 0 when it is gone (the peer refuses the record)."""
        found = self._hop_ids.get(hop_id)
        if found is None:
            raw = self._hop_of(hop_id) if self._hop_of is not None else None
            found = 0
            if raw is not None and len(raw) == HOP_SIZE:
                self._hops.append(raw[:_HOP_CONTENT] + bytes(HOP_SIZE - _HOP_CONTENT))
                found = len(self._hops)
            self._hop_ids[hop_id] = found
        return found

    def add(self, records: Iterable[bytes]) -> None:
        """Records as the ring (or a snapshot) gives them (RECORD_SIZE bytes each)."""
        self.add_bytes(b"".join(records))

    def add_bytes(self, raw: bytes) -> None:
        """Records back to back (a whole number of RECORD_SIZE). Records of
        one key merge into its last one, which says what the peer needs of
        the others (_merge): its table is the confirmed one if the key was
        promoted meanwhile; a key learned here meanwhile travels as learned."""
        if not raw:
            return
        given = np.frombuffer(raw, dtype=RECORD_DTYPE)
        merged = _merge(raw, given)
        arr = given[merged.last]  # a copy
        arr["table"][merged.confirmed] = abi.ChangeTable.CONFIRMED
        arr["kind"][merged.new] = abi.ChangeKind.LEARNED
        arr["table"][merged.new] = abi.ChangeTable.PENDING
        removal = np.isin(arr["kind"], _REMOVAL_KINDS)
        age = (self._now - arr["last_seen"].astype(np.int64)) & 0xFFFFFFFF
        age[age >= 0x80000000] = 0  # refreshed after now was read: not aged at all
        left = self._timeouts[_states(arr)]
        if self._hz:
            left -= age * 1000 // self._hz
        left[removal] = 0
        arr["last_seen"] = np.maximum(left, 0)
        kept = ~removal
        for field in ("ifindex", "vm_ifindex"):
            col = arr[field]
            col[removal] = 0
            found = np.unique(col[kept])
            ids = np.array([self._id(int(i)) for i in found], dtype=np.uint32)
            col[kept] = ids[np.searchsorted(found, col[kept])]
        ext = kept & ((arr["flags"] & abi.F_ENTRY_HOP_EXT) != 0)
        if ext.any():  # a tunnel/MPLS last hop: its descriptor travels in the batch
            col = arr["hop"]
            found = np.unique(col[ext])
            ids = np.array([self._hop(int(i)) for i in found], dtype=np.uint32)
            col[ext] = ids[np.searchsorted(found, col[ext])]
        self._out.append(arr.tobytes())
        self._count += len(given)

    def take(self) -> Batch:
        """The batch so far; the encoder starts a new one."""
        out = Batch(b"".join(self._out), self.names, b"".join(self._hops))
        self._out, self.names, self._ids, self._count = [], [], {0: 0}, 0
        self._hops, self._hop_ids = [], {}
        return out


@dataclass
class DecodedBatch:
    """A batch made ready for this host's tables: the last record of each key
    (each carries its entry whole, so the last one is the truth), as arrays
    in the batch's order: *keys* (full conn_key bytes, V40) and *entries*
    (conn_entry bytes, this host's ifindexes and clock) to write, *confirmed*
    (its key's last table is the confirmed one, _Merged), *new* (the peer's
    data path learned it into pending, so its confirmed table had no such
    key, nor has ours: its removal came before, in order); and the keys to
    remove."""

    keys: np.ndarray
    entries: np.ndarray
    confirmed: np.ndarray
    new: np.ndarray
    removed: np.ndarray
    unmapped: int  # records naming an uplink this host does not have
    records: int  # in the batch, all told
    hop_refused: int = 0  # tunnel/MPLS last hops without a descriptor here: removed, not written

    @property
    def writes(self) -> dict[bytes, tuple[bytes, bool, bool]]:
        """key -> (entry, confirmed, new), as Python objects (tests, small batches)."""
        rows = zip(self.keys, self.entries, self.confirmed, self.new, strict=True)
        return {k.tobytes(): (e.tobytes(), bool(c), bool(n)) for k, e, c, n in rows}

    @property
    def removals(self) -> list[bytes]:
        return [k.tobytes() for k in self.removed]


HopIdOf = Callable[[bytes], "int | None"]  # a hop_desc's bytes -> this host's id (None: no room)


def _hop_descs(hops: bytes) -> list[bytes]:
    """A batch's hops field as descriptors; ValueError when malformed."""
    if len(hops) % HOP_SIZE:
        raise ValueError(f"hops are whole hop_descs of {HOP_SIZE} bytes, got {len(hops)}")
    descs = [hops[o : o + HOP_SIZE] for o in range(0, len(hops), HOP_SIZE)]
    known = {int(k) for k in abi.HopKind}
    for d in descs:
        kind = abi.HopDesc.from_buffer_copy(d).kind
        if kind not in known:
            raise ValueError(f"a hop of unknown kind {kind}")
    return descs


def decode_batch(
    records: bytes,
    names: list[str],
    index_of: Callable[[str], int],
    now: int,
    settings: abi.Settings,
    hops: bytes = b"",
    hop_id_of: HopIdOf | None = None,
) -> DecodedBatch:
    """A binary batch back into entries for this host at jiffies *now*:
    names -> its ifindexes (an uplink it lacks: skipped, counted; a VM port
    it lacks: no VM), milliseconds left -> last_seen, a tunnel/MPLS last
    hop's descriptor -> this host's id for it (*hop_id_of*: find or
    allocate; None, or a descriptor gone on the sender: the record is
    refused, its key removed, counted). ValueError when the batch is
    malformed."""
    if len(records) % RECORD_SIZE:
        raise ValueError(f"a batch is whole records of {RECORD_SIZE} bytes, got {len(records)}")
    arr = np.frombuffer(records, dtype=RECORD_DTYPE)
    local = np.array([0, *(index_of(n) for n in names)], dtype=np.uint32)
    if len(arr) and max(int(arr["ifindex"].max()), int(arr["vm_ifindex"].max())) >= len(local):
        raise ValueError(f"a record names an interface beyond the batch's {len(names)}")
    descs = _hop_descs(hops)
    merged = _merge(records, arr)
    arr = arr[merged.last]
    removal = np.isin(arr["kind"], _REMOVAL_KINDS)
    ext = ~removal & ((arr["flags"] & abi.F_ENTRY_HOP_EXT) != 0)
    if ext.any() and int(arr["hop"][ext].max()) > len(descs):
        raise ValueError(f"a record names a hop beyond the batch's {len(descs)}")
    ifindex, vm_ifindex = local[arr["ifindex"]], local[arr["vm_ifindex"]]
    unmapped = ~removal & (arr["ifindex"] != 0) & (ifindex == 0)
    ext &= ~unmapped
    # each descriptor the records to write use, under this host's id; none
    # here: the record is refused and any copy of older news removed (an id
    # is never guessed)
    hop_ids = np.zeros(len(descs) + 1, dtype=np.uint32)
    hop_ok = np.zeros(len(descs) + 1, dtype=bool)
    for i in np.unique(arr["hop"][ext]):
        found = hop_id_of(descs[i - 1]) if i and hop_id_of is not None else None
        if found is not None:
            hop_ids[i], hop_ok[i] = found, True
    refused = ext & ~hop_ok[np.where(ext, arr["hop"], 0)]
    hop_refused = int(refused.sum())
    removal |= refused
    write = ~removal & ~unmapped
    out = arr[write]  # a copy
    out["ifindex"], out["vm_ifindex"] = ifindex[write], vm_ifindex[write]
    out_ext = ext[write]
    out["hop"][out_ext] = hop_ids[out["hop"][out_ext]]
    idle = np.maximum(_timeouts_ms(settings)[_states(out)] - out["last_seen"], 0)
    out["last_seen"] = (now - idle * settings.hz // 1000) & 0xFFFFFFFF
    no_vm = out["vm_ifindex"] == 0
    out["flags"][no_vm] &= np.uint8(~abi.F_ENTRY_VM_FAST & 0xFF)
    return DecodedBatch(
        keys=out["key"],
        entries=out["entry"],
        confirmed=merged.confirmed[write],
        new=merged.new[write],
        removed=arr["key"][removal],
        unmapped=int(unmapped.sum()),
        records=len(records) // RECORD_SIZE,
        hop_refused=hop_refused,
    )


def split_families(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full conn_keys (V40) as the per-family tables key them: (rows of the
    IPv4 ones, their 16-byte conn_key4s; rows of the others, their keys),
    each set of keys a (rows, key size) uint8 array."""
    k = np.ascontiguousarray(keys).view(np.uint8).reshape(-1, KEY_SIZE)
    v4 = k[:, int(abi.ConnKey.family.offset)] == abi.FAMILY_V4
    rows4, rows6 = np.flatnonzero(v4), np.flatnonzero(~v4)
    k4 = np.zeros((len(rows4), ctypes.sizeof(abi.ConnKey4)), dtype=np.uint8)
    src = k[rows4]
    for name in ("saddr", "daddr", "sport", "dport", "proto", "zone"):
        to, frm = int(getattr(abi.ConnKey4, name).offset), int(getattr(abi.ConnKey, name).offset)
        size = int(getattr(abi.ConnKey4, name).size)
        k4[:, to : to + size] = src[:, frm : frm + size]
    return rows4, k4, rows6, k[rows6]


def full_keys4(keys4: np.ndarray) -> np.ndarray:
    """The full conn_keys (a (rows, KEY_SIZE) uint8 array) of the IPv4
    tables' 16-byte keys (a (rows, 16) uint8 array): split_families undone."""
    k = np.zeros((len(keys4), KEY_SIZE), dtype=np.uint8)
    for name in ("saddr", "daddr", "sport", "dport", "proto", "zone"):
        to, frm = int(getattr(abi.ConnKey, name).offset), int(getattr(abi.ConnKey4, name).offset)
        size = int(getattr(abi.ConnKey4, name).size)
        k[:, to : to + size] = keys4[:, frm : frm + size]
    k[:, int(abi.ConnKey.family.offset)] = abi.FAMILY_V4
    return k


def records_of(kind: int, table: int, keys: np.ndarray, entries: np.ndarray) -> bytes:
    """conn_change records of entries read from a table (a snapshot): full
    keys and entries as (rows, size) uint8 arrays."""
    out = np.zeros(len(keys), dtype=RECORD_DTYPE)
    out["kind"], out["table"] = kind, table
    rows = out.view(np.uint8).reshape(len(keys), RECORD_SIZE)
    rows[:, _KEY : _KEY + KEY_SIZE] = keys
    rows[:, _ENTRY : _ENTRY + ENTRY_SIZE] = entries
    return out.tobytes()
