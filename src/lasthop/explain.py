"""`lasthop explain`: what lasthop knows of one connection and what it will
do with its packets, in plain words (issue 11).

It costs a few map lookups, whatever the table's size: the connection's key
in both orientations (a client's request, or a VM's own connection) in the
confirmed and pending tables, and for a service the Maglev slot the data
path would hash to. Names come from where the host already keeps them: the
interface names, the neighbour table (which addresses the last-hop MAC
answers for: the firewall), the services' definitions and health.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lasthop import abi
from lasthop.connections import Connection, decode, format_mac, tunnel_str
from lasthop.endpoint import format_flow
from lasthop.errors import ConfigError

if TYPE_CHECKING:
    from lasthop.config import Config
    from lasthop.datapath import Maps
    from lasthop.scope import Decision
    from lasthop.services.manager import ServiceManager

__all__ = ["Explanation", "Query", "ServiceChoice", "explain", "parse_endpoint"]

PROTOS = {"tcp": abi.IPPROTO_TCP, "udp": abi.IPPROTO_UDP, "icmp": abi.IPPROTO_ICMP}


def parse_endpoint(text: str, what: str) -> tuple[str, int]:
    """ "10.0.0.1:80", "[fd00::1]:80", "10.0.0.1" or "fd00::1" -> (address, port or 0)."""
    host, port = text, "0"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{what} {text!r}: expected [ADDR]:PORT")
        port = rest[1:] or "0"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as err:
        raise ConfigError(f"{what} {text!r}: not an IP address") from err
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {text!r}: the port must be 0-65535")
    return str(addr), int(port)


@dataclass(frozen=True)
class Query:
    """A connection as the user names it: the client opened it to the server
    (an ICMP echo: the port is its identifier)."""

    proto: str
    client: str
    client_port: int
    server: str
    server_port: int
    zone: int = 0

    def __post_init__(self) -> None:
        if self.proto not in PROTOS:
            raise ConfigError(f"proto {self.proto!r}: one of {', '.join(PROTOS)}")
        families = {ipaddress.ip_address(a).version for a in (self.client, self.server)}
        if len(families) != 1:
            raise ConfigError("client and server: both IPv4 or both IPv6")

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.client).version

    def key(self, *, reverse: bool = False) -> abi.ConnKey:
        """The table's key of this connection, opened by the client (or, with
        *reverse*, by the server: a VM's own connection seen from the uplink)."""
        src, sport, dst, dport = (self.client, self.client_port, self.server, self.server_port)
        if reverse:
            src, sport, dst, dport = dst, dport, src, sport
        fam = socket.AF_INET if self.family == 4 else socket.AF_INET6
        proto = PROTOS[self.proto]
        if proto == abi.IPPROTO_ICMP and self.family == 6:
            proto = abi.IPPROTO_ICMPV6
        key = abi.ConnKey(proto=proto, family=self.family, zone=self.zone)
        for words, addr in ((key.saddr, src), (key.daddr, dst)):
            raw = socket.inet_pton(fam, addr)  # network order, IPv4 in the first word
            ctypes.memmove(words, raw, len(raw))
        if self.proto == "icmp":  # the echo identifier, in both port fields
            key.sport = key.dport = socket.htons(self.client_port)
        else:
            key.sport, key.dport = socket.htons(sport), socket.htons(dport)
        return key

    def describe(self) -> str:
        return format_flow(self.proto, self.client, self.client_port, self.server, self.server_port)


@dataclass
class ServiceChoice:
    """The service whose address the server is, and the VM a new connection gets."""

    name: str
    vm: str  # "" when no VM serves
    slot: int
    serving: list[str]
    not_serving: dict[str, str]  # VM port -> why (drained, health, link)


@dataclass
class Explanation:
    query: Query
    table: str = ""  # confirmed | pending | "" (no entry)
    opened_by: str = ""  # client | server (a VM's own connection)
    connection: Connection | None = None
    timeout_s: float | None = None
    left_s: float | None = None
    neighbours: list[str] = field(default_factory=list)  # addresses the last-hop MAC has
    firewall: str = ""  # the last hop's name in the config's last_hop_names
    hop_moved_to: str = ""  # lh_hop_moved: the MAC the last hop's address moved to
    hop_unreachable: bool = False  # lh_hop_moved: the last hop's neighbour entry failed
    scope: Decision | None = None  # the config's scope rules on this connection
    scope_uplink_known: bool = True  # False: rules naming an uplink were not considered
    service: ServiceChoice | None = None
    words: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["query"] = asdict(self.query) | {"family": self.query.family}
        out["scope"] = self.scope.to_json() if self.scope is not None else None
        return out


