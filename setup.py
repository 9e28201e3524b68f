"""Builds the BPF object into the wheel: `pip wheel .` (or `python -m build`)
compiles bpf/lasthop.c with clang, so `pip install` of the wheel needs no
compiler. Everything else is in pyproject.toml."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithObject(build_py):
    """build_py that compiles the BPF object first (lasthop/build.py, loaded by
    path: the package's own dependencies are not installed at build time)."""

    def run(self) -> None:
        spec = importlib.util.spec_from_file_location(
            "lasthop_build", ROOT / "src" / "lasthop" / "build.py"
        )
        assert spec is not None and spec.loader is not None
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        if not build.is_current():
            path = build.build()
            self.announce(f"compiled the BPF object {path}", level=2)
        super().run()


setup(cmdclass={"build_py": BuildWithObject})
