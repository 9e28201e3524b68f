"""The agent's settings: a TOML file, command-line flags on top.

A bad file raises :class:`ConfigError` naming the key and the reason.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    IPvAnyNetwork,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lasthop import abi, configfile
from lasthop.abi import State
from lasthop.errors import ConfigError, ServiceError
from lasthop.scope import ScopeRule
from lasthop.services.model import HealthCheck, Service, check_unique

__all__ = [
    "Config",
    "ConfigError",
    "Interface",
    "Timeouts",
    "load",
    "is_loopback",
    "parse_hostport",
    "API_SOCKET_DIR",
]

API_SOCKET_DIR = Path("/run/lasthop")


def is_loopback(host: str) -> bool:
    """Whether *host* (an address, or "localhost") is this host's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def parse_hostport(text: str) -> tuple[str, int]:
    """ "127.0.0.1:9180" -> ("127.0.0.1", 9180); IPv6 in brackets: "[::1]:9180"."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (like 127.0.0.1:9180), got {text!r}")
    return host, int(port)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MacAddress = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$", to_lower=True),
]


class Interface(_Model):
    """An uplink or a VM port."""

    name: str = Field(min_length=1, max_length=abi.IFNAMSIZ - 1)
    zone: int = Field(default=0, ge=0, le=65535)
    addresses: list[IPvAnyAddress] = Field(
        default_factory=list,
        description="VM port: the only addresses its VM may open connections from "
        "(none: learned from the VM's answers to clients)",
    )
    allow_last_hops: list[MacAddress] = Field(
        default_factory=list,
        description="uplink: only these MACs are learned as last hops (the firewalls); "
        "frames from any other take the host's normal path, counted with their MAC",
    )
    deny_last_hops: list[MacAddress] = Field(
        default_factory=list,
        description="uplink: these MACs are never learned as last hops",
    )
    allow_endpoints: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="tunnel uplink (VXLAN, Geneve): only requests from these remote endpoints "
        "(prefixes) are learned; any other takes the host's normal path, counted with it",
    )
    deny_endpoints: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="tunnel uplink: requests from these remote endpoints are never learned",
    )
    follow_failover: bool = Field(
        default=False,
        description="uplink: when a firewall address in firewall_addresses moves to another MAC "
        "(gratuitous ARP, unsolicited NA), replies of the old MAC's connections go to the new "
        "one at once (docs/failover.md)",
    )
    firewall_addresses: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="uplink: the firewalls' addresses (prefixes) whose announcements may move "
        "last hops; announcements of any other address move nothing",
    )
    learn: bool = Field(
        default=True,
        description="uplink: false = lasthop learns no new connection arriving here: they take "
        "the host's normal path, counted scope_passed (a scope rule ahead of [[scope]])",
    )

    peer_redirect: bool | None = Field(
        default=None,
        description="VM port: override the host's peer_redirect for this port",
    )

    mpls: bool = Field(
        default=False,
        description="uplink: the firewalls hand requests over under MPLS labels (up to 3 above "
        "IPv4/IPv6): an XDP program takes them off, each connection's stack is learned and "
        "put back on its replies (docs/datapath.md, MPLS)",
    )

    @model_validator(mode="after")
    def _failover_needs_addresses(self) -> Interface:
        if self.follow_failover and not self.firewall_addresses:
            raise ValueError(
                "follow_failover needs firewall_addresses: the prefixes of the firewalls' "
                "shared addresses (any host on the segment can announce an address)"
            )
        return self

    @model_validator(mode="after")
    def _one_list(self) -> Interface:
        if self.allow_last_hops and self.deny_last_hops:
            raise ValueError(
                "allow_last_hops and deny_last_hops: give one list, not both (an allow-list "
                "already refuses every MAC it does not name)"
            )
        n = len(self.allow_last_hops) + len(self.deny_last_hops)
        if n > abi.MAX_LISTED_HOPS:
            raise ValueError(f"at most {abi.MAX_LISTED_HOPS} last hops listed, not {n}")
        if self.allow_endpoints and self.deny_endpoints:
            raise ValueError(
                "allow_endpoints and deny_endpoints: give one list, not both (an allow-list "
                "already refuses every endpoint it does not name)"
            )
        return self


# Longest timeout: ages are 32-bit jiffies differences, and the data path caps
# timeouts at 2^30 jiffies (12.4 days at HZ=1000).
MAX_TIMEOUT = 1_000_000.0


def _timeout(default: float, what: str) -> float:
    return Field(default=default, gt=0, le=MAX_TIMEOUT, description=what)


class Timeouts(_Model):
    """Seconds an entry may stay idle, by the state of its connection
    (docs/config.md says why each default)."""

    tcp_syn: float = _timeout(60.0, "SYN sent, or answered, handshake not complete")
    tcp_established: float = _timeout(7440.0, "handshake completed (or mid-stream answered)")
    tcp_midstream: float = _timeout(600.0, "first seen mid-stream, not yet answered")
    tcp_closing: float = _timeout(120.0, "FIN from one side")
    tcp_closed: float = _timeout(10.0, "RST, or FIN from both sides")
    udp_new: float = _timeout(30.0, "UDP (and other protocols): not answered")
    udp_answered: float = _timeout(30.0, "answered once; the opener has not spoken again")
    udp_stream: float = _timeout(180.0, "answered, and the opener spoke again")
    icmp: float = _timeout(30.0, "ICMP echo")

    def by_state(self) -> dict[int, float]:
        """enum conn_state value -> seconds (lasthop.abi.State)."""
        return {
            State.NONE: self.tcp_established,  # entries from before states existed
            State.TCP_SYN_SENT: self.tcp_syn,
            State.TCP_SYN_RECV: self.tcp_syn,
            State.TCP_MIDSTREAM: self.tcp_midstream,
            State.TCP_ESTABLISHED: self.tcp_established,
            State.TCP_CLOSING: self.tcp_closing,
            State.TCP_CLOSED: self.tcp_closed,
            State.UDP_NEW: self.udp_new,
            State.UDP_ANSWERED: self.udp_answered,
            State.UDP_STREAM: self.udp_stream,
            State.ICMP_NEW: self.icmp,
            State.ICMP_ANSWERED: self.icmp,
        }


class Config(_Model):
    netns: str | None = None
    uplinks: list[Interface] = Field(default_factory=list, alias="uplink")
    vm_ports: list[Interface] = Field(default_factory=list, alias="vm_port")
    bridge: str | None = Field(default=None, max_length=abi.IFNAMSIZ - 1)
    bridge_zone: int = Field(default=0, ge=0, le=65535)
    routed: bool = False
    relearn: Literal["latest", "first"] = "latest"
    table_size: int = Field(
        default=abi.CONN_TABLE_SIZE,
        ge=1,
        le=1 << 27,
        description="confirmed IPv4 connections the table holds",
    )
    pending_table_size: int | None = Field(
        default=None,
        ge=1,
        le=1 << 27,
        description="new IPv4 connections not yet confirmed (LRU); default table_size / 4",
    )
    table_size_v6: int | None = Field(
        default=None,
        ge=1,
        le=1 << 27,
        description="confirmed IPv6 connections the table holds; default table_size / 4",
    )
    pending_table_size_v6: int | None = Field(
        default=None,
        ge=1,
        le=1 << 27,
        description="new IPv6 connections not yet confirmed (LRU); default pending_table_size / 4",
    )
    pending_in_place: int | None = Field(
        default=None,
        ge=0,
        le=1 << 27,
        description="new IPv4 connections that may wait, unconfirmed, in the confirmed table "
        "itself (sized table_size + this, so they never take a confirmed connection's room): "
        "confirmed there by clearing a bit, no move; beyond it, or with sync on, the pending "
        "LRU as before. Default: a quarter of pending_table_size with sync off (0 with sync on, "
        "or the room a pinned table already has); 0 = off (docs/table.md)",
    )
    timeouts: Timeouts = Field(default_factory=Timeouts, description="idle timeouts by state")
    expiry_interval: float = Field(
        default=1.0,
        ge=0.1,
        le=3600,
        description="seconds between runs of the kernel's expiry pass: an entry goes at most "
        "about this after its timeout (docs/table.md); a run walks the table (~200-450 ns an "
        "entry) only when it changed or a walk is due, else it costs nothing",
    )
    idle_timeout: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT,
        description="replaced by timeouts.tcp_established (still honoured, with a warning)",
    )
    vm_origin_quota: int = Field(
        default=16384, ge=1, le=1 << 27, description="entries each VM port may open (vm_origin)"
    )
    tc_hook: Literal["auto", "tcx", "clsact"] = Field(
        default="auto",
        description="how the programs go on the interfaces' tc hooks: tcx links (kernel 6.6+; "
        "no qdisc, ~85 ns a packet less on a routed host in `bench lab`), clsact filters "
        "(older kernels, or tools that expect `tc filter show` to list them), auto: tcx "
        "where the kernel has it",
    )
    pin_root: Path | None = Field(
        default=None, description="bpffs folder for the pins; default: <bpffs>/lasthop/<netns>"
    )
    api_tokens: Path | None = Field(
        default=None,
        description="TOML file of the API's tokens (read-only or read-write); with it, every "
        "request over TCP needs `Authorization: Bearer TOKEN` (docs/operations.md)",
    )
    api: str | None = Field(default=None, description="HOST:PORT the REST API also serves (TCP)")
    api_socket: str | None = Field(
        default=None,
        description='unix socket of the REST API; default /run/lasthop/<netns>.sock, "" = none',
    )
    api_socket_group: str | None = Field(
        default=None,
        min_length=1,
        description="group owning the unix socket (mode 0660): its members may drive the API",
    )

    services: list[Service] = Field(
        default_factory=list,
        alias="service",
        description="virtual addresses served by pools of VMs",
    )
    health: HealthCheck = Field(default_factory=HealthCheck, description="how VMs are checked")
    fast_path: bool = Field(
        default=True, description="bridged host: requests skip the bridge to the VM that answered"
    )
    peer_redirect: bool = Field(
        default=True,
        description="a VM port that is a veth with its guest end in another namespace: "
        "requests lasthop sends to the VM (fast path, services) go straight into the guest "
        "end's ingress (bpf_redirect_peer), not out of the host end: its egress qdisc, tc "
        "egress filters and a capture on it do not see them (docs/datapath.md)",
    )
    vm_origin: bool = Field(
        default=True, description="remember connections VMs open, so servers' replies reach that VM"
    )
    sync: str | None = Field(
        default=None,
        description="redis://HOST:PORT/DB: replicate the table with the cluster (docs/ha.md)",
    )
    sync_cluster: str = Field(
        default="default",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="the cluster's name: its hosts share one stream",
    )
    sync_host: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="this host's id in the cluster; default <hostname>/<netns>",
    )
    last_hop_names: dict[MacAddress, str] = Field(
        default_factory=dict,
        description="MAC -> name of the firewall (or router) it is: `explain` names last hops so",
    )
    scope: list[ScopeRule] = Field(
        default_factory=list,
        description="which new connections lasthop handles: rules, first match wins "
        "(docs/config.md, Scope)",
    )
    scope_default: Literal["learn", "pass"] = Field(
        default="learn", description="what a new connection no scope rule matches gets"
    )
    on_vm_down: Literal["reassign", "drop"] = Field(
        default="reassign", description="connections of a VM removed or down: move or drop them"
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("services")
    @classmethod
    def _check_services(cls, value: list[Service]) -> list[Service]:
        try:
            check_unique(value)
        except ServiceError as err:
            raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _idle_timeout_is_established(self) -> Config:
        if self.idle_timeout is not None and self.idle_timeout != self.timeouts.tcp_established:
            logging.getLogger("lasthop").warning(
                "idle_timeout is replaced by timeouts.tcp_established (the kernel now expires "
                "entries by connection state); using tcp_established = %g",
                self.idle_timeout,
            )
            timeouts = self.timeouts.model_copy(update={"tcp_established": self.idle_timeout})
            object.__setattr__(self, "timeouts", timeouts)
        return self

    @field_validator("uplinks")
    @classmethod
    def _no_delivery_on_uplinks(cls, value: list[Interface]) -> list[Interface]:
        for link in value:
            if link.peer_redirect is not None:
                raise ValueError(
                    f"{link.name}: peer_redirect is for VM ports (how requests reach a VM; "
                    "replies leave an uplink by its own device)"
                )
        return value

    @field_validator("vm_ports")
    @classmethod
    def _no_hop_lists_on_vm_ports(cls, value: list[Interface]) -> list[Interface]:
        for port in value:
            if port.allow_last_hops or port.deny_last_hops:
                raise ValueError(
                    f"{port.name}: allow_last_hops and deny_last_hops are for uplinks "
                    "(a VM port's packets are replies, not requests through a last hop)"
                )
            if port.allow_endpoints or port.deny_endpoints:
                raise ValueError(
                    f"{port.name}: allow_endpoints and deny_endpoints are for tunnel uplinks "
                    "(a VM port's packets are replies, not requests through a last hop)"
                )
            if port.mpls:
                raise ValueError(
                    f"{port.name}: mpls is for uplinks (requests arrive labelled there; "
                    "a VM gets its frames without labels)"
                )
            if port.follow_failover or port.firewall_addresses:
                raise ValueError(
                    f"{port.name}: follow_failover and firewall_addresses are for uplinks "
                    "(the firewalls announce their addresses there)"
                )
            if not port.learn:
                raise ValueError(
                    f"{port.name}: learn is for uplinks (a VM port's connections are "
                    'scoped by [[scope]] rules without an uplink, scope_default = "pass")'
                )
        return value

    def scope_rules(self) -> list[ScopeRule]:
        """The scope rules in force, in order: a pass of every uplink with
        ``learn = false``, then the ``[[scope]]`` rules."""
        passes = [ScopeRule(action="pass", uplink=u.name) for u in self.uplinks if not u.learn]
        return [*passes, *self.scope]

    def lists_endpoints(self) -> bool:
        """Whether some uplink lists tunnel endpoints (F_SET_ENDPOINTS)."""
        return any(u.allow_endpoints or u.deny_endpoints for u in self.uplinks)

    def scoped(self) -> bool:
        """Whether the data path must match new connections at all."""
        return bool(self.scope_rules()) or self.scope_default == "pass"

    @model_validator(mode="after")
    def _endpoints_fit(self) -> Config:
        n = sum(
            len(u.allow_endpoints) + len(u.deny_endpoints) + (2 if u.allow_endpoints else 0)
            for u in self.uplinks
        )
        if n > abi.MAX_LISTED_ENDPOINTS:
            raise ValueError(
                f"at most {abi.MAX_LISTED_ENDPOINTS} endpoints listed over all uplinks (each "
                f"allow-list takes two more), not {n}"
            )
        return self

    @model_validator(mode="after")
    def _scope_names_uplinks(self) -> Config:
        names = {u.name for u in self.uplinks}
        for n, rule in enumerate(self.scope):
            if rule.uplink is not None and rule.uplink not in names:
                raise ValueError(
                    f"scope[{n}].uplink: {rule.uplink!r} is not an uplink of the config "
                    f"({', '.join(sorted(names)) or 'none'})"
                )
        n = len(self.scope_rules())
        if n >= abi.MAX_SCOPE_RULES:
            raise ValueError(
                f"scope: at most {abi.MAX_SCOPE_RULES - 1} rules, uplinks with learn = false "
                f"counted (the default takes the last of {abi.MAX_SCOPE_RULES} slots), not {n}"
            )
        return self

    @field_validator("sync")
    @classmethod
    def _check_sync(cls, value: str | None) -> str | None:
        if value is not None:
            from lasthop.sync.replicator import check_url

            check_url(value)
        return value

    @field_validator("api")
    @classmethod
    def _check_api(cls, value: str | None, info: ValidationInfo) -> str | None:
        """HOST:PORT; an address other than loopback only with a token file
        (api_tokens comes before api, so it is validated already)."""
        if value is not None:
            host, _ = parse_hostport(value)
            if not is_loopback(host) and info.data.get("api_tokens") is None:
                raise ValueError(
                    f"refusing to serve the API on {value}: not a loopback address, and no "
                    "api_tokens file names who may use it (docs/operations.md)"
                )
        return value

    @field_validator("api_socket_group")
    @classmethod
    def _check_group(cls, value: str | None) -> str | None:
        if value is not None:
            import grp

            try:
                grp.getgrnam(value)
            except KeyError:
                raise ValueError(f"no group named {value!r} on this host") from None
        return value

    def api_socket_path(self, netns: str) -> Path | None:
        """Where the unix socket of the REST API goes; None = no socket."""
        if self.api_socket == "":
            return None
        return Path(self.api_socket) if self.api_socket else API_SOCKET_DIR / f"{netns}.sock"

    def merged(self, **flags: object) -> Config:
        """This config with command-line values on top (None and empty = keep)."""
        data = self.model_dump(by_alias=False)
        for key, value in flags.items():
            if value is None or value == [] or value == ():
                continue
            if key in ("uplinks", "vm_ports") and isinstance(value, list | tuple):
                names = {i["name"] for i in data[key]}
                data[key] = data[key] + [{"name": n, "zone": 0} for n in value if n not in names]
            else:
                data[key] = value
        return _validate(data, "command line")


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validate(data: dict[str, object], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        lines = [f"{source}: key '{_where(e['loc'])}': {e['msg']}" for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None


def load(path: Path | None) -> Config:
    """Reads *path* (TOML), or the defaults when None."""
    if path is None:
        return Config()
    return _validate(configfile.read(path), str(path))