def explain(
    q: Query,
    maps: Maps,
    now: int,
    hz: int,
    services: ServiceManager | None,
    neighbours: dict[str, list[str]],
    config: Config | None = None,
) -> Explanation:
    """What the tables hold for *q* and what the data path will do with it.
    *neighbours*: MAC -> the addresses the neighbour table gives it; *config*
    (when given) names the last hops and holds the scope rules."""
    ex = Explanation(q)
    settings = maps.get_settings()
    for reverse in (False, True):
        key = q.key(reverse=reverse)
        confirmed, pending = maps.tables_for(key)  # the key's family's maps
        for name, table in (("confirmed", confirmed), ("pending", pending)):
            entry = table.lookup(key)
            if entry is not None:
                if entry.flags2 & abi.F_ENTRY2_INPLACE:  # waits in the confirmed map
                    name = "pending"
                ex.table, ex.opened_by = name, "server" if reverse else "client"
                ex.connection = decode(key, entry, now, hz, hop=maps.hop_desc)
                ex.timeout_s = float(settings.timeout[entry.state])
                ex.left_s = round(max(0.0, ex.timeout_s - ex.connection.age_s), 3)
                break
        if ex.table:
            break
    if ex.connection is not None and ex.connection.mac:
        ex.neighbours = neighbours.get(ex.connection.mac, [])
        if settings.flags & abi.F_SET_HOPS_MOVED:
            _hop_record(ex, ex.connection, maps)
    if services is not None and ex.opened_by != "server":
        ex.service = _service(q, maps, services)
    if config is not None:
        _from_config(ex, config)
    ex.words = _words_for(ex) + _scope_words(ex)
    return ex


def _hop_record(ex: Explanation, c: Connection, maps: Maps) -> None:
    """What lh_hop_moved says of the entry's last hop (one lookup), when its
    uplink follows fail-over."""
    if not c.uplink_ifindex or not maps.iface(c.uplink_ifindex).flags & abi.F_IFACE_FOLLOW_MOVES:
        return
    key = abi.hop_key(c.uplink_ifindex, bytes.fromhex(c.mac.replace(":", "")))
    raw = maps.hop_moved.lookup(bytes(key))
    if raw is None:
        return
    record = abi.HopMoved.from_buffer_copy(raw[: ctypes.sizeof(abi.HopMoved)])
    if record.flags & abi.HOP_UNREACHABLE:
        ex.hop_unreachable = True
    else:
        ex.hop_moved_to = format_mac(bytes(record.mac))


def _service(q: Query, maps: Maps, services: ServiceManager) -> ServiceChoice | None:
    from lasthop.services.lookup import matcher, read_table
    from lasthop.services.maglev import slot_of

    key = q.key()
    name = matcher(services.services)(key)
    if name is None:
        return None
    (status,) = services.status(name)
    table = read_table(maps.maglev, status.id) or []
    slot = slot_of(key)
    by_ifindex = {vm.ifindex: vm.port for vm in status.vms}
    chosen = by_ifindex.get(table[slot], "") if table else ""
    not_serving = {
        vm.port: ", ".join(
            why
            for why, bad in (
                ("drained", vm.drained),
                (f"health {vm.health}", vm.health in ("unhealthy", "down")),
                (f"link {vm.link}", vm.down),
            )
            if bad
        )
        or "not serving"
        for vm in status.vms
        if not vm.serving
    }
    serving = [vm.port for vm in status.vms if vm.serving]
    return ServiceChoice(name, chosen, slot, serving, not_serving)


def _from_config(ex: Explanation, config: Config) -> None:
    """The last hop's name, and what the scope rules say of the connection: as
    its entry has it (the uplink it came in on; a VM-opened one none), or for a
    new connection of the query (its uplink unknown)."""
    from lasthop.scope import first_match

    q, c = ex.query, ex.connection
    if c is not None and c.mac:
        ex.firewall = config.last_hop_names.get(c.mac, "")
    if c is not None:
        vm_opened = "vm_origin" in c.flags
        uplink = None if vm_opened or not c.uplink else c.uplink
        src, dst, dport, proto = c.src, c.dst, c.dport, q.key().proto
    else:
        uplink, src, dst, dport, proto = None, q.client, q.server, q.server_port, q.key().proto
        ex.scope_uplink_known = not any(r.uplink for r in config.scope_rules())
    if q.proto == "icmp":
        dport = q.client_port  # the echo identifier sits in both port fields
    ex.scope = first_match(
        config.scope_rules(), config.scope_default, uplink=uplink, zone=q.zone, src=src, dst=dst,
        proto=proto, dport=dport,
    )  # fmt: skip


