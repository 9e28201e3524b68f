"""The data path as the agent sees it: the BPF object loaded with its maps
pinned, programs attached to interfaces, and typed access to the maps.

Maps are pinned by name under one folder per network namespace; loading the
object again reuses them, so a restart or upgrade keeps every entry. Programs
are attached as tc filters with a fixed handle and priority and replaced
atomically on the next attach.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lasthop import abi, libbpf
from lasthop.build import ensure_object
from lasthop.errors import DatapathError, NotAttachedError, TableSizeError

__all__ = [
    "Datapath",
    "DatapathError",
    "NotAttachedError",
    "TableSizeError",
    "Pins",
    "TC_HANDLE",
    "TC_PRIORITY",
]

TC_HANDLE = 0x4C48  # "LH"
TC_PRIORITY = 0x4C48
OBJECT_ENV = "LASTHOP_BPF_OBJECT"  # a prebuilt object to load instead of building bpf/lasthop.c
MAP_NAMES = ("lh_conns", "lh_ifaces", "lh_counters", "lh_settings", "lh_services", "lh_maglev")
UPLINK_EGRESS_PROGRAM = "lh_uplink_out"  # host-sent ICMP errors to their last hop
PROGRAM_OF_ROLE = {abi.Role.UPLINK: "lh_uplink", abi.Role.VM_PORT: "lh_vmport"}


@dataclass(frozen=True)
class Pins:
    """Where one namespace's maps are pinned."""

    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name

    def exist(self) -> bool:
        return self.path("lh_conns").exists()

    def remove(self) -> list[str]:
        removed = []
        if self.folder.is_dir():
            for entry in self.folder.iterdir():
                entry.unlink()
                removed.append(entry.name)
            self.folder.rmdir()
        return removed


class Maps:
    """The pinned maps, with typed element access."""

    def __init__(self, maps: dict[str, libbpf.Map]) -> None:
        self.conns = maps["lh_conns"]
        self.ifaces = maps["lh_ifaces"]
        self.counters = maps["lh_counters"]
        self.settings = maps["lh_settings"]
        self.services = maps["lh_services"]
        self.maglev = maps["lh_maglev"]

    @classmethod
    def open_pinned(cls, pins: Pins) -> Maps:
        if not pins.exist():
            raise NotAttachedError(
                f"no data path pinned at {pins.folder}: is `lasthop run` attached here?"
            )
        return cls({name: libbpf.Map.pinned(pins.path(name)) for name in MAP_NAMES})

    def close(self) -> None:
        for m in (
            self.conns,
            self.ifaces,
            self.counters,
            self.settings,
            self.services,
            self.maglev,
        ):
            m.close()

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

    def attached(self) -> dict[int, abi.IfaceCfg]:
        """ifindex -> config of every interface with a role."""
        out = {}
        for key, value in self.ifaces.items():
            cfg = abi.IfaceCfg.from_buffer_copy(value)
            if cfg.role != abi.Role.NONE:
                out[int.from_bytes(key, "little")] = cfg
        return out

    # settings
    def get_settings(self) -> abi.Settings:
        raw = self.settings.lookup(_u32(0))
        return abi.Settings.from_buffer_copy(raw) if raw else abi.Settings()

    def set_settings(self, settings: abi.Settings) -> None:
        self.settings.update(_u32(0), bytes(settings))

    # connections
    def entries(self) -> Iterator[tuple[abi.ConnKey, abi.ConnEntry]]:
        for key, value in self.conns.items():
            yield abi.ConnKey.from_buffer_copy(key), abi.ConnEntry.from_buffer_copy(value)

    def delete(self, key: abi.ConnKey) -> bool:
        return self.conns.delete(bytes(key))

    # counters
    def counter_totals(self) -> dict[int, list[int]]:
        """slot -> per-reason totals summed over CPUs (slots with any count)."""
        out: dict[int, list[int]] = {}
        for key, value in self.counters.items():
            total = sum(int.from_bytes(v, "little") for v in self.counters.percpu_values(value))
            if total:
                index = int.from_bytes(key, "little")
                slot, reason = divmod(index, abi.CNT_MAX)
                out.setdefault(slot, [0] * abi.CNT_MAX)[reason] = total
        return out

    def add_counter(self, slot: int, counter: abi.Counter, n: int) -> None:
        """Adds *n* to a counter from user space (on CPU 0's copy)."""
        key = abi.counter_key(slot, counter)
        raw = bytearray(self.counters.lookup(key) or bytes(8 * libbpf.num_possible_cpus()))
        raw[0:8] = (int.from_bytes(raw[0:8], "little") + n).to_bytes(8, "little")
        self.counters.update(key, bytes(raw))


