"""Services: virtual addresses whose connections a pool of VMs serves.

Three parts:

- the model (pydantic, also the config file's ``[[service]]`` tables):
  :class:`Service`, :class:`ServiceVm`, :class:`HealthCheck`;
- the store: a JSON state file (``/run/lasthop/<netns>/services.json``) that
  keeps the definitions, their Maglev table ids and the VMs' health across
  agent restarts and edits made while no agent runs;
- the :class:`ServiceManager`, which turns them into map contents. It writes
  (who owns what, docs/services.md):

  ===================  =====================================================
  lh_services          service address (+ proto, port) -> id
  lh_maglev[id]        the service's Maglev table: a new inner map, filled,
                       then swapped in with one update (no packet ever sees
                       a half-built table)
  lh_settings.flags    F_SET_SERVICES while any service exists
  lh_ifaces[vm]        F_IFACE_VM_DOWN (link gone or health says down),
                       vm_mac + F_IFACE_VM_MAC when the config names the MAC
  lh_conns             only when a VM leaves a pool or a service goes: the
                       entries pinned to it move (reassign) or go (drop)
  ===================  =====================================================

A VM gets new connections while it is in the pool, not drained, its port is
attached and up, and its health is up (or not yet known). Connections
already pinned to a VM stay with it through drain and failing checks; they
move only when the VM is removed or down.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lasthop import abi
from lasthop.maglev import MAGLEV_SIZE, Backend, build_table, slot_of

if TYPE_CHECKING:
    from lasthop.datapath import Maps
    from lasthop.libbpf import Map

__all__ = [
    "HealthCheck",
    "Service",
    "ServiceVm",
    "ServiceError",
    "ServiceNotFound",
    "ServiceConflict",
    "ServiceManager",
    "ServiceStore",
    "StateFile",
    "VmHealth",
    "state_path",
    "write_table",
    "read_table",
    "parse_vm",
    "STATE_DIR",
]

log = logging.getLogger("lasthop")

STATE_DIR = Path(os.environ.get("LASTHOP_STATE_DIR", "/run/lasthop"))
STATE_VERSION = 1
BPF_MAP_TYPE_ARRAY = 2
PROTO_NUMBERS = {"any": 0, "tcp": 6, "udp": 17, "icmp": 1}
IPPROTO_ICMPV6 = 58
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

Proto = Literal["tcp", "udp", "icmp", "any"]
Status = Literal["unknown", "up", "unhealthy", "down"]


class ServiceError(ValueError):
    """A service definition or change is invalid."""


class ServiceNotFound(ServiceError, LookupError):
    """No such service, or no such VM in its pool."""


class ServiceConflict(ServiceError):
    """The change collides with what exists (a name or an address already taken)."""


# ---------------------------------------------------------------- the model


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthCheck(_Model):
    """How the agent checks each VM of a pool, from the host's namespace."""

    type: Literal["tcp", "http", "none"] = Field(
        default="tcp", description="tcp: connect; http: GET path, 2xx/3xx = healthy; none"
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="port to check; default: the service's first port"
    )
    path: str = Field(default="/", description="http: the path to GET")
    interval: float = Field(default=2.0, gt=0, le=3600, description="seconds between checks")
    timeout: float = Field(default=1.0, gt=0, le=60, description="seconds a check may take")
    rise: int = Field(default=2, ge=1, le=100, description="passes in a row that bring a VM back")
    fall: int = Field(default=3, ge=1, le=100, description="failures in a row: unhealthy")
    down_after: int = Field(
        default=0,
        ge=0,
        le=10000,
        description="failures in a row after which the VM is down: its connections move; 0 = never",
    )

    @model_validator(mode="after")
    def _check(self) -> HealthCheck:
        if not self.path.startswith("/"):
            raise ValueError("path must start with '/'")
        if self.down_after and self.down_after < self.fall:
            raise ValueError(f"down_after ({self.down_after}) must be 0 or >= fall ({self.fall})")
        return self


