"""`lasthop top` in a pseudo-terminal next to a real agent: it draws its
live view, and the counters that real traffic moved show up in it.

    fw (10.0.0.1) ── fw0 ┐
                         br0 (host: lasthop run --uplink fw0 --bridge br0;  lasthop top)
    vm (10.0.0.2) ── vm0 ┘
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

from agentlib import ROOT_MARKS, BridgedSite, Sandbox
from lasthop.lab.runner import lasthop_argv

pytestmark = ROOT_MARKS
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
ROWS, COLS = 60, 160
CELL = r"[ │]+"  # between two cells of a table row


class Terminal:
    """A command on a pseudo-terminal of ROWS x COLS; what it wrote, without escapes."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLS), "LINES": str(ROWS)}
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.raw = b""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Reads until *pattern* appears in the output (or fails, showing the output)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found:
                return found
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:  # the command ended: no more to read
                    break
        raise AssertionError(f"{pattern!r} not shown; the terminal had:\n{self.text[-4000:]}")

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            # read on while it ends: a frame it is still writing (or the
            # terminal reset after Ctrl-C) blocks in write() on a full pty
            # that nobody reads, and it would never exit
            deadline = time.monotonic() + 10
            while self.proc.poll() is None and time.monotonic() < deadline:
                self._drain(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        while self._drain(0.1):
            pass
        os.close(self.master)
        return self.proc.returncode

    def _drain(self, timeout: float) -> bool:
        """Reads what the terminal holds, waiting up to *timeout*; False when
        there was nothing (or the command's side is closed)."""
        with contextlib.suppress(OSError):
            if select.select([self.master], [], [], timeout)[0]:
                chunk = os.read(self.master, 65536)
                self.raw += chunk
                return bool(chunk)
        return False


def test_top_draws_its_view_and_shows_the_counters_real_traffic_moved(box: Sandbox) -> None:
    """Under a pseudo-terminal `lasthop top` renders (no error, exit 0 on Ctrl-C);
    after UDP exchanges through the bridge it shows learned on the uplink and
    redirected on the VM port among the counters that moved, and the
    firewall's MAC among the top last hops."""
    site = BridgedSite(box)
    term: Terminal | None = None
    try:
        site.serve()
        box.agent("--uplink", "fw0", "--bridge", "br0", netns=site.host)
        argv = lasthop_argv("top", "--netns", site.host.name, "--interval", "0.2")
        term = Terminal(argv)
        term.wait_for(r"counters that moved")  # the first frame is drawn
        site.exchange("udp", n=3)
        term.wait_for(rf"learned{CELL}fw0{CELL}\+[1-9]\d*{CELL}\d+")
        term.wait_for(rf"redirected{CELL}vm0{CELL}\+[1-9]\d*{CELL}\d+")
        term.wait_for(re.escape(site.fw_mac) + rf"{CELL}fw0{CELL}\d+%{CELL}~\d+")
        code = term.close()
        assert code == 0, term.text[-4000:]
        assert "Traceback" not in term.text
    finally:
        if term is not None and term.proc.poll() is None:
            term.close()
        site.close()
