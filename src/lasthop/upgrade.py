"""Adopting pins an older lasthop left: maps whose layout changed are
converted, so an upgrade keeps every established connection.

Release 3 gives IPv4 its own tables keyed by a 16-byte conn_key4
(lh_conns4, lh_pending4); lh_conns and lh_pending keep the 40-byte conn_key
and hold IPv6 only, sized by table_size_v6 / pending_table_size_v6. Pins of
release 2 (lh_conns and lh_pending, both families, no lh_conns4 pin) are
read before the object is loaded, their pins removed, and every entry goes
back into the table of its family and kind (confirmed or pending) after
loading. An entry the new table has no room for is dropped, and the count
logged (the connection then falls back to ordinary routing, as an evicted
one; `table_size_v6` sizes the IPv6 tables).

Release 1 pinned `lh_conns` as one LRU hash with a 40-byte entry whose
`last_seen` was 64 bits wide and which had no state. This release splits the
table in two (lh_pending, lh_conns) and packs the entry differently. libbpf
refuses to reuse a pin whose type or sizes differ, so before the object is
loaded the old table is read, its pin removed, and after loading its entries
go into the new lh_conns as confirmed connections of state NONE (they expire
after timeouts.tcp_established, like an established one). A pin whose
contents the agent rewrites at start anyway (lh_settings) is simply removed.

Release 5 makes lh_hop_descs an array of slots (hop_desc grows a
generation, 88 bytes) where it was a hash keyed by the id. The old hash's
descriptors (at most MAX_HOP_DESCS, read once) are carried into the slot
their id names, with the generation that keeps the id valid (the id's low 14
bits are the slot, the rest its generation), so the entries that name them
keep their tunnel or MPLS hop through the upgrade. Two old ids of one slot
(of n hops, about n * n / 32768 such pairs: 0.3 for 100, 30 for 1,000), and
the second is stored
through lh_hop_put under a new id, and the entries naming its old id reply by
ordinary routing (`hop_desc_gone`) until their next request packet learns it
again -- as do entries the old data path learns between the read and the
new programs' attach.

Release 4 gives each interface 64 counter slots in lh_counters (CNT_MAX),
not 48: key = slot * CNT_MAX + reason, so every old key moves. The old
per-CPU counts are read before loading, the pin removed, and each count
written back under its new key (same slot, same reason): `stats` and the
metrics go on from where they were, no counter restarts at zero.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lasthop import abi, libbpf
from lasthop.errors import DatapathError

__all__ = ["OldEntry", "Upgrade", "prepare"]

log = logging.getLogger("lasthop")
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_LRU_HASH = 9


class OldEntry(ctypes.Structure):
    """struct conn_entry of release 1 (lh_conns an LRU hash)."""

    _fields_ = [
        ("last_seen", ctypes.c_uint64),
        ("ifindex", ctypes.c_uint32),
        ("vm_ifindex", ctypes.c_uint32),
        ("mac", ctypes.c_uint8 * abi.ETH_ALEN),
        ("vlan_tci", ctypes.c_uint16 * abi.MAX_VLAN_TAGS),
        ("vlan_count", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("tunnel_id", ctypes.c_uint32),
        ("packets", ctypes.c_uint32),
        ("replies", ctypes.c_uint32),
    ]


def convert(old: OldEntry) -> abi.ConnEntry:
    new = abi.ConnEntry(
        last_seen=old.last_seen & 0xFFFFFFFF,
        ifindex=old.ifindex,
        vm_ifindex=old.vm_ifindex,
        packets=old.packets,
        replies=old.replies,
        vlan_count=old.vlan_count,
        flags=old.flags,
        state=abi.State.NONE,
    )
    new.mac[:] = list(old.mac)
    new.vlan_tci[:] = list(old.vlan_tci)
    return new


class _Tables(Protocol):
    def tables_for(self, key: abi.ConnKey) -> tuple[Any, Any]: ...

    @property
    def counters(self) -> libbpf.Map: ...

    def store_hop_desc(self, hop_id: int, desc: abi.HopDesc) -> None: ...

    def put_hop_desc(self, desc: abi.HopDesc) -> int: ...


@dataclass
class Upgrade:
    """What `prepare` took out of the old pins, to put into the new maps."""

    # (table: 0 confirmed / 1 pending, conn_key, new conn_entry)
    entries: list[tuple[int, bytes, bytes]]
    # lh_counters of an older CNT_MAX: (new key, every CPU's count as the map holds it)
    counters: list[tuple[bytes, bytes]] = field(default_factory=list)
    # lh_hop_descs of release 4 (a hash): (old id, the descriptor's content bytes)
    hops: list[tuple[int, bytes]] = field(default_factory=list)

    def apply(self, maps: _Tables) -> int:
        """Writes the carried entries into the new tables (datapath.Maps), each
        into its family's; returns how many."""
        written = 0
        for which, raw_key, value in self.entries:
            key = abi.ConnKey.from_buffer_copy(raw_key)
            try:
                maps.tables_for(key)[which].update(
                    key, abi.ConnEntry.from_buffer_copy(value), libbpf.BPF_NOEXIST
                )
                written += 1
            except libbpf.BpfError:  # full, or learned again meanwhile
                continue
        if self.entries:
            log.warning(
                "upgrade: carried %d of %d connections into the new table",
                written,
                len(self.entries),
            )
        for counter_key, counts in self.counters:
            maps.counters.update(counter_key, counts)
        self._apply_hops(maps)
        return written

    def _apply_hops(self, maps: _Tables) -> None:
        """The old hash's descriptors, each into the slot its id names with the
        generation that keeps the id (written directly: the new programs are
        not attached yet, nothing else writes the array); a second id of one
        slot (the higher) through lh_hop_put, under a new id."""
        kept = moved = lost = 0
        taken: set[int] = set()
        for old_id, content in sorted(self.hops):  # of two ids of a slot, the lower keeps it
            desc = abi.HopDesc.from_buffer_copy(content.ljust(ctypes.sizeof(abi.HopDesc), b"\0"))
            slot, _ = abi.hop_id_slot(old_id)
            if slot not in taken:
                taken.add(slot)
                maps.store_hop_desc(old_id, desc)
                kept += 1
                continue
            try:
                maps.put_hop_desc(desc)
                moved += 1
            except (DatapathError, libbpf.BpfError):
                lost += 1
        if self.hops:
            log.warning(
                "upgrade: lh_hop_descs is now an array of slots; carried %d hops under "
                "their ids, %d under new ids (their connections reply by routing until "
                "their next request), %d without room",
                kept,
                moved,
                lost,
            )


