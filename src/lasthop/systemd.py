"""systemd: the unit shipped with the package, and the notify protocol.

The protocol (sd_notify(3)) is a datagram of ``KEY=VALUE`` lines sent to
the unix socket named by ``NOTIFY_SOCKET`` (a leading ``@`` is Linux's
abstract namespace). The agent sends ``READY=1`` once every configured
interface is attached, ``STATUS=`` with the table's entry count after each
expiry pass, ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` from its main
loop, and ``RELOADING=1`` ... ``READY=1`` around a reload. Outside systemd
(no ``NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

__all__ = ["DEFAULT_CONFIG", "Notifier", "unit_text"]

DEFAULT_CONFIG = Path("/etc/lasthop/lasthop.toml")


def unit_text(config: Path = DEFAULT_CONFIG, executable: str | None = None) -> str:
    """The unit file (lasthop/data/lasthop.service) with this install's
    `lasthop` and *config* filled in."""
    exe = executable or shutil.which("lasthop") or str(Path(sys.executable).parent / "lasthop")
    template = resources.files("lasthop").joinpath("data/lasthop.service").read_text()
    return template.replace("@LASTHOP@", exe).replace("@CONFIG@", str(config))


class Notifier:
    """Messages to the service manager; a no-op without NOTIFY_SOCKET."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # the watchdog is ours when WATCHDOG_PID is unset or names this process
        ours = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_every = int(usec) / 2e6 if ours else None  # seconds between pings
        self._next_ping = 0.0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: object) -> bool:
        """One datagram: READY=1, STATUS=..., as keyword arguments; False when off."""
        if not self.address:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        text = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        try:
            self._sock.sendto(text.encode(), self.address)
        except OSError:
            return False  # the manager went away: nothing to tell
        return True

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def status(self, status: str) -> None:
        self.send(status=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) expects with RELOADING=1
        self.send(reloading=1, monotonic_usec=time.monotonic_ns() // 1000)

    def stopping(self) -> None:
        self.send(stopping=1)

    def watchdog(self, now: float | None = None) -> None:
        """WATCHDOG=1 when half the watchdog's interval has passed since the last."""
        if self.watchdog_every is None:
            return
        now = time.monotonic() if now is None else now
        if now >= self._next_ping:
            self.send(watchdog=1)
            self._next_ping = now + self.watchdog_every

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