class ServiceVm(_Model):
    """A VM in a pool: its port on the host, and how it is weighed and checked."""

    port: str = Field(
        min_length=1, max_length=abi.IFNAMSIZ - 1, description="the VM's port on the host"
    )
    weight: int = Field(default=1, ge=1, le=1000, description="share of new connections")
    address: str | None = Field(default=None, description="the VM's own address: where checks go")
    mac: str | None = Field(default=None, description="the guest's MAC; default: learned")
    drained: bool = Field(default=False, description="no new connections; existing ones stay")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else str(ipaddress.ip_address(value))

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None and not _MAC.fullmatch(value):
            raise ValueError(f"not a MAC address: {value!r}")
        return None if value is None else value.lower()


class Service(_Model):
    """A virtual address (optionally one protocol and some ports) and its pool."""

    name: str = Field(description="unique name")
    address: str = Field(description="the virtual address, IPv4 or IPv6")
    proto: Proto = Field(default="any", description='"tcp", "udp", "icmp" or "any"')
    ports: list[int] = Field(default_factory=list, description="ports (tcp/udp); none = every port")
    vms: list[ServiceVm] = Field(default_factory=list, description="the pool")
    health: HealthCheck | None = Field(default=None, description="overrides the config's [health]")

    @model_validator(mode="before")
    @classmethod
    def _default_proto(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("proto") is None and data.get("ports"):
            data = {**data, "proto": "tcp"}  # a port without a protocol means TCP
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("1-63 letters, digits, '.', '_' or '-', starting with a letter/digit")
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        addr = ipaddress.ip_address(value)
        if addr.is_multicast or addr.is_unspecified:
            raise ValueError(f"{value} cannot be a service address")
        return str(addr)

    @model_validator(mode="after")
    def _check(self) -> Service:
        if self.ports and self.proto not in ("tcp", "udp"):
            raise ValueError(f"ports need proto tcp or udp, not {self.proto!r}")
        if len(set(self.ports)) != len(self.ports) or any(not 0 < p < 65536 for p in self.ports):
            raise ValueError("ports must be distinct, 1-65535")
        names = [vm.port for vm in self.vms]
        if len(set(names)) != len(names):
            raise ValueError("a VM port may appear only once in a pool")
        return self

    @property
    def family(self) -> int:
        return abi.FAMILY_V6 if ":" in self.address else abi.FAMILY_V4

    @property
    def proto_number(self) -> int:
        if self.proto == "icmp" and self.family == abi.FAMILY_V6:
            return IPPROTO_ICMPV6
        return PROTO_NUMBERS[self.proto]

    def svc_keys(self) -> list[tuple[bytes, int, int]]:
        """(address bytes as the data path keys them, proto, port) per lh_services key."""
        raw = ipaddress.ip_address(self.address).packed.ljust(16, b"\0")
        return [(raw, self.proto_number, port) for port in (self.ports or [0])]

    def vm(self, port: str) -> ServiceVm:
        for vm in self.vms:
            if vm.port == port:
                return vm
        raise ServiceNotFound(f"service {self.name!r} has no VM {port!r}")

    def check(self, default: HealthCheck) -> HealthCheck:
        """The health check of this service's VMs, with the port filled in."""
        check = self.health or default
        if check.port is None and check.type != "none":
            if not self.ports:
                return check.model_copy(update={"type": "none"})
            check = check.model_copy(update={"port": self.ports[0]})
        return check


def parse_vm(text: str) -> ServiceVm:
    """``PORT[:WEIGHT][@ADDRESS]`` (as the CLI takes it) -> ServiceVm."""
    spec, _, address = text.partition("@")
    port, _, weight = spec.partition(":")
    try:
        return ServiceVm(port=port, weight=int(weight) if weight else 1, address=address or None)
    except (ValidationError, ValueError) as err:
        why = _first_error(err)
        raise ServiceError(f"VM {text!r}: expected PORT[:WEIGHT][@ADDRESS] ({why})") from None


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        return f"{where}: {e['msg']}" if where else str(e["msg"])
    return str(err)


def validate_service(data: dict[str, Any]) -> Service:
    """A Service from plain data; ServiceError names the first problem."""
    try:
        return Service.model_validate(data)
    except ValidationError as err:
        raise ServiceError(f"service {data.get('name', '?')!r}: {_first_error(err)}") from None


def check_unique(services: Iterable[Service]) -> None:
    """No two services share a name or an lh_services key; at most MAX_SERVICES."""
    names: set[str] = set()
    keys: dict[tuple[bytes, int, int], str] = {}
    count = 0
    for svc in services:
        count += 1
        if svc.name in names:
            raise ServiceConflict(f"two services are named {svc.name!r}")
        names.add(svc.name)
        for key in svc.svc_keys():
            if key in keys:
                raise ServiceConflict(
                    f"services {keys[key]!r} and {svc.name!r} both claim "
                    f"{_describe_key(svc, key[2])}"
                )
            keys[key] = svc.name
    if count > abi.MAX_SERVICES:
        raise ServiceError(f"at most {abi.MAX_SERVICES} services")
    if len(keys) > abi.MAX_SERVICES * 4:
        raise ServiceError(f"at most {abi.MAX_SERVICES * 4} addresses and ports over all services")


def _describe_key(svc: Service, port: int) -> str:
    where = f"[{svc.address}]" if svc.family == abi.FAMILY_V6 else svc.address
    return f"{svc.proto} {where}:{port}" if port else f"{svc.proto} {svc.address}"


# ---------------------------------------------------------------- the store


class VmHealth(BaseModel):
    """What the checks found about one VM of one service."""

    status: Status = "unknown"
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    changes: int = 0  # status changes since the service was defined
    since: float = 0.0  # wall time of the last change
    detail: str = ""  # the last check's result


class StateFile(BaseModel):
    """The state file: what survives an agent restart."""

    version: int = STATE_VERSION
    services: list[Service] = Field(default_factory=list)
    # The config's services when the agent last started: a service the config
    # still defines the same way keeps its run-time changes (drain, VMs added).
    config_services: list[Service] | None = None
    ids: dict[str, int] = Field(default_factory=dict)  # service -> its slot in lh_maglev
    # service -> port -> health
    health: dict[str, dict[str, VmHealth]] = Field(default_factory=dict)
    ifindexes: dict[str, int] = Field(default_factory=dict)  # VM port -> ifindex last seen


def state_path(netns: str) -> Path:
    return STATE_DIR / netns / "services.json"


class ServiceStore:
    """The state file; written whole to a temporary file, then renamed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> StateFile | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            state = StateFile.model_validate_json(text)
        except ValidationError as err:
            why = _first_error(err)
            raise ServiceError(f"{self.path}: not a lasthop state file: {why}") from None
        if state.version != STATE_VERSION:
            raise ServiceError(f"{self.path}: version {state.version}, expected {STATE_VERSION}")
        return state

    def save(self, state: StateFile) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(state.model_dump_json(indent=1, exclude_none=True) + "\n")
        os.replace(tmp, self.path)


def merge(config_services: list[Service], state: StateFile | None) -> list[Service]:
    """The services to run: the config's, with the run-time changes made since
    (kept while the config defines that service as it did at the last start).
    Services added at run time stay; services the config no longer has go."""
    if state is None or state.config_services is None:
        runtime = [] if state is None else list(state.services)
        names = {s.name for s in config_services}
        return list(config_services) + [s for s in runtime if s.name not in names]
    old = {s.name: s for s in state.config_services}
    new = {s.name: s for s in config_services}
    current = {s.name: s for s in state.services}
    out: list[Service] = []
    for name, svc in new.items():
        if old.get(name) == svc:
            if name in current:  # unchanged in the config: keep run-time edits (or its removal)
                out.append(current[name])
        else:
            out.append(svc)  # new or changed in the config: the config wins
    out += [s for name, s in current.items() if name not in old and name not in new]
    return out


# ---------------------------------------------------------------- the maps


def _u32(n: int) -> bytes:
    return struct.pack("=I", n)


_SLOT_KEYS = array("I", range(MAGLEV_SIZE)).tobytes()


def write_table(maglev: Map, service_id: int, table: list[int]) -> None:
    """Swaps *table* in as lh_maglev[service_id]: a new inner map, filled in
    one batched write, then put in the outer map with one update."""
    from lasthop import libbpf

    if len(table) != MAGLEV_SIZE:
        raise ValueError(f"a Maglev table has {MAGLEV_SIZE} slots, not {len(table)}")
    fd = libbpf.map_create(BPF_MAP_TYPE_ARRAY, f"lh_maglev_{service_id}", 4, 4, MAGLEV_SIZE)
    try:
        libbpf.Map(fd).update_batch(_SLOT_KEYS, array("I", table).tobytes(), MAGLEV_SIZE)
        maglev.update(_u32(service_id), _u32(fd))  # the swap: the outer map now holds the new table
    finally:
        os.close(fd)  # the outer map keeps the inner one alive


def read_table(maglev: Map, service_id: int) -> list[int] | None:
    """The table lh_maglev[service_id] holds, or None."""
    from lasthop import libbpf

    raw = maglev.lookup(_u32(service_id))
    if raw is None:
        return None
    inner = libbpf.Map(libbpf.map_get_fd_by_id(struct.unpack("=I", raw[:4])[0]), owned=True)
    try:
        table = [0] * MAGLEV_SIZE
        for key, value in inner.items(batch=MAGLEV_SIZE):
            table[struct.unpack("=I", key)[0]] = struct.unpack("=I", value[:4])[0]
        return table
    finally:
        inner.close()


def _svc_key(addr: bytes, proto: int, port: int, family: int) -> bytes:
    key = abi.SvcKey(port=socket.htons(port), proto=proto, family=family)
    ctypes.memmove(key.addr, addr, 16)
    return bytes(key)


# ---------------------------------------------------------------- links


@dataclass(frozen=True)
class PortState:
    """A VM port as the manager sees it now."""

    ifindex: int  # 0: no such interface
    attached: bool  # lh_ifaces says role VM port
    link_up: bool  # operationally up (True when unknown)

    @property
    def usable(self) -> bool:
        return bool(self.ifindex) and self.attached and self.link_up

    @property
    def text(self) -> str:
        if not self.ifindex:
            return "missing"
        if not self.attached:
            return "not-attached"
        return "up" if self.link_up else "down"


def _ifindex(port: str) -> int:
    try:
        return socket.if_nametoindex(port)
    except OSError:
        return 0


def link_states() -> dict[str, bool]:
    """Interface name -> operationally up, for this namespace (netlink)."""
    from pyroute2 import IPRoute

    out = {}
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            state = msg.get_attr("IFLA_OPERSTATE") or "UNKNOWN"
            out[msg.get_attr("IFLA_IFNAME")] = state not in ("DOWN", "LOWERLAYERDOWN", "NOTPRESENT")
    return out


# ---------------------------------------------------------------- the manager


@dataclass(frozen=True)
class VmStatus:
    port: str
    ifindex: int
    weight: int
    address: str | None
    drained: bool
    health: Status
    link: str
    serving: bool  # gets new connections
    down: bool  # its connections move (or drop)
    slots: int  # Maglev slots it holds
    changes: int
    since: float
    detail: str

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ServiceStatus:
    service: Service
    id: int
    vms: list[VmStatus]

    def to_json(self) -> dict[str, object]:
        svc = self.service
        return {
            "name": svc.name,
            "id": self.id,
            "address": svc.address,
            "proto": svc.proto,
            "ports": svc.ports,
            "health": svc.health.model_dump() if svc.health else None,
            "vms": [vm.to_json() for vm in self.vms],
        }


MapsSource = Callable[[], AbstractContextManager["Maps | None"]]


class ServiceManager:
    """The services of one namespace: model, state file and maps kept in step.

    *open_maps* yields the data path's maps, or None when nothing is pinned
    (then only the state file changes; the next agent applies it). Every
    method holds *lock* (the controller's), so the API thread, the health
    checks and the agent loop never interleave map writes.
    """

    def __init__(
        self,
        netns: str,
        open_maps: MapsSource,
        *,
        lock: threading.RLock | None = None,
        path: Path | None = None,
    ) -> None:
        self.netns = netns
        self.store = ServiceStore(path or state_path(netns))
        self._open_maps = open_maps
        self._lock = lock or threading.RLock()
        self._state = self.store.load() or StateFile()
        self._tables: dict[int, list[int]] = {}  # what lh_maglev holds, as this process wrote it
        self._links: dict[str, bool] | None = None  # None: not watched (no agent): assume up
        self._observed: dict[str, int] = {}  # VM port -> ifindex at the last refresh
        self.default_health = HealthCheck()
        self.health_changes = 0  # status changes seen by this process

    # -- reading -------------------------------------------------------------
    @property
    def services(self) -> list[Service]:
        return list(self._state.services)

    def get(self, name: str) -> Service:
        for svc in self._state.services:
            if svc.name == name:
                return svc
        raise ServiceNotFound(f"no service named {name!r}")

    def health_of(self, name: str, port: str) -> VmHealth:
        return self._state.health.setdefault(name, {}).setdefault(port, VmHealth())

    def status(self, name: str | None = None) -> list[ServiceStatus]:
        with self._lock:
            chosen = [self.get(name)] if name else self._state.services
            with self._maps() as maps:
                ports = self._port_states(maps)
            out = []
            for svc in chosen:
                sid = self._state.ids.get(svc.name, -1)
                table = self._tables.get(sid)
                counts: dict[int, int] = {}
                for value in table or []:
                    counts[value] = counts.get(value, 0) + 1
                vms = []
                for vm in svc.vms:
                    ps = ports[vm.port]
                    h = self.health_of(svc.name, vm.port)
                    vms.append(
                        VmStatus(
                            port=vm.port,
                            ifindex=ps.ifindex,
                            weight=vm.weight,
                            address=vm.address,
                            drained=vm.drained,
                            health=h.status,
                            link=ps.text,
                            serving=self._serving(svc, vm, ps),
                            down=self._down(vm.port, ps),
                            slots=counts.get(ps.ifindex, 0) if ps.ifindex else 0,
                            changes=h.changes,
                            since=h.since,
                            detail=h.detail,
                        )
                    )
                out.append(ServiceStatus(svc, sid, vms))
            return out

    # -- changing --------------------------------------------------------------
    def start(self, config_services: Iterable[Service], health: HealthCheck) -> None:
        """The agent starts: merge the config's services into the state file's,
        and write every table, key and flag (tables are rebuilt, not trusted)."""
        with self._lock:
            config_services = list(config_services)
            check_unique(config_services)
            self.default_health = health
            self._links = link_states()
            state = self.store.load() or StateFile()
            services = merge(config_services, state)
            check_unique(services)
            state.services = services
            state.config_services = config_services
            self._state = state
            self._tables.clear()
            self._sync(force=True)
            self._save()
            if services:
                log.info("services: %s", ", ".join(s.name for s in services))
            for st in self.status():
                for vm in st.vms:
                    if vm.link != "up":
                        log.warning(
                            "service %s: VM port %s is %s: it gets no connections",
                            st.service.name,
                            vm.port,
                            vm.link,
                        )

    def add(self, service: Service) -> ServiceStatus:
        """A new service (ServiceConflict if the name or an address is taken)."""
        with self._lock:
            if any(s.name == service.name for s in self._state.services):
                raise ServiceConflict(
                    f"service {service.name!r} exists: remove it first, "
                    "or add VMs with `service add NAME --vm PORT`"
                )
            check_unique([*self._state.services, service])
            self._state.services.append(service)
            self._changed(
                f"service {service.name} added ({_describe_key(service, 0)}, "
                f"VMs {', '.join(v.port for v in service.vms) or 'none'})"
            )
            return self.status(service.name)[0]

    def add_vms(self, name: str, vms: Iterable[ServiceVm]) -> ServiceStatus:
        with self._lock:
            svc = self.get(name)
            new = list(vms)
            for vm in new:
                if any(v.port == vm.port for v in svc.vms):
                    raise ServiceConflict(f"{vm.port!r} is already in the pool of {name!r}")
            self._replace(svc.model_copy(update={"vms": [*svc.vms, *new]}))
            self._changed(f"service {name}: VMs {', '.join(v.port for v in new)} added")
            return self.status(name)[0]

    def remove(self, name: str) -> int:
        """Removes a service; its connections are forgotten (their packets are
        routed as usual from then on). Returns how many."""
        with self._lock:
            self.get(name)
            match = self._matcher(self._state.services)  # as the data path found them
            self._state.services = [s for s in self._state.services if s.name != name]
            self._state.health.pop(name, None)
            gone = self._state.ids.pop(name)
            removed = 0
            with self._maps() as maps:
                if maps is not None:
                    self._sync_maps(maps, force=False, drop_ids={gone})  # keys and table go first
                    removed = self._forget_connections(maps, lambda k: match(k) == name)
            self._save()
            log.warning("service %s removed (%d connections forgotten)", name, removed)
            return removed

    def remove_vms(self, name: str, ports: Iterable[str]) -> dict[str, int]:
        """Takes VMs out of a pool; their connections move to the VMs left
        (on_vm_down = reassign) or are forgotten (drop). Returns counts."""
        with self._lock:
            svc = self.get(name)
            gone = list(dict.fromkeys(ports))
            for port in gone:
                svc.vm(port)
            self._replace(
                svc.model_copy(update={"vms": [v for v in svc.vms if v.port not in gone]})
            )
            for port in gone:
                self._state.health.get(name, {}).pop(port, None)
            moved = {"moved": 0, "dropped": 0}
            with self._maps() as maps:
                if maps is not None:
                    self._sync_maps(maps, force=False)  # the new table first: moves follow it
                    ifindexes = {_ifindex(p) or self._state.ifindexes.get(p, 0) for p in gone} - {0}
                    moved = self._move_connections(maps, self.get(name), ifindexes)
            self._save()
            log.warning(
                "service %s: VMs %s removed (connections: %d moved, %d dropped)",
                name,
                ", ".join(gone),
                moved["moved"],
                moved["dropped"],
            )
            return moved

    def set_drained(self, name: str, ports: Iterable[str], drained: bool) -> ServiceStatus:
        """Drain: no new connections, existing ones stay. Undrain: back in."""
        with self._lock:
            svc = self.get(name)
            wanted = set(ports)
            for port in wanted:
                svc.vm(port)
            vms = [
                v.model_copy(update={"drained": drained}) if v.port in wanted else v
                for v in svc.vms
            ]
            self._replace(svc.model_copy(update={"vms": vms}))
            self._changed(
                f"service {name}: {', '.join(sorted(wanted))} "
                f"{'drained' if drained else 'undrained'}"
            )
            return self.status(name)[0]

    def report(self, name: str, port: str, ok: bool, detail: str) -> Status | None:
        """A health check's result; returns the new status when it changed."""
        with self._lock:
            try:
                svc = self.get(name)
                svc.vm(port)
            except ServiceNotFound:
                return None  # removed while the check ran
            check = svc.check(self.default_health)
            h = self.health_of(name, port)
            h.detail = detail
            old = h.status
            if ok:
                h.successes, h.failures = h.successes + 1, 0
                if old == "unknown" or (old != "up" and h.successes >= check.rise):
                    h.status = "up"
            else:
                h.failures, h.successes = h.failures + 1, 0
                if old == "unknown" or (old == "up" and h.failures >= check.fall):
                    h.status = "unhealthy"
                if check.down_after and h.failures >= check.down_after:
                    h.status = "down"
            if h.status == old:
                return None
            h.changes += 1
            h.since = time.time()
            self.health_changes += 1
            level = logging.INFO if old == "unknown" and h.status == "up" else logging.WARNING
            log.log(level, "service %s: VM %s %s -> %s (%s)", name, port, old, h.status, detail)
            self._changed(None)
            return h.status

    def refresh_links(self) -> bool:
        """Re-reads the VM ports' link states; re-applies when one changed."""
        with self._lock:
            mine = {vm.port for s in self._state.services for vm in s.vms}
            if not mine:
                return False  # nothing to watch: no netlink dump every second
            links = link_states()
            old = self._links or {}
            now = {p: _ifindex(p) for p in mine}
            changed = [
                p
                for p in sorted(mine)
                if links.get(p) != old.get(p) or now[p] != self._observed.get(p)
            ]
            self._links = links
            self._observed = now
            for p in changed:
                state = "missing" if p not in links else ("up" if links[p] else "down")
                log.warning("VM port %s is %s (ifindex %d)", p, state, now[p])
            if changed:
                self._changed(None)
            else:
                with self._maps() as maps:
                    if maps is not None:
                        self._mark_gone(maps)  # a port's removal may have cleared the mark
            return bool(changed)

    def sync(self) -> None:
        """Writes the maps from the model again (after interfaces changed)."""
        with self._lock:
            self._sync(force=False)
            self._save()

    # -- internals -------------------------------------------------------------
    @contextlib.contextmanager
    def _maps(self) -> Iterator[Maps | None]:
        from lasthop.datapath import NotAttachedError

        try:
            cm = self._open_maps()
            maps = cm.__enter__()
        except NotAttachedError:
            yield None
            return
        try:
            yield maps
        finally:
            cm.__exit__(None, None, None)

    def _replace(self, svc: Service) -> None:
        self._state.services = [svc if s.name == svc.name else s for s in self._state.services]

    def _changed(self, what: str | None) -> None:
        self._sync(force=False)
        self._save()
        if what:
            log.info("%s", what)

    def _save(self) -> None:
        mine = {vm.port for s in self._state.services for vm in s.vms}
        self._state.ifindexes = {p: i for p, i in self._state.ifindexes.items() if p in mine}
        pools = {s.name: {vm.port for vm in s.vms} for s in self._state.services}
        self._state.health = {
            name: {p: h for p, h in ports.items() if p in pools[name]}
            for name, ports in self._state.health.items()
            if name in pools
        }
        if self._state.services or self.store.path.exists():  # no services, no file
            self.store.save(self._state)

    def _sync(self, *, force: bool) -> None:
        self._assign_ids()
        with self._maps() as maps:
            if maps is not None:
                self._sync_maps(maps, force=force)

    def _assign_ids(self) -> None:
        names = {s.name for s in self._state.services}
        self._state.ids = {n: i for n, i in self._state.ids.items() if n in names}
        used = set(self._state.ids.values())
        free = (i for i in range(abi.MAX_SERVICES) if i not in used)
        for svc in self._state.services:
            if svc.name not in self._state.ids:
                self._state.ids[svc.name] = next(free)

    def _port_states(self, maps: Maps | None) -> dict[str, PortState]:
        out = {}
        for svc in self._state.services:
            for vm in svc.vms:
                ifindex = _ifindex(vm.port)
                attached = bool(ifindex) and (
                    maps is None or maps.iface(ifindex).role == abi.Role.VM_PORT
                )
                up = True if self._links is None else self._links.get(vm.port, True)
                out[vm.port] = PortState(ifindex, attached, up)
        return out

    def _serving(self, svc: Service, vm: ServiceVm, ps: PortState) -> bool:
        status = self.health_of(svc.name, vm.port).status
        return ps.usable and not vm.drained and status in ("unknown", "up")

    def _down(self, port: str, ps: PortState) -> bool:
        """A VM is down when its port is gone or down, or when every service
        it serves has found it down."""
        if not ps.ifindex or not ps.link_up:
            return True
        statuses = [
            self.health_of(s.name, port).status
            for s in self._state.services
            if any(v.port == port for v in s.vms)
        ]
        return bool(statuses) and all(st == "down" for st in statuses)

    def _sync_maps(self, maps: Maps, *, force: bool, drop_ids: Iterable[int] = ()) -> None:
        """Tables, then keys, then VM flags, then the flag; stale keys and
        tables go last. A table never names a VM that is down, so the data
        path never reassigns a connection to one."""
        ports = self._port_states(maps)
        for svc in self._state.services:
            sid = self._state.ids[svc.name]
            backends = [
                Backend(vm.port, ports[vm.port].ifindex, vm.weight)
                for vm in svc.vms
                if self._serving(svc, vm, ports[vm.port])
            ]
            table = build_table(backends)
            if force or self._tables.get(sid) != table:
                write_table(maps.maglev, sid, table)
                self._tables[sid] = table
        wanted: dict[bytes, int] = {}
        for svc in self._state.services:
            for addr, proto, port in svc.svc_keys():
                wanted[_svc_key(addr, proto, port, svc.family)] = self._state.ids[svc.name]
        for key, sid in wanted.items():
            maps.services.update(key, bytes(abi.SvcInfo(id=sid)))
        self._sync_vm_ports(maps, ports)
        settings = maps.get_settings()
        flags = settings.flags & ~abi.F_SET_SERVICES | (abi.F_SET_SERVICES if wanted else 0)
        if flags != settings.flags:
            settings.flags = flags
            maps.set_settings(settings)
        for key in list(maps.services.keys()):
            if key not in wanted:
                maps.services.delete(key)
        ids = set(self._state.ids.values())
        stale = set(range(abi.MAX_SERVICES)) if force else {*self._tables, *drop_ids}
        for sid in sorted(stale - ids):
            maps.maglev.delete(_u32(sid))
            self._tables.pop(sid, None)

    def _sync_vm_ports(self, maps: Maps, ports: dict[str, PortState]) -> None:
        macs = {vm.port: vm.mac for s in self._state.services for vm in s.vms if vm.mac}
        self._mark_gone(maps)  # before the new ifindexes replace the old ones
        for port, ps in ports.items():
            if ps.ifindex:
                self._state.ifindexes[port] = ps.ifindex
            if not ps.attached:
                continue
            cfg = maps.iface(ps.ifindex)
            before = bytes(cfg)
            down = self._down(port, ps)
            cfg.flags = cfg.flags & ~abi.F_IFACE_VM_DOWN | (abi.F_IFACE_VM_DOWN if down else 0)
            mac = macs.get(port)
            if mac:
                ctypes.memmove(cfg.vm_mac, bytes.fromhex(mac.replace(":", "")), abi.ETH_ALEN)
                cfg.flags |= abi.F_IFACE_VM_MAC
            if bytes(cfg) != before:
                maps.set_iface(ps.ifindex, cfg)
                if (abi.IfaceCfg.from_buffer_copy(before).flags ^ cfg.flags) & abi.F_IFACE_VM_DOWN:
                    log.warning(
                        "VM port %s %s",
                        port,
                        "down: its connections move"
                        if down
                        else "up again: it serves its connections",
                    )

    def _mark_gone(self, maps: Maps) -> None:
        """A VM port that went away (or came back as a new interface) leaves
        connections pinned to its old ifindex: mark that ifindex down so the
        data path moves them, unless another interface has it now."""
        for port, old in self._state.ifindexes.items():
            if old == _ifindex(port):
                continue
            cfg = maps.iface(old)
            if cfg.role == abi.Role.NONE and not cfg.flags & abi.F_IFACE_VM_DOWN:
                maps.set_iface(old, abi.IfaceCfg(flags=abi.F_IFACE_VM_DOWN))
                log.warning("VM port %s (ifindex %d) is gone: its connections move", port, old)

    @staticmethod
    def _matcher(services: Iterable[Service]) -> Callable[[abi.ConnKey], str | None]:
        """key -> name of the service its first packet found (as svc_find does)."""
        keys: dict[tuple[bytes, int, int, int], str] = {}
        for svc in services:
            for addr, proto, port in svc.svc_keys():
                keys[(addr, proto, port, svc.family)] = svc.name

        def match(k: abi.ConnKey) -> str | None:
            addr = bytes(k.daddr)
            if k.proto in (6, 17):
                name = keys.get((addr, k.proto, socket.ntohs(k.dport), k.family))
                if name:
                    return name
            return keys.get((addr, k.proto, 0, k.family)) or keys.get((addr, 0, 0, k.family))

        return match

    def _move_connections(self, maps: Maps, svc: Service, ifindexes: set[int]) -> dict[str, int]:
        """Entries of *svc* pinned to *ifindexes*: to the table's choice now
        (reassign), or deleted (drop, or no VM left)."""
        from lasthop import libbpf

        drop = bool(maps.get_settings().flags & abi.F_SET_VM_DOWN_DROP)
        table = self._tables.get(self._state.ids[svc.name]) or [0] * MAGLEV_SIZE
        match = self._matcher(self._state.services)
        moved = dropped = 0
        for key, entry in list(maps.entries()):
            if entry.vm_ifindex not in ifindexes or entry.flags & abi.F_ENTRY_VM_ORIGIN:
                continue
            if match(key) != svc.name:
                continue
            # read-modify-write: a packet between the two may lose its refresh
            new = table[slot_of(key)]
            if drop or not new:
                dropped += maps.delete(key)
                continue
            entry.vm_ifindex = new
            try:
                maps.conns.update(bytes(key), bytes(entry), libbpf.BPF_EXIST)
                moved += 1
            except libbpf.BpfError:
                pass  # evicted meanwhile
        if moved:
            maps.add_counter(0, abi.Counter.SVC_REASSIGNED, moved)
        if dropped:
            maps.add_counter(0, abi.Counter.AGENT_REMOVED, dropped)
        return {"moved": moved, "dropped": dropped}

    def _forget_connections(self, maps: Maps, ours: Callable[[abi.ConnKey], bool]) -> int:
        """Deletes the service connections *ours* picks (VM-opened ones stay)."""
        removed = 0
        for key, entry in list(maps.entries()):
            if entry.vm_ifindex and not entry.flags & abi.F_ENTRY_VM_ORIGIN and ours(key):
                removed += maps.delete(key)
        if removed:
            maps.add_counter(0, abi.Counter.AGENT_REMOVED, removed)
        return removed
