"""Interfaces of the current network namespace, through netlink (pyroute2):
names, indexes, MACs, bridge ports, and a watch for ports coming and going."""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lasthop import abi
from lasthop.errors import LinkError
from lasthop.rtevents import event_socket, queued

if TYPE_CHECKING:
    from pyroute2 import IPRoute

__all__ = ["Link", "LinkError", "Links", "link_kind", "link_kind_name"]


log = logging.getLogger("lasthop")


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: bytes
    master: int  # ifindex of the bridge it is a port of, 0 = none
    oper_up: bool = True  # operationally up (IFLA_OPERSTATE, as Links.oper_up reads it)
    kind: abi.LinkKind = abi.LinkKind.ETHERNET  # what its frames carry (link_kind below)
    info_kind: str = ""  # IFLA_INFO_KIND ("vxlan", "veth", ...; "" = a plain device)
    external: bool = False  # a tunnel in external (collect-metadata) mode
    # a veth (or netkit) whose other end is in another namespace (IFLA_LINK_NETNSID):
    # the data path can deliver into that end's ingress (bpf_redirect_peer)
    peer_elsewhere: bool = False


_OPER_DOWN = ("DOWN", "LOWERLAYERDOWN", "NOTPRESENT")
# IFLA_INFO_KIND of the devices whose other end bpf_redirect_peer can reach
# (ndo_get_peer_dev); a tap has none
PEER_KINDS = ("veth", "netkit")
# tunnel kind -> its IFLA_INFO_DATA attribute that says "external" (collect metadata)
_EXTERNAL_ATTR = {
    "vxlan": "IFLA_VXLAN_COLLECT_METADATA",
    "geneve": "IFLA_GENEVE_COLLECT_METADATA",
}


def _kind(msg: object) -> tuple[str, bool]:
    """The link's kind and, for a tunnel, whether it is external."""
    info = msg.get_attr("IFLA_LINKINFO")  # type: ignore[attr-defined]
    if info is None:
        return "", False
    kind = info.get_attr("IFLA_INFO_KIND") or ""
    data = info.get_attr("IFLA_INFO_DATA")
    attr = _EXTERNAL_ATTR.get(kind)
    if attr is None or data is None:
        return kind, False
    value = data.get_attr(attr)
    return kind, value is not None and value is not False and value != 0


# Link types (linux/if_arp.h ARPHRD_*) whose frames have no Ethernet header:
# the data path sees IP first on them (lh_uplink_l3).
L3_LINK_TYPES = {
    0xFFFE: "none (tun, WireGuard, xfrm)",  # ARPHRD_NONE
    768: "IP-in-IP",  # ARPHRD_TUNNEL
    769: "IPv6-in-IPv6",  # ARPHRD_TUNNEL6
    776: "sit",  # ARPHRD_SIT
    778: "GRE",  # ARPHRD_IPGRE
    823: "ip6gre",  # ARPHRD_IP6GRE
}
# IFLA_INFO_KIND of an Ethernet-typed link that is an overlay endpoint when
# external; a tunnel with its own remote forwards by MAC like any Ethernet link
OVERLAY_KINDS = {"vxlan": abi.LinkKind.VXLAN, "geneve": abi.LinkKind.GENEVE}


def link_kind(link_type: int, info_kind: str | None, external: bool = False) -> abi.LinkKind:
    """What a link's frames carry, from its type (ifi_type), IFLA_INFO_KIND and,
    for a tunnel, whether it is external (collect metadata)."""
    if link_type in L3_LINK_TYPES:
        return abi.LinkKind.L3
    if external:
        return OVERLAY_KINDS.get(info_kind or "", abi.LinkKind.ETHERNET)
    return abi.LinkKind.ETHERNET


