"""The foreground agent: attach, serve the REST API, then follow bridge ports
and run the kernel's expiry pass until SIGTERM/SIGINT. Stopping leaves the data path attached
and the table pinned, so traffic keeps flowing and the next run adopts every
entry."""

from __future__ import annotations

import logging
import select
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from lasthop import abi
from lasthop.config import Config, parse_hostport
from lasthop.controller import Controller
from lasthop.linkwatch import UplinkWatch
from lasthop.services.health import HealthMonitor

if TYPE_CHECKING:
    from lasthop.api import ApiServer

__all__ = ["Agent"]

log = logging.getLogger("lasthop")
TICK = 0.5  # longest wait between two looks at the clock (a signal ends a wait at once)


class Agent:
    def __init__(self, controller: Controller, config: Config) -> None:
        self.controller = controller
        self.config = config
        self._stop = False
        self._bridge_index = 0
        # the signal's byte lands here (signal.set_wakeup_fd) and ends the loop's wait at once
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    def _api(self) -> ApiServer | None:
        """The API server for this config (bound, not yet serving), or None."""
        unix_path = self.config.api_socket_path(self.controller.netns)
        tcp = parse_hostport(self.config.api) if self.config.api else None
        if unix_path is None and tcp is None:
            return None
        from lasthop.api import ApiServer, create_app  # FastAPI and uvicorn only when serving

        server = ApiServer(create_app(self.controller), unix_path=unix_path, tcp=tcp)
        server.bind()
        return server

    def run(self, *, ready: Callable[[str], object] = print) -> None:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        previous_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        c = self.controller
        try:
            api = self._api()  # before attaching: a second agent in this netns stops here
        except BaseException:
            self._restore(previous, previous_wakeup)
            raise
        health: HealthMonitor | None = None
        uplinks_watch: UplinkWatch | None = None
        try:
            if self.config.bridge:
                c.links.watch()  # before start(): no port added meanwhile is missed
                self._bridge_index = c.links.by_name(self.config.bridge, "bridge").index
            attached = c.start(self.config)
            c.start_sync(self.config)  # after start: it adds F_SET_SYNC to the settings
            health = HealthMonitor(c.services)  # checks the services' VMs, follows their links
            health.start()
            uplinks_watch = UplinkWatch(c)  # an uplink's link down: replies take routing
            uplinks_watch.start()
            where = api.start() if api is not None else []
            uplinks = sorted(attached.uplinks.values())
            vm_ports = sorted(attached.vm_ports.values())
            ready(
                f"lasthop: attached in netns {c.netns}: uplinks {uplinks}, VM ports {vm_ports}"
                + (f"; API on {', '.join(where)}" if where else "")
            )
            self._loop()
            log.info("stopping: data path stays attached, table stays pinned at %s", c.pins.folder)
        finally:
            c.stop_sync()
            if uplinks_watch is not None:
                uplinks_watch.stop()
            if health is not None:
                health.stop()
            if api is not None:
                api.stop()
            self._restore(previous, previous_wakeup)

    def _restore(self, handlers: dict[signal.Signals, Any], wakeup_fd: int) -> None:
        signal.set_wakeup_fd(wakeup_fd)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        self._wake_r.close()
        self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def _loop(self) -> None:
        c = self.controller
        # the pass is lh_expire, in the kernel (docs/table.md); an entry goes at
        # most expiry_interval (plus one pass) after its timeout
        every = self.config.expiry_interval
        next_pass = time.monotonic() + every
        while not self._stop:
            if self.config.bridge:
                self._follow_bridge(timeout=TICK)
            else:
                select.select([self._wake_r], [], [], min(TICK, every))
            self._drain_wake()
            if time.monotonic() >= next_pass:
                removed = c.expire()
                if removed:
                    log.debug("expiry pass removed %d idle entries", removed)
                next_pass = time.monotonic() + every

    def _follow_bridge(self, timeout: float) -> None:
        c = self.controller
        for event, link in c.links.events(timeout, wake=self._wake_r):
            is_port = link.master == self._bridge_index and link.index not in c.attached.uplinks
            if event == "new" and is_port and link.index not in c.attached.vm_ports:
                c.attach(link, abi.Role.VM_PORT, self.config.bridge_zone)
            elif link.index in c.attached.vm_ports and (event == "del" or not is_port):
                c.forget(link.index)
