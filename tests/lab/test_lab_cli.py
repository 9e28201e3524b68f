"""`lasthop lab` (run as `python -m lasthop.lab.cli`): commands and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lasthop.lab import Plan, agent
from lasthop.lab.cli import EXIT_LAB, EXIT_OK, EXIT_USAGE
from lasthop.lab.topology import lab_namespaces

pytestmark = [pytest.mark.root, pytest.mark.netns]


def _lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lasthop.lab.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_up_status_down(lab_name: str) -> None:
    """up builds the routed lab with the recipe, status describes it, down removes it."""
    up = _lab("up", "--name", lab_name, "--routed", "--recipe")
    assert up.returncode == EXIT_OK, up.stderr
    assert f"{lab_name}-fw3" in up.stdout and "Linux recipe on" in up.stdout
    status = _lab("status", "--name", lab_name, "--check")
    assert status.returncode == EXIT_OK, status.stderr
    assert "02:00:00:f0:00:02" in status.stdout and "traffic check" in status.stdout
    down = _lab("down", "--name", lab_name)
    assert down.returncode == EXIT_OK
    assert f"removed {len(Plan(lab_name).namespaces())} namespaces" in down.stdout
    assert lab_namespaces(lab_name) == []


def test_status_of_a_missing_lab_exits_3(lab_name: str) -> None:
    result = _lab("status", "--name", lab_name)
    assert result.returncode == EXIT_LAB and f"no lab {lab_name}" in result.stdout


def test_recipe_without_routed_is_a_usage_error(lab_name: str) -> None:
    result = _lab("up", "--name", lab_name, "--recipe")
    assert result.returncode == EXIT_USAGE and "--routed" in result.stderr
    assert lab_namespaces(lab_name) == []


@pytest.mark.slow
@pytest.mark.bpf
@pytest.mark.skipif(not agent.available(), reason="agent not built yet")
def test_demo_passes_and_cleans_up(lab_name: str) -> None:
    """The demo exits 0 (fails without lasthop, works with it) and leaves nothing behind."""
    result = _lab("demo", "--name", lab_name, "--mode", "bridged", "-n", "1")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert "demo passed" in result.stdout
    assert "fw2" in result.stdout and "02:00:00:f0:00:02" in result.stdout
    assert lab_namespaces(lab_name) == []
