"""`lasthop stats` without click: the console script's first stop (issue 8:
`stats --json` in a new process within 100 ms at any table size).

The command itself costs ~2.5 ms; the rest of a start was importing click,
typing, dataclasses/inspect, logging and socket, which this path does
without. It reads the same pinned maps as :meth:`Controller.stats` (through
four libbpf calls of its own: lasthop.libbpf costs more to import than the
whole command) and prints exactly what the click command prints
(tests/test_stats_cli.py compares both on the same pins, text and --json).

It takes only what `lasthop stats --help` documents, in click's forms
(`--netns NAME`, `--netns=NAME`, `--config PATH`, `--json`); anything else —
--help, an unknown or malformed option, global options before `stats` —
goes to the click command, so help and errors stay click's own.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

from lasthop import abi

TYPE_CHECKING = False  # typing's, without importing typing (mypy reads it the same)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from typing import TypeVar

    _Key = TypeVar("_Key", abi.HopKey, abi.EndpointKey)

__all__ = ["OPTIONS", "main", "parse", "read", "render"]

# option -> the keyword it fills (None: a flag); what `lasthop stats --help` lists
OPTIONS: dict[str, str | None] = {"--config": "config", "--netns": "netns", "--json": None}
_FRAME = bytes(14)  # a test run needs a frame; lh_stats and lh_clock ignore it
_ENOENT = 2


def parse(argv: list[str]) -> dict[str, str | bool] | None:
    """The options in *argv* (after `stats`), or None when click must judge
    them (--help, an unknown option, a missing value, an argument)."""
    out: dict[str, str | bool] = {}
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name not in OPTIONS:
            return None
        key = OPTIONS[name]
        if key is None:  # --json
            if eq:
                return None
            out["json"] = True
            continue
        if not eq:
            value = next(args, "")
            if not value or value.startswith("-"):
                return None  # click's "requires an argument" (or an option as a value)
        if not value or (key == "config" and os.path.isdir(value)):
            return None  # click's own checks: an empty value, a directory as --config
        out[key] = value
    return out


class _Bpf:
    """The four libbpf calls `stats` makes (lasthop.libbpf binds them all)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        self.cpus = self.lib.libbpf_num_possible_cpus()
        self.fds: list[int] = []

    def _check(self, call: str, ret: int) -> int:
        if ret < 0:
            from lasthop.errors import BpfError

            raise BpfError(call, -ret if ret != -1 else ctypes.get_errno())
        return ret

    def get(self, path: str) -> int:
        fd = self._check(f"bpf_obj_get({path})", self.lib.bpf_obj_get(path.encode()))
        self.fds.append(fd)
        return fd

    def lookup(self, fd: int, key: bytes, size: int) -> bytes | None:
        value = ctypes.create_string_buffer(size)
        ret = self.lib.bpf_map_lookup_elem(fd, key, value)
        if ret < 0:
            err = -ret if ret != -1 else ctypes.get_errno()
            if err == _ENOENT:
                return None
            self._check("bpf_map_lookup_elem", -err)
        return value.raw

    def percpu_sum(self, fd: int, key: bytes) -> int:
        """A per-CPU u64, summed over the possible CPUs."""
        raw = self.lookup(fd, key, 8 * self.cpus)
        return 0 if raw is None else sum(int.from_bytes(raw[i : i + 8], "little")
                                         for i in range(0, len(raw), 8))  # fmt: skip

    def keys(self, fd: int, size: int) -> Iterator[bytes]:
        key, nxt = None, ctypes.create_string_buffer(size)
        while self.lib.bpf_map_get_next_key(fd, key, nxt) == 0:
            key = ctypes.create_string_buffer(nxt.raw, size)
            yield key.raw

    def max_entries(self, fd: int) -> int:
        info = (ctypes.c_uint32 * 24)()  # struct bpf_map_info: max_entries is its 5th u32
        size = ctypes.c_uint32(ctypes.sizeof(info))
        self._check("bpf_obj_get_info_by_fd",
                    self.lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)))  # fmt: skip
        return int(info[4])

    def run(self, fd: int) -> int:
        """Test-runs the program at *fd* on an empty frame; its return value."""
        opts = (ctypes.c_uint64 * 10)()  # struct bpf_test_run_opts, zeroed: sz first
        opts[0] = ctypes.sizeof(opts)
        data = ctypes.create_string_buffer(_FRAME, len(_FRAME))
        out = ctypes.create_string_buffer(len(_FRAME) + 256)
        opts[1], opts[2] = ctypes.addressof(data), ctypes.addressof(out)  # data_in, data_out
        u32 = ctypes.cast(opts, ctypes.POINTER(ctypes.c_uint32))
        u32[6], u32[7] = len(_FRAME), len(out)  # data_size_in, data_size_out
        self._check("bpf_prog_test_run_opts", self.lib.bpf_prog_test_run_opts(fd, opts))
        return int(u32[14])  # retval, at offset 56

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _refused(
    bpf: _Bpf, fd: int, key_type: type[_Key], text: Callable[[_Key], str]
) -> dict[str, dict[str, int]]:
    """A refused-senders LRU (lh_hops_refused, lh_endpoints_refused: a u64
    count per key holding an uplink's ifindex) by uplink name, then by *text*
    of the key; as Controller.stats reads them."""
    out: dict[str, dict[str, int]] = {}
    for raw in bpf.keys(fd, ctypes.sizeof(key_type)):
        value = bpf.lookup(fd, raw, 8)
        if value is not None:
            key = key_type.from_buffer_copy(raw)
            uplink = _ifname(key.ifindex) if key.ifindex else ""
            out.setdefault(uplink, {})[text(key)] = int.from_bytes(value, "little")
    return out


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def _ifname(index: int) -> str:
    import _socket  # socket.py's enums cost ~30 M instructions; the C module none

    try:
        return str(_socket.if_indextoname(index))
    except OSError:
        return f"if{index}"


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _age_s(now: int, then: int, hz: int) -> float:
    diff = (now - then) & 0xFFFFFFFF  # as lasthop.clock.Clock.age_s
    return diff / hz if hz and diff < 0x80000000 else 0.0


