"""`lasthop bench services`: how evenly Maglev spreads connections, how few
move when a VM leaves, how long a table takes to build and swap, and what
the service path costs per packet.

Spread and movement are computed, not sampled from traffic: 1,000,000
simulated connection keys (random client address and port to one virtual
address, seeded, so every run gives the same figures) are hashed with the
data path's jhash2 (lasthop.services.maglev; vectorised with numpy when it is there)
and looked up in tables built by lasthop.services.maglev.build_table, exactly as the
data path would for each key's first packet.

    spread     busiest VM's share of the keys / the mean share (equal weights)
               target <= 1.02
    movement   share of keys whose VM changes when one of N VMs is removed
               target <= 1/N + 1 %  (keys as new connections: pinned ones
               never move, that is what the entry is for)
    weights    each VM's share / its weight's share (weights 1, 2, 3, 4)
    rebuild    build_table for 64 VMs; the swap into lh_maglev (root)
    VM leaves  a VM taken out of a pool with N live entries (K of them the
               service's, on that VM): lh_svc_walk's run, which moves them
               in the kernel, against reading the table into Python (what
               the agent did before, at the least), side by side (root)

Per packet (root): lh_uplink on a service connection's packets, back to back
with BPF_PROG_TEST_RUN, against lh_empty in the same rounds: the pinned path
(entry found, its VM up, MAC rewritten, redirected; target <= 3.0x) and a
full-proxy server reply (VM-opened entry, sent to its VM); the selection
path (a new connection: lookup of the service, Maglev slot, learn) as single
runs of fresh connections, timed like `bench datapath` times inserts.
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import socket
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lasthop import abi, build
from lasthop.bench.frames import TCP_ACK, TCP_SYN, quiet, tcp4_frame, u32
from lasthop.datapath import FamilyMap
from lasthop.services.maglev import MAGLEV_SEED, MAGLEV_SIZE, Member, build_table, jhash2

__all__ = ["BenchError", "Results", "run", "print_results", "simulated_slots", "TARGETS"]

TARGETS = {"spread": 1.02, "movement_extra": 0.01, "service_pinned": 3.0}
POOLS = (3, 8, 16, 32, 64)
WEIGHTS = (1, 2, 3, 4)
REBUILD_VMS = 64
SEED = 20240601

Progress = Callable[[str], None]

_VIP = socket.inet_aton("192.0.2.100")
_SERVER = socket.inet_aton("203.0.113.50")
_CLIENT = socket.inet_aton("198.51.100.20")
_FW = bytes.fromhex("02fa0000000b")
_UPLINK_MAC = bytes.fromhex("020000000101")
_VM_MAC = bytes.fromhex("525400000001")
_UPLINK_IFINDEX = 1  # test run takes ifindex 0/1 as loopback: present in any namespace
_VM_IFINDEX0 = 100  # VM ports exist only in lh_ifaces: a test run never sends the redirect


class BenchError(RuntimeError):
    """The bench cannot run here."""


# -- keys and slots -----------------------------------------------------------------


def _key_words_python(n: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    vip = struct.unpack("=I", _VIP)[0]
    port80 = socket.htons(80) << 16
    tail = 6 | abi.FAMILY_V4 << 8
    return [
        (rng.getrandbits(32), 0, 0, 0, vip, 0, 0, 0, rng.getrandbits(16) | port80, tail)
        for _ in range(n)
    ]


def simulated_slots(n: int, seed: int = SEED) -> Sequence[int]:
    """The Maglev slots of *n* simulated TCP connections to one virtual
    address: random client address and port, as struct conn_key words."""
    try:
        import numpy as np
    except ImportError:
        return [jhash2(w, MAGLEV_SEED) % MAGLEV_SIZE for w in _key_words_python(n, seed)]
    rng = np.random.default_rng(seed)
    words = np.zeros((n, 10), dtype=np.uint32)
    words[:, 0] = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    words[:, 4] = struct.unpack("=I", _VIP)[0]
    words[:, 8] = rng.integers(0, 2**16, n, dtype=np.uint32) | np.uint32(socket.htons(80) << 16)
    words[:, 9] = 6 | abi.FAMILY_V4 << 8
    slots = _jhash2_numpy(words, MAGLEV_SEED) % MAGLEV_SIZE
    # the vectorised hash must agree with the mirror the tests hold to the C
    for i in range(0, n, max(1, n // 64)):
        assert slots[i] == jhash2([int(w) for w in words[i]], MAGLEV_SEED) % MAGLEV_SIZE
    return slots  # type: ignore[no-any-return]


def _jhash2_numpy(words: Any, initval: int) -> Any:
    """jhash2 of 10 words per row, on uint32 columns (wrapping arithmetic)."""
    import numpy as np

    def rol(x: Any, k: int) -> Any:
        return (x << np.uint32(k)) | (x >> np.uint32(32 - k))

    def mix(a: Any, b: Any, c: Any) -> tuple[Any, Any, Any]:
        a = a - c
        a ^= rol(c, 4)
        c = c + b  # noqa: E702
        b = b - a
        b ^= rol(a, 6)
        a = a + c  # noqa: E702
        c = c - b
        c ^= rol(b, 8)
        b = b + a  # noqa: E702
        a = a - c
        a ^= rol(c, 16)
        c = c + b  # noqa: E702
        b = b - a
        b ^= rol(a, 19)
        a = a + c  # noqa: E702
        c = c - b
        c ^= rol(b, 4)
        b = b + a  # noqa: E702
        return a, b, c

    n = words.shape[0]
    init = np.uint32((0xDEADBEEF + (10 << 2) + initval) & 0xFFFFFFFF)
    a, b, c = (np.full(n, init, dtype=np.uint32) for _ in range(3))
    for i in (0, 3, 6):
        a, b, c = a + words[:, i], b + words[:, i + 1], c + words[:, i + 2]
        a, b, c = mix(a, b, c)
    a = a + words[:, 9]
    c ^= b
    c = c - rol(b, 14)  # noqa: E702
    a ^= c
    a = a - rol(c, 11)  # noqa: E702
    b ^= a
    b = b - rol(a, 25)  # noqa: E702
    c ^= b
    c = c - rol(b, 16)  # noqa: E702
    a ^= c
    a = a - rol(c, 4)  # noqa: E702
    b ^= a
    b = b - rol(a, 14)  # noqa: E702
    c ^= b
    c = c - rol(b, 24)  # noqa: E702
    return c


# -- results --------------------------------------------------------------------------


@dataclass
class Spread:
    vms: int
    busiest: float  # busiest VM's share / the mean share
    quietest: float
    control: float  # busiest / mean for the same keys spread by hash % N (no table): key noise
    moved: float  # share of keys whose VM changes when one VM is removed
    moved_bound: float  # 1/N + 1 %
    slots_min: int
    slots_max: int

    @property
    def ok(self) -> bool:
        return self.busiest <= TARGETS["spread"] and self.moved <= self.moved_bound


@dataclass
class Figure:
    name: str
    label: str
    ns: float
    ratio: float  # / lh_empty
    target: float | None
    detail: str

    @property
    def ok(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


@dataclass
class Move:
    """A VM leaving a pool at *entries* live entries, *ours* of them on it."""

    entries: int
    ours: int
    walk_ms: float  # lh_svc_walk's run (test run, wall time), median
    read_ms: float  # every entry read into Python (Maps.entries), median
    walk_runs: list[float]
    read_runs: list[float]

    @property
    def ratio(self) -> float:
        return self.read_ms / self.walk_ms


@dataclass
class Results:
    keys: int
    spreads: list[Spread]
    weights: dict[str, float]  # VM weight -> share / expected share
    rebuild_ms: float
    swap_ms: float | None
    figures: list[Figure]
    settings: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    move: Move | None = None

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.spreads) and all(f.ok is not False for f in self.figures)

    def to_json(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "spread": [asdict(s) | {"ok": s.ok} for s in self.spreads],
            "weights": self.weights,
            "rebuild_ms": {"build_64_vms": self.rebuild_ms, "swap": self.swap_ms},
            "figures": [asdict(f) | {"ok": f.ok} for f in self.figures],
            "vm_leaves": None if self.move is None else asdict(self.move),
            "targets": TARGETS,
            "ok": self.ok,
            "settings": self.settings,
            "environment": self.environment,
        }


# -- the computed figures -------------------------------------------------------------


def _shares(table: list[int], slots: Sequence[int]) -> dict[int, int]:
    try:
        import numpy as np
    except ImportError:
        counts: dict[int, int] = {}
        for s in slots:
            v = table[s]
            counts[v] = counts.get(v, 0) + 1
        return counts
    values = np.asarray(table, dtype=np.uint32)[np.asarray(slots)]
    found, n = np.unique(values, return_counts=True)
    return {int(v): int(c) for v, c in zip(found, n, strict=True)}


def _moved(before: list[int], after: list[int], slots: Sequence[int]) -> float:
    try:
        import numpy as np
    except ImportError:
        return sum(1 for s in slots if before[s] != after[s]) / len(slots)
    idx = np.asarray(slots)
    return float(np.mean(np.asarray(before)[idx] != np.asarray(after)[idx]))


def spread(n: int, slots: Sequence[int]) -> Spread:
    pool = [Member(f"vm{i}", i + 1) for i in range(n)]
    table = build_table(pool)
    counts = _shares(table, slots)
    mean = len(slots) / n
    per_slot = _shares(table, range(MAGLEV_SIZE))
    after = build_table(pool[1:])
    modulo = _shares(list(range(n)) * (MAGLEV_SIZE // n + 1), slots)
    return Spread(
        vms=n,
        busiest=max(counts.values()) / mean,
        quietest=min(counts.values()) / mean,
        control=max(modulo.values()) / mean,
        moved=_moved(table, after, slots),
        moved_bound=1 / n + TARGETS["movement_extra"],
        slots_min=min(per_slot.values()),
        slots_max=max(per_slot.values()),
    )


def weights(slots: Sequence[int]) -> dict[str, float]:
    pool = [Member(f"vm{i}", i + 1, w) for i, w in enumerate(WEIGHTS)]
    counts = _shares(build_table(pool), slots)
    total = sum(WEIGHTS)
    return {f"weight {w}": counts[i + 1] / len(slots) / (w / total) for i, w in enumerate(WEIGHTS)}


def rebuild_ms(rounds: int = 5) -> float:
    pool = [Member(f"vm{i}", i + 1) for i in range(REBUILD_VMS)]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        build_table(pool)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# -- per packet -----------------------------------------------------------------------


class _Datapath:
    """The object, unpinned: an uplink on ifindex 1, three VM ports in lh_ifaces
    only, one service over them."""

    def __init__(self, obj: Any) -> None:
        from lasthop.services.lookup import write_table

        self.obj = obj
        ifaces = obj.map("lh_ifaces")
        up = abi.IfaceCfg(role=int(abi.Role.UPLINK), slot=1)
        ctypes.memmove(up.mac, _UPLINK_MAC, abi.ETH_ALEN)
        ifaces.update(u32(_UPLINK_IFINDEX), bytes(up))
        pool = []
        for i in range(3):
            vm = abi.IfaceCfg(role=int(abi.Role.VM_PORT), slot=2 + i, flags=abi.F_IFACE_VM_MAC)
            ctypes.memmove(vm.vm_mac, _VM_MAC, abi.ETH_ALEN)
            ifaces.update(u32(_VM_IFINDEX0 + i), bytes(vm))
            pool.append(Member(f"vm{i}", _VM_IFINDEX0 + i))
        write_table(obj.map("lh_maglev"), 0, build_table(pool))
        key = abi.SvcKey(port=socket.htons(80), proto=6, family=abi.FAMILY_V4)
        ctypes.memmove(key.addr, _VIP, 4)
        obj.map("lh_services").update(bytes(key), bytes(abi.SvcInfo(id=0)))
        obj.map("lh_settings").update(u32(0), bytes(abi.Settings(flags=abi.F_SET_SERVICES)))
        ctx = bytearray(192)
        struct.pack_into("=I", ctx, 40, _UPLINK_IFINDEX)
        self.ctx = bytes(ctx)
        self.conns = FamilyMap.of(obj.map, abi.ChangeTable.CONFIRMED)

    def run(self, prog: str, frame: bytes, repeat: int = 1) -> tuple[int, int]:
        r = self.obj.program(prog).test_run(frame, repeat=repeat, ctx=self.ctx)
        return r.retval, r.duration_ns

    def vm_origin_entry(self, sport: int) -> bytes:
        """A VM-opened connection to the server (key: server -> VIP), as lh_vmport makes it."""
        key = abi.ConnKey(
            sport=socket.htons(80), dport=socket.htons(sport), proto=6, family=abi.FAMILY_V4
        )
        ctypes.memmove(key.saddr, _SERVER, 4)
        ctypes.memmove(key.daddr, _VIP, 4)
        entry = abi.ConnEntry(vm_ifindex=_VM_IFINDEX0, flags=abi.F_ENTRY_VM_ORIGIN)
        self.conns.update(bytes(key), bytes(entry))
        return tcp4_frame(_FW, _UPLINK_MAC, _SERVER, _VIP, 80, sport, TCP_ACK)


def _per_packet(repeat: int, rounds: int, singles: int, progress: Progress) -> list[Figure]:
    from lasthop.libbpf import BpfObject

    with tempfile.TemporaryDirectory(prefix="lasthop-bench-") as tmp:
        progress("building the BPF object")
        try:
            obj_path = build.build(Path(tmp) / "lasthop.bpf.o")
        except build.BuildError as err:
            raise BenchError(str(err)) from err
        obj = BpfObject(obj_path, pin_root=None, max_entries={"lh_conns4": 1 << 18})
        try:
            dp = _Datapath(obj)
            pinned = tcp4_frame(_FW, _UPLINK_MAC, _CLIENT, _VIP, 40001, 80, TCP_ACK)
            plain = tcp4_frame(_FW, _UPLINK_MAC, _CLIENT, _SERVER, 40001, 80, TCP_ACK)
            proxy = dp.vm_origin_entry(50001)
            cases = {
                "empty": ("lh_empty", pinned),
                "service_pinned": ("lh_uplink", pinned),
                "vm_origin_return": ("lh_uplink", proxy),
                "uplink_refresh": ("lh_uplink", plain),
            }
            for prog, frame in cases.values():  # first packets: select, learn
                dp.run(prog, frame)
            runs: dict[str, list[int]] = {name: [] for name in cases}
            for r in range(rounds):
                progress(f"back-to-back runs: round {r + 1}/{rounds}")
                for name, (prog, frame) in cases.items():
                    verdict, ns = dp.run(prog, frame, repeat)
                    want = 7 if name in ("service_pinned", "vm_origin_return") else 0
                    if verdict != want:
                        raise BenchError(f"{name}: verdict {verdict}, expected {want}")
                    runs[name].append(ns)
            progress(f"{singles} new service connections, as single runs")
            sel, base = [], []
            for i in range(singles):
                saddr = bytes((10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF))
                syn = tcp4_frame(_FW, _UPLINK_MAC, saddr, _VIP, 1024, 80, TCP_SYN)
                verdict, ns = dp.run("lh_uplink", syn)
                if verdict != 7:
                    raise BenchError(f"a new service connection was not redirected ({verdict})")
                sel.append(ns)
                base.append(dp.run("lh_empty", pinned)[1])
        finally:
            obj.close()
    empty = statistics.median(runs["empty"])
    labels = {
        "empty": "empty tc program (lh_empty)",
        "service_pinned": "service packet, pinned to its VM",
        "vm_origin_return": "server reply to a full-proxy VM",
        "uplink_refresh": "uplink refresh (no service), same program",
    }
    figures = [
        Figure(
            name,
            labels[name],
            statistics.median(ns),
            statistics.median(ns) / empty,
            TARGETS.get(name),
            f"rounds: {ns}",
        )
        for name, ns in runs.items()
    ]
    extra = statistics.fmean(sel) - statistics.fmean(base)
    figures.append(
        Figure(
            "service_selected",
            "new service connection: Maglev choice + learn",
            empty + extra,
            (empty + extra) / empty,
            None,
            f"single runs: mean {statistics.fmean(sel):.0f} ns, lh_empty "
            f"{statistics.fmean(base):.0f} ns",
        )
    )
    return figures


def _swap_ms(rounds: int = 5) -> float | None:
    """The swap of a 65,537-slot table into lh_maglev (create, batch fill, update)."""
    from lasthop.libbpf import BpfObject
    from lasthop.services.lookup import write_table

    table = build_table([Member(f"vm{i}", i + 1) for i in range(REBUILD_VMS)])
    with tempfile.TemporaryDirectory(prefix="lasthop-bench-") as tmp:
        obj = BpfObject(
            build.build(Path(tmp) / "o.bpf.o"), pin_root=None, max_entries={"lh_conns4": 1024}
        )
        try:
            maglev = obj.map("lh_maglev")
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                write_table(maglev, 0, table)
                times.append((time.perf_counter() - t0) * 1000)
        finally:
            obj.close()
    return statistics.median(times)


_MOVE_KEY = struct.Struct("<4s4s2s2sBxH")  # struct conn_key4


def _move_keys(start: int, n: int, daddr: bytes) -> bytes:
    """n conn_key4s of clients 10.x.y.z (by i) to daddr port 80, TCP."""
    return b"".join(
        _MOVE_KEY.pack(
            bytes((10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF)),
            daddr,
            (1024 + (i >> 24)).to_bytes(2, "big"),
            (80).to_bytes(2, "big"),
            socket.IPPROTO_TCP,
            0,
        )
        for i in range(start, start + n)
    )


def _move(entries: int, ours: int, rounds: int = 4) -> Move:
    """lh_conns4 filled with *entries*, *ours* of them the service's on VM
    ifindex 7; each round moves those between VMs 7 and 9 with one run of
    lh_svc_walk (checked: all *ours* moved), then reads the table into Python."""
    from lasthop.datapath import MAP_NAMES, Maps, table_sizes
    from lasthop.libbpf import BpfObject
    from lasthop.services.lookup import svc_key, write_table

    with tempfile.TemporaryDirectory(prefix="lasthop-bench-") as tmp:
        obj = BpfObject(
            build.build(Path(tmp) / "o.bpf.o"), pin_root=None, max_entries=table_sizes(entries)
        )
        try:
            maps = Maps({name: obj.map(name) for name in MAP_NAMES})
            maps.svc_walker = obj.program("lh_svc_walk")

            def value(vm: int) -> bytes:
                return bytes(abi.ConnEntry(ifindex=3, vm_ifindex=vm, packets=1,
                                           flags=abi.F_ENTRY_HOP_KNOWN,
                                           state=int(abi.State.TCP_ESTABLISHED)))  # fmt: skip

            others, batch = entries - ours, 16384
            for start in range(0, others, batch):
                n = min(batch, others - start)
                maps.conns4.update_batch(_move_keys(start, n, _SERVER), value(5) * n, n)
            maps.conns4.update_batch(_move_keys(others, ours, _VIP), value(7) * ours, ours)
            maps.services.update(
                svc_key(_VIP + bytes(12), socket.IPPROTO_TCP, 80, abi.FAMILY_V4),
                bytes(abi.SvcInfo(id=0)),
            )
            walk, read = [], []
            for r in range(rounds):
                src, dst = (7, 9) if r % 2 == 0 else (9, 7)
                write_table(maps.maglev, 0, [dst] * MAGLEV_SIZE)
                req = abi.SvcWalk(service_id=0, count=1, drop=0)
                req.ifindex[0] = src
                t0 = time.perf_counter()
                done = maps.svc_walk(req)
                walk.append((time.perf_counter() - t0) * 1000)
                if done is None or (done.moved, done.dropped) != (ours, 0):
                    raise BenchError(f"lh_svc_walk did not move the {ours} entries ({done})")
                t0 = time.perf_counter()
                seen = sum(1 for _ in maps.entries())
                read.append((time.perf_counter() - t0) * 1000)
                if seen != entries:
                    raise BenchError(f"read {seen} entries of {entries}")
        finally:
            obj.close()
    return Move(entries, ours, statistics.median(walk), statistics.median(read), walk, read)


def run(
    keys: int = 1_000_000,
    repeat: int = 1_000_000,
    rounds: int = 5,
    singles: int = 5000,
    datapath: bool = True,
    move_entries: int = 1_000_000,
    progress: Progress = quiet,
) -> Results:
    started = time.monotonic()
    progress(f"hashing {keys} simulated connection keys")
    slots = simulated_slots(keys)
    spreads = []
    for n in POOLS:
        progress(f"spread and movement, {n} VMs")
        spreads.append(spread(n, slots))
    w = weights(slots)
    progress("rebuild time")
    build_ms = rebuild_ms()
    figures: list[Figure] = []
    swap = None
    move = None
    if datapath:
        if os.geteuid() != 0:
            raise BenchError(
                "the per-packet figures need root (CAP_BPF): run as root, or pass --no-datapath"
            )
        swap = _swap_ms()
        figures = _per_packet(repeat, rounds, singles, progress)
        if move_entries:
            progress(f"a VM leaving a pool at {move_entries} entries")
            move = _move(move_entries, min(1000, move_entries // 10))
    return Results(
        keys=keys,
        spreads=spreads,
        weights=w,
        rebuild_ms=build_ms,
        swap_ms=swap,
        figures=figures,
        move=move,
        settings={
            "keys": keys,
            "repeat": repeat,
            "rounds": rounds,
            "singles": singles,
            "move_entries": move_entries,
            "seed": SEED,
            "table_size": MAGLEV_SIZE,
        },
        environment={
            "kernel": platform.release(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "elapsed_s": round(time.monotonic() - started, 1),
        },
    )


# -- printing -------------------------------------------------------------------------


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("[green]pass[/green]" if ok else "[red]FAIL[/red]")


def print_results(results: Results, console: Any) -> None:
    from rich.table import Table

    t = Table(
        title=f"Maglev spread over {results.keys:,} simulated connections "
        f"(table {MAGLEV_SIZE:,} slots)"
    )
    for col in (
        "VMs",
        "busiest / mean",
        "quietest / mean",
        "",
        "hash % N",
        "moved when 1 VM leaves",
        "bound 1/N + 1 %",
        "",
        "slots per VM",
    ):
        t.add_column(col, justify="left" if col in ("", "slots per VM") else "right")
    for s in results.spreads:
        t.add_row(
            str(s.vms),
            f"{s.busiest:.4f}",
            f"{s.quietest:.4f}",
            _mark(s.busiest <= TARGETS["spread"]),
            f"{s.control:.4f}",
            f"{s.moved:.2%}",
            f"{s.moved_bound:.2%}",
            _mark(s.moved <= s.moved_bound),
            f"{s.slots_min}-{s.slots_max}",
        )
    console.print(t)
    console.print(
        "hash % N: the busiest share when the same keys are spread by their hash "
        "modulo N, with no table: what 1,000,000 random keys alone give (the sampling "
        "noise, about 2.4 x sqrt(N / keys) at the busiest of N)",
        style="dim",
    )
    console.print(
        "weights 1:2:3:4, each VM's share / its weight's share: "
        + ", ".join(f"{k}: {v:.4f}" for k, v in results.weights.items())
    )
    swap = f"; swap into lh_maglev {results.swap_ms:.1f} ms" if results.swap_ms is not None else ""
    console.print(f"table rebuild, {REBUILD_VMS} VMs: {results.rebuild_ms:.1f} ms (Python){swap}")
    if results.move is not None:
        m = results.move
        console.print(
            f"a VM leaves a pool at {m.entries:,} entries ({m.ours} of them on it): "
            f"lh_svc_walk {m.walk_ms:.1f} ms; reading the table into Python "
            f"{m.read_ms:.0f} ms ({m.ratio:.1f}x)",
            highlight=False,
        )
    if results.figures:
        t = Table(title="service path per packet (BPF_PROG_TEST_RUN, lh_uplink)")
        for col in ("case", "ns/packet", "× empty", "target", ""):
            t.add_column(col, justify="left" if col in ("case", "") else "right")
        for f in results.figures:
            t.add_row(
                f.label,
                f"{f.ns:.1f}",
                f"{f.ratio:.2f}",
                f"≤ {f.target:g}×" if f.target else "",
                _mark(f.ok),
            )
        console.print(t)
    env = results.environment
    console.print(
        f"kernel {env['kernel']}, {env['cpus']} CPUs; settings {results.settings}; "
        f"{env['elapsed_s']} s",
        style="dim",
    )
