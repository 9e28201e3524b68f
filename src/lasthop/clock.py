"""The data path's clock: entries are stamped with jiffies (cheap in BPF), so
ages need the kernel's current jiffies and HZ. The pinned `lh_clock` program
returns jiffies when test-run; the agent learns HZ once a start and stores it
in lh_settings.hz: the running kernel's CONFIG_HZ from its build config when
that is readable (a file read, ~1 ms), else measured from jiffies counted over
0.1 s (Clock.hz)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from lasthop import libbpf

__all__ = ["Clock", "KNOWN_HZ", "config_hz"]

KNOWN_HZ = (100, 250, 300, 1000)  # the kernel's CONFIG_HZ choices
_ETH_FRAME = bytes(14)  # test run needs a frame; the program ignores it
# the running kernel's build config: built in (CONFIG_IKCONFIG_PROC), or as distributions install it
PROC_CONFIG = Path("/proc/config.gz")
BOOT_CONFIG = Path("/boot")  # config-<release>
_CONFIG_HZ = re.compile(rb"^CONFIG_HZ=(\d+)$", re.MULTILINE)


def config_hz(proc: Path = PROC_CONFIG, boot: Path = BOOT_CONFIG) -> int | None:
    """The running kernel's CONFIG_HZ from its build config (*proc*, gzipped,
    else *boot*/config-<release>), or None when neither is readable or it
    names no HZ of KNOWN_HZ (then measure it: Clock.measure_hz)."""
    import gzip  # here: the commands that only read the table never need it
    import zlib

    sources = ((proc, gzip.open), (boot / f"config-{os.uname().release}", open))
    for path, opener in sources:
        try:
            with opener(path, "rb") as f:
                text = f.read()
        except (OSError, EOFError, zlib.error):  # missing, unreadable, not gzip
            continue
        found = _CONFIG_HZ.search(text)
        if found and int(found.group(1)) in KNOWN_HZ:
            return int(found.group(1))
    return None


class Clock:
    def __init__(self, prog_fd: int, *, owned: bool = False) -> None:
        self._prog = libbpf.Program(prog_fd, "lh_clock")
        self._owned = owned

    @classmethod
    def pinned(cls, path: Path) -> Clock:
        return cls(libbpf.obj_get(path), owned=True)

    def close(self) -> None:
        if self._owned:
            os.close(self._prog.fd)
            self._owned = False

    def jiffies(self) -> int:
        """The low 32 bits of the kernel's jiffies now."""
        return self._prog.test_run(_ETH_FRAME).retval

    def hz(self) -> int:
        """The kernel's HZ: its build config's (config_hz), else measured."""
        return config_hz() or self.measure_hz()

    def measure_hz(self, interval: float = 0.1) -> int:
        """The kernel's HZ, from jiffies counted over *interval* seconds."""
        t0, j0 = time.monotonic(), self.jiffies()
        time.sleep(interval)
        t1, j1 = time.monotonic(), self.jiffies()
        rate = ((j1 - j0) & 0xFFFFFFFF) / (t1 - t0)
        return min(KNOWN_HZ, key=lambda hz: abs(hz - rate))

    @staticmethod
    def age_s(now_jiffies: int, last_seen: int, hz: int) -> float:
        """Seconds since *last_seen* (jiffies), modulo 2**32 jiffies; 0 for a
        stamp a moment after *now_jiffies* (refreshed since the clock was read)."""
        diff = (now_jiffies - last_seen) & 0xFFFFFFFF
        return diff / hz if hz and diff < 0x80000000 else 0.0

    @staticmethod
    def until_s(now_jiffies: int, due: int, hz: int) -> float:
        """Seconds from *now_jiffies* until *due* (jiffies), modulo 2**32; 0
        once it has passed."""
        return Clock.age_s(due, now_jiffies, hz)
