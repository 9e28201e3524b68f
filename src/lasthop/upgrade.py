"""Adopting pins an older lasthop left: maps whose layout changed are
converted, so an upgrade keeps every established connection.

Release 1 pinned `lh_conns` as one LRU hash with a 40-byte entry whose
`last_seen` was 64 bits wide and which had no state. This release splits the
table in two (lh_pending, lh_conns) and packs the entry differently. libbpf
refuses to reuse a pin whose type or sizes differ, so before the object is
loaded the old table is read, its pin removed, and after loading its entries
go into the new lh_conns as confirmed connections of state NONE (they expire
after timeouts.tcp_established, like an established one). A pin whose
contents the agent rewrites at start anyway (lh_settings) is simply removed.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

from lasthop import abi, libbpf

__all__ = ["OldEntry", "Upgrade", "prepare"]

log = logging.getLogger("lasthop")
BPF_MAP_TYPE_HASH = 1
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


@dataclass
class Upgrade:
    """What `prepare` took out of the old pins, to put into the new maps."""

    entries: list[tuple[bytes, bytes]]  # (conn_key, new conn_entry)

    def apply(self, conns: libbpf.Map) -> int:
        """Writes the carried entries into the new lh_conns; returns how many."""
        written = 0
        for key, value in self.entries:
            try:
                conns.update(key, value, libbpf.BPF_NOEXIST)
                written += 1
            except libbpf.BpfError:  # full, or learned again meanwhile
                continue
        if self.entries:
            log.warning(
                "upgrade: carried %d of %d connections into the new table",
                written,
                len(self.entries),
            )
        return written


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
                    upgrade.entries.append((key, bytes(entry)))
        finally:
            conns.close()
        if old:
            log.warning(
                "upgrade: the pinned table has release 1's layout; moving %d entries",
                len(upgrade.entries),
            )
            conns_pin.unlink()
    # The agent writes every setting at start; the expiry figures start again.
    for name, struct in (("lh_settings", abi.Settings), ("lh_expiry", abi.ExpiryStats)):
        info = libbpf.pinned_info(folder / name)
        if info is not None and info.value_size != ctypes.sizeof(struct):
            (folder / name).unlink()
    info = libbpf.pinned_info(folder / "lh_changes")
    if info is not None and info.max_entries != changes_size:
        (folder / "lh_changes").unlink()
    return upgrade
