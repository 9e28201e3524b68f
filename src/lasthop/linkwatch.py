"""The uplinks' link state, followed for the data path (issue 11, link loss).

When an uplink's link goes down, replies sent into it are lost; the data
path instead lets them take ordinary routing (another uplink, a default
route) while the flag F_IFACE_LINK_DOWN is on the uplink's config, and
counts them `hop_down`. The entries stay: when the link returns the flag
goes and their replies follow their last hops again. A thread of the agent
sets and clears the flag from the kernel's link events (netlink), so the
change is applied within milliseconds and costs nothing while links are
steady; it reads the links once at start (a link that went down while no
agent ran).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING

from lasthop.links import Links

if TYPE_CHECKING:
    from lasthop.controller import Controller

__all__ = ["UplinkWatch"]

log = logging.getLogger("lasthop")
WAIT = 1.0  # s: longest wait for events before looking at the stop flag


class UplinkWatch:
    """Follows the attached uplinks' operational state into the data path."""

    def __init__(self, controller: Controller) -> None:
        self._c = controller
        self._links = Links()  # its own netlink sockets: this runs in its own thread
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Subscribes to link events, applies the current state, then follows it."""
        self._links.watch()  # before the scan: no change between them is missed
        for link in self._links.all():
            self._apply(link.index)
        self._thread = threading.Thread(target=self._run, name="lasthop-links", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join()
        self._links.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for _event, link in self._links.events(WAIT, wake=self._wake_r):
                    self._apply(link.index)
            except Exception:  # the agent goes on without it rather than stop forwarding
                log.exception("following the uplinks' link state failed; stopped following")
                return

    def _apply(self, ifindex: int) -> None:
        """The uplink's state as the kernel has it now (an event's own copy may
        be a bridge's partial view: "del" also comes when a port leaves its
        bridge); gone counts as down."""
        if ifindex in self._c.attached_now().uplinks:
            link = self._links.by_index(ifindex)
            self._c.set_link_down(ifindex, link is None or not link.oper_up)