def _scope_words(ex: Explanation) -> list[str]:
    s = ex.scope
    if s is None:
        return []
    which = f"rule {s.rule} ({s.text})" if s.rule else f"no rule matches ({s.text})"
    if s.action == "learn":
        out = [f"Scope: {which}: lasthop handles a connection like it."]
    elif ex.connection is not None:
        out = [
            f"Scope: {which}: a new connection like it takes the host's normal path; this "
            "entry predates the rule (`lasthop flush --out-of-scope` removes it)."
        ]
    else:
        out = [f"Scope: {which}: it takes the host's normal path, counted scope_passed."]
    if not ex.scope_uplink_known:
        out.append(
            "(Rules naming an uplink were not considered: no entry says which it arrives on.)"
        )
    return out


def _hop(c: Connection, neighbours: list[str], firewall: str = "") -> str:
    names = [f"firewall {firewall}"] if firewall else []
    names += [f"{', '.join(neighbours)} in the neighbour table"] if neighbours else []
    who = f" ({'; '.join(names)})" if names else ""
    tags = f", VLAN {'.'.join(map(str, c.vlan))}" if c.vlan else ""
    tunnel = f", through the tunnel to {tunnel_str(c)}" if c.endpoint else ""
    return f"MAC {c.mac}{who} on uplink {c.uplink}{tags}{tunnel}"


def _words_for(ex: Explanation) -> list[str]:
    q, c = ex.query, ex.connection
    back = format_flow(q.proto, q.server, q.server_port, q.client, q.client_port)
    if c is None:
        out = [f"No entry for {q.describe()} (zone {q.zone}), in either direction."]
        if ex.service is None:
            out.append(
                f"A reply ({back}) takes the host's normal path: the guest's route. A request "
                "arriving on an uplink would be learned with the MAC it came from."
            )
        return out + _service_words(ex)
    out = [
        f"{q.describe()}: a {ex.table} entry, state {c.state}, idle {c.age_s:.1f} s of its "
        f"{ex.timeout_s:.0f} s timeout ({ex.left_s:.1f} s left); {c.packets} requests, "
        f"{c.replies} replies redirected."
    ]
    if ex.opened_by == "server":
        out.append(
            f"It was opened the other way: {q.server} (VM port {c.vm_port or '?'}) connected "
            f"to {q.client}."
        )
    if c.mac:
        out.append(f"Its requests came from {_hop(c, ex.neighbours, ex.firewall)}.")
        side = "the VM's answers" if ex.opened_by == "client" else "the VM's next packets"
        out.append(
            f"So {side} ({back if ex.opened_by == 'client' else q.describe()}) go to "
            f"{c.uplink} with destination MAC {c.mac}"
            + (f", tagged {'.'.join(map(str, c.vlan))}" if c.vlan else "")
            + (f", encapsulated to {tunnel_str(c)}" if c.endpoint else "")
            + ", whatever the guest's routing says."
        )
        if ex.hop_moved_to:
            out.append(
                f"But its address moved to MAC {ex.hop_moved_to} (a fail-over): the next reply "
                "goes there, and the entry follows."
            )
        if ex.hop_unreachable:
            out.append(
                f"But MAC {c.mac} does not answer (the host's neighbour entry for it failed): "
                "replies take the host's normal path, counted hop_unreachable, until it does."
            )
    else:
        out.append(
            "Its last hop is not known yet (nothing has come back from an uplink): the VM's "
            "packets take the host's normal path until then."
        )
    if c.vm_port and ex.opened_by == "client":
        fast = " (requests go straight to it: the fast path)" if "vm_fast" in c.flags else ""
        out.append(f"It is pinned to VM port {c.vm_port}{fast}.")
    return out + _service_words(ex)


def _service_words(ex: Explanation) -> list[str]:
    s = ex.service
    if s is None:
        return []
    if ex.connection is not None:
        return [f"{ex.query.server} is service {s.name}: the entry, not Maglev, decides the VM."]
    out = [f"{ex.query.server} is service {s.name}."]
    if s.vm:
        out.append(
            f"A new connection with this tuple goes to {s.vm} (Maglev slot {s.slot} of "
            f"{abi.MAGLEV_SIZE}); serving: {', '.join(s.serving)}."
        )
    else:
        out.append("No VM serves it now: a new connection is not answered.")
    for port, why in s.not_serving.items():
        out.append(f"{port} gets no new connection: {why}.")
    return out


def neighbour_table() -> dict[str, list[str]]:
    """MAC -> addresses, from this namespace's neighbour table (pyroute2)."""
    from pyroute2 import IPRoute

    out: dict[str, list[str]] = {}
    with IPRoute() as ipr:
        for msg in ipr.get_neighbours():
            mac, dst = msg.get_attr("NDA_LLADDR"), msg.get_attr("NDA_DST")
            if mac and dst:
                out.setdefault(mac.lower(), []).append(dst)
    return {mac: sorted(addrs) for mac, addrs in out.items()}
