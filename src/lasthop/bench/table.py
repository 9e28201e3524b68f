"""`lasthop bench table`: what the connection table costs the agent at N live
entries, measured on the real agent (`lasthop run`, a subprocess) side by side
in one run with the same agent on an empty table.

    bench process (netns lh-table-<pid>)       agent: lasthop run --config <tmp>
      fills lh_conns4/lh_pending4 ──pins──>   lh_conns4, lh_pending4, lh_expiry ...
      times stats, /metrics        ──API───>   127.0.0.1:9180 (inside the netns)
      reads /proc/<agent>/stat                 lh_expire every 1 s: walks only
                                               after a change or when one is due
    up0 <-> up0p, vm0 <-> vm0p: veth pairs, the uplink and the VM port

Figures (each also measured on the empty table first, as its baseline):
    agent CPU at rest   utime + stime of the agent (every thread) over the rest
                        window, in % of one core, once the walk the fill called
                        for has ended (_settle): a table at rest is not walked.
                        The detail names every walk seen in the window and what
                        called for it (asked, changed, due); the check
                        rest_walks_not_due fails on any but a due one
    ... table changing  the same while the table "changes" every 0.25 s: the
                        bench adds to the data path's TC_STATE_CHANGES count, as
                        a FIN or a new connection would; a run walks once the
                        shortest timeout less the lead has passed since the
                        last walk began (docs/table.md)
    ... under a flood   the same while a thread of the bench floods the uplink
                        with new connections as fast as one CPU can (TCP SYNs
                        from spoofed clients: lh_bench_uplink, lh_uplink's code
                        stepping the client address each run, test-run on the
                        agent's pinned maps), at the end of the run: the
                        in-place quota fills, then every SYN evicts from the
                        pending LRU (the mid-stream fill goes with it); the
                        check flood_confirmed_kept counts what left lh_conns4's
                        confirmed entries meanwhile (none may)
    stats --json        wall time of `lasthop stats --json` (a new process each
                        time: Python's start is part of it), median of several;
                        in turn, round by round, the same through click
                        (`python -m lasthop.cli stats`, the way before issue 8's
                        lasthop.stats_cli) and `python -c pass`
    stats in-process    Controller.stats() on the pinned maps, median of several
    /metrics scrape     one GET of the agent's /metrics, median of several
    top refresh         what `lasthop top` does each second, in-process: one
                        Controller.stats(), a sample of the table's first
                        entries (lasthop.top.SAMPLE), the frame and its tables
    expiry pass         lh_expire run once by test run on the agent's pinned maps
                        (the kernel's own timing); the agent's passes, from
                        lh_expiry started/finished jiffies, in the detail
    expiry lateness     K entries stamped now in states with a short timeout
                        (udp_new in lh_pending4, udp_stream in lh_conns4); each
                        is polled until gone; lateness = gone - (insert + timeout);
                        the detail says how many the drain removed at their
                        deadline (lh_expiry_due) rather than a walk
    memory per entry    memlock (/proc/self/fdinfo) of every map the agent pins
                        over the entries the four tables can hold (IPv4 and
                        IPv6 at their default sizes: IPv6 a quarter of IPv4)

The N live entries are IPv4: confirmed TCP connections (TCP_ESTABLISHED, in
lh_conns4) and, a tenth of them, mid-stream ones still in lh_pending4, all stamped with the
data path's clock when written (batch updates through the pins); their timeouts
outlast the run, and the run checks that none was removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lasthop import abi, libbpf
from lasthop.bench.frames import TCP_SYN, skb_ctx, tcp4_frame
from lasthop.build import build, ensure_object
from lasthop.clock import Clock
from lasthop.config import Config
from lasthop.datapath import MAP_NAMES, OBJECT_ENV, SIZE_KEYS, Maps, Pins
from lasthop.lab.namespaces import LabError
from lasthop.lab.runner import AgentProcess, lasthop_argv
from lasthop.top import SAMPLE as TOP_SAMPLE

EVERY = Config().expiry_interval  # the agent's default pass interval

__all__ = ["BenchError", "Figure", "Results", "TARGETS", "run", "print_results"]

# Issue 8's targets at N live entries.
TARGETS: dict[str, float] = {
    "agent_cpu": 1.0,  # % of one core
    "stats_cli": 100.0,  # ms
    "stats_inproc": 100.0,  # ms
    "metrics": 100.0,  # ms
    "expiry_lateness": 5.0,  # s past the timeout
    "memory_per_entry": 150.0,  # bytes
}
API_PORT = 9180  # inside the private netns: nothing else listens there
SHORT_TIMEOUT = 5.0  # s: [timeouts] udp_new and udp_stream of the bench's config (default)
LONG_TIMEOUT = 3600  # s: tcp_midstream, so the pending fill outlives the run
PENDING_SHARE = 10  # one live entry in ten is a pending (mid-stream) one
_BATCH = 16384
_UP_MAC, _VM_MAC = "02:00:00:00:01:01", "02:00:00:00:02:01"
_FW_MAC = bytes.fromhex("02fa0000000a")
_VM4 = bytes((192, 0, 2, 11))
_KEY = struct.Struct("<4s4s2s2sBxH")  # struct conn_key4: the IPv4 tables' key
_CLK_TCK = os.sysconf("SC_CLK_TCK")
FLOOD_BATCH = 20_000  # new connections per test run of the flood
_FLOOD_CLIENTS = 0x64400000  # 100.64.0.0/10: the flood's spoofed clients

Progress = Callable[[str], None]


class BenchError(RuntimeError):
    """The bench cannot run here (not root, the agent did not start...)."""


# -- results --------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    label: str
    value: float
    unit: str  # "%", "ms", "s", "B"
    baseline: float | None  # the same figure on the empty table (None: not measured)
    target: float | None
    detail: str = ""

    @property
    def ok(self) -> bool | None:
        return None if self.target is None else self.value <= self.target


@dataclass
class Results:
    figures: list[Figure]
    checks: dict[str, Any]  # self-checks: live entries kept, expired entries gone
    threads: dict[str, float]  # agent thread (name/tid) -> % of a core at N entries
    settings: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(f.ok is not False for f in self.figures)

    def figure(self, name: str) -> Figure:
        return next(f for f in self.figures if f.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "figures": [asdict(f) | {"ok": f.ok} for f in self.figures],
            "checks": self.checks,
            "threads": self.threads,
            "ok": self.ok,
            "targets": TARGETS,
            "settings": self.settings,
            "environment": self.environment,
        }


# -- the namespace and the agent ------------------------------------------------------


@contextlib.contextmanager
def _private_netns(name: str) -> Iterator[None]:
    """A network namespace with lo up and two veth pairs (up0, vm0), entered by
    this thread (its sockets, the API's clients, live there); removed after."""
    from pyroute2 import NetNS, netns

    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            for ifname, mac in (("up0", _UP_MAC), ("vm0", _VM_MAC)):
                ns.link("add", ifname=ifname, kind="veth", peer={"ifname": f"{ifname}p"})
                for dev in (ifname, f"{ifname}p"):
                    ns.link("set", index=ns.link_lookup(ifname=dev)[0], state="up")
                ns.link("set", index=ns.link_lookup(ifname=ifname)[0], address=mac)
        netns.pushns(name)
        try:
            yield
        finally:
            netns.popns()
    finally:
        netns.remove(name)


def _config(netns: str, pin_root: Path, entries: int, short_timeout: float) -> str:
    pending = max(1024, entries // 4)
    return f"""netns = "{netns}"
table_size = {entries}
pending_table_size = {pending}
pin_root = "{pin_root}"
api = "127.0.0.1:{API_PORT}"
api_socket = ""

[[uplink]]
name = "up0"

[[vm_port]]
name = "vm0"

[timeouts]
udp_new = {short_timeout}
udp_stream = {short_timeout}
tcp_midstream = {LONG_TIMEOUT}
"""


# -- measuring ------------------------------------------------------------------------


def _user_sys(path: str) -> tuple[int, int]:
    """utime, stime (clock ticks) of /proc/.../stat."""
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def _ticks(path: str) -> int:
    """utime + stime (clock ticks) of /proc/.../stat."""
    return sum(_user_sys(path))


def _threads(pid: int) -> dict[str, int]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            comm = (task / "comm").read_text().strip()
            out[f"{comm}/{task.name}"] = _ticks(str(task / "stat"))
    return out


@dataclass
class _Walk:
    ms: float  # its length (lh_expiry started/finished jiffies)
    cause: str  # what called for it: _walk_cause


@dataclass
class _Rest:
    cpu_pct: float
    sys_pct: float  # the part in the kernel (the expiry pass runs there)
    threads: dict[str, float]
    walks: list[_Walk]  # the agent's expiry walks seen in the window

    @property
    def passes(self) -> list[float]:
        """The walks' lengths, ms."""
        return [w.ms for w in self.walks]


def _at_or_after(a: int, b: int) -> bool:
    """Whether jiffies *a* is at or after *b* (32-bit stamps that wrap)."""
    return ((a - b) & 0xFFFFFFFF) < 0x80000000


def _walk_cause(before: abi.ExpiryStats, after: abi.ExpiryStats) -> str:
    """What called for the walk *after* records, *before* being lh_expiry as
    the previous walk left it (docs/table.md, "A table at rest is not
    walked"): "asked" (a new lh_expiry_request token), "changed" (the data
    path's change count moved), "due" (the walk began at or past next_due);
    several joined by "+"; "unexplained" when none holds (a product bug, or
    *before* read while that walk was under way: _settle makes sure none is
    when a window begins)."""
    causes = []
    if after.request != before.request:
        causes.append("asked")
    if after.changes != before.changes:
        causes.append("changed")
    if before.passes and _at_or_after(after.started, before.next_due):
        causes.append("due")
    if causes:
        return "+".join(causes)
    return (  # the numbers, to find out why
        f"unexplained: passes {before.passes}->{after.passes}, started {before.started}->"
        f"{after.started}, next_due {before.next_due}->{after.next_due}, changes "
        f"{before.changes}->{after.changes}, checked {before.checked}->{after.checked}, "
        f"due_next {before.due_next}->{after.due_next}, drains {before.drains}->{after.drains}"
    )


def _walks_text(walks: list[_Walk]) -> str:
    if not walks:
        return "no walk in the window"
    return f"{len(walks)} walks in the window: " + ", ".join(
        f"{w.ms:.0f} ms ({w.cause})" for w in walks
    )


def _rest(pid: int, maps: Maps, seconds: float, *, churn: bool = False) -> _Rest:
    """The agent's CPU over *seconds* of doing nothing but its own loop, and
    the expiry walks it ran meanwhile, each with what called for it. With
    *churn*, the table "changes" every 0.25 s (one more TC_STATE_CHANGES, as
    the data path counts a new connection or a state move): the agent walks as
    often as such changes call for, the cost of a busy table."""
    hz = maps.get_settings().hz or 1000
    t0, c0, th0 = time.monotonic(), _user_sys(f"/proc/{pid}/stat"), _threads(pid)
    walks, last = [], maps.expiry_stats()
    while time.monotonic() - t0 < seconds:
        time.sleep(min(0.25, max(0.0, seconds - (time.monotonic() - t0))))
        if churn:
            maps.add_table_counter(abi.TableCounter.STATE_CHANGES, 1)
        ex = maps.expiry_stats()
        if ex.passes != last.passes and ex.finished:  # a new walk finished since the last look
            ms = ((ex.finished - ex.started) & 0xFFFFFFFF) * 1000 / hz
            walks.append(_Walk(ms, _walk_cause(last, ex)))
            last = ex
    wall = time.monotonic() - t0
    c1, th1 = _user_sys(f"/proc/{pid}/stat"), _threads(pid)
    pct = 100 * (sum(c1) - sum(c0)) / _CLK_TCK / wall
    sys_pct = 100 * (c1[1] - c0[1]) / _CLK_TCK / wall
    threads = {
        name: round(100 * (th1[name] - th0.get(name, 0)) / _CLK_TCK / wall, 3) for name in th1
    }
    return _Rest(
        pct, sys_pct, {k: v for k, v in sorted(threads.items(), key=lambda kv: -kv[1])}, walks
    )


@dataclass
class _Flood:
    rest: _Rest  # the agent meanwhile
    syns: int  # new connections the data path took
    seconds: float


def _flood(pid: int, maps: Maps, pins: Pins, sizes: dict[str, int], up: int, seconds: float,
           tmp: Path) -> _Flood:  # fmt: skip
    """The agent over *seconds* while a thread floods the uplink with new
    connections (module docstring): lh_bench_uplink, from a bench build of the
    sources, on the agent's pinned maps, FLOOD_BATCH spoofed clients a test run."""
    obj_path = build(tmp / "bench.bpf.o", {"LH_BENCH": "1"})
    obj = libbpf.BpfObject(
        obj_path, pin_root=pins.folder, max_entries=sizes, programs=["lh_bench_uplink"]
    )
    prog, ctx = obj.program("lh_bench_uplink"), skb_ctx(up)
    stop, failed, syns = threading.Event(), [], [0]

    vm_mac = bytes.fromhex(_VM_MAC.replace(":", ""))

    def flood() -> None:
        client = _FLOOD_CLIENTS
        try:
            while not stop.is_set():
                frame = tcp4_frame(_FW_MAC, vm_mac, client.to_bytes(4, "big"), _VM4, 40000, 80,
                                   TCP_SYN)  # fmt: skip
                run = prog.test_run(frame, repeat=FLOOD_BATCH, ctx=ctx)
                if run.retval != 0:  # TC_ACT_OK: learned and passed to the bridge
                    raise BenchError(f"flood: lh_bench_uplink returned {run.retval}")
                syns[0] += FLOOD_BATCH
                client += FLOOD_BATCH
        except BaseException as err:  # noqa: BLE001 -- raised again below
            failed.append(err)

    thread = threading.Thread(target=flood, name="flood")
    started = time.monotonic()
    thread.start()
    try:
        rest = _rest(pid, maps, seconds)
    finally:
        stop.set()
        thread.join()
        obj.close()
    if failed:
        raise failed[0]
    return _Flood(rest, syns[0], time.monotonic() - started)


def _settle(maps: Maps, clock: Clock, timeout: float = 120.0) -> None:
    """Asks for a walk and waits until one that began after the asking has
    finished: entries written from here are no change the data path counted,
    and no walk is under way when the window measured next begins.

    A walk shows its token (lh_expiry.request) and its start from its first
    instructions, its end (finished, then passes) from its last. So waiting
    for "passes moved and the token is ours" was not enough: a walk already
    under way when the bench asked (at 1,000,000 entries, one the changing
    table's phase called for runs ~300 ms) moved passes, the next one showed
    the token as it began, and the rest window then held that whole walk (the
    1.4-1.7 % "at rest" of some runs). The walk waited for here began at or
    after the asking and has ended (finished not before started)."""
    seen = maps.expiry_stats().passes
    asked = clock.jiffies()
    maps.request_expiry()
    raw = maps.expiry_request.lookup(bytes(4))
    token = int.from_bytes(raw[:8], "little") if raw else 0
    deadline = time.monotonic() + timeout
    while True:
        ex = maps.expiry_stats()
        if (
            ex.passes != seen
            and ex.request == token
            and _at_or_after(ex.started, asked)  # began after the asking
            and _at_or_after(ex.finished, ex.started)  # and has ended
        ):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the agent ran no expiry pass within {timeout:.0f} s")
        time.sleep(0.05)


def _median_ms(fn: Callable[[], object], times: int) -> float:
    out = []
    for _ in range(times):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


# `lasthop stats --json` three ways, each a new process, interleaved round by round
# (issue 8): the console script's way (lasthop._entry: lasthop.stats_cli, no click),
# the click command it replaced (still `python -m lasthop.cli stats`), and Python's
# own start, the floor under both.
_STATS_WAYS = {
    "stats_cli": ["-m", "lasthop", "stats"],
    "stats_click": ["-m", "lasthop.cli", "stats"],
    "python_start": ["-c", "pass"],
}


def _stats_cli(config: Path, way: str = "stats_cli") -> None:
    argv = _STATS_WAYS[way]
    args = [] if way == "python_start" else ["--config", str(config), "--json"]
    subprocess.run([sys.executable, *argv, *args], check=True, capture_output=True)


def _stats_ways_ms(config: Path, times: int) -> dict[str, float]:
    """Median wall ms of each of _STATS_WAYS, run in turn in every round."""
    out: dict[str, list[float]] = {way: [] for way in _STATS_WAYS}
    for _ in range(times):
        for way in _STATS_WAYS:
            t = time.perf_counter()
            _stats_cli(config, way)
            out[way].append((time.perf_counter() - t) * 1000)
    return {way: statistics.median(v) for way, v in out.items()}


def _scrape() -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{API_PORT}/metrics", timeout=30) as r:
        r.read()


def _object() -> Path:
    """The object the agent loads ($LASTHOP_BPF_OBJECT, else the built one)."""
    override = os.environ.get(OBJECT_ENV)
    return Path(override) if override else ensure_object()


def _expire_once(obj: libbpf.BpfObject, maps: Maps) -> float:
    """One lh_expire walk on the pinned maps, ms as the kernel timed it (asked
    for: with nothing changed and nothing due the run would not walk). The
    kernel's figure is a u32 of ns: a walk past 4.29 s (10,000,000 entries)
    saturates it, and then the syscall's wall time is taken instead."""
    maps.request_expiry()
    started = time.perf_counter()
    run = obj.program("lh_expire").test_run(bytes(14))
    wall_ms = (time.perf_counter() - started) * 1000
    if run.retval != 1:
        raise BenchError(f"lh_expire did not walk when asked (it returned {run.retval})")
    return wall_ms if run.duration_ns >= 2**32 - 1 else run.duration_ns / 1e6


@dataclass
class _Timings:
    stats_cli: float
    stats_click: float  # the same through click (`python -m lasthop.cli stats`)
    python_start: float  # `python -c pass`
    stats_inproc: float
    metrics: float
    expiry_pass: float
    top_refresh: float


def _top_refresh(controller: Any) -> None:
    """What `lasthop top` does each second: its reads, the frame and its tables."""
    from lasthop import top

    cur, sample = top.read(controller)
    top.render(top.frame(None, cur, 1.0, sample), "bench")


def _timings(
    config: Path, controller: Any, obj: libbpf.BpfObject, maps: Maps, repeat: int
) -> _Timings:
    for way in _STATS_WAYS:
        _stats_cli(config, way)  # warm: the page cache of Python's imports
    controller.stats()
    _scrape()
    ways = _stats_ways_ms(config, repeat)
    return _Timings(
        **ways,
        stats_inproc=_median_ms(controller.stats, repeat),
        metrics=_median_ms(_scrape, repeat),
        expiry_pass=statistics.median(_expire_once(obj, maps) for _ in range(3)),
        top_refresh=_median_ms(lambda: _top_refresh(controller), repeat),
    )


def _keys(first_octet: int, start: int, n: int, proto: int) -> bytes:
    """n distinct IPv4 keys client -> the VM's port 80: clients
    <first_octet>.x.y.z by i, source port 1024 + (i >> 24); ports in network order."""
    pack, dport = _KEY.pack, (80).to_bytes(2, "big")
    return b"".join(
        pack(
            bytes((first_octet, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF)),
            _VM4,
            (1024 + (i >> 24)).to_bytes(2, "big"),
            dport,
            proto,
            0,
        )
        for i in range(start, start + n)
    )


def _value(state: abi.State, last_seen: int, up: int, vm: int) -> bytes:
    e = abi.ConnEntry(
        last_seen=last_seen,
        ifindex=up,
        vm_ifindex=vm,
        packets=1,
        flags=abi.F_ENTRY_HOP_KNOWN,
        state=int(state),
    )
    ctypes.memmove(e.mac, _FW_MAC, abi.ETH_ALEN)
    return bytes(e)


def _fill(
    m: libbpf.Map,
    first_octet: int,
    n: int,
    state: abi.State,
    clock: Clock,
    up: int,
    vm: int,
    proto: int = 6,
) -> None:
    """n entries in *state*, last_seen = the data path's clock as each batch is written."""
    for start in range(0, n, _BATCH):
        count = min(_BATCH, n - start)
        keys = _keys(first_octet, start, count, proto)
        m.update_batch(keys, _value(state, clock.jiffies(), up, vm) * count, count)


@dataclass
class _Lateness:
    worst: float
    median: float
    gone: int
    inserted: int
    drained: int  # removed by the drain at their deadline (lh_expiry_due), not by a walk
    walks: int  # the agent's walks meanwhile


def _lateness(
    maps: Maps, clock: Clock, k: int, up: int, vm: int, timeout: float, grace: float
) -> _Lateness:
    """K entries in a state that times out after *timeout* s (half per table),
    polled until gone."""
    half = k // 2
    tables = (
        (maps.pending4, 12, half, abi.State.UDP_NEW),
        (maps.conns4, 13, k - half, abi.State.UDP_STREAM),
    )
    pending: dict[bytes, tuple[libbpf.Map, float]] = {}
    ex0 = maps.expiry_stats()
    for m, octet, n, state in tables:
        _fill(m, octet, n, state, clock, up, vm, proto=17)
        maps.request_expiry()  # written from here: the data path counted no change
        t0 = time.monotonic()
        keys = _keys(octet, 0, n, 17)
        for i in range(n):
            pending[keys[i * _KEY.size : (i + 1) * _KEY.size]] = (m, t0)
    late: list[float] = []
    deadline = time.monotonic() + timeout + grace
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)
        now = time.monotonic()
        for key, (m, t0) in list(pending.items()):
            if m.lookup(key) is None:
                late.append(now - t0 - timeout)
                del pending[key]
    missing = [grace] * len(pending)  # never gone: as late as the whole wait, at least
    for key, (m, _) in pending.items():
        m.delete(key)
    allv = late + missing
    ex1 = maps.expiry_stats()
    return _Lateness(
        max(allv),
        statistics.median(allv),
        len(late),
        k,
        ex1.due_expired - ex0.due_expired,
        ex1.passes - ex0.passes,
    )


def _memory(pins: Pins) -> tuple[float, dict[str, int], int]:
    """memlock of every map the agent pins over the entries the four tables hold."""
    maps: dict[str, int] = {}
    capacity = 0
    for name in MAP_NAMES:
        m = libbpf.Map.pinned(pins.path(name))
        try:
            maps[name] = m.memlock()
            if name in SIZE_KEYS:
                capacity += m.info.max_entries
        finally:
            m.close()
    return sum(maps.values()) / capacity, maps, capacity


# -- the run --------------------------------------------------------------------------


def run(
    entries: int = 1_000_000,
    rest: float = 30.0,
    repeat: int = 7,
    expiring: int = 1000,
    short_timeout: float = SHORT_TIMEOUT,
    progress: Progress = lambda msg: None,
) -> Results:
    """Measures every figure at *entries* live entries and on the empty table;
    see the module docstring. Everything it made is removed, even on Ctrl-C."""
    if os.geteuid() != 0:
        raise BenchError("needs root (CAP_BPF, CAP_NET_ADMIN): run as root")
    from lasthop import netns as lh_netns
    from lasthop.controller import Controller

    started = time.monotonic()
    name = f"lh-table-{os.getpid()}"
    pin_root = lh_netns.bpffs_root() / f"lasthop-bench-{os.getpid()}"
    pins = Pins(pin_root / name)
    tmp = Path(tempfile.mkdtemp(prefix="lasthop-bench-table-"))
    config = tmp / "lasthop.toml"
    config.write_text(_config(name, pin_root, entries, short_timeout))
    agent = AgentProcess(lasthop_argv("run", "--config", str(config)), tmp / "agent.log")
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(_private_netns(name))
        progress("starting the agent")
        try:
            agent.start(timeout=60)
        except LabError as err:
            raise BenchError(str(err)) from err
        assert agent.proc is not None
        pid = agent.proc.pid
        maps = Maps.open_pinned(pins)
        stack.callback(maps.close)
        clock = Clock.pinned(pins.path("lh_clock"))
        stack.callback(clock.close)
        controller = Controller(name, pin_root)
        stack.callback(controller.close)
        sizes = {  # the agent sized these at load: the object must match its pins
            "lh_conns4": maps.conns4.info.max_entries,
            "lh_pending4": maps.pending4.info.max_entries,
            "lh_conns": maps.conns.info.max_entries,
            "lh_pending": maps.pending.info.max_entries,
            "lh_changes": maps.changes.info.max_entries,
        }
        # lh_expire alone (the bench runs only it): the data path's programs are
        # the agent's, and verifying them again took seconds of every run
        obj = libbpf.BpfObject(
            _object(), pin_root=pins.folder, max_entries=sizes, programs=["lh_expire"]
        )
        stack.callback(obj.close)
        up, vm = (controller.links.by_name(n, "interface").index for n in ("up0", "vm0"))

        progress("empty table: timings")
        base = _timings(config, controller, obj, maps, repeat)
        progress(f"empty table: agent at rest for {rest:g} s")
        _settle(maps, clock)
        base_rest = _rest(pid, maps, rest)
        progress(f"empty table: agent with a changing table for {rest:g} s")
        base_churn = _rest(pid, maps, rest, churn=True)

        n_pending = entries // PENDING_SHARE
        n_conns = entries - n_pending
        progress(f"filling {n_conns} confirmed + {n_pending} pending entries")
        t_fill = time.monotonic()
        _fill(maps.conns4, 10, n_conns, abi.State.TCP_ESTABLISHED, clock, up, vm)
        _fill(maps.pending4, 11, n_pending, abi.State.TCP_MIDSTREAM, clock, up, vm)
        fill_s = time.monotonic() - t_fill

        progress(f"{entries} entries: agent at rest for {rest:g} s")
        _settle(maps, clock)  # the walk the fill calls for, then rest
        full_rest = _rest(pid, maps, rest)
        progress(f"{entries} entries: agent with a changing table for {rest:g} s")
        full_churn = _rest(pid, maps, rest, churn=True)
        progress(f"{entries} entries: timings")
        full = _timings(config, controller, obj, maps, repeat)
        progress(f"{entries} entries: expiry lateness of {expiring} entries")
        late = _lateness(maps, clock, expiring, up, vm, short_timeout, grace=30.0)
        stats = controller.stats()
        per_entry, memlock, capacity = _memory(pins)
        T = abi.TableCounter
        ev = maps.table_totals()
        checks: dict[str, dict[str, Any]] = {
            "live_confirmed": {"expected": n_conns, "counted": stats.confirmed.entries},
            "live_pending": {"expected": n_pending, "counted": stats.pending.entries},
            "expired_gone": {"expected": expiring, "counted": late.gone},
            # a table at rest is walked only when an entry is due: any other walk
            # in a rest window means something changed it or asked (not at rest)
            "rest_walks_not_due": {
                "expected": 0,
                "counted": sum(w.cause != "due" for w in base_rest.walks + full_rest.walks),
                "walks": [w.cause for w in base_rest.walks + full_rest.walks],
            },
            "agent_removed": {
                "expected": 0,
                "counted": ev[T.CONFIRMED_REMOVED] + ev[T.PENDING_REMOVED],
            },
        }
        # last: the flood evicts the pending fill (and would spoil the checks above)
        progress(f"{entries} entries: agent under a flood of new connections for {rest:g} s")
        before = maps.table_totals()
        flooded = _flood(pid, maps, pins, sizes, up, rest, tmp)
        after = maps.table_totals()
        gone = (T.CONFIRMED_EXPIRED, T.CONFIRMED_REMOVED)
        checks["flood_confirmed_kept"] = {
            "expected": 0,
            "counted": sum(after[c] - before[c] for c in gone),
            "syns": flooded.syns,
        }
        for c in checks.values():
            c["ok"] = c["expected"] == c["counted"]
        agent_passes = full_churn.passes
        passes_text = (
            f"agent's passes: median {statistics.median(agent_passes):.0f} ms, "
            f"max {max(agent_passes):.0f} ms ({len(agent_passes)} passes, jiffies)"
            if agent_passes
            else "no agent pass seen"
        )
        top = ", ".join(f"{k} {v:.2f} %" for k, v in list(full_rest.threads.items())[:3])
        figures = [
            Figure(
                "agent_cpu",
                "agent CPU at rest",
                full_rest.cpu_pct,
                "%",
                base_rest.cpu_pct,
                TARGETS["agent_cpu"],
                f"of which in the kernel {full_rest.sys_pct:.2f} % (empty "
                f"{base_rest.sys_pct:.2f} %); {_walks_text(full_rest.walks)}; threads: {top}",
            ),
            Figure(
                "agent_cpu_churn",
                "agent CPU, table changing",
                full_churn.cpu_pct,
                "%",
                base_churn.cpu_pct,
                None,
                f"a data-path change every 0.25 s; of which in the kernel "
                f"{full_churn.sys_pct:.2f} %; {len(full_churn.passes)} passes seen",
            ),
            Figure(
                "agent_cpu_flood",
                "agent CPU, under a flood",
                flooded.rest.cpu_pct,
                "%",
                None,
                None,
                f"{flooded.syns / flooded.seconds:,.0f} new connections/s from one CPU "
                f"({flooded.syns:,} in {flooded.seconds:.1f} s: {FLOOD_BATCH:,}-SYN test "
                f"runs of lh_bench_uplink); of which in the kernel {flooded.rest.sys_pct:.2f} %; "
                f"{_walks_text(flooded.rest.walks)}",
            ),
            Figure(
                "stats_cli",
                "`lasthop stats --json` (new process)",
                full.stats_cli,
                "ms",
                base.stats_cli,
                TARGETS["stats_cli"],
                f"table's share: {full.stats_cli - base.stats_cli:+.1f} ms over empty; "
                f"{full.stats_click / full.stats_cli:.2f}x faster than through click; "
                f"Python's own start {full.python_start:.1f} ms",
            ),
            Figure(
                "stats_click",
                "... through click (before: python -m lasthop.cli)",
                full.stats_click,
                "ms",
                base.stats_click,
                None,
                "run in turn with the line above and below, round by round",
            ),
            Figure(
                "python_start",
                "`python -c pass`",
                full.python_start,
                "ms",
                base.python_start,
                None,
                f"{sys.executable}",
            ),
            Figure(
                "stats_inproc",
                "Controller.stats() in-process",
                full.stats_inproc,
                "ms",
                base.stats_inproc,
                TARGETS["stats_inproc"],
            ),
            Figure(
                "metrics", "/metrics scrape", full.metrics, "ms", base.metrics, TARGETS["metrics"]
            ),
            Figure(
                "top_refresh",
                "a `lasthop top` refresh (in-process)",
                full.top_refresh,
                "ms",
                base.top_refresh,
                None,
                f"one stats and a sample of {TOP_SAMPLE} entries; "
                f"table's share: {full.top_refresh - base.top_refresh:+.1f} ms over empty",
            ),
            Figure(
                "expiry_pass",
                "expiry pass (lh_expire, kernel time)",
                full.expiry_pass,
                "ms",
                base.expiry_pass,
                None,
                f"{passes_text}; walks back to back with the agent's {EVERY:g} s runs "
                "(the most changes can ask for) would spend "
                f"{100 * full.expiry_pass / (full.expiry_pass + 1000 * EVERY):.1f}"
                " % of a core in it; at rest none",
            ),
            Figure(
                "expiry_lateness",
                "expired entries: worst lateness",
                late.worst,
                "s",
                None,
                TARGETS["expiry_lateness"],
                f"median {late.median:.2f} s past the {short_timeout:g} s timeout; "
                f"{late.gone} of {late.inserted} gone, {late.drained} of them by the drain "
                f"at their deadline; {late.walks} walks meanwhile",
            ),
            Figure(
                "memory_per_entry",
                "kernel memory per entry, all maps",
                per_entry,
                "B",
                None,
                TARGETS["memory_per_entry"],
                f"{sum(memlock.values()) / 2**20:.1f} MiB memlock over {capacity} entries; "
                + ", ".join(f"{n} {memlock[n] / sizes[n]:.1f} B/entry" for n in SIZE_KEYS),
            ),
        ]
        return Results(
            figures=figures,
            checks=checks,
            threads=full_rest.threads,
            settings={
                "entries": entries,
                "confirmed": n_conns,
                "pending": n_pending,
                **{SIZE_KEYS[n]: sizes[n] for n in SIZE_KEYS},
                "rest_s": rest,
                "repeat": repeat,
                "expiring": expiring,
                "short_timeout_s": short_timeout,
                "fill_s": round(fill_s, 1),
                "memlock": memlock,
            },
            environment={
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "elapsed_s": round(time.monotonic() - started, 1),
            },
        )
    finally:
        agent.stop()
        stack.close()  # our fds, then the namespace (veths, filters)
        pins.remove()  # and pin_root, left empty
        shutil.rmtree(tmp, ignore_errors=True)


# -- printing and the command ---------------------------------------------------------


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return ""
    return f"{v:.2f} {unit}" if unit in ("%", "s") else f"{v:.1f} {unit}"


def print_results(results: Results, console: Any) -> None:
    from rich.table import Table

    s = results.settings
    t = Table(title=f"lasthop table at {s['entries']:,} live entries (empty table alongside)")
    for col in ("figure", "value", "empty table", "target", "", "detail"):
        t.add_column(col, justify="right" if col in ("value", "empty table", "target") else "left")
    for f in results.figures:
        mark = "" if f.ok is None else ("[green]ok[/green]" if f.ok else "[red]MISSED[/red]")
        target = f"≤ {_fmt(f.target, f.unit)}" if f.target is not None else ""
        t.add_row(f.label, _fmt(f.value, f.unit), _fmt(f.baseline, f.unit), target, mark, f.detail)
    console.print(t)
    for name, c in results.checks.items():
        style = "green" if c["ok"] else "red"
        console.print(f"check {name}: {c['counted']} (expected {c['expected']})", style=style)
    env = results.environment
    console.print(
        f"kernel {env['kernel']}, {env['cpus']} CPUs; {s['confirmed']} confirmed + "
        f"{s['pending']} pending (filled in {s['fill_s']} s), tables "
        f"{s['table_size']} + {s['pending_table_size']}; rest {s['rest_s']:g} s, "
        f"median of {s['repeat']}; {env['elapsed_s']} s",
        style="dim",
    )
