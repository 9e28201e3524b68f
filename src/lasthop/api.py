"""The REST API: a FastAPI app built over the controller, and the uvicorn
server that runs it in a background thread of `lasthop run`.

The handlers are thin: each calls one controller method and returns its JSON
(the shapes of `lasthop show --json` and `stats --json`, docs/cli.md). By
default the API listens on a unix socket, /run/lasthop/<netns>.sock;
``api = "HOST:PORT"`` adds a TCP listener in the agent's network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from uvicorn.protocols.http.h11_impl import H11Protocol

from lasthop import metrics
from lasthop.apiauth import READ_METHODS, Refused, Tokens
from lasthop.connections import Connection, ConnFilter, json_array
from lasthop.controller import Attached, InterfaceInfo, Stats
from lasthop.endpoint import format_endpoint
from lasthop.errors import ApiError, ConfigError, LasthopError
from lasthop.logs import event
from lasthop.services.api import router as services_router
from lasthop.services.manager import ServiceManager

if TYPE_CHECKING:
    from lasthop.sync import SyncStatus

__all__ = ["ApiError", "ApiServer", "ControllerApi", "create_app"]

API_VERSION = "v1"
SOCKET_MODE = 0o660
log = logging.getLogger("lasthop")
Reload = Callable[[], dict[str, object]]  # the agent's reload: its result as JSON


class ControllerApi(Protocol):
    """What the API needs of the controller."""

    netns: str

    def attached_now(self) -> Attached: ...
    def iter_connections(
        self, where: ConnFilter | None = None, *, limit: int = 0
    ) -> Iterator[Connection]: ...
    def stats(self) -> Stats: ...
    def sync_status(self) -> SyncStatus: ...
    def sync_resync(self) -> int: ...
    def flush(self) -> int: ...
    def flush_out_of_scope(self) -> int: ...
    def interfaces(self) -> list[InterfaceInfo]: ...
    @property
    def services(self) -> ServiceManager: ...


def create_app(
    controller: ControllerApi, *, tokens: Tokens | None = None, reload: Reload | None = None
) -> FastAPI:
    """The app; every handler is one controller call. *tokens*: who may call
    over TCP (lasthop.apiauth); *reload*: what POST /v1/reload runs."""
    app = FastAPI(title="lasthop", version=API_VERSION, docs_url="/docs", redoc_url=None)
    registry = metrics.registry(controller)
    app.state.tokens = tokens or Tokens([])

    @app.middleware("http")
    async def _owner(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Refuses what the caller may not do; logs every write with who and what."""
        server = request.scope.get("server")
        unix = server is None or server[1] is None
        client = request.scope.get("client")
        peer = (
            f"{client[0]}" if unix and client else (f"{client[0]}:{client[1]}" if client else None)
        )
        try:
            caller = app.state.tokens.caller(
                method=request.method,
                authorization=request.headers.get("authorization"),
                peer=peer,
                unix=unix,
            )
        except Refused as refused:
            event(
                log, "api_refused", level=logging.WARNING, peer=peer or "unix socket",
                method=request.method, path=request.url.path, status=refused.status,
                reason=str(refused),
            )  # fmt: skip
            headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
            return JSONResponse({"detail": str(refused)}, refused.status, headers=headers)
        response = await call_next(request)
        if request.method.upper() not in READ_METHODS:
            what: dict[str, Any] = {"method": request.method, "path": request.url.path}
            if request.url.query:
                what["query"] = request.url.query  # e.g. which VMs a DELETE removes
            event(log, "api_write", who=caller.who, **what, status=response.status_code)
        return response

    @app.exception_handler(LasthopError)
    async def _error(request: Request, err: LasthopError) -> JSONResponse:
        """Each error class knows its status (lasthop.errors)."""
        return JSONResponse({"detail": str(err)}, status_code=err.http_status)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """The agent is up; what it has attached."""
        attached = controller.attached_now()
        return {
            "status": "ok",
            "netns": controller.netns,
            "uplinks": sorted(attached.uplinks.values()),
            "vm_ports": sorted(attached.vm_ports.values()),
        }

    @app.get(f"/{API_VERSION}/connections")
    def connections(
        limit: int = Query(0, ge=0, description="at most this many, newest first; 0 = all"),
        client: str | None = Query(None, description="client address or prefix"),
        server: str | None = Query(None, description="server address or prefix"),
        uplink: str | None = None,
        vm_port: str | None = None,
        state: str | None = None,
        mac: str | None = None,
    ) -> StreamingResponse:
        """The per-connection table (as `show --json`, with its filters),
        streamed: one entry at a time, never the whole table in memory."""
        where = ConnFilter(client, server, uplink, vm_port, state, mac)  # FilterError: 422

        conns = controller.iter_connections(where, limit=limit)
        # the first entry is read here, so that nothing attached or a kernel error
        # still becomes its HTTP status: once streaming starts, the status is sent
        first = next(conns, None)
        rows = itertools.chain([] if first is None else [first], conns)
        return StreamingResponse(
            json_array(c.to_json() for c in rows), media_type="application/json"
        )

    @app.get(f"/{API_VERSION}/stats")
    def stats() -> dict[str, object]:
        """Counters per reason, in total and per interface, and the table (as `stats --json`)."""
        return controller.stats().to_json()

    @app.post(f"/{API_VERSION}/flush")
    def flush(out_of_scope: bool = False) -> dict[str, int]:
        """Removes every entry; with ?out_of_scope=true only those the scope rules now pass."""
        if out_of_scope:
            return {"flushed": controller.flush_out_of_scope()}
        return {"flushed": controller.flush()}

    @app.post(f"/{API_VERSION}/reload")
    def reload_config() -> dict[str, object]:
        """Re-reads the config and applies the difference (docs/operations.md);
        a bad config is refused (422) and the running one stays."""
        if reload is None:
            raise ConfigError("this agent cannot reload: it was not started by `lasthop run`")
        return reload()

    @app.get(f"/{API_VERSION}/interfaces")
    def interfaces() -> list[dict[str, object]]:
        """The interfaces the data path is configured for."""
        return [i.to_json() for i in controller.interfaces()]

    @app.get(f"/{API_VERSION}/sync")
    def sync_status() -> dict[str, object]:
        """The sync's figures (as `sync status --json`); 503 when sync is off."""
        return controller.sync_status().to_json()

    @app.post(f"/{API_VERSION}/sync/resync")
    def sync_resync() -> dict[str, bool]:
        """Asks the agent for a snapshot of its table on the stream."""
        controller.sync_resync()
        return {"requested": True}

    @app.get("/metrics")
    def prometheus() -> Response:
        """Prometheus text format, read from the maps on each scrape."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(services_router(controller))  # /v1/services: lasthop.services.api
    return app


class _PeerProtocol(H11Protocol):
    """uvicorn's h11 protocol that names a unix socket's caller by its uid
    (SO_PEERCRED) in the request's scope ("client": ("uid N", pid))."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
            self.client = (f"uid {uid}", pid)


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


