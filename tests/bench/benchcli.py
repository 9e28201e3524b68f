"""One run of a bench through its CLI, shared by every test of a module (the
run is the expensive part; the tests read its results and its printed report)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner, Result

from lasthop.bench.cli import bench


@dataclass
class CliRun:
    """`lasthop bench ARGS` run once: what the CLI printed and exited with, the
    keyword arguments it gave the bench's run(), and the results run() returned."""

    output: Result
    kwargs: dict[str, Any]
    results: Any


def invoke(module: ModuleType, args: list[str], run: Callable[..., Any] | None = None) -> CliRun:
    """Invokes `lasthop bench ARGS` with *module*.run wrapped so the results it
    returns are kept; *run* stands in for the real run() when given (a test of
    the CLI's printing and exit codes over results already measured)."""
    real = run or module.run
    seen: list[tuple[dict[str, Any], Any]] = []

    def spy(**kwargs: Any) -> Any:
        seen.append((kwargs, real(**kwargs)))
        return seen[-1][1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "run", spy)
        output = CliRunner().invoke(bench, args)
    assert len(seen) == 1, output.output
    kwargs, results = seen[0]
    return CliRun(output, kwargs, results)
