"""The code keeps the project's own rules: ruff (lint, import order) and ruff
format over the package and the tests, and mypy strict over the package
(pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def start_mypy() -> subprocess.Popen[str]:
    """mypy as pyproject.toml configures it (strict over src/lasthop). Its own
    cache (.mypy_cache, ignored by git) checks each module again only when it
    or what it imports changed; a fresh clone checks all of it."""
    return subprocess.Popen(
        [str(BIN / "mypy")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_mypy_strict_finds_nothing(background_mypy: subprocess.Popen[str] | None) -> None:
    # started with the session (conftest.background_mypy): it ran beside the tests before this
    proc = background_mypy or start_mypy()
    output, _ = proc.communicate()
    assert proc.returncode == 0, output
