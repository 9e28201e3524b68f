"""The REST API's listening sockets (a unix socket, a TCP listener), bound
before the agent attaches anything -- a second agent in the same namespace
stops there -- and without FastAPI: the agent imports that (lasthop.api, ~0.4 s)
while the kernel verifies its programs, and serves on these sockets after."""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

from lasthop.endpoint import format_endpoint
from lasthop.errors import ApiError

__all__ = ["SOCKET_MODE", "Listeners"]

SOCKET_MODE = 0o660


def _bind_unix(path: Path, group: str | None = None) -> socket.socket:
    """A listening-ready unix socket at *path*; a stale file is replaced, a live
    one (another agent answering) is an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ApiError(f"cannot listen on {path}: it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # left by an agent that died
        else:
            raise ApiError(f"another lasthop agent answers on {path}: stop it first")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except OSError as err:
        sock.close()
        raise ApiError(f"cannot listen on {path}: {err.strerror}") from None
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ApiError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as err:
        sock.close()
        raise ApiError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


class Listeners:
    """The API's sockets: :meth:`bind` them, serve on :attr:`sockets`
    (lasthop.api.ApiServer), :meth:`close` them (the unix socket's file too,
    if it is still ours)."""

    def __init__(
        self,
        *,
        unix_path: Path | None = None,
        tcp: tuple[str, int] | None = None,
        group: str | None = None,
    ) -> None:
        self.unix_path = unix_path
        self.tcp = tcp
        self.group = group
        self.addresses: list[str] = []
        self.sockets: list[socket.socket] = []
        self._unix_ino = 0

    def bind(self) -> None:
        try:
            if self.unix_path is not None:
                sock = _bind_unix(self.unix_path, self.group)
                self.sockets.append(sock)
                self._unix_ino = self.unix_path.stat().st_ino
                self.addresses.append(f"unix:{self.unix_path}")
            if self.tcp is not None:
                self.sockets.append(_bind_tcp(*self.tcp))
                self.addresses.append(f"http://{format_endpoint(*self.tcp)}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        if self.unix_path is not None and self._unix_ino:
            try:
                if self.unix_path.stat().st_ino == self._unix_ino:
                    self.unix_path.unlink()
            except FileNotFoundError:
                pass
            self._unix_ino = 0
