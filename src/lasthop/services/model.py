"""The service model: what the config's ``[[service]]`` tables, the state
file, the REST API and the CLI all describe (pydantic, no libbpf).

A :class:`Service` is a virtual address (optionally one protocol and some
ports) served by a pool of :class:`ServiceVm`; :class:`HealthCheck` says how
its VMs are checked. :func:`check_unique` keeps two services from claiming
the same ``lh_services`` key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lasthop import abi
from lasthop.endpoint import format_endpoint
from lasthop.errors import ServiceConflict, ServiceError, ServiceNotFound

__all__ = [
    "HealthCheck",
    "Service",
    "ServiceVm",
    "Proto",
    "Status",
    "check_unique",
    "describe_key",
    "first_error",
    "parse_vm",
    "validate_service",
]

PROTO_NUMBERS = {"any": 0, "tcp": abi.IPPROTO_TCP, "udp": abi.IPPROTO_UDP, "icmp": abi.IPPROTO_ICMP}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

Proto = Literal["tcp", "udp", "icmp", "any"]
Status = Literal["unknown", "up", "unhealthy", "down"]


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
            return abi.IPPROTO_ICMPV6
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
        why = first_error(err)
        raise ServiceError(f"VM {text!r}: expected PORT[:WEIGHT][@ADDRESS] ({why})") from None


def first_error(err: Exception) -> str:
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
        raise ServiceError(f"service {data.get('name', '?')!r}: {first_error(err)}") from None


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
                    f"{describe_key(svc, key[2])}"
                )
            keys[key] = svc.name
    if count > abi.MAX_SERVICES:
        raise ServiceError(f"at most {abi.MAX_SERVICES} services")
    if len(keys) > abi.MAX_SERVICES * 4:
        raise ServiceError(f"at most {abi.MAX_SERVICES * 4} addresses and ports over all services")


def describe_key(svc: Service, port: int) -> str:
    return (
        f"{svc.proto} {format_endpoint(svc.address, port)}"
        if port
        else f"{svc.proto} {svc.address}"
    )
