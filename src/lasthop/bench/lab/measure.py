"""The measurements of `lasthop bench lab`: every repetition sends one burst
of each test through every mode's path, back to back (the modes in an order
that rotates from one repetition to the next), and reads the CPU each burst
cost (the sender thread's time plus ksoftirqd's). A repetition's bursts are
the pairs the report's ratios are made of: run within a second of each
other, they share whatever the machine was doing then."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lasthop.bench.frames import quiet
from lasthop.bench.lab.paths import (
    EXTRA_MODES,
    MODES,
    BenchError,
    BenchPath,
    Progress,
    compile_tools,
    remove_paths,
)
from lasthop.bench.signals import stop_signals_interrupt

__all__ = ["FULL", "QUICK", "DEFAULT_PREFIX", "Measured", "Run", "Settings", "measure_all"]

LOCK_DIR = Path("/run/lasthop-bench")
DEFAULT_PREFIX = "lhb"
MAX_LOSS = 0.001  # a run that lost more than this share of its packets is flagged
SETTLE_S = 0.2  # after flushing a table: RCU frees the entries before the next run


@dataclass(frozen=True)
class Settings:
    reps: int = 40  # repetitions: each one burst of each test through every mode
    packets: int = 25_000  # per burst of the packets test
    connections: int = 10_000  # new flows per burst of the connections test
    flows: int = 1024  # established flows the packets test cycles over
    # frames the sender sends untimed before each burst, in the same process:
    # packets over the known flows (3 per flow: a request, its answer and a
    # request again make a flow established after a flush), new flows for
    # the connections test (caches warm, as the timed ones find them)
    warmup: int = 3_072
    conn_warmup: int = 1_000
    flush_every: int = 4  # repetitions between two flushes of every table
    cpu: int = 0  # the sender's CPU
    br_netfilter: bool = False  # the hosts' bridges call the IP netfilter hooks
    churn: int = 2  # fill-and-flush rounds of every table before the first repetition
    quick: bool = False
    extra_modes: tuple[str, ...] = ()  # diagnostic modes to run too (paths.EXTRA_MODES)
    # the packets test sends TCP ACKs of established connections (a handshake
    # per flow after every flush) instead of UDP: lasthop's TCP fast path
    tcp: bool = False

    @property
    def per_flush(self) -> int:
        """New flows a table takes between two flushes (warm-up included)."""
        return self.flush_every * (self.connections + self.conn_warmup)


FULL = Settings()
QUICK = Settings(reps=5, packets=10_000, connections=4_000, flush_every=3, churn=1, quick=True)
# conntrack's table here holds 262,144: between two flushes, stay well below
MAX_PER_FLUSH = 200_000


@dataclass(frozen=True)
class Run:
    """One measured run of one test through one mode."""

    mode: str
    test: str  # "packets" or "connections"
    rep: int
    sent: int  # requests the sender wrote, timed
    reached_vm: int  # requests the VM received (and answered), warm-up included
    replies: int  # answers back at fw1
    cpu_ns: int  # the sender thread's CPU time: its own work and the path's softirq work
    softirqd_ns: int  # ksoftirqd's CPU time meanwhile (work the kernel deferred), all CPUs
    wall_ns: int
    # requests the sender wrote before timing (same flows, same process; TCP: and handshakes)
    warmup: int = 0
    position: int = 0  # its place among the repetition's bursts of this test (0 = first)

    @property
    def total_ns(self) -> int:
        return self.cpu_ns + self.softirqd_ns

    @property
    def per_request_ns(self) -> float:
        return self.total_ns / self.sent

    @property
    def lost(self) -> int:
        return self.sent + self.warmup - self.replies


@dataclass(frozen=True)
class Measured:
    """What one bench run measured: every run, the checks, the time it took."""

    runs: list[Run]
    checks: dict[str, Any]
    elapsed_s: float


def _softirqd_pids() -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _cpu_time_ns(pids: list[int]) -> int:
    """Summed CPU time (ns, from /proc/PID/schedstat) of pids."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


@contextmanager
def _exclusive(prefix: str) -> Iterator[None]:
    """One bench lab per prefix at a time (they would share namespaces)."""
    lock = LOCK_DIR / f"lab-{prefix}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(f"a bench lab with prefix {prefix} is running ({lock})") from None
        yield


def _measure(
    path: BenchPath,
    settings: Settings,
    test: str,
    rep: int,
    position: int,
    new_base: int,
    ksoft: list[int],
    handshake: bool = False,
) -> Run:
    vm0, fw0 = path.counters()
    soft0 = _cpu_time_ns(ksoft)
    if test == "packets":
        out = path.send(
            settings.packets,
            flows=settings.flows,
            cpu=settings.cpu,
            warmup=settings.warmup,
            tcp=settings.tcp,
            handshake=settings.tcp and handshake,
        )
    else:
        out = path.send(
            settings.connections,
            new_base=new_base,
            cpu=settings.cpu,
            warmup=settings.conn_warmup,
        )
    soft = _cpu_time_ns(ksoft) - soft0
    vm1, fw1 = path.counters()
    return Run(
        path.mode.name,
        test,
        rep,
        out["sent"],
        vm1 - vm0,
        fw1 - fw0,
        out["cpu_ns"],
        soft,
        out["wall_ns"],
        out.get("warmup", 0) + out.get("handshake", 0),
        position,
    )


