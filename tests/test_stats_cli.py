"""`lasthop stats` the short way (lasthop.stats_cli, issue 8): it takes the
options the click command documents and nothing else (anything else, --help
included, goes to click), and prints exactly what the click command
(`python -m lasthop.cli stats`) prints on the same pins, text and --json."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from agentlib import ROOT_MARKS, BridgedSite, Sandbox, sandbox
from lasthop import cli, stats_cli

F = TypeVar("F", bound=Callable[..., Any])
SHORT = [sys.executable, "-m", "lasthop", "stats"]  # lasthop._entry, as the console script
CLICK = [sys.executable, "-m", "lasthop.cli", "stats"]
OTHER_MAC = "02:00:5e:00:01:0a"


def _root(fn: F) -> F:
    for mark in ROOT_MARKS:
        fn = mark(fn)
    return fn


def test_the_short_way_takes_exactly_the_click_commands_options() -> None:
    """Every option `lasthop stats --help` lists (but --help) is one the short way parses."""
    documented = {o for p in cli.stats.params for o in p.opts}
    assert documented == set(stats_cli.OPTIONS)


@pytest.mark.parametrize(
    ("argv", "parsed"),
    [
        ([], {}),
        (["--json"], {"json": True}),
        (["--netns", "h1", "--json"], {"netns": "h1", "json": True}),
        (["--netns=h1"], {"netns": "h1"}),
        (["--config", "/etc/lasthop.toml"], {"config": "/etc/lasthop.toml"}),
        (["--netns", "a", "--netns", "b"], {"netns": "b"}),  # click: the last one
        # click's to judge (help, or its error message):
        (["--help"], None),
        (["--jsn"], None),
        (["--json=1"], None),
        (["--netns"], None),
        (["--netns", "--json"], None),
        (["--netns="], None),
        (["--config", "/"], None),  # a directory
        (["extra"], None),
        (["-v"], None),
    ],
)
def test_parse(argv: list[str], parsed: dict[str, object] | None) -> None:
    """The short way parses click's forms of the documented options, and leaves anything
    else to click (None)."""
    assert stats_cli.parse(argv) == parsed


@pytest.mark.parametrize("argv", [["--help"], ["--jsn"], ["--netns"], ["extra"]])
def test_help_and_usage_errors_are_clicks(argv: list[str]) -> None:
    """--help and a bad option print what the click command prints, with its exit code."""
    short = subprocess.run([*SHORT, *argv], capture_output=True, text=True, check=False)
    click = subprocess.run([*CLICK, *argv], capture_output=True, text=True, check=False)
    assert short.returncode == click.returncode
    assert (short.stdout, short.stderr) == tuple(
        s.replace("python -m lasthop.cli", "python -m lasthop")
        for s in (click.stdout, click.stderr)
    )


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox() as b:
        yield b


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module", params=["learned", "refused"])
def hops(request: pytest.FixtureRequest, module_box: Sandbox) -> Iterator[tuple[str, BridgedSite]]:
    """A bridged site whose agent learned connections in both tables ("learned"), or
    refused the firewall's MAC, counted in untrusted_hops ("refused"): which, and the
    site. The text and --json tests of one kind share it (they only read)."""
    site = BridgedSite(module_box)
    config = module_box.logs / f"hops-{request.param}.toml"
    allowed = [OTHER_MAC] if request.param == "refused" else [OTHER_MAC, site.fw_mac]
    config.write_text(f'[[uplink]]\nname = "fw0"\nallow_last_hops = {json.dumps(allowed)}\n')
    agent = None
    try:
        site.serve()
        agent = module_box.agent("--config", str(config), "--bridge", "br0", netns=site.host)
        site.exchange("tcp", n=3)  # works either way: the bridge forwards it
        site.exchange("udp", n=2)
        yield request.param, site
    finally:
        if agent is not None:
            agent.stop()
        site.close()


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
@_root
def test_both_ways_print_the_same(hops: tuple[str, BridgedSite], as_json: bool) -> None:
    """With connections learned in both tables (or the firewall's MAC refused, counted
    in untrusted_hops), the short way prints what the click command prints (the two
    ages within a second: time passes between the runs)."""
    kind, site = hops
    argv = ["--netns", site.host.name, *(["--json"] if as_json else [])]
    for _ in range(10):  # an expiry pass may land between two runs: then again
        before, click, after = (
            _run([*SHORT, *argv]),
            _run([*CLICK, *argv]),
            _run([*SHORT, *argv]),
        )
        for r in (before, click, after):
            assert r.returncode == 0, r.stderr
        if not as_json:
            if before.stdout == after.stdout:
                assert click.stdout == before.stdout
                assert "confirmed: " in click.stdout and "fw0" in click.stdout
                return
            continue
        got = [json.loads(r.stdout) for r in (before, click, after)]
        ages = [[g["table"].pop(k) for g in got] for k in ("last_pass_age_s", "next_due_s")]
        if got[0] == got[2]:
            assert got[1] == got[0]
            for values in ages:  # None until the first expiry pass, then seconds
                if None in values:
                    assert values == [None, None, None]
                else:
                    assert max(values) - min(values) < 1.0, values
            assert "fw0" in got[1]["interfaces"]
            if kind == "refused":
                assert got[1]["untrusted_hops"]["fw0"][site.fw_mac] > 0
            else:
                assert got[1]["totals"]["learned"] > 0
            return
    pytest.fail("the counters moved between every two runs")


@_root
def test_nothing_attached_is_the_same_error(box: Sandbox) -> None:
    """Where no agent pinned anything, both ways fail alike: same message, exit 3."""
    ns = box.host()
    short, click = (_run([*way, "--netns", ns.name, "--json"]) for way in (SHORT, CLICK))
    assert short.returncode == click.returncode == 3
    assert short.stderr == click.stderr and "no data path pinned" in short.stderr