class _Server(uvicorn.Server):
    """uvicorn's server, stopping as soon as it is asked.

    uvicorn looks at ``should_exit`` every 0.1 s and, stopping, waits 0.1 s
    more for its connections whatever they do: about 0.2 s of each agent's
    stop. Here :meth:`wake` ends the main loop's wait at once, and a stop
    with no request under way (idle keep-alive connections close when asked)
    skips the fixed pause; a request still under way gets uvicorn's own
    graceful shutdown, unchanged.
    """

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """From any thread, after setting should_exit: the main loop sees it now."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(wake.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # on_tick renews the Date header when counter % 10 == 0: here once a second
        while not await self.on_tick(0):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connection
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # an idle one closes now, a busy one after its response
        for _ in range(20):  # connection_lost comes a loop turn or two after the close
            if not self.server_state.connections and not self.server_state.tasks:
                break
            await asyncio.sleep(0.005)
        else:
            await super().shutdown(sockets)  # a request under way: uvicorn's graceful wait
            return
        for server in self.servers:
            await server.wait_closed()
        await self.lifespan.shutdown()


class ApiServer:
    """uvicorn serving the app in a daemon thread.

    :meth:`bind` first (before the agent changes anything, so a second agent
    in the same namespace stops early), then :meth:`start` and :meth:`stop`.
    The thread must be started after the process entered its network
    namespace: threads inherit the namespace of the thread that creates them.
    """

    def __init__(
        self,
        app: FastAPI,
        *,
        unix_path: Path | None = None,
        tcp: tuple[str, int] | None = None,
        group: str | None = None,
    ) -> None:
        self.app = app
        self.unix_path = unix_path
        self.group = group
        self.tcp = tcp
        self.addresses: list[str] = []
        self._sockets: list[socket.socket] = []
        self._unix_ino = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def bind(self) -> None:
        try:
            if self.unix_path is not None:
                sock = _bind_unix(self.unix_path, self.group)
                self._sockets.append(sock)
                self._unix_ino = self.unix_path.stat().st_ino
                self.addresses.append(f"unix:{self.unix_path}")
            if self.tcp is not None:
                self._sockets.append(_bind_tcp(*self.tcp))
                self.addresses.append(f"http://{format_endpoint(*self.tcp)}")
        except BaseException:
            self.stop()
            raise

    def start(self, timeout: float = 10.0) -> list[str]:
        """Serves in the background; returns the addresses once they answer."""
        if not self._sockets:
            self.bind()
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,  # writes are logged by the app, with who (api_write)
            http=_PeerProtocol,
        )
        self._server = _Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": self._sockets},
            name="lasthop-api",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ApiError(f"the API server did not start on {', '.join(self.addresses)}")
            time.sleep(0.01)
        return self.addresses

    def stop(self) -> None:
        """Stops serving and removes the unix socket (if it is still ours)."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._server.wake()
            self._thread.join(timeout=5.0)
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self.unix_path is not None and self._unix_ino:
            try:
                if self.unix_path.stat().st_ino == self._unix_ino:
                    self.unix_path.unlink()
            except FileNotFoundError:
                pass
            self._unix_ino = 0