def _carry_counters(folder: Path, upgrade: Upgrade) -> None:
    """lh_counters with another CNT_MAX than this release's (48 before
    release 4): every non-zero count re-keyed to (slot, reason) under
    abi.CNT_MAX, the pin removed. MAX_IFACES * old CNT_MAX elements are read
    once, whatever the table holds."""
    pin = folder / "lh_counters"
    info = libbpf.pinned_info(pin)
    if info is None or info.max_entries == abi.MAX_IFACES * abi.CNT_MAX:
        return
    old_max = info.max_entries // abi.MAX_IFACES
    m = libbpf.Map.pinned(pin)
    try:
        for key, value in m.items():
            if not any(value):
                continue
            slot, reason = divmod(int.from_bytes(key, "little"), old_max)
            if reason >= abi.CNT_MAX:
                continue  # no such reason here: a later release's
            upgrade.counters.append((bytes(ctypes.c_uint32(slot * abi.CNT_MAX + reason)), value))
    finally:
        m.close()
    log.warning(
        "upgrade: lh_counters had %d slots an interface, now %d; carried %d counts",
        old_max,
        abi.CNT_MAX,
        len(upgrade.counters),
    )
    pin.unlink()


def _carry_release2(folder: Path, upgrade: Upgrade) -> None:
    """Release 2's lh_conns and lh_pending (both families, conn_key): every
    entry carried, both pins removed (IPv6-only tables of their own size
    replace them)."""
    for which, name in ((0, "lh_conns"), (1, "lh_pending")):
        pin = folder / name
        if not pin.exists():
            continue
        m = libbpf.Map.pinned(pin)
        try:
            if m.info.key_size != ctypes.sizeof(abi.ConnKey):
                raise DatapathError(
                    f"the pinned {name} at {folder} has {m.info.key_size}-byte keys, "
                    f"no release's layout: `lasthop detach` first (drops every entry)"
                )
            upgrade.entries.extend((which, key, value) for key, value in m.items())
        finally:
            m.close()
    log.warning(
        "upgrade: the pinned tables have release 2's layout (one table for both "
        "families); moving %d entries into the per-family tables",
        len(upgrade.entries),
    )
    for name in ("lh_conns", "lh_pending"):
        (folder / name).unlink(missing_ok=True)


def _carry_hop_descs(folder: Path, upgrade: Upgrade) -> None:
    """Release 4's lh_hop_descs, a hash keyed by the id (or any pin whose
    value is not this release's hop_desc): every descriptor's content read
    (at most MAX_HOP_DESCS, once), the pin removed."""
    pin = folder / "lh_hop_descs"
    info = libbpf.pinned_info(pin)
    if info is None:
        return
    if info.type == BPF_MAP_TYPE_ARRAY and info.value_size == ctypes.sizeof(abi.HopDesc):
        return
    content = abi.HopDesc.mark.offset
    if info.type == BPF_MAP_TYPE_HASH and info.key_size == 4 and info.value_size >= content:
        m = libbpf.Map.pinned(pin)
        try:
            for key, value in m.items():
                upgrade.hops.append((int.from_bytes(key, "little"), value[:content]))
        finally:
            m.close()
    pin.unlink()


def prepare(folder: Path, changes_size: int) -> Upgrade:
    """Reads and unpins what the new object cannot reuse; call before loading.
    *changes_size*: the lh_changes ring the agent loads (records an earlier
    agent did not read need not outlive it: its sync resyncs at start)."""
    upgrade = Upgrade(entries=[])
    conns_pin = folder / "lh_conns"
    if conns_pin.exists():
        conns = libbpf.Map.pinned(conns_pin)
        try:
            old = (
                conns.info.type == BPF_MAP_TYPE_LRU_HASH
                and conns.info.value_size == ctypes.sizeof(OldEntry)
            )
            if old:
                for key, value in conns.items():
                    entry = convert(OldEntry.from_buffer_copy(value))
                    upgrade.entries.append((0, key, bytes(entry)))
        finally:
            conns.close()
        if old:
            log.warning(
                "upgrade: the pinned table has release 1's layout; moving %d entries",
                len(upgrade.entries),
            )
            conns_pin.unlink()
    old_tables = (folder / "lh_pending").exists() or conns_pin.exists()
    if old_tables and not (folder / "lh_conns4").exists():
        _carry_release2(folder, upgrade)
    _carry_counters(folder, upgrade)
    _carry_hop_descs(folder, upgrade)
    # The agent writes every setting at start; the expiry figures start again.
    for name, struct in (("lh_settings", abi.Settings), ("lh_expiry", abi.ExpiryStats)):
        info = libbpf.pinned_info(folder / name)
        if info is not None and info.value_size != ctypes.sizeof(struct):
            (folder / name).unlink()
    info = libbpf.pinned_info(folder / "lh_changes")
    if info is not None and info.max_entries != changes_size:
        (folder / "lh_changes").unlink()
    return upgrade
