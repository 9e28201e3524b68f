"""The measurements of `lasthop bench lab`: every repetition runs each test
through every mode's path in turn, and reads the CPU the path cost (the
sender thread's time plus ksoftirqd's)."""

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
    reps: int = 5
    packets: int = 200_000  # per run of the packets test
    connections: int = 50_000  # new flows per run of the connections test
    flows: int = 1024  # established flows the packets test cycles over
    warmup: int = 5_000  # packets sent (unmeasured) before each packets run
    cpu: int = 0  # the sender's CPU
    br_netfilter: bool = False  # the hosts' bridges call the IP netfilter hooks
    churn: int = 2  # fill-and-flush rounds of every table before the first repetition
    quick: bool = False


FULL = Settings()
QUICK = Settings(reps=3, packets=40_000, connections=10_000, warmup=2_000, churn=1, quick=True)


@dataclass(frozen=True)
class Run:
    """One measured run of one test through one mode."""

    mode: str
    test: str  # "packets" or "connections"
    rep: int
    sent: int  # requests the sender wrote
    reached_vm: int  # requests the VM received (and answered)
    replies: int  # answers back at fw1
    cpu_ns: int  # the sender thread's CPU time: its own work and the path's softirq work
    softirqd_ns: int  # ksoftirqd's CPU time meanwhile (work the kernel deferred), all CPUs
    wall_ns: int

    @property
    def total_ns(self) -> int:
        return self.cpu_ns + self.softirqd_ns

    @property
    def per_request_ns(self) -> float:
        return self.total_ns / self.sent

    @property
    def lost(self) -> int:
        return self.sent - self.replies


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
    path: BenchPath, settings: Settings, test: str, rep: int, new_base: int, ksoft: list[int]
) -> Run:
    vm0, fw0 = path.counters()
    soft0 = _cpu_time_ns(ksoft)
    if test == "packets":
        out = path.send(settings.packets, flows=settings.flows, cpu=settings.cpu)
    else:
        out = path.send(settings.connections, new_base=new_base, cpu=settings.cpu)
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
            for mode in MODES:
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


def _interleaved(paths: list[BenchPath], settings: Settings, progress: Progress) -> list[Run]:
    """Every repetition runs each test through every mode in turn: A B C ... A B C ..."""
    ksoft = _softirqd_pids()
    runs: list[Run] = []
    next_flow = 0
    # A table fresh from allocation hands out its entries in address order;
    # one that has been filled and emptied does not, and inserts into it cost
    # ~10% more. A host's table is never fresh: churn every table first.
    for round_ in range(settings.churn):
        progress(f"churning the tables ({round_ + 1}/{settings.churn})")
        for path in paths:
            path.send(settings.connections, new_base=next_flow, cpu=settings.cpu)
            next_flow += settings.connections
            path.flush()
    for rep in range(settings.reps):
        progress(f"repetition {rep + 1}/{settings.reps}: {settings.packets} packets per mode")
        for path in paths:
            path.send(
                settings.warmup, flows=settings.flows, cpu=settings.cpu
            )  # every flow known, caches warm
            runs.append(_measure(path, settings, "packets", rep, -1, ksoft))
        progress(
            f"repetition {rep + 1}/{settings.reps}: {settings.connections} new connections per mode"
        )
        for path in paths:
            path.flush()
        time.sleep(SETTLE_S)
        for path in paths:
            runs.append(_measure(path, settings, "connections", rep, next_flow, ksoft))
            next_flow += settings.connections  # never a flow seen before, in any mode
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
