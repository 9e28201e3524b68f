"""Shared test set-up: tests marked ``root`` are skipped, with the reason,
when the suite does not run as root. Fixtures for one area live in that
area's own conftest (tests/bpf/conftest.py, ...).

Started with the session (BACKGROUND): work of a test that only reads the
tree and keeps a core busy for seconds -- mypy strict over the package
(~15 s on a fresh clone), the wheel built from a copy of the sources and
installed in a fresh venv (~12 s), the fuzzer's two objects (~4 s each) --
runs beside the tests collected before it, which mostly wait on the kernel
and on subprocesses; the test then takes its result (the `background`
fixture) and asserts on it as before."""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# work started with the session, two at a time, when a selected test needs it:
# name -> (what selects it: part of a test's node id, "module:function(tmp folder)")
BACKGROUND = {
    "mypy": ("test_style.py::test_mypy_strict_finds_nothing", "test_style:mypy"),
    "wheel": ("test_packaging.py::test_the_wheel", "test_packaging:wheel_installed"),
    "fuzz_object": ("fuzz/test_fuzz.py::test_programs_keep", "fuzz.runner:fuzz_object"),
    "broken_object": ("fuzz/test_fuzz.py::test_a_flipped", "fuzz.runner:broken_object"),
}

if TYPE_CHECKING:
    from agentlib import Sandbox


# where tests leave traces on the host; a run must end with none it did not find there
TRACE_DIRS = (
    Path("/run/netns"),  # network namespaces
    Path("/sys/fs/bpf"),  # pins, pin roots (the benches' own)
    Path("/sys/fs/bpf/lasthop"),  # the default pin root's namespace folders
    Path("/run/lasthop"),  # agents' API sockets and services state
    Path("/run/lasthop-lab"),  # labs' state
)
_TRACES = pytest.StashKey[set[str]]()
_LEFT = pytest.StashKey[list[str]]()


def _traces() -> set[str]:
    found = set()
    for folder in TRACE_DIRS:
        try:
            found |= {str(folder / name) for name in os.listdir(folder)}
        except OSError:  # not there (or no bpffs): nothing of ours either
            continue
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    # A suite started in the background by a non-interactive shell (`pytest &`
    # in a script) inherits SIGINT ignored, and an ignored signal stays ignored
    # across exec: the commands the tests press Ctrl-C on (`lasthop top`,
    # `bench lab`) would then never see KeyboardInterrupt and be killed after
    # the test's wait. A handled signal is reset to the default at exec.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.geteuid() == 0:
        session.config.stash[_TRACES] = _traces()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """A run that leaves a namespace, a pin or an agent's file it did not find
    fails (exit 1), naming each in the summary."""
    before = session.config.stash.get(_TRACES, None)
    if before is None:
        return
    left = sorted(_traces() - before)
    session.config.stash[_LEFT] = left
    if left and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    left = terminalreporter.config.stash.get(_LEFT, [])
    if left:
        terminalreporter.section("left behind by this run", red=True)
        for trace in left:
            terminalreporter.line(trace)


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
def background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Any]]:
    """background(name): what BACKGROUND's job *name* returned. Each job a
    selected test needs starts as the session starts (in a thread: they wait
    on subprocesses); one no selected test needed runs when asked for. The
    session's end waits for any job no test read."""
    jobs: dict[str, Future[Any]] = {}

    def folder(work: Callable[[Path], Any]) -> Path:
        return tmp_path_factory.mktemp(work.__name__)

    def get(name: str) -> Any:
        if name in jobs:
            return jobs[name].result()
        work = _job(BACKGROUND[name][1])
        return work(folder(work))

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, (selects, where) in BACKGROUND.items():
            if any(selects in item.nodeid for item in request.session.items):
                work = _job(where)
                jobs[name] = pool.submit(work, folder(work))
        yield get


def _job(where: str) -> Callable[[Path], Any]:
    module, name = where.split(":")
    job: Callable[[Path], Any] = getattr(importlib.import_module(module), name)
    return job