def _object() -> Path:
    """The object to load: $LASTHOP_BPF_OBJECT when set, else the built one."""
    override = os.environ.get(OBJECT_ENV)
    return Path(override) if override else ensure_object()


def _u32(n: int) -> bytes:
    return bytes(ctypes.c_uint32(n))


class Datapath:
    """The loaded object: programs to attach and the (pinned) maps."""

    def __init__(self, pins: Pins, *, table_size: int, obj_path: Path | None = None) -> None:
        os.makedirs(pins.folder, exist_ok=True)
        self.pins = pins
        try:
            self._obj = libbpf.BpfObject(
                obj_path or _object(), pin_root=pins.folder, max_entries={"lh_conns": table_size}
            )
        except libbpf.BpfError as err:
            if pins.exist():
                current = libbpf.Map.pinned(pins.path("lh_conns"))
                size = current.info.max_entries
                current.close()
                if size != table_size:
                    raise TableSizeError(
                        f"the pinned table at {pins.folder} holds {size} entries, the config "
                        f"asks for {table_size}: keep table_size = {size}, or `lasthop detach` "
                        "first (drops every entry)"
                    ) from err
            raise DatapathError(f"cannot load the data path: {err}") from err
        self.maps = Maps({name: self._obj.map(name) for name in MAP_NAMES})
        self.clock_prog = self._obj.program("lh_clock")
        clock_pin = pins.path("lh_clock")  # programs are not pinned by libbpf: replace by hand
        clock_pin.unlink(missing_ok=True)
        libbpf.obj_pin(self.clock_prog.fd, clock_pin)

    def attach(self, ifindex: int, role: abi.Role, *, egress: bool = False) -> int:
        """Attaches the role's program at ifindex's tc ingress, and with
        *egress* (an uplink of a routed host) lh_uplink_out at its egress;
        returns the ingress prog id."""
        prog = self._obj.program(PROGRAM_OF_ROLE[role])
        hook = libbpf.TcHook(ifindex, libbpf.INGRESS)
        hook.create()  # clsact: one qdisc holds both hooks
        prog_id = hook.attach(prog.fd, handle=TC_HANDLE, priority=TC_PRIORITY)
        out_hook = libbpf.TcHook(ifindex, libbpf.EGRESS)
        if egress:
            out = self._obj.program(UPLINK_EGRESS_PROGRAM)
            out_hook.attach(out.fd, handle=TC_HANDLE, priority=TC_PRIORITY)
        else:  # none, or one a previous run attached with other settings
            out_hook.detach(handle=TC_HANDLE, priority=TC_PRIORITY)
        return prog_id

    def close(self) -> None:
        """Forgets the object; attached programs and pinned maps stay."""
        self._obj.close()


def detach_filter(ifindex: int) -> bool:
    """Removes our tc filters from ifindex's ingress and egress (other filters
    stay); True when there was one."""
    found = False
    for point in (libbpf.INGRESS, libbpf.EGRESS):
        found |= libbpf.TcHook(ifindex, point).detach(handle=TC_HANDLE, priority=TC_PRIORITY)
    return found


def filter_prog_id(ifindex: int) -> int | None:
    return libbpf.TcHook(ifindex, libbpf.INGRESS).query(handle=TC_HANDLE, priority=TC_PRIORITY)
