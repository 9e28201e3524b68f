"""`lasthop bench datapath`: what the data path costs per packet, measured in
the kernel with BPF_PROG_TEST_RUN, side by side with an empty tc program
(lh_empty) in the same run; and what a connection-table entry costs in
kernel memory. docs/datapath.md explains the method and its limits.

Per-packet figures (the program run back to back on one frame):
    reply hit v4 / v6   lh_vmport finds the entry, rewrites the MAC, redirects (bridged)
    uplink refresh      lh_uplink finds the entry, same last hop: last_seen, packets
    reply miss          lh_vmport finds no entry (a TCP segment: nothing is learned)
    empty               lh_empty: the cost of running any tc program here
Each is the median of several rounds of `repeat` runs; rounds interleave the
programs so that drift hits them all alike.

New entries: test run repeats one frame, so after the first run an insert
is a refresh. Inserts are therefore single runs (repeat=1) of distinct
frames, each a connection the table has never seen, timed by the kernel
(not the syscall) and interleaved with single runs of lh_empty; the insert's
own cost is the difference of the two means, added to the empty program's
back-to-back time so the figure compares with the rows above. It is taken
twice: into a table with room, and into a full table, where every insert
evicts the least recently used entry.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import socket
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lasthop import abi, build
from lasthop.bench.frames import TCP_SYN, quiet, tcp4_frame, tcp6_frame, u32
from lasthop.libbpf import BpfObject, Map, Program

__all__ = ["Figure", "Memory", "Results", "TARGETS", "run", "print_results"]

# Ratios to the empty program (and bytes per entry) the data path must stay within.
TARGETS: dict[str, float] = {
    "reply_hit_v4": 2.0,
    "reply_hit_v6": 2.0,
    "uplink_refresh": 2.5,
    "insert_full": 30.0,
    "memory_per_entry": 150.0,
}
CONNTRACK_DOCUMENTED = (256, 320)  # struct nf_conn slab object, x86_64, by kernel version

_SKB_CTX_SIZE = 192
_SKB_IFINDEX_OFF = 40
_UPLINK_MAC = bytes.fromhex("020000000101")
_VMPORT_MAC = bytes.fromhex("020000000201")
_FW_A = bytes.fromhex("02fa0000000a")
_FW_B = bytes.fromhex("02fa0000000b")
_VM = bytes.fromhex("525400000001")
_CLIENT4, _VM4 = socket.inet_aton("198.51.100.20"), socket.inet_aton("192.0.2.11")
_CLIENT6 = socket.inet_pton(socket.AF_INET6, "2001:db8:100::20")
_VM6 = socket.inet_pton(socket.AF_INET6, "2001:db8:2::11")


def _key4(saddr: bytes, daddr: bytes, sport: int, dport: int) -> bytes:
    return struct.pack(
        "<16s16s2s2sBBH",
        saddr + bytes(12),
        daddr + bytes(12),
        sport.to_bytes(2, "big"),
        dport.to_bytes(2, "big"),
        6,
        abi.FAMILY_V4,
        0,
    )


def _key6(saddr: bytes, daddr: bytes, sport: int, dport: int) -> bytes:
    return struct.pack(
        "<16s16s2s2sBBH",
        saddr,
        daddr,
        sport.to_bytes(2, "big"),
        dport.to_bytes(2, "big"),
        6,
        abi.FAMILY_V6,
        0,
    )


# -- results --------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    label: str
    program: str
    ns: float  # per packet: median of the rounds; single runs: from the means
    ns_low: float  # the fastest round; single runs: from the medians (no outliers)
    ratio: float  # ns / the empty program's ns
    method: str  # "back-to-back" or "single runs"
    target: float | None = None  # ratio
    detail: str = ""

    @property
    def ok(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


@dataclass
class Memory:
    entries: int
    memlock_bytes: int
    per_entry: float
    conntrack_bytes: int | None
    conntrack_source: str
    target: float = TARGETS["memory_per_entry"]

    @property
    def ok(self) -> bool:
        return self.per_entry <= self.target


@dataclass
class Results:
    figures: list[Figure]
    memory: Memory | None
    settings: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        checks = [f.ok for f in self.figures if f.ok is not None]
        if self.memory:
            checks.append(self.memory.ok)
        return all(checks)

    def figure(self, name: str) -> Figure:
        return next(f for f in self.figures if f.name == name)

    def to_json(self) -> dict[str, Any]:
        figures = []
        for f in self.figures:
            d = asdict(f)
            d["ok"] = f.ok
            figures.append(d)
        memory = None
        if self.memory:
            memory = asdict(self.memory)
            memory["ok"] = self.memory.ok
        return {
            "figures": figures,
            "memory": memory,
            "ok": self.ok,
            "settings": self.settings,
            "environment": self.environment,
        }


# -- the bench ------------------------------------------------------------------------


class BenchError(RuntimeError):
    """The bench cannot run here (not root, no clang, no veth...)."""


@contextlib.contextmanager
def _private_netns() -> Iterator[dict[str, int]]:
    """A network namespace of our own with two veth pairs, entered for the run
    (test run resolves ctx.ifindex in the caller's namespace); removed after."""
    from pyroute2 import NetNS, netns

    name = f"lh-bench-{os.getpid()}"
    netns.create(name)
    try:
        index = {}
        with NetNS(name) as ns:
            for ifname, mac in (("up0", _UPLINK_MAC), ("vm0", _VMPORT_MAC)):
                ns.link("add", ifname=ifname, kind="veth", peer={"ifname": f"{ifname}p"})
                index[ifname] = ns.link_lookup(ifname=ifname)[0]
                ns.link("set", index=index[ifname], address=mac.hex(":"))
        netns.pushns(name)
        try:
            yield index
        finally:
            netns.popns()
    finally:
        netns.remove(name)


class _Bench:
    def __init__(self, obj: BpfObject, index: dict[str, int]) -> None:
        self.obj = obj
        self.index = index
        self.conns: Map = obj.map("lh_conns")
        self.counters: Map = obj.map("lh_counters")
        ifaces = obj.map("lh_ifaces")
        for ifname, mac, role, slot in (
            ("up0", _UPLINK_MAC, abi.Role.UPLINK, 1),
            ("vm0", _VMPORT_MAC, abi.Role.VM_PORT, 2),
        ):
            cfg = abi.IfaceCfg(role=int(role), slot=slot)
            ctypes.memmove(cfg.mac, mac, abi.ETH_ALEN)
            ifaces.update(u32(index[ifname]), bytes(cfg))
        self.slot = {"up0": 1, "vm0": 2}

    def ctx(self, ifname: str) -> bytes:
        ctx = bytearray(_SKB_CTX_SIZE)
        struct.pack_into("<I", ctx, _SKB_IFINDEX_OFF, self.index[ifname])
        return bytes(ctx)

    def prog(self, name: str) -> Program:
        return self.obj.program(name)

    def counter(self, ifname: str, c: abi.Counter) -> int:
        raw = self.counters.lookup(abi.counter_key(self.slot[ifname], c))
        assert raw is not None
        return sum(struct.unpack("<Q", v[:8])[0] for v in self.counters.percpu_values(raw))

    def entry(self, key: bytes, ifname: str = "up0") -> None:
        e = abi.ConnEntry(ifindex=self.index[ifname], flags=abi.F_ENTRY_HOP_KNOWN, packets=1)
        ctypes.memmove(e.mac, _FW_B, abi.ETH_ALEN)
        self.conns.update(key, bytes(e))


Progress = Callable[[str], None]


def _back_to_back(b: _Bench, repeat: int, rounds: int, progress: Progress) -> dict[str, list[int]]:
    """Each case `rounds` times, interleaved: name -> per-round ns per packet."""
    b.entry(_key4(_CLIENT4, _VM4, 40001, 80))
    b.entry(_key6(_CLIENT6, _VM6, 40001, 80))
    reply4 = tcp4_frame(_VM, _FW_A, _VM4, _CLIENT4, 80, 40001)
    cases = {
        "empty": ("lh_empty", reply4, "vm0"),
        "reply_hit_v4": ("lh_vmport", reply4, "vm0"),
        "reply_hit_v6": ("lh_vmport", tcp6_frame(_VM, _FW_A, _VM6, _CLIENT6, 80, 40001), "vm0"),
        "uplink_refresh": ("lh_uplink", tcp4_frame(_FW_B, _VM, _CLIENT4, _VM4, 40001, 80), "up0"),
        "reply_miss": ("lh_vmport", tcp4_frame(_VM, _FW_A, _VM4, _CLIENT4, 80, 40002), "vm0"),
    }
    out: dict[str, list[int]] = {name: [] for name in cases}
    for r in range(rounds):
        progress(f"back-to-back runs: round {r + 1}/{rounds}")
        for name, (prog, frame, ifname) in cases.items():
            run = b.prog(prog).test_run(frame, repeat=repeat, ctx=b.ctx(ifname))
            out[name].append(run.duration_ns)
    # the runs did what their names say
    assert b.counter("vm0", abi.Counter.REDIRECTED) == 2 * repeat * rounds, "reply hits missed"
    assert b.counter("up0", abi.Counter.REFRESHED) == repeat * rounds, "refreshes missed"
    assert b.counter("vm0", abi.Counter.MISS) == repeat * rounds, "misses were not misses"
    return out


def _insert_frames(n: int, first: int) -> Iterator[bytes]:
    """Requests of n connections never seen: client 10.x.y.z, ports varied."""
    for i in range(first, first + n):
        saddr = bytes((10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF))
        yield tcp4_frame(_FW_B, _VM, saddr, _VM4, 1024 + (i >> 24), 80, TCP_SYN)


@dataclass
class _Singles:
    insert: list[int]
    empty: list[int]
    refresh: list[int]


def _single_runs(b: _Bench, n: int, first: int) -> _Singles:
    """n inserts of fresh connections, each followed by a single run of the empty
    program and one refresh of a known entry (the calibration: what single runs
    add to a path measured back to back); the kernel-timed ns of each."""
    up, empty = b.prog("lh_uplink"), b.prog("lh_empty")
    ctx = b.ctx("up0")
    known = tcp4_frame(_FW_B, _VM, _CLIENT4, _VM4, 40001, 80)
    learned = b.counter("up0", abi.Counter.LEARNED)
    refreshed = b.counter("up0", abi.Counter.REFRESHED)
    out = _Singles([], [], [])
    for frame in _insert_frames(n, first):
        out.insert.append(up.test_run(frame, ctx=ctx).duration_ns)
        out.empty.append(empty.test_run(frame, ctx=ctx).duration_ns)
        out.refresh.append(up.test_run(known, ctx=ctx).duration_ns)
    assert b.counter("up0", abi.Counter.LEARNED) - learned == n, "an insert was not a new entry"
    assert b.counter("up0", abi.Counter.REFRESHED) - refreshed == n, "a refresh was not one"
    return out


def _prefill(b: _Bench, capacity: int) -> None:
    """Fills the table to capacity (and past it, so the LRU is evicting)."""
    e = abi.ConnEntry(ifindex=b.index["up0"], flags=abi.F_ENTRY_HOP_KNOWN, packets=1)
    value = bytes(e)
    for i in range(capacity + capacity // 8):
        saddr = bytes((172, 16 + ((i >> 16) & 0x0F), (i >> 8) & 0xFF, i & 0xFF))
        b.conns.update(_key4(saddr, _VM4, 1024 + (i >> 20), 80), value)


def _memlock(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    raise BenchError(f"no memlock in /proc/self/fdinfo/{fd}")


def _conntrack_entry() -> tuple[int | None, str]:
    try:
        for line in Path("/proc/slabinfo").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == "nf_conntrack":
                return int(fields[3]), "/proc/slabinfo nf_conntrack objsize (struct nf_conn)"
    except OSError:
        pass
    lo, hi = CONNTRACK_DOCUMENTED
    return None, f"documented: struct nf_conn is {lo}-{hi} bytes on x86_64 (slabinfo not readable)"


def _memory(obj_path: Path, entries: int) -> Memory:
    obj = BpfObject(obj_path, pin_root=None, max_entries={"lh_conns": entries})
    try:
        conns = obj.map("lh_conns")
        memlock = _memlock(conns.fd)
        n = conns.info.max_entries
    finally:
        obj.close()
    ct, source = _conntrack_entry()
    return Memory(
        entries=n,
        memlock_bytes=memlock,
        per_entry=memlock / n,
        conntrack_bytes=ct,
        conntrack_source=source,
    )


def run(
    repeat: int = 2_000_000,
    rounds: int = 5,
    inserts: int = 20_000,
    table: int = 65_536,
    memory_entries: int = 1 << 20,
    progress: Progress = quiet,
) -> Results:
    """Measures every figure; see the module docstring for the method."""
    if os.geteuid() != 0:
        raise BenchError("needs root (CAP_BPF, CAP_NET_ADMIN): run as root")
    if inserts >= table // 2:
        raise BenchError(f"--inserts {inserts} must stay below half the table ({table})")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lasthop-bench-") as tmp:
        progress("building the BPF object")
        try:
            obj_path = build.build(Path(tmp) / "lasthop.bpf.o")
        except build.BuildError as err:
            raise BenchError(str(err)) from err
        with _private_netns() as index:
            obj = BpfObject(obj_path, pin_root=None, max_entries={"lh_conns": table})
            try:
                b = _Bench(obj, index)
                hot = _back_to_back(b, repeat, rounds, progress)
                progress(f"{inserts} inserts into a table with room")
                room = _single_runs(b, inserts, 0)
                progress(f"filling the table ({table} entries)")
                _prefill(b, table)
                progress(f"{inserts} inserts into the full table")
                full = _single_runs(b, inserts, inserts)
            finally:
                obj.close()
        memory = None
        if memory_entries:
            progress(f"kernel memory of a {memory_entries}-entry table")
            memory = _memory(obj_path, memory_entries)

    empty = statistics.median(hot["empty"])
    labels = {
        "empty": ("empty tc program", "lh_empty"),
        "reply_hit_v4": ("reply hit, TCP v4, bridged", "lh_vmport"),
        "reply_hit_v6": ("reply hit, TCP v6, bridged", "lh_vmport"),
        "uplink_refresh": ("uplink refresh", "lh_uplink"),
        "reply_miss": ("reply miss (no entry)", "lh_vmport"),
    }
    figures = []
    for name, runs in hot.items():
        label, prog = labels[name]
        ns = statistics.median(runs)
        figures.append(
            Figure(
                name,
                label,
                prog,
                ns,
                min(runs),
                ns / empty,
                "back-to-back",
                TARGETS.get(name),
                detail=f"rounds: {runs}",
            )
        )

    def single(name: str, label: str, runs: list[int], base: list[int], detail: str) -> Figure:
        extra = statistics.fmean(runs) - statistics.fmean(base)
        extra_med = statistics.median(runs) - statistics.median(base)
        return Figure(
            name,
            label,
            "lh_uplink",
            empty + extra,
            empty + extra_med,
            (empty + extra) / empty,
            "single runs",
            TARGETS.get(name),
            detail=f"{detail}: mean {statistics.fmean(runs):.0f} ns, lh_empty "
            f"{statistics.fmean(base):.0f} ns; medians "
            f"{statistics.median(runs):.0f} / {statistics.median(base):.0f} ns",
        )

    figures += [
        single("insert_room", "new entry, table with room", room.insert, room.empty, "single runs"),
        single(
            "insert_full", "new entry, full table (evicts)", full.insert, full.empty, "single runs"
        ),
        single(
            "refresh_single",
            "uplink refresh, as single runs",
            room.refresh + full.refresh,
            room.empty + full.empty,
            "calibration",
        ),
    ]
    return Results(
        figures=figures,
        memory=memory,
        settings={
            "repeat": repeat,
            "rounds": rounds,
            "inserts": inserts,
            "table": table,
            "memory_entries": memory_entries,
        },
        environment={
            "kernel": platform.release(),
            "machine": platform.machine(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "elapsed_s": round(time.monotonic() - started, 1),
        },
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# -- printing -------------------------------------------------------------------------


def print_results(results: Results, console: Any) -> None:
    from rich.table import Table

    table = Table(title="lasthop data path, per packet (BPF_PROG_TEST_RUN)")
    for col, justify in (
        ("case", "left"),
        ("program", "left"),
        ("ns/packet", "right"),
        ("low", "right"),
        ("× empty", "right"),
        ("target", "right"),
        ("", "left"),
        ("method", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for f in results.figures:
        mark = "" if f.ok is None else ("[green]pass[/green]" if f.ok else "[red]FAIL[/red]")
        target = f"≤ {f.target:g}×" if f.target else ""
        table.add_row(
            f.label,
            f.program,
            f"{f.ns:.1f}",
            f"{f.ns_low:.1f}",
            f"{f.ratio:.2f}",
            target,
            mark,
            f.method,
        )
    console.print(table)
    m = results.memory
    if m:
        mark = "[green]pass[/green]" if m.ok else "[red]FAIL[/red]"
        ct = f"{m.conntrack_bytes} B" if m.conntrack_bytes else "256-320 B"
        console.print(
            f"kernel memory per entry: {m.per_entry:.1f} B "
            f"({m.memlock_bytes / 2**20:.1f} MiB memlock for {m.entries} entries; "
            f"target ≤ {m.target:g} B) {mark}\n"
            f"Linux conntrack per entry: {ct} ({m.conntrack_source})"
        )
    for f in results.figures:
        if f.method == "single runs":
            console.print(f"{f.label}: {f.detail}", style="dim")
    env = results.environment
    console.print(
        f"kernel {env.get('kernel')}, {env.get('cpu')}, {env.get('cpus')} CPUs; "
        f"settings {results.settings}; {env.get('elapsed_s')} s",
        style="dim",
    )
