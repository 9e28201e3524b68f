"""The foreground agent: attach, serve the REST API, then follow bridge ports
and run the kernel's expiry pass until SIGTERM/SIGINT; SIGHUP (or `lasthop
reload`, POST /v1/reload) re-reads the config and applies the difference.
Stopping leaves the data path attached and the table pinned, so traffic keeps
flowing and the next run adopts every entry. Under systemd it tells the
manager when it is ready, its entry count and that it is alive
(lasthop.systemd)."""

from __future__ import annotations

import contextlib
import logging
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from lasthop import abi
from lasthop import reload as reload_mod
from lasthop.apiauth import Tokens
from lasthop.config import Config, parse_hostport
from lasthop.controller import Controller
from lasthop.errors import ConfigError, LasthopError
from lasthop.failover import FailoverWatch
from lasthop.linkwatch import UplinkWatch
from lasthop.logs import event
from lasthop.services.health import HealthMonitor
from lasthop.systemd import Notifier

if TYPE_CHECKING:
    from fastapi import FastAPI

    from lasthop.api import ApiServer

__all__ = ["Agent"]

log = logging.getLogger("lasthop")
TICK = 0.5  # longest wait between two looks at the clock (a signal ends a wait at once)


class Agent:
    """*source* re-reads the config for a reload (the file and the command
    line's flags on top); None: this agent cannot reload."""

    def __init__(
        self,
        controller: Controller,
        config: Config,
        *,
        source: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.controller = controller
        self.config = config
        self.source = source
        self.notifier = notifier or Notifier()
        self._app: FastAPI | None = None
        self._reload_lock = threading.Lock()
        self._reload_asked = False
        self._stop = False
        self._bridge_index = 0
        # the signal's byte lands here (signal.set_wakeup_fd) and ends the loop's wait at once
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_asked = True
        else:
            self._stop = True

    def _api(self) -> ApiServer | None:
        """The API server for this config (bound, not yet serving), or None."""
        unix_path = self.config.api_socket_path(self.controller.netns)
        tcp = parse_hostport(self.config.api) if self.config.api else None
        if unix_path is None and tcp is None:
            return None
        from lasthop.api import ApiServer, create_app  # FastAPI and uvicorn only when serving

        tokens = Tokens.load(self.config.api_tokens)  # ConfigError names the file and the entry
        self._app = create_app(self.controller, tokens=tokens, reload=self._reload_json)
        server = ApiServer(
            self._app, unix_path=unix_path, tcp=tcp, group=self.config.api_socket_group
        )
        server.bind()
        return server

    # -- reload ------------------------------------------------------------
    def reload(self) -> reload_mod.Result:
        """Re-reads the config and applies the difference; a bad config raises
        (ConfigError naming the keys) and the running config stays."""
        with self._reload_lock:
            if self.source is None:
                raise ConfigError("this agent has no config to re-read")
            self.notifier.reloading()
            try:
                new = self.source()
                tokens = Tokens.load(new.api_tokens) if self._app is not None else None
                result = self.controller.reload(new)
                if tokens is not None and self._app is not None:
                    self._app.state.tokens = tokens
                assert self.controller.config is not None
                self.config = self.controller.config
                for key in result.kept:
                    event(
                        log, "reload_kept", level=logging.WARNING, key=key,
                        reason="cannot change while running: restart the agent to change it",
                    )  # fmt: skip
                event(
                    log, "reload", changed=",".join(result.changed) or "nothing",
                    kept=",".join(result.kept), attached=",".join(result.attached),
                    detached=",".join(result.detached),
                )  # fmt: skip
            except LasthopError as err:
                event(log, "reload_refused", level=logging.ERROR, error=str(err))
                raise
            finally:  # READY after the log lines: whoever waits for it finds them
                if self.notifier.enabled:
                    self.notifier.ready(self._status())
            return result

    def _reload_json(self) -> dict[str, object]:
        return self.reload().to_json()

    def _status(self) -> str:
        """systemd's STATUS: the table's entries and what is attached (no table walk)."""
        c = self.controller
        attached = c.attached_now()
        try:
            entries = f"{c.entry_count()} entries"
        except LasthopError as err:
            entries = f"entries unknown ({err})"
        return f"{entries}; {len(attached.uplinks)} uplinks, {len(attached.vm_ports)} VM ports"

    def run(self, *, ready: Callable[[str], object] = print) -> None:
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {s: signal.signal(s, self._on_signal) for s in signals}
        previous_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        c = self.controller
        try:
            api = self._api()  # before attaching: a second agent in this netns stops here
        except BaseException:
            self._restore(previous, previous_wakeup)
            raise
        health: HealthMonitor | None = None
        uplinks_watch: UplinkWatch | None = None
        failover: FailoverWatch | None = None
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
            failover = FailoverWatch(c)  # a firewall's address moved: replies follow it
            failover.start()
            where = api.start() if api is not None else []
            uplinks = sorted(attached.uplinks.values())
            vm_ports = sorted(attached.vm_ports.values())
            ready(
                f"lasthop: attached in netns {c.netns}: uplinks {uplinks}, VM ports {vm_ports}"
                + (f"; API on {', '.join(where)}" if where else "")
            )
            if self.notifier.enabled:
                self.notifier.ready(self._status())
            self._loop()
            self.notifier.stopping()
            event(log, "stop", pins=str(c.pins.folder), data_path="stays attached")
        finally:
            self.notifier.close()
            c.stop_sync()
            if uplinks_watch is not None:
                uplinks_watch.stop()
            if failover is not None:
                failover.stop()
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
        next_pass = time.monotonic() + self.config.expiry_interval
        while not self._stop:
            self.notifier.watchdog()  # from this loop: a hung loop is a dead agent
            every = self.config.expiry_interval  # a reload may change it
            if self.config.bridge:
                self._follow_bridge(timeout=TICK)
            else:
                select.select([self._wake_r], [], [], min(TICK, every))
            self._drain_wake()
            if self._reload_asked:
                self._reload_asked = False
                with contextlib.suppress(LasthopError):  # logged: the running config stays
                    self.reload()
            if time.monotonic() >= next_pass:
                removed = c.expire()
                if removed:
                    log.debug("expiry pass removed %d idle entries", removed)
                next_pass = time.monotonic() + every
                if self.notifier.enabled:
                    self.notifier.status(self._status())

    def _follow_bridge(self, timeout: float) -> None:
        c = self.controller
        for change, link in c.links.events(timeout, wake=self._wake_r):
            is_port = link.master == self._bridge_index and link.index not in c.attached.uplinks
            if change == "new" and is_port and link.index not in c.attached.vm_ports:
                c.attach(link, abi.Role.VM_PORT, self.config.bridge_zone)
            elif link.index in c.attached.vm_ports and (change == "del" or not is_port):
                c.forget(link.index)
