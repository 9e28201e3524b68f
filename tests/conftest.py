"""Shared test set-up: tests marked ``root`` are skipped, with the reason,
when the suite does not run as root. Fixtures for one area live in that
area's own conftest (tests/bpf/conftest.py, ...).

Started with the session: mypy strict over the package (test_style's check,
~15 s of one core on a fresh clone) runs beside the tests collected before
it, which mostly wait on the kernel and on subprocesses; its test then reads
the verdict (`background_mypy`)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

MYPY_TEST = "test_style.py::test_mypy_strict_finds_nothing"

if TYPE_CHECKING:
    from agentlib import Sandbox


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(
        reason="needs root (CAP_NET_ADMIN, CAP_BPF): run the suite as root, e.g. sudo scripts/test"
    )
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def module_box() -> Iterator[Sandbox]:
    """One agent sandbox (tests/agentlib.py) for a whole test module: for the tests
    that share one agent (each agent start verifies its BPF programs, ~3 s) because
    they only read what it attached, or restore what they change. Everything in it
    is removed after the module's last test."""
    from agentlib import sandbox

    with sandbox() as box:
        yield box


@pytest.fixture(scope="session", autouse=True)
def background_mypy(request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str] | None]:
    """mypy started as the session starts when its test is selected (None otherwise);
    stopped at the end if that test never read it."""
    from test_style import start_mypy

    selected = any(item.nodeid.endswith(MYPY_TEST) for item in request.session.items)
    proc = start_mypy() if selected else None
    try:
        yield proc
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