def read(folder: str) -> dict[str, object]:
    """What `lasthop stats --json` prints, read from the maps pinned in *folder*
    (the shape of :meth:`lasthop.controller.Stats.to_json`)."""
    if not os.path.exists(f"{folder}/lh_conns"):
        from lasthop.errors import NotAttachedError

        raise NotAttachedError(f"no data path pinned at {folder}: is `lasthop run` attached here?")
    import _socket

    bpf = _Bpf()
    try:
        pin = {name: bpf.get(f"{folder}/{name}") for name in (
            "lh_ifaces", "lh_counters", "lh_table_counters", "lh_expiry", "lh_settings",
            "lh_hops_refused", "lh_endpoints_refused", "lh_conns4", "lh_conns", "lh_pending4",
            "lh_pending",
        )}  # fmt: skip
        cfg_size, role_at = ctypes.sizeof(abi.IfaceCfg), abi.IfaceCfg.role.offset
        names: dict[int, str] = {}  # slot -> interface
        for index, _ in _socket.if_nameindex():
            if 0 < index < abi.MAX_IFINDEX:
                raw = bpf.lookup(pin["lh_ifaces"], _u32(index), cfg_size)
                if raw and raw[role_at] != abi.Role.NONE:
                    names[abi.IfaceCfg.from_buffer_copy(raw).slot] = _ifname(index)
        totals = [0] * abi.CNT_MAX
        interfaces: dict[str, dict[str, int]] = {}
        counter_names = {int(c): c.name.lower() for c in abi.Counter}
        for slot in sorted({0, *names}):
            counts = [bpf.percpu_sum(pin["lh_counters"], _u32(slot * abi.CNT_MAX + r))
                      for r in range(abi.CNT_MAX)]  # fmt: skip
            if any(counts):
                name = names.get(slot, "unattached" if slot == 0 else f"slot{slot}")
                interfaces[name] = {counter_names.get(r, f"reason_{r}"): n
                                    for r, n in enumerate(counts) if n}  # fmt: skip
                totals = [a + b for a, b in zip(totals, counts, strict=True)]
        bpf.run(bpf.get(f"{folder}/lh_stats"))  # the kernel's element counts into lh_expiry
        T = abi.TableCounter
        ev = {c: bpf.percpu_sum(pin["lh_table_counters"], _u32(c)) for c in T}
        raw = bpf.lookup(pin["lh_expiry"], _u32(0), ctypes.sizeof(abi.ExpiryStats))
        ex = abi.ExpiryStats.from_buffer_copy(raw) if raw else abi.ExpiryStats()
        raw = bpf.lookup(pin["lh_settings"], _u32(0), ctypes.sizeof(abi.Settings))
        settings = abi.Settings.from_buffer_copy(raw) if raw else abi.Settings()
        hz, quota = settings.hz, settings.inplace_quota  # quota: lh_conns4's room for pending
        now = bpf.run(bpf.get(f"{folder}/lh_clock"))
        untrusted = _refused(bpf, pin["lh_hops_refused"], abi.HopKey,
                             lambda hop: _mac(bytes(hop.mac)))  # fmt: skip
        endpoints = _refused(bpf, pin["lh_endpoints_refused"], abi.EndpointKey,
                             abi.endpoint_text)  # fmt: skip
        capacity = [
            bpf.max_entries(pin[a]) + bpf.max_entries(pin[b])
            for a, b in (("lh_conns4", "lh_conns"), ("lh_pending4", "lh_pending"))
        ]
    finally:
        bpf.close()
    state_names = [s.name.lower() for s in abi.State]

    def table(t: int, inserted: int, expired: int, removed: int, evicted: int) -> dict[str, object]:
        return {
            "entries": ex.elements[t],
            "capacity": capacity[t],
            "inserted": inserted,
            "expired": expired,
            "removed": removed,
            "evicted": evicted,
            "states": {
                state_names[s]: ex.live[t][s] for s in range(len(state_names)) if ex.live[t][s]
            },  # fmt: skip
        }

    te = abi.table_events(ev)
    evicted = max(0, te["pending_left"] - ex.elements[1])
    capacity = [capacity[0] - quota, capacity[1] + quota]
    confirmed = table(0, te["confirmed_inserted"], te["confirmed_expired"],
                      te["confirmed_removed"], 0)  # fmt: skip
    pending = table(1, te["pending_inserted"], te["pending_expired"], te["pending_removed"],
                    evicted)  # fmt: skip
    return {
        "totals": {c.name.lower(): totals[c] for c in abi.Counter},
        "interfaces": interfaces,
        "table": {
            "entries": ex.elements[0] + ex.elements[1],
            "capacity": capacity[0] + capacity[1],
            "evicted": evicted,
            "promoted": te["promoted"],
            "confirm_refused": ev[T.CONFIRM_REFUSED],
            "expiry_passes": ex.passes,
            "expiry_skipped": ex.skipped,
            "last_pass_age_s": _age_s(now, ex.finished, hz) if ex.passes else None,
            "next_due_s": _age_s(ex.next_due, now, hz) if ex.passes else None,
            "confirmed": confirmed,
            "pending": pending,
        },
        "untrusted_hops": untrusted,
        "untrusted_endpoints": endpoints,
    }


