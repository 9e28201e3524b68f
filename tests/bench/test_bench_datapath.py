"""The datapath benchmark runs end to end (tiny settings: this checks the
method's plumbing and self-checks, not the figures)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lasthop.bench import datapath
from lasthop.bench.cli import bench

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

SMALL = {"repeat": 2000, "rounds": 2, "inserts": 300, "table": 1024, "memory_entries": 4096}


def test_run_measures_every_figure() -> None:
    """Every path gets a positive time, the empty program is the unit, and the
    memory figure is memlock over max_entries of a real table."""
    results = datapath.run(**SMALL)
    names = [f.name for f in results.figures]
    assert names == [
        "empty",
        "reply_hit_v4",
        "reply_hit_v6",
        "uplink_refresh",
        "reply_miss",
        "insert_room",
        "insert_full",
        "refresh_single",
    ]
    assert results.figure("empty").ratio == 1.0
    assert all(f.ns > 0 for f in results.figures)
    assert {f.name for f in results.figures if f.target} == {
        "reply_hit_v4",
        "reply_hit_v6",
        "uplink_refresh",
        "insert_full",
    }
    m = results.memory
    assert m is not None and m.entries == 4096
    assert m.per_entry == m.memlock_bytes / 4096
    assert 40 + 40 < m.per_entry < 1024  # at least key + value per entry
    json.dumps(results.to_json())


def test_cli_json_and_exit_codes() -> None:
    """`bench datapath --json` prints the figures; exit 0 even when a target
    is missed, unless --strict."""
    args = [
        "datapath",
        "--json",
        "--repeat",
        "2000",
        "--rounds",
        "1",
        "--inserts",
        "200",
        "--table",
        "1024",
        "--memory-entries",
        "0",
    ]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["memory"] is None
    assert {f["name"] for f in report["figures"]} >= {"reply_hit_v4", "insert_full"}
    strict = CliRunner().invoke(bench, [*args, "--strict"])
    assert strict.exit_code == (0 if json.loads(strict.stdout)["ok"] else 1)
