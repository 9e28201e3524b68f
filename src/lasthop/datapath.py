"""The data path as the agent sees it: the BPF object loaded with its maps
pinned, programs attached to interfaces, and typed access to the maps.

Maps are pinned by name under one folder per network namespace; loading the
object again reuses them, so a restart or upgrade keeps every entry. Programs
are attached to the interfaces' tc hooks through tcx links pinned beside the
maps (kernel 6.6+), or as clsact filters with a fixed handle and priority
(older kernels, or `tc_hook = "clsact"`); either is replaced atomically on
the next attach.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lasthop import abi, libbpf, upgrade
from lasthop.errors import DatapathError, NotAttachedError, TableSizeError

__all__ = [
    "Datapath",
    "DatapathError",
    "NotAttachedError",
    "TableSizeError",
    "Pins",
    "Table",
    "FamilyMap",
    "TC_HANDLE",
    "TC_PRIORITY",
    "TC_HOOKS",
]

TC_HANDLE = 0x4C48  # "LH"
TC_PRIORITY = 0x4C48
_NONZERO = re.compile(rb"[^\x00]")  # a configured interface's role byte in lh_ifaces
OBJECT_ENV = "LASTHOP_BPF_OBJECT"  # a prebuilt object to load instead of building bpf/lasthop.c
MAP_NAMES = (
    "lh_conns4",
    "lh_pending4",
    "lh_conns",
    "lh_pending",
    "lh_ifaces",
    "lh_counters",
    "lh_settings",
    "lh_services",
    "lh_maglev",
    "lh_table_counters",
    "lh_expiry",
    "lh_expiry_request",
    "lh_expiry_due",
    "lh_vm_addrs",
    "lh_vm_usage",
    "lh_changes",
    "lh_hops",
    "lh_hops_refused",
    "lh_hop_moved",
    "lh_endpoints",
    "lh_endpoints_refused",
    "lh_endpoints_down",
    "lh_scope",
    "lh_hop_descs",
    "lh_inplace",
)
# run by the CLI through their pins
PINNED_PROGRAMS = (
    "lh_clock", "lh_stats", "lh_svc_walk", "lh_scope_flush", "lh_hop_put", "lh_conn_remove",
)  # fmt: skip
TABLES = ("confirmed", "pending")  # the index of expiry_stats arrays (both families each)
# the connection maps: (name, family, table); lh_conns4/lh_pending4 are keyed
# by the 16-byte conn_key4, lh_conns/lh_pending (IPv6) by conn_key
CONN_MAPS = (
    ("lh_conns4", abi.FAMILY_V4, abi.ChangeTable.CONFIRMED),
    ("lh_pending4", abi.FAMILY_V4, abi.ChangeTable.PENDING),
    ("lh_conns", abi.FAMILY_V6, abi.ChangeTable.CONFIRMED),
    ("lh_pending", abi.FAMILY_V6, abi.ChangeTable.PENDING),
)
# config key of each connection map's size
SIZE_KEYS = {
    "lh_conns4": "table_size",
    "lh_pending4": "pending_table_size",
    "lh_conns": "table_size_v6",
    "lh_pending": "pending_table_size_v6",
}
UPLINK_EGRESS_PROGRAM = "lh_uplink_out"  # host-sent ICMP errors to their last hop
PROGRAM_OF_ROLE = {abi.Role.UPLINK: "lh_uplink", abi.Role.VM_PORT: "lh_vmport"}
L3_UPLINK_PROGRAM = "lh_uplink_l3"  # an uplink whose frames start at their IP header
MPLS_UPLINK_PROGRAM = "lh_uplink_mpls"  # XDP of an MPLS uplink: labels off, into metadata
# programs an agent loads only when first needed, each alone on the first object's
# maps (Datapath.program_later): lh_uplink_l3 at the first L3 uplink's attach,
# lh_uplink_out at the first uplink of a routed host (a bridged host never runs it)
LATER_PROGRAMS = (L3_UPLINK_PROGRAM, UPLINK_EGRESS_PROGRAM)
# programs of the object the agent does not load at start: those above, and the
# benchmarks' and tests' (they load them themselves)
AGENT_SKIPS = (*LATER_PROGRAMS, "lh_reference", "lh_empty")
# the programs lasthop puts on tc hooks: what detach and the queries look for
TC_PROGRAMS = frozenset({*PROGRAM_OF_ROLE.values(), L3_UPLINK_PROGRAM, UPLINK_EGRESS_PROGRAM})
# config tc_hook: tcx links, clsact filters, or tcx where the kernel has them
TC_HOOKS = ("auto", "tcx", "clsact")
_NO_TCX = (errno.EINVAL, errno.EOPNOTSUPP)  # bpf_link_create on a kernel older than 6.6
PIN_CREATE_TRIES = 100  # Pins.create: a root removed under it is made again this often


@dataclass(frozen=True)
class Pins:
    """Where one namespace's maps are pinned: *folder*, one per namespace in
    the pin root above it (`/sys/fs/bpf/lasthop` unless configured).

    create() makes the root when missing and remove() takes it away once no
    namespace's folder is left in it, so a host (or a test run) that detached
    everything keeps nothing in bpffs. The two never race: the root goes only
    while it is empty (rmdir refuses otherwise), and a create() whose root
    went between its two mkdirs makes both again."""

    folder: Path

    @property
    def root(self) -> Path:
        return self.folder.parent

    def path(self, name: str) -> Path:
        return self.folder / name

    def exist(self) -> bool:
        return self.path("lh_conns").exists()

    def create(self) -> None:
        for _ in range(PIN_CREATE_TRIES):
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                self.folder.mkdir(exist_ok=True)
                return
            except FileNotFoundError:  # another namespace's remove() took the empty root
                continue
        raise DatapathError(f"cannot create {self.folder}: its parent keeps being removed")

    def remove(self) -> list[str]:
        """Removes every pin (and folder) of this namespace, then the root if
        that left it empty and it is no mount point; returns the names removed."""
        removed = []
        if self.folder.is_dir():
            for entry in sorted(self.folder.rglob("*"), key=lambda p: -len(p.parts)):
                if entry.is_dir():
                    entry.rmdir()
                else:
                    entry.unlink()
                removed.append(str(entry.relative_to(self.folder)))
            self.folder.rmdir()
        if self.root.is_dir() and not os.path.ismount(self.root):
            try:
                self.root.rmdir()
            except OSError as err:  # another namespace's pins, or one made meanwhile: it stays
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.EBUSY):
                    raise
        return removed


@dataclass(frozen=True)
class Table:
    """One connection map: its family's key layout (conn_key4 for IPv4,
    conn_key for IPv6), its counter of entries the agent removed and its name
    in change records. Keys in and out are always the full ConnKey."""

    map: libbpf.Map
    family: int  # abi.FAMILY_V4 or FAMILY_V6
    which: abi.ChangeTable  # CONFIRMED or PENDING

    @property
    def removed(self) -> abi.TableCounter:
        if self.which == abi.ChangeTable.CONFIRMED:
            return abi.TableCounter.CONFIRMED_REMOVED
        return abi.TableCounter.PENDING_REMOVED

    def raw_key(self, key: abi.ConnKey) -> bytes:
        """The map's key of *key* (of this table's family)."""
        return bytes(abi.key4_of(key)) if self.family == abi.FAMILY_V4 else bytes(key)

    def conn_key(self, raw: bytes) -> abi.ConnKey:
        """The full ConnKey of one of the map's keys."""
        if self.family == abi.FAMILY_V4:
            return abi.key_of4(abi.ConnKey4.from_buffer_copy(raw))
        return abi.ConnKey.from_buffer_copy(raw)

    def items(self) -> Iterator[tuple[abi.ConnKey, abi.ConnEntry]]:
        """Every entry, read in batches (never all at once)."""
        for key, value in self.map.items():
            yield self.conn_key(key), abi.ConnEntry.from_buffer_copy(value)

    def lookup(self, key: abi.ConnKey) -> abi.ConnEntry | None:
        raw = self.map.lookup(self.raw_key(key))
        return abi.ConnEntry.from_buffer_copy(raw) if raw is not None else None

    def update(self, key: abi.ConnKey, entry: abi.ConnEntry, flags: int = libbpf.BPF_ANY) -> None:
        self.map.update(self.raw_key(key), bytes(entry), flags)

    def delete(self, key: abi.ConnKey) -> bool:
        return self.map.delete(self.raw_key(key))


