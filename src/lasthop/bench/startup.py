"""`lasthop bench startup`: what loading the data path costs each agent start,
with every program (as before issue lazyl3) and without those the agent does
not load at start (AGENT_SKIPS: LATER_PROGRAMS -- lh_uplink_l3, loaded at the
first L3 attach, lh_uplink_out at a routed host's first uplink -- and the
benchmarks' lh_reference and lh_empty), side by side in one run, in turn.

    round i:   load A: BpfObject(all programs)          pins under
               load B: BpfObject(skip AGENT_SKIPS)      /sys/fs/bpf/lasthop-bench-startup-<pid>
               (which of A and B goes first alternates; both adopt the same pins, as a restart)
    then:      Datapath(...) whole, and each of LATER_PROGRAMS' load alone (its first attach)
    once:      every program's "processed N insns" (the verifier's log, level 4)

Figures: the median wall time of each load, the ratio B / A, the Datapath
construction and each later load's time. Needs root (bpffs); attaches nothing.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lasthop import abi, libbpf
from lasthop.datapath import AGENT_SKIPS, LATER_PROGRAMS, Datapath, Pins, _object, table_sizes

__all__ = ["Results", "run", "print_results"]

PIN_ROOT = Path("/sys/fs/bpf")


@dataclass
class Results:
    rounds: int
    all_s: list[float] = field(default_factory=list)  # load with every program
    lazy_s: list[float] = field(default_factory=list)  # load as the agent: without AGENT_SKIPS
    datapath_s: list[float] = field(default_factory=list)  # Datapath(...) whole
    # each of LATER_PROGRAMS loaded later, alone
    later_s: dict[str, list[float]] = field(default_factory=dict)
    processed: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return statistics.median(self.lazy_s) / statistics.median(self.all_s)

    @property
    def ok(self) -> bool:
        return self.ratio < 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "load_all_s": self.all_s,
            "load_without_l3_s": self.lazy_s,
            "datapath_s": self.datapath_s,
            "later_load_s": self.later_s,
            "ratio_without_l3_over_all": self.ratio,
            "processed_insns": self.processed,
        }


def _timed(fn: Callable[[], libbpf.BpfObject]) -> float:
    t0 = time.perf_counter()
    obj = fn()
    elapsed = time.perf_counter() - t0
    obj.close()
    return elapsed


def run(rounds: int = 5, progress: Callable[[str], None] = lambda _: None) -> Results:
    path = _object()
    pins = Pins(PIN_ROOT / f"lasthop-bench-startup-{os.getpid()}")
    os.makedirs(pins.folder, exist_ok=True)
    sizes = table_sizes(abi.CONN_TABLE_SIZE)
    sizes["lh_changes"] = os.sysconf("SC_PAGE_SIZE")  # as an agent without sync

    def load_all() -> libbpf.BpfObject:
        return libbpf.BpfObject(path, pin_root=pins.folder, max_entries=sizes)

    def load_lazy() -> libbpf.BpfObject:
        return libbpf.BpfObject(path, pin_root=pins.folder, max_entries=sizes, skip=AGENT_SKIPS)

    res = Results(rounds)
    try:
        progress("warm-up: creating the pins")
        _timed(load_lazy)
        for i in range(rounds):
            progress(f"round {i + 1}/{rounds}")
            order = [(load_all, res.all_s), (load_lazy, res.lazy_s)]
            for load, into in order if i % 2 == 0 else reversed(order):
                into.append(_timed(load))
            t0 = time.perf_counter()
            dp = Datapath(pins, table_size=abi.CONN_TABLE_SIZE, changes_size=sizes["lh_changes"])
            res.datapath_s.append(time.perf_counter() - t0)
            try:
                for name in LATER_PROGRAMS:  # what each one's first attach adds
                    t0 = time.perf_counter()
                    dp.program_later(name)
                    res.later_s.setdefault(name, []).append(time.perf_counter() - t0)
            finally:
                dp.close()
        progress("verifier statistics")
        with libbpf.BpfObject(path, verifier_stats=True) as obj:
            res.processed = dict(sorted(obj.processed.items(), key=lambda kv: -kv[1]))
    finally:
        pins.remove()
    return res


def print_results(res: Results, console: Console) -> None:
    med = statistics.median
    t = Table(title=f"data path load at agent start ({res.rounds} rounds, in turn)")
    for col in ("figure", "median", "runs"):
        t.add_column(col)

    def row(name: str, values: list[float]) -> None:
        t.add_row(name, f"{med(values):.3f} s", " ".join(f"{v:.3f}" for v in values))

    row("load, every program (before)", res.all_s)
    row(f"load, as the agent (without {', '.join(AGENT_SKIPS)})", res.lazy_s)
    row("Datapath(...) whole (now)", res.datapath_s)
    for name, values in res.later_s.items():
        row(f"{name} at its first attach", values)
    t.add_row("ratio now / before", f"{res.ratio:.2f}", "")
    console.print(t)
    p = Table(title="verifier: processed insns per program")
    p.add_column("program")
    p.add_column("processed insns", justify="right")
    for name, n in res.processed.items():
        p.add_row(name, f"{n:,}")
    at_start = sum(n for name, n in res.processed.items() if name not in AGENT_SKIPS)
    p.add_row("total at agent start", f"{at_start:,}")
    console.print(p)
