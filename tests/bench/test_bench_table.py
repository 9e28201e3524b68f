"""`lasthop bench table` runs end to end on the real agent (a tiny table and a
short rest: this checks the method's plumbing and self-checks, not the
figures; no target is asserted). It runs once, through `lasthop bench table
--json`: the tests read its results and what the CLI printed of them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from benchcli import CliRun, invoke

from lasthop import abi
from lasthop.bench import table

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns, pytest.mark.slow]

# the smallest rest and timeout the CLI takes: a walk and the drain are still seen in each
SMALL = {"entries": 5000, "rest": 1.0, "repeat": 2, "expiring": 20, "short_timeout": 1.0}
FIGURES = [
    "agent_cpu",
    "agent_cpu_churn",
    "agent_cpu_flood",
    "stats_cli",
    "stats_click",
    "python_start",
    "stats_inproc",
    "metrics",
    "top_refresh",
    "expiry_pass",
    "expiry_lateness",
    "memory_per_entry",
]


ARGS = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]


@pytest.fixture(scope="module")
def cli_run() -> CliRun:
    return invoke(table, ["table", "--json", *ARGS])


@pytest.fixture(scope="module")
def results(cli_run: CliRun) -> table.Results:
    assert isinstance(cli_run.results, table.Results)
    return cli_run.results


def test_every_figure_is_measured(results: table.Results) -> None:
    """Every figure has a value (and, where it has one, its empty-table
    baseline); timings and memory are positive, CPU and lateness not negative."""
    assert [f.name for f in results.figures] == FIGURES
    for f in results.figures:
        assert f.value >= 0, f.name
        if f.unit in ("ms", "B"):
            assert f.value > 0, f.name
    assert all(
        results.figure(n).baseline is not None
        for n in (
            "agent_cpu", "stats_cli", "stats_click", "python_start", "stats_inproc", "metrics",
            "top_refresh", "expiry_pass",
        )
    )  # fmt: skip
    assert results.threads, "the agent's threads were read"


def test_targets_are_the_issues(results: table.Results) -> None:
    """CPU ≤ 1 %, stats and /metrics ≤ 100 ms, lateness ≤ 5 s, memory ≤ 150 B;
    ok follows the figure either way."""
    targeted = {f.name: f.target for f in results.figures if f.target is not None}
    assert targeted == table.TARGETS
    for f in results.figures:
        assert f.ok is None if f.target is None else f.ok == (f.value <= f.target)
    assert results.ok == all(f.ok is not False for f in results.figures)


def test_the_table_kept_its_live_entries(results: table.Results) -> None:
    """Every live entry written is still there, the short-timeout ones are all
    gone, the agent removed nothing, and a flood of new connections (it ran:
    the data path took its SYNs) took no confirmed entry."""
    assert all(c["ok"] for c in results.checks.values()), results.checks
    assert results.checks["flood_confirmed_kept"]["syns"] >= table.FLOOD_BATCH


def test_nothing_is_left_behind(results: table.Results) -> None:
    """The run's namespace, pins and agent are gone."""
    assert not Path(f"/run/netns/lh-table-{os.getpid()}").exists()
    assert not Path(f"/sys/fs/bpf/lasthop-bench-{os.getpid()}").exists()


def test_json_output(cli_run: CliRun) -> None:
    """--json passes the options to the run and prints every figure of it with
    its target and ok; exit code 0 (ran)."""
    out = cli_run.output
    assert out.exit_code == 0, out.output
    assert {k: v for k, v in cli_run.kwargs.items() if k != "progress"} == SMALL
    doc = json.loads(out.stdout)
    assert [f["name"] for f in doc["figures"]] == FIGURES
    assert doc["targets"] == table.TARGETS
    assert doc == json.loads(json.dumps(cli_run.results.to_json()))


def _stats(passes: int, started: int, request: int, changes: int, next_due: int) -> abi.ExpiryStats:
    return abi.ExpiryStats(
        passes=passes, started=started, request=request, changes=changes, next_due=next_due
    )


@pytest.mark.parametrize(
    ("before", "after", "cause"),
    [
        # the walk the rest window is for: its moment (next_due) has come
        ((3, 100, 7, 50, 900), (4, 900, 7, 50, 2000), "due"),
        # next_due wraps past 2^32 jiffies: still due
        ((3, 100, 7, 50, 0xFFFFFF00), (4, 0x10, 7, 50, 2000), "due"),
        # a new token: asked (the bench's own request, a flush...)
        ((3, 100, 7, 50, 900), (4, 200, 8, 50, 2000), "asked"),
        # the data path changed the table
        ((3, 100, 7, 50, 900), (4, 200, 7, 51, 2000), "changed"),
        ((3, 100, 7, 50, 900), (4, 950, 8, 51, 2000), "asked+changed+due"),
        # none of the three: the kernel walked when nothing called for it
        ((3, 100, 7, 50, 900), (4, 200, 7, 50, 2000), "unexplained"),
    ],
)
def test_a_walk_says_what_called_for_it(
    before: tuple[int, ...], after: tuple[int, ...], cause: str
) -> None:
    """Each walk seen in a rest window is put down to what called for it, from
    lh_expiry before and after: a new request token, a moved change count, or
    its start at or past the previous walk's next_due."""
    assert table._walk_cause(_stats(*before), _stats(*after)).startswith(cause)


class _ScriptedMaps:
    """lh_expiry as the bench reads it, one scripted snapshot a look."""

    TOKEN = 77

    def __init__(self, snapshots: list[abi.ExpiryStats]) -> None:
        self.snapshots = snapshots
        self.looks = 0
        self.expiry_request = self

    def expiry_stats(self) -> abi.ExpiryStats:
        snap = self.snapshots[min(self.looks, len(self.snapshots) - 1)]
        self.looks += 1
        return snap

    def request_expiry(self) -> None:
        pass

    def lookup(self, key: bytes) -> bytes:
        return self.TOKEN.to_bytes(8, "little")


class _Clock:
    def jiffies(self) -> int:
        return 300


def test_settle_waits_for_the_end_of_the_walk_it_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A walk under way at the asking ends (passes moves, the old token); the
    next shows the bench's token from its start: _settle returns only once
    that walk has ended, so no walk runs into the rest window measured next."""
    monkeypatch.setattr(time, "sleep", lambda s: None)
    old, new = 11, _ScriptedMaps.TOKEN

    def st(passes: int, started: int, finished: int, request: int) -> abi.ExpiryStats:
        return abi.ExpiryStats(passes=passes, started=started, finished=finished, request=request)

    maps = _ScriptedMaps(
        [
            st(5, 250, 240, old),  # seen: a walk under way (began at 250)
            st(6, 250, 330, old),  # it ended: passes moved, the token is not ours
            st(6, 550, 330, new),  # the next walk began: our token, not ended
            st(6, 550, 330, new),
            st(7, 550, 625, new),  # ended
        ]
    )
    table._settle(maps, _Clock())  # type: ignore[arg-type]
    assert maps.looks == 5
