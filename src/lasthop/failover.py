"""Instant fail-over: replies follow a firewall's address to its new MAC (issue 11, item 3).

When a firewall pair fails over, the new active unit announces the shared
address from its own MAC: a gratuitous ARP, an unsolicited neighbour
advertisement. Requests re-learn their last hop on the next packet anyway;
a server that speaks first would still send to the dead MAC. On the uplinks
that opt in (``uplink[].follow_failover``), a thread of the agent reads the
ARP and NA frames arriving there (an AF_PACKET socket per uplink, with a
classic BPF filter so nothing else wakes it), learns which address each
MAC announces, and when an address moves from MAC A to MAC B writes A -> B
into lh_hop_moved; the data path (bpf/failover.h) rewrites each entry of A
on its next reply. The agent never reads the connection table for it.

The segment is hostile: any host on it can send a gratuitous ARP for the
firewall's address. Only an announcement of an address in the uplink's
``firewall_addresses`` from a MAC its ``allow_last_hops`` / ``deny_last_hops``
let be a last hop moves anything (and only on an uplink that opted in).

A record is retired when its old MAC announces again (it is alive: A -> B,
then B -> A, leaves B -> A alone) or after the longest timeout, when no
entry can still hold the old MAC. Chains stay resolved: A -> B then B -> C
is written A -> C and B -> C, so the data path needs one lookup.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lasthop import abi
from lasthop.connections import format_mac

if TYPE_CHECKING:
    from lasthop.config import Config
    from lasthop.controller import Controller
    from lasthop.neighwatch import NeighbourEvent, NeighbourWatch
    from lasthop.routewatch import RouteLookup, RouteWatch

__all__ = [
    "Announcement",
    "EndpointSink",
    "EndpointsDown",
    "FailoverWatch",
    "HopMoves",
    "Policy",
    "parse_announcement",
    "policies_of",
]

log = logging.getLogger("lasthop")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NEIGHBOUR_TABLE = "entry of the host's neighbour table"  # a move's source, as logged
WAIT = 1.0  # s: longest wait for frames before looking at retirements and the uplinks
MAX_OWNERS = 4096  # (uplink, address) -> MAC remembered; the oldest goes first
ICMP6_NA = 136
ND_OPT_TARGET_LLADDR = 2
PACKET_OUTGOING = 4  # sll_pkttype of a frame this host sends
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26

# Classic BPF on the uplink's socket: ARP, or ICMPv6 type 136 (NA) right after
# the IPv6 header; anything else never reaches the agent. (code, jt, jf, k)
ANNOUNCEMENT_FILTER = (
    (0x28, 0, 0, 12),  # ldh [12]            ethertype
    (0x15, 5, 0, 0x0806),  # jeq ARP         -> accept
    (0x15, 0, 5, 0x86DD),  # jeq IPv6, else  -> drop
    (0x30, 0, 0, 20),  # ldb [20]            next header
    (0x15, 0, 3, 58),  # jeq ICMPv6, else    -> drop
    (0x30, 0, 0, 54),  # ldb [54]            ICMPv6 type
    (0x15, 0, 1, ICMP6_NA),  # jeq NA        -> accept, else drop
    (0x06, 0, 0, 0x40000),  # accept: ret 256 KiB
    (0x06, 0, 0, 0),  # drop: ret 0
)


@dataclass(frozen=True)
class Announcement:
    """A host on an uplink said: *address* is at *mac*."""

    ifindex: int
    address: IPAddress
    mac: bytes


def parse_announcement(frame: bytes, ifindex: int) -> Announcement | None:
    """The binding an ARP (its sender's) or a neighbour advertisement (its
    target's) states; None for anything else, or when the frame's own source
    MAC is not the one it names (a frame about someone else moves nothing)."""
    import dpkt  # at the first frame, not at every agent's start (~40 ms of imports)

    try:
        eth = dpkt.ethernet.Ethernet(frame)
    except (dpkt.UnpackError, struct.error):
        return None
    data = eth.data
    if isinstance(data, dpkt.arp.ARP):
        if data.hrd != dpkt.arp.ARP_HRD_ETH or data.pro != dpkt.ethernet.ETH_TYPE_IP:
            return None
        if len(data.sha) != 6 or len(data.spa) != 4 or data.sha != eth.src:
            return None
        addr: IPAddress = ipaddress.IPv4Address(data.spa)
        if addr.is_unspecified:  # an address probe (RFC 5227) announces nothing
            return None
        return Announcement(ifindex, addr, bytes(data.sha))
    if isinstance(data, dpkt.ip6.IP6) and data.nxt == dpkt.ip.IP_PROTO_ICMP6:
        if data.hlim != 255:  # RFC 4861 7.1.2: not from the link itself
            return None
        icmp = data.data
        if not isinstance(icmp, dpkt.icmp6.ICMP6) or icmp.type != ICMP6_NA:
            return None
        body = bytes(icmp.data)
        if len(body) < 20:
            return None
        target = ipaddress.IPv6Address(body[4:20])
        mac = _target_lladdr(body[20:]) or bytes(eth.src)
        if mac != eth.src:
            return None
        return Announcement(ifindex, target, mac)
    return None


def _target_lladdr(options: bytes) -> bytes | None:
    """The target link-layer address option of an NA's options, if any."""
    while len(options) >= 8:
        kind, length = options[0], options[1] * 8
        if length == 0 or length > len(options):
            return None
        if kind == ND_OPT_TARGET_LLADDR and length == 8:
            return options[2:8]
        options = options[length:]
    return None


@dataclass(frozen=True)
class Policy:
    """What an uplink that opted in lets move an entry: announcements of an
    address in *prefixes*, from a MAC its allow-list names (or its deny-list
    does not)."""

    prefixes: tuple[IPNetwork, ...]
    allow: frozenset[bytes] = frozenset()
    deny: frozenset[bytes] = frozenset()

    def covers(self, address: IPAddress) -> bool:
        """Whether *address* is a firewall's (in firewall_addresses)."""
        return any(address in p for p in self.prefixes if p.version == address.version)

    def refuses(self, ann: Announcement) -> str | None:
        """Why *ann* may move nothing; None when it may."""
        if not self.covers(ann.address):
            return "address not in firewall_addresses"
        if self.allow and ann.mac not in self.allow:
            return "MAC not in allow_last_hops"
        if ann.mac in self.deny:
            return "MAC in deny_last_hops"
        return None


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def policies_of(config: Config, index_of: Callable[[str], int | None]) -> dict[int, Policy]:
    """ifindex -> Policy of every uplink whose config sets follow_failover."""
    out = {}
    for up in config.uplinks:
        if not up.follow_failover:
            continue
        ifindex = index_of(up.name)
        if ifindex is None:
            continue
        out[ifindex] = Policy(
            prefixes=tuple(up.firewall_addresses),
            allow=frozenset(_mac(m) for m in up.allow_last_hops),
            deny=frozenset(_mac(m) for m in up.deny_last_hops),
        )
    return out


HopKey = tuple[int, bytes]  # (uplink ifindex, MAC)


class Sink:
    """Where HopMoves writes: lh_hop_moved (through the controller)."""

    def put(self, key: HopKey, new: bytes) -> None: ...

    def put_unreachable(self, key: HopKey) -> None: ...

    def delete(self, key: HopKey) -> None: ...


@dataclass
class HopMoves:
    """Who announces which address, and the moves that follows (no I/O here:
    *sink* writes lh_hop_moved). Bounded: MAX_OWNERS addresses and
    abi.MAX_MOVED_HOPS records."""

    sink: Sink
    policies: dict[int, Policy] = field(default_factory=dict)
    owners: OrderedDict[tuple[int, IPAddress], bytes] = field(default_factory=OrderedDict)
    moved: dict[HopKey, tuple[bytes, float]] = field(default_factory=dict)  # -> (new MAC, since)
    unreachable: dict[HopKey, float] = field(default_factory=dict)  # -> since (neighbour FAILED)
    refused: Counter[tuple[int, str, str]] = field(default_factory=Counter)  # (if, MAC, why)
    seen: int = 0

    def see(self, ann: Announcement, now: float, source: str = "announcement") -> bool:
        """Takes one announcement (*source*: what said it, for the log); True
        when it moved a last hop."""
        policy = self.policies.get(ann.ifindex)
        if policy is None:
            return False
        why = policy.refuses(ann)
        if why is not None:
            key = (ann.ifindex, format_mac(ann.mac), why)
            if not self.refused[key]:
                log.warning(
                    "failover: ignored an %s of %s from %s on ifindex %d: %s",
                    source, ann.address, format_mac(ann.mac), ann.ifindex, why,
                )  # fmt: skip
            self.refused[key] += 1
            return False
        self.seen += 1
        here = (ann.ifindex, ann.mac)
        if here in self.moved:  # it speaks: alive again, its entries stay its own
            self._retire(here, "announces again")
        if here in self.unreachable:  # it answers again: its entries are used again
            self._retire(here, "reachable again")
            log.warning(
                "failover: %s on ifindex %d answers again: replies of its connections go to it",
                format_mac(ann.mac), ann.ifindex,
            )  # fmt: skip
        where = (ann.ifindex, ann.address)
        old = self.owners.pop(where, None)
        self.owners[where] = ann.mac
        while len(self.owners) > MAX_OWNERS:
            self.owners.popitem(last=False)
        if old is None or old == ann.mac:
            return False
        self._move((ann.ifindex, old), ann.mac, now, ann.address, source)
        return True

    def lost(self, ifindex: int, address: IPAddress, now: float) -> bool:
        """The host's neighbour entry for *address* on uplink *ifindex* failed
        (FAILED, INCOMPLETE): the MAC that owns it no longer answers, so its
        entries stop being used until it is valid again (a record with
        HOP_UNREACHABLE). True when that wrote a record. The same trust as an
        announcement: only a firewall address, on an uplink that opted in."""
        policy = self.policies.get(ifindex)
        if policy is None or not policy.covers(address):
            return False
        mac = self.owners.get((ifindex, address))
        if mac is None:
            return False  # no MAC known to own it: nothing is sent to it by us
        key = (ifindex, mac)
        if key in self.moved or key in self.unreachable:
            return False  # its entries already go elsewhere, or nowhere
        if len(self.moved) + len(self.unreachable) >= abi.MAX_MOVED_HOPS:
            self._make_room()
        self.unreachable[key] = now
        self.sink.put_unreachable(key)
        log.warning(
            "failover: %s at %s on ifindex %d does not answer (neighbour entry failed): "
            "replies of its connections take the host's routing until it does",
            address, format_mac(mac), ifindex,
        )  # fmt: skip
        return True

    def _make_room(self) -> None:
        """Retires the oldest record of either kind."""
        ages = {k: since for k, (_, since) in self.moved.items()} | self.unreachable
        oldest = min(ages, key=lambda k: ages[k])
        self._retire(oldest, "no room")

    def _move(self, old: HopKey, new: bytes, now: float, address: IPAddress, source: str) -> None:
        ifindex = old[0]
        self.unreachable.pop(old, None)  # the move's record takes its place
        # chains: whatever pointed to the old MAC now points to the new one
        for key, (to, _) in list(self.moved.items()):
            if key[0] == ifindex and to == old[1]:
                self._record(key, new, now)
        self._record(old, new, now)
        log.warning(
            "failover: %s moved from %s to %s on ifindex %d (%s): its connections' replies follow",
            address, format_mac(old[1]), format_mac(new), ifindex, source,
        )  # fmt: skip

    def _record(self, key: HopKey, new: bytes, now: float) -> None:
        if key not in self.moved and len(self.moved) + len(self.unreachable) >= abi.MAX_MOVED_HOPS:
            self._make_room()
        self.moved[key] = (new, now)
        self.sink.put(key, new)

    def _retire(self, key: HopKey, why: str) -> None:
        self.moved.pop(key, None)
        self.unreachable.pop(key, None)
        self.sink.delete(key)
        log.info("failover: record %s on ifindex %d retired: %s", format_mac(key[1]), key[0], why)

    def retire_older(self, now: float, max_age: float) -> int:
        """Retires records older than *max_age* seconds (the longest timeout:
        no entry can still hold their old MAC). Returns how many."""
        old = [k for k, (_, since) in self.moved.items() if now - since > max_age]
        old += [k for k, since in self.unreachable.items() if now - since > max_age]
        for key in old:
            self._retire(key, "older than the longest timeout")
        return len(old)

    def set_policies(self, policies: dict[int, Policy]) -> None:
        """New config: records and owners of uplinks that no longer opt in go."""
        self.policies = policies
        for key in [k for k in [*self.moved, *self.unreachable] if k[0] not in policies]:
            self._retire(key, "uplink no longer follows fail-over")
        for where in [w for w in self.owners if w[0] not in policies]:
            del self.owners[where]

    def adopt(self, records: Iterable[tuple[HopKey, bytes, bool]], now: float) -> None:
        """Records a previous agent left in lh_hop_moved ((uplink, MAC), new MAC,
        unreachable): kept, retired on the usual rules."""
        for key, new, unreachable in records:
            if key[0] not in self.policies:
                self.sink.delete(key)
            elif unreachable:
                self.unreachable[key] = now
            else:
                self.moved[key] = (new, now)


def announcement_socket(ifindex: int) -> socket.socket:
    """An AF_PACKET socket that receives the ARP and NA frames arriving on
    *ifindex*; the filter is on before the socket is bound, so nothing
    else is ever queued."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing yet
    try:
        insns = b"".join(struct.pack("HBBI", *i) for i in ANNOUNCEMENT_FILTER)
        buf = ctypes.create_string_buffer(insns)
        prog = struct.pack("HL", len(ANNOUNCEMENT_FILTER), ctypes.addressof(buf))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
        sock.bind((socket.if_indextoname(ifindex), ETH_P_ALL))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class EndpointSink:
    """Where EndpointsDown writes: lh_endpoints_down (through the controller)."""

    def __init__(self, controller: Controller | None) -> None:
        self._c = controller

    def set(self, address: IPAddress, down: bool) -> None:
        if self._c is not None:
            self._c.set_endpoint_down(address, down)


NEIGHBOUR_FAILED = "neighbour entry failed"  # why an endpoint is down, as logged
NO_ROUTE = "no route"


@dataclass
class EndpointsDown:
    """Tunnel endpoints that do not answer (item 4 for tunnels), as
    lh_endpoints_down holds them: at most abi.MAX_ENDPOINTS_DOWN, the oldest
    retired first. Two reasons, either enough: the endpoint's neighbour entry
    failed (cleared when it names a MAC again, is deleted -- the kernel
    collects a FAILED entry after a while: the endpoint is tried again -- or
    is older than the longest timeout), or the host has no route toward it
    (lasthop.routewatch; cleared when a route is back). The record goes with
    its last reason."""

    sink: EndpointSink
    down: OrderedDict[IPAddress, float] = field(default_factory=OrderedDict)
    why: dict[IPAddress, set[str]] = field(default_factory=dict)

    def see(self, ev: NeighbourEvent, now: float) -> None:
        if ev.mac is None and not ev.deleted:
            self._mark(ev.address, NEIGHBOUR_FAILED, now)
        elif ev.address in self.down:
            self._clear(
                ev.address, NEIGHBOUR_FAILED, "forgotten" if ev.deleted else "answers again"
            )

    def routes(self, routed: dict[IPAddress, bool], now: float) -> None:
        """The routes toward the endpoints the data path knows (endpoint ->
        whether the host routes toward it), as one check found them."""
        for address, ok in routed.items():
            if not ok:
                self._mark(address, NO_ROUTE, now)
            elif address in self.down:
                self._clear(address, NO_ROUTE, "a route toward it is back")

    def _mark(self, address: IPAddress, reason: str, now: float) -> None:
        why = self.why.setdefault(address, set())
        if reason in why:
            return
        why.add(reason)
        if address not in self.down:
            while len(self.down) >= abi.MAX_ENDPOINTS_DOWN:
                self._retire(next(iter(self.down)), "no room")
            self.down[address] = now
            self.sink.set(address, True)
        log.warning(
            "failover: %s does not answer (%s): replies through it as "
            "a tunnel endpoint take the host's routing until it does",
            address,
            reason,
        )

    def _clear(self, address: IPAddress, reason: str, how: str) -> None:
        why = self.why.get(address, set())
        why.discard(reason)
        if not why:
            self._retire(address, how)

    def _retire(self, address: IPAddress, why: str) -> None:
        del self.down[address]
        self.why.pop(address, None)
        self.sink.set(address, False)
        log.warning("failover: endpoint %s is used again: %s", address, why)

    def unrouted(self) -> set[IPAddress]:
        """The endpoints down for want of a route (each check asks again)."""
        return {a for a, why in self.why.items() if NO_ROUTE in why}

    def adopt(self, addresses: Iterable[IPAddress], now: float) -> None:
        """Records a previous agent left: read as failed neighbours (retired as
        usual; the first route check marks again those with no route)."""
        for address in addresses:
            self.down[address] = now
            self.why[address] = {NEIGHBOUR_FAILED}

    def retire_older(self, now: float, max_age: float) -> int:
        """Failed-neighbour reasons older than *max_age* go; an endpoint with
        no route stays down until a route is back. Returns how many retired."""
        old = [a for a, since in self.down.items() if now - since > max_age]
        retired = 0
        for address in old:
            if NEIGHBOUR_FAILED in self.why.get(address, {NEIGHBOUR_FAILED}):
                self._clear(address, NEIGHBOUR_FAILED, "older than the longest timeout")
                retired += address not in self.down
        return retired


class ControllerSink(Sink):
    def __init__(self, controller: Controller) -> None:
        self._c = controller

    def put(self, key: HopKey, new: bytes) -> None:
        self._c.set_hop_moved(key[0], key[1], new)

    def put_unreachable(self, key: HopKey) -> None:
        self._c.set_hop_moved(key[0], key[1], key[1], unreachable=True)

    def delete(self, key: HopKey) -> None:
        self._c.set_hop_moved(key[0], key[1], None)


class FailoverWatch:
    """The agent's thread: reads announcements on the uplinks that follow
    fail-over, and the host's neighbour table (lasthop.neighwatch), and
    keeps lh_hop_moved as HopMoves decides."""

    def __init__(self, controller: Controller) -> None:
        self._c = controller
        self.moves = HopMoves(ControllerSink(controller))
        self._socks: dict[int, socket.socket] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._config: Config | None = None
        self._neigh: NeighbourWatch | None = None
        # neighbour device (the uplink, or the bridge it is a port of) -> its uplinks
        self._neigh_uplinks: dict[int, tuple[int, ...]] = {}
        self._tunnels = False  # a tunnel uplink is attached: endpoints are followed
        self._routes: RouteWatch | None = None  # route changes, while _tunnels
        self._route_cursor: tuple[int, Any] = (0, None)  # the last endpoint a partial check asked
        # (neighbour device, firewall address) -> the MAC its entry last named (None: failed)
        self._neigh_macs: dict[tuple[int, IPAddress], bytes | None] = {}
        self.endpoints = EndpointsDown(EndpointSink(controller))

    def start(self) -> None:
        now = time.monotonic()
        self.moves.adopt(self._c.hops_moved(), now)
        self.endpoints.adopt(self._c.endpoints_down(), now)  # a previous agent's
        self._sync_uplinks()
        self._thread = threading.Thread(target=self._run, name="lasthop-failover", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join()
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
        if self._neigh is not None:
            self._neigh.close()
        if self._routes is not None:
            self._routes.close()
        self._wake_r.close()
        self._wake_w.close()

    def _sync_uplinks(self) -> None:
        """Sockets and policies as the running config says (after a reload too)."""
        config = self._c.config
        if config is self._config or config is None:
            return
        self._config = config
        attached = {name: i for i, name in self._c.attached_now().uplinks.items()}
        policies = policies_of(config, attached.get)
        self.moves.set_policies(policies)
        for ifindex in [i for i in self._socks if i not in policies]:
            self._socks.pop(ifindex).close()
        for ifindex in policies:
            if ifindex not in self._socks:
                try:
                    self._socks[ifindex] = announcement_socket(ifindex)
                except OSError as err:
                    log.error("failover: cannot read announcements on ifindex %d: %s", ifindex, err)
        self._neigh_uplinks = self._neighbour_devices(policies)
        self._tunnels = any(
            link.kind in (abi.LinkKind.VXLAN, abi.LinkKind.GENEVE)
            for link in self._c.links.all()
            if link.index in attached.values()
        )
        self._follow_neighbours(bool(policies) or self._tunnels)
        self._follow_routes(self._tunnels)
        self._seed()

    def _follow_neighbours(self, wanted: bool) -> None:
        """Opens the neighbour event socket (before the seed dump: no change
        between is missed) only while something needs it: a bridge's FDB
        churn arrives there too, and a host that follows nothing pays nothing."""
        from lasthop.neighwatch import NeighbourWatch

        if wanted and self._neigh is None:
            self._neigh = NeighbourWatch()
        elif not wanted and self._neigh is not None:
            self._neigh.close()
            self._neigh = None
            self._neigh_macs.clear()

    def _follow_routes(self, wanted: bool) -> None:
        """Opens the route event socket while a tunnel uplink is attached (its
        first check is due at once: the seed); closed, no endpoint stays down
        for want of a route."""
        from lasthop.routewatch import RouteWatch

        if wanted and self._routes is None:
            self._routes = RouteWatch()
        elif not wanted and self._routes is not None:
            self._routes.close()
            self._routes = None
            self.endpoints.routes(dict.fromkeys(self.endpoints.unrouted(), True), time.monotonic())

    def check_routes(self, now: float, routed: RouteLookup | None = None) -> bool:
        """One check of the routes toward the endpoints the data path knows
        (lh_hop_descs' tunnel descriptors) and those down for want of one:
        *routed* answers, or the kernel (RTM_GETROUTE) when None. At most
        MAX_ROUTE_CHECKS lookups (~0.5 ms each) beside the unrouted ones, the
        next in address order after the last: True when some are left for
        the next check."""
        from lasthop.routewatch import MAX_ROUTE_CHECKS, endpoint_routed, routed_endpoints

        unrouted = self.endpoints.unrouted()
        known = sorted(self._c.tunnel_endpoints() - unrouted, key=lambda a: (a.version, a))
        after = [a for a in known if (a.version, a) > self._route_cursor]
        pool = after or known  # from the start again once the last partial check reached the end
        batch, left = pool[:MAX_ROUTE_CHECKS], len(pool) > MAX_ROUTE_CHECKS
        self._route_cursor = (batch[-1].version, batch[-1]) if left and batch else (0, None)
        endpoints = unrouted | set(batch)
        if routed is None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                found = routed_endpoints(endpoints, lambda address: endpoint_routed(ipr, address))
        else:
            found = routed_endpoints(endpoints, routed)
        self.endpoints.routes(found, now)
        return left

    def _neighbour_devices(self, policies: dict[int, Policy]) -> dict[int, tuple[int, ...]]:
        """Neighbour device -> the uplinks its entries speak for: each uplink
        itself, and the bridge it is a port of (one read of the links)."""
        out: dict[int, list[int]] = {}
        for link in self._c.links.all() if policies else ():
            if link.index in policies:
                out.setdefault(link.index, []).append(link.index)
                if link.master:
                    out.setdefault(link.master, []).append(link.index)
        return {dev: tuple(ups) for dev, ups in out.items()}

    def _seed(self) -> None:
        """One dump of the neighbour devices' entries: who owns which address
        (and, for an owner known before, a move or a failure)."""
        if self._neigh is None or not self._neigh_uplinks:
            return
        from lasthop.neighwatch import NeighbourWatch

        now = time.monotonic()
        for ev in NeighbourWatch.dump(self._neigh_uplinks):
            self._neighbour(ev, now)

    def _neighbour(self, ev: NeighbourEvent, now: float) -> None:
        """One neighbour event, for each uplink it speaks for: only a firewall
        address counts (the rest of the table is no one's concern here)."""
        if self._tunnels:
            self.endpoints.see(ev, now)
        if ev.deleted:
            return  # forgotten: nothing said of a last hop
        uplinks = [
            u
            for u in self._neigh_uplinks.get(ev.ifindex, ())
            if (policy := self.moves.policies.get(u)) is not None and policy.covers(ev.address)
        ]
        if not uplinks:
            return
        # Only a change of the table's own word counts: an entry going REACHABLE
        # -> STALE -> DELAY still naming A must not undo a move to B seen on the
        # wire before the table (which may ignore an update within its locktime)
        # caught up. Bounded: firewall addresses only.
        where = (ev.ifindex, ev.address)
        before = self._neigh_macs.get(where, b"")
        self._neigh_macs[where] = ev.mac
        if ev.mac == before:
            return
        for uplink in uplinks:
            if ev.mac is None:
                self.moves.lost(uplink, ev.address, now)
            else:
                self.moves.see(Announcement(uplink, ev.address, ev.mac), now, NEIGHBOUR_TABLE)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # the agent goes on without it rather than stop forwarding
                log.exception("following fail-overs failed; stopped following")
                return

    def _step(self) -> None:
        neigh = [self._neigh.sock] if self._neigh is not None else []
        routes = [self._routes.sock] if self._routes is not None else []
        wait = WAIT
        due = self._routes.wait(time.monotonic()) if self._routes is not None else None
        if due is not None:  # a route check waits for its gap to end
            wait = min(wait, due)
        ready, _, _ = select.select(
            [self._wake_r, *neigh, *routes, *self._socks.values()], [], [], wait
        )
        now = time.monotonic()
        if self._routes is not None:
            if self._routes.sock in ready:
                self._routes.read()
            if self._routes.due(now):  # at most once per gap, however many changes
                more = False
                try:
                    more = self.check_routes(now)
                except Exception:  # the next change asks again; fail-over goes on meanwhile
                    log.exception(
                        "failover: checking the routes toward the tunnel endpoints failed"
                    )
                self._routes.checked(now, time.monotonic() - now)
                self._routes.pending = more  # the rest, after the gap
        if self._neigh is not None and self._neigh.sock in ready:
            for ev in self._neigh.events():
                self._neighbour(ev, now)
            if self._neigh.lost_events:
                self._neigh.lost_events = False
                self._seed()
        for ifindex, sock in list(self._socks.items()):
            if sock not in ready:
                continue
            while True:
                try:
                    frame, addr = sock.recvfrom(2048)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                ann = parse_announcement(frame, ifindex)
                if ann is not None:
                    self.moves.see(ann, now)
        config = self._c.config
        if config is not None:
            longest = max(config.timeouts.by_state().values())
            self.moves.retire_older(now, longest + config.expiry_interval)
            self.endpoints.retire_older(now, longest + config.expiry_interval)
        self._sync_uplinks()