class FamilyMap:
    """The confirmed or the pending table, both families, as one map of full
    conn_key bytes (for tests and benches that speak in raw keys): an IPv4 key
    goes to the 16-byte-keyed map, an IPv6 one to the conn_key-keyed map."""

    def __init__(self, map4: libbpf.Map, map6: libbpf.Map) -> None:
        self.map4 = map4
        self.map6 = map6

    @classmethod
    def of(cls, get: Callable[[str], libbpf.Map], which: abi.ChangeTable) -> FamilyMap:
        """The table *which* of an object or pin folder (*get*: name -> map)."""
        names = [name for name, _, w in CONN_MAPS if w == which]
        return cls(get(names[0]), get(names[1]))

    def route(self, key: bytes) -> tuple[libbpf.Map, bytes]:
        """The map holding full key *key*, and its key there."""
        k = abi.ConnKey.from_buffer_copy(key)
        if k.family == abi.FAMILY_V4:
            return self.map4, bytes(abi.key4_of(k))
        return self.map6, key

    def lookup(self, key: bytes) -> bytes | None:
        m, k = self.route(key)
        return m.lookup(k)

    def update(self, key: bytes, value: bytes, flags: int = libbpf.BPF_ANY) -> None:
        m, k = self.route(key)
        m.update(k, value, flags)

    def delete(self, key: bytes) -> bool:
        m, k = self.route(key)
        return m.delete(k)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every entry with its full key, IPv4 first, read in batches."""
        for key, value in self.map4.items():
            yield bytes(abi.key_of4(abi.ConnKey4.from_buffer_copy(key))), value
        yield from self.map6.items()

    def keys(self) -> Iterator[bytes]:
        return (key for key, _ in self.items())

    def count(self) -> int:
        return self.map4.count() + self.map6.count()

    def close(self) -> None:
        self.map4.close()
        self.map6.close()


class Maps:
    """The pinned maps, with typed element access."""

    def __init__(self, maps: dict[str, libbpf.Map]) -> None:
        self._all = maps
        self.conns4 = maps["lh_conns4"]
        self.pending4 = maps["lh_pending4"]
        self.conns = maps["lh_conns"]  # IPv6
        self.pending = maps["lh_pending"]  # IPv6
        self._tables = tuple(Table(maps[name], fam, which) for name, fam, which in CONN_MAPS)
        self.ifaces = maps["lh_ifaces"]
        self.counters = maps["lh_counters"]
        self.settings = maps["lh_settings"]
        self.services = maps["lh_services"]
        self.maglev = maps["lh_maglev"]
        self.table_counters = maps["lh_table_counters"]
        self.expiry = maps["lh_expiry"]
        self.expiry_request = maps["lh_expiry_request"]
        self.vm_addrs = maps["lh_vm_addrs"]
        self.vm_usage = maps["lh_vm_usage"]
        self.changes = maps["lh_changes"]
        self.hops = maps["lh_hops"]
        self.hops_refused = maps["lh_hops_refused"]
        self.hop_moved = maps["lh_hop_moved"]
        self.endpoints = maps["lh_endpoints"]
        self.endpoints_refused = maps["lh_endpoints_refused"]
        self.endpoints_down = maps["lh_endpoints_down"]
        self.scope = maps["lh_scope"]
        self.hop_descs = maps["lh_hop_descs"]
        self.inplace = maps["lh_inplace"]
        # sync on (lasthop.sync): receives a conn_change record for each entry
        # user space removes or rewrites, as the data path's go to lh_changes
        self.on_change: Callable[[bytes], None] | None = None
        # lh_svc_walk: the agent's object's, or opened from its pin when first run
        self.svc_walker: libbpf.Program | None = None
        self._walker_pin: Path | None = None
        # lh_hop_put: the same, for put_hop_desc
        self.hop_putter: libbpf.Program | None = None
        self._putter_pin: Path | None = None
        # lh_conn_remove: the same, for remove()
        self.conn_remover: libbpf.Program | None = None
        self._remover_pin: Path | None = None

    @classmethod
    def open_pinned(cls, pins: Pins) -> Maps:
        if not pins.exist():
            raise NotAttachedError(
                f"no data path pinned at {pins.folder}: is `lasthop run` attached here?"
            )
        maps = cls({name: libbpf.Map.pinned(pins.path(name)) for name in MAP_NAMES})
        maps._walker_pin = pins.path("lh_svc_walk")
        maps._putter_pin = pins.path("lh_hop_put")
        maps._remover_pin = pins.path("lh_conn_remove")
        return maps

    def close(self) -> None:
        for m in self._all.values():
            m.close()
        if self._walker_pin is not None and self.svc_walker is not None:
            os.close(self.svc_walker.fd)  # opened from the pin: ours
            self.svc_walker = None
        if self._putter_pin is not None and self.hop_putter is not None:
            os.close(self.hop_putter.fd)
            self.hop_putter = None
        if self._remover_pin is not None and self.conn_remover is not None:
            os.close(self.conn_remover.fd)
            self.conn_remover = None

    def svc_walk(self, request: abi.SvcWalk) -> abi.SvcWalk | None:
        """Has the kernel move or remove the service connections *request*
        names (lh_svc_walk: it walks the tables, user space reads none of
        them); the request with its counts, or None when no lh_svc_walk is
        loaded here (then the caller walks)."""
        if self.svc_walker is None and self._walker_pin is not None:
            if not self._walker_pin.exists():  # an agent of an older release pinned none
                return None
            self.svc_walker = libbpf.Program(libbpf.obj_get(self._walker_pin), "lh_svc_walk")
        if self.svc_walker is None:
            return None
        run = self.svc_walker.test_run(bytes(request))
        if run.retval != 1:
            raise DatapathError(f"lh_svc_walk refused its request (returned {run.retval})")
        return abi.SvcWalk.from_buffer_copy(run.data[: ctypes.sizeof(abi.SvcWalk)])

    def hop_desc(self, hop_id: int) -> abi.HopDesc | None:
        """The tunnel/MPLS last hop an entry with F_ENTRY_HOP_EXT names, if its
        slot still holds it (encap.h's hop_desc_of: the id's generation, even,
        a kind set)."""
        raw = self.hop_descs.lookup(_u32(hop_id & abi.HOP_SLOT_MASK))
        if not raw:
            return None
        desc = abi.HopDesc.from_buffer_copy(raw)
        return desc if abi.hop_id_names(hop_id, desc.gen) and desc.kind else None

    def store_hop_desc(self, hop_id: int, desc: abi.HopDesc) -> None:
        """store_hop_desc on lh_hop_descs: *desc* into the slot *hop_id* names,
        not a claim (only while no program writes the array: an upgrade)."""
        store_hop_desc(self.hop_descs, hop_id, desc)

    def put_hop_desc(self, desc: abi.HopDesc) -> int:
        """Stores *desc* as the data path would (the slot holding the same
        content, else a free one claimed by compare-and-swap: encap.h's
        hop_desc_resolve, marked in use by the expiry pass under way or next so
        its sweep keeps it), through lh_hop_put (test run: user space cannot
        compare-and-swap a slot), for `import`, the sync's applier and an
        upgrade; returns its id. Raises DatapathError when its slots are taken."""
        if self.hop_putter is None and self._putter_pin is not None:
            if not self._putter_pin.exists():
                raise DatapathError(
                    "no lh_hop_put pinned: the attached data path is an older release's "
                    "(restart `lasthop run` to upgrade it)"
                )
            self.hop_putter = libbpf.Program(libbpf.obj_get(self._putter_pin), "lh_hop_put")
        if self.hop_putter is None:
            raise DatapathError("lh_hop_put is not loaded")
        run = self.hop_putter.test_run(bytes(desc))
        if run.retval == 1:
            return int(abi.HopDesc.from_buffer_copy(run.data[: ctypes.sizeof(abi.HopDesc)]).mark)
        if run.retval == 0:
            raise DatapathError(f"lh_hop_put: not a hop descriptor (kind {desc.kind})")
        try:
            reason = abi.Counter(run.retval).name.lower()
        except ValueError:
            reason = str(run.retval)
        raise DatapathError(f"lh_hop_descs: no slot for hop {hop_desc_hash(desc):#x} ({reason})")

    # interfaces
    def iface(self, ifindex: int) -> abi.IfaceCfg:
        raw = self.ifaces.lookup(_u32(ifindex))
        return abi.IfaceCfg.from_buffer_copy(raw) if raw else abi.IfaceCfg()

    def set_iface(self, ifindex: int, cfg: abi.IfaceCfg) -> None:
        if not 0 < ifindex < abi.MAX_IFINDEX:
            raise DatapathError(
                f"ifindex {ifindex} is outside the data path's range 1..{abi.MAX_IFINDEX - 1}"
            )
        self.ifaces.update(_u32(ifindex), bytes(cfg))

    def attached(self, among: Iterable[int] | None = None) -> dict[int, abi.IfaceCfg]:
        """ifindex -> config of every interface with a role; with *among*, of
        those ifindexes only (a few lookups instead of all MAX_IFINDEX slots)."""
        out = {}
        role_at = abi.IfaceCfg.role.offset
        if among is None:
            try:
                raw = self.ifaces.array_values(abi.MAX_IFINDEX)
            except libbpf.BpfError:  # no batch read of arrays (kernel < 5.6): pair by pair
                raw = b""
            if raw:
                # one read of every slot, the role bytes scanned in C (a Python loop over
                # the 65,536 pairs took ~60 ms, and start() asks once per interface)
                size = ctypes.sizeof(abi.IfaceCfg)
                for found in _NONZERO.finditer(raw[role_at::size]):
                    i = found.start()
                    out[i] = abi.IfaceCfg.from_buffer_copy(raw, i * size)
                return out
        if among is not None:
            pairs: Iterable[tuple[bytes, bytes | None]] = (
                (_u32(i), self.ifaces.lookup(_u32(i))) for i in among if 0 < i < abi.MAX_IFINDEX
            )
        else:
            pairs = self.ifaces.items()
        for key, value in pairs:
            if value and value[role_at] != abi.Role.NONE:
                out[int.from_bytes(key, "little")] = abi.IfaceCfg.from_buffer_copy(value)
        return out

    # settings
    def get_settings(self) -> abi.Settings:
        raw = self.settings.lookup(_u32(0))
        return abi.Settings.from_buffer_copy(raw) if raw else abi.Settings()

    def set_settings(self, settings: abi.Settings) -> None:
        self.settings.update(_u32(0), bytes(settings))
        self.request_expiry()  # new timeouts: every deadline moves

    # connections
    def entries(self) -> Iterator[tuple[abi.ConnKey, abi.ConnEntry]]:
        """Every entry, confirmed first, read in batches (never all at once)."""
        for which in (abi.ChangeTable.CONFIRMED, abi.ChangeTable.PENDING):
            yield from self.entries_of(TABLES[which])

    def entries_of(self, table: str) -> Iterator[tuple[abi.ConnKey, abi.ConnEntry]]:
        """The entries of one table, both families: "confirmed" or "pending"."""
        which = abi.ChangeTable(TABLES.index(table))
        for t in self._tables:
            if t.which == which:
                yield from t.items()

    def report(
        self,
        kind: abi.ChangeKind,
        table: abi.ChangeTable,
        key: abi.ConnKey,
        entry: abi.ConnEntry | None = None,
    ) -> None:
        """Hands a change user space made to the sync (on_change), if it is on."""
        if self.on_change is not None:
            rec = abi.ConnChange(kind=kind, table=table, key=key, entry=entry or abi.ConnEntry())
            self.on_change(bytes(rec))

    def tables(self) -> tuple[Table, ...]:
        """Each connection map, confirmed before pending, IPv4 before IPv6."""
        return self._tables

    def capacity(self, which: abi.ChangeTable) -> int:
        """Entries the confirmed or the pending tables hold, both families."""
        return sum(t.map.info.max_entries for t in self._tables if t.which == which)

    def tables_for(self, key: abi.ConnKey) -> tuple[Table, Table]:
        """The (confirmed, pending) tables of *key*'s family."""
        fam = abi.FAMILY_V4 if key.family == abi.FAMILY_V4 else abi.FAMILY_V6
        confirmed, pending = (t for t in self._tables if t.family == fam)
        return confirmed, pending

    def delete(self, key: abi.ConnKey) -> bool:
        """Removes a connection from whichever table holds it; counts and reports the removal."""
        for table in self.tables_for(key):
            counter = self.remove(table, key)
            if counter is not None:
                self.add_table_counter(counter, 1)
                self.report(abi.ChangeKind.REMOVED, removed_as(counter), key)
                return True
        return False

    def remove(self, table: Table, key: abi.ConnKey) -> abi.TableCounter | None:
        """Removes *key* from *table*, neither counted nor reported: the
        counter its removal belongs under (an unconfirmed entry waiting in a
        confirmed table, F_ENTRY2_INPLACE: INPLACE_REMOVED, a pending
        connection), None when the table has no such entry. A confirmed
        table's entry goes through lh_conn_remove (test run), which gives an
        in-place entry's place in the quota back exactly once, as user space
        cannot (the bit is cleared by an atomic fetch-and, and a
        confirmation on another CPU may race it)."""
        if table.which == abi.ChangeTable.PENDING:
            return table.removed if table.delete(key) else None
        pin = self._remover_pin
        if self.conn_remover is None and pin is not None and pin.exists():
            self.conn_remover = libbpf.Program(libbpf.obj_get(pin), "lh_conn_remove")
        if self.conn_remover is None:  # an older release's data path: no in-place entries
            return table.removed if table.delete(key) else None
        run = self.conn_remover.test_run(bytes(key))
        return _REMOVED_BY.get(run.retval)

    def update_entry(self, key: abi.ConnKey, entry: abi.ConnEntry) -> bool:
        """Rewrites an existing entry in place (whichever table); False when gone.
        The caller asks for a walk (request_expiry) once after its writes."""
        for table in self.tables_for(key):
            try:
                table.update(key, entry, libbpf.BPF_EXIST)
            except libbpf.BpfError:
                continue  # not in this table
            self.report(abi.ChangeKind.HOP, table.which, key, entry)  # e.g. a service moved its VM
            return True
        return False

    def request_expiry(self) -> None:
        request_expiry(self.expiry_request)

    def table_totals(self) -> dict[abi.TableCounter, int]:
        """Table-wide event counters, summed over CPUs."""
        out = {}
        for c in abi.TableCounter:
            raw = self.table_counters.lookup(_u32(int(c)))
            values = self.table_counters.percpu_values(raw) if raw else []
            out[c] = sum(int.from_bytes(v, "little") for v in values)
        return out

    def add_table_counter(self, counter: abi.TableCounter, n: int) -> None:
        """Adds *n* from user space (CPU 0's copy; the data path never writes these)."""
        _add_percpu(self.table_counters, _u32(int(counter)), n)

    def expiry_stats(self) -> abi.ExpiryStats:
        raw = self.expiry.lookup(_u32(0))
        return abi.ExpiryStats.from_buffer_copy(raw) if raw else abi.ExpiryStats()

    # VM addresses
    def set_vm_addr(self, ifindex: int, family: int, addr: bytes, origin: abi.VmAddrOrigin) -> None:
        self.vm_addrs.update(
            bytes(abi.vm_addr_key(ifindex, family, addr)), bytes(abi.VmAddr(origin))
        )

    def vm_addr_items(self) -> Iterator[tuple[abi.VmAddrKey, abi.VmAddr]]:
        for key, value in self.vm_addrs.items():
            yield abi.VmAddrKey.from_buffer_copy(key), abi.VmAddr.from_buffer_copy(value)

    # counters
    def counter_totals(self, slots: Iterable[int] | None = None) -> dict[int, list[int]]:
        """slot -> per-reason totals summed over CPUs (slots with any count);
        with *slots*, only those are read."""
        out: dict[int, list[int]] = {}
        if slots is not None:
            keys = (
                _u32(s * abi.CNT_MAX + r) for s in sorted(set(slots)) for r in range(abi.CNT_MAX)
            )
            pairs: Iterable[tuple[bytes, bytes | None]] = (
                (k, self.counters.lookup(k)) for k in keys
            )
        else:
            pairs = self.counters.items()
        for key, value in pairs:
            if not value or not any(value):
                continue
            total = sum(int.from_bytes(v, "little") for v in self.counters.percpu_values(value))
            if total:
                index = int.from_bytes(key, "little")
                slot, reason = divmod(index, abi.CNT_MAX)
                out.setdefault(slot, [0] * abi.CNT_MAX)[reason] = total
        return out

    def add_counter(self, slot: int, counter: abi.Counter, n: int) -> None:
        """Adds *n* to a counter from user space (on CPU 0's copy)."""
        _add_percpu(self.counters, abi.counter_key(slot, counter), n)


