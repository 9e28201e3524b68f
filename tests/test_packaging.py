"""The package as an operator installs it: a wheel built from a clean copy of
the sources (compiling the BPF object: building from source works) carries
the object and the unit; `pip install` of it into a fresh virtual
environment gives a `lasthop` that attaches, loading the wheel's object, on
a PATH with no compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentlib import ROOT_MARKS, Sandbox, sandbox
from lasthop.lab.runner import AgentProcess

pytestmark = [*ROOT_MARKS, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
TOOLS = ("ip", "tc", "mount")  # what the agent may run; no clang, no llc, no cc


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox() as b:
        yield b


def _run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert result.returncode == 0, f"{argv}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result.stdout


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path


def wheel_installed(tmp: Path) -> Installed:
    """A wheel built from a clean copy of the sources (no object: its build
    compiles one) and pip-installed in a fresh venv; started with the session
    (conftest.BACKGROUND), beside the tests before this one."""
    src = tmp / "src"
    junk = shutil.ignore_patterns("__pycache__", "*.o", "*.sha256", "*.egg-info")
    shutil.copytree(REPO / "src", src / "src", ignore=junk)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    assert not (src / "src/lasthop/bpf/lasthop.bpf.o").exists()
    pip = Path(sys.executable).parent / "pip"
    _run(pip, "wheel", "-q", "--no-deps", "-w", tmp / "dist", src)
    (wheel,) = (tmp / "dist").glob("lasthop-*.whl")

    # a fresh environment with nothing in it, into which this pip installs the
    # wheel and its dependencies (seeding the venv's own pip took 12 s, and
    # installing with it 27 s against 13 s; nothing is byte-compiled ahead)
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    _run(pip, "--python", venv / "bin/python", "install", "-q", "--no-compile", wheel)
    return Installed(wheel, venv)


def test_the_wheel_carries_the_object_and_runs_without_a_compiler(
    box: Sandbox, tmp_path: Path, background: Callable[[str], Any]
) -> None:
    installed: Installed = background("wheel")
    wheel, venv = installed.wheel, installed.venv
    names = zipfile.ZipFile(wheel).namelist()
    assert {"lasthop/bpf/lasthop.bpf.o", "lasthop/bpf/lasthop.bpf.sha256"} <= set(names)
    assert "lasthop/data/lasthop.service" in names

    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    path = f"{venv / 'bin'}:{tools}"
    assert shutil.which("clang", path=path) is None and shutil.which("cc", path=path) is None
    env = {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}

    lasthop = str(venv / "bin/lasthop")
    assert _run(lasthop, "--version", env=env).startswith("lasthop ")
    assert "ExecStart=" + lasthop in _run(lasthop, "systemd-unit", env=env)

    ns = box.host()
    agent = AgentProcess(
        [lasthop, "run", "--netns", ns.name, "--uplink", "up0", "--vm-port", "vm0"],
        box.logs / "wheel-agent.log",
        env=env,
    )
    box.agents.append(agent)
    assert agent.start().startswith("lasthop: attached")
    assert ns.tc_program("up0") == "lh_uplink"
    where = _run(
        venv / "bin/python",
        "-c",
        "from lasthop import build; print(build.OBJECT, build.is_current())",
        env=env,
    ).split()
    assert where == [
        str(next(venv.glob("lib/python*/site-packages/lasthop/bpf/lasthop.bpf.o"))),
        "True",
    ]
    assert os.path.getsize(where[0]) > 0
