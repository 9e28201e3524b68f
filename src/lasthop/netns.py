"""Network namespaces and the bpffs: entering a named netns, finding our own
name, and making sure pins have a bpffs to live in.

The one home of setns(2) (Python 3.11 has no os.setns): the agent, the lab
and the tests all enter namespaces through here."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from lasthop.errors import NetnsError

__all__ = ["NetnsError", "NETNS_RUN", "setns", "enter", "current_name", "bpffs_root"]

CLONE_NEWNET = 0x40000000
BPF_FS_MAGIC = 0xCAFE4A11
NETNS_RUN = Path("/run/netns")
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, name: str) -> None:
    """Moves the calling thread into the network namespace open at *fd*
    (*name* only says which one in the error)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns({name}): {os.strerror(err)}")


def enter(name: str) -> None:
    """Moves the calling thread into the namespace *name* under /run/netns.

    Called before any other thread starts (the agent), it moves the whole
    process: all its later sockets and netlink calls."""
    path = NETNS_RUN / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name!r} not found ({path} missing)") from None
    try:
        setns(fd, name)
    finally:
        os.close(fd)


def current_name() -> str:
    """The name of this thread's netns under /run/netns, or "default" (PID 1's).

    Where PID 1's namespace is out of reach (EACCES in some containers), a
    namespace not named under /run/netns is taken to be the default one."""
    mine = os.stat("/proc/thread-self/ns/net")
    try:
        pid1: os.stat_result | None = os.stat("/proc/1/ns/net")
    except OSError:
        pid1 = None
    if pid1 is not None and mine.st_ino == pid1.st_ino:
        return "default"
    if NETNS_RUN.is_dir():
        for entry in sorted(NETNS_RUN.iterdir()):
            try:
                st = entry.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return entry.name
    return "default" if pid1 is None else f"netns-{mine.st_ino}"


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def _is_bpffs(path: Path) -> bool:
    buf = _Statfs()
    if _libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return False
    return bool((buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC)


def _other_roots() -> list[Path]:
    """Roots of other mount namespaces: PID 1's, then our ancestors'."""
    roots = [Path("/proc/1/root")]
    pid = os.getppid()
    while pid > 1:
        roots.append(Path(f"/proc/{pid}/root"))
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return roots


def bpffs_root(wanted: Path = Path("/sys/fs/bpf")) -> Path:
    """A bpffs directory shared with the rest of the host.

    `ip netns exec` gives its command a fresh /sys without the bpffs; then the
    host's one is still reachable through the root of PID 1 or, where PID 1 is
    out of reach (containers), of the process that ran us. Only when none is
    mounted do we mount one (it lasts as long as this mount namespace).
    """
    if _is_bpffs(wanted):
        return wanted
    for root in _other_roots():
        host = root / wanted.relative_to("/")
        if _is_bpffs(host):
            return host
    import subprocess  # only here: the commands that find a bpffs start without it

    wanted.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(wanted)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 or not _is_bpffs(wanted):
        raise NetnsError(f"no bpffs at {wanted} and mounting one failed: {result.stderr.strip()}")
    return wanted
