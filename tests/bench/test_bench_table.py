"""`lasthop bench table` runs end to end on the real agent (a tiny table and a
short rest: this checks the method's plumbing and self-checks, not the
figures; no target is asserted). It runs once, through `lasthop bench table
--json`: the tests read its results and what the CLI printed of them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from benchcli import CliRun, invoke

from lasthop.bench import table

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns, pytest.mark.slow]

# the smallest rest and timeout the CLI takes: a walk and the drain are still seen in each
SMALL = {"entries": 5000, "rest": 1.0, "repeat": 2, "expiring": 20, "short_timeout": 1.0}
FIGURES = [
    "agent_cpu",
    "agent_cpu_churn",
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
    gone, and the agent removed nothing."""
    assert all(c["ok"] for c in results.checks.values()), results.checks


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
