"""The agent's settings: a TOML file, command-line flags on top.

A bad file raises :class:`ConfigError` naming the key and the reason.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lasthop import abi
from lasthop.errors import ConfigError, ServiceError
from lasthop.services.model import HealthCheck, Service, check_unique

__all__ = ["Config", "ConfigError", "Interface", "load", "parse_hostport", "API_SOCKET_DIR"]

API_SOCKET_DIR = Path("/run/lasthop")


def parse_hostport(text: str) -> tuple[str, int]:
    """ "127.0.0.1:9180" -> ("127.0.0.1", 9180); IPv6 in brackets: "[::1]:9180"."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (like 127.0.0.1:9180), got {text!r}")
    return host, int(port)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Interface(_Model):
    """An uplink or a VM port."""

    name: str = Field(min_length=1, max_length=abi.IFNAMSIZ - 1)
    zone: int = Field(default=0, ge=0, le=65535)


class Config(_Model):
    netns: str | None = None
    uplinks: list[Interface] = Field(default_factory=list, alias="uplink")
    vm_ports: list[Interface] = Field(default_factory=list, alias="vm_port")
    bridge: str | None = Field(default=None, max_length=abi.IFNAMSIZ - 1)
    bridge_zone: int = Field(default=0, ge=0, le=65535)
    routed: bool = False
    relearn: Literal["latest", "first"] = "latest"
    table_size: int = Field(default=abi.CONN_TABLE_SIZE, ge=1, le=1 << 27)
    idle_timeout: float = Field(
        default=600.0, gt=0, description="seconds before an idle entry is removed"
    )
    pin_root: Path | None = Field(
        default=None, description="bpffs folder for the pins; default: <bpffs>/lasthop/<netns>"
    )
    api: str | None = Field(default=None, description="HOST:PORT the REST API also serves (TCP)")
    api_socket: str | None = Field(
        default=None,
        description='unix socket of the REST API; default /run/lasthop/<netns>.sock, "" = none',
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
    vm_origin: bool = Field(
        default=True, description="remember connections VMs open, so servers' replies reach that VM"
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

    @field_validator("api")
    @classmethod
    def _check_api(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value)
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
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return _validate(data, str(path))