def render(st: dict[str, object]) -> None:
    """Prints *st* (the --json shape) for people: the plain `lasthop stats`."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200, emoji=False)
    tab: dict[str, dict[str, object]] = st["table"]  # type: ignore[assignment]
    totals: dict[str, int] = st["totals"]  # type: ignore[assignment]
    interfaces: dict[str, dict[str, int]] = st["interfaces"]  # type: ignore[assignment]
    # a line of its own: as a table title rich wraps it to the (narrow) table's width
    for label in ("confirmed", "pending"):
        t = tab[label]
        states_d: dict[str, int] = t["states"]  # type: ignore[assignment]
        states = ", ".join(f"{k} {v}" for k, v in states_d.items()) or "none"
        console.print(
            f"{label}: {t['entries']} of {t['capacity']} entries ({states}); "
            f"{t['inserted']} inserted, {t['expired']} expired, {t['removed']} removed"
            + (f", {t['evicted']} evicted" if label == "pending" else ""),
            highlight=False,
        )
    console.print(
        f"table: {tab['entries']} of {tab['capacity']} entries, {tab['promoted']} confirmed, "
        f"{tab['confirm_refused']} refused (confirmed table full)",
        highlight=False,
    )
    table = Table()
    table.add_column("counter")
    table.add_column("total", justify="right")
    for name in interfaces:
        table.add_column(name, justify="right")
    for counter, total in totals.items():
        if total or counter in ("learned", "redirected", "miss"):
            table.add_row(
                counter, str(total), *(str(interfaces[n].get(counter, "")) for n in interfaces)
            )
    console.print(table)


def _folder(netns_name: str | None, pin_root: Path | None) -> str:
    """Where `run` pinned the maps: as :class:`lasthop.controller.Controller` finds it."""
    from lasthop import netns

    if netns_name:
        netns.enter(netns_name)
    name = netns_name or netns.current_name()
    return f"{pin_root or netns.bpffs_root() / 'lasthop'}/{name}"


def main(argv: list[str]) -> int | None:
    """Runs `lasthop stats` with *argv* (after `stats`); None when click must
    (then nothing was done)."""
    opts = parse(argv)
    if opts is None:
        return None
    from lasthop.errors import LasthopError, fail

    try:
        netns_name, pin_root = opts.get("netns"), None
        if "config" in opts:
            from pathlib import Path

            from lasthop import configfile

            place = configfile.place(Path(str(opts["config"])))
            netns_name, pin_root = netns_name or place.netns, place.pin_root
        st = read(_folder(str(netns_name) if netns_name else None, pin_root))
    except (LasthopError, OSError) as err:
        fail(err)
    if opts.get("json"):
        print(json.dumps(st, indent=1))
    else:
        render(st)
    return 0