def request_expiry(expiry_request: libbpf.Map) -> None:
    """Makes the next expiry run (lh_expire) walk the tables: call after
    writing or removing entries from user space, which the data path's change
    count does not see. A fresh token each time, so concurrent callers cannot
    cancel each other out."""
    token = int.from_bytes(os.urandom(8), "little") or 1
    expiry_request.update(_u32(0), token.to_bytes(8, "little"))


def _add_percpu(m: libbpf.Map, key: bytes, n: int) -> None:
    raw = bytearray(m.lookup(key) or bytes(8 * libbpf.num_possible_cpus()))
    raw[0:8] = (int.from_bytes(raw[0:8], "little") + n).to_bytes(8, "little")
    m.update(key, bytes(raw))


def _object() -> Path:
    """The object to load: $LASTHOP_BPF_OBJECT when set, else the built one."""
    from lasthop.build import ensure_object  # only the agent loads an object

    override = os.environ.get(OBJECT_ENV)
    return Path(override) if override else ensure_object()


def default_pending(table_size: int) -> int:
    """The pending table's size when the config names none: a quarter of the
    confirmed one (new connections confirm or expire within seconds)."""
    return max(1024, table_size // 4)


def default_in_place(pending_size: int | None, table_size: int) -> int:
    """pending_in_place when the config names none: a quarter of the pending
    table (65,536 at the default sizes: many times the connections a host
    opens within their handshakes' round trip)."""
    return (pending_size or default_pending(table_size)) // 4


def default_v6(size_v4: int) -> int:
    """An IPv6 table's size when the config names none: a quarter of the IPv4
    one's (most hosts' connections are IPv4; a preallocated table costs its
    whole size in memory whether used or not)."""
    return max(1024, size_v4 // 4)


def table_sizes(
    table_size: int,
    pending_size: int = 0,
    table_size_v6: int = 0,
    pending_size_v6: int = 0,
    in_place: int = 0,
) -> dict[str, int]:
    """Each connection map's max_entries from the config's sizes (0: default).
    lh_conns4 holds table_size confirmed connections and up to *in_place*
    (pending_in_place) unconfirmed ones beside them, so those never take the
    room table_size promises to confirmed connections."""
    pending = pending_size or default_pending(table_size)
    return {
        "lh_conns4": table_size + in_place,
        "lh_pending4": pending,
        "lh_conns": table_size_v6 or default_v6(table_size),
        "lh_pending": pending_size_v6 or default_v6(pending),
    }


def changes_ring_size(sync: bool) -> int:
    """lh_changes' bytes: the whole ring with sync on; without, one page (the
    map must exist, but the data path writes nothing to it: 4 MiB for
    nothing was ~3 B an entry of a 1,000,000-entry table's budget)."""
    return abi.CHANGES_RING_SIZE if sync else os.sysconf("SC_PAGE_SIZE")


_HOP_CONTENT = abi.HopDesc.mark.offset  # bytes of a hop_desc that are content


def hop_desc_hash(desc: abi.HopDesc) -> int:
    """encap.h's hop_desc_hash: the kernel's jhash2 of the content words."""
    from lasthop.services.maglev import jhash2

    raw = bytes(desc)[:_HOP_CONTENT]
    return jhash2(struct.unpack(f"={len(raw) // 4}I", raw), 0)


def store_hop_desc(descs: libbpf.Map, hop_id: int, desc: abi.HopDesc) -> None:
    """Writes *desc* into the slot *hop_id* names, with the generation that
    makes the id name it -- not a claim: only where no program writes
    lh_hop_descs (tests, the bench, an upgrade before the new programs are
    attached). The agent's running writers go through Maps.put_hop_desc."""
    slot, gen = abi.hop_id_slot(hop_id)
    stored = abi.HopDesc.from_buffer_copy(bytes(desc))
    stored.gen = gen
    descs.update(_u32(slot), bytes(stored))


_HOP_SETTLED_TRIES = 3  # copies of a slot that keeps changing before it is left out


def _hop_settled(descs: libbpf.Map, key: bytes, raw: bytes) -> abi.HopDesc | None:
    """The descriptor of slot *key* as one writer left it, or None (no hop,
    or the slot kept changing). A copy of a slot is not atomic: one copied
    while the data path or the agent rewrote it can mix two hops under an
    even generation read before the write began. Every write moves the
    generation, so a second copy equal to the first (the sweep's mark, which
    moves without a write, aside) saw no write in between."""
    settled = abi.HopDesc.mark.offset
    for _ in range(_HOP_SETTLED_TRIES):
        desc = abi.HopDesc.from_buffer_copy(raw)
        if not desc.kind or desc.gen & 1:
            return None
        again = descs.lookup(key)
        if again is None:
            return None
        if again[:settled] == raw[:settled] and abi.HopDesc.from_buffer_copy(again).gen == desc.gen:
            return desc
        raw = again
    return None


def hops_in_use(descs: libbpf.Map) -> Iterator[tuple[int, abi.HopDesc]]:
    """The slots of lh_hop_descs that hold a hop, as (the id naming it, its
    descriptor): a kind set, the generation even (not being written) and the
    same in a second copy (_hop_settled); at most MAX_HOP_DESCS, read in
    batches, then the slots in use once more each."""
    for key, raw in descs.items():
        desc = _hop_settled(descs, key, raw)
        if desc is not None:
            yield abi.hop_id_of(int.from_bytes(key, "little"), desc.gen), desc


def _u32(n: int) -> bytes:
    return bytes(ctypes.c_uint32(n))


# lh_conn_remove's result -> the counter of the removal
_REMOVED_BY = {1: abi.TableCounter.CONFIRMED_REMOVED, 2: abi.TableCounter.INPLACE_REMOVED}


def removed_as(counter: abi.TableCounter) -> abi.ChangeTable:
    """The table a removal counted under *counter* reports to the peers: an
    in-place entry is a pending connection."""
    if counter == abi.TableCounter.CONFIRMED_REMOVED:
        return abi.ChangeTable.CONFIRMED
    return abi.ChangeTable.PENDING


class Datapath:
    """The loaded object: programs to attach and the (pinned) maps."""

    def __init__(
        self,
        pins: Pins,
        *,
        table_size: int,
        pending_size: int = 0,
        table_size_v6: int = 0,
        pending_size_v6: int = 0,
        in_place: int = 0,
        changes_size: int = abi.CHANGES_RING_SIZE,
        obj_path: Path | None = None,
        tc_hook: str = "auto",
    ) -> None:
        assert tc_hook in TC_HOOKS, tc_hook
        pins.create()
        self.pins = pins
        self._tc_hook = tc_hook
        # tcx links in use: None until the first attach asks the kernel ("auto")
        self.tcx: bool | None = {"tcx": True, "clsact": False}.get(tc_hook)
        sizes = table_sizes(table_size, pending_size, table_size_v6, pending_size_v6, in_place)
        sizes["lh_changes"] = changes_size
        carried = upgrade.prepare(pins.folder, changes_size)  # an older agent's pins
        self._path = obj_path or _object()
        # the object as loaded now: LATER_PROGRAMS, loaded later, must come from the
        # same build as the maps they share, even if the file is replaced meanwhile
        self._image = self._path.read_bytes()
        self._later: dict[str, libbpf.BpfObject] = {}  # LATER_PROGRAMS loaded so far, by name
        try:
            self._obj = libbpf.BpfObject(
                self._path,
                pin_root=pins.folder,
                max_entries=sizes,
                skip=AGENT_SKIPS,  # LATER_PROGRAMS: loaded when first attached
                image=self._image,
            )
        except libbpf.BpfError as err:
            for name, key in SIZE_KEYS.items():
                if name == "lh_conns4" and in_place:  # the quota's room is in it
                    key = "table_size + pending_in_place"
                info = libbpf.pinned_info(pins.path(name))
                size = info.max_entries if info is not None else sizes[name]
                if size != sizes[name]:
                    raise TableSizeError(
                        f"the pinned {name} at {pins.folder} holds {size} entries, the config "
                        f"asks for {sizes[name]}: keep {key} = {size}, or `lasthop detach` "
                        "first (drops every entry)"
                    ) from err
            raise DatapathError(f"cannot load the data path: {err}") from err
        self.maps = Maps({name: self._obj.map(name) for name in MAP_NAMES})
        self.maps.hop_putter = self._obj.program("lh_hop_put")
        self.maps.conn_remover = self._obj.program("lh_conn_remove")
        if carried.apply(self.maps):
            self.maps.request_expiry()
        self.clock_prog = self._obj.program("lh_clock")
        self.expire_prog = self._obj.program("lh_expire")
        self.stats_prog = self._obj.program("lh_stats")
        self.maps.svc_walker = self._obj.program("lh_svc_walk")
        self.scope_flush_prog = self._obj.program("lh_scope_flush")
        self.prune_uplinks_prog = self._obj.program("lh_prune_uplinks")
        for name in PINNED_PROGRAMS:  # programs are not pinned by libbpf: replace by hand
            pin = pins.path(name)
            pin.unlink(missing_ok=True)
            libbpf.obj_pin(self._obj.program(name).fd, pin)

    def attach(
        self,
        ifindex: int,
        role: abi.Role,
        *,
        egress: bool = False,
        kind: abi.LinkKind = abi.LinkKind.ETHERNET,
    ) -> int:
        """Attaches the role's program at ifindex's tc ingress (an L3 uplink's
        own, lh_uplink_l3), an MPLS uplink's lh_uplink_mpls at its XDP hook,
        and with *egress* (an uplink of a routed host) lh_uplink_out at its
        egress; returns the ingress prog id."""
        l3 = role == abi.Role.UPLINK and kind == abi.LinkKind.L3
        prog = (
            self.program_later(L3_UPLINK_PROGRAM)
            if l3
            else self._obj.program(PROGRAM_OF_ROLE[role])
        )
        prog_id = self._hook(ifindex, libbpf.INGRESS, prog.fd)
        xdp = libbpf.XdpHook(ifindex)
        if role == abi.Role.UPLINK and kind == abi.LinkKind.MPLS:
            xdp.attach(
                self._obj.program(MPLS_UPLINK_PROGRAM).fd
            )  # after tc: it learns what XDP pops
        else:  # none, or one a previous run attached to an MPLS uplink
            xdp.detach(MPLS_UPLINK_PROGRAM)
        if egress:
            self._hook(ifindex, libbpf.EGRESS, self.program_later(UPLINK_EGRESS_PROGRAM).fd)
        else:  # none, or one a previous run attached with other settings
            _unhook(ifindex, libbpf.EGRESS, self.pins)
        return prog_id

    def _hook(self, ifindex: int, point: int, prog_fd: int) -> int:
        """Puts the program on ifindex's tc hook *point*, through a tcx link
        when the kernel has them (and tc_hook allows), else as a clsact
        filter; returns its prog id. The other kind, left there by a run with
        another tc_hook or an older release, goes after the new one is on:
        meanwhile both are there and the tcx program, run first, decides (ours
        never return TC_ACT_UNSPEC, the verdict that would run the filter too)."""
        legacy = libbpf.TcHook(ifindex, point)
        tcx = libbpf.TcxHook(ifindex, point, tcx_pin(self.pins, ifindex, point))
        if self.tcx is not False:
            try:
                prog_id = tcx.attach(prog_fd)
            except libbpf.BpfError as err:
                if self._tc_hook == "tcx" or err.errno not in _NO_TCX:
                    raise DatapathError(f"cannot attach to ifindex {ifindex}: {err}") from err
                self.tcx = False  # "auto" on a kernel without tcx: clsact from now on
            else:
                self.tcx = True
                legacy.detach(handle=TC_HANDLE, priority=TC_PRIORITY)
                return prog_id
        legacy.create()  # clsact: one qdisc holds both hooks
        prog_id = legacy.attach(prog_fd, handle=TC_HANDLE, priority=TC_PRIORITY)
        tcx.detach()
        return prog_id

    def loaded_later(self, name: str) -> bool:
        """Whether *name*, one of LATER_PROGRAMS, is loaded (first attached)."""
        return name in self._later

    def program_later(self, name: str) -> libbpf.Program:
        """*name*, one of LATER_PROGRAMS, loaded on first use (its verification
        is paid only by an agent that attaches it: lh_uplink_l3 ~2 s, an L3
        uplink; lh_uplink_out ~0.3 s, a routed host): the object opened again
        with only that program, every map the first object's own (shared by fd,
        lh_frags and lh_hop_scratch included: docs/datapath.md says why)."""
        assert name in LATER_PROGRAMS, name
        if name not in self._later:
            try:
                self._later[name] = libbpf.BpfObject(
                    self._path, programs=[name], maps_of=self._obj, image=self._image
                )
            except libbpf.BpfError as err:
                raise DatapathError(f"cannot load {name}: {err}") from err
        return self._later[name].program(name)

    def close(self) -> None:
        """Forgets the objects; attached programs and pinned maps stay."""
        for obj in self._later.values():
            obj.close()
        self._later.clear()
        self._obj.close()


def tcx_pin(pins: Pins, ifindex: int, point: int) -> Path:
    """Where the tcx link of ifindex's hook *point* is pinned (Pins.remove
    takes it with the maps)."""
    return pins.folder / "tcx" / f"{ifindex}-{'ingress' if point == libbpf.INGRESS else 'egress'}"


def _unhook(ifindex: int, point: int, pins: Pins) -> bool:
    """Takes our program off ifindex's tc hook *point*, tcx link and clsact
    filter alike (other programs and filters stay); True when one was there."""
    found = libbpf.TcxHook(ifindex, point, tcx_pin(pins, ifindex, point)).detach()
    found |= libbpf.TcHook(ifindex, point).detach(handle=TC_HANDLE, priority=TC_PRIORITY)
    return found


def forget_links(ifindex: int, pins: Pins) -> None:
    """Removes the tcx link pins of an interface that went away (its links are
    defunct: the kernel took them off with the device)."""
    for point in (libbpf.INGRESS, libbpf.EGRESS):
        tcx_pin(pins, ifindex, point).unlink(missing_ok=True)


def detach_filter(ifindex: int, pins: Pins) -> bool:
    """Removes our programs from ifindex's tc ingress and egress and its XDP
    hook (other programs stay); True when there was one."""
    found = False
    for point in (libbpf.INGRESS, libbpf.EGRESS):
        found |= _unhook(ifindex, point, pins)
    found |= libbpf.XdpHook(ifindex).detach(MPLS_UPLINK_PROGRAM)
    return found


def _ours_on_tcx(ifindex: int, point: int) -> int | None:
    """The prog id of our program among the tcx hook's, None without one."""
    for prog_id in libbpf.tcx_prog_ids(ifindex, point):
        if libbpf.prog_name(prog_id) in TC_PROGRAMS:
            return prog_id
    return None


def hook_kind(ifindex: int, point: int = libbpf.INGRESS) -> str:
    """What holds our program on ifindex's tc hook *point*: "tcx", "clsact" or "none"."""
    if _ours_on_tcx(ifindex, point) is not None:
        return "tcx"
    found = libbpf.TcHook(ifindex, point).query(handle=TC_HANDLE, priority=TC_PRIORITY)
    return "none" if found is None else "clsact"


def filter_prog_id(ifindex: int, point: int = libbpf.INGRESS) -> int | None:
    """The prog id of our program on ifindex's tc hook *point* (a tcx link's
    or a clsact filter's), None when there is none."""
    found = _ours_on_tcx(ifindex, point)
    if found is not None:
        return found
    return libbpf.TcHook(ifindex, point).query(handle=TC_HANDLE, priority=TC_PRIORITY)
