"""A redis-server of our own on a unix socket: the store of the HA lab, of
`lasthop bench sync` and of the sync tests (one way to start and stop it).
No TCP port, no persistence: stop() then start() again brings the store
back empty, at the same path."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from lasthop.errors import SyncError

__all__ = ["RedisServer"]

START_TIMEOUT_S = 10.0  # from the process's start to its socket listening


class RedisServer:
    """redis-server listening on ``<folder>/redis.sock``; its output goes to
    *log* (appended) or nowhere. A context manager: stopped on exit."""

    def __init__(self, folder: Path, log: Path | None = None) -> None:
        self.folder = folder
        self.log = log
        self.socket = folder / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> int:
        """Starts the server and waits until its socket exists; returns its
        PID. SyncError when redis-server is not installed or does not start."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise SyncError("needs redis-server (Debian package redis-server: scripts/setup)")
        argv = [exe, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        argv += ["--dir", str(self.folder), "--save", "", "--appendonly", "no"]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SyncError(f"redis-server did not listen on {self.socket}")
            time.sleep(0.01)
        return self.proc.pid

    def stop(self) -> None:
        """The store goes down (SIGTERM, then SIGKILL after 10 s); its socket is removed."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
