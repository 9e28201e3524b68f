"""The foreground agent: attach, then follow bridge ports and age entries
until SIGTERM/SIGINT. Stopping leaves the data path attached and the table
pinned, so traffic keeps flowing and the next run adopts every entry."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

from lasthop import abi
from lasthop.config import Config
from lasthop.controller import Controller

__all__ = ["Agent"]

log = logging.getLogger("lasthop")
AGE_EVERY = 5.0  # seconds between aging passes


class Agent:
    def __init__(self, controller: Controller, config: Config) -> None:
        self.controller = controller
        self.config = config
        self._stop = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    def run(self, *, ready: callable = print) -> None:  # type: ignore[valid-type]
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        c = self.controller
        if self.config.bridge:
            c.links.watch()  # before start(): no port added meanwhile is missed
        attached = c.start(self.config)
        ready(
            f"lasthop: attached in netns {c.netns}: uplinks {sorted(attached.uplinks.values())}, "
            f"VM ports {sorted(attached.vm_ports.values())}"
        )
        next_age = time.monotonic() + AGE_EVERY
        while not self._stop:
            if self.config.bridge:
                self._follow_bridge(timeout=0.5)
            else:
                time.sleep(0.5)
            if time.monotonic() >= next_age:
                removed = c.age(self.config.idle_timeout)
                if removed:
                    log.info("aged out %d idle entries", removed)
                next_age = time.monotonic() + AGE_EVERY
        log.info("stopping: data path stays attached, table stays pinned at %s", c.pins.folder)

    def _follow_bridge(self, timeout: float) -> None:
        c = self.controller
        bridge = c.links.by_name(self.config.bridge or "", "bridge")
        for event, link in c.links.events(timeout):
            is_port = link.master == bridge.index and link.index not in c.attached.uplinks
            if event == "new" and is_port and link.index not in c.attached.vm_ports:
                c.attach(link, abi.Role.VM_PORT, self.config.bridge_zone)
            elif link.index in c.attached.vm_ports and (event == "del" or not is_port):
                c.forget(link.index)