def _link(msg: object) -> Link:
    get = msg.get_attr  # type: ignore[attr-defined]
    mac = get("IFLA_ADDRESS") or "00:00:00:00:00:00"
    kind, external = _kind(msg)
    return Link(
        index=msg["index"],  # type: ignore[index]
        name=get("IFLA_IFNAME"),
        mac=bytes.fromhex(mac.replace(":", ""))[:6].ljust(6, b"\0"),
        master=get("IFLA_MASTER") or 0,
        oper_up=(get("IFLA_OPERSTATE") or "UNKNOWN") not in _OPER_DOWN,
        kind=link_kind(msg["ifi_type"], kind, external),  # type: ignore[index]
        info_kind=kind,
        external=external,
        peer_elsewhere=kind in PEER_KINDS and get("IFLA_LINK_NETNSID") is not None,
    )


def link_kind_name(value: int) -> str:
    """iface_cfg.link_kind as /v1/interfaces shows it: "ethernet", "vxlan", ..."""
    try:
        return abi.LinkKind(value).name.lower()
    except ValueError:
        return str(value)


class Links:
    """Netlink access; one socket for queries, an optional one for events.

    pyroute2 (a quarter of a second of imports) is loaded, and its IPRoute
    made, when netlink is first asked: a command that never asks (stats, show)
    starts without it. IPRoute opens a socket in each thread that uses it, in
    that thread's namespace, so making it late changes no namespace."""

    def __init__(self) -> None:
        self._iproute: IPRoute | None = None
        self._query = threading.Lock()  # the agent, the API and the health checks share _ipr
        self._events: socket.socket | None = None
        self._marshal: Any = None

    @property
    def _ipr(self) -> IPRoute:
        """pyroute2's IPRoute, made on first use (callers hold self._query)."""
        if self._iproute is None:
            from pyroute2 import IPRoute

            self._iproute = IPRoute()
        return self._iproute

    def close(self) -> None:
        if self._iproute is not None:
            self._iproute.close()
        if self._events is not None:
            self._events.close()

    def all(self) -> list[Link]:
        with self._query:
            return [_link(m) for m in self._ipr.get_links()]

    def oper_up(self) -> dict[str, bool]:
        """Interface name -> operationally up."""
        with self._query:
            msgs = self._ipr.get_links()
        return {
            m.get_attr("IFLA_IFNAME"): (m.get_attr("IFLA_OPERSTATE") or "UNKNOWN") not in _OPER_DOWN
            for m in msgs
        }

    def by_name(self, name: str, what: str = "interface") -> Link:
        for link in self.all():
            if link.name == name:
                return link
        raise LinkError(f"{what} {name!r} not found in this network namespace")

    def by_index(self, index: int) -> Link | None:
        for link in self.all():
            if link.index == index:
                return link
        return None

    def ports(self, bridge: Link) -> list[Link]:
        return [link for link in self.all() if link.master == bridge.index]

    def watch(self) -> None:
        """Starts receiving link events (see :meth:`events`)."""
        from pyroute2.netlink.rtnl import RTMGRP_LINK
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        self._events = event_socket(RTMGRP_LINK)
        self._marshal = MarshalRtnl()

    def events(
        self, timeout: float, wake: socket.socket | None = None
    ) -> Iterator[tuple[str, Link]]:
        """("new"|"del", link) for link changes within *timeout* seconds; returns
        early when *wake* becomes readable.

        "del" also comes when a port leaves its bridge (an AF_BRIDGE RTM_DELLINK).
        When the kernel dropped events (ENOBUFS), every current link comes as "new"."""
        assert self._events is not None, "call watch() first"
        ready, _, _ = select.select([self._events, *([wake] if wake else [])], [], [], timeout)
        if self._events not in ready:
            return
        for data in queued(self._events):
            if data is None:
                log.warning("link events were lost (ENOBUFS): rescanning every link")
                for link in self.all():
                    yield "new", link
                continue
            for msg in self._marshal.parse(data):
                event = msg.get("event")
                if event == "RTM_NEWLINK":
                    yield "new", _link(msg)
                elif event == "RTM_DELLINK":
                    yield "del", _link(msg)
