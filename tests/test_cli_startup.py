"""What `lasthop` loads to start (issue 8: `stats --json` in a new process
within 100 ms). The commands that read the pinned maps, and every command's
--help, import none of the heavy packages — pyroute2, pydantic and the config
model, fastapi and uvicorn, rich (until a table is printed), scapy, the lab,
the benches — which were most of the 1.1 s `stats --json` took.

Checked on the modules a real start imports (`python -X importtime` lists
them on stderr), not on a timing: a regression fails here, not by chance.
`lasthop bench table` reports the time itself (figure stats_cli)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentlib import Sandbox

HEAVY = (
    "pyroute2",
    "pydantic",
    "pydantic_core",
    "fastapi",
    "starlette",
    "uvicorn",
    "rich",
    "scapy",
    "prometheus_client",
    "lasthop.config",
    "lasthop.agent",
    "lasthop.api",
    "lasthop.metrics",
    "lasthop.services",
    "lasthop.lab",
    "lasthop.bench",
)
# What the short way of `stats` (lasthop.stats_cli) also goes without: click, the
# package's modules that read maps for the agent, and (--json: rich is not loaded)
# the standard library that click, dataclasses and the controller pull in.
LEAN = (
    "click",
    "lasthop.cli",
    "lasthop.libbpf",
    "lasthop.controller",
    "lasthop.datapath",
    "lasthop.connections",
    "lasthop.clock",
)
LEAN_JSON = ("typing", "dataclasses", "inspect", "logging", "socket")
SCRIPT = Path(sys.executable).parent / "lasthop"  # the console script pip installed


def _imports(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Runs this interpreter with ARGV; its result and every module it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    return result, imported


def _start(
    *argv: str, heavy: tuple[str, ...] = HEAVY
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Runs this interpreter with ARGV; its result and the *heavy* modules it imported."""
    result, imported = _imports(*argv)
    found = sorted(m for m in imported if any(m == h or m.startswith(h + ".") for h in heavy))
    return result, found


def test_importing_the_cli_loads_nothing_heavy() -> None:
    """`import lasthop.cli` (what the console script does first) loads no heavy package."""
    result, heavy = _start("-c", "import lasthop.cli")
    assert result.returncode == 0, result.stderr[-2000:]
    assert heavy == []


@pytest.mark.parametrize("command", ["stats", "show", "flush", "detach", "run", "top"])
@pytest.mark.parametrize("entry", ["python -m lasthop", "lasthop"])
def test_a_commands_help_loads_nothing_heavy(entry: str, command: str) -> None:
    """`lasthop COMMAND --help` loads no heavy package, by either entry point."""
    if entry == "lasthop" and not SCRIPT.exists():
        pytest.skip(f"no console script at {SCRIPT} (pip install -e .)")
    head = ["-m", "lasthop"] if entry == "python -m lasthop" else [str(SCRIPT)]
    result, heavy = _start(*head, command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Usage: {entry} {command} [OPTIONS]" in result.stdout
    assert heavy == []


def test_the_subcommand_groups_still_load_when_named() -> None:
    """The groups in their own packages (service, lab, bench) are listed and run as before."""
    result = subprocess.run(
        [sys.executable, "-m", "lasthop", "--help"], capture_output=True, text=True, check=True
    )
    for group in ("service", "lab", "bench"):
        assert f"  {group} " in result.stdout
        argv = [sys.executable, "-m", "lasthop", group, "--help"]
        assert subprocess.run(argv, capture_output=True, check=False).returncode == 0, group


@pytest.fixture(scope="module")
def attached(module_box: Sandbox) -> str:
    """The namespace of one agent (uplink up0, VM port vm0) that the tests below
    share: each only runs a reading command next to it. Its name."""
    ns = module_box.host()
    module_box.agent("--uplink", "up0", "--vm-port", "vm0", netns=ns)
    return ns.name


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("command", ["stats", "show"])
def test_reading_the_pinned_maps_loads_nothing_heavy(attached: str, command: str) -> None:
    """`lasthop stats --json` and `show --json` next to a running agent answer, and load
    no heavy package: no pyroute2, no config model, no rich."""
    result, heavy = _start("-m", "lasthop", command, "--netns", attached, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    json.loads(result.stdout)
    assert heavy == []


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_stats_without_a_config_file_loads_no_toml_parser(attached: str) -> None:
    """`lasthop stats --netns NAME --json` reads no file, so it loads no tomllib
    (with --config it does: the file is TOML)."""
    result, imported = _imports("-m", "lasthop", "stats", "--netns", attached, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tomllib" not in imported


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_stats_the_short_way_loads_no_click_nor_what_it_needs(attached: str, as_json: bool) -> None:
    """`lasthop stats [--json]` (lasthop._entry -> lasthop.stats_cli) imports no click,
    libbpf binding or controller, and with --json no typing, dataclasses, inspect, logging
    or socket either: what made its start 180-300 ms (the text output loads rich, which
    needs those)."""
    argv = ["-m", "lasthop", "stats", "--netns", attached, *(["--json"] if as_json else [])]
    result, found = _start(*argv, heavy=LEAN + (HEAVY + LEAN_JSON if as_json else ()))
    assert result.returncode == 0, result.stderr[-2000:]
    assert found == []