def measure_all(
    settings: Settings, progress: Progress = quiet, prefix: str = DEFAULT_PREFIX
) -> Measured:
    """Builds every mode's path, runs the tests interleaved, removes everything."""
    if os.geteuid() != 0:
        raise BenchError("the bench lab needs root (network namespaces, nftables, BPF)")
    if not re.fullmatch(r"[a-z][a-z0-9]{0,3}", prefix):
        raise BenchError(
            f"prefix {prefix!r}: 1-4 lowercase letters and digits, starting with a letter"
        )
    if not 0 <= settings.cpu < (os.cpu_count() or 1):
        raise BenchError(f"no CPU {settings.cpu} on this machine")
    extra = {m.name for m in EXTRA_MODES}
    unknown = [name for name in settings.extra_modes if name not in extra]
    if unknown:
        raise BenchError(f"extra mode {unknown[0]!r}: one of {', '.join(sorted(extra))}")
    if settings.per_flush > MAX_PER_FLUSH:
        raise BenchError(
            f"{settings.flush_every} repetitions of {settings.connections:,} new connections "
            f"(+ {settings.conn_warmup:,} warm-up) between two flushes: at most "
            f"{MAX_PER_FLUSH:,} (conntrack's table holds 262,144)"
        )
    started = time.monotonic()
    with (
        _exclusive(prefix),
        stop_signals_interrupt(signal.SIGTERM, signal.SIGHUP),
        tempfile.TemporaryDirectory(prefix="lasthop-bench-lab-") as tmp,
    ):
        progress("building the sender and the reflector")
        tools = compile_tools(Path(tmp))
        remove_paths(prefix, progress)
        try:
            paths: list[BenchPath] = []
            chosen = [m for m in EXTRA_MODES if m.name in settings.extra_modes]
            for mode in (*MODES, *chosen):
                progress(f"building {mode.name}: {mode.label}")
                path = BenchPath(mode, tools, prefix, settings.br_netfilter)
                paths.append(path)
                path.build()
            runs = _interleaved(paths, settings, progress)
            checks = _checks(paths, runs)
        finally:
            progress("removing the namespaces")
            remove_paths(prefix, quiet)
    return Measured(runs, checks, time.monotonic() - started)


def _order(paths: list[BenchPath], turn: int) -> list[tuple[int, BenchPath]]:
    """The modes of one burst of one test: rotated by one at every turn, so
    each mode is first, second, ... equally often (and follows each other)."""
    start = turn % len(paths)
    return list(enumerate(paths[start:] + paths[:start]))


def _flush(paths: list[BenchPath]) -> None:
    for path in paths:
        path.flush()
    time.sleep(SETTLE_S)


def _interleaved(paths: list[BenchPath], settings: Settings, progress: Progress) -> list[Run]:
    """Every repetition sends one burst of the packets test through every mode,
    then one burst of the connections test through every mode, the modes'
    order rotating; every table is flushed every flush_every repetitions."""
    ksoft = _softirqd_pids()
    runs: list[Run] = []
    next_flow = 0
    # A table fresh from allocation hands out its entries in address order;
    # one that has been filled and emptied does not, and inserts into it cost
    # ~10% more. A host's table is never fresh: churn every table first.
    for round_ in range(settings.churn):
        progress(f"churning the tables ({round_ + 1}/{settings.churn})")
        for path in paths:
            path.send(settings.per_flush, new_base=next_flow, cpu=settings.cpu)
            next_flow += settings.per_flush
        _flush(paths)
    for rep in range(settings.reps):
        flushed = rep % settings.flush_every == 0  # (or churned)
        if rep and flushed:
            _flush(paths)  # the packets bursts' warm-up learns their flows again
        progress(
            f"repetition {rep + 1}/{settings.reps}: {settings.packets:,} packets and "
            f"{settings.connections:,} new connections through each mode"
        )
        for position, path in _order(paths, rep):
            runs.append(_measure(path, settings, "packets", rep, position, -1, ksoft, flushed))
        for position, path in _order(paths, rep):
            runs.append(_measure(path, settings, "connections", rep, position, next_flow, ksoft))
            next_flow += settings.conn_warmup + settings.connections  # never a flow seen before
    return runs


def _checks(paths: list[BenchPath], runs: list[Run]) -> dict[str, Any]:
    """Evidence each mode did what it is named for: lasthop redirected the
    replies, the recipe tracked the connections; no run lost packets."""
    checks: dict[str, Any] = {}
    for path in paths:
        mine = [r for r in runs if r.mode == path.mode.name]
        lost = max((r.lost / r.sent for r in mine), default=0.0)
        entry: dict[str, Any] = {"max_loss": lost, "ok": lost <= MAX_LOSS}
        if path.mode.extra == "lasthop":
            totals = path.lasthop_stats()["totals"]
            replies = sum(r.replies for r in mine)
            entry |= {
                "redirected": totals.get("redirected", 0),
                "learned": totals.get("learned", 0),
                "replies": replies,
                # requests lh_uplink sent straight to the VM's port (the fast
                # path): without it every request crosses the bridge/routing
                "fast_to_vm": totals.get("fast_to_vm", 0),
            }
            entry["ok"] = entry["ok"] and entry["redirected"] >= replies
        elif path.mode.extra == "recipe":
            last = [r for r in mine if r.test == "connections"][-1]
            entry |= {"conntrack_entries": path.conntrack_count(), "last_connections": last.sent}
            entry["ok"] = entry["ok"] and entry["conntrack_entries"] >= last.sent
        checks[path.mode.name] = entry
    return checks
