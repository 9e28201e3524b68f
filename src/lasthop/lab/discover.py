"""The lab as it really is, read from its namespaces (`ip -j -d addr`,
`ip -j netns list-id`, `ip -j route get`): every namespace with its
interfaces, MACs and addresses, and every veth pair between two of them.
lasthop.lab.drawing draws it; nothing here comes from the plan but the list
of namespaces to read, so a drawing shows what was built, not what was meant.

A way is the namespaces a packet crosses: `route_way` asks each namespace's
routing table for the next IP hop, and fills in the L2 namespaces between
two IP hops (the switch, a bridged host) by the shortest way over the links.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from lasthop.lab import plan as P
from lasthop.lab.namespaces import LabError, run

__all__ = ["Iface", "Node", "Link", "Topology", "discover", "role_of", "route_way", "ROLES"]

# Left to right in a drawing; also the order nodes and links are listed in.
ROLES = ("client", "firewall", "switch", "host", "vm")
MAX_ROUTE_HOPS = 8  # a way longer than this is a routing loop


@dataclass(frozen=True)
class Iface:
    """An interface of a namespace (loopback left out)."""

    name: str
    ifindex: int
    mac: str
    kind: str  # veth, bridge, ...
    master: str  # the bridge it is a port of ("": none)
    addrs: tuple[str, ...]  # global addresses with their prefix length, IPv4 first


@dataclass(frozen=True)
class Node:
    ns: str
    role: str  # one of ROLES
    ifaces: tuple[Iface, ...]

    def iface(self, name: str) -> Iface | None:
        return next((i for i in self.ifaces if i.name == name), None)


@dataclass(frozen=True, order=True)
class Link:
    """A veth pair: (namespace, interface) at each end, the left one (by ROLES) first."""

    a_ns: str
    a_if: str
    b_ns: str
    b_if: str

    def ends(self) -> tuple[str, str]:
        return (self.a_ns, self.b_ns)


@dataclass(frozen=True)
class Topology:
    name: str
    mode: str  # bridged | routed
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    notes: tuple[str, ...] = field(default=())

    def node(self, ns: str) -> Node:
        for n in self.nodes:
            if n.ns == ns:
                return n
        raise KeyError(ns)

    def owner(self, address: str) -> str | None:
        """The namespace that holds IP *address* (without prefix), if any."""
        for n in self.nodes:
            for i in n.ifaces:
                if any(a.split("/")[0] == address for a in i.addrs):
                    return n.ns
        return None

    def owner_of_mac(self, mac: str) -> str | None:
        for n in self.nodes:
            if any(i.mac == mac.lower() for i in n.ifaces):
                return n.ns
        return None

    def link_between(self, a: str, b: str) -> Link | None:
        """The (first) link joining namespaces a and b, either way round."""
        for link in self.links:
            if {link.a_ns, link.b_ns} == {a, b}:
                return link
        return None

    def l2_way(self, a: str, b: str) -> list[str]:
        """The shortest way from namespace a to b over the links (BFS, in
        link order: the same way every time)."""
        seen = {a: ""}
        queue = deque([a])
        while queue:
            here = queue.popleft()
            if here == b:
                break
            for link in self.links:
                if here in link.ends():
                    there = link.b_ns if link.a_ns == here else link.a_ns
                    if there not in seen:
                        seen[there] = here
                        queue.append(there)
        if b not in seen:
            raise LabError(f"no link path from {a} to {b}")
        way = [b]
        while way[-1] != a:
            way.append(seen[way[-1]])
        return way[::-1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def role_of(plan: P.Plan, ns: str) -> str:
    suffix = ns[len(plan.name) + 1 :]
    if suffix == "sw":
        return "switch"
    if suffix == "host":
        return "host"
    return {"cl": "client", "fw": "firewall", "vm": "vm"}[suffix[:2]]


def _ip_json(ns: str, *args: str) -> Any:
    return json.loads(run(["ip", "-n", ns, "-j", *args]).stdout or "[]")


def _iface(raw: dict[str, Any]) -> Iface:
    addrs = [
        (a["family"] != "inet", f"{a['local']}/{a['prefixlen']}")
        for a in raw.get("addr_info", [])
        if a.get("scope") == "global"
    ]
    return Iface(
        name=raw["ifname"],
        ifindex=raw["ifindex"],
        mac=str(raw.get("address", "")).lower(),
        kind=str(raw.get("linkinfo", {}).get("info_kind", "")),
        master=str(raw.get("master", "")),
        addrs=tuple(a for _, a in sorted(addrs, key=lambda x: x[0])),
    )


def _order(plan: P.Plan, ns: str) -> tuple[int, str]:
    return (ROLES.index(role_of(plan, ns)), ns)


def discover(plan: P.Plan, namespaces: list[str] | None = None) -> Topology:
    """Reads the lab's namespaces (default: every one of the plan) as they are now."""
    names = sorted(namespaces or plan.namespaces(), key=lambda ns: _order(plan, ns))
    raw: dict[str, list[dict[str, Any]]] = {}
    nsids: dict[str, dict[int, str]] = {}
    for ns in names:
        raw[ns] = [i for i in _ip_json(ns, "-d", "addr", "show") if i.get("ifname") != "lo"]
        nsids[ns] = {e["nsid"]: e["name"] for e in _ip_json(ns, "netns", "list-id") if "name" in e}
    nodes = tuple(Node(ns, role_of(plan, ns), tuple(_iface(i) for i in raw[ns])) for ns in names)
    by_index = {(n.ns, i.ifindex): i.name for n in nodes for i in n.ifaces}
    links: set[Link] = set()
    for ns in names:
        for i in raw[ns]:
            if i.get("linkinfo", {}).get("info_kind") != "veth" or "link_index" not in i:
                continue
            peer_ns = nsids[ns].get(i["link_netnsid"], "") if "link_netnsid" in i else ns
            peer = by_index.get((peer_ns, i["link_index"]))
            if peer is None:  # the peer is outside the lab's namespaces
                continue
            a, b = sorted([(ns, i["ifname"]), (peer_ns, peer)], key=lambda e: _order(plan, e[0]))
            links.add(Link(a[0], a[1], b[0], b[1]))
    return Topology(
        plan.name,
        plan.mode,
        nodes,
        tuple(sorted(links, key=lambda k: (_order(plan, k.a_ns), _order(plan, k.b_ns), k))),
    )


def route_way(topo: Topology, src_ns: str, dst: str, stop: set[str] | None = None) -> list[str]:
    """The namespaces a packet from *src_ns* to address *dst* crosses, as the
    routing tables send it (`ip route get` in each IP hop), up to the
    namespace holding *dst* or the first one in *stop* (a firewall that
    would drop it). The L2 namespaces between two IP hops are filled in."""
    way = [src_ns]
    here = src_ns
    for _ in range(MAX_ROUTE_HOPS):
        if topo.owner(dst) == here or (stop and here in stop and here != src_ns):
            return way
        routes = _ip_json(here, "route", "get", dst)
        if not routes:
            raise LabError(f"{here} has no route to {dst}")
        nexthop = routes[0].get("gateway") or dst
        there = topo.owner(nexthop)
        if there is None:
            raise LabError(f"{here} routes {dst} via {nexthop}, which no lab namespace holds")
        way += topo.l2_way(here, there)[1:]
        here = there
    raise LabError(f"the way from {src_ns} to {dst} is longer than {MAX_ROUTE_HOPS} hops")
