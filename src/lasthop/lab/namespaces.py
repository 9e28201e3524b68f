"""Named network namespaces: create, list, run commands in, find and stop the
processes inside, delete; and sockets opened inside one (a thread entered
through lasthop.netns). Also `eventually`, the lab's wait for a
condition."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from lasthop import netns
from lasthop.netns import NETNS_RUN

T = TypeVar("T")

__all__ = [
    "LabError",
    "NETNS_RUN",
    "run",
    "ip_batch",
    "ns_exec",
    "sysctl",
    "existing",
    "pids_in",
    "stop_pids",
    "delete",
    "made_in",
    "open_socket",
    "NetnsExecutor",
    "eventually",
]


class LabError(RuntimeError):
    """A lab command failed; the message names the command and its stderr."""


def run(
    argv: Sequence[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise LabError(f"{' '.join(argv)}: exit {result.returncode}: {detail}")
    return result


def ip_batch(ns: str | None, lines: Iterable[str]) -> None:
    """Runs `ip` commands (one per line, without the leading `ip`) in ns, in one process."""
    text = "\n".join(lines) + "\n"
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    run(argv, input=text)


def ns_exec(
    ns: str, argv: Sequence[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", ns, *argv], input=input, check=check)


def sysctl(ns: str, settings: dict[str, str | int]) -> None:
    ns_exec(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


def existing() -> list[str]:
    """Names of all named network namespaces."""
    try:
        return sorted(p.name for p in NETNS_RUN.iterdir())
    except FileNotFoundError:
        return []


def pids_in(names: Iterable[str]) -> dict[str, list[int]]:
    """The processes inside each named namespace (what `ip netns pids` finds)."""
    ids: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(NETNS_RUN / name)
        except FileNotFoundError:
            continue
        ids[(st.st_dev, st.st_ino)] = name
    found: dict[str, list[int]] = {name: [] for name in ids.values()}
    if not ids:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        owner = ids.get((st.st_dev, st.st_ino))
        if owner is not None:
            found[owner].append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone once reaped.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
        except OSError:
            return False


def stop_pids(pids: Iterable[int], timeout: float = 2.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after timeout."""
    pending = set()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            pending.add(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if _alive(p)}
        if pending:
            time.sleep(0.02)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pending:
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.01)


def delete(names: Iterable[str]) -> None:
    """Stops every process inside, then deletes the namespaces (their links go with them)."""
    names = list(names)
    stop_pids([pid for pids in pids_in(names).values() for pid in pids])
    if names:
        run(
            ["ip", "-force", "-batch", "-"],
            input="".join(f"netns delete {n}\n" for n in names),
            check=False,
        )


def _enter(name: str) -> None:
    """Moves the calling thread (only) into namespace name."""
    try:
        netns.enter(name)
    except netns.NetnsError as err:
        raise LabError(err.strerror or str(err)) from None


class NetnsExecutor(ThreadPoolExecutor):
    """One worker thread living inside namespace ns: whatever it runs (sockets,
    subprocesses) belongs to ns."""

    def __init__(self, ns: str) -> None:
        super().__init__(
            max_workers=1, thread_name_prefix=f"netns-{ns}", initializer=_enter, initargs=(ns,)
        )
        self.ns = ns

    def sockets(self, kinds: Sequence[tuple[int, int]]) -> list[socket.socket]:
        """Opens one non-blocking socket per (family, type), inside ns."""

        def make() -> list[socket.socket]:
            out = []
            for family, kind in kinds:
                s = socket.socket(family, kind)
                s.setblocking(False)
                out.append(s)
            return out

        return self.submit(make).result()


def made_in(ns: str, make: Callable[[], T]) -> T:
    """What *make* returns, run in a thread of its own inside namespace ns:
    a socket or a device it opens belongs to ns, the caller's thread stays put."""
    box: list[T | BaseException] = []

    def run_in() -> None:
        try:
            _enter(ns)
            box.append(make())
        except BaseException as err:  # handed to the caller
            box.append(err)

    t = threading.Thread(target=run_in)
    t.start()
    t.join()
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    return result


def open_socket(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A blocking socket that lives in namespace ns (its routes, its addresses)."""
    return made_in(ns, lambda: socket.socket(family, kind, proto))


def eventually(check: Callable[[], bool], timeout: float = 8.0, every: float = 0.1) -> bool:
    """Whether *check* holds within *timeout* seconds (tried every *every* seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False
