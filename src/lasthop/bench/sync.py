"""`lasthop bench sync`: what replication costs and how fast it goes, from
one run (issue 12's targets), through a real redis-server the bench starts
on a unix socket:

    data path      per new confirmed connection (SYN, SYN-ACK, ACK run back to
                   back by lh_bench_uplink / lh_bench_vmport, as in `bench
                   datapath`), rounds with sync off and on interleaved: the
                   ratio on/off (target <= 1.2x); the ring drained between
                   rounds, its records per connection counted
    throughput     host A's data path writes CHANGES records (SYNs of new
                   connections, lh_bench_uplink) into lh_changes as fast as it
                   can; A's Replicator publishes them, host B's (another
                   process, its own tables) applies them: records/s of each
                   (target 100,000/s)
    lag            the same at RATE records/s (chunks of CHUNK every
                   CHUNK/RATE s; 101,000/s by default): from a chunk's run in
                   A's kernel to the moment B has written it, p50 and p99
                   (target p99 <= 50 ms), held only if A published at least
                   100,000/s (its records over the time from the first chunk's
                   run to the last chunk's XADD: a producer the machine slowed
                   would flatter the lag); and where a chunk waited: in A (its
                   run to its XADD), in the store (to B's reading it), in B
    resync         A holds RESYNC entries; a fresh B starts (its hello asks A
                   for a snapshot): from B's start to its last entry written
                   (target <= 10 s); B's table then counted

Hosts A and B are two BPF objects loaded side by side (not attached; the
bench's private namespaces give each an up0 and a vm0), each with the agent's
own Replicator (lasthop.sync): the code `lasthop run --sync` runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lasthop import abi, build
from lasthop.bench import datapath as dp
from lasthop.bench.frames import TCP_SYN, quiet, tcp4_frame
from lasthop.clock import Clock
from lasthop.datapath import MAP_NAMES, Maps
from lasthop.errors import SyncError
from lasthop.libbpf import BpfObject, RingBuffer
from lasthop.sync.store import RedisServer

__all__ = ["BenchError", "Results", "TARGETS", "print_results", "run"]

Progress = Callable[[str], None]
TARGETS = {
    "datapath_ratio": 1.2,  # data path per new connection, sync on / off
    "published_per_s": 100_000.0,
    "applied_per_s": 100_000.0,
    "lag_published_per_s": 100_000.0,  # the lag holds only at the rate
    "lag_p99_ms": 50.0,
    "resync_s": 10.0,
}
CHUNK = 1000  # records per run of lh_bench_uplink in the throughput and lag phases
_CLIENTS = 0x0B000000  # 11.0.0.0: the clients of the throughput and lag phases
_RESYNC_CLIENTS = 0x0C000000  # 12.0.0.0: the entries of the resync phase
_FILL_BATCH = 8192


class BenchError(RuntimeError):
    """The bench cannot run here (not root, no redis-server, ...) or a phase
    did not do what it says (records lost, entries missing)."""


@dataclass
class Results:
    datapath_off_ns: list[float]  # per new confirmed connection, one per round
    datapath_on_ns: list[float]
    records_per_connection: float
    published_per_s: float
    applied_per_s: float
    lag_rate: int  # offered: a chunk of CHUNK records every CHUNK / rate s
    lag_published_per_s: float  # the lag phase's records over its first run to its last XADD
    lag_p50_ms: float
    lag_p99_ms: float
    lag_samples: int
    resync_entries: int
    resync_s: float
    resync_applied: int
    lost: int  # TC_SYNC_LOST over every phase: must be 0 for the figures to hold
    # where a chunk's lag went, p50 / p99 (ms): A (ring, batching, encoding:
    # its run to the XADD's timestamp), the store (to B's reading of the
    # message: Redis, B's queue), B (decoding, writing)
    lag_stages: dict[str, tuple[float, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def datapath_ratio(self) -> float:
        return statistics.median(self.datapath_on_ns) / statistics.median(self.datapath_off_ns)

    def figures(self) -> dict[str, float]:
        return {
            "datapath_ratio": self.datapath_ratio,
            "published_per_s": self.published_per_s,
            "applied_per_s": self.applied_per_s,
            "lag_published_per_s": self.lag_published_per_s,
            "lag_p99_ms": self.lag_p99_ms,
            "resync_s": self.resync_s,
        }

    def met(self) -> dict[str, bool]:
        out = {}
        for name, value in self.figures().items():
            limit = TARGETS[name]
            out[name] = value >= limit if name.endswith("_per_s") else value <= limit
        return out

    @property
    def ok(self) -> bool:
        return all(self.met().values()) and self.lost == 0

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "datapath_ratio": self.datapath_ratio,
            "targets": TARGETS,
            "met": self.met(),
        }


# -- the store ------------------------------------------------------------------


@contextlib.contextmanager
def _redis(folder: Path) -> Iterator[str]:
    try:
        with RedisServer(folder) as server:
            yield server.url
    except SyncError as err:
        raise BenchError(str(err)) from err


# -- a host: a BPF object's maps and the agent's Replicator ------------------------


def _settings(maps: Maps, clock: Clock) -> None:
    from lasthop.config import Timeouts

    s = maps.get_settings()
    s.hz = clock.hz()
    for state, seconds in Timeouts().by_state().items():
        s.timeout[state] = round(seconds)
    maps.set_settings(s)


class _Host:
    """One host's tables (a BPF object, not attached) and, once started, its
    Replicator. *ring* sizes lh_changes; *table* lh_conns4 (the bench's
    connections are IPv4; the IPv6 maps stay small)."""

    def __init__(self, obj_path: Path, *, ring: int, table: int, pending: int = 0) -> None:
        self.obj = BpfObject(
            obj_path,
            pin_root=None,
            max_entries={
                "lh_changes": ring,
                "lh_conns4": table,
                "lh_pending4": pending or table,
                "lh_conns": 1024,
                "lh_pending": 1024,
            },
        )
        self.maps = Maps({name: self.obj.map(name) for name in MAP_NAMES})
        self.clock = Clock(self.obj.program("lh_clock").fd)
        _settings(self.maps, self.clock)
        self.lock = threading.RLock()
        self.replicator: Any = None

    def start(self, url: str, name: str, cls: Any = None) -> None:
        from lasthop.sync import Replicator

        self.replicator = (cls or Replicator)(
            self.maps, self.clock, self.lock, url=url, cluster="bench", host=name
        )
        self.replicator.start()

    def lost(self) -> int:
        return int(self.maps.table_totals()[abi.TableCounter.SYNC_LOST])

    def close(self) -> None:
        if self.replicator is not None:
            self.replicator.stop()
        self.obj.close()


# -- host B: another process ---------------------------------------------------------


def _clients_of(keys: Any) -> Any:
    """The numbers of bench connections' clients (their IPv4 source
    addresses), of full conn_keys (a numpy V40 array)."""
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(-1, ctypes.sizeof(abi.ConnKey))
    return raw[:, :4].copy().view(">u4").ravel().astype(np.int64) - _CLIENTS


def _peer(
    pipe: Any, obj_path: str, url: str, table: int, expect: int, timeout: float, flat: int = 0
) -> None:
    """Host B: applies A's records; reports its start time, when it has
    applied *flat* records (the throughput phase: the lag phase starts on an
    empty queue), then how many it applied, for each chunk the last batch
    that wrote its records (chunk -> (A's XADD timestamp, B's reading of it,
    B's writing done), wall times), when the last one was written, and its
    confirmed table's size, through *pipe*."""
    from lasthop.sync import Replicator

    applied_at: dict[int, tuple[float, float, float]] = {}
    done = threading.Event()
    state = {"applied": 0, "last": 0.0, "ts": 0.0, "read": 0.0}

    class Timed(Replicator):
        def _handle(self, raw: dict[bytes, bytes]) -> None:
            state["read"] = time.time()
            state["ts"] = float(raw.get(b"ts", b"nan"))
            super()._handle(raw)

        def apply(self, records: bytes, names: list[str], hops: bytes = b"") -> Any:
            batch = super().apply(records, names, hops)
            now = time.time()
            before = state["applied"]
            state["applied"] = self._status.applied
            state["last"] = now
            for chunk in np.unique(_clients_of(batch.keys) // CHUNK):
                applied_at[int(chunk)] = (state["ts"], state["read"], now)
            if before < flat <= state["applied"]:
                pipe.send(("flat", now))
            if state["applied"] >= expect:
                done.set()
            return batch

    try:
        with dp._private_netns():
            host = _Host(Path(obj_path), ring=1 << 16, table=table)
            pipe.send(("started", time.time()))
            host.start(url, "B", Timed)
            done.wait(timeout)
            count = host.maps.conns4.count() + host.maps.conns.count()
            pipe.send(("done", state["applied"], state["last"], applied_at, count))
            host.close()
    except BaseException as err:  # reported to the parent, which raises it
        pipe.send(("error", repr(err)))


class _PeerProcess:
    def __init__(
        self, obj_path: Path, url: str, table: int, expect: int, timeout: float, flat: int = 0
    ) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_peer,
            args=(child, str(obj_path), url, table, expect, timeout, flat),
            daemon=True,
        )
        self.proc.start()
        self.timeout = timeout

    def receive(self, what: str) -> tuple[Any, ...]:
        if not self.pipe.poll(self.timeout + 60):
            raise BenchError(f"host B did not report {what!r}")
        msg = self.pipe.recv()
        if msg[0] == "error":
            raise BenchError(f"host B failed: {msg[1]}")
        if msg[0] != what:
            raise BenchError(f"host B reported {msg[0]!r}, expected {what!r}")
        return tuple(msg[1:])

    def close(self) -> None:
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# -- the phases -------------------------------------------------------------------------


def _set_sync(maps: Maps, on: bool) -> None:
    from lasthop.sync.wire import sync_epoch_shift

    s = maps.get_settings()
    s.flags = (s.flags | abi.F_SET_SYNC) if on else (s.flags & ~abi.F_SET_SYNC)
    s.sync_shift = sync_epoch_shift(s.hz, dict(enumerate(s.timeout)))
    maps.set_settings(s)


def _datapath(
    obj_path: Path, conns: int, rounds: int, progress: Progress
) -> tuple[list[float], list[float], float, int]:
    """Per new confirmed connection, sync off and on, interleaved rounds;
    records per connection; records lost."""
    with dp._private_netns() as index:
        obj = BpfObject(
            obj_path,
            pin_root=None,
            max_entries={
                "lh_conns4": 4 * conns * rounds,
                "lh_pending4": 4 * conns * rounds,
                "lh_changes": 1 << 24,
            },
        )
        try:
            b = dp._Bench(obj, index)
            maps = Maps({name: obj.map(name) for name in MAP_NAMES})
            ring = RingBuffer(maps.changes.fd)
            off: list[float] = []
            on: list[float] = []
            records = 0
            try:
                for r in range(2 * rounds):
                    sync = r % 2 == 1
                    progress(
                        f"data path: round {r // 2 + 1}/{rounds}, sync {'on' if sync else 'off'}"
                    )
                    _set_sync(maps, sync)
                    s = dp._handshake_stream(b, conns, 1, first_round=r)
                    step = s.step[0] - s.empty[0]
                    per_conn = s.syn[0] + s.syn_ack[0] + s.ack[0] - 3 * step
                    (on if sync else off).append(per_conn)
                    got = len(ring.read())
                    if sync:
                        records += got
                    elif got:
                        raise BenchError(f"sync off, yet {got} records in lh_changes")
            finally:
                ring.close()
            lost = int(maps.table_totals()[abi.TableCounter.SYNC_LOST])
        finally:
            obj.close()
    return off, on, records / (conns * rounds), lost


def _produce(
    a: _Host, index: dict[str, int], first: int, n: int, rate: float | None
) -> dict[int, float]:
    """n SYNs of new connections (clients *first*...) run through A's
    lh_bench_uplink in chunks of CHUNK (each SYN a record in lh_changes), at
    *rate* records/s or flat out. Returns each chunk's wall time, just
    before its run."""
    prog = a.obj.program("lh_bench_uplink")
    ctx = bytearray(192)
    ctx[40:44] = index["up0"].to_bytes(4, "little")
    produced: dict[int, float] = {}
    t0 = time.monotonic()
    for k in range(n // CHUNK):
        if rate:
            delay = t0 + k * CHUNK / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        client = (_CLIENTS + first + k * CHUNK).to_bytes(4, "big")
        frame = tcp4_frame(dp._FW_B, dp._VM, client, dp._VM4, 50000, 80, TCP_SYN)
        produced[(first + k * CHUNK) // CHUNK] = time.time()
        prog.test_run(frame, repeat=CHUNK, ctx=bytes(ctx))
    return produced


def _fill_resync(a: _Host, n: int, ifindex: int) -> None:
    now = a.clock.jiffies()
    e = abi.ConnEntry(
        ifindex=ifindex,
        flags=abi.F_ENTRY_HOP_KNOWN,
        packets=1,
        state=int(abi.State.TCP_ESTABLISHED),
        last_seen=now,
    )
    ctypes.memmove(e.mac, dp._FW_B, abi.ETH_ALEN)
    value = bytes(e)
    for lo in range(0, n, _FILL_BATCH):
        count = min(_FILL_BATCH, n - lo)
        keys = b"".join(  # IPv4 entries: lh_conns4's 16-byte keys
            bytes(abi.key4_of(abi.ConnKey.from_buffer_copy(
                dp._key4((_RESYNC_CLIENTS + i).to_bytes(4, "big"), dp._VM4, 50000, 80)
            )))
            for i in range(lo, lo + count)
        )  # fmt: skip
        a.maps.conns4.update_batch(keys, value * count, count)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.005)


def run(
    changes: int = 300_000,
    rate: int = 101_000,
    resync: int = 1_000_000,
    conns: int = 5_000,
    rounds: int = 5,
    progress: Progress = quiet,
) -> Results:
    """Every phase, in one run; see the module docstring."""
    if os.geteuid() != 0:
        raise BenchError("needs root (CAP_BPF, CAP_NET_ADMIN): run as root")
    changes = max(CHUNK, changes - changes % CHUNK)
    with tempfile.TemporaryDirectory(prefix="lasthop-bench-sync-") as tmp:
        folder = Path(tmp)
        progress("building the BPF object")
        try:
            obj_path = build.build(folder / "lasthop.bpf.o", {"LH_BENCH": "1"})
        except build.BuildError as err:
            raise BenchError(str(err)) from err
        off, on, per_conn, lost = _datapath(obj_path, conns, rounds, progress)

        table = 2 * changes + 4096
        with _redis(folder) as url, dp._private_netns() as index:
            progress("throughput: host A's tables, host B (another process)")
            a = _Host(obj_path, ring=1 << 25, table=table)
            try:
                dp._Bench(a.obj, index)  # up0 an uplink, vm0 a VM port, as in bench datapath
                a.start(url, "A")
                _wait(lambda: a.replicator.status().resyncs >= 1, "host A's first snapshot")
                peer = _PeerProcess(obj_path, url, table, 2 * changes, 120, flat=changes)
                peer.receive("started")
                # B's hello has reached A once A has answered it with a snapshot
                _wait(lambda: a.replicator.status().resyncs >= 2, "host B's hello")
                published0 = a.replicator.status().published
                progress(f"throughput: {changes} records flat out")
                flat = _produce(a, index, 0, changes, None)
                _wait(
                    lambda: a.replicator.status().published - published0 >= changes,
                    "host A publishing",
                    120,
                )
                t_published = time.time()
                peer.receive("flat")  # B has caught up: the lag phase starts on an empty queue
                progress(f"lag: {changes} records at {rate}/s")
                paced = _produce(a, index, changes, changes, rate)
                applied, _, applied_at, _ = peer.receive("done")
                peer.close()
                lost += a.lost()
            finally:
                a.close()

            progress(f"resync: {resync} entries on host A")
            a = _Host(obj_path, ring=1 << 16, table=resync + 4096, pending=4096)
            try:
                _fill_resync(a, resync, index["up0"])
                a.start(url, "A2")
                _wait(lambda: a.replicator.status().resyncs >= 1, "host A's first snapshot", 120)
                progress(f"resync: {resync} entries to a fresh host B")
                fresh = _PeerProcess(obj_path, url, resync + 4096, resync, 60)
                (r_start,) = fresh.receive("started")
                r_applied, r_last, _, r_count = fresh.receive("done")
                fresh.close()
            finally:
                a.close()

    t_start = min(flat.values())
    if any(c not in applied_at for c in (*flat, *paced)) or applied < 2 * changes:
        raise BenchError(f"host B applied {applied} of {2 * changes} records")
    flat_done = max(applied_at[c][2] for c in flat)
    lags = [applied_at[c][2] - t for c, t in paced.items()]
    stages = {
        "A": [applied_at[c][0] - t for c, t in paced.items()],
        "store": [applied_at[c][1] - applied_at[c][0] for c in paced],
        "B": [applied_at[c][2] - applied_at[c][1] for c in paced],
    }
    lag_published = changes / (max(applied_at[c][0] for c in paced) - min(paced.values()))
    return Results(
        datapath_off_ns=off,
        datapath_on_ns=on,
        records_per_connection=per_conn,
        published_per_s=changes / (t_published - t_start),
        applied_per_s=changes / (flat_done - t_start),
        lag_rate=rate,
        lag_published_per_s=lag_published,
        lag_stages={k: (_pct(v, 0.5) * 1000, _pct(v, 0.99) * 1000) for k, v in stages.items()},
        lag_p50_ms=_pct(lags, 0.5) * 1000,
        lag_p99_ms=_pct(lags, 0.99) * 1000,
        lag_samples=len(lags),
        resync_entries=resync,
        resync_s=r_last - r_start if r_applied >= resync else float("inf"),
        resync_applied=r_count,
        lost=lost,
        settings={
            "changes": changes,
            "rate": rate,
            "conns": conns,
            "rounds": rounds,
            "chunk": CHUNK,
        },
    )


def print_results(results: Results, console: Any) -> None:
    r = results
    met = r.met()

    def mark(name: str) -> str:
        return "[green]met[/green]" if met[name] else "[red]missed[/red]"

    off, on = statistics.median(r.datapath_off_ns), statistics.median(r.datapath_on_ns)
    console.print(
        f"data path per new confirmed connection: sync off {off:.0f} ns, on {on:.0f} ns: "
        f"{r.datapath_ratio:.2f}x (target <= {TARGETS['datapath_ratio']}x) "
        f"{mark('datapath_ratio')}; {r.records_per_connection:.2f} records per connection",
        highlight=False,
    )
    console.print(
        f"  rounds off {[round(x) for x in r.datapath_off_ns]}, on "
        f"{[round(x) for x in r.datapath_on_ns]}",
        highlight=False,
    )
    console.print(
        f"changes published {r.published_per_s:,.0f}/s {mark('published_per_s')}, applied "
        f"{r.applied_per_s:,.0f}/s {mark('applied_per_s')} (target "
        f"{TARGETS['published_per_s']:,.0f}/s; {r.settings['changes']:,} records flat out)",
        highlight=False,
    )
    console.print(
        f"lag A -> B at {r.lag_rate:,}/s offered, {r.lag_published_per_s:,.0f}/s published "
        f"{mark('lag_published_per_s')}: p50 {r.lag_p50_ms:.1f} ms, p99 {r.lag_p99_ms:.1f} ms "
        f"(target p99 <= {TARGETS['lag_p99_ms']:.0f} ms) {mark('lag_p99_ms')}; "
        f"{r.lag_samples} chunks of {CHUNK}",
        highlight=False,
    )
    console.print(
        "  where a chunk waits, p50 / p99: "
        + ", ".join(f"{what} {p50:.1f} / {p99:.1f} ms" for what, (p50, p99) in r.lag_stages.items())
        + " (A: its run to its XADD; store: to B's read; B: decode and write)",
        highlight=False,
    )
    console.print(
        f"full resync of {r.resync_entries:,} entries to a fresh peer: {r.resync_s:.1f} s "
        f"(target <= {TARGETS['resync_s']:.0f} s) {mark('resync_s')}; "
        f"its table then holds {r.resync_applied:,}",
        highlight=False,
    )
    console.print(f"records lost in the kernel (TC_SYNC_LOST): {r.lost}", highlight=False)
