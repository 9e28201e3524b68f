"""The records hosts exchange: a change of one entry, with interfaces by NAME
(hosts number their interfaces differently) and the time the entry has LEFT
before its state's timeout (hosts' clocks differ; no absolute time travels).

A stream message is one batch: fields ``host`` (who published), ``ts`` (its
wall clock, for the lag figure only), ``type`` ("changes", "snapshot",
"hello": a host asks its peers for their tables) and ``records``, a JSON list
of records, each a list in the order of WIRE_FIELDS.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lasthop import abi

__all__ = [
    "WIRE_FIELDS",
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
    raw: bytes, name_of: Callable[[int], str], now: int, settings: abi.Settings
) -> list[object]:
    """A conn_change from lh_changes as the values of WIRE_FIELDS."""
    rec = abi.ConnChange.from_buffer_copy(raw[: ctypes.sizeof(abi.ConnChange)])
    e = rec.entry
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
    ]


def decode_record(values: list[object]) -> Change:
    """The values of WIRE_FIELDS back into a Change (ValueError when malformed)."""
    if len(values) != len(WIRE_FIELDS):
        raise ValueError(f"a record has {len(WIRE_FIELDS)} fields, got {len(values)}")
    kind, table, key, uplink, vm_port, mac, vlan, flags, state, seq, pk, rp, left = values
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
    )
