"""The code keeps the project's own rules: ruff (lint, import order) and ruff
format over the package and the tests, and mypy strict over the package
(pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_finds_nothing() -> None:
    result = _run(str(BIN / "ruff"), "check", "--no-cache", "src", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_changes_nothing() -> None:
    result = _run(str(BIN / "ruff"), "format", "--check", "--no-cache", "src", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def mypy(_: Path) -> subprocess.CompletedProcess[str]:
    """mypy as pyproject.toml configures it (strict over src/lasthop). Its own
    cache (.mypy_cache, ignored by git) checks each module again only when it
    or what it imports changed; a fresh clone checks all of it."""
    return _run(str(BIN / "mypy"))


def test_mypy_strict_finds_nothing(background: Callable[[str], Any]) -> None:
    # started with the session (conftest.BACKGROUND): it ran beside the tests before this
    result: subprocess.CompletedProcess[str] = background("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
